"""Faults benchmark, the drift and soak phases: a population shift seen by ``recsys_drift_psi``, and hours of load.

See :mod:`benchmarks.faults` for what is measured and why.
"""

from __future__ import annotations

import math
import random
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import log
from benchmarks.faults.load import LoadRunner, Workload, summarize
from benchmarks.faults.stack import FaultSettings, Stack, fd_count, thread_count

METRICS_PORT_ENV = "RECSYS_METRICS_PORT"
"""The orchestrator's metrics port travels in its environment (``ServeSettings.from_env``)."""


@dataclass(frozen=True)
class OneGenreWorkload(Workload):
    """Explicit histories drawn from one genre's movies only: a population the models never saw.

    Attributes:
        genre_movies: Movie ids of the genre.
    """

    genre_movies: np.ndarray

    def call(self, rng: random.Random) -> dict[str, Any]:
        n = min(len(self.genre_movies), rng.randint(5, 30))
        picks = rng.sample(range(len(self.genre_movies)), n)
        return {"history": [int(self.genre_movies[i]) for i in picks], "k": self.k}


def shift_genre(artifacts: Path, min_movies: int = 20) -> tuple[str, np.ndarray]:
    """The genre of the shifted traffic and its movie ids: of the genres with enough movies
    (``min_movies``, or the biggest one), the rarest in the reference's histories, so that the
    shift is one a retrain would have to learn."""
    import pandas as pd

    from orchestrator.artifacts import DRIFT_REFERENCE
    from orchestrator.drift import DriftReference

    items = pd.read_parquet(artifacts / "items.parquet", columns=["movie_id", "genres"])
    exploded = items.assign(genre=items.genres.astype(str).str.split("|")).explode("genre")
    exploded = exploded[exploded.genre.str.len() > 0]
    sizes = exploded.genre.value_counts()
    ref = DriftReference.load(artifacts / DRIFT_REFERENCE)
    bins = ref.bins["history_genres"].categories or ()
    share = dict(zip(bins, ref.counts["history_genres"] / max(1, ref.counts["history_genres"].sum())))
    candidates = [g for g in sizes.index if sizes[g] >= min_movies and g in share] or [str(sizes.index[0])]
    genre = str(min(candidates, key=lambda g: share.get(g, 0.0)))
    return genre, exploded[exploded.genre == genre].movie_id.to_numpy(np.int64)


