"""Several workers on one inbox and database (issue 15): the Claimer's leases and takeovers, and two real worker
processes sharing a backlog while one of them is killed with ``kill -9``; on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from screening.claims import Claimer, ClaimLost
from screening.db import claims as dbc
from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Claim, ClaimKind, Drop, Image, Report, Result

from .conftest import write_fundus

PROJECT = Path(__file__).resolve().parents[2]
FILE = ClaimKind.FILE



def test_the_heartbeat_keeps_a_claim_past_its_lease_and_close_releases_it(factory):
    a, b = Claimer(factory, "north", 1.0), Claimer(factory, "south", 1.0)
    assert a.take(FILE, "P1_R.jpg") and a.holds(FILE, "P1_R.jpg")
    time.sleep(2.5)  # two and a half leases: renewed by the heartbeat meanwhile
    assert not b.take(FILE, "P1_R.jpg")
    with session_scope(factory) as s:
        assert b.held_by_others(s, FILE) == {"P1_R.jpg": a.holder}
    a.close()
    assert b.take(FILE, "P1_R.jpg")
    b.close()
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(Claim)) == 0


def test_the_heartbeat_ends_when_the_last_claim_is_released_and_the_next_claim_starts_another(factory):
    """A run that holds nothing keeps no thread renewing nothing: releasing its last claim ends the heartbeat at
    once, not a third of a lease later; the next claim gets a new heartbeat that keeps it past its lease."""
    a, b = Claimer(factory, "north", 3.0), Claimer(factory, "south", 3.0)
    try:
        assert a.take(FILE, "P1_R.jpg") and a.take(FILE, "P2_R.jpg")
        first = a._beat
        assert first is not None and first.is_alive()
        a.release(FILE, ["P1_R.jpg"])
        first.join(timeout=0.3)
        assert first.is_alive()  # P2_R.jpg is still held
        a.release(FILE, ["P2_R.jpg"])
        first.join(timeout=0.3)  # a third of the lease is 1 s
        assert not first.is_alive()
        assert a.take(FILE, "P3_R.jpg")
        assert a._beat is not None and a._beat is not first and a._beat.is_alive()
        time.sleep(3.5)  # past the lease: renewed meanwhile
        assert not b.take(FILE, "P3_R.jpg")
    finally:
        a.close()
        b.close()


def test_failing_renewals_log_one_traceback_then_a_line_each_and_the_recovery(factory, monkeypatch, caplog):
    """A database unreachable for a while: the heartbeat keeps trying without a traceback every few seconds."""
    import logging

    from screening.db import claims as dbc_module

    real_renew, calls = dbc_module.renew, []

    def flaky(session, holder, lease_s):
        calls.append(1)
        if len(calls) <= 3:
            raise ConnectionError("server unreachable")
        return real_renew(session, holder, lease_s)

    monkeypatch.setattr(dbc_module, "renew", flaky)
    a = Claimer(factory, "north", 0.3)
    try:
        with caplog.at_level(logging.INFO, logger="screening"):
            assert a.take(FILE, "P1_R.jpg")
            deadline = time.monotonic() + 10
            while len(calls) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        a.close()
    records = [r for r in caplog.records if "renewing this worker's claims" in r.getMessage()]
    assert [(r.levelname, r.exc_info is not None) for r in records[:4]] == [
        ("ERROR", True), ("WARNING", False), ("WARNING", False), ("INFO", False)]
    assert "3 times in a row, ConnectionError" in records[2].getMessage()
    assert "works again after 3 failure(s)" in records[3].getMessage()


def test_a_stalled_holder_is_taken_over_after_its_lease_and_commits_nothing(factory):
    a, b = Claimer(factory, "north", 0.5), Claimer(factory, "south", 30.0)
    assert a.take(FILE, "P2_L.jpg")
    a._stop_heartbeat()  # a stalls: its heartbeat stops (as in a process frozen past its lease)
    time.sleep(1.0)
    assert b.take(FILE, "P2_L.jpg")
    with pytest.raises(ClaimLost, match="took over"), session_scope(factory) as s:
        a.hold(s, FILE, "P2_L.jpg")
    assert not a.holds(FILE, "P2_L.jpg")
    with session_scope(factory) as s:
        b.hold(s, FILE, "P2_L.jpg")  # still b's
    b.close()


def _holding_process(db_url: str, holder: str, lease: float) -> subprocess.Popen[str]:
    """Another process holding the claim on 'P3_R.jpg' (no heartbeat), until it is killed."""
    code = ("import sys, time\nfrom screening.db import make_engine, make_session_factory, session_scope\n"
            "from screening.db import claims\nfrom screening.db.models import ClaimKind\n"
            "factory = make_session_factory(make_engine(sys.argv[1]))\n"
            "with session_scope(factory) as s:\n"
            "    assert claims.take(s, ClaimKind.FILE, 'P3_R.jpg', sys.argv[2], 'north', float(sys.argv[3])) == sys.argv[2]\n"
            "print('held', flush=True)\ntime.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, db_url, holder, str(lease)], cwd=PROJECT,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_killed_worker_on_another_machine_releases_its_claim_after_the_lease(factory, db_url):
    """A holder named as on another machine cannot be checked for life: its claim waits out the lease."""
    child = _holding_process(db_url, "north/another-machine/4242/0a0b", 3.0)
    b = Claimer(factory, "south", 30.0)
    try:
        assert not b.take(FILE, "P3_R.jpg")
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not b.take(FILE, "P3_R.jpg")  # killed, but the lease is still running
        time.sleep(3.2)
        assert b.take(FILE, "P3_R.jpg")
    finally:
        child.kill()
        b.close()


def test_a_killed_worker_on_this_machine_is_taken_over_at_once(factory, db_url):
    """A restarted worker need not wait out its killed predecessor's lease: its process is gone."""
    import socket

    child = _holding_process(db_url, "north/elsewhere/1/0a0b", 600.0)
    child.kill()
    child.wait()
    b = Claimer(factory, "south", 30.0)
    assert not b.take(FILE, "P3_R.jpg")  # as held from another machine: the lease (600 s) would have to pass
    with session_scope(factory) as s:  # named as the process it was, on this machine
        s.execute(Claim.__table__.update().values(holder=f"north/{socket.gethostname()}/{child.pid}/0a0b"))
    assert b.take(FILE, "P3_R.jpg")
    b.close()


