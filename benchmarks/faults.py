"""Faults and load (issue #6): the served stack under load, with Triton killed, stalled and
reloaded, the orchestrator killed, and hostile requests.

    recsys bench faults [--artifacts DIR --repo DIR] [--out FILE] [--quick] [--skip PHASE ...]

Everything runs as real processes on loopback: the embedded Triton (``orchestrator/tritonserver.py``) runs
under a ``recsys triton`` subprocess on fixed ports, so that its ``tritonserver`` pid can be
SIGKILLed, SIGSTOPped and restarted on the same ports; the orchestrator is a ``recsys serve
--triton-url ...`` subprocess on a fixed port and history file, so that it can be SIGKILLed
and restarted on both. The deployment is a *copy*
(the reload phase publishes a new version into the repository and rebuilds the FAISS bundle
in the artifacts); without ``--artifacts``/``--repo`` a tiny model is trained on
``data/ml-latest-small`` first.

Phases, in this order (each can be skipped; its JSON section then says ``"skipped": true``):

``load``
    Recommend at concurrency 32 through :class:`~clients.client.AsyncRecsysClient` (no
    retries, so nothing is hidden): known users from ``interactions.parquet`` and, for a
    share of the calls, explicit histories. Target: 0 errors.
``triton_killed``
    The same load at concurrency 8; Triton is SIGKILLed mid-run, kept down until the
    orchestrator's health for ``recsys.v1.Recommender`` reads NOT_SERVING, then restarted on
    the same ports. Targets: every request answered (fallbacks count as answers), health
    turned NOT_SERVING, the first personal answer at most 5 s after Triton was ready again.
``deadline``
    Triton SIGSTOPped (alive but silent); 1,000 calls with a 50 ms deadline; SIGCONT. Targets:
    every call DEADLINE_EXCEEDED, the orchestrator's thread and fd counts
    (``/proc/PID/task``, ``/proc/PID/fd``) back to their baseline within a few seconds.
``reload``
    ``recsys export`` (version N+1 and the FAISS bundle) runs while the load goes on; the load
    continues until personal answers report the new version or a timeout. The orchestrator
    is started with ``RECSYS_RELOAD_POLL_S`` (``ServeSettings.reload_poll_s``, read by
    ``from_env``). Targets: no failed call, the new version served, no old-version answer
    once a new-version one has been seen.
``durability``
    RecordInteraction for fresh users (ids above every known one) at concurrency 8; the
    orchestrator is SIGKILLed the moment the N-th acknowledgement arrives, restarted on the
    same SQLite file, and every acknowledged ``(user, movie, timestamp)`` is looked up in it.
    Target: 0 lost.
``fuzz``
    Hypothesis generates malformed and hostile requests for every RPC (huge and zero k,
    negative and int64-extreme ids, histories of up to 100,000 ids, unicode and garbage genre
    names, NaN/inf floats, inverted years, missing fields, empty messages), sent through the
    raw generated stubs so no client-side check hides anything. Every answer must be OK or a
    client-error status with a message. Targets: 0 INTERNAL/UNKNOWN (including failures
    inside BatchRecommend results, and the random-bytes bodies probed after it,
    ``fuzz.undecodable``: the server parses bodies with deserializers that never raise and
    answers undecodable ones INVALID_ARGUMENT), 0 orchestrator crashes.

Output: the JSON report (``--out``): ``conditions`` and one section per phase, each with its
figures and its ``targets`` (``value``, ``wanted``, ``met``; ``met`` is null when skipped);
progress on stderr; a table, any INTERNAL/UNKNOWN request with the server's traceback, and
the targets on stdout. Exit code 0 only when every target of every phase that ran is met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, latency_summary, log, markdown_table, write_json
from export import DEFAULT_DATA_DIR

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("load", "triton_killed", "deadline", "reload", "durability", "fuzz")
SECTION_KEYS = {
    "load": ("requests", "errors"),
    "triton_killed": ("requests", "answered", "fallback", "recovered_s"),
    "deadline": ("calls", "leaked_threads"),
    "reload": ("requests", "failed", "versions"),
    "durability": ("acked", "lost"),
    "fuzz": ("requests", "internal", "crashes"),
}
"""The keys every section of the report has (skipped phases carry them as null)."""

SERVICE = "recsys.v1.Recommender"
CLIENT_ERRORS = frozenset(
    {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
)
"""Statuses a hostile request may get besides OK."""
SERVER_DEFECTS = frozenset({"INTERNAL", "UNKNOWN"})
MODEL_FALLBACKS = frozenset({"FALLBACK_REASON_MODEL_UNAVAILABLE", "FALLBACK_REASON_MODEL_TIMEOUT"})


@dataclass(frozen=True)
class FaultSettings:
    """What one run does.

    Attributes:
        load_requests: Recommend calls of the load phase.
        load_concurrency: Calls in flight during the load phase.
        history_share: Share of load calls that send an explicit history instead of a user id.
        k: Items per Recommend.
        call_timeout_s: Deadline of each load call.
        kill_concurrency: Calls in flight while Triton is killed and restarted.
        kill_warmup_s: Load before the kill.
        kill_down_s: Least time Triton stays dead (it also stays dead until health says so).
        kill_recover_timeout_s: Longest wait for a personal answer after the restart.
        deadline_calls: Calls made against the stalled Triton.
        deadline_s: Their deadline.
        deadline_concurrency: Their concurrency.
        settle_s: Longest wait for thread and fd counts to return to their baseline.
        reload_concurrency: Calls in flight during the export.
        reload_timeout_s: Longest wait, after the export finished, for the new version.
        reload_poll_s: ``RECSYS_RELOAD_POLL_S`` given to the orchestrator.
        export_timeout_s: Longest the export may take.
        durability_n: Acknowledged RecordInteraction calls before the orchestrator is killed.
        durability_concurrency: Their concurrency.
        fuzz_requests: Hostile requests generated by Hypothesis.
        fuzz_timeout_s: Deadline of each fuzz call.
        undecodable: Requests of random bytes probed after the fuzz phase.
        health_poll_s: ``RECSYS_HEALTH_POLL_S`` for the orchestrator (None: its default, 1 s).
        seed: Workload, fuzz and id choices.
        skip: Phases not run.
    """

    load_requests: int = 20_000
    load_concurrency: int = 32
    history_share: float = 0.2
    k: int = 10
    call_timeout_s: float = 10.0
    kill_concurrency: int = 8
    kill_warmup_s: float = 3.0
    kill_down_s: float = 3.0
    kill_recover_timeout_s: float = 60.0
    deadline_calls: int = 1_000
    deadline_s: float = 0.05
    deadline_concurrency: int = 8
    settle_s: float = 10.0
    reload_concurrency: int = 4
    reload_timeout_s: float = 120.0
    reload_poll_s: float = 2.0
    export_timeout_s: float = 900.0
    durability_n: int = 500
    durability_concurrency: int = 8
    fuzz_requests: int = 10_000
    fuzz_timeout_s: float = 10.0
    undecodable: int = 100
    health_poll_s: float | None = None
    seed: int = 0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = [f"unknown phase {p!r} in skip (phases: {', '.join(PHASES)})" for p in self.skip if p not in PHASES]
        counts = ("load_requests", "load_concurrency", "k", "kill_concurrency", "deadline_calls", "deadline_concurrency",
                  "reload_concurrency", "durability_n", "durability_concurrency", "fuzz_requests")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in counts if getattr(self, name) < 1]
        seconds = ("call_timeout_s", "deadline_s", "settle_s", "reload_timeout_s", "reload_poll_s", "export_timeout_s", "fuzz_timeout_s")
        problems += [f"{name} must be > 0, got {getattr(self, name)}" for name in seconds if not getattr(self, name) > 0]
        if not 0.0 <= self.history_share <= 1.0:
            problems.append(f"history_share must be in [0, 1], got {self.history_share}")
        if self.undecodable < 0:
            problems.append(f"undecodable must be >= 0, got {self.undecodable}")
        if problems:
            raise ValueError("invalid fault settings: " + "; ".join(problems))

    @classmethod
    def quick(cls) -> "FaultSettings":
        """Smaller counts: a few minutes on the development machine."""
        return cls(load_requests=2_000, fuzz_requests=1_000, deadline_calls=100, durability_n=100, undecodable=20, reload_timeout_s=60.0)


# ---------------------------------------------------------------------------- processes


def _json_file(path: Path) -> dict | None:
    """The JSON object a subprocess printed, once it is complete (None before)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren ...), from ``/proc``."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                out += [int(child), *descendants(int(child))]
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def thread_count(pid: int) -> int:
    """Threads of a process (``/proc/PID/task``)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    """Open file descriptors of a process (``/proc/PID/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true (True) or ``timeout_s`` passes (False)."""
    expires = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= expires:
            return False
        time.sleep(poll_s)


class Stack:
    """Triton and the orchestrator, each a subprocess, on ports that survive restarts.

    Triton runs under a ``recsys triton`` launcher (whose ``tritonserver`` child is the pid
    that gets killed and stopped); the orchestrator is ``recsys serve --triton-url``. Nothing
    here forks with a ``preexec_fn``: this process has gRPC threads running while it starts
    processes, and a Python-level fork of a threaded gRPC process crashed the child
    (SIGSEGV) in a first version that started ``EmbeddedTriton`` here directly.

    Args:
        artifacts: Artifacts folder.
        repo: Model repository.
        workdir: Where the logs and the history file go.
        env: Extra environment of the orchestrator (``RECSYS_*`` settings).
        serve_flags: Extra ``recsys serve`` flags.
    """

    def __init__(self, artifacts: Path, repo: Path, workdir: Path, env: dict[str, str], serve_flags: tuple[str, ...] = ()):
        from orchestrator.tritonserver import free_port

        self.artifacts = artifacts
        self.repo = repo
        self.workdir = workdir
        self.env = env
        self.serve_flags = serve_flags
        self.history_db = workdir / "history.sqlite"
        self.port = free_port()
        self.triton_ports = (free_port(), free_port(), free_port())
        self.launcher: subprocess.Popen | None = None
        self.triton_pid: int | None = None
        self.orchestrator: subprocess.Popen | None = None
        self.starts: Counter = Counter()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def triton_url(self) -> str:
        return f"127.0.0.1:{self.triton_ports[1]}"

    # ------------------------------------------------------------------ Triton

    def start_triton(self, timeout_s: float = 180.0) -> float:
        """Starts Triton on the stack's ports and waits until every model is READY; seconds taken."""
        t0 = time.monotonic()
        n = self.starts["triton"]
        self.starts["triton"] += 1
        http, grpc_port, metrics = self.triton_ports
        out_path = self.workdir / f"triton-{n}.out"
        cmd = [
            sys.executable, "-m", "clients.cli", "triton", "--repo", str(self.repo), "--http-port", str(http),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), "--timeout", str(timeout_s),
            "--log", str(self.workdir / f"triton-{n}.log"), "--json",
        ]
        with open(out_path, "wb") as out, open(self.workdir / f"triton-{n}.err", "wb") as err:
            self.launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        # the launcher prints its addresses once every model is READY
        while not _json_file(out_path):
            if self.launcher.poll() is not None:
                raise RuntimeError(f"recsys triton exited with code {self.launcher.returncode}:\n{_tail(self.workdir / f'triton-{n}.err')}")
            if time.monotonic() - t0 > timeout_s + 10:
                raise RuntimeError(f"recsys triton not ready after {timeout_s:.0f} s")
            time.sleep(0.05)
        children = Path(f"/proc/{self.launcher.pid}/task/{self.launcher.pid}/children").read_text().split()
        if len(children) != 1:
            raise RuntimeError(f"recsys triton has children {children}, expected one tritonserver")
        self.triton_pid = int(children[0])
        return time.monotonic() - t0

    def kill_triton(self) -> list[int]:
        """SIGKILL to tritonserver; the launcher notices and exits.

        Returns:
            The pids of Triton's Python-backend stubs (one process per model instance): a
            SIGKILL of the server does not reach them, see :meth:`reap_orphans`.
        """
        assert self.launcher is not None and self.triton_pid is not None
        stubs = descendants(self.triton_pid)
        os.kill(self.triton_pid, signal.SIGKILL)
        self.launcher.wait(timeout=60)
        self.triton_pid = None
        return stubs

    def reap_orphans(self, stubs: list[int]) -> list[str]:
        """The stubs of a killed Triton still running, by model; SIGKILLed (they ignore SIGTERM) so they do not outlive the run."""
        orphans = []
        for pid in stubs:
            if not alive(pid):
                continue
            with contextlib.suppress(OSError):
                # the stub's first argument is <repo>/<model>/<version>/model.py
                script = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode())
                orphans.append(script.parent.parent.name if self.repo.resolve() in script.parents else str(script))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return orphans

    # ------------------------------------------------------------------ orchestrator

    def start_orchestrator(self, timeout_s: float = 120.0) -> float:
        """Starts ``recsys serve`` and waits until its health is SERVING; seconds taken."""
        t0 = time.monotonic()
        n = self.starts["orchestrator"]
        self.starts["orchestrator"] += 1
        cmd = [
            sys.executable, "-m", "clients.cli", "serve", "--artifacts", str(self.artifacts), "--repo", str(self.repo),
            "--triton-url", self.triton_url, "--port", str(self.port), "--history-db", str(self.history_db),
            "--log-level", "warning", "--json", *self.serve_flags,
        ]
        self.orchestrator_log = self.workdir / f"orchestrator-{n}.log"
        with open(self.workdir / f"orchestrator-{n}.out", "wb") as out, open(self.orchestrator_log, "wb") as err:
            self.orchestrator = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        expires = t0 + timeout_s
        # a fresh channel per check: one that failed to connect would wait out its reconnect backoff
        while _health(self.target) != "SERVING":
            if self.orchestrator.poll() is not None:
                raise RuntimeError(f"recsys serve exited with code {self.orchestrator.returncode}:\n{self.orchestrator_log_tail()}")
            if time.monotonic() > expires:
                raise RuntimeError(f"recsys serve not SERVING after {timeout_s:.0f} s:\n{self.orchestrator_log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def orchestrator_alive(self) -> bool:
        return self.orchestrator is not None and self.orchestrator.poll() is None

    @property
    def orchestrator_pid(self) -> int:
        assert self.orchestrator is not None
        return self.orchestrator.pid

    def kill_orchestrator(self) -> None:
        """SIGKILL, reaped."""
        assert self.orchestrator is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.orchestrator.pid, signal.SIGKILL)
        self.orchestrator.wait()

    def orchestrator_log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.orchestrator_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def orchestrator_logs(self) -> str:
        """Every orchestrator log of this run, concatenated (tracebacks of internal errors)."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("orchestrator-*.log")))

    def close(self) -> None:
        """Stops the orchestrator (SIGTERM, then SIGKILL), then Triton."""
        if self.orchestrator is not None and self.orchestrator.poll() is None:
            self.orchestrator.terminate()
            try:
                self.orchestrator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.orchestrator.kill()
                self.orchestrator.wait()
        if self.launcher is not None and self.launcher.poll() is None:
            if self.triton_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.triton_pid, signal.SIGCONT)
            self.launcher.terminate()  # the launcher stops tritonserver, then exits
            try:
                self.launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()


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
    def from_artifacts(cls, artifacts: Path, history_share: float, k: int) -> "Workload":
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

    def start(self) -> "LoadRunner":
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


def _health(target: str) -> str:
    from clients.client import RecsysClient

    try:
        with RecsysClient(target, timeout_s=1.0, retries=0) as client:
            return client.health(SERVICE)
    except Exception as exc:
        return type(exc).__name__


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
    log(f"triton_killed: Triton restarted, ready after {t_ready - t_restart:.1f} s; "
        f"{len(orphans)} of the killed server's {len(stubs)} backend stubs still ran {t_ready - t_kill:.0f} s after the kill")

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
            cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
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


async def _record_until(target: str, calls: list[tuple[int, int, float, int]], n: int, concurrency: int, kill: Callable[[], None]) -> tuple[set, Counter]:
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
        (base + i, int(workload.movies[rng.randrange(len(workload.movies))]), rng.choice((0.0, 1.0, 2.5, 3.0, 4.5, 5.0)), now - rng.randrange(86_400))
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


# ---------------------------------------------------------------------------- fuzz

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
EDGE_INTS = (0, -1, 1, 2, 10, 199, 200, 201, 499, 500, 501, 1_000, 1_001, 10_000, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63))
EDGE_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 0.49, 0.5, 1.0, 4.99, 5.0, 5.01, -1.0, 1e-45, 3.4e38, -3.4e38)
HOSTILE_TEXT = (
    "", " ", "\t\n", "action", "ACTION", "Sci-Fi ", "Comedy|Drama", "(no genres listed)", "\x00", "\u202e", "\ufeffDrama",
    "💥", "Ação", "%s%n", "'; DROP TABLE interactions; --", "*", "Action" * 200,
)


def fuzz_calls(movies: np.ndarray, users: np.ndarray, genres: tuple[str, ...]) -> Any:
    """The Hypothesis strategy of ``(rpc name, request message)`` pairs.

    Each field is valid three times in four (:func:`mostly`) and every optional field is set
    half of the time, so that a good share of the requests passes validation and reaches the
    pipeline with odd but legal values (k = 500, empty genre matches, pools at their bounds);
    the rest carries one or more hostile values. Long id lists are drawn as a length and a
    seed and built with numpy: Hypothesis's own buffer would overflow long before 100,000 ids.
    """
    from hypothesis import strategies as st

    from protos.recsys.v1 import recsys_pb2 as pb

    now = int(time.time())  # once: a strategy that changes between examples is "flaky" to Hypothesis

    def mostly(valid: Any, hostile: Any) -> Any:
        # not st.one_of(valid, valid, valid, hostile): that drew the valid branch only ~40% of the time
        return st.sampled_from((valid, valid, valid, hostile)).flatmap(lambda chosen: chosen)

    present = st.sampled_from((True, True, True, False))

    edge32 = [v for v in EDGE_INTS if INT32[0] <= v <= INT32[1]]
    int32 = st.one_of(st.integers(*INT32), st.sampled_from(edge32), st.integers(-3, 600))
    int64 = st.one_of(st.integers(*INT64), st.sampled_from(EDGE_INTS))
    f32 = st.one_of(st.floats(width=32), st.sampled_from(EDGE_FLOATS), st.floats(-10, 10, width=32))
    movie = mostly(st.sampled_from([int(m) for m in movies]), int64)
    user = mostly(st.one_of(st.sampled_from([int(u) for u in users]), st.integers(1, 10**7)), int64)
    k = mostly(st.one_of(st.integers(1, 20), st.integers(1, 500)), int32)
    unit = mostly(st.floats(0, 1, width=32), f32)
    stars = mostly(st.floats(0, 5, width=32), f32)
    count = mostly(st.integers(1, 250), int32)
    names = list(genres) + [g.lower() for g in genres] + [g.upper() for g in genres]
    text = mostly(st.sampled_from(names), st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(st.characters(codec="utf-8"), max_size=40)))
    year = mostly(st.integers(1900, 2010), st.one_of(st.integers(*INT32), st.integers(1700, 2200), st.sampled_from((1799, 1800, 2100, 2101))))
    small = st.one_of(st.integers(0, 5), st.integers(0, 60))
    big = st.sampled_from((999, 1_000, 1_001, 9_999, 10_000, 10_001, 100_000))
    rare_big = st.one_of(small, small, small, big)

    def ids(rng: np.random.Generator, n: int) -> list[int]:
        pick = rng.random(n)
        known = movies[rng.integers(0, len(movies), n)]
        hostile = rng.integers(INT64[0], INT64[1], n, dtype=np.int64, endpoint=True)
        return np.where(pick < 0.8, known, np.where(pick < 0.9, -known, hostile)).tolist()

    @st.composite
    def id_list(draw: Any, sizes: Any) -> list[int]:
        return ids(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), draw(sizes))

    @st.composite
    def filters(draw: Any, excluded: Any) -> pb.Filters:
        msg = pb.Filters(genres=draw(st.one_of(st.just([]), st.lists(text, max_size=3))))
        if draw(st.booleans()):
            msg.min_year = draw(year)
        if draw(st.booleans()):
            msg.max_year = draw(year)
        if draw(st.booleans()):
            msg.min_mean_rating = draw(stars)
        msg.exclude_movie_ids.extend(draw(id_list(excluded)))
        if draw(st.booleans()):
            msg.include_seen = draw(st.booleans())
        return msg

    @st.composite
    def rerank(draw: Any) -> pb.Rerank:
        msg = pb.Rerank()
        if draw(st.booleans()):
            msg.mmr_lambda = draw(unit)
        if draw(st.booleans()):
            msg.candidate_pool = draw(count)
        if draw(st.booleans()):
            msg.freshness_weight = draw(unit)
        if draw(st.booleans()):
            msg.max_per_genre = draw(count)
        return msg

    @st.composite
    def history(draw: Any, lengths: Any) -> pb.History:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        movie_ids = ids(rng, draw(lengths))
        mode = draw(st.sampled_from(("none", "valid", "hostile", "mismatch")))
        ratings: list[float] = []
        if mode in ("valid", "hostile"):
            ratings = rng.choice([0.0, 0.5, 1.0, 3.5, 5.0], len(movie_ids)).tolist()
            if mode == "hostile" and ratings:
                for _ in range(draw(st.integers(1, 3))):
                    ratings[int(rng.integers(len(ratings)))] = draw(f32)
        elif mode == "mismatch":
            ratings = [3.0] * draw(st.integers(0, len(movie_ids) + 2))
        return pb.History(movie_ids=movie_ids, ratings=ratings)

    @st.composite
    def recommend(draw: Any, lengths: Any = st.one_of(small, small, big), excluded: Any = rare_big) -> pb.RecommendRequest:
        msg = pb.RecommendRequest()
        subject = draw(mostly(st.sampled_from(("user", "history")), st.just("none")))
        if subject == "user":
            msg.user_id = draw(user)
        elif subject == "history":
            msg.history.CopyFrom(draw(history(lengths)))
        if draw(present):
            msg.k = draw(k)
        if draw(st.booleans()):
            msg.filters.CopyFrom(draw(filters(excluded)))
        if draw(st.booleans()):
            msg.rerank.CopyFrom(draw(rerank()))
        return msg

    @st.composite
    def similar(draw: Any) -> pb.SimilarRequest:
        msg = pb.SimilarRequest(movie_id=draw(movie))
        if draw(present):
            msg.k = draw(k)
        if draw(st.booleans()):
            msg.user_id = draw(user)
        if draw(st.booleans()):
            msg.filters.CopyFrom(draw(filters(rare_big)))
        if draw(st.booleans()):
            msg.rerank.CopyFrom(draw(rerank()))
        return msg

    @st.composite
    def popular(draw: Any) -> pb.PopularRequest:
        msg = pb.PopularRequest(window=draw(mostly(st.sampled_from((0, 1)), st.one_of(st.integers(-2, 3), st.integers(*INT32)))))
        if draw(present):
            msg.k = draw(k)
        if draw(st.booleans()):
            msg.filters.CopyFrom(draw(filters(rare_big)))
        return msg

    @st.composite
    def batch(draw: Any) -> pb.BatchRecommendRequest:
        # a full batch of 256 runs 256 pipelines: at the limit in 1 batch in 64 only
        n = draw(mostly(st.integers(1, 8), st.sampled_from((0,) * 5 + (257,) * 5 + (1_000,) * 5 + (256,))))
        distinct = draw(st.lists(recommend(small, small), min_size=1, max_size=4))
        return pb.BatchRecommendRequest(requests=[distinct[i % len(distinct)] for i in range(n)])

    @st.composite
    def record(draw: Any) -> pb.RecordInteractionRequest:
        msg = pb.RecordInteractionRequest()
        if draw(st.booleans()):
            msg.user_id = draw(user)
        if draw(st.booleans()):
            msg.movie_id = draw(movie)
        if draw(st.booleans()):
            msg.rating = draw(mostly(st.sampled_from((0.0, 0.5, 1.0, 2.5, 4.0, 5.0)), f32))
        if draw(st.booleans()):
            msg.timestamp_s = draw(mostly(st.integers(0, now + 86_400), st.one_of(st.integers(*INT64), st.sampled_from((-1, now + 86_401)))))
        return msg

    empty = st.sampled_from(
        [("Recommend", pb.RecommendRequest()), ("Similar", pb.SimilarRequest()), ("Popular", pb.PopularRequest()),
         ("BatchRecommend", pb.BatchRecommendRequest()), ("RecordInteraction", pb.RecordInteractionRequest())]
    )
    return st.one_of(
        st.tuples(st.just("Recommend"), recommend()),
        st.tuples(st.just("Similar"), similar()),
        st.tuples(st.just("Popular"), popular()),
        st.tuples(st.just("BatchRecommend"), batch()),
        st.tuples(st.just("RecordInteraction"), record()),
        empty,
    )


def describe_request(msg: Any, limit: int = 600) -> str:
    """A one-line text form of a request, long id lists cut to their first few (with their length)."""
    from google.protobuf import text_format

    def trim(m: Any) -> None:
        for fd, value in m.ListFields():
            if fd.label == fd.LABEL_REPEATED:
                if fd.message_type is not None:
                    for sub in value:
                        trim(sub)
                    if len(value) > 3:
                        del value[3:]
                elif len(value) > 8:
                    n = len(value)
                    del value[8:]
                    lengths.append(f"{fd.name}: {n} values")
            elif fd.message_type is not None:
                trim(value)

    lengths: list[str] = []
    copy = type(msg)()
    copy.CopyFrom(msg)
    trim(copy)
    text = text_format.MessageToString(copy, as_one_line=True)
    if hasattr(msg, "requests") and len(msg.requests) > 3:
        lengths.append(f"requests: {len(msg.requests)}")
    text = text if len(text) <= limit else text[:limit] + "..."
    return text + (f"  [{'; '.join(lengths)}]" if lengths else "")


def _server_traceback(logs: str, details: str) -> str | None:
    """The orchestrator's logged exception for an opaque ``internal error (reference X)`` message."""
    m = re.search(r"reference ([0-9a-f]{12})", details or "")
    if not m:
        return None
    at = logs.find(f"internal error {m.group(1)}")
    if at < 0:
        return None
    block = logs[at:].splitlines()[1:60]
    tail = [line for line in block if line and not re.match(r"\d{4}-\d\d-\d\d ", line)]
    return "\n".join(tail[-6:]) or None


