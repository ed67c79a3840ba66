import json
import logging
import re
from pathlib import Path

import pytest

from screening import cli

from .conftest import write_fundus


def _config(tmp_path: Path, checkpoint: Path, quality: Path | None = None, laterality: Path | None = None,
            database: str | None = None) -> Path:
    """A config beside its own folders; the intake-check models are the shipped ones unless given."""
    models = Path(__file__).resolve().parents[2] / "models"
    quality, laterality = quality or models / "quality.pt", laterality or models / "laterality.pt"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ncheckpoint = '{checkpoint}'\nquality_model = '{quality}'\n"
                   f"laterality_model = '{laterality}'\nstable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\n"
                   "report_priority = 'normal'\n"  # as the settings fixture's (tests/screening/conftest.py)
                   + (f"database = '{database}'\n" if database else ""))
    return cfg


def test_a_missing_intake_model_stops_the_worker_saying_what_to_do(tmp_path, tiny_checkpoint, capsys):
    cfg = _config(tmp_path, tiny_checkpoint, quality=tmp_path / "no-quality.pt")
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 2
    err = capsys.readouterr().err
    assert "gradability model not found" in err and "no-quality.pt" in err and "dr-train fit-quality" in err


def test_a_grader_grades_an_eye_the_model_found_ungradable_from_the_command_line(tmp_path, tiny_checkpoint, intake_models,
                                                                                 capsys):
    """README: the grader may grade a photo the intake checks found ungradable. `review correct --dr` refused it as
    if the grader had passed --ungradable (found in a staff-style check); with no model grade to keep, both grades
    are needed."""
    cfg = _config(tmp_path, tiny_checkpoint, quality=intake_models["dark_blurred"])
    write_fundus(tmp_path / "inbox" / "U9_R.jpg", seed=4)
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    capsys.readouterr()
    run = lambda *argv: (cli.main(["--config", str(cfg), "review", *argv, "--no-render"]), *capsys.readouterr())  # noqa: E731
    rc, out, err = run("correct", "1", "--reviewer", "Dr Grey", "--dr", "R=2")
    assert rc == 1 and "no grade to keep (the model found it ungradable), so grading it takes both --dr R=GRADE and --dme R=GRADE" in err
    rc, out, err = run("correct", "1", "--reviewer", "Dr Grey", "--dr", "R=2", "--ungradable", "R")
    assert rc == 1 and "eye R is marked --ungradable" in err
    rc, out, err = run("correct", "1", "--reviewer", "Dr Grey", "--dr", "R=2", "--dme", "R=1")
    assert rc == 0, err
    assert "corrected by Dr Grey" in out and "Right eye: DR 2, DME 1" in out


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["run", "--help"], ["audit", "--help"], ["init-db", "--help"], ["review", "import", "--help"],
                 ["review", "correct", "--help"], ["serve", "--help"], ["user", "add", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    assert "--once" in capsys.readouterr().out


def test_missing_checkpoint_without_demo_fails_clearly(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "nope.pt")
    assert cli.main(["--config", str(cfg), "run", "--once", "--no-demo"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_missing_checkpoint_trains_demo_model_once(tmp_path, monkeypatch, tiny_checkpoint):
    import shutil

    import training.demo

    calls = []

    def fake_demo(output, work, minutes, progress):
        calls.append(output)
        shutil.copy(tiny_checkpoint, output)
        return output

    monkeypatch.setattr(training.demo, "train_demo_model", fake_demo)
    from screening.config import load_screening_settings

    settings = load_screening_settings(_config(tmp_path, tmp_path / "absent.pt"))
    settings.work_dir.mkdir(parents=True)
    first = cli.resolve_checkpoint(settings)
    second = cli.resolve_checkpoint(settings)
    assert first == second == settings.work_dir / "demo-model.pt" and len(calls) == 1


def test_a_config_copied_elsewhere_gets_no_demo_model_and_a_made_inbox_is_said(tmp_path, caplog):
    """A newcomer's check: config.toml copied out of the project pointed at a models/ folder that is not there and
    quietly trained a demo model; a mistyped (or unmounted) inbox was made empty without a word."""
    import logging

    from screening.config import load_screening_settings
    from training.api import CheckpointError

    settings = load_screening_settings(_config(tmp_path, tmp_path / "models" / "baseline.pt"))
    with pytest.raises(CheckpointError, match="its folder does not exist either.*config file's own folder"):
        cli.resolve_checkpoint(settings)
    with caplog.at_level(logging.WARNING, logger="screening"):
        cli.prepare_folders(settings)
        cli.prepare_folders(settings)  # it exists now: said once
    made = [r.getMessage() for r in caplog.records if "did not exist and was made empty" in r.getMessage()]
    assert len(made) == 1 and str(settings.inbox) in made[0] and "mounted" in made[0]


def test_run_once_then_audit_exports(tmp_path, tiny_checkpoint, intake_models, capsys):
    cfg = _config(tmp_path, tiny_checkpoint, intake_models["gradable"], intake_models["unsure_eye"])
    write_fundus(tmp_path / "inbox" / "P1_R.jpg", seed=1)
    (tmp_path / "inbox" / "notes.txt").write_text("hello")
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    out = capsys.readouterr().out
    assert "processed 1" in out and "rejected 1" in out
    assert not logging.getLogger("weasyprint.progress").isEnabledFor(logging.INFO)  # no "Step n" lines per report
    assert cli.main(["--config", str(cfg), "audit", "--json", str(tmp_path / "a.json"), "--csv", str(tmp_path / "a.csv")]) == 0
    table = capsys.readouterr().out
    assert "Images graded" in table and "unsupported" in table
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["rejected"] == 1 and sum(data["overall"]["dr_grades"].values()) == 1
    assert list(data["by_model"]) == ["test-synthetic-v1"]
    assert (tmp_path / "a.csv").read_text().startswith("section,model_version,key,value")


def test_bad_config_key_exits_2(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[screening]\ninbox_folder = 'x'\n")
    assert cli.main(["--config", str(cfg), "init-db"]) == 2
    assert "screening.inbox_folder" in capsys.readouterr().err


def test_init_db_on_each_database_never_prints_the_password(tmp_path, db_url, capsys):
    from sqlalchemy.engine import make_url

    from screening.db import current_revision, head_revision, make_engine

    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":  # the test server trusts local connections: any password is accepted
        url = url.set(password="s3cret")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ndatabase = '{url.render_as_string(hide_password=False)}'\n")
    assert cli.main(["--config", str(cfg), "init-db"]) == 0
    out = capsys.readouterr().out
    assert "database ready" in out and "s3cret" not in out
    engine = make_engine(db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_tallies_check_finds_a_tally_out_of_step_and_rebuild_mends_it(tmp_path, capsys):
    """`dr-screen tallies check` exits 1 naming the count that differs from the rows; `rebuild` recomputes it."""
    from datetime import datetime, timezone

    from sqlalchemy import update

    from screening.db import init_db, make_engine, make_session_factory, session_scope
    from screening.db import repository as repo
    from screening.db.models import AuditTally

    url = f"sqlite:///{tmp_path / 's.db'}"
    engine = make_engine(url)
    init_db(engine)
    with session_scope(make_session_factory(engine)) as s:
        repo.record_drop(s, sha256="a" * 64, source_name="x.jpg", outcome="rejected",
                         received_at=datetime(2025, 3, 1, 9, tzinfo=timezone.utc))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[screening]\ndatabase = '{url}'\n")
    assert cli.main(["--config", str(cfg), "tallies", "check"]) == 0
    assert "agree" in capsys.readouterr().out
    with engine.begin() as conn:  # a row changed behind the worker's back
        conn.execute(update(AuditTally).values(n=AuditTally.n + 2))
    assert cli.main(["--config", str(cfg), "tallies", "check"]) == 1
    out = capsys.readouterr().out
    assert "2025-03-01 drops" in out and "kept 3, rows say 1" in out
    assert cli.main(["--config", str(cfg), "tallies", "rebuild"]) == 0
    assert cli.main(["--config", str(cfg), "tallies", "check"]) == 0
    engine.dispose()


def test_audit_and_init_db_do_not_import_torch(tmp_path):
    """`dr-screen audit` starts in well under a second: torch (seconds to import) is for the worker only."""
    import subprocess
    import sys

    code = ("import sys; from screening import cli; "
            f"cli.main(['--config', {str(tmp_path / 'c.toml')!r}, 'init-db']); "
            f"rc = cli.main(['--config', {str(tmp_path / 'c.toml')!r}, 'audit']); "
            "print(rc, 'torch' in sys.modules)")
    (tmp_path / "c.toml").write_text(f"[screening]\ndatabase = 'sqlite:///{tmp_path / 'a.db'}'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stderr[-2000:]


# ----------------------------------------------------------------------------- clear start-up errors (issue 12)

@pytest.mark.parametrize("line, fragment", [
    ("database = 'sqlite:///{tmp}/no/such/folder/s.db'", "does not exist"),
    ("database = 'nosuchdb://x/y'", "not a usable database URL"),
    ("inbox = '{tmp}/inbox-file'", "is a file, not a folder"),
], ids=["missing-folder", "unknown-scheme", "inbox-is-a-file"])
def test_configuration_faults_are_clear_errors_not_tracebacks(tmp_path, tiny_checkpoint, capsys, line, fragment):
    (tmp_path / "inbox-file").write_text("not a folder")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ncheckpoint = '{tiny_checkpoint}'\nthreads = 1\ndevice = 'cpu'\n"
                   + line.format(tmp=tmp_path) + "\n")
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_once_exits_non_zero_when_a_report_failed(tmp_path, tiny_checkpoint, capsys):
    """It printed "reports 0" and exited 0 when every report failed (issue 12)."""
    cfg = _config(tmp_path, tiny_checkpoint)
    (tmp_path / "templates").mkdir()  # templates beside the config win: a broken one fails every render
    (tmp_path / "templates" / "report.html.j2").write_text("{{ no_such_variable.attribute }}")
    (tmp_path / "templates" / "report.css").write_text("")
    cfg.write_text(cfg.read_text() + "report_renderer = 'inline'\nreport_retries = 1\n")
    write_fundus(tmp_path / "inbox" / "P1_R.jpg", seed=1)
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 1
    out = capsys.readouterr().out
    assert "processed 1" in out and "report failures 1" in out


def test_once_exits_non_zero_while_a_file_cannot_be_read_and_logs_privately(tmp_path, tiny_checkpoint, capsys,
                                                                              monkeypatch):
    """A file the worker may not read is neither graded nor refused: cron must notice (exit 1) until it can; and
    dr-screen sets up its log through screening.logs (no exception's message in it)."""
    import errno

    from screening.stages import intake

    def denied(path, max_bytes):  # the suite runs as root, whom chmod 000 does not stop
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    configured = []
    real_configure = cli.configure
    monkeypatch.setattr(cli, "configure", lambda *a, **k: configured.append(a) or real_configure(*a, **k))
    monkeypatch.setattr(intake, "read_content", denied)
    cfg = _config(tmp_path, tiny_checkpoint)
    photo = write_fundus(tmp_path / "inbox" / "P1_R.jpg", seed=1)
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 1
    assert "could not be read (permissions, I/O) 1" in capsys.readouterr().out and photo.is_file()
    assert configured


def test_once_rejects_an_empty_file_left_long_ago(tmp_path, tiny_checkpoint, capsys):
    """With stable_seconds = 2 an empty file needed 20 s of watching, and --once waits 10 s: never rejected."""
    import os
    import time

    cfg = _config(tmp_path, tiny_checkpoint)
    cfg.write_text(cfg.read_text().replace("stable_seconds = 0.1", "stable_seconds = 2.0"))
    empty = tmp_path / "inbox" / "P1_R.jpg"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    os.utime(empty, (time.time() - 400, time.time() - 400))  # older than incomplete_grace (300 s): not a copy starting
    t0 = time.monotonic()
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    assert "rejected 1" in capsys.readouterr().out and time.monotonic() - t0 < 60
    (reason,) = (tmp_path / "rejected").glob("*.reason.txt")
    assert "empty (0 bytes)" in reason.read_text()


def test_review_commands_end_to_end(tmp_path, tiny_checkpoint, capsys, db_url):
    from pypdf import PdfReader

    cfg = _config(tmp_path, tiny_checkpoint, database=db_url)  # on SQLite, then on PostgreSQL
    for name, seed in (("P1_R.jpg", 1), ("P1_L.jpg", 2), ("P2_R.jpg", 3)):
        write_fundus(tmp_path / "inbox" / name, seed=seed)
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    capsys.readouterr()
    run = lambda *argv: (cli.main(["--config", str(cfg), "review", *argv]), *capsys.readouterr())  # noqa: E731

    rc, out, _ = run("list")
    assert rc == 0 and "2 visit(s) await review" in out and "P1" in out and "P2" in out
    visit_rows = lambda text: [line for line in text.splitlines()[1:] if line[:1].isdigit()]  # noqa: E731
    rows = {line.split()[1]: line for line in visit_rows(out)}
    assert "left eye missing" in rows["P2"] and "missing" not in rows["P1"]  # P2 sent its right eye only
    rc, out, _ = run("list", "--limit", "1")
    assert rc == 0 and ("2 visit(s) await review (the model's referrals first, or a reopened sign-off's when more urgent; "
                        "then oldest first; the first 1 shown)") in out
    assert len(visit_rows(out)) == 1  # the backlog is counted whole, one row shown
    with pytest.raises(SystemExit):
        run("list", "--limit", "-1")
    assert "0 or more" in capsys.readouterr().err
    rc, out, _ = run("show", "1")
    assert rc == 0 and "Visit 1: patient P1" in out and "status: awaiting review" in out and "Right eye" in out
    assert re.search(r"model's recommendation: .+ \[--referral [a-z_0-9]+\] - ", out)  # not "(routine) (routine)"

    rc, out, err = run("correct", "1", "--reviewer", "Dr Grey", "--dr", "R=4", "--ungradable", "L", "--comment", "NVD")
    assert rc == 0, err
    assert "signed off: review 1: corrected by Dr Grey" in out and "Left eye: ungradable" in out and "Urgent referral" in out
    report = out.split("written to ")[1].strip()
    assert report.endswith("report_v2.pdf")
    text = " ".join(p.extract_text() for p in PdfReader(report).pages)
    assert "Reviewed by Dr Grey" in text and "Grader: 4" in text

    rc, out, err = run("confirm", "9", "--reviewer", "Dr Grey")
    assert rc == 1 and "there is no visit 9" in err
    rc, out, err = run("correct", "2", "--reviewer", "Dr Grey")
    assert rc == 1 and "nothing to correct" in err
    rc, out, _ = run("list")
    assert "1 visit(s) await review" in out and "P2" in out and "P1 " not in out

    csv_path = tmp_path / "centre.csv"
    csv_path.write_text("patient,eye,date,dr_grade,dme_grade\nP2,R,%s,7,0\n" % _exam_date(tmp_path))
    rc, out, err = run("import", str(csv_path), "--reviewer", "North Centre")
    assert rc == 1 and f"{csv_path}: line 2, column 'dr_grade': '7' is not a grade" in err and "nothing was recorded" in out
    csv_path.write_text("patient,eye,date,dr_grade,dme_grade\nP2,R,%s,1,0\n" % _exam_date(tmp_path))
    rc, out, err = run("import", str(csv_path), "--reviewer", "North Centre", "--dry-run")
    assert rc == 0 and out.startswith("line 2: visit 2 (P2, ") and ": would record " in out
    assert "nothing was written" in out and "1 visit(s) await review" in run("list")[1]
    rc, out, err = run("import", str(csv_path), "--reviewer", "North Centre")
    assert rc == 0, err
    assert "1 sign-off(s) recorded" in out and "visit 2: reviewed report v2 written" in out
    assert "No visits await review." in run("list")[1]
    rc, out, _ = run("render")
    assert rc == 0 and "0 reviewed report(s) rendered" in out  # nothing is missing

    assert cli.main(["--config", str(cfg), "audit", "--json", str(tmp_path / "a.json")]) == 0
    agreement = json.loads((tmp_path / "a.json").read_text())["agreement"]
    assert agreement["overall"]["share_reviewed"] == 1.0 and set(agreement["by_reviewer"]) == {"Dr Grey", "North Centre"}


def _exam_date(tmp_path) -> str:
    """The exam date the worker gave photos named without a date (the day they were dropped)."""
    return next((tmp_path / "reports" / "P2").iterdir()).name


def test_user_commands(tmp_path, capsys, monkeypatch):
    import io

    cfg = tmp_path / "config.toml"
    cfg.write_text("[screening]\n")
    user = lambda *argv, stdin="": (  # noqa: E731
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin)), cli.main(["--config", str(cfg), "user", *argv]),
        *capsys.readouterr())[1:]
    assert user("add", "grey", "--name", "Dr A. Grey", "--password-stdin", stdin="correct horse battery\n")[0] == 0
    rc, _, err = user("add", "grey", "--password-stdin", stdin="another long one\n")
    assert rc == 1 and "exists already" in err
    rc, _, err = user("add", "abbot", "--password-stdin", stdin="short\n")
    assert rc == 1 and "at least 10" in err
    rc, _, err = user("add", "../etc", "--password-stdin", stdin="correct horse battery\n")
    assert rc == 1 and "letters, digits" in err
    assert user("disable", "grey")[0] == 0
    rc, out, _ = user("list")
    assert out.splitlines() == ["grey\tDr A. Grey\tdisabled"]
    assert user("passwd", "nobody", "--password-stdin", stdin="correct horse battery\n")[0] == 1

    from screening.config import load_screening_settings
    from screening.db import make_engine, make_session_factory, session_scope
    from screening.db import reviews as rrepo
    from screening.web.auth import verify_password

    assert user("passwd", "grey", "--password-stdin", stdin="a new long password\n")[0] == 0
    with session_scope(make_session_factory(make_engine(load_screening_settings(cfg).database))) as s:
        stored = rrepo.get_user(s, "grey").password_hash
    assert stored.startswith("scrypt:") and "a new long password" not in stored
    assert verify_password(stored, "a new long password") and not verify_password(stored, "correct horse battery")


def test_a_database_server_that_cannot_be_reached_gets_server_advice(tmp_path, capsys):
    """It said "check the path and its permissions" for a PostgreSQL URL too; the password is never printed."""
    pytest.importorskip("psycopg")
    cfg = tmp_path / "config.toml"
    cfg.write_text('[screening]\ndatabase = "postgresql+psycopg://grader:s3cret-pw@127.0.0.1:1/screening"\n'
                   f'inbox = "{tmp_path / "inbox"}"\n')
    assert cli.main(["--config", str(cfg), "review", "list"]) == 2
    err = capsys.readouterr().err
    assert "cannot be opened" in err and "server is running" in err and "check the path" not in err
    assert "s3cret-pw" not in err and "127.0.0.1:1/screening" in err


def test_serve_off_loopback_needs_a_user(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[screening]\n")
    assert cli.main(["--config", str(cfg), "init-db"]) == 0
    assert cli.main(["--config", str(cfg), "serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "no active user" in capsys.readouterr().err
    # behind a proxy on this machine the page is bound to 127.0.0.1 yet serves the network: a login is required too
    assert cli.main(["--config", str(cfg), "serve", "--port", "1", "--trusted-proxy", "127.0.0.1"]) == 2
    assert "no active user" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["audit"], ["review", "list"], ["tallies", "check"], ["serve"]])
def test_a_mistyped_database_path_is_refused_not_made_empty(tmp_path, capsys, command):
    """`audit` on a mistyped SQLite path made an empty database and printed a day of zeros, rc 0 (a manager-style
    check); only the worker's run, init-db and the first `user add` make a database."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ndatabase = 'sqlite:///{tmp_path / 'screeing_typo.db'}'\n")
    assert cli.main(["--config", str(cfg), *command]) == 2
    err = capsys.readouterr().err
    assert "there is no database at" in err and "screeing_typo.db" in err and "a typo?" in err
    assert not (tmp_path / "screeing_typo.db").exists()


def test_audit_arguments_are_checked_before_the_audit_is_computed(tmp_path, factory, db_url, capsys):
    """Found in a staff-style check of the audit: --to before --from crashed with a withheld ValueError; --csv in a
    missing folder and --json naming a folder failed after the table, message withheld; a malformed date said
    "invalid fromisoformat value"; an unknown --model-version gave an all-zero table. Each is now a plain
    argument error (exit 2) naming the option, before any statistics are computed."""
    from screening.db import session_scope

    from .review.conftest import seed_visit

    with session_scope(factory) as s:
        seed_visit(s, "P1", {"R": (1, 0, False)}, model_version="m-1")
    cfg = _config(tmp_path, tmp_path / "unused.pt", database=db_url)

    def audit(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(["--config", str(cfg), "audit", *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = audit("--from", "2026-12-03", "--to", "2026-12-01")
    assert rc == 2 and "--to is before --from" in err and "Traceback" not in err and out == ""
    rc, out, err = audit("--csv", str(tmp_path / "missing" / "x.csv"))
    assert rc == 2 and f"--csv {tmp_path / 'missing' / 'x.csv'}" in err and "does not exist" in err and out == ""
    rc, out, err = audit("--csv", str(tmp_path / "a.csv"), "--json", str(tmp_path))
    assert rc == 2 and f"--json {tmp_path} is a folder" in err and out == "" and not (tmp_path / "a.csv").exists()
    rc, out, err = audit("--model-version", "nope")
    assert rc == 2 and "no photo was graded by that version" in err and "known: m-1" in err and out == ""
    for bad, said in (("1/12/2026", "expected a date as YYYY-MM-DD"), ("2026-02-30", "'2026-02-30' is not a real date"),
                      ("2026-13-01", "'2026-13-01' is not a real date")):  # YYYY-MM-DD but no such day: not "expected YYYY-MM-DD"
        with pytest.raises(SystemExit) as exc:
            cli.main(["--config", str(cfg), "audit", "--from", bad])
        assert exc.value.code == 2
        assert f"argument --from: {said}" in capsys.readouterr().err
    rc, out, err = audit("--model-version", "m-1", "--csv", str(tmp_path / "a.csv"))
    assert rc == 0 and "CSV written to" in out and (tmp_path / "a.csv").exists()
    # an existing file is replaced only when asked (--csv config.toml replaced the configuration without a word)
    rc, out, err = audit("--csv", str(cfg))
    assert rc == 2 and "exists already" in err and "--overwrite" in err and "[screening]" in cfg.read_text()
    rc, out, err = audit("--csv", str(tmp_path / "b.out"), "--json", str(tmp_path / "b.out"))
    assert rc == 2 and "name the same file" in err and not (tmp_path / "b.out").exists()
    rc, out, err = audit("--csv", str(tmp_path / "a.csv"), "--overwrite")
    assert rc == 0 and "CSV written to" in out
    rc, out, err = audit("--from", "2999-01-01")
    assert rc == 0 and "is after today" in err and "no file can have arrived" in err


def test_staff_swap_a_visits_eyes_and_the_worker_makes_a_new_version_saying_so(tmp_path, tiny_checkpoint, capsys):
    """A laterality mismatch says "check the label"; `review eye` records the answer (a swapped pair in one command)
    and the next version of the visit's report shows it."""
    from pypdf import PdfReader

    cfg = _config(tmp_path, tiny_checkpoint)
    for name, seed in (("P1_R.jpg", 1), ("P1_L.jpg", 2)):
        write_fundus(tmp_path / "inbox" / name, seed=seed)
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    capsys.readouterr()
    run = lambda *argv: (cli.main(["--config", str(cfg), *argv]), *capsys.readouterr())  # noqa: E731
    rc, out, _ = run("review", "show", "1")
    ids = {m[1]: int(m[0]) for m in re.findall(r"image (\d+), (P1_[RL]\.jpg)", out)}
    right, left = ids["P1_R.jpg"], ids["P1_L.jpg"]

    rc, out, err = run("review", "eye", f"{right}=L", f"{left}=OD", "--reviewer", "Ann Lee", "--reason", "camera worklist",
                       "--against-photo")  # synthetic photos: whatever the laterality check reads in them
    assert rc == 0, err
    assert f"image {right} (visit 1): eye set from R to L" in out and f"image {left} (visit 1): eye set from L to R" in out
    assert "visit 1: a new report version follows" in out
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    (folder,) = {p.parent for p in (tmp_path / "reports").rglob("report_v2.pdf")}
    text = " ".join(p.extract_text() for p in PdfReader(folder / "report_v2.pdf").pages).replace("\n", " ")
    assert "Eye set to the left eye by Ann Lee" in text and "camera worklist" in text
    rc, out, _ = run("review", "show", "1")
    assert f"Left eye field 1 of 1: image {right}, P1_R.jpg" in out  # filed under the eye set

    rc, out, err = run("review", "eye", f"{right}=L", "--reviewer", "Ann Lee", "--reason", "again", "--against-photo")
    assert rc == 1 and f"image {right} is already filed as the left eye" in err and "nothing was changed" in err
    with pytest.raises(SystemExit):
        run("review", "eye", str(right), "--reviewer", "Ann Lee", "--reason", "x")
    assert "write IMAGE=EYE" in capsys.readouterr().err


def test_config_may_follow_the_subcommand(tmp_path, tiny_checkpoint, capsys):
    """`dr-screen review list --config site.toml` was "unrecognized arguments" (a newcomer's check)."""
    cfg = _config(tmp_path, tiny_checkpoint)
    assert cli.main(["--config", str(cfg), "init-db"]) == 0
    capsys.readouterr()
    assert cli.main(["review", "list", "--config", str(cfg)]) == 0
    assert "No visits await review." in capsys.readouterr().out
    assert cli.main(["audit", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_staff_move_a_photo_to_the_right_patient_and_both_visits_get_a_version_saying_so(tmp_path, tiny_checkpoint, capsys):
    """An identity conflict's other answer: the photo was stored under the wrong patient. The visit it left says
    so (and, left without photos, says that), and the visit it joins never names the other patient."""
    from pypdf import PdfReader

    cfg = _config(tmp_path, tiny_checkpoint)
    for name, seed in (("P1_R.jpg", 1), ("P1_L.jpg", 2), ("P2_R.jpg", 3)):
        write_fundus(tmp_path / "inbox" / name, seed=seed)
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    capsys.readouterr()
    run = lambda *argv: (cli.main(["--config", str(cfg), *argv]), *capsys.readouterr())  # noqa: E731
    ids = {m[1]: int(m[0]) for m in re.findall(r"image (\d+), (P1_[RL]\.jpg)", run("review", "show", "1")[1])}
    pdf = lambda patient, v: " ".join(  # noqa: E731
        p.extract_text() for p in PdfReader(next((tmp_path / "reports" / patient).rglob(f"report_v{v}.pdf"))).pages
    ).replace("\n", " ")

    rc, out, err = run("review", "move", str(ids["P1_L.jpg"]), "--patient", "P2", "--reviewer", "Ann Lee",
                       "--reason", "camera worklist")
    assert rc == 0, err
    assert f"image {ids['P1_L.jpg']}: moved from visit 1 to visit 2 (eye L)" in out and "visit(s) 1, 2: a new report" in out
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    p1, p2 = pdf("P1", 2), pdf("P2", 2)
    assert "is not this visit's: Ann Lee moved it to another visit" in p1 and "Left eye" in pdf("P1", 1)
    assert "Filed in this visit by Ann Lee" in p2 and "moved from another visit" in p2 and "P1" not in p2

    assert run("review", "confirm", "1", "--reviewer", "Dr Grey")[0] == 0  # P1 as it is now: v3, reviewed
    rc, out, err = run("review", "move", str(ids["P1_R.jpg"]), "--patient", "P3", "--date", "2025-02-01", "--eye", "L",
                       "--reviewer", "Ann Lee", "--reason", "clinic notes", "--against-photo")
    assert rc == 0 and "visit 1 has no photo left, and its next version says so" in out, err
    assert "note: patient P3 was not in the database: a new patient record was made" in out
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    p1 = pdf("P1", 4)
    assert "No gradable images received" in p1 and "P1_R.jpg" in p1 and "P1_L.jpg" in p1  # both moves are said
    assert "Its photographs were moved to other visits since, so that sign-off no longer stands" in p1
    rc, _, err = run("review", "show", "1")
    assert rc == 1 and "visit 1 has no photo to review: A photograph shown in earlier versions" in err
    assert next((tmp_path / "reports" / "P3" / "2025-02-01").glob("report_v1.pdf"))
    rc, _, err = run("review", "move", str(ids["P1_R.jpg"]), "--patient", "P3", "--date", "2025-02-01",
                     "--reviewer", "Ann Lee", "--reason", "again")
    assert rc == 1 and "is already in that visit" in err and "nothing was changed" in err
    with pytest.raises(SystemExit):
        run("review", "move", "1", "--patient", "P3", "--date", "1 Feb", "--reviewer", "A", "--reason", "x")
    assert "is not a date: write YYYY-MM-DD" in capsys.readouterr().err
