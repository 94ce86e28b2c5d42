"""``recsys evaluate``: every model on the same split, through the same harness, in one run.

Protocol (also written into the report):

* Global time split (:mod:`export.split`); relevance = rating >= 4 in the test period.
* Test users = users with at least one relevant test item and some history before the test
  period (a personal model has nothing to read otherwise; cold users are served by the
  popularity fallback in production).
* Full ranking over all items; everything the user interacted with before the test period
  is excluded from the ranking.
* Baseline hyper-parameters are tuned on validation (fit on train, NDCG@10 on validation
  users), then every model is refit on train+val with the chosen hyper-parameters and
  evaluated on test. The two-tower is tuned (early-stopped) the same way.
* Diversity (ILD) is measured on genre vectors, so it is comparable across models;
  novelty uses popularity before the test period.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from export import baselines
from export.data import MovieLens
from export.history import Histories
from export.ranking_metrics import evaluate_rankings, ndcg_at_k
from export.pipeline import Fitted, Period, TrainSettings, retrieve, run, users_with_history
from export.ranker import candidate_features, rerank
from export.retrieval import top_k_scores
from export.split import relevant_items
from orchestrator.mmr import blend_vectors, mmr_rerank

MODEL_NAMES = ("popularity", "item_knn", "ease", "als", "two_tower", "two_tower_ranker", "two_tower_ranker_mmr")
"""Every model in the report, in this order."""

KS = (10, 20, 100)
MAIN_METRICS = ("ndcg@10", "recall@20", "recall@100", "map@10", "coverage@10", "ild@10")


@dataclass(frozen=True)
class EvalSettings:
    """Settings of an evaluation run.

    Attributes:
        train: Model training settings.
        mmr_lambda: MMR trade-off (1 = pure relevance, 0 = pure diversity).
        mmr_pool: Candidates (best by ranker score) that MMR chooses from.
        mmr_genre_weight: Share of genre cosine (vs two-tower embedding cosine) in MMR's
            item similarity (:func:`orchestrator.mmr.blend_vectors`).
        mmr_sweep: Extra lambdas reported as a diversity/accuracy curve.
        baselines: Baselines to run (names from :data:`export.baselines.GRIDS`).
    """

    train: TrainSettings = field(default_factory=TrainSettings)
    mmr_lambda: float = 0.4
    mmr_pool: int = 50
    mmr_genre_weight: float = 0.8
    mmr_sweep: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    baselines: tuple[str, ...] = ("popularity", "item_knn", "ease", "als")


def interaction_matrix(histories: Histories, user_ids: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Binary users x items matrix of ``histories`` with rows ordered as ``user_ids``."""
    pos = histories.positions(user_ids)
    rows, cols = [], []
    for r, p in enumerate(pos):
        if p >= 0:
            seg = histories.items[histories.offsets[p] : histories.offsets[p + 1]]
            rows.append(np.full(len(seg), r))
            cols.append(seg)
    rows_a = np.concatenate(rows) if rows else np.empty(0, np.int64)
    cols_a = np.concatenate(cols) if cols else np.empty(0, np.int64)
    m = sp.csr_matrix((np.ones(len(rows_a), np.float32), (rows_a, cols_a)), shape=(len(user_ids), n_items))
    m.data[:] = 1.0  # duplicates (re-ratings) count once
    return m


