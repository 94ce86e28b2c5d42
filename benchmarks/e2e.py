"""End to end: ``Recommend`` served (gRPC orchestrator + Triton) side by side with the in-process floor.

    recsys bench e2e --out reports/benchmarks/e2e.json       # both cases, c1/c4/c16/c32
    recsys bench e2e --quick                                  # ml-latest-small only, a smoke run (< 3 min)

``--quick`` measures the ml-latest-small case with 300 requests per level and reuses the deployment
``make demo`` left in ``artifacts/`` and ``model_repository/`` when there is one (26 s here);
without one it first trains and exports one (about 5 more minutes on 2 cores).

What one run does, per case:

1. **A deployment.** ``ml32m-shape``: an 87,585-item catalog (the ML-32M movie count) from
   the synthetic generator, models trained for one epoch (latency does not care how good
   they are, only how big the catalog and the graphs are), exported. ``ml-latest-small``:
   the bundled data, the same way. ``ml-100k`` (not run by default) reads ``data/ml-100k``,
   which users download themselves (``recsys data download ml-100k``). Each is built once
   into ``--work`` and reused; ``--artifacts`` and ``--repo`` take an existing one instead.
2. **Served.** ``recsys serve`` in its own process (it starts the embedded Triton), the
   asyncio client in this one, ``--warmup`` calls, then ``--requests`` ``Recommend`` calls at
   each concurrency: p50/p95/p99, QPS, errors by status. Known users drawn with a fixed seed,
   ``k`` results, the default MMR re-ranking, no client retries.
3. **In process.** After the served stack stopped: the same ONNX files in onnxruntime, the
   same FAISS index, the same re-ranking, called from one Python thread with no RPC: the
   floor the served path is compared with.
   At each level the CPU every process spent per answered call (``recsys serve``, the
   embedded ``tritonserver``, its Python-backend stubs, this process as the load generator;
   ``benchmarks/process_cpu.py``) and the ceiling it sets, ``cores x 1000 / total`` answers
   per second: whether a throughput target is out of reach of the code or of the machine.
4. **Stages.** Medians of the server-reported stage timings (history, user tower,
   retrieval, ranking, re-ranking) at c1, the server's own total, and the RPC overhead
   (client-observed minus server total), served and in process.
5. **Candidate sources** (``--ann-only``, on with ``--quick``; issue 12). The same deployment
   served again with ``RECSYS_CANDIDATE_SOURCES=two_tower`` (FAISS' list alone, no other
   source computed) at c1, and its in-process floor: merged vs ANN-only at the same
   candidate count in one run (``sources`` in the JSON: differences and ratios of the p50s).

The JSON (``--out``) keeps the issue's shape for the first case at the top level and every
case under ``cases``; a PNG (latency and throughput against concurrency) goes beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, log, markdown_table, write_json
from benchmarks.process_cpu import ProcessTreeCpu, cpu_line
from export import DEFAULT_DATA_DIR

DEFAULT_OUT = REPORTS / "e2e.json"
DEFAULT_WORK = REPORTS / "e2e-work"
LEVELS = (1, 4, 16, 32)
STAGES = ("history", "user_tower", "retrieval", "ranking", "reranking")

TARGETS = {
    "served_c1_p50_ms": 6.0,
    "served_c1_p99_ms": 10.0,
    "inprocess_c1_p50_ms": 3.0,
    "served_minus_inprocess_p50_ms": 1.5,
    "c16_qps": 400.0,
    "c16_p99_ms": 50.0,
    "overload_admitted_p99_ms": 100.0,
    "overload_shed_p99_ms": 10.0,
    "overload_internal": 0,
    "batch_speedup": 2.0,
}
"""Issue 13's targets (``*_qps`` and ``batch_speedup`` are floors, the rest ceilings)."""
OVERLOAD_CONCURRENCY = 64
BATCH_USERS = 64
BATCH_ROUNDS = 3


@dataclass(frozen=True)
class Case:
    """One deployment to measure.

    Attributes:
        name: ``ml32m-shape``, ``ml-latest-small`` or ``ml-100k``.
        data: How to get its data: ``synth`` (arguments below) or a MovieLens folder.
        synth: ``recsys data synth`` arguments for ``synth`` cases.
        epochs: Two-tower epochs (latency only needs the shapes right).
    """

    name: str
    data: str
    synth: tuple[str, ...] = ()
    epochs: int = 1


