"""Candidate sources merged before the ranker: one definition, used offline and online.

The two-tower's ANN search alone misses the popular items users go on to rate (a first
stage trained with in-batch negatives pushes them down). Several cheap sources, each a
ranked list of items for one user, are merged into the one candidate set the ranker orders:

* ``two_tower``: the ANN search over item vectors (FAISS online, exact top-K offline);
* ``item_knn``: neighbours of the items in the user's history window, from a precomputed
  top-M item-item cosine table (co-occurrence in the training period only);
* ``genre_popular``: popular items of the user's favourite genres (genre histogram of the
  window), scored ``log(1 + count) * cosine(profile, item genres)``;
* ``recent_popular``: most rated in the ``RECENT_DAYS`` before the training cut-off;
* ``popular``: most rated before the training cut-off.

:func:`merge` interleaves the lists in proportion to per-source budgets (chosen on
validation and published with the tables), dropping duplicates, and returns each merged
candidate's 0-based rank in every source (-1 where absent): the ranker's
``candidate_sources`` input. Everything here is numpy on one user at a time, so the
orchestrator runs exactly what evaluation ran (offline loops over users).

:class:`CandidateTables` is the published artifact (``candidate_tables.npz``, no pickle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from orchestrator.artifacts import CANDIDATE_TABLES
from orchestrator.contract import CANDIDATE_SOURCE_NAMES as SOURCES

TABLES_FILE = CANDIDATE_TABLES
"""The published tables' file name (its home: ``orchestrator/artifacts.py``), beside the reader."""

SOURCE_FEATURE_NAMES = tuple(f"source_rank_{s}" for s in SOURCES)
"""Ranker feature names of the ``candidate_sources`` columns (0-based rank in the source, -1 absent)."""


GENRE_POOL_GENRES = 3
"""How many of the user's most frequent genres the ``genre_popular`` source draws from."""


@dataclass(frozen=True)
class CandidateTables:
    """Precomputed lookups of the non-ANN sources, as of one training cut-off.

    Attributes:
        neighbours: int32 [n_items, M] most similar items of each item, best first, -1 padded.
        neighbour_sims: float32 [n_items, M] their cosine similarities (0 for padding).
        popular: int64 [P] most rated items before the cut-off, most rated first.
        recent_popular: int64 [P] most rated in the recent window before the cut-off.
        genre_popular: int64 [n_genres, P] most rated items of each genre, -1 padded.
        log_count: float32 [n_items] ``log(1 + ratings before the cut-off)``.
        genre_matrix: float32 [n_items, n_genres] multi-hot genres.
        budgets: float32 [len(SOURCES)] share of the merged set each source fills.
    """

    neighbours: np.ndarray
    neighbour_sims: np.ndarray
    popular: np.ndarray
    recent_popular: np.ndarray
    genre_popular: np.ndarray
    log_count: np.ndarray
    genre_matrix: np.ndarray
    budgets: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.log_count)
        if self.neighbours.shape != self.neighbour_sims.shape or len(self.neighbours) != n:
            raise ValueError(f"neighbour table {self.neighbours.shape} / {self.neighbour_sims.shape} for {n} items")
        if len(self.genre_matrix) != n or len(self.genre_popular) != self.genre_matrix.shape[1]:
            raise ValueError("genre tables do not match the catalog")
        if self.budgets.shape != (len(SOURCES),) or (self.budgets < 0).any() or self.budgets.sum() <= 0:
            raise ValueError(f"budgets must be {len(SOURCES)} non-negative shares, got {self.budgets}")

    @property
    def n_items(self) -> int:
        return len(self.log_count)

    def arrays(self) -> dict[str, np.ndarray]:
        """The published arrays by field name (not the lookups derived from them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @cached_property
    def genre_norm(self) -> np.ndarray:
        """float32 [n_items] each item's genre-vector norm, computed once (``genre_popular``'s cosine).

        Computed row by row as ``genre_popular`` did per call; for multi-hot rows the squares
        sum to an exact small integer, so the norm does not depend on which rows are batched.
        """
        g = self.genre_matrix
        return np.sqrt(np.einsum("ij,ij->i", g, g))

    def with_budgets(self, budgets: Sequence[float]) -> CandidateTables:
        """The same tables with other per-source budgets (normalised to sum 1)."""
        b = np.asarray(budgets, np.float32)
        return CandidateTables(**{**self.arrays(), "budgets": b / max(float(b.sum()), 1e-12)})

    def save(self, path: str | Path) -> None:
        """Writes the tables as one ``.npz`` (plain arrays, loadable without pickle)."""
        np.savez(Path(path), sources=np.array(SOURCES), **self.arrays())

    @classmethod
    def load(cls, path: str | Path) -> CandidateTables:
        """Reads tables written by :meth:`save`.

        Raises:
            ValueError: The file was written for another list of sources.
        """
        with np.load(Path(path), allow_pickle=False) as z:
            if tuple(z["sources"].tolist()) != SOURCES:
                raise ValueError(f"{path}: tables for sources {z['sources'].tolist()}, this code serves {list(SOURCES)}")
            return cls(**{name: z[name] for name in cls.__dataclass_fields__})


def _drop(items: np.ndarray, blocked: np.ndarray | None) -> np.ndarray:
    """``items`` without the blocked ones (``blocked``: bool [n_items] mask, True = never return)."""
    items = items[items >= 0]
    return items if blocked is None else items[~blocked[items]]


def _top(items: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` best of ``score`` (descending, ties by ``items`` ascending), in that order.

    Equal to ``np.lexsort((items, -score))[:n]`` when no two (score, item) pairs are equal: a partition finds
    the ``n``-th best score, and only the scores at least that good (ties at the boundary
    included) are sorted.
    """
    if n <= 0:
        return np.zeros(0, np.int64)
    neg = -score
    if len(neg) <= 2 * n:
        return np.lexsort((items, neg))[:n]
    kth = np.partition(neg, n - 1)[n - 1]
    if np.isnan(kth):  # fewer than n comparable scores: NaNs sort last, as lexsort puts them
        return np.lexsort((items, neg))[:n]
    keep = np.flatnonzero(neg <= kth)
    return keep[np.lexsort((items[keep], neg[keep]))][:n]


