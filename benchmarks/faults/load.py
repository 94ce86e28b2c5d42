"""Faults benchmark, the load and the phases: steady load, Triton killed, deadlines, hot reload, durability.

See :mod:`benchmarks.faults` for what is measured and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import latency_summary, log
from benchmarks.faults.stack import MODEL_FALLBACKS, ROOT, FaultSettings, Stack, _health, fd_count, thread_count, wait_until

# ---------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Workload:
    """Who the load asks for: known users, and explicit histories of known movies.

    Attributes:
        users: Known user ids (from ``interactions.parquet``).
        movies: Catalog movie ids.
        genres: Catalog genre names.
        history_share: Share of calls sending an explicit history.
        k: Items per call.
    """

    users: np.ndarray
    movies: np.ndarray
    genres: tuple[str, ...]
    history_share: float
    k: int

    @classmethod
    def from_artifacts(cls, artifacts: Path, history_share: float, k: int) -> Workload:
        import pandas as pd

        users = pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id"]).user_id.unique()
        items = pd.read_parquet(artifacts / "items.parquet", columns=["movie_id", "genres"])
        genres = sorted({g for gs in items.genres for g in str(gs).split("|") if g})
        return cls(np.sort(users.astype(np.int64)), items.movie_id.to_numpy(np.int64), tuple(genres), history_share, k)

    def call(self, rng: random.Random) -> dict[str, Any]:
        """Keyword arguments of one ``recommend`` call."""
        if rng.random() < self.history_share:
            picks = rng.sample(range(len(self.movies)), min(len(self.movies), rng.randint(1, 30)))
            return {"history": [int(self.movies[i]) for i in picks], "k": self.k}
        return {"user_id": int(self.users[rng.randrange(len(self.users))]), "k": self.k}


Outcome = tuple[float, float, str, str, str]
"""``(started, ended, status, fallback reason or "", model_version)``; times are ``time.monotonic()``."""


class LoadRunner:
    """Recommend calls at a fixed concurrency from an asyncio loop in a background thread.

    The main thread stays free to kill, stall and restart processes while the calls go on,
    and reads :attr:`outcomes` (appended by the loop thread) to see what the callers saw.

    Args:
        target: Orchestrator ``host:port``.
        workload: What to ask.
        concurrency: Calls in flight.
        total: Calls to make (None: until :meth:`stop`).
        timeout_s: Deadline of each call.
        seed: Workload randomness.
    """

    def __init__(self, target: str, workload: Workload, concurrency: int, total: int | None, timeout_s: float, seed: int):
        self.target = target
        self.workload = workload
        self.concurrency = concurrency
        self.total = total
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.bench_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="faults-load", daemon=True)
        self._issued = 0

    async def _worker(self, client: Any) -> None:
        from clients.errors import RecsysRpcError
        from protos.recsys.v1 import recsys_pb2 as pb

        while not self._stop.is_set() and (self.total is None or self._issued < self.total):
            self._issued += 1
            kwargs = self.workload.call(self.rng)
            t0 = time.monotonic()
            try:
                r = await client.recommend(timeout_s=self.timeout_s, **kwargs)
                reason = pb.FallbackReason.Name(r.fallback_reason) if r.is_fallback else ""
                self.outcomes.append((t0, time.monotonic(), "OK", reason, r.model_version))
            except RecsysRpcError as exc:
                self.outcomes.append((t0, time.monotonic(), exc.code.name, "", ""))
            except Exception as exc:  # a defect of the benchmark, not of the server: keep going, report it
                self.bench_errors.append(repr(exc))
                self.outcomes.append((t0, time.monotonic(), "CLIENT_" + type(exc).__name__, "", ""))

    async def _main(self) -> None:
        from clients.client import AsyncRecsysClient

        # no retries: a retried UNAVAILABLE would hide exactly what this benchmark looks for
        async with AsyncRecsysClient(self.target, timeout_s=self.timeout_s, retries=0) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.concurrency)))

    def start(self) -> LoadRunner:
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Issues no more calls and waits for those in flight."""
        self._stop.set()
        self._thread.join()

    def first(self, predicate: Callable[[Outcome], bool]) -> Outcome | None:
        """The earliest-ending outcome satisfying ``predicate`` so far."""
        return next((o for o in list(self.outcomes) if predicate(o)), None)


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by status and fallback reason, versions, latency and throughput of a set of calls."""
    by_status = Counter(o[2] for o in outcomes)
    ok = [o for o in outcomes if o[2] == "OK"]
    personal = [o for o in ok if not o[3]]
    span = (max(o[1] for o in outcomes) - min(o[0] for o in outcomes)) if outcomes else 0.0
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "personal": len(personal),
        "fallback_by_reason": dict(Counter(o[3] for o in ok if o[3])),
        "by_status": dict(by_status),
        "versions": sorted({o[4] for o in personal}, key=lambda v: (len(v), v)),
        "latency_ok": latency_summary([o[1] - o[0] for o in ok]),
        "qps": round(len(outcomes) / span, 1) if span > 0 else None,
        "seconds": round(span, 2),
    }


# ---------------------------------------------------------------------------- phases


def phase_load(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``load``: a fixed number of calls at high concurrency; every non-OK status is an error, except
    RESOURCE_EXHAUSTED: admission control's refusal past ``max_in_flight`` (issue 13), counted as ``shed``."""
    runner = LoadRunner(stack.target, workload, s.load_concurrency, s.load_requests, s.call_timeout_s, s.seed).start()
    while runner.running():
        runner.join(10)
        log(f"load: {len(runner.outcomes):,} / {s.load_requests:,}")
    summary = summarize(runner.outcomes)
    shed = summary["by_status"].get("RESOURCE_EXHAUSTED", 0)
    errors = summary["requests"] - summary["ok"] - shed
    return {
        "requests": summary["requests"],
        "errors": errors,
        "errors_by_status": {k: v for k, v in summary["by_status"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")},
        "shed": shed,
        "fallback": sum(summary["fallback_by_reason"].values()),
        "fallback_by_reason": summary["fallback_by_reason"],
        "concurrency": s.load_concurrency,
        "history_share": s.history_share,
        "latency": summary["latency_ok"],
        "qps": summary["qps"],
        "seconds": summary["seconds"],
        "bench_errors": runner.bench_errors[:5],
    }


def phase_triton_killed(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``triton_killed``: SIGKILL Triton under load, wait for NOT_SERVING, restart it on its ports."""
    runner = LoadRunner(stack.target, workload, s.kill_concurrency, None, s.call_timeout_s, s.seed + 1).start()
    time.sleep(s.kill_warmup_s)
    t_kill = time.monotonic()
    stubs = stack.kill_triton()
    log("triton_killed: Triton SIGKILLed")
    not_serving = wait_until(lambda: _health(stack.target) == "NOT_SERVING", 30.0, 0.1)
    t_not_serving = time.monotonic()
    time.sleep(max(0.0, s.kill_down_s - (time.monotonic() - t_kill)))
    t_restart = time.monotonic()
    try:
        stack.start_triton()
    except Exception:
        runner.stop()
        raise
    t_ready = time.monotonic()
    orphans = stack.reap_orphans(stubs)
    log(
        f"triton_killed: Triton restarted, ready after {t_ready - t_restart:.1f} s; "
        f"{len(orphans)} of the killed server's {len(stubs)} backend stubs still ran {t_ready - t_kill:.0f} s after the kill"
    )

    def personal_since_restart(o: Outcome) -> bool:
        return o[2] == "OK" and not o[3] and o[0] >= t_restart

    recovered = wait_until(lambda: runner.first(personal_since_restart) is not None, s.kill_recover_timeout_s)
    serving_again = wait_until(lambda: _health(stack.target) == "SERVING", 30.0, 0.1)
    t_serving = time.monotonic()
    time.sleep(1.0)  # a little steady state after the recovery
    runner.stop()
    first = runner.first(personal_since_restart)
    summary = summarize(runner.outcomes)
    down = [o for o in runner.outcomes if t_kill <= o[0] < t_ready]
    fallback = sum(v for k, v in summary["fallback_by_reason"].items() if k in MODEL_FALLBACKS)
    return {
        "requests": summary["requests"],
        "answered": summary["ok"],
        "fallback": fallback,
        "recovered_s": round(first[1] - t_restart, 3) if first else None,
        "recovered_after_ready_s": round(first[1] - t_ready, 3) if first else None,
        "recovered": bool(recovered),
        # includes the `recsys triton` launcher's own start (Python imports), as a real restart would
        "triton_restart_s": round(t_ready - t_restart, 3),
        "triton_down_s": round(t_ready - t_kill, 3),
        "health_not_serving": bool(not_serving),
        "backend_stubs": len(stubs),
        "orphaned_backend_stubs": len(orphans),  # still running when Triton was ready again
        "orphaned_backend_stub_models": orphans,
        "health_not_serving_after_kill_s": round(t_not_serving - t_kill, 3) if not_serving else None,
        "health_serving_after_ready_s": round(t_serving - t_ready, 3) if serving_again else None,
        "by_status": summary["by_status"],
        "fallback_by_reason": summary["fallback_by_reason"],
        "while_down": {"requests": len(down), "personal": sum(1 for o in down if o[2] == "OK" and not o[3])},
        "concurrency": s.kill_concurrency,
        "latency": summary["latency_ok"],
        "seconds": summary["seconds"],
        "bench_errors": runner.bench_errors[:5],
    }


def phase_deadline(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``deadline``: short-deadline calls against a SIGSTOPped Triton; threads and fds after."""
    pid = stack.orchestrator_pid
    time.sleep(1.0)
    before = {"threads": thread_count(pid), "fds": fd_count(pid)}
    peak = dict(before)
    runner = LoadRunner(stack.target, workload, s.deadline_concurrency, s.deadline_calls, s.deadline_s, s.seed + 2)
    os.kill(stack.triton_pid, signal.SIGSTOP)
    try:
        runner.start()
        while runner.running():
            peak = {"threads": max(peak["threads"], thread_count(pid)), "fds": max(peak["fds"], fd_count(pid))}
            runner.join(0.1)
    finally:
        os.kill(stack.triton_pid, signal.SIGCONT)
    t_cont = time.monotonic()
    settled = wait_until(lambda: thread_count(pid) <= before["threads"] and fd_count(pid) <= before["fds"], s.settle_s, 0.25)
    settle_s = time.monotonic() - t_cont
    after = {"threads": thread_count(pid), "fds": fd_count(pid)}
    summary = summarize(runner.outcomes)

    def personal() -> bool:
        from clients.client import RecsysClient

        with contextlib.suppress(Exception), RecsysClient(stack.target, timeout_s=5.0, retries=0) as client:
            return not client.recommend(int(workload.users[0]), k=workload.k).is_fallback
        return False

    recovered = wait_until(personal, 30.0, 0.2)
    return {
        "calls": summary["requests"],
        "leaked_threads": after["threads"] - before["threads"],
        "leaked_fds": after["fds"] - before["fds"],
        "deadline_exceeded": summary["by_status"].get("DEADLINE_EXCEEDED", 0),
        "by_status": summary["by_status"],
        "deadline_s": s.deadline_s,
        "concurrency": s.deadline_concurrency,
        "threads": {"before": before["threads"], "peak": peak["threads"], "after": after["threads"]},
        "fds": {"before": before["fds"], "peak": peak["fds"], "after": after["fds"]},
        "settled": bool(settled),
        "settle_s": round(settle_s, 2),
        "latency": latency_summary([o[1] - o[0] for o in runner.outcomes]),
        "personal_after_sigcont": bool(recovered),
    }


def phase_reload(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``reload``: ``recsys export`` under load; the load lasts until the new version answers."""
    runner = LoadRunner(stack.target, workload, s.reload_concurrency, None, s.call_timeout_s, s.seed + 3).start()
    time.sleep(1.0)
    old = summarize(runner.outcomes)["versions"]
    t0 = time.monotonic()
    out_path, err_path = stack.workdir / "export.json", stack.workdir / "export.log"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "export", "--artifacts", str(stack.artifacts), "--repo", str(stack.repo), "--quiet"],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    try:
        rc = proc.wait(timeout=s.export_timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    t_exported = time.monotonic()
    new_version = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        new_version = str(json.loads(out_path.read_text())["version"])
    log(f"reload: export exited {rc} after {t_exported - t0:.1f} s, published version {new_version}; waiting for it")

    def is_new(o: Outcome) -> bool:
        return o[2] == "OK" and not o[3] and o[4] == new_version

    reloaded = new_version is not None and wait_until(lambda: runner.first(is_new) is not None, s.reload_timeout_s, 0.1)
    if reloaded:
        time.sleep(2.0)  # the swap should stay swapped: later answers must not go back
    runner.stop()
    first = runner.first(is_new)
    summary = summarize(runner.outcomes)
    back = sum(1 for o in runner.outcomes if first and o[2] == "OK" and not o[3] and o[0] > first[1] and o[4] != new_version)
    fallback = sum(summary["fallback_by_reason"].values())
    return {
        "requests": summary["requests"],
        "failed": summary["requests"] - summary["ok"],
        "versions": summary["versions"],
        "reloaded": bool(reloaded),
        "old_versions": old,
        "new_version": new_version,
        "first_new_version_s": round(first[1] - t0, 3) if first else None,
        "first_new_version_after_export_s": round(first[1] - t_exported, 3) if first else None,
        "old_version_after_new": back,
        "fallback": fallback,
        "fallback_by_reason": summary["fallback_by_reason"],
        "by_status": summary["by_status"],
        "export_rc": rc,
        "export_s": round(t_exported - t0, 2),
        "export_log_tail": err_path.read_text(errors="replace").splitlines()[-5:] if rc else [],
        "reload_poll_s": s.reload_poll_s,
        "concurrency": s.reload_concurrency,
        "latency": summary["latency_ok"],
        "seconds": summary["seconds"],
    }


async def _record_until(
    target: str, calls: list[tuple[int, int, float, int]], n: int, concurrency: int, kill: Callable[[], None]
) -> tuple[set, Counter]:
    """RecordInteraction ``calls`` in order until ``n`` are acknowledged, then ``kill()`` at once.

    Returns:
        The acknowledged ``(user, movie, timestamp)`` keys and the statuses seen.
    """
    from clients.client import AsyncRecsysClient
    from clients.errors import RecsysRpcError

    acked: set[tuple[int, int, int]] = set()
    statuses: Counter = Counter()
    queue = iter(calls)
    done = asyncio.Event()

    async def worker(client: Any) -> None:
        for user, movie, rating, ts in queue:
            if done.is_set():
                return
            try:
                r = await client.record_interaction(user, movie, rating, ts)
            except RecsysRpcError as exc:
                statuses[exc.code.name] += 1
                continue
            statuses["OK"] += 1
            acked.add((user, movie, int(r.timestamp_s)))
            if len(acked) >= n and not done.is_set():
                done.set()
                kill()  # synchronous: no other acknowledgement is read before the process is gone

    async with AsyncRecsysClient(target, timeout_s=10.0, retries=0) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return acked, statuses


def phase_durability(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``durability``: acknowledged writes, SIGKILL at the N-th acknowledgement, restart, look them up."""
    rng = random.Random(s.seed + 4)
    base = int(workload.users.max()) + 1_000_001
    now = int(time.time())
    # twice as many calls as needed: the kill lands with some of them still in flight
    calls = [
        (
            base + i,
            int(workload.movies[rng.randrange(len(workload.movies))]),
            rng.choice((0.0, 1.0, 2.5, 3.0, 4.5, 5.0)),
            now - rng.randrange(86_400),
        )
        for i in range(2 * s.durability_n)
    ]
    pid = stack.orchestrator_pid
    killed_at: list[float] = []

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    t0 = time.monotonic()
    acked, statuses = asyncio.run(_record_until(stack.target, calls, s.durability_n, s.durability_concurrency, kill))
    if not killed_at:  # fewer than N acknowledged (the statuses say why): kill it all the same
        kill()
    stack.orchestrator.wait()
    log(f"durability: {len(acked)} acknowledged, orchestrator SIGKILLed; restarting it on the same history file")
    restart_s = stack.start_orchestrator()
    con = sqlite3.connect(stack.history_db, timeout=30)
    try:
        rows = con.execute(
            "SELECT user_id, movie_id, timestamp FROM interactions WHERE user_id >= ? AND user_id < ?", (base, base + len(calls))
        ).fetchall()
    finally:
        con.close()
    stored = set(rows)
    found = len(acked & stored)
    visible = 0
    sample = sorted(acked)[:20]
    from clients.client import RecsysClient

    with RecsysClient(stack.target, timeout_s=10.0, retries=0) as client:
        for user, _, _ in sample:
            with contextlib.suppress(Exception):
                visible += int(client.recommend(user, k=workload.k).history_length >= 1)
    return {
        "acked": len(acked),
        "lost": len(acked) - found,
        "found": found,
        "stored_unacknowledged": len(stored - acked),
        "statuses": dict(statuses),
        "killed": bool(killed_at),
        "writes_s": round((killed_at[0] if killed_at else time.monotonic()) - t0, 2),
        "restart_s": round(restart_s, 2),
        "visible_via_recommend": {"checked": len(sample), "with_history": visible},
        "concurrency": s.durability_concurrency,
        "user_ids": [base, base + len(calls) - 1],
    }
