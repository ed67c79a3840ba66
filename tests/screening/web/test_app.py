"""The review page through Flask's test client: queue, visit, confirm and correct, logins, CSRF, file
serving by database id only, escaping, and logs without patient ids."""

from __future__ import annotations

import logging
import re

import pytest
from sqlalchemy import select, update

from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.db.models import Image, Report, Result, ReviewUser, utcnow
from screening.review.reviewed_report import ModelCatalog
from screening.web.app import create_app, is_loopback, local_target
from screening.web.auth import hash_password

from ..conftest import TEMPLATES

PASSWORD = "correct horse battery"


def _app(worked, **kw):
    return create_app(worked.settings, worked.factory, TEMPLATES, require_login=kw.pop("require_login", False), **kw)


def _form(html: str, form_id: str = "signoff") -> dict[str, str]:
    """The hidden fields and the selected answers of the sign-off form, as a browser would send them."""
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))
    for name, body in re.findall(r'<select name="([^"]+)"[^>]*>(.*?)</select>', html, re.S):
        chosen = re.search(r'<option value="([^"]*)" selected', body)
        fields[name] = chosen.group(1) if chosen else ""
    return fields


def _add_user(worked, username="grey", name="Dr A. Grey", active=True):
    with session_scope(worked.factory) as s:
        user = rrepo.add_user(s, username, name, hash_password(PASSWORD))
        user.active = active
        return user.id


def _login(client, username="grey", password=PASSWORD, follow=False):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    return client.post("/login?next=/queue", data={"csrf_token": token, "username": username, "password": password},
                       follow_redirects=follow)


def test_queue_and_visit_show_the_models_answers_pictures_and_pdf(worked_db):
    worked = worked_db  # on SQLite, then on PostgreSQL
    client = _app(worked).test_client()
    queue = client.get("/queue")
    assert queue.status_code == 200
    html = queue.get_data(as_text=True)
    assert "Awaiting review" in html and "P1" in html and "P2" in html
    for header, value in (("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff")):
        assert queue.headers[header] == value
    assert "default-src 'none'" in queue.headers["Content-Security-Policy"]
    assert client.get("/").headers["Location"].endswith("/queue")

    exam_id = worked.exams["P1"]
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert "Model's recommendation" in page and "Confidence per grade" in page and "Your answer" in page
    pictures = re.findall(rf'src="(/visits/{exam_id}/images/\d+/(?:photo|overlay|dr_cam|dme_cam)\.jpg)"', page)
    assert len(pictures) == 8  # two eyes x photo, overlay, two heatmaps
    for url in pictures:
        resp = client.get(url)
        assert resp.status_code == 200 and resp.mimetype == "image/jpeg" and resp.data[:2] == b"\xff\xd8"
    [pdf] = re.findall(rf'href="(/visits/{exam_id}/reports/1\.pdf)"', page)
    resp = client.get(pdf)
    assert resp.status_code == 200 and resp.mimetype == "application/pdf" and resp.data.startswith(b"%PDF")
    css = client.get("/review.css")
    assert css.mimetype == "text/css" and ".level-urgent { background: #b71c1c; }" in css.get_data(as_text=True)
    assert client.get("/visits/999").status_code == 404
    # P2 sent its right eye only: the queue and the visit say so beside the recommendation, as the PDF does
    row = next(r for r in html.split("<tr>") if ">P2<" in r)
    assert '<span class="badge caution"' in row and "left eye missing" in row and "left eye missing" not in \
        next(r for r in html.split("<tr>") if ">P1<" in r)
    page = client.get(f"/visits/{worked.exams['P2']}").get_data(as_text=True)
    assert "Incomplete visit: no photograph of the left eye was graded (none received, or refused)" in page.split("</section>")[0]
    assert re.search(r"\(score \d+\.\d%\)", page)  # to a tenth, as on the PDF


def test_the_queue_page_lists_the_most_urgent_visits_and_counts_the_whole_backlog(worked):
    """A backlog of thousands must stay one quick page: the first QUEUE_ROWS visits in the queue's order, the count
    and a line saying more wait."""
    app = _app(worked)
    html = app.test_client().get("/queue").get_data(as_text=True)
    assert html.count('class="open"') == 2 and 'id="more"' not in html
    app.config["QUEUE_ROWS"] = 1
    html = app.test_client().get("/queue").get_data(as_text=True)
    assert html.count('class="open"') == 1 and '<span class="count">2</span>' in html
    assert "The 1 most urgent of 2 are listed" in html


