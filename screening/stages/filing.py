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

A move that fails (a full or read-only archive, a share gone) records an ``archive_failed`` incident and
raises :class:`MoveFailed`; the file stays in the inbox with its committed record, which is exactly the
interrupted case above, so the next attempt finishes it. Across file systems a file is copied under a hidden
``.<name>.partial`` name beside its destination and renamed into place only when complete, so the archive
never holds half a photo under its real name; partial copies left by a crash are removed at start-up
(:meth:`Filing.clean_partials`). A copy already complete at the destination (a crash between the copy and
the removal from the inbox) is recognised by its content and not made twice.

Destinations: ``archive/<date>/<sha12>_<name>``, ``archive/<date>/duplicates/...``, and
``rejected/<time>_<sha8>_<name>`` with ``<that>.reason.txt`` beside it (the time is the drop's, so a move
finished after a restart writes the same reason file). A sidecar JSON travels with its image as
``<dest>.json``. Names from users only ever become file names through :func:`training.common.safe_file_name`.
Inbox entries that are not files (a link, a folder) move as they are: a link is moved, never followed.

Several workers (:mod:`screening.claims`): only the worker holding a file's claim moves it, but the inbox may be
a network share where another worker (one that took the file over after this one stalled) got there first. A
file already gone is then recorded as such without overwriting what the other worker recorded, and the
start-up clean-ups leave alone what other live workers are in the middle of (their claimed files, and partial
copies younger than two leases).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from training.common import atomic_write_text, fsync_dir, safe_file_name, sha256_file

from ..claims import Claimer
from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import ClaimKind, Drop, DropOutcome, Event, Image
from ..db.session import transaction
from ..intake import entry_sha256, sidecar_for
from ..rejection import Incident

log = logging.getLogger("screening")

NOT_FILED = "the file was no longer in the inbox when the worker came to move it"
GONE_AT_START = ("the file was no longer in the inbox when the worker restarted (taken away, or moved just before "
                 "the worker stopped)")
PARTIAL_SUFFIX = ".partial"


class MoveFailed(Exception):
    """A file could not leave the inbox (the cause is chained); its record is committed and the move is retried."""


def _one_line(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``): a file name (or a reason quoting one)
    with a line break in it wrote a second, forged-looking ``File:`` line into the reason file."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _reason_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".reason.txt")


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{PARTIAL_SUFFIX}")


