"""Offline ranking metrics for top-k recommendation.

Every metric works on integer item indices in ``0 .. n_items - 1``. A ranked
list is ordered best first and may contain ``-1`` as padding ("no item"): a
padding slot occupies its rank but never counts as a hit, and it is ignored by
the list-level measures (coverage, diversity, novelty).

Conventions shared by all relevance metrics (let ``R`` be the set of relevant
items, ``L`` the ranked list, ``L_i`` its item at 1-based rank ``i`` and
``hit_i = [L_i in R]``):

* ``R`` is a set: duplicate entries in ``relevant`` are counted once.
* The top-k is ``L[:k]``. When ``k`` exceeds ``len(L)`` the missing slots are
  treated like padding, i.e. as misses. This keeps ``precision@k``'s
  denominator equal to ``k`` so a short list cannot look better than a full one.
* A ranked list must not repeat an item (padding aside); repeats would let one
  relevant item be counted several times, so they raise ``ValueError``.

The per-user functions are written for clarity; :func:`evaluate_rankings`
computes the same quantities for all users at once from a boolean hit matrix,
and the tests check that both agree.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "average_precision_at_k",
    "catalog_coverage",
    "evaluate_rankings",
    "hit_rate_at_k",
    "intra_list_diversity",
    "ndcg_at_k",
    "novelty",
    "precision_at_k",
    "recall_at_k",
    "reciprocal_rank",
]

PAD = -1
"""Value marking an empty slot in a ranked list."""

# Users per block when gathering item vectors for ILD: bounds the temporary
# [block, k, d] array to a few tens of MB for k=100, d~64.
_ILD_BLOCK = 1024


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _check_k(k: int) -> int:
    # bool is an Integral subclass; k=True is almost certainly a bug.
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _as_index_array(x: np.ndarray, name: str, ndim: int = 1) -> np.ndarray:
    """Return ``x`` as an int64 array of rank ``ndim``, rejecting non-integer data.

    Empty inputs are accepted whatever their dtype because ``np.array([])`` is
    float64 and is the natural way to write "no items".
    """
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        # Catches score arrays passed where item indices were expected.
        raise ValueError(f"{name} must hold integer item indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_ranked(ranked: np.ndarray, name: str = "ranked") -> np.ndarray:
    arr = _as_index_array(ranked, name, ndim=1)
    if arr.size and arr.min() < PAD:
        raise ValueError(f"{name} may only contain item indices >= 0 or {PAD} padding")
    real = arr[arr != PAD]
    if real.size != np.unique(real).size:
        raise ValueError(f"{name} repeats an item; a ranking must list each item at most once")
    return arr


def _check_relevant(relevant: np.ndarray) -> np.ndarray:
    arr = _as_index_array(relevant, "relevant", ndim=1)
    if arr.size and arr.min() < 0:
        # A negative id would match the -1 padding and count it as a hit.
        raise ValueError("relevant must contain item indices >= 0")
    return np.unique(arr)


def _hits(ranked: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, int]:
    """Boolean hit vector of ``ranked`` against ``relevant`` and ``|relevant|``."""
    ranked = _check_ranked(ranked)
    rel = _check_relevant(relevant)
    # PAD is never in rel (rel >= 0), so padding can't hit.
    return np.isin(ranked, rel), int(rel.size)


def _top_k_hits(ranked: np.ndarray, relevant: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    k = _check_k(k)
    hits, n_rel = _hits(ranked, relevant)
    return hits[:k], n_rel


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero (cosine 0 with anything)."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D [n_items, d], got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("item_vectors must be finite")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def _self_information(item_popularity: np.ndarray) -> np.ndarray:
    """``-log2 p_i`` with add-one smoothed ``p_i``; see :func:`novelty`."""
    counts = np.asarray(item_popularity, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"item_popularity must be a non-empty 1-D array, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise ValueError("item_popularity must hold finite, non-negative counts")
    p = (counts + 1.0) / (counts.sum() + counts.size)
    return -np.log2(p)


def _check_items_in_range(items: np.ndarray, n_items: int, name: str) -> None:
    if items.size and items.max() >= n_items:
        raise ValueError(f"{name} contains item index {int(items.max())} >= n_items={n_items}")


# --------------------------------------------------------------------------- #
# Per-user relevance metrics
# --------------------------------------------------------------------------- #


def recall_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Fraction of the relevant items found in the top-k.

    Definition::

        recall@k = |L[:k] ∩ R| / |R|          (0 when R is empty)

    The denominator is ``|R|``, not ``min(|R|, k)``, so a user with more than
    ``k`` relevant items cannot reach 1. That is deliberate: with ``|R|`` the
    metric is non-decreasing in ``k`` and matches the definition most
    published recall@k figures use, whereas the capped variant can drop when
    ``k`` grows (``hits/k`` while ``k < |R|``). nDCG@k and MAP@k below are the
    metrics normalised by the best achievable top-k.

    Args:
        ranked: 1-D int array of item indices, best first; ``-1`` is padding.
        relevant: 1-D int array of relevant item indices (treated as a set).
        k: Cut-off, ``k >= 1``.

    Returns:
        Recall in ``[0, 1]``.
    """
    hits, n_rel = _top_k_hits(ranked, relevant, k)
    return float(hits.sum() / n_rel) if n_rel else 0.0


