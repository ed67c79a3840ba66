"""The login brake: per user name and client address, forgetting old entries."""

from __future__ import annotations

from screening.web.auth import LoginThrottle


def test_failures_lock_one_name_from_one_address_only():
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=600)
    for i in range(3):
        t.failed("Grey", "10.9.9.9", now=i)
    assert t.locked("grey", "10.9.9.9", now=10) == 592  # from the third failure (t=2); the name is case-blind
    assert t.locked("grey", "10.0.0.2", now=10) == 0  # another computer
    assert t.locked("white", "10.9.9.9", now=10) == 0  # another name
    assert t.locked("grey", "10.9.9.9", now=700) == 0  # the lock ends


def test_failures_outside_the_window_do_not_add_up():
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=600)
    for now in (0, 100, 200):
        t.failed("grey", "10.9.9.9", now=now)
    assert t.locked("grey", "10.9.9.9", now=201) == 0


def test_guesses_under_ever_new_names_do_not_grow_memory_for_good():
    t = LoginThrottle(max_failures=5, window_s=60, lockout_s=60)
    for i in range(5000):
        t.failed(f"user{i}", "10.9.9.9", now=float(i))
    assert len(t._failures) < 1100
