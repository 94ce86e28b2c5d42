"""The GPU path, measured in process: two-tower training throughput and the serving stages' compute.

    python -m benchmarks.gpu_path [--items 87585] [--users 4000] [--out FILE]

Runs on whatever device torch sees (CUDA when present) and, side by side in the same run, on
the CPU of the same machine, so the figures come as ratios. It needs only torch, numpy,
pandas, tqdm, LightGBM and Hummingbird (no Triton, FAISS or polars), so it runs on a bare GPU
host with the training stack:

1. ``train``: :func:`export.two_tower.train_two_tower` for one epoch over a synthetic history
   set (``--users`` users x ``--per-user`` interactions, Zipf-popular items) with the full
   ``--items`` catalog (the embedding table, sampled negatives and optimiser state are full
   size), reported as targets/s and extrapolated to the ML-32M epoch (25.4M targets).
2. ``user_tower``: the served user tower at batch 1 and 64 (p50 ms).
3. ``retrieval``: exact inner-product top-200 over the item vectors (what a flat GPU index
   does), batch 1 and 64.
4. ``ranker``: a LambdaRank booster of the served size (150 trees, depth 6) on 200 candidate
   rows, converted by Hummingbird (``gemm``, the served strategy) to torch.

Not measured here: Triton's own hop and the gRPC overhead (Triton's onnxruntime backend is
not in the embedded server; see BENCHMARKS.md for the CPU-served figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.history import Histories
from export.items import Catalog, ItemStats
from export.two_tower import TwoTowerConfig, train_two_tower
from orchestrator.artifacts import Demographics

ML32M_TARGETS = 25_400_000
"""Training targets of one epoch on the ML-32M shape (``benchmarks/offline_scale.py``)."""


def synthetic(n_items: int, n_users: int, per_user: int, seed: int = 0) -> tuple[Catalog, ItemStats, Histories]:
    """A catalog with genres and a Zipf-popular history set, in the shapes training reads."""
    rng = np.random.default_rng(seed)
    genres = [f"g{i}" for i in range(20)]
    genre_matrix = (rng.random((n_items, len(genres))) < 0.1).astype(np.float32)
    catalog = Catalog(
        movie_ids=np.arange(n_items, dtype=np.int64),
        titles=np.full(n_items, "", dtype=object),
        years=rng.integers(1950, 2024, n_items).astype(np.int32),
        genres=genres,
        genre_matrix=genre_matrix,
        genre_strings=np.full(n_items, "", dtype=object),
    )
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.9
    items = rng.choice(n_items, size=n_users * per_user, p=weights / weights.sum()).astype(np.int64)
    count = np.bincount(items, minlength=n_items).astype(np.float32)
    stats = ItemStats(
        cutoff=1_700_000_000,
        count=count,
        recent_count=count / 10,
        mean_rating=np.full(n_items, 3.5, np.float32),
        first_seen_days=np.full(n_items, 1000, np.float32),
    )
    histories = Histories(
        user_ids=np.arange(n_users, dtype=np.int64),
        offsets=np.arange(0, n_users * per_user + 1, per_user, dtype=np.int64),
        items=items,
        ratings=rng.choice(np.array([3, 4, 5], np.float32), size=items.size),
        timestamps=np.tile(np.arange(per_user, dtype=np.int64), n_users) + 1_600_000_000,
    )
    return catalog, stats, histories


def p50_ms(fn: Callable[[], Any], device: torch.device, runs: int = 200, warmup: int = 20) -> float:
    """Median wall time of ``fn`` in ms, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


