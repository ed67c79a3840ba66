"""Commit, then move: in every branch that moves a clinic file out of the inbox, a worker process killed
between the commit and the move loses nothing and records nothing twice once it is restarted.

Each case sets the scene in this process, then runs the real CLI (``dr-screen run --once``) in a child
process whose one file-moving function (``screening.stages.filing.move_out_of_inbox``, through which every
move goes) ends the process with ``os._exit`` instead of moving. The database it leaves is checked (the
record is committed, the file is still in the inbox), then a fresh worker runs and the end state is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db import repository as repo
from screening.db.models import Drop, Event, Image, Result
from screening.inference import Predictor
from screening.pipeline import Worker

from ..conftest import write_fundus

PROJECT = Path(__file__).resolve().parents[3]
KILLED = 86
CHILD = """
import os, sys
import screening.stages.filing as filing
from screening.cli import main

def killed(path, dest):  # the process dies where the file would have moved: after the commit
    os._exit({code})

filing.move_out_of_inbox = killed
sys.exit(main(["--config", sys.argv[1], "run", "--once", "--no-demo"]))
""".format(code=KILLED)


@pytest.fixture(params=["sqlite"])
def db_backend(request) -> str:
    """These tests kill a real CLI process between a commit and a move (about 10 s each): their subject is the
    files, and the statements they commit are the ones every other stage test runs on both databases. So they
    run on SQLite, and one of them (the graded image) on PostgreSQL as well."""
    return str(request.param)


@pytest.fixture
def inline(settings):
    return settings.model_copy(update={"report_renderer": "inline"})


def _worker(settings) -> Worker:
    engine = make_engine(settings.database)
    init_db(engine)
    return Worker(settings, Predictor(settings.checkpoint, "cpu", 1), make_session_factory(engine), PROJECT / "templates")


def _run(settings) -> None:
    with _worker(settings) as worker:
        worker.run_once(settle_timeout=5)


def _killed_run(settings, tmp_path: Path) -> None:
    """The CLI in a child process that dies at its first move out of the inbox."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[screening]\n"
        f"inbox = '{settings.inbox}'\nreports = '{settings.reports}'\narchive = '{settings.archive}'\n"
        f"rejected = '{settings.rejected}'\nwork_dir = '{settings.work_dir}'\ndatabase = '{settings.database}'\n"
        f"checkpoint = '{settings.checkpoint}'\nquality_model = '{settings.quality_model}'\n"
        f"laterality_model = '{settings.laterality_model}'\nstable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\n"
        "report_renderer = 'inline'\n"
    )
    child = subprocess.run([sys.executable, "-c", CHILD, str(cfg)], cwd=PROJECT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))})
    assert child.returncode == KILLED, f"the child was not stopped at a move (exit {child.returncode}):\n{child.stderr[-3000:]}"


def _state(settings) -> dict:
    factory = make_session_factory(make_engine(settings.database))
    with session_scope(factory) as s:
        return {
            "drops": Counter(d.outcome for d in s.scalars(select(Drop))),
            "images": {i.source_name: (i.state, i.stored_path) for i in s.scalars(select(Image))},
            "results": len(s.scalars(select(Result)).all()),
            "events": Counter(e.kind for e in s.scalars(select(Event))),
            "unfiled": [(d.outcome, d.source_name) for d in repo.unfiled_drops(s)],
        }


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------- cases


@pytest.mark.parametrize("db_backend", ["sqlite", "postgresql"], indirect=True)
def test_graded_image_killed_before_its_archive(inline, tmp_path):
    write_fundus(inline.inbox / "P1_R.jpg", seed=1)
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["results"] == 1 and st["images"]["P1_R.jpg"] == ("done", str(inline.inbox / "P1_R.jpg"))
    assert _files(inline.inbox) == ["P1_R.jpg"] and _files(inline.archive) == []

    _run(inline)
    st = _state(inline)
    assert _files(inline.inbox) == [] and len(_files(inline.archive)) == 1
    state, stored = st["images"]["P1_R.jpg"]
    assert state == "reported" and Path(stored).is_file() and Path(stored).is_relative_to(inline.archive)
    assert st["results"] == 1 and st["drops"] == {"new": 1} and st["unfiled"] == []
    assert len(list(inline.reports.rglob("report_v*.pdf"))) == 1


