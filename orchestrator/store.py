"""The history store: every user's interactions, read by Recommend, appended by RecordInteraction.

Two implementations of one small interface (:class:`HistoryStore`):

* :class:`SqliteHistoryStore` (default): one file, WAL journal, ``synchronous=FULL``; a
  write is committed (and fsynced) before RecordInteraction acknowledges it. The table is
  clustered by ``(user_id, timestamp, movie_id)``, so one user's history is one ordered range
  scan.
* :class:`RedisHistoryStore`: per user a sorted set (score = timestamp) and a hash of
  ratings. Durability is the Redis server's: run it with ``appendonly yes`` and
  ``appendfsync always`` for the SQLite guarantee.

Both are seeded from ``artifacts/interactions.parquet`` the first time they start empty (a
seed marker records the file's sha256); an existing store is never re-seeded, so online
interactions survive restarts and retrains. Movies are stored by movie id: ids outlive item
indices across retrains. Writes are idempotent on ``(user_id, movie_id, timestamp)``.
``delete_user`` erases a user's interactions (DeleteUser); the seed marker keeps a restart
from bringing them back from the parquet file.

Bounded reads: Recommend reads :meth:`HistoryStore.recent`, the user's last ``n``
interactions and the *seen set* (every movie id the user interacted with, one packed int64
array per user kept beside the history), never the whole history: a user with 10,000
interactions costs about what one with 50 does. The seen sets are maintained on every write
and built once for stores created before they existed (at open, logged).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from orchestrator.artifacts import file_sha256
from orchestrator.errors import Unavailable

log = logging.getLogger(__name__)

SEED_CHUNK_ROWS = 200_000


@dataclass(frozen=True)
class UserHistory:
    """One user's interactions, oldest first (ties in time by movie id, as offline).

    Attributes:
        movie_ids: int64 [n].
        ratings: float32 [n], 0 = watched without a rating.
        timestamps: int64 [n] Unix seconds.
    """

    movie_ids: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def empty(cls) -> UserHistory:
        return cls(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.movie_ids)


class HistoryStore(Protocol):
    """What the pipeline needs from a history store."""

    def history(self, user_id: int) -> UserHistory:
        """The user's interactions (empty for an unknown user).

        Raises:
            Unavailable: The store cannot be read.
        """
        ...

    def recent(self, user_id: int, n: int) -> tuple[UserHistory, np.ndarray]:
        """The user's last ``n`` interactions (oldest first, the order of :meth:`history`) and
        their seen set (int64 movie ids, sorted, unique; all of the history, not only the last ``n``).

        Raises:
            Unavailable: The store cannot be read.
        """
        ...

    def record(self, user_id: int, movie_id: int, rating: float, timestamp_s: int) -> tuple[bool, int]:
        """Appends one interaction durably; ``(created, history length)``.

        Raises:
            Unavailable: The store cannot be written.
        """
        ...

    def delete_user(self, user_id: int) -> int:
        """Deletes every interaction of the user durably (GDPR erasure); how many there were.

        Raises:
            Unavailable: The store cannot be written.
        """
        ...

    def close(self) -> None:
        """Releases connections."""
        ...


def _seed_frame(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path, columns=["user_id", "movie_id", "rating", "timestamp"])
    # primary-key order: B-tree appends instead of random inserts (minutes saved on 32M rows)
    return frame.sort_values(["user_id", "timestamp", "movie_id"], kind="stable")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    user_id   INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    movie_id  INTEGER NOT NULL,
    rating    REAL    NOT NULL,
    PRIMARY KEY (user_id, timestamp, movie_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen (user_id INTEGER PRIMARY KEY, movie_ids BLOB NOT NULL);
"""
SEEN_MARKER = "seen_v1"
"""Meta key (SQLite) / key suffix (Redis) set once every user's seen set is built."""


def pack_seen(movie_ids: np.ndarray) -> bytes:
    """A seen set as stored: sorted unique little-endian int64."""
    return np.unique(np.asarray(movie_ids, np.int64)).astype("<i8").tobytes()


def unpack_seen(blob: bytes | None) -> np.ndarray:
    """The movie ids of a stored seen set (duplicates, e.g. Redis appends, removed)."""
    if not blob:
        return np.empty(0, np.int64)
    return np.unique(np.frombuffer(blob, "<i8").astype(np.int64))


