"""The artifacts folder as the service reads it: file names, hashes, demographics.

``recsys train`` writes the folder and ``recsys export`` records the hashes of
:data:`EXPORTED_FILES` in each version's ``version.json``; the orchestrator reads it back with
the helpers here (numpy and pandas only, no training stack), and the offline side imports
them so that writer and reader share one definition.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ITEMS = "items.parquet"
ITEM_EMBEDDINGS = "item_embeddings.npy"
INTERACTIONS = "interactions.parquet"
DEMOGRAPHICS_VOCABULARY = "demographics.json"
FAISS_DIR = "faiss"
CANDIDATE_TABLES = "candidate_tables.npz"
"""The candidate sources' tables and budgets (``orchestrator/candidates.py``)."""
DRIFT_REFERENCE = "drift_reference.json"
"""The export's drift reference (``orchestrator/drift.py``), written by ``recsys train``."""
EXPORTED_FILES = ("two_tower.pt", "ranker_features.pt", "ranker.lgb", ITEM_EMBEDDINGS, ITEMS, CANDIDATE_TABLES, DRIFT_REFERENCE)
"""Artifact files whose hashes the export records in ``version.json``: a match means no re-export."""
CATALOG_FILES = (ITEMS, ITEM_EMBEDDINGS, CANDIDATE_TABLES)
"""Artifact files whose recorded hashes must match before a version's catalog is served."""
AGE_BUCKETS = (0, 18, 25, 35, 45, 50, 56)
"""Lower edges of the age buckets of the demographic codes (MovieLens' own groups)."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (artifacts can be hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(artifacts: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` ``recsys train`` wrote into ``artifacts``."""
    manifest: dict[str, Any] = json.loads((Path(artifacts) / MANIFEST).read_text())
    return manifest


@dataclass(frozen=True)
class Demographics:
    """Categorical user attributes, aligned with a user id array; 0 means unknown.

    Attributes:
        user_ids: int64 [n] sorted.
        codes: int64 [n, 3]: age bucket, gender, occupation.
        occupations: Occupation vocabulary (code = position + 1).
    """

    user_ids: np.ndarray
    codes: np.ndarray
    occupations: list[str] = field(default_factory=list)

    @classmethod
    def from_users(cls, users: Any) -> Demographics:
        """Builds codes from the loader's ``users`` frame (or an empty table when None)."""
        if users is None or len(users) == 0:
            return cls(np.empty(0, np.int64), np.empty((0, 3), np.int64), [])
        users = users.sort_values("user_id")
        edges = np.asarray(AGE_BUCKETS[1:])
        age = users.age.to_numpy()
        age_b = np.where(age > 0, np.searchsorted(edges, age, side="right") + 1, 0)
        gender = users.gender.map({"M": 1, "F": 2}).fillna(0).to_numpy(np.int64)
        occupations = sorted(users.occupation.dropna().astype(str).unique().tolist())
        occ = users.occupation.map({o: i + 1 for i, o in enumerate(occupations)}).fillna(0).to_numpy(np.int64)
        codes = np.stack([age_b, gender, occ], axis=1).astype(np.int64)
        return cls(users.user_id.to_numpy(np.int64), codes, occupations)

    @property
    def cardinalities(self) -> tuple[int, int, int]:
        """Codes per attribute, 0 (unknown) included: the sizes of the tower's embedding tables."""
        return (len(AGE_BUCKETS) + 1, 3, len(self.occupations) + 1)

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        """Codes for ``user_ids`` (zeros for users without demographics)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        out = np.zeros((len(user_ids), 3), dtype=np.int64)
        if len(self.user_ids) == 0:
            return out
        pos = np.clip(np.searchsorted(self.user_ids, user_ids), 0, len(self.user_ids) - 1)
        hit = self.user_ids[pos] == user_ids
        out[hit] = self.codes[pos[hit]]
        return out


class DemographicsMismatch(ValueError):
    """``users.csv``'s occupations differ from the vocabulary the tower was trained with."""


