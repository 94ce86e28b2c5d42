"""Second stage: a LightGBM LambdaRank ranker over the merged candidates.

Training data (one query per user): the ``candidates`` items the merged candidate sources
(``orchestrator/candidates.py``) propose for a user from their history before the validation
period; labels from what the user did in the
validation period (2 = rated >= 4, 1 = rated below 4, 0 = not rated). Features come from
:class:`export.features.RankerFeatures`, the same module that is exported to Triton.

Trees are kept Hummingbird-friendly (``max_depth <= 8``, a few hundred trees at most): the
ONNX translation of deep trees is slow on the CPU and can need tens of GiB (docs/platform.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd

from export.features import FEATURE_NAMES, RankerFeatures
from export.items import Catalog
from export.split import RELEVANCE_MIN_RATING


@dataclass(frozen=True)
class RankerConfig:
    """LightGBM LambdaRank hyper-parameters.

    Attributes:
        candidates: Merged candidates per user that the ranker orders.
        n_estimators: Boosting rounds (trees).
        learning_rate: Shrinkage.
        max_depth: Tree depth cap (<= 8 for Hummingbird).
        num_leaves: Leaves per tree.
        min_child_samples: Minimum rows per leaf.
        subsample: Row subsampling per tree.
        colsample: Feature subsampling per tree.
        seed: LightGBM seed (bag ``i`` uses ``seed + i``).
        bags: Boosters trained with consecutive seeds and served summed as one
            (:func:`merge_boosters`), ``n_estimators / bags`` trees each; 1 = one booster.
        base_feature: Feature column the trees boost from (LightGBM ``init_score``) instead
            of from zero; None = from zero.
        base_alpha: Weight of that column scaled to unit deviation over the training rows;
            the served booster carries the term as a one-leaf linear tree (:func:`with_linear_base`).
    """

    candidates: int = 200
    # 150 before: on ml-100k (3 rolling windows) 100 trees ranked better (NDCG@10 +8 %, paired
    # 95% CI excluding 0) and cost 25 % less tree time at 200 rows (BENCHMARKS.md "Ranker
    # operating point"; 50 trees scored about as well but leave little room on bigger data)
    n_estimators: int = 100
    learning_rate: float = 0.05
    max_depth: int = 6
    num_leaves: int = 31
    # 50 before: the ranker trains on one query per validation user (64-93 a window on ml-100k),
    # and larger leaves lifted NDCG@10 in expectation over 5 seeds on both ml-100k (+0.017,
    # +12 %) and the synthetic ML-32M-shaped sample (+0.005, +2 %); 200-800 form a plateau
    # (BENCHMARKS.md "The ranker's regularisation"). On big data a fixed leaf size binds less.
    min_child_samples: int = 400
    subsample: float = 0.8
    colsample: float = 0.8
    seed: int = 0
    bags: int = 1
    # None / 0 before: with 64-93 training queries a window on ml-100k, the trees learn a
    # correction to EASE's own score rather than a ranking from scratch; over 5 seeds the
    # ranker then scored at least EASE in 4 of 5 rolling windows with every seed (3 or 4 from
    # zero) at the same NDCG@10 in expectation (BENCHMARKS.md "Boosting from EASE's score")
    base_feature: str | None = "ease_score"
    base_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.max_depth > 8 or self.max_depth < 1:
            raise ValueError(f"max_depth must be in 1..8 for Hummingbird, got {self.max_depth}")
        if self.n_estimators > 500:
            raise ValueError(f"n_estimators must be <= 500 for a servable ranker, got {self.n_estimators}")
        if self.bags < 1 or self.n_estimators % self.bags:
            raise ValueError(f"bags must be >= 1 and divide n_estimators ({self.n_estimators}), got {self.bags}")
        if not self.base_alpha >= 0:
            raise ValueError(f"base_alpha must be >= 0, got {self.base_alpha}")


def candidate_features(
    features: RankerFeatures,
    history: np.ndarray,
    history_rating: np.ndarray,
    cand_items: np.ndarray,
    cand_scores: np.ndarray,
    cand_sources: np.ndarray,
    chunk_users: int = 256,
) -> np.ndarray:
    """Feature matrix for every (user, candidate) pair, one row per candidate.

    Args:
        features: The feature module.
        history: int64 [n_users, L] history windows.
        history_rating: float32 [n_users, L].
        cand_items: int64 [n_users, C] candidates, best first (``-1`` = none).
        cand_scores: float32 [n_users, C] retrieval scores.
        cand_sources: float32 [n_users, C, S] rank of each candidate in each source (-1 absent).
        chunk_users: Users per feature call.

    Returns:
        float32 [n_users * C, len(FEATURE_NAMES)], rows grouped by user.
    """
    n_users, n_cand = cand_items.shape
    out = []
    for s in range(0, n_users, chunk_users):
        sl = slice(s, s + chunk_users)
        m = len(cand_items[sl])
        items = np.where(cand_items[sl] >= 0, cand_items[sl], 0).reshape(-1)
        scores = np.where(np.isfinite(cand_scores[sl]), cand_scores[sl], -1.0).reshape(-1)
        ranks = np.tile(np.arange(n_cand, dtype=np.float32), m)
        out.append(
            features.compute(
                items,
                scores.astype(np.float32),
                ranks,
                history[sl],
                history_rating[sl],
                cand_sources[sl].reshape(m * n_cand, -1),
            )
        )
    if not out:
        return np.zeros((0, len(FEATURE_NAMES)), np.float32)
    return np.concatenate(out)


def candidate_labels(user_ids: np.ndarray, cand_items: np.ndarray, period: pd.DataFrame, catalog: Catalog) -> np.ndarray:
    """Graded labels of candidates from a period's ratings: 2 rated >= 4, 1 rated < 4, 0 not rated."""
    items = catalog.to_items(period.movie_id.to_numpy())
    grade = np.where(period.rating.to_numpy() >= RELEVANCE_MIN_RATING, 2, 1)
    lookup = pd.Series(grade, index=pd.MultiIndex.from_arrays([period.user_id.to_numpy(), items]))
    lookup = lookup.groupby(level=[0, 1]).max()
    n_users, n_cand = cand_items.shape
    keys = pd.MultiIndex.from_arrays([np.repeat(user_ids, n_cand), cand_items.reshape(-1)])
    labels = lookup.reindex(keys).fillna(0).to_numpy(np.int32)
    return labels.reshape(n_users, n_cand)


