"""The user-tower call overlapped with the candidate sources that need no user vector.

``ServeSettings.overlap_user_tower`` runs the tower call on a pool thread while the request
thread computes the item-neighbour, genre and popular lists. The answers must be exactly the
sequential path's, and the call must really leave the request thread (else nothing overlaps).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from orchestrator.backends import InProcessBackend
from orchestrator.catalog import Catalog, Filters
from orchestrator.errors import Deadline
from orchestrator.pipeline import Query, Recommender
from orchestrator.rerank import RerankOptions
from orchestrator.settings import ServeSettings
from orchestrator.store import SqliteHistoryStore


class ThreadRecordingBackend(InProcessBackend):
    """The in-process models, noting which thread each user-tower call ran on."""

    def __init__(self, repo) -> None:
        super().__init__(repo)
        self.tower_threads: list[str] = []

    def user_embedding(self, *args, **kwargs):
        self.tower_threads.append(threading.current_thread().name)
        return super().user_embedding(*args, **kwargs)


@pytest.fixture(scope="module")
def parts(tiny_artifacts, tiny_repository, tmp_path_factory):
    catalog = Catalog.load(tiny_artifacts, use_gpu=False)
    store = SqliteHistoryStore(tmp_path_factory.mktemp("overlap") / "h.sqlite")
    yield catalog, store, ThreadRecordingBackend(tiny_repository)
    store.close()


def answers(parts, tiny_artifacts, overlap: bool) -> list[tuple[list[int], list[float]]]:
    catalog, store, backend = parts
    settings = ServeSettings(artifacts_dir=tiny_artifacts, overlap_user_tower=overlap, retrieve_k=30, mmr_pool=30)
    rec = Recommender(settings, catalog, store, backend)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(12):
        movies = [int(m) for m in rng.choice(catalog.movie_ids, size=int(rng.integers(1, 9)), replace=False)]
        q = Query(10, Filters(), RerankOptions(0.7, 30), history=tuple(movies), ratings=(4.0,) * len(movies))
        r = rec.recommend(q, Deadline(5.0, 5.0))
        assert r.fallback is None
        out.append((r.items.tolist(), r.scores.tolist()))
    return out


def test_overlapped_answers_equal_the_sequential_ones(parts, tiny_artifacts):
    backend = parts[2]
    backend.tower_threads.clear()
    sequential = answers(parts, tiny_artifacts, overlap=False)
    assert backend.tower_threads and all(name == threading.current_thread().name for name in backend.tower_threads)
    backend.tower_threads.clear()
    overlapped = answers(parts, tiny_artifacts, overlap=True)
    assert backend.tower_threads and all(name.startswith("recsys-tower") for name in backend.tower_threads)
    assert overlapped == sequential
