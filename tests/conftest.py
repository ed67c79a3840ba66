"""Shared fixtures. Real data lives beside the project at ../shared/data and is never copied in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DR_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real fundus data folder; tests using it skip with a reason when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real fundus data not found at {SHARED_DATA} (set DR_SHARED_DATA or place it beside the project)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests marked ``slow`` (a minute or two each: the demo training run, float16 on real photos, the
    model card's evaluation, killed workers) first. ``make test`` spreads the suite over the CPU's cores
    (pytest-xdist); started last, one of them would run alone at the end while the other cores sit idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise collection order


# --- databases: every database test runs on SQLite and on PostgreSQL ---------------------------------------

PG_TEMP = PROJECT_ROOT / "scripts" / "pg-temp.sh"


def _no_postgres(reason: str) -> None:
    """Skip a PostgreSQL variant, saying why; under CI (CI=true) fail instead, so CI really runs them."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the PostgreSQL tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL variant skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a throw-away PostgreSQL server (scripts/pg-temp.sh) for the whole session, stopped at the end.
    ``DR_TEST_POSTGRES_URL`` points the tests at an existing server instead (a database per test is created in
    it and dropped)."""
    import shutil
    import subprocess
    import tempfile

    given = os.environ.get("DR_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _no_postgres("the psycopg driver is not installed (pip install 'psycopg[binary]'; it is a project dependency)")
    # not under pytest's tmp_path: that is private to this user and the server may run as 'postgres'
    folder = tempfile.mkdtemp(prefix="dr-pg-")
    proc = subprocess.run([str(PG_TEMP), "start", folder], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        _no_postgres(f"{PG_TEMP.name} could not start a server (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    try:
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(PG_TEMP), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


_db_counter = iter(range(1, 1_000_000))


def postgres_database(server_url: str):
    """Create an empty database on ``server_url``; returns (its URL, a function that drops it)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"dr_test_{os.getpid()}_{next(_db_counter)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return make_url(server_url).set(database=name).render_as_string(hide_password=False), drop


BACKENDS = ("sqlite", "postgresql")


def _backends() -> list[str]:
    """The backends the database tests run on: both, unless ``DR_TEST_DATABASES`` names fewer (``sqlite`` for a
    quicker local run: the PostgreSQL half is about a sixth of the suite's time). CI must run both."""
    chosen = [b.strip().lower() for b in os.environ.get("DR_TEST_DATABASES", ",".join(BACKENDS)).split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown or not chosen:
        raise pytest.UsageError(f"DR_TEST_DATABASES={os.environ.get('DR_TEST_DATABASES')!r}: name one or more of "
                                f"{', '.join(BACKENDS)}, separated by commas (unknown: {', '.join(unknown) or 'none'})")
    if os.environ.get("CI", "").lower() == "true" and set(chosen) != set(BACKENDS):
        raise pytest.UsageError("CI=true runs the database tests on every backend; unset DR_TEST_DATABASES")
    return [b for b in BACKENDS if b in chosen]


@pytest.fixture(params=_backends())
def db_backend(request) -> str:
    """Each database test runs once per backend the product supports (``DR_TEST_DATABASES`` may narrow it)."""
    return request.param


@pytest.fixture
def make_db_url(db_backend, request, tmp_path):
    """``make_db_url(name)``: the URL of a new, empty database on this test's backend (a SQLite file in
    tmp_path, or a database on the session's PostgreSQL server, dropped at the end of the test)."""
    drops = []

    def make(name: str = "screening") -> str:
        if db_backend == "sqlite":
            return f"sqlite:///{tmp_path / (name + '.db')}"
        url, drop = postgres_database(request.getfixturevalue("postgres_server"))
        drops.append(drop)
        return url

    yield make
    for drop in drops:
        drop()


@pytest.fixture
def db_url(make_db_url) -> str:
    """An empty database on each supported backend: a SQLite file, then a PostgreSQL database."""
    return make_db_url()


@pytest.fixture
def factory(db_url):
    """A session factory on ``db_url`` with the schema created (each supported backend); the engine is disposed after."""
    from screening.db import init_db, make_engine, make_session_factory

    engine = make_engine(db_url)
    init_db(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def pg_url(request):
    """An empty database on the session's PostgreSQL server, for tests of what only a server does (connections
    dropped, deadlocks); dropped at the end of the test."""
    if "postgresql" not in _backends():
        pytest.skip("PostgreSQL left out by DR_TEST_DATABASES")
    url, drop = postgres_database(request.getfixturevalue("postgres_server"))
    yield url
    drop()


# --- threads: a test must not leave a claims heartbeat behind -----------------------------------------------

@pytest.fixture(autouse=True)
def _no_claims_heartbeat_left_running():
    """Fail a test that leaves a :class:`screening.claims.Claimer` holding claims (not released, not closed). Its heartbeat
    thread would go on renewing them every few seconds for the rest of the session, against a database the test
    has dropped, logging errors into later tests (and, compiling SQL beside them, it once tripped CPython 3.11's
    non-thread-safe AST recursion counter in a later test's ``ast.parse``)."""
    import threading

    before = set(threading.enumerate())
    yield
    started = [t for t in threading.enumerate() if t.name == "claims-heartbeat" and t not in before]
    for thread in started:
        thread.join(timeout=1.0)  # one whose last claim was just released is ending
    leaked = [t for t in started if t.is_alive()]
    if leaked:
        pytest.fail(f"the test left {len(leaked)} claims heartbeat thread(s) running: close every Claimer it made "
                    "(Claimer.close, e.g. in a fixture's teardown or a finally block)", pytrace=False)
