"""The last stage: MMR for diversity, then the business rules (freshness, per-genre quota,
promotion slots).

Pure numpy over one user's ranked candidates; :func:`rerank` returns positions into them and
:func:`place_promotions` pins promoted items into the final list.
MMR itself is :func:`orchestrator.mmr.mmr_rerank` (Carbonell & Goldstein 1998), the code the
offline evaluation measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.mmr import mmr_rerank
from orchestrator.settings import ServeSettings

PROMOTION_KINDS = {"sponsored": "sponsored", "editorial": "editorial pick"}
"""Promotion kind -> the explanation a promoted item carries."""


@dataclass(frozen=True)
class Promotion:
    """A movie pinned at a position of the answer (validated by the service).

    Attributes:
        movie_id: MovieLens movie id (resolved against the answering catalog by the pipeline).
        position: 0-based position in the answer.
        kind: A key of :data:`PROMOTION_KINDS`.
    """

    movie_id: int
    position: int
    kind: str = "sponsored"


@dataclass(frozen=True)
class RerankOptions:
    """How to turn ranked candidates into the final list (validated by the service).

    Attributes:
        mmr_lambda: 1 = ranker order, 0 = most diverse.
        pool: How many of the best-ranked candidates MMR chooses from.
        freshness_weight: Weight of release-year freshness added to the scaled relevance.
        max_per_genre: At most this many results per genre; None = no quota.
        promotions: Promotion slots, applied after everything else.
        penalty: MMR's similarity penalty (:data:`orchestrator.mmr.PENALTIES`); the default
            is the served one (``ServeSettings.mmr_penalty``).
    """

    mmr_lambda: float
    pool: int
    freshness_weight: float = 0.0
    max_per_genre: int | None = None
    promotions: tuple[Promotion, ...] = ()
    penalty: str = ServeSettings.mmr_penalty


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
    3. MMR over the pool with ``options.mmr_lambda`` and ``options.penalty`` on ``vectors``'
       cosine.
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
    order = mmr_rerank(pool_rel, np.asarray(vectors)[pool], k=len(pool) if quota else k, lam=options.mmr_lambda, penalty=options.penalty)
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


def place_promotions(organic: np.ndarray, k: int, promoted: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pins promoted items at their positions; the organic items fill the rest in order.

    An organic item that is also promoted is shown once, at its promoted position. When the
    organic items run out before ``k``, the promotions still waiting close the list in
    position order (no gaps).

    Args:
        organic: int [n] items best first (ask for ``k + len(promoted)`` so that removing
            promoted duplicates still fills ``k``).
        k: Length wanted.
        promoted: int [p] distinct items to show (already admissible: filtered ones are the
            caller's to drop).
        positions: int [p] distinct 0-based positions, aligned with ``promoted``.

    Returns:
        ``(items int64 [m], source int64 [m])``, ``m <= k``: ``source[j]`` is the index into
        ``promoted`` of a promoted item, -1 for an organic one.
    """
    promoted = np.asarray(promoted, np.int64)
    at = {int(p): j for j, p in enumerate(np.asarray(positions, np.int64))}
    rest = iter(np.asarray(organic, np.int64)[~np.isin(organic, promoted)].tolist())
    items: list[int] = []
    source: list[int] = []
    for pos in range(k):
        if pos in at:
            j = at.pop(pos)
            items.append(int(promoted[j]))
            source.append(j)
            continue
        nxt = next(rest, None)
        if nxt is None:
            break
        items.append(nxt)
        source.append(-1)
    for pos in sorted(at):  # past the end of a short list
        if len(items) == k:
            break
        items.append(int(promoted[at[pos]]))
        source.append(at[pos])
    return np.asarray(items, np.int64), np.asarray(source, np.int64)


def intra_list_diversity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance ``1 - cos`` of a list's vectors (0 for fewer than 2)."""
    v = np.asarray(vectors, np.float64)
    if len(v) < 2:
        return 0.0
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    n = len(v)
    return float(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))
