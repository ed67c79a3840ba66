"""Logins for the review page: password hashing, user names, and a brake on password guessing.

Passwords are hashed with Werkzeug's ``generate_password_hash`` (scrypt, n=32768 r=8 p=1, a random salt
per password, parameters stored in the hash so that stronger defaults apply to new hashes without
breaking old ones): a maintained KDF instead of hand-rolled parameters.
"""

from __future__ import annotations

import re
import threading
import time

from werkzeug.security import check_password_hash, generate_password_hash

MIN_PASSWORD_CHARS = 10
USERNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A constant hash to check against when the user does not exist, so that a wrong user name takes as long
# as a wrong password (no user-name probing by timing).
_DUMMY_HASH = generate_password_hash("not a password of anybody", method="scrypt")


class AuthError(ValueError):
    """A user name or password that cannot be used; the message says why."""


def check_username(username: str) -> str:
    name = username.strip()
    if not USERNAME_RE.fullmatch(name):
        raise AuthError(f"user name {username!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthError(f"the password is {len(password)} characters long; use at least {MIN_PASSWORD_CHARS}")
    if password.strip() != password:
        raise AuthError("the password starts or ends with white space (a copy-paste slip?); type it again")
    return generate_password_hash(password, method="scrypt")


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; with ``password_hash=None`` (unknown user) spends the same time."""
    if password_hash is None:
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(password_hash, password)


class LoginThrottle:
    """Refuses logins of a user name *from one client address* for ``lockout_s`` after ``max_failures`` failed
    attempts from there within ``window_s``, and of the name from *any new address* after ``name_cap`` failures from
    all addresses together (in memory: a restart of the page forgets it, acceptable for a local service).

    Why per address and not per name alone: keyed on the name only, anyone who can reach the page could lock a
    named grader out of it for a quarter of an hour by typing five wrong passwords; keyed on (name, address), the
    guesser locks out only themselves. The looser cap per name stops a guesser who changes address (an IPv6 /64 is
    counted as one address, since one host may hold all of it); it spares the addresses the name has logged in from
    before, so the grader at their own workstation still logs in. Behind a reverse proxy every client has the
    proxy's address, so ``dr-screen serve --trusted-proxy`` must name it for the client's own address to be used."""

    def __init__(self, max_failures: int = 5, window_s: float = 900.0, lockout_s: float = 900.0,
                 name_cap: int = 30) -> None:
        self.max_failures, self.window_s, self.lockout_s, self.name_cap = max_failures, window_s, lockout_s, name_cap
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._locked_until: dict[tuple[str, str], float] = {}
        self._name_failures: dict[str, list[float]] = {}
        self._name_locked_until: dict[str, float] = {}
        self._known: dict[str, set[str]] = {}  # addresses each name has logged in from (spared by the name's cap)
        self._lock = threading.Lock()

    @staticmethod
    def _address(address: str | None) -> str:
        import ipaddress

        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return address or "?"
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)

    def _key(self, username: str, address: str | None) -> tuple[str, str]:
        return username.lower(), self._address(address)

    def locked(self, username: str, address: str | None, now: float | None = None) -> float:
        """Seconds until ``username`` may try again from ``address`` (0 when it may now)."""
        now = time.monotonic() if now is None else now
        name, where = key = self._key(username, address)
        with self._lock:
            wait = self._locked_until.get(key, 0.0) - now
            if where not in self._known.get(name, ()):
                wait = max(wait, self._name_locked_until.get(name, 0.0) - now)
            return max(0.0, wait)

    def failed(self, username: str, address: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = self._key(username, address)
        with self._lock:
            self._forget_old(now)
            recent = [t for t in self._failures.get(key, []) if now - t < self.window_s] + [now]
            self._failures[key] = recent
            if len(recent) >= self.max_failures:
                self._locked_until[key] = now + self.lockout_s
                self._failures[key] = []
            name = key[0]
            everywhere = [t for t in self._name_failures.get(name, []) if now - t < self.window_s] + [now]
            self._name_failures[name] = everywhere
            if len(everywhere) >= self.name_cap:
                self._name_locked_until[name] = now + self.lockout_s
                self._name_failures[name] = []

    def succeeded(self, username: str, address: str | None) -> None:
        name, where = key = self._key(username, address)
        with self._lock:
            self._failures.pop(key, None)
            known = self._known.setdefault(name, set())
            if len(known) < 64:  # a grader's few workstations
                known.add(where)

    def _forget_old(self, now: float) -> None:
        """Drops expired entries, so that guesses under ever new names or addresses cannot grow memory for good."""
        if len(self._failures) + len(self._locked_until) + len(self._name_failures) < 1024:
            return
        self._failures = {k: v for k, v in self._failures.items() if v and now - v[-1] < self.window_s}
        self._locked_until = {k: t for k, t in self._locked_until.items() if t > now}
        self._name_failures = {k: v for k, v in self._name_failures.items() if v and now - v[-1] < self.window_s}
        self._name_locked_until = {k: t for k, t in self._name_locked_until.items() if t > now}


__all__ = ["MIN_PASSWORD_CHARS", "AuthError", "LoginThrottle", "check_username", "hash_password", "verify_password"]