class FuzzJudge:
    """Sends each generated request through the raw stub and classifies the answer."""

    def __init__(self, stack: Stack, timeout_s: float):
        import grpc

        from protos.recsys.v1 import recsys_pb2_grpc

        self.grpc = grpc
        self.stack = stack
        self.timeout_s = timeout_s
        self._connect = lambda: grpc.insecure_channel(stack.target, options=[("grpc.max_send_message_length", -1)])
        self.channel = self._connect()
        self.stub = recsys_pb2_grpc.RecommenderStub(self.channel)
        self._stub_type = recsys_pb2_grpc.RecommenderStub
        self.requests = 0
        self.by_rpc: Counter = Counter()
        self.by_rpc_status: Counter = Counter()
        self.messages: Counter = Counter()
        self.statuses: Counter = Counter()
        self.internal = 0
        self.other = 0
        self.empty_messages = 0
        self.bad_ok = 0
        self.crashes = 0
        self.bench_errors = 0
        self.examples: list[dict[str, Any]] = []
        self.crash_examples: list[dict[str, Any]] = []
        self.other_examples: list[dict[str, Any]] = []

    def _example(self, into: list, rpc: str, msg: Any, status: str, details: str, where: str = "") -> None:
        if len(into) < 10:
            into.append({"rpc": rpc, "status": status, "details": details, "where": where, "request": describe_request(msg)})

    def __call__(self, rpc: str, msg: Any) -> None:
        self.requests += 1
        self.by_rpc[rpc] += 1
        try:
            resp = getattr(self.stub, rpc)(msg, timeout=self.timeout_s)
            code, details = "OK", ""
        except self.grpc.RpcError as exc:
            resp, code, details = None, exc.code().name, exc.details() or ""
        self.statuses[code] += 1
        self.by_rpc_status[f"{rpc} {code}"] += 1
        if code != "OK":
            self.messages[re.sub(r"-?\d[\w.+-]*", "N", details)[:70]] += 1
        if code == "OK":
            self._check_ok(rpc, msg, resp)
        elif code in SERVER_DEFECTS:
            self.internal += 1
            self._example(self.examples, rpc, msg, code, details)
        elif not self.stack.orchestrator_alive():
            self.crashes += 1
            self._example(self.crash_examples, rpc, msg, code, details, f"exit code {self.stack.orchestrator.returncode}")
            log(f"fuzz: the orchestrator died on {rpc} ({code}); restarting it")
            self.stack.start_orchestrator()
            self.channel.close()
            self.channel = self._connect()
            self.stub = self._stub_type(self.channel)
        elif code not in CLIENT_ERRORS:
            self.other += 1
            self._example(self.other_examples, rpc, msg, code, details)
        if code != "OK" and not details.strip():
            self.empty_messages += 1

    def _check_ok(self, rpc: str, msg: Any, resp: Any) -> None:
        k = getattr(msg, "k", None)
        if rpc in ("Recommend", "Similar", "Popular") and k is not None and len(resp.items) > max(k, 0):
            self.bad_ok += 1
            self._example(self.other_examples, rpc, msg, "OK", f"{len(resp.items)} items for k={k}")
        if rpc == "BatchRecommend":
            if [r.index for r in resp.results] != list(range(len(msg.requests))):
                self.bad_ok += 1
                self._example(self.other_examples, rpc, msg, "OK", "results do not match the requests one to one")
            for r in resp.results:
                if r.WhichOneof("outcome") != "failure":
                    continue
                name = f"CODE_{r.failure.code}"
                for c in self.grpc.StatusCode:
                    if c.value[0] == r.failure.code:
                        name = c.name
                if name in SERVER_DEFECTS:
                    self.internal += 1
                    self._example(self.examples, rpc, msg.requests[r.index], name, r.failure.message, f"BatchRecommend result {r.index}")
                elif name not in CLIENT_ERRORS:
                    self.other += 1
                    self._example(self.other_examples, rpc, msg.requests[r.index], name, r.failure.message, f"BatchRecommend result {r.index}")
                if not r.failure.message.strip():
                    self.empty_messages += 1

    def close(self) -> None:
        self.channel.close()