def test_multi_page_file_killed_before_its_archive(inline, tmp_path):
    """Both photo pages committed, the form refused, then killed where the file would be archived: the restart
    moves the file once and records nothing twice (issue 12, multi-page files)."""
    from ..conftest import WHITE_PAGE, synthetic_fundus, write_tiff_pages

    inline = inline.model_copy(update={"quality_model": PROJECT / "models" / "quality.pt"})  # refuses the form
    write_tiff_pages(inline.inbox / "P9_R.tif", [synthetic_fundus(91), WHITE_PAGE, synthetic_fundus(92)])
    _killed_run(inline, tmp_path)
    st = _state(inline)
    here = str(inline.inbox / "P9_R.tif")
    assert st["images"] == {"P9_R.tif (page 1)": ("done", here), "P9_R.tif (page 2)": ("rejected", here),
                            "P9_R.tif (page 3)": ("done", here)}
    assert st["results"] == 2 and st["drops"] == {"new": 1}
    assert _files(inline.inbox) == ["P9_R.tif"] and _files(inline.archive) == []

    _run(inline)
    st = _state(inline)
    assert _files(inline.inbox) == [] and len(_files(inline.archive)) == 1
    (archived,) = {stored for _, stored in st["images"].values()}
    assert Path(archived).is_file() and Path(archived).is_relative_to(inline.archive)
    assert [state for state, _ in st["images"].values()] == ["reported", "rejected", "reported"]
    assert st["results"] == 2 and st["drops"] == {"new": 1} and st["unfiled"] == []
    assert len(list(inline.reports.rglob("report_v*.pdf"))) == 1


def test_duplicate_of_a_graded_image_killed_before_its_move(inline, tmp_path):
    write_fundus(inline.inbox / "P2_R.jpg", seed=2)
    _run(inline)
    (archived,) = inline.archive.rglob("*P2_R.jpg")
    shutil.copy(archived, inline.inbox / "P2_R.jpg")  # the same photo dropped again
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["drops"] == {"new": 1, "duplicate": 1} and st["unfiled"] == [("duplicate", "P2_R.jpg")]
    assert _files(inline.inbox) == ["P2_R.jpg"]

    _run(inline)
    st = _state(inline)
    assert _files(inline.inbox) == [] and len(list(inline.archive.rglob("duplicates/*P2_R.jpg"))) == 1
    assert st["drops"] == {"new": 1, "duplicate": 1} and st["unfiled"] == [] and st["events"]["duplicate"] == 1
    assert st["results"] == 1 and st["images"]["P2_R.jpg"][0] == "reported"


def test_duplicate_of_an_image_in_flight_killed_before_its_move(inline, tmp_path):
    first = write_fundus(inline.inbox / "P3_R.jpg", seed=3)
    second = inline.inbox / "P3_R_20250101.jpg"
    shutil.copy(first, second)  # same bytes in the same batch: the second is a duplicate of the first
    os.utime(first, (1_700_000_000, 1_700_000_000))  # the first is swept first
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["drops"] == {"new": 1, "duplicate": 1} and st["unfiled"] == [("duplicate", "P3_R_20250101.jpg")]
    assert st["images"]["P3_R.jpg"][0] == "received" and st["results"] == 0
    assert _files(inline.inbox) == ["P3_R.jpg", "P3_R_20250101.jpg"]

    _run(inline)
    st = _state(inline)
    assert _files(inline.inbox) == []
    assert len(list(inline.archive.rglob("duplicates/*P3_R_20250101.jpg"))) == 1
    assert len([p for p in inline.archive.rglob("*.jpg") if "duplicates" not in p.parts]) == 1
    assert st["drops"] == {"new": 1, "duplicate": 1} and st["unfiled"] == [] and st["events"]["duplicate"] == 1
    assert st["results"] == 1 and st["images"]["P3_R.jpg"][0] == "reported"


