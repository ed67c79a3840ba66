"""``dr-screen``: run the worker (watch or one-shot), audit statistics, database set-up, the clinician's
review (queue, sign-off, grading-centre import), the review page and its logins. Thin: the work is in
:mod:`screening.review` and :mod:`screening.web`."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .runtime import apply_worker_env

apply_worker_env()  # before torch is imported below (see screening/runtime.py)

from training.api import ConfigError  # noqa: E402  (torch-free: CheckpointError is caught lazily, see main)
from training.common import also_after_subcommands  # noqa: E402

from .config import ScreeningSettings, load_screening_settings  # noqa: E402
from .logs import configure  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from .pipeline import Worker
    from .review import Visit

log = logging.getLogger("screening")
T = TypeVar("T")


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


def _session_factory(settings: ScreeningSettings, create: bool = False) -> sessionmaker[Session]:
    """The database, migrated; a URL that cannot work is a :class:`ConfigError` saying why.

    ``create``: a SQLite file that does not exist yet is made (the worker's start, ``init-db``, the first user).
    Every other command refuses it: an audit on a mistyped path made an empty database and reported a day of
    zeros as if nothing had happened (found in a manager-style check)."""
    from sqlalchemy.exc import OperationalError

    from .db import init_db, make_engine, make_session_factory
    from .db.session import sqlite_file_path

    check_database_url(settings.database)
    path = sqlite_file_path(settings.database)
    if not create and path is not None and not Path(path).exists():
        raise ConfigError(f"[screening] database: there is no database at {path}. The worker makes it on its first "
                          "run (`dr-screen run`); if it has run, check the path in the configuration (a typo?)")
    try:
        engine = make_engine(settings.database)
        init_db(engine)
    except OperationalError as exc:
        advice = ("check the path and its permissions" if settings.database.startswith("sqlite") else
                  "check that the server is running and reachable from here, and the host, port, user name, password "
                  "and database name in the URL")
        raise ConfigError(f"[screening] database {settings.database.split('@')[-1]!r} cannot be opened "
                          f"({str(exc.orig).strip()}); {advice}") from None
    return make_session_factory(engine)


def prepare_folders(settings: ScreeningSettings) -> None:
    """Create the worker's folders; a path that exists but is not a folder is a :class:`ConfigError`."""
    for key in ("inbox", "reports", "archive", "rejected", "work_dir"):
        folder: Path = getattr(settings, key)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"[screening] {key} = {str(folder)!r} is a file, not a folder; point it at a folder")
        made = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"[screening] {key}: cannot create the folder {folder} ({exc.strerror})") from None
        if made and key == "inbox":  # a typo or an unmounted share read like a quiet clinic (a newcomer's check)
            log.warning("the inbox %s did not exist and was made empty: if it should be a network share, is it mounted? "
                        "If the path is wrong, fix [screening] inbox (relative paths are read from the config file's "
                        "folder)", folder)


def resolve_checkpoint(settings: ScreeningSettings, allow_demo: bool = True) -> Path:
    """The configured checkpoint, or (when it is missing) a demo model trained once on synthetic images."""
    if settings.checkpoint.is_file():
        return settings.checkpoint
    if not allow_demo:
        from training.api import CheckpointError

        raise CheckpointError(f"checkpoint not found: {settings.checkpoint}; set [screening] checkpoint in the config "
                              "(relative paths are read from the config file's folder)")
    if not settings.checkpoint.parent.is_dir():  # a config copied elsewhere: its relative model path points nowhere
        from training.api import CheckpointError

        raise CheckpointError(f"checkpoint not found: {settings.checkpoint} (its folder does not exist either). Relative "
                              "paths in a config are read from the config file's own folder: point [screening] checkpoint "
                              "(and quality_model, laterality_model) at the project's models/. A demo model is trained "
                              "only where the configured model folder exists")
    demo = settings.demo_checkpoint
    if not demo.is_file():
        from training.api import train_demo_model

        log.warning("no checkpoint at %s: training a DEMO model on synthetic images (about 3 minutes); "
                    "its reports are watermarked 'not for clinical use'", settings.checkpoint)
        train_demo_model(demo, settings.work_dir / "demo-training", minutes=3.0, progress=False)
    log.warning("using the DEMO model %s: reports are not for clinical use", demo)
    return demo