def train_ranker(
    features: np.ndarray, labels: np.ndarray, config: RankerConfig, feature_names: Sequence[str] = FEATURE_NAMES
) -> lgb.Booster:
    """Trains LambdaRank on ``features`` [n_users * C, F] grouped by user with ``labels`` [n_users, C].

    Queries without any positive label carry no ranking signal and are dropped. ``feature_names``
    names the ``F`` columns (the served features; benchmarks that try extra columns name them).
    With ``config.bags`` > 1, that many boosters of ``n_estimators / bags`` trees are trained with
    seeds ``seed, seed + 1, ...`` and returned as one booster that sums them
    (:func:`merge_boosters`). With ``config.base_feature``, the trees boost from
    ``base_alpha * column / std(column)`` (the deviation over all of ``features``' rows) and
    the returned booster adds that term itself (:func:`with_linear_base`), so its
    ``predict`` is the whole score.
    """
    n_users, n_cand = labels.shape
    keep = labels.max(axis=1) > 0
    if not keep.any():
        raise ValueError("no ranker training query has a positive label: the validation period is too small")
    base = _base_term(features, config, feature_names)
    x = features.reshape(n_users, n_cand, -1)[keep].reshape(-1, features.shape[1])
    y = labels[keep].reshape(-1)
    init = None if base is None else x[:, base[0]].astype(np.float64) * base[1]
    data = lgb.Dataset(x, label=y, group=np.full(int(keep.sum()), n_cand), feature_name=list(feature_names), init_score=init)
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": config.learning_rate,
        "max_depth": config.max_depth,
        "num_leaves": config.num_leaves,
        "min_child_samples": config.min_child_samples,
        "bagging_fraction": config.subsample,
        "bagging_freq": 1,
        "feature_fraction": config.colsample,
        "lambdarank_truncation_level": 20,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "verbosity": -1,
    }
    rounds = config.n_estimators // config.bags
    members = [lgb.train({**params, "seed": config.seed + i}, data, num_boost_round=rounds) for i in range(config.bags)]
    booster = members[0] if config.bags == 1 else merge_boosters(members)
    return booster if base is None else with_linear_base(booster, *base)


def _base_term(features: np.ndarray, config: RankerConfig, feature_names: Sequence[str]) -> tuple[int, float] | None:
    """``(column index, coefficient)`` of the score the trees boost from, or None."""
    if config.base_feature is None or config.base_alpha == 0:
        return None
    if config.base_feature not in feature_names:
        raise ValueError(f"base_feature {config.base_feature!r} is not a ranker feature (one of {', '.join(feature_names)})")
    j = list(feature_names).index(config.base_feature)
    return j, config.base_alpha / (float(np.asarray(features[:, j], np.float64).std()) or 1.0)


def with_linear_base(booster: lgb.Booster, feature: int, coef: float) -> lgb.Booster:
    """``booster`` plus ``coef * x[feature]`` in every prediction, as one more tree.

    The term is LightGBM's own linear-tree format (``is_linear=1``) on a tree of one leaf
    (constant 0, one coefficient), so ``predict``, ``save_model`` and everything that loads
    ``ranker.lgb`` see the whole score; Hummingbird has no linear trees, so the ONNX export
    takes the term off again (:func:`split_linear_base`) and adds it in the graph. A missing
    (NaN) feature value makes LightGBM fall back to the leaf value, 0: served features are
    never NaN (the parity checks compare both on real rows).
    """
    lines = [line for line in booster.model_to_string().split("\n") if not line.startswith("tree_sizes=")]
    end = lines.index("end of trees")
    tree = [
        f"Tree={booster.num_trees()}",
        "num_leaves=1",
        "num_cat=0",
        "split_feature=",
        "split_gain=",
        "threshold=",
        "decision_type=",
        "left_child=",
        "right_child=",
        "leaf_value=0",
        "leaf_weight=0",
        "leaf_count=0",
        "internal_value=",
        "internal_weight=",
        "internal_count=",
        "is_linear=1",
        "leaf_const=0",
        "num_features=1",
        f"leaf_features={int(feature)} ",
        f"leaf_coeff={float(coef)!r} ",
        "shrinkage=1",
        "",
        "",
    ]
    return lgb.Booster(model_str="\n".join(lines[:end] + tree + lines[end:]))


