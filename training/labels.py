"""The label vocabulary of the network: lesion channels, ICDR DR grades and IDRiD DME risk grades.

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

__all__ = ["DME_GRADES", "DR_GRADES", "LESIONS", "LESION_CODES", "LESION_KEYS", "LESION_NAMES", "PATHOLOGY_CODES"]
