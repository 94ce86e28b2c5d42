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
* **Start-up.** :func:`start_version` picks the version to pin before the server exists:
  of the two newest complete versions (the ones the backend keeps), those whose catalog
  files still have the hashes their export recorded; the newest of them already READY in
  the backend, else the newest of them (health stays NOT_SERVING until it is READY). When
  published versions exist but none of them has its catalog, the server refuses to start
  (:class:`StartupError`). :class:`ReloadWatcher` then loads what is missing: a newer
  version, or the pinned one when the backend answers without it, retrying failures with
  exponential backoff.
* **A/B.** With ``ab_version`` and ``ab_share``, a stable hash of the user id (and
  ``ab_salt``) sends that share of users to the ``treatment`` deployment, everyone else
  (and requests without a user id) to ``control``, the newest version. The arm is in the
  response, the request log and the metrics.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.artifacts import CATALOG_FILES, DRIFT_REFERENCE, file_sha256
from orchestrator.backends import InferenceBackend
from orchestrator.catalog import Catalog
from orchestrator.contract import KEPT_VERSIONS, SERVED_MODELS, latest_version, published_versions, read_version_info
from orchestrator.errors import Deadline, ModelUnavailable, RecsysError
from orchestrator.pipeline import Query, Recommender, Result
from orchestrator.settings import ServeSettings
from orchestrator.store import HistoryStore

log = logging.getLogger(__name__)

CONTROL, TREATMENT = "control", "treatment"


class ReloadError(RuntimeError):
    """A version cannot be served (its artifacts are gone or changed, or the backend refused it)."""


class StartupError(RuntimeError):
    """No published version can be served with the artifacts at hand: the server must not start."""


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


def complete_versions(repo: Path) -> list[int]:
    """Versions every served model (the ensemble included) has, newest first."""
    common: set[int] | None = None
    for model in SERVED_MODELS:
        found = set(published_versions(Path(repo) / model))
        common = found if common is None else common & found
    return sorted(common or (), reverse=True)


def start_version(repo: Path, artifacts_dir: Path, backend: InferenceBackend, timeout_s: float = 2.0) -> tuple[int | None, Path]:
    """The version to pin at start-up and the artifacts folder of its catalog (hash-checked).

    Candidates are the :data:`~orchestrator.contract.KEPT_VERSIONS` newest complete versions
    (the backend serves no older one) whose catalog files have the hashes their export
    recorded (:func:`artifacts_of`, as a hot reload checks them). Of those, the newest one
    already READY in the backend wins; when none is READY (Triton still starting, or the
    newest export landed while the orchestrator was down and nothing loaded it), the newest
    candidate is pinned and :class:`ReloadWatcher` loads it (health is NOT_SERVING until then).
    A newer candidate passed over because it is not READY is loaded by the watcher's first poll.

    Args:
        repo: Model repository.
        artifacts_dir: The configured artifacts folder (also accepted for a version whose
            recorded folder is elsewhere, when its files have the recorded hashes).
        backend: The inference backend, asked which versions are READY.
        timeout_s: Per readiness question.

    Returns:
        ``(version, folder)``; ``(None, artifacts_dir)`` when the repository holds no complete
        version (an unversioned setup: nothing to check against).

    Raises:
        StartupError: Versions are published, but none of the newest ones has its catalog.
    """
    versions = complete_versions(repo)
    if not versions:
        log.warning("start-up: %s holds no complete version; serving %s unpinned and unchecked", repo, artifacts_dir)
        return None, Path(artifacts_dir)
    servable: list[tuple[int, Path]] = []
    problems = []
    for version in versions[:KEPT_VERSIONS]:
        try:
            servable.append((version, artifacts_of(repo, version, artifacts_dir)))
        except ReloadError as exc:
            problems.append(str(exc))
            log.error("start-up: version %s cannot be served: %s", version, exc)
    if not servable:
        raise StartupError(
            "start-up refused: no published version can be served with these artifacts (its catalog files "
            "do not have the hashes its export recorded): " + "; ".join(problems)
        )
    for version, folder in servable:
        if backend.version_ready(version, timeout_s):
            if version != servable[0][0]:
                log.warning("start-up: version %s is not READY in the backend; pinning %s, which is", servable[0][0], version)
            return version, folder
    version, folder = servable[0]
    log.warning("start-up: no candidate version is READY in the backend yet; pinning %s and loading it (NOT_SERVING until READY)", version)
    return version, folder


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
        """The backend is ready and the pinned version answers (not just some version)."""
        if not self.inner.ready(timeout_s):
            return False
        return self.version is None or self.inner.version_ready(self.version, timeout_s)

    def version_ready(self, version: int, timeout_s: float) -> bool:
        return self.inner.version_ready(version, timeout_s)

    def live(self, timeout_s: float) -> bool:
        return self.inner.live(timeout_s)

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
        sources: np.ndarray,
        timeout_s: float,
        version: int | None = None,
    ) -> np.ndarray:
        return self.inner.rank(
            items, retrieval_scores, retrieval_ranks, history, ratings, sources, timeout_s=timeout_s, version=self.version
        )

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
        return sum(a.recommender.warm_up(calls) for a in self._arms())

    def _arms(self) -> list[Arm]:
        return [self._control] + ([self._treatment] if self._treatment is not None else [])

    # ------------------------------------------------------------------ health

    def ready(self, timeout_s: float) -> bool:
        """The backend is ready and every arm's pinned version is READY in it (what health reports).

        The backend being ready is not enough: a version published while the orchestrator was
        down, or one whose load failed, leaves every answer of its arm the popular fallback.
        """
        if not self.backend.ready(timeout_s):
            return False
        return all(a.version is None or self.backend.version_ready(a.version, timeout_s) for a in self._arms())

    @property
    def model_version(self) -> str:
        """The control deployment's pinned version (the backend's newest when unpinned)."""
        version = self._control.version
        return self.backend.model_version if version is None else str(version)

    def load_pinned(self) -> bool:
        """Loads each arm's pinned version the backend lacks; True when there was one to load.

        Raises:
            ReloadError: The backend cannot load it.
        """
        missing = [a.version for a in self._arms() if a.version is not None and not self.backend.version_ready(a.version, 2.0)]
        for version in missing:
            log.info("pinned version %s is not READY in the backend: loading it", version)
            try:
                self.backend.load_version(version, self.settings.reload_timeout_s)
            except ModelUnavailable as exc:
                raise ReloadError(f"version {version}: the backend cannot serve it: {exc}") from exc
        return bool(missing)

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


