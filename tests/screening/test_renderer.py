"""The report renderer process: renders what it is sent, stays torch-free, survives its child dying."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from screening.renderer import InlineRenderer, ProcessRenderer, RenderJob, make_renderer

from .test_report import TEMPLATES, _ctx, _eye, _pages_text

PROJECT = Path(__file__).resolve().parents[2]


def _text(pdf: Path) -> str:
    return " ".join(_pages_text(pdf))


def _wait(renderer, n: int, timeout: float = 60.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += renderer.results(timeout=1.0)
    return got


def test_renderer_modules_do_not_import_torch():
    """The renderer process must stay small: importing it (and the report code) must not pull in torch."""
    code = "import sys, screening.renderer, screening.report; print(sorted(m for m in ('torch', 'cv2', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_process_renderer_renders_in_order_and_versions_do_not_collide(tmp_path):
    renderer = ProcessRenderer()
    try:
        renderer.submit(RenderJob(1, _ctx([_eye("R", 0, 0, tmp_path / "img")], version=1), TEMPLATES, tmp_path / "reports"))
        # the same exam again before the first is finished: the caller decides version 2
        renderer.submit(RenderJob(2, _ctx([_eye("R", 0, 0, tmp_path / "img"), _eye("L", 3, 1, tmp_path / "img")], version=2),
                                  TEMPLATES, tmp_path / "reports"))
        # a third asking for a version that is taken by then: refused, v1 is never overwritten
        renderer.submit(RenderJob(3, _ctx([], version=1), TEMPLATES, tmp_path / "reports"))
        assert renderer.pending == 3 and renderer.pid is not None and renderer.pid != os.getpid()
        results = _wait(renderer, 3)
    finally:
        renderer.close()
    assert [r.key for r in results] == [1, 2, 3] and [r.error for r in results][:2] == [None, None]
    assert [r.version for r in results] == [1, 2, 1]  # each result says which version it was for
    assert [r.path.name for r in results[:2]] == ["report_v1.pdf", "report_v2.pdf"]
    assert results[2].path is None and "ReportVersionTaken" in results[2].error and "report_v1.pdf" in results[2].error
    assert "Report v1" in _text(results[0].path) and "Report v2" in _text(results[1].path)
    first = _text(results[0].path)
    assert "Right eye" in first and "Left eye" in first and "not received" in first.lower()  # still the one-eye v1
    second = _text(results[1].path)
    assert "Left eye" in second and "Severe non-proliferative" in second
    assert renderer.pending == 0 and renderer.pid is None


def test_process_renderer_reports_a_failure_with_its_reason(tmp_path):
    renderer = ProcessRenderer()
    try:
        renderer.submit(RenderJob(7, _ctx([]), tmp_path / "missing-templates", tmp_path / "reports", retries=1))
        (result,) = _wait(renderer, 1)
    finally:
        renderer.close()
    assert result.key == 7 and result.path is None
    assert "ReportError" in result.error and "report.css" in result.error
    assert not list((tmp_path / "reports").rglob("*.pdf"))


def test_dead_renderer_fails_its_jobs_and_the_next_submit_starts_a_new_one(tmp_path):
    renderer = ProcessRenderer()
    try:
        renderer.start()
        first = renderer.pid
        os.kill(first, signal.SIGSTOP)  # hold it so the job is certainly still outstanding when it dies
        renderer.submit(RenderJob(1, _ctx([]), TEMPLATES, tmp_path / "reports"))
        os.kill(first, signal.SIGKILL)
        (lost,) = _wait(renderer, 1)
        assert lost.key == 1 and lost.path is None and "exited" in lost.error
        renderer.submit(RenderJob(2, _ctx([]), TEMPLATES, tmp_path / "reports"))
        (ok,) = _wait(renderer, 1)
        assert renderer.pid not in (None, first)
    finally:
        renderer.close()
    assert ok.key == 2 and ok.path is not None and ok.path.name == "report_v1.pdf"


def test_renderer_process_ignores_ctrl_c_and_stops_when_the_worker_goes(tmp_path):
    """Ctrl-C reaches the whole process group: the renderer keeps going until the worker closes its input."""
    renderer = ProcessRenderer()
    try:
        renderer.start()
        pid = renderer.pid
        time.sleep(1.0)  # let it install its handlers
        os.kill(pid, signal.SIGINT)
        renderer.submit(RenderJob(1, _ctx([]), TEMPLATES, tmp_path / "reports"))
        (ok,) = _wait(renderer, 1)
        assert ok.path is not None
        proc = renderer._proc
    finally:
        renderer.close(timeout=10)
    assert proc.returncode == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_renderer_process_runs_only_on_idle_cpu(tmp_path):
    """Grading keeps the CPU: the renderer child runs under SCHED_IDLE, the worker keeps its own policy."""
    renderer = ProcessRenderer()
    try:
        renderer.submit(RenderJob(1, _ctx([]), TEMPLATES, tmp_path / "reports"))
        (ok,) = _wait(renderer, 1)  # the child has set its policy before it reads its first job
        assert ok.path is not None
        assert os.sched_getscheduler(renderer.pid) == os.SCHED_IDLE
    finally:
        renderer.close()
    assert os.sched_getscheduler(0) != os.SCHED_IDLE


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="scheduling classes are read the Linux way")
@pytest.mark.parametrize("priority, added", [("low", 10), ("normal", 0)])
def test_renderer_process_at_low_or_normal_priority_keeps_the_normal_class(tmp_path, priority, added):
    """On a machine other work keeps busy an idle-class renderer waits for it: ``report_priority`` "low" renices
    the child by 10, "normal" leaves it at the worker's priority; neither uses SCHED_IDLE."""
    renderer = make_renderer("process", priority)
    try:
        renderer.submit(RenderJob(1, _ctx([]), TEMPLATES, tmp_path / "reports"))
        (ok,) = _wait(renderer, 1)  # the child has set its priority before it reads its first job
        assert ok.path is not None
        assert os.sched_getscheduler(renderer.pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, renderer.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + added)
    finally:
        renderer.close()


