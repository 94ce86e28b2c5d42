"""The request log: what was recommended to whom, written off the request path, and its replay.

Every answered Recommend (each answer of a BatchRecommend too), Similar and Popular becomes
one row of a SQLite table (file: :meth:`ServeSettings.request_log_db`, beside the history DB
by default)::

    request_id       TEXT     uuid4 hex; the call's ``x-request-id`` trailing metadata
    timestamp        REAL     Unix seconds when the answer was ready
    user_id          INTEGER  NULL for explicit-history Recommends and Popular
    rpc              TEXT     Recommend / BatchRecommend / Similar / Popular
    movie_ids        TEXT     JSON list of the returned movie ids, best first
    scores           TEXT     JSON list of their scores (see RecommendedItem.score)
    latency_ms       REAL     server-side time of the answer
    model_version    TEXT     model repository version, or "popularity"
    fallback_reason  TEXT     NULL, or no_history / model_unavailable / model_timeout / ...
    variant          TEXT     A/B variant ("" until experiments exist)
    drift            TEXT     NULL, or the model answer's drift sample (``DriftSample.to_json``),
                              read by ``recsys drift``; serialised by the writer thread

A request never waits for the log: :meth:`RequestLog.log` puts the row on a bounded queue and
returns; when the queue is full the row is dropped and counted. One writer thread drains the
queue and inserts whatever has accumulated in one transaction (large batches under load,
single rows when idle). :meth:`RequestLog.close` writes what is queued before returning.
The log is analytics, not acknowledged data: ``synchronous=NORMAL`` (a power cut may lose the
last rows, never corrupt the file).

Retention: the writer thread prunes the table every ``prune_interval_s`` (and
:meth:`RequestLog.prune` on demand): rows older than ``max_age_s`` go, then the oldest rows
beyond ``max_rows`` (``ServeSettings.request_log_max_age_s`` / ``request_log_max_rows``; None
turns either off). SQLite reuses the freed pages for new rows, so the file stops growing
once the table is at its bound (it does not shrink: ``VACUUM`` it offline for that).

:func:`replay` joins the log with the history store's SQLite file offline
(``recsys replay``): of the movies recommended to a user, how many the user interacted with
afterwards.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.drift import DriftSample
from orchestrator.errors import Unavailable

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id      TEXT    NOT NULL,
    timestamp       REAL    NOT NULL,
    user_id         INTEGER,
    rpc             TEXT    NOT NULL,
    movie_ids       TEXT    NOT NULL,
    scores          TEXT    NOT NULL,
    latency_ms      REAL    NOT NULL,
    model_version   TEXT    NOT NULL,
    fallback_reason TEXT,
    variant         TEXT    NOT NULL DEFAULT '',
    drift           TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_user ON requests (user_id, timestamp);
CREATE INDEX IF NOT EXISTS requests_by_id ON requests (request_id);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (timestamp);
"""

REPLAYED_RPCS = ("Recommend", "BatchRecommend")
"""The RPCs whose rows :func:`replay` scores (personal recommendations)."""


@dataclass(frozen=True)
class LogRow:
    """One answered call (see the module docstring for the columns)."""

    request_id: str
    timestamp_s: float
    user_id: int | None
    rpc: str
    movie_ids: list[int]
    scores: list[float]
    latency_ms: float
    model_version: str
    fallback_reason: str | None = None
    variant: str = ""
    drift: DriftSample | None = None

    def values(self) -> tuple:
        return (
            self.request_id,
            self.timestamp_s,
            self.user_id,
            self.rpc,
            json.dumps(self.movie_ids),
            json.dumps([round(s, 6) for s in self.scores]),
            self.latency_ms,
            self.model_version,
            self.fallback_reason,
            self.variant,
            self.drift.to_json() if self.drift is not None else None,
        )


class _Command:
    """Work for the writer thread, run in queue order (after every row queued before it)."""

    def __init__(self, run: Callable[[sqlite3.Connection], Any]):
        self.run = run
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


_STOP = object()


