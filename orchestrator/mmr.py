"""Maximal Marginal Relevance (MMR) re-ranking for diversity.

MMR (J. Carbonell and J. Goldstein, "The use of MMR, diversity-based
reranking for reordering documents and producing summaries", SIGIR 1998)
builds the output list greedily. Given the already selected set ``S`` it
picks, among the remaining candidates ``i``::

    argmax_i  lam * rel_i - (1 - lam) * max_{j in S} sim(i, j)

where ``sim`` is the cosine similarity of the candidates' vectors. ``lam = 1``
is pure relevance ordering; ``lam = 0`` picks each item to be as dissimilar as
possible from what is already in the list (the first pick is still the most
relevant item).

``penalty`` chooses how the similarity to the selected set enters (issue 12):

* ``"max"`` (the formula above, Carbonell & Goldstein): the closest selected item;
* ``"sum"``: ``sum_{j in S} sim(i, j)``, the increase of the list's summed pairwise
  similarity when ``i`` joins it. Intra-list diversity (ILD, ``1 -`` the mean pairwise
  cosine) is a function of exactly that sum, so this greedy step trades relevance against
  the quantity ILD measures. The penalty grows with the list, so the top positions (where
  NDCG's discount is largest) stay close to the ranker's order and the lower ones diversify
  more; ``lam`` values are not comparable across penalties.
* ``"mean"``: the sum divided by ``|S|``.

Relevance is min-max scaled to ``[0, 1]`` inside the candidate pool before it
enters the formula. Cosine similarity lives in ``[-1, 1]`` while ranker scores
can have any scale (LambdaRank margins, dot products, probabilities), so
without scaling a given ``lam`` would trade off very differently from one model
to the next; after scaling, ``lam`` means the same thing whatever produced the
scores, and the result is invariant to positive affine transforms of them.
"""

from __future__ import annotations

import numbers

import numpy as np

PENALTIES = ("max", "sum", "mean")
"""The values of ``mmr_rerank``'s ``penalty``."""

__all__ = ["PENALTIES", "blend_vectors", "mmr_rerank"]


