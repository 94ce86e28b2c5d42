"""The contract between the offline export and the online service: one home for each fact.

What the export writes and what the orchestrator, batch scoring, the perf_analyzer inputs and
the tests read, defined once here and imported everywhere else:

* **model names**: the five folders of the model repository;
* **tensors**: each model's input and output names, Triton data types and dims (batch axis
  excluded), for a model's sizes (:func:`model_tensors`), and the numpy dtypes the clients send
  (:func:`user_tower_feeds`, :func:`candidate_feeds`);
* **the history window**: the last ``L`` items, most recent last, left-padded with
  :data:`PAD_ITEM` / :data:`PAD_RATING` (:func:`history_windows`), which training, batch
  scoring, serving and the warm-up all cut with the same function;
* **the version layout**: ``<repo>/<model>/<N>/`` numeric folders, the newest common one is
  served (:func:`latest_version`), and the ``version.json`` each export writes beside the graph
  (:func:`read_version_info`).

This module imports numpy only: the offline side imports it, not the reverse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------- model names

USER_TOWER = "user_tower"
ITEM_TOWER = "item_tower"
RANKER_FEATURES = "ranker_features"
RANKER_TREES = "ranker"
RANKER_ENSEMBLE = "ranker_ensemble"
GRAPH_MODELS = (USER_TOWER, ITEM_TOWER, RANKER_FEATURES, RANKER_TREES)
"""The models backed by an ONNX graph, in the order the export writes them."""
MODEL_NAMES = (*GRAPH_MODELS, RANKER_ENSEMBLE)
"""Every folder of the model repository."""
SERVED_LEAF_MODELS = (USER_TOWER, RANKER_FEATURES, RANKER_TREES)
"""The graphs the online path runs (the ensemble chains the last two)."""
SERVED_MODELS = (*SERVED_LEAF_MODELS, RANKER_ENSEMBLE)
"""A version is published when every one of these has it."""
RANKER_MAX_ROWS = 4096
"""The ``ranker`` model's ``max_batch_size``: the most candidate rows one ``ranker_ensemble`` call
may carry (the unbatched ensemble hands all of a call's rows to that step as one batch)."""
KEPT_VERSIONS = 2
"""Versions served side by side (the configs' ``version_policy: latest 2``): the one being
replaced keeps answering its pinned requests while the next one loads, and A/B tests compare two."""

# ------------------------------------------------------------------------------ tensors

HISTORY = "history"
HISTORY_RATING = "history_rating"
DEMOGRAPHICS = "demographics"
USER_EMBEDDING = "user_embedding"
ITEM = "item"
ITEM_EMBEDDING = "item_embedding"
RETRIEVAL_SCORE = "retrieval_score"
RETRIEVAL_RANK = "retrieval_rank"
CANDIDATE_SOURCES = "candidate_sources"
"""Per candidate, its 0-based rank in each candidate source, -1 where absent (``orchestrator/candidates.py``)."""
FEATURES = "features"
SCORE = "score"
ENSEMBLE_FEATURES = "candidate_features"
"""The ensemble's intermediate tensor between ``ranker_features`` and ``ranker``."""
N_DEMOGRAPHICS = 3
"""Demographic codes per user: age bucket, gender, occupation."""

USER_INPUTS = (HISTORY, HISTORY_RATING, DEMOGRAPHICS)
"""The user tower's inputs, in graph order."""
CANDIDATE_SOURCE_NAMES = ("two_tower", "item_knn", "genre_popular", "recent_popular", "popular")
"""The candidate sources (``orchestrator/candidates.py``), in the column order of ``candidate_sources``."""
CANDIDATE_INPUTS = (ITEM, RETRIEVAL_SCORE, RETRIEVAL_RANK, HISTORY, HISTORY_RATING, CANDIDATE_SOURCES)
"""The inputs of ``ranker_features`` and of the ensemble, in graph order: per candidate [N]
(item, retrieval score and rank) and [N, S] (rank in each source), per user [U, H] (history,
ratings; H = :data:`RANKER_HISTORY`), N = U * C."""
PER_USER_INPUTS = (HISTORY, HISTORY_RATING)
"""The ranker inputs sent once per user, not once per candidate."""
RANKER_HISTORY = 200
"""``H``: the ranker's history window (its per-user inputs are [U, H], cut by :func:`history_windows`
like the user tower's [L]; the tower reads the last ``L`` of the same interactions). The feature
graph's EASE factor score reads all ``H``, its other history features the most recent 50."""

TRITON_TO_NUMPY: dict[str, type] = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32}
"""The Triton data types the contract uses and the numpy dtype each one is sent as."""


