"""screening.logs: log lines say where and what kind of error, never a message that may name a patient."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from screening.db.session import make_engine
from screening.logs import PrivateFormatter, exception_kind

NAME = "SR010_OD_20261202.jpg"  # an inbox name: the patient id first


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - the test's own exception
        return caught


def test_exception_kind_keeps_the_type_and_errno_not_the_message():
    exc = PermissionError(errno.EACCES, "Permission denied", f"/srv/inbox/{NAME}")
    assert exception_kind(exc) == "PermissionError [EACCES]"
    assert exception_kind(ValueError(f"bad {NAME}")) == "ValueError"


def test_exception_kind_names_the_cause_it_was_raised_from():
    def render() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", f"/reports/SR010/{NAME}")
        except OSError as exc:
            raise RuntimeError("could not render the report for patient 'SR010'") from exc

    with pytest.raises(RuntimeError) as info:
        render()
    assert exception_kind(info.value) == "RuntimeError, from OSError [ENOSPC]"


def test_a_database_error_is_described_by_its_driver_class_and_hides_its_parameters(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn, pytest.raises(OperationalError) as info:
        conn.execute(text("INSERT INTO missing_table (name) VALUES (:name)"), {"name": NAME})
    assert "SR010" not in str(info.value)  # hide_parameters: the text may reach a log
    assert exception_kind(info.value) == "OperationalError (sqlite3.OperationalError)"


def test_the_formatter_keeps_the_frames_and_withholds_every_message_of_the_chain():
    def read_inbox_file() -> None:
        open(f"/nonexistent-inbox/{NAME}", "rb")

    def intake() -> None:
        try:
            read_inbox_file()
        except OSError as exc:
            raise RuntimeError(f"intake of {NAME} failed") from exc

    try:
        intake()
    except RuntimeError:
        record = logging.LogRecord("screening", logging.ERROR, __file__, 1, "intake of a file failed", None, sys.exc_info())
    out = PrivateFormatter("%(levelname)s %(message)s").format(record)
    assert "SR010" not in out
    assert out.startswith("ERROR intake of a file failed\nTraceback (most recent call last):")
    assert "in read_inbox_file" in out and "in intake" in out  # where it happened is kept
    assert out.index("FileNotFoundError [ENOENT] (message withheld") < out.index("direct cause") < out.index(
        "RuntimeError (message withheld")


def test_a_context_without_a_cause_is_kept_too():
    try:
        try:
            raise KeyError(NAME)
        except KeyError:
            raise ValueError(NAME)  # noqa: B904 - a context, not a cause
    except ValueError:
        info = sys.exc_info()
    out = PrivateFormatter().formatException(info)
    assert "SR010" not in out and "During handling of the above exception" in out
    assert out.index("KeyError") < out.index("ValueError")


def test_dr_screen_processes_log_through_the_private_formatter(tmp_path):
    """configure() as cli.main and the renderer child call it: a logged exception's message never reaches stderr."""
    code = ("import logging; from screening.logs import configure; configure(logging.INFO)\n"
            "try:\n    open(%r, 'rb')\nexcept OSError:\n    logging.getLogger('screening').exception('could not read an inbox file')\n"
            % str(tmp_path / NAME))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "could not read an inbox file" in proc.stderr and "FileNotFoundError [ENOENT]" in proc.stderr
    assert "SR010" not in proc.stderr


def test_an_error_nothing_handled_is_logged_without_its_message(tmp_path):
    """sys.excepthook: Python would print the uncaught error's message (a reports path names the patient)."""
    code = ("import logging, threading; from screening.logs import configure; configure(logging.INFO)\n"
            "t = threading.Thread(target=open, args=(%r,), name='reconcile'); t.start(); t.join()\n"
            "open(%r, 'rb')\n" % (str(tmp_path / "reports" / "SR010" / "a.pdf"), str(tmp_path / NAME)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1  # still an error exit
    assert "stopped by an error that no step handled" in proc.stderr and "thread reconcile stopped" in proc.stderr
    assert proc.stderr.count("FileNotFoundError [ENOENT]") == 2 and "SR010" not in proc.stderr
