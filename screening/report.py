"""Per-visit PDF reports: one A4 report per patient exam, rendered from a Jinja2 template with WeasyPrint.

Public API
----------
- :class:`EyeFinding` (one photograph of one eye: a field), :class:`ReportContext`: what the worker hands over
  (validated on construction). An eye may have several fields (e.g. macula-centred and disc-centred): every one
  is shown, and the eye's result is chosen from them by :func:`eye_result` (:data:`EYE_RESULT_RULES`).
- :class:`ReviewNote`, :class:`EyeReview`: a clinician's sign-off, printed beside the model's answers on a reviewed version.
- :data:`LESION_COLOURS` (``screening.legend.LESION_COLOURS_RGB``), :data:`LESION_LABELS`: legend colours and names.
- :func:`referral_recommendation`: the worse-eye referral rule (one table, :data:`REFERRAL_LEVELS`), applied to
  each eye's result.
- :func:`report_folder`, :func:`existing_versions`: where an exam's reports go and which versions are there.
- :func:`render_html`, :func:`render_pdf`, :func:`render_with_retries`; :class:`ReportError`,
  :class:`ReportVersionTaken`.

Files are written as ``reports_dir/<safe patient id>/<exam date ISO>/report_v<N>.pdf``
(:func:`training.common.safe_id` makes the folder name); ``latest.pdf`` beside them is a copy of the newest
one. N is ``ReportContext.report_version``, decided by the caller (the worker's report stage, from the
database, the reports on their way and the files on disk); this module only publishes it, and never
over an earlier report. Every file is published atomically (:func:`training.common.atomic_write`), so a
reader never sees a half-written PDF.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, Sequence

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from screening.legend import LESION_COLOURS_RGB
from training.common import DME_GRADES, DR_GRADES, LESION_CODES, LESION_NAMES, atomic_write_bytes, safe_id

log = logging.getLogger(__name__)

TEMPLATE_NAME = "report.html.j2"
DEMO_WATERMARK = "DEMO MODEL \u2014 NOT FOR CLINICAL USE"
RESEARCH_STATUS = "research model, not clinically validated"

# Overlay colours (RGB): the very dict screening.explain draws the lesion overlay with, so the legend always
# matches the picture. MA red, HE maroon, EX yellow, SE light blue, OD green.
LESION_COLOURS: dict[str, tuple[int, int, int]] = LESION_COLOURS_RGB
LESION_LABELS: dict[str, str] = LESION_NAMES
if not tuple(LESION_COLOURS) == tuple(LESION_LABELS) == LESION_CODES:
    raise ImportError(f"lesion colour/label tables {tuple(LESION_COLOURS)} out of sync with the model's {LESION_CODES}")

EYE_NAMES = {"R": "Right eye", "L": "Left eye"}
EYE_ORDER = ("R", "L")

EyeResultRule = Literal["worst", "latest"]
UngradableRule = Literal["recall", "refer"]  # what an ungradable eye asks for ([screening] ungradable_rule)
EYE_RESULT_RULES: dict[str, str] = {  # rule -> how the report states it
    "worst": "its worst gradable field",
    "latest": "its latest gradable field",
}


class ReportError(RuntimeError):
    """Rendering a report failed (after all retries); the message names the patient and the exam."""


class ReportVersionTaken(FileExistsError):
    """The report file of the requested version exists already: it is never overwritten. Not retried;
    the caller decides a new version (the worker's catch-up does, seeing the file on disk)."""


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EyeFinding:
    """The grading of one photograph (one field) of one eye. An ungradable photo (``gradable`` False) has no
    grades (``None``) and says why in ``ungradable_reasons`` (what staff read, one sentence per reason)."""

    eye: Literal["R", "L"]
    source_name: str  # the uploaded file's name: shown (escaped), never used as a path
    photo_path: Path | None
    overlay_path: Path | None
    dr_cam_path: Path | None
    dme_cam_path: Path | None
    dr_grade: int | None
    dr_probs: Sequence[float] | None  # 5 ICDR class probabilities
    dme_grade: int | None
    dme_probs: Sequence[float] | None  # 3 IDRiD DME risk probabilities
    referable_score: float | None
    referable: bool | None
    lesion_areas: dict[str, float] = field(default_factory=dict)  # code -> fraction of the fundus, 0..1
    image_quality: str | None = None
    gradable: bool = True
    ungradable_reasons: tuple[str, ...] = ()
    eye_note: str | None = None  # the laterality check's note (a mismatch, an eye not confirmed or read from the photo)
    eye_mismatch: bool = False  # the note is a mismatch (shown as a warning; the other notes as information)
    filing_note: str | None = None  # a person moved the photo into this visit (`dr-screen review move`): who, when, why
    mask_folder: Path | None = None  # the lesion masks at the photo's own size (TIFF), for image viewers
    # lesions the model that graded this photo does not reliably detect (:func:`undetected_lesions` of its metrics;
    # empty when that model is unknown): shown as "not assessed", not as an area
    lesions_not_detected: tuple[str, ...] = ()
    # the models that checked this photo's gradability and eye ("gradability" / "laterality" -> format and SHA-256
    # prefix, images.check_models; empty for photos checked before they were recorded)
    check_models: Mapping[str, str] = field(default_factory=dict)
    device: str | None = None  # the camera (DICOM manufacturer and model), when the file named it

    def __post_init__(self) -> None:
        if self.eye not in EYE_NAMES:
            raise ValueError(f"eye must be 'R' or 'L', got {self.eye!r}")
        if not self.gradable:
            if not self.ungradable_reasons:
                raise ValueError("an ungradable eye needs its reasons (ungradable_reasons)")
            if any(v is not None for v in (self.dr_grade, self.dme_grade, self.referable)):
                raise ValueError("an ungradable eye has no grades: pass None for dr_grade, dme_grade and referable")
            return
        if self.dr_grade is None or self.dme_grade is None or self.dr_probs is None or self.dme_probs is None \
                or self.referable_score is None or self.referable is None:
            raise ValueError("a gradable eye needs its grades, probabilities and referral score")
        if not 0 <= int(self.dr_grade) < len(DR_GRADES):
            raise ValueError(f"dr_grade must be 0..{len(DR_GRADES) - 1}, got {self.dr_grade!r}")
        if not 0 <= int(self.dme_grade) < len(DME_GRADES):
            raise ValueError(f"dme_grade must be 0..{len(DME_GRADES) - 1}, got {self.dme_grade!r}")
        if len(self.dr_probs) != len(DR_GRADES):
            raise ValueError(f"dr_probs needs {len(DR_GRADES)} values, got {len(self.dr_probs)}")
        if len(self.dme_probs) != len(DME_GRADES):
            raise ValueError(f"dme_probs needs {len(DME_GRADES)} values, got {len(self.dme_probs)}")
        unknown = set(self.lesion_areas) - set(LESION_CODES)
        if unknown:
            raise ValueError(f"unknown lesion codes {sorted(unknown)}; expected some of {LESION_CODES}")

    @property
    def eye_name(self) -> str:
        return EYE_NAMES[self.eye]

    def _graded(self) -> tuple[int, Sequence[float], int, Sequence[float]]:
        if self.dr_grade is None or self.dr_probs is None or self.dme_grade is None or self.dme_probs is None:
            raise ValueError(f"{self.eye_name} is ungradable: it has no grades")
        return self.dr_grade, self.dr_probs, self.dme_grade, self.dme_probs

    @property
    def dr_name(self) -> str:
        return DR_GRADES[self._graded()[0]]

    @property
    def dme_name(self) -> str:
        return DME_GRADES[self._graded()[2]]

    @property
    def dr_confidence(self) -> float:
        grade, probs, _, _ = self._graded()
        return float(probs[grade])

    @property
    def dme_confidence(self) -> float:
        _, _, grade, probs = self._graded()
        return float(probs[grade])

    @property
    def short_reasons(self) -> str:
        """The ungradable reasons without their advice: "too dark (under-exposed), blurred (...)"."""
        return ", ".join(r.split(":")[0] for r in self.ungradable_reasons)


@dataclass(frozen=True)
class EyeReview:
    """The grader's answer for one eye: gradable or not, and if gradable the DR grade and DME risk."""

    eye: Literal["R", "L"]
    gradable: bool
    dr_grade: int | None
    dme_grade: int | None

    def __post_init__(self) -> None:
        if self.eye not in EYE_NAMES:
            raise ValueError(f"eye must be 'R' or 'L', got {self.eye!r}")
        if not self.gradable:
            if self.dr_grade is not None or self.dme_grade is not None:
                raise ValueError(f"{EYE_NAMES[self.eye]}: an ungradable eye has no DR grade or DME risk")
            return
        if self.dr_grade is None or not 0 <= int(self.dr_grade) < len(DR_GRADES):
            raise ValueError(f"{EYE_NAMES[self.eye]}: DR grade must be 0..{len(DR_GRADES) - 1}, got {self.dr_grade!r}")
        if self.dme_grade is None or not 0 <= int(self.dme_grade) < len(DME_GRADES):
            raise ValueError(f"{EYE_NAMES[self.eye]}: DME risk must be 0..{len(DME_GRADES) - 1}, got {self.dme_grade!r}")


@dataclass(frozen=True)
class ReviewNote:
    """A clinician's sign-off of the visit: printed on the reviewed version, beside (never instead of) the
    model's answers, so that a reader sees both what the software said and what the grader decided."""

    reviewer: str
    reviewed_at: datetime
    outcome: Literal["confirmed", "corrected"]
    referral: str  # the grader's referral outcome, a key of REFERRAL_LEVELS
    eyes: tuple[EyeReview, ...]
    comment: str | None = None
    # the referral the grader's grades alone imply (a key of REFERRAL_LEVELS; None: not known): when the sign-off's
    # referral is more urgent, its box says why instead of the level's generic advice
    implied: str | None = None

    def __post_init__(self) -> None:
        if not self.reviewer.strip():
            raise ValueError("reviewer name is empty")
        if self.outcome not in ("confirmed", "corrected"):
            raise ValueError(f"outcome must be 'confirmed' or 'corrected', got {self.outcome!r}")
        if self.referral not in REFERRAL_LEVELS:
            raise ValueError(f"unknown referral {self.referral!r}; expected one of {list(REFERRAL_LEVELS)}")

    def eye(self, code: str) -> EyeReview | None:
        return next((e for e in self.eyes if e.eye == code), None)


@dataclass(frozen=True)
class ReportContext:
    clinic_name: str
    patient_id: str
    exam_date: date
    eyes: list[EyeFinding]
    model_version: str
    checkpoint_sha256: str
    model_status: Literal["research", "demo"]
    model_metrics: dict[str, float | str]
    generated_at: datetime
    report_version: int = 1
    eye_result_rule: EyeResultRule = "worst"
    review: ReviewNote | None = None  # set on the version rendered after a clinician's sign-off
    ungradable_rule: UngradableRule = "recall"  # [screening] ungradable_rule
    # pages of a multi-page file of this visit that were refused (each its reason, naming the page): not graded
    refused_pages: tuple[str, ...] = ()
    # a draft made after the visit was signed off (a photo added since): who signed which version, so the newest
    # PDF does not read as if the visit had never been reviewed
    earlier_review: str | None = None
    # the visit's reopened sign-off recommended more urgently than this draft: its note is shown as a caution
    earlier_review_urgent: bool = False
    # a person moved a photo out of this visit (`dr-screen review move`): earlier versions showed another patient's
    # photo; shown as a caution under the recommendation
    visit_note: str | None = None

    def __post_init__(self) -> None:
        if self.ungradable_rule not in ("recall", "refer"):
            raise ValueError(f"ungradable_rule must be 'recall' or 'refer', got {self.ungradable_rule!r}")
        if self.model_status not in ("research", "demo"):
            raise ValueError(f"model_status must be 'research' or 'demo', got {self.model_status!r}")
        if isinstance(self.exam_date, datetime) or not isinstance(self.exam_date, date):
            raise ValueError(f"exam_date must be a datetime.date, got {type(self.exam_date).__name__}")
        if int(self.report_version) < 1:
            raise ValueError(f"report_version must be >= 1, got {self.report_version!r}")
        if self.eye_result_rule not in EYE_RESULT_RULES:
            raise ValueError(f"eye_result_rule must be one of {sorted(EYE_RESULT_RULES)}, got {self.eye_result_rule!r}")

    def fields(self, code: str) -> list[EyeFinding]:
        """The eye's photographs in the order they arrived (``eyes`` is in that order)."""
        return [e for e in self.eyes if e.eye == code]

    def eye(self, code: str) -> EyeFinding | None:
        """The eye's result: the field :func:`eye_result` chooses (None when the eye has no photograph)."""
        return eye_result(self.fields(code), self.eye_result_rule)

    def eye_results(self) -> list[EyeFinding]:
        """Each eye's result, right eye first: what the referral is decided from."""
        return [f for code in EYE_ORDER if (f := self.eye(code)) is not None]


def model_metrics_for_report(meta: Mapping[str, Any]) -> dict[str, float | str]:
    """A checkpoint's headline metrics (its metadata, as ``training.checkpoint`` stores it), labelled for the
    report's model section. Here rather than in the predictor so that a reviewed version, rendered without
    loading the model, describes it in the same words."""
    metrics = meta.get("metrics", {})
    val = metrics.get("validation", {})
    out: dict[str, float | str] = {}
    for label, key in (("Validation DR kappa", "val_kappa"), ("Validation referable-DR AUC", "val_ref_auc"),
                       ("Validation mean lesion AUPR", "val_aupr_mean")):
        if isinstance(val.get(key), (int, float)):
            out[label] = round(float(val[key]), 3)
    test = metrics.get("test") or {}
    lesion_aupr = tuple(f"{c} AUPR" for c in LESION_CODES if c != "OD")
    for key in ("referable AUC", "sensitivity", "specificity", "DR kappa", *lesion_aupr, "OD Dice"):
        if isinstance(test.get(key), (int, float)):
            out[f"Test {key}"] = round(float(test[key]), 3)
    ci = test.get("referable AUC 95% CI")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, float) for v in ci):
        out["Test referable AUC 95% CI"] = f"{ci[0]:.2f}-{ci[1]:.2f}"
    out["Referral threshold"] = round(float(meta["thresholds"]["referable"]), 3)
    target = meta["thresholds"].get("target_sensitivity")
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        out["Threshold's target sensitivity (validation)"] = round(float(target), 3)
    out["Grades from"] = grade_source(meta)
    return out


