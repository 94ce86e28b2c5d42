"""Exact top-K over the whole catalog, with per-user exclusions (items already seen).

Used by evaluation (full ranking over all items) and to generate the ranker's candidates.
The served path uses FAISS instead; this module is the exact reference it is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k_scores(scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of each row of ``scores``, best first, after masking ``exclude``.

    Args:
        scores: float [n_users, n_items]; modified in place where items are excluded.
        k: How many items per row (capped at ``n_items``).
        exclude: Per-row item indices to drop (e.g. seen items); may be None.

    Returns:
        ``(items int64 [n, k], scores float32 [n, k])``; rows with fewer than ``k``
        admissible items are padded with item ``-1`` and score ``-inf``.
    """
    n_users, n_items = scores.shape
    k = min(k, n_items)
    if exclude is not None:
        rows = np.repeat(np.arange(n_users), [len(e) for e in exclude])
        cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]) if rows.size else np.empty(0, np.int64)
        scores[rows, cols] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n_items else np.tile(np.arange(n_items), (n_users, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    items = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    items[~np.isfinite(top)] = -1
    return items, top


def top_k(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-K of users against all items, in chunks of users.

    Args:
        user_vectors: float32 [n_users, d].
        item_vectors: float32 [n_items, d].
        k: Items per user.
        exclude: Per-user item indices to drop.
        chunk: Users per matrix product (bounds memory at ``chunk x n_items`` floats).

    Returns:
        ``(items int64 [n_users, k], scores float32 [n_users, k])``.
    """
    items_out, scores_out = [], []
    for s in range(0, len(user_vectors), chunk):
        scores = user_vectors[s : s + chunk] @ item_vectors.T
        ex = None if exclude is None else exclude[s : s + chunk]
        i, sc = top_k_scores(scores, k, ex)
        items_out.append(i)
        scores_out.append(sc)
    if not items_out:
        k = min(k, len(item_vectors))
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(items_out), np.concatenate(scores_out)