CASES = {
    # the ML-32M movie count with few enough ratings that one epoch takes minutes, not hours
    "ml32m-shape": Case("ml32m-shape", "synth", ("--users", "20000", "--items", "87585", "--ratings", "400000", "--span-days", "1095")),
    "ml-latest-small": Case("ml-latest-small", DEFAULT_DATA_DIR),
    # the figures in BENCHMARKS.md were measured on it; it may not be shipped, so users download it
    "ml-100k": Case("ml-100k", "data/ml-100k"),
}
DEFAULT_CASES = ("ml32m-shape", "ml-latest-small")


# ---------------------------------------------------------------------------- deployment


def _recsys(*args: str, quiet: bool = True) -> None:
    """Runs a ``recsys`` subcommand in a child process (fails loudly with its stderr tail)."""
    cmd = [sys.executable, "-m", "clients.cli", *args]
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-2000:] if quiet else ""
        raise RuntimeError(f"`recsys {' '.join(args)}` failed ({proc.returncode}):\n{tail}")


def build_deployment(case: Case, work: Path) -> tuple[Path, Path]:
    """``(artifacts, repo)`` of ``case`` under ``work``, trained and exported unless already there."""
    root = work / case.name
    artifacts, repo = root / "artifacts", root / "model_repository"
    if (
        (artifacts / "manifest.json").is_file()
        and (artifacts / "faiss" / "index.json").is_file()
        and any((repo / "user_tower").glob("[0-9]*/model.onnx"))
    ):
        log(f"{case.name}: reusing the deployment in {root}")
        return artifacts, repo
    data = Path(case.data)
    if case.data != "synth" and not (data / "ratings.csv").is_file():
        raise FileNotFoundError(f"{case.name}: no {data}/ratings.csv; download it first: recsys data download {case.name} --out {data}")
    if case.data == "synth":
        data = root / "data"
        if not (data / "ratings.csv").is_file():
            log(f"{case.name}: writing synthetic data ({' '.join(case.synth)})")
            _recsys("data", "synth", *case.synth, "--out", str(data), "--quiet")
    log(f"{case.name}: training ({case.epochs} epoch) into {artifacts}")
    _recsys("train", "--data", str(data), "--out", str(artifacts), "--epochs", str(case.epochs), "--quiet")
    log(f"{case.name}: exporting into {repo}")
    if repo.exists():
        shutil.rmtree(repo)
    _recsys("export", "--artifacts", str(artifacts), "--repo", str(repo), "--quiet")
    return artifacts, repo


def demo_deployment() -> tuple[Path, Path] | None:
    """``(artifacts, model_repository)`` of ``make demo`` when its latest export is of those artifacts."""
    from orchestrator.artifacts import exported_from

    artifacts, repo = Path("artifacts"), Path("model_repository")
    if (artifacts / "manifest.json").is_file() and (artifacts / "faiss" / "index.json").is_file() and exported_from(artifacts, repo):
        return artifacts, repo
    return None


def known_users(artifacts: Path, n: int, seed: int) -> list[int]:
    """``n`` user ids with a history (with repeats when there are fewer), fixed by ``seed``."""
    import pandas as pd

    users = np.unique(pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id"])["user_id"].to_numpy())
    rng = np.random.default_rng(seed)
    return rng.choice(users, size=n, replace=len(users) < n).astype(int).tolist()


# ---------------------------------------------------------------------------- served


class ServedStack:
    """``recsys serve`` (embedded Triton + orchestrator) in a child process; stopped with SIGTERM."""

    def __init__(
        self,
        artifacts: Path,
        repo: Path,
        history_db: Path,
        extra: tuple[str, ...] = (),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.cmd = [
            sys.executable, "-m", "clients.cli", "serve", "--artifacts", str(artifacts), "--repo", str(repo),
            "--history-db", str(history_db), "--port", "0", "--json", "--log-level", "warning", *extra,
        ]  # fmt: skip
        self.cwd = cwd  # another checkout of the project serves (``python -m`` imports from the cwd first)
        self.env = env  # the server's environment (``RECSYS_*`` settings); None: this process's
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.info: dict[str, Any] = {}

    def __enter__(self) -> ServedStack:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=None, text=True, start_new_session=True, cwd=self.cwd, env=self.env
        )
        text = ""  # the (indented) JSON announcement, printed once both listen
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"`recsys serve` exited with {self.proc.wait()} before announcing its address")
            text += line
            if line.startswith("}"):
                break
        self.info = json.loads(text)
        self.address = self.info["grpc"]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _wait_serving(address: str, timeout_s: float = 120.0) -> float:
    """Seconds until the orchestrator's health says SERVING (the client's own wait)."""
    from clients.client import RecsysClient

    t0 = time.perf_counter()
    with RecsysClient(address, retries=0) as client:
        client.wait_until_serving(timeout_s)
    return time.perf_counter() - t0


