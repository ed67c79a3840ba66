"""Intake layer: notice new fundus exports in the inbox, wait until they stop changing, identify them.

Nothing here runs the model, touches the database or moves files; the pipeline does that with what
:class:`Intake` hands it.

How files reach the pipeline
----------------------------
* :class:`InboxWatcher` runs a watchdog observer (``native`` = inotify/FSEvents/ReadDirectoryChanges,
  ``polling`` = :class:`~watchdog.observers.polling.PollingObserver`). Its handler only enqueues paths.
  Native events are not delivered for changes made by *other machines* on a network share, so
  ``observer = "polling"`` is the safe choice for SMB/NFS inboxes.
* :func:`sweep` lists the inbox directly; :class:`Intake` sweeps at start and every
  ``sweep_interval`` seconds, which catches files present before start and any missed events.
* :class:`StabilityTracker` decides when a file has stopped changing: its ``(size, mtime_ns)`` must
  stay the same for ``stable_seconds`` of *observed* time (the file's own mtime is not trusted: share
  clocks drift). A file that stays at 0 bytes is reported after ``10 x stable_seconds`` so the
  pipeline can reject it as empty instead of skipping it forever.

Only the top level of the inbox is considered, and nothing in it is skipped for ever except the inbox's own
placeholder (an empty ``.gitkeep``, :func:`is_placeholder`). Sub-folders,
symlinks, pipes and devices are returned like files (never followed or recursed into) and
:func:`stray_rejection` says why the pipeline refuses them. Temporary/hidden names (see :func:`is_ignored`)
are left alone while they may still be in use; once unchanged for ``abandoned_after`` seconds they are
returned too, and refused with a reason. Regular files with an unsupported suffix are returned like any
other file and :func:`check_supported` raises the :class:`~screening.rejection.Rejection` the pipeline records.

Reading: :func:`read_content` reads a file once, whole, without following links, and hashes exactly the
bytes it read (the pipeline decodes those same bytes); a file that changes while it is read raises
:class:`StillChanging` and is read again later.

Naming: :func:`parse_identity` reads ``patient``/``eye``/``date`` from the file stem using the
configured ``filename_patterns`` (raising a :class:`~screening.rejection.Rejection` when it cannot), and a sidecar ``<stem>.json`` (or ``<name>.json``) with keys
``patient_id``, ``eye``, ``exam_date`` complements/overrides what the name gave. The sidecar is a
companion of the image: the pipeline should move it together with the image (see :func:`sidecar_for`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from training.common import MAX_ID_LENGTH, is_safe_id, sha256_file

from .rejection import Rejection, RejectReason

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers.api import BaseObserver

    from screening.config import ScreeningSettings

log = logging.getLogger(__name__)

__all__ = [
    "EMPTY_FILE_FACTOR",
    "MAX_RETRY_DELAY",
    "PLACEHOLDER_NAME",
    "SUPPORTED_SUFFIXES",
    "Content",
    "Identity",
    "InboxWatcher",
    "Intake",
    "StabilityTracker",
    "StillChanging",
    "check_supported",
    "entry_sha256",
    "is_candidate",
    "is_ignored",
    "is_placeholder",
    "is_supported",
    "normalise_eye",
    "parse_identity",
    "read_content",
    "sidecar_for",
    "stray_rejection",
    "sweep",
    "wait_until_stable",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
"""Suffixes the pipeline accepts (compared lower-cased). A DICOM file is recognised by its content whatever its
name (:func:`screening.dicom.is_dicom`); these two suffixes only make a DICOM-named file count as one."""

EMPTY_FILE_FACTOR = 10.0
"""A 0-byte file is reported as stable after this many ``stable_seconds`` (so it can be rejected), or as soon
as its modification time is that old (a one-shot run does not wait for an empty file left long ago)."""

MAX_RETRY_DELAY = 3600.0
"""Longest wait, in seconds, before a file whose handling failed or was put off is tried again."""

PLACEHOLDER_NAME = ".gitkeep"
"""The one name in the inbox the worker leaves alone for ever, when it is an empty regular file
(:func:`is_placeholder`)."""

_IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".json")
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_EYES = {"l": "L", "left": "L", "le": "L", "os": "L", "r": "R", "right": "R", "re": "R", "od": "R"}
_SIDECAR_MAX_BYTES = 64 * 1024
_NAMING_HINT = ("name files like Patient001_L.jpg or <id>_<eye>_<yyyymmdd>.jpg (eye L, R, LE, RE, OS, OD, left or "
                "right; date YYYYMMDD or YYYY-MM-DD)")
# A camera's or PACS export's own file numbering (IMG0001, DSC01234, PXL_..., IM000101, scan8), which the
# "<letters><digits>" patterns would otherwise read as a patient id: two patients' IMG0001.jpg then joined one visit.
CAMERA_NUMBERING = re.compile(r"(?:IMG|IMAG|IMAGE|IM|DSC|DSCN|DSCF|DCIM|PICT|PXL|CIMG|GOPR|DJI|MVIMG|SCAN)[_-]?\d+",
                              re.IGNORECASE)


# --------------------------------------------------------------------------------------------- names


def is_ignored(name: str | os.PathLike[str]) -> bool:
    """True for names intake never picks up: temporary/hidden files (until renamed) and sidecar JSON.

    Dotfiles, Office lock files ``~$...``, ``*.part``, ``*.tmp``, ``*.crdownload``, ``*.partial``,
    ``Thumbs.db``, ``desktop.ini`` and ``*.json`` sidecars (read together with their image).
    Only the last path component is looked at; comparisons are case-insensitive.
    """
    base = os.path.basename(os.fspath(name).rstrip("/\\"))
    low = base.lower()
    if not base or base.startswith(".") or base.startswith("~$"):
        return True
    return low in _IGNORED_NAMES or low.endswith(_IGNORED_SUFFIXES)


def is_supported(path: str | os.PathLike[str]) -> bool:
    """True when the file's suffix is one of :data:`SUPPORTED_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def check_supported(path: str | os.PathLike[str]) -> None:
    """Raises a :class:`Rejection` (``unsupported_type``) unless the suffix is one of :data:`SUPPORTED_SUFFIXES`."""
    p = Path(path)
    if is_supported(p):
        return
    allowed = ", ".join(sorted(SUPPORTED_SUFFIXES)) + " (DICOM files whatever their name)"
    if not p.suffix:
        raise Rejection(RejectReason.UNSUPPORTED_TYPE, f"'{p.name}' has no file extension and is not a DICOM file; "
                                                       f"supported image types are {allowed}")
    raise Rejection(RejectReason.UNSUPPORTED_TYPE,
                    f"'{p.name}' has unsupported file type '{p.suffix}'; supported image types are {allowed}")