def rank_with(model, matrix: sp.csr_matrix, rows: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Top-``k`` items of a fitted baseline for matrix rows, seen items excluded."""
    out = []
    for s in range(0, len(rows), 2048):
        scores = model.score(rows[s : s + 2048]).astype(np.float32)
        items, _ = top_k_scores(scores, k, seen[s : s + 2048])
        out.append(items)
    return np.concatenate(out)


def tune_baseline(name: str, fitted: Fitted, progress: bool) -> tuple[dict, list[dict]]:
    """Grid search of a baseline on validation: fit on train, NDCG@10 on validation users."""
    period = fitted.val_period
    rel = relevant_items(fitted.split.val, fitted.catalog.index_of())
    users = users_with_history(rel, period)
    all_users = period.histories.user_ids
    matrix = interaction_matrix(period.histories, all_users, fitted.catalog.n_items)
    rows = period.histories.positions(users)
    seen = period.histories.seen(users)
    trials = []
    for params in tqdm(baselines.GRIDS[name], desc=f"tune {name}", disable=not progress, leave=False):
        model = baselines.make(name, **params).fit(matrix)
        ranked = rank_with(model, matrix, rows, seen, 10)
        score = float(np.mean([ndcg_at_k(r, rel[u], 10) for u, r in zip(users, ranked)]))
        trials.append({"params": params, "val_ndcg@10": score})
    best = max(trials, key=lambda t: t["val_ndcg@10"])
    return best["params"], trials


@dataclass
class TestRankings:
    """Top-100 lists of every model for the test users."""

    users: np.ndarray
    relevant: list[np.ndarray]
    lists: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]


def our_rankings(fitted: Fitted, users: np.ndarray, settings: EvalSettings) -> dict[str, np.ndarray]:
    """two_tower, two_tower_ranker, two_tower_ranker_mmr (and the MMR sweep) for test users."""
    period: Period = fitted.test_period
    model = fitted.two_tower.model
    n_cand = max(settings.train.ranker.candidates, max(KS))
    cand, cand_scores, hist, hist_r = retrieve(model, period, fitted.demographics, users, n_cand)
    out = {"two_tower": cand[:, : max(KS)]}
    features = fitted.ranker_features(period, model)
    feats = candidate_features(features, hist, hist_r, cand, cand_scores)
    ranked, scores = rerank(fitted.ranker, feats, cand)
    out["two_tower_ranker"] = ranked[:, : max(KS)]
    vectors = blend_vectors(
        [features.vectors.numpy(), fitted.catalog.genre_matrix], [1.0 - settings.mmr_genre_weight, settings.mmr_genre_weight]
    )
    for lam in sorted(set(settings.mmr_sweep) | {settings.mmr_lambda}, reverse=True):
        out[f"mmr@{lam:g}"] = mmr_lists(ranked, scores, vectors, lam, settings.mmr_pool, max(KS))
    out["two_tower_ranker_mmr"] = out[f"mmr@{settings.mmr_lambda:g}"]
    return out


def mmr_lists(ranked: np.ndarray, scores: np.ndarray, vectors: np.ndarray, lam: float, pool: int, k: int) -> np.ndarray:
    """MMR over the ``pool`` best ranker candidates; the rest of the list keeps ranker order."""
    out = np.full((len(ranked), k), -1, dtype=np.int64)
    for row, (items, sc) in enumerate(zip(ranked, scores)):
        valid = items >= 0
        items, sc = items[valid], sc[valid]
        head = min(pool, len(items))
        picked = mmr_rerank(sc[:head], vectors[items[:head]], k=head, lam=lam)
        merged = np.concatenate([items[:head][picked], items[head:]])[:k]
        out[row, : len(merged)] = merged
    return out


def evaluate(
    data_dir: str | Path,
    out_path: str | Path,
    settings: EvalSettings | None = None,
    artifacts_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Trains what it needs, evaluates every model on the test period, writes JSON (+ PNG).

    Args:
        data_dir: MovieLens CSV folder.
        out_path: Report JSON path; the bar chart goes beside it with a ``.png`` suffix.
        settings: Evaluation settings.
        artifacts_dir: When given, the trained two-tower + ranker are also published there
            (as ``recsys train`` would).
        progress: Show progress bars.

    Returns:
        The report dict.
    """
    settings = settings or EvalSettings()
    started = time.perf_counter()
    reports: list[dict] = []

    def inspect(ml: MovieLens, fitted: Fitted) -> None:
        reports.append(evaluate_fitted(ml, fitted, data_dir, out_path, settings, started, progress))

    run(data_dir, artifacts_dir, None, settings.train, progress, inspect)  # the artifacts are saved after evaluating
    return reports[0]


def evaluate_fitted(
    ml: MovieLens, fitted: Fitted, data_dir: str | Path, out_path: str | Path, settings: EvalSettings, started: float, progress: bool
) -> dict:
    """Evaluates the fitted models of :func:`export.pipeline.run` on the test period; writes JSON (+ PNG)."""
    catalog, split, period = fitted.catalog, fitted.split, fitted.test_period

    rel_test = relevant_items(split.test, catalog.index_of())
    users = users_with_history(rel_test, period)
    if len(users) == 0:
        raise ValueError("no test user has both history and a relevant item: data set too small for this split")
    relevant = [rel_test[u] for u in users]
    seen = period.histories.seen(users)

    lists: dict[str, np.ndarray] = {}
    tuning: dict[str, dict] = {}
    all_users = period.histories.user_ids
    matrix = interaction_matrix(period.histories, all_users, catalog.n_items)
    rows = period.histories.positions(users)
    for name in settings.baselines:
        t0 = time.perf_counter()
        params, trials = tune_baseline(name, fitted, progress)
        model = baselines.make(name, **params).fit(matrix)
        lists[name] = rank_with(model, matrix, rows, seen, max(KS))
        tuning[name] = {"chosen": params, "trials": trials, "seconds": round(time.perf_counter() - t0, 2)}
    ours = our_rankings(fitted, users, settings)

    def metrics(ranked: np.ndarray) -> dict[str, float]:
        return evaluate_rankings(
            ranked,
            relevant,
            n_items=catalog.n_items,
            ks=KS,
            item_vectors=catalog.genre_matrix,
            item_popularity=period.stats.count,
        )

    report_models = {name: metrics(lists[name]) for name in settings.baselines}
    for name in ("two_tower", "two_tower_ranker", "two_tower_ranker_mmr"):
        report_models[name] = metrics(ours[name])
    sweep = {k.split("@", 1)[1]: metrics(v) for k, v in ours.items() if k.startswith("mmr@")}
    report = {
        "protocol": {
            **split.protocol(),
            "test_users": int(len(users)),
            "items": int(catalog.n_items),
            "ranking": "full ranking over all items; items seen before the test period excluded",
            "test_user_rule": "users with >= 1 relevant test item and >= 1 interaction before the test period",
            "tuning": "baselines tuned on validation NDCG@10 (fit on train), then refit on train+val",
            "diversity": "ILD on genre multi-hot vectors (1 - cosine); novelty = mean -log2 popularity share",
            "mmr": {"lambda": settings.mmr_lambda, "pool": settings.mmr_pool, "genre_weight": settings.mmr_genre_weight},
            "data": str(data_dir),
            "report": {"rows_read": ml.report.rows_read, "dropped": ml.report.dropped},
        },
        "models": report_models,
        "mmr_sweep": sweep,
        "tuning": tuning,
        "two_tower": {
            "best_epoch": fitted.two_tower_val.best_epoch,
            "training_log": fitted.two_tower_val.history,
        },
        "targets": targets(report_models),
        "significance": {
            f"two_tower_ranker - {name} ndcg@10": paired_bootstrap(ours["two_tower_ranker"], lists[name], relevant)
            for name in settings.baselines
        },
        "seconds": {**{k: round(v, 2) for k, v in fitted.seconds.items()}, "total": round(time.perf_counter() - started, 2)},
        "settings": asdict(settings),
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot_report(report, out.with_suffix(".png"))
    return report


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, relevant: list[np.ndarray], k: int = 10, samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap over test users of NDCG@k(a) - NDCG@k(b).

    Resamples users with replacement ``samples`` times and reports the mean difference and the
    2.5/97.5 percentiles: with a few dozen test users (MovieLens 100K) a gap of a few percent
    can be noise, and the interval says so.
    """
    per_a = np.array([ndcg_at_k(r, rel, k) for r, rel in zip(a, relevant)])
    per_b = np.array([ndcg_at_k(r, rel, k) for r, rel in zip(b, relevant)])
    diff = per_a - per_b
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean_diff": float(diff.mean()), "ci95_low": float(lo), "ci95_high": float(hi), "users": int(len(diff))}


def targets(models: dict[str, dict[str, float]]) -> dict:
    """The issue's targets, computed (not asserted): ratios and whether each is met."""
    ranker = models["two_tower_ranker"]
    mmr = models["two_tower_ranker_mmr"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    out = {
        "ranker_vs_ease_ndcg@10": ratio(ranker["ndcg@10"], models["ease"]["ndcg@10"]) if "ease" in models else None,
        "ranker_vs_als_ndcg@10": ratio(ranker["ndcg@10"], models["als"]["ndcg@10"]) if "als" in models else None,
        "mmr_ild@10_gain": ratio(mmr["ild@10"], ranker["ild@10"]),
        "mmr_ndcg@10_ratio": ratio(mmr["ndcg@10"], ranker["ndcg@10"]),
    }
    out["met"] = {
        "ranker >= 1.05 x ease": out["ranker_vs_ease_ndcg@10"] is not None and out["ranker_vs_ease_ndcg@10"] >= 1.05,
        "ranker >= 1.15 x als": out["ranker_vs_als_ndcg@10"] is not None and out["ranker_vs_als_ndcg@10"] >= 1.15,
        "mmr ild +20%": out["mmr_ild@10_gain"] is not None and out["mmr_ild@10_gain"] >= 1.2,
        "mmr ndcg loss <= 3%": out["mmr_ndcg@10_ratio"] is not None and out["mmr_ndcg@10_ratio"] >= 0.97,
    }
    return out


def plot_report(report: dict, path: str | Path) -> None:
    """Bar chart of the main metrics per model, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = ["#9e9e9e" if m in ("popularity", "item_knn", "ease", "als") else "#1f77b4" for m in models]
    for ax, metric in zip(axes.ravel(), MAIN_METRICS):
        values = [report["models"][m].get(metric, 0.0) for m in models]
        bars = ax.bar(range(len(models)), values, color=colors)
        ax.set_title(metric)
        ax.set_xticks(range(len(models)), models, rotation=35, ha="right", fontsize=8)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    proto = report["protocol"]
    fig.suptitle(
        f"{proto['data']}: {proto['test_users']} test users, {proto['items']} items, test from {proto['test_starts'][:10]} "
        "(grey = baselines, blue = ours)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_table(report: dict, metrics: tuple[str, ...] = ("ndcg@10", "recall@20", "recall@100", "map@10", "mrr", "coverage@10", "ild@10", "novelty@10")) -> str:
    """A fixed-width text table of the report's models x metrics."""
    head = f"{'model':<22}" + "".join(f"{m:>12}" for m in metrics)
    lines = [head, "-" * len(head)]
    for name, vals in report["models"].items():
        lines.append(f"{name:<22}" + "".join(f"{vals.get(m, float('nan')):>12.4f}" for m in metrics))
    return "\n".join(lines)
