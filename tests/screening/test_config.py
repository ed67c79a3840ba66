import pytest

from screening.config import load_screening_settings
from training.config import ConfigError


def test_project_config(project_root):
    from screening.config import DEFAULT_PATTERNS

    s = load_screening_settings(project_root / "config.toml")
    assert s.inbox == project_root / "inbox"
    assert s.database == f"sqlite:///{project_root / 'screening.db'}"
    # the names README documents are the same whether config.toml lists them or a config leaves them out
    assert s.filename_patterns == DEFAULT_PATTERNS


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
    with pytest.raises(ConfigError, match=r"screening\.database.*(not supported|not a usable database URL)"):
        load_screening_settings(p)


def test_gpu_settings(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[screening]\ndevice = 'cuda'\nprecision = 'float16'\ngpu_memory_gb = 20\n")
    s = load_screening_settings(p)
    assert (s.precision, s.gpu_memory_gb, s.batch_size, s.gpu_batch_cap()) == ("float16", 20.0, 1, None)
    p.write_text("[screening]\ndevice = 'cuda'\ngpu_memory_gb = 20\nbatch_size = 32\n")
    assert load_screening_settings(p).gpu_batch_cap() == 32


def test_bfloat16_is_refused_with_the_reason(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[screening]\ndevice = 'cuda'\nprecision = 'bfloat16'\n")
    with pytest.raises(ConfigError, match=r"precision.*bfloat16.*changed a referral.*float16"):
        load_screening_settings(p)


@pytest.mark.parametrize("line", ["precision = 'float16'", "gpu_memory_gb = 8"])
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_gpu_settings_without_cuda_are_refused(tmp_path, line, device):
    """The CPU path stays float32 with the configured batch: a GPU setting there is a mistake, said so."""
    p = tmp_path / "c.toml"
    p.write_text(f"[screening]\ndevice = '{device}'\n{line}\n")
    key = line.split(" ")[0]
    with pytest.raises(ConfigError, match=rf"screening\.{key}.*set device = 'cuda'"):
        load_screening_settings(p)


@pytest.mark.parametrize("key, default, other, bad", [
    ("eye_result", "worst", "latest", "best"),  # which field of an eye gives its result
    ("report_priority", "idle", "low", "background"),  # the report renderer's CPU priority
])
def test_a_choice_setting_takes_its_values_and_refuses_others_naming_the_key(tmp_path, project_root, key, default,
                                                                               other, bad):
    assert getattr(load_screening_settings(project_root / "config.toml"), key) == default
    p = tmp_path / "c.toml"
    p.write_text(f"[screening]\n{key} = '{other}'\n")
    assert getattr(load_screening_settings(p), key) == other
    p.write_text(f"[screening]\n{key} = '{bad}'\n")
    with pytest.raises(ConfigError, match=rf"screening\.{key}"):
        load_screening_settings(p)
