"""The review page: the queue, each visit with its photos, overlays and heatmaps at full size, the model's
grades and confidence, a form to confirm or correct, and the PDFs.

Flask (server-rendered Jinja2 templates from ``templates/review/``, no JavaScript and no build step) with
Flask-WTF's CSRF protection on every POST, served by waitress (:mod:`screening.web.serve`).

What keeps patient data in its place:

* URLs carry database ids only (visit = exam id, image id, report version), never a patient id, name or
  path; the access log (method, path, status, user id) therefore holds none either.
* Pictures and PDFs are looked up by id in the database and served only when the stored path lies inside
  the worker's ``work_dir`` (pictures) or ``reports`` folder (PDFs); nothing a browser sends is used as a path.
* Every page is autoescaped (user text, file names and patient ids included), sent with a strict
  Content-Security-Policy and ``Cache-Control: no-store``. The session cookie is signed, HttpOnly and
  SameSite=Strict, and holds only the user id (it is readable by whoever holds it, so nothing clinical).
* Bound to a loopback address, the page is open to the local user and answers only to the Host names
  127.0.0.1 and localhost (a web site cannot reach it through DNS rebinding). Anywhere else it requires a
  login (users in the database, ``dr-screen user add``), like ``--require-login`` does on loopback.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, flash, g, redirect, render_template, request, send_file, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from jinja2 import StrictUndefined
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.routing import IntegerConverter, Map

from screening.claims import Claimer, make_holder
from screening.config import ScreeningSettings
from screening.db import reviews as rrepo
from screening.db.models import Exam, Image, Report, ReviewSource, ReviewUser, utcnow
from screening.db.session import session_scope
from screening.findings import refused_page_reasons, stored_finding
from screening.report import (
    EYE_NAMES,
    EYE_RESULT_RULES,
    LESION_AUPR_FLOOR,
    LESION_LABELS,
    REFERRAL_LEVELS,
    EyeReview,
    ReportError,
    check_model_rows,
    undetected_lesions,
)
from screening.review.eyes import set_eyes, under_visit_claims
from screening.review.reviewed_report import ModelCatalog, render_reviewed_report
from screening.review.visits import (
    GRADER_REFERRALS,
    ReviewError,
    Visit,
    check_unchanged,
    load_visit,
    recently_reviewed,
    review_queue,
    sign_off,
    starting_answers,
)
from screening.web.auth import LoginThrottle, verify_password
from training.common import DME_GRADES, DR_GRADES

log = logging.getLogger("screening.web")

PICTURES = ("photo", "overlay", "dr_cam", "dme_cam")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
# Where the login page may send the user back to: a path of this site and its query, in the characters its own URLs
# use. Anything else (another host as "//host", "/\\host", or "/<TAB>/host", which browsers and Werkzeug turn into
# "//host"; a scheme; spaces or control characters) is an open redirect and goes to the queue instead.
LOCAL_TARGET = re.compile(r"/(?![/\\])[A-Za-z0-9_.~/-]*(\?[A-Za-z0-9_.~%=&+-]*)?")
SESSION_HOURS = 8
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")


def _inside(path: str | Path | None, root: Path) -> Path | None:
    """The resolved file when ``path`` is a file inside ``root``; None otherwise."""
    if not path:
        return None
    p = Path(path).resolve()
    return p if p.is_relative_to(root.resolve()) and p.is_file() else None


def _picture_path(image: Image, kind: str) -> Path | None:
    """Where the picture ``kind`` of ``image`` is, as the report shows it (the database says; never the browser).
    An ungradable photo has only its ``photo``."""
    f = stored_finding(image, image.result)
    if f is None:
        return None
    return {"photo": f.photo_path, "overlay": f.overlay_path, "dr_cam": f.dr_cam_path, "dme_cam": f.dme_cam_path}[kind]


def _parse_answers(form: Any, visit: Visit) -> list[EyeReview]:
    """The correction form's per-eye fields (``gradable_R``, ``dr_R``, ``dme_R``...) as answers."""
    answers = []
    for e in visit.eyes:
        gradable = form.get(f"gradable_{e.eye}", "yes")
        if gradable not in ("yes", "no"):
            raise ReviewError(f"{e.name}: choose whether the photo is gradable")
        if gradable == "no":
            answers.append(EyeReview(e.eye, False, None, None))  # type: ignore[arg-type]
            continue
        dr, dme = form.get(f"dr_{e.eye}", ""), form.get(f"dme_{e.eye}", "")
        if not (dr.isdigit() and int(dr) < len(DR_GRADES)):
            raise ReviewError(f"{e.name}: choose a DR grade 0-{len(DR_GRADES) - 1}")
        if not (dme.isdigit() and int(dme) < len(DME_GRADES)):
            raise ReviewError(f"{e.name}: choose a DME risk 0-{len(DME_GRADES) - 1}")
        answers.append(EyeReview(e.eye, True, int(dr), int(dme)))  # type: ignore[arg-type]
    return answers