def test_a_visit_with_an_open_identity_conflict_cannot_be_signed_off_on_the_page(worked):
    """A copy of one of its photos came named as another patient: the page says why its buttons are off, and a
    sign-off sent anyway is refused (409) and not recorded."""
    from screening.db import repository as repo

    exam_id = worked.exams["P1"]
    client = _app(worked).test_client()
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert 'id="conflict-block"' not in html and 'id="confirm">' in html
    form = _form(html)
    with session_scope(worked.factory) as s:
        image = s.scalars(select(Image).where(Image.exam_id == exam_id, Image.eye == "R")).first()
        repo.record_drop(s, sha256=image.sha256, source_name="P9_R.jpg", outcome="rejected", image=image,
                         reason="the same bytes as another patient's photo", reason_code="identity_conflict")
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert 'id="conflict-block"' in html and 'id="confirm" disabled>' in html and 'id="correct" class="secondary" disabled>' in html
    resp = client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local"})
    assert resp.status_code == 409 and "identity conflict is open" in resp.get_data(as_text=True)
    with session_scope(worked.factory) as s:
        assert rrepo.current_review(s, exam_id) is None


def test_a_visit_whose_photos_were_all_moved_says_so_and_keeps_its_reports(worked):
    """A link to a visit emptied by `review move` (an old bookmark, a colleague's message) said only "There is
    nothing at this address": the page says what happened to its photos and lists its PDFs. An id that never
    existed is still a plain 404."""
    from screening.review.eyes import move_photos

    exam_id = worked.exams["P2"]
    client = _app(worked).test_client()
    with session_scope(worked.factory) as s:
        ids = list(s.scalars(select(Image.id).where(Image.exam_id == exam_id)))
        move_photos(s, ids, "P1", None, None, "Ann Lee", "camera worklist <b>names P1</b>")
    resp = client.get(f"/visits/{exam_id}")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 404 and f"Visit {exam_id}: nothing to review" in html
    assert "has no photo to review" in html and "Ann Lee" in html and "&lt;b&gt;names P1&lt;/b&gt;" in html
    [pdf] = re.findall(rf'href="(/visits/{exam_id}/reports/1\.pdf)"', html)
    assert client.get(pdf).status_code == 200
    assert "There is nothing at this address" in client.get("/visits/98765").get_data(as_text=True)


def test_a_lesion_the_grading_model_cannot_detect_is_shown_as_not_assessed(worked):
    """As on the PDF: the model that graded the eye is looked up by its checkpoint's hash, and a lesion whose test
    AUPR is below the floor shows "not assessed" with the reason, not "0.00%"."""
    class Measured(ModelCatalog):  # the worked checkpoint, as if it had been tested like the shipped model
        def _meta(self, path):
            meta = super()._meta(path)
            return None if meta is None else {**meta, "metrics": {**meta["metrics"], "test": {
                "MA AUPR": 0.0004, "HE AUPR": 0.287, "EX AUPR": 0.571, "SE AUPR": 0.053}}}

    url = f"/visits/{worked.exams['P1']}"
    plain = " ".join(_app(worked).test_client().get(url).get_data(as_text=True).split())
    assert re.search(r"Microaneurysms \(MA\): \d+\.\d\d%", plain) and "not assessed" not in plain
    catalog = Measured([worked.settings.checkpoint])
    page = " ".join(_app(worked, catalog=catalog).test_client().get(url).get_data(as_text=True).split())
    assert page.count('Microaneurysms (MA): <span class="muted">not assessed*</span>') == 2  # both eyes
    assert page.count('Soft exudates (SE): <span class="muted">not assessed*</span>') == 2
    assert re.search(r"Haemorrhages \(HE\): \d+\.\d\d%", page)
    assert "does not reliably detect microaneurysms or soft exudates (test AUPR below 0.10)" in page


def test_a_refused_page_of_the_visit_is_named_on_the_page_as_on_the_pdf(worked):
    """The PDF says which pages of a multi-page file were not graded; the grader on the page must see it too."""
    from screening.db import repository as repo
    from screening.db.models import Exam

    exam_id = worked.exams["P1"]
    url = f"/visits/{exam_id}"
    assert "Not graded" not in _app(worked).test_client().get(url).get_data(as_text=True)
    with session_scope(worked.factory) as s:
        repo.add_image(s, sha256="9" * 64, source_name="<b>P1_R.tif</b> (page 2)", exam=s.get(Exam, exam_id), eye="R",
                       page=2, file_sha256="8" * 64, state="rejected", error_code="not_fundus",
                       error="'<b>P1_R.tif</b> (page 2)' does not look like a colour fundus photo")
    page = " ".join(_app(worked).test_client().get(url).get_data(as_text=True).split())
    assert "Not graded: 1 page of a multi-page file was refused." in page
    assert "&#39;&lt;b&gt;P1_R.tif&lt;/b&gt; (page 2)&#39; does not look like a colour fundus photo" in page  # escaped