def test_refused_new_file_killed_before_its_move(inline, tmp_path):
    write_fundus(inline.inbox / "holiday.jpg", seed=4)  # a fundus photo without a patient id
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["drops"] == {"rejected": 1} and st["unfiled"] == [("rejected", "holiday.jpg")]
    assert st["images"]["holiday.jpg"] == ("rejected", str(inline.inbox / "holiday.jpg"))
    assert _files(inline.inbox) == ["holiday.jpg"]

    _run(inline)
    st = _state(inline)
    files = _files(inline.rejected)
    assert _files(inline.inbox) == [] and len(files) == 2  # the file and its one reason file
    (reason,) = [f for f in files if f.endswith(".reason.txt")]
    assert "no patient id" in (inline.rejected / reason).read_text()
    state, stored = st["images"]["holiday.jpg"]
    assert state == "rejected" and stored == str(inline.rejected / reason.removesuffix(".reason.txt"))
    assert st["drops"] == {"rejected": 1} and st["unfiled"] == [] and st["events"]["rejected"] == 1


def test_refused_pending_drop_of_a_known_image_killed_before_its_move(inline, tmp_path, monkeypatch):
    """An image whose grading failed stays in the inbox; its sidecar then names an impossible eye: the image
    itself is refused, and its file (with the sidecar) moves to rejected/."""
    write_fundus(inline.inbox / "P5_R.jpg", seed=5)
    monkeypatch.setattr(Predictor, "run", lambda self, batch: (_ for _ in ()).throw(RuntimeError("out of memory")))
    _run(inline)
    monkeypatch.undo()
    assert _state(inline)["images"]["P5_R.jpg"][0] == "failed"
    (inline.inbox / "P5_R.json").write_text(json.dumps({"eye": "X"}))
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["drops"] == {"new": 1, "rejected": 1} and st["unfiled"] == [("rejected", "P5_R.jpg")]
    assert st["images"]["P5_R.jpg"] == ("rejected", str(inline.inbox / "P5_R.jpg"))
    assert _files(inline.inbox) == ["P5_R.jpg", "P5_R.json"]

    _run(inline)
    st = _state(inline)
    files = _files(inline.rejected)
    assert _files(inline.inbox) == [] and len(files) == 3
    (photo,) = [f for f in files if f.endswith("P5_R.jpg")]
    assert photo + ".json" in files and photo + ".reason.txt" in files  # the sidecar went with it
    assert "invalid eye" in (inline.rejected / (photo + ".reason.txt")).read_text()
    assert st["images"]["P5_R.jpg"] == ("rejected", str(inline.rejected / photo))
    assert st["drops"] == {"new": 1, "rejected": 1} and st["unfiled"] == [] and st["events"]["rejected"] == 1


def test_refused_again_under_another_name_killed_before_its_move(inline, tmp_path):
    write_fundus(inline.inbox / "holiday.jpg", seed=6)
    _run(inline)
    (first,) = [p for p in inline.rejected.iterdir() if p.name.endswith("holiday.jpg")]
    shutil.copy(first, inline.inbox / "holiday2.jpg")
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["drops"] == {"rejected": 2} and st["unfiled"] == [("rejected", "holiday2.jpg")]
    assert st["images"]["holiday.jpg"] == ("rejected", str(first))  # the known image keeps its own file
    assert _files(inline.inbox) == ["holiday2.jpg"]

    _run(inline)
    st = _state(inline)
    assert _files(inline.inbox) == [] and len(_files(inline.rejected)) == 4  # two files, two reason files
    assert len([f for f in _files(inline.rejected) if f.endswith("holiday2.jpg")]) == 1
    assert st["images"] == {"holiday.jpg": ("rejected", str(first))}
    assert st["drops"] == {"rejected": 2} and st["unfiled"] == [] and st["events"]["rejected"] == 2