def mmr_rerank(
    relevance: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    lam: float,
    pool: int | None = None,
    penalty: str = "max",
) -> np.ndarray:
    """Re-rank candidates with Maximal Marginal Relevance.

    Algorithm:

    1. Pool: keep the ``pool`` candidates with the highest relevance (all when
       ``pool`` is None), ordered by relevance descending, ties by lower index.
    2. Scale relevance within the pool: ``r_i = (rel_i - min) / (max - min)``;
       if all relevances are equal, ``r_i = 1``.
    3. Normalise vectors to unit length; a zero vector has similarity 0 with
       every candidate.
    4. Pick the most relevant candidate first, then repeatedly the remaining
       candidate maximising ``lam * r_i - (1 - lam) * P_i`` until ``k`` are picked or
       the pool is exhausted, with ``P_i = max_{j in S} cos(i, j)`` (``penalty="max"``),
       ``sum_{j in S} cos(i, j)`` (``"sum"``) or that sum over ``|S|`` (``"mean"``).

    Ties in step 4 follow ``np.argmax`` semantics over the pool order of step
    1, i.e. they go to the more relevant candidate, then to the lower input
    index. Consequently ``lam = 1`` returns exactly the top-k by relevance in
    stable order (``np.argsort(-relevance, kind="stable")[:k]``).

    A running vector of each candidate's maximum (or summed) similarity to the
    selected set is updated with one matrix-vector product per pick, so the cost is
    O(k * pool * d) time and O(pool * d) memory.

    Args:
        relevance: Float array ``[n]``; higher is more relevant. Must be finite.
        item_vectors: Float array ``[n, d]`` of the candidates' embeddings, any
            norm. Must be finite.
        k: Number of items to return, ``k >= 1``.
        lam: Trade-off in ``[0, 1]``; 1 = relevance only, 0 = diversity only.
        pool: If given (``>= 1``), only the ``pool`` most relevant candidates
            are considered.
        penalty: One of :data:`PENALTIES` (see the module docstring).

    Returns:
        Int array of ``min(k, pool or n, n)`` distinct indices into
        ``relevance``/``item_vectors``, in the selected order.

    Raises:
        ValueError: If shapes disagree, inputs are not finite, ``k < 1``,
            ``pool < 1``, ``lam`` is outside ``[0, 1]`` or ``penalty`` is unknown.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    vecs = np.asarray(item_vectors, dtype=np.float64)
    if rel.ndim != 1:
        raise ValueError(f"relevance must be 1-D [n], got shape {rel.shape}")
    if vecs.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D [n, d], got shape {vecs.shape}")
    if vecs.shape[0] != rel.shape[0]:
        raise ValueError(f"item_vectors has {vecs.shape[0]} rows but relevance has {rel.shape[0]} entries")
    if not (np.all(np.isfinite(rel)) and np.all(np.isfinite(vecs))):
        # NaN would make argmax pick it (NaN compares as the max) and corrupt the order.
        raise ValueError("relevance and item_vectors must be finite")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(lam, numbers.Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, numbers.Integral) or pool < 1):
        raise ValueError(f"pool must be a positive integer or None, got {pool!r}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")

    # Stable sort: the pool order doubles as the tie-break order of every step.
    cand = np.argsort(-rel, kind="stable")
    if pool is not None:
        cand = cand[:pool]
    n_out = min(int(k), cand.size)
    if n_out == 0:
        return np.zeros(0, dtype=np.intp)

    r = rel[cand]
    lo, hi = r.min(), r.max()
    r = (r - lo) / (hi - lo) if hi > lo else np.ones_like(r)

    v = vecs[cand]
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)

    lam = float(lam)
    rel_term = lam * r
    picked = np.empty(n_out, dtype=np.intp)
    taken = np.zeros(cand.size, dtype=bool)
    # The first pick maximises lam * r alone (S is empty); cand is sorted by
    # relevance so that is position 0, for every lam including 0.
    picked[0] = 0
    taken[0] = True
    # max: each candidate's highest similarity to S; sum/mean: its summed similarity to S
    sim_to_s = unit @ unit[0]
    for step in range(1, n_out):
        pen = sim_to_s / step if penalty == "mean" else sim_to_s
        score = rel_term - (1.0 - lam) * pen
        score[taken] = -np.inf
        best = int(np.argmax(score))
        picked[step] = best
        taken[best] = True
        if penalty == "max":
            np.maximum(sim_to_s, unit @ unit[best], out=sim_to_s)
        else:
            sim_to_s += unit @ unit[best]
    return cand[picked].astype(np.intp, copy=False)


def blend_vectors(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Concatenates row-normalised vector sets so that cosine = weighted sum of cosines.

    With every part's rows at unit norm and part ``p`` scaled by ``sqrt(w_p)`` (weights
    summing to 1), the concatenated rows have unit norm and their inner product is
    ``sum_p w_p * cos_p``. MMR uses this to judge similarity on learned embeddings and on
    genres at once: embeddings alone see two thrillers by the same audience as different,
    genres alone see every comedy as the same.

    Args:
        parts: Arrays [n, d_p] with the same ``n``.
        weights: Non-negative weights, one per part, summing to 1.

    Returns:
        float32 [n, sum d_p].
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError("need one weight per part and at least one part")
    if any(w < 0 for w in weights) or not np.isclose(sum(weights), 1.0):
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights}")
    out = []
    for part, w in zip(parts, weights):
        part = np.asarray(part, dtype=np.float64)
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        out.append(np.sqrt(w) * np.divide(part, norms, out=np.zeros_like(part), where=norms > 0))
    return np.concatenate(out, axis=1).astype(np.float32)
