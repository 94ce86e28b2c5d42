"""``recsys batch-score``: top-K recommendations for many users through Triton's HTTP endpoint.

The offline twin of the online path, for e-mail campaigns, caches and offline evaluation
of what is actually served. Per chunk of users:

1. **Inputs**: each user's last ``L`` interactions from ``interactions.parquet`` cut with
   :meth:`export.history.Histories.last` (the window the user tower was trained on:
   time-ordered, ties by movie id, left-padded with item -1 / rating 0), and demographic
   codes from the data's ``users.csv`` where there is one (zeros = unknown otherwise).
2. **User tower** over Triton HTTP with binary tensors, in requests of the model's
   ``max_batch_size`` rows, several in flight.
3. **Retrieval**: FAISS top-``N`` from the ``artifacts/faiss`` bundle, excluding every item
   the user has interacted with (:meth:`orchestrator.ann.IndexBundle.search`), merged with
   the other candidate sources of ``candidate_tables.npz`` exactly as the orchestrator and
   the evaluation merge them (:mod:`orchestrator.candidates`).
4. **Ranking**: ``ranker_ensemble`` over Triton HTTP, one row per candidate (candidates are
   the batch dimension); whole users are packed into each request up to the ensemble's
   ``max_batch_size`` rows, so one request carries many users.
5. **Top-K** per user by ranker score; ties go to the better merged rank, so the order
   is deterministic.

Output: one Parquet file with ``user_id, rank (1-based), movie_id, score, model_version``
(the ``ranker_ensemble`` version that scored the row; every request of a run is pinned to
the versions found at start, so a model published mid-run cannot mix versions).

Restartable: each chunk of users is written to ``<out>.parts/part-XXXXX.parquet``
atomically (temporary name, then rename) and recorded in ``<out>.parts/state.json``. A
rerun of the same command skips recorded chunks and recomputes any other, so a crash at
any point leaves neither a partial nor a duplicate chunk. The state also holds a
fingerprint of the run (users, k, N, chunking, model versions, artifacts); a rerun that
differs is refused instead of silently mixing results. When every chunk is done the parts
are combined into ``<out>`` (again via a temporary name) and the parts folder is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from export.candidates import merged_from_ann
from export.history import Histories
from export.items import Catalog
from orchestrator.artifacts import ITEM_EMBEDDINGS, Demographics, DemographicsMismatch
from orchestrator.artifacts import load_demographics as _load_demographics
from orchestrator.candidates import TABLES_FILE, CandidateTables
from orchestrator.contract import (
    HISTORY,
    HISTORY_RATING,
    ITEM,
    RANKER_ENSEMBLE,
    RANKER_HISTORY,
    RANKER_MAX_ROWS,
    SCORE,
    USER_EMBEDDING,
    USER_TOWER,
    candidate_feeds,
    user_tower_feeds,
)

log = logging.getLogger(__name__)

ENSEMBLE = RANKER_ENSEMBLE
MAX_ROWS_PER_CALL = RANKER_MAX_ROWS
"""Rows per ``ranker_ensemble`` call (the ensemble has no batch axis, so no max_batch_size says it)."""
STATE_VERSION = 1
SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("rank", pa.int32()),
        ("movie_id", pa.int64()),
        ("score", pa.float32()),
        ("model_version", pa.int64()),
    ]
)
_TRITON_DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}


class BatchScoreError(ValueError):
    """The run cannot start or continue (bad arguments, mismatched resume state, server problems)."""


class StopRequested(Exception):
    """Raised by a chunk callback to end a run early, leaving its parts for a resume."""


# --------------------------------------------------------------------------- user data


@dataclass(frozen=True)
class UserData:
    """What the tower and the ranker need to know about users.

    Attributes:
        histories: Every user's time-ordered interactions (item indices).
        demographics: Demographic codes (empty when the data has no ``users.csv``).
        movie_ids: int64 [n_items], the movie id of each item index.
    """

    histories: Histories
    demographics: Demographics
    movie_ids: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.movie_ids)


def load_catalog(artifacts: str | Path) -> Catalog:
    """A :class:`Catalog` from ``items.parquet`` with just what id mapping needs.

    Histories only map movie ids to item indices (``Catalog.to_items``), so titles, years and
    genres are left empty; the item order is the table's ``item`` column.
    """
    table = pd.read_parquet(Path(artifacts) / "items.parquet", columns=["item", "movie_id"]).sort_values("item")
    items = table["item"].to_numpy(np.int64)
    if not np.array_equal(items, np.arange(len(items))):
        raise BatchScoreError(f"{artifacts}/items.parquet: item column must be 0..n-1")
    movie_ids = table["movie_id"].to_numpy(np.int64)
    if len(movie_ids) > 1 and not np.all(np.diff(movie_ids) > 0):
        # Catalog.to_items binary-searches movie ids, which holds only when item order is movie order
        raise BatchScoreError(f"{artifacts}/items.parquet: movie ids are not increasing with the item index")
    n = len(movie_ids)
    return Catalog(
        movie_ids=movie_ids,
        titles=np.full(n, "", dtype=object),
        years=np.zeros(n, np.int32),
        genres=[],
        genre_matrix=np.zeros((n, 0), np.float32),
        genre_strings=np.full(n, "", dtype=object),
    )


def load_demographics(artifacts: str | Path, data_dir: str | Path | None = None) -> Demographics:
    """Demographic codes as the user tower was trained with them (:func:`orchestrator.artifacts.load_demographics`).

    Raises:
        BatchScoreError: The occupations differ from training's.
    """
    try:
        return _load_demographics(artifacts, data_dir)
    except DemographicsMismatch as exc:
        raise BatchScoreError(str(exc)) from exc


def load_user_data(artifacts: str | Path, data_dir: str | Path | None = None) -> UserData:
    """Histories (from ``interactions.parquet``), demographics and the item id mapping."""
    artifacts = Path(artifacts)
    catalog = load_catalog(artifacts)
    frame = pd.read_parquet(artifacts / "interactions.parquet", columns=["user_id", "movie_id", "rating", "timestamp"])
    return UserData(Histories.from_frame(frame, catalog), load_demographics(artifacts, data_dir), catalog.movie_ids)


def resolve_users(spec: str | int | Sequence[int] | np.ndarray, histories: Histories) -> np.ndarray:
    """The user ids a run scores, in output order.

    Args:
        spec: ``"all"`` (every user with interactions), a count ``N`` (the first ``N`` of
            those by id), a file (one id per line, or a CSV/Parquet with a ``user_id``
            column), or the ids themselves. Users without interactions are still scored
            (padding history, demographics only).
        histories: The interaction store.

    Returns:
        int64 user ids, duplicates removed, first occurrence kept.
    """
    if isinstance(spec, (np.ndarray, list, tuple)):
        ids = np.asarray(spec, dtype=np.int64)
    elif isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if n <= 0:
            raise BatchScoreError(f"--users {spec}: the count must be positive")
        ids = histories.user_ids[:n]
    elif isinstance(spec, str) and spec.strip().lower() == "all":
        ids = histories.user_ids
    else:
        path = Path(str(spec))
        if not path.is_file():
            raise BatchScoreError(f"--users {spec}: neither 'all', a count nor an existing file")
        if path.suffix == ".parquet":
            ids = pd.read_parquet(path, columns=["user_id"])["user_id"].to_numpy()
        elif path.suffix == ".csv":
            ids = pd.read_csv(path, usecols=["user_id"])["user_id"].to_numpy()
        else:
            lines = [s.strip() for s in path.read_text().splitlines()]
            try:
                ids = np.array([int(s) for s in lines if s and not s.startswith("#")], dtype=np.int64)
            except ValueError as exc:
                raise BatchScoreError(f"{path}: expected one integer user id per line ({exc})") from exc
        ids = np.asarray(ids, dtype=np.int64)
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def user_windows(data: UserData, user_ids: np.ndarray, history_len: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One history read for ``user_ids``: the user tower's inputs (its window of ``history_len``,
    ratings, demographics) and the ranker's per-user inputs (the last ``RANKER_HISTORY`` items and
    ratings), the tower's window being the last ``L`` of the ranker's, as served."""
    history, rating = data.histories.last(user_ids, RANKER_HISTORY)
    tower = user_tower_feeds(history[:, -history_len:], rating[:, -history_len:], data.demographics.lookup(user_ids))
    return tower, history, rating