def test_confirm_and_correct_from_the_page(worked_db):
    worked = worked_db  # on SQLite, then on PostgreSQL
    client = _app(worked).test_client()
    exam_id = worked.exams["P1"]
    form = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    resp = client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local", "comment": "looks right"})
    assert resp.status_code == 302 and resp.headers["Location"].endswith(f"/visits/{exam_id}")
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert "Signed off (confirmed). The reviewed report is version 2." in page
    assert "Signed off: confirmed by Dr Local" in page and 'value="Dr Local"' in page  # the name is remembered
    assert re.search(r"Report version 2</a>\s*— [^—]+— <span class=\"outcome reviewed\">reviewed</span>", page)
    with session_scope(worked.factory) as s:
        review = rrepo.current_review(s, exam_id)
        assert (review.source, review.outcome, review.reviewer, review.comment, review.user_id) == (
            "web", "confirmed", "Dr Local", "looks right", None)

    assert 'id="confirm"' not in page  # signed off: the form starts from the sign-off, 'confirm' is not offered
    # a correction: the right eye's DR grade changed, the left eye ungradable
    form = _form(page)
    new_dr = str((int(form["dr_R"]) + 1) % 5)
    # 'Confirm' with a changed answer is refused, so a grader's change is never silently dropped
    resp = client.post(f"/visits/{exam_id}/confirm", data={**form, "dr_R": new_dr, "reviewer": "Dr Local"})
    assert resp.status_code == 400 and "pressed &#39;Confirm the model&#39;s findings&#39;" in resp.get_data(as_text=True)
    resp = client.post(f"/visits/{exam_id}/correct", data={**form, "dr_R": new_dr, "gradable_L": "no", "reviewer": "Dr Local"})
    assert resp.status_code == 302
    with session_scope(worked.factory) as s:
        review = rrepo.current_review(s, exam_id)
        assert review.outcome == "corrected" and [(e.eye, e.gradable, e.dr_grade) for e in review.eyes] == [
            ("R", True, int(new_dr)), ("L", False, None)]
        assert [r.version for r in rrepo.exam_reports(s, exam_id)] == [3, 2, 1]
    # the form of before the correction is stale now: refused with 409, nothing recorded
    resp = client.post(f"/visits/{exam_id}/correct", data={**form, "reviewer": "Dr Local"})
    assert resp.status_code == 409 and "while it was open" in resp.get_data(as_text=True)
    # a bad value is refused with the reason, and what was typed is kept
    fresh = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    resp = client.post(f"/visits/{exam_id}/correct", data={**fresh, "dr_R": "9", "reviewer": "Dr Local", "comment": "kept text"})
    assert resp.status_code == 400 and "choose a DR grade 0-4" in resp.get_data(as_text=True)
    assert "kept text" in resp.get_data(as_text=True)
    with session_scope(worked.factory) as s:
        assert len(rrepo.review_history(s, exam_id)) == 2


def test_without_a_name_or_a_csrf_token_nothing_is_recorded(worked):
    client = _app(worked).test_client()
    exam_id = worked.exams["P2"]
    form = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    resp = client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "  "})
    assert resp.status_code == 400 and "name is empty" in resp.get_data(as_text=True)
    no_token = {k: v for k, v in form.items() if k != "csrf_token"}
    resp = client.post(f"/visits/{exam_id}/confirm", data={**no_token, "reviewer": "Dr Local"})
    assert resp.status_code == 400 and "CSRF" in resp.get_data(as_text=True)
    other = _app(worked).test_client()  # another browser's session: the token is not valid there
    other.get("/queue")
    assert other.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local"}).status_code == 400
    with session_scope(worked.factory) as s:
        assert rrepo.current_review(s, exam_id) is None


def test_loopback_page_answers_only_to_loopback_host_names(worked):
    client = _app(worked).test_client()
    assert client.get("/queue", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/queue", headers={"Host": "attacker.example"}).status_code == 400
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("clinic-pc")


def test_login_required_off_loopback(worked):
    app = _app(worked, require_login=True, loopback=False)
    client = app.test_client()
    _add_user(worked)
    _add_user(worked, "gone", "Dr Gone", active=False)
    resp = client.get(f"/visits/{worked.exams['P1']}")
    assert resp.status_code == 302 and "/login?next=/visits/" in resp.headers["Location"]
    assert client.get("/visits/1/images/1/photo.jpg").status_code == 302  # pictures too
    assert client.post("/visits/1/confirm", data={}).status_code in (400, 401)
    assert _login(client, password="wrong password!").status_code == 401
    assert _login(client, username="nobody").status_code == 401
    assert _login(client, username="gone").status_code == 401  # a disabled user cannot log in
    resp = _login(client)
    assert resp.status_code == 302 and resp.headers["Location"] == "/queue"
    page = client.get(f"/visits/{worked.exams['P1']}").get_data(as_text=True)
    assert "Signed in as <strong>Dr A. Grey</strong>" in page and 'name="reviewer"' not in page
    resp = client.post(f"/visits/{worked.exams['P1']}/confirm", data={**_form(page), "reviewer": "Someone Else"})
    assert resp.status_code == 302
    with session_scope(worked.factory) as s:
        review = rrepo.current_review(s, worked.exams["P1"])
        assert review.reviewer == "Dr A. Grey" and review.user_id is not None  # signed as the logged-in user
    # a password change ends the sessions opened with the old one
    with session_scope(worked.factory) as s:
        s.execute(update(ReviewUser).where(ReviewUser.username == "grey").values(password_changed_at=utcnow()))
    assert client.get("/queue").status_code == 302
    # log out: a copy of the session's cookie (another browser, a saved profile) stops working too
    _login(client)
    copy = app.test_client()
    copy.set_cookie("dr_review", client.get_cookie("dr_review").value)
    assert copy.get("/queue").status_code == 200
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/queue").get_data(as_text=True)).group(1)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/queue").status_code == 302
    assert copy.get("/queue").status_code == 302
    assert _login(client).status_code == 302 and client.get("/queue").status_code == 200  # a new login works
    # an open redirect through ?next= is not possible
    resp = client.post("/login?next=//evil.example/x", data={
        "csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").get_data(as_text=True)).group(1),
        "username": "grey", "password": PASSWORD})
    assert resp.headers["Location"] == "/queue"


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example", "/\t/evil.example", "/%09/evil.example",
                                    "https://evil.example", "/ /evil.example", "javascript:alert(1)", "", "queue"])
