"""Where the two models run: the interface, Triton, and in process.

The pipeline calls two models and nothing else:

* ``user_tower``: (history [B, L] int64, history_rating [B, L] fp32, demographics [B, 3]
  int64) -> user_embedding [B, dim] fp32;
* ``ranker_ensemble``: U users' history windows once (history [U, H] int32, history_rating
  [U, H] fp32, H = ``RANKER_HISTORY``) and their N = U * C candidates, C per user, grouped by user (item [N] int32,
  retrieval_score [N] fp32, retrieval_rank [N] fp32, candidate_sources [N, S] fp32) -> score [N, 1] fp32 (features +
  LightGBM trees in one call).

:class:`TritonBackend` sends them to Triton over gRPC; :class:`InProcessBackend` runs the
same ``model.onnx`` files of the repository with onnxruntime (service tests, and the floor
that benchmarks compare Triton with). Swap the backend, not the pipeline.

Every call takes ``timeout_s``: the time it may take, the pipeline's min of
``triton_timeout_s`` and the caller's remaining deadline. Failures are raised as
:class:`~orchestrator.errors.ModelError` subclasses chosen by status code (see
:data:`TRITON_STATUS`), with the original exception as the cause.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from orchestrator.contract import (  # noqa: F401 - KEPT_VERSIONS, CANDIDATE_INPUTS: re-exported for the service
    CANDIDATE_INPUTS,
    FEATURES,
    KEPT_VERSIONS,
    RANKER_ENSEMBLE,
    RANKER_FEATURES,
    RANKER_TREES,
    SCORE,
    SERVED_LEAF_MODELS,
    USER_EMBEDDING,
    USER_TOWER,
    candidate_feeds,
    latest_version,
    user_tower_feeds,
)
from orchestrator.errors import ModelError, ModelTimeout, ModelUnavailable

log = logging.getLogger(__name__)

RANKER = RANKER_ENSEMBLE
LEAF_MODELS = SERVED_LEAF_MODELS


class InferenceBackend(Protocol):
    """The two model calls of the pipeline (see the module docstring for tensors)."""

    name: str

    @property
    def model_version(self) -> str:
        """The served model repository version, e.g. ``"3"``."""
        ...

    def ready(self, timeout_s: float) -> bool:
        """Whether both models can answer now."""
        ...

    def live(self, timeout_s: float) -> bool:
        """Whether the backend answers at all (it may be without the models), so that a load can be asked."""
        ...

    def user_embedding(
        self, history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray, timeout_s: float, version: int | None = None
    ) -> np.ndarray:
        """float32 [B, dim] user vectors for left-padded history windows [B, L] (``version``: pinned, None: latest)."""
        ...

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
        """float32 [N] ranker scores of N = U * C candidates of U users (history windows [U, H], C candidates each, grouped by user; source ranks [N, S])."""
        ...

    def load_version(self, version: int, timeout_s: float) -> None:
        """Makes ``version`` of every model callable (pinned) next to the versions already served."""
        ...

    def version_ready(self, version: int, timeout_s: float) -> bool:
        """Whether ``version`` of every model answers pinned calls now (False when it cannot be asked)."""
        ...

    def close(self) -> None:
        """Releases connections / sessions."""
        ...


class InProcessBackend:
    """onnxruntime on the repository's ONNX graphs, in this process.

    The ranker ensemble is reproduced as its two steps (``ranker_features`` then
    ``ranker``). onnxruntime cannot be interrupted, so ``timeout_s`` is checked after the
    call: a late answer raises :class:`ModelTimeout` like Triton's would.

    Args:
        repo: Model repository.
        version: Version to load (default: the latest common one).
        threads: onnxruntime intra-op threads per session.
    """

    name = "in-process"

    def __init__(self, repo: str | Path, version: int | None = None, threads: int = 1):
        import onnxruntime as ort

        repo = Path(repo)
        self._ort = ort
        self.repo = repo
        self.threads = threads
        self.version = version or latest_version(repo, LEAF_MODELS)
        self._sessions: dict[tuple[str, int], Any] = {}
        self.load_version(self.version, timeout_s=float("inf"))

    def load_version(self, version: int, timeout_s: float) -> None:  # noqa: ARG002 - loading cannot be interrupted
        """Opens the sessions of ``version``; the two newest versions stay open (Triton's policy)."""
        ort = self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            new = {
                (m, version): ort.InferenceSession(
                    str(self.repo / m / str(version) / "model.onnx"), opts, providers=["CPUExecutionProvider"]
                )
                for m in LEAF_MODELS
            }
        except Exception as exc:  # a missing or broken graph: the version is not servable
            raise ModelUnavailable(f"version {version}: cannot open its graphs ({type(exc).__name__}: {exc})") from exc
        self._sessions.update(new)
        keep = sorted({v for _, v in self._sessions})[-KEPT_VERSIONS:]
        self._sessions = {key: sess for key, sess in self._sessions.items() if key[1] in keep}
        self.version = max(keep)

    @property
    def model_version(self) -> str:
        return str(self.version)

    def ready(self, timeout_s: float) -> bool:  # noqa: ARG002 - loaded at construction
        return True

    def live(self, timeout_s: float) -> bool:  # noqa: ARG002 - in this process
        return True

    def version_ready(self, version: int, timeout_s: float) -> bool:  # noqa: ARG002 - a dictionary lookup
        return all((m, version) in self._sessions for m in LEAF_MODELS)

    def _run(self, model: str, output: str, feeds: dict[str, np.ndarray], timeout_s: float, version: int | None) -> np.ndarray:
        if timeout_s <= 0:
            raise ModelTimeout(f"{model}: no time left for the call")
        session = self._sessions.get((model, self.version if version is None else version))
        if session is None:
            raise ModelUnavailable(f"{model}: version {version} is not loaded")
        t0 = time.monotonic()
        try:
            out = session.run([output], feeds)[0]
        except Exception as exc:  # onnxruntime raises its own types for bad feeds: a defect here
            raise ModelError(f"{model}: onnxruntime failed: {type(exc).__name__}") from exc
        if time.monotonic() - t0 > timeout_s:
            raise ModelTimeout(f"{model}: answered after the {timeout_s:.3f} s timeout")
        return out

    def user_embedding(
        self, history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray, timeout_s: float, version: int | None = None
    ) -> np.ndarray:
        feeds = user_tower_feeds(history, ratings, demographics)
        return self._run(USER_TOWER, USER_EMBEDDING, feeds, timeout_s, version)

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
        t0 = time.monotonic()
        feeds = candidate_feeds(items, retrieval_scores, retrieval_ranks, history, ratings, sources)
        features = self._run(RANKER_FEATURES, FEATURES, feeds, timeout_s, version)
        left = timeout_s - (time.monotonic() - t0)
        return self._run(RANKER_TREES, SCORE, {FEATURES: features}, left, version).reshape(-1)

    def close(self) -> None:
        self._sessions.clear()


TRITON_CHANNEL_ARGS = [
    # tritonclient's own defaults (it drops them all when channel_args is given)
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    # reconnect to a restarted Triton within ~1 s: gRPC's default backoff grows to 120 s, so
    # after a few seconds of outage the next attempt could be seconds after Triton is back
    # (bench faults measured 2.3-4.2 s from Triton ready to the first personal answer)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""Options of the orchestrator's one gRPC channel to Triton."""

TRITON_STATUS: dict[str, type[ModelError]] = {
    "DEADLINE_EXCEEDED": ModelTimeout,
    "UNAVAILABLE": ModelUnavailable,  # not reachable, or shutting down
    "NOT_FOUND": ModelUnavailable,  # the model is not loaded (yet)
    "RESOURCE_EXHAUSTED": ModelUnavailable,  # queue full
    "CANCELLED": ModelUnavailable,
    "INTERNAL": ModelUnavailable,  # the model's execute() failed: serve the fallback
    "UNKNOWN": ModelUnavailable,
    "INVALID_ARGUMENT": ModelError,  # our tensors break the contract: a defect, not the caller's
    "FAILED_PRECONDITION": ModelError,
    "UNIMPLEMENTED": ModelError,
}
"""Triton status code -> error class; codes not listed are :class:`ModelError`."""


def triton_error(exc: Exception, model: str, timeout_s: float) -> ModelError:
    """The :class:`ModelError` for a tritonclient exception, chosen by its status code only.

    tritonclient reports gRPC failures as ``InferenceServerException`` whose ``status()``
    is the gRPC code (``"StatusCode.UNAVAILABLE"``); failures raised inside tritonclient
    before any call have no status.
    """
    status = exc.status() if hasattr(exc, "status") else None
    code = str(status).rsplit(".", 1)[-1] if status else ""
    cls = TRITON_STATUS.get(code, ModelError)
    if cls is ModelTimeout:
        return cls(f"{model}: Triton did not answer within {timeout_s:.3f} s")
    return cls(f"{model}: Triton call failed ({code or 'no status'})")


class TritonBackend:
    """The models on a Triton server, through ONE tritonclient gRPC client.

    tritonclient's gRPC client is thread-safe for ``infer`` (its docstring; only streaming
    is not), so all of the server's worker threads share one client and its HTTP/2
    connection. Versions are Triton's latest (``model_version=""``); :attr:`model_version`
    reports the version Triton says is ready.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
    """

    name = "triton"

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.url = url
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url, channel_args=TRITON_CHANNEL_ARGS)
        self._version = "unknown"
        self._lock = threading.Lock()
        # the leaf version the ensemble's "latest" steps resolve to; None while a version
        # loads (every ranking goes through the pinned leaf models until it is known again)
        self._ensemble_version: int | None = None
        self._loading = False
        # whether ranker_ensemble is the fused Python-backend model (the embedded CPU config),
        # whose version V runs V's graphs, or a Triton ensemble; None until Triton says
        self._fused: bool | None = None

    @property
    def model_version(self) -> str:
        return self._version

    def ready(self, timeout_s: float) -> bool:
        """Server ready and both models ready; refreshes :attr:`model_version`."""
        try:
            ok = self.client.is_server_ready(client_timeout=timeout_s) and all(
                self.client.is_model_ready(m, client_timeout=timeout_s) for m in (USER_TOWER, RANKER)
            )
            if ok:
                meta = self.client.get_model_metadata(USER_TOWER, client_timeout=timeout_s, as_json=True)
                versions = meta.get("versions") or []
                ranker = self.client.get_model_metadata(RANKER_TREES, client_timeout=timeout_s, as_json=True).get("versions") or []
                fused = self._fused
                if fused is None:  # asked once per load: a reload may change the config
                    config = self.client.get_model_config(RANKER, client_timeout=timeout_s, as_json=True).get("config", {})
                    fused = config.get("platform") != "ensemble"
                with self._lock:
                    self._version = str(max(versions, key=int)) if versions else "unknown"
                    if not self._loading:
                        self._ensemble_version = max(map(int, ranker)) if ranker else None
                        self._fused = fused
            return bool(ok)
        except Exception as exc:  # any failure to ask is "not ready", which is what health reports
            log.debug("triton at %s not ready: %r", self.url, exc)
            return False

    def live(self, timeout_s: float) -> bool:
        """Triton's ``/v2/health/live``: up and answering, whatever its models' state."""
        try:
            return bool(self.client.is_server_live(client_timeout=timeout_s))
        except Exception:  # noqa: BLE001 - unreachable, stopped or restarting: not live
            return False

    def _infer(self, model: str, feeds: dict[str, np.ndarray], output: str, timeout_s: float, version: int | None = None) -> np.ndarray:
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        if timeout_s <= 0:
            raise ModelTimeout(f"{model}: no time left for the call")
        inputs = []
        for name, array in feeds.items():
            t = self._grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            inputs.append(t)
        try:
            result = self.client.infer(
                model,
                inputs,
                model_version="" if version is None else str(version),
                outputs=[self._grpc.InferRequestedOutput(output)],
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise triton_error(exc, model, timeout_s) from exc
        out = result.as_numpy(output)
        if out is None:
            raise ModelError(f"{model}: Triton returned no '{output}' tensor")
        return out

    def user_embedding(
        self, history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray, timeout_s: float, version: int | None = None
    ) -> np.ndarray:
        feeds = user_tower_feeds(history, ratings, demographics)
        return self._infer(USER_TOWER, feeds, USER_EMBEDDING, timeout_s, version)

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
        """``ranker_ensemble`` when it runs ``version`` (one call), else its two steps pinned to ``version``.

        The fused CPU model (``export/triton_config.render_fused_ranker_config``) runs its own
        version's graphs, so it is simply called pinned. A Triton ensemble's steps call the
        *latest* ranker_features and ranker, so a request pinned to the version being
        replaced (or to the other arm of an A/B test) must not go through it.
        """
        feeds = candidate_feeds(items, retrieval_scores, retrieval_ranks, history, ratings, sources)
        if self._fused:
            return self._infer(RANKER, feeds, SCORE, timeout_s, version).reshape(-1)
        if version is None or version == self._ensemble_version:
            return self._infer(RANKER, feeds, SCORE, timeout_s).reshape(-1)
        t0 = time.monotonic()
        features = self._infer(RANKER_FEATURES, feeds, FEATURES, timeout_s, version)
        left = timeout_s - (time.monotonic() - t0)
        return self._infer(RANKER_TREES, {FEATURES: features}, SCORE, left, version).reshape(-1)

    def load_version(self, version: int, timeout_s: float) -> None:
        """Asks Triton to (re)load every model, then waits until ``version`` of each is READY.

        The configs keep the two newest versions (``version_policy: latest 2``), so the
        version served until now keeps answering while this one loads. A Triton without
        explicit model control (polling, or none) refuses the load call: then this only waits.

        Raises:
            ModelUnavailable: ``version`` is not READY within ``timeout_s``.
        """
        from tritonclient.utils import InferenceServerException

        with self._lock:
            self._loading, self._ensemble_version, self._fused = True, None, None
        try:
            for model in (*LEAF_MODELS, RANKER):
                try:
                    self.client.load_model(model, client_timeout=timeout_s)
                except InferenceServerException as exc:
                    if "explicit" not in str(exc).lower():
                        raise ModelUnavailable(f"{model}: Triton refused to load version {version}: {exc.message()}") from exc
            expires = time.monotonic() + timeout_s
            for model in (*LEAF_MODELS, RANKER):  # the ensemble's version folder too: the fused model is pinned to it
                while not self._ready_version(model, version):
                    if time.monotonic() > expires:
                        raise ModelUnavailable(f"{model}: version {version} not READY after {timeout_s:.0f} s")
                    time.sleep(0.1)
        finally:
            with self._lock:
                self._loading = False
        self.ready(timeout_s=2.0)  # the ensemble's version and model_version, refreshed

    def _ready_version(self, model: str, version: int, timeout_s: float = 2.0) -> bool:
        try:
            return bool(self.client.is_model_ready(model, str(version), client_timeout=timeout_s))
        except Exception:  # noqa: BLE001 - "not ready yet" in every form
            return False

    def version_ready(self, version: int, timeout_s: float) -> bool:
        """Every leaf model READY at ``version`` in Triton (the ensemble is not pinned: see :meth:`rank`)."""
        return all(self._ready_version(m, version, timeout_s) for m in LEAF_MODELS)

    def close(self) -> None:
        self.client.close()
