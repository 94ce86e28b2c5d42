"""Retrieval in process, one user at a time: the ANN search alone against the merged sources.

    python -m benchmarks.candidate_latency --artifacts artifacts --baseline HEAD~1

For ``--windows`` history windows of a deployment's users (random cut-off points in their
stored histories: the last ``history_len`` items before the cut-off, the items before it as
the seen set), each step of ``Catalog.candidates`` is timed per window, in rounds that
alternate the variants so that load drifts hit all alike:

* ``ann``: ``Catalog.retrieve`` (FAISS top-``retrieve_k`` among the unseen items), the query
  being the normalised mean of the window's item vectors (the latency does not depend on
  how good the query is, only on the index and ``k``);
* ``blocked_mask``, ``candidates (merged)`` with the published budgets, ``candidates
  (two_tower only)`` (budgets ``1, 0, 0, 0, 0``: the ranks in the other sources are still
  computed, since the ranker reads them), ``two_tower_scores``, and each source alone;
* the same functions from ``orchestrator/candidates.py`` as of git ``--baseline`` (loaded
  from ``git show``), on the same windows in the same run; their outputs are checked equal
  to this tree's (items, order and source-rank rows), so the comparison is like for like.

Figures: p50 / p99 per window in milliseconds, and the ratio of this tree to the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, log, markdown_table, write_json

DEFAULT_OUT = REPORTS / "candidate_latency.json"
TWO_TOWER_ONLY = (1.0, 0.0, 0.0, 0.0, 0.0)
"""Budgets of the ANN-only variant (``SOURCES`` order; two_tower first)."""


def module_at(ref: str) -> ModuleType:
    """``orchestrator/candidates.py`` as of git ``ref``, imported under another name."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{ref}:orchestrator/candidates.py"], cwd=root, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="cand-baseline-")) / "candidates_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("candidates_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def windows(artifacts: Path, catalog: Any, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (window int64 [L] -1 padded, seen item indices) pairs at random cut-offs of random users."""
    import pandas as pd

    frame = pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id", "movie_id", "timestamp"])
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    items = catalog.to_items(frame["movie_id"].to_numpy())
    users = frame["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    rng = np.random.default_rng(seed)
    length = catalog.history_len
    out = []
    for u in rng.integers(0, len(starts), n):
        cut = int(rng.integers(starts[u] + 1, ends[u] + 1))
        seen = items[starts[u] : cut]
        seen = seen[seen >= 0]
        win = np.full(length, -1, np.int64)
        last = seen[-length:]
        win[length - len(last) :] = last
        out.append((win, np.unique(seen)))
    return out


def run(artifacts: Path, n_windows: int, rounds: int, baseline: str | None, seed: int) -> dict[str, Any]:
    """Times every step per window; returns the report (p50/p99 ms per step and variant)."""
    import orchestrator.candidates as current
    from orchestrator.catalog import Catalog
    from orchestrator.settings import ServeSettings

    catalog = Catalog.load(artifacts)
    k = ServeSettings(artifacts_dir=artifacts).retrieve_k
    tables = catalog.tables
    tt_only = tables.with_budgets(TWO_TOWER_ONLY)
    wins = windows(artifacts, catalog, n_windows, seed)
    queries = []
    for win, _ in wins:
        q = catalog.vectors[win[win >= 0]].mean(0)
        queries.append((q / max(float(np.linalg.norm(q)), 1e-12)).astype(np.float32))
    anns = [catalog.retrieve(q, k, None, seen)[0] for q, (_, seen) in zip(queries, wins)]
    blocked = [current.blocked_mask(catalog.n_items, seen) for _, seen in wins]

    mods = {"this tree": current}
    if baseline:
        mods[f"baseline {baseline}"] = module_at(baseline)
        for i, ((win, seen), ann, b) in enumerate(zip(wins, anns, blocked)):
            for t in (tables, tt_only):
                a_items, a_ranks = current.candidates(t, ann, win, b, k)
                b_items, b_ranks = mods[f"baseline {baseline}"].candidates(t, ann, win, b, k)
                if not (np.array_equal(a_items, b_items) and np.array_equal(a_ranks, b_ranks)):
                    raise AssertionError(f"window {i}: this tree's candidates differ from {baseline}'s")
        log(f"outputs equal to {baseline}'s on {len(wins)} windows x 2 budget sets")

    steps: dict[str, Callable[[Any, int], Any]] = {
        "ann (FAISS retrieve)": lambda m, i: catalog.retrieve(queries[i], k, None, wins[i][1]),
    }
    for name, m in mods.items():
        steps |= {
            f"{name}: blocked_mask": lambda m_, i, m=m: m.blocked_mask(catalog.n_items, wins[i][1]),
            f"{name}: candidates (merged)": lambda m_, i, m=m: m.candidates(tables, anns[i], wins[i][0], blocked[i], k),
            f"{name}: candidates (two_tower only)": lambda m_, i, m=m: m.candidates(tt_only, anns[i], wins[i][0], blocked[i], k),
            f"{name}: item_knn": lambda m_, i, m=m: m.item_knn(tables, wins[i][0], blocked[i], k),
            f"{name}: genre_popular": lambda m_, i, m=m: m.genre_popular(tables, wins[i][0], blocked[i], k),
            f"{name}: popular lists (2)": lambda m_, i, m=m: (
                m.popular_list(tables.recent_popular, blocked[i], k),
                m.popular_list(tables.popular, blocked[i], k),
            ),
            f"{name}: merge": lambda m_, i, m=m: m.merge(lists[i], tables.budgets, k),
            f"{name}: two_tower_scores": lambda m_, i, m=m: m.two_tower_scores(queries[i], catalog.vectors, anns[i]),
        }
    lists = [current.source_lists(tables, ann, win, b, k) for (win, _), ann, b in zip(wins, anns, blocked)]
    times: dict[str, list[float]] = {s: [] for s in steps}
    for r in range(rounds):
        for s, f in list(steps.items()) if r % 2 == 0 else list(steps.items())[::-1]:
            for i in range(len(wins)):
                t0 = time.perf_counter()
                f(None, i)
                times[s].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{rounds}")
    out = {
        s: {"p50_ms": round(float(np.median(v)) * 1e3, 4), "p99_ms": round(float(np.percentile(v, 99)) * 1e3, 4)} for s, v in times.items()
    }
    return {
        "conditions": conditions(catalog_items=catalog.n_items, retrieve_k=k, windows=len(wins), rounds=rounds, baseline=baseline),
        "budgets": [round(float(b), 4) for b in tables.budgets],
        "steps": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", default="artifacts", help="a trained deployment's artifacts (default: %(default)s)")
    p.add_argument("--windows", type=int, default=1000, help="history windows timed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the windows, alternating the order of steps (default: %(default)s)")
    p.add_argument("--baseline", default=None, help="git ref whose orchestrator/candidates.py is timed beside this tree's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    with LoadWatch() as load:
        report = run(Path(args.artifacts), args.windows, args.rounds, args.baseline, args.seed)
    report["conditions"]["load_average"] = load.record()
    steps = report["steps"]
    rows = []
    for s, v in steps.items():
        ref = None
        if args.baseline and s.startswith("this tree: "):
            ref = steps.get(f"baseline {args.baseline}: " + s.removeprefix("this tree: "), {}).get("p50_ms")
        rows.append((s, v["p50_ms"], v["p99_ms"], round(v["p50_ms"] / ref, 3) if ref else ""))
    print(markdown_table(["step (per window)", "p50 ms", "p99 ms", "p50 / baseline"], rows))
    print("\n" + conditions_line(report["conditions"]))
    print(f"wrote {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