def precision_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Fraction of the top-k slots holding a relevant item.

    Definition::

        precision@k = |L[:k] ∩ R| / k

    The denominator is always ``k``: padding and slots beyond the end of a
    short list count as misses.

    Args:
        ranked: 1-D int array of item indices, best first; ``-1`` is padding.
        relevant: 1-D int array of relevant item indices (treated as a set).
        k: Cut-off, ``k >= 1``.

    Returns:
        Precision in ``[0, 1]``.
    """
    hits, _ = _top_k_hits(ranked, relevant, k)
    return float(hits.sum() / k)


def ndcg_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Normalised discounted cumulative gain with binary gains.

    Definition (ranks ``i`` are 1-based)::

        DCG@k  = sum_{i <= k, hit_i} 1 / log2(i + 1)
        IDCG@k = sum_{i = 1}^{min(|R|, k)} 1 / log2(i + 1)
        nDCG@k = DCG@k / IDCG@k               (0 when R is empty)

    IDCG is the DCG of a list that puts ``min(|R|, k)`` relevant items first,
    so a perfect top-k scores 1 even when ``|R| > k``.

    Args:
        ranked: 1-D int array of item indices, best first; ``-1`` is padding.
        relevant: 1-D int array of relevant item indices (treated as a set).
        k: Cut-off, ``k >= 1``.

    Returns:
        nDCG in ``[0, 1]``.
    """
    hits, n_rel = _top_k_hits(ranked, relevant, k)
    if n_rel == 0:
        return 0.0
    ranks = np.flatnonzero(hits) + 1
    dcg = np.sum(1.0 / np.log2(ranks + 1))
    idcg = np.sum(1.0 / np.log2(np.arange(1, min(n_rel, k) + 1) + 1))
    return float(dcg / idcg)


