"""The intake checks every photo goes through before grading: is it gradable, and which eye does it show.

* **Gradability** (:func:`training.api.assess_quality`, a learned verdict with reasons): a photo that is not a
  colour fundus photo at all is refused (a :class:`~screening.rejection.Rejection`, recorded like any other);
  any other reason makes it *ungradable*: it is stored with its reasons, gets no DR grade, and its report says
  "ungradable: recapture".
* **Laterality** (:func:`training.api.predict_laterality`): the eye read from the photo (optic disc side and
  orientation) with a confidence. The eye stated by the file name, sidecar or DICOM laterality tag always wins;
  when the photo is not clear enough to check it (below the model's confidence threshold: the model abstains), the
  report says "eye not confirmed" instead of guessing; a confident
  disagreement is recorded and shown as a mismatch, never silently corrected. A photo whose name states no eye
  takes the predicted one when it is confident, and is refused (with the reason) when it is not.

:class:`IntakeChecks` holds both models for the worker's lifetime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.api import (
    REASON_TEXT,
    LateralityPrediction,
    QualityVerdict,
    assess_quality,
    load_laterality_model,
    load_quality_model,
    predict_laterality,
)
from training.common import sha256_file

from .config import ScreeningSettings
from .imaging import DecodedImage
from .intake import Identity
from .rejection import Rejection, RejectReason

EyeSource = Literal["name", "sidecar", "dicom", "image"]
EYE_WORDS = {"L": "left", "R": "right"}


@dataclass(frozen=True)
class EyeCheck:
    """The eye of one photo: what its name said (if anything) and what the photo shows."""

    stated: Literal["L", "R"] | None
    stated_from: str | None  # "file name", "sidecar <name>.json" or "DICOM (0020,0062)"
    prediction: LateralityPrediction

    @property
    def eye(self) -> Literal["L", "R"]:
        """The eye the photo is filed under: the stated one, else the predicted one."""
        return self.stated if self.stated is not None else self.prediction.eye

    @property
    def source(self) -> EyeSource:
        """Where the filed eye came from: ``stated_from`` "sidecar ..." or "DICOM ..." (a DICOM intake names its
        laterality tag so), else the file name; "image" when no eye was stated."""
        if self.stated is None:
            return "image"
        origin = self.stated_from or ""
        if origin.startswith("sidecar"):
            return "sidecar"
        return "dicom" if origin.startswith("DICOM") else "name"

    @property
    def mismatch(self) -> bool:
        """The photo confidently shows the other eye than the one stated."""
        return self.stated is not None and self.prediction.confident and self.prediction.eye != self.stated

    @property
    def confirmed(self) -> bool:
        """The photo confidently shows the stated eye (or, with none stated, the eye it is filed under). False is
        the model abstaining (not confident) or a mismatch."""
        return self.prediction.confident and self.prediction.eye == self.eye

    def note(self) -> str | None:
        """What the report says about the eye, or None when there is nothing to say (the photo confirms the stated
        eye). Stored with the image (``images.eye_note``)."""
        if self.source == "image":
            return f"Eye read from the photo (none stated in the file name, sidecar or DICOM tags): it {self.prediction.describe()}."
        stated = EYE_WORDS[self.stated or "R"]
        where = self.stated_from or "file name"
        if self.mismatch:
            return (f"Laterality mismatch: the {where} says {stated} eye, but the photo "
                    f"{self.prediction.describe()}. The result is filed under the stated eye: check the label.")
        if not self.confirmed:
            return (f"Eye not confirmed by the photo: it {self.prediction.describe()}, too uncertain to check the "
                    f"label. Filed under the {stated} eye the {where} states.")
        return None


def model_identity(model: Mapping[str, Any], path: Path | None = None) -> str:
    """A check model as the database and the report name it: its format and the first 12 hex digits of its file's
    SHA-256 (as a grade names its checkpoint), e.g. ``dr-laterality-3 a81c0f3e29b4``."""
    return f"{model.get('format', 'unknown format')} {sha256_file(path)[:12] if path is not None else 'file unknown'}"


@dataclass(frozen=True)
class IntakeVerdict:
    quality: QualityVerdict
    eye: EyeCheck
    models: Mapping[str, str] = field(default_factory=dict)  # IntakeChecks.identities: which models said so

    @property
    def gradable(self) -> bool:
        return self.quality.gradable


class IntakeChecks:
    """Both models, loaded once; :meth:`check` runs them on a decoded photo."""

    def __init__(self, quality_model: dict[str, Any], laterality_model: dict[str, Any],
                 orientation: Literal["detect", "upright"] = "detect", identities: Mapping[str, str] | None = None) -> None:
        """``identities``: each model as :func:`model_identity` names it, stored with every photo it checks (the
        models' formats alone, "file unknown", when not given)."""
        self.quality_model = quality_model
        self.laterality_model = laterality_model
        self.orientation: Literal["detect", "upright"] = orientation
        self.identities: dict[str, str] = dict(identities) if identities is not None else {
            "gradability": model_identity(quality_model), "laterality": model_identity(laterality_model)}

    @classmethod
    def from_settings(cls, settings: ScreeningSettings) -> IntakeChecks:
        """Raises :class:`training.api.CheckpointError` (with what to do) when a model file is missing or unusable."""
        quality, laterality = load_quality_model(settings.quality_model), load_laterality_model(settings.laterality_model)
        return cls(quality, laterality, settings.photo_orientation,
                   {"gradability": model_identity(quality, Path(settings.quality_model)),
                    "laterality": model_identity(laterality, Path(settings.laterality_model))})

    def check(self, decoded: DecodedImage, identity: Identity, file_name: str) -> IntakeVerdict:
        """The verdict for one photo; raises a :class:`Rejection` for a picture that is not a colour fundus photo,
        and for a photo whose eye is neither stated nor confidently visible."""
        if decoded.whole is None:
            raise ValueError("the intake checks need the whole decoded photo (screening.imaging.preprocess keeps it in DecodedImage.whole)")
        quality = assess_quality(self.quality_model, decoded.whole)
        if quality.not_fundus:
            score = quality.scores["not_fundus"]
            raise Rejection(RejectReason.NOT_FUNDUS,
                            f"'{file_name}' {REASON_TEXT['not_fundus']} (gradability model: {score:.0%} not a fundus photo); "
                            "export the colour fundus photograph itself (red-free, angiography, documents and other "
                            "pictures are not supported)")
        prediction = predict_laterality(self.laterality_model, decoded.rgb, self.orientation)
        eye = EyeCheck(identity.eye, identity.eye_from, prediction)
        if identity.eye is None and not prediction.confident:
            why = (f"the photo is ungradable ({quality.describe()}), so its eye cannot be read from it" if not quality.gradable
                   else f"the photo does not show it clearly enough: it {prediction.describe()}, "
                        f"below the {float(self.laterality_model['confident']):.0%} needed")
            raise Rejection(RejectReason.IDENTITY,
                            f"no eye stated for '{file_name}' (L/R/LE/RE/OD/OS/left/right: none in its file name, sidecar or "
                            f"DICOM laterality tags), and {why}; name the file with the eye, e.g. Patient001_L.jpg, or "
                            "set the laterality on the camera")
        return IntakeVerdict(quality, eye, self.identities)


__all__ = ["EYE_WORDS", "EyeCheck", "EyeSource", "IntakeChecks", "IntakeVerdict", "model_identity"]