@dataclass
class Retry:
    """Failed load attempts of one version and when the next may start (``time.monotonic``)."""

    attempts: int
    next_at: float
    error: str
    delay_s: float = 0.0
    """The wait this failure scheduled before the next attempt."""


class ReloadWatcher:
    """Polls the repository every ``poll_s``: loads a newer complete version, and the pinned one
    when the backend is up without it; failed loads are retried with exponential backoff.

    A newer version that failed is retried after ``retry_s``, ``2 * retry_s``, ... (at most
    ``retry_max_s`` apart) up to ``max_attempts`` attempts, then left alone until a newer one
    appears. The pinned version is retried without a limit (health is NOT_SERVING meanwhile).
    Every failure is logged with its attempt number and next try, and reported to
    ``on_failure`` (the ``recsys_version_load_failures_total`` counter).

    Args:
        router: The deployments.
        repo: Model repository.
        poll_s: Polling period; 0: no polling thread (:meth:`check` may still be called).
        follow_newer: Load newer versions (hot reload); False: only keep the pinned one loaded.
        retry_s: Delay before the first retry.
        retry_max_s: Longest delay between retries.
        max_attempts: Attempts at a newer version before giving up on it.
        on_failure: Called once per failed attempt.
    """

    def __init__(
        self,
        router: Router,
        repo: Path,
        poll_s: float,
        *,
        follow_newer: bool = True,
        retry_s: float = 5.0,
        retry_max_s: float = 60.0,
        max_attempts: int = 6,
        on_failure: Callable[[], None] | None = None,
    ):
        self.router = router
        self.repo = Path(repo)
        self.poll_s = poll_s
        self.follow_newer = follow_newer
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.on_failure = on_failure
        self.failed: dict[int, Retry] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsys-reload", daemon=True)

    def _due(self, version: int, pinned: bool) -> bool:
        retry = self.failed.get(version)
        if retry is None:
            return True
        if not pinned and retry.attempts >= self.max_attempts:
            return False
        return time.monotonic() >= retry.next_at

    def _fail(self, version: int, exc: Exception, pinned: bool) -> None:
        previous = self.failed.get(version)
        attempts = 1 + (previous.attempts if previous else 0)
        delay = min(self.retry_s * 2 ** (attempts - 1), self.retry_max_s)
        self.failed[version] = Retry(attempts, time.monotonic() + delay, str(exc), delay)
        if self.on_failure is not None:
            self.on_failure()
        served = self.router.versions
        if pinned:
            log.error(
                "pinned version %s failed to load (attempt %d), retry in %.1f s; health NOT_SERVING: %s", version, attempts, delay, exc
            )
        elif attempts >= self.max_attempts:
            log.error("version %s failed to load %d times, giving up until a newer one; serving %s: %s", version, attempts, served, exc)
        else:
            log.error("version %s failed to load (attempt %d), retry in %.1f s; serving %s: %s", version, attempts, delay, served, exc)

    def check(self) -> bool:
        """One poll; True when a new version was swapped in."""
        control = self.router.versions.get(CONTROL)
        # only when the backend is live: while Triton is down or restarting it loads its own
        # versions at start, and a load call queued behind a stopped Triton would reload it later
        # ("ready" is no gate: with the newest version UNAVAILABLE Triton reports the model unready)
        if control is not None and self._due(control, pinned=True) and self.router.backend.live(2.0):
            try:
                if self.router.load_pinned():
                    log.info("pinned version %s is READY", control)
                self.failed.pop(control, None)
            except Exception as exc:  # noqa: BLE001 - logged, metered, retried; health says NOT_SERVING
                self._fail(control, exc, pinned=True)
        if not self.follow_newer:
            return False
        version = published_version(self.repo)
        if version is None or (control is not None and version <= control) or not self._due(version, pinned=False):
            return False
        try:
            swapped = self.router.reload(version)
        except Exception as exc:  # noqa: BLE001 - the served version keeps serving; say why not the new one
            self._fail(version, exc, pinned=False)
            return False
        self.failed.pop(version, None)
        return swapped

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()  # at once: the start-up choice may have left a newer version to load
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        if self.poll_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
