"""Claim statements (screening/db/claims.py) on each database: one holder per key, leases, takeover, fencing."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select

from screening.db import claims as dbc
from screening.db import session_scope, transaction
from screening.db.models import Claim, ClaimKind

FILE, VISIT = ClaimKind.FILE, ClaimKind.VISIT



def _take(factory, key, holder, lease=30.0, kind=FILE):
    with session_scope(factory) as s:
        return dbc.take(s, kind, key, holder, "site-a", lease)


def test_one_holder_per_key_until_released(factory):
    assert _take(factory, "P1_R.jpg", "a") == "a"
    assert _take(factory, "P1_R.jpg", "b") == "a"  # a's lease is running: b is told who has it
    assert _take(factory, "P1_R.jpg", "a") == "a"  # a again: still a's (renewed)
    assert _take(factory, "P1_R.jpg", "b", kind=VISIT) == "b"  # another kind, another key space
    with session_scope(factory) as s:
        assert dbc.held_by_others(s, FILE, "b") == {"P1_R.jpg": "a"} and dbc.held_by_others(s, FILE, "a") == {}
        dbc.release(s, FILE, ["P1_R.jpg"], "b")  # not b's: left alone
    assert _take(factory, "P1_R.jpg", "b") == "a"
    with session_scope(factory) as s:
        dbc.release(s, FILE, ["P1_R.jpg"], "a")
    assert _take(factory, "P1_R.jpg", "b") == "b"


def test_an_expired_lease_is_taken_over_and_fences_its_old_holder(factory):
    assert _take(factory, "P2_L.jpg", "a", lease=0.2) == "a"
    with session_scope(factory) as s:
        assert dbc.hold(s, FILE, "P2_L.jpg", "a", 0.2)  # renewed while a works
    time.sleep(0.4)  # a stalls past its lease
    assert _take(factory, "P2_L.jpg", "b") == "b"
    with session_scope(factory) as s:
        assert not dbc.hold(s, FILE, "P2_L.jpg", "a", 30)  # a must commit nothing for it now
        assert dbc.hold(s, FILE, "P2_L.jpg", "b", 30)
        row = s.scalars(select(Claim)).one()
        assert (row.holder, row.site) == ("b", "site-a") and row.expires_at > dbc.db_now(s)


def test_take_over_from_a_dead_holder_is_compare_and_set(factory):
    _take(factory, "x.jpg", "dead")
    with session_scope(factory) as s:
        assert dbc.take_over(s, FILE, "x.jpg", "b", "site-b", 30, "dead")
        assert not dbc.take_over(s, FILE, "x.jpg", "c", "site-c", 30, "dead")  # no longer dead's
    assert _take(factory, "x.jpg", "c") == "b"


def test_renew_and_purge(factory):
    for key in ("1", "2"):
        _take(factory, key, "a", lease=0.2)
    _take(factory, "3", "b", lease=0.2)
    with session_scope(factory) as s:
        assert dbc.renew(s, "a", 30) == 2
    time.sleep(0.4)
    with session_scope(factory) as s:
        assert dbc.purge(s, 0.0) == 1  # b's lapsed; a's were renewed
        assert sorted(s.scalars(select(Claim.key))) == ["1", "2"]


def test_racing_holders_never_share_a_key(factory):
    """Eight threads (eight holders, each its own connection) race for the same 30 keys: every key ends with
    exactly one holder, and each holder was told the truth about what it won."""
    keys = [f"photo{k}.jpg" for k in range(30)]
    won: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def race(holder: str) -> None:
        try:
            start.wait()
            mine = []
            for key in keys:
                if transaction(factory, lambda s, key=key: dbc.take(s, FILE, key, holder, "s", 30)) == holder:
                    mine.append(key)
            won[holder] = mine
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    claimed = [key for mine in won.values() for key in mine]
    assert sorted(claimed) == sorted(keys)  # each key won once, by one holder
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(Claim)) == 30
        assert {k: h for k, h in s.execute(select(Claim.key, Claim.holder))} == {k: h for h, ks in won.items() for k in ks}
