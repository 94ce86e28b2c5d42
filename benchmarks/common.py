"""What every benchmark records next to its figures: the conditions, and a few shared helpers.

STYLE.md item 12: a figure without its conditions cannot be compared with another one. Every
benchmark in this folder therefore writes :func:`conditions` (git sha and whether the tree was
dirty, CPU model, cores, the CPUs this process may use, niceness, package versions) and the
load average before and after its run (:class:`LoadWatch`): the development machines are
shared 2-core VMs, and a load average of 3 during a latency run explains a p99 better than
any code change does.

Latency summaries (:func:`latency_summary`) are medians and 99th percentiles in
milliseconds; means are kept for throughput arithmetic, never for comparisons.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.process_cpu import usable_cpus
from export.pipeline import git_sha, merged_candidates, package_versions, ranker_queries, users_with_history
from export.ranker import candidate_features, candidate_labels
from export.split import relevant_items

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
"""Default output folder (``reports/`` is git-ignored: figures are regenerated, not committed)."""

GIB = 1024**3


def log(message: str) -> None:
    """A timestamped progress line on stderr (long runs say where they are; stdout stays the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform`` only says ``x86_64``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_dirty() -> bool | None:
    """Whether the code behind the figures differs from the commit (None outside git).

    A sha alone would claim the figures came from that commit; with work in progress in
    the tree they came from the sha *plus* the diff, and the report should say so. Counted:
    modified tracked files anywhere, and untracked files under ``benchmarks/`` and
    ``export/`` (a new benchmark module is part of what produced its figures).
    """
    try:
        tracked = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", ":(top)benchmarks", ":(top)export"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or tracked.returncode != 0:
        return None
    return bool(out.stdout.strip() or tracked.stdout.strip())


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_ticks() -> tuple[int, int, int] | None:
    """``(all, busy, steal)`` clock ticks of every CPU since boot, from ``/proc/stat`` (None elsewhere).

    ``steal`` is time a virtual CPU was runnable but the hypervisor ran something else: on a
    shared VM it changes how much work a CPU-second does, which no load average shows.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return sum(fields), user + nice + system + irq + softirq, steal


def current_rss_bytes() -> int:
    """Resident set size of this process *now* (``getrusage`` only knows the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def conditions(**extra: Any) -> dict[str, Any]:
    """The machine and code a benchmark ran on.

    Args:
        **extra: Benchmark-specific conditions (threads, repeats, warm-up, catalog size...),
            merged in last.

    Returns:
        A JSON-able dict.
    """
    out: dict[str, Any] = {
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "nice": os.nice(0),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "gpu": None,
        "platform": platform.platform(),
        "packages": package_versions(),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.update(extra)
    return out


class LoadWatch:
    """Records the load average before and after a block, and its wall time.

    Example::

        with LoadWatch() as load:
            run()
        report["conditions"]["load_average"] = load.record()
    """

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []
        self.seconds = 0.0
        self._t0 = 0.0
        self._ticks0: tuple[int, int, int] | None = None
        self._ticks1: tuple[int, int, int] | None = None

    def __enter__(self) -> LoadWatch:
        self.before = load_average()
        self._ticks0 = cpu_ticks()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.after = load_average()
        self._ticks1 = cpu_ticks()

    def record(self) -> dict[str, Any]:
        """``{"before": [1, 5, 15 min], "after": [...], "wall_s": ..., "busy_pct": ..., "steal_pct": ...}``.

        ``busy_pct`` / ``steal_pct``: shares of all CPUs' time during the block spent working /
        taken by the hypervisor (None without ``/proc/stat``).
        """
        out: dict[str, Any] = {"before": self.before, "after": self.after or load_average(), "wall_s": round(self.seconds, 1)}
        out["busy_pct"] = out["steal_pct"] = None
        t0, t1 = self._ticks0, self._ticks1 or cpu_ticks()
        if t0 and t1 and t1[0] > t0[0]:
            span = t1[0] - t0[0]
            out["busy_pct"] = round(100 * (t1[1] - t0[1]) / span, 1)
            out["steal_pct"] = round(100 * (t1[2] - t0[2]) / span, 1)
        return out


def latency_summary(seconds: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """p50 / p99 / mean in milliseconds of per-call wall times given in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan}
    return {
        "n": int(ms.size),
        "p50_ms": round(float(np.median(ms)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` rounded, or None when either is missing or the reference is 0."""
    if value is None or reference is None or not reference or not math.isfinite(value) or not math.isfinite(reference):
        return None
    return round(value / reference, 3)


def write_json(path: str | Path, payload: Any) -> Path:
    """Writes ``payload`` as indented JSON atomically (a reader never sees half a report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers are right-aligned, None prints as ``-``."""
    rows = [list(r) for r in rows]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) if rows else False for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(v) for v in r) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def conditions_line(cond: dict[str, Any]) -> str:
    """One printable line of the conditions that matter most when reading a table."""
    sha = (cond.get("git_sha") or "no-git")[:10] + ("+dirty" if cond.get("git_dirty") else "")
    load = cond.get("load_average", {})
    return (
        f"git {sha}; {cond.get('cpu')}, {cond.get('cores')} cores; nice {cond.get('nice')}; "
        f"load avg before {load.get('before')} after {load.get('after')}"
        + (f"; CPUs busy {load['busy_pct']} %, stolen by the hypervisor {load['steal_pct']} %" if load.get("steal_pct") is not None else "")
    )


def publish_report(report: dict[str, Any], load: LoadWatch, text: str, out: str | None, **extra: Any) -> int:
    """Adds the run's conditions to ``report``, prints them and ``text``, writes the JSON to ``out``."""
    report["conditions"] = conditions(load_average=load.record(), **extra)
    print(conditions_line(report["conditions"]))
    print(text)
    if out:
        write_json(Path(out), report)
    return 0


@dataclass(frozen=True)
class RankerMatrices:
    """One rolling window's ranker data, built as :func:`export.pipeline.fit_models` builds it.

    Attributes:
        train: float32 [n_val_users * C, F] features of the validation candidates (the
            ranker's training queries: users active in validation who have a past).
        labels: int32 [n_val_users, C] their graded labels from the validation period.
        train_candidates: Those users' merged candidates (``items`` [n_val_users, C]).
        train_users: Those users.
        test: float32 [n_test_users * C, F] features of the test users' candidates.
        test_candidates: The test users' merged candidates (``items`` [n_test_users, C]).
        test_users: The test users (relevant items in the test period and a past).
        relevant: Each test user's relevant items.
    """

    train: np.ndarray
    labels: np.ndarray
    train_candidates: Any
    train_users: np.ndarray
    test: np.ndarray
    test_candidates: Any
    test_users: np.ndarray
    relevant: list[np.ndarray]


def ranker_matrices(fitted: Any, candidates: int) -> RankerMatrices:
    """The validation (training) and test matrices of the ranker for ``fitted``'s window."""
    cat, split, period = fitted.catalog, fitted.split, fitted.test_period
    rel = relevant_items(split.test, cat.index_of())
    users = users_with_history(rel, period)
    model = fitted.two_tower.model
    c = merged_candidates(model, period, fitted.demographics, fitted.tables, users, candidates)
    test = candidate_features(fitted.ranker_features(period, model), c.history, c.history_rating, c.items, c.scores, c.sources)
    vp, vm = fitted.val_period, fitted.two_tower_val.model
    active = ranker_queries(split.val, vp.histories)
    cv = merged_candidates(vm, vp, fitted.demographics, fitted.tables_val, active, candidates, False)
    train = candidate_features(fitted.ranker_features(vp, vm), cv.history, cv.history_rating, cv.items, cv.scores, cv.sources)
    labels = candidate_labels(active, cv.items, split.val, cat)
    return RankerMatrices(train, labels, cv, active, test, c, users, [rel[u] for u in users])
