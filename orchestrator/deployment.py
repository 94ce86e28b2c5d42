"""Which model version answers: hot reload to version N+1, and A/B routing between two versions.

A **deployment** is one published version ``V`` of the model repository served as a whole:
the user tower and the ranker pinned to ``V`` on the backend (:class:`PinnedBackend`), and
the catalog (item table, vectors, FAISS index) of the artifacts ``V`` was exported from.
A request picks its deployment once, at its start, and uses only it, so a user tower of
one version never meets an index of another.

:class:`Router` holds the deployments and looks like a :class:`~orchestrator.pipeline.Recommender`
to the service:

* **Hot reload.** :class:`ReloadWatcher` polls the repository for a newer complete version
  (every model has it; ``recsys export`` renames the ensemble's folder into place last).
  :meth:`Router.reload` then loads that version's catalog next to the served one, asks the
  backend to load the version (Triton keeps the two newest, ``version_policy: latest 2``,
  so the old one answers meanwhile), warms it up, and swaps one reference. Requests already
  running finish on the old deployment; a failed reload leaves the old one serving and is
  logged.
* **A/B.** With ``ab_version`` and ``ab_share``, a stable hash of the user id (and
  ``ab_salt``) sends that share of users to the ``treatment`` deployment, everyone else
  (and requests without a user id) to ``control``, the newest version. The arm is in the
  response, the request log and the metrics.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.artifacts import DRIFT_REFERENCE, file_sha256
from orchestrator.backends import InferenceBackend
from orchestrator.catalog import Catalog
from orchestrator.contract import KEPT_VERSIONS, SERVED_MODELS, latest_version, read_version_info
from orchestrator.errors import Deadline, ModelUnavailable, RecsysError
from orchestrator.pipeline import Query, Recommender, Result
from orchestrator.settings import ServeSettings
from orchestrator.store import HistoryStore

log = logging.getLogger(__name__)

CONTROL, TREATMENT = "control", "treatment"
CATALOG_FILES = ("items.parquet", "item_embeddings.npy")
"""Artifact files whose recorded hashes must match before a version's catalog is served."""


class ReloadError(RuntimeError):
    """A version cannot be served (its artifacts are gone or changed, or the backend refused it)."""