async def _drive(address: str, users: list[int], concurrency: int, k: int, timeout_s: float) -> dict[str, Any]:
    """``len(users)`` Recommend calls from ``concurrency`` asyncio workers; latencies and statuses."""
    import grpc

    from clients.client import AsyncRecsysClient

    latencies: list[float] = []
    server_ms: list[dict[str, float]] = []
    errors: Counter[str] = Counter()
    fallbacks = 0
    queue = list(reversed(users))
    async with AsyncRecsysClient(address, timeout_s=timeout_s, retries=0) as client:

        async def worker() -> None:
            nonlocal fallbacks
            while queue:
                user = queue.pop()
                t0 = time.perf_counter()
                try:
                    r = await client.recommend(user, k=k)
                except grpc.RpcError as exc:  # the client's typed errors are RpcErrors with their code
                    errors[exc.code().name] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 - counted, never hidden
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                fallbacks += bool(r.is_fallback)
                t = r.timings
                server_ms.append(
                    {"history": t.history_ms, "user_tower": t.user_tower_ms, "retrieval": t.retrieval_ms,
                     "ranking": t.ranking_ms, "reranking": t.reranking_ms, "server": r.latency_ms}
                )  # fmt: skip

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "server_ms": server_ms, "errors": dict(errors), "fallbacks": fallbacks, "wall_s": wall}


RETRY_HINT = re.compile(r"retry after (\d+) ms")
"""The retry hint in a shed call's message (``orchestrator/admission.py`` ``Admission.refusal``)."""


