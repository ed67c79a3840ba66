"""The label vocabulary of the network: lesion channels, ICDR DR grades and IDRiD DME risk grades, and the
gradability model's reasons for an ungradable photo.

Plain tuples with no torch import, so that code which only needs the names (the report renderer, which
runs in its own small process) can use them without loading the deep-learning stack.
"""

from __future__ import annotations

LESIONS: tuple[str, ...] = ("microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates", "optic_disc")
LESION_CODES: tuple[str, ...] = ("MA", "HE", "EX", "SE", "OD")
LESION_KEYS: tuple[str, ...] = tuple(code.lower() for code in LESION_CODES)
"""Lower-case codes, for names such as the database's ``area_ma`` columns and the manifests' ``ma_mask``."""
LESION_NAMES: dict[str, str] = {code: name.replace("_", " ").capitalize() for code, name in zip(LESION_CODES, LESIONS)}
"""What a person reads: ``{"MA": "Microaneurysms", ..., "OD": "Optic disc"}``."""
PATHOLOGY_CODES: tuple[str, ...] = LESION_CODES[:4]
"""The lesions proper; the optic disc (``OD``, the last channel) is anatomy, segmented as a landmark."""
DR_GRADES: tuple[str, ...] = (
    "No apparent retinopathy",
    "Mild non-proliferative DR",
    "Moderate non-proliferative DR",
    "Severe non-proliferative DR",
    "Proliferative DR",
)
DME_GRADES: tuple[str, ...] = (  # names without their number: reports print "2 – <name>"
    "No DME risk",
    "DME risk: hard exudates away from the macula centre",
    "DME risk: hard exudates within one disc diameter of the macula centre",
)

# Why a photo is ungradable: the gradability model's outputs (training.quality) and the words the reports, the
# review page and the audit print for them. Here, not beside the model, so that showing an ungradable photo never
# imports torch (the review commands and the review page's queue read them for every ungradable photo).
REASONS: tuple[str, ...] = ("too_dark", "over_exposed", "blurred", "field", "obscured", "haze", "not_fundus")
"""Why a photo is ungradable, one model output each. ``not_fundus`` is not a photo to recapture but a wrong
file: the worker refuses it (a recorded rejection); every other reason makes the eye "ungradable: recapture"."""

REASON_TEXT: dict[str, str] = {
    "too_dark": "too dark (under-exposed): raise the flash or exposure, check the pupil is dilated",
    "over_exposed": "over-exposed (washed out): lower the flash or exposure",
    "blurred": "blurred (out of focus or moved): refocus, ask the patient to keep still",
    "field": "field too small, decentred or cut off: centre the pupil and the macula, check the working distance",
    "obscured": "part of the field obscured (eyelashes, eyelid or pupil-edge shadow): hold the lids open, re-align",
    "haze": "hazy, low contrast (media opacity such as cataract, or a dirty lens): clean the lens; if it persists, "
            "the patient needs a slit-lamp examination",
    "not_fundus": "does not look like a colour fundus photo",
}
"""What staff read for each reason: what is wrong and what to do."""

__all__ = ["DME_GRADES", "DR_GRADES", "LESIONS", "LESION_CODES", "LESION_KEYS", "LESION_NAMES", "PATHOLOGY_CODES",
           "REASONS", "REASON_TEXT"]