def templates_dir(config_path: Path) -> Path:
    """``templates/`` beside the config file when it has the report template, else the installed one."""
    templates = config_path.resolve().parent / "templates"
    if not (templates / "report.html.j2").is_file():
        templates = Path(__file__).resolve().parents[1] / "templates"
    return templates


def make_worker(settings: ScreeningSettings, config_path: Path, allow_demo: bool = True) -> Worker:
    from .inference import MAX_GPU_BATCH, Predictor
    from .pipeline import Worker

    predictor = Predictor(resolve_checkpoint(settings, allow_demo), settings.device, settings.threads, settings.precision)
    log.info("model %s (%s) on %s, %s", predictor.version, predictor.kind, predictor.device, predictor.precision)
    if settings.gpu_memory_gb:  # device is cuda (config validation): batches as large as that memory allows
        batch = predictor.batch_size_for(settings.gpu_memory_gb, settings.gpu_batch_cap() or MAX_GPU_BATCH)
        settings = settings.model_copy(update={"batch_size": batch})
    return Worker(settings, predictor, _session_factory(settings, create=True), templates_dir(config_path))


def cmd_run(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    """Exit 0 when everything was handled; 1 when a file failed, could not be read or moved, or a report failed
    (all of them are retried by the next run); 2 for a configuration error; 3 when the worker had to stop (the database
    file was deleted or replaced). Other workers may run on the same inbox and database at the same time
    (screening/claims.py); a file one of them holds is left to it."""
    check_database_url(settings.database)
    prepare_folders(settings)
    with make_worker(settings, Path(args.config), allow_demo=not args.no_demo) as worker:
        log.info("worker %s (site %s) on %s", worker.claims.holder, settings.site, settings.database.split("@")[-1])
        if args.once:
            out = worker.run_once()
            print(out.summary())
            return 0 if out.ok else 1
        worker.run_forever()
    return 0


def _day(text: str) -> date:
    """An audit day, ``YYYY-MM-DD`` (argparse names the option in front of the message)."""
    import re

    shaped = re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()) is not None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        if shaped:  # 2026-02-30: the form is right, the date does not exist
            raise argparse.ArgumentTypeError(f"{text!r} is not a real date (no such month or day)") from None
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from None


def _output_problem(option: str, text: str, overwrite: bool = False) -> str | None:
    """Why the file ``text`` given to ``option`` could not be written, or None: checked before the audit is
    computed, so a wrong path costs nothing and says which option. The path is the user's own argument, not
    patient data: it is named. An existing file is replaced only with ``overwrite`` (``--csv config.toml``
    replaced the configuration without a word, found in a manager-style check)."""
    import os

    path = Path(text)
    if path.is_dir():
        return f"{option} {text} is a folder: give a file name in it"
    if path.exists() and not overwrite:
        return f"{option} {text} exists already: give a new file name, or pass --overwrite to replace it"
    folder = path.parent
    if not folder.is_dir():
        return f"{option} {text}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{option} {text}: not allowed to write there"
    return None


