"""Diversity re-rankers' frontier: NDCG@10 loss vs ILD@10 gain over the ranker's lists (issue 12).

Usage::

    python -m benchmarks.diversity_frontier --ml-100k PATH [--dump /tmp/rerank_inputs.pkl] [--out FILE.md]

Step 1 runs ``recsys evaluate --windows 5`` once (:func:`export.evaluate.evaluate`, default
:class:`~export.evaluate.EvalSettings`) and keeps, per window, what the re-ranker sees: each
test user's ranked candidates and ranker scores, the similarity vectors MMR receives, the genre
vectors ILD is measured on and the relevant items (a pickle under ``--dump``; reused when it
exists, so the grid reruns in about a minute). It first checks that re-ranking the dump with
the report's own MMR gives the report's ``mmr_sweep`` to 6 decimals.

Step 2 re-ranks every test list with each method of a grid and measures NDCG@10 and ILD@10
as the report does (per (user, window) pair, pooled), relative to the ranker's own order:

* ``mmr-max``, ``mmr-sum``, ``mmr-mean``: :func:`orchestrator.mmr.mmr_rerank` with that
  ``penalty`` (relevance = min-max scaled ranker score in the pool);
* ``keep2`` variants: the first two positions stay as ranked, MMR fills the rest;
* ``mmr-sum-unscaled`` (``-discounted``): the summed penalty against the ranker's raw
  scores, optionally discounted by output position (:func:`mmr_unscaled`);
* ``dpp``: the fast greedy MAP inference of Chen, Zhang and Zhou (NeurIPS 2018) on the kernel
  ``L = diag(q) (G + beta I) diag(q)``, ``q = exp(alpha * scaled score)``, ``G`` the genre
  cosine matrix of the pool.

The operating point is chosen on windows 1-3 only (most ILD@10 gain with NDCG@10 loss
<= 3 % there, among the methods the served code implements, :data:`SERVABLE`) and reported on
all 5 windows and on the held-out windows 4-5; the best of any method is printed beside it.

A second rule reads no relevance labels at all (:func:`label_free_choice`): among the served
methods, the point that reaches the ILD@10 target (+20 %) on the test lists and keeps the
most of the ranker's own expected DCG@10 (:func:`strength_dcg`: each candidate's gain is its
share of ``exp(score)`` among the user's candidates, the Bradley-Terry reading of LambdaRank
scores). ILD@10 and that DCG need only the lists and the ranker's scores, so a deployment can
set its point from served traffic the same way; its NDCG@10 change is then an out-of-sample
figure on all 5 windows.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export import evaluate as ev
from export.ranking_metrics import _ild_rows, evaluate_rankings, ndcg_at_k
from export.split import relevant_items
from orchestrator.mmr import mmr_rerank

TUNE = (0, 1, 2)
HELD = (3, 4)
MAX_LOSS = 3.0
"""Percent NDCG@10 loss the operating point may cost on the tuning windows (the issue's bound)."""

ILD_TARGET = 20.0
"""Percent ILD@10 gain over the ranker's order that the label-free rule must reach (the issue's)."""

SERVABLE = ("mmr-max", "mmr-sum", "mmr-mean")
"""Methods :func:`orchestrator.mmr.mmr_rerank` serves (its ``penalty`` modes)."""

Rerank = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(pool scores best first, pool unit vectors) -> picked positions into the pool."""


def dump_inputs(data: str, path: Path) -> dict:
    """Runs the 5-window evaluation once and pickles what the re-ranker sees per window."""
    windows: list[dict] = []
    seen: dict = {}
    our_rankings, mmr_lists = ev.our_rankings, ev.mmr_lists

    def mmr_hook(ranked, scores, vectors, lam, pool, k, penalty="max"):
        seen.setdefault("inputs", (np.array(ranked), np.array(scores), np.array(vectors)))
        return mmr_lists(ranked, scores, vectors, lam, pool, k, penalty)

    def rankings_hook(fitted, users, settings):
        seen.clear()
        out = our_rankings(fitted, users, settings)
        rel = relevant_items(fitted.split.test, fitted.catalog.index_of())
        ranked, scores, vectors = seen["inputs"]
        windows.append(
            {
                "ranked": ranked,
                "scores": scores,
                "mmr_vectors": vectors,
                "relevant": [np.asarray(rel[u]) for u in users],
                "genre": np.asarray(fitted.catalog.genre_matrix),
                "n_items": int(fitted.catalog.n_items),
                "popularity": np.asarray(fitted.test_period.stats.count),
                "lists": {key: v for key, v in out.items() if key.startswith("mmr@")},
            }
        )
        return out

    settings = ev.EvalSettings(windows=5)
    ev.our_rankings, ev.mmr_lists = rankings_hook, mmr_hook
    try:
        report = ev.evaluate(data, path.with_suffix(".eval.json"), settings, progress=False)
    finally:
        ev.our_rankings, ev.mmr_lists = our_rankings, mmr_lists
    dump = {"windows": windows, "sweep": report["mmr_sweep"], "users": [w["test_users"] for w in report["windows"]], "settings": settings}
    path.write_bytes(pickle.dumps(dump))
    return dump


def check_reproduces(dump: dict) -> None:
    """The report's MMR sweep, recomputed from the dump, must match it to 6 decimals."""
    s = dump["settings"]
    for lam, pooled in dump["sweep"].items():
        per = []
        for w in dump["windows"]:
            lists = ev.mmr_lists(w["ranked"], w["scores"], w["mmr_vectors"], float(lam), s.mmr_pool, max(ev.KS), s.mmr_penalty)
            assert (lists == w["lists"][f"mmr@{lam}"]).all(), lam
            per.append(
                evaluate_rankings(
                    lists, w["relevant"], n_items=w["n_items"], ks=ev.KS, item_vectors=w["genre"], item_popularity=w["popularity"]
                )
            )
        mine = ev.pool_metrics(per, dump["users"])
        for key in ("ndcg@10", "ild@10"):
            assert abs(mine[key] - pooled[key]) < 1e-6, (lam, key, mine[key], pooled[key])


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def _scaled(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def mmr(lam: float, penalty: str, keep: int = 1) -> Rerank:
    """MMR over the pool; the first ``keep`` positions stay in the ranker's order.

    ``keep = 1`` is :func:`orchestrator.mmr.mmr_rerank` itself (the served code); for
    ``keep > 1`` the same greedy rule continues from the kept items (they count in the
    penalty), relevance min-max scaled over the whole pool as there.
    """

    def fn(sc: np.ndarray, unit: np.ndarray) -> np.ndarray:
        k = min(10, len(sc))
        if keep == 1:
            return mmr_rerank(sc, unit, k=k, lam=lam, penalty=penalty)
        r = _scaled(sc)
        taken = np.zeros(len(sc), bool)
        picked = list(range(min(keep, k)))
        taken[picked] = True
        sims = unit @ unit[picked].T
        agg = sims.max(axis=1) if penalty == "max" else sims.sum(axis=1)
        while len(picked) < k:
            pen = agg / len(picked) if penalty == "mean" else agg
            best = int(np.argmax(np.where(taken, -np.inf, lam * r - (1 - lam) * pen)))
            picked.append(best)
            taken[best] = True
            sim = unit @ unit[best]
            agg = np.maximum(agg, sim) if penalty == "max" else agg + sim
        return np.array(picked)

    return fn


def mmr_unscaled(beta: float, discount: bool = False) -> Rerank:
    """Summed-penalty MMR on the ranker's raw scores: ``s_i - beta * sum_(j in S) cos(i, j)``.

    LambdaRank scores are pairwise log-odds (``s_i - s_j`` is the log-odds that ``i`` ranks above
    ``j``), so unlike the min-max scaled relevance of :func:`orchestrator.mmr.mmr_rerank` the trade
    -off here depends on how sure the ranker is of each user's order. ``discount`` multiplies the
    relevance term at output position ``p`` (1-based) by NDCG's ``1 / log2(p + 1)``, so the lower
    positions give up relevance for diversity more readily than the top ones.
    """

    def fn(sc: np.ndarray, unit: np.ndarray) -> np.ndarray:
        k = min(10, len(sc))
        picked, taken = [0], np.zeros(len(sc), bool)
        taken[0] = True
        agg = unit @ unit[0]
        while len(picked) < k:
            rel = sc / np.log2(len(picked) + 2) if discount else sc
            best = int(np.argmax(np.where(taken, -np.inf, rel - beta * agg)))
            picked.append(best)
            taken[best] = True
            agg = agg + unit @ unit[best]
        return np.array(picked)

    return fn


def dpp(alpha: float, beta: float) -> Rerank:
    """Chen et al. 2018 greedy MAP (incremental Cholesky), O(k * pool * d)."""

    def fn(sc: np.ndarray, unit: np.ndarray) -> np.ndarray:
        n = len(sc)
        k = min(10, n)
        q = np.exp(alpha * (_scaled(sc) - 1.0))
        c = np.zeros((k, n))
        d2 = q * q * ((unit * unit).sum(1) + beta)
        taken = np.zeros(n, bool)
        picked = []
        for j in range(k):
            best = int(np.argmax(np.where(taken, -np.inf, d2)))
            picked.append(best)
            taken[best] = True
            row = q[best] * q * (unit @ unit[best])
            row[best] += q[best] ** 2 * beta
            c[j] = (row - c[:j].T @ c[:j, best]) / np.sqrt(max(d2[best], 1e-300))
            d2 = d2 - c[j] ** 2
        return np.array(picked)

    return fn


def rerank_window(w: dict, fn: Rerank, pool: int) -> np.ndarray:
    """int64 [users, 10]: ``fn`` over each user's ``pool`` best candidates (as ``mmr_lists``)."""
    unit = _unit(w["mmr_vectors"])
    out = np.full((len(w["ranked"]), 10), -1, np.int64)
    for row, (items, sc) in enumerate(zip(w["ranked"], w["scores"])):
        items, sc = items[items >= 0], sc[items >= 0]
        head = min(pool, len(items))
        merged = np.concatenate([items[:head][fn(sc[:head], unit[items[:head]])], items[head:]])[:10]
        out[row, : len(merged)] = merged
    return out


def per_pair(w: dict, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user NDCG@10 and ILD@10 (genre vectors), as ``evaluate_rankings`` computes them."""
    ndcg = np.array([ndcg_at_k(r, rel, 10) for r, rel in zip(lists, w["relevant"])])
    return ndcg, _ild_rows(lists[:, :10], _unit(w["genre"]))


def strength_dcg(w: dict, lists: np.ndarray) -> np.ndarray:
    """Per user, DCG@10 of ``lists`` with each item's gain its share of ``exp(ranker score)``
    among the user's candidates (no labels); the ranker's own order maximises it."""
    out = np.zeros(len(lists))
    disc = 1.0 / np.log2(np.arange(2, 12))
    for row, (items, sc, picked) in enumerate(zip(w["ranked"], w["scores"], lists)):
        ok = items >= 0
        strength = np.exp(sc[ok] - sc[ok].max())
        gain = dict(zip(items[ok].tolist(), (strength / strength.sum()).tolist()))
        out[row] = sum(gain.get(int(i), 0.0) * d for i, d in zip(picked[:10], disc) if i >= 0)
    return out


def label_free_choice(rows: list[dict], target: float = ILD_TARGET) -> dict | None:
    """Among the served methods' points whose ILD@10 gain on all 5 windows reaches ``target``,
    the one that keeps the most strength DCG (both label-free); None if none reaches it."""
    enough = [r for r in rows if r["method"] in SERVABLE and r["all"][1] >= target]
    return max(enough, key=lambda r: r["strength"]) if enough else None


def grid() -> list[tuple[str, str, int, Rerank]]:
    """(method, parameters, pool, re-ranker) of every point tried."""
    out: list[tuple[str, str, int, Rerank]] = []
    for pool in (20, 30, 50, 100):
        for keep in (1, 2):
            tag = "" if keep == 1 else "-keep2"
            for lam in (0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4):
                out.append((f"mmr-max{tag}", f"lam {lam:g}", pool, mmr(lam, "max", keep)))
            for lam in (0.94, 0.92, 0.9, 0.88, 0.86, 0.84, 0.8, 0.75, 0.7):
                out.append((f"mmr-sum{tag}", f"lam {lam:g}", pool, mmr(lam, "sum", keep)))
            for lam in (0.7, 0.6, 0.55, 0.5, 0.45, 0.4):
                out.append((f"mmr-mean{tag}", f"lam {lam:g}", pool, mmr(lam, "mean", keep)))
        for beta in (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25):
            out.append(("mmr-sum-unscaled", f"beta {beta:g}", pool, mmr_unscaled(beta)))
            out.append(("mmr-sum-unscaled-discounted", f"beta {beta:g}", pool, mmr_unscaled(beta, discount=True)))
        for alpha in (1, 2, 3, 5, 8):
            for beta in (0.001, 0.1):
                out.append(("dpp", f"alpha {alpha:g}, beta {beta:g}", pool, dpp(alpha, beta)))
    return out


def frontier(dump: dict) -> list[dict]:
    """Every grid point's NDCG@10 / ILD@10 change (%) vs the ranker's order, per window set."""
    windows = dump["windows"]
    base = [per_pair(w, w["ranked"][:, :10]) for w in windows]
    base_strength = np.concatenate([strength_dcg(w, w["ranked"][:, :10]) for w in windows]).mean()

    def change(res: list, idx: tuple[int, ...]) -> tuple[float, float]:
        cat = [np.concatenate([r[i][m] for i in idx]) for r in (res, base) for m in (0, 1)]
        return 100 * (cat[0].mean() / cat[2].mean() - 1), 100 * (cat[1].mean() / cat[3].mean() - 1)

    rows = []
    for method, params, pool, fn in grid():
        lists = [rerank_window(w, fn, pool) for w in windows]
        res = [per_pair(w, x) for w, x in zip(windows, lists)]
        strength = np.concatenate([strength_dcg(w, x) for w, x in zip(windows, lists)]).mean()
        nd = np.concatenate([r[0] for r in res]) - np.concatenate([b[0] for b in base])
        ci = ev.bootstrap_diff(nd)
        scale = 100 / np.concatenate([b[0] for b in base]).mean()
        rows.append(
            {
                "method": method,
                "params": params,
                "pool": pool,
                "all": change(res, tuple(range(len(windows)))),
                "tune": change(res, TUNE),
                "held": change(res, HELD),
                "ndcg_ci": (ci["ci95_low"] * scale, ci["ci95_high"] * scale),
                "strength": 100 * (strength / base_strength - 1),
            }
        )
    return rows


def pareto(rows: list[dict], key: str) -> list[dict]:
    """Points no other point beats on both NDCG@10 change and ILD@10 change on ``key``."""
    out, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (-r[key][0], -r[key][1])):
        if r[key][1] > best:
            best = r[key][1]
            out.append(r)
    return out


def table(rows: list[dict], chosen: dict) -> str:
    """Markdown: the frontier on windows 1-3 (where the point is chosen), each on all 5 and 4-5."""
    head = (
        "| method | parameters | pool | NDCG@10 (1-3) | ILD@10 (1-3) | NDCG@10 (all 5) | 95 % CI | ILD@10 (all 5) "
        "| NDCG@10 (4-5) | ILD@10 (4-5) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in pareto(rows, "tune"):
        if r["tune"][0] < -12:
            break
        mark = "**" if r is chosen else ""
        lines.append(
            f"| {mark}{r['method']}{mark} | {r['params']} | {r['pool']} | {r['tune'][0]:+.1f} % | {r['tune'][1]:+.1f} % "
            f"| {r['all'][0]:+.1f} % | {r['ndcg_ci'][0]:+.1f}..{r['ndcg_ci'][1]:+.1f} | {r['all'][1]:+.1f} % "
            f"| {r['held'][0]:+.1f} % | {r['held'][1]:+.1f} % |"
        )
    return head + "\n".join(lines) + "\n"


def families(rows: list[dict], served: tuple[str, str, int]) -> str:
    """Markdown: per method, its best points on all 5 windows (in-sample: read off the test
    windows, to compare the methods' frontiers, not to choose), and the served point."""
    out = "| method | most ILD@10 for <= 3 % NDCG@10 loss (all 5) | least NDCG@10 loss for >= +20 % ILD@10 (all 5) |\n|---|---|---|\n"

    def fmt(r: dict | None) -> str:
        return f"{r['params']}, pool {r['pool']}: {r['all'][0]:+.1f} % / {r['all'][1]:+.1f} %" if r else "none in the grid"

    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        within = [r for r in mine if r["all"][0] >= -MAX_LOSS]
        enough = [r for r in mine if r["all"][1] >= 20.0]
        out += (
            f"| {method} | {fmt(max(within, key=lambda r: r['all'][1]) if within else None)} "
            f"| {fmt(max(enough, key=lambda r: r['all'][0]) if enough else None)} |\n"
        )
    for r in rows:
        if (r["method"], r["params"], r["pool"]) == served:
            out += (
                f"\nserved ({r['method']} {r['params']}, pool {r['pool']}): all 5 windows NDCG@10 {r['all'][0]:+.2f} % "
                f"[{r['ndcg_ci'][0]:+.1f}..{r['ndcg_ci'][1]:+.1f}], ILD@10 {r['all'][1]:+.2f} %; windows 1-3 "
                f"{r['tune'][0]:+.2f} % / {r['tune'][1]:+.2f} %; windows 4-5 {r['held'][0]:+.2f} % / {r['held'][1]:+.2f} %\n"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml-100k", required=True, help="MovieLens 100K CSV folder")
    parser.add_argument("--dump", default="/tmp/rerank_inputs.pkl", help="re-ranker inputs (reused when present)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    path = Path(args.dump)
    dump = pickle.loads(path.read_bytes()) if path.exists() else dump_inputs(args.ml_100k, path)
    check_reproduces(dump)
    print(f"dump reproduces the report's mmr_sweep ({len(dump['sweep'])} lambdas, penalty {dump['settings'].mmr_penalty})")
    rows = frontier(dump)
    ok = [r for r in rows if r["tune"][0] >= -MAX_LOSS]
    # the served code is mmr_rerank: any penalty, first position kept (keep2 / dpp are not served)
    chosen = max((r for r in ok if r["method"] in SERVABLE), key=lambda r: r["tune"][1])
    best = max(ok, key=lambda r: r["tune"][1])
    text = table(rows, chosen)
    for what, r in (("served family (mmr_rerank)", chosen), ("any method", best)):
        text += (
            f"\nchosen on windows 1-3 among {what} (most ILD@10 for <= {MAX_LOSS:g} % NDCG@10 loss): {r['method']} "
            f"{r['params']} pool {r['pool']}: all 5 windows NDCG@10 {r['all'][0]:+.2f} %, ILD@10 {r['all'][1]:+.2f} %; "
            f"windows 4-5 NDCG@10 {r['held'][0]:+.2f} %, ILD@10 {r['held'][1]:+.2f} %\n"
        )
    free = label_free_choice(rows)
    text += f"\nchosen without labels (ILD@10 >= +{ILD_TARGET:g} % on all 5, most strength DCG@10 kept): " + (
        f"{free['method']} {free['params']} pool {free['pool']}: strength DCG {free['strength']:+.2f} %; all 5 windows "
        f"NDCG@10 {free['all'][0]:+.2f} % [{free['ndcg_ci'][0]:+.1f}..{free['ndcg_ci'][1]:+.1f}], ILD@10 {free['all'][1]:+.2f} %; "
        f"windows 1-3 {free['tune'][0]:+.2f} % / {free['tune'][1]:+.2f} %; windows 4-5 {free['held'][0]:+.2f} % / {free['held'][1]:+.2f} %\n"
        if free
        else "no served point reaches it\n"
    )
    st = dump["settings"]
    text += "\n" + families(rows, (f"mmr-{st.mmr_penalty}", f"lam {st.mmr_lambda:g}", st.mmr_pool))
    for name in ("mmr-max",):
        for r in rows:
            if r["method"] == name and r["pool"] == 50 and r["params"] in ("lam 0.7", "lam 0.4"):
                text += f"reference {name} {r['params']} pool 50: all {r['all'][0]:+.2f} % / {r['all'][1]:+.2f} %, 1-3 {r['tune'][0]:+.2f} % / {r['tune'][1]:+.2f} %, 4-5 {r['held'][0]:+.2f} % / {r['held'][1]:+.2f} %\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
