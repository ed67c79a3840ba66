"""Per-visit PDF reports: referral rule, escaping, safe paths, versioning, retries, and the rendered PDF's text."""

from __future__ import annotations

import dataclasses
import html
import re
import shutil
import subprocess
from datetime import date, datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest

from screening import report as rpt
from screening.report import (
    DEMO_WATERMARK,
    LESION_COLOURS,
    RESEARCH_STATUS,
    EyeFinding,
    ReportContext,
    ReportError,
    ReportVersionTaken,
    referral_recommendation,
    render_html,
    render_pdf,
    render_with_retries,
)
from training.model.multitask import DME_GRADES, DR_GRADES

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
EXAM = date(2024, 5, 17)
HAS_POPPLER = shutil.which("pdftoppm") is not None and shutil.which("pdftotext") is not None


# ------------------------------------------------------------------------------------------------ helpers


def _norm(text: str) -> str:
    """Drop whitespace and hyphens so line wrapping / de-hyphenation in PDF text extraction doesn't matter."""
    return re.sub(r"[\s\-\u2010\u2011\u00ad]+", "", text).lower()


def _contains(text: str, needle: str) -> bool:
    return _norm(needle) in _norm(text)


def _images(folder: Path, eye: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    h, w = 96, 112
    photo = np.zeros((h, w, 3), np.uint8)
    cv2.circle(photo, (w // 2, h // 2), 44, (40, 70, 170), -1)
    overlay = photo.copy()
    for code, (x, y) in zip(LESION_COLOURS, [(40, 40), (60, 50), (70, 35), (45, 62), (78, 48)]):
        r, g, b = LESION_COLOURS[code]
        cv2.circle(overlay, (x, y), 4, (b, g, r), -1)
    cam = cv2.applyColorMap(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1)), cv2.COLORMAP_JET)
    out = {}
    for name, img in {"photo": photo, "overlay": overlay, "dr_cam": cam, "dme_cam": cam[:, ::-1]}.items():
        p = folder / f"{eye}_{name}.png"
        assert cv2.imwrite(str(p), img)
        out[name] = p
    return out


def _eye(eye: str, dr: int, dme: int, folder: Path | None = None, source_name: str | None = None) -> EyeFinding:
    imgs = _images(folder, eye) if folder is not None else {}
    dr_probs = [0.02] * 5
    dr_probs[dr] = 0.92
    dme_probs = [0.05] * 3
    dme_probs[dme] = 0.9
    return EyeFinding(
        eye=eye, source_name=source_name or f"{eye}_fundus.jpg",
        photo_path=imgs.get("photo"), overlay_path=imgs.get("overlay"),
        dr_cam_path=imgs.get("dr_cam"), dme_cam_path=imgs.get("dme_cam"),
        dr_grade=dr, dr_probs=dr_probs, dme_grade=dme, dme_probs=dme_probs,
        referable_score=0.9 if dr >= 2 else 0.1, referable=dr >= 2,
        lesion_areas={"MA": 0.0012, "HE": 0.004, "EX": 0.0, "SE": 0.00001, "OD": 0.021},
    )


def _ctx(eyes, status="demo", patient_id="PAT-00123", version=1) -> ReportContext:
    return ReportContext(
        clinic_name="Northside Diabetic Eye Screening", patient_id=patient_id, exam_date=EXAM, eyes=eyes,
        model_version="mt-resnet34 v1.3.0", checkpoint_sha256="ab12cd34ef56" + "0" * 52, model_status=status,
        model_metrics={"DR quadratic kappa": 0.8123, "Referable DR AUC": 0.934, "Validation set": "IDRiD test"},
        generated_at=datetime(2024, 5, 17, 14, 32, tzinfo=timezone.utc), report_version=version,
    )


def _pages_text(pdf: Path) -> list[str]:
    pypdf = pytest.importorskip("pypdf")
    return [p.extract_text() or "" for p in pypdf.PdfReader(str(pdf)).pages]


def _pdftotext(pdf: Path) -> str:
    return subprocess.run(["pdftotext", str(pdf), "-"], check=True, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------------------------- referral


@pytest.mark.parametrize(
    ("right", "left", "level", "text"),
    [
        ((0, 0), (0, 0), "rescreen_24", "Rescreen in 12-24 months"),
        ((1, 0), (0, 0), "rescreen_12", "Rescreen in 12 months"),
        ((0, 0), (2, 0), "routine", "Refer to ophthalmology (routine)"),
        ((1, 0), (0, 1), "routine", "Refer to ophthalmology (routine)"),
        ((3, 0), (1, 2), "soon", "Refer within weeks"),
        ((2, 2), (4, 0), "urgent", "Urgent referral (proliferative DR)"),
    ],
)
def test_referral_comes_from_the_worse_eye(right, left, level, text):
    ref = referral_recommendation([_eye("R", *right), _eye("L", *left)])
    assert ref.level == level
    assert text in ref.text
    assert ref.colour == rpt.REFERRAL_LEVELS[level].colour


def test_referral_reason_names_the_worse_eye_and_handles_no_eyes():
    ref = referral_recommendation([_eye("R", 1, 0), _eye("L", 4, 0)])
    assert ref.reason.startswith("Left eye") and DR_GRADES[4] in ref.reason and ref.basis == "Based on the worse eye"
    assert referral_recommendation([_eye("L", 0, 0)]).level == "rescreen_24"
    assert referral_recommendation([_eye("L", 0, 0)]).basis == "Based on the one eye received"
    assert referral_recommendation([]).level == "no_images"
    # a tie lists both eyes: "the worse eye" above "Right eye: No apparent retinopathy...; Left eye: Moderate..."
    # (the right eye referred on its score, the left on its grade) read as if the grade-0 eye were the worse
    on_score = dataclasses.replace(_eye("R", 0, 0), referable=True, referable_score=0.59)
    tie = referral_recommendation([on_score, _eye("L", 2, 0)])
    assert tie.level == "routine" and tie.reason.startswith("Right eye") and "; Left eye" in tie.reason
    assert tie.basis == "Based on both eyes (the same outcome)"
    text = " ".join(render_html(_ctx([on_score, _eye("L", 2, 0)]), TEMPLATES).split())
    assert "Based on both eyes (the same outcome) — Right eye:" in text and "Based on the worse eye" not in text
    # the summary row of a grade-0 eye that is referred says why beside the outcome; a grade-2 eye's does not
    assert text.count("on the model's referable-DR score (59.0%), not its grade") == 1


def test_invalid_findings_are_rejected():
    with pytest.raises(ValueError, match="dr_grade"):
        dataclasses.replace(_eye("R", 0, 0), dr_grade=5)
    with pytest.raises(ValueError, match="dme_probs"):
        dataclasses.replace(_eye("R", 0, 0), dme_probs=[1.0])
    with pytest.raises(ValueError, match="eye must be"):
        _eye("X", 0, 0)
    with pytest.raises(ValueError, match="eye_result_rule"):
        dataclasses.replace(_ctx([_eye("R", 0, 0)]), eye_result_rule="best")


# -------------------------------------------------------------------------------- several fields per eye


def test_the_eye_result_is_its_worst_field_or_its_latest():
    macula, disc, recapture = _eye("R", 1, 0), _eye("R", 3, 0), _eye("R", 0, 0)
    assert rpt.eye_result([macula, disc, recapture], "worst") is disc
    assert rpt.eye_result([macula, disc, recapture], "latest") is recapture
    assert rpt.eye_result([], "worst") is None
    same = dataclasses.replace(macula, source_name="again.jpg")
    assert rpt.eye_result([macula, same], "worst") is macula  # equal findings: the earlier field
    # a field referred by its score outranks a clean one of the same grade
    scored = dataclasses.replace(macula, dr_grade=0, dr_probs=[0.6, 0.1, 0.1, 0.1, 0.1], referable=True, referable_score=0.7)
    assert rpt.eye_result([_eye("R", 0, 0), scored], "worst") is scored
    with pytest.raises(ValueError, match="rule"):
        rpt.eye_result([macula], "best")  # type: ignore[arg-type]


def test_the_referral_comes_from_each_eyes_result_under_either_rule():
    fields = [_eye("R", 4, 0), _eye("R", 0, 0), _eye("L", 1, 0)]  # a proliferative finding in the first right field
    worst = _ctx(fields)
    assert [e.dr_grade for e in worst.eye_results()] == [4, 1] and len(worst.fields("R")) == 2
    assert referral_recommendation(worst.eye_results()).level == "urgent"
    latest = dataclasses.replace(worst, eye_result_rule="latest")
    assert [e.dr_grade for e in latest.eye_results()] == [0, 1]
    assert referral_recommendation(latest.eye_results()).level == "rescreen_12"


def test_every_field_is_shown_with_its_pictures_and_the_eye_result_is_marked(tmp_path):
    macula = dataclasses.replace(_eye("R", 1, 0, tmp_path / "m"), source_name="P1_R_macula.jpg",
                                 mask_folder=tmp_path / "work" / "ab" / "abcdef")
    disc = dataclasses.replace(_eye("R", 3, 1, tmp_path / "d"), source_name="P1_R_disc.jpg")
    left = _eye("L", 0, 0, tmp_path / "l")
    ctx = _ctx([macula, disc, left], status="research")
    html = render_html(ctx, TEMPLATES)
    # each field's own four pictures
    for finding in (macula, disc, left):
        for picture in (finding.photo_path, finding.overlay_path, finding.dr_cam_path, finding.dme_cam_path):
            assert html.count(picture.resolve().as_uri()) == 1
    assert "Field 1 of 2" in html and "Field 2 of 2" in html and html.count("eye result</span>") == 1
    assert "Field 1 of 1" not in html  # a single photograph looks as it always did
    text = "\n".join(_pages_text(render_pdf(ctx, TEMPLATES, tmp_path / "reports")))
    for needle in ("P1_R_macula.jpg", "P1_R_disc.jpg", "2 photographs of this eye", "its worst gradable field: field 2",
                   "2 fields; result from field 2", DR_GRADES[1], DR_GRADES[3], "Refer within weeks",
                   "Lesion masks at the photograph's own size", str(tmp_path / "work" / "ab" / "abcdef")):
        assert _contains(text, needle), needle
    recaptured = dataclasses.replace(ctx, eyes=[disc, macula, left], eye_result_rule="latest", report_version=2)
    latest = "\n".join(_pages_text(render_pdf(recaptured, TEMPLATES, tmp_path / "reports")))
    assert _contains(latest, f"its latest gradable field: field 2, {DR_GRADES[1]}") and _contains(latest, "Rescreen in 12 months")
    assert _contains(latest, DR_GRADES[3])  # the earlier field is still shown


# ---------------------------------------------------------------------------------------- paths and HTML


def test_patient_id_is_sanitised_and_cannot_escape(tmp_path):
    """The folder name comes from training.common.safe_id (tested in tests/training/test_common.py)."""
    folder = rpt.report_dir(_ctx([], patient_id="../../etc"), tmp_path / "reports")
    assert folder.is_relative_to((tmp_path / "reports").resolve())
    assert re.fullmatch(r"[A-Za-z0-9_-]+", folder.parent.name) and ".." not in folder.parent.name
    assert rpt.report_dir(_ctx([], patient_id="PAT-001_a"), tmp_path / "reports").parent.name == "PAT-001_a"
    a_b = rpt.report_folder(tmp_path / "reports", "a/b", EXAM)
    assert a_b != rpt.report_folder(tmp_path / "reports", "a_b", EXAM)  # no folder shared by two patients
    for bad in ("", "   "):
        with pytest.raises(ValueError):
            rpt.report_folder(tmp_path / "reports", bad, EXAM)


@pytest.mark.skipif(not HAS_POPPLER, reason="poppler-utils (pdftotext) not installed")
@pytest.mark.parametrize("patient_id", [
    "HOSPITAL000012345678901234567890ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",  # 64 characters, the longest a name allows
    "HOSP-0000123456789-ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789-XYZ12",  # a DICOM Patient ID (LO: up to 64)
])
def test_a_long_patient_id_is_wrapped_in_the_header_never_cut(patient_id, tmp_path):
    """The header's Patient ID cell is 42 mm wide: an unbroken id of more than about 24 characters ran off the page,
    so the header showed a plausible but wrong id (found in a clinic-style check). Every character stays on the
    page, in order."""
    pdf = render_pdf(_ctx([_eye("R", 1, 0)], patient_id=patient_id), TEMPLATES, tmp_path / "out")
    page = subprocess.run(["pdftotext", "-bbox", "-f", "1", "-l", "1", str(pdf), "-"], check=True,
                          capture_output=True, text=True).stdout
    width = float(re.search(r'<page width="([0-9.]+)"', page).group(1))
    words = [(float(x0), float(y0), float(x1), html.unescape(w)) for x0, y0, x1, w in re.findall(
        r'<word xMin="([0-9.]+)" yMin="([0-9.]+)" xMax="([0-9.]+)" yMax="[0-9.]+">([^<]*)</word>', page)]
    assert max(x1 for _, _, x1, _ in words) <= width - 10  # nothing beyond the right margin
    start = next(i for i, w in enumerate(words) if w[3] == "ID")  # "Patient ID", then its value's pieces
    pieces = "".join(w[3] for w in words[start + 1:start + 8])
    assert pieces.startswith(patient_id), pieces


def test_html_escapes_user_strings_and_uses_file_uris(tmp_path):
    eye = _eye("R", 2, 1, tmp_path / "img", source_name='<script>alert("x")</script>.jpg')
    html = render_html(_ctx([eye], patient_id="<b>P1</b>"), TEMPLATES)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>P1</b>" not in html and "&lt;b&gt;P1&lt;/b&gt;" in html
    assert eye.photo_path.resolve().as_uri() in html
    for rgb in LESION_COLOURS.values():  # the legend's colours come from the one Python dict
        assert "#{:02x}{:02x}{:02x}".format(*rgb) in html


def test_a_report_loads_nothing_from_the_network(monkeypatch, tmp_path):
    """Patient data stays local: the report's fetcher refuses any URL but file: and data:, so even a remote
    picture or stylesheet in the HTML opens no connection (WeasyPrint catches fetch errors, hence the spy)."""
    import socket

    from weasyprint import HTML

    attempts = []

    def connect(*args, **kwargs):
        attempts.append(args)
        raise OSError("the test allows no connection")

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(ValueError, match="disallowed protocol"):
        rpt.local_fetcher().fetch("http://203.0.113.7/x.png")
    remote = ('<link rel="stylesheet" href="https://203.0.113.7/a.css"><p>x</p><img src="http://203.0.113.7/x.png">'
              '<img src="ftp://203.0.113.7/y.png">')
    assert HTML(string=remote, url_fetcher=rpt.local_fetcher()).write_pdf().startswith(b"%PDF")
    assert attempts == []
    made = []
    real = rpt.local_fetcher
    monkeypatch.setattr(rpt, "local_fetcher", lambda: made.append(1) or real())
    render_pdf(_ctx([_eye("R", 2, 1, tmp_path / "img")]), TEMPLATES, tmp_path / "reports")
    assert made and attempts == []  # render_pdf renders through it


# ------------------------------------------------------------------------------------------ rendered PDFs


@pytest.fixture(scope="module")
def demo_pdf(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("demo")
    right = dataclasses.replace(_eye("R", 2, 1, tmp / "img", source_name="<script>x</script>.jpg"),
                                device="<Topcon> TRC-NW400")  # from a DICOM file's tags: escaped like any user text
    eyes = [_eye("L", 4, 0, tmp / "img"), right]
    return render_pdf(_ctx(eyes, status="demo"), TEMPLATES, tmp / "reports")


def test_demo_report_pdf(demo_pdf, tmp_path):
    assert demo_pdf.name == "report_v1.pdf"
    assert demo_pdf.parent.name == EXAM.isoformat() and demo_pdf.parent.parent.name == "PAT-00123"
    assert (demo_pdf.parent / "latest.pdf").read_bytes() == demo_pdf.read_bytes()
    assert not [p for p in demo_pdf.parent.iterdir() if p.suffix == ".tmp"]

    pages = _pages_text(demo_pdf)
    assert 1 <= len(pages) <= 2, "two eyes must fit on two A4 pages"
    text = "\n".join(pages)
    for needle in ["PAT-00123", "2024-05-17", DR_GRADES[4], DR_GRADES[2], DME_GRADES[0], DME_GRADES[1],
                   "Urgent referral (proliferative DR)", "mt-resnet34 v1.3.0", "ab12cd34ef56", "0.812",
                   "Right eye", "Left eye", "<script>x</script>.jpg", "not replace an examination",
                   "Camera: <Topcon> TRC-NW400"]:  # the camera beside the photo's name
        assert _contains(text, needle), needle
    assert not re.search(r"([12])–dmerisk\1", _norm(text)), "the DME label repeats its number"
    for page in pages:  # the watermark is on every page
        assert _contains(page, "NOT FOR CLINICAL USE")
    assert _contains(text, DEMO_WATERMARK)
    assert "research model" not in text.lower()
    # the Right eye's section comes before the Left eye's, whatever the order of ctx.eyes
    assert _norm(text).index(_norm("<script>x</script>.jpg")) < _norm(text).index(_norm("L_fundus.jpg"))


def test_two_graded_eyes_keep_all_their_findings(tmp_path):
    """Each eye's section stays whole with its findings and lesion table: right eye on page 1, left eye on
    page 2 (two graded eyes do not fit on one page), with long file names and image-quality notes."""
    long_name = "camera-export_" + "x" * 60 + "_R.jpg"
    right = dataclasses.replace(_eye("R", 3, 2, tmp_path / "img", source_name=long_name), image_quality="slightly blurred",
                                lesion_areas={"MA": 0.0031, "HE": 0.0456, "EX": 0.0789, "SE": 0.0002, "OD": 0.0211})
    left = dataclasses.replace(_eye("L", 1, 0, tmp_path / "img"), image_quality="small pupil",
                               lesion_areas={"MA": 0.0007, "HE": 0.0, "EX": 0.0123, "SE": 0.0, "OD": 0.0199})
    pages = _pages_text(render_pdf(_ctx([left, right], status="research"), TEMPLATES, tmp_path / "reports"))
    assert len(pages) == 2
    areas = {"R": ["0.31%", "4.56%", "7.89%", "0.02%", "2.11%"], "L": ["0.07%", "1.23%", "1.99%"]}
    for page, eye, grade, quality in ((pages[0], "R", DR_GRADES[3], "slightly blurred"), (pages[1], "L", DR_GRADES[1], "small pupil")):
        for needle in ["Lesion area (% of fundus)", "Referable DR", "Confidence 92%", "Confidence 90%", grade, quality, *areas[eye]]:
            assert _contains(page, needle), (eye, needle)
    assert _contains(pages[0], long_name) and not _contains(pages[0], "1.23%")
    assert _contains(pages[1], "Grading model") and _contains(pages[1], "not replace an examination")


@pytest.mark.skipif(not HAS_POPPLER, reason="poppler-utils (pdftoppm, pdftotext) not installed")
def test_demo_report_rasterises_and_pdftotext_reads_it(demo_pdf, tmp_path):
    subprocess.run(["pdftoppm", "-r", "50", "-png", str(demo_pdf), str(tmp_path / "page")], check=True)
    pngs = sorted(tmp_path.glob("page-*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    img = cv2.imread(str(pngs[0]))
    assert img is not None and img.shape[0] > img.shape[1]  # portrait A4
    text = _pdftotext(demo_pdf)
    for needle in ["PAT-00123", "2024-05-17", "Proliferative DR", "DME risk", "Urgent referral", "mt-resnet34 v1.3.0"]:
        assert _contains(text, needle), needle


def test_the_model_section_names_the_models_that_checked_the_photos(tmp_path):
    """Each check model once, in the words and order of the report; a visit whose fields were checked by two
    versions of the laterality model lists both; a report of photos checked before this was recorded has no row."""
    right = dataclasses.replace(_eye("R", 1, 0), check_models={"gradability": "dr-quality-1 aaaa", "laterality": "dr-laterality-3 bbbb"})
    left = dataclasses.replace(_eye("L", 0, 0), check_models={"gradability": "dr-quality-1 aaaa", "laterality": "dr-laterality-3 cccc"})
    assert rpt.check_model_rows([right, left]) == [("Gradability model", "dr-quality-1 aaaa"),
                                                   ("Laterality model", "dr-laterality-3 bbbb; dr-laterality-3 cccc")]
    assert rpt.check_model_rows([_eye("R", 1, 0)]) == []
    assert rpt.check_model_rows([right, _eye("L", 0, 0)]) == [  # the left photo was checked before they were recorded
        ("Gradability model", "dr-quality-1 aaaa; not recorded for 1 photo"),
        ("Laterality model", "dr-laterality-3 bbbb; not recorded for 1 photo")]
    text = "\n".join(_pages_text(render_pdf(_ctx([right, left], status="research"), TEMPLATES, tmp_path / "reports")))
    assert _contains(text, "Laterality model") and _contains(text, "dr-laterality-3 bbbb; dr-laterality-3 cccc")
    assert _contains(text, "Gradability model") and _contains(text, "dr-quality-1 aaaa")
    assert _contains(text, "Grading model and photo checks")


def test_research_report_missing_eye_versions_and_evil_id(tmp_path):
    reports = tmp_path / "reports"
    ctx = _ctx([_eye("R", 1, 0, tmp_path / "img")], status="research", patient_id="../../etc")
    first = render_pdf(ctx, TEMPLATES, reports)
    # the malicious id stays inside the reports folder
    assert first.resolve().is_relative_to(reports.resolve())
    assert not (tmp_path / "etc").exists()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", first.parent.parent.name)

    text = "\n".join(_pages_text(first))
    assert _contains(text, RESEARCH_STATUS)
    assert "NOT FOR CLINICAL USE" not in text and "DEMO" not in text
    assert _contains(text, "Left eye") and _contains(text, "not received")
    assert _contains(text, "Rescreen in 12 months") and _contains(text, DR_GRADES[1])
    assert _contains(text, "../../etc")  # shown (escaped) as given, only the folder name is sanitised

    v1_bytes = first.read_bytes()
    with pytest.raises(ReportVersionTaken, match="report_v1.pdf exists"):  # same version again: v1 is never overwritten
        render_pdf(ctx, TEMPLATES, reports)
    assert first.read_bytes() == v1_bytes and (first.parent / "latest.pdf").read_bytes() == v1_bytes
    second = render_pdf(dataclasses.replace(ctx, report_version=2), TEMPLATES, reports)
    assert second.name == "report_v2.pdf" and first.name == "report_v1.pdf"
    assert first.read_bytes() == v1_bytes
    assert (second.parent / "latest.pdf").read_bytes() == second.read_bytes()
    assert _contains("\n".join(_pages_text(second)), "Report version 2")
    assert sorted(p.name for p in second.parent.iterdir()) == ["latest.pdf", "report_v1.pdf", "report_v2.pdf"]


# ---------------------------------------------------------------------------------------------- retries


def test_render_with_retries_retries_then_succeeds(monkeypatch, tmp_path):
    calls = []

    def flaky(ctx, templates_dir, reports_dir):
        calls.append(1)
        if len(calls) < 3:
            raise OSError("disk hiccup")
        return tmp_path / "ok.pdf"

    monkeypatch.setattr(rpt, "render_pdf", flaky)
    assert render_with_retries(_ctx([]), TEMPLATES, tmp_path, retries=3, delay=0) == tmp_path / "ok.pdf"
    assert len(calls) == 3


def test_render_with_retries_raises_report_error_naming_the_exam(monkeypatch, tmp_path):
    calls = []

    def broken(ctx, templates_dir, reports_dir):
        calls.append(1)
        raise RuntimeError("weasyprint exploded")

    monkeypatch.setattr(rpt, "render_pdf", broken)
    with pytest.raises(ReportError, match=r"PAT-00123.*2024-05-17.*weasyprint exploded") as exc:
        render_with_retries(_ctx([]), TEMPLATES, tmp_path, retries=3, delay=0)
    assert len(calls) == 3 and isinstance(exc.value.__cause__, RuntimeError)

    monkeypatch.undo()
    with pytest.raises(ReportError, match="empty"):  # invalid input fails at once, without retries
        render_with_retries(_ctx([], patient_id="  "), TEMPLATES, tmp_path, retries=3, delay=0)


def test_a_taken_version_is_not_retried(monkeypatch, tmp_path):
    calls = []

    def taken(ctx, templates_dir, reports_dir):
        calls.append(1)
        raise ReportVersionTaken("report_v1.pdf exists already")

    monkeypatch.setattr(rpt, "render_pdf", taken)
    with pytest.raises(ReportError, match="report_v1.pdf exists"):
        render_with_retries(_ctx([]), TEMPLATES, tmp_path, retries=3, delay=0)
    assert len(calls) == 1


def test_referable_score_above_threshold_escalates_a_low_grade_eye():
    """The operating threshold (chosen for sensitivity) refers an eye whose most likely grade is mild."""
    from dataclasses import replace

    mild = replace(_eye("R", 1, 0), referable=True, referable_score=0.61)
    ref = referral_recommendation([mild, _eye("L", 0, 0)])
    assert ref.level == "routine"
    assert "above the screening threshold" in ref.reason and "61.0%" in ref.reason
    assert referral_recommendation([_eye("R", 1, 0)]).level == "rescreen_12"


def test_a_referral_on_the_score_alone_says_the_threshold_is_sensitivity_first():
    """DR 0 and referred (P(referable) 33% over a 15% threshold): the report must not claim moderate DR or macular
    oedema, and says why (the operating point was chosen on validation for sensitivity), with the numbers."""
    from dataclasses import replace

    dr0 = replace(_eye("R", 0, 0), referable=True, referable_score=0.33)
    ref = referral_recommendation([dr0, _eye("L", 0, 0)])
    assert ref.level == "routine" and ref.on_score and "moderate non-proliferative" not in ref.advice
    assert not referral_recommendation([_eye("R", 2, 0), dr0]).on_score  # a grade asks for it: the usual advice
    ctx = replace(_ctx([dr0, _eye("L", 0, 0)]), model_metrics={"Referral threshold": 0.151,
                                                               "Threshold's target sensitivity (validation)": 0.9})
    text = " ".join(render_html(ctx, TEMPLATES).split())
    assert "the screening threshold (15.1%) is sensitivity-first" in text and "at least 90% of eyes" in text
    assert "(model score 33.0%; referral threshold 15.1%)" in text
    near = replace(ctx, eyes=[replace(dr0, referable_score=0.157), _eye("L", 0, 0)])  # both read "16%" to the unit
    assert "(model score 15.7%; referral threshold 15.1%)" in " ".join(render_html(near, TEMPLATES).split())
    assert "sensitivity-first" not in " ".join(render_html(_ctx([_eye("R", 0, 0)]), TEMPLATES).split())


def test_a_lesion_the_model_cannot_detect_is_not_assessed_rather_than_zero() -> None:
    """The shipped model's microaneurysm map is empty on every photo (test AUPR 0.000): "Microaneurysms (MA): 0%"
    on a grade-3 eye read as "none seen". A lesion below the AUPR floor is "not assessed", with the reason."""
    from dataclasses import replace

    from screening.report import model_metrics_for_report, undetected_lesions, with_undetected

    meta = {"thresholds": {"referable": 0.2}, "metrics": {"test": {"MA AUPR": 0.0004, "HE AUPR": 0.287, "EX AUPR": 0.571,
                                                                   "SE AUPR": 0.053, "OD Dice": 0.951}}}
    metrics = model_metrics_for_report(meta)
    assert metrics["Test MA AUPR"] == 0.0 and metrics["Test HE AUPR"] == 0.287 and "Test OD AUPR" not in metrics
    assert undetected_lesions(metrics) == ("MA", "SE")
    assert undetected_lesions({}) == ()  # metrics unknown (the checkpoint is gone): nothing claimed either way
    marked = with_undetected(_eye("R", 3, 0), metrics)
    assert marked.lesions_not_detected == ("MA", "SE") and with_undetected(_ungradable("L"), metrics).lesions_not_detected == ()
    text = " ".join(render_html(replace(_ctx([marked]), model_metrics=metrics), TEMPLATES).split())
    assert "Microaneurysms (MA): <span class=\"value\">not assessed*</span>" in text
    assert "Soft exudates (SE): <span class=\"value\">not assessed*</span>" in text
    assert "Haemorrhages (HE): <span class=\"value\">0.40%</span>" in text  # a lesion it detects keeps its area
    assert "* Not reliably detected by this model (test AUPR below 0.10): none found does not mean none present." in text
    assert 'Test lesion AUPR: <span class="value">MA 0.000 · HE 0.287 · EX 0.571 · SE 0.053</span>' in text  # one row
    plain = " ".join(render_html(_ctx([_eye("R", 3, 0)]), TEMPLATES).split())
    assert "not assessed" not in plain and "Microaneurysms (MA): <span class=\"value\">0.12%</span>" in plain
    # each photo by the model that graded it: a field graded by a model that detects microaneurysms keeps its area
    both = " ".join(render_html(replace(_ctx([marked, _eye("L", 2, 0)]), model_metrics=metrics), TEMPLATES).split())
    assert both.count("Microaneurysms (MA): <span class=\"value\">not assessed*</span>") == 1
    assert both.count("Microaneurysms (MA): <span class=\"value\">0.12%</span>") == 1


def test_the_grad_cam_caption_says_how_much_of_the_grade_the_maps_explain() -> None:
    """A blended model (v2.1) was captioned as if a regression made the whole grade: each kind now has its own words."""
    from dataclasses import replace

    from screening.report import grade_source

    def caption(meta: dict) -> str:
        ctx = replace(_ctx([_eye("R", 0, 0)]), model_metrics={"Grades from": grade_source(meta)})
        return " ".join(render_html(ctx, TEMPLATES).split())

    heads = {"model_config": {"grade_inputs": "features+lesions"}}
    assert "regression on measured lesion evidence" not in caption(heads)
    assert "the grades themselves come from a regression" in caption({"grader": {}})
    blended = caption({"grader": {"heads_weight": 0.6}})
    assert "part of each grade" in blended and "the grades themselves" not in blended


def test_stylesheet_is_parsed_once_yet_applied_and_reloaded_when_it_changes(tmp_path: Path) -> None:
    """render_pdf hands WeasyPrint a cached, parsed report.css instead of a <link>: the style must still
    apply, and an edited stylesheet must be picked up."""
    pypdf = pytest.importorskip("pypdf")
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    assert "<link" not in render_html(_ctx([_eye("R", 1, 0)]), templates, link_stylesheet=False)
    ctx = _ctx([_eye("R", 1, 0, tmp_path / "img")])

    def page_mm(pdf: Path) -> tuple[int, int]:
        box = pypdf.PdfReader(str(pdf)).pages[0].mediabox
        return round(float(box.width) * 25.4 / 72), round(float(box.height) * 25.4 / 72)

    css = templates / "report.css"
    css.write_text(css.read_text().replace("size: A4;", "size: 150mm 200mm;", 1))
    assert page_mm(render_pdf(ctx, templates, tmp_path / "out")) == (150, 200)  # not WeasyPrint's default A4
    css.write_text(css.read_text().replace("size: 150mm 200mm;", "size: A5;", 1) + "\n/* edited */\n")
    assert page_mm(render_pdf(dataclasses.replace(ctx, report_version=2), templates, tmp_path / "out")) == (148, 210)


# ------------------------------------------------------------------------------- ungradable eyes, laterality


def _ungradable(eye: str, folder: Path | None = None, *reasons: str) -> EyeFinding:
    imgs = _images(folder, eye) if folder is not None else {}
    return EyeFinding(
        eye=eye, source_name=f"{eye}_dark.jpg", photo_path=imgs.get("photo"), overlay_path=None, dr_cam_path=None,
        dme_cam_path=None, dr_grade=None, dr_probs=None, dme_grade=None, dme_probs=None, referable_score=None,
        referable=None, gradable=False,
        ungradable_reasons=reasons or ("too dark (under-exposed): raise the flash or exposure",),
    )


@pytest.mark.parametrize(("rule", "level", "text"), [
    ("recall", "ungradable", "Recall: ungradable image"),
    ("refer", "refer_ungradable", "Refer: ungradable photographs"),
])
def test_an_ungradable_eye_recalls_or_refers_the_patient_by_rule(rule, level, text):
    ref = referral_recommendation([_eye("R", 0, 0), _ungradable("L")], rule)
    assert (ref.level, ref.text) == (level, text)
    assert ref.reason == "Left eye: ungradable, too dark (under-exposed)"


def test_an_ungradable_eye_never_hides_a_referral_from_the_other_eye():
    for rule in ("recall", "refer"):
        assert referral_recommendation([_eye("R", 4, 0), _ungradable("L")], rule).level == "urgent"
        assert referral_recommendation([_eye("R", 2, 0), _ungradable("L")], rule).level == "routine"
    assert referral_recommendation([_eye("R", 1, 0), _ungradable("L")], "recall").level == "ungradable"


def _next_steps(ctx) -> list[str]:
    page = render_html(ctx, TEMPLATES)
    return [" ".join(html.unescape(m).split()) for m in re.findall(r'<p class="ungradable-next">Next step: (.*?)</p>', page, re.S)]


def test_an_ungradable_photos_next_step_follows_the_visits_recommendation():
    """Each ungradable section gave its own eye's advice: 'recall the patient for new photographs' under a referral
    for the other eye, and under an ungradable field whose eye a gradable retake had graded (clinic-style check)."""
    [step] = _next_steps(_ctx([_eye("R", 3, 0), _ungradable("L")]))
    assert step.startswith('the recommendation above ("Refer within weeks (severe non-proliferative DR)") comes first')
    assert "recall the patient" not in step
    [step] = _next_steps(_ctx([_eye("R", 0, 0), _ungradable("L")]))  # the ungradable eye decides: its advice
    assert step == rpt.REFERRAL_LEVELS["ungradable"].advice
    [step] = _next_steps(_ctx([_ungradable("L"), _eye("L", 0, 0), _eye("R", 0, 0)]))  # field 1; the retake graded
    assert step == "none for this photograph: the eye's result is field 2's."
    # a reviewed version follows the grader's recommendation, not the model's it replaced (review finding)
    overturned = _review(referral="ungradable", eyes=(rpt.EyeReview("R", True, 0, 0), rpt.EyeReview("L", False, None, None)))
    [step] = _next_steps(dataclasses.replace(_ctx([_eye("R", 3, 0), _ungradable("L")]), review=overturned))
    assert step == rpt.REFERRAL_LEVELS["ungradable"].advice  # the grader's recall stands: no "Refer within weeks"
    graded = _review(referral="soon", eyes=(rpt.EyeReview("R", True, 0, 0), rpt.EyeReview("L", True, 3, 0)))
    [step] = _next_steps(dataclasses.replace(_ctx([_eye("R", 0, 0), _ungradable("L")]), review=graded))
    assert step.startswith("none for this photograph: the grader graded this eye")
    refer = dataclasses.replace(_ctx([_ungradable("R")]), ungradable_rule="refer")
    [step] = _next_steps(refer)  # the programme refers instead of recalling: no "recapture was not enough"
    assert step == rpt.REFERRAL_LEVELS["refer_ungradable"].advice and "instead of recalling" in step


def test_an_ungradable_finding_has_reasons_and_no_grades():
    with pytest.raises(ValueError, match="reasons"):
        dataclasses.replace(_ungradable("R"), ungradable_reasons=())
    with pytest.raises(ValueError, match="no grades"):
        dataclasses.replace(_ungradable("R"), dr_grade=2)
    with pytest.raises(ValueError, match="needs its grades"):
        dataclasses.replace(_eye("R", 0, 0), dr_grade=None)
    with pytest.raises(ValueError, match="ungradable"):
        _ = _ungradable("R").dr_name


def test_report_says_ungradable_recapture_with_the_reasons_and_no_grade(tmp_path):
    reasons = ("blurred (out of focus or moved): refocus, ask the patient to keep still",
               "hazy, low contrast (media opacity such as cataract, or a dirty lens): clean the lens")
    ctx = dataclasses.replace(_ctx([_eye("R", 0, 0, tmp_path), _ungradable("L", tmp_path, *reasons)], status="research"),
                              ungradable_rule="recall")
    html = render_html(ctx, TEMPLATES)
    assert html.count("Ungradable: recapture") >= 2 and "Recall: ungradable image" in html  # summary row, eye section; recommendation
    assert "refocus, ask the patient to keep still" in html and "clean the lens" in html
    assert "no retinopathy grade is given for it" in html
    text = " ".join(_pages_text(render_pdf(ctx, TEMPLATES, tmp_path / "reports")))
    assert "Ungradable: recapture" in text and "recall the patient for new photographs" in text
    assert "Left eye: ungradable, blurred (out of focus or moved), hazy, low contrast" in text  # the reason line
    assert len(re.findall(r"Confidence \d", text)) == 2  # the right eye's DR and DME confidences; the left eye has none


def test_a_laterality_note_is_shown_escaped(tmp_path):
    note = "Laterality mismatch: the file name says right eye, but the photo looks like a <left> eye"
    html = render_html(_ctx([dataclasses.replace(_eye("R", 0, 0), eye_note=note, eye_mismatch=True)]), TEMPLATES)
    assert "Laterality mismatch: the file name says right eye" in html and "&lt;left&gt;" in html
    assert '<p class="eye-note">Laterality mismatch' in html  # a warning
    unsure = "Eye not confirmed by the photo: it looks like a left eye (...), too uncertain to check the label. Filed under the right eye the file name states."
    html = render_html(_ctx([dataclasses.replace(_eye("R", 0, 0), eye_note=unsure)]), TEMPLATES)
    assert '<p class="eye-info">Eye not confirmed by the photo' in html  # information, not an alarm


def test_the_recommendation_box_says_when_an_eye_is_missing_or_its_label_in_doubt(tmp_path):
    """Said only in the eye's own section, a missing eye left 'Rescreen in 12-24 months' reading like a whole visit's
    outcome, and a laterality mismatch left the outcome silent about resting on a label (clinic-style check)."""
    one = _ctx([_eye("R", 0, 0)])
    assert [c.note for c in rpt.visit_cautions(one.eyes)] == ["left eye missing"]
    assert rpt.visit_cautions(_ctx([_eye("R", 0, 0), _eye("L", 0, 0)]).eyes) == []
    html = render_html(one, TEMPLATES)
    box = html.split('class="referral"')[1].split("</section>")[0]
    assert "Incomplete visit: no photograph of the left eye was graded (none received, or refused)" in box and "covers the right eye only" in box

    doubted = dataclasses.replace(_eye("L", 2, 0, source_name="<x>_L.jpg"), eye_mismatch=True,
                                  eye_note="Laterality mismatch: the file name says left eye, but the photo looks like a right eye.")
    ctx = _ctx([_eye("R", 0, 0), doubted])
    assert len(rpt.visit_cautions([*ctx.eyes, dataclasses.replace(doubted, source_name="L2.jpg")])) == 1  # once an eye
    [caution] = rpt.visit_cautions(ctx.eyes)
    assert caution.note == "left eye: label in doubt" and "(<x>_L.jpg) looks like the other eye" in caution.text
    # on the PDF the doubted eye's summary row is tagged (its section says why): a line in the box pushed a
    # reviewed two-eye report onto a third page
    for version in (ctx, dataclasses.replace(ctx, review=_review())):
        page = render_html(version, TEMPLATES)
        summary = page.split('class="summary"')[1].split("</table>")[0]
        rows = {r.split("</td>")[0]: r for r in summary.split("<tr>")[2:]}
        [left] = [r for k, r in rows.items() if "Left eye" in k]
        [right] = [r for k, r in rows.items() if "Right eye" in k]
        assert "label in doubt" in left and "label in doubt" not in right
    pages = _pages_text(render_pdf(dataclasses.replace(ctx, review=_review()), TEMPLATES, tmp_path / "out"))
    assert len(pages) == 2  # the reviewed two-eye report keeps its two pages


def test_two_different_photographs_under_one_name_are_said_in_the_box():
    """A corrected photo sent again under the same name was added as a second field beside the first, both labelled
    with the one name, and nothing said so (an IT-style hardening check)."""
    first, again = _eye("R", 0, 0, source_name="EPN1_R_20261202.jpg"), _eye("R", 3, 0, source_name="EPN1_R_20261202.jpg")
    ctx = _ctx([first, again, _eye("L", 0, 0)])
    [caution] = rpt.visit_cautions(ctx.eyes)
    assert caution.note == "same name twice" and "2 different photographs arrived under the same name EPN1_R_20261202.jpg" in caution.text
    box = render_html(ctx, TEMPLATES).split('class="referral"')[1].split("</section>")[0]
    assert "sent again is graded as another field beside the first" in box
    assert rpt.visit_cautions(_ctx([first, _eye("R", 3, 0, source_name="EPN1_R_20261202_2.jpg"), _eye("L", 0, 0)]).eyes) == []
    # a name without an eye may serve both eyes (the eye read from each photo): not the same photograph sent again
    assert rpt.visit_cautions(_ctx([_eye("R", 0, 0, source_name="P17.jpg"), _eye("L", 0, 0, source_name="P17.jpg")]).eyes) == []


def test_grades_that_contradict_each_other_are_said_in_the_box(tmp_path):
    """EyePACS patient 16 (graders: DR 4 in both eyes) was graded DR 0 with DME risk 2 and sent on as a routine
    referral with nothing saying the two answers cannot both be right (exudates are retinopathy)."""
    ctx = _ctx([_eye("R", 0, 2, source_name="EP16_R.jpg"), _eye("L", 2, 1)])
    [caution] = rpt.visit_cautions(ctx.eyes)
    assert caution.kind == "contradiction" and caution.note == "right eye: grades disagree"
    assert "(EP16_R.jpg) contradict each other" in caution.text and "DME risk of 2" in caution.text
    pages = _pages_text(render_pdf(ctx, TEMPLATES, tmp_path / "out"))
    assert _contains(pages[0], "a grader must look at this eye") and len(pages) == 2
    assert rpt.visit_cautions(_ctx([_eye("R", 1, 1), _eye("L", 0, 0)]).eyes) == []  # mild DR with exudates: possible
    # another field of the eye gives its result (DR 3, the worst): that result is not contradictory
    assert rpt.visit_cautions([_eye("R", 0, 2), _eye("R", 3, 0, source_name="R2.jpg"), _eye("L", 2, 1)]) == []
    # a signed version: the grader answered for the eye; the box does not repeat the caution, two pages kept
    both = _ctx([_eye("R", 0, 2), _eye("L", 0, 1)])
    signed = dataclasses.replace(both, review=_review(eyes=(rpt.EyeReview("R", True, 4, 2), rpt.EyeReview("L", True, 2, 1))))
    pages = _pages_text(render_pdf(signed, TEMPLATES, tmp_path / "signed"))
    assert not _contains(" ".join(pages), "a grader must look at this eye") and len(pages) == 2


# ------------------------------------------------------------------------------------------ reviewed version


def _review(**kw) -> rpt.ReviewNote:
    values = dict(reviewer="Dr <i>Grey</i>", reviewed_at=datetime(2024, 5, 20, 9, 15, tzinfo=timezone.utc),
                  outcome="corrected", referral="soon",
                  eyes=(rpt.EyeReview("R", True, 3, 0), rpt.EyeReview("L", False, None, None)), comment="beading <b>here</b>")
    values.update(kw)
    return rpt.ReviewNote(**values)


def test_review_note_refuses_inconsistent_answers():
    with pytest.raises(ValueError, match="ungradable eye has no DR grade"):
        rpt.EyeReview("R", False, 2, None)
    with pytest.raises(ValueError, match="DME risk must be 0..2"):
        rpt.EyeReview("L", True, 2, 3)
    with pytest.raises(ValueError, match="unknown referral"):
        _review(referral="later")
    with pytest.raises(ValueError, match="reviewer name is empty"):
        _review(reviewer="  ")


def test_reviewed_report_shows_the_sign_off_beside_the_models_answers(tmp_path):
    eyes = [_eye("R", 1, 0, tmp_path / "img"), _eye("L", 2, 1, tmp_path / "img")]
    html = render_html(dataclasses.replace(_ctx(eyes), review=_review()), TEMPLATES)
    assert "<i>Grey</i>" not in html and "&lt;i&gt;Grey&lt;/i&gt;" in html and "&lt;b&gt;here&lt;/b&gt;" in html

    pdf = render_pdf(dataclasses.replace(_ctx(eyes, status="research"), review=_review()), TEMPLATES, tmp_path / "reports")
    pages = _pages_text(pdf)
    assert len(pages) == 2, "the sign-off must not push a two-eye report onto a third page"
    text = "\n".join(pages)
    for needle in ["Clinician sign-off", "Reviewed by Dr <i>Grey</i> on 2024-05-20 09:15 UTC", "corrected the automated grading",
                   "Refer within weeks (severe non-proliferative DR)", "Comment: beading <b>here</b>",
                   # the model's own answers stay visible next to the grader's
                   "Model's recommendation (changed at sign-off): Refer to ophthalmology (routine)",
                   f"1 – {DR_GRADES[1]}", f"Grader: 3 – {DR_GRADES[3]} (corrected)", "Grader: ungradable",
                   f"2 – {DR_GRADES[2]}", "Grader: agrees"]:
        assert _contains(text, needle), needle
    for page in pages:  # the running footer says it on every page
        assert _contains(page, "Reviewed by Dr <i>Grey</i> on 2024-05-20")


def test_confirmed_review_says_confirmed_and_draft_has_no_sign_off(tmp_path):
    eyes = [_eye("R", 2, 0)]
    note = _review(outcome="confirmed", referral="routine", eyes=(rpt.EyeReview("R", True, 2, 0),), comment=None)
    html = render_html(dataclasses.replace(_ctx(eyes), review=note), TEMPLATES)
    assert "confirmed</strong> the automated grading" in html and "(corrected)" not in html
    assert "changed at sign-off" not in html and "Comment:" not in html
    draft = render_html(_ctx(eyes), TEMPLATES)
    assert "Clinician sign-off" not in draft and "Reviewed by" not in draft and "Grader:" not in draft


def test_a_sign_off_referring_above_what_its_grades_imply_says_why_not_the_levels_generic_reason():
    """A grader confirmed DR 0 / DME 0 with the model's score-based routine referral: the box read "Routine referral
    for moderate non-proliferative DR and/or possible diabetic macular oedema" (a staff-style check)."""
    eyes = [_eye("R", 0, 0)]
    confirmed = _review(outcome="confirmed", referral="routine", eyes=(rpt.EyeReview("R", True, 0, 0),), comment=None,
                        implied="rescreen_12")
    html = render_html(dataclasses.replace(_ctx(eyes), review=confirmed), TEMPLATES)
    assert ("Referred although the grades recorded alone would imply &#39;" in html
            and "the model&#39;s referable-DR score was over the screening threshold." in html)
    assert rpt.REFERRAL_LEVELS["routine"].advice not in html.split("Clinician sign-off")[1].split("Model")[0]
    chosen = dataclasses.replace(confirmed, outcome="corrected", referral="soon")
    assert "the grader chose it." in render_html(dataclasses.replace(_ctx(eyes), review=chosen), TEMPLATES)
    implied = dataclasses.replace(confirmed, implied="routine")  # the grades themselves refer: the level's own advice
    html = render_html(dataclasses.replace(_ctx(eyes), review=implied), TEMPLATES)
    assert "Referred although" not in html


def test_an_eyes_result_is_a_gradable_field_before_an_ungradable_one():
    graded, dark, blurred = _eye("R", 1, 0), _ungradable("R"), _ungradable("R", None, "blurred (out of focus)")
    for rule in ("worst", "latest"):
        assert rpt.eye_result([graded, dark], rule) is graded  # an ungradable recapture does not undo a grade
        assert rpt.eye_result([dark, graded], rule) is graded
        assert rpt.eye_result([dark, blurred], rule) is blurred  # all ungradable: the latest stands for the eye
    with pytest.raises(ValueError, match="unknown eye result rule"):
        rpt.eye_result([graded], "best")  # type: ignore[arg-type]


def test_several_fields_with_an_ungradable_one_show_both_and_grade_from_the_gradable(tmp_path):
    ctx = _ctx([_ungradable("R", tmp_path), _eye("R", 2, 0, tmp_path), _eye("L", 0, 0, tmp_path)])
    html = render_html(ctx, TEMPLATES)
    assert "2 fields; result from field 2" in html and "Ungradable: recapture" in html
    assert "Refer to ophthalmology (routine)" in html  # the graded field's moderate DR decides, not the recall


def test_a_reviewed_report_shows_the_grader_beside_an_ungradable_eye(tmp_path):
    note = _review(outcome="confirmed", referral="ungradable", comment=None,
                   eyes=(rpt.EyeReview("R", True, 0, 0), rpt.EyeReview("L", False, None, None)))
    ctx = dataclasses.replace(_ctx([_eye("R", 0, 0), _ungradable("L")]), review=note)
    html = render_html(ctx, TEMPLATES)
    assert "Grader: ungradable (agrees)" in html and "Recall: ungradable image" in html
    regraded = _review(referral="routine", eyes=(rpt.EyeReview("R", True, 0, 0), rpt.EyeReview("L", True, 2, 0)))
    html = render_html(dataclasses.replace(ctx, review=regraded), TEMPLATES)
    assert f"graded it: DR 2 – {DR_GRADES[2]}" in html and "DR 2, DME 0 (graded)" in html