def test_login_never_redirects_off_the_site(target):
    assert local_target(target) is None


@pytest.mark.parametrize("target", ["/queue", "/visits/12", "/visits/12?", "/visits/12?tab=eyes&x=1"])
def test_login_returns_to_a_page_of_the_site(target):
    assert local_target(target) == target


def test_a_tab_in_next_does_not_make_an_open_redirect(worked):
    """Werkzeug drops a tab from a Location header, so "/<TAB>/host" would leave the site as "//host"."""
    client = _app(worked, require_login=True, loopback=False).test_client()
    _add_user(worked)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").get_data(as_text=True)).group(1)
    resp = client.post("/login?next=/%09/evil.example", data={"csrf_token": token, "username": "grey", "password": PASSWORD})
    assert resp.status_code == 302 and resp.headers["Location"] == "/queue"


def test_login_returns_to_the_visit_that_asked_for_it(worked):
    client = _app(worked, require_login=True, loopback=False).test_client()
    _add_user(worked)
    visit = f"/visits/{worked.exams['P1']}"
    asked = client.get(visit).headers["Location"]  # the login page, with next= as the app builds it
    page = client.get(asked)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    resp = client.post(asked, data={"csrf_token": token, "username": "grey", "password": PASSWORD})
    assert resp.status_code == 302 and resp.headers["Location"] == visit


def test_password_guessing_is_slowed_down(worked):
    client = _app(worked, require_login=True, loopback=False).test_client()
    _add_user(worked)
    for _ in range(5):
        assert _login(client, password="not the password").status_code == 401
    resp = _login(client)  # even the right password is refused for a while
    assert resp.status_code == 401 and "Too many failed attempts" in resp.get_data(as_text=True)


def test_a_guesser_elsewhere_does_not_lock_the_grader_out(worked):
    """Keyed on the name alone, five wrong passwords from anywhere locked a named grader out for 15 minutes."""
    app = _app(worked, require_login=True, loopback=False)
    _add_user(worked)
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "10.9.9.9"
    for _ in range(5):
        assert _login(guesser, password="not the password").status_code == 401
    assert "Too many failed attempts" in _login(guesser).get_data(as_text=True)  # the guesser is stopped
    grader = app.test_client()
    grader.environ_base["REMOTE_ADDR"] = "10.0.0.2"
    assert _login(grader).status_code == 302  # at the grader's own workstation, the right password still works


def test_files_are_served_only_from_work_and_reports_by_id(worked, tmp_path):
    client = _app(worked).test_client()
    p1, p2 = worked.exams["P1"], worked.exams["P2"]
    with session_scope(worked.factory) as s:
        image_p2 = s.scalars(select(Result.image_id).join(Image, Image.id == Result.image_id).where(Image.exam_id == p2)).one()
        outside = tmp_path / "outside.jpg"
        outside.write_bytes(b"\xff\xd8secret")
        s.execute(update(Result).where(Result.image_id == image_p2).values(overlay_path=str(outside)))
        s.execute(update(Report).where(Report.exam_id == p2).values(path="/etc/passwd"))
    assert client.get(f"/visits/{p2}/images/{image_p2}/photo.jpg").status_code == 200
    assert client.get(f"/visits/{p2}/images/{image_p2}/overlay.jpg").status_code == 404  # stored path outside work/
    assert client.get(f"/visits/{p1}/images/{image_p2}/photo.jpg").status_code == 404  # another visit's image
    assert client.get(f"/visits/{p2}/images/{image_p2}/mask_MA.jpg").status_code == 404  # not a served kind
    assert client.get(f"/visits/{p2}/images/{image_p2}/..%2F..%2Fetc%2Fpasswd.jpg").status_code == 404
    assert client.get(f"/visits/{p2}/reports/1.pdf").status_code == 404  # stored path outside reports/
    assert client.get(f"/visits/{p2}/reports/7.pdf").status_code == 404


