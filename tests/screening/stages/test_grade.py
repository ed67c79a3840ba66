"""The grade stage alone: batches in order, the next one prepared in a helper thread, a failing batch alone."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from screening.inference import PreparedBatch
from screening.stages import GradeStage, Job


class FakePredictor:
    """Counts calls; the prediction of an image is its first pixel value."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on, self.prepared_in, self.runs = fail_on, [], 0

    def prepare(self, images):
        self.prepared_in.append(threading.current_thread().name)
        return PreparedBatch(images=list(images), tensor=None, image_features=None)

    def run(self, batch):
        self.runs += 1
        if self.runs == self.fail_on:
            raise RuntimeError("forward failed")
        return [int(im[0, 0, 0]) for im in batch.images]

    def finish(self, batch, out):
        return out


def _jobs(n: int) -> list[Job]:
    return [Job(i, 100 + i, None, f"{i:064x}", SimpleNamespace(rgb=np.full((4, 4, 3), i, np.uint8))) for i in range(n)]


def test_batches_in_order_prepared_ahead_and_a_failure_stays_in_its_batch():
    predictor = FakePredictor(fail_on=2)
    stage = GradeStage(predictor, batch_size=2)
    batches = stage.split(_jobs(5))
    assert [[j.image_id for j in b] for b in batches] == [[0, 1], [2, 3], [4]]
    graded = list(stage.grade(batches))
    assert [g.predictions for g in graded] == [[0, 1], [], [4]]
    assert graded[1].error is not None and "forward failed" in str(graded[1].error)
    assert [g.error is None for g in graded] == [True, False, True]
    assert all(name.startswith("prepare") for name in predictor.prepared_in) and len(predictor.prepared_in) == 3
    assert all(g.per_image_ms >= 0 for g in graded)
    assert list(stage.grade([])) == []
    with pytest.raises(ValueError, match="batch_size"):
        GradeStage(predictor, 0)