def item_knn(tables: CandidateTables, window: np.ndarray, blocked: np.ndarray | None, n: int) -> np.ndarray:
    """Items most similar to the window's: score = sum of cosines to every window item.

    Ranked by a partial sort (:func:`_top`): the order is the full sort's.

    Args:
        tables: The tables.
        window: int64 [L] the history window (-1 padding).
        blocked: bool [n_items] items never to return, or None.
        n: Items wanted.
    """
    hist = window[window >= 0]
    if hist.size == 0:
        return np.zeros(0, np.int64)
    # dense over the catalog (a few passes over n_items cost less than sorting the window's
    # neighbours): bincount adds each item's cosines in the window's order, as over the
    # sorted unique items; shifted by one, the -1 padding lands in bin 0, dropped
    nb = tables.neighbours[hist].reshape(-1) + 1
    m = tables.n_items + 1
    score = np.bincount(nb, weights=tables.neighbour_sims[hist].reshape(-1), minlength=m)[1:]
    present = np.bincount(nb, minlength=m)[1:] > 0
    if blocked is not None:
        present &= ~blocked
    uniq = np.flatnonzero(present)
    return uniq[_top(uniq, score[uniq], n)].astype(np.int64)


def genre_popular(tables: CandidateTables, window: np.ndarray, blocked: np.ndarray | None, n: int) -> np.ndarray:
    """Popular items of the user's favourite genres: ``log(1 + count) * cosine(profile, genres)``."""
    hist = window[window >= 0]
    if hist.size == 0:
        return np.zeros(0, np.int64)
    profile = tables.genre_matrix[hist].sum(0)
    if not profile.any():
        return np.zeros(0, np.int64)
    top = np.lexsort((np.arange(len(profile)), -profile))[:GENRE_POOL_GENRES]
    top = top[profile[top] > 0]
    # the union of the genres' lists, sorted and unique, as a mask (cheaper than np.unique's sort)
    member = np.zeros(tables.n_items, bool)
    listed = tables.genre_popular[top].reshape(-1)
    member[listed[listed >= 0]] = True
    if blocked is not None:
        member &= ~blocked
    pool = np.flatnonzero(member)
    if pool.size == 0:
        return pool.astype(np.int64)
    g = tables.genre_matrix[pool]
    # einsum, not ``@``: a BLAS call on a matrix this small costs more in thread wake-ups than
    # in arithmetic on a busy machine (measured: 28 ms vs 0.2 ms at load 25); and not
    # ``(g * profile).sum(1)``, which builds temporaries: 0.06 vs 0.30 ms at ~5,000 x 20
    cos = np.einsum("ij,j->i", g, profile) / (tables.genre_norm[pool] * np.sqrt(float((profile * profile).sum())) + 1e-6)
    score = tables.log_count[pool] * cos
    return pool[_top(pool, score, n)].astype(np.int64)


def popular_list(order: np.ndarray, blocked: np.ndarray | None, n: int) -> np.ndarray:
    """The first ``n`` admissible items of a precomputed popularity order."""
    return _drop(order, blocked)[:n].astype(np.int64)


