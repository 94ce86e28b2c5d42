"""Bounded history reads: ``recent`` (last n + seen set) agrees with the full ``history``."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
from test_service_store import redis_url  # noqa: F401  (the real redis-server fixture)

from orchestrator.store import RedisHistoryStore, SqliteHistoryStore

USER = 5


@pytest.fixture
def interactions(tmp_path):
    rng = np.random.default_rng(3)
    n = 300
    ts = np.sort(rng.integers(0, 120, n))  # many ties in time: the offline order breaks them by movie id
    frame = pd.DataFrame({"user_id": USER, "movie_id": rng.integers(1, 80, n), "rating": 4.0, "timestamp": ts})
    frame = frame.drop_duplicates(["user_id", "movie_id", "timestamp"])
    frame = pd.concat([frame, pd.DataFrame({"user_id": [6], "movie_id": [1], "rating": [3.0], "timestamp": [0]})])
    path = tmp_path / "interactions.parquet"
    frame.to_parquet(path)
    return path


def check_recent(store) -> None:
    full = store.history(USER)
    for n in (0, 1, 7, 20, 50, len(full), len(full) + 5):
        h, seen = store.recent(USER, n)
        want = slice(len(full) - min(n, len(full)), len(full))
        assert h.movie_ids.tolist() == full.movie_ids[want].tolist()
        assert h.timestamps.tolist() == full.timestamps[want].tolist()
        assert h.ratings.tolist() == full.ratings[want].tolist()
        assert seen.tolist() == np.unique(full.movie_ids).tolist()
    store.record(USER, 500, 2.0, 10_000)
    store.record(USER, 500, 2.0, 10_000)  # a retry
    h, seen = store.recent(USER, 1)
    assert h.movie_ids.tolist() == [500] and h.ratings.tolist() == [2.0] and 500 in seen.tolist()
    assert seen.tolist() == np.unique(store.history(USER).movie_ids).tolist()
    store.delete_user(USER)
    h, seen = store.recent(USER, 10)
    assert len(h) == 0 and len(seen) == 0
    assert store.recent(999, 10)[1].size == 0


def test_sqlite_recent_and_seen(tmp_path, interactions):
    store = SqliteHistoryStore(tmp_path / "h.sqlite", interactions)
    check_recent(store)
    store.close()


def test_sqlite_builds_seen_sets_for_old_stores(tmp_path, interactions):
    db = tmp_path / "h.sqlite"
    SqliteHistoryStore(db, interactions).close()
    with sqlite3.connect(db) as conn:  # a store written before seen sets existed
        conn.execute("DROP TABLE seen")
        conn.execute("DELETE FROM meta WHERE key = 'seen_v1'")
    store = SqliteHistoryStore(db, interactions)
    assert store.recent(USER, 0)[1].tolist() == np.unique(store.history(USER).movie_ids).tolist()
    assert store.recent(6, 0)[1].tolist() == [1]
    store.close()


def test_redis_recent_and_seen(redis_url, interactions):  # noqa: F811
    store = RedisHistoryStore(redis_url, interactions, prefix="w:")
    check_recent(store)
    store.client.delete("w:seen_v1", "w:s:6")  # as before seen sets existed
    again = RedisHistoryStore(redis_url, interactions, prefix="w:")
    assert again.recent(6, 0)[1].tolist() == [1]
    store.close()
    again.close()


def test_the_window_skips_movies_the_catalog_lost(tiny_artifacts, tmp_path):
    from orchestrator.catalog import Catalog
    from orchestrator.pipeline import Recommender
    from orchestrator.settings import ServeSettings

    catalog = Catalog.load(tiny_artifacts, use_gpu=False)
    store = SqliteHistoryStore(tmp_path / "h.sqlite")
    L = catalog.history_len
    known = [int(m) for m in catalog.movie_ids[: L + 3]]
    for t, m in enumerate(known):
        store.record(77, m, 4.0, t)
    for t in range(3 * L):  # newer rows of movies a retrain dropped
        store.record(77, 9_000_000 + t, 4.0, 1_000 + t)
    rec = Recommender(ServeSettings(artifacts_dir=tiny_artifacts), catalog, store, backend=None)  # type: ignore[arg-type]
    h, seen = rec.stored_window(77)
    assert len(h) > L and (catalog.to_items(h.movie_ids) >= 0).sum() >= L
    from orchestrator.catalog import Filters
    from orchestrator.pipeline import Query
    from orchestrator.rerank import RerankOptions

    window, _ = rec.window(Query(5, Filters(), RerankOptions(0.5, 10), user_id=77))
    assert window.length == L and catalog.movie_ids[window.items].tolist() == known[-L:]
    assert sorted(catalog.movie_ids[window.seen].tolist()) == sorted(known)
    store.close()