def test_user_text_is_escaped_everywhere(worked):
    from datetime import date

    from screening.db import repository as repo

    evil = '<script>alert("x")</script>'
    with session_scope(worked.factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, evil), date(2025, 1, 2))
        img = repo.add_image(s, sha256="e" * 64, source_name=f"{evil}.jpg", exam=exam, eye="R")
        repo.add_result(s, img, model_version=evil, checkpoint_sha256="c" * 64, dr_grade=2, dr_probs=[0.2] * 5, dme_grade=0,
                        dme_probs=[1 / 3] * 3, referable_score=0.9, referable=True)
        exam_id = exam.id
    client = _app(worked).test_client()
    form = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": f"Dr {evil}", "comment": evil})
    for url in ("/queue", f"/visits/{exam_id}"):
        html = client.get(url).get_data(as_text=True)
        assert "<script>" not in html and "&lt;script&gt;" in html, url


def test_access_log_has_ids_but_no_patient_ids(worked, caplog):
    client = _app(worked).test_client()
    exam_id = worked.exams["P1"]
    with caplog.at_level(logging.INFO, logger="screening"):
        page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
        client.post(f"/visits/{exam_id}/confirm", data={**_form(page), "reviewer": "Dr Local"})
        client.get("/queue")
    messages = [r.getMessage() for r in caplog.records]
    assert f"GET /visits/{exam_id} 200 user=None" in messages
    assert any(m.startswith("review ") and f"of exam {exam_id} recorded (confirmed)" in m for m in messages)
    assert not [m for m in messages if re.search(r"\bP[12]\b", m)], messages


def test_a_page_opened_before_a_photos_eye_was_set_cannot_sign_off(worked):
    """`review eye` swaps a visit's photos while a grader has it open: the grader's answer for the right eye would
    land on the other photo, so the sign-off is refused (409) as for a new photo; the reloaded page signs off."""
    from screening.review.eyes import set_eyes

    client = _app(worked).test_client()
    exam_id = worked.exams["P1"]
    form = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    seen = dict((int(k[:-1]), k[-1]) for k in form["seen_eyes"].split(","))
    assert sorted(seen.values()) == ["L", "R"]
    resp = client.post(f"/visits/{exam_id}/confirm", data={**form, "seen_eyes": "1X", "reviewer": "Dr Local"})
    assert resp.status_code == 400 and "the form is damaged" in resp.get_data(as_text=True)
    with session_scope(worked.factory) as s:
        set_eyes(s, [(i, "L" if eye == "R" else "R") for i, eye in seen.items()], "A. Clerk", "worklist")
    resp = client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local"})
    assert resp.status_code == 409 and "a photo&#39;s eye was set" in resp.get_data(as_text=True)
    resp = client.post(f"/visits/{exam_id}/correct", data={**form, "reviewer": "Dr Local", "comment": "typed for R"})
    page = resp.get_data(as_text=True)  # the answers typed were for the photos under their old eyes: not kept
    assert resp.status_code == 409 and "a photo&#39;s eye was set" in page and "typed for R" not in page
    with session_scope(worked.factory) as s:
        assert rrepo.current_review(s, exam_id) is None
    fresh = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    assert client.post(f"/visits/{exam_id}/confirm", data={**fresh, "reviewer": "Dr Local"}).status_code == 302
    with session_scope(worked.factory) as s:
        review = rrepo.current_review(s, exam_id)
        assert {(e.image_id, e.eye) for e in review.eyes} == {(i, "L" if eye == "R" else "R") for i, eye in seen.items()}


def test_an_eye_with_two_fields_shows_both_and_is_signed_off_once(settings_db):
    from datetime import date

    from ..conftest import run_worker

    settings = settings_db  # on SQLite, then on PostgreSQL

    worked = run_worker(settings, {"P3_R.jpg": 1, f"P3_R_{date.today():%Y%m%d}.jpg": 4})  # two fields of one eye
    client = _app(worked).test_client()
    exam_id = worked.exams["P3"]
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert "2 fields; the eye's result is field" in page and "Field 2 of 2" in page
    image_ids = set(re.findall(rf'src="/visits/{exam_id}/images/(\d+)/photo\.jpg"', page))
    assert len(image_ids) == 2
    form = _form(page)
    assert set(form["seen_fields"].split(",")) == image_ids
    assert client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local"}).status_code == 302
    with session_scope(worked.factory) as s:
        review = rrepo.current_review(s, exam_id)
        assert [e.eye for e in review.eyes] == ["R"] and str(review.eyes[0].image_id) in image_ids


