"""Report PDFs rendered off the inference path.

WeasyPrint is pure Python for most of its work and holds the GIL, so a render thread slows the next
batch's forward more than it saves (measured, BENCHMARKS.md). :class:`ProcessRenderer` instead keeps one
small child process (``python -m screening.renderer``) that imports only Jinja2, WeasyPrint and
:mod:`screening.report` -- no torch, about 80 MB at its peak -- and renders the jobs it is sent, in order, while the
worker goes on with the next batch. :class:`InlineRenderer` renders in the calling thread (same interface;
``[screening] report_renderer = "inline"``).

The child runs at idle CPU priority by default, so grading comes first (``[screening] report_priority``:
:func:`set_priority`). The child only turns a :class:`~screening.report.ReportContext` into a published PDF; the worker keeps all
database work. Protocol: pickled :class:`RenderJob` objects on the child's stdin, pickled
:class:`RenderResult` objects back on its stdout (both ends are this code; nothing else writes there). The
child exits when its stdin closes, so it never outlives the worker, not even a killed one; it renders nothing
more once its parent is gone (a job still in the pipe would be published and never recorded), and a result
it cannot send back (the worker died while it rendered) ends it quietly, without a traceback: the worker's
start-up reconciles such a PDF (:meth:`screening.stages.report.ReportStage.reconcile`). If the child dies,
every job it held comes back as failed (the worker retries those reports later) and the next
:meth:`ProcessRenderer.submit` starts a new child.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, get_args

from .logs import configure, exception_kind
from .report import ReportContext, render_with_retries
from .runtime import release_memory

log = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding screening/ and training/
RENDERER_NICENESS = 10  # added to the worker's niceness: "low", and "idle" where SCHED_IDLE is unavailable
ReportPriority = Literal["idle", "low", "normal"]  # [screening] report_priority (see set_priority)
PRIORITIES: tuple[str, ...] = get_args(ReportPriority)


def check_priority(priority: str) -> str:
    """``priority`` when it is one of :data:`PRIORITIES`; a ValueError naming it otherwise."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown report priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    return priority


@dataclass(frozen=True)
class RenderJob:
    key: int  # chosen by the caller, returned in the result
    ctx: ReportContext
    templates_dir: Path
    reports_dir: Path
    retries: int = 3
    retry_delay: float = 0.5


@dataclass(frozen=True)
class RenderResult:
    key: int
    version: int  # the report version this job was for: the one written when ``path`` is set
    path: Path | None  # the published report_v<version>.pdf, or None when rendering failed
    error: str | None = None  # what went wrong, when path is None (for the database: it may name the patient)
    kind: str | None = None  # the same without a message, for the log (screening.logs); None: ``error`` names nobody


def render_job(job: RenderJob) -> RenderResult:
    """Render one job; any failure becomes a result with the error's type and message."""
    version = job.ctx.report_version
    try:
        path = render_with_retries(job.ctx, job.templates_dir, job.reports_dir, retries=job.retries, delay=job.retry_delay)
    except Exception as exc:  # noqa: BLE001 - reported back to the worker, which records it and retries later
        return RenderResult(job.key, version, None, f"{type(exc).__name__}: {exc}", exception_kind(exc))
    return RenderResult(job.key, version, path)


class Renderer(Protocol):
    def start(self) -> None:
        """Get ready to render (a no-op where there is nothing to start)."""
        ...

    def submit(self, job: RenderJob) -> None: ...

    def results(self, timeout: float = 0.0) -> list[RenderResult]:
        """Finished jobs, oldest first; waits up to ``timeout`` seconds for the first one if none is ready
        and jobs are outstanding."""
        ...

    @property
    def pending(self) -> int: ...

    def close(self, timeout: float = 30.0) -> None: ...


class InlineRenderer:
    """Renders each job as it is submitted, in the caller's thread."""

    def __init__(self) -> None:
        self._done: list[RenderResult] = []

    def start(self) -> None:
        pass

    def submit(self, job: RenderJob) -> None:
        self._done.append(render_job(job))

    def results(self, timeout: float = 0.0) -> list[RenderResult]:
        done, self._done = self._done, []
        return done

    @property
    def pending(self) -> int:
        return len(self._done)

    def close(self, timeout: float = 30.0) -> None:
        pass


