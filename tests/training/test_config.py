from pathlib import Path

import pytest

from training.config import ConfigError, load_training_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_project_config_parses_and_resolves_paths(project_root):
    cfg = load_training_config(project_root / "config.toml")
    assert cfg.model.backbone in ("resnet18", "resnet34", "resnet50")
    assert cfg.train.out_dir.is_absolute() and cfg.train.out_dir.parent.parent == project_root
    assert all(s.path.is_absolute() for s in cfg.data.sources)


def test_unknown_key_is_named_with_file(tmp_path):
    p = _write(tmp_path, "[model]\nbackbone = 'resnet18'\nbackbon = 'x'\n")
    with pytest.raises(ConfigError) as exc:
        load_training_config(p)
    assert "model.backbon" in str(exc.value) and str(p) in str(exc.value)


def test_wrong_type_is_named(tmp_path):
    p = _write(tmp_path, "[train]\nepochs = 'many'\n")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_training_config(p)


def test_unknown_source_kind_and_bad_image_size(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sources\.0"):
        load_training_config(_write(tmp_path, "[data]\nsources = [{kind='dicom-zip', path='x'}]\n"))
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_training_config(_write(tmp_path, "[model]\nimage_size = 300\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_training_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_training_config(_write(tmp_path, "[model\n"))


def test_relative_paths_resolve_against_config_folder(tmp_path):
    sub = tmp_path / "site"
    sub.mkdir()
    cfg = load_training_config(_write(sub, "[train]\nout_dir = 'runs/x'\n[model]\npretrained_weights = ''\n"))
    assert cfg.train.out_dir == sub / "runs" / "x"
    assert cfg.model.pretrained_weights is None


def test_crop_size_is_checked_against_the_encoder_and_the_image_size(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.crop_size.*multiple of 32"):
        load_training_config(_write(tmp_path, "[train]\ncrop_size = 100\n"))
    with pytest.raises(ConfigError, match=r"crop_size \(512\) must not exceed model.image_size \(256\)"):
        load_training_config(_write(tmp_path, "[model]\nimage_size = 256\n[train]\ncrop_size = 512\n"))
    cfg = load_training_config(_write(tmp_path, "[model]\nimage_size = 512\n[train]\ncrop_size = 256\ninit_from = 'runs/a/best.pt'\n"))
    assert cfg.train.crop_size == 256 and cfg.train.init_from == tmp_path / "runs/a/best.pt"
    assert load_training_config(_write(tmp_path, "[train]\ninit_from = ''\n")).train.init_from is None


def test_training_precision_is_fp32_or_bf16(tmp_path):
    assert load_training_config(_write(tmp_path, "[train]\nprecision = 'bf16'\n")).train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_training_config(_write(tmp_path, "[train]\nprecision = 'fp16'\n"))
