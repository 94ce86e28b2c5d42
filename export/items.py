"""The catalog: item indices, static item attributes and statistics as of a cut-off time.

Every model in the project addresses movies by *item index* ``0..n_items-1`` (the row of the
movie in ``movies.csv`` order); ``-1`` means "no item" (padding). Movie ids only appear at the
edges (loading, the item table shipped to the orchestrator, the API).

Popularity and mean ratings depend on time, so :func:`item_stats` takes the interactions of
the past and the cut-off second, and never looks beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from orchestrator.artifacts import items_of

YEAR_BUCKETS = (0, 1930, 1950, 1960, 1970, 1980, 1985, 1990, 1993, 1995, 1997, 2000, 2005, 2010, 2015, 2020)
"""Lower edges of release-year buckets; bucket 0 is "unknown year"."""

POP_BUCKETS = 10
"""Popularity buckets: 0 = never rated, then 1..9 by log-count."""

RECENT_DAYS = 30
"""Window of "recent" popularity, in days before the cut-off."""

PRIOR_RATINGS = 10.0
"""Pseudo-count of the Bayesian mean rating: an item with few ratings is pulled to the global mean."""


@dataclass(frozen=True)
class Catalog:
    """Static attributes of every movie, aligned by item index.

    Attributes:
        movie_ids: int64 [n_items], movie id of each item index.
        titles: Titles without the year.
        years: int32 [n_items], release year, 0 when unknown.
        genres: Genre vocabulary.
        genre_matrix: float32 [n_items, n_genres] multi-hot.
        genre_strings: The original ``A|B`` genre strings.
    """

    movie_ids: np.ndarray
    titles: np.ndarray
    years: np.ndarray
    genres: list[str]
    genre_matrix: np.ndarray
    genre_strings: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.movie_ids)

    @classmethod
    def from_movies(cls, movies: pd.DataFrame, genres: list[str], genre_matrix: np.ndarray) -> Catalog:
        """Builds the catalog from the loader's ``movies`` frame (sorted by movie id)."""
        return cls(
            movie_ids=movies.movie_id.to_numpy(dtype=np.int64),
            titles=movies.title.to_numpy(dtype=object),
            years=movies.year.to_numpy(dtype=np.int32),
            genres=list(genres),
            genre_matrix=np.asarray(genre_matrix, dtype=np.float32),
            genre_strings=movies.genres.to_numpy(dtype=object),
        )

    def index_of(self) -> pd.Series:
        """A Series mapping movie id -> item index."""
        return pd.Series(np.arange(self.n_items, dtype=np.int64), index=self.movie_ids)

    def to_items(self, movie_ids: np.ndarray | pd.Series) -> np.ndarray:
        """Maps movie ids to item indices; unknown ids map to -1."""
        return items_of(self.movie_ids, movie_ids)  # the item order is movie-id order

    def year_buckets(self) -> np.ndarray:
        """int64 [n_items] year bucket ids; 0 = unknown year."""
        edges = np.asarray(YEAR_BUCKETS[1:], dtype=np.int32)
        b = np.searchsorted(edges, self.years, side="right") + 1
        return np.where(self.years > 0, b, 0).astype(np.int64)


@dataclass(frozen=True)
class ItemStats:
    """Per-item statistics computed only from interactions before ``cutoff``.

    Attributes:
        cutoff: Unix second the statistics are "as of".
        count: float32 [n_items] ratings before the cut-off.
        recent_count: float32 [n_items] ratings in the ``RECENT_DAYS`` before the cut-off.
        mean_rating: float32 [n_items] Bayesian mean rating (``PRIOR_RATINGS`` pseudo-ratings at the global mean).
        first_seen_days: float32 [n_items] days between the item's first rating and the cut-off (0 if never rated).
    """

    cutoff: int
    count: np.ndarray
    recent_count: np.ndarray
    mean_rating: np.ndarray
    first_seen_days: np.ndarray

    def pop_buckets(self) -> np.ndarray:
        """int64 [n_items] popularity buckets: 0 never rated, else 1..POP_BUCKETS-1 by log-count."""
        logc = np.log1p(self.count)
        top = max(float(logc.max()), 1e-6)
        b = 1 + np.floor(logc / top * (POP_BUCKETS - 2) + 1e-9).astype(np.int64)
        return np.where(self.count > 0, np.minimum(b, POP_BUCKETS - 1), 0)


def item_stats(past: pd.DataFrame, catalog: Catalog, cutoff: int) -> ItemStats:
    """Computes :class:`ItemStats` from the interactions before ``cutoff``.

    Args:
        past: Interactions; rows at or after ``cutoff`` are ignored (so no future leaks in).
        catalog: The catalog defining item indices.
        cutoff: Unix second.
    """
    past = past[past.timestamp < cutoff]
    items = catalog.to_items(past.movie_id.to_numpy())
    keep = items >= 0
    items, ratings, ts = items[keep], past.rating.to_numpy(np.float64)[keep], past.timestamp.to_numpy()[keep]
    n = catalog.n_items
    count = np.bincount(items, minlength=n).astype(np.float64)
    recent = ts >= cutoff - RECENT_DAYS * 86400
    recent_count = np.bincount(items[recent], minlength=n).astype(np.float64)
    total = np.bincount(items, weights=ratings, minlength=n)
    global_mean = float(ratings.mean()) if len(ratings) else 3.5
    mean = (total + PRIOR_RATINGS * global_mean) / (count + PRIOR_RATINGS)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, items, ts)
    first_days = np.where(count > 0, (cutoff - first) / 86400.0, 0.0)
    return ItemStats(
        cutoff=int(cutoff),
        count=count.astype(np.float32),
        recent_count=recent_count.astype(np.float32),
        mean_rating=mean.astype(np.float32),
        first_seen_days=first_days.astype(np.float32),
    )
