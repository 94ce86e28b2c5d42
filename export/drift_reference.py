"""The export's drift reference: the serving pipeline, run in process on the training users.

``recsys train`` (``export/pipeline.py`` :func:`~export.pipeline.save_artifacts`) calls
:func:`build_reference`: every user's final history (what the history store is seeded
with; a fixed-seed sample of :data:`REFERENCE_USERS` on large data) goes through the
orchestrator's own :class:`~orchestrator.pipeline.Recommender` with its default settings
(k = 10, default MMR), the models answering in process (:class:`FittedBackend`: the
PyTorch user tower and the LightGBM ranker whose ONNX export is parity-checked against
them to 1e-5). Each answer's :class:`~orchestrator.drift.DriftSample` is exactly what the
server records, so served traffic that looks like the training users has a PSI near 0.

The reference is written to ``artifacts/drift_reference.json``, one of the files whose
sha256 each published version records (``orchestrator/artifacts.py`` ``EXPORTED_FILES``).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import faiss
import lightgbm as lgb
import numpy as np
import pandas as pd

from export.features import RankerFeatures
from export.two_tower import TwoTower
from orchestrator.ann import IndexBundle
from orchestrator.artifacts import Demographics
from orchestrator.candidates import CandidateTables
from orchestrator.catalog import Catalog
from orchestrator.drift import DriftReference, DriftSample
from orchestrator.errors import Deadline
from orchestrator.pipeline import Query, Recommender, Result
from orchestrator.settings import ServeSettings
from orchestrator.store import UserHistory

REFERENCE_USERS = 3000
"""Users the reference is computed from at most (a fixed-seed sample beyond): ~30,000 values
per per-item distribution, enough that its own sampling noise adds < 0.01 to a PSI."""
REFERENCE_K = 10
"""``k`` of the reference's requests (the first :data:`~orchestrator.drift.OBSERVED_TOP` items are observed)."""
BATCH = 128


class FittedBackend:
    """An :class:`~orchestrator.backends.InferenceBackend` over the fitted models, in this process."""

    name = "fitted"

    def __init__(self, model: TwoTower, features: RankerFeatures, booster: lgb.Booster):
        self.model, self.features, self.booster = model, features, booster

    @property
    def model_version(self) -> str:
        return "export"

    def ready(self, timeout_s: float) -> bool:
        return True

    def user_embedding(
        self, history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray, timeout_s: float, version: int | None = None
    ) -> np.ndarray:
        return self.model.user_vectors(history, ratings, demographics).astype(np.float32)

    def rank(
        self,
        items: np.ndarray,
        retrieval_scores: np.ndarray,
        retrieval_ranks: np.ndarray,
        history: np.ndarray,
        ratings: np.ndarray,
        sources: np.ndarray,
        timeout_s: float,
        version: int | None = None,
    ) -> np.ndarray:
        feats = self.features.compute(  # the contract's layout: N = U * C, grouped by user
            items.astype(np.int64),
            retrieval_scores.astype(np.float32),
            retrieval_ranks.astype(np.float32),
            history,
            ratings,
            sources.astype(np.float32),
        )
        return np.asarray(self.booster.predict(feats, num_threads=1), np.float32).reshape(-1)

    def load_version(self, version: int, timeout_s: float) -> None:
        return None

    def close(self) -> None:
        return None


class RequestHistoriesOnly:
    """The history store of the reference run: every query carries its history, nothing is read."""

    def history(self, user_id: int) -> UserHistory:
        raise RuntimeError("the drift reference's queries carry their histories; the store is never read")


def final_histories(ratings: pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each user's movies and ratings, oldest first, ties by movie id (the history store's order)."""
    frame = ratings.sort_values(["user_id", "timestamp", "movie_id"], kind="stable")
    users = frame.user_id.to_numpy(np.int64)
    movies = frame.movie_id.to_numpy(np.int64)
    stars = frame.rating.to_numpy(np.float32)
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(users)]
    return {int(users[s]): (movies[s:e], stars[s:e]) for s, e in zip(starts, ends)}


def build_reference(
    items: pd.DataFrame,
    vectors: np.ndarray,
    model: TwoTower,
    features: RankerFeatures,
    booster: lgb.Booster,
    demographics: Demographics,
    ratings: pd.DataFrame,
    tables: CandidateTables,
    users: int = REFERENCE_USERS,
    seed: int = 0,
) -> DriftReference:
    """The drift reference of a trained model set (see the module docstring).

    Args:
        items: The item table (``items.parquet``'s frame).
        vectors: float32 [n_items, dim] item embeddings.
        model: The served two-tower.
        features: The served ranker feature module.
        booster: The served ranker.
        demographics: The users' demographic codes.
        ratings: Every interaction (what the history store is seeded with).
        tables: The published candidate sources' tables.
        users: Users to sample at most.
        seed: Sampling seed.

    Raises:
        ValueError: No user got a model answer.
    """
    settings = ServeSettings()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, np.float32))
    bundle = IndexBundle(flat, np.arange(len(vectors), dtype=np.int64), {"kind": "flat", "built": "drift reference"}, vectors)
    manifest = {"two_tower": {"config": asdict(model.config)}}
    catalog = Catalog(
        items, vectors, bundle, manifest, settings.mmr_genre_weight, tables, demographics if len(demographics.user_ids) else None
    )
    rec = Recommender(settings, catalog, RequestHistoriesOnly(), FittedBackend(model, features, booster))  # type: ignore[arg-type]

    from orchestrator.service import parse_recommend  # the server's defaults for an ordinary request
    from protos.recsys.v1 import recsys_pb2 as pb

    base = parse_recommend(pb.RecommendRequest(user_id=1, k=REFERENCE_K), settings)
    histories = final_histories(ratings)
    ids = np.array(sorted(histories), np.int64)
    if len(ids) > users:
        ids = np.sort(np.random.default_rng(seed).choice(ids, users, replace=False))
    samples: list[DriftSample] = []
    for lo in range(0, len(ids), BATCH):
        queries: list[Query] = []
        for u in ids[lo : lo + BATCH]:
            movies, stars = histories[int(u)]
            queries.append(replace(base, user_id=int(u), history=tuple(movies.tolist()), ratings=tuple(stars.tolist())))
        for r in rec.recommend_many(queries, Deadline(None, 600.0)):
            if isinstance(r, Result) and r.drift is not None:
                samples.append(r.drift)
    meta: dict[str, Any] = {
        "users": len(ids),
        "k": REFERENCE_K,
        "seed": seed,
        "settings": {k: getattr(settings, k) for k in ("retrieve_k", "mmr_lambda", "mmr_pool", "mmr_penalty", "mmr_genre_weight")},
        "index": "exact inner product (the served FAISS index approximates it)",
    }
    return DriftReference.from_samples(samples, catalog.filter.genres, meta)