# A lesion whose held-out pixel AUPR is below this is not reported as an area: the shipped model's microaneurysm
# map is empty on every photo (AUPR 0.000), so "Microaneurysms: 0%" read as "none seen" on a grade-3 eye.
LESION_AUPR_FLOOR = 0.10


def with_undetected(finding: EyeFinding, model_metrics: Mapping[str, float | str]) -> EyeFinding:
    """``finding`` marked with the lesions its grading model (whose report metrics these are) cannot detect."""
    return replace(finding, lesions_not_detected=undetected_lesions(model_metrics)) if finding.gradable else finding


def undetected_lesions(model_metrics: Mapping[str, float | str]) -> tuple[str, ...]:
    """The lesion codes this model version does not reliably detect: test AUPR (from the report's labelled
    metrics, :func:`model_metrics_for_report`) below :data:`LESION_AUPR_FLOOR`. None when the metrics are
    unknown (a checkpoint no longer installed): nothing is claimed either way."""
    return tuple(c for c in LESION_CODES
                 if isinstance(v := model_metrics.get(f"Test {c} AUPR"), (int, float)) and v < LESION_AUPR_FLOOR)


REGRESSION_SOURCE = "lesion-evidence regression on image measurements"
BLENDED = "blended with"


def _regression_share(source: str) -> str | None:
    if REGRESSION_SOURCE not in source:
        return None
    return "blend" if BLENDED in source else "regression"


