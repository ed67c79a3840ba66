# Plain runner. `make run` starts the worker, `make test` runs lint (ruff), types (mypy) and the whole suite;
# both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config.toml
# pytest-xdist workers for `make test`: one per core; TEST_WORKERS=0 runs the suite in this one process
TEST_WORKERS ?= auto

.PHONY: run once test train evaluate bench clean

$(VENV)/.installed: pyproject.toml scripts/system-deps.sh
	./scripts/system-deps.sh
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/dr-screen --config $(CONFIG) run

once: $(VENV)/.installed
	$(VENV)/bin/dr-screen --config $(CONFIG) run --once

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

train: $(VENV)/.installed
	$(VENV)/bin/dr-train --config $(CONFIG) train

evaluate: $(VENV)/.installed
	$(VENV)/bin/dr-train --config $(CONFIG) evaluate --checkpoint models/baseline.pt --split test

clean:
	rm -rf .cache runs work archive rejected screening.db* .pytest_cache
