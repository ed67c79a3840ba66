"""The training loop: early stopping, resume from last.pt (also after an interruption), seeding, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import training.engine as engine
import training.train as train_module
from training.checkpoint import read_checkpoint
from training.engine import EarlyStopping
from training.train import run_training

torch.set_num_threads(1)


def _run(cfg, resume: bool = False):
    logs: list[str] = []
    state = run_training(cfg, kind="synthetic", resume=resume, progress=False, command="pytest", log=logs.append)
    return state, logs


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def _loss_columns(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(("train_", "val_")) and "images_per_s" not in k}


# ------------------------------------------------------------------------------------- EarlyStopping


def test_early_stopping_counts_epochs_without_improvement() -> None:
    s = EarlyStopping(patience=2, min_delta=0.01)
    assert s.best == -math.inf and not s.should_stop
    assert s.step(0.5) is True and s.best == 0.5
    assert s.step(0.505) is False and s.bad_epochs == 1 and s.best == 0.5  # within min_delta: no improvement
    assert not s.should_stop
    assert s.step(0.6) is True and s.bad_epochs == 0  # an improvement resets the count
    assert s.step(0.2) is False and s.step(0.6) is False
    assert s.should_stop and s.best == 0.6


def test_early_stopping_resumes_from_saved_counters() -> None:
    s = EarlyStopping(patience=3, best=0.7, bad_epochs=2)
    assert not s.should_stop
    assert s.step(0.69) is False and s.should_stop
    assert EarlyStopping(patience=1, best=0.7, bad_epochs=1).should_stop


# ------------------------------------------------------------------------------------------------ fit


def test_fit_stops_early_when_the_score_does_not_improve(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "score_predictions", lambda preds: (0.5, {"kappa": 0.5}))
    cfg = make_config(epochs=10, patience=2, max_steps_per_epoch=1)
    state, logs = _run(cfg)
    # epoch 1 sets the best; epochs 2 and 3 do not improve -> stop after 3 of 10
    assert state.epoch == 3 and state.bad_epochs == 2
    assert [r["epoch"] for r in state.history] == [1, 2, 3]
    assert any("early stopping after epoch 3" in m for m in logs)
    assert read_checkpoint(cfg.train.out_dir / "best.pt")["epoch"] == 1
    assert read_checkpoint(cfg.train.out_dir / "last.pt")["epoch"] == 3


def test_resume_continues_at_the_next_epoch_and_writes_outputs(make_config) -> None:
    cfg2 = make_config(epochs=2)
    out = cfg2.train.out_dir
    state, _ = _run(cfg2)
    assert state.epoch == 2
    first = _history(out)
    assert [r["epoch"] for r in first] == [1, 2]
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg3 = cfg2.model_copy(update={"train": cfg2.train.model_copy(update={"epochs": 3})})
    state, logs = _run(cfg3, resume=True)
    assert any("resumed from" in m and "after epoch 2" in m for m in logs)
    assert state.epoch == 3 and len(state.history) == 3
    hist = _history(out)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[:2] == first  # the first two rows are carried over, not recomputed
    assert read_checkpoint(out / "last.pt")["epoch"] == 3

    # Already at epochs: resuming again trains nothing.
    state, _ = _run(cfg3, resume=True)
    assert state.epoch == 3 and len(_history(out)) == 3


def test_interrupted_run_resumes_from_last_checkpoint(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(epochs=3)
    out = cfg.train.out_dir
    real = engine.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 2:  # epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(engine, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run(cfg)
    assert read_checkpoint(out / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in _history(out)] == [1]
    assert not list(out.glob("*.tmp"))

    state, logs = _run(cfg, resume=True)
    assert any("after epoch 1" in m for m in logs)
    assert state.epoch == 3
    assert [r["epoch"] for r in _history(out)] == [1, 2, 3]
    assert read_checkpoint(out / "last.pt")["epoch"] == 3


def test_restart_ignores_last_checkpoint(make_config) -> None:
    cfg = make_config(epochs=1)
    _run(cfg)
    state, logs = _run(cfg, resume=False)
    assert state.epoch == 1 and not any("resumed" in m for m in logs)


def test_same_seed_gives_identical_losses(make_config, tmp_path: Path) -> None:
    a, _ = _run(make_config(out_dir=tmp_path / "a", seed=3))
    b, _ = _run(make_config(out_dir=tmp_path / "b", seed=3))
    ra, rb = _loss_columns(a.history[0]), _loss_columns(b.history[0])
    assert "train_total" in ra and "val_total" in ra
    assert ra == rb
    c, _ = _run(make_config(out_dir=tmp_path / "c", seed=4))
    assert _loss_columns(c.history[0])["train_total"] != ra["train_total"]


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_run(make_config, tmp_path: Path) -> None:
    """Interrupted after epoch 1 and resumed: same batches, same augmentation, same dropout -> same weights."""
    straight = make_config(epochs=2, out_dir=tmp_path / "straight", balanced_sampling=True)
    _, straight_logs = _run(straight)
    assert any("ETA" in m and "1 more epoch" in m for m in straight_logs)
    first = make_config(epochs=1, out_dir=tmp_path / "resumed", balanced_sampling=True)
    _run(first)
    second = first.model_copy(update={"train": first.train.model_copy(update={"epochs": 2})})
    _, logs = _run(second, resume=True)
    assert any("resumed from" in m for m in logs)
    a = read_checkpoint(tmp_path / "straight" / "last.pt")["model_state"]
    b = read_checkpoint(tmp_path / "resumed" / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_bf16_training_steps_under_autocast_and_keeps_float32_weights(make_config, tmp_path: Path) -> None:
    """precision = "bf16": the forward pass runs in bfloat16 (convolutions see bfloat16 inputs), the weights,
    the checkpoint and validation stay float32, the loss is finite, each history row says which precision
    trained it, and the run differs from the float32 one (the option is not ignored)."""
    def conv_outputs(run_dir: Path, **train: object) -> tuple[engine.FitState, set[tuple[bool, torch.dtype]]]:
        seen: set[tuple[bool, torch.dtype]] = set()

        def spy(module, _inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                seen.add((module.training, output.dtype))

        handle = torch.nn.modules.module.register_module_forward_hook(spy)
        try:
            return _run(make_config(out_dir=run_dir, seed=3, **train))[0], seen
        finally:
            handle.remove()

    bf, bf_seen = conv_outputs(tmp_path / "bf16", precision="bf16")
    fp, fp_seen = conv_outputs(tmp_path / "fp32")
    assert bf_seen == {(True, torch.bfloat16), (False, torch.float32)}  # training steps bf16, validation float32
    assert fp_seen == {(True, torch.float32), (False, torch.float32)}
    assert bf.history[0]["train_bf16"] == 1.0 and fp.history[0]["train_bf16"] == 0.0
    assert math.isfinite(bf.history[0]["train_total"]) and math.isfinite(bf.history[0]["val_total"])
    assert bf.history[0]["train_total"] != fp.history[0]["train_total"]
    state = read_checkpoint(tmp_path / "bf16" / "last.pt")["model_state"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        engine.train_one_epoch(torch.nn.Linear(1, 1), [], None, None, torch.device("cpu"), 1, precision="fp16")  # type: ignore[arg-type]