def scrape_psi(port: int) -> dict[str, float]:
    """``recsys_drift_psi`` by distribution (the maximum over model versions) from the orchestrator's page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "recsys_drift_psi" and not math.isnan(s.value):
                d = s.labels["distribution"]
                out[d] = max(out.get(d, -math.inf), s.value)
    return out


def _traffic(stack: Stack, workload: Workload, n: int, s: FaultSettings, seed: int) -> dict[str, Any]:
    runner = LoadRunner(stack.target, workload, s.drift_concurrency, n, s.call_timeout_s, seed).start()
    runner.join()
    return summarize(runner.outcomes)


def phase_drift(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``drift``: ordinary traffic, then one-genre histories (:func:`shift_genre`); the server's own PSI after each.

    The orchestrator runs with ``RECSYS_DRIFT_WINDOW_REQUESTS = drift_window``; each part sends
    ``3 * drift_window`` calls, so that both histogram generations hold only that part's answers
    whatever came before. Ordinary traffic is known users by id (the population the export's
    reference was computed on); the shifted traffic sends explicit histories of one genre's movies.
    """
    from orchestrator.drift import PSI_ALERT

    port = int(stack.env[METRICS_PORT_ENV])
    n = 3 * s.drift_window
    normal = _traffic(stack, replace(workload, history_share=0.0), n, s, s.seed + 1)
    psi_normal = scrape_psi(port)
    genre, movies = shift_genre(stack.artifacts)
    shifted_load = OneGenreWorkload(workload.users, workload.movies, workload.genres, 1.0, workload.k, movies)
    shifted = _traffic(stack, shifted_load, n, s, s.seed + 2)
    psi_shifted = scrape_psi(port)
    log(
        f"drift: PSI max {max(psi_normal.values(), default=math.nan):.3f} ordinary, {max(psi_shifted.values(), default=math.nan):.3f} {genre}-only"
    )
    return {
        "psi_normal": round(max(psi_normal.values()), 4) if psi_normal else None,
        "psi_shifted": round(max(psi_shifted.values()), 4) if psi_shifted else None,
        # the alert rule's expression (deploy/alerts.yml): recsys_drift_psi > 0.25
        "alert": any(v > PSI_ALERT for v in psi_shifted.values()),
        "alert_threshold": PSI_ALERT,
        "psi_normal_by_distribution": {k: round(v, 4) for k, v in psi_normal.items()},
        "psi_shifted_by_distribution": {k: round(v, 4) for k, v in psi_shifted.items()},
        "shift": f"explicit histories of 5-30 {genre} movies ({len(movies)} in the catalog)",
        "requests_per_part": n,
        "window_requests": s.drift_window,
        "concurrency": s.drift_concurrency,
        "by_status": {"normal": normal["by_status"], "shifted": shifted["by_status"]},
        "fallback": {"normal": normal["fallback_by_reason"], "shifted": shifted["fallback_by_reason"]},
    }


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def phase_soak(stack: Stack, workload: Workload, s: FaultSettings) -> dict[str, Any]:
    """``soak``: the ordinary load at concurrency 8 for ``soak_minutes``; memory, fds and threads.

    The first ``soak_warmup_share`` of the time (at least 5 s) is warm-up (caches, allocator
    arenas, connection pools fill); growth is the last sample against the one at the end of
    warm-up. Triton's RSS is sampled as well (one ``/proc`` read).
    """
    pid = stack.orchestrator_pid
    duration = s.soak_minutes * 60.0
    warmup = max(5.0, s.soak_warmup_share * duration)
    runner = LoadRunner(stack.target, workload, s.soak_concurrency, None, s.call_timeout_s, s.seed + 3).start()
    t0 = time.monotonic()
    samples: list[dict[str, float]] = []
    base: dict[str, float] | None = None
    next_log = t0 + 60
    every_s = min(s.soak_sample_s, max(0.5, duration / 20))  # short test soaks still get ~20 samples
    try:
        while time.monotonic() - t0 < duration:
            time.sleep(min(every_s, max(0.0, duration - (time.monotonic() - t0))))
            point = {"t_s": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(pid), "fds": fd_count(pid), "threads": thread_count(pid)}
            if stack.triton_pid is not None:
                point["triton_rss_kib"] = rss_kib(stack.triton_pid)
            samples.append(point)
            if base is None and point["t_s"] >= warmup:
                base = point
            if time.monotonic() >= next_log:
                log(
                    f"soak: {point['t_s'] / 60:.1f} / {s.soak_minutes} min, {len(runner.outcomes):,} calls, RSS {point['rss_kib'] / 1024:.0f} MiB"
                )
                next_log += 60
    finally:
        runner.stop()
    summary = summarize(runner.outcomes)
    shed = summary["by_status"].get("RESOURCE_EXHAUSTED", 0)
    end = samples[-1] if samples else None
    base = base or (samples[0] if samples else None)

    def growth(key: str) -> float | None:
        if base is None or end is None or not base.get(key):
            return None
        return round(100.0 * (end[key] - base[key]) / base[key], 2)

    return {
        "minutes": s.soak_minutes,
        "requests": summary["requests"],
        "errors": summary["requests"] - summary["ok"],
        "errors_by_status": {k: v for k, v in summary["by_status"].items() if k != "OK"},
        "shed": shed,
        "fallback": sum(summary["fallback_by_reason"].values()),
        "rss_growth_pct": growth("rss_kib"),
        "fds_delta": None if base is None or end is None else int(end["fds"] - base["fds"]),
        "threads_delta": None if base is None or end is None else int(end["threads"] - base["threads"]),
        "triton_rss_growth_pct": growth("triton_rss_kib"),
        "warmup_s": round(warmup, 1),
        "baseline": base,
        "end": end,
        "rss_peak_kib": max((p["rss_kib"] for p in samples), default=None),
        "samples": samples[:: max(1, len(samples) // 60)],  # at most ~60 points in the report
        "concurrency": s.soak_concurrency,
        "history_share": workload.history_share,
        "latency": summary["latency_ok"],
        "qps": summary["qps"],
        "bench_errors": runner.bench_errors[:5],
    }
