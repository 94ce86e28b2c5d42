"""CPU seconds per answered call, by process: where a served call's CPU goes, and the ceiling it sets.

On a machine whose cores the load generator shares with the server, throughput at saturation
is bounded by ``cores / (CPU seconds per call summed over every process)``, whatever the
scheduling: a benchmark that reports QPS without this cannot say whether a target is out of
reach of the code or of the machine. :class:`ProcessTreeCpu` reads ``/proc/<pid>/stat``
(user + system ticks) of the served stack's process tree (``recsys serve``, the embedded
``tritonserver`` it starts and Triton's Python-backend stubs below that) before and after a
measured level; this process's own CPU is the load generator's.

Linux only: elsewhere (no ``/proc``) :meth:`ProcessTreeCpu.snapshot` returns None and the
report says so instead of a figure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC = Path("/proc")
ROLES = {"tritonserver": "tritonserver", "triton_python_b": "triton_python_stubs"}
"""Process names (``comm``, cut at 15 characters by the kernel) -> the role they are counted under;
the tree's root is ``orchestrator``, any other descendant ``other``."""


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of each process in the tree (with its role) and of this process, at one moment."""

    by_pid: dict[int, tuple[str, float]]
    generator_s: float


def _stat(pid: int) -> tuple[str, int, float] | None:
    """``(comm, parent pid, user + system seconds)`` of ``pid``, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: it ends at the LAST ')'
    close = text.rfind(")")
    comm = text[text.find("(") + 1 : close]
    fields = text[close + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return comm, int(fields[1]), ticks / os.sysconf("SC_CLK_TCK")


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), None where the platform cannot say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _self_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ProcessTreeCpu:
    """CPU accounting for the process tree under ``root`` (the served stack) and this process.

    Example::

        cpu = ProcessTreeCpu(stack.proc.pid)
        before = cpu.snapshot()
        ...  # n answered calls
        figures = cpu.per_call(before, cpu.snapshot(), n)
    """

    def __init__(self, root: int):
        self.root = root

    def snapshot(self) -> CpuSnapshot | None:
        """CPU seconds of every process now in the tree; None without ``/proc``."""
        if not (PROC / str(self.root) / "stat").exists():
            return None
        stats = {}
        for entry in PROC.iterdir():
            if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
                stats[int(entry.name)] = found
        tree, grew = {self.root}, True
        while grew:  # descendants: children of anything already in the tree
            more = {pid for pid, (_, parent, _) in stats.items() if parent in tree} - tree
            tree |= more
            grew = bool(more)
        by_pid = {}
        for pid in tree & stats.keys():
            comm, _, used = stats[pid]
            by_pid[pid] = ("orchestrator" if pid == self.root else ROLES.get(comm, "other"), used)
        return CpuSnapshot(by_pid, _self_seconds())

    @staticmethod
    def per_call(before: CpuSnapshot | None, after: CpuSnapshot | None, calls: int) -> dict[str, Any] | None:
        """Milliseconds of CPU per call by role, their total and the saturation ceiling.

        Processes present in both snapshots count their difference; one started in between
        counts all it used (a stub Triton started for a reload, say). ``ceiling_qps`` is
        ``cores x 1000 / total_ms``: the answers per second the cores allow with no idle moment.
        """
        if before is None or after is None or calls <= 0:
            return None
        used: dict[str, float] = {}
        for pid, (role, s) in after.by_pid.items():
            used[role] = used.get(role, 0.0) + s - (before.by_pid[pid][1] if pid in before.by_pid else 0.0)
        used["load_generator"] = after.generator_s - before.generator_s
        ms = {role: round(s / calls * 1e3, 3) for role, s in sorted(used.items())}
        total = sum(used.values()) / calls * 1e3
        cores = usable_cpus() or os.cpu_count() or 1
        return {
            "ms_per_call": ms,
            "total_ms": round(total, 3),
            "cores": cores,
            "ceiling_qps": round(cores * 1e3 / total, 1) if total > 0 else None,
        }


def cpu_line(figures: dict[str, Any] | None) -> str:
    """One log line: ``CPU per call: orchestrator 6.6 ms, ... = 11.5 ms (ceiling 174 QPS on 2 cores)``."""
    if figures is None:
        return "CPU per call: not measured (no /proc)"
    parts = ", ".join(f"{role} {ms} ms" for role, ms in figures["ms_per_call"].items())
    return f"CPU per call: {parts} = {figures['total_ms']} ms (ceiling {figures['ceiling_qps']} QPS on {figures['cores']} cores)"