async def _drive_overload(
    address: str, users: list[int], concurrency: int, k: int, timeout_s: float, honour_hint: bool = False
) -> dict[str, Any]:
    """Recommend calls at ``concurrency`` past capacity: latency of admitted and of shed calls apart.

    Each worker sends its next call as soon as the last one is answered; with ``honour_hint`` a
    worker whose call was shed first waits the server's retry hint (jittered 0.5-1x, as the
    client library's retry does), without it the shed workers call again at once (a flood).

    In the flood the shed calls' latency is set by the refusal rate (Little's law: the
    ``concurrency - max_in_flight`` workers being refused at any moment over ``shed_per_s``
    is their mean wait), so the report gives ``shed_per_s`` and ``shed_mean_ms`` beside the p99.
    """
    import grpc

    from clients.client import AsyncRecsysClient
    from clients.errors import RecsysRpcError

    admitted: list[float] = []
    shed: list[float] = []
    codes: Counter[str] = Counter()
    queue = list(reversed(users))
    rng = random.Random(0)
    async with AsyncRecsysClient(address, timeout_s=timeout_s, retries=0) as client:

        async def worker() -> None:
            while queue:
                user = queue.pop()
                t0 = time.perf_counter()
                try:
                    await client.recommend(user, k=k)
                    admitted.append(time.perf_counter() - t0)
                    codes["OK"] += 1
                except (grpc.RpcError, RecsysRpcError) as exc:  # raw or typed (clients.errors), by status code
                    code = exc.code() if callable(exc.code) else exc.code
                    codes[code.name] += 1
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        shed.append(time.perf_counter() - t0)
                        hint = RETRY_HINT.search(exc.details() if callable(exc.details) else exc.details)
                        if honour_hint and hint:
                            await asyncio.sleep(rng.uniform(0.5, 1.0) * int(hint.group(1)) / 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0

    def p99(xs: list[float]) -> float | None:
        return round(float(np.percentile(np.asarray(xs) * 1e3, 99)), 3) if xs else None

    return {
        "concurrency": concurrency,
        "requests": len(users),
        "admitted": len(admitted),
        "shed": len(shed),
        "admitted_p99_ms": p99(admitted),
        "admitted_p50_ms": round(float(np.median(admitted)) * 1e3, 3) if admitted else None,
        "shed_p99_ms": p99(shed),
        "shed_mean_ms": round(float(np.mean(shed)) * 1e3, 3) if shed else None,
        "internal": codes.get("INTERNAL", 0) + codes.get("UNKNOWN", 0),
        "codes": dict(codes),
        "admitted_per_s": round(len(admitted) / wall, 1),
        "shed_per_s": round(len(shed) / wall, 1),
        "wall_s": round(wall, 3),
        "clients": "wait the retry hint after a shed call" if honour_hint else "call again at once after a shed call",
    }


def overload_line(o: dict[str, Any]) -> str:
    """One overload run in words."""
    return (
        f"c{o['concurrency']} overload ({o['clients']}): {o['admitted']} admitted (p99 {o['admitted_p99_ms']} ms, "
        f"{o.get('admitted_per_s')}/s), {o['shed']} shed (p99 {o['shed_p99_ms']} ms, mean {o.get('shed_mean_ms')} ms, "
        f"{o.get('shed_per_s')}/s), {o['internal']} INTERNAL/UNKNOWN"
    )


def run_batch(address: str, users: list[int], k: int, rounds: int = BATCH_ROUNDS) -> dict[str, Any]:
    """``len(users)`` single Recommend calls one after another vs one BatchRecommend of them (medians over rounds)."""
    from clients.client import RecsysClient, recommend_request

    single, batch = [], []
    with RecsysClient(address, timeout_s=30, retries=0) as client:
        for _ in range(rounds):  # alternated, so load drifts hit both alike
            t0 = time.perf_counter()
            for u in users:
                client.recommend(u, k=k)
            single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            resp = client.batch_recommend([recommend_request(u, k=k) for u in users])
            batch.append(time.perf_counter() - t0)
            failed = [r for r in resp.results if r.WhichOneof("outcome") != "response"]
            if failed:
                raise RuntimeError(f"BatchRecommend failed for {len(failed)} of {len(users)} users: {failed[0].failure.message}")
    return {
        "users": len(users),
        "rounds": rounds,
        "single_users_per_s": round(len(users) / float(np.median(single)), 1),
        "batch_users_per_s": round(len(users) / float(np.median(batch)), 1),
    }


def level_summary(latencies: list[float], wall_s: float, errors: dict[str, int], fallbacks: int = 0) -> dict[str, Any]:
    """The issue's per-level figures: p50/p95/p99 (ms), QPS (answers / wall second), errors by status."""
    ms = np.asarray(latencies, np.float64) * 1e3
    pct = (lambda q: round(float(np.percentile(ms, q)), 3)) if ms.size else (lambda q: None)
    return {
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "qps": round(len(ms) / wall_s, 1) if wall_s > 0 else None,
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "fallbacks": fallbacks,
        "requests": len(ms) + sum(errors.values()),
    }


def stage_medians(rows: list[dict[str, float]], client_ms: np.ndarray | None = None) -> dict[str, float]:
    """Median per stage; with client latencies, also the RPC overhead (client minus server total)."""
    if not rows:
        return {}
    out = {s: round(float(np.median([r[s] for r in rows])), 3) for s in (*STAGES, "server")}
    if client_ms is not None and len(client_ms) == len(rows):
        server = np.asarray([r["server"] for r in rows])
        out["rpc_overhead"] = round(float(np.median(client_ms - server)), 3)
        out["client"] = round(float(np.median(client_ms)), 3)
    return out


def run_served(
    artifacts: Path, repo: Path, users: list[int], levels: tuple[int, ...], requests: int, warmup: int, k: int,
    timeout_s: float, serve_args: tuple[str, ...], extras: bool = True, overload: bool | None = None, cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The served half: start, time to SERVING, first call, warm-up, every level; with ``extras`` the
    overload run (c64) and the BatchRecommend comparison too (``overload``: the overload run alone, or not;
    ``cwd``: serve from another checkout of the project; ``env``: the server's environment)."""
    out: dict[str, Any] = {"levels": {}}
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        t0 = time.perf_counter()
        with ServedStack(artifacts, repo, Path(tmp) / "history.sqlite", serve_args, cwd, env) as stack:
            out["serving_after_s"] = round(time.perf_counter() - t0 + _wait_serving(stack.address), 2)
            first = asyncio.run(_drive(stack.address, users[:1], 1, k, timeout_s))
            out["first_call_ms"] = round(first["latencies"][0] * 1e3, 2) if first["latencies"] else None
            log(f"served: SERVING after {out['serving_after_s']} s, first call {out['first_call_ms']} ms; warm-up {warmup}")
            asyncio.run(_drive(stack.address, users[1 : 1 + warmup], min(4, max(levels)), k, timeout_s))
            cpu = ProcessTreeCpu(stack.proc.pid) if stack.proc else None
            for c in levels:
                picked = users[1 + warmup : 1 + warmup + requests]
                before = cpu.snapshot() if cpu else None
                r = asyncio.run(_drive(stack.address, picked, c, k, timeout_s))
                s = level_summary(r["latencies"], r["wall_s"], r["errors"], r["fallbacks"])
                # CPU of every process per answered call: what the cores allow at saturation
                s["cpu"] = ProcessTreeCpu.per_call(before, cpu.snapshot() if cpu else None, len(r["latencies"]))
                if c == levels[0]:
                    out["stages_ms"] = stage_medians(r["server_ms"], np.asarray(r["latencies"]) * 1e3)
                out["levels"][f"c{c}"] = s
                log(f"served c{c}: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, {s['qps']} QPS, {s['errors']} errors; {cpu_line(s['cpu'])}")
            if extras if overload is None else overload:
                picked = users[1 + warmup : 1 + warmup + max(requests, 4 * OVERLOAD_CONCURRENCY)]
                for key, honour in (("overload", False), ("overload_backoff", True)):
                    out[key] = o = asyncio.run(_drive_overload(stack.address, picked, OVERLOAD_CONCURRENCY, k, timeout_s, honour))
                    log(f"served {overload_line(o)}")
            if not extras:
                return out
            out["batch"] = b = run_batch(stack.address, users[1 + warmup : 1 + warmup + BATCH_USERS], k)
            log(f"served batch of {b['users']}: {b['batch_users_per_s']} users/s batched, {b['single_users_per_s']} as single calls")
    return out


# ---------------------------------------------------------------------------- in process


def run_inprocess(
    artifacts: Path, repo: Path, users: list[int], requests: int, warmup: int, k: int, candidate_sources: str = "merged"
) -> dict[str, Any]:
    """The floor: the same pipeline, catalog, index and ONNX files, one thread, no RPC."""
    from orchestrator.backends import InProcessBackend
    from orchestrator.catalog import Catalog, Filters
    from orchestrator.errors import Deadline
    from orchestrator.pipeline import Query, Recommender
    from orchestrator.rerank import RerankOptions
    from orchestrator.settings import ServeSettings
    from orchestrator.store import SqliteHistoryStore

    settings = ServeSettings(artifacts_dir=artifacts, model_repository=repo, candidate_sources=candidate_sources)
    with tempfile.TemporaryDirectory(prefix="e2e-inproc-") as tmp:
        store = SqliteHistoryStore(Path(tmp) / "history.sqlite", artifacts / "interactions.parquet")
        rec = Recommender(settings, Catalog.load(artifacts, settings.mmr_genre_weight), store, InProcessBackend(repo))
        options = RerankOptions(mmr_lambda=settings.mmr_lambda, pool=settings.mmr_pool, penalty=settings.mmr_penalty)

        def call(user: int) -> tuple[float, dict[str, float]]:
            t0 = time.perf_counter()
            r = rec.recommend(Query(k=k, filters=Filters(), rerank=options, user_id=user), Deadline(5.0, 5.0))
            return time.perf_counter() - t0, r.timings_ms

        first = call(users[0])[0]
        for u in users[1 : 1 + warmup]:
            call(u)
        lat, rows = [], []
        t0 = time.perf_counter()
        for u in users[1 + warmup : 1 + warmup + requests]:
            s, timings = call(u)
            lat.append(s)
            rows.append({st: timings.get(st, 0.0) for st in STAGES} | {"server": s * 1e3})
        wall = time.perf_counter() - t0
        store.close()
    return {
        "first_call_ms": round(first * 1e3, 2),
        "levels": {"c1": level_summary(lat, wall, {})},
        "stages_ms": stage_medians(rows),
    }


# ---------------------------------------------------------------------------- report


def targets(
    served: dict[str, Any], inprocess: dict[str, Any], overload: dict[str, Any] | None = None, batch: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    c1, c16 = served.get("c1", {}), served.get("c16", {})
    overload, batch = overload or {}, batch or {}
    speedup = None
    if batch.get("single_users_per_s"):
        speedup = round(batch["batch_users_per_s"] / batch["single_users_per_s"], 2)
    floor = inprocess.get("c1", {}).get("p50_ms")
    gap = round(c1["p50_ms"] - floor, 3) if c1.get("p50_ms") is not None and floor is not None else None
    measured = {
        "served_c1_p50_ms": c1.get("p50_ms"),
        "served_c1_p99_ms": c1.get("p99_ms"),
        "served_minus_inprocess_p50_ms": gap,
        "c16_qps": c16.get("qps"),
        "c16_p99_ms": c16.get("p99_ms"),
        "inprocess_c1_p50_ms": floor,
        "overload_admitted_p99_ms": overload.get("admitted_p99_ms"),
        "overload_shed_p99_ms": overload.get("shed_p99_ms"),
        "overload_internal": overload.get("internal"),
        "batch_speedup": speedup,
    }
    out = {}
    for name, limit in TARGETS.items():
        value = measured[name]
        floor_target = name.endswith("qps") or name == "batch_speedup"
        ok = None if value is None else (value >= limit if floor_target else value <= limit)
        out[name] = {"target": limit, "measured": value, "met": ok}
    ceiling = (c16.get("cpu") or {}).get("ceiling_qps")
    if ceiling is not None:  # what this machine's cores allow at c16's CPU per call, with no idle moment
        out["c16_qps"]["cpu_ceiling_qps"] = ceiling
    return out


def sources_comparison(
    merged_served: dict[str, Any], merged_floor: dict[str, Any], ann_served: dict[str, Any], ann_floor: dict[str, Any]
) -> dict[str, Any]:
    """Merged candidate sources against the ANN list alone (``candidate_sources=two_tower``) at c1.

    Same deployment, users and candidate count; ratios are merged / ANN-only of the p50s.
    """

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    out: dict[str, Any] = {
        "ann_only": {"served_c1": ann_served["levels"]["c1"], "inprocess_c1": ann_floor["levels"]["c1"]},
        "stages_ms": {"served": ann_served.get("stages_ms", {}), "inprocess": ann_floor["stages_ms"]},
    }
    pairs = {
        "served_c1_p50": (merged_served["levels"].get("c1", {}).get("p50_ms"), ann_served["levels"]["c1"]["p50_ms"]),
        "inprocess_c1_p50": (merged_floor["levels"]["c1"]["p50_ms"], ann_floor["levels"]["c1"]["p50_ms"]),
        "served_retrieval_p50": (merged_served.get("stages_ms", {}).get("retrieval"), ann_served.get("stages_ms", {}).get("retrieval")),
        "inprocess_retrieval_p50": (merged_floor["stages_ms"].get("retrieval"), ann_floor["stages_ms"].get("retrieval")),
    }
    out["merged_over_ann_only"] = {k: ratio(a, b) for k, (a, b) in pairs.items()}
    out["merged_minus_ann_only_ms"] = {k: round(a - b, 3) if a is not None and b is not None else None for k, (a, b) in pairs.items()}
    out["note"] = "ANN-only ran after the merged served levels (its own server start); in process, the merged floor ran after it"
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency percentiles and QPS against concurrency, served vs the in-process floor, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.8 * len(cases)), squeeze=False)
    for row, (name, case) in enumerate(cases.items()):
        served = case["served"]
        levels = [int(c[1:]) for c in served]
        ax = axes[row][0]
        for q, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
            ax.plot(levels, [served[f"c{c}"][q] for c in levels], style, label=f"served {q[:3]}")
        floor = case["inprocess"]["c1"]["p50_ms"]
        ax.axhline(floor, color="grey", lw=1, label=f"in-process p50 (c1) {floor:.1f} ms")
        ax.axhline(TARGETS["served_c1_p99_ms"], color="red", lw=0.8, ls="--", label="10 ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{name}: {case['conditions']['catalog_items']:,} items, Recommend k={case['conditions']['k']}")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        ax.plot(levels, [served[f"c{c}"]["qps"] for c in levels], "o-", label="measured")
        ceiling = [(served[f"c{c}"].get("cpu") or {}).get("ceiling_qps") for c in levels]
        if all(v is not None for v in ceiling):  # cores / CPU per call of every process, load generator included
            ax.plot(levels, ceiling, "x--", color="grey", label="CPU ceiling (cores / CPU per call)")
        ax.axhline(TARGETS["c16_qps"], color="red", lw=0.8, ls="--", label="400 QPS target (c16)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("answers / s")
        ax.set_title("throughput (served)")
        ax.legend(fontsize=7)
    cond = report["conditions"]
    fig.suptitle(f"recsys bench e2e: {cond['cpu']}, {cond['cores']} cores, GPU: {cond['gpu'] or 'none'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(report: dict[str, Any]) -> None:
    for name, case in report["cases"].items():
        print(f"\n## {name}: {case['conditions']['catalog_items']:,} items, {case['conditions']['requests']} requests per level")
        rows = [
            (f"served {c}", s["p50_ms"], s["p95_ms"], s["p99_ms"], s["qps"], s["errors"], s["fallbacks"]) for c, s in case["served"].items()
        ]
        f = case["inprocess"]["c1"]
        rows.append(("in-process c1", f["p50_ms"], f["p95_ms"], f["p99_ms"], f["qps"], f["errors"], f["fallbacks"]))
        print(markdown_table(["path", "p50 ms", "p95 ms", "p99 ms", "QPS", "errors", "fallbacks"], rows))
        for c, s in case["served"].items():
            print(f"served {c}: {cpu_line(s.get('cpu'))}")
        st = case["stages_ms"]
        print("\nmedian stage times at c1 (ms): served " + ", ".join(f"{k} {v}" for k, v in st["served"].items()))
        print("                              in-process " + ", ".join(f"{k} {v}" for k, v in st["inprocess"].items()))
        if case.get("overload"):
            for key in ("overload", "overload_backoff"):
                if case.get(key):
                    print(overload_line(case[key]))
        if case.get("batch"):
            b = case["batch"]
            print(f"BatchRecommend of {b['users']}: {b['batch_users_per_s']} users/s vs {b['single_users_per_s']} as single calls")
        if case.get("sources"):
            d, r = case["sources"]["merged_minus_ann_only_ms"], case["sources"]["merged_over_ann_only"]
            print(
                "merged sources vs the ANN list alone, same candidate count, c1 p50 (merged - ANN-only, merged / ANN-only): "
                + ", ".join(f"{k} {d[k]} ms x{r[k]}" for k in d)
            )
        print(
            f"first call after start: served {case['first_call_ms']['served']} ms, in-process "
            f"{case['first_call_ms']['inprocess']} ms; SERVING {case['serving_after_s']} s after launch"
        )
        print(
            "\ntargets: "
            + "; ".join(
                f"{k} {v['measured']} (target {v['target']}): {'met' if v['met'] else 'NOT met'}"
                + (f" (this machine's CPU ceiling at that CPU per call: {v['cpu_ceiling_qps']})" if "cpu_ceiling_qps" in v else "")
                for k, v in case["targets"].items()
            )
        )
    print("\n" + conditions_line(report["conditions"]))


# ---------------------------------------------------------------------------- main


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``recsys bench e2e``."""
    p.add_argument("--case", action="append", choices=tuple(CASES), help="repeatable (default: ml32m-shape then ml-latest-small)")
    p.add_argument("--artifacts", default=None, help="measure this deployment instead of building one (one case)")
    p.add_argument("--repo", default=None, help="its model repository (with --artifacts)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="where built deployments live (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2000, help="Recommend calls per concurrency level (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="calls before measuring (default: %(default)s)")
    p.add_argument("--concurrency", default=",".join(map(str, LEVELS)), help="levels (default: %(default)s)")
    p.add_argument("-k", type=int, default=10, help="results per call (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, help="client deadline per call, seconds (default: %(default)s)")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra `recsys serve` argument (repeatable, e.g. --serve-arg=--workers=16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: ml-latest-small (the demo's deployment when there is one), 300 requests per level, 50 warm-up",
    )
    p.add_argument(
        "--ann-only",
        action="store_true",
        help="also serve and run in process with the ANN list alone as candidates (candidate_sources=two_tower, c1), "
        "to compare with the merged sources at the same candidate count (on with --quick)",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report; the PNG goes beside it (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    levels = tuple(int(c) for c in str(args.concurrency).split(","))
    if args.quick:
        args.requests, args.warmup = min(args.requests, 300), min(args.warmup, 50)
        args.ann_only = True
        args.case = args.case or ["ml-latest-small"]
    names = args.case or list(DEFAULT_CASES)
    if args.artifacts:
        names = ["custom"]
    report: dict[str, Any] = {"cases": {}}
    with LoadWatch() as load:
        for name in names:
            if name == "custom":
                artifacts, repo = Path(args.artifacts), Path(args.repo or "model_repository")
            elif args.quick and name == "ml-latest-small" and demo_deployment() is not None:
                artifacts, repo = demo_deployment()
                log(f"{name}: reusing the demo's deployment ({artifacts}, {repo})")
            else:
                artifacts, repo = build_deployment(CASES[name], Path(args.work))
            manifest = json.loads((artifacts / "manifest.json").read_text())
            users = known_users(artifacts, 1 + args.warmup + args.requests, args.seed)
            cand = int(manifest.get("ranker", {}).get("config", {}).get("candidates", 200))
            n_items = int(np.load(artifacts / "item_embeddings.npy", mmap_mode="r").shape[0])
            log(f"{name}: {n_items:,} items; served path")
            with LoadWatch() as case_load:
                served = run_served(artifacts, repo, users, levels, args.requests, args.warmup, args.k, args.timeout, tuple(args.serve_arg))
                if args.ann_only:
                    log(f"{name}: served, the ANN list alone as candidates (c1)")
                    env = {**os.environ, "RECSYS_CANDIDATE_SOURCES": "two_tower"}
                    ann_served = run_served(
                        artifacts,
                        repo,
                        users,
                        (1,),
                        args.requests,
                        args.warmup,
                        args.k,
                        args.timeout,
                        tuple(args.serve_arg),
                        False,
                        env=env,
                    )
                    log(f"{name}: in-process floor, the ANN list alone")
                    ann_floor = run_inprocess(artifacts, repo, users, args.requests, args.warmup, args.k, "two_tower")
                log(f"{name}: in-process floor")
                floor = run_inprocess(artifacts, repo, users, args.requests, args.warmup, args.k)
            report["cases"][name] = {
                "conditions": {
                    "catalog_items": n_items,
                    "candidates": cand,
                    "k": args.k,
                    "requests": args.requests,
                    "warmup": args.warmup,
                    "levels": list(levels),
                    "artifacts": str(artifacts),
                    "repo": str(repo),
                    "serve_args": list(args.serve_arg),
                    "load_average": case_load.record(),
                },  # fmt: skip
                "served": served["levels"],
                "inprocess": floor["levels"],
                "stages_ms": {"served": served.get("stages_ms", {}), "inprocess": floor["stages_ms"]},
                "first_call_ms": {"served": served["first_call_ms"], "inprocess": floor["first_call_ms"]},
                "serving_after_s": served["serving_after_s"],
                "overload": served.get("overload"),
                "overload_backoff": served.get("overload_backoff"),
                "batch": served.get("batch"),
            }
            if args.ann_only:
                report["cases"][name]["sources"] = sources_comparison(served, floor, ann_served, ann_floor)
            report["cases"][name]["targets"] = targets(served["levels"], floor["levels"], served.get("overload"), served.get("batch"))
    first = next(iter(report["cases"].values()))
    report = {
        "conditions": conditions(**{k: first["conditions"][k] for k in ("catalog_items", "candidates", "k", "requests", "warmup")})
        | {"load_average": load.record(), "client": "clients.client.AsyncRecsysClient (asyncio, no retries), same machine"},
        "served": first["served"],
        "inprocess": first["inprocess"],
        "stages_ms": first["stages_ms"],
        "targets": first["targets"],
        "overload": first["overload"],
        "overload_backoff": first["overload_backoff"],
        "batch": first["batch"],
        **report,
    }
    out = write_json(args.out, report)
    png = plot(report, Path(args.out).with_suffix(".png"))
    print_report(report)
    print(f"\nwrote {out} and {png}")
    return 0