# ------------------------------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Identity:
    """Who and what a photo is, from its name, sidecar or DICOM tags. ``patient_id`` stays out of ``repr``."""

    patient_id: str = field(repr=False)
    eye: Literal["L", "R"] | None  # None: not stated; the intake checks read it from the photo or refuse the file
    exam_date: date | None = None  # None: the pipeline uses the drop date
    device: str | None = None  # the camera, where the file says (DICOM Manufacturer and model)
    # where the stated eye came from: "file name", "sidecar <name>" or "DICOM <tag>" (screening.checks.EyeCheck.source)
    eye_from: str | None = None


def _unidentified(message: str) -> Rejection:
    return Rejection(RejectReason.IDENTITY, message)


def sidecar_for(path: str | os.PathLike[str]) -> Path | None:
    """The sidecar JSON of an image if one exists: ``<stem>.json`` first, then ``<name>.json``."""
    p = Path(path)
    for cand in (p.with_suffix(".json"), p.with_name(p.name + ".json")):
        if cand != p and cand.is_file():
            return cand
    return None


def normalise_eye(value: object) -> Literal["L", "R"] | None:
    """``L``/``R``/``LE``/``RE``/``OS``/``OD``/``left``/``right`` (any case) -> ``"L"`` or ``"R"``; None for
    anything else."""
    if not isinstance(value, str):
        return None
    eye = _EYES.get(value.strip().lower())
    return None if eye is None else cast(Literal["L", "R"], eye)


def _parse_date(value: str) -> date | None:
    """``YYYYMMDD`` or ``YYYY-MM-DD`` (``_`` also accepted as a separator), ASCII digits only -> date; None if
    invalid (``\\d`` would also match other scripts' digits, which ``int`` then reads as numbers)."""
    s = value.strip()
    m = re.fullmatch(r"([0-9]{4})[-_]?([0-9]{2})[-_]?([0-9]{2})", s)
    if m is None:
        return None
    try:
        d = date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    return d if d.year >= 1900 else None


# Public name for the grading-centre import (screening.review), which reads exam dates written the same ways.
parse_exam_date = _parse_date


def _match_patterns(stem: str, patterns: Sequence[str | re.Pattern[str]]) -> dict[str, str | None] | None:
    """First pattern that matches, as a dict of its named groups; exact case first, then ignoring case."""
    for flags in (0, re.IGNORECASE):
        for pat in patterns:
            rx = re.compile(pat.pattern, pat.flags | flags) if isinstance(pat, re.Pattern) else re.compile(pat, flags)
            m = rx.search(stem)
            if m is not None and m.groupdict().get("patient"):
                return m.groupdict()
    return None


# Eye words seen in clinics' names that the patterns do not take (compared lower-cased, without '-', '.', ' '):
# both eyes, short forms, other languages. A name with one of these is refused, saying so.
_NOT_EYES = frozenset({
    "ou", "both", "rt", "lt", "reye", "leye", "righteye", "lefteye", "eyer", "eyel", "eyeright", "eyeleft",
    "rechts", "links", "droit", "droite", "gauche", "og", "derecho", "izquierdo", "oi", "destro", "sinistro",
})


def _as_date(year: str, month: str, day: str) -> date | None:
    try:
        return date(int(year), int(month), int(day))
    except ValueError:
        return None


