"""The ranker's operating point: trees x candidates against quality, and the Hummingbird strategy's latency.

    python -m benchmarks.ranker_operating_point --data D [--windows 2] [--trees 50,100,150,300]
        [--candidates 100,150,200] [--epochs E] [--out reports/benchmarks/ranker_operating_point.json]

Quality: rolling-origin windows (:func:`export.pipeline.run`, the evaluation's own splits); per
window the two-tower and candidate tables are fitted once, then for each candidate count ``C``
the merged candidates are rebuilt at ``C`` (validation users to train, test users to rank) and
for each number of trees ``T`` only the LightGBM LambdaRank ranker is retrained
(``export.ranker.train_ranker``, every other hyper-parameter as shipped). NDCG@10 of the
ranked candidates (no MMR) is pooled over the test users of all windows, and each setting's
difference from the shipped one gets a paired bootstrap 95% interval (the same users rank
under every setting); the ranker's scores
are LightGBM's own, which every Hummingbird strategy reproduces to ~1e-6, so the strategy does
not change quality.

Latency (in process, onnxruntime, one intra-op thread as served): the rankers of the latest
window exported with each Hummingbird strategy, timed at ``C`` rows (one Recommend's ranker
call), with LightGBM native as the yardstick; plus the feature graph at ``C`` rows, which does
not depend on the trees. Medians of ``--repeats`` calls.

Two-tower epochs default to the shipped config; ``--epochs`` lowers them on a busy machine (the
comparison is between ranker settings on the same two-tower, so it stays fair).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, log, markdown_table, write_json
from export.evaluate import bootstrap_diff
from export.onnx_export import TREE_IMPLEMENTATIONS, export_ranker, export_ranker_features, session
from export.pipeline import Fitted, TrainSettings, merged_candidates, ranker_queries, run, users_with_history
from export.ranker import RankerConfig, candidate_features, candidate_labels, rerank, train_ranker
from export.ranking_metrics import ndcg_at_k
from export.split import relevant_items
from export.two_tower import TwoTowerConfig


def _median_ms(fn: Any, repeats: int) -> float:
    fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(ms)), 4)


class Sweep:
    """Per window: NDCG@10 per user for every (C, T); the latest window's boosters and features for timing."""

    def __init__(self, trees: list[int], candidates: list[int], base: RankerConfig):
        self.trees, self.candidates, self.base = trees, candidates, base
        self.ndcg: dict[tuple[int, int], list[float]] = {(c, t): [] for c in candidates for t in trees}
        self.windows: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}

    def __call__(self, _ml: Any, fitted: Fitted) -> None:
        t_window = time.perf_counter()
        split, catalog = fitted.split, fitted.catalog
        index = catalog.index_of()
        # training queries: users active in validation with a past (as fit_models does)
        active = ranker_queries(split.val, fitted.val_period.histories)
        rel_test = relevant_items(split.test, index)
        users = users_with_history(rel_test, fitted.test_period)
        relevant = [rel_test[u] for u in users]
        feats_val_module = fitted.ranker_features(fitted.val_period, fitted.two_tower_val.model)
        feats_test_module = fitted.ranker_features(fitted.test_period, fitted.two_tower.model)
        window: dict[str, Any] = {"test_users": int(len(users)), "ndcg@10": {}}
        boosters: dict[tuple[int, int], Any] = {}
        test_feats: dict[int, tuple[np.ndarray, Any]] = {}
        for c in self.candidates:
            cv = merged_candidates(fitted.two_tower_val.model, fitted.val_period, fitted.demographics, fitted.tables_val, active, c)
            xv = candidate_features(feats_val_module, cv.history, cv.history_rating, cv.items, cv.scores, cv.sources)
            yv = candidate_labels(active, cv.items, split.val, catalog)
            ct = merged_candidates(fitted.two_tower.model, fitted.test_period, fitted.demographics, fitted.tables, users, c)
            xt = candidate_features(feats_test_module, ct.history, ct.history_rating, ct.items, ct.scores, ct.sources)
            test_feats[c] = (xt, ct)
            for t in self.trees:
                booster = train_ranker(xv, yv, replace(self.base, candidates=c, n_estimators=t))
                ranked, _ = rerank(booster, xt, ct.items)
                per_user = [ndcg_at_k(row, rel, 10) for row, rel in zip(ranked, relevant)]
                self.ndcg[(c, t)].extend(per_user)
                window["ndcg@10"][f"C{c}/T{t}"] = round(float(np.mean(per_user)), 5)
                boosters[(c, t)] = booster
            scores = ", ".join(f"T{t} {window['ndcg@10'][f'C{c}/T{t}']:.4f}" for t in self.trees)
            log(f"window {len(self.windows) + 1}: C={c} done ({scores})")
        window["seconds"] = round(time.perf_counter() - t_window, 1)
        self.windows.append(window)
        self.last = {"boosters": boosters, "features": test_feats, "module": feats_test_module}