def test_an_interrupted_move_whose_file_was_taken_away_is_closed_at_start_up(inline, tmp_path):
    """After the kill someone removes the file: the restart records the drop as not moved, so the same file
    dropped again later is a new arrival, not the end of the old move."""
    write_fundus(inline.inbox / "holiday.jpg", seed=7)
    _killed_run(inline, tmp_path)
    kept = (inline.inbox / "holiday.jpg").read_bytes()
    (inline.inbox / "holiday.jpg").unlink()
    _run(inline)
    st = _state(inline)
    assert st["unfiled"] == [] and st["drops"] == {"rejected": 1} and _files(inline.rejected) == []
    factory = make_session_factory(make_engine(inline.database))
    with session_scope(factory) as s:
        (closing,) = s.scalars(select(Event).where(Event.kind == "rejected")).all()
        assert "not moved" in closing.message and closing.drop_id is not None
    (inline.inbox / "holiday.jpg").write_bytes(kept)
    _run(inline)
    st = _state(inline)
    assert st["drops"] == {"rejected": 2} and len(_files(inline.rejected)) == 2 and _files(inline.inbox) == []


def test_a_refused_link_killed_before_its_move_is_recorded_once(inline, tmp_path):
    """An inbox entry that is not a file has a drop without an image; its interrupted move is finished the same way."""
    target = write_fundus(tmp_path / "elsewhere.jpg", seed=9)
    (inline.inbox).mkdir(parents=True, exist_ok=True)
    (inline.inbox / "P9_R.jpg").symlink_to(target)
    _killed_run(inline, tmp_path)
    st = _state(inline)
    assert st["drops"] == Counter({"rejected": 1}) and st["unfiled"] == [("rejected", "P9_R.jpg")]
    assert (inline.inbox / "P9_R.jpg").is_symlink()
    _run(inline)
    st = _state(inline)
    assert st["drops"] == Counter({"rejected": 1}) and st["unfiled"] == [] and st["images"] == {}
    assert [p.name for p in inline.rejected.iterdir() if p.is_symlink()] and target.is_file()
    assert list(inline.inbox.iterdir()) == []


def test_partial_copies_left_by_a_crash_are_removed_at_start_up(inline):
    from screening.stages import Filing

    for folder in (inline.archive / "2026-01-02", inline.archive / "2026-01-02" / "duplicates", inline.rejected):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".abc_P1_R.jpg.partial").write_bytes(b"half a photo")
        (folder / "kept.jpg").write_bytes(b"a whole one")
    filing = Filing(inline, _worker(inline).factory)
    assert filing.clean_partials() == 3
    assert sorted(p.name for p in inline.archive.rglob("*") if p.is_file()) == ["kept.jpg", "kept.jpg"]
    with session_scope(filing.factory) as s:
        assert [e.code for e in s.scalars(select(Event).where(Event.kind == "reconcile"))] == ["partial_copy_removed"]


def test_a_line_break_in_a_refused_files_name_cannot_forge_a_line_of_its_reason_file(settings):
    from datetime import datetime, timezone

    from screening.stages import Filing

    settings.inbox.mkdir(parents=True, exist_ok=True)
    path = settings.inbox / "P1_R.jpg\nFile: forged.jpg"
    path.write_bytes(b"not a photo")
    dest = Filing(settings, None).reject(path, "a" * 64, f"'{path.name}' is not a readable image",
                                         datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc))
    text = Path(str(dest) + ".reason.txt").read_text(encoding="utf-8")
    assert [line for line in text.splitlines() if line.startswith("File:")] == ["File: P1_R.jpg\\nFile: forged.jpg"]
    assert "Reason: 'P1_R.jpg\\nFile: forged.jpg' is not a readable image" in text
    assert dest.read_bytes() == b"not a photo"