def _date_problem(part: str) -> str | None:
    """What is wrong with ``part`` when it looks like a date written in a form the names do not take."""
    if re.fullmatch(r"[0-9]{8}|[0-9]{4}-[0-9]{2}-[0-9]{2}", part):
        return None  # a form the patterns take: the name fails for another reason
    m = re.fullmatch(r"([0-9]{1,4})[-.]([0-9]{1,2})[-.]([0-9]{1,4})", part)
    if m and len(m[1]) == 4 and len(m[3]) <= 2:
        readings = {_as_date(m[1], m[2], m[3])}  # year-month-day
    elif m and len(m[1]) <= 2 and len(m[3]) == 4:
        readings = {_as_date(m[3], m[2], m[1]), _as_date(m[3], m[1], m[2])}  # day-month-year, month-day-year
    elif (m and len(m[1]) <= 2 and len(m[3]) == 2) or re.fullmatch(r"[0-9]{6}", part):
        # a two-digit year (201125, 20.11.25): which end is the year cannot be told, so no example; and it must
        # read as some date, as a camera's time (143015) does not
        a, b, c = m.groups() if m else (part[:2], part[2:4], part[4:])
        if not {_as_date("20" + a, b, c), _as_date("20" + c, b, a), _as_date("20" + c, a, b)} - {None}:
            return None
        readings = set()
    else:
        return None
    readings.discard(None)
    example = f" ({readings.pop():%Y%m%d})" if len(readings) == 1 else ""
    return f"'{part}' looks like a date; write dates as YYYYMMDD{example} or YYYY-MM-DD"


# What a computer adds to the name of a copy: "A1234_OD_20251120 (1)", "... - Copy", "... - Copy (2)", "... copy 2".
_COPY_SUFFIX = re.compile(r"(?:\s*\(\d{1,3}\)|\s*-\s*copy(?:\s*\(\d{1,3}\))?|\s+copy(?:\s+\d{1,3})?)$", re.IGNORECASE)


# An eye word the names take (_EYES) between other separators than '_'
_EYE_WORD = re.compile(r"[\s.-]+(" + "|".join(sorted(_EYES, key=len, reverse=True)) + r")([\s.-]+|$)", re.IGNORECASE)


def _taken(stem: str, patterns: Sequence[str | re.Pattern[str]]) -> bool:
    """Whether the patterns would take ``stem`` as a patient's photo (a valid id, not a camera's numbering)."""
    groups = _match_patterns(stem, patterns)
    patient = groups.get("patient") if groups else None
    return bool(patient) and is_safe_id(patient) and not CAMERA_NUMBERING.fullmatch(patient or "")


def _renamed(stem: str, suffix: str, patterns: Sequence[str | re.Pattern[str]]) -> str | None:
    """How to rename a file whose name the patterns take once a copy's number is dropped or its parts are
    separated by ``_``; None when neither helps. The suggestion is checked against the patterns in use, so it is
    never a name that would be refused in turn."""
    copy = _COPY_SUFFIX.search(stem)
    bases = [stem] if copy is None else [stem[:copy.start()], stem]
    for base in bases:
        separated = [re.sub(r"\s+", "_", base)]
        # '_' on both sides of an eye word only: a hyphen in the id (AB-12) or a YYYY-MM-DD date stays
        separated.append(_EYE_WORD.sub(lambda m: f"_{m[1]}{'_' if m[2] else ''}", base))
        separated.append(re.sub(r"[\s.]+", "_", base))
        separated.append(re.sub(r"[\s.-]+", "_", base))
        separated.append(re.sub(r"(?<![0-9])([0-9]{4})_([0-9]{2})_([0-9]{2})(?![0-9])", r"\1-\2-\3", separated[-1]))
        for candidate in dict.fromkeys(separated):  # in order, each once
            if candidate == stem or not _taken(candidate, patterns):
                continue
            name = candidate + suffix
            if base != stem and copy is not None:
                second = f", or {candidate}_2{suffix} if it is a second photo of that eye" if _taken(
                    candidate + "_2", patterns) else ""
                return (f"'{copy.group().strip()}' at its end looks like what a computer adds to a copy's name: "
                        f"rename it {name}{second}")
            return f"separate the patient id, eye and date with '_': rename it {name}"
    return None


def _diagnose_name(stem: str, suffix: str, patterns: Sequence[str | re.Pattern[str]]) -> str | None:
    """The first thing recognisably wrong with a file name no pattern matched, or None.

    Without this such a name was refused as having "no patient id", although the id was there and the date
    (``E1011_R_20.11.2025``) or the eye (``E1011_OU_20251120``) was what the patterns did not take, or the parts
    were separated by spaces or hyphens (``A1234 OD 20251120``), or a computer had numbered a copy
    (``A1234_OD_20251120 (1)``), or the id had a letter outside A-Z (``Müller017_L``). Only the ``_``-separated
    parts after the first are looked at for eyes and dates: the first is the patient id in every default pattern,
    and may be any letters, digits and hyphens. A six-digit part is taken for a date only when no part is a
    date already (``..._20251120_143015`` ends in a time).
    """
    renamed = _renamed(stem, suffix, patterns)
    if renamed:
        return renamed
    parts = stem.split("_")[1:]
    has_date = any(re.fullmatch(r"[0-9]{8}|[0-9]{4}-[0-9]{2}-[0-9]{2}", part) for part in parts)
    for part in parts:
        if re.sub(r"[-. ]", "", part.lower()) in _NOT_EYES:
            return (f"'{part}' is not an eye the names use: write R, RE, OD or right (L, LE, OS or left), "
                    "one photo per eye")
        problem = None if has_date and part.isdigit() else _date_problem(part)
        if problem:
            return problem
    odd = sorted({c for c in stem if not (c.isascii() and (c.isalnum() or c in "_-"))})
    if odd:
        shown = ", ".join("a space" if c == " " else f"'{c}'" for c in odd[:5])
        letter = any(c.isalpha() for c in odd)
        return (f"it has characters the names do not take ({shown}): names use only the letters A-Z and a-z, "
                "the digits 0-9 and '-', with '_' between the parts"
                + (" (write a patient id with another letter as the clinic's system writes it in these)" if letter else ""))
    return None


