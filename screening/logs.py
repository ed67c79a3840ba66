"""What the worker's processes write to their log: never a patient identifier.

Why: an exception's message carries whatever the failing call was given. An OSError names the inbox file, whose
name starts with the patient id (``SR010_OD_20261202.jpg``); SQLAlchemy's text carries the statement's parameters
(claim keys, patient codes, stored paths); a ReportError names the patient. A log leaves the clinic's database
(terminals, journald, log shippers), so a log line says *where* an error happened (the traceback's frames: file,
line, code) and *what kind* it was (:func:`exception_kind`: the type, an OSError's errno name, a database error's
driver class), never its message. The message itself is kept where the clinic's data already is: the database's
events, the drops' reasons, the report's record.

:class:`PrivateFormatter` applies this to every ``log.exception`` and ``exc_info`` line of a process that
:func:`configure` set up (``dr-screen`` and the report renderer child); log calls that pass a message as an
argument must pass :func:`exception_kind` or ids themselves.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import traceback
from types import TracebackType
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"  # as Python prints a chain
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def exception_kind(exc: BaseException) -> str:
    """``exc`` described without its message: ``PermissionError [EACCES]``, ``OperationalError (sqlite3.
    OperationalError)``, ``ReportError, from OSError [ENOSPC]`` (the cause it was raised from, once)."""
    kind = _kind(exc)
    cause = exc.__cause__
    if cause is None or cause is getattr(exc, "orig", None):  # a database error's cause is its driver's, named already
        return kind
    return f"{kind}, from {_kind(cause)}"


def _kind(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return f"{name} [{errno.errorcode.get(exc.errno, exc.errno)}]"
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's exception
    if isinstance(orig, BaseException):
        return f"{name} ({type(orig).__module__}.{type(orig).__name__})"
    return name


class PrivateFormatter(logging.Formatter):
    """A formatter whose tracebacks keep their frames and lose every exception's message (:func:`exception_kind`
    instead), along the whole chain of causes and contexts."""

    def formatException(self, ei: tuple[type[BaseException], BaseException, TracebackType | None]
                        | tuple[None, None, None]) -> str:
        exc = ei[1]
        if exc is None:
            return ""
        chain: list[tuple[BaseException, str]] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        link = ""
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            chain.append((current, link))
            if current.__cause__ is not None:
                current, link = current.__cause__, _CAUSE
            elif current.__context__ is not None and not current.__suppress_context__:
                current, link = current.__context__, _CONTEXT
            else:
                current = None
        parts: list[str] = []
        for item, link in reversed(chain):  # the first cause first, as Python prints it
            frames = traceback.format_tb(item.__traceback__)
            lines = ["Traceback (most recent call last):\n", *frames] if frames else []
            parts.append("".join(lines) + f"{_kind(item)} (message withheld: it may name a patient)\n")
            if link:
                parts.append(link)
        return "".join(parts).rstrip("\n")


def configure(level: int, fmt: str = FORMAT, stream: TextIO | None = None) -> None:
    """The root logger of this process, as :func:`logging.basicConfig` sets it up (nothing when it has handlers
    already): ``level``, one handler to ``stream`` (stderr) with a :class:`PrivateFormatter` of ``fmt``. An error
    that nothing handled, in the main thread or another, is logged through it too instead of Python printing its
    message (:func:`log_uncaught`)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrivateFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    if handler in logging.getLogger().handlers:  # this process's own set-up, not a host's (pytest's, an embedder's)
        sys.excepthook = log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: the error through the log (its kind and frames), not Python's full print-out."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("screening").critical("stopped by an error that no step handled", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("screening").error("thread %s stopped by an error that no step handled", name,
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


__all__ = ["FORMAT", "PrivateFormatter", "configure", "exception_kind", "log_uncaught"]