class ProcessRenderer:
    """Renders jobs in one child process, in submission order; see the module docstring."""

    def __init__(self, python: str | None = None, priority: str = "idle") -> None:
        self.python = python or sys.executable
        self.priority = check_priority(priority)  # refused here, in the worker, not later in the child
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._outstanding: dict[int, int] = {}  # job key -> its report version
        self._done: queue.SimpleQueue[RenderResult] = queue.SimpleQueue()

    # -- child lifecycle
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (it takes about a second to import WeasyPrint); a no-op while one runs."""
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [self.python, "-m", "screening.renderer", "--priority", self.priority], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env,  # same working folder as the worker: relative paths in a job mean the same to both
        )
        self._reader = threading.Thread(target=self._read, args=(self._proc,), name="report-renderer-reader", daemon=True)
        self._reader.start()
        log.debug("report renderer process %s started", self._proc.pid)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        while True:
            try:
                result = pickle.load(proc.stdout)
            except EOFError:  # the child is gone
                break
            except Exception:
                log.exception("report renderer sent something unreadable; restarting it")
                proc.kill()
                break
            with self._lock:
                self._outstanding.pop(result.key, None)
            self._done.put(result)
        code = proc.wait()
        self._fail_outstanding(f"the report renderer process exited (exit code {code}) before finishing this report")

    def _fail_outstanding(self, reason: str) -> None:
        with self._lock:
            lost, self._outstanding = sorted(self._outstanding.items()), {}
        if lost:
            log.error("report renderer: %s; %d report(s) will be retried", reason, len(lost))
        for key, version in lost:
            self._done.put(RenderResult(key, version, None, reason))

    # -- jobs
    def submit(self, job: RenderJob) -> None:
        self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        with self._lock:
            self._outstanding[job.key] = job.ctx.report_version
        try:
            proc.stdin.write(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:  # the child died (the reader fails its other jobs)
            with self._lock:
                lost = self._outstanding.pop(job.key, None) is not None
            if lost:
                self._done.put(RenderResult(job.key, job.ctx.report_version, None,
                                            f"the report renderer process is gone ({type(exc).__name__})"))

    def results(self, timeout: float = 0.0) -> list[RenderResult]:
        out: list[RenderResult] = []
        if timeout > 0 and self.pending:
            try:
                out.append(self._done.get(timeout=timeout))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._outstanding) + self._done.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Let the child finish what it holds (up to ``timeout`` seconds), then stop it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("report renderer did not stop within %.0f s; killing it", timeout)
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)


def make_renderer(kind: str, priority: str = "idle") -> Renderer:
    if kind == "process":
        return ProcessRenderer(priority=priority)
    if kind == "inline":
        return InlineRenderer()
    raise ValueError(f"unknown report renderer {kind!r}; expected 'process' or 'inline'")


# ------------------------------------------------------------------------------------------------ child


def set_priority(priority: str = "idle") -> str:
    """The render process's CPU priority (``[screening] report_priority``). Returns what applied.

    ``"idle"`` (the default; grading comes first: the report takes the CPU the worker leaves idle, all of it while
    the worker waits): Linux's SCHED_IDLE runs this process only on a core nothing else wants, so it no longer
    preempts the forward pass's threads in the middle of their work the way a reniced process still does; elsewhere
    the process is reniced by :data:`RENDERER_NICENESS`. On a machine that other work keeps busy (another worker,
    other services) an idle-class renderer waits for that work, so ``"low"`` (reniced by :data:`RENDERER_NICENESS`
    above the worker: reports progress at a small share of a busy core) and ``"normal"`` (the worker's own
    priority, unchanged) are offered too.
    """
    if check_priority(priority) == "normal":
        return "normal"
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    os.nice(RENDERER_NICENESS)
    return f"nice {RENDERER_NICENESS}"


def _serve(jobs: BinaryIO, results: BinaryIO, parent: int | None = None) -> int:
    """Render the jobs read from ``jobs`` in order, answering on ``results``, until ``jobs`` ends, ``parent``
    (the worker's pid) is no longer this process's parent, or the answer cannot be delivered."""
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return 0
        if parent is not None and os.getppid() != parent:
            log.warning("the worker has stopped; report job %s not rendered (it will be made again)", job.key)
            return 0
        result = render_job(job)
        try:
            pickle.dump(result, results, protocol=pickle.HIGHEST_PROTOCOL)
            results.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.warning("the worker stopped while report job %s rendered; its start-up reconciles the file", job.key)
            return 0
        release_memory()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m screening.renderer", description="the worker's report renderer")
    parser.add_argument("--priority", choices=PRIORITIES, default="idle")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the worker decides when to stop and closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    set_priority(args.priority)
    configure(logging.WARNING, "%(asctime)s %(levelname)s %(name)s (renderer): %(message)s", sys.stderr)
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the result stream
    import weasyprint  # noqa: F401 - imported before the first job arrives

    try:
        return _serve(sys.stdin.buffer, results, parent)
    finally:
        try:
            results.close()
        except OSError:  # a broken pipe: nobody is listening any more, and nothing is left to say
            pass


if __name__ == "__main__":
    # run as ``-m``: use the importable module, so results pickle as screening.renderer.RenderResult
    from screening.renderer import main as _main

    sys.exit(_main())