@dataclass(frozen=True)
class Tensor:
    """A tensor as Triton's config describes it: name, Triton data type, dims without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    @property
    def dtype(self) -> type:
        """The numpy dtype of this tensor's data."""
        return TRITON_TO_NUMPY[self.data_type]


def model_tensors(
    history_len: int, dim: int, n_features: int, n_sources: int | None = None
) -> dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
    """``(inputs, outputs)`` of each graph-backed model for a model's sizes.

    Args:
        history_len: ``L``, the user tower's history window (the ranker's is :data:`RANKER_HISTORY`).
        dim: Embedding size.
        n_features: Ranker feature count.
        n_sources: Candidate sources ``S`` (default: ``len(CANDIDATE_SOURCE_NAMES)``).

    Returns:
        Model name -> (input tensors, output tensors), in graph order.
    """
    L, D, F = history_len, dim, n_features
    # ranker_features has no batch axis (max_batch_size 0, dims are whole shapes): per-candidate
    # tensors [N], per-user tensors [U, H] sent once per user; INT32 ids halve INT64's bytes
    # (catalogs are far below 2^31)
    S = len(CANDIDATE_SOURCE_NAMES) if n_sources is None else n_sources
    H = RANKER_HISTORY
    candidates = (
        Tensor(ITEM, "TYPE_INT32", (-1,)),
        Tensor(RETRIEVAL_SCORE, "TYPE_FP32", (-1,)),
        Tensor(RETRIEVAL_RANK, "TYPE_FP32", (-1,)),
        Tensor(HISTORY, "TYPE_INT32", (-1, H)),
        Tensor(HISTORY_RATING, "TYPE_FP32", (-1, H)),
        Tensor(CANDIDATE_SOURCES, "TYPE_FP32", (-1, S)),
    )
    return {
        USER_TOWER: (
            (
                Tensor(HISTORY, "TYPE_INT64", (L,)),
                Tensor(HISTORY_RATING, "TYPE_FP32", (L,)),
                Tensor(DEMOGRAPHICS, "TYPE_INT64", (N_DEMOGRAPHICS,)),
            ),
            (Tensor(USER_EMBEDDING, "TYPE_FP32", (D,)),),
        ),
        ITEM_TOWER: ((Tensor(ITEM, "TYPE_INT64", (1,)),), (Tensor(ITEM_EMBEDDING, "TYPE_FP32", (D,)),)),
        RANKER_FEATURES: (candidates, (Tensor(FEATURES, "TYPE_FP32", (-1, F)),)),
        RANKER_TREES: ((Tensor(FEATURES, "TYPE_FP32", (F,)),), (Tensor(SCORE, "TYPE_FP32", (1,)),)),
    }


def user_tower_feeds(history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray) -> dict[str, np.ndarray]:
    """The user tower's input tensors, in the dtypes of its configs."""
    return {
        HISTORY: np.ascontiguousarray(history, np.int64),
        HISTORY_RATING: np.ascontiguousarray(ratings, np.float32),
        DEMOGRAPHICS: np.ascontiguousarray(demographics, np.int64),
    }


def candidate_feeds(
    items: np.ndarray,
    retrieval_scores: np.ndarray,
    retrieval_ranks: np.ndarray,
    history: np.ndarray,
    ratings: np.ndarray,
    sources: np.ndarray,
) -> dict[str, np.ndarray]:
    """The ranker's input tensors: per-candidate [N], per-user [U, H] (N a multiple of U), compact dtypes.

    Raises:
        ValueError: The candidates do not split evenly over the users (a caller's defect).
    """
    history = np.ascontiguousarray(np.atleast_2d(history), dtype=np.int32)
    n, users = len(items), len(history)
    if users == 0 or n % users:
        raise ValueError(f"{n} candidates do not split evenly over {users} history rows")
    return {
        ITEM: np.ascontiguousarray(items, np.int32).reshape(n),
        RETRIEVAL_SCORE: np.ascontiguousarray(retrieval_scores, np.float32).reshape(n),
        RETRIEVAL_RANK: np.ascontiguousarray(retrieval_ranks, np.float32).reshape(n),
        HISTORY: history,
        HISTORY_RATING: np.ascontiguousarray(np.atleast_2d(ratings), dtype=np.float32),
        CANDIDATE_SOURCES: np.ascontiguousarray(sources, dtype=np.float32).reshape(n, -1),
    }