def average_precision_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Average precision truncated at k (the per-user term of MAP@k).

    Definition (ranks ``i`` are 1-based)::

        AP@k = ( sum_{i <= k, hit_i} precision@i ) / min(|R|, k)     (0 when R is empty)

    Dividing by ``min(|R|, k)`` rather than ``|R|`` makes a perfect top-k
    score 1 for users with more than ``k`` relevant items.

    Args:
        ranked: 1-D int array of item indices, best first; ``-1`` is padding.
        relevant: 1-D int array of relevant item indices (treated as a set).
        k: Cut-off, ``k >= 1``.

    Returns:
        AP@k in ``[0, 1]``.
    """
    hits, n_rel = _top_k_hits(ranked, relevant, k)
    if n_rel == 0:
        return 0.0
    ranks = np.flatnonzero(hits) + 1
    # The j-th hit (1-based) sits at rank ranks[j-1], so precision there is j / rank.
    precisions = np.arange(1, ranks.size + 1) / ranks
    return float(precisions.sum() / min(n_rel, k))


def reciprocal_rank(ranked: np.ndarray, relevant: np.ndarray) -> float:
    """Reciprocal of the rank of the first relevant item in the whole list.

    Definition::

        RR = 1 / min{ i : hit_i }             (0 when there is no hit)

    There is no cut-off: the whole ``ranked`` list is searched, so the
    effective cut-off is the list length.

    Args:
        ranked: 1-D int array of item indices, best first; ``-1`` is padding.
        relevant: 1-D int array of relevant item indices (treated as a set).

    Returns:
        Reciprocal rank in ``[0, 1]``.
    """
    hits, _ = _hits(ranked, relevant)
    first = np.flatnonzero(hits)
    return float(1.0 / (first[0] + 1)) if first.size else 0.0


def hit_rate_at_k(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Whether at least one relevant item is in the top-k.

    Definition::

        hitrate@k = 1 if |L[:k] ∩ R| > 0 else 0

    Args:
        ranked: 1-D int array of item indices, best first; ``-1`` is padding.
        relevant: 1-D int array of relevant item indices (treated as a set).
        k: Cut-off, ``k >= 1``.

    Returns:
        ``1.0`` or ``0.0``.
    """
    hits, _ = _top_k_hits(ranked, relevant, k)
    return float(hits.any())


# --------------------------------------------------------------------------- #
# Per-list beyond-accuracy metrics
# --------------------------------------------------------------------------- #


