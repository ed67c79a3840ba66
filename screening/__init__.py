"""The screening worker: inbox -> model -> database -> per-visit PDF report, plus audit queries."""