def _read_sidecar(sidecar: Path) -> dict[str, object]:
    try:
        size = sidecar.stat().st_size
        if size > _SIDECAR_MAX_BYTES:
            raise _unidentified(f"sidecar {sidecar.name} is too large ({size} bytes; at most {_SIDECAR_MAX_BYTES})")
        data = json.loads(sidecar.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unidentified(f"sidecar {sidecar.name} could not be read as JSON: {exc}") from None
    # any other OSError (no permission, an I/O error) propagates: the photo then waits in the inbox, it is not refused
    if not isinstance(data, dict):
        raise _unidentified(f"sidecar {sidecar.name} must hold a JSON object with patient_id, eye, exam_date")
    return data


def parse_identity(
    path: str | os.PathLike[str], patterns: Sequence[str | re.Pattern[str]], today: date | None = None,
) -> Identity:
    """Patient, eye and exam date of an image from its name and/or sidecar JSON; raises a :class:`Rejection`
    (``identity``) saying what is missing or invalid and how to name the file.

    The patterns are tried on the file stem in order (as written, then case-insensitively); groups
    ``patient``, ``eye``, ``date`` are used when present; a name none matches, without a sidecar patient id, is
    refused saying what in it looks wrong (:func:`_diagnose_name`). A sidecar (:func:`sidecar_for`) with keys
    ``patient_id``, ``eye``, ``exam_date`` (``YYYY-MM-DD`` or null) overrides/complements the name.
    An absent eye is allowed (``eye`` None): the worker then reads it from the photo when that is clear enough
    (:mod:`screening.checks`) and refuses the file otherwise; an eye that is given but invalid is refused here.
    The result is validated: patient id ``[A-Za-z0-9_-]{1,64}`` (:func:`training.common.is_safe_id`: no
    path separators or ``..``),
    eye one of L/R/LE/RE/OD/OS/left/right (OD = right, OS = left), date a real calendar date, not after ``today``
    (default: the local date; one day of slack for a camera whose clock runs ahead of this machine's).
    """
    p = Path(path)
    groups = _match_patterns(p.stem, patterns) or {}
    patient: object = groups.get("patient")
    eye_raw: object = groups.get("eye")
    date_raw: object = groups.get("date")
    source = {"patient": "file name", "eye": "file name", "date": "file name"}

    sidecar = sidecar_for(p)
    if sidecar is not None:
        data = _read_sidecar(sidecar)
        for key, slot in (("patient_id", "patient"), ("eye", "eye"), ("exam_date", "date")):
            if key in data and data[key] is not None:
                value = data[key]
                if key == "patient_id" and isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if not isinstance(value, str):
                    raise _unidentified(f"sidecar {sidecar.name}: '{key}' must be a string, got {value!r}")
                if slot == "patient":
                    patient = value
                elif slot == "eye":
                    eye_raw = value
                else:
                    date_raw = value
                source[slot] = f"sidecar {sidecar.name}"

    if not patient:
        side = p.with_suffix(".json").name
        problem = _diagnose_name(p.stem, p.suffix, patterns)
        if problem:
            raise _unidentified(
                f"cannot read the file name '{p.name}': {problem}; or put a sidecar {side} with its patient_id; "
                f"{_NAMING_HINT}")
        raise _unidentified(f"no patient id in the file name '{p.name}' and no sidecar {side}; {_NAMING_HINT}")
    if not isinstance(patient, str) or not is_safe_id(patient):
        raise _unidentified(
            f"invalid patient id {patient!r} (from {source['patient']}): use 1-{MAX_ID_LENGTH} letters, digits, '_' or '-'"
        )
    if source["patient"] == "file name" and CAMERA_NUMBERING.fullmatch(patient):
        raise _unidentified(
            f"'{p.name}' is named by a camera's own numbering: {patient!r} is not taken as a patient id; "
            f"{_NAMING_HINT}, or put a sidecar {p.with_suffix('.json').name} with its patient_id in the inbox "
            "before the photo (or with it)")

    eye: Literal["L", "R"] | None = None
    if eye_raw:
        eye = normalise_eye(eye_raw)
        if eye is None:
            raise _unidentified(
                f"invalid eye {eye_raw!r} (from {source['eye']}): use R, RE, OD or right (L, LE, OS or left)")

    exam_date: date | None = None
    if date_raw:
        exam_date = _parse_date(str(date_raw))
        if exam_date is None:
            raise _unidentified(
                f"invalid exam date {date_raw!r} (from {source['date']}): expected a real date as YYYYMMDD or YYYY-MM-DD"
            )
        latest = (today or date.today()) + timedelta(days=1)
        if exam_date > latest:
            raise _unidentified(
                f"exam date {exam_date.isoformat()} (from {source['date']}) is in the future; check the date in the "
                "file name or sidecar (and the camera's clock)"
            )
    return Identity(patient_id=patient, eye=eye, exam_date=exam_date, eye_from=source["eye"] if eye else None)


# ------------------------------------------------------------------------------------------ stability

Signature = tuple[int, int]


def _signature(path: Path) -> Signature | None:
    """``(size, mtime_ns)`` of an inbox entry (symlinks not followed); None if gone. Only a regular file can
    count as empty: any other entry (a link, a folder) reports a size of at least 1."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size if stat.S_ISREG(st.st_mode) else max(st.st_size, 1), st.st_mtime_ns)


def _mtime_age(path: Path) -> float:
    """Seconds since ``path`` was last modified, by the wall clock (0 when it is gone)."""
    try:
        return time.time() - float(os.lstat(path).st_mtime)
    except OSError:
        return 0.0


class StabilityTracker:
    """Decides when files have stopped changing.

    ``observe(path)`` is True once the file's ``(size, mtime_ns)`` has been unchanged for
    ``stable_seconds`` since it was first seen with that signature. A vanished (or non-regular) file is
    forgotten. A 0-byte file only counts as stable after ``empty_factor x stable_seconds`` so the
    pipeline can reject it as empty. Not thread-safe: use from one thread.
    """

    def __init__(
        self,
        stable_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        empty_factor: float = EMPTY_FILE_FACTOR,
    ) -> None:
        if stable_seconds < 0:
            raise ValueError("stable_seconds must be >= 0")
        self.stable_seconds = float(stable_seconds)
        self.empty_seconds = float(stable_seconds) * empty_factor
        self.clock = clock
        self._seen: dict[Path, tuple[Signature, float]] = {}

    def observe(self, path: str | os.PathLike[str], now: float | None = None) -> bool:
        p = Path(path)
        sig = _signature(p)
        if sig is None:
            self._seen.pop(p, None)
            return False
        t = self.clock() if now is None else now
        prev = self._seen.get(p)
        if prev is None or prev[0] != sig:
            self._seen[p] = (sig, t)
            since = t
        else:
            since = prev[1]
        needed = self.stable_seconds
        if sig[0] == 0 and _mtime_age(p) < self.empty_seconds:  # empty and recent: a copy may be starting
            needed = self.empty_seconds
        return t - since >= needed

    def forget(self, path: str | os.PathLike[str]) -> None:
        self._seen.pop(Path(path), None)

    def signature(self, path: str | os.PathLike[str]) -> Signature | None:
        """The ``(size, mtime_ns)`` last observed for ``path`` (None if not tracked)."""
        seen = self._seen.get(Path(path))
        return seen[0] if seen else None

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(path) in self._seen

    def __len__(self) -> int:
        return len(self._seen)


def wait_until_stable(
    paths: Iterable[str | os.PathLike[str]],
    timeout: float,
    *,
    stable_seconds: float = 2.0,
    interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Path]:
    """Block until every path is stable or ``timeout`` seconds pass; returns the stable ones (input order).

    Vanished files are dropped. Files still changing at the deadline are left out of the result.
    """
    todo = [Path(p) for p in paths]
    tracker = StabilityTracker(stable_seconds, clock)
    step = interval if interval is not None else min(0.25, max(stable_seconds / 4, 0.01))
    deadline = clock() + timeout
    stable: set[Path] = set()
    while True:
        now = clock()
        for p in todo:
            if p not in stable and tracker.observe(p, now):
                stable.add(p)
        todo = [p for p in todo if p in stable or _signature(p) is not None]
        if all(p in stable for p in todo) or now >= deadline:
            return [p for p in todo if p in stable]
        sleep(min(step, max(deadline - now, 0.0)))


# -------------------------------------------------------------------------------------------- sweep


def _has_photo(sidecar: Path) -> bool:
    """True when a file beside ``sidecar`` would read it as its sidecar (:func:`sidecar_for`)."""
    stem = sidecar.name[: -len(".json")] if sidecar.name.lower().endswith(".json") else sidecar.stem
    try:
        names = os.listdir(sidecar.parent)
    except OSError:
        return False
    return any(n != sidecar.name and (n == stem or Path(n).stem == stem) and not is_ignored(n) for n in names)


def is_placeholder(name: str, st: os.stat_result) -> bool:
    """True for the inbox's own placeholder: exactly :data:`PLACEHOLDER_NAME`, an empty regular file. The
    repository ships it so that ``inbox/`` exists in a fresh checkout; refusing it as a hidden name left behind
    moved the project's own file to ``rejected/``. Anything else under that name (a photo hidden there, a link,
    a folder) is refused like any hidden name."""
    return name == PLACEHOLDER_NAME and stat.S_ISREG(st.st_mode) and st.st_size == 0


def is_candidate(path: Path, st: os.stat_result, abandoned_after: float | None, now: float | None = None) -> bool:
    """Whether an inbox entry is for the pipeline now: every entry except the inbox placeholder
    (:func:`is_placeholder`, never), a hidden or temporary name (:func:`is_ignored`) that changed less than
    ``abandoned_after`` seconds ago (None: never), or a sidecar whose photo is beside it (it travels with the
    photo)."""
    if is_placeholder(path.name, st):
        return False
    if not is_ignored(path.name):
        return True
    if abandoned_after is None or (now if now is not None else time.time()) - st.st_mtime < abandoned_after:
        return False
    return not (path.name.lower().endswith(".json") and stat.S_ISREG(st.st_mode) and _has_photo(path))


def sweep(inbox: str | os.PathLike[str], abandoned_after: float | None = None) -> list[Path]:
    """Candidate entries directly in ``inbox`` (:func:`is_candidate`), oldest mtime first (name breaks ties).

    Non-recursive: sub-folders, symlinks and other non-regular entries are listed (never followed) for the
    pipeline to refuse with a reason (:func:`stray_rejection`); hidden and temporary names only once
    ``abandoned_after`` seconds old. Unsupported suffixes are included (the pipeline rejects them with
    :func:`check_supported`). Raises ``OSError`` if the inbox itself cannot be listed.
    """
    root = Path(inbox)
    found: list[tuple[int, str, Path]] = []
    now = time.time()
    with os.scandir(root) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # vanished between listing and stat
                continue
            if is_candidate(root / entry.name, st, abandoned_after, now):
                found.append((st.st_mtime_ns, entry.name, root / entry.name))
    found.sort(key=lambda t: (t[0], t[1]))
    return [p for _, _, p in found]


# ------------------------------------------------------------------------------------ entries, reading

_KINDS = ((stat.S_ISLNK, "a link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _kind(st: os.stat_result) -> str | None:
    """What a non-regular entry is, in words; None for a regular file."""
    return next((name for test, name in _KINDS if test(st.st_mode)), None if stat.S_ISREG(st.st_mode) else "not a file")


def stray_rejection(path: Path, st: os.stat_result, abandoned_after: float, now: float | None = None) -> Rejection | None:
    """Why the inbox entry ``path`` (its ``lstat`` is ``st``) is not a photo to read, or None when it is a
    regular file with an ordinary name. Links are described, never followed."""
    kind = _kind(st)
    if kind == "a link":
        return Rejection(RejectReason.NOT_A_FILE, f"'{path.name}' is a link, not a file; links are never followed. "
                         "Copy the photo itself into the inbox")
    if kind == "a folder":
        return Rejection(RejectReason.NOT_A_FILE, f"'{path.name}' is a folder; only files directly in the inbox are "
                         "read. Move the photos out of it into the inbox")
    if kind is not None:
        return Rejection(RejectReason.NOT_A_FILE, f"'{path.name}' is {kind}, not a file; copy photos into the inbox as files")
    if is_ignored(path.name) and is_candidate(path, st, abandoned_after, now):
        unchanged = (f"{duration_text((now if now is not None else time.time()) - st.st_mtime)} (the limit, [screening] "
                     f"abandoned_after, is {duration_text(abandoned_after)})")
        if path.name.lower().endswith(".json"):
            return Rejection(RejectReason.LEFT_BEHIND, f"sidecar '{path.name}' has had no photo of the same name beside "
                             f"it and has not changed for {unchanged}; copy the photo and its sidecar into the inbox together")
        return Rejection(RejectReason.LEFT_BEHIND, f"'{path.name}' has a hidden or temporary name and has not changed "
                         f"for {unchanged} (an interrupted copy?); if it is a photo, give it an ordinary name "
                         "(no leading '.', no .part/.tmp ending) and copy it into the inbox again")
    return None


def text_name(name: str) -> str | None:
    """``name`` as text where it is not valid UTF-8 (a share or camera with another character set wrote it: Python
    lists such bytes as surrogates, which no database or log line can hold), each such byte shown as ``\\xNN``;
    None when ``name`` is already valid text."""
    try:
        name.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def duration_text(seconds: float) -> str:
    """A span for people: "40 s", "12 min", "3.5 h", "2.0 days" (a threshold of 10 s once read "0.00277778 h")."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def entry_sha256(path: Path, st: os.stat_result | None = None) -> str:
    """The identity a drop of ``path`` is recorded under: the SHA-256 of a regular file's bytes; for anything
    else (never opened, never followed) the SHA-256 of what it is and its name (and a link's target text)."""
    st = st if st is not None else os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        return sha256_file(path)
    described = f"{_kind(st)}\0{path.name}"
    if stat.S_ISLNK(st.st_mode):
        described += "\0" + os.readlink(path)
    return hashlib.sha256(described.encode("utf-8", "surrogateescape")).hexdigest()


