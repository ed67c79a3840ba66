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


def test_a_guesser_changing_address_meets_the_names_cap_but_the_graders_own_computer_does_not():
    """Keyed on (name, address) alone, a guesser with many addresses (an IPv6 /64) had unlimited guesses."""
    t = LoginThrottle(max_failures=5, window_s=60, lockout_s=600, name_cap=10)
    t.succeeded("grey", "10.0.0.2")  # the grader's workstation
    for i in range(10):
        t.failed("grey", f"2001:db8::{i}", now=float(i))  # one /64: one address
    assert t.locked("grey", "2001:db8::ffff", now=10) > 0  # the /64 is locked for the name...
    for i in range(10):
        t.failed("grey", f"192.0.2.{i}", now=float(i))  # two tries each from ten addresses
    assert t.locked("grey", "192.0.2.200", now=10) > 0  # ...and the name's cap stops a new address
    assert t.locked("grey", "10.0.0.2", now=10) == 0  # the workstation it logged in from still may
    assert t.locked("white", "192.0.2.200", now=10) == 0  # another name