def grade_source(meta: Mapping[str, Any]) -> str:
    """What produced the DR grade and DME risk, in words for the report (from the checkpoint's metadata; stored
    with the report's model metrics, so :func:`template_variables` reads the kind back from these words)."""
    grader = meta.get("grader")
    if grader is not None and float(grader.get("heads_weight", 0.0)) > 0:
        w = float(grader["heads_weight"])
        return f"the network's DR/DME heads ({w:.0%}) {BLENDED} a {REGRESSION_SOURCE} ({1 - w:.0%})"
    if grader is not None:
        return REGRESSION_SOURCE
    if (meta.get("model_config") or {}).get("grade_inputs") == "features+lesions":
        return "the network's DR/DME heads (image features and its own lesion maps)"
    return "the network's DR/DME heads (image features)"


# ----------------------------------------------------------------------------------------------- referral


@dataclass(frozen=True)
class ReferralLevel:
    level: str
    rank: int  # higher = more urgent
    text: str  # the headline shown in the report
    advice: str  # the follow-up instruction under it
    colour: str  # box colour in the report


# The one table of referral outcomes, most urgent first. Wording follows common screening-programme practice
# (e.g. NHS Diabetic Eye Screening Programme / ICO guidance); local pathways may set different intervals.
REFERRAL_LEVELS: dict[str, ReferralLevel] = {
    lv.level: lv
    for lv in (
        ReferralLevel("urgent", 7, "Urgent referral (proliferative DR)",
                      "Refer urgently to ophthalmology / hospital eye service; to be seen within 2 weeks.",
                      "#b71c1c"),
        ReferralLevel("soon", 6, "Refer within weeks (severe non-proliferative DR)",
                      "Refer to ophthalmology; to be seen within 4-6 weeks.", "#d84315"),
        ReferralLevel("routine", 5, "Refer to ophthalmology (routine)",
                      "Routine referral for moderate non-proliferative DR and/or possible diabetic macular oedema; "
                      "to be seen within 13 weeks.", "#e69500"),
        # An eye that could not be graded: the model gives one of these two ([screening] ungradable_rule), a grader
        # may choose either. Never "no retinopathy" by default.
        ReferralLevel("refer_ungradable", 4, "Refer: ungradable photographs",
                      "An eye could not be graded from its photographs, and this programme refers such eyes instead of "
                      "recalling for new photographs. Refer for a clinical examination (slit-lamp biomicroscopy) as local "
                      "policy requires.",
                      "#8e5a00"),
        ReferralLevel("ungradable", 3, "Recall: ungradable image",
                      "An eye could not be graded from its photograph: recall the patient for new photographs "
                      "(dilated if not done, clean lens); if they are ungradable again, refer for examination "
                      "(slit lamp) as per the local pathway.", "#6a1b9a"),
        ReferralLevel("rescreen_12", 2, "Rescreen in 12 months",
                      "Mild non-proliferative DR: no referral needed; rescreen in 12 months and optimise glycaemic, "
                      "blood-pressure and lipid control.", "#558b2f"),
        ReferralLevel("rescreen_24", 1, "Rescreen in 12-24 months (routine)",
                      "No apparent diabetic retinopathy or macular oedema risk; routine rescreening in 12-24 months "
                      "as per local programme.", "#2e7d32"),
        ReferralLevel("no_images", 0, "No gradable images received",
                      "No eye was graded: recall the patient for retinal photography.", "#616161"),
    )
}
# The outcomes that send the patient to ophthalmology (a "positive" when referral sensitivity is measured).
REFER_LEVELS = frozenset({"urgent", "soon", "routine"})
# Outcomes that say no grade could be given (left out of referral sensitivity and specificity).
NO_GRADE_LEVELS = frozenset({"ungradable", "refer_ungradable", "no_images"})