def data_dir_of(artifacts: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The data folder holding ``users.csv``: given, or the one the manifest names (None: not here)."""
    if data_dir is not None:
        return Path(data_dir)
    artifacts = Path(artifacts)
    if not (artifacts / MANIFEST).is_file():
        return None
    recorded = read_manifest(artifacts).get("data", {}).get("path")
    if not recorded:
        return None
    # the manifest records the path as given to `recsys train`, usually relative to the
    # project root; the artifacts usually live in that root too
    for candidate in (Path(recorded), artifacts.parent / recorded):
        if candidate.is_dir():
            return candidate
    return None


def load_demographics(artifacts: str | Path, data_dir: str | Path | None = None) -> Demographics:
    """Demographic codes as the user tower was trained with them, or an empty table.

    Codes are rebuilt from ``users.csv`` by :meth:`Demographics.from_users`; the occupation
    vocabulary must equal the one saved at training (``demographics.json``), otherwise an
    occupation would silently get another code.

    Args:
        artifacts: Folder written by ``recsys train``.
        data_dir: Folder with ``users.csv`` (default: the data path in ``manifest.json``).

    Returns:
        The codes; empty (every user unknown) when there is no ``users.csv``.

    Raises:
        DemographicsMismatch: The occupations differ from training's.
    """
    import pandas as pd  # only readers of users.csv pay for pandas' import

    artifacts = Path(artifacts)
    folder = data_dir_of(artifacts, data_dir)
    path = folder / "users.csv" if folder is not None else None
    if path is None or not path.is_file():
        log.info("no users.csv found (%s): every user's demographics are unknown", path)
        return Demographics.from_users(None)
    raw = pd.read_csv(path, usecols=["userId", "age", "gender", "occupation"], dtype={"gender": str, "occupation": str})
    demo = Demographics.from_users(raw.rename(columns={"userId": "user_id"}))
    saved = artifacts / DEMOGRAPHICS_VOCABULARY
    if saved.is_file():
        trained = json.loads(saved.read_text()).get("occupations", [])
        if trained != demo.occupations:
            raise DemographicsMismatch(
                f"{path}: occupations {demo.occupations} differ from the training vocabulary in {saved}; "
                "pass --data with the data set the model was trained on"
            )
    return demo


def exported_from(artifacts: Path, repo: Path) -> bool:
    """Whether the repository's latest version was exported from exactly these artifacts."""
    from orchestrator.contract import latest_version, read_version_info

    try:
        recorded = read_version_info(repo, latest_version(repo)).get("artifacts", {}).get("files_sha256", {})
    except FileNotFoundError:
        return False
    return all(recorded.get(n) == file_sha256(artifacts / n) for n in EXPORTED_FILES if (artifacts / n).exists())


def items_of(sorted_movie_ids: np.ndarray, movie_ids: Any, order: np.ndarray | None = None) -> np.ndarray:
    """Item index of each movie id, -1 for ids not in the item table: the one id mapping of both sides.

    Args:
        sorted_movie_ids: int64 [n] the table's movie ids, ascending.
        movie_ids: Ids to map (any int sequence or array).
        order: int64 [n] item index of each entry of ``sorted_movie_ids`` (None: the identity,
            as in a table whose item order is movie-id order).

    Returns:
        int64 [len(movie_ids)].
    """
    ids = np.asarray(movie_ids, dtype=np.int64).reshape(-1)
    n = len(sorted_movie_ids)
    if n == 0 or ids.size == 0:
        return np.full(ids.size, -1, dtype=np.int64)
    pos = np.clip(np.searchsorted(sorted_movie_ids, ids), 0, n - 1)
    found = sorted_movie_ids[pos] == ids
    return np.where(found, pos if order is None else order[pos], -1).astype(np.int64)
