"""The ranker's regularisation and seed: what ``min_child_samples`` buys, in expectation over seeds (issue 12).

    python -m benchmarks.ranker_regularisation --data DIR [--windows 5] [--min-child 50,100,200,400]
        [--seeds 5] [--bags 5x20@0.25] [--sample 1.0] [--val-fraction 0.1] [--init ease_score@0.5] [--out FILE.json]

Per rolling window every model is fitted as ``recsys evaluate`` fits it; then only the
LambdaRank ranker is retrained, on the same validation matrix (:func:`benchmarks.common.ranker_matrices`),
for each ``min_child_samples`` value and each of ``--seeds`` seeds, and scored on the same test
candidates. The ranker trains on one query per validation user (64-93 a window on MovieLens
100K, 159-190 on the synthetic sample) with row and feature sampling (0.8), so one seed's
NDCG@10 can differ from another's by as much as two settings differ: each row reports the
mean over seeds (what the setting gives in expectation), the seeds' range, and paired
bootstraps of the seed-averaged per-user NDCG@10 against the first setting's and against EASE
(dense weights over the user's whole history, ``export.features.EASE_LAM``), and per seed the
number of windows where the ranker scores at least EASE. The JSON adds each seed's NDCG@10 per
window beside EASE's.

``--bags KxT@LR`` adds rows for bagged rankers of the same serving cost as the rest when
``K * T`` equals the shipped tree count: K boosters of T trees at learning rate LR, seeds
consecutive, summed (``RankerConfig.bags``), each with every ``--min-child`` value.
``--sample F`` adds single boosters with row and feature sampling F (1.0: none, so every seed
gives the same ranker); ``--val-fraction`` widens or narrows the validation period, i.e. the
ranker's training queries (the test windows stay the same, so the EASE column compares runs).
``--init COLUMN@ALPHA`` adds rankers (at the first ``--min-child`` value) that boost from alpha
times a feature column scaled to unit deviation (``RankerConfig.base_feature`` / ``base_alpha``;
the shipped ranker boosts from ``ease_score`` x 0.5); ``--init none`` adds rankers boosted
from zero.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from benchmarks.common import LoadWatch, log, markdown_table, publish_report, ranker_matrices
from benchmarks.ease_history import alone_ndcg, ease_weights
from export.evaluate import bootstrap_diff, per_user_ndcg
from export.features import FEATURE_NAMES
from export.pipeline import TrainSettings, run
from export.ranker import RankerConfig, rerank, train_ranker


def settings_grid(
    base: RankerConfig,
    min_child: list[int],
    seeds: int,
    bags: list[tuple[int, int, float]],
    sample: list[float] | None = None,
) -> dict[str, list[RankerConfig]]:
    """Row name -> the configs whose rankers the row averages (one per seed).

    ``sample`` adds, per ``min_child`` value, single boosters whose row and feature sampling
    are that fraction instead of the shipped ones (1.0: no sampling, the seed then changes nothing).
    """
    grid: dict[str, list[RankerConfig]] = {}
    for m in min_child:
        grid[f"min_child_samples {m}"] = [replace(base, min_child_samples=m, seed=s) for s in range(seeds)]
    for f in sample or []:
        for m in min_child:
            grid[f"sampling {f:g}, min_child_samples {m}"] = [
                replace(base, min_child_samples=m, seed=s, subsample=f, colsample=f) for s in range(seeds)
            ]
    for k, t, lr in bags:
        for m in min_child:
            grid[f"{k} bags x {t} trees, lr {lr:g}, min_child_samples {m}"] = [
                replace(base, min_child_samples=m, seed=s * k, bags=k, n_estimators=k * t, learning_rate=lr) for s in range(seeds)
            ]
    return grid


def init_rows(base: RankerConfig, specs: list[tuple[str | None, float]], seeds: int) -> dict[str, list[RankerConfig]]:
    """Rows of rankers boosted from ``alpha`` times a feature column (None: from zero)."""
    return {
        (f"boosted from {c} x {a:g}" if c else "boosted from zero"): [
            replace(base, seed=s, base_feature=c, base_alpha=a) for s in range(seeds)
        ]
        for c, a in specs
    }


def measure(data: str, windows: int, grid: dict[str, list[RankerConfig]], settings: TrainSettings | None = None) -> dict[str, Any]:
    """Per row and seed, per-user NDCG@10 pooled over the windows; EASE's beside, and per seed
    the number of windows where the ranker is at least EASE."""
    settings = settings or TrainSettings()
    per_seed: dict[str, list[list[np.ndarray]]] = {name: [[] for _ in cfgs] for name, cfgs in grid.items()}
    ease: list[np.ndarray] = []
    queries: list[int] = []

    def inspect(_ml: Any, fitted: Any) -> None:
        m = ranker_matrices(fitted, settings.ranker.candidates)
        queries.append(int((m.labels.max(axis=1) > 0).sum()))
        log(f"window {len(queries)}: {queries[-1]} training queries, {len(m.test_users)} test users")
        n_items = fitted.two_tower.model.item_vectors().shape[0]
        weights = {"dense": ease_weights(fitted.test_period.histories, n_items)}
        ease.append(alone_ndcg(fitted.test_period.histories, m.test_users, m.relevant, weights, lengths=(0,))["dense/all"])
        for name, cfgs in grid.items():
            for i, cfg in enumerate(cfgs):
                ranked, _ = rerank(train_ranker(m.train, m.labels, cfg), m.test, m.test_candidates.items)
                per_seed[name][i].append(per_user_ndcg(ranked, m.relevant))

    run(data, None, None, settings, False, inspect, windows=windows)
    e = np.concatenate(ease)
    first = None
    rows: dict[str, Any] = {}
    for name, seeds in per_seed.items():
        each = np.stack([np.concatenate(s) for s in seeds])  # [seeds, pairs]
        mean = each.mean(axis=0)
        first = mean if first is None else first
        rows[name] = {
            "ndcg@10": float(mean.mean()),
            "seeds": [float(x) for x in each.mean(axis=1)],
            "vs_first": bootstrap_diff(mean - first),
            "vs_ease": bootstrap_diff(mean - e),
            "seed0_vs_ease": bootstrap_diff(each[0] - e),
            "per_window": [[float(w.mean()) for w in s] for s in seeds],  # [seed][window]
            "windows_won": [sum(float(w.mean()) >= float(x.mean()) for w, x in zip(s, ease, strict=True)) for s in seeds],
        }
    report = {"pairs": int(len(e)), "training_queries": queries, "ease_ndcg@10": float(e.mean()), "rows": rows}
    report["ease_per_window"] = [float(w.mean()) for w in ease]
    return report


def table(report: dict[str, Any]) -> str:
    """Markdown: a row per setting."""

    def ci(d: dict[str, float]) -> str:
        return f"{d['mean_diff']:+.4f} [{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]"

    rows = [
        [
            name,
            r["ndcg@10"],
            f"{min(r['seeds']):.4f} .. {max(r['seeds']):.4f}",
            ci(r["vs_first"]),
            ci(r["vs_ease"]),
            ci(r["seed0_vs_ease"]),
            " ".join(str(n) for n in r["windows_won"]),
        ]
        for name, r in report["rows"].items()
    ]
    head = [
        "ranker",
        "NDCG@10 (mean of seeds)",
        "seeds' range",
        "minus first row [95 % CI]",
        "minus EASE",
        "seed 0 minus EASE",
        "windows >= EASE (each seed)",
    ]
    return (
        markdown_table(head, rows)
        + f"\n\nEASE (dense, whole history): {report['ease_ndcg@10']:.4f}; {report['pairs']} (user, window) pairs\n"
    )


def _init(text: str) -> tuple[str | None, float]:
    if text == "none":
        return None, 0.0
    column, alpha = text.rsplit("@", 1)
    if column not in FEATURE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown feature column {column!r}; one of {', '.join(FEATURE_NAMES)}")
    return column, float(alpha)


def _bags(text: str) -> tuple[int, int, float]:
    k, rest = text.split("x", 1)
    t, lr = rest.split("@", 1)
    return int(k), int(t), float(lr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", required=True, help="MovieLens CSV folder")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--min-child", default="50,100,200,400", help="min_child_samples values, the first is the reference row")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--bags", action="append", default=[], type=_bags, help="KxT@LR: K boosters of T trees at learning rate LR")
    p.add_argument("--sample", default="", help="row/feature sampling fractions for extra single-booster rows, e.g. 1.0")
    p.add_argument("--val-fraction", type=float, default=TrainSettings.val_fraction, help="validation period share (the ranker's queries)")
    p.add_argument(
        "--init",
        action="append",
        default=[],
        type=_init,
        help="COLUMN@ALPHA: rankers boosted from a feature column; none: from zero (repeatable)",
    )
    p.add_argument("--out", default=None, help="JSON report (table printed)")
    args = p.parse_args(argv)
    min_child = [int(x) for x in args.min_child.split(",")]
    sample = [float(x) for x in args.sample.split(",") if x]
    settings = TrainSettings(val_fraction=args.val_fraction)
    grid = settings_grid(settings.ranker, min_child, args.seeds, args.bags, sample)
    boosted = init_rows(replace(settings.ranker, min_child_samples=min_child[0]), args.init, args.seeds)
    with LoadWatch() as load:
        report = measure(args.data, args.windows, grid | boosted, settings)
    return publish_report(report, load, table(report), args.out, data=args.data, seeds=args.seeds, val_fraction=args.val_fraction)


if __name__ == "__main__":
    sys.exit(main())
