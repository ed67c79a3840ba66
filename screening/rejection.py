"""Why a file is refused, why an image failed, and what else went wrong: stable reason codes, and
:class:`Rejection`, the one exception type for a refusal.

Every check that can refuse a dropped file raises :class:`Rejection`: the entry itself
(:func:`screening.intake.check_entry`: a link, a folder, an empty or oversized file, a temporary name left
behind), the suffix (:func:`screening.intake.check_supported`), the name or sidecar
(:func:`screening.intake.parse_identity`), the picture itself (:func:`screening.imaging.decode_bytes`), the
intake checks (:mod:`screening.checks`: not a fundus photo, or no eye stated and none visible). A fundus photo
that is ungradable is *not* refused: it is recorded as ungradable, with its reasons (``images.quality_reasons``).
The intake stage catches a :class:`Rejection` in one place and records the refusal. The message is what staff read (in the
``.reason.txt`` beside the file and in the database); the code is what the program and the audit group by
(``images.error_code``, ``drops.reason_code``, ``events.code``): messages may name files and numbers, codes
never change. No torch or numpy import here: the inbox layer and the renderer process use it too.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why a dropped file was refused (``drops.reason_code``, and ``images.error_code`` of a rejected image)."""

    UNSUPPORTED_TYPE = "unsupported_type"  # not one of the image suffixes the worker reads
    IDENTITY = "identity"  # patient, eye or exam date missing or invalid (file name or sidecar)
    IDENTITY_CONFLICT = "identity_conflict"  # the same bytes as a photo recorded for another patient or eye
    UNREADABLE = "unreadable"  # no image could be decoded from the bytes
    INCOMPLETE = "incomplete"  # the image data stops before its end (truncated, still being copied, corrupt)
    EMPTY = "empty"  # 0 bytes
    TOO_LARGE = "too_large"  # over the configured limit on bytes or pixels
    MULTI_PAGE = "multi_page"  # more pages than the configured limit (a TIFF of several photos is graded per page)
    NOT_A_FILE = "not_a_file"  # a link, a folder, a pipe or a device in the inbox
    LEFT_BEHIND = "left_behind"  # a hidden or temporary name (.part, ~$, dotfile, a lone sidecar) unchanged too long
    TOO_SMALL = "too_small"  # fewer pixels than a fundus photo needs
    # Raised by the hand-set colour rule before revision 0005; older rows carry it. A dark fundus photo is now
    # recorded as ungradable (reason ``too_dark`` in images.quality_reasons), not refused.
    TOO_DARK = "too_dark"
    NOT_FUNDUS = "not_fundus"  # a picture, but not a colour fundus photo (the learned gradability verdict)


class FailReason(StrEnum):
    """Why an admitted image failed (``images.error_code`` of a ``failed`` image); the file stays in the inbox
    and is retried, except for ``original_missing``."""

    GRADING = "grading_failed"  # preparing the batch or the forward pass raised
    STORING = "storing_failed"  # writing the pictures or the result raised
    ORIGINAL_MISSING = "original_missing"  # the file left the inbox before it was graded


class Incident(StrEnum):
    """Things the worker noticed and repaired or retried (``events.code``); the audit counts them."""

    ARCHIVE_FAILED = "archive_failed"  # a move out of the inbox failed (full or read-only disk); retried
    PARTIAL_COPY_REMOVED = "partial_copy_removed"  # a half-copied file left in archive/ or rejected/ by a crash
    NOT_MOVED = "not_moved"  # a recorded file was gone from the inbox when its move came
    RESULT_STATE_REPAIRED = "result_state_repaired"  # an image with a stored result was not marked graded
    ORPHAN_REPORT_REMOVED = "orphan_report_removed"  # a report PDF on disk that the database never recorded
    REPORT_FILE_MISSING = "report_file_missing"  # a recorded report whose PDF is gone; the visit is rendered again
    REPORT_FAILED = "report_failed"  # rendering failed; retried by the catch-up
    FILE_UNREADABLE = "file_unreadable"  # an inbox file the worker may not or cannot read (permissions, I/O); retried


# What each code means, in the words a programme manager reads beside it in the audit (the codes themselves are
# stable keys for exports and queries; the audit printed them bare, and "identity" next to "identity_conflict" read
# as jargon: a manager-style check). The reason file of each refused file says exactly what was wrong with it.
CODE_TEXT: dict[str, str] = {
    RejectReason.UNSUPPORTED_TYPE: "not an image type the worker reads",
    RejectReason.IDENTITY: "patient, eye or exam date missing or invalid (file name, sidecar or DICOM tags; camera "
                           "numbering such as IMG0001 without a sidecar; a date in the future)",
    RejectReason.IDENTITY_CONFLICT: "the same photo already recorded for another patient or eye",
    RejectReason.UNREADABLE: "no image could be read from the file",
    RejectReason.INCOMPLETE: "the image data stops before its end (truncated or corrupt)",
    RejectReason.EMPTY: "an empty file (0 bytes)",
    RejectReason.TOO_LARGE: "over the configured size limit",
    RejectReason.MULTI_PAGE: "more pages than the configured limit",
    RejectReason.NOT_A_FILE: "a link, folder or device in the inbox",
    RejectReason.LEFT_BEHIND: "a hidden or temporary file left unchanged too long",
    RejectReason.TOO_SMALL: "too few pixels for a fundus photograph",
    RejectReason.TOO_DARK: "too dark (refused before 0005; now recorded as ungradable)",
    RejectReason.NOT_FUNDUS: "not a colour fundus photograph",
    FailReason.GRADING: "grading failed; the file stays in the inbox and is retried",
    FailReason.STORING: "storing the result failed; retried",
    FailReason.ORIGINAL_MISSING: "the file left the inbox before it was graded",
    Incident.ARCHIVE_FAILED: "a move out of the inbox failed (full or read-only disk); retried",
    Incident.PARTIAL_COPY_REMOVED: "a half-copied file left by a crash, removed",
    Incident.NOT_MOVED: "a recorded file was gone from the inbox when it was to be moved",
    Incident.RESULT_STATE_REPAIRED: "a graded photo not marked graded, repaired",
    Incident.ORPHAN_REPORT_REMOVED: "a report file the database never recorded, removed",
    Incident.REPORT_FILE_MISSING: "a recorded report whose file was gone; made again",
    Incident.REPORT_FAILED: "a report failed to render; retried",
    Incident.FILE_UNREADABLE: "an inbox file that could not be read (permissions, I/O); retried",
}


def code_text(code: str) -> str:
    """``code`` with what it means (``identity (patient, eye or exam date ...)``), or the code alone if unknown."""
    text = CODE_TEXT.get(code)
    return f"{code} ({text})" if text else code


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


__all__ = ["CODE_TEXT", "FailReason", "Incident", "RejectReason", "Rejection", "code_text"]