def _check_untouched(form: Any, visit: Visit) -> None:
    """'Confirm' records the model's answers: refuse it when the grader changed an answer or chose a referral
    in the same form (they meant 'Sign off with my answers')."""
    changed = any(f"gradable_{e.eye}" in form for e in visit.eyes) and _parse_answers(form, visit) != [
        e.model_answer for e in visit.eyes]
    chosen = form.get("referral", "")
    if changed or (chosen and chosen != visit.model_referral.level):
        raise ReviewError("you changed answers or the referral in the form, but pressed 'Confirm the model's findings'; "
                          "press 'Sign off with my answers' to record your answers, or put them back")


def _seen(form: Any) -> tuple[set[int] | None, set[tuple[int, str]] | None, int | None]:
    """The visit's photographs, their eyes and its sign-off as they were when the grader opened the page (hidden
    fields; ``seen_eyes`` reads ``31R,32L``)."""
    try:
        fields = form.get("seen_fields")
        eyes = form.get("seen_eyes")
        raw = form.get("seen_review", "")
        seen_eyes = None
        if eyes is not None:
            seen_eyes = {(int(k[:-1]), k[-1]) for k in eyes.split(",") if k}
            if any(eye not in ("R", "L") for _, eye in seen_eyes):
                raise ValueError(eyes)
        return ({int(i) for i in fields.split(",")} if fields is not None else None), seen_eyes, (int(raw) if raw else None)
    except ValueError:
        raise ReviewError("the form is damaged; reload the visit and sign off again") from None


class DatabaseId(IntegerConverter):
    """A number in a path that names a row (a visit, an image, a report version): 1 to 2**63 - 1. A larger one is
    "not found" like any id that names nothing, instead of an overflow in the database driver (a server error)."""

    def __init__(self, url_map: Map) -> None:
        super().__init__(url_map, min=1, max=2**63 - 1)


def _logged_in_after(login_at: Any, ended_at: datetime) -> bool:
    """Whether a session's login time (``session["at"]``, ISO 8601) is after ``ended_at``; False when missing."""
    try:
        return isinstance(login_at, str) and datetime.fromisoformat(login_at) > ended_at
    except ValueError:
        return False


def local_target(target: str) -> str | None:
    """``target`` when it is a path of this site (:data:`LOCAL_TARGET`), else None."""
    return target if LOCAL_TARGET.fullmatch(target) else None


QUEUE_ROWS = 200
"""The most urgent visits the queue page lists (the count above them is the whole backlog's): a backlog of
thousands after a grader's holiday is still one quick page, and the next ones come up as these are signed off."""