def time_latest(sweep: Sweep, repeats: int, workdir: Path) -> dict[str, dict[str, float | None]]:
    """``{"C{c}/T{t}": {strategy: ms, "lightgbm": ms, "features": ms}}`` on the latest window's models."""
    out: dict[str, dict[str, float | None]] = {}
    last = sweep.last
    feature_graph = workdir / "ranker_features.onnx"
    export_ranker_features(last["module"], feature_graph)
    fsess = session(feature_graph)
    for c in sweep.candidates:
        xt, ct = last["features"][c]
        rows = xt[:c]  # one user's candidates: one Recommend's ranker call
        one_user = {
            "item": np.where(ct.items[0] >= 0, ct.items[0], 0).astype(np.int32),
            "retrieval_score": np.nan_to_num(ct.scores[0], neginf=0.0).astype(np.float32),
            "retrieval_rank": np.arange(c, dtype=np.float32),
            "history": ct.history[:1].astype(np.int32),
            "history_rating": ct.history_rating[:1].astype(np.float32),
            "candidate_sources": ct.sources[0].astype(np.float32),
        }
        feeds = {i.name: one_user[i.name] for i in fsess.get_inputs()}
        f_ms = _median_ms(lambda: fsess.run(None, feeds), repeats)  # noqa: B023
        for t in sweep.trees:
            booster = last["boosters"][(c, t)]
            row: dict[str, float | None] = {"features": f_ms, "lightgbm": _median_ms(lambda: booster.predict(rows, num_threads=1), repeats)}  # noqa: B023
            for impl in TREE_IMPLEMENTATIONS:
                path = workdir / f"ranker-C{c}-T{t}-{impl}.onnx"
                try:
                    export_ranker(booster, impl, path)
                    sess = session(path)
                    got = sess.run(["score"], {"features": rows})[0].reshape(-1)
                    if not np.allclose(got, booster.predict(rows, num_threads=1), atol=1e-4):
                        raise ValueError("scores differ from LightGBM")
                    row[impl] = _median_ms(lambda: sess.run(["score"], {"features": rows}), repeats)  # noqa: B023
                except Exception as exc:  # noqa: BLE001 - a strategy that fails is reported, not fatal
                    log(f"C{c}/T{t} {impl}: {type(exc).__name__}: {exc}")
                    row[impl] = None
            out[f"C{c}/T{t}"] = row
            log(f"timed C{c}/T{t}: {row}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MovieLens CSV folder")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--trees", default="50,100,150,300")
    p.add_argument("--candidates", default="100,150,200")
    p.add_argument("--epochs", type=int, default=None, help="two-tower epochs (default: the shipped config's)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per latency figure")
    p.add_argument("--out", default=str(REPORTS / "ranker_operating_point.json"))
    args = p.parse_args(argv)
    trees = [int(x) for x in args.trees.split(",")]
    cands = [int(x) for x in args.candidates.split(",")]
    tt = TwoTowerConfig() if args.epochs is None else replace(TwoTowerConfig(), epochs=args.epochs)
    base = RankerConfig()
    settings = TrainSettings(two_tower=tt, ranker=replace(base, candidates=max(cands)))
    sweep = Sweep(trees, cands, base)
    with LoadWatch() as load:
        run(args.data, None, None, settings, progress=False, inspect=sweep, windows=args.windows)
        with tempfile.TemporaryDirectory(prefix="ranker-op-") as tmp:
            timing = time_latest(sweep, args.repeats, Path(tmp))
    ref_key = (base.candidates, base.n_estimators)
    ref = np.asarray(sweep.ndcg[ref_key]) if ref_key in sweep.ndcg else None
    rows, table = [], {}
    for c in cands:
        for t in trees:
            per_user = np.asarray(sweep.ndcg[(c, t)])
            q = float(per_user.mean())
            tm = timing[f"C{c}/T{t}"]
            good = {k: v for k, v in tm.items() if k in TREE_IMPLEMENTATIONS and v is not None}
            best = min(good, key=lambda k: good[k]) if good else None
            # the same users in the same order under every setting: a paired bootstrap of the difference
            diff = bootstrap_diff(per_user - ref) if ref is not None else None
            rel = round(100 * (q / float(ref.mean()) - 1), 2) if ref is not None else None
            ci = f"{diff['ci95_low']:+.4f} .. {diff['ci95_high']:+.4f}" if diff else None
            table[f"C{c}/T{t}"] = {
                "ndcg@10": round(q, 5),
                "vs_shipped_pct": rel,
                "diff_vs_shipped": diff,
                "ms": tm,
                "fastest_strategy": best,
            }
            rows.append([c, t, round(q, 4), rel, ci, tm["features"], *(tm.get(i) for i in TREE_IMPLEMENTATIONS), tm["lightgbm"], best])
    headers = [
        "candidates",
        "trees",
        "NDCG@10",
        "vs shipped %",
        "diff 95% CI",
        "features ms",
        *(f"{i} ms" for i in TREE_IMPLEMENTATIONS),
        "LightGBM ms",
        "fastest",
    ]
    cond = conditions(
        data=args.data,
        windows=args.windows,
        two_tower_epochs=tt.epochs,
        repeats=args.repeats,
        shipped=f"C{base.candidates}/T{base.n_estimators}",
    ) | {"load_average": load.record(), "test_users_pooled": int(len(next(iter(sweep.ndcg.values()))))}
    print(markdown_table(headers, rows))
    print(conditions_line(cond))
    write_json(args.out, {"conditions": cond, "table": table, "windows": sweep.windows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
