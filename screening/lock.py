"""One worker per inbox and per database: the single place that enforces it.

Two workers on one inbox graded every photo twice and then marked most of them failed; two on one new
database raced to create the schema. Until several workers are supported (claims in the database, issue 15,
will replace this module), a worker takes two exclusive locks before it opens the database and releases them
when it exits: one on the inbox folder itself and one on ``<database file>.worker.lock`` beside a SQLite
database. They are ``flock`` locks, so the kernel releases them when the process dies, even by ``kill -9``:
there is never a stale lock to clean up. Nothing is written into the inbox.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from .db.session import sqlite_file_path

log = logging.getLogger("screening")


class WorkerLocked(RuntimeError):
    """Another worker holds the inbox or the database."""


def _lock(path: Path, *, directory: bool) -> int | None:
    """An exclusive, non-blocking flock on ``path``; its descriptor, or None when another process holds it. A file
    system that cannot lock (some network shares refuse ``flock`` on a folder) gets a warning, not a refusal:
    the descriptor is kept all the same."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if directory else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        log.warning("cannot lock %s on this file system (%s); make sure only one worker uses it", path, exc.strerror)
    except BaseException:
        os.close(fd)
        raise
    return fd


class WorkerLock:
    """Held while a worker runs (``with WorkerLock(inbox, database_url): ...``); raises :class:`WorkerLocked`
    with what to do when another worker already runs on the same inbox or database."""

    def __init__(self, inbox: Path, database_url: str) -> None:
        self.inbox = Path(inbox)
        db = sqlite_file_path(database_url)
        self.database = Path(db) if db is not None else None
        self.db_lock = Path(db + ".worker.lock") if db is not None else None
        self._fds: list[int] = []

    def _holder(self) -> str:
        try:
            text = self.db_lock.read_text(encoding="utf-8").strip() if self.db_lock is not None else ""
        except OSError:
            text = ""
        return f" ({text})" if text else ""

    def acquire(self) -> None:
        try:
            if self.db_lock is not None:
                fd = _lock(self.db_lock, directory=False)
                if fd is None:
                    raise WorkerLocked(
                        f"another worker is already running on the database {self.database}"
                        f"{self._holder()}; stop it first, or give this worker its own database and inbox")
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}\n".encode())
            fd = _lock(self.inbox, directory=True)
            if fd is None:
                raise WorkerLocked(f"another worker is already watching the inbox {self.inbox}{self._holder()}; stop it "
                                   "first, or give this worker its own inbox and database")
            self._fds.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # closing the descriptor releases its flock

    def __enter__(self) -> WorkerLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


__all__ = ["WorkerLock", "WorkerLocked"]