def test_an_eye_the_worker_found_ungradable_shows_its_photo_and_reasons_and_confirms(settings, intake_models):
    from ..conftest import run_worker

    worked = run_worker(settings.model_copy(update={"quality_model": intake_models["dark_blurred"]}), {"P4_L.jpg": 5})
    client = _app(worked).test_client()
    exam_id = worked.exams["P4"]
    assert "P4" in client.get("/queue").get_data(as_text=True)
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert "ungradable: not graded" in page and "too dark (under-exposed)" in page and "Recall: ungradable image" in page
    pictures = re.findall(rf'src="(/visits/{exam_id}/images/\d+/\w+\.jpg)"', page)
    assert len(pictures) == 1 and pictures[0].endswith("/photo.jpg")  # no overlay or heat maps: nothing was graded
    resp = client.get(pictures[0])
    assert resp.status_code == 200 and resp.data[:2] == b"\xff\xd8"
    assert client.get(pictures[0].replace("photo", "overlay")).status_code == 404
    form = _form(page)
    assert form["gradable_L"] == "no"  # the model's answer
    # no grade is put in the grader's mouth: made gradable, the eye's grades must be chosen (they were 0 and 0)
    assert re.search(r'<select name="dr_L"[^>]*>\s*<option value="" selected>choose', page)
    resp = client.post(f"/visits/{exam_id}/correct", data={**form, "gradable_L": "yes", "reviewer": "Dr Local"})
    assert resp.status_code == 400 and "choose a DR grade" in resp.get_data(as_text=True)
    assert client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local"}).status_code == 302
    with session_scope(worked.factory) as s:
        review = rrepo.current_review(s, exam_id)
        assert (review.outcome, review.referral, [e.gradable for e in review.eyes]) == ("confirmed", "ungradable", [False])


def test_the_visit_page_names_the_models_that_checked_its_photos_as_the_pdf_does(worked):
    """The PDF's model section names the gradability and laterality models that checked the photos
    (``images.check_models``); the grader on the page sees the same rows, and none when none was recorded."""
    exam_id = worked.exams["P1"]
    url = f"/visits/{exam_id}"
    with session_scope(worked.factory) as s:
        s.execute(update(Image).where(Image.exam_id == exam_id).values(check_models=None))
    assert 'id="check-models"' not in _app(worked).test_client().get(url).get_data(as_text=True)
    with session_scope(worked.factory) as s:
        first, second = s.scalars(select(Image).where(Image.exam_id == exam_id).order_by(Image.id)).all()
        first.check_models = {"gradability": "dr-quality-1 aaaa", "laterality": "dr-laterality-3 <b>bb</b>"}
        second.check_models = {"gradability": "dr-quality-1 aaaa"}  # checked when no laterality model was loaded
    page = " ".join(_app(worked).test_client().get(url).get_data(as_text=True).split())
    line = re.search(r'<p class="muted" id="check-models">(.*?)</p>', page).group(1)
    assert line == ('Photo checks: Gradability model <span class="mono">dr-quality-1 aaaa</span> · Laterality model '
                    '<span class="mono">dr-laterality-3 &lt;b&gt;bb&lt;/b&gt;; not recorded for 1 photo</span>')


