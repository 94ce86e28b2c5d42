"""What the orchestrator serves from in process: the item table, the item vectors, FAISS, and
the candidate sources' tables (``candidate_tables.npz``: item neighbours, popular lists).

Loaded once at start (:meth:`Catalog.load`), read-only afterwards, shared by every worker
thread. Items are addressed by *item index* (``0..n_items-1``, the row of the item table)
inside; movie ids appear only at the API's edge (:meth:`Catalog.to_items`,
:attr:`Catalog.movie_ids`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from orchestrator.ann import IndexBundle, ItemFilter, load_index_bundle, to_device
from orchestrator.artifacts import DRIFT_REFERENCE, Demographics, items_of
from orchestrator.artifacts import load_demographics as read_demographics
from orchestrator.candidates import TABLES_FILE, CandidateTables, blocked_mask, merge, side_lists, two_tower_scores
from orchestrator.contract import CANDIDATE_SOURCE_NAMES as SOURCES
from orchestrator.drift import DriftReference
from orchestrator.errors import InvalidArgument, NotFound
from orchestrator.mmr import blend_vectors
from orchestrator.settings import ServeSettings

log = logging.getLogger(__name__)

YEAR_RANGE = (1800, 2100)
"""Release years a filter may name."""


@dataclass(frozen=True)
class Filters:
    """The request's item filters, validated by the service (see ``Filters`` in the proto).

    Attributes:
        genres: Genre names, any-of (case-insensitive).
        min_year: Earliest release year, inclusive.
        max_year: Latest release year, inclusive.
        min_mean_rating: Lowest Bayesian mean rating.
        exclude_movie_ids: Movie ids never to return.
        include_seen: Return movies the user already rated.
    """

    genres: tuple[str, ...] = ()
    min_year: int | None = None
    max_year: int | None = None
    min_mean_rating: float | None = None
    exclude_movie_ids: tuple[int, ...] = ()
    include_seen: bool = False


def load_demographics(artifacts: Path, manifest: dict) -> Demographics | None:
    """The training users' demographic codes, when the data folder the manifest names is here.

    Known MovieLens users then get the codes the tower was trained with, and the online
    answer agrees with ``recsys batch-score``'s (which reads them the same way). Deployments
    without the data (ml-25m/32m have no ``users.csv``) serve zeros, which the tower was
    trained to handle.
    """
    recorded = manifest.get("data", {}).get("path")
    if not recorded:
        return None
    folder = next((p for p in (Path(recorded), artifacts.parent / recorded) if (p / "users.csv").is_file()), None)
    if folder is None:
        return None
    try:
        demo = read_demographics(artifacts, folder)
    except Exception as exc:  # a vocabulary mismatch must not stop serving: codes become unknown
        log.warning("demographics from %s not used: %s", folder, exc)
        return None
    return demo if len(demo.user_ids) else None


class Catalog:
    """Item attributes, vectors and the FAISS index of one artifacts folder.

    Attributes:
        n_items: Catalog size.
        movie_ids: int64 [n_items], movie id of each item index.
        titles: Titles (no year).
        genres: Genre names of each item.
        years: int64 [n_items], 0 = unknown.
        popularity: int64 [n_items] ratings up to the training cut-off.
        recent_popularity: int64 [n_items] ratings in the 30 days before it.
        vectors: float32 [n_items, dim] unit item embeddings (FAISS' vectors too).
        mmr_vectors: float32 rows whose inner product is MMR's blended similarity.
        index: The FAISS bundle searched by :meth:`retrieve`.
        history_len: The user tower's history window ``L`` (from the manifest).
        manifest: The artifacts' ``manifest.json``.
        demographics: :class:`~orchestrator.artifacts.Demographics` of the training data's users, or
            None (every user's codes unknown).
        tables: The candidate sources' tables and budgets, published with the artifacts.
        drift_reference: The export's drift reference (``drift_reference.json``), or None
            (artifacts written before drift references existed: no ``recsys_drift_psi``).
    """

    def __init__(
        self,
        items: pd.DataFrame,
        vectors: np.ndarray,
        index: IndexBundle,
        manifest: dict,
        mmr_genre_weight: float,
        tables: CandidateTables,
        demographics: Demographics | None = None,
    ):
        items = items.sort_values("item").reset_index(drop=True)
        if not np.array_equal(items["item"].to_numpy(), np.arange(len(items))):
            raise ValueError("items.parquet: the item column must be 0..n-1")
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} item vectors for {len(items)} items")
        self.n_items = len(items)
        self.movie_ids = items["movie_id"].to_numpy(np.int64)
        self._order = np.argsort(self.movie_ids, kind="stable")
        self._sorted_ids = self.movie_ids[self._order]
        self.titles = items["title"].astype(str).to_numpy(dtype=object)
        self.genres: list[list[str]] = [[g for g in s.split("|") if g] for s in items["genres"].fillna("").astype(str)]
        self.years = items["year"].fillna(0).to_numpy(np.int64)
        self.popularity = items["popularity"].to_numpy(np.int64)
        self.recent_popularity = items["recent_popularity"].to_numpy(np.int64)
        self.filter = ItemFilter(items)
        self._genre_codes = {g.lower(): i for i, g in enumerate(self.filter.genres)}
        self.genre_matrix = np.zeros((self.n_items, len(self.filter.genres)), np.float32)
        for i, names in enumerate(self.genres):
            for g in names:
                self.genre_matrix[i, self._genre_codes[g.lower()]] = 1.0
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.mmr_vectors = blend_vectors([self.vectors, self.genre_matrix], [1.0 - mmr_genre_weight, mmr_genre_weight])
        self.index = index
        self.manifest = manifest
        self.demographics = demographics
        if tables.n_items != len(items):
            raise ValueError(f"candidate tables for {tables.n_items} items, items.parquet has {len(items)}")
        self.tables = tables
        self.history_len = int(manifest["two_tower"]["config"]["history_len"])
        self.drift_reference: DriftReference | None = None
        # most-rated first, ties by item index: the popular lists are precomputed orders
        self._by_popularity = np.lexsort((np.arange(self.n_items), -self.popularity))
        self._by_recent = np.lexsort((np.arange(self.n_items), -self.recent_popularity))

    @classmethod
    def load(
        cls, artifacts_dir: str | Path, mmr_genre_weight: float = ServeSettings.mmr_genre_weight, use_gpu: bool | None = None
    ) -> Catalog:
        """Reads ``items.parquet``, ``item_embeddings.npy``, ``manifest.json``, the candidate tables
        and the FAISS bundle.

        Without ``faiss/index.json`` (``recsys train`` alone does not build one) an exact
        ``IndexFlatIP`` over the embeddings is built in memory: on catalogs up to ~10^5 items
        it is also the fastest kind (export/faiss_index.py measures this).

        Args:
            artifacts_dir: Folder written by ``recsys train``.
            mmr_genre_weight: Share of genre cosine in MMR's similarity.
            use_gpu: Where FAISS searches (None: the GPU when there is one).
        """
        art = Path(artifacts_dir)
        manifest = json.loads((art / "manifest.json").read_text())
        items = pd.read_parquet(art / "items.parquet")
        vectors = np.load(art / "item_embeddings.npy", allow_pickle=False).astype(np.float32)
        if (art / "faiss" / "index.json").is_file():
            bundle = load_index_bundle(art / "faiss")
            if bundle.vectors is None:
                bundle.vectors = vectors
        else:
            flat = faiss.IndexFlatIP(vectors.shape[1])
            flat.add(vectors)
            bundle = IndexBundle(flat, np.arange(len(vectors), dtype=np.int64), {"kind": "flat", "built": "in memory"}, vectors)
            log.info("%s has no FAISS bundle: serving an exact in-memory flat index", art)
        bundle.index = to_device(bundle.index, use_gpu)
        if not (art / TABLES_FILE).is_file():
            raise FileNotFoundError(
                f"{art / TABLES_FILE}: missing candidate tables (artifacts from before multi-source candidates: re-run `recsys train`)"
            )
        tables = CandidateTables.load(art / TABLES_FILE)
        catalog = cls(items, vectors, bundle, manifest, mmr_genre_weight, tables, load_demographics(art, manifest))
        if (art / DRIFT_REFERENCE).is_file():
            try:
                catalog.drift_reference = DriftReference.load(art / DRIFT_REFERENCE)
            except ValueError as exc:  # drift monitoring is optional: serving goes on without it
                log.warning("%s not used, no drift metrics: %s", art / DRIFT_REFERENCE, exc)
        return catalog

    # ------------------------------------------------------------------ ids

    def demographics_of(self, user_id: int | None) -> np.ndarray:
        """int64 [1, 3] codes the user tower reads (zeros = unknown, e.g. for a history-only user)."""
        if user_id is None or self.demographics is None:
            return np.zeros((1, 3), dtype=np.int64)
        return self.demographics.lookup(np.array([user_id], dtype=np.int64)).astype(np.int64)

    def to_items(self, movie_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Item index of each movie id; -1 for ids not in the catalog."""
        return items_of(self._sorted_ids, movie_ids, self._order)

    def item_of(self, movie_id: int) -> int:
        """The item index of one movie id.

        Raises:
            NotFound: The movie is not in the catalog.
        """
        item = int(self.to_items([movie_id])[0])
        if item < 0:
            raise NotFound(f"movie {movie_id} is not in the catalog ({self.n_items} movies)")
        return item

    # ------------------------------------------------------------------ filters

    def allowed(self, filters: Filters) -> np.ndarray | None:
        """bool [n_items] of the items the filters admit; None when nothing is filtered.

        Raises:
            InvalidArgument: A genre no item has.
        """
        unknown = [g for g in filters.genres if g.strip().lower() not in self._genre_codes]
        if unknown:
            raise InvalidArgument(f"unknown genre(s) {unknown}; known genres: {', '.join(self.filter.genres)}")
        if not filters.genres and filters.min_year is None and filters.max_year is None and filters.min_mean_rating is None:
            return None
        return self.filter.mask(filters.genres, filters.min_year, filters.max_year, filters.min_mean_rating)

    def excluded(self, filters: Filters, seen: np.ndarray | None = None) -> np.ndarray:
        """Item indices never to return: the explicit exclusions plus ``seen`` unless included."""
        parts = [self.to_items(filters.exclude_movie_ids)]
        if seen is not None and not filters.include_seen:
            parts.append(np.asarray(seen, dtype=np.int64))
        out = np.unique(np.concatenate(parts))
        return out[out >= 0]

    # ------------------------------------------------------------------ lookups

    def retrieve(self, query: np.ndarray, k: int, allowed: np.ndarray | None, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top-``k`` by inner product among the admissible items (filters inside the search).

        Returns:
            ``(items int64 [m], scores float32 [m])`` best first, ``m <= k`` (fewer when the
            filters admit fewer).
        """
        k = max(1, min(k, self.n_items))
        items, scores = self.index.search(np.asarray(query, np.float32).reshape(1, -1), k, exclude=[exclude], allowed_mask=allowed)
        keep = items[0] >= 0
        return items[0][keep], scores[0][keep]

    def side_lists(self, window: np.ndarray, k: int, allowed: np.ndarray | None, exclude: np.ndarray) -> list[np.ndarray]:
        """The candidate sources that do not need the user vector (:func:`~orchestrator.candidates.side_lists`).

        Args:
            window: int64 [L] history window (-1 padded).
            k: Longest list wanted from each source.
            allowed: bool [n_items] admitted by the filters, or None.
            exclude: Item indices never to return.
        """
        return side_lists(self.tables, window, blocked_mask(self.n_items, exclude, allowed), k)

    def candidates(
        self,
        user: np.ndarray,
        window: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        exclude: np.ndarray,
        ann_only: bool = False,
        side: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The merged candidate set: FAISS top-``k`` plus the other sources, as evaluation merges them.

        Args:
            user: float32 [dim] user vector.
            window: int64 [L] history window (-1 padded).
            k: Candidates wanted (each source's list is up to ``k`` long too).
            allowed: bool [n_items] admitted by the filters, or None.
            exclude: Item indices never to return.
            ann_only: The FAISS list alone, no other source (``ServeSettings.candidate_sources``
                ``two_tower``): each item's two-tower rank, -1 in every other column.
            side: :meth:`side_lists` of the same window, filters and ``k`` when already computed
                (the pipeline computes them while the user tower runs); computed here otherwise.

        Returns:
            ``(items int64 [m], scores float32 [m], sources float32 [m, S])``, ``m <= k``: merge
            order, the two-tower inner product of each, and each one's rank in every source.
        """
        ann, _ = self.retrieve(user, k, allowed, exclude)
        if ann_only:
            items, sources = ann, np.full((len(ann), len(SOURCES)), -1.0, np.float32)
            sources[:, SOURCES.index("two_tower")] = np.arange(len(ann))
        else:
            if side is None:
                side = self.side_lists(window, k, allowed, exclude)
            items, sources = merge([np.asarray(ann, np.int64)[:k], *side], self.tables.budgets, k)
        scores = two_tower_scores(np.asarray(user, np.float32).reshape(-1), self.vectors, items)
        return items, scores, sources

    def popular(self, k: int, recent: bool, allowed: np.ndarray | None, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most rated admissible items and their counts (all time or recent window)."""
        order = self._by_recent if recent else self._by_popularity
        ok = np.ones(self.n_items, dtype=bool) if allowed is None else allowed.copy()  # never edit the caller's mask
        ok[exclude] = False
        picked = order[ok[order]][:k]
        counts = (self.recent_popularity if recent else self.popularity)[picked]
        return picked, counts.astype(np.float32)

    def freshness(self, items: np.ndarray) -> np.ndarray:
        """Release year scaled to 0..1 over the catalog's known years (unknown year: 0)."""
        known = self.years[self.years > 0]
        if known.size == 0:
            return np.zeros(len(items), np.float32)
        lo, hi = known.min(), known.max()
        years = self.years[items]
        return np.where(years > 0, (years - lo) / max(hi - lo, 1), 0.0).astype(np.float32)

    def nearest_in(self, items: np.ndarray, history: np.ndarray) -> np.ndarray:
        """For each item, the history item whose embedding is the most similar (for explanations)."""
        if len(history) == 0 or len(items) == 0:
            return np.full(len(items), -1, dtype=np.int64)
        sims = self.vectors[items] @ self.vectors[history].T
        return history[np.argmax(sims, axis=1)]
