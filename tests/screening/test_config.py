import pytest

from screening.config import load_screening_settings
from training.config import ConfigError


def test_project_config(project_root):
    s = load_screening_settings(project_root / "config.toml")
    assert s.inbox == project_root / "inbox"
    assert s.database == f"sqlite:///{project_root / 'screening.db'}"


def test_unknown_screening_key_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[screening]\ninbx = 'x'\n")
    with pytest.raises(ConfigError, match=r"screening\.inbx"):
        load_screening_settings(p)


def test_pattern_without_patient_group_rejected(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[screening]\nfilename_patterns = ['^(?P<eye>L|R)$']\n")
    with pytest.raises(ConfigError, match="patient"):
        load_screening_settings(p)


def test_typo_in_training_table_also_fails_worker_start(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[modle]\nbackbone = 'resnet18'\n")
    with pytest.raises(ConfigError, match="modle"):
        load_screening_settings(p)


def test_eye_result_rule_is_worst_or_latest(tmp_path, project_root):
    assert load_screening_settings(project_root / "config.toml").eye_result == "worst"
    p = tmp_path / "c.toml"
    p.write_text("[screening]\neye_result = 'latest'\n")
    assert load_screening_settings(p).eye_result == "latest"
    p.write_text("[screening]\neye_result = 'best'\n")
    with pytest.raises(ConfigError, match=r"screening\.eye_result"):
        load_screening_settings(p)
