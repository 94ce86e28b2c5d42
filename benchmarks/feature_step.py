"""The ranker's feature step in process: the ``ranker_features`` graph in onnxruntime, one thread.

    python -m benchmarks.feature_step [--items 87585] [--rounds 7] [--out reports/benchmarks/feature_step.json]

Random tables of the served shapes (an ML-32M-sized catalog by default, 64-dim item vectors,
32-dim CF vectors, 64 EASE weights per item, rank-64 EASE factors over 10,000 items, 20 genres,
histories of H = 200), exported with the project's own exporter, then timed at
the shapes the orchestrator sends: one user with 200 candidates (Recommend) and 64 users with
200 each (a BatchRecommend's ranker call, split at 4,096 rows in serving, here one call to show
the per-user cost). Medians of ``--rounds`` rounds of 50 calls (5 for the 64-user shape). The
issue-13 target: <= 0.3 ms at 200 candidates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, log, write_json
from export.features import EASE_NEIGHBOURS, EASE_RANK, RankerFeatures
from export.onnx_export import export_ranker_features
from orchestrator.candidates import SOURCES
from orchestrator.contract import RANKER_HISTORY

TARGET_MS = 0.3
HISTORY_LEN = RANKER_HISTORY
EASE_FITTED = 10_000
"""Items with EASE factors (``EASE_MAX_ITEMS`` at this catalog size)."""


def random_module(n_items: int, seed: int = 0) -> RankerFeatures:
    """A feature module with random tables of the served shapes (timing does not need trained ones)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "log_count": torch.rand(n_items, generator=g) * 5,
        "log_recent": torch.rand(n_items, generator=g),
        "mean_rating": torch.rand(n_items, generator=g) * 5,
        "first_days": torch.rand(n_items, generator=g) * 1000,
        "year": 1950 + torch.rand(n_items, generator=g) * 70,
        "genres": (torch.rand(n_items, 20, generator=g) > 0.8).float(),
        "vectors": torch.nn.functional.normalize(torch.randn(n_items, 64, generator=g), dim=-1),
        "cf_vectors": torch.randn(n_items, 32, generator=g),
        "ease_items": torch.randint(0, n_items, (n_items, EASE_NEIGHBOURS), generator=g),
        "ease_weights": torch.rand(n_items, EASE_NEIGHBOURS, generator=g) * 0.1,
        "ease_zeros": torch.zeros(n_items + 1),
        "ease_rows": torch.cat([torch.randint(0, EASE_FITTED + 1, (n_items,), generator=g), torch.tensor([EASE_FITTED])]),
        "ease_p": torch.cat([torch.randn(EASE_FITTED, EASE_RANK, generator=g) * 0.01, torch.zeros(1, EASE_RANK)]),
        "ease_q": torch.cat([torch.randn(EASE_FITTED, EASE_RANK, generator=g) * 0.01, torch.zeros(1, EASE_RANK)]),
    }
    return RankerFeatures.from_state_dict(state).eval()


def feeds(n_items: int, users: int, candidates: int, seed: int) -> dict[str, np.ndarray]:
    """What the orchestrator sends: [N] per candidate, [U, H] per user, INT32 ids."""
    rng = np.random.default_rng(seed)
    n = users * candidates
    return {
        "item": rng.integers(0, n_items, n).astype(np.int32),
        "retrieval_score": rng.uniform(-1, 1, n).astype(np.float32),
        "retrieval_rank": np.tile(np.arange(candidates, dtype=np.float32), users),
        "history": rng.integers(0, n_items, (users, HISTORY_LEN)).astype(np.int32),
        "history_rating": (rng.integers(1, 11, (users, HISTORY_LEN)) / 2).astype(np.float32),
        "candidate_sources": np.where(rng.random((n, len(SOURCES))) < 0.5, rng.integers(0, candidates, (n, len(SOURCES))), -1).astype(
            np.float32
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=87_585)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(REPORTS / "feature_step.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, LoadWatch() as load:
        path = Path(tmp) / "ranker_features.onnx"
        export_ranker_features(random_module(args.items), path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        shapes = {"1 user": (1, 50), "64 users": (64, 5)}
        x = {name: feeds(args.items, users, args.candidates, seed=i) for i, (name, (users, _)) in enumerate(shapes.items())}
        for name in shapes:  # first runs allocate
            sess.run(None, x[name])
        rounds: dict[str, list[float]] = {name: [] for name in shapes}
        for _ in range(args.rounds):
            for name, (_users, calls) in shapes.items():
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    sess.run(None, x[name])
                    times.append(time.perf_counter() - t0)
                rounds[name].append(float(np.median(times)) * 1e3)
    result = {
        name: {
            "users": users, "rows": users * args.candidates, "median_ms": round(float(np.median(v)), 4),
            "per_user_ms": round(float(np.median(v)) / users, 4), "rounds_ms": [round(t, 4) for t in v],
        }
        for (name, (users, _)), v in zip(shapes.items(), rounds.values())
    }  # fmt: skip
    one = result["1 user"]["median_ms"]
    report = {
        "conditions": conditions(
            catalog_items=args.items, candidates=args.candidates, history_len=HISTORY_LEN, threads=1, rounds=args.rounds
        )
        | {"load_average": load.record()},
        "feature_step": result,
        "target": {"limit_ms": TARGET_MS, "measured_ms": one, "met": one <= TARGET_MS},
    }
    write_json(args.out, report)
    for name, r in result.items():
        print(f"{name}: {r['rows']} rows, median {r['median_ms']} ms ({r['per_user_ms']} ms per user)")
    print(f"target <= {TARGET_MS} ms at {args.candidates} candidates: {'met' if one <= TARGET_MS else 'NOT met'}")
    print(conditions_line(report["conditions"]))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