def test_a_photo_after_an_urgent_sign_off_reopens_the_visit_from_the_graders_answers(worked, intake_models):
    """A grader referred P2 urgently (DR 4 where the model said 1); the left eye arrives afterwards, ungradable. The
    queue, the page and the new draft keep the grader's referral in sight, the form starts from the grader's
    answers, and the model's lower answer cannot be signed off without a chosen referral and a reason."""
    from pypdf import PdfReader

    from screening.report import EyeReview
    from screening.review import load_visit, sign_off
    from screening.review.reviewed_report import render_reviewed_report

    from ..conftest import run_worker

    exam_id = worked.exams["P2"]
    with session_scope(worked.factory) as s:  # the tiny test model grades every photo 4: make its answer mild DR
        s.execute(update(Result).where(Result.image_id.in_(select(Image.id).where(Image.exam_id == exam_id)))
                  .values(dr_grade=1, dr_probs=[0.1, 0.8, 0.05, 0.03, 0.02], dme_grade=0, dme_probs=[0.9, 0.05, 0.05],
                          referable=False, referable_score=0.05))
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli", answers=[EyeReview("R", True, 4, 0)])
    render_reviewed_report(worked.factory, exam_id, catalog=ModelCatalog.from_settings(worked.settings),
                           clinic_name="North Clinic", templates_dir=TEMPLATES, reports_dir=worked.settings.reports, retries=1)
    client = _app(worked).test_client()
    stale = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))  # the right eye only
    # the left eye, after the sign-off, found ungradable: a model's draft of the visit recommending a recall
    run_worker(worked.settings.model_copy(update={"quality_model": intake_models["dark_blurred"]}), {"P2_L.jpg": 4})
    with session_scope(worked.factory) as s:
        visit = load_visit(s, exam_id)
        model_level, model_r = visit.model_referral.level, visit.eye("R").model_answer
        draft = rrepo.exam_reports(s, exam_id)[0]
    assert model_level != "urgent" and draft.review_id is None and draft.version == 3
    text = " ".join(" ".join((p.extract_text() or "").split()) for p in PdfReader(draft.path).pages)
    assert "recommending 'Urgent referral (proliferative DR)'" in text
    assert "is more urgent than this version's: act on it until the visit is reviewed again" in text

    # the page opened before the left eye arrived: refused as stale (it had no left-eye fields to complain about)
    resp = client.post(f"/visits/{exam_id}/correct", data={**stale, "reviewer": "Dr Local"})
    assert resp.status_code == 409 and "a new photo was graded" in resp.get_data(as_text=True)
    assert "signed off before: Urgent referral" in client.get("/queue").get_data(as_text=True)
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert "Earlier sign-off (reopened)" in page and "P2_L.jpg" in page and 'id="confirm"' not in page
    form = _form(page)
    assert form["dr_R"] == "4" and form["gradable_L"] in ("yes", "no")  # the grader's right eye, the model's left
    lowered = {**form, "dr_R": str(model_r.dr_grade), "dme_R": str(model_r.dme_grade), "reviewer": "Dr Local"}
    resp = client.post(f"/visits/{exam_id}/correct", data=lowered)
    assert resp.status_code == 400 and "recommended &#39;Urgent referral" in resp.get_data(as_text=True)
    assert client.post(f"/visits/{exam_id}/correct", data={**form, "reviewer": "Dr Local"}).status_code == 302
    with session_scope(worked.factory) as s:
        assert rrepo.current_review(s, exam_id).referral == "urgent"


def test_ids_beyond_the_databases_range_are_not_found(worked):
    client = _app(worked).test_client()
    huge = "99999999999999999999999"
    exam_id = worked.exams["P1"]
    for path in (f"/visits/{huge}", f"/visits/{2**63}", f"/visits/{exam_id}/images/{huge}/photo.jpg",
                 f"/visits/{exam_id}/reports/{huge}.pdf", "/visits/0"):
        resp = client.get(path)
        assert resp.status_code == 404 and "There is nothing at this address" in resp.get_data(as_text=True), path
    assert client.post(f"/visits/{huge}/confirm", data={}).status_code in (400, 404)  # CSRF or not found, never 500


def _eye_form(client, exam_id: int, image_id: int, **fields) -> dict[str, str]:
    """The visit page's "Wrong eye?" form of ``image_id`` as a browser sends it, with ``fields`` filled in."""
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    block = re.search(rf'<details class="set-eye" id="set-eye-{image_id}"(.*?)</details>', html, re.S).group(1)
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', block))
    return {**hidden, "eye": "R", **fields}


def test_a_photos_eye_is_set_from_the_visit_page_with_who_and_why(worked):
    """A grader who sees "Laterality mismatch: check the label" had to go to a terminal (`review eye`) to answer it.
    The page's form does what the command does, under the visit's report claim: refusals name the problem and change
    nothing; a confirmation is recorded with the name and reason, the warning goes, a new version is due and a
    sign-off made before no longer covers the visit."""
    from screening.db import repository as repo
    from screening.db.models import Event
    from screening.review.visits import load_visit

    exam_id = worked.exams["P1"]
    client = _app(worked).test_client()
    with session_scope(worked.factory) as s:
        right = s.scalars(select(Image).where(Image.exam_id == exam_id, Image.eye == "R")).first()
        right.predicted_eye, right.eye_confidence, right.eye_mismatch = "L", 0.97, True  # reads as the left eye
        right.eye_note = "Laterality mismatch: the photo reads as the left eye; check the label."
        rid = right.id
        other = s.scalars(select(Image.id).where(Image.exam_id != exam_id, Image.exam_id.is_not(None))).first()
    form = _form(client.get(f"/visits/{exam_id}").get_data(as_text=True))
    assert client.post(f"/visits/{exam_id}/confirm", data={**form, "reviewer": "Dr Local"}).status_code == 302
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert f'id="set-eye-{rid}" open>' in html  # the flagged photo's form is open; the other photo's is folded
    assert re.search(r'id="set-eye-\d+">', html)

    def post(**fields):
        return client.post(f"/visits/{exam_id}/images/{rid}/eye", data=_eye_form(client, exam_id, rid, **fields))

    refusals = [
        (dict(reason="camera worklist", reviewer="Dr Local"), 400, "the photo reads as the left eye (97% sure)"),
        (dict(reason="  ", reviewer="Dr Local", against_photo="1"), 400, "the reason (what the label was checked against) is empty"),
        (dict(eye="X", reason="worklist", reviewer="Dr Local"), 400, "choose the right or the left eye"),
        (dict(reason="worklist", reviewer="Dr Local", against_photo="1", seen_eyes="1R"), 409, "changed while it was open"),
    ]
    for fields, status, message in refusals:
        resp = post(**fields)
        assert resp.status_code == status and message in resp.get_data(as_text=True).replace("&#39;", "'"), fields
    assert client.post(f"/visits/{exam_id}/images/{other}/eye", data=_eye_form(
        client, exam_id, rid, reason="worklist", reviewer="Dr Local", against_photo="1")).status_code == 404
    with session_scope(worked.factory) as s:
        assert s.get(Image, rid).eye_source != "staff" and not s.scalars(select(Event).where(Event.kind == "eye_set")).all()
        assert not load_visit(s, exam_id).awaiting_review

    resp = post(reason="camera worklist <b>", reviewer="Dr Local", against_photo="1")
    assert resp.status_code == 302
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert f"Image {rid}: eye confirmed as the right eye" in page and "sign-off no longer covers it" in page
    assert f'id="set-eye-{rid}" open>' not in page and "camera worklist &lt;b&gt;" in page  # the note, escaped
    with session_scope(worked.factory) as s:
        image = s.get(Image, rid)
        assert image.eye == "R" and image.eye_source == "staff"
        assert image.eye_note.startswith("Eye confirmed as the right eye by Dr Local")
        assert s.scalars(select(Event.message).where(Event.kind == "eye_set")).all() == [
            "eye R confirmed by Dr Local: camera worklist <b>"]
        assert exam_id in [e.id for e in repo.exams_needing_report(s)]
        assert load_visit(s, exam_id).awaiting_review  # the earlier sign-off answered while the label was in doubt