@dataclass(frozen=True)
class Referral:
    level: str  # a key of REFERRAL_LEVELS
    text: str
    advice: str
    colour: str
    reason: str  # which eye and finding drove it, e.g. "Right eye: Proliferative DR, No DME risk"
    on_score: bool = False  # referred only because P(referable) is over the threshold: no eye's grade asks for it
    basis: str = "Based on the worse eye"  # or "on both eyes" (a tie: both are listed), or "on the one eye received"


# The routine referral's advice names moderate DR or macular oedema; an eye referred on its score alone has neither.
SCORE_REFERRAL_ADVICE = ("Routine referral, to be seen within 13 weeks: the model's referable-DR score is over the "
                         "screening threshold, though the most likely grade is below moderate DR with no DME risk.")


def _on_score(e: EyeFinding) -> bool:
    """Referred only because the referable-DR score is at or above the threshold: DR below 2, no DME risk."""
    return bool(e.gradable and e.referable and (e.dr_grade or 0) < 2 and e.dme_grade == 0)


def _eye_level(e: EyeFinding, ungradable_rule: UngradableRule = "recall") -> ReferralLevel:
    if not e.gradable:
        return REFERRAL_LEVELS["refer_ungradable" if ungradable_rule == "refer" else "ungradable"]
    assert e.dr_grade is not None and e.dme_grade is not None
    if e.dr_grade >= 4:
        key = "urgent"
    elif e.dr_grade == 3:
        key = "soon"
    elif e.dr_grade == 2 or e.dme_grade >= 1 or e.referable:
        # referable: the referable-DR score is at or above the validated operating threshold (chosen for
        # sensitivity >= 0.90), which can refer an eye whose most likely single grade is below moderate
        key = "routine"
    elif e.dr_grade == 1:
        key = "rescreen_12"
    else:
        key = "rescreen_24"
    return REFERRAL_LEVELS[key]


def _severity(e: EyeFinding) -> tuple[int, int, int, float]:
    """How bad a gradable field's findings are: its referral level first, then the grades, then the referral score."""
    grade, _, dme, _ = e._graded()
    return _eye_level(e).rank, grade, dme, float(e.referable_score or 0.0)


def eye_result(fields: Sequence[EyeFinding], rule: EyeResultRule = "worst") -> EyeFinding | None:
    """The field that stands for the eye: with ``"worst"`` the one with the most severe findings (ties: the earlier
    field), so a lesion seen in one field only is never outweighed by a clean other field; with ``"latest"`` the
    last one to arrive (a recapture replaces the result, every field is still shown). Only gradable fields are
    chosen from when the eye has one (an ungradable recapture does not undo a grade); an eye whose fields are all
    ungradable is represented by its latest. None without fields."""
    if rule not in EYE_RESULT_RULES:
        raise ValueError(f"unknown eye result rule {rule!r}; expected one of {sorted(EYE_RESULT_RULES)}")
    if not fields:
        return None
    gradable = [f for f in fields if f.gradable]
    if not gradable:
        return fields[-1]
    if rule == "latest":
        return gradable[-1]
    return max(gradable, key=_severity)  # max keeps the first of equal keys