def test_an_unknown_report_priority_is_refused_naming_it():
    with pytest.raises(ValueError, match="'background'.*idle, low, normal"):
        ProcessRenderer(priority="background")
    import screening.renderer as r

    with pytest.raises(ValueError, match="'background'"):
        r.set_priority("background")


def test_idle_priority_falls_back_to_niceness(monkeypatch):
    import screening.renderer as r

    calls = []

    def refuse(*_):
        raise PermissionError("not allowed here")

    monkeypatch.setattr(r.os, "sched_setscheduler", refuse)
    monkeypatch.setattr(r.os, "nice", calls.append)
    assert r.set_priority() == f"nice {r.RENDERER_NICENESS}" and calls == [r.RENDERER_NICENESS]


def test_inline_renderer_same_results(tmp_path):
    renderer = make_renderer("inline")
    assert isinstance(renderer, InlineRenderer)
    renderer.submit(RenderJob(3, _ctx([_eye("L", 2, 0)]), TEMPLATES, tmp_path / "reports"))
    assert renderer.pending == 1
    (result,) = renderer.results()
    assert result.key == 3 and result.path.name == "report_v1.pdf" and renderer.pending == 0
    with pytest.raises(ValueError, match="'threads'"):
        make_renderer("threads")


def test_relative_paths_mean_the_same_folder_to_the_renderer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    renderer = ProcessRenderer()
    try:
        renderer.submit(RenderJob(1, _ctx([]), TEMPLATES, Path("relative-reports")))
        (result,) = _wait(renderer, 1)
    finally:
        renderer.close()
    assert result.error is None and result.path.is_relative_to(tmp_path.resolve() / "relative-reports")
    assert result.path.is_file()


def test_a_renderer_whose_worker_is_gone_stops_quietly(tmp_path, monkeypatch, caplog):
    """A renderer finishing after its worker died logged a BrokenPipeError traceback (issue 12); one whose worker is
    gone before it starts a job does not render it (it would be published and never recorded)."""
    import io
    import pickle

    from screening import renderer as module
    from screening.renderer import RenderResult, _serve

    rendered = []
    monkeypatch.setattr(module, "render_job", lambda job: rendered.append(job.key) or RenderResult(job.key, 1, None, "x"))
    job = RenderJob(7, _ctx([], version=1), TEMPLATES, tmp_path / "reports")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the worker is gone: nobody reads the results
    with os.fdopen(write_end, "wb") as results:
        assert _serve(io.BytesIO(pickle.dumps(job)), results) == 0
        assert rendered == [7]
        with pytest.raises(BrokenPipeError):
            results.close()
    assert "stopped while report job 7 rendered" in caplog.text and "Traceback" not in caplog.text
    rendered.clear()
    assert _serve(io.BytesIO(pickle.dumps(job)), io.BytesIO(), parent=os.getpid() + 999_999) == 0
    assert rendered == []  # its parent is not the worker any more: nothing rendered


def test_a_killed_worker_leaves_no_traceback_from_its_renderer(tmp_path):
    """The real child: its worker submits a report and is killed at once; whatever the child did then, it says
    nothing but a warning on stderr."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.screening.test_report import TEMPLATES, _ctx, _eye\n"
        "from screening.renderer import ProcessRenderer, RenderJob\n"
        "r = ProcessRenderer()\n"
        "r.submit(RenderJob(1, _ctx([_eye('R', 0, 0, Path(sys.argv[2]))], version=1), TEMPLATES, Path(sys.argv[3])))\n"
        "time.sleep(float(sys.argv[4]))\n"
        "os.kill(os.getpid(), 9)\n")
    run = subprocess.run([sys.executable, str(script), str(PROJECT), str(tmp_path / "img"), str(tmp_path / "reports"), "1.5"],
                         cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr[-2000:]


def test_a_failed_job_keeps_the_patient_for_the_database_and_gives_the_log_only_the_kinds(tmp_path, monkeypatch):
    """The worker records ``error`` (it names the patient, like the rest of the database) and logs ``kind``."""
    from screening import report as rpt
    from screening.renderer import render_job

    def full_disk(ctx, templates_dir, reports_dir):
        raise OSError(28, "No space left on device", str(tmp_path / "reports" / ctx.patient_id / "report_v1.pdf"))

    monkeypatch.setattr(rpt, "render_pdf", full_disk)
    ctx = _ctx([], version=1)
    result = render_job(RenderJob(3, ctx, TEMPLATES, tmp_path / "reports", retries=1, retry_delay=0))
    assert result.path is None and ctx.patient_id in result.error
    assert result.kind == "ReportError, from OSError [ENOSPC]"
