"""The unit every data source produces: one image with whichever labels it has."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# DME label codes carried by a Record / sample:
DME_UNKNOWN = -1  # no DME label at all
DME_PRESENT = 3  # DME risk present but grade (1 or 2) unknown, e.g. a binary "maculopathy" flag
DR_UNKNOWN = -1


@dataclass(frozen=True)
class Record:
    """One fundus image and what is known about it.

    ``masks`` is ``None`` when the image has no lesion annotation at all; otherwise it holds one
    entry per lesion (training.model.LESIONS order), where ``None`` means "annotated, lesion absent".
    """

    image: Path
    patient_id: str
    source: str
    eye: str | None = None
    dr_grade: int = DR_UNKNOWN
    dme_grade: int = DME_UNKNOWN
    masks: tuple[Path | None, ...] | None = None
    # Graders' verdict where the source publishes one (Messidor-2's ``gradable``): True/False; None = not stated.
    gradable: bool | None = None

    @property
    def has_grade(self) -> bool:
        return self.dr_grade != DR_UNKNOWN

    @property
    def has_dme(self) -> bool:
        return self.dme_grade != DME_UNKNOWN

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    @property
    def referable(self) -> int | None:
        """Referable DR: grade >= 2 or any DME risk; None when it cannot be told from the labels."""
        if self.dr_grade >= 2 or self.dme_grade >= 1:
            return 1
        if self.dr_grade in (0, 1) and self.dme_grade == 0:
            return 0
        return None


def fingerprints(records: Iterable[Record]) -> list[str]:
    """Short, sorted hashes of the records' source, folder and file name (``site1/001.jpg`` and ``site2/001.jpg``
    differ): what a checkpoint keeps of the photos its run trained and validated on, so that an evaluation can tell
    when its split holds any of them (the split is rebuilt from the sources configured then; a source with more or
    fewer rows deals patients out differently). Hashed: a clinic's own file names may hold patient ids, and a
    checkpoint is shipped."""
    return sorted({hashlib.blake2b(f"{r.source}:{Path(r.image).parent.name}/{Path(r.image).name}".encode(),
                                   digest_size=6).hexdigest() for r in records})
