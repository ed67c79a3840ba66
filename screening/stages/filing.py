"""Moving clinic files out of the inbox: the one place it happens, always after the commit that records them.

Commit, then move. A file leaves the inbox only once the database says what it is (graded, a duplicate,
refused), so a worker killed at any moment leaves either the file in the inbox with nothing recorded (the
next run handles it as new) or a committed record whose file is still in the inbox. That second case is
recognised and finished on restart, without recording anything twice:

* a graded image's own file: the image is ``done``/``reported`` and its ``stored_path`` is still the inbox
  path; :meth:`Filing.archive_image` moves it and records the archive path;
* a duplicate or refused drop: the drop row is committed first; after the move, an event of the drop's
  outcome kind (``duplicate`` / ``rejected``) is logged with the drop's id. A drop without that event is
  *unfiled* (:func:`screening.db.repository.unfiled_drops`): intake finishes its move when the same file
  (name and content) is seen again, and :meth:`Filing.close_stale` closes it at start-up when the file is gone.

Destinations: ``archive/<date>/<sha12>_<name>``, ``archive/<date>/duplicates/...``, and
``rejected/<time>_<sha8>_<name>`` with ``<that>.reason.txt`` beside it (the time is the drop's, so a move
finished after a restart writes the same reason file). A sidecar JSON travels with its image as
``<dest>.json``. Names from users only ever become file names through :func:`training.common.safe_file_name`.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from training.common import atomic_write_text, safe_file_name, sha256_file

from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import Drop, DropOutcome, Image
from ..db.session import session_scope
from ..intake import sidecar_for

log = logging.getLogger("screening")

NOT_FILED = "the file was no longer in the inbox when the worker came to move it"
GONE_AT_START = ("the file was no longer in the inbox when the worker restarted (taken away, or moved just before "
                 "the worker stopped)")


def _reason_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".reason.txt")


def move_out_of_inbox(path: Path, dest: Path) -> None:
    """Move a clinic file (and its sidecar JSON, as ``<dest>.json``) out of the inbox. The caller has committed
    the database state that records the file."""
    sidecar = sidecar_for(path)
    shutil.move(str(path), dest)
    if sidecar is not None:
        shutil.move(str(sidecar), dest.with_name(dest.name + ".json"))


class Filing:
    """Archives graded and duplicate files, moves refused ones to ``rejected/`` with a reason file, and records
    where each went (see the module docstring for the commit-then-move protocol)."""

    def __init__(self, settings: ScreeningSettings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory

    # ------------------------------------------------------------------------------- moves alone
    def _move(self, path: Path, dest: Path) -> Path | None:
        if not path.is_file():
            return None
        try:
            move_out_of_inbox(path, dest)
        except FileNotFoundError:  # taken away between the check and the move
            return None
        return dest

    def archive(self, path: Path, sha: str, sub: str = "") -> Path | None:
        """Move ``path`` to ``archive/<today>/<sub>/``; None when it is no longer there."""
        folder = self.settings.archive / datetime.now().strftime("%Y-%m-%d") / sub
        folder.mkdir(parents=True, exist_ok=True)
        name = safe_file_name(path.name)
        dest = folder / f"{sha[:12]}_{name}"
        n = 1
        while dest.exists():
            dest = folder / f"{sha[:12]}_{n}_{name}"
            n += 1
        return self._move(path, dest)

    def _reject_dest(self, name: str, sha: str, received_at: datetime) -> Path:
        """Where a refused file goes: named after its drop's time, so a move finished after a restart picks the
        same name. A name whose file exists is another drop's; a reason file alone is this one's, left by an
        interrupted move."""
        stem = f"{received_at.astimezone():%Y%m%dT%H%M%S}_{sha[:8]}"
        safe = safe_file_name(name)
        dest = self.settings.rejected / f"{stem}_{safe}"
        n = 1
        while dest.exists():
            dest = self.settings.rejected / f"{stem}_{n}_{safe}"
            n += 1
        return dest

    def reject(self, path: Path, sha: str, reason: str, received_at: datetime) -> Path | None:
        """Write the reason file and move ``path`` beside it into ``rejected/``; None when it is no longer there."""
        if not path.is_file():
            return None
        dest = self._reject_dest(path.name, sha, received_at)
        when = received_at.astimezone().replace(tzinfo=None)
        atomic_write_text(
            _reason_file(dest),
            f"File: {path.name}\nSHA-256: {sha}\nRejected: {when.isoformat(timespec='seconds')}\n"
            f"Reason: {reason}\nWhat to do: fix the issue and copy the file into the inbox again.\n",
        )
        return self._move(path, dest)

    # ------------------------------------------------------------------------ move, then record
    def archive_image(self, image_id: int, path: Path, sha: str) -> Path | None:
        """Archive a graded image's own file (its result is committed) and record where it went."""
        dest = self.archive(path, sha)
        with session_scope(self.factory) as session:
            image = session.get(Image, image_id)
            if image is None:
                raise LookupError(f"image {image_id} is not in the database; its file {path.name} stays in the inbox")
            image.stored_path = None if dest is None else str(dest)
            if dest is None:
                repo.add_event(session, "archive", f"not archived: {NOT_FILED}", image=image)
        return dest

    def file_drop(self, drop_id: int, path: Path, sha: str) -> Path | None:
        """Move the file of a committed duplicate or refused drop, then log the drop's closing event (and, when
        it was an image's own file, the image's new ``stored_path``)."""
        with session_scope(self.factory) as session:
            drop = session.get(Drop, drop_id)
            if drop is None:
                raise LookupError(f"drop {drop_id} is not in the database; its file {path.name} stays in the inbox")
            outcome, reason, received_at = drop.outcome, drop.reason or "", drop.received_at
        if outcome == DropOutcome.DUPLICATE:
            dest = self.archive(path, sha, "duplicates")
            message = f"archived as {dest.name}" if dest is not None else f"not archived: {NOT_FILED}"
        elif outcome == DropOutcome.REJECTED:
            dest = self.reject(path, sha, reason, received_at)
            message = reason if dest is not None else f"{reason} (not moved: {NOT_FILED})"
        else:
            raise ValueError(f"drop {drop_id} has outcome {outcome!r}; only duplicate and rejected drops are filed")
        with session_scope(self.factory) as session:
            drop = session.get(Drop, drop_id)
            assert drop is not None  # read above; drops are never deleted
            image = drop.image
            if image is not None and image.stored_path == str(path):  # the image's own file went with this drop
                image.stored_path = None if dest is None else str(dest)
            repo.add_event(session, outcome, message, image=image, drop=drop)
        return dest

    # ---------------------------------------------------------------------------------- recovery
    def close_stale(self) -> int:
        """At start-up: close the unfiled drops whose file is no longer in the inbox (a move interrupted after
        the file had gone, or a file removed by hand), so a later file of the same name and content is recorded
        as a new arrival. Returns how many were closed."""
        closed = 0
        with session_scope(self.factory) as session:
            for drop in repo.unfiled_drops(session):
                name = drop.source_name
                candidate = self.settings.inbox / name
                if os.path.basename(name) == name and candidate.is_file() and sha256_file(candidate) == drop.sha256:
                    continue  # still there: intake finishes its move
                if drop.outcome == DropOutcome.REJECTED:  # its reason file may have been written before the kill
                    _reason_file(self._reject_dest(name, drop.sha256, drop.received_at)).unlink(missing_ok=True)
                if drop.image is not None and drop.image.stored_path == str(candidate):
                    drop.image.stored_path = None
                repo.add_event(session, drop.outcome, f"not moved: {GONE_AT_START}", image=drop.image, drop=drop)
                closed += 1
        if closed:
            log.warning("%d interrupted move(s) out of the inbox found no file any more; recorded as not moved", closed)
        return closed


__all__ = ["GONE_AT_START", "NOT_FILED", "Filing", "move_out_of_inbox"]