def referral_recommendation(eyes: Sequence[EyeFinding], ungradable_rule: UngradableRule = "recall") -> Referral:
    """The referral for the exam, taken from the worse eye (ties: the right eye, then the left). ``eyes`` holds one
    finding per eye: each eye's result (:meth:`ReportContext.eye_results`). An ungradable eye recalls or refers the
    patient (``ungradable_rule``), unless the other eye needs a referral anyway."""
    if not eyes:
        lv = REFERRAL_LEVELS["no_images"]
        return Referral(lv.level, lv.text, lv.advice, lv.colour, "No eye images were received for this exam.",
                        basis="Nothing to grade")
    ordered = sorted(eyes, key=lambda e: EYE_ORDER.index(e.eye))
    worst = max(ordered, key=lambda e: _eye_level(e, ungradable_rule).rank)  # max keeps the first of equal ranks
    lv = _eye_level(worst, ungradable_rule)
    def finding(e: EyeFinding) -> str:
        if not e.gradable:
            return f"{e.eye_name}: ungradable, {e.short_reasons}"
        text = f"{e.eye_name}: {e.dr_name}, {e.dme_name}"
        if _on_score(e) and e.referable_score is not None:
            text += f" (referable-DR score {e.referable_score:.1%} is above the screening threshold)"
        return text

    deciding = [e for e in ordered if _eye_level(e, ungradable_rule).rank == lv.rank]
    reason = "; ".join(finding(e) for e in deciding)
    on_score = lv.level == "routine" and all(_on_score(e) for e in deciding)
    # "the worse eye" above a list of both eyes read as if the first one named (a grade-0 eye) were the worse
    basis = ("Based on the one eye received" if len(ordered) == 1 else
             "Based on both eyes (the same outcome)" if len(deciding) > 1 else "Based on the worse eye")
    return Referral(lv.level, lv.text, SCORE_REFERRAL_ADVICE if on_score else lv.advice, lv.colour, reason, on_score, basis)


def printed_referral(ctx: ReportContext) -> str:
    """The level key (:data:`REFERRAL_LEVELS`) of the recommendation the PDF of ``ctx`` leads with: the grader's on a
    reviewed version (its "Clinician sign-off" box), else the model's (:func:`referral_recommendation`, as
    :func:`template_variables` prints it). Recorded with the version (``reports.referral_level``) for the audit."""
    return _standing_level(ctx, referral_recommendation(ctx.eye_results(), ctx.ungradable_rule))


def _standing_level(ctx: ReportContext, model_referral: Referral) -> str:
    """The grader's referral on a reviewed version, else the model's ``model_referral``."""
    return ctx.review.referral if ctx.review is not None else model_referral.level


def ungradable_next_step(level: ReferralLevel, standing: ReferralLevel, result_field: int | None = None, *,
                         signed_off: bool = False, graded_by_grader: bool = False) -> str:
    """What an ungradable photograph's section tells staff to do, in step with the recommendation that stands
    (``standing``: the model's on a draft, the grader's on a reviewed version, ``signed_off``): its eye's advice
    (recall or refer) when that decides the visit; nothing for a field that is not its eye's result
    (``result_field``: the field that is, e.g. a gradable retake) or for an eye the grader graded; and, when
    another outcome stands above it, that outcome. Each section gave its own eye's advice, so an eye under a
    referral for the other eye read "recall the patient for new photographs" (found in a clinic-style check)."""
    if result_field is not None:
        return f"none for this photograph: the eye's result is field {result_field}'s."
    if graded_by_grader:
        return "none for this photograph: the grader graded this eye (above); the sign-off's recommendation stands."
    if standing.rank > level.rank:
        return (f"the recommendation above (\"{standing.text}\") comes first; the eye examination it leads to covers "
                "this eye too.")
    if signed_off and standing.level != level.level:  # the grader chose another outcome for the visit: it stands
        return f"as the sign-off above says (\"{standing.text}\")."
    return level.advice


@dataclass(frozen=True)
class Caution:
    """Something the recommendation rests on that staff must check before acting on it: ``note`` for the review
    queue's note column, ``text`` for the report's recommendation box."""

    note: str
    text: str
    kind: Literal["missing", "mismatch", "resent", "contradiction", "conflict"] = "missing"


def visit_cautions(findings: Sequence[EyeFinding], rule: EyeResultRule = "worst") -> list[Caution]:
    """What the visit's recommendation box must say beside the outcome (``findings``: every photograph of the
    visit). An eye with no photograph: the outcome covers the other eye only, yet reads like a whole visit's ("Rescreen
    in 12-24 months" on a visit missing an eye could close the episode). A photograph whose eye the laterality check
    doubts: the outcome assumes its label, and a mix-up swaps which eye is referred. Both were said only in the eye's
    own section, below the box (found in a clinic-style check)."""
    cautions: list[Caution] = []
    received = [code for code in EYE_ORDER if any(f.eye == code for f in findings)]
    if len(received) == 1:
        missing = next(code for code in EYE_ORDER if code not in received)
        name, other = EYE_NAMES[missing].lower(), EYE_NAMES[received[0]].lower()
        cautions.append(Caution(
            f"{name} missing",
            f"Incomplete visit: no photograph of the {name} was graded (none received, or refused), so this "
            f"recommendation covers the {other} only. Photograph or grade the {name} before the screening episode is "
            "closed."))
    for code in EYE_ORDER:  # once an eye, however many of its fields are doubted
        f = next((f for f in findings if f.eye == code and f.eye_mismatch), None)
        if f is not None:
            name = EYE_NAMES[code].lower()
            cautions.append(Caution(
                f"{name}: label in doubt",
                f"Laterality mismatch: the photograph filed as the {name} ({f.source_name}) looks like the other eye; "
                "this recommendation assumes its label. Check the eye before acting on it.", "mismatch"))
    for code in EYE_ORDER:  # the model's two heads disagree: exudates (DME risk) are themselves retinopathy
        f = eye_result([f for f in findings if f.eye == code], rule)  # the photo that gives the eye's result (``rule``)
        if f is not None and f.gradable and f.dr_grade == 0 and (f.dme_grade or 0) >= 1:
            name = EYE_NAMES[code].lower()
            cautions.append(Caution(
                f"{name}: grades disagree",
                f"The model's grades for the {name} ({f.source_name}) contradict each other: no apparent retinopathy, "
                f"yet a DME risk of {f.dme_grade} (hard exudates, which are themselves a sign of retinopathy). One of "
                "them is wrong and the retinopathy may be more severe than graded: a grader must look at this eye.",
                "contradiction"))
    named = Counter((f.eye, f.source_name) for f in findings if f.source_name)  # a name without an eye may serve both
    for (_, name), n in named.items():  # different bytes under one name (the same bytes would be a duplicate)
        if n > 1:
            cautions.append(Caution(
                "same name twice",
                f"{n} different photographs arrived under the same name {name}: a photograph sent again is graded as "
                "another field beside the first, not in its place. Check which is right before acting on this "
                "recommendation.", "resent"))
    return cautions


