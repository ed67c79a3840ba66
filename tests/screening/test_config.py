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


@pytest.mark.parametrize(
    "given, expected",
    [
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql+psycopg://dr:s3cret@db.example/screening", "postgresql+psycopg://dr:s3cret@db.example/screening"),
        ("postgresql://dr@db.example:5433/screening", "postgresql+psycopg://dr@db.example:5433/screening"),
    ],
)
def test_database_urls_sqlite_and_postgresql(tmp_path, given, expected):
    p = tmp_path / "c.toml"
    p.write_text(f"[screening]\ndatabase = '{given}'\n")
    assert load_screening_settings(p).database == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "screening.db"])
def test_unsupported_database_url_named(tmp_path, url):
    p = tmp_path / "c.toml"
    p.write_text(f"[screening]\ndatabase = '{url}'\n")
    with pytest.raises(ConfigError, match=r"screening\.database.*(not supported|not a database URL)"):
        load_screening_settings(p)