def create_app(
    settings: ScreeningSettings,
    factory: sessionmaker[Session],
    templates_dir: Path,
    *,
    require_login: bool,
    loopback: bool = True,
    catalog: ModelCatalog | None = None,
    secret_key: bytes | None = None,
    secure_cookies: bool = False,
) -> Flask:
    """The review page's WSGI app. ``templates_dir`` holds ``report.html.j2`` (the PDF) and ``review/``
    (these pages). A fresh random ``secret_key`` per process signs sessions: a restart logs everyone out."""
    app = Flask(__name__, template_folder=str(Path(templates_dir) / "review"), static_folder=None)
    app.url_map.converters["id"] = DatabaseId
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME="dr_review",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        WTF_CSRF_TIME_LIMIT=SESSION_HOURS * 3600,
        WTF_CSRF_SSL_STRICT=secure_cookies,
        MAX_CONTENT_LENGTH=64 * 1024,
        MAX_FORM_MEMORY_SIZE=64 * 1024,
        TRUSTED_HOSTS=LOOPBACK_HOSTS if loopback else None,
        QUEUE_ROWS=QUEUE_ROWS,
    )
    # Flask autoescapes only *.html file names; these templates are *.html.j2: escape everything, always.
    app.jinja_options = {**app.jinja_options, "autoescape": True, "undefined": StrictUndefined}
    CSRFProtect(app)
    catalog = catalog or ModelCatalog.from_settings(settings)
    # the visit's report claim, as workers take it (screening.claims): reviewed versions stay in order with theirs
    claims = Claimer(factory, settings.site, settings.claim_lease_seconds, make_holder(f"{settings.site}-review"))
    throttle = LoginThrottle()
    work_root, reports_root = Path(settings.work_dir), Path(settings.reports)
    rule = settings.eye_result  # which field of an eye gives its result, as on the worker's reports
    ungradable = settings.ungradable_rule  # the model's referral for an ungradable eye, as on the worker's reports
    css = Path(templates_dir) / "review" / "review.css"

    def current_user(s: Session) -> ReviewUser | None:
        uid = session.get("user_id")
        user = s.get(ReviewUser, uid) if isinstance(uid, int) else None
        if user is None or not user.active or session.get("pw") != user.password_changed_at.isoformat():
            return None  # disabled, or the password changed since this session logged in
        if user.sessions_ended_at is not None and not _logged_in_after(session.get("at"), user.sessions_ended_at):
            return None  # logged in before the user's last logout (a copy of an ended session's cookie)
        return user

    @app.before_request
    def _authenticate() -> Any:
        g.user_id, g.display_name = None, None
        if request.endpoint in ("login", "stylesheet"):
            return None
        with session_scope(factory) as s:
            user = current_user(s)
            if user is not None:
                g.user_id, g.display_name = user.id, user.display_name
        if require_login and g.user_id is None:
            session.pop("user_id", None)
            if request.method == "GET":
                return redirect(url_for("login", next=request.path))
            abort(401)
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        # ids only in paths, never a query string (login's "next" is a path of ids too)
        log.info("%s %s %s user=%s", request.method, request.path, resp.status_code, g.get("user_id"))
        return resp

    @app.errorhandler(CSRFError)
    def _csrf(exc: CSRFError) -> tuple[str, int]:
        return render_template("error.html.j2", title="Form expired",
                               message="This form is too old or did not come from this page (CSRF check failed). "
                                       "Go back, reload the page and submit it again."), 400

    @app.errorhandler(404)
    def _not_found(exc: Any) -> tuple[str, int]:
        return render_template("error.html.j2", title="Not found", message="There is nothing at this address."), 404

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"require_login": require_login, "display_name": g.get("display_name"), "eye_names": EYE_NAMES,
                "dr_grades": DR_GRADES, "dme_grades": DME_GRADES, "levels": REFERRAL_LEVELS,
                "grader_referrals": GRADER_REFERRALS, "lesion_labels": LESION_LABELS}

    # ------------------------------------------------------------------ login
    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        target = local_target(request.args.get("next", "")) or url_for("queue")
        error = None
        if request.method == "POST":
            username = request.form.get("username", "").strip()
            password = request.form.get("password", "")
            address = request.remote_addr
            wait = throttle.locked(username, address)
            if wait:
                error = (f"Too many failed attempts for this user name from this computer; try again in "
                         f"{max(1, round(wait / 60))} minutes.")
            else:
                with session_scope(factory) as s:
                    user = rrepo.get_user(s, username) if username else None
                    ok = verify_password(user.password_hash if user is not None else None, password)
                    ok = ok and user is not None and user.active
                    if ok:
                        assert user is not None
                        session.clear()  # a fresh session at login (no fixation)
                        session.permanent = True
                        session["user_id"], session["pw"] = user.id, user.password_changed_at.isoformat()
                        session["at"] = utcnow().isoformat()  # compared with the user's next logout
                        throttle.succeeded(username, address)
                        log.info("login user=%s", user.id)
                        return redirect(target)
                throttle.failed(username, address)
                log.warning("failed login")
                error = "Unknown user name or wrong password."
        return render_template("login.html.j2", error=error, next=target), (401 if error else 200)

    @app.post("/logout")
    def logout() -> Any:
        """Ends every session of the user, not only this cookie (a copy of it would otherwise work on)."""
        if g.get("user_id") is not None:
            with session_scope(factory) as s:
                user = s.get(ReviewUser, g.user_id)
                if user is not None:
                    user.sessions_ended_at = utcnow()
            log.info("logout user=%s", g.user_id)
        session.clear()
        return redirect(url_for("login") if require_login else url_for("queue"))

    level_rules = "".join(f".level-{k} {{ background: {lv.colour}; }} .level-border-{k} {{ border-left-color: {lv.colour}; }}\n"
                          for k, lv in REFERRAL_LEVELS.items())

    @app.get("/review.css")
    def stylesheet() -> Any:
        return Response(css.read_text(encoding="utf-8") + level_rules, mimetype="text/css")

    # ------------------------------------------------------------------ queue and visit
    @app.get("/")
    def index() -> Any:
        return redirect(url_for("queue"))

    @app.get("/queue")
    def queue() -> Any:
        with session_scope(factory) as s:
            waiting = review_queue(s, rule, ungradable)
            done = recently_reviewed(s, limit=30, rule=rule, ungradable_rule=ungradable)
        return render_template("queue.html.j2", waiting=waiting, shown=waiting[:app.config["QUEUE_ROWS"]], done=done)

    def show_visit(exam_id: int, error: str | None = None, status: int = 200, form: Any = None) -> Any:
        with session_scope(factory) as s:
            try:
                visit = load_visit(s, exam_id, rule, ungradable)
            except ReviewError as exc:
                if s.get(Exam, exam_id) is None:
                    abort(404)
                # a visit whose photos were all moved to other visits, or not graded yet: say so, not "nothing here"
                # (a link to it may sit in an old message or a bookmark); its PDFs stay as they were
                reports = rrepo.exam_reports(s, exam_id)
                return render_template("error.html.j2", title=f"Visit {exam_id}: nothing to review", message=str(exc),
                                       reports=reports, exam_id=exam_id), 404
            history = rrepo.review_history(s, exam_id)
            reports = rrepo.exam_reports(s, exam_id)
            refused = refused_page_reasons(s, exam_id)  # as the PDF names them
        current = visit.current_review
        # a signed-off visit, reopened by a new photograph or not, starts from its sign-off's answers (an eye it did
        # not answer for from the model's) and referral: a new field must not silently put the model's answers back
        # in place of the grader's. Only a visit never signed off offers 'Confirm the model's findings'.
        offer_confirm = current is None
        defaults, chosen = starting_answers(visit)
        referral_default = chosen or ""
        # lesions the grading model cannot detect are shown as not assessed, as on the PDF (an empty map is not "none")
        undetected = {e.eye: undetected_lesions(catalog.metrics(e.result.checkpoint_sha256)) for e in visit.eyes}
        return render_template(
            "visit.html.j2", visit=visit, history=history, reports=reports, defaults=defaults, error=error,
            referral_default=referral_default,
            offer_confirm=offer_confirm, undetected=undetected, refused_pages=refused, lesion_floor=f"{LESION_AUPR_FLOOR:.2f}",
            form=form or {}, reviewer_name=g.get("display_name") or session.get("reviewer_name", ""),
            pictures=PICTURES, rule_text=EYE_RESULT_RULES[rule], check_models=check_model_rows(visit.report_findings()),
        ), status

    @app.get("/visits/<id:exam_id>")
    def visit(exam_id: int) -> Any:
        return show_visit(exam_id)

    def record(exam_id: int, confirm: bool) -> Any:
        form = request.form
        reviewer = g.get("display_name") or form.get("reviewer", "")
        try:
            with session_scope(factory) as s:
                visit = load_visit(s, exam_id, rule, ungradable)
                fields, eyes, review_id = _seen(form)
                check_unchanged(visit, fields, eyes)  # before the answers: a form without the new eye's fields is stale
                user = s.get(ReviewUser, g.user_id) if g.user_id is not None else None
                if confirm:
                    _check_untouched(form, visit)
                review = sign_off(
                    s, exam_id, reviewer=reviewer, source=ReviewSource.WEB.value, user=user,
                    answers=None if confirm else _parse_answers(form, visit),
                    referral=(form.get("referral") or None) if not confirm else None,
                    comment=form.get("comment"), seen_fields=fields, seen_eyes=eyes, seen_review_id=review_id, rule=rule,
                    ungradable_rule=ungradable,
                )
                outcome, review_id = review.outcome, review.id
        except ReviewError as exc:  # shown on the visit page, with what the grader entered kept in the form
            # a photo's eye set while the page was open: the answers typed were for the photos under their old eyes,
            # so the page comes back with the current starting answers, not the typed ones
            kept = None if "a photo's eye was set" in str(exc) else form
            conflict = "while it was open" in str(exc) or "conflict is open" in str(exc)  # the visit's state, not the form
            return show_visit(exam_id, error=str(exc), status=409 if conflict else 400, form=kept)
        if g.get("user_id") is None:
            session["reviewer_name"] = reviewer.strip()
        log.info("review %s of exam %s recorded (%s) user=%s", review_id, exam_id, outcome, g.get("user_id"))
        try:
            report = render_reviewed_report(factory, exam_id, catalog=catalog, clinic_name=settings.clinic_name,
                                            templates_dir=Path(templates_dir), reports_dir=reports_root,
                                            retries=settings.report_retries, rule=rule,
                                            ungradable_rule=ungradable, claims=claims)
            flash(f"Signed off ({outcome}). The reviewed report is version {report.version}.", "ok")
        except (ReportError, ReviewError) as exc:
            log.error("reviewed report for exam %s failed: %s", exam_id, type(exc).__name__)
            flash("Signed off and stored, but the reviewed PDF could not be made; "
                  f"run `dr-screen review render {exam_id}` on the worker machine.", "error")
        return redirect(url_for("visit", exam_id=exam_id))

    @app.post("/visits/<id:exam_id>/confirm")
    def confirm(exam_id: int) -> Any:
        return record(exam_id, confirm=True)

    @app.post("/visits/<id:exam_id>/correct")
    def correct(exam_id: int) -> Any:
        return record(exam_id, confirm=False)

    def refile_eyes(exam_id: int, choose: Callable[[Session, Visit], list[tuple[int, str]]]) -> Any:
        """A person who checked the labels sets (or confirms) photos' eyes from the visit page, as `dr-screen review
        eye` does (screening.review.eyes.set_eyes, in one transaction under the visit's report claim): the answer to a
        laterality mismatch or an identity conflict no longer needs a terminal. ``choose``: the (image id, eye) pairs
        the form asks for. Refused, with nothing changed, when the page showed other photos or eyes than the visit has
        now, or when set_eyes refuses (a photo reads as the other eye and 'even if the photo reads as the other eye'
        was not ticked; no reason; already set to that eye by a person)."""
        form = request.form
        who = g.get("display_name") or form.get("reviewer", "")

        def work(s: Session) -> Any:
            _, seen_eyes, _ = _seen(form)
            if seen_eyes is None:
                raise ReviewError("the form is damaged; reload the visit and set the eye again")
            visit = load_visit(s, exam_id, rule, ungradable)
            check_unchanged(visit, None, seen_eyes)
            done = set_eyes(s, choose(s, visit), who, form.get("reason", ""), against_photo=bool(form.get("against_photo")))
            return done, visit.current_review is not None

        try:
            done, signed = under_visit_claims(factory, claims, [exam_id], work)
        except ReviewError as exc:
            stale = "while it was open" in str(exc) or "has been writing" in str(exc)
            return show_visit(exam_id, error=str(exc), status=409 if stale else 400)
        if g.get("user_id") is None:
            session["reviewer_name"] = who.strip()
        log.info("eyes of %s image(s) in exam %s set user=%s", len(done), exam_id, g.get("user_id"))
        said = "; ".join(f"image {d.image_id}: eye " + ("confirmed as the" if not d.changed else
                                                        f"set from the {EYE_NAMES[d.before].lower()} to the")
                         + f" {EYE_NAMES[d.after].lower()}" for d in done)
        flash(f"{said[0].upper()}{said[1:]}. The worker makes a new report version at its next sweep"
              + ("; the visit's sign-off no longer covers it: review it again." if signed else "."), "ok")
        return redirect(url_for("visit", exam_id=exam_id))

    @app.post("/visits/<id:exam_id>/images/<id:image_id>/eye")
    def set_eye(exam_id: int, image_id: int) -> Any:
        """One photo's eye (the "Wrong eye?" form under each photo)."""
        eye = request.form.get("eye", "")

        def choose(s: Session, visit: Visit) -> list[tuple[int, str]]:
            image = s.get(Image, image_id)
            if image is None or image.exam_id != exam_id:
                abort(404)
            if eye not in EYE_NAMES:
                raise ReviewError(f"image {image_id}: choose the right or the left eye")
            return [(image_id, eye)]

        return refile_eyes(exam_id, choose)

    @app.post("/visits/<id:exam_id>/swap-eyes")
    def swap_eyes(exam_id: int) -> Any:
        """Every photo of the visit filed under the other eye, together (a swapped pair: the camera's right and left
        exchanged), so that no version ever shows both eyes' photos under one eye."""
        return refile_eyes(exam_id, lambda s, visit: [(f.image_id, "L" if e.eye == "R" else "R")
                                                      for e in visit.eyes for f in e.fields])

    # ------------------------------------------------------------------ files, by database id only
    @app.get("/visits/<id:exam_id>/images/<id:image_id>/<kind>.jpg")
    def picture(exam_id: int, image_id: int, kind: str) -> Any:
        if kind not in PICTURES:
            abort(404)
        with session_scope(factory) as s:
            image = s.get(Image, image_id)
            if image is None or image.exam_id != exam_id:
                abort(404)
            path = _inside(_picture_path(image, kind), work_root)
        if path is None:
            abort(404)
        return send_file(path, mimetype="image/jpeg", max_age=0)

    @app.get("/visits/<id:exam_id>/reports/<id:version>.pdf")
    def report_pdf(exam_id: int, version: int) -> Any:
        with session_scope(factory) as s:
            report = s.scalars(select(Report).where(Report.exam_id == exam_id, Report.version == version)).one_or_none()
            path = _inside(report.path, reports_root) if report is not None else None
        if path is None:
            abort(404)
        return send_file(path, mimetype="application/pdf", download_name=f"report_v{version}.pdf", as_attachment=False,
                         max_age=0)

    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["LOCAL_TARGET", "LOOPBACK_HOSTS", "PICTURES", "create_app", "is_loopback", "local_target"]