def test_an_identity_conflict_answered_on_the_page_lifts_the_sign_off_block(worked):
    from screening.db import repository as repo

    exam_id = worked.exams["P1"]
    client = _app(worked).test_client()
    with session_scope(worked.factory) as s:
        image = s.scalars(select(Image).where(Image.exam_id == exam_id, Image.eye == "L")).first()
        repo.record_drop(s, sha256=image.sha256, source_name="P1_R_copy.jpg", outcome="rejected", image=image,
                         reason="the same bytes as the other eye's photo", reason_code="identity_conflict")
        lid = image.id
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert 'id="conflict-block"' in html and f'id="set-eye-{lid}" open>' in html
    resp = client.post(f"/visits/{exam_id}/images/{lid}/eye", data=_eye_form(
        client, exam_id, lid, eye="L", reason="checked the camera's worklist", reviewer="Dr Local", against_photo="1"))
    assert resp.status_code == 302
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert 'id="conflict-block"' not in html and 'id="confirm">' in html
    assert client.post(f"/visits/{exam_id}/confirm", data={**_form(html), "reviewer": "Dr Local"}).status_code == 302


def test_a_swapped_pair_is_swapped_on_the_page_in_one_step(worked):
    """Both photos read as the other eye: the page offers (open) to file every photo under the other eye, together,
    as `review eye 31=L 32=R` does; a page older than the visit's eyes is refused and changes nothing."""
    from screening.db.models import Event

    exam_id = worked.exams["P1"]
    client = _app(worked).test_client()
    with session_scope(worked.factory) as s:
        photos = {i.eye: i for i in s.scalars(select(Image).where(Image.exam_id == exam_id))}
        for image, reads in ((photos["R"], "L"), (photos["L"], "R")):
            image.predicted_eye, image.eye_confidence, image.eye_mismatch = reads, 0.95, True
        ids = {eye: image.id for eye, image in photos.items()}
    html = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    block = re.search(r'<details class="set-eye" id="swap-eyes" open>(.*?)</details>', html, re.S).group(1)
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', block))
    stale = {**form, "seen_eyes": f"{ids['R']}L,{ids['L']}R", "reason": "worklist", "reviewer": "Dr Local"}
    assert client.post(f"/visits/{exam_id}/swap-eyes", data=stale).status_code == 409
    resp = client.post(f"/visits/{exam_id}/swap-eyes", data={**form, "reason": "camera worklist", "reviewer": "Dr Local"})
    assert resp.status_code == 302
    page = client.get(f"/visits/{exam_id}").get_data(as_text=True)
    assert (f"Image {ids['R']}: eye set from the right eye to the left eye; image {ids['L']}: eye set from the left eye "
            "to the right eye.") in page
    assert 'id="swap-eyes" open>' not in page  # each photo is now filed under the eye it reads as
    with session_scope(worked.factory) as s:
        assert {i.id: i.eye for i in s.scalars(select(Image).where(Image.exam_id == exam_id))} == {ids["R"]: "L", ids["L"]: "R"}
        assert len(s.scalars(select(Event).where(Event.kind == "eye_set")).all()) == 2