def ab_bucket(user_id: int, salt: str) -> float:
    """A user's stable position in [0, 1): the same user lands in the same arm on every replica."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def published_version(repo: Path) -> int | None:
    """The newest version every served model (the ensemble included) has, or None."""
    try:
        return latest_version(repo, SERVED_MODELS)
    except FileNotFoundError:
        return None


def artifacts_of(repo: Path, version: int, fallback: Path) -> Path:
    """The artifacts folder ``version`` was exported from, checked by the hashes its export recorded.

    Args:
        repo: Model repository.
        version: Published version.
        fallback: Also accepted when its files have the recorded hashes (the recorded path
            may be from another machine, e.g. an image built elsewhere).

    Raises:
        ReloadError: Neither folder holds the files this version was exported from.
    """
    try:
        recorded = read_version_info(repo, version).get("artifacts", {})
    except FileNotFoundError as exc:
        raise ReloadError(str(exc)) from exc
    hashes = recorded.get("files_sha256", {})
    candidates = [Path(recorded["path"])] if recorded.get("path") else []
    candidates.append(Path(fallback))
    checked = CATALOG_FILES + ((DRIFT_REFERENCE,) if DRIFT_REFERENCE in hashes else ())  # older exports have none
    for folder in candidates:
        if all((folder / n).is_file() and file_sha256(folder / n) == hashes.get(n) for n in checked):
            return folder
    raise ReloadError(
        f"version {version}: no artifacts folder with the item table it was exported from "
        f"(tried {', '.join(map(str, candidates))}); re-export it or keep its artifacts"
    )


class PinnedBackend:
    """A backend whose calls all go to one model version."""

    def __init__(self, backend: InferenceBackend, version: int | None):
        self.inner = backend
        self.version = version
        self.name = backend.name

    @property
    def model_version(self) -> str:
        return self.inner.model_version if self.version is None else str(self.version)

    def ready(self, timeout_s: float) -> bool:
        return self.inner.ready(timeout_s)

    def user_embedding(
        self, history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray, timeout_s: float, version: int | None = None
    ) -> np.ndarray:
        # ``version`` is accepted so that this is an InferenceBackend; a pinned backend answers with its own
        return self.inner.user_embedding(history, ratings, demographics, timeout_s=timeout_s, version=self.version)

    def rank(
        self,
        items: np.ndarray,
        retrieval_scores: np.ndarray,
        retrieval_ranks: np.ndarray,
        history: np.ndarray,
        ratings: np.ndarray,
        timeout_s: float,
        version: int | None = None,
    ) -> np.ndarray:
        return self.inner.rank(items, retrieval_scores, retrieval_ranks, history, ratings, timeout_s=timeout_s, version=self.version)

    def load_version(self, version: int, timeout_s: float) -> None:
        self.inner.load_version(version, timeout_s)

    def close(self) -> None:
        """The shared backend is closed by its owner (the router)."""


@dataclass(frozen=True)
class Arm:
    """One deployment: a version, its pipeline, and the A/B variant it answers as."""

    version: int | None
    recommender: Recommender
    variant: str


class Router:
    """The deployments, and a :class:`Recommender`'s surface over them (see the module docstring).

    Args:
        settings: Serving settings (``ab_*``, ``reload_*``).
        catalog: The catalog of ``version``.
        store: The history store (shared by every version).
        backend: The inference backend (shared; calls are pinned per arm).
        version: The version the backend serves now (None: unknown, calls unpinned).
    """

    def __init__(self, settings: ServeSettings, catalog: Catalog, store: HistoryStore, backend: InferenceBackend, version: int | None):
        self.settings = settings
        self.store = store
        self.backend = backend
        self._reload_lock = threading.Lock()
        experiment = settings.ab_version is not None and settings.ab_share > 0
        self._control = self._arm(version, catalog, CONTROL if experiment else "")
        self._treatment: Arm | None = None
        if experiment and settings.ab_version is not None:
            self._treatment = self._load_arm(int(settings.ab_version), TREATMENT)

    # ------------------------------------------------------------------ routing

    def _arm(self, version: int | None, catalog: Catalog, variant: str) -> Arm:
        pinned = PinnedBackend(self.backend, version) if version is not None else self.backend
        return Arm(version, Recommender(self.settings, catalog, self.store, pinned), variant)

    def _load_arm(self, version: int, variant: str) -> Arm:
        """Catalog + backend version + warm-up of ``version``; raises :class:`ReloadError`."""
        folder = artifacts_of(self.settings.model_repository, version, self.settings.artifacts_dir)
        catalog = Catalog.load(folder, self.settings.mmr_genre_weight)
        try:
            self.backend.load_version(version, self.settings.reload_timeout_s)
        except ModelUnavailable as exc:
            raise ReloadError(f"version {version}: the backend cannot serve it: {exc}") from exc
        return self._arm(version, catalog, variant)

    def pick(self, user_id: int | None) -> Arm:
        """The arm of a request: treatment for ``ab_share`` of the users by stable hash."""
        treatment = self._treatment
        if treatment is not None and user_id is not None and ab_bucket(user_id, self.settings.ab_salt) < self.settings.ab_share:
            return treatment
        return self._control

    @property
    def catalog(self) -> Catalog:
        """The control deployment's catalog (Similar, Popular, validation of movie ids)."""
        return self._control.recommender.catalog

    @property
    def versions(self) -> dict[str, int | None]:
        """``{"control": V}`` (and ``"treatment"`` during an experiment)."""
        out = {CONTROL: self._control.version}
        if self._treatment is not None:
            out[TREATMENT] = self._treatment.version
        return out

    # ------------------------------------------------------------------ the Recommender surface

    def recommend(self, q: Query, deadline: Deadline) -> Result:
        arm = self.pick(q.user_id)
        result = arm.recommender.recommend(q, deadline)
        result.variant = arm.variant
        return result

    def recommend_many(self, queries: list[Query], deadline: Deadline) -> list[Result | RecsysError]:
        """:meth:`Recommender.recommend_many` per arm (each arm's users batched together), in order."""
        arms: dict[int, tuple[Arm, list[int]]] = {}
        for i, q in enumerate(queries):
            arm = self.pick(q.user_id)
            arms.setdefault(id(arm), (arm, []))[1].append(i)
        results: list[Result | RecsysError | None] = [None] * len(queries)
        for arm, idx in arms.values():
            for i, result in zip(idx, arm.recommender.recommend_many([queries[i] for i in idx], deadline)):
                if isinstance(result, Result):
                    result.variant = arm.variant
                results[i] = result
        return results  # type: ignore[return-value]

    def __getattr__(self, name: str) -> Any:
        """The rest of the Recommender surface (``similar``, ``popular``, ``record``, the stages)
        is the control deployment's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._control.recommender, name)

    def warm_up(self, calls: int) -> float:
        arms = [self._control] + ([self._treatment] if self._treatment is not None else [])
        return sum(a.recommender.warm_up(calls) for a in arms)

    # ------------------------------------------------------------------ hot reload

    def reload(self, version: int) -> bool:
        """Serves ``version`` as control if it is newer than the served one.

        Returns:
            True when swapped; False when ``version`` is not newer.

        Raises:
            ReloadError: It cannot be served; the served version is untouched.
        """
        with self._reload_lock:
            current = self._control.version
            if current is not None and version <= current:
                return False
            log.info("reload: loading version %s (serving %s)", version, current)
            arm = self._load_arm(version, self._control.variant)
            arm.recommender.warm_up(self.settings.warmup_calls)  # its first calls are cold: not the users'
            treatment = self._treatment
            if treatment is not None and treatment.version is not None and treatment.version < version - (KEPT_VERSIONS - 1):
                # the backend keeps the two newest versions: the treatment's is about to go
                log.warning("A/B: treatment version %s is no longer among the served versions; experiment ended", treatment.version)
                self._treatment = None
                arm = Arm(arm.version, arm.recommender, "")
            self._control = arm  # one reference: a request sees the old deployment or the new one
            log.info("reload: now serving version %s", version)
            return True


class ReloadWatcher:
    """Polls the repository every ``reload_poll_s`` and reloads a newer complete version.

    A version that fails is logged and not retried until a newer one appears.
    """

    def __init__(self, router: Router, repo: Path, poll_s: float):
        self.router = router
        self.repo = Path(repo)
        self.poll_s = poll_s
        self.failed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsys-reload", daemon=True)

    def check(self) -> bool:
        """One poll; True when a new version was swapped in."""
        version = published_version(self.repo)
        if version is None or version in self.failed:
            return False
        try:
            return self.router.reload(version)
        except Exception as exc:  # noqa: BLE001 - the served version keeps serving; say why not the new one
            self.failed.add(version)
            log.error("reload to version %s failed, still serving %s: %s", version, self.router.versions, exc)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def start(self) -> None:
        if self.poll_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
