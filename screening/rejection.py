"""Why a file is refused: one exception type, :class:`Rejection`, with a reason code and a message for staff.

Every check that can refuse a dropped file raises it: the suffix (:func:`screening.intake.check_supported`),
the name or sidecar (:func:`screening.intake.parse_identity`), the file's image data
(:func:`screening.imaging.decode`), the intake checks (:mod:`screening.checks`: not a fundus photo, or no eye
stated and none visible). A photo that is a fundus photo but ungradable is *not* refused: it is recorded as
ungradable, with its reasons. The intake stage catches it in one place and records the refusal; the
message is what staff read (in the ``.reason.txt`` beside the file and in the database), the code is for
the program (outcomes, logs, tests). No torch or numpy import here: the inbox layer uses it too.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    UNSUPPORTED_TYPE = "unsupported_type"  # not one of the image suffixes the worker reads
    IDENTITY = "identity"  # patient, eye or exam date missing or invalid (file name or sidecar)
    UNREADABLE = "unreadable"  # no image could be decoded from the bytes
    TOO_SMALL = "too_small"  # fewer pixels than a fundus photo needs
    NOT_FUNDUS = "not_fundus"  # a picture, but not a colour fundus photo (the learned gradability verdict)


class Rejection(Exception):
    """A file the worker cannot use. ``message`` says what was wrong and what to do, for clinic staff: it
    names the file but never carries anything read from inside it beyond what is needed to fix it."""

    def __init__(self, code: RejectReason, message: str) -> None:
        super().__init__(message)
        self.code = RejectReason(code)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"Rejection({self.code.value!r}, {self.message!r})"


__all__ = ["RejectReason", "Rejection"]