# ---------------------------------------------------------------------------------- two real worker processes

def _config(tmp_path: Path, settings, site: str) -> Path:
    cfg = tmp_path / f"{site}.toml"
    cfg.write_text(
        "[screening]\n"
        f"inbox = '{settings.inbox}'\nreports = '{settings.reports}'\narchive = '{settings.archive}'\n"
        f"rejected = '{settings.rejected}'\nwork_dir = '{settings.work_dir}'\ndatabase = '{settings.database}'\n"
        f"checkpoint = '{settings.checkpoint}'\nquality_model = '{settings.quality_model}'\n"
        f"laterality_model = '{settings.laterality_model}'\n"
        f"stable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\nbatch_size = 1\n"
        f"poll_interval = 0.2\nsweep_interval = 1.0\nreport_renderer = 'inline'\nsite = '{site}'\n"
        "claim_lease_seconds = 3\n"
    )
    return cfg


def _start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "screening.cli", "--config", str(cfg), "run"], cwd=PROJECT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(PROJECT)})


@pytest.mark.slow
def test_two_workers_share_one_inbox_and_one_is_killed_mid_photo(settings_db, tmp_path):
    """Two workers (sites north and south) in watch mode on one inbox and database with a backlog of 7 visits,
    both eyes each. North is killed with SIGKILL while it holds a photo; south finishes everything. Every photo
    is graded exactly once, none is lost or left, each visit's versions are 1..n with no gap, the newest one
    covers both eyes, and each result names the site that graded it."""
    settings = settings_db  # on SQLite, then on PostgreSQL
    photos = [f"V{k}_{eye}.jpg" for k in range(7) for eye in "RL"]
    for n, name in enumerate(photos):
        write_fundus(settings.inbox / name, seed=100 + n)
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    north = _start(_config(tmp_path, settings, "north"), tmp_path / "north.log")
    south = _start(_config(tmp_path, settings, "south"), tmp_path / "south.log")
    logs = lambda: "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "north.log", tmp_path / "south.log"))  # noqa: E731

    def north_holds_a_photo() -> bool:
        with session_scope(factory) as s:
            return bool(s.scalar(select(func.count()).select_from(Claim).where(
                Claim.site == "north", Claim.kind == FILE.value)))

    try:
        # Seen holding a photo, north is frozen (SIGSTOP) and asked again: it may have released the photo between
        # the look and the signal (a run once found nothing held at the kill). Still holding one, frozen, it is
        # killed mid-photo; otherwise it goes on and is caught at its next photo.
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline and north.poll() is None and south.poll() is None, logs()
            if north_holds_a_photo():
                north.send_signal(signal.SIGSTOP)
                if north_holds_a_photo():
                    break
                north.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        north.send_signal(signal.SIGKILL)
        north.wait()
        with session_scope(factory) as s:  # what north held when it died
            held = set(s.scalars(select(Claim.key).where(Claim.site == "north", Claim.kind == FILE.value)))

        def finished() -> bool:
            with session_scope(factory) as s:
                states = Counter(s.scalars(select(Image.state)))
            return states == Counter({"reported": len(photos)}) and not list(settings.inbox.iterdir())

        deadline = time.monotonic() + 300
        while not finished():
            assert time.monotonic() < deadline and south.poll() is None, logs()
            time.sleep(0.25)
    finally:
        for proc in (north, south):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (north, south):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert south.returncode == 0, logs()

    with session_scope(factory) as s:
        images = list(s.scalars(select(Image)))
        assert sorted(i.source_name for i in images) == sorted(photos)  # none lost, none recorded twice
        results = list(s.scalars(select(Result)))
        assert sorted(r.image_id for r in results) == sorted(i.id for i in images)  # each graded exactly once
        assert {r.site for r in results} <= {"north", "south"} and "south" in {r.site for r in results}
        site_of = {i.source_name: r.site for i in images for r in results if r.image_id == i.id}
        assert held and "south" in {site_of[name] for name in held}  # north's photos taken over and finished by south
        assert s.scalar(select(func.count()).select_from(Drop).where(Drop.outcome != "new")) == 0
        versions: dict[int, list[int]] = {}
        for exam_id, version in s.execute(select(Report.exam_id, Report.version).order_by(Report.exam_id, Report.version)):
            versions.setdefault(exam_id, []).append(version)
        assert len(versions) == 7 and all(v == list(range(1, len(v) + 1)) for v in versions.values()), versions
        assert s.scalar(select(func.count()).select_from(Claim)) == 0 or all(
            c.site == "north" for c in s.scalars(select(Claim)))  # south released all of its own
    archived = sorted(p.name.split("_", 1)[1] for p in settings.archive.rglob("*.jpg"))
    assert archived == sorted(photos)  # each original archived once
    for visit in {p.split("_")[0] for p in photos}:
        (latest,) = settings.reports.glob(f"{visit}/*/latest.pdf")
        assert latest.stat().st_size > 0
    engine.dispose()


def test_workers_starting_together_create_the_schema_once(make_db_url):
    """Two processes open a new database at the same moment: one creates the schema, the other waits for it."""
    from screening.db import current_revision, head_revision

    url = make_db_url("fresh")
    code = "import sys\nfrom screening.db import init_db, make_engine\nprint(init_db(make_engine(sys.argv[1])))\n"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=PROJECT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT)})
             for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]
    engine = make_engine(url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    engine.dispose()


def test_claims_rows_are_the_only_coordination(factory):
    """No lock file and nothing in the inbox: two Claimers in one process (two worker threads) share by rows."""
    a, b = Claimer(factory, "north", 30.0), Claimer(factory, "south", 30.0)
    assert a.take(FILE, "x.jpg") and not b.take(FILE, "x.jpg") and b.take(FILE, "y.jpg")
    with session_scope(factory) as s:
        assert {c.key: c.site for c in s.scalars(select(Claim))} == {"x.jpg": "north", "y.jpg": "south"}
        assert dbc.held_by_others(s, FILE, a.holder) == {"y.jpg": b.holder}
    a.close()
    b.close()
