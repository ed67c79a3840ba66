"""Grade stage: admitted jobs in batches -> predictions, one forward pass per batch.

Batch k+1 is prepared (the evaluation preset; with a grader, its image measurements) in a helper thread
while batch k finishes (masks, Grad-CAM) and is stored: single-threaded work that leaves a core free
(BENCHMARKS.md, fourth round). A batch whose preparation or forward fails comes back with its error and
no predictions; the other batches go on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..inference import Predictor, PreparedBatch
from .outcomes import GradedBatch, Job


class GradeStage:
    def __init__(self, predictor: Predictor, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.predictor = predictor
        self.batch_size = batch_size

    def split(self, jobs: Sequence[Job]) -> list[list[Job]]:
        """The batches ``jobs`` go through the model in, in order."""
        return [list(jobs[i:i + self.batch_size]) for i in range(0, len(jobs), self.batch_size)]

    def _prepare(self, batch: list[Job]) -> tuple[PreparedBatch, float]:
        t0 = time.perf_counter()
        prepared = self.predictor.prepare([j.decoded.rgb for j in batch])
        return prepared, time.perf_counter() - t0

    def grade(self, batches: Sequence[list[Job]]) -> Iterator[GradedBatch]:
        """Each batch's predictions, in order, as soon as they are ready (the next batch is being prepared
        meanwhile)."""
        if not batches:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
            upcoming: Future[tuple[PreparedBatch, float]] | None = pool.submit(self._prepare, batches[0])
            for k, batch in enumerate(batches):
                assert upcoming is not None
                current, upcoming = upcoming, None
                has_next = k + 1 < len(batches)
                t0 = time.perf_counter()
                error: Exception | None = None
                try:
                    prepared, prepare_s = current.result()
                    raw = self.predictor.run(prepared)
                    if has_next:
                        upcoming = pool.submit(self._prepare, batches[k + 1])
                    predictions = self.predictor.finish(prepared, raw)
                    del prepared, raw
                except Exception as exc:  # noqa: BLE001 - the batch fails alone; the worker records why
                    predictions, prepare_s, error = [], 0.0, exc
                if upcoming is None and has_next:
                    upcoming = pool.submit(self._prepare, batches[k + 1])
                per_image_ms = (time.perf_counter() - t0 + prepare_s) * 1000 / len(batch)
                yield GradedBatch(batch, predictions, error, per_image_ms)
                del predictions


__all__ = ["GradeStage"]
