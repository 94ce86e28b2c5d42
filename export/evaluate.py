"""``recsys evaluate``: every model on the same splits, through the same harness, in one run.

Protocol (also written into the report):

* Rolling-origin time split (:func:`export.split.rolling_splits`): ``windows`` consecutive
  test periods (10 % of the interactions each by default); window k validates on the slice
  before its test period and trains on everything earlier. Nothing at or after a window's
  test period reaches that window's training, tuning or features. ``windows=1`` is the
  single global time split. Relevance = rating >= 4 in the test period.
* Test users = users with at least one relevant test item and some history before the test
  period (a personal model has nothing to read otherwise; cold users are served by the
  popularity fallback in production).
* Full ranking over all items; everything the user interacted with before the test period
  is excluded from the ranking.
* Per window, baseline hyper-parameters are tuned on validation (fit on train, NDCG@10 on
  validation users), then every model is refit on train+val with the chosen
  hyper-parameters and evaluated on test. The two-tower is tuned (early-stopped) the same
  way, and the ranker is trained on the validation period.
* Pooled metrics are means over all (user, window) pairs (a user active in two test windows
  counts twice); coverage, a catalogue-level measure, is the mean over windows. Intervals are
  a paired bootstrap over the same (user, window) pairs.
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
from export.pipeline import Fitted, Period, TrainSettings, merged_candidates, run, users_with_history
from export.ranker import candidate_features, rerank
from export.ranking_metrics import evaluate_rankings, ndcg_at_k
from export.retrieval import top_k, top_k_scores
from export.split import relevant_items
from orchestrator.candidates import SOURCES
from orchestrator.mmr import blend_vectors, mmr_rerank
from orchestrator.settings import ServeSettings

MODEL_NAMES = ("popularity", "item_knn", "ease", "als", "two_tower", "two_tower_ranker", "two_tower_ranker_mmr")
"""Every model in the report, in this order."""

KS = (10, 20, 100, 200)
MAIN_METRICS = ("ndcg@10", "recall@20", "recall@100", "recall@200", "coverage@10", "ild@10")
CANDIDATE_K = 200
"""Cut-off of the candidate-set recall in the report (``candidates.recall@200``)."""


@dataclass(frozen=True)
class EvalSettings:
    """Settings of an evaluation run.

    Attributes:
        train: Model training settings (its ``test_fraction`` is each window's share).
        windows: Rolling-origin test windows (1 = the single global time split).
        mmr_lambda: MMR trade-off (1 = pure relevance, 0 = pure diversity).
        mmr_pool: Candidates (best by ranker score) that MMR chooses from.
        mmr_penalty: MMR's similarity penalty (:data:`orchestrator.mmr.PENALTIES`).
        mmr_genre_weight: Share of genre cosine (vs two-tower embedding cosine) in MMR's
            item similarity (:func:`orchestrator.mmr.blend_vectors`).
        mmr_sweep: Extra lambdas reported as a diversity/accuracy curve.
        baselines: Baselines to run (names from :data:`export.baselines.GRIDS`).
        bootstrap_samples: Resamples of the paired bootstrap.
    """

    train: TrainSettings = field(default_factory=TrainSettings)
    windows: int = 1
    # the served defaults (one home: orchestrator/settings.py)
    mmr_lambda: float = ServeSettings.mmr_lambda
    mmr_pool: int = ServeSettings.mmr_pool
    mmr_penalty: str = ServeSettings.mmr_penalty
    mmr_genre_weight: float = ServeSettings.mmr_genre_weight
    mmr_sweep: tuple[float, ...] = (1.0, 0.95, 0.92, 0.9, 0.88, 0.86, 0.84, 0.8, 0.7)
    baselines: tuple[str, ...] = ("popularity", "item_knn", "ease", "als")
    bootstrap_samples: int = 2000


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


def _pad(lists: np.ndarray, width: int) -> np.ndarray:
    """Right-pads ranked lists with ``-1`` to ``width`` columns (a catalogue smaller than
    ``max(KS)``, or a ranker given fewer candidates, returns shorter lists; the missing
    slots count as misses)."""
    if lists.shape[1] >= width:
        return lists[:, :width]
    out = np.full((lists.shape[0], width), -1, dtype=np.int64)
    out[:, : lists.shape[1]] = lists
    return out


def our_rankings(fitted: Fitted, users: np.ndarray, settings: EvalSettings) -> dict[str, np.ndarray]:
    """two_tower, two_tower_ranker, two_tower_ranker_mmr (and the MMR sweep) for test users.

    Also returns ``"candidates"``: the candidate set the ranker receives (its width is the
    ranker's ``candidates`` setting), whose recall caps what the ranker can reach.
    """
    period: Period = fitted.test_period
    model = fitted.two_tower.model
    n_ranker = settings.train.ranker.candidates
    width = max(KS)
    # the ranker sees exactly what it sees when served: the merged set of `candidates` items
    c = merged_candidates(model, period, fitted.demographics, fitted.tables, users, n_ranker)
    ann, _ = top_k(c.user_vectors, c.item_vectors, width, period.histories.seen(users))
    out = {"two_tower": _pad(ann, width), "candidates": c.items}
    out.update({f"source:{name}": _pad_lists([lists[s] for lists in c.lists], n_ranker) for s, name in enumerate(SOURCES)})
    features = fitted.ranker_features(period, model)
    feats = candidate_features(features, c.history, c.history_rating, c.items, c.scores, c.sources)
    ranked, scores = rerank(fitted.ranker, feats, c.items)
    out["two_tower_ranker"] = _pad(ranked, width)
    vectors = blend_vectors(
        [features.vectors.numpy(), fitted.catalog.genre_matrix], [1.0 - settings.mmr_genre_weight, settings.mmr_genre_weight]
    )
    for lam in sorted(set(settings.mmr_sweep) | {settings.mmr_lambda}, reverse=True):
        out[f"mmr@{lam:g}"] = mmr_lists(ranked, scores, vectors, lam, settings.mmr_pool, width, settings.mmr_penalty)
    out["two_tower_ranker_mmr"] = out[f"mmr@{settings.mmr_lambda:g}"]
    return out


def _pad_lists(rows: list[np.ndarray], n: int) -> np.ndarray:
    """int64 [len(rows), n]: each row's first ``n`` items, -1 padded."""
    out = np.full((len(rows), n), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : min(n, len(r))] = r[:n]
    return out


def mmr_lists(
    ranked: np.ndarray, scores: np.ndarray, vectors: np.ndarray, lam: float, pool: int, k: int, penalty: str = "max"
) -> np.ndarray:
    """MMR over the ``pool`` best ranker candidates; the rest of the list keeps ranker order."""
    out = np.full((len(ranked), k), -1, dtype=np.int64)
    for row, (items, sc) in enumerate(zip(ranked, scores)):
        valid = items >= 0
        items, sc = items[valid], sc[valid]
        head = min(pool, len(items))
        picked = mmr_rerank(sc[:head], vectors[items[:head]], k=head, lam=lam, penalty=penalty)
        merged = np.concatenate([items[:head][picked], items[head:]])[:k]
        out[row, : len(merged)] = merged
    return out


def candidate_recall(candidates: np.ndarray, relevant: list[np.ndarray], k: int | None = None) -> np.ndarray:
    """Per-user share of the relevant items found in the first ``k`` candidates (all when None)."""
    top = candidates if k is None else candidates[:, :k]
    return np.array([np.isin(rel, row[row >= 0]).sum() / len(rel) for row, rel in zip(top, relevant)])


@dataclass
class WindowResult:
    """What one rolling-origin window contributes to the report.

    Attributes:
        entry: The window's JSON entry (``test_starts``, ``test_users``, ``models``, ...).
        ndcg: Per-user NDCG@10 of every model, aligned with the window's test users.
        sweep: MMR sweep metrics (lambda -> metrics).
        candidate_recall: Per-user recall@200 of the ranker's candidate set.
        users: The window's test users.
    """

    entry: dict
    ndcg: dict[str, np.ndarray]
    sweep: dict[str, dict[str, float]]
    candidate_recall: np.ndarray
    users: np.ndarray


def evaluate_window(fitted: Fitted, settings: EvalSettings, progress: bool) -> WindowResult:
    """Tunes and refits the baselines, ranks for the window's test users, measures every model.

    Args:
        fitted: The two-tower and ranker trained on this window's split.
        settings: Evaluation settings.
        progress: Show progress bars.

    Returns:
        The window's :class:`WindowResult`.

    Raises:
        ValueError: When the window has no test user.
    """
    t_start = time.perf_counter()
    catalog, split, period = fitted.catalog, fitted.split, fitted.test_period
    rel_test = relevant_items(split.test, catalog.index_of())
    users = users_with_history(rel_test, period)
    if len(users) == 0:
        raise ValueError(
            f"no test user from {split.protocol()['test_starts']} has both history and a relevant item: "
            "data set too small for this split (use fewer --windows)"
        )
    relevant = [rel_test[u] for u in users]
    seen = period.histories.seen(users)

    lists: dict[str, np.ndarray] = {}
    tuning: dict[str, dict] = {}
    matrix = interaction_matrix(period.histories, period.histories.user_ids, catalog.n_items)
    rows = period.histories.positions(users)
    for name in settings.baselines:
        t0 = time.perf_counter()
        params, trials = tune_baseline(name, fitted, progress)
        model = baselines.make(name, **params).fit(matrix)
        lists[name] = _pad(rank_with(model, matrix, rows, seen, max(KS)), max(KS))
        tuning[name] = {"chosen": params, "trials": trials, "seconds": round(time.perf_counter() - t0, 2)}
    ours = our_rankings(fitted, users, settings)
    for name in ("two_tower", "two_tower_ranker", "two_tower_ranker_mmr"):
        lists[name] = ours[name]

    def metrics(ranked: np.ndarray) -> dict[str, float]:
        return evaluate_rankings(
            ranked,
            relevant,
            n_items=catalog.n_items,
            ks=KS,
            item_vectors=catalog.genre_matrix,
            item_popularity=period.stats.count,
        )

    models = {name: metrics(lists[name]) for name in lists}
    sweep = {k.split("@", 1)[1]: metrics(v) for k, v in ours.items() if k.startswith("mmr@")}
    ndcg = {name: per_user_ndcg(lists[name], relevant) for name in lists}
    cand_recall = candidate_recall(ours["candidates"], relevant, CANDIDATE_K)
    proto = split.protocol()
    entry = {
        "test_starts": proto["test_starts"],
        "test_ends": proto["test_ends"],
        "test_users": int(len(users)),
        "models": models,
        "candidates": {
            "recall@200": float(cand_recall.mean()),
            "recall": float(candidate_recall(ours["candidates"], relevant).mean()),
            "size": int(ours["candidates"].shape[1]),
            "sources": list(SOURCES),
            "budgets": [round(float(b), 4) for b in fitted.tables.budgets],
            "source_recall@200": {name: float(candidate_recall(ours[f"source:{name}"], relevant, CANDIDATE_K).mean()) for name in SOURCES},
            "budget_search": fitted.budget_trials,
        },
        "significance": {
            f"two_tower_ranker - {name} ndcg@10": bootstrap_diff(ndcg["two_tower_ranker"] - ndcg[name], settings.bootstrap_samples)
            for name in lists
            if name != "two_tower_ranker"
        },
        "split": proto,
        "mmr_sweep": sweep,
        "tuning": tuning,
        "two_tower": {"best_epoch": fitted.two_tower_val.best_epoch, "training_log": fitted.two_tower_val.history},
        "seconds": {
            **{k: round(v, 2) for k, v in fitted.seconds.items()},
            "baselines_and_ranking": round(time.perf_counter() - t_start, 2),
        },
    }
    return WindowResult(entry, ndcg, sweep, cand_recall, users)


def per_user_ndcg(ranked: np.ndarray, relevant: list[np.ndarray], k: int = 10) -> np.ndarray:
    """NDCG@k of each user's list (the unit the bootstrap resamples)."""
    return np.array([ndcg_at_k(r, rel, k) for r, rel in zip(ranked, relevant)], dtype=np.float64)


def pool_metrics(per_window: list[dict[str, float]], users: list[int]) -> dict[str, float]:
    """Pools one model's window metrics over all (user, window) pairs.

    Every per-user metric is a mean over a window's users, so the mean over all pairs is the
    user-weighted mean of the window means. Coverage is a catalogue-level measure, not a
    per-user one: it is averaged over windows instead.
    """
    weights = np.asarray(users, dtype=np.float64)
    out = {}
    for key in per_window[0]:
        values = np.array([m[key] for m in per_window], dtype=np.float64)
        out[key] = float(values.mean() if key.startswith("coverage@") else (values * weights).sum() / weights.sum())
    return out


def evaluate(
    data_dir: str | Path,
    out_path: str | Path,
    settings: EvalSettings | None = None,
    artifacts_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Trains what it needs per window, evaluates every model, writes JSON (+ PNG charts).

    Args:
        data_dir: MovieLens CSV folder.
        out_path: Report JSON path; the pooled chart goes beside it with a ``.png`` suffix,
            and with several windows one chart per window as ``<stem>.window<k>.png``.
        settings: Evaluation settings (``settings.windows`` rolling-origin windows).
        artifacts_dir: When given, the models trained for the latest window (the same split
            as ``recsys train``) are also published there.
        progress: Show progress bars.

    Returns:
        The report dict.
    """
    settings = settings or EvalSettings()
    started = time.perf_counter()
    results: list[WindowResult] = []

    def inspect(ml: MovieLens, fitted: Fitted) -> None:  # keeps no reference: run frees each window's models
        results.append(evaluate_window(fitted, settings, progress))

    # the one offline composition: fit per window, evaluate each, save the latest window's models
    done = run(data_dir, artifacts_dir, None, settings.train, progress, inspect, windows=settings.windows)
    report = build_report(results, settings, done["ml"], done["fitted"], data_dir)
    report["seconds"] = {"total": round(time.perf_counter() - started, 2)}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot_report(report, out.with_suffix(".png"))
    if len(results) > 1:
        for k, window in enumerate(report["windows"]):
            plot_window(report, k, out.with_name(f"{out.stem}.window{k + 1}.png"))
    return report


def build_report(results: list[WindowResult], settings: EvalSettings, ml: MovieLens, fitted: Fitted, data_dir) -> dict:
    """The report dict: pooled models, significance and candidates, plus every window's entry."""
    users = [r.entry["test_users"] for r in results]
    names = list(results[0].entry["models"])
    models = {name: pool_metrics([r.entry["models"][name] for r in results], users) for name in names}
    sweep = {lam: pool_metrics([r.sweep[lam] for r in results], users) for lam in results[0].sweep}
    ndcg = {name: np.concatenate([r.ndcg[name] for r in results]) for name in names}
    cand = np.concatenate([r.candidate_recall for r in results])
    windows = [r.entry for r in results]
    protocol = {
        "split": "global time split" if len(results) == 1 else f"rolling-origin time split, {len(results)} windows",
        "windows": len(results),
        "window_fraction": settings.train.test_fraction,
        "val_fraction": settings.train.val_fraction,
        "val_starts": windows[0]["split"]["val_starts"],
        "test_starts": windows[0]["test_starts"],
        "test_ends": windows[-1]["test_ends"],
        "test_users": int(sum(users)),
        "distinct_test_users": int(len(set().union(*(set(r.users.tolist()) for r in results)))),
        "items": int(fitted.catalog.n_items),
        "relevance": windows[0]["split"]["relevance"],
        "ranking": "full ranking over all items; items seen before the test period excluded",
        "test_user_rule": "users with >= 1 relevant test item and >= 1 interaction before the test period",
        "tuning": "per window: baselines tuned on validation NDCG@10 (fit on train), then refit on train+val; "
        "two-tower early-stopped on validation, refit on train+val; ranker trained on validation",
        "leakage": "a window's models, tuning and features read only interactions before its test period",
        "pooling": "per-user metrics averaged over all (user, window) pairs; coverage averaged over windows",
        "bootstrap": f"paired, {settings.bootstrap_samples} resamples of the (user, window) pairs, 2.5/97.5 percentiles",
        "diversity": "ILD on genre multi-hot vectors (1 - cosine); novelty = mean -log2 popularity share",
        "mmr": {
            "lambda": settings.mmr_lambda,
            "pool": settings.mmr_pool,
            "penalty": settings.mmr_penalty,
            "genre_weight": settings.mmr_genre_weight,
        },
        "data": str(data_dir),
        "report": {"rows_read": ml.report.rows_read, "dropped": ml.report.dropped},
    }
    if len(results) == 1:
        protocol.update({key: windows[0]["split"][key] for key in ("train", "val", "test")})
    return {
        "protocol": protocol,
        "models": models,
        "significance": {
            f"two_tower_ranker - {name} ndcg@10": bootstrap_diff(ndcg["two_tower_ranker"] - ndcg[name], settings.bootstrap_samples)
            for name in names
            if name != "two_tower_ranker"
        },
        "candidates": {
            "recall@200": float(cand.mean()),
            "recall": pool_metrics([{"recall": w["candidates"]["recall"]} for w in windows], users)["recall"],
            "size": int(windows[-1]["candidates"]["size"]),
        },
        "targets": targets(models, windows, settings.baselines),
        "mmr_sweep": sweep,
        "windows": windows,
        "settings": asdict(settings),
    }


def bootstrap_diff(diff: np.ndarray, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of a mean per-unit difference (a unit = one (user, window) pair).

    Resamples the units with replacement ``samples`` times and reports the mean difference and
    the 2.5/97.5 percentiles: with a few dozen test users (one window of MovieLens 100K) a gap
    of a few percent can be noise, and the interval says so.
    """
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean_diff": float(diff.mean()), "ci95_low": float(lo), "ci95_high": float(hi), "users": int(len(diff))}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, relevant: list[np.ndarray], k: int = 10, samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap over test users of NDCG@k(a) - NDCG@k(b) (see :func:`bootstrap_diff`)."""
    return bootstrap_diff(per_user_ndcg(a, relevant, k) - per_user_ndcg(b, relevant, k), samples, seed)


def targets(models: dict[str, dict[str, float]], windows: list[dict], baseline_names: tuple[str, ...]) -> dict:
    """The issues' targets, computed on the pooled metrics (not asserted): ratios and whether each is met."""
    ranker = models["two_tower_ranker"]
    mmr = models["two_tower_ranker_mmr"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    best = max(baseline_names, key=lambda b: models[b]["ndcg@10"]) if baseline_names else None
    best_recall = max((models[b]["recall@200"] for b in baseline_names), default=None)
    per_window = (
        [ratio(w["models"]["two_tower_ranker"]["ndcg@10"], max(w["models"][b]["ndcg@10"] for b in baseline_names)) for w in windows]
        if baseline_names
        else []
    )
    out = {
        "ranker_vs_ease_ndcg@10": ratio(ranker["ndcg@10"], models["ease"]["ndcg@10"]) if "ease" in models else None,
        "ranker_vs_als_ndcg@10": ratio(ranker["ndcg@10"], models["als"]["ndcg@10"]) if "als" in models else None,
        "best_baseline": best,
        "ranker_vs_best_baseline_ndcg@10": ratio(ranker["ndcg@10"], models[best]["ndcg@10"]) if best else None,
        "ranker_vs_best_baseline_ndcg@10_per_window": per_window,
        "best_baseline_recall@200": best_recall,
        "mmr_ild@10_gain": ratio(mmr["ild@10"], ranker["ild@10"]),
        "mmr_ndcg@10_ratio": ratio(mmr["ndcg@10"], ranker["ndcg@10"]),
    }
    out["met"] = {
        "ranker >= 1.05 x ease": out["ranker_vs_ease_ndcg@10"] is not None and out["ranker_vs_ease_ndcg@10"] >= 1.05,
        "ranker >= 1.15 x als": out["ranker_vs_als_ndcg@10"] is not None and out["ranker_vs_als_ndcg@10"] >= 1.15,
        "ranker >= 1.05 x best baseline": out["ranker_vs_best_baseline_ndcg@10"] is not None
        and out["ranker_vs_best_baseline_ndcg@10"] >= 1.05,
        "mmr ild +20%": out["mmr_ild@10_gain"] is not None and out["mmr_ild@10_gain"] >= 1.2,
        "mmr ndcg loss <= 3%": out["mmr_ndcg@10_ratio"] is not None and out["mmr_ndcg@10_ratio"] >= 0.97,
    }
    return out


def _bars(ax, models: dict[str, dict[str, float]], metric: str, reference: float | None = None) -> None:
    """One panel: ``metric`` per model (grey = baselines, blue = ours); ``reference`` is drawn
    as a dashed line (the candidate-set recall on the recall@200 panel)."""
    names = list(models)
    values = [models[m].get(metric, 0.0) for m in names]
    colors = ["#9e9e9e" if m in baselines.GRIDS else "#1f77b4" for m in names]
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.set_title(metric)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="#d62728", linestyle="--", linewidth=1, label=f"ranker's candidates {reference:.3f}")
        ax.legend(loc="lower left", fontsize=7)


def plot_report(report: dict, path: str | Path) -> None:
    """Pooled chart: the main metrics per model, NDCG@10 per window, and the paired-bootstrap
    intervals of two_tower_ranker minus each other model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    flat = axes.ravel()
    for ax, metric in zip(flat, MAIN_METRICS):
        _bars(ax, report["models"], metric, report["candidates"]["recall@200"] if metric == "recall@200" else None)
    ax = flat[6]
    windows = report["windows"]
    x = np.arange(1, len(windows) + 1)
    for name in report["models"]:
        style = "--" if name in baselines.GRIDS else "-"
        ax.plot(x, [w["models"][name]["ndcg@10"] for w in windows], style, marker="o", label=name)
    ax.set_xticks(x, [f"{k}\n{w['test_starts'][:10]}\n{w['test_users']} u" for k, w in zip(x, windows)], fontsize=7)
    ax.set_title("ndcg@10 per window (test start, users)")
    ax.legend(fontsize=6)
    ax = flat[7]
    sig = report["significance"]
    labels = [key.split(" - ", 1)[1].removesuffix(" ndcg@10") for key in sig]
    means = np.array([v["mean_diff"] for v in sig.values()])
    err = np.array([[v["mean_diff"] - v["ci95_low"] for v in sig.values()], [v["ci95_high"] - v["mean_diff"] for v in sig.values()]])
    ax.errorbar(means, range(len(labels)), xerr=err, fmt="o", capsize=4)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("two_tower_ranker - model, ndcg@10 (95 % CI)")
    proto = report["protocol"]
    fig.suptitle(
        f"{proto['data']}: pooled over {proto['windows']} window(s), {proto['test_users']} (user, window) pairs, "
        f"{proto['items']} items, tests from {proto['test_starts'][:10]} (grey = baselines, blue = ours)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_window(report: dict, k: int, path: str | Path) -> None:
    """Chart of one window: the main metrics per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = report["windows"][k]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, metric in zip(axes.ravel(), MAIN_METRICS):
        _bars(ax, window["models"], metric, window["candidates"]["recall@200"] if metric == "recall@200" else None)
    end = (window["test_ends"] or "end")[:10]
    fig.suptitle(
        f"{report['protocol']['data']}: window {k + 1} of {len(report['windows'])}, test {window['test_starts'][:10]} "
        f"to {end}, {window['test_users']} test users (grey = baselines, blue = ours)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TABLE_METRICS = ("ndcg@10", "recall@20", "recall@100", "recall@200", "map@10", "mrr", "coverage@10", "ild@10", "novelty@10")


def comparison_table(report: dict, metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """A fixed-width text table of the report's pooled models x metrics, the candidate set's
    recall and the paired-bootstrap intervals."""
    head = f"{'model':<22}" + "".join(f"{m:>12}" for m in metrics)
    lines = [head, "-" * len(head)]
    for name, vals in report["models"].items():
        lines.append(f"{name:<22}" + "".join(f"{vals.get(m, float('nan')):>12.4f}" for m in metrics))
    cand = report["candidates"]
    proto = report["protocol"]
    lines.append(
        f"ranker candidates: {cand['size']} per user, recall@200 {cand['recall@200']:.4f}; "
        f"{proto['windows']} window(s), {proto['test_users']} (user, window) pairs"
    )
    for key, v in report["significance"].items():
        lines.append(f"{key:<42} {v['mean_diff']:+.4f}  [{v['ci95_low']:+.4f}, {v['ci95_high']:+.4f}]")
    return "\n".join(lines)


def markdown_table(
    report: dict, metrics: tuple[str, ...] = ("ndcg@10", "recall@20", "recall@100", "recall@200", "coverage@10", "ild@10")
) -> str:
    """The pooled table in Markdown, with two_tower_ranker's NDCG@10 difference to each model
    and its 95 % interval, and the candidate set's recall as a last row."""
    sig = report["significance"]
    head = "| model | " + " | ".join(metrics) + " | ranker - model NDCG@10 [95 % CI] |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for name, vals in report["models"].items():
        s = sig.get(f"two_tower_ranker - {name} ndcg@10")
        diff = f"{s['mean_diff']:+.4f} [{s['ci95_low']:+.4f}, {s['ci95_high']:+.4f}]" if s else ""
        lines.append(f"| {name} | " + " | ".join(f"{vals[m]:.4f}" for m in metrics) + f" | {diff} |")
    cand = report["candidates"]
    cells = [f"{cand['recall@200']:.4f}" if m == "recall@200" else "" for m in metrics]
    lines.append(f"| ranker's candidate set ({cand['size']}) | " + " | ".join(cells) + " | |")
    return "\n".join(lines)