class SqliteHistoryStore:
    """The history in one SQLite file (see the module docstring).

    One connection per thread (sqlite3 connections must not be shared across threads
    without serialising them); WAL lets readers run while a writer commits.

    Args:
        path: The database file (created with its folder if missing).
        seed_from: ``interactions.parquet`` to seed an empty store from.
        busy_timeout_s: How long a writer waits for another's lock before UNAVAILABLE.
    """

    def __init__(self, path: str | Path, seed_from: str | Path | None = None, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        if seed_from is not None:
            self._seed(Path(seed_from))
        self._build_seen()

    def _build_seen(self) -> None:
        """Builds every user's seen set once (stores seeded or written before seen sets existed)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM meta WHERE key = ?", (SEEN_MARKER,)).fetchone() is None:
                users = 0
                cur = conn.execute("SELECT user_id, movie_id FROM interactions ORDER BY user_id")  # primary-key order
                carry_user, carry = None, np.empty(0, np.int64)
                while rows := cur.fetchmany(SEED_CHUNK_ROWS):
                    arr = np.asarray(rows, np.int64)
                    bounds = np.flatnonzero(np.diff(arr[:, 0])) + 1
                    out = []
                    for part in np.split(arr, bounds):
                        user = int(part[0, 0])
                        if user == carry_user:
                            part_movies = np.concatenate([carry, part[:, 1]])
                        else:
                            if carry_user is not None:
                                out.append((carry_user, pack_seen(carry)))
                            part_movies = part[:, 1]
                        carry_user, carry = user, part_movies
                    users += len(out)
                    conn.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?)", out)
                if carry_user is not None:
                    conn.execute("INSERT OR REPLACE INTO seen VALUES (?, ?)", (carry_user, pack_seen(carry)))
                    users += 1
                conn.execute("INSERT INTO meta VALUES (?, '1')", (SEEN_MARKER,))
                log.info("%s: built the seen sets of %d users", self.path, users)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit mode; transactions are explicit (BEGIN ... COMMIT) below
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")  # commit = on disk, before we acknowledge
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _seed(self, parquet: Path) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # one seeder even if several servers start at once
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'seed_sha256'").fetchone()
            digest = file_sha256(parquet)
            if row is not None:
                if row[0] != digest:
                    log.warning("%s was seeded from another interactions file; keeping its history", self.path)
                conn.execute("COMMIT")
                return
            frame = _seed_frame(parquet)
            cols = (
                frame.user_id.to_numpy(np.int64),
                frame.timestamp.to_numpy(np.int64),
                frame.movie_id.to_numpy(np.int64),
                frame.rating.to_numpy(np.float64),
            )
            for s in range(0, len(frame), SEED_CHUNK_ROWS):
                rows = zip(*(c[s : s + SEED_CHUNK_ROWS].tolist() for c in cols))
                conn.executemany("INSERT OR IGNORE INTO interactions VALUES (?, ?, ?, ?)", rows)
            conn.execute("INSERT INTO meta VALUES ('seed_sha256', ?)", (digest,))
            conn.execute("COMMIT")
            log.info("seeded %s with %d interactions from %s", self.path, len(frame), parquet)
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def history(self, user_id: int) -> UserHistory:
        """See :meth:`HistoryStore.history`."""
        try:
            rows = (
                self._conn()
                .execute(
                    "SELECT movie_id, rating, timestamp FROM interactions WHERE user_id = ? ORDER BY timestamp, movie_id",
                    (int(user_id),),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise Unavailable(f"history store cannot be read: {exc}") from exc
        if not rows:
            return UserHistory.empty()
        movie, rating, ts = zip(*rows)
        return UserHistory(np.array(movie, np.int64), np.array(rating, np.float32), np.array(ts, np.int64))

    def recent(self, user_id: int, n: int) -> tuple[UserHistory, np.ndarray]:
        """See :meth:`HistoryStore.recent`: one index range read of ``n`` rows and one blob."""
        try:
            conn = self._conn()
            rows = conn.execute(
                "SELECT movie_id, rating, timestamp FROM interactions WHERE user_id = ? ORDER BY timestamp DESC, movie_id DESC LIMIT ?",
                (int(user_id), max(0, int(n))),
            ).fetchall()
            blob = conn.execute("SELECT movie_ids FROM seen WHERE user_id = ?", (int(user_id),)).fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"history store cannot be read: {exc}") from exc
        seen = unpack_seen(blob[0] if blob else None)
        if not rows:
            return UserHistory.empty(), seen
        movie, rating, ts = zip(*reversed(rows))
        return UserHistory(np.array(movie, np.int64), np.array(rating, np.float32), np.array(ts, np.int64)), seen

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` .. ``COMMIT`` (rolled back on any error); SQLite errors are :class:`Unavailable`."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise Unavailable(f"history store cannot be written: {exc}") from exc

    def record(self, user_id: int, movie_id: int, rating: float, timestamp_s: int) -> tuple[bool, int]:
        """See :meth:`HistoryStore.record`."""
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO interactions VALUES (?, ?, ?, ?)",
                (int(user_id), int(timestamp_s), int(movie_id), float(rating)),
            )
            created = cur.rowcount == 1
            if created:  # the seen set, in the same transaction
                blob = conn.execute("SELECT movie_ids FROM seen WHERE user_id = ?", (int(user_id),)).fetchone()
                seen = unpack_seen(blob[0] if blob else None)
                if not np.isin(movie_id, seen):
                    conn.execute("INSERT OR REPLACE INTO seen VALUES (?, ?)", (int(user_id), pack_seen(np.append(seen, movie_id))))
            (length,) = conn.execute("SELECT COUNT(*) FROM interactions WHERE user_id = ?", (int(user_id),)).fetchone()
        return created, int(length)

    def delete_user(self, user_id: int) -> int:
        """See :meth:`HistoryStore.delete_user`."""
        with self._transaction() as conn:
            deleted = conn.execute("DELETE FROM interactions WHERE user_id = ?", (int(user_id),)).rowcount
            conn.execute("DELETE FROM seen WHERE user_id = ?", (int(user_id),))
        return int(deleted)

    def close(self) -> None:
        """Closes every thread's connection."""
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()


class RedisHistoryStore:
    """The history in Redis (see the module docstring); needs the ``redis`` package.

    Keys: ``{prefix}h:{user}`` sorted set of ``"{movie_id}:{timestamp}"`` scored by timestamp,
    ``{prefix}r:{user}`` hash member -> rating, ``{prefix}s:{user}`` the seen set (packed
    int64 movie ids, appended by each write, deduplicated on read), ``{prefix}seed_sha256``
    the seed marker, ``{prefix}seen_v1`` set once every user's seen set is built.

    Args:
        url: ``redis://host:port/db``.
        seed_from: ``interactions.parquet`` to seed an empty store from.
        prefix: Key prefix (several deployments can share one Redis).
        timeout_s: Socket timeout of every command.
    """

    def __init__(self, url: str, seed_from: str | Path | None = None, prefix: str = "recsys:", timeout_s: float = 2.0):
        try:
            import redis
        except ImportError as exc:
            raise RuntimeError("history_store=redis needs the redis package (pip install redis)") from exc
        self._errors = (redis.RedisError, OSError)
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        if seed_from is not None:
            self._seed(Path(seed_from))
        self._build_seen()

    def _build_seen(self) -> None:
        """Builds every user's seen set once (stores seeded or written before seen sets existed).

        Redis unreachable at start: skipped with a warning (reads then fail UNAVAILABLE anyway)
        and done at the next start.
        """
        try:
            if not self.client.set(self.prefix + SEEN_MARKER, "building", nx=True):
                return
        except self._errors as exc:
            log.warning("redis unreachable, seen sets not checked: %s", exc)
            return
        users = 0
        for key in self.client.scan_iter(match=f"{self.prefix}h:*", count=1000):
            user = key.decode().rsplit(":", 1)[1]
            members: list[bytes] = self.client.zrange(key, 0, -1)  # type: ignore[assignment]  # redis stubs: sync client
            self.client.set(f"{self.prefix}s:{user}", pack_seen(np.array([int(m.split(b":")[0]) for m in members], np.int64)))
            users += 1
        self.client.set(self.prefix + SEEN_MARKER, "1")
        log.info("redis: built the seen sets of %d users", users)

    def _seed(self, parquet: Path) -> None:
        digest = file_sha256(parquet)
        marker = self.prefix + "seed_sha256"
        # SET NX elects one seeder; the value is only the digest once seeding completed
        if not self.client.set(marker, "seeding:" + digest, nx=True):
            return
        frame = _seed_frame(parquet)
        pipe = self.client.pipeline(transaction=False)
        for n, (u, m, r, t) in enumerate(
            zip(frame.user_id.tolist(), frame.movie_id.tolist(), frame.rating.tolist(), frame.timestamp.tolist())
        ):
            member = f"{m}:{t}"
            pipe.zadd(f"{self.prefix}h:{u}", {member: t})
            pipe.hset(f"{self.prefix}r:{u}", member, r)
            if n % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
        self.client.set(marker, digest)

    def history(self, user_id: int) -> UserHistory:
        """See :meth:`HistoryStore.history`."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrange(f"{self.prefix}h:{user_id}", 0, -1, withscores=True)
            pipe.hgetall(f"{self.prefix}r:{user_id}")
            members, ratings = pipe.execute()
        except self._errors as exc:
            raise Unavailable(f"history store (redis) cannot be read: {exc}") from exc
        if not members:
            return UserHistory.empty()
        parsed = [(int(ts), int(m.split(b":")[0]), float(ratings.get(m, 0.0))) for m, ts in members]
        parsed.sort()  # by time, then movie id: the offline order
        ts, movie, rating = zip(*parsed)
        return UserHistory(np.array(movie, np.int64), np.array(rating, np.float32), np.array(ts, np.int64))

    def recent(self, user_id: int, n: int) -> tuple[UserHistory, np.ndarray]:
        """See :meth:`HistoryStore.recent`: the last ``n`` members and the seen set, not the whole history.

        Members tied in time sort by their text in Redis but by movie id offline, so when the
        ``n`` fetched may cut through a tie, every member at the earliest fetched timestamp is
        fetched too and the order settled here.
        """
        h, r, sk = f"{self.prefix}h:{user_id}", f"{self.prefix}r:{user_id}", f"{self.prefix}s:{user_id}"
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.get(sk)
            if n > 0:
                pipe.zrange(h, -n, -1, withscores=True)
            blob, *fetched = pipe.execute()
            members = fetched[0] if fetched else []
            if n > 0 and len(members) == n:
                members = self.client.zrangebyscore(h, members[0][1], "+inf", withscores=True)
            ratings = self.client.hmget(r, [m for m, _ in members]) if members else []
        except self._errors as exc:
            raise Unavailable(f"history store (redis) cannot be read: {exc}") from exc
        seen = unpack_seen(blob)
        if not members:
            return UserHistory.empty(), seen
        parsed = sorted((int(ts), int(m.split(b":")[0]), float(v or 0.0)) for (m, ts), v in zip(members, ratings))[-n:]
        ts, movie, rating = zip(*parsed)
        return UserHistory(np.array(movie, np.int64), np.array(rating, np.float32), np.array(ts, np.int64)), seen

    def record(self, user_id: int, movie_id: int, rating: float, timestamp_s: int) -> tuple[bool, int]:
        """See :meth:`HistoryStore.record`."""
        member = f"{movie_id}:{timestamp_s}"
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.zadd(f"{self.prefix}h:{user_id}", {member: timestamp_s}, nx=True)
            pipe.hsetnx(f"{self.prefix}r:{user_id}", member, float(rating))
            # a retry appends its id again: the seen set is deduplicated on read
            pipe.append(f"{self.prefix}s:{user_id}", np.array([movie_id], "<i8").tobytes())
            pipe.zcard(f"{self.prefix}h:{user_id}")
            added, _, _, length = pipe.execute()
        except self._errors as exc:
            raise Unavailable(f"history store (redis) cannot be written: {exc}") from exc
        return bool(added), int(length)

    def delete_user(self, user_id: int) -> int:
        """See :meth:`HistoryStore.delete_user`."""
        try:
            pipe = self.client.pipeline(transaction=True)  # MULTI: count and delete at once
            pipe.zcard(f"{self.prefix}h:{user_id}")
            pipe.delete(f"{self.prefix}h:{user_id}", f"{self.prefix}r:{user_id}", f"{self.prefix}s:{user_id}")
            count, _ = pipe.execute()
        except self._errors as exc:
            raise Unavailable(f"history store (redis) cannot be written: {exc}") from exc
        return int(count)

    def close(self) -> None:
        """Closes the connection pool."""
        self.client.close()
