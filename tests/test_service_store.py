"""History stores: SQLite (default) and Redis (a real redis-server; skipped when none is installed)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import pytest

from orchestrator.store import RedisHistoryStore, SqliteHistoryStore


@pytest.fixture(scope="module")
def interactions(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "interactions.parquet"
    pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2],
            "movie_id": [30, 10, 20, 10, 40],
            "rating": np.array([4.0, 5.0, 3.0, 2.0, 4.5], np.float32),
            "timestamp": [300, 100, 100, 50, 60],
        }
    ).to_parquet(path)
    return path


def check_store(store) -> None:
    h = store.history(1)
    assert h.movie_ids.tolist() == [10, 20, 30]  # time order, ties by movie id (the offline order)
    assert h.ratings.tolist() == [5.0, 3.0, 4.0] and h.timestamps.tolist() == [100, 100, 300]
    assert len(store.history(999)) == 0
    assert store.record(1, 50, 0.0, 400) == (True, 4)
    assert store.record(1, 50, 0.0, 400) == (False, 4)  # idempotent
    assert store.history(1).movie_ids.tolist()[-1] == 50
    assert store.record(7, 10, 3.5, 1) == (True, 1)
    assert store.delete_user(2) == 2 and len(store.history(2)) == 0  # DeleteUser: seeded rows too
    assert store.delete_user(2) == 0 and store.delete_user(999) == 0


def test_sqlite_store_seeds_once_and_is_durable(tmp_path, interactions):
    db = tmp_path / "h.sqlite"
    store = SqliteHistoryStore(db, interactions)
    check_store(store)
    store.close()
    # a fresh process would see the acknowledged writes, and a restart does not re-seed
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0] == 5
    again = SqliteHistoryStore(db, interactions)
    assert again.history(1).movie_ids.tolist() == [10, 20, 30, 50]
    assert len(again.history(2)) == 0  # a deleted user stays deleted: no re-seed
    again.close()


def test_sqlite_store_takes_concurrent_writers(tmp_path, interactions):
    store = SqliteHistoryStore(tmp_path / "h.sqlite", interactions)
    errors = []

    def write(worker: int) -> None:
        try:
            for i in range(20):
                store.record(100, 1000 * worker + i, 4.0, i)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(store.history(100)) == 80
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_redis_store(redis_url, interactions):
    store = RedisHistoryStore(redis_url, interactions, prefix="t:")
    check_store(store)
    store.close()
    again = RedisHistoryStore(redis_url, interactions, prefix="t:")  # no re-seed
    assert again.history(1).movie_ids.tolist() == [10, 20, 30, 50]
    assert len(again.history(2)) == 0
    again.close()


def test_redis_store_down_is_unavailable():
    pytest.importorskip("redis")
    from orchestrator.errors import Unavailable

    store = RedisHistoryStore(f"redis://127.0.0.1:{_free_port()}/0", None, timeout_s=0.2)
    with pytest.raises(Unavailable):
        store.history(1)
    with pytest.raises(Unavailable):
        store.record(1, 2, 3.0, 4)
    with pytest.raises(Unavailable):
        store.delete_user(1)