def _move_entry(src: Path, dest: Path) -> None:
    """Move one inbox entry to ``dest`` (a free name). A rename where it can; across file systems a regular file
    is copied to :func:`_partial` first, made durable, renamed into place, and only then removed from the inbox."""
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    if not stat.S_ISREG(os.lstat(src).st_mode):
        shutil.move(str(src), dest)  # a link is recreated as a link, a folder copied with its links as links
        return
    tmp = _partial(dest)
    try:
        shutil.copyfile(src, tmp, follow_symlinks=False)
        shutil.copystat(src, tmp, follow_symlinks=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.rename(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    os.unlink(src)


def move_out_of_inbox(path: Path, dest: Path) -> None:
    """Move a clinic file (and its sidecar JSON, as ``<dest>.json``) out of the inbox. The caller has committed
    the database state that records the file."""
    sidecar = sidecar_for(path) if stat.S_ISREG(os.lstat(path).st_mode) else None
    _move_entry(path, dest)
    if sidecar is not None:
        _move_entry(sidecar, dest.with_name(dest.name + ".json"))


class Filing:
    """Archives graded and duplicate files, moves refused ones to ``rejected/`` with a reason file, and records
    where each went (see the module docstring for the commit-then-move protocol)."""

    def __init__(self, settings: ScreeningSettings, factory: sessionmaker[Session], claims: Claimer | None = None) -> None:
        self.settings = settings
        self.factory = factory
        self.claims = claims

    def _incident(self, exc: OSError, what: str, image_id: int | None, drop_id: int | None) -> MoveFailed:
        """Record a failed move (no names in the log: the ids say which) and build the error to raise."""
        reason = exc.strerror or type(exc).__name__
        message = f"could not move {what} ({reason}); it stays in the inbox and the move is retried"

        def record(session: Session) -> None:
            image = session.get(Image, image_id) if image_id is not None else None
            drop = session.get(Drop, drop_id) if drop_id is not None else None
            repo.add_event(session, "archive", message, image=image, drop=drop, code=Incident.ARCHIVE_FAILED)

        transaction(self.factory, record, what="recording a failed move")
        log.error("image %s / drop %s: %s", image_id, drop_id, message)
        return MoveFailed(message)

    # ------------------------------------------------------------------------------- moves alone
    def _move(self, path: Path, dest: Path) -> Path | None:
        if not os.path.lexists(path):
            return None
        try:
            move_out_of_inbox(path, dest)
        except FileNotFoundError:  # taken away between the check and the move
            if os.path.lexists(path):
                raise
            return None
        return dest

    def archive(self, path: Path, sha: str, sub: str = "") -> Path | None:
        """Move ``path`` to ``archive/<today>/<sub>/``; None when it is no longer there. A file of the same content
        already there under the name this one would get (copied before a crash) is reused."""
        if not os.path.lexists(path):
            return None
        folder = self.settings.archive / datetime.now().strftime("%Y-%m-%d") / sub
        folder.mkdir(parents=True, exist_ok=True)
        name = safe_file_name(path.name)
        dest = folder / f"{sha[:12]}_{name}"
        n = 1
        while os.path.lexists(dest):
            if dest.is_file() and not dest.is_symlink() and path.is_file() and sha256_file(dest) == sha:
                sidecar = sidecar_for(path)
                if sidecar is not None and not os.path.lexists(dest.with_name(dest.name + ".json")):
                    _move_entry(sidecar, dest.with_name(dest.name + ".json"))
                path.unlink()
                return dest
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
        while os.path.lexists(dest):
            dest = self.settings.rejected / f"{stem}_{n}_{safe}"
            n += 1
        return dest

    def reject(self, path: Path, sha: str, reason: str, received_at: datetime) -> Path | None:
        """Write the reason file and move ``path`` beside it into ``rejected/``; None when it is no longer there."""
        if not os.path.lexists(path):
            return None
        self.settings.rejected.mkdir(parents=True, exist_ok=True)
        dest = self._reject_dest(path.name, sha, received_at)
        when = received_at.astimezone()  # local, with its offset: the audit counts UTC days, folders local ones
        atomic_write_text(
            _reason_file(dest),
            f"File: {_one_line(path.name)}\nSHA-256: {sha}\nRejected: {when.isoformat(timespec='seconds')}\n"
            f"Reason: {_one_line(reason)}\nWhat to do: correct what the reason names (it says how), then drop the corrected "
            "file into the inbox again. This file stays here for reference; it is not tried again.\n",
        )
        return self._move(path, dest)

    # ------------------------------------------------------------------------ move, then record
    def archive_image(self, image_id: int, path: Path, sha: str) -> Path | None:
        """Archive a graded image's own file (its result is committed) and record where it went. Raises
        :class:`MoveFailed` (recorded) when the archive cannot take it now."""
        try:
            dest = self.archive(path, sha)
        except OSError as exc:
            raise self._incident(exc, f"graded image {image_id} to the archive", image_id, None) from exc

        def record(session: Session) -> None:
            image = session.get(Image, image_id)
            if image is None:
                raise LookupError(f"image {image_id} is not in the database; its file {path.name} was archived as {dest}")
            if dest is None and image.stored_path not in (None, str(path)):
                return  # another worker moved it and recorded where: theirs stands
            image.stored_path = None if dest is None else str(dest)
            if dest is None:
                repo.add_event(session, "archive", f"not archived: {NOT_FILED}", image=image, code=Incident.NOT_MOVED)

        transaction(self.factory, record, what="recording an archived file")
        return dest

    def archive_pages(self, file_sha256: str, path: Path) -> Path | None:
        """Archive a multi-page file once every page is graded or refused (committed), and record where it went on
        each of its pages (:mod:`screening.stages.pages`). Raises :class:`MoveFailed` (recorded) when the archive
        cannot take it now."""
        try:
            dest = self.archive(path, file_sha256)
        except OSError as exc:
            first = transaction(self.factory, lambda s: [i.id for i in repo.pages_of_file(s, file_sha256)][:1],
                                what="reading a file's pages")
            raise self._incident(exc, "a file of several pages to the archive", first[0] if first else None, None) from exc

        def record(session: Session) -> None:
            pages = repo.pages_of_file(session, file_sha256)
            here = [image for image in pages if image.stored_path == str(path)]
            if dest is None and pages and not here:
                return  # another worker moved it and recorded where: theirs stands
            for image in here:
                image.stored_path = None if dest is None else str(dest)
            if dest is None and pages:
                repo.add_event(session, "archive", f"not archived: {NOT_FILED}", image=pages[0], code=Incident.NOT_MOVED)

        transaction(self.factory, record, what="recording an archived file")
        return dest

    def file_drop(self, drop_id: int, path: Path, sha: str) -> Path | None:
        """Move the file of a committed duplicate or refused drop, then log the drop's closing event (and, when
        it was an image's own file, the image's new ``stored_path``). Raises :class:`MoveFailed` (recorded)
        when it cannot move now: the drop stays unfiled and the next intake of the file finishes it."""

        def read(session: Session) -> tuple[str, str, datetime, int | None]:
            drop = session.get(Drop, drop_id)
            if drop is None:
                raise LookupError(f"drop {drop_id} is not in the database; its file {path.name} stays in the inbox")
            return drop.outcome, drop.reason or "", drop.received_at, drop.image_id

        outcome, reason, received_at, image_id = transaction(self.factory, read, what="reading a drop")
        try:
            if outcome == DropOutcome.DUPLICATE:
                dest = self.archive(path, sha, "duplicates")
                message = f"archived as {dest.name}" if dest is not None else f"not archived: {NOT_FILED}"
            elif outcome == DropOutcome.REJECTED:
                dest = self.reject(path, sha, reason, received_at)
                message = reason if dest is not None else f"{reason} (not moved: {NOT_FILED})"
            else:
                raise ValueError(f"drop {drop_id} has outcome {outcome!r}; only duplicate and rejected drops are filed")
        except OSError as exc:
            where = "the archive" if outcome == DropOutcome.DUPLICATE else "rejected/"
            raise self._incident(exc, f"the file of drop {drop_id} to {where}", image_id, drop_id) from exc

        def record(session: Session) -> None:
            drop = session.get(Drop, drop_id)
            assert drop is not None  # read above; drops are never deleted
            closed = session.scalar(select(Event.id).where(Event.drop_id == drop_id, Event.kind == outcome).limit(1))
            if closed is not None:
                return  # another worker filed it (and closed the drop) first
            image = drop.image
            if image is not None and image.stored_path == str(path):  # the image's own file went with this drop
                image.stored_path = None if dest is None else str(dest)
            repo.add_event(session, outcome, message, image=image, drop=drop, code=None if dest else Incident.NOT_MOVED)

        transaction(self.factory, record, what="recording a filed drop")
        return dest

    # ---------------------------------------------------------------------------------- recovery
    def clean_partials(self) -> int:
        """At start-up: remove the ``.<name>.partial`` copies a crash left in the archive or ``rejected/`` (their
        originals are still in the inbox with their records, and are moved again). While other workers hold
        files, a partial copy younger than two leases may be one of theirs being written: it is left. Returns
        how many."""
        claims = self.claims
        others_busy = claims is not None and bool(transaction(
            self.factory, lambda s: claims.held_by_others(s, ClaimKind.FILE), what="reading other workers' claims"))
        min_age = 2 * self.settings.claim_lease_seconds if others_busy else 0.0
        now = time.time()
        removed = 0
        for root in (self.settings.archive, self.settings.rejected):
            for folder, _, names in os.walk(root):  # os.walk: several times faster than Path.rglob on a big archive
                for name in names:
                    if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                        try:
                            if min_age and now - os.lstat(os.path.join(folder, name)).st_mtime < min_age:
                                continue
                            os.unlink(os.path.join(folder, name))
                        except OSError:
                            continue
                        removed += 1
        if removed:
            transaction(self.factory, lambda s: repo.add_event(
                s, "reconcile", f"removed {removed} partial cop{'y' if removed == 1 else 'ies'} left by an interrupted move",
                code=Incident.PARTIAL_COPY_REMOVED), what="recording removed partial copies")
            log.warning("removed %d partial copies left by an interrupted move", removed)
        return removed

    def close_stale(self) -> int:
        """At start-up: close the unfiled drops whose file is no longer in the inbox (a move interrupted after
        the file had gone, or a file removed by hand), so a later file of the same name and content is recorded
        as a new arrival. Returns how many were closed."""

        def close(session: Session) -> int:
            closed = 0
            busy = self.claims.held_by_others(session, ClaimKind.FILE) if self.claims is not None else {}
            for drop in repo.unfiled_drops(session):
                name = drop.source_name
                if name in busy:
                    continue  # another worker is filing it right now
                candidate = self.settings.inbox / name
                try:
                    still_there = (os.path.basename(name) == name and os.path.lexists(candidate)
                                   and entry_sha256(candidate) == drop.sha256)
                except OSError:
                    still_there = False
                if still_there:
                    continue  # intake finishes its move
                if drop.outcome == DropOutcome.REJECTED:  # its reason file may have been written before the kill
                    _reason_file(self._reject_dest(name, drop.sha256, drop.received_at)).unlink(missing_ok=True)
                if drop.image is not None and drop.image.stored_path == str(candidate):
                    drop.image.stored_path = None
                repo.add_event(session, drop.outcome, f"not moved: {GONE_AT_START}", image=drop.image, drop=drop,
                               code=Incident.NOT_MOVED)
                closed += 1
            return closed

        closed = transaction(self.factory, close, what="closing interrupted moves")
        if closed:
            log.warning("%d interrupted move(s) out of the inbox found no file any more; recorded as not moved", closed)
        return closed


__all__ = ["GONE_AT_START", "NOT_FILED", "PARTIAL_SUFFIX", "Filing", "MoveFailed", "move_out_of_inbox"]