# -------------------------------------------------------------------------------------------------- paths


def report_folder(reports_dir: Path | str, patient_id: str, exam_date: date) -> Path:
    """``reports_dir/<safe patient id>/<exam date ISO>``; guaranteed to lie inside ``reports_dir``."""
    root = Path(reports_dir).resolve()
    out = (root / safe_id(patient_id) / exam_date.isoformat()).resolve()
    if not out.is_relative_to(root):  # cannot happen with the sanitised name; belt and braces
        raise ValueError(f"report folder {out} escapes {root}")
    return out


def report_dir(ctx: ReportContext, reports_dir: Path) -> Path:
    """The folder of ``ctx``'s exam (:func:`report_folder`)."""
    return report_folder(reports_dir, ctx.patient_id, ctx.exam_date)


_VERSION_RE = re.compile(r"^report_v(\d+)\.pdf$")


def existing_versions(folder: Path) -> list[int]:
    """The versions of the ``report_v<N>.pdf`` files in ``folder``, ascending (none when it is absent)."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name)))


# ------------------------------------------------------------------------------------------------ render


def _uri(path: Path | str | None) -> str | None:
    if path is None:
        return None
    p = Path(path).resolve()
    return p.as_uri() if p.is_file() else None


def _pct(x: float, digits: int = 0) -> str:
    return f"{100.0 * float(x):.{digits}f}%"


def _area(x: float | None) -> str:
    if x is None:
        return "\u2013"
    v = 100.0 * float(x)
    if v == 0:
        return "0%"
    if v < 0.01:
        return "<0.01%"
    return f"{v:.2f}%"


def _share(v: object, digits: int = 0) -> str | None:
    """A model metric that is a share (the referral threshold, its target sensitivity) as a percentage; None if absent."""
    return _pct(v, digits) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _metric(v: float | str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _metric_rows(metrics: Mapping[str, float | str]) -> list[tuple[str, str]]:
    """The model section's rows: each metric on its own, but the per-lesion test AUPRs on one row (four rows of
    them pushed a two-eye report's last box onto a third page)."""
    lesion_keys = {f"Test {c} AUPR": c for c in LESION_CODES}
    merged = ("Test lesion AUPR", " · ".join(f"{c} {_metric(metrics[k])}" for k, c in lesion_keys.items() if k in metrics))
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if key not in lesion_keys:
            rows.append((key, _metric(value)))
        elif merged not in rows:  # the lesions' one row, where the first of them stood
            rows.append(merged)
    return rows


