"""The last stage: MMR for diversity, then the business rules (freshness, per-genre quota).

Pure numpy over one user's ranked candidates; :func:`rerank` returns positions into them.
MMR itself is :func:`orchestrator.mmr.mmr_rerank` (Carbonell & Goldstein 1998), the code the
offline evaluation measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.mmr import mmr_rerank


@dataclass(frozen=True)
class RerankOptions:
    """How to turn ranked candidates into the final list (validated by the service).

    Attributes:
        mmr_lambda: 1 = ranker order, 0 = most diverse.
        pool: How many of the best-ranked candidates MMR chooses from.
        freshness_weight: Weight of release-year freshness added to the scaled relevance.
        max_per_genre: At most this many results per genre; None = no quota.
    """

    mmr_lambda: float
    pool: int
    freshness_weight: float = 0.0
    max_per_genre: int | None = None


def _scaled(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def rerank(
    relevance: np.ndarray,
    vectors: np.ndarray,
    k: int,
    options: RerankOptions,
    freshness: np.ndarray | None = None,
    genres: np.ndarray | None = None,
) -> np.ndarray:
    """Final order of the candidates.

    1. Pool: the ``options.pool`` candidates with the highest relevance.
    2. Freshness: ``relevance' = scaled(relevance) + w * freshness`` inside the pool (both
       in 0..1), when ``freshness_weight > 0``.
    3. MMR over the pool with ``options.mmr_lambda`` on ``vectors``' cosine.
    4. Quota: walking MMR's order, skip a candidate once any of its genres holds
       ``max_per_genre`` picks; stop at ``k``. MMR orders the whole pool when a quota is
       set, so skipped picks are replaced by the next best diverse ones.

    Args:
        relevance: float [n] ranker scores.
        vectors: float [n, d] similarity vectors of the candidates.
        k: Results wanted.
        options: See :class:`RerankOptions`.
        freshness: float [n] in 0..1 (needed when ``freshness_weight > 0``).
        genres: float/bool [n, n_genres] multi-hot (needed with ``max_per_genre``).

    Returns:
        int [m] positions into the candidates, ``m <= k``.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.size == 0:
        return np.zeros(0, dtype=np.intp)
    pool = np.argsort(-rel, kind="stable")[: max(1, options.pool)]
    pool_rel = _scaled(rel[pool])
    if options.freshness_weight > 0 and freshness is not None:
        pool_rel = pool_rel + options.freshness_weight * np.asarray(freshness, np.float64)[pool]
    quota = options.max_per_genre is not None and genres is not None
    order = mmr_rerank(pool_rel, np.asarray(vectors)[pool], k=len(pool) if quota else k, lam=options.mmr_lambda)
    picked = pool[order]
    if not quota:
        return picked[:k]
    g = np.asarray(genres)[picked] > 0
    counts = np.zeros(g.shape[1], dtype=np.int64)
    out = []
    for pos, row in zip(picked, g):
        if np.any(counts[row] >= options.max_per_genre):
            continue
        counts[row] += 1
        out.append(pos)
        if len(out) == k:
            break
    return np.asarray(out, dtype=np.intp)


def intra_list_diversity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance ``1 - cos`` of a list's vectors (0 for fewer than 2)."""
    v = np.asarray(vectors, np.float64)
    if len(v) < 2:
        return 0.0
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    n = len(v)
    return float(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))