# ----------------------------------------------------------------------- history window

PAD_ITEM = -1
"""Item index of an empty slot of a history window."""
PAD_RATING = 0.0
"""Rating of an empty slot (and of a rating nobody gave)."""


def history_windows(
    items: np.ndarray, ratings: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """History windows: the items and ratings at ``[max(start, end - length), end)``, left-padded.

    The one function that cuts windows: training samples, batch scoring, the online request
    and the warm-up all call it, so the model never sees a window laid out differently from
    the ones it was trained on.

    Args:
        items: int64 [nnz] time-ordered item indices of one or many users, concatenated.
        ratings: float [nnz] their ratings.
        starts: int64 [n] first position of each window's user (a start past the end: empty).
        ends: int64 [n] exclusive end position of each window.
        length: Window length ``L``.

    Returns:
        ``(items int64 [n, L], ratings float32 [n, L])``, most recent last, padded on the left
        with :data:`PAD_ITEM` / :data:`PAD_RATING`.
    """
    ends = np.asarray(ends, np.int64)
    starts = np.asarray(starts, np.int64)
    idx = ends[:, None] - length + np.arange(length)[None, :]
    valid = idx >= starts[:, None]
    idx = np.where(valid, idx, 0)
    if len(items) == 0:
        return np.full(idx.shape, PAD_ITEM, np.int64), np.full(idx.shape, PAD_RATING, np.float32)
    out_items = np.where(valid, np.asarray(items)[idx], PAD_ITEM)
    out_ratings = np.where(valid, np.asarray(ratings)[idx], PAD_RATING)
    return out_items.astype(np.int64), out_ratings.astype(np.float32)


def history_window(items: np.ndarray, ratings: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One user's window: the last ``length`` of ``items`` / ``ratings`` (time-ordered), left-padded.

    Returns:
        ``(items int64 [L], ratings float32 [L])``; see :func:`history_windows`.
    """
    n = len(items)
    win_items, win_ratings = history_windows(items, ratings, np.zeros(1, np.int64), np.array([n], np.int64), length)
    return win_items[0], win_ratings[0]


# ----------------------------------------------------------------------- version layout

VERSION_INFO = "version.json"
"""Written by the export into every ``<model>/<N>/``: the export's record (artifacts' hashes, parity, timings)."""


def published_versions(model_dir: Path) -> list[int]:
    """Numeric version folders of one model, ascending (none when the folder is missing)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(repo: Path, models: tuple[str, ...] = SERVED_MODELS) -> int:
    """The highest version number every one of ``models`` has in ``repo``.

    Raises:
        FileNotFoundError: No common version (run ``recsys export``).
    """
    common: set[int] | None = None
    for m in models:
        found = set(published_versions(Path(repo) / m))
        common = found if common is None else common & found
    if not common:
        raise FileNotFoundError(f"{repo}: no version exported for all of {models} (run `recsys export`)")
    return max(common)


def version_dir(repo: Path, model: str, version: int) -> Path:
    """``<repo>/<model>/<version>``: where a version's graph and ``version.json`` live."""
    return Path(repo) / model / str(version)


def read_version_info(repo: Path, version: int, model: str = USER_TOWER) -> dict[str, Any]:
    """The ``version.json`` the export wrote for ``model`` at ``version``.

    Raises:
        FileNotFoundError: The version has no ``version.json`` (not written by ``recsys export``).
    """
    path = version_dir(repo, model, version) / VERSION_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; cannot tell what version {version} was exported from")
    info: dict[str, Any] = json.loads(path.read_text())
    return info
