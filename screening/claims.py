"""Several workers on one inbox and one database: who does what (issue 15; replaces the one-worker lock).

Each worker run has a holder name, ``<site>/<host>/<pid>/<random>``, and claims its work in the database
(:mod:`screening.db.claims`) before doing it:

* **a photo**, by its file name in the inbox (``file``), from before it is read until it has left the inbox
  (or was put off for a retry). A file another worker holds is skipped and looked at again later;
* **a visit's next report version** (``visit``, the exam id), from choosing the version until the report is
  recorded: two workers that graded the two eyes of one visit at the same moment make versions 1 and 2, in
  order, one after the other (the second waits for the first, then renders only if a photo is still
  unreported). The review page's reviewed versions take the same claim.

A claim is a lease (``[screening] claim_lease_seconds``). While a worker holds claims a heartbeat thread renews
them every third of the lease; a worker that dies (``kill -9``, a power cut) renews nothing, and its claims are
taken over once the lease has passed, so another worker finishes its photos and visits. On the same machine a
claim whose holder's process is gone is taken over at once (a restarted worker need not wait out its
predecessor's lease). Every transaction that commits claimed work renews the claim first
(:meth:`Claimer.hold`): a worker that stalled past its lease and was taken over commits nothing for that work
(:class:`ClaimLost`), so nothing is graded twice.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterable

from sqlalchemy.orm import Session, sessionmaker

from .db import claims as db_claims
from .db.models import ClaimKind
from .db.session import DatabaseGone, log_failure, transaction

log = logging.getLogger("screening")


class ClaimLost(RuntimeError):
    """This worker's claim on a photo or visit was taken over by another worker (its lease ran out while this
    one was stalled): the other worker finishes that work, and nothing of it is committed here."""


def make_holder(site: str) -> str:
    """A name for this worker run, unique among all workers: site, host, process id and a random part."""
    return f"{site}/{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"[:160]


def _is_dead_here(holder: str) -> bool:
    """True when ``holder`` names a process on this machine that no longer exists (a worker killed here)."""
    parts = holder.split("/")
    if len(parts) < 4 or parts[-3] != socket.gethostname():
        return False
    try:
        pid = int(parts[-2])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Claimer:
    """One worker run's claims: take, hold (fencing), release, and the heartbeat that renews them."""

    def __init__(self, factory: sessionmaker[Session], site: str, lease_s: float, holder: str | None = None) -> None:
        if lease_s <= 0:
            raise ValueError(f"the claim lease must be positive, got {lease_s} s")
        self.factory = factory
        self.site = site
        self.lease_s = float(lease_s)
        self.holder = holder or make_holder(site)
        self._held: set[tuple[ClaimKind, str]] = set()
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None
        self._wake = threading.Event()  # set: the heartbeat looks now (this run is closing, or holds nothing)
        self._closing = False

    # ----------------------------------------------------------------------------------- claiming
    def take(self, kind: ClaimKind, key: str) -> bool:
        """Claim ``(kind, key)``; False when another worker holds it (its lease still running, its process
        alive as far as this machine can tell)."""

        def claim(session: Session) -> bool:
            owner = db_claims.take(session, kind, key, self.holder, self.site, self.lease_s)
            if owner == self.holder:
                return True
            if _is_dead_here(owner) and db_claims.take_over(session, kind, key, self.holder, self.site,
                                                             self.lease_s, owner):
                log.info("took over a %s claim from a worker that is no longer running on this machine", kind.value)
                return True
            return False

        taken = transaction(self.factory, claim, what="claiming work")
        if taken:
            with self._lock:
                self._held.add((kind, key))
            self._start_heartbeat()
        return taken

    def holds(self, kind: ClaimKind, key: str) -> bool:
        """Whether this run believes it holds ``(kind, key)`` (no database access)."""
        with self._lock:
            return (kind, key) in self._held

    def hold(self, session: Session, kind: ClaimKind, key: str) -> None:
        """In the caller's transaction, before it writes claimed work: renew the claim, or raise
        :class:`ClaimLost` when another worker has taken it over."""
        if not db_claims.hold(session, kind, key, self.holder, self.lease_s):
            self._forget([(kind, key)])
            raise ClaimLost(f"another worker took over this worker's {kind.value} claim after its lease of "
                            f"{self.lease_s:g} s ran out; that worker finishes the work")

    def release(self, kind: ClaimKind, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        transaction(self.factory, lambda session: db_claims.release(session, kind, keys, self.holder),
                    what="releasing claims")
        self._forget([(kind, key) for key in keys])

    def _forget(self, claims: list[tuple[ClaimKind, str]]) -> None:
        """Drop ``claims`` from what this run holds; with nothing left, wake the heartbeat so that it ends now
        rather than a third of a lease later (the next claim starts it again)."""
        with self._lock:
            self._held.difference_update(claims)
            if not self._held:
                self._wake.set()

    def held_by_others(self, session: Session, kind: ClaimKind) -> dict[str, str]:
        """Keys of ``kind`` other workers hold now (their lease running): key -> holder."""
        return {key: holder for key, holder in db_claims.held_by_others(session, kind, self.holder).items()
                if not _is_dead_here(holder)}

    def release_all(self) -> None:
        with self._lock:
            held = list(self._held)
        for kind in ClaimKind:
            self.release(kind, [key for k, key in held if k == kind])

    # ---------------------------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        with self._lock:
            self._closing = False
            if self._beat is not None and self._beat.is_alive():
                return
            self._wake.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        """Renew every claim of this run each third of the lease; ends as soon as nothing is held (started again
        by the next claim) or at :meth:`close`. A renewal that fails (the server unreachable a while) is tried
        again each period: the first failure is logged with its traceback, the next ones in a line each, and
        the first success after them says so."""
        failures = 0
        while True:
            self._wake.wait(self.lease_s / 3)
            with self._lock:
                if self._closing or not self._held:
                    self._beat = None
                    return
                self._wake.clear()  # woken by a release while a new claim was being taken: carry on
            try:
                transaction(self.factory, lambda session: db_claims.renew(session, self.holder, self.lease_s),
                            what="renewing claims")
            except DatabaseGone:
                log.error("the database is gone; claims are no longer renewed")
                return
            except Exception as exc:  # noqa: BLE001 - log_failure logs it
                failures += 1
                if failures == 1:
                    log_failure(log, exc, "renewing this worker's claims failed; trying again every %.0f s",
                                self.lease_s / 3)
                else:
                    log.warning("renewing this worker's claims failed again (%d times in a row, %s); trying again in "
                                "%.0f s", failures, type(exc).__name__, self.lease_s / 3)
            else:
                if failures:
                    log.info("renewing this worker's claims works again after %d failure(s)", failures)
                failures = 0

    def _stop_heartbeat(self) -> None:
        """End the heartbeat now, whatever is held (its claims then lapse when their lease runs out)."""
        with self._lock:
            self._closing = True
            self._wake.set()
        beat = self._beat
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=10)

    def close(self) -> None:
        """Release every claim and stop the heartbeat."""
        self._stop_heartbeat()
        try:
            self.release_all()
        except DatabaseGone:
            pass

    def purge_expired(self) -> int:
        """Delete claims whose lease ran out more than a lease ago (see :func:`screening.db.claims.purge`)."""
        return transaction(self.factory, lambda session: db_claims.purge(session, self.lease_s),
                           what="removing expired claims")


__all__ = ["ClaimLost", "Claimer", "make_holder"]
