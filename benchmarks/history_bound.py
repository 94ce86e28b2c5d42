"""Recommend for a user with 10,000 stored interactions vs one with 50, side by side.

Issue 15's bounded-state target: the history store is read as the model's window plus a
compact seen set (``HistoryStore.recent``), so a long history costs about what a short one
does (target: within 10 %). Both users' calls run interleaved in one process, on one
in-process pipeline (onnxruntime) over one SQLite history store, so machine load hits both
alike; the figure is the ratio of medians. For context the full-history read the pipeline
used to do (``HistoryStore.history``) is timed too.

    python -m benchmarks.history_bound --artifacts artifacts --repo model_repository
    python -m benchmarks.history_bound --tiny        # trains the test suite's tiny model first
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import conditions, conditions_line, latency_summary, load_average


def _tiny(tmp: Path) -> tuple[Path, Path]:
    """The tests' tiny synthetic model (tests/conftest.py settings), trained and exported into ``tmp``."""
    from export.onnx_export import export_repository
    from export.pipeline import TrainSettings, train
    from export.ranker import RankerConfig
    from export.synth import SynthSpec, synthesize
    from export.two_tower import TwoTowerConfig

    settings = TrainSettings(
        two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=64, patience=2, lr=5e-3),
        ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5),
        refit=False,
    )
    synthesize(SynthSpec(users=300, items=150, ratings=5000, seed=3, span_days=10), tmp / "data", progress=False)
    train(tmp / "data", tmp / "artifacts", settings, progress=False)
    export_repository(tmp / "artifacts", tmp / "repo")
    return tmp / "artifacts", tmp / "repo"


def run(artifacts: Path, repo: Path, long_n: int, short_n: int, repeats: int, warmup: int, tmp: Path, pool: int = 40) -> dict[str, Any]:
    """Fills two users' histories, then times Recommend for both, interleaved."""
    from orchestrator.backends import InProcessBackend
    from orchestrator.catalog import Catalog, Filters
    from orchestrator.errors import Deadline
    from orchestrator.pipeline import Query, Recommender
    from orchestrator.rerank import RerankOptions
    from orchestrator.settings import ServeSettings
    from orchestrator.store import SqliteHistoryStore

    settings = ServeSettings(artifacts_dir=artifacts, model_repository=repo)
    catalog = Catalog.load(artifacts, settings.mmr_genre_weight, use_gpu=False)
    store = SqliteHistoryStore(tmp / "history.sqlite")
    long_user, short_user = 900_000_001, 900_000_002
    # both users draw from one pool of movies (the long one re-watches them at other times), so
    # their seen sets, and with them retrieval and ranking, are alike: what differs is the
    # stored history length alone (on the tiny 150-movie catalog 10,000 distinct picks would
    # exclude every movie)
    rng = np.random.default_rng(0)
    movies = rng.choice(catalog.movie_ids, size=min(pool, catalog.n_items), replace=False)
    conn = store._conn()  # bulk fill in one transaction; record() per row would fsync 10,000 times
    for user, n in ((long_user, long_n), (short_user, short_n)):
        picks = rng.choice(movies, size=n, replace=True)
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO interactions VALUES (?, ?, ?, ?)", [(user, t, int(m), 4.0) for t, m in enumerate(picks)])
        conn.execute("COMMIT")
        store.record(user, int(picks[-1]), 4.0, n + 1)  # one real write: keeps its seen set
    # the seen sets of the bulk rows: the once-only build that an old store gets at open
    conn.execute("DELETE FROM meta WHERE key = 'seen_v1'")
    store._build_seen()
    backend = InProcessBackend(repo)
    rec = Recommender(settings, catalog, store, backend)
    query = {u: Query(10, Filters(), RerankOptions(settings.mmr_lambda, settings.mmr_pool), user_id=u) for u in (long_user, short_user)}
    times: dict[int, list[float]] = {long_user: [], short_user: []}
    full: dict[int, list[float]] = {long_user: [], short_user: []}
    for i in range(warmup + repeats):
        for u in (long_user, short_user) if i % 2 == 0 else (short_user, long_user):  # alternate who goes first
            t0 = time.perf_counter()
            res = rec.recommend(query[u], Deadline(None, 10.0))
            dt = time.perf_counter() - t0
            assert res.fallback is None, res.fallback
            t1 = time.perf_counter()
            store.history(u)
            dt_full = time.perf_counter() - t1
            if i >= warmup:
                times[u].append(dt)
                full[u].append(dt_full)
    seen_long, seen_short = store.recent(long_user, 0)[1], store.recent(short_user, 0)[1]
    backend.close()
    store.close()
    long_s, short_s = latency_summary(times[long_user]), latency_summary(times[short_user])
    return {
        "seen_movies": {"long": int(len(np.unique(seen_long))), "short": int(len(np.unique(seen_short)))},
        "recommend_ms": {"long": long_s, "short": short_s},
        "ratio_long_over_short_p50": long_s["p50_ms"] / short_s["p50_ms"],
        "full_history_read_ms_p50": {
            "long": latency_summary(full[long_user])["p50_ms"],
            "short": latency_summary(full[short_user])["p50_ms"],
        },
        "target": "ratio <= 1.10",
    }


def main(argv: list[str] | None = None) -> int:
    """Command line; prints the figures with their conditions (``--json`` for the raw dict)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.history_bound", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--tiny", action="store_true", help="train the tests' tiny synthetic model first (about a minute)")
    p.add_argument("--long", type=int, default=10_000, help="interactions of the long-history user")
    p.add_argument("--short", type=int, default=50, help="interactions of the short-history user")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, repo = _tiny(Path(tmp)) if args.tiny else (args.artifacts, args.repo)
        figures = run(artifacts, repo, args.long, args.short, args.repeats, args.warmup, Path(tmp))
    cond = conditions(
        load_average={"before": before, "after": load_average()},
        backend="in-process onnxruntime",
        history_store="sqlite",
        model="tiny synthetic (tests' settings)" if args.tiny else str(args.artifacts),
        long_interactions=args.long,
        short_interactions=args.short,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    if args.json:
        print(json.dumps({"figures": figures, "conditions": cond}, indent=2, default=str))
        return 0
    r, f = figures["recommend_ms"], figures["full_history_read_ms_p50"]
    print(f"# Recommend, {args.long:,} vs {args.short:,} stored interactions ({conditions_line(cond)})")
    print(f"  long : p50 {r['long']['p50_ms']:.2f} ms  p99 {r['long']['p99_ms']:.2f} ms")
    print(f"  short: p50 {r['short']['p50_ms']:.2f} ms  p99 {r['short']['p99_ms']:.2f} ms")
    print(f"  seen movies: long {figures['seen_movies']['long']}, short {figures['seen_movies']['short']} (one pool of 40)")
    print(f"  ratio long/short p50: {figures['ratio_long_over_short_p50']:.3f}  (target <= 1.10)")
    print(f"  for context, a full-history read (the old path): long {f['long']:.2f} ms, short {f['short']:.2f} ms (p50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