class StillChanging(Exception):
    """The file changed while it was read: read it again once it is stable."""


@dataclass(frozen=True)
class Content:
    """A file read once: ``data`` are the bytes hashed into ``sha256`` (None when the file is larger than the
    limit: then it was hashed in blocks and never held in memory)."""

    data: bytes | None
    sha256: str
    size: int
    mtime_ns: int


def read_content(path: Path, max_bytes: int) -> Content:
    """Read the regular file ``path`` whole, without following a link, and hash exactly what was read.

    Raises :class:`StillChanging` when its size or modification time moved during the read,
    FileNotFoundError when it is gone, a :class:`Rejection` (``not_a_file``) when a link or another
    kind of entry took its name since it was listed, and any other OSError (no permission, an I/O error) as it
    is: the caller leaves such a file in the inbox."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a link
            raise Rejection(RejectReason.NOT_A_FILE, f"'{path.name}' is a link, not a file; links are never followed. "
                            "Copy the photo itself into the inbox") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise Rejection(RejectReason.NOT_A_FILE, f"'{path.name}' is {_kind(before)}, not a file")
        digest = hashlib.sha256()
        data: bytes | None = None
        if before.st_size <= max_bytes:
            data = fh.read(max_bytes + 1)
            digest.update(data)
        if data is None or len(data) > max_bytes:
            data = None
            while block := fh.read(1 << 20):
                digest.update(block)
        after = os.fstat(fd)
        size = after.st_size
        if (before.st_size, before.st_mtime_ns) != (size, after.st_mtime_ns) or (data is not None and len(data) != size):
            raise StillChanging(path)
    return Content(data, digest.hexdigest(), size, after.st_mtime_ns)


# ------------------------------------------------------------------------------------------- watcher


def _event_path(raw: str | bytes) -> Path:
    return Path(os.fsdecode(raw))


def _make_handler(enqueue: Callable[[Path], None]) -> FileSystemEventHandler:
    from watchdog.events import FileSystemEventHandler

    class _EnqueueHandler(FileSystemEventHandler):
        """Only enqueues paths; all work happens in the consumer thread."""

        def on_created(self, event: FileSystemEvent) -> None:
            if not event.is_directory:
                enqueue(_event_path(event.src_path))

        def on_modified(self, event: FileSystemEvent) -> None:
            if not event.is_directory:
                enqueue(_event_path(event.src_path))

        def on_closed(self, event: FileSystemEvent) -> None:  # inotify close-after-write: a good "maybe done" hint
            if not event.is_directory:
                enqueue(_event_path(event.src_path))

        def on_moved(self, event: FileSystemEvent) -> None:
            if not event.is_directory and event.dest_path:
                enqueue(_event_path(event.dest_path))

    return _EnqueueHandler()


class InboxWatcher:
    """Watchdog observer on the inbox (non-recursive) whose handler only enqueues file paths.

    ``observer="native"`` uses :class:`watchdog.observers.Observer`; if it cannot start (e.g. the
    inotify watch limit is reached) it falls back to polling with a warning. ``"polling"`` uses
    :class:`~watchdog.observers.polling.PollingObserver` with ``timeout=poll_interval``.
    """

    def __init__(
        self,
        inbox: str | os.PathLike[str],
        observer: Literal["native", "polling"] = "native",
        poll_interval: float = 1.0,
    ) -> None:
        if observer not in ("native", "polling"):
            raise ValueError(f"observer must be 'native' or 'polling', got {observer!r}")
        self.inbox = Path(os.path.abspath(inbox))
        self.observer_kind = observer
        self.poll_interval = float(poll_interval)
        self.active_kind: str | None = None
        self._queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._observer: BaseObserver | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ScreeningSettings) -> InboxWatcher:
        return cls(settings.inbox, settings.observer, settings.poll_interval)

    def _enqueue(self, path: Path) -> None:
        self._queue.put(path)

    def _new_observer(self, kind: str) -> BaseObserver:
        if kind == "polling":
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.poll_interval)
        from watchdog.observers import Observer

        return Observer()

    def start(self) -> None:
        with self._lock:
            if self._observer is not None:
                return
            if not self.inbox.is_dir():
                raise FileNotFoundError(f"inbox folder {self.inbox} does not exist (is the share mounted?)")
            handler = _make_handler(self._enqueue)
            kinds = [self.observer_kind] + (["polling"] if self.observer_kind == "native" else [])
            last_exc: Exception | None = None
            for kind in kinds:
                obs = self._new_observer(kind)
                try:
                    obs.schedule(handler, str(self.inbox), recursive=False)
                    obs.start()
                except OSError as exc:
                    last_exc = exc
                    log.warning("could not start %s observer on %s: %s", kind, self.inbox, exc)
                    continue
                self._observer, self.active_kind = obs, kind
                if kind != self.observer_kind:
                    log.warning("watching %s with the polling observer instead", self.inbox)
                return
            assert last_exc is not None
            raise last_exc

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            obs.join(timeout)

    @property
    def running(self) -> bool:
        return self._observer is not None

    def pending(self, timeout: float | None = 0.0) -> set[Path]:
        """Drain the queue: wait up to ``timeout`` s for the first path (0 = don't wait), then take all queued."""
        out: set[Path] = set()
        try:
            if timeout is None or timeout > 0:
                out.add(self._queue.get(timeout=timeout))
            while True:
                out.add(self._queue.get_nowait())
        except queue.Empty:
            pass
        return out

    def __enter__(self) -> InboxWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------- intake


@dataclass(frozen=True)
class _Retry:
    signature: Signature | None  # as it was when the retry was asked for
    not_before: float
    attempts: int


class Intake:
    """Watcher + periodic sweep + stability tracking: ``poll()`` returns files ready to process now.

    Each path is returned once; it is returned again only if its ``(size, mtime_ns)`` changed after it
    was returned (normally the pipeline moves it out of the inbox), or once :meth:`retry_later` asked for it
    (its handling failed or was put off: a locked database, a full archive, a file still incomplete), at the
    first sweep after a delay that doubles with each attempt, or as soon as it changes. ``poll`` works
    without ``start()`` (sweep only); ``start()`` adds the watchdog observer. Use from one thread.
    """

    def __init__(
        self,
        settings: ScreeningSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        watcher: InboxWatcher | None = None,
    ) -> None:
        self.settings = settings
        self.inbox = Path(os.path.abspath(settings.inbox))
        self.clock = clock
        self.sweep_interval = float(settings.sweep_interval)
        self.tracker = StabilityTracker(settings.stable_seconds, clock)
        self.watcher = watcher or InboxWatcher(self.inbox, settings.observer, settings.poll_interval)
        self._pending: set[Path] = set()
        self._returned: dict[Path, Signature] = {}
        self._retry: dict[Path, _Retry] = {}
        self._next_sweep: float | None = None  # None: sweep on the next poll
        self.last_sweep_error: OSError | None = None

    # lifecycle
    def start(self) -> None:
        self.watcher.start()
        self._next_sweep = None

    def stop(self) -> None:
        self.watcher.stop()

    def __enter__(self) -> Intake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pending(self) -> frozenset[Path]:
        """Files seen but not yet stable."""
        return frozenset(self._pending)

    def _key(self, path: Path) -> Path | None:
        """Canonical inbox path for a candidate, or None if it is not directly in the inbox."""
        if not path.name or os.path.normcase(os.path.abspath(path.parent)) != os.path.normcase(str(self.inbox)):
            return None
        return self.inbox / path.name

    def _add(self, path: Path, now: float) -> None:
        key = self._key(path)
        if key is None or key in self._pending:
            return
        try:
            st = os.lstat(key)
        except OSError:
            self._returned.pop(key, None)
            self._retry.pop(key, None)
            return
        if not is_candidate(key, st, self.settings.abandoned_after):
            return
        sig = _signature(key)
        retry = self._retry.get(key)
        if retry is not None:
            if sig == retry.signature and now < retry.not_before:  # unchanged, and not due yet
                return
        elif self._returned.get(key) == sig:  # already handed out and unchanged
            return
        self._pending.add(key)

    def retry_later(self, path: Path, now: float | None = None, *, reset: bool = False) -> float:
        """Hand ``path`` out again later: after ``sweep_interval`` seconds, doubling with each attempt (at most
        :data:`MAX_RETRY_DELAY`), or as soon as it changes. ``reset``: count from the first attempt again (what
        held it up was not the file, e.g. the database was unreachable). Returns the delay."""
        key = self._key(Path(path))
        if key is None:
            return 0.0
        t = self.clock() if now is None else now
        attempts = self._retry[key].attempts + 1 if key in self._retry and not reset else 1
        delay = min(self.sweep_interval * 2.0 ** (attempts - 1), MAX_RETRY_DELAY)
        self._retry[key] = _Retry(self._returned.get(key) or _signature(key), t + delay, attempts)
        self._returned.pop(key, None)
        return delay

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.sweep_interval
        try:
            listed = sweep(self.inbox, self.settings.abandoned_after)
        except OSError as exc:
            if self.last_sweep_error is None or str(exc) != str(self.last_sweep_error):
                log.warning("cannot list inbox %s: %s", self.inbox, exc)
            self.last_sweep_error = exc
            return
        self.last_sweep_error = None
        present = {p for p in self._returned.keys() | self._retry.keys() if os.path.lexists(p)}
        for gone in [p for p in self._returned if p not in present]:
            del self._returned[gone]
        for gone in [p for p in self._retry if p not in present]:
            del self._retry[gone]
        for p in listed:
            self._add(p, now)

    def poll(self, now: float | None = None) -> list[Path]:
        """Files that are stable now (oldest first), drawn from watcher events plus the periodic sweep."""
        t = self.clock() if now is None else now
        for p in self.watcher.pending(0):
            self._add(p, t)
        if self._next_sweep is None or t >= self._next_sweep:
            self._sweep(t)
        ready: list[tuple[int, str, Path]] = []
        for p in list(self._pending):
            if not self.tracker.observe(p, t):
                if _signature(p) is None:  # vanished
                    self._pending.discard(p)
                    self._returned.pop(p, None)
                continue
            sig = self.tracker.signature(p)
            self._pending.discard(p)
            self.tracker.forget(p)
            if sig is None:
                continue
            self._returned[p] = sig
            ready.append((sig[1], p.name, p))
        ready.sort(key=lambda r: (r[0], r[1]))
        return [p for _, _, p in ready]

    def wait_until_stable(self, paths: Iterable[str | os.PathLike[str]], timeout: float) -> list[Path]:
        """One-shot: block until the given files are stable (settings.stable_seconds) or timeout."""
        return wait_until_stable(paths, timeout, stable_seconds=self.settings.stable_seconds, clock=self.clock)