def _rgb(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def _eye_review_view(e: EyeFinding, r: EyeReview | None) -> dict[str, object] | None:
    """What the grader said about this eye, beside the model's answer (None: no review of this eye)."""
    if r is None:
        return None
    if not r.gradable:
        return {"gradable": False, "agrees": not e.gradable}
    assert r.dr_grade is not None and r.dme_grade is not None
    return {
        "gradable": True,
        "dr_grade": r.dr_grade, "dr_name": DR_GRADES[r.dr_grade], "dr_changed": r.dr_grade != e.dr_grade,
        "dme_grade": r.dme_grade, "dme_name": DME_GRADES[r.dme_grade], "dme_changed": r.dme_grade != e.dme_grade,
        "agrees": r.dr_grade == e.dr_grade and r.dme_grade == e.dme_grade,
    }


def _review_view(ctx: ReportContext, model_referral: Referral) -> dict[str, object] | None:
    r = ctx.review
    if r is None:
        return None
    at = r.reviewed_at
    level = REFERRAL_LEVELS[r.referral]
    advice = level.advice
    if r.implied in REFERRAL_LEVELS and level.level in REFER_LEVELS and REFERRAL_LEVELS[r.implied].rank < level.rank:
        # e.g. grades 0 and 0 confirmed with the model's score-based routine referral: the level's own advice
        # ("for moderate non-proliferative DR and/or possible DME") would give a reason the grades contradict
        why = ("the model's referable-DR score was over the screening threshold" if r.outcome == "confirmed"
               else "the grader chose it")
        advice = (f"Referred although the grades recorded alone would imply '{REFERRAL_LEVELS[r.implied].text}': "
                  f"{why}.")
    return {
        "reviewer": r.reviewer,
        "reviewed_at": at.strftime("%Y-%m-%d %H:%M") + (f" {at.strftime('%Z') or at.strftime('%z')}" if at.tzinfo else ""),
        "reviewed_on": at.strftime("%Y-%m-%d"),
        "corrected": r.outcome == "corrected",
        "level": level,
        "advice": advice,
        "referral_changed": r.referral != model_referral.level,
        "comment": r.comment,
    }


def _eye_view(e: EyeFinding, review: EyeReview | None = None, ungradable_rule: UngradableRule = "recall") -> dict[str, object]:
    common: dict[str, object] = {
        "code": e.eye,
        "name": e.eye_name,
        "source_name": e.source_name,
        "device": e.device,
        "photo": _uri(e.photo_path),
        "gradable": e.gradable,
        "eye_note": e.eye_note,
        "eye_note_class": "eye-note" if e.eye_mismatch else "eye-info",
        "filing_note": e.filing_note,
        "level": _eye_level(e, ungradable_rule),
        "image_quality": e.image_quality,
        "review": _eye_review_view(e, review),
    }
    if not e.gradable:
        return {**common, "reasons": list(e.ungradable_reasons), "short_reasons": e.short_reasons}
    assert e.dr_probs is not None and e.dme_probs is not None and e.referable_score is not None
    return {
        **common,
        "overlay": _uri(e.overlay_path),
        "dr_cam": _uri(e.dr_cam_path),
        "dme_cam": _uri(e.dme_cam_path),
        "dr_grade": e.dr_grade,
        "dr_name": e.dr_name,
        "dr_conf": _pct(e.dr_confidence),
        "dr_probs": [(i, DR_GRADES[i], _pct(p)) for i, p in enumerate(e.dr_probs)],
        "dme_grade": e.dme_grade,
        "dme_name": e.dme_name,
        "dme_conf": _pct(e.dme_confidence),
        "dme_probs": [(i, DME_GRADES[i], _pct(p)) for i, p in enumerate(e.dme_probs)],
        "referable": e.referable,
        "referable_score": _pct(e.referable_score, 1),  # to a tenth, as the threshold: 15.7 % vs 15.5 % read "16 %" both
        "on_score": _on_score(e),  # referred on the score alone: said beside the outcome, where a grade 0 meets "Refer"
        "lesions": [
            {"code": c, "label": LESION_LABELS[c], "colour": _rgb(LESION_COLOURS[c]), "assessed": c not in e.lesions_not_detected,
             "area": _area(e.lesion_areas.get(c)) if c not in e.lesions_not_detected else "not assessed*"}
            for c in LESION_CODES
        ],
        "mask_folder": str(e.mask_folder) if e.mask_folder is not None else None,
    }


@functools.lru_cache(maxsize=8)
def _environment(templates_dir: Path) -> Environment:
    """One Jinja2 environment per templates folder: the template is compiled once, not once per report
    (its loader still reloads a template whose file changed)."""
    return Environment(loader=FileSystemLoader(str(templates_dir)), autoescape=True, undefined=StrictUndefined)


LOCAL_PROTOCOLS = ("file", "data")  # what a report may load: its pictures and stylesheet on this machine, inline data


def local_fetcher() -> Any:
    """A WeasyPrint URL fetcher that loads only :data:`LOCAL_PROTOCOLS`: a report never reaches the network, whatever
    a template or a stored path holds (patient data stays local); anything else is refused (a missing picture)."""
    from weasyprint.urls import URLFetcher

    return URLFetcher(allowed_protocols=LOCAL_PROTOCOLS)


@functools.lru_cache(maxsize=8)
def _stylesheet(css_path: Path, stamp: tuple[int, int]) -> tuple[object, object]:
    """The report stylesheet parsed once (per file version, ``stamp`` = mtime and size) with its font configuration."""
    from weasyprint import CSS
    from weasyprint.text.fonts import FontConfiguration

    fonts = FontConfiguration()
    return CSS(filename=str(css_path), font_config=fonts, url_fetcher=local_fetcher()), fonts


def render_html(ctx: ReportContext, templates_dir: Path | str, link_stylesheet: bool = True) -> str:
    """The report as an HTML string; every user-provided string is autoescaped by Jinja2.

    ``link_stylesheet=False`` leaves out the ``<link>`` to report.css (render_pdf hands WeasyPrint the parsed
    stylesheet instead of having it parse the file for every report).
    """
    templates_dir = Path(templates_dir).resolve()
    return _environment(templates_dir).get_template(TEMPLATE_NAME).render(**template_variables(ctx, templates_dir, link_stylesheet))


CHECK_MODEL_LABELS = {"gradability": "Gradability model", "laterality": "Laterality model"}


def check_model_rows(findings: Sequence[EyeFinding]) -> list[tuple[str, str]]:
    """The report's rows naming the models that checked the visit's photos (gradability, then laterality), each
    model once; a visit whose photos were checked by two versions of one (a model replaced between its fields)
    lists both, and photos whose checking model was not recorded (checked before revision 0015_check_models) are
    counted, so a row never claims a model checked every photo when it did not. No row when none was recorded."""
    rows: list[tuple[str, str]] = []
    for kind, label in CHECK_MODEL_LABELS.items():
        seen = list(dict.fromkeys(f.check_models[kind] for f in findings if kind in f.check_models))
        unknown = sum(kind not in f.check_models for f in findings)
        if seen:
            if unknown:
                seen.append(f"not recorded for {unknown} photo{'s' if unknown != 1 else ''}")
            rows.append((label, "; ".join(seen)))
    return rows


def template_variables(ctx: ReportContext, templates_dir: Path, link_stylesheet: bool = True) -> dict[str, object]:
    """What the template sees (benchmarks/bench_report.py renders other template versions with it)."""
    gen = ctx.generated_at
    generated = gen.strftime("%Y-%m-%d %H:%M") + (f" {gen.strftime('%Z') or gen.strftime('%z')}" if gen.tzinfo else "")
    referral = referral_recommendation(ctx.eye_results(), ctx.ungradable_rule)
    standing = REFERRAL_LEVELS[_standing_level(ctx, referral)]  # what the PDF leads with (printed_referral)
    eyes = []
    for code in EYE_ORDER:
        fields, result = ctx.fields(code), ctx.eye(code)
        grader = ctx.review.eye(code) if ctx.review else None  # the grader's answer is for the eye: beside its result
        views = [dict(_eye_view(f, grader if f is result else None, ctx.ungradable_rule), number=k, is_result=f is result)
                 for k, f in enumerate(fields, start=1)]
        result_number = next((k for k, f in enumerate(fields, start=1) if f is result), None)
        for view, f in zip(views, fields):
            if not f.gradable:
                view["next_step"] = ungradable_next_step(
                    _eye_level(f, ctx.ungradable_rule), standing, None if f is result else result_number,
                    signed_off=ctx.review is not None, graded_by_grader=f is result and grader is not None and grader.gradable)
        eyes.append({
            "code": code, "name": EYE_NAMES[code], "fields": views,
            "finding": next((v for v in views if v["is_result"]), None),
            "rule_text": EYE_RESULT_RULES[ctx.eye_result_rule],
            "label_in_doubt": any(f.eye_mismatch for f in fields),
        })
    return dict(
        clinic_name=ctx.clinic_name,
        patient_id=ctx.patient_id,
        exam_date=ctx.exam_date.isoformat(),
        report_version=ctx.report_version,
        generated_at=generated,
        referral=referral,
        # the box says what a missing eye means; a doubted label is tagged on its eye's summary row (a line in the
        # box pushed a reviewed two-eye report onto a third page), and its section says why
        # the grades' contradiction is for the grader to resolve: a signed version's box does not repeat it (the grader
        # has answered for the eye; the line also pushed a reviewed two-eye report onto a third page)
        cautions=[c.text for c in visit_cautions(ctx.eyes, ctx.eye_result_rule)
                  if c.kind in ("missing", "resent") or (c.kind == "contradiction" and ctx.review is None)],
        review=_review_view(ctx, referral),
        refused_pages=list(ctx.refused_pages),
        earlier_review=ctx.earlier_review,
        earlier_review_urgent=ctx.earlier_review_urgent,
        visit_note=ctx.visit_note,
        eyes=eyes,
        model_version=ctx.model_version,
        checkpoint_short=(ctx.checkpoint_sha256 or "")[:12] or "unknown",
        check_models=check_model_rows(ctx.eyes),
        model_metrics=_metric_rows(ctx.model_metrics),
        lesion_floor=f"{LESION_AUPR_FLOOR:.2f}",
        referral_threshold=_share(ctx.model_metrics.get("Referral threshold"), 1),
        sensitivity_target=_share(ctx.model_metrics.get("Threshold's target sensitivity (validation)")),
        # "regression": the grades are the regression's alone; "blend": partly; None: the heads' (what Grad-CAM explains)
        grades_regression=_regression_share(str(ctx.model_metrics.get("Grades from", ""))),
        is_demo=ctx.model_status == "demo",
        demo_watermark=DEMO_WATERMARK,
        research_status=RESEARCH_STATUS,
        stylesheet=(templates_dir / "report.css").as_uri() if link_stylesheet else None,
    )


def render_pdf(ctx: ReportContext, templates_dir: Path | str, reports_dir: Path | str) -> Path:
    """Render the PDF and publish it as ``report_v<ctx.report_version>.pdf``; returns its path.

    The version is the caller's: the one printed in the PDF is the one in its name. An existing file of that
    version is never replaced: :class:`ReportVersionTaken` is raised instead (checked before rendering, and
    again atomically when publishing, in case another writer took the name meanwhile). ``latest.pdf`` in the
    same folder is atomically replaced by a copy, unless a newer version is already there.
    """
    from weasyprint import HTML  # imported lazily: it is slow to import

    templates_dir = Path(templates_dir).resolve()
    css_path = templates_dir / "report.css"
    try:
        st = css_path.stat()
    except OSError as exc:
        raise FileNotFoundError(f"report stylesheet missing: {css_path} ({exc.strerror}); restore templates/report.css") from None
    css, fonts = _stylesheet(css_path, (st.st_mtime_ns, st.st_size))
    folder = report_dir(ctx, Path(reports_dir))
    folder.mkdir(parents=True, exist_ok=True)
    version = int(ctx.report_version)
    final = folder / f"report_v{version}.pdf"
    taken = f"{final} exists already (reports are never overwritten); render it as a new version"
    if final.exists():
        raise ReportVersionTaken(taken)
    html = render_html(ctx, templates_dir, link_stylesheet=False)
    pdf = HTML(string=html, base_url=str(templates_dir), url_fetcher=local_fetcher()).write_pdf(stylesheets=[css],
                                                                                              font_config=fonts)
    try:
        atomic_write_bytes(final, pdf, overwrite=False)
    except FileExistsError:
        raise ReportVersionTaken(taken) from None
    if version >= max(existing_versions(folder), default=0):
        atomic_write_bytes(folder / "latest.pdf", pdf)
    log.debug("wrote report version %d", version)  # not its path: the folder is the patient's id
    return final


def render_with_retries(
    ctx: ReportContext,
    templates_dir: Path | str,
    reports_dir: Path | str,
    retries: int = 3,
    delay: float = 0.5,
) -> Path:
    """``render_pdf`` with up to ``retries`` attempts (at least one), sleeping ``delay * attempt`` in between.

    Invalid input (ValueError) and a version that is taken (:class:`ReportVersionTaken`) are not retried. After the last failure a :class:`ReportError` naming the patient
    and the exam date is raised, chained to the last exception.
    """
    attempts = max(1, int(retries))
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return render_pdf(ctx, templates_dir, reports_dir)
        except (ValueError, ReportVersionTaken) as exc:
            last = exc
            break
        except Exception as exc:  # noqa: BLE001 - anything from WeasyPrint or the filesystem
            last = exc
            # no patient identifiers in logs: the caller logs the exam's database id
            log.warning("report rendering failed (attempt %d/%d): %s", attempt, attempts, type(exc).__name__)
            if attempt < attempts and delay > 0:
                time.sleep(delay * attempt)
    raise ReportError(
        f"could not render the report for patient {ctx.patient_id!r}, exam {ctx.exam_date.isoformat()}: "
        f"{type(last).__name__}: {last}"
    ) from last


__all__ = [
    "DEMO_WATERMARK", "EYE_NAMES", "EYE_RESULT_RULES", "LESION_AUPR_FLOOR", "LESION_COLOURS", "LESION_LABELS",
    "LOCAL_PROTOCOLS", "NO_GRADE_LEVELS",
    "REFERRAL_LEVELS", "REFER_LEVELS", "RESEARCH_STATUS", "Caution", "EyeFinding", "EyeResultRule", "EyeReview", "Referral",
    "ReferralLevel", "ReportContext", "ReportError", "ReportVersionTaken", "ReviewNote", "UngradableRule", "existing_versions",
    "eye_result",
    "grade_source", "model_metrics_for_report", "undetected_lesions", "with_undetected",
    "local_fetcher", "printed_referral", "referral_recommendation", "render_html", "render_pdf", "render_with_retries", "report_dir", "report_folder",
    "template_variables", "ungradable_next_step", "visit_cautions",
]