def intra_list_diversity(items: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance between the items of one list.

    Definition (``u_i = v_i / ||v_i||``, and ``u_i = 0`` when ``v_i = 0``)::

        ILD = (1 / C(m, 2)) * sum_{a < b} (1 - u_{L_a} · u_{L_b})

    over the ``m`` non-padding items of the list; ``ILD = 0`` when ``m < 2``.
    A zero vector has cosine 0 (distance 1) with every item, which is the
    neutral choice for items without an embedding. Values lie in ``[0, 2]``.

    Computed with ``sum_{a<b} u_a·u_b = (||sum_a u_a||^2 - sum_a ||u_a||^2) / 2``,
    which is O(m d) instead of O(m^2 d).

    Args:
        items: 1-D int array of item indices (rows of ``item_vectors``); ``-1``
            entries are ignored.
        item_vectors: Float array ``[n_items, d]`` of item embeddings, any norm.

    Returns:
        Intra-list diversity.
    """
    items = _check_ranked(items, "items")
    unit = _unit_rows(item_vectors)
    _check_items_in_range(items, unit.shape[0], "items")
    return float(_ild_rows(items[None, :], unit)[0])


def _ild_rows(ranked: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """ILD of every row of ``ranked`` (``[n_users, k]``, ``-1`` padded)."""
    out = np.zeros(ranked.shape[0], dtype=np.float64)
    for start in range(0, ranked.shape[0], _ILD_BLOCK):
        block = ranked[start : start + _ILD_BLOCK]
        mask = block != PAD
        # Padding gathers row 0 and is then zeroed, so it adds nothing to the sums.
        vecs = unit[np.where(mask, block, 0)] * mask[..., None]
        sum_vec = vecs.sum(axis=1)
        pair_dot = 0.5 * (np.einsum("ud,ud->u", sum_vec, sum_vec) - np.einsum("ukd,ukd->u", vecs, vecs))
        m = mask.sum(axis=1)
        n_pairs = m * (m - 1) / 2
        out[start : start + _ILD_BLOCK] = np.where(n_pairs > 0, 1.0 - pair_dot / np.maximum(n_pairs, 1), 0.0)
    return out


def novelty(items: np.ndarray, item_popularity: np.ndarray) -> float:
    """Mean self-information of the items of one list.

    Definition, with ``c_j`` the interaction count of item ``j`` over the
    ``N`` items of the catalogue::

        p_i     = (c_i + 1) / (sum_j c_j + N)
        novelty = (1 / m) * sum_{a} -log2 p_{L_a}

    over the ``m`` non-padding items of the list (0 when ``m = 0``). The
    add-one (Laplace) smoothing gives items never seen in training a finite
    self-information instead of ``+inf``, which would otherwise dominate the
    mean; it leaves the ordering of items by popularity unchanged.

    Args:
        items: 1-D int array of item indices; ``-1`` entries are ignored.
        item_popularity: 1-D array ``[n_items]`` of non-negative interaction
            counts (typically from the training split).

    Returns:
        Novelty in bits.
    """
    items = _check_ranked(items, "items")
    info = _self_information(item_popularity)
    _check_items_in_range(items, info.size, "items")
    real = items[items != PAD]
    return float(info[real].mean()) if real.size else 0.0


# --------------------------------------------------------------------------- #
# Aggregates
# --------------------------------------------------------------------------- #


def _check_ranked_matrix(ranked: np.ndarray, n_items: int) -> np.ndarray:
    arr = _as_index_array(ranked, "ranked", ndim=2)
    if arr.size:
        if arr.min() < PAD:
            raise ValueError(f"ranked may only contain item indices >= 0 or {PAD} padding")
        _check_items_in_range(arr, n_items, "ranked")
        # After sorting a row, a repeated item shows up as equal neighbours.
        srt = np.sort(arr, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != PAD)
        if dup.any():
            row = int(np.flatnonzero(dup.any(axis=1))[0])
            raise ValueError(f"ranked row {row} repeats an item; a ranking must list each item at most once")
    return arr


def _check_n_items(n_items: int) -> int:
    if isinstance(n_items, bool) or not isinstance(n_items, numbers.Integral) or n_items < 1:
        raise ValueError(f"n_items must be a positive integer, got {n_items!r}")
    return int(n_items)


def catalog_coverage(ranked_lists: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalogue recommended to at least one user.

    Definition::

        coverage@k = |union_u L_u[:k] \\ {-1}| / n_items

    Args:
        ranked_lists: Int array ``[n_users, width]`` of ranked lists; ``-1`` is
            padding and is not an item.
        n_items: Catalogue size.
        k: Cut-off, ``k >= 1``.

    Returns:
        Coverage in ``[0, 1]``.
    """
    k = _check_k(k)
    n_items = _check_n_items(n_items)
    ranked = _check_ranked_matrix(ranked_lists, n_items)
    top = ranked[:, :k]
    return float(np.unique(top[top != PAD]).size / n_items)


def _hit_matrix(ranked: np.ndarray, relevant: list[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``[n_users, width]`` hit matrix and ``|R_u|`` per user.

    One ``np.isin`` over (user, item) codes ``u * n_items + item`` replaces a
    Python loop of per-user ``isin`` calls.
    """
    n_users = ranked.shape[0]
    rel_sets = [_check_relevant(r) for r in relevant]
    n_rel = np.array([r.size for r in rel_sets], dtype=np.int64)
    if n_users and n_rel.min() == 0:
        bad = int(np.flatnonzero(n_rel == 0)[0])
        raise ValueError(f"user {bad} has no relevant items; filter such users out before evaluation (their recall/nDCG are undefined)")
    for u, r in enumerate(rel_sets):
        if r[-1] >= n_items:
            raise ValueError(f"relevant[{u}] contains item index {int(r[-1])} >= n_items={n_items}")
    rel_codes = np.repeat(np.arange(n_users, dtype=np.int64), n_rel) * n_items + np.concatenate(rel_sets)
    user_offset = np.arange(n_users, dtype=np.int64)[:, None] * n_items
    # Padding maps to code -1, which no relevant code (all >= 0) can equal.
    ranked_codes = np.where(ranked != PAD, ranked + user_offset, -1)
    return np.isin(ranked_codes, rel_codes), n_rel


def evaluate_rankings(
    ranked: np.ndarray,
    relevant: list[np.ndarray],
    *,
    n_items: int,
    ks: tuple[int, ...] = (10, 20, 100),
    item_vectors: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute all ranking metrics for a batch of users.

    Each per-user metric is averaged over users (every user weighs the same);
    see the per-user functions for the definitions. ``coverage@k`` is the
    catalogue-level :func:`catalog_coverage`. ``mrr`` is the mean
    :func:`reciprocal_rank` over the full width of ``ranked`` (i.e. MRR@max(ks)).

    Args:
        ranked: Int array ``[n_users, max(ks)]`` (wider is allowed) of item
            indices per user, best first; ``-1`` is padding.
        relevant: One 1-D int array of relevant item indices per user. Every set
            must be non-empty.
        n_items: Catalogue size; all indices must be below it.
        ks: Cut-offs to report.
        item_vectors: Optional ``[n_items, d]`` embeddings; adds ``ild@k``.
        item_popularity: Optional ``[n_items]`` interaction counts; adds
            ``novelty@k``.

    Returns:
        Dict with keys ``recall@k``, ``precision@k``, ``ndcg@k``, ``map@k``,
        ``hitrate@k``, ``coverage@k`` for each ``k`` in ``ks``, ``mrr``, and
        ``ild@k`` / ``novelty@k`` when the optional inputs are given.

    Raises:
        ValueError: On malformed input, an empty relevant set, an index out of
            range, a repeated item within a ranked list, or ``ranked`` narrower
            than ``max(ks)``.
    """
    n_items = _check_n_items(n_items)
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise ValueError("ks must contain at least one cut-off")
    ranked = _check_ranked_matrix(ranked, n_items)
    n_users, width = ranked.shape
    if n_users == 0:
        raise ValueError("ranked has no users")
    if len(relevant) != n_users:
        raise ValueError(f"relevant has {len(relevant)} entries but ranked has {n_users} rows")
    if width < max(ks):
        # A narrower matrix would silently score @k as if the tail were misses.
        raise ValueError(f"ranked has {width} columns but max(ks) = {max(ks)}")

    hits, n_rel = _hit_matrix(ranked, relevant, n_items)
    hits_f = hits.astype(np.float64)
    ranks = np.arange(1, width + 1, dtype=np.float64)
    cum_hits = np.cumsum(hits_f, axis=1)
    discount = 1.0 / np.log2(ranks + 1.0)
    # cum_discount[j] = IDCG with j+1 relevant items placed first.
    cum_discount = np.cumsum(discount)
    # Precision at every rank, kept only where there is a hit: the AP summand.
    ap_terms = hits_f * cum_hits / ranks

    unit = _unit_rows(item_vectors) if item_vectors is not None else None
    if unit is not None and unit.shape[0] != n_items:
        raise ValueError(f"item_vectors has {unit.shape[0]} rows but n_items={n_items}")
    info = _self_information(item_popularity) if item_popularity is not None else None
    if info is not None and info.size != n_items:
        raise ValueError(f"item_popularity has {info.size} entries but n_items={n_items}")

    out: dict[str, float] = {}
    for k in ks:
        n_hit = cum_hits[:, k - 1]
        ideal = np.minimum(n_rel, k)
        out[f"recall@{k}"] = float(np.mean(n_hit / n_rel))
        out[f"precision@{k}"] = float(np.mean(n_hit / k))
        out[f"ndcg@{k}"] = float(np.mean((hits_f[:, :k] @ discount[:k]) / cum_discount[ideal - 1]))
        out[f"map@{k}"] = float(np.mean(ap_terms[:, :k].sum(axis=1) / ideal))
        out[f"hitrate@{k}"] = float(np.mean(n_hit > 0))
        top = ranked[:, :k]
        out[f"coverage@{k}"] = float(np.unique(top[top != PAD]).size / n_items)
        if unit is not None:
            out[f"ild@{k}"] = float(np.mean(_ild_rows(top, unit)))
        if info is not None:
            real = top != PAD
            n_real = real.sum(axis=1)
            info_sum = np.where(real, info[np.where(real, top, 0)], 0.0).sum(axis=1)
            out[f"novelty@{k}"] = float(np.mean(np.where(n_real > 0, info_sum / np.maximum(n_real, 1), 0.0)))

    any_hit = hits.any(axis=1)
    first = hits.argmax(axis=1)
    out["mrr"] = float(np.mean(np.where(any_hit, 1.0 / (first + 1), 0.0)))
    return out
