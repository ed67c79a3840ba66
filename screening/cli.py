"""``dr-screen``: run the worker (watch or one-shot), audit statistics, database set-up. Thin."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from .runtime import apply_worker_env

apply_worker_env()  # before torch is imported below (see screening/runtime.py)

from training.api import CheckpointError, ConfigError  # noqa: E402

from .config import ScreeningSettings, load_screening_settings  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from .pipeline import Worker

log = logging.getLogger("screening")


def check_database_url(url: str) -> None:
    """A :class:`ConfigError` saying why ``url`` cannot work (unparseable, an unknown kind of database, a SQLite
    file in a folder that does not exist), before anything is opened."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from .db.session import sqlite_file_path

    shown = url.split("@")[-1]  # never print a password
    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"[screening] database = {shown!r} is not a usable database URL ({type(exc).__name__}); "
                          "use e.g. 'sqlite:///screening.db'") from None
    path = sqlite_file_path(url)
    if path is not None and not Path(path).parent.is_dir():
        raise ConfigError(f"[screening] database: the folder {Path(path).parent} does not exist; create it or point "
                          "the database URL at an existing folder")


def _session_factory(settings: ScreeningSettings) -> sessionmaker[Session]:
    """The database, created or migrated; a URL that cannot work is a :class:`ConfigError` saying why."""
    from sqlalchemy.exc import OperationalError

    from .db import init_db, make_engine, make_session_factory

    check_database_url(settings.database)
    try:
        engine = make_engine(settings.database)
        init_db(engine)
    except OperationalError as exc:
        raise ConfigError(f"[screening] database {settings.database.split('@')[-1]!r} cannot be opened ({exc.orig}); "
                          "check the path and its permissions") from None
    return make_session_factory(engine)


def prepare_folders(settings: ScreeningSettings) -> None:
    """Create the worker's folders; a path that exists but is not a folder is a :class:`ConfigError`."""
    for key in ("inbox", "reports", "archive", "rejected", "work_dir"):
        folder: Path = getattr(settings, key)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"[screening] {key} = {str(folder)!r} is a file, not a folder; point it at a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"[screening] {key}: cannot create the folder {folder} ({exc.strerror})") from None


def resolve_checkpoint(settings: ScreeningSettings, allow_demo: bool = True) -> Path:
    """The configured checkpoint, or (when it is missing) a demo model trained once on synthetic images."""
    if settings.checkpoint.is_file():
        return settings.checkpoint
    if not allow_demo:
        raise CheckpointError(f"checkpoint not found: {settings.checkpoint}; set [screening] checkpoint in the config")
    demo = settings.work_dir / "demo-model.pt"
    if not demo.is_file():
        from training.api import train_demo_model

        log.warning("no checkpoint at %s: training a DEMO model on synthetic images (about 3 minutes); "
                    "its reports are watermarked 'not for clinical use'", settings.checkpoint)
        train_demo_model(demo, settings.work_dir / "demo-training", minutes=3.0, progress=False)
    log.warning("using the DEMO model %s: reports are not for clinical use", demo)
    return demo


def make_worker(settings: ScreeningSettings, config_path: Path, allow_demo: bool = True) -> Worker:
    from .inference import Predictor
    from .pipeline import Worker

    predictor = Predictor(resolve_checkpoint(settings, allow_demo), settings.device, settings.threads)
    log.info("model %s (%s) on %s", predictor.version, predictor.kind, predictor.device)
    templates = config_path.resolve().parent / "templates"
    if not (templates / "report.html.j2").is_file():
        templates = Path(__file__).resolve().parents[1] / "templates"
    return Worker(settings, predictor, _session_factory(settings), templates)


def cmd_run(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    """Exit 0 when everything was handled; 1 when a file failed, could not be moved, or a report failed (all of
    them are retried by the next run); 2 for a configuration error; 3 when the worker could not run or had
    to stop (another worker holds the inbox or database; the database file was deleted or replaced)."""
    from .lock import WorkerLock

    check_database_url(settings.database)
    prepare_folders(settings)
    with WorkerLock(settings.inbox, settings.database):  # before the database is opened: no two create it
        with make_worker(settings, Path(args.config), allow_demo=not args.no_demo) as worker:
            if args.once:
                out = worker.run_once()
                print(out.summary())
                return 0 if out.ok else 1
            worker.run_forever()
    return 0


def cmd_audit(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from .audit import audit_summary, format_table, write_csv, write_json
    from .db import session_scope

    factory = _session_factory(settings)
    with session_scope(factory) as session:
        summary = audit_summary(session, args.start, args.end, args.model_version)
    print(format_table(summary))
    if args.csv:
        write_csv(summary, Path(args.csv))
        print(f"CSV written to {args.csv}")
    if args.json:
        write_json(summary, Path(args.json))
        print(f"JSON written to {args.json}")
    return 0


def cmd_init_db(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    _session_factory(settings)
    print(f"database ready: {settings.database}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr-screen", description="DR screening worker: inbox -> grades -> PDF reports.")
    p.add_argument("--config", default="config.toml", help="settings file (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("run", help="watch the inbox and process new photos (Ctrl-C to stop)")
    sp.add_argument("--once", action="store_true", help="process what is in the inbox now, then exit (cron, tests)")
    sp.add_argument("--no-demo", action="store_true", help="fail instead of training a demo model when no checkpoint exists")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("audit", help="counts by grade, DME, referral; rejects; turnaround; per model version")
    sp.add_argument("--from", dest="start", type=date.fromisoformat, help="first day (YYYY-MM-DD), by date received")
    sp.add_argument("--to", dest="end", type=date.fromisoformat, help="last day (YYYY-MM-DD), inclusive")
    sp.add_argument("--model-version")
    sp.add_argument("--csv", help="also write the table as CSV to this file")
    sp.add_argument("--json", help="also write JSON to this file")
    sp.set_defaults(func=cmd_audit)
    sp = sub.add_parser("init-db", help="create or migrate the database")
    sp.set_defaults(func=cmd_init_db)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("weasyprint.progress").setLevel(logging.WARNING)  # seven "Step n" lines per report
    from .db import DatabaseGone, SchemaError
    from .lock import WorkerLocked

    try:
        settings = load_screening_settings(args.config)
        command: Callable[[argparse.Namespace, ScreeningSettings], int] = args.func
        return command(args, settings)
    except (ConfigError, CheckpointError, SchemaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (WorkerLocked, DatabaseGone) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