def side_lists(tables: CandidateTables, window: np.ndarray, blocked: np.ndarray | None, n: int) -> list[np.ndarray]:
    """The ranked lists of every source but the ANN search (``SOURCES[1:]``), for one user.

    They read only the history window and the blocked mask, not the user vector, so the
    orchestrator computes them while the user-tower call is in flight
    (``ServeSettings.overlap_user_tower``).

    Args:
        tables: The tables.
        window: int64 [L] the user's history window.
        blocked: bool [n_items] items never to return (seen, filtered out), or None.
        n: Longest list wanted from each source.
    """
    return [
        item_knn(tables, window, blocked, n),
        genre_popular(tables, window, blocked, n),
        popular_list(tables.recent_popular, blocked, n),
        popular_list(tables.popular, blocked, n),
    ]


def source_lists(tables: CandidateTables, ann: np.ndarray, window: np.ndarray, blocked: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Every source's ranked list for one user, in :data:`SOURCES` order: the ANN result (int64,
    best first, already filtered by the caller) then :func:`side_lists`."""
    return [np.asarray(ann, np.int64)[:n], *side_lists(tables, window, blocked, n)]


def merge(lists: Sequence[np.ndarray], budgets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleaves ranked lists in proportion to ``budgets``, without duplicates.

    Position ``p`` of source ``s`` gets the key ``(p + 0.5) / budgets[s]``; items are taken in
    key order (ties: source order), each once, until ``n``. A source with budget share ``b``
    therefore fills about ``b * n`` slots, and its unused share (overlap, a short list) goes
    to the others.

    Returns:
        ``(items int64 [m], source_ranks float32 [m, len(lists)])`` with ``m <= n``: the
        merged candidates in merge order and each one's 0-based rank in every source
        (-1 = not in that source's list).
    """
    n_src = len(lists)
    arrays = [np.asarray(lst, np.int64) for lst in lists]
    keyed = [s for s, (lst, b) in enumerate(zip(arrays, budgets)) if b > 0 and len(lst) > 0]
    if not keyed:
        return np.zeros(0, np.int64), np.full((0, n_src), -1.0, np.float32)
    key = np.concatenate([(np.arange(len(arrays[s]), dtype=np.float64) + 0.5) / float(budgets[s]) for s in keyed])
    # stable: equal keys keep the concatenation's (source) order
    item = np.concatenate([arrays[s] for s in keyed])[np.argsort(key, kind="stable")]
    # per-item slots over the lists' id range (dense, no sort): each item's first place in key
    # order is the smallest index written to its slot
    every = np.concatenate(arrays)
    lo = int(every.min())
    span = int(every.max()) - lo + 1
    place = np.arange(len(item))
    first = np.full(span, len(item))
    np.minimum.at(first, item - lo, place)
    merged = item[first[item - lo] == place][:n]
    # each merged item's first position in every source: the smallest position per (row, source)
    row = np.full(span, -1)
    row[merged - lo] = np.arange(len(merged))
    lens = np.array([len(x) for x in arrays])
    source = np.repeat(np.arange(n_src), lens)
    position = np.arange(len(every)) - np.repeat(np.cumsum(lens) - lens, lens)
    r = row[every - lo]
    hit = r >= 0
    ranks = np.full(len(merged) * n_src, len(every))
    np.minimum.at(ranks, r[hit] * n_src + source[hit], position[hit])
    ranks[ranks == len(every)] = -1
    return merged, ranks.reshape(len(merged), n_src).astype(np.float32)


def candidates(
    tables: CandidateTables, ann: np.ndarray, window: np.ndarray, blocked: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The merged candidate set of one user and its ``candidate_sources`` rows.

    Args:
        tables: Tables and budgets.
        ann: Two-tower ANN result (admissible items only), best first.
        window: int64 [L] history window.
        blocked: bool [n_items] never-return mask, or None.
        n: Candidates wanted.

    Returns:
        ``(items int64 [m], candidate_sources float32 [m, len(SOURCES)])``, ``m <= n``.
    """
    return merge(source_lists(tables, ann, window, blocked, n), tables.budgets, n)


def two_tower_scores(user_vectors: np.ndarray, item_vectors: np.ndarray, items: np.ndarray) -> np.ndarray:
    """float32 [..., n] inner products of users [..., d] with their candidates ``items`` [..., n].

    Padding (-1) candidates score ``-inf``. Multiply-and-sum rather than BLAS: bit-identical
    for one user online and many users offline, and no thread wake-ups for 200 x dim floats.
    """
    items = np.asarray(items, np.int64)
    user = np.asarray(user_vectors, np.float32)[..., None, :]
    scores = (item_vectors[np.where(items >= 0, items, 0)] * user).sum(-1, dtype=np.float32)
    return np.where(items >= 0, scores, -np.inf).astype(np.float32)


def blocked_mask(n_items: int, exclude: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """bool [n_items]: True for items never to return (excluded, or outside ``allowed``)."""
    mask = np.zeros(n_items, bool) if allowed is None else ~np.asarray(allowed, bool)
    exclude = np.asarray(exclude, np.int64)
    mask[exclude[exclude >= 0]] = True
    return mask