def cmd_audit(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    if args.start is not None and args.end is not None and args.end < args.start:
        print(f"error: --to is before --from ({args.end} < {args.start})", file=sys.stderr)
        return 2
    outputs = [(option, text) for option, text in (("--csv", args.csv), ("--json", args.json)) if text]
    if len(outputs) == 2 and Path(args.csv).resolve() == Path(args.json).resolve():
        print(f"error: --csv and --json name the same file ({args.csv}): the second would replace the first; give "
              "each its own name", file=sys.stderr)
        return 2
    for option, text in outputs:
        if (problem := _output_problem(option, text, args.overwrite)) is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2

    from .audit import audit_summary, format_table, model_versions, write_csv, write_json
    from .db import session_scope

    factory = _session_factory(settings)
    with session_scope(factory) as session:
        if args.model_version is not None and args.model_version not in (known := model_versions(session)):
            print(f"error: --model-version {args.model_version!r}: no photo was graded by that version; "
                  f"known: {', '.join(known) if known else 'none (no photo graded yet)'}", file=sys.stderr)
            return 2
        summary = audit_summary(session, args.start, args.end, args.model_version, by_site=args.by_site)
    print(format_table(summary))
    from datetime import datetime, timezone

    today = datetime.now(timezone.utc).date()
    if args.start is not None and args.start > today:  # zeros with no hint read as a day with no activity
        print(f"note: --from {args.start} is after today ({today}, UTC): no file can have arrived in that period yet",
              file=sys.stderr)
    for option, text in outputs:
        try:
            (write_csv if option == "--csv" else write_json)(summary, Path(text))
        except OSError as exc:  # checked above; the disk may still fill or the folder go
            print(f"error: {option} {text}: could not write it: {exc.strerror or type(exc).__name__}", file=sys.stderr)
            return 2
        print(f"{option[2:].upper()} written to {text}")
    return 0


def cmd_init_db(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from sqlalchemy.engine import make_url

    _session_factory(settings, create=True)
    print(f"database ready: {make_url(settings.database).render_as_string(hide_password=True)}")
    return 0


def cmd_tallies(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    """The audit's day tallies against a count of the rows (``check``), or recomputed from them (``rebuild``)."""
    from .db import session_scope, tallies

    factory = _session_factory(settings)
    if args.tallies_command == "rebuild":
        with session_scope(factory) as session:
            tallies.rebuild(session)
        print("audit tallies rebuilt from the rows")
        return 0
    with factory() as session:
        problems = tallies.check(session)
    if not problems:
        print("audit tallies agree with the rows")
        return 0
    print(f"{len(problems)} audit tallies differ from a count of the rows (written behind the worker's back?); "
          "`dr-screen tallies rebuild` recomputes them:")
    for line in problems[:50]:
        print(f"  {line}")
    return 1


# --- review ---------------------------------------------------------------------------------------


def _eye_value(text: str) -> tuple[str, int]:
    """``R=3`` / ``left=1`` -> ("R", 3) for --dr/--dme."""
    from .intake import normalise_eye

    eye, sep, value = text.partition("=")
    code = normalise_eye(eye)
    if not sep or code is None or not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write EYE=GRADE, e.g. R=3 or left=1")
    return code, int(value)


def _count(text: str) -> int:
    """A count of 0 or more for --limit."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write a whole number, 0 or more (0: no limit)")
    return int(text)


def _eye_code(text: str) -> str:
    from .intake import normalise_eye

    code = normalise_eye(text)
    if code is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an eye: write R or L (RE/LE, OD/OS, right/left)")
    return code


def _render_reviewed(args: argparse.Namespace, settings: ScreeningSettings, factory: sessionmaker[Session], exam_id: int) -> bool:
    from .claims import Claimer, make_holder
    from .report import ReportError
    from .review.reviewed_report import ModelCatalog, render_reviewed_report
    from .review.visits import ReviewError

    claims = Claimer(factory, settings.site, settings.claim_lease_seconds, make_holder(f"{settings.site}-review"))
    try:
        report = render_reviewed_report(factory, exam_id, catalog=ModelCatalog.from_settings(settings),
                                        clinic_name=settings.clinic_name, templates_dir=templates_dir(Path(args.config)),
                                        reports_dir=settings.reports, retries=settings.report_retries, rule=settings.eye_result,
                                        ungradable_rule=settings.ungradable_rule, claims=claims)
    except (ReportError, ReviewError) as exc:
        print(f"error: visit {exam_id}: the reviewed report could not be made: {exc}. The sign-off is stored; "
              f"run `dr-screen review render {exam_id}` to try again", file=sys.stderr)
        return False
    finally:
        claims.close()
    print(f"visit {exam_id}: reviewed report v{report.version} written to {report.path}")
    return True


def _image_eye(text: str) -> tuple[int, str]:
    """IMAGE=EYE for ``review eye``: an image id and R or L."""
    image, sep, eye = text.partition("=")
    if not sep or not image.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write IMAGE=EYE, e.g. 12=L (image ids from `review show VISIT`)")
    return int(image), _eye_code(eye)


def cmd_review_eye(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    """``review eye``: a person who checked the labels sets (or confirms) photos' eyes, in one transaction under the
    visits' report claims, so that a worker making a version of the visit finishes first and then makes another."""
    from sqlalchemy import select

    from .db import session_scope
    from .db.models import Image
    from .review import load_visits
    from .review.eyes import set_eyes

    factory = _session_factory(settings)
    with session_scope(factory) as session:
        wanted = [image_id for image_id, _ in args.eyes]
        exam_ids = sorted({e for e in session.scalars(select(Image.exam_id).where(Image.id.in_(wanted))) if e is not None})
    done = _refile(settings, factory, exam_ids, lambda session: set_eyes(
        session, args.eyes, args.reviewer, args.reason, against_photo=args.against_photo))
    if done is None:
        return 1
    for e in done:
        what = "confirmed as" if not e.changed else f"set from {e.before} to"
        print(f"image {e.image_id} (visit {e.exam_id}): eye {what} {e.after}")
        if e.contradicted:
            print(f"warning: image {e.image_id}: the photo reads as the {'right' if e.photo_reads == 'R' else 'left'} "
                  f"eye ({e.photo_confidence:.0%} sure), not the one set; check the image id (`dr-screen review show "
                  f"{e.exam_id}`) and the label. Run the command again with the other eye if it was a slip")
    with session_scope(factory) as session:
        visits = load_visits(session, sorted({e.exam_id for e in done}), settings.eye_result, settings.ungradable_rule)
    for v in visits:
        print(f"visit {v.exam_id}: a new report version follows (a running worker makes it at its next sweep, within "
              f"{settings.sweep_interval:g} s; with none running, `dr-screen run --once`)")
        _say_reopened(v)
    return 0


def _say_reopened(visit: Visit) -> None:
    if visit.current_review is not None and visit.awaiting_review:
        print(f"visit {visit.exam_id}: its sign-off by {visit.current_review.reviewer} was made before this, so the "
              "visit awaits review again (`dr-screen review list`)")


def _refile(settings: ScreeningSettings, factory: sessionmaker[Session], exam_ids: Iterable[int],
            work: Callable[[Session], T]) -> T | None:
    """Run ``work`` (a refiling: `review eye`, `review move`) in one transaction under the report claims of the
    visits it touches (:func:`screening.review.eyes.under_visit_claims`); None, with the error printed, when a claim
    or the work is refused (nothing was changed)."""
    from .claims import Claimer, make_holder
    from .review import ReviewError
    from .review.eyes import under_visit_claims

    claims = Claimer(factory, settings.site, settings.claim_lease_seconds, make_holder(f"{settings.site}-review"))
    try:
        return under_visit_claims(factory, claims, exam_ids, work)
    except ReviewError as exc:
        print(f"error: {exc}; nothing was changed" if "nothing was changed" not in str(exc) else f"error: {exc}",
              file=sys.stderr)
        return None
    finally:
        claims.close()


def _date_arg(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD") from None


def cmd_review_move(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    """``review move``: photos stored under the wrong patient (or date) filed in the right visit, under the visits'
    report claims; both visits get a new version from the worker."""
    from sqlalchemy import select

    from .db import repository as repo
    from .db import session_scope
    from .db.models import Exam, Image
    from .review import load_visits
    from .review.eyes import move_photos

    factory = _session_factory(settings)
    with session_scope(factory) as session:
        # the visits the photos leave, and the one they join if it exists: a worker making a version of either waits
        # for the move (a version read before the move's commit but timed after it would never show the photo)
        exam_ids = {e for e in session.scalars(select(Image.exam_id).where(Image.id.in_(args.images))) if e is not None}
        patient = repo.find_patient(session, args.patient.strip())
        if patient is not None:
            dates = {args.date} if args.date else set(session.scalars(
                select(Exam.exam_date).join(Image, Image.exam_id == Exam.id).where(Image.id.in_(args.images))))
            exam_ids |= set(session.scalars(select(Exam.id).where(Exam.patient_id == patient.id,
                                                                  Exam.exam_date.in_(dates))))
    moved = _refile(settings, factory, exam_ids, lambda session: move_photos(
        session, args.images, args.patient, args.date, args.eye, args.reviewer, args.reason,
        against_photo=args.against_photo))
    if moved is None:
        return 1
    if moved and moved[0].new_patient:
        print(f"note: patient {args.patient.strip()} was not in the database: a new patient record was made (a typo? "
              "`dr-screen review move` the photos back)")
    for m in moved:
        print(f"image {m.image_id}: moved from visit {m.from_exam} to visit {m.to_exam} (eye {m.eye})"
              + (f"; visit {m.from_exam} has no photo left, and its next version says so" if m.emptied else ""))
    touched = sorted({m.from_exam for m in moved} | {m.to_exam for m in moved})
    print(f"visit(s) {', '.join(map(str, touched))}: a new report version follows (a running worker makes it at its next "
          f"sweep, within {settings.sweep_interval:g} s; with none running, `dr-screen run --once`)")
    with session_scope(factory) as session:
        for v in load_visits(session, touched, settings.eye_result, settings.ungradable_rule):
            _say_reopened(v)
    return 0


def cmd_review_list(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from .db import session_scope
    from .review import review_queue
    from .review.text import format_queue

    with session_scope(_session_factory(settings)) as session:
        visits = review_queue(session, settings.eye_result, settings.ungradable_rule)
    print(format_queue(visits, limit=args.limit), end="")
    return 0


def cmd_review_show(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from .db import reviews as rrepo
    from .db import session_scope
    from .review import ReviewError, load_visit
    from .review.text import format_visit

    with session_scope(_session_factory(settings)) as session:
        try:
            visit = load_visit(session, args.visit, settings.eye_result, settings.ungradable_rule)
        except ReviewError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(format_visit(visit, rrepo.review_history(session, args.visit), rrepo.exam_reports(session, args.visit)), end="")
    return 0


def cmd_review_sign(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    """``review confirm`` and ``review correct``: record, then render the reviewed version."""
    from .db import session_scope
    from .report import EyeReview
    from .review import ReviewError, load_visit, sign_off
    from .review.text import format_review
    from .review.visits import starting_answers

    factory = _session_factory(settings)
    try:
        with session_scope(factory) as session:
            answers = None
            referral = None
            if args.review_command == "correct":
                visit = load_visit(session, args.visit, settings.eye_result, settings.ungradable_rule)
                given, chosen = starting_answers(visit)  # a signed-off visit starts from its sign-off, as on the page
                for eye in args.ungradable:
                    if eye not in given:
                        raise ReviewError(f"visit {args.visit} has no graded photo of eye {eye}")
                    given[eye] = EyeReview(eye, False, None, None)
                grades: dict[str, dict[str, int]] = {}
                for option, values in (("dr", args.dr), ("dme", args.dme)):
                    for eye, grade in values:
                        if eye not in given:
                            raise ReviewError(f"visit {args.visit} has no graded photo of eye {eye}")
                        if eye in args.ungradable:
                            raise ReviewError(f"eye {eye} is marked --ungradable; it cannot also have a --{option} grade")
                        grades.setdefault(eye, {})[option] = grade
                for eye, grade_of in grades.items():
                    old = given[eye]
                    if not old.gradable and len(grade_of) < 2:  # ungradable so far: no grade to keep
                        raise ReviewError(f"eye {eye}: it has no grade to keep (the {'sign-off' if visit.current_review else 'model'} "
                                          f"found it ungradable), so grading it takes both --dr {eye}=GRADE and --dme {eye}=GRADE")
                    given[eye] = EyeReview(old.eye, True, grade_of.get("dr", old.dr_grade), grade_of.get("dme", old.dme_grade))
                if not (args.dr or args.dme or args.ungradable or args.referral):
                    raise ReviewError("nothing to correct: give --dr, --dme, --ungradable or --referral "
                                      "(or use `dr-screen review confirm`)")
                answers = list(given.values())
                # not given: the sign-off's chosen referral is kept (as the page keeps it selected); auto: the grades'
                referral = None if args.referral == "auto" else (args.referral or chosen)
            review = sign_off(session, args.visit, reviewer=args.reviewer, source="cli", answers=answers, rule=settings.eye_result,
                              ungradable_rule=settings.ungradable_rule,
                              referral=referral, comment=args.comment)
            print(f"signed off: {format_review(review)}")
    except (ReviewError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.no_render and not _render_reviewed(args, settings, factory, args.visit):
        return 1
    return 0


def cmd_review_import(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from .review.grading_csv import import_grading, read_grading_csv
    from .review.text import format_import

    lines, errors, warnings = read_grading_csv(Path(args.csv), args.reviewer)
    factory = _session_factory(settings)
    session = factory()
    try:
        outcome = import_grading(session, lines, rule=settings.eye_result, ungradable_rule=settings.ungradable_rule)
        outcome.errors = sorted(errors + outcome.errors, key=lambda e: (e.line, e.column or ""))
        outcome.warnings = warnings + outcome.warnings
        if outcome.ok and not args.dry_run:
            session.commit()
        else:
            session.rollback()  # a dry run, or a file with errors: nothing is kept
    finally:
        session.close()
    print(format_import(outcome, args.dry_run), end="")
    for error in outcome.errors:
        print(f"{args.csv}: {error}", file=sys.stderr)
    if not outcome.ok:
        return 1
    if not args.dry_run and not args.no_render:
        failed = [v.exam_id for v in outcome.visits if not v.skipped
                  and not _render_reviewed(args, settings, factory, v.exam_id)]
        return 1 if failed else 0
    return 0


def cmd_review_render(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from .db import reviews as rrepo
    from .db import session_scope
    from .review import load_visits

    factory = _session_factory(settings)
    with session_scope(factory) as session:
        # only the visits whose current sign-off has no PDF are built (not every visit ever graded)
        unrendered = [e for e in rrepo.exams_with_unrendered_review(session) if not args.visit or e == args.visit]
        todo = [v.exam_id for v in load_visits(session, unrendered, settings.eye_result, settings.ungradable_rule)
                if v.current_review is not None and not v.awaiting_review]
    if args.visit and not todo:
        print(f"visit {args.visit}: nothing to render (not signed off, awaiting a new sign-off, or its reviewed report exists)")
    ok = [exam_id for exam_id in todo if _render_reviewed(args, settings, factory, exam_id)]
    print(f"{len(ok)} reviewed report(s) rendered, {len(todo) - len(ok)} failed")
    return 0 if len(ok) == len(todo) else 1


def cmd_serve(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from .web.serve import ServeError, serve

    try:
        serve(settings, _session_factory(settings), templates_dir(Path(args.config)),
              host=args.host or settings.review_host, port=args.port or settings.review_port,
              require_login=args.require_login, secure_cookies=args.secure_cookies,
              trusted_proxy=args.trusted_proxy)
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the usual way to stop it
        log.info("review page stopped")
    return 0


# --- review-page users ----------------------------------------------------------------------------


def _new_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ; nothing was changed")
    return first


def cmd_user(args: argparse.Namespace, settings: ScreeningSettings) -> int:
    from sqlalchemy.exc import IntegrityError

    from .db import reviews as rrepo
    from .db import session_scope
    from .db.models import utcnow
    from .web.auth import AuthError, check_username, hash_password

    factory = _session_factory(settings, create=args.user_command == "add")  # the first user may come before a run
    try:
        if args.user_command == "list":
            with session_scope(factory) as session:
                for u in rrepo.list_users(session):
                    print(f"{u.username}\t{u.display_name}\t{'active' if u.active else 'disabled'}")
            return 0
        username = check_username(args.username)
        if args.user_command == "add":
            name = (args.name or username).strip()
            password_hash = hash_password(_new_password(args))
            with session_scope(factory) as session:
                rrepo.add_user(session, username, name, password_hash)
            print(f"user {username} added (signs as {name!r})")
            return 0
        with session_scope(factory) as session:
            user = rrepo.get_user(session, username)
            if user is None:
                raise AuthError(f"no user {username!r}; `dr-screen user list` shows them")
            if args.user_command == "passwd":
                user.password_hash = hash_password(_new_password(args))
                user.password_changed_at = utcnow()  # logs out the user's open sessions
            else:
                user.active = args.user_command == "enable"  # a disabled user's sessions end at their next request
        print(f"user {username}: {args.user_command} done")
        return 0
    except (AuthError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except IntegrityError:
        print(f"error: a user {args.username!r} exists already", file=sys.stderr)
        return 1


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
    sp.add_argument("--from", dest="start", type=_day, help="first day (YYYY-MM-DD), by date received")
    sp.add_argument("--to", dest="end", type=_day, help="last day (YYYY-MM-DD), inclusive")
    sp.add_argument("--model-version", help="only photos graded by this model version (an unknown one lists the known)")
    sp.add_argument("--by-site", action="store_true", help="also count per site of the grading worker ([screening] site)")
    sp.add_argument("--csv", help="also write the table as CSV to this file")
    sp.add_argument("--json", help="also write JSON to this file")
    sp.add_argument("--overwrite", action="store_true", help="replace --csv/--json files that exist already")
    sp.set_defaults(func=cmd_audit)
    sp = sub.add_parser("init-db", help="create or migrate the database")
    sp.set_defaults(func=cmd_init_db)
    sp = sub.add_parser("tallies", help="the audit's day tallies: check them against the rows, or rebuild them")
    sp.add_argument("tallies_command", choices=["check", "rebuild"],
                    help="check: compare with a count of the rows (exit 1 if they differ); rebuild: recompute them")
    sp.set_defaults(func=cmd_tallies)

    rv = sub.add_parser("review", help="the clinician's sign-off: queue, show, confirm, correct, import a grading CSV")
    rsub = rv.add_subparsers(dest="review_command", required=True)
    sp = rsub.add_parser("list", help="visits awaiting review (the most urgent first: the model's referral, or a reopened sign-off's when more urgent; then oldest first)")
    sp.add_argument("--limit", type=_count, default=0, help="show at most this many (0: all); the count is always the whole queue's")
    sp.set_defaults(func=cmd_review_list)
    sp = rsub.add_parser("show", help="one visit: the model's grades, sign-offs and reports")
    sp.add_argument("visit", type=int, help="the visit number (from `review list`)")
    sp.set_defaults(func=cmd_review_show)
    for name, text in (("confirm", "confirm the model's grades and referral"),
                       ("correct", "record the grader's own answers (eyes not named keep the current sign-off's "
                                   "answers, or the model's grades when there is none)")):
        sp = rsub.add_parser(name, help=text)
        sp.add_argument("visit", type=int)
        sp.add_argument("--reviewer", required=True, help="the name the sign-off is made in (printed on the report)")
        sp.add_argument("--comment")
        sp.add_argument("--no-render", action="store_true", help="do not render the reviewed report now (`review render` later)")
        if name == "correct":
            from .review.visits import GRADER_REFERRALS

            sp.add_argument("--dr", type=_eye_value, action="append", default=[], metavar="EYE=GRADE", help="DR grade 0-4, e.g. R=3")
            sp.add_argument("--dme", type=_eye_value, action="append", default=[], metavar="EYE=GRADE", help="DME risk 0-2, e.g. L=1")
            sp.add_argument("--ungradable", type=_eye_code, action="append", default=[], metavar="EYE", help="this eye's photo is ungradable")
            sp.add_argument("--referral", choices=["auto", *GRADER_REFERRALS],
                            help="the referral outcome (auto: what the grades imply, worse-eye rule; not given: the "
                                 "current sign-off's chosen referral if it chose one, else auto)")
        sp.set_defaults(func=cmd_review_sign)
    sp = rsub.add_parser("import", help="record a grading centre's CSV (patient, eye, date, dr_grade, dme_grade, ...)")
    sp.add_argument("csv", help="the CSV file; see screening/review/grading_csv.py for its columns")
    sp.add_argument("--reviewer", help="the grader's name for lines without a reviewer column")
    sp.add_argument("--dry-run", action="store_true", help="check everything and say what would be recorded; write nothing")
    sp.add_argument("--no-render", action="store_true", help="do not render the reviewed reports now (`review render` later)")
    sp.set_defaults(func=cmd_review_import)
    sp = rsub.add_parser("eye", help="set (or confirm) photos' eyes after checking their labels (a laterality mismatch, "
                                     "an identity conflict); their visits get a new report version")
    sp.add_argument("eyes", type=_image_eye, nargs="+", metavar="IMAGE=EYE",
                    help="an image id (from `review show VISIT`) and R or L, e.g. 12=L; give a swapped pair together")
    sp.add_argument("--reviewer", required=True, help="the name of the person who checked the label (printed on the report)")
    sp.add_argument("--reason", required=True, help="what the label was checked against, e.g. 'camera worklist'")
    sp.add_argument("--against-photo", action="store_true",
                    help="set an eye the photo reads as the other one (90%%+ sure): a camera that mirrors photos")
    sp.set_defaults(func=cmd_review_eye)
    sp = rsub.add_parser("move", help="file photos stored under the wrong patient (or date) in the right visit; both "
                                      "visits get a new report version")
    sp.add_argument("images", type=int, nargs="+", metavar="IMAGE", help="image ids (from `review show VISIT`)")
    sp.add_argument("--patient", required=True, help="the patient id the photos belong to, as in the file names")
    sp.add_argument("--date", type=_date_arg, help="the visit's date, YYYY-MM-DD (default: the date they are filed under)")
    sp.add_argument("--eye", type=_eye_code, help="R or L (default: the eye they are filed under)")
    sp.add_argument("--reviewer", required=True, help="the name of the person who checked the label (printed on the report)")
    sp.add_argument("--reason", required=True, help="what the label was checked against, e.g. 'camera worklist'")
    sp.add_argument("--against-photo", action="store_true",
                    help="with --eye: an eye the photo reads as the other one (90%%+ sure)")
    sp.set_defaults(func=cmd_review_move)
    sp = rsub.add_parser("render", help="render reviewed reports that are missing (e.g. after a failed render)")
    sp.add_argument("visit", type=int, nargs="?", help="only this visit")
    sp.set_defaults(func=cmd_review_render)

    sp = sub.add_parser("serve", help="the review page for clinicians (127.0.0.1 by default; elsewhere with login)")
    sp.add_argument("--host", help="address to listen on (default: [screening] review_host, 127.0.0.1)")
    sp.add_argument("--port", type=int, help="port (default: [screening] review_port, 8765)")
    sp.add_argument("--require-login", action="store_true", help="require a login on loopback too")
    sp.add_argument("--secure-cookies", action="store_true", help="behind an HTTPS proxy: send the session cookie over HTTPS only")
    sp.add_argument("--trusted-proxy", metavar="ADDRESS",
                    help="the HTTPS proxy's IP address: believe its X-Forwarded-For, so that the login brake counts each "
                         "client's own address")
    sp.set_defaults(func=cmd_serve)

    us = sub.add_parser("user", help="logins for the review page")
    usub = us.add_subparsers(dest="user_command", required=True)
    sp = usub.add_parser("add", help="add a user (asks for the password twice)")
    sp.add_argument("username")
    sp.add_argument("--name", help="the name sign-offs are made in, e.g. 'Dr A. Grey' (default: the user name)")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin (scripts)")
    sp = usub.add_parser("passwd", help="set a new password (logs the user out everywhere)")
    sp.add_argument("username")
    sp.add_argument("--password-stdin", action="store_true")
    for name in ("disable", "enable"):
        sp = usub.add_parser(name, help=f"{name} a user's login (their past sign-offs stay)")
        sp.add_argument("username")
    usub.add_parser("list", help="user names, display names, active or not")
    us.set_defaults(func=cmd_user)
    also_after_subcommands(p, "--config")  # `dr-screen audit --config site.toml` as well as before the subcommand
    return p


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors ``main`` reports as exit 2 (a setting, schema or checkpoint to fix). Evaluated only when an
    exception is being handled: a CheckpointError can only have been raised once torch and
    ``training.checkpoint`` were imported, so the audit and init-db never import torch just to name it."""
    from .db import SchemaError

    errors: tuple[type[Exception], ...] = (ConfigError, SchemaError)
    loaded = sys.modules.get("training.checkpoint")
    if loaded is not None:
        errors += (loaded.CheckpointError,)
    return errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(logging.DEBUG if args.verbose else logging.INFO)  # tracebacks without messages: screening.logs
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("weasyprint.progress").setLevel(logging.WARNING)  # seven "Step n" lines per report
    from .db import DatabaseGone

    try:
        settings = load_screening_settings(args.config)
        command: Callable[[argparse.Namespace, ScreeningSettings], int] = args.func
        return command(args, settings)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatabaseGone as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