def split_linear_base(booster: lgb.Booster) -> tuple[lgb.Booster, tuple[int, float] | None]:
    """``(the trees alone, (feature, coef) of the linear term or None)``: the inverse of
    :func:`with_linear_base`, for converters without linear trees (Hummingbird)."""
    lines = booster.model_to_string().split("\n")
    if "is_linear=1" not in lines:
        return booster, None
    lines = [line for line in lines if not line.startswith("tree_sizes=")]
    starts = [i for i, line in enumerate(lines) if line.startswith("Tree=")]
    end = lines.index("end of trees")
    last = lines[starts[-1] : end]
    if lines.count("is_linear=1") != 1 or "is_linear=1" not in last or "num_leaves=1" not in last:
        raise ValueError("split_linear_base: only a last one-leaf linear tree (with_linear_base) is supported")
    field = {k: v for k, _, v in (line.partition("=") for line in last)}
    if float(field["leaf_const"]) != 0.0 or int(field["num_features"]) != 1:
        raise ValueError("split_linear_base: the linear tree is not a with_linear_base term")
    term = (int(field["leaf_features"].split()[0]), float(field["leaf_coeff"].split()[0]))
    return lgb.Booster(model_str="\n".join(lines[: starts[-1]] + lines[end:])), term


def merge_boosters(boosters: Sequence[lgb.Booster]) -> lgb.Booster:
    """One booster whose prediction is the sum of ``boosters``' (trained on the same features).

    LightGBM has no API for it, so the model text is joined: the first booster's header, every
    booster's trees renumbered in order, the first booster's parameters. ``tree_sizes=`` (byte
    offsets LightGBM may use to parse trees in parallel) is dropped, so the trees are parsed in
    sequence, and so are the first booster's per-feature split counts, which no longer describe
    the model (``feature_importance()`` counts from the trees themselves). The ONNX export,
    the parity checks and ``predict`` see an ordinary booster of ``sum of num_trees()`` trees.
    """
    if not boosters:
        raise ValueError("merge_boosters needs at least one booster")
    texts = [b.model_to_string().split("\n") for b in boosters]
    first = texts[0]
    if any(_header(t) != _header(first) for t in texts[1:]):
        raise ValueError("merge_boosters: the boosters were not trained on the same features")
    start, end = _tree_span(first)
    header = [line for line in first[:start] if not line.startswith("tree_sizes=")]
    trees: list[str] = []
    n = 0
    for t in texts:
        a, b = _tree_span(t)
        for line in t[a:b]:
            if line.startswith("Tree="):
                line = f"Tree={n}"
                n += 1
            trees.append(line)
    tail = first[end:]
    if "feature_importances:" in tail:
        i = tail.index("feature_importances:") + 1
        while i < len(tail) and tail[i]:
            del tail[i]
    return lgb.Booster(model_str="\n".join(header + trees + tail))


def _tree_span(lines: list[str]) -> tuple[int, int]:
    """Line indices of a model text's first ``Tree=`` line and of its ``end of trees`` line."""
    return next(i for i, line in enumerate(lines) if line.startswith("Tree=")), lines.index("end of trees")


def _header(lines: list[str]) -> list[str]:
    """The header lines that must agree for trees to be summed (features and their ranges)."""
    return [x for x in lines if x.startswith(("max_feature_idx=", "feature_names=", "feature_infos=", "objective="))]


def rerank(booster: lgb.Booster, features: np.ndarray, cand_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orders each user's candidates by ranker score.

    Returns:
        ``(items int64 [n_users, C], scores float32 [n_users, C])`` best first; padding
        candidates (``-1``) sink to the end.
    """
    n_users, n_cand = cand_items.shape
    return order_by_scores(booster.predict(features, num_threads=2).reshape(n_users, n_cand).astype(np.float32), cand_items)


def order_by_scores(scores: np.ndarray, cand_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``cand_items`` [n_users, C] ordered by ``scores`` (same shape), best first,
    ties in candidate order; padding (``-1``) sinks to the end with score ``-inf``."""
    scores = np.where(cand_items >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(cand_items, order, axis=1), np.take_along_axis(scores, order, axis=1)


def config_dict(config: RankerConfig) -> dict:
    """The config as a JSON-able dict (for manifests)."""
    return asdict(config)
