"""EASE over a longer history: what the ranker's EASE features leave behind (issue 12).

    python -m benchmarks.ease_history --data DIR [--windows 5] [--extra-window 0] [--out FILE.json]

The served ``ease_score`` (``export/features.py``) reads the 50-item history window through a
table of each item's ``EASE_NEIGHBOURS`` largest EASE weights; the EASE baseline scores from
the user's whole history with the dense weights. Per rolling window (the evaluation's splits,
every model fitted as ``recsys evaluate`` fits it), this measures what each of the two limits
costs and whether a whole-history EASE column would lift the ranker:

1. **EASE alone.** Every item scored by EASE (lambda ``EASE_LAM``, fitted on the test period's
   history), seen items excluded, NDCG@10 of the top 10 for the test users: dense weights or
   the served table, over the last 50 / last 200 / every interaction of each user.
2. **The ranker with an extra column.** The LambdaRank ranker retrained on the validation
   candidates exactly as the pipeline trains it (``train_ranker`` with the pipeline's ``RankerConfig``),
   with one or two extra columns: EASE's score of each candidate over the last
   ``--extra-window`` interactions (0 = all), with dense weights or their rank-64 truncated
   SVD (``P Q^T``, so a user's score vector is ``(sum of P over the history) Q^T``). Validation
   columns come from the validation period's history and weights, test columns from the test
   period's. The candidates ordered by each column alone are reported beside.

Pooled over the (user, window) pairs; each ranker row's interval is the paired bootstrap of
its NDCG@10 minus the shipped ranker's. This is the measurement that added the served
``ease_lowrank_long`` (the rank-64 column over the last ``RANKER_HISTORY`` = 200 interactions,
BENCHMARKS.md); since then the shipped ranker carries it, so ``--extra-window 200``'s
``+ EASE rank 64`` row repeats a column the shipped one has.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks.common import LoadWatch, log, markdown_table, publish_report, ranker_matrices
from export.baselines import EASE
from export.evaluate import bootstrap_diff, per_user_ndcg
from export.features import EASE_LAM, EASE_NEIGHBOURS, EASE_RANK, FEATURE_NAMES, ease_factors, ease_tables
from export.history import Histories
from export.pipeline import TrainSettings, run
from export.ranker import order_by_scores, rerank, train_ranker

WINDOWS = (50, 200, 0)
"""History lengths of the EASE-alone table (0 = every interaction)."""

RANK = EASE_RANK
"""Rank of the factorised EASE weights (the served ``ease_lowrank_long``'s)."""


def longest(histories: Histories) -> int:
    """The longest history of the store (the length that reads every interaction)."""
    return max(int(np.diff(histories.offsets).max(initial=0)), 1)


def ease_weights(histories: Histories, n_items: int) -> np.ndarray:
    """Dense EASE weights ``B`` [n_items, n_items] fitted on binary interactions of ``histories``."""
    b = EASE(lam=EASE_LAM, max_items=max(n_items, 1)).fit(histories.binary_matrix(n_items)).weights
    assert b is not None
    return b.astype(np.float32)


def table_weights(histories: Histories, n_items: int) -> np.ndarray:
    """The served neighbour table (:func:`export.features.ease_tables`) as a dense matrix, zeros elsewhere."""
    t = ease_tables(histories, n_items)
    items, weights = t.items, t.weights
    out = np.zeros((n_items, n_items), np.float32)
    rows = np.repeat(np.arange(n_items), items.shape[1])
    keep = items.reshape(-1) >= 0
    out[rows[keep], items.reshape(-1)[keep]] = weights.reshape(-1)[keep]
    return out


def top10(scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """The 10 best items of one score row, ``seen`` excluded."""
    scores = scores.copy()
    scores[seen] = -np.inf
    return np.argsort(-scores, kind="stable")[:10]


def alone_ndcg(
    histories: Histories,
    users: np.ndarray,
    relevant: list[np.ndarray],
    weights: dict[str, np.ndarray],
    lengths: tuple[int, ...] = WINDOWS,
) -> dict[str, np.ndarray]:
    """Per-user NDCG@10 of EASE alone for each (weights, history length) pair (0 = every interaction)."""
    every = longest(histories)
    full, _ = histories.last(users, every)
    out: dict[str, np.ndarray] = {}
    for length in lengths:
        hist, _ = histories.last(users, length or every)
        for wname, b in weights.items():
            ranked = np.stack([top10(b[h[h >= 0]].sum(axis=0), f[f >= 0]) for h, f in zip(hist, full)])
            out[f"{wname}/{length or 'all'}"] = per_user_ndcg(ranked, relevant)
    return out


def extra_columns(histories: Histories, b: np.ndarray, users: np.ndarray, cands: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """EASE's score of each candidate over the last ``length`` interactions (0 = all): with the
    dense weights ``b`` (:func:`ease_weights` of ``histories``) and their rank-64 factors."""
    p, q = ease_factors(b)
    hist, _ = histories.last(users, length or longest(histories))
    safe = np.where(cands >= 0, cands, 0)
    dense = np.zeros(cands.shape, np.float32)
    low = np.zeros(cands.shape, np.float32)
    for i, h in enumerate(hist):
        h = h[h >= 0]
        dense[i] = b[np.ix_(h, safe[i])].sum(axis=0)
        low[i] = p[h].sum(axis=0) @ q[safe[i]].T
    return {"dense": dense, f"rank{RANK}": low}


SHIPPED = f"shipped ranker ({len(FEATURE_NAMES)} features)"
"""The row every other ranker row is compared with."""

VARIANTS: dict[str, tuple[str, ...]] = {
    SHIPPED: (),
    f"+ EASE rank {RANK}": (f"rank{RANK}",),
    "+ EASE dense": ("dense",),
    "+ both": ("dense", f"rank{RANK}"),
}


def measure(data: str, windows: int, extra_window: int, settings: TrainSettings | None = None) -> dict:
    """Runs the evaluation's windows and collects both tables' per-user NDCG@10 (``settings``: the
    pipeline's, default ones unless given)."""
    settings = settings or TrainSettings()
    alone: dict[str, list[np.ndarray]] = {}
    ranker: dict[str, list[np.ndarray]] = {}
    lengths: list[np.ndarray] = []

    def inspect(ml, fitted) -> None:
        period = fitted.test_period
        n_items = fitted.two_tower.model.item_vectors().shape[0]
        m = ranker_matrices(fitted, settings.ranker.candidates)
        users, relevant, c = m.test_users, m.relevant, m.test_candidates
        log(f"window {len(lengths) + 1}: {len(users)} test users, EASE alone")
        full, _ = period.histories.last(users, longest(period.histories))
        lengths.append((full >= 0).sum(axis=1))
        dense = ease_weights(period.histories, n_items)
        weights = {"dense": dense, f"table{EASE_NEIGHBOURS}": table_weights(period.histories, n_items)}
        for key, v in alone_ndcg(period.histories, users, relevant, weights).items():
            alone.setdefault(key, []).append(v)
        log("ranker variants")
        vp = fitted.val_period
        vx = extra_columns(vp.histories, ease_weights(vp.histories, n_items), m.train_users, m.train_candidates.items, extra_window)
        tx = extra_columns(period.histories, dense, users, c.items, extra_window)
        for name, cols in VARIANTS.items():
            booster = train_ranker(
                np.hstack([m.train] + [vx[k].reshape(-1, 1) for k in cols]), m.labels, settings.ranker, (*FEATURE_NAMES, *cols)
            )
            ranked, _ = rerank(booster, np.hstack([m.test] + [tx[k].reshape(-1, 1) for k in cols]), c.items)
            ranker.setdefault(name, []).append(per_user_ndcg(ranked, relevant))
        for k, s in tx.items():
            ordered, _ = order_by_scores(s.reshape(c.items.shape), c.items)
            ranker.setdefault(f"candidates ordered by EASE {k} alone", []).append(per_user_ndcg(ordered, relevant))

    run(data, None, None, settings, False, inspect, windows=windows)
    base = np.concatenate(ranker[SHIPPED])
    hl = np.concatenate(lengths)
    return {
        "pairs": int(len(base)),
        "history_length": {"median": float(np.median(hl)), "mean": float(hl.mean())},
        "ease_alone": {k: float(np.concatenate(v).mean()) for k, v in alone.items()},
        "ranker": {
            k: {"ndcg@10": float(np.concatenate(v).mean()), "vs_shipped": bootstrap_diff(np.concatenate(v) - base)}
            for k, v in ranker.items()
        },
        "per_window": {k: [float(x.mean()) for x in v] for k, v in {**alone, **ranker}.items()},
    }


def tables(report: dict) -> str:
    """The two markdown tables."""
    alone = report["ease_alone"]
    rows_a = [[w] + [alone[f"{w}/{n or 'all'}"] for n in WINDOWS] for w in ("dense", f"table{EASE_NEIGHBOURS}")]
    a = markdown_table(["weights \\ history", *(f"last {n}" if n else "whole history" for n in WINDOWS)], rows_a)
    rows_r = []
    for k, v in report["ranker"].items():
        d = v["vs_shipped"]
        rows_r.append([k, v["ndcg@10"], f"{d['mean_diff']:+.4f} [{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]"])
    r = markdown_table(["ranker", "NDCG@10", "minus shipped [95 % CI]"], rows_r)
    return f"{a}\n\n{r}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", required=True, help="MovieLens CSV folder")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--extra-window", type=int, default=0, help="history length of the ranker's extra columns (0 = all)")
    p.add_argument("--out", default=None, help="JSON report (tables printed)")
    args = p.parse_args(argv)
    with LoadWatch() as load:
        report = measure(args.data, args.windows, args.extra_window)
    return publish_report(report, load, tables(report), args.out, data=args.data, extra_window=args.extra_window)


if __name__ == "__main__":
    sys.exit(main())