def candidate_rows(
    cand_items: np.ndarray,
    cand_scores: np.ndarray,
    cand_sources: np.ndarray,
    history: np.ndarray,
    history_rating: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``ranker_ensemble`` rows: one per valid candidate, grouped by user, in merge order.

    ``retrieval_rank`` is the 0-based position in the merged list, as in training
    (:func:`export.ranker.candidate_features`). Padding (-1) candidates are dropped rather
    than scored: they are not items.

    Users keep different numbers of valid candidates, so every row carries its own history
    row (the graph's U = N, C = 1 layout): any split of the rows is a valid call.

    Returns:
        ``(inputs, user_row, rank)``: the tensors [R, ...], the position in the chunk of each
        row's user and each row's retrieval rank (int64).
    """
    valid = cand_items >= 0
    user_row, rank = np.nonzero(valid)  # row-major: grouped by user, ranks ascending
    # each row carries its own user's history row (U = N, C = 1): any split of the rows is a valid call
    inputs = candidate_feeds(
        cand_items[user_row, rank],
        cand_scores[user_row, rank],
        rank,
        history[user_row],
        history_rating[user_row],
        cand_sources[user_row, rank],
    )
    return inputs, user_row.astype(np.int64), rank.astype(np.int64)


def top_k_per_user(
    user_row: np.ndarray, rank: np.ndarray, item: np.ndarray, score: np.ndarray, n_users: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` best rows of each user: score descending, then retrieval rank ascending.

    Returns:
        ``(user_row, out_rank, item, score)`` of the kept rows, grouped by user in chunk
        order, ``out_rank`` 1-based.
    """
    order = np.lexsort((rank, -score.astype(np.float64), user_row))
    user_sorted = user_row[order]
    starts = np.searchsorted(user_sorted, np.arange(n_users))
    position = np.arange(len(order)) - starts[user_sorted]
    keep = position < k
    kept = order[keep]
    return user_row[kept], (position[keep] + 1).astype(np.int32), item[kept], score[kept]


# --------------------------------------------------------------------------- Triton client


def _host_port(url: str) -> str:
    """``host:port`` from ``http://host:port[/]`` (tritonclient adds the scheme itself)."""
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    return url.rstrip("/")


@dataclass
class ModelInfo:
    """What the client needs to know about one served model.

    Attributes:
        name: Model name.
        version: The version every request of this run is pinned to.
        max_batch_size: Largest batch (rows) one request may carry.
        dims: Input name -> dims without the batch axis.
    """

    name: str
    version: int
    max_batch_size: int
    dims: dict[str, list[int]] = field(default_factory=dict)


class TritonHTTP:
    """Binary-tensor inference over Triton's HTTP endpoint, several requests in flight.

    Args:
        url: ``host:port`` (an ``http://`` prefix is accepted).
        concurrency: Requests in flight (and HTTP connections). Two or more let the
            ensemble's two steps and the network overlap.
        timeout: Network timeout per request in seconds.
    """

    def __init__(self, url: str, concurrency: int = 4, timeout: float = 300.0):
        import tritonclient.http as httpclient  # imports gevent: only when scoring

        self._http = httpclient
        self.url = _host_port(url)
        self.concurrency = max(1, int(concurrency))
        self.client = httpclient.InferenceServerClient(
            self.url, concurrency=self.concurrency, connection_timeout=timeout, network_timeout=timeout
        )

    def close(self) -> None:
        self.client.close()

    def model(self, name: str) -> ModelInfo:
        """The newest READY version of ``name`` with its batch limit and input dims.

        Raises:
            BatchScoreError: The server is unreachable or the model is not ready.
        """
        try:
            if not self.client.is_model_ready(name):
                raise BatchScoreError(f"{name}: not ready on {self.url}")
            meta = self.client.get_model_metadata(name)
            config = self.client.get_model_config(name)
        except BatchScoreError:
            raise
        except Exception as exc:  # tritonclient raises its own and socket errors alike
            raise BatchScoreError(f"{name}: cannot query Triton at {self.url}: {exc}") from exc
        versions = sorted(int(v) for v in meta.get("versions", []) if str(v).isdigit())
        ready = [v for v in versions if self.client.is_model_ready(name, str(v))]
        if not ready:
            raise BatchScoreError(f"{name}: no READY version on {self.url}")
        dims = {t["name"]: [int(d) for d in t.get("dims", [])] for t in config.get("input", [])}
        return ModelInfo(name, ready[-1], int(config.get("max_batch_size", 0)), dims)

    def _request(self, info: ModelInfo, arrays: dict[str, np.ndarray], output: str):
        inputs = []
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            t = self._http.InferInput(name, list(array.shape), _TRITON_DTYPES[array.dtype])
            t.set_data_from_numpy(array, binary_data=True)
            inputs.append(t)
        outputs = [self._http.InferRequestedOutput(output, binary_data=True)]
        return self.client.async_infer(info.name, inputs, model_version=str(info.version), outputs=outputs)

    def infer_rows(self, info: ModelInfo, arrays: dict[str, np.ndarray], output: str, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        """Runs ``arrays`` split at ``bounds`` (row ranges), at most ``concurrency`` in flight.

        Returns:
            The output rows concatenated in input order.
        """
        pending: list[tuple[int, Any]] = []
        results: list[np.ndarray | None] = [None] * len(bounds)

        def collect(entry: tuple[int, Any]) -> None:
            i, request = entry
            try:
                out = request.get_result().as_numpy(output)
            except Exception as exc:  # InferenceServerException, socket errors: one message for the CLI
                raise BatchScoreError(f"{info.name} v{info.version}: inference failed on {self.url}: {exc}") from exc
            if out is None or len(out) != bounds[i][1] - bounds[i][0]:
                # a failing Python-backend model can answer with an empty output instead of
                # an error (docs/platform.md, numpy 2): never let that pass as scores
                got = None if out is None else out.shape
                raise BatchScoreError(f"{info.name}: output {output} has shape {got} for {bounds[i][1] - bounds[i][0]} rows")
            results[i] = out

        for i, (lo, hi) in enumerate(bounds):
            if len(pending) >= self.concurrency:
                collect(pending.pop(0))
            pending.append((i, self._request(info, {n: a[lo:hi] for n, a in arrays.items()}, output)))
        for entry in pending:
            collect(entry)
        if not results:
            return np.zeros((0,), np.float32)
        return np.concatenate(results)


def even_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[(0, size), (size, 2 size), ...]`` covering ``n`` rows."""
    size = max(1, int(size))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def user_bounds(user_row: np.ndarray, n_users: int, max_rows: int) -> list[tuple[int, int]]:
    """Row ranges holding whole users with at most ``max_rows`` rows each (greedy packing).

    A user's candidates stay in one request so that a request is a set of complete
    rankings; a user with more candidates than ``max_rows`` gets requests of their own.
    """
    counts = np.bincount(user_row, minlength=n_users)
    bounds: list[tuple[int, int]] = []
    start = end = 0
    for c in counts:
        c = int(c)
        if end > start and end - start + c > max_rows:
            bounds.append((start, end))
            start = end
        end += c
        while end - start > max_rows:  # only for a single user wider than a request
            bounds.append((start, start + max_rows))
            start += max_rows
    if end > start:
        bounds.append((start, end))
    return bounds


# --------------------------------------------------------------------------- resumable output


def parts_dir(out: str | Path) -> Path:
    """``<out>.parts``: where the chunks of an unfinished run live."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, payload: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def _file_digest(path: Path) -> str | None:
    """sha256 of a file, or None when it does not exist."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(
    users: np.ndarray, k: int, candidates: int, batch_size: int, versions: dict[str, int], artifacts: Path, index_sha: str | None
) -> dict[str, Any]:
    """Everything a chunk's content depends on; a resume must match it exactly."""
    return {
        "users_sha256": hashlib.sha256(np.ascontiguousarray(users, dtype=np.int64).tobytes()).hexdigest(),
        "n_users": int(len(users)),
        "k": int(k),
        "candidates": int(candidates),
        "batch_size": int(batch_size),
        "model_versions": {name: int(v) for name, v in sorted(versions.items())},
        "interactions_sha256": _file_digest(artifacts / "interactions.parquet"),
        "candidate_tables_sha256": _file_digest(artifacts / TABLES_FILE),
        "faiss_sha256": index_sha,
    }


class PartStore:
    """Chunk files and the state that says which are complete.

    A chunk counts as done only when its file exists *and* the state lists it: the file is
    renamed into place before the state is updated, so a crash in between only costs a
    recomputation (the rename overwrites), never a duplicate.
    """

    def __init__(self, out: Path, fingerprint: dict[str, Any], n_chunks: int, restart: bool = False):
        self.out = out
        self.dir = parts_dir(out)
        self.state_path = self.dir / "state.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        # two runs writing the same parts would each think a chunk is theirs to skip or redo
        self._lock = open(self.dir / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise BatchScoreError(f"{self.dir} is in use by another batch-score run") from exc
        try:
            self._open(fingerprint, n_chunks, restart)
        except BaseException:
            self.close()
            raise

    def _open(self, fingerprint: dict[str, Any], n_chunks: int, restart: bool) -> None:
        if restart:
            for path in (*self.dir.glob("part-*.parquet"), self.state_path):
                path.unlink(missing_ok=True)
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else None
        if state is not None and (state.get("state_version") != STATE_VERSION or state.get("fingerprint") != fingerprint):
            old = state.get("fingerprint", {})
            diff = sorted(k for k in set(fingerprint) | set(old) if fingerprint.get(k) != old.get(k))
            raise BatchScoreError(
                f"{self.dir} holds chunks of a different run (differs in: {', '.join(diff) or 'state version'}); "
                "rerun with --restart to discard them"
            )
        self.state = state or {"state_version": STATE_VERSION, "fingerprint": fingerprint, "n_chunks": n_chunks, "done": []}
        self.done = {int(c) for c in self.state["done"] if self.part(int(c)).is_file()}
        _write_json(self.state_path, self._payload())

    def part(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:05d}.parquet"

    def _payload(self) -> dict[str, Any]:
        self.state["done"] = sorted(self.done)
        self.state["updated_at"] = pd.Timestamp.now(tz="UTC").isoformat()
        return self.state

    def commit(self, chunk: int, table: pa.Table) -> None:
        """Writes one chunk atomically, then records it."""
        _write_atomic(self.part(chunk), lambda p: pq.write_table(table, p))
        self.done.add(chunk)
        _write_json(self.state_path, self._payload())

    def combine(self, metadata: dict[str, str]) -> int:
        """Concatenates every chunk in order into ``out`` (atomically); returns the row count."""
        rows = 0
        schema = SCHEMA.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})

        def write(tmp: Path) -> None:
            nonlocal rows
            with pq.ParquetWriter(tmp, schema) as writer:
                for chunk in range(self.state["n_chunks"]):
                    table = pq.read_table(self.part(chunk)).cast(SCHEMA).replace_schema_metadata(schema.metadata)
                    rows += table.num_rows
                    writer.write_table(table)

        self.out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out, write)
        return rows

    def close(self) -> None:
        """Releases the folder's lock."""
        if not self._lock.closed:
            self._lock.close()

    def remove(self) -> None:
        """Deletes the parts folder (after :meth:`combine`), releasing the lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Timings:
    """Wall seconds per stage, summed over the chunks computed in this invocation."""

    inputs: float = 0.0
    user_tower: float = 0.0
    faiss: float = 0.0
    sources: float = 0.0
    ranker: float = 0.0
    write: float = 0.0


def _score_chunk(
    triton: TritonHTTP,
    tower: ModelInfo,
    ensemble: ModelInfo,
    bundle,
    tables: CandidateTables,
    item_vectors: np.ndarray,
    data: UserData,
    users: np.ndarray,
    history_len: int,
    candidates: int,
    k: int,
    timings: Timings,
) -> pa.Table:
    """One chunk of users through tower -> FAISS + other sources, merged -> ensemble -> top-K, as an Arrow table."""
    t = time.perf_counter()
    x, long_history, long_rating = user_windows(data, users, history_len)
    seen = data.histories.seen(users)
    timings.inputs += time.perf_counter() - t

    t = time.perf_counter()
    vectors = triton.infer_rows(tower, x, USER_EMBEDDING, even_bounds(len(users), tower.max_batch_size or len(users)))
    timings.user_tower += time.perf_counter() - t

    t = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ann, _ = bundle.search(vectors, candidates, exclude=seen)
    timings.faiss += time.perf_counter() - t

    t = time.perf_counter()
    cand_items, cand_scores, cand_sources = merged_from_ann(tables, ann, x[HISTORY], seen, vectors, item_vectors, candidates)
    timings.sources += time.perf_counter() - t

    t = time.perf_counter()
    rows, user_row, rank = candidate_rows(cand_items, cand_scores, cand_sources, long_history, long_rating)
    max_rows = ensemble.max_batch_size or MAX_ROWS_PER_CALL
    scores = triton.infer_rows(ensemble, rows, SCORE, user_bounds(user_row, len(users), max_rows)).reshape(-1)
    timings.ranker += time.perf_counter() - t

    urow, out_rank, item, score = top_k_per_user(user_row, rank, rows[ITEM].reshape(-1), scores, len(users), k)
    return pa.table(
        {
            "user_id": pa.array(users[urow], pa.int64()),
            "rank": pa.array(out_rank, pa.int32()),
            "movie_id": pa.array(data.movie_ids[item], pa.int64()),
            "score": pa.array(score.astype(np.float32), pa.float32()),
            "model_version": pa.array(np.full(len(urow), ensemble.version, np.int64), pa.int64()),
        },
        schema=SCHEMA,
    )


def _check_shapes(tower: ModelInfo, ensemble: ModelInfo, history_len: int, n_items: int, bundle) -> None:
    """Refuses a server whose models do not fit the artifacts (before any chunk is scored)."""
    problems = []
    for info, length in ((tower, history_len), (ensemble, RANKER_HISTORY)):
        for name in (HISTORY, HISTORY_RATING):
            dims = info.dims.get(name)
            if not dims or dims[-1] != length:  # [L] with a batch axis, [-1, H] without
                problems.append(f"{info.name} input {name} has dims {dims}, expected a last dim of {length}")
    if int(bundle.index.ntotal) != n_items:
        problems.append(f"the FAISS index holds {bundle.index.ntotal} items, items.parquet {n_items}")
    if problems:
        raise BatchScoreError("the served models do not match the artifacts: " + "; ".join(problems))


def batch_score(
    artifacts: str | Path,
    out: str | Path,
    users: str | int | Sequence[int] | np.ndarray = "all",
    *,
    url: str | None = None,
    repo: str | Path | None = "model_repository",
    k: int = 100,
    candidates: int | None = None,
    batch_size: int = 512,
    concurrency: int = 4,
    data_dir: str | Path | None = None,
    restart: bool = False,
    keep_parts: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int, pa.Table], None] | None = None,
    faiss_threads: int | None = 1,
) -> dict[str, Any]:
    """``recsys batch-score``: writes the top-``k`` of every requested user to ``out``.

    Args:
        artifacts: Folder written by ``recsys train`` (with the ``faiss/`` bundle of
            ``recsys export``).
        out: Output Parquet file.
        users: See :func:`resolve_users`.
        url: Triton HTTP ``host:port``; None starts the embedded Triton on ``repo`` for the
            duration of the run.
        repo: Model repository for the embedded Triton.
        k: Recommendations per user.
        candidates: Retrieval depth ``N`` (default: the ranker's training depth from the
            manifest, else 200).
        batch_size: Users per chunk (one part file, one unit of restart).
        concurrency: Triton requests in flight.
        data_dir: Folder with ``users.csv`` for demographics (default: the manifest's).
        restart: Discard the parts of an earlier run instead of resuming it.
        keep_parts: Keep ``<out>.parts`` after combining (default: removed).
        progress: Show a progress bar.
        on_chunk: Called with ``(chunk index, table)`` after each chunk is committed; raising
            :class:`StopRequested` (or anything) ends the run with the chunks so far kept.
        faiss_threads: OpenMP threads for FAISS (None: FAISS's default). One by default:
            Triton shares the machine's cores with this process.

    Returns:
        A summary: users, rows, chunks (computed / resumed), seconds, users per second,
        model versions, per-stage timings.

    Raises:
        BatchScoreError: Bad arguments, models or resume state.
        FileNotFoundError: An artifact or the FAISS bundle is missing.
    """
    from tqdm.auto import tqdm

    from orchestrator.ann import load_index_bundle

    t_start = time.perf_counter()
    artifacts, out = Path(artifacts), Path(out)
    if k <= 0 or batch_size <= 0 or concurrency <= 0:
        raise BatchScoreError("--k, --batch-size and --concurrency must be positive")
    bundle_dir = artifacts / "faiss"
    if not (bundle_dir / "index.json").is_file():
        raise FileNotFoundError(f"{bundle_dir}/index.json: no FAISS bundle (run `recsys export`, which builds it)")
    manifest_path = artifacts / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if candidates is None:
        candidates = int(manifest.get("ranker", {}).get("config", {}).get("candidates", 200))
    if k > candidates:
        raise BatchScoreError(f"--k {k} exceeds the retrieval depth {candidates} (--candidates)")

    data = load_user_data(artifacts, data_dir)
    user_ids = resolve_users(users, data.histories)
    if len(user_ids) == 0:
        raise BatchScoreError("no users to score")
    if candidates > data.n_items:
        raise BatchScoreError(f"--candidates {candidates} exceeds the catalog ({data.n_items} items)")
    bundle = load_index_bundle(bundle_dir)
    tables = CandidateTables.load(artifacts / TABLES_FILE)
    item_vectors = np.load(artifacts / ITEM_EMBEDDINGS, allow_pickle=False).astype(np.float32)
    if tables.n_items != data.n_items or len(item_vectors) != data.n_items:
        raise BatchScoreError(f"{artifacts}: candidate tables / item vectors do not match items.parquet ({data.n_items} items)")

    server = None
    with contextlib.ExitStack() as stack:
        if faiss_threads is not None:
            import faiss

            previous = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(int(faiss_threads))
            stack.callback(faiss.omp_set_num_threads, previous)  # a process-wide setting: give it back
        if url is None:
            from orchestrator.tritonserver import EmbeddedTriton

            if repo is None:
                raise BatchScoreError("give --url or --repo")
            server = EmbeddedTriton(repo).start()
            stack.callback(server.stop)
            url = server.http_url
        triton = TritonHTTP(url, concurrency=concurrency)
        stack.callback(triton.close)
        tower, ensemble = triton.model(USER_TOWER), triton.model(ENSEMBLE)
        history_len = tower.dims.get(HISTORY, [0])[0]
        _check_shapes(tower, ensemble, history_len, data.n_items, bundle)
        versions = {USER_TOWER: tower.version, ENSEMBLE: ensemble.version}
        fingerprint = run_fingerprint(
            user_ids, k, candidates, batch_size, versions, artifacts, bundle.meta.get("sha256", {}).get("faiss.index")
        )
        chunks = even_bounds(len(user_ids), batch_size)
        store = PartStore(out, fingerprint, len(chunks), restart=restart)
        stack.callback(store.close)
        resumed = sorted(store.done)
        timings = Timings()
        computed_users = 0
        bar = tqdm(
            total=len(user_ids),
            initial=sum(hi - lo for c, (lo, hi) in enumerate(chunks) if c in store.done),
            unit="user",
            desc="batch-score",
            disable=not progress,
            file=sys.stderr,
        )
        t_compute = time.perf_counter()
        try:
            for c, (lo, hi) in enumerate(chunks):
                if c in store.done:
                    continue
                table = _score_chunk(
                    triton, tower, ensemble, bundle, tables, item_vectors, data, user_ids[lo:hi], history_len, candidates, k, timings
                )
                t = time.perf_counter()
                store.commit(c, table)
                timings.write += time.perf_counter() - t
                computed_users += hi - lo
                bar.update(hi - lo)
                if on_chunk is not None:
                    on_chunk(c, table)
        finally:
            bar.close()
        compute_s = time.perf_counter() - t_compute
        metadata = {
            "recsys.model_versions": json.dumps(versions),
            "recsys.k": str(k),
            "recsys.candidates": str(candidates),
            "recsys.created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        }
        rows = store.combine(metadata)
        if not keep_parts:
            store.remove()
    return {
        "out": str(out),
        "users": int(len(user_ids)),
        "rows": int(rows),
        "k": k,
        "candidates": candidates,
        "chunks": len(chunks),
        "chunks_resumed": len(resumed),
        "model_versions": versions,
        "url": _host_port(url),
        "embedded_triton": server is not None,
        "users_computed": computed_users,
        "compute_seconds": round(compute_s, 2),
        "users_per_second": round(computed_users / compute_s, 1) if compute_s > 0 and computed_users else None,
        "stage_seconds": {name: round(v, 2) for name, v in vars(timings).items()},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
