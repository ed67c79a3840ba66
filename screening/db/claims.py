"""Claims in the database: which worker is doing which photo, and which visit's next report version.

The statements behind :class:`screening.claims.Claimer`; each takes the caller's session and never commits.
One table (``claims``, :class:`~screening.db.models.Claim`), one row per (kind, key), and the same SQL on
SQLite and PostgreSQL:

* **take**: ``INSERT ... ON CONFLICT (kind, key) DO UPDATE ... WHERE the lease has run out OR it is already
  this holder's``. One statement, so two workers racing for a key cannot both win: on PostgreSQL the unique
  index makes the second wait for the first and then see its row; on SQLite the statement takes the database's
  write lock. (A ``SELECT ... FOR UPDATE SKIP LOCKED`` over a queue would need the work as rows before it is
  claimed; an inbox file has no row until it has been read, so the claim row *is* the lock.)
* **hold**: ``UPDATE ... SET expires_at WHERE kind, key AND holder``, run first in every transaction that
  commits claimed work: it renews the lease and, where it changes no row, tells the holder that its claim
  was taken over, before anything is written. On PostgreSQL it also row-locks the claim until the commit, so
  a takeover cannot slip in between the check and the commit.
* **renew** / **release**: the heartbeat, and the end of the work.

Leases are compared against one clock: the server's on PostgreSQL (workers on several machines), this
machine's on SQLite (every worker of a SQLite file runs on the machine that holds it).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.orm import Session

from screening.db.dialect import insert_on_conflict
from screening.db.models import Claim, ClaimKind, utcnow


def db_now(session: Session) -> datetime:
    """The time leases are measured by, as an aware UTC datetime (see the module docstring)."""
    if session.get_bind().dialect.name == "postgresql":
        now = session.scalar(select(func.statement_timestamp()))
        assert isinstance(now, datetime)
        return now.astimezone(timezone.utc)
    return utcnow()


def take(session: Session, kind: ClaimKind, key: str, holder: str, site: str, lease_s: float) -> str:
    """Claim ``(kind, key)`` for ``holder`` unless another holder's lease is still running. Returns the holder
    the claim belongs to afterwards: ``holder`` when it was taken (or already held), else the other one."""
    now = db_now(session)
    stmt = insert_on_conflict(session, Claim).values(kind=kind.value, key=key, holder=holder, site=site, claimed_at=now,
                                   expires_at=now + timedelta(seconds=lease_s))
    stmt = stmt.on_conflict_do_update(
        index_elements=["kind", "key"],
        set_={"holder": stmt.excluded.holder, "site": stmt.excluded.site, "claimed_at": stmt.excluded.claimed_at,
              "expires_at": stmt.excluded.expires_at},
        where=(Claim.expires_at < now) | (Claim.holder == holder),
    )
    session.execute(stmt)
    owner = session.scalar(select(Claim.holder).where(Claim.kind == kind.value, Claim.key == key))
    assert owner is not None  # the row was inserted, updated, or is another holder's
    return owner


def take_over(session: Session, kind: ClaimKind, key: str, holder: str, site: str, lease_s: float, dead: str) -> bool:
    """Take ``(kind, key)`` from ``dead``, a holder known to have stopped (its process is gone), before its lease
    runs out: compare-and-set on the holder, so a claim that changed hands meanwhile is left alone."""
    now = db_now(session)
    result = session.execute(
        update(Claim).where(Claim.kind == kind.value, Claim.key == key, Claim.holder == dead)
        .values(holder=holder, site=site, claimed_at=now, expires_at=now + timedelta(seconds=lease_s)),
        execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount == 1


def hold(session: Session, kind: ClaimKind, key: str, holder: str, lease_s: float) -> bool:
    """Renew ``holder``'s claim on ``(kind, key)`` in the caller's transaction; False when it is not (or no
    longer) theirs: nothing may then be committed for that work."""
    now = db_now(session)
    result = session.execute(
        update(Claim).where(Claim.kind == kind.value, Claim.key == key, Claim.holder == holder)
        .values(expires_at=now + timedelta(seconds=lease_s)), execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount == 1


def renew(session: Session, holder: str, lease_s: float) -> int:
    """Extend every lease ``holder`` has; returns how many."""
    now = db_now(session)
    result = session.execute(update(Claim).where(Claim.holder == holder)
                             .values(expires_at=now + timedelta(seconds=lease_s)),
                             execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount


def release(session: Session, kind: ClaimKind, keys: Iterable[str], holder: str) -> None:
    """Drop ``holder``'s claims on ``keys`` (those another holder took over are left alone)."""
    keys = list(keys)
    if keys:
        session.execute(delete(Claim).where(Claim.kind == kind.value, Claim.key.in_(keys), Claim.holder == holder),
                        execution_options={"synchronize_session": False})


def held_by_others(session: Session, kind: ClaimKind, holder: str) -> dict[str, str]:
    """Keys of ``kind`` whose lease is running for a holder other than ``holder``: key -> holder."""
    now = db_now(session)
    rows = session.execute(select(Claim.key, Claim.holder).where(
        Claim.kind == kind.value, Claim.holder != holder, Claim.expires_at >= now))
    return {key: other for key, other in rows}


def purge(session: Session, older_than_s: float) -> int:
    """Delete claims whose lease ran out more than ``older_than_s`` ago (left by workers that died: a takeover
    reuses the row, but a file that was finished meanwhile is never claimed again). Returns how many."""
    now = db_now(session)
    result = session.execute(delete(Claim).where(Claim.expires_at < now - timedelta(seconds=older_than_s)),
                             execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount


__all__ = ["db_now", "held_by_others", "hold", "purge", "release", "renew", "take", "take_over"]
