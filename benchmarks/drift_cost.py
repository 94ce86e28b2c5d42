"""What drift monitoring adds to a Recommend: the sample and the histogram update, against the whole answer.

    python -m benchmarks.drift_cost --artifacts DIR --repo DIR [--calls 2000]

In process (onnxruntime on the repository's graphs, no gRPC): the same users' Recommend is
timed with the pipeline as served, and the two hot-path steps that drift adds are timed on
their own over the same answers (:func:`~orchestrator.drift.drift_sample` in the pipeline,
:meth:`~orchestrator.drift.DriftMonitor.observe` in the service). The request log's JSON of
the sample is written by its writer thread, off the request path, and is not counted.
Prints per-call microseconds and the ratio, with the conditions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import conditions, conditions_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--repo", default="model_repository")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)

    from orchestrator.backends import InProcessBackend
    from orchestrator.catalog import Catalog, Filters
    from orchestrator.drift import DriftMonitor
    from orchestrator.errors import Deadline
    from orchestrator.pipeline import Query, Recommender
    from orchestrator.rerank import RerankOptions
    from orchestrator.settings import ServeSettings
    from orchestrator.store import SqliteHistoryStore

    art = Path(args.artifacts)
    settings_mmr = RerankOptions(0.4, 50)
    catalog = Catalog.load(art)
    if catalog.drift_reference is None:
        raise SystemExit(f"{art} has no drift reference (retrain with this version)")
    ratings = pd.read_parquet(art / "interactions.parquet")
    users = ratings.user_id.unique()

    tmp = Path(tempfile.mkdtemp(prefix="drift-cost-")) / "history.sqlite"
    store = SqliteHistoryStore(tmp, seed_from=art / "interactions.parquet")
    rec = Recommender(ServeSettings(artifacts_dir=art), catalog, store, InProcessBackend(args.repo))
    rng = np.random.default_rng(0)
    picked = rng.choice(users, args.calls)
    queries = [Query(10, Filters(), settings_mmr, user_id=int(u)) for u in picked]
    for q in queries[:50]:  # warm-up
        rec.recommend(q, Deadline(None, 10))
    t0 = time.perf_counter()
    results = [rec.recommend(q, Deadline(None, 10)) for q in queries]
    recommend_s = (time.perf_counter() - t0) / len(picked)
    answers = [r for r in results if r.drift is not None]
    # the sample again, from the same answers' inputs (what recommend() did inside)
    windows = [rec.window(q)[0] for q, r in zip(queries, results) if r.drift is not None]
    vec = np.ones(catalog.vectors.shape[1], np.float32)
    t0 = time.perf_counter()
    for r, w in zip(answers, windows):
        rec.sample(w, vec, r.drift.retrieval_scores, r.scores, r.items)  # type: ignore[union-attr]
    sample_s = (time.perf_counter() - t0) / len(answers)
    monitor = DriftMonitor()
    t0 = time.perf_counter()
    for r in answers:
        monitor.observe(r.model_version, catalog.drift_reference, r.drift)  # type: ignore[arg-type]
    observe_s = (time.perf_counter() - t0) / len(answers)
    tmp.unlink(missing_ok=True)
    added = sample_s + observe_s
    report = {
        "recommend_in_process_us": round(recommend_s * 1e6, 1),
        "drift_sample_us": round(sample_s * 1e6, 2),
        "histogram_observe_us": round(observe_s * 1e6, 2),
        "added_share_of_recommend": round(added / recommend_s, 4),
        "answers": len(answers),
        "conditions": conditions(
            catalog={"items": catalog.n_items, "users": int(len(users))}, calls=args.calls, backend="in-process onnxruntime"
        ),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "conditions"}, indent=2))
    print(conditions_line(report["conditions"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
