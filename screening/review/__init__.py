"""The clinician's sign-off: review queue, confirmations and corrections, the grading-centre import, the
reviewed report version and model-versus-grader agreement.

Submodules: :mod:`.visits` (queue and sign-off rules), :mod:`.grading_csv` (bulk import),
:mod:`.reviewed_report` (the re-rendered PDF), :mod:`.agreement` (audit statistics), :mod:`.text`
(terminal output). Torch is imported only to read a checkpoint's metadata for a reviewed report (the network
itself is never loaded), so the review page and its commands stay light.
"""

from screening.review.visits import (
    GRADER_REFERRALS,
    ReviewError,
    Visit,
    VisitEye,
    load_visit,
    load_visits,
    recently_reviewed,
    referral_from_answers,
    review_queue,
    sign_off,
)

__all__ = [
    "GRADER_REFERRALS",
    "ReviewError",
    "Visit",
    "VisitEye",
    "load_visit",
    "load_visits",
    "recently_reviewed",
    "referral_from_answers",
    "review_queue",
    "sign_off",
]
