"""The lesion stage of training (experiments/README.md E5): crops, lesion-only data, init from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import file_sha256, read_checkpoint
from training.config import DataSettings, ManifestSource, ModelSettings, TrainingConfig, TrainSettings
from training.data.synthetic import write_synthetic_dataset
from training.train import make_loaders, run_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unannotated_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 graded synthetic images without lesion masks (a second source beside the annotated one)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("plain") / "data", 8, size=96, seed=1, with_masks=False)


def _config(trained_run, unannotated_csv: Path, out: Path, **train: object) -> TrainingConfig:
    base, _ = trained_run
    settings = dict(base.train.model_dump()) | dict(out_dir=out, lesion_only=True, crop_size=32, samples_per_epoch=8,
                                                    max_steps_per_epoch=None, cls_weight=0.0, seg_weight=1.0)
    settings.update(train)
    sources = (*base.data.sources, ManifestSource(kind="manifest", path=unannotated_csv, name="plain"))
    return TrainingConfig(data=DataSettings(**(base.data.model_dump() | {"sources": sources})), model=base.model,
                          train=TrainSettings(**settings))


def test_lesion_only_loaders_draw_crops_of_annotated_images(trained_run, unannotated_csv: Path, tmp_path: Path) -> None:
    cfg = _config(trained_run, unannotated_csv, tmp_path / "run")
    data = make_loaders(cfg, progress=False)
    assert data.splits["train"] and all(r.has_masks for r in data.splits["train"] + data.splits["val"])
    batches = list(data.train)
    assert len(batches) == 8 // cfg.train.batch_size  # samples_per_epoch, not the split's size
    assert batches[0]["image"].shape[-2:] == (32, 32) and batches[0]["masks"].shape[-2:] == (32, 32)
    assert bool(batches[0]["has_masks"].all())
    full = make_loaders(cfg.model_copy(update={"train": cfg.train.model_copy(update={"lesion_only": False})}), progress=False)
    assert any(not r.has_masks for r in full.splits["train"])  # the other source is there, and was left out above
    assert next(iter(data.val))["image"].shape[-1] == cfg.model.image_size  # validation sees whole images


def test_lesion_stage_starts_from_the_checkpoint_and_leaves_the_grading_heads_alone(
    trained_run, unannotated_csv: Path, tmp_path: Path
) -> None:
    _, run_dir = trained_run
    init = run_dir / "best.pt"
    cfg = _config(trained_run, unannotated_csv, tmp_path / "run", init_from=init, lr=1e-2, epochs=1)
    run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    before, after = read_checkpoint(init)["model_state"], read_checkpoint(tmp_path / "run" / "last.pt")["model_state"]
    heads = [k for k in before if k.startswith(("dr_head.", "dme_head."))]
    assert heads and all(torch.equal(before[k].float(), after[k].float()) for k in heads)
    seg = [k for k in before if k.startswith(("encoder.", "decoder.", "seg_head.")) and before[k].is_floating_point()]
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in seg)  # and the rest did train
    origin = read_checkpoint(tmp_path / "run" / "last.pt")["provenance"]["init_from"]  # what it was built on
    source = read_checkpoint(init)
    assert origin["sha256"] == file_sha256(init) and origin["model_version"] == source["model_version"]
    assert origin["data"] == source["provenance"]["data"]


def test_init_from_a_different_architecture_names_the_difference(trained_run, unannotated_csv: Path, tmp_path: Path) -> None:
    _, run_dir = trained_run
    base = _config(trained_run, unannotated_csv, tmp_path / "run", init_from=run_dir / "best.pt")
    cfg = base.model_copy(update={"model": ModelSettings(**(base.model.model_dump() | {"decoder_channels": (32, 16, 16, 8, 8)}))})
    with pytest.raises(ValueError, match=r"best\.pt.*decoder_channels"):
        run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)


def test_source_weight_power_evens_out_the_sources_draws(trained_run, tmp_path: Path) -> None:
    """power 0: images drawn as the sources come (lesion images boosted); power 1: each source equally often."""
    other = write_synthetic_dataset(tmp_path / "other", 24, size=96, seed=2, with_masks=False)  # named "manifest:plain" by _config

    def draws(power: float) -> dict[str, float]:
        cfg = _config(trained_run, other, tmp_path / f"run{power}", lesion_only=False, crop_size=None,
                      source_weight_power=power, samples_per_epoch=4000)
        data = make_loaders(cfg, progress=False)
        sampler = data.train.sampler
        sampler.set_epoch(0)
        sources = [data.splits["train"][i].source for i in sampler]
        return {s: sources.count(s) / len(sources) for s in set(sources)}

    plain, even = draws(0.0), draws(1.0)
    assert len(plain) == 2 and plain.keys() == even.keys()
    assert abs(even["manifest:plain"] - 0.5) < 0.04
    assert abs(plain["manifest:plain"] - 0.5) > 0.1


def test_head_width_of_the_settings_reaches_the_model(trained_run) -> None:
    """[model] head_hidden builds heads of that width, so a grade-heads checkpoint (256 or 128) can be continued."""
    from training.train import model_config_from

    base, _ = trained_run
    cfg = base.model_copy(update={"model": base.model.model_copy(update={"head_hidden": 64})})
    assert model_config_from(cfg).head_hidden == 64


def _quiet(cfg: TrainingConfig, resume: bool = True):
    return run_training(cfg, kind="synthetic", resume=resume, progress=False, command="pytest", log=lambda _m: None)


def test_a_resume_under_other_settings_or_data_is_refused_naming_them(make_config, unannotated_csv: Path) -> None:
    """An ML engineer's check: `train --lr 0.1` resumed at the old rate while the checkpoint recorded 0.1, and
    `--image-size 96` finished a 64 px run at 96 px; only how long it runs and where may change."""
    from training.config import ConfigError

    _quiet(make_config(), resume=False)
    with pytest.raises(ConfigError, match=r"train\.lr 0\.001 -> 0\.1.*--restart"):
        _quiet(make_config(epochs=2, lr=0.1))
    cfg = make_config(epochs=2)
    more = cfg.model_copy(update={"data": DataSettings(**(cfg.data.model_dump() | {"sources": (
        *cfg.data.sources, ManifestSource(kind="manifest", path=unannotated_csv, name="plain"))}))})
    with pytest.raises(ConfigError, match="the data"):
        _quiet(more)
    said: list[str] = []
    state = run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})}),
                         kind="synthetic", progress=False, command="pytest", log=said.append)  # E8 resumed in bf16
    assert state.epoch == 2 and any(m.startswith("resumed from") and "after epoch 1" in m for m in said)
    assert read_checkpoint(cfg.train.out_dir / "last.pt")["provenance"]["train_config"]["lr"] == 0.001


def test_an_evaluation_split_holding_photos_the_run_saw_is_refused(trained_run) -> None:
    """The run records hashes of the photos it trained and validated on; evaluate refuses a split holding any."""
    from training.data.records import fingerprints
    from training.evaluate import _split, check_unseen

    cfg, run_dir = trained_run
    meta = read_checkpoint(run_dir / "best.pt")
    seen = meta["provenance"]["split"]["seen"]
    splits = _split(cfg, meta)
    assert seen == {"train": fingerprints(splits["train"]), "val": fingerprints(splits["val"])}
    assert not any("/" in h or "synthetic" in h for h in seen["train"])  # hashes, not file names
    check_unseen(meta, "test", splits["test"], run_dir / "best.pt")  # the run's own split: fine
    check_unseen(meta, "val", splits["val"], run_dir / "best.pt")
    with pytest.raises(ValueError, match=r"1 of the \d+ photos of the 'test' split were in its run's train or val"):
        check_unseen(meta, "test", [*splits["test"], splits["train"][0]], run_dir / "best.pt")
    with pytest.raises(ValueError, match="'val' split were in its run's train split"):
        check_unseen(meta, "val", [*splits["val"], splits["train"][0]], run_dir / "best.pt")


def test_a_validation_split_with_no_negatives_says_the_threshold_was_not_chosen() -> None:
    """A DR-only set (APTOS) trained with thresholds.referable = 0.5 and nothing said: DR 0-1 without a DME grade
    is neither referable nor not, so its validation had no negatives to choose the threshold on."""
    from training.data.records import DME_UNKNOWN
    from training.train import threshold_basis

    assert threshold_basis([0, 0, 2, 4], [DME_UNKNOWN] * 4).startswith("the validation split has no non-referable photo")
    assert threshold_basis([0, 0, 2, 4], [0, 0, DME_UNKNOWN, DME_UNKNOWN]) is None  # DR 0 with DME 0: non-referable
    assert "no referable or non-referable photo" in threshold_basis([0, 1], [DME_UNKNOWN, DME_UNKNOWN])


def test_the_checkpoint_says_how_its_threshold_was_set(trained_run) -> None:
    _, run_dir = trained_run
    assert read_checkpoint(run_dir / "best.pt")["thresholds"]["referable_source"]


def test_an_empty_manifest_a_split_without_validation_and_a_non_utf8_csv_say_what_to_do(tmp_path: Path, make_config) -> None:
    """An ML engineer's check: a header-only manifest gave 'cached 0 images' and then 'add sources' with a source
    configured; a one-patient set trained a whole epoch before 'the data loader gave no batches'; a Latin-1 CSV named
    a byte offset only."""
    from training.data.sources import DataSourceError, load_all
    from training.train import make_loaders

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "labels.csv").write_text("image,dr_grade,dme_grade\n")
    empty = DataSettings(sources=(ManifestSource(kind="manifest", path=tmp_path / "d" / "labels.csv"),))
    with pytest.raises(DataSourceError, match="lists no images: add its rows or remove it"):
        load_all(empty)
    (tmp_path / "d" / "labels.csv").write_bytes("image,dr_grade,dme_grade\ncaf\xe9.jpg,1,0\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match="is not UTF-8 text.*save it as UTF-8"):
        load_all(empty)
    cfg = make_config()
    one_patient = [r for r in load_all(cfg.data) if r.patient_id == load_all(cfg.data)[0].patient_id]
    with pytest.raises(ValueError, match=r"the split has \d+ training and 0 validation images"):
        make_loaders(cfg, one_patient, progress=False)