def train_throughput(device: torch.device, data: tuple[Catalog, ItemStats, Histories], config: TwoTowerConfig) -> dict[str, Any]:
    """One epoch of the project's training loop on ``device``: targets/s and the ML-32M epoch."""
    catalog, stats, histories = data
    empty = Demographics(user_ids=np.zeros(0, np.int64), codes=np.zeros((0, 3), np.int64))
    t0 = time.perf_counter()
    result = train_two_tower(config, catalog, stats, histories, empty, epochs=1, progress=False, device=device)
    seconds = time.perf_counter() - t0
    targets = int(histories.items.size - histories.user_ids.size)
    rate = targets / seconds
    return {
        "targets": targets,
        "seconds": round(seconds, 2),
        "targets_per_s": round(rate),
        "ml32m_epoch_min": round(ML32M_TARGETS / rate / 60, 1),
        "model": result.model,
    }


def serving_stages(model: Any, device: torch.device, n_items: int, history_len: int) -> dict[str, float]:
    """p50 ms of the user tower, exact top-200 retrieval and the Hummingbird ranker on ``device``."""
    import lightgbm as lgb
    from hummingbird.ml import convert

    model = model.to(device).eval()
    user = model.user_tower
    out: dict[str, float] = {}
    with torch.inference_mode():
        vectors = torch.as_tensor(model.item_vectors(), device=device)
        for b in (1, 64):
            hist = torch.randint(0, n_items, (b, history_len), device=device)
            rat = torch.full((b, history_len), 4.0, device=device)
            dem = torch.zeros((b, 3), dtype=torch.long, device=device)
            out[f"user_tower_b{b}_ms"] = p50_ms(lambda: user(hist, rat, dem), device)
            q = torch.randn(b, vectors.shape[1], device=device)
            out[f"retrieval_top200_b{b}_ms"] = p50_ms(lambda: torch.topk(q @ vectors.T, 200, dim=1), device)
    rng = np.random.default_rng(0)
    x = rng.random((20_000, 30)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.random(20_000) > 0.9).astype(int)
    booster = lgb.train(
        {"objective": "lambdarank", "max_depth": 6, "num_leaves": 31, "verbose": -1, "seed": 0},
        lgb.Dataset(x, y, group=[200] * 100),
        num_boost_round=150,
    )
    hb = convert(booster, "torch", extra_config={"tree_implementation": "gemm"}).to(device.type)
    rows = torch.as_tensor(x[:200], device=device)
    with torch.inference_mode():
        out["ranker_200_rows_ms"] = p50_ms(lambda: hb.model(rows), device)
    return out


def run(n_items: int, n_users: int, per_user: int, cpu_users: int) -> dict[str, Any]:
    """Trains and times on the GPU (when present) and on the CPU; returns the report.

    The CPU trains on the first ``cpu_users`` users only (same catalog): throughput is per
    target, and a full CPU epoch of the GPU's data would dominate the run.
    """
    data = synthetic(n_items, n_users, per_user)
    cpu_data = synthetic(n_items, cpu_users, per_user)
    config = TwoTowerConfig()
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    report: dict[str, Any] = {
        "conditions": {
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "items": n_items,
            "users": n_users,
            "cpu_users": cpu_users,
            "per_user": per_user,
            "history_len": config.history_len,
            "batch_size": config.batch_size,
        },
        "devices": {},
    }
    for device in devices:
        train = train_throughput(device, data if device.type == "cuda" else cpu_data, config)
        model = train.pop("model")
        report["devices"][device.type] = {"train": train, "serving": serving_stages(model, device, n_items, config.history_len)}
        print(json.dumps({device.type: report["devices"][device.type]}), flush=True)
    if "cuda" in report["devices"]:
        gpu, cpu = report["devices"]["cuda"], report["devices"]["cpu"]
        report["speedup"] = {
            "train": round(gpu["train"]["targets_per_s"] / cpu["train"]["targets_per_s"], 1),
            **{k: round(cpu["serving"][k] / gpu["serving"][k], 1) for k in gpu["serving"]},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gpu_path``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=87_585)
    p.add_argument("--users", type=int, default=4_000)
    p.add_argument("--per-user", type=int, default=100)
    p.add_argument("--cpu-users", type=int, default=300)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    report = run(args.items, args.users, args.per_user, args.cpu_users)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