def probe_undecodable(stack: Stack, n: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """Random bytes as request bodies of every RPC: what the gRPC layer answers before any handler."""
    import grpc

    rng = random.Random(seed)
    statuses: Counter = Counter()
    rpcs = ("Recommend", "Similar", "Popular", "BatchRecommend", "RecordInteraction")
    with grpc.insecure_channel(stack.target) as channel:
        for i in range(n):
            call = channel.unary_unary(f"/{SERVICE}/{rpcs[i % len(rpcs)]}")  # no serializers: raw bytes
            body = rng.randbytes(rng.randint(1, 64))
            try:
                call(body, timeout=timeout_s)
                statuses["OK"] += 1
            except grpc.RpcError as exc:
                statuses[exc.code().name] += 1
    return {"requests": n, "by_status": dict(statuses)}


def phase_fuzz(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``fuzz``: Hypothesis-generated hostile requests through the raw stubs."""
    from hypothesis import HealthCheck, Phase, given, seed
    from hypothesis import settings as hsettings

    judge = FuzzJudge(stack, s.fuzz_timeout_s)
    calls = fuzz_calls(workload.movies, workload.users, workload.genres)
    t0 = time.monotonic()

    @seed(s.seed)
    @hsettings(
        max_examples=s.fuzz_requests, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), print_blob=False,
    )
    @given(calls)
    def probe(call: tuple[str, Any]) -> None:
        try:
            judge(*call)
        except Exception as exc:  # a benchmark defect must not end the run (Hypothesis would shrink it)
            judge.bench_errors += 1
            log(f"fuzz: benchmark error on {call[0]}: {exc!r}")
        if judge.requests % 1000 == 0:
            log(f"fuzz: {judge.requests:,} / {s.fuzz_requests:,}, internal {judge.internal}, crashes {judge.crashes}")

    probe()
    seconds = time.monotonic() - t0
    judge.close()
    undecodable = probe_undecodable(stack, s.undecodable, s.seed, s.fuzz_timeout_s) if s.undecodable else None
    logs = stack.orchestrator_logs()
    for ex in judge.examples:
        ex["server_traceback"] = _server_traceback(logs, ex["details"])
    alive = stack.orchestrator_alive()
    health = _health(stack.target)
    return {
        "requests": judge.requests,
        # undecodable bodies count too: the server answers them INVALID_ARGUMENT (service.add_servicer)
        "internal": judge.internal + sum((undecodable or {}).get("by_status", {}).get(c, 0) for c in ("INTERNAL", "UNKNOWN")),
        "crashes": judge.crashes + (0 if alive else 1),
        "other_status": judge.other,
        "empty_messages": judge.empty_messages,
        "inconsistent_ok": judge.bad_ok,
        "by_status": dict(judge.statuses),
        "by_rpc": dict(judge.by_rpc),
        "by_rpc_status": dict(sorted(judge.by_rpc_status.items())),
        "top_error_messages": dict(judge.messages.most_common(15)),
        "alive_at_end": alive,
        "health_at_end": health,
        "internal_examples": judge.examples,
        "crash_examples": judge.crash_examples,
        "other_examples": judge.other_examples,
        "bench_errors": judge.bench_errors,
        "undecodable": undecodable,
        "seconds": round(seconds, 1),
    }


# ---------------------------------------------------------------------------- the run


def prepare_deployment(artifacts: str | None, repo: str | None, data: str, workdir: Path, in_place: bool) -> tuple[Path, Path, dict[str, Any]]:
    """The artifacts and repository to serve: copies of the given ones, or a tiny model trained on ``data``."""
    if (artifacts is None) != (repo is None):
        raise ValueError("give both --artifacts and --repo, or neither (then a tiny model is trained on --data)")
    if artifacts is not None and repo is not None:
        if in_place:
            return Path(artifacts), Path(repo), {"source": "given, served in place", "artifacts": artifacts, "repo": repo}
        art, rep = workdir / "artifacts", workdir / "model_repository"
        shutil.copytree(artifacts, art)
        shutil.copytree(repo, rep, ignore=shutil.ignore_patterns("__pycache__"))
        return art, rep, {"source": "copies of the given folders", "artifacts": str(Path(artifacts).resolve()), "repo": str(Path(repo).resolve())}
    import torch

    from export.onnx_export import export_repository
    from export.pipeline import TrainSettings, train
    from export.ranker import RankerConfig
    from export.two_tower import TwoTowerConfig

    log(f"no --artifacts/--repo: training a tiny model on {data}")
    tiny = TrainSettings(
        two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=256, patience=2, lr=5e-3),
        ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5),
        refit=False,
    )
    art, rep = workdir / "artifacts", workdir / "model_repository"
    torch.set_num_threads(1)
    train(data, art, tiny, progress=False)
    export_repository(art, rep)
    return art, rep, {"source": f"tiny model trained on {data} for this run", "artifacts": str(art), "repo": str(rep)}


def skipped_section(phase: str) -> dict[str, Any]:
    """The section of a phase that did not run: its keys, null."""
    return {**{k: None for k in SECTION_KEYS[phase]}, "skipped": True}


def run_benchmark(s: FaultSettings, artifacts: str | None = None, repo: str | None = None, data: str = DEFAULT_DATA_DIR,
                  keep: bool = False, in_place: bool = False) -> dict[str, Any]:
    """Every phase not skipped, in order, on one stack; the report (see the module docstring)."""
    import pandas as pd

    from orchestrator.settings import ServeSettings
    workdir = Path(tempfile.mkdtemp(prefix="recsys-faults-"))
    report: dict[str, Any] = {}
    stack = None
    try:
        art, rep, source = prepare_deployment(artifacts, repo, data, workdir, in_place)
        workload = Workload.from_artifacts(art, s.history_share, s.k)
        n_interactions = len(pd.read_parquet(art / "interactions.parquet", columns=["user_id"]))
        env = {"RECSYS_RELOAD_POLL_S": str(s.reload_poll_s)}
        if s.health_poll_s is not None:
            env["RECSYS_HEALTH_POLL_S"] = str(s.health_poll_s)
        stack = Stack(art, rep, workdir, env)
        # what the orchestrator subprocess will read: its defaults, then these variables
        served = asdict(ServeSettings.from_env({**os.environ, **env}))
        with LoadWatch() as load:
            triton_s = stack.start_triton()
            orch_s = stack.start_orchestrator()
            log(f"Triton ready in {triton_s:.1f} s, orchestrator SERVING in {orch_s:.1f} s at {stack.target}")
            phases = {
                "load": phase_load, "triton_killed": phase_triton_killed, "deadline": phase_deadline,
                "reload": phase_reload, "durability": phase_durability, "fuzz": phase_fuzz,
            }
            for name, fn in phases.items():
                if name in s.skip:
                    report[name] = skipped_section(name)
                    continue
                log(f"phase {name}")
                with LoadWatch() as watch:
                    report[name] = fn(stack, workload, s)
                report[name]["load_average"] = watch.record()
                log(f"phase {name} done in {watch.seconds:.1f} s")
        report = {
            "conditions": conditions(
                deployment=source,
                catalog={"items": len(workload.movies), "users": len(workload.users), "interactions": n_interactions,
                         "genres": len(workload.genres)},
                settings=asdict(s),
                orchestrator={**{k: served.get(k) for k in ("workers", "triton_timeout_s", "default_deadline_s", "health_poll_s", "retrieve_k", "reload_poll_s")},
                              "env": env, "flags": list(stack.serve_flags)},
                triton={"startup_s": round(triton_s, 2), "config": "embedded, CPU configs (configs/cpu.pbtxt)"},
                orchestrator_startup_s=round(orch_s, 2),
                load_average=load.record(),
                workdir=str(workdir) if keep else None,
            ),
            **report,
        }
    finally:
        if stack is not None:
            stack.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for t in evaluate_targets(report):  # inside each section: the report's top level is fixed
        report[t.pop("phase")].setdefault("targets", []).append(t)
    return report


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value; ``met`` is None for a skipped phase."""

    def t(phase: str, name: str, value: Any, target: str, ok: Callable[[], bool]) -> dict[str, Any]:
        skipped = report.get(phase, {}).get("skipped")
        return {"phase": phase, "target": name, "value": value, "wanted": target, "met": None if skipped else bool(ok())}

    ld, tk, dl, rl, du, fz = (report.get(p, {}) for p in PHASES)
    return [
        t("load", "errors", ld.get("errors"), "0", lambda: ld["errors"] == 0),
        t("triton_killed", "unanswered", None if tk.get("skipped") else tk["requests"] - tk["answered"], "0",
          lambda: tk["answered"] == tk["requests"]),
        t("triton_killed", "health NOT_SERVING while down", tk.get("health_not_serving"), "yes", lambda: tk["health_not_serving"]),
        t("triton_killed", "recovered_after_ready_s", tk.get("recovered_after_ready_s"), "<= 5",
          lambda: tk["recovered_after_ready_s"] is not None and tk["recovered_after_ready_s"] <= 5.0),
        t("deadline", "calls not DEADLINE_EXCEEDED", None if dl.get("skipped") else dl["calls"] - dl["deadline_exceeded"], "0",
          lambda: dl["deadline_exceeded"] == dl["calls"]),
        t("deadline", "leaked_threads", dl.get("leaked_threads"), "<= 0", lambda: dl["leaked_threads"] <= 0),
        t("deadline", "leaked_fds", dl.get("leaked_fds"), "<= 0", lambda: dl["leaked_fds"] <= 0),
        t("reload", "failed", rl.get("failed"), "0", lambda: rl["failed"] == 0),
        t("reload", "new version served", rl.get("reloaded"), "yes", lambda: rl["reloaded"]),
        t("reload", "old version answers after the first new one", rl.get("old_version_after_new"), "0",
          lambda: rl["old_version_after_new"] == 0),
        t("durability", "lost", du.get("lost"), "0", lambda: du["lost"] == 0 and du["acked"] > 0),
        t("fuzz", "internal", fz.get("internal"), "0", lambda: fz["internal"] == 0),
        t("fuzz", "crashes", fz.get("crashes"), "0", lambda: fz["crashes"] == 0),
        t("fuzz", "other statuses / empty messages", None if fz.get("skipped") else fz["other_status"] + fz["empty_messages"], "0",
          lambda: fz["other_status"] == 0 and fz["empty_messages"] == 0),
    ]


def table(report: dict[str, Any]) -> str:
    """The figures of every phase, one row each."""

    def ms(section: dict) -> str:
        lat = section.get("latency") or {}
        return f"p50 {lat.get('p50_ms', math.nan):.1f} / p99 {lat.get('p99_ms', math.nan):.1f} ms" if lat.get("n") else "-"

    rows = []
    ld = report["load"]
    if not ld.get("skipped"):
        rows.append(("load", f"{ld['requests']:,} Recommend at c{ld['concurrency']}: {ld['errors']} errors {ld['errors_by_status']}, "
                     f"{ld['qps']} QPS, {ms(ld)}"))
    tk = report["triton_killed"]
    if not tk.get("skipped"):
        rows.append(("triton_killed", f"{tk['requests']:,} calls at c{tk['concurrency']}: {tk['answered']:,} answered, {tk['fallback']:,} fallback; "
                     f"NOT_SERVING {tk['health_not_serving_after_kill_s']} s after the kill; Triton restart {tk['triton_restart_s']} s; "
                     f"first personal answer {tk['recovered_s']} s after the restart began, {tk['recovered_after_ready_s']} s after ready; "
                     f"orphaned backend stubs {tk['orphaned_backend_stub_models'] or 0}"))
    dl = report["deadline"]
    if not dl.get("skipped"):
        rows.append(("deadline", f"{dl['calls']:,} calls, {dl['deadline_s'] * 1e3:.0f} ms deadline, Triton stopped: {dl['by_status']}; "
                     f"threads {dl['threads']['before']} -> peak {dl['threads']['peak']} -> {dl['threads']['after']}, "
                     f"fds {dl['fds']['before']} -> peak {dl['fds']['peak']} -> {dl['fds']['after']} ({dl['settle_s']} s after SIGCONT)"))
    rl = report["reload"]
    if not rl.get("skipped"):
        rows.append(("reload", f"{rl['requests']:,} calls at c{rl['concurrency']} during `recsys export` ({rl['export_s']} s, rc {rl['export_rc']}): "
                     f"{rl['failed']} failed, {rl['fallback']} fallback, versions {rl['versions']}, reloaded {rl['reloaded']}"
                     + (f", new version first {rl['first_new_version_after_export_s']} s after the export" if rl["reloaded"] else "")))
    du = report["durability"]
    if not du.get("skipped"):
        rows.append(("durability", f"{du['acked']:,} acknowledged, SIGKILL, restart {du['restart_s']} s: {du['found']:,} found, {du['lost']} lost; "
                     f"visible via Recommend {du['visible_via_recommend']['with_history']}/{du['visible_via_recommend']['checked']}"))
    fz = report["fuzz"]
    if not fz.get("skipped"):
        und = fz.get("undecodable") or {}
        rows.append(("fuzz", f"{fz['requests']:,} hostile requests ({fz['seconds']} s): {fz['internal']} INTERNAL/UNKNOWN, {fz['crashes']} crashes, "
                     f"{fz['other_status']} other statuses, {fz['empty_messages']} empty messages; statuses {fz['by_status']}; "
                     f"undecodable bytes: {und.get('by_status')}"))
    return markdown_table(("phase", "figures"), rows)


def all_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every section's targets, each with its phase."""
    return [{"phase": p, **t} for p in PHASES for t in report[p].get("targets", [])]


def targets_text(report: dict[str, Any]) -> str:
    lines = []
    for t in all_targets(report):
        mark = "skipped" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        lines.append(f"  {mark:<8} {t['phase']}: {t['target']} = {t['value']} (wanted {t['wanted']})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``recsys bench faults`` (``python -m benchmarks.faults`` takes the same)."""
    p.add_argument("--artifacts", default=None, help="artifacts folder (copied); default: train a tiny model on --data")
    p.add_argument("--repo", default=None, help="model repository (copied); give it with --artifacts")
    p.add_argument("--data", default=DEFAULT_DATA_DIR, help="data for the tiny model (default: %(default)s)")
    p.add_argument("--in-place", action="store_true", help="serve --artifacts/--repo without copying (reload writes into them)")
    p.add_argument("--out", default=str(REPORTS / "faults.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="load 2,000, deadline 100, durability 100, fuzz 1,000")
    p.add_argument("--skip", action="append", choices=PHASES, default=[], help="a phase not to run (repeatable)")
    p.add_argument("--load-requests", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None, help="load phase concurrency (default 32)")
    p.add_argument("--deadline-calls", type=int, default=None)
    p.add_argument("--durability-n", type=int, default=None)
    p.add_argument("--fuzz-requests", type=int, default=None)
    p.add_argument("--undecodable", type=int, default=None, help="random-bytes requests after the fuzz")
    p.add_argument("--reload-timeout", type=float, default=None, help="seconds to wait for the new version after the export")
    p.add_argument("--reload-poll-s", type=float, default=None, help="the orchestrator's reload polling period (default 2)")
    p.add_argument("--health-poll-s", type=float, default=None, help="the orchestrator's health polling period (default: its own, 1 s)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, copies, history file)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``recsys bench faults``: runs, writes the JSON, prints the table; 0 only if every target is met."""
    s = FaultSettings.quick() if args.quick else FaultSettings()
    overrides = {
        "load_requests": args.load_requests, "load_concurrency": args.concurrency, "deadline_calls": args.deadline_calls,
        "durability_n": args.durability_n, "fuzz_requests": args.fuzz_requests, "undecodable": args.undecodable,
        "reload_timeout_s": args.reload_timeout, "reload_poll_s": args.reload_poll_s, "health_poll_s": args.health_poll_s,
        "seed": args.seed,
    }
    s = replace(s, skip=tuple(args.skip), **{k: v for k, v in overrides.items() if v is not None})
    report = run_benchmark(s, args.artifacts, args.repo, args.data, keep=args.keep, in_place=args.in_place)
    report["conditions"]["command"] = getattr(args, "command_line", None) or " ".join(["recsys", *sys.argv[1:]])
    out = write_json(args.out, report)
    print(table(report))
    fz = report["fuzz"]
    for ex in (fz.get("internal_examples") or []) + (fz.get("crash_examples") or []) + (fz.get("other_examples") or []):
        print(f"\n{ex['rpc']} -> {ex['status']} {ex['where']}: {ex['details']}\n  request: {ex['request']}")
        if ex.get("server_traceback"):
            print("  server: " + ex["server_traceback"].replace("\n", "\n          "))
    print(f"\n{conditions_line(report['conditions'])}")
    print("targets:\n" + targets_text(report))
    print(f"wrote {out}")
    failed = [t for t in all_targets(report) if t["met"] is False]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m benchmarks.faults", *(argv if argv is not None else sys.argv[1:])])
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