class RequestLog:
    """The request log's writer (see the module docstring).

    Args:
        path: The SQLite file (created with its folder).
        queue_size: Rows waiting at most; more are dropped.
        batch_rows: Most rows one transaction inserts.
        on_drop: Called once per dropped row (a metric's ``inc``).
        on_write: Called with the number of rows each committed batch wrote.
        max_age_s: Rows older than this are pruned; None: kept whatever their age.
        max_rows: At most this many rows are kept (the newest); None: no bound.
        prune_interval_s: How often the writer prunes (also once at start).
        clock: Unix seconds (tests pass a fake to age rows).
    """

    def __init__(
        self,
        path: str | Path,
        queue_size: int = 10_000,
        batch_rows: int = 512,
        on_drop: Callable[[], None] | None = None,
        on_write: Callable[[int], None] | None = None,
        max_age_s: float | None = None,
        max_rows: int | None = None,
        prune_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {max_age_s}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.path = Path(path)
        self.batch_rows = batch_rows
        self.max_age_s = max_age_s
        self.max_rows = max_rows
        self.prune_interval_s = prune_interval_s
        self.pruned = 0
        self._clock = clock
        self._next_prune = 0.0  # the first batch (or idle wake-up) prunes what a long stop left
        self.dropped = 0
        self._on_drop = on_drop
        self._on_write = on_write
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # created here so that a bad path fails at start-up; used by the writer thread only
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(requests)")}
        if "drift" not in columns:  # a log written before drift samples existed
            self._conn.execute("ALTER TABLE requests ADD COLUMN drift TEXT")
        self._thread = threading.Thread(target=self._run, name="recsys-request-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the request path

    def log(self, row: LogRow) -> bool:
        """Queues a row without waiting; False when it was dropped (queue full or log closed)."""
        if not self._closed:
            try:
                self._queue.put_nowait(row)
                return True
            except queue.Full:
                pass
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop()
        return False

    # ------------------------------------------------------------------ commands

    def _submit(self, run: Callable[[sqlite3.Connection], Any], timeout_s: float, what: str) -> Any:
        if self._closed:
            raise Unavailable(f"the request log is closed; cannot {what}")
        cmd = _Command(run)
        try:
            self._queue.put(cmd, timeout=timeout_s)  # rare admin work may wait for room
        except queue.Full:
            raise Unavailable(f"the request log is busy; cannot {what} now, retry") from None
        if not cmd.done.wait(timeout_s):
            raise Unavailable(f"the request log did not {what} within {timeout_s:g} s, retry")
        if cmd.error is not None:
            raise Unavailable(f"the request log cannot {what}: {cmd.error}") from cmd.error
        return cmd.result

    def flush(self, timeout_s: float = 5.0) -> None:
        """Returns once every row queued before the call is written.

        Raises:
            Unavailable: Not done within ``timeout_s``, or the log is closed.
        """
        self._submit(lambda conn: None, timeout_s, "flush")

    def delete_user(self, user_id: int, timeout_s: float = 5.0) -> int:
        """Deletes the user's rows, including those still queued; the number deleted.

        Raises:
            Unavailable: Not done within ``timeout_s``, the log is closed, or SQLite failed.
        """

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM requests WHERE user_id = ?", (int(user_id),)).rowcount

        return int(self._submit(delete, timeout_s, "delete the user's rows"))

    def prune(self, timeout_s: float = 30.0) -> int:
        """Applies the retention now (after every row queued before the call); rows deleted.

        Raises:
            Unavailable: Not done within ``timeout_s``, the log is closed, or SQLite failed.
        """
        return int(self._submit(self._prune, timeout_s, "prune"))

    def _prune(self, conn: sqlite3.Connection) -> int:
        """Deletes rows past ``max_age_s``, then the oldest beyond ``max_rows`` (writer thread only)."""
        deleted = 0
        with conn:
            conn.execute("BEGIN")
            if self.max_age_s is not None:
                deleted += conn.execute("DELETE FROM requests WHERE timestamp < ?", (self._clock() - self.max_age_s,)).rowcount
            if self.max_rows is not None:
                # rowids grow with insertion: the newest max_rows rows are the highest rowids
                deleted += conn.execute(
                    "DELETE FROM requests WHERE rowid <= (SELECT rowid FROM requests ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                    (self.max_rows,),
                ).rowcount
        if deleted:
            log.info("request log: pruned %d rows (max_age_s=%s, max_rows=%s)", deleted, self.max_age_s, self.max_rows)
        self.pruned += deleted
        self._next_prune = time.monotonic() + self.prune_interval_s
        return deleted

    def _maybe_prune(self) -> None:
        if (self.max_age_s is None and self.max_rows is None) or time.monotonic() < self._next_prune:
            return
        try:
            self._prune(self._conn)
        except sqlite3.Error as exc:  # retention is housekeeping: log, retry at the next interval
            log.error("request log: pruning failed: %s", exc)
            self._next_prune = time.monotonic() + self.prune_interval_s

    def close(self, timeout_s: float = 10.0) -> None:
        """Writes what is queued, stops the writer and closes the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.error("request log: the writer is stuck; %d rows are lost", self._queue.qsize())
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._conn.close()

    # ------------------------------------------------------------------ the writer thread

    def _write(self, rows: list[LogRow]) -> None:
        if not rows:
            return
        try:
            with self._conn:  # one transaction
                self._conn.execute("BEGIN")
                self._conn.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [r.values() for r in rows])
        except sqlite3.Error as exc:  # a full disk must not kill the writer: count and go on
            log.error("request log: %d rows lost: %s", len(rows), exc)
            self.dropped += len(rows)
            if self._on_drop is not None:
                for _ in rows:
                    self._on_drop()
            return
        if self._on_write is not None:
            self._on_write(len(rows))

    def _run(self) -> None:
        while True:
            self._maybe_prune()
            try:
                # wakes up at least once per interval, so an idle log is pruned too
                batch = [self._queue.get(timeout=max(0.01, self.prune_interval_s))]
            except queue.Empty:
                continue
            while len(batch) < self.batch_rows:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows: list[LogRow] = []
            for item in batch:
                if isinstance(item, LogRow):
                    rows.append(item)
                    continue
                self._write(rows)  # commands see every row queued before them
                rows = []
                if item is _STOP:
                    return
                try:
                    item.result = item.run(self._conn)
                except Exception as exc:  # reported to the caller, the writer lives on
                    item.error = exc
                item.done.set()
            self._write(rows)
            self._maybe_prune()


# ---------------------------------------------------------------------------- replay


def _ro_uri(path: Path) -> str:
    return Path(path).resolve().as_uri() + "?mode=ro"


_REPLAY_SQL = """
WITH per_request AS (
    SELECT r.rowid AS id, r.user_id, r.model_version, r.variant,
           COUNT(j.value) AS items,
           COALESCE(SUM(EXISTS (
               SELECT 1 FROM hist.interactions i
               WHERE i.user_id = r.user_id AND i.timestamp > r.timestamp
                 AND (:horizon IS NULL OR i.timestamp <= r.timestamp + :horizon)
                 AND i.movie_id = j.value
           )), 0) AS hits
    FROM main.requests r LEFT JOIN json_each(r.movie_ids) j
    WHERE r.user_id IS NOT NULL AND r.rpc IN ({rpcs})
    GROUP BY r.rowid
)
SELECT model_version, variant, user_id, COUNT(*), SUM(items), SUM(hits), SUM(hits > 0)
FROM per_request GROUP BY model_version, variant, user_id
"""


def _stats(groups: list[tuple]) -> dict[str, Any]:
    requests = sum(g[3] for g in groups)
    items = sum(g[4] for g in groups)
    hits = sum(g[5] for g in groups)
    with_hit = sum(g[6] for g in groups)
    return {
        "requests": requests,
        "users": len({g[2] for g in groups}),
        "items": items,
        "hits": hits,
        "hit_rate": hits / items if items else None,
        "requests_with_hit": with_hit,
        "request_hit_rate": with_hit / requests if requests else None,
    }


def replay(log_path: str | Path, history_db: str | Path, horizon_s: float | None = None) -> dict[str, Any]:
    """Hit rate of the logged recommendations against the history that followed them.

    For every logged Recommend (and BatchRecommend answer) that names a user, each returned
    movie is a *hit* when the user's history holds an interaction with it after the
    request's timestamp (and at most ``horizon_s`` after, when given). Both files are opened
    read-only; the server may be running.

    Args:
        log_path: The request log (SQLite).
        history_db: The history store's SQLite file.
        horizon_s: Longest delay, in seconds, for an interaction to count; None: any later.

    Returns:
        ``{"overall": S, "by_model_version": {version: S}, "by_variant": {variant: S}, ...}``
        where each ``S`` holds ``requests``, ``users``, ``items`` (recommended movies),
        ``hits``, ``hit_rate`` = hits / items, ``requests_with_hit`` and
        ``request_hit_rate`` = requests_with_hit / requests (rates None when empty).

    Raises:
        FileNotFoundError: A file is missing.
        sqlite3.Error: A file is not the expected database.
    """
    for path in (log_path, history_db):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    conn = sqlite3.connect(_ro_uri(Path(log_path)), uri=True)
    try:
        conn.execute("ATTACH DATABASE ? AS hist", (_ro_uri(Path(history_db)),))
        # named and positional parameters cannot mix: the (constant) RPC names are literals
        sql = _REPLAY_SQL.format(rpcs=", ".join(f"'{r}'" for r in REPLAYED_RPCS))
        groups = conn.execute(sql, {"horizon": horizon_s}).fetchall()
    finally:
        conn.close()
    by_version: dict[str, list[tuple]] = {}
    by_variant: dict[str, list[tuple]] = {}
    for g in groups:
        by_version.setdefault(g[0], []).append(g)
        by_variant.setdefault(g[1], []).append(g)
    return {
        "log": str(log_path),
        "history_db": str(history_db),
        "horizon_s": horizon_s,
        "overall": _stats(groups),
        "by_model_version": {k: _stats(v) for k, v in sorted(by_version.items())},
        "by_variant": {k: _stats(v) for k, v in sorted(by_variant.items())},
    }


def replay_table(report: dict[str, Any]) -> str:
    """:func:`replay`'s report as plain text."""

    def line(name: str, s: dict[str, Any]) -> str:
        rate = "-" if s["hit_rate"] is None else f"{s['hit_rate']:.4f}"
        req_rate = "-" if s["request_hit_rate"] is None else f"{s['request_hit_rate']:.4f}"
        return f"  {name:<20} {s['requests']:>9} {s['users']:>7} {s['items']:>9} {s['hits']:>7} {rate:>9} {req_rate:>12}"

    head = f"  {'':<20} {'requests':>9} {'users':>7} {'items':>9} {'hits':>7} {'hit rate':>9} {'req hit rate':>12}"
    out = [f"replay of {report['log']} against {report['history_db']}", head, line("overall", report["overall"])]
    out += [line(f"model {v}", s) for v, s in report["by_model_version"].items()]
    out += [line(f"variant {v or '(none)'}", s) for v, s in report["by_variant"].items()]
    return "\n".join(out)
