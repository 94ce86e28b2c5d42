"""benchmarks.process_cpu: CPU seconds of a process tree by role, per call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.process_cpu import ProcessTreeCpu, cpu_line

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\nprint('{name} done', flush=True)\ntime.sleep(60)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_root_and_its_child_are_counted():
    # the root burns 0.3 s of CPU, its child 0.6 s; each says so on the shared stdout, then sleeps
    child = BURN.format(s=0.6, name="child")
    script = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}]); exec({BURN.format(s=0.3, name='root')!r})"
    root = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        cpu = ProcessTreeCpu(root.pid)
        before = cpu.snapshot()
        assert before is not None and before.by_pid  # the root at least
        assert root.stdout is not None
        done = {root.stdout.readline().strip() for _ in range(2)}  # blocks until both burned
        assert done == {"root done", "child done"}
        after = cpu.snapshot()
        figures = ProcessTreeCpu.per_call(before, after, calls=10)
        assert figures is not None
        assert len(after.by_pid) == 2  # the child process was found through its parent
        per_call = figures["ms_per_call"]
        # 10 calls: the root's ~0.3 s (and its start-up) is ~30 ms a call, the child's ~0.6 s (role "other") ~60 ms
        assert 25 <= per_call["orchestrator"] <= 60 and 55 <= per_call["other"] <= 95
        assert figures["ceiling_qps"] == pytest.approx(figures["cores"] * 1e3 / figures["total_ms"], rel=0.01)
        assert "orchestrator" in cpu_line(figures) and "ceiling" in cpu_line(figures)
    finally:
        os.killpg(root.pid, signal.SIGKILL)  # the child too
        root.wait()


def test_without_proc_nothing_is_claimed():
    assert ProcessTreeCpu(2**22 + 12345).snapshot() is None  # no such pid
    assert ProcessTreeCpu.per_call(None, None, 10) is None
    assert cpu_line(None) == "CPU per call: not measured (no /proc)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_load_watch_reports_the_busy_and_stolen_shares():
    from benchmarks.common import LoadWatch, conditions_line

    with LoadWatch() as load:
        t = time.process_time()
        while time.process_time() - t < 0.3:  # one CPU busy for 0.3 s
            pass
    record = load.record()
    cores = len(os.sched_getaffinity(0))
    assert 100 / cores * 0.5 <= record["busy_pct"] <= 100  # at least about half of one CPU's share
    assert 0 <= record["steal_pct"] <= 100
    assert "stolen by the hypervisor" in conditions_line({"load_average": record})
