"""Where the two models run: the interface, Triton, and in process.

The pipeline calls two models and nothing else:

* ``user_tower``: (history [B, L] int64, history_rating [B, L] fp32, demographics [B, 3]
  int64) -> user_embedding [B, dim] fp32;
* ``ranker_ensemble``: one row per candidate (item, retrieval_score, retrieval_rank,
  history, history_rating) -> score [N, 1] fp32 (features + LightGBM trees in one call).

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
from typing import Protocol

import numpy as np

from orchestrator.errors import ModelError, ModelTimeout, ModelUnavailable

log = logging.getLogger(__name__)

USER_TOWER = "user_tower"
RANKER = "ranker_ensemble"
CANDIDATE_INPUTS = ("item", "retrieval_score", "retrieval_rank", "history", "history_rating")


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

    def user_embedding(
        self, history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray, timeout_s: float
    ) -> np.ndarray:
        """float32 [B, dim] user vectors for left-padded history windows [B, L]."""
        ...

    def rank(
        self,
        items: np.ndarray,
        retrieval_scores: np.ndarray,
        retrieval_ranks: np.ndarray,
        history: np.ndarray,
        ratings: np.ndarray,
        timeout_s: float,
    ) -> np.ndarray:
        """float32 [N] ranker scores of N candidates of one user (history windows [N, L])."""
        ...

    def close(self) -> None:
        """Releases connections / sessions."""
        ...


def user_tower_feeds(history: np.ndarray, ratings: np.ndarray, demographics: np.ndarray) -> dict[str, np.ndarray]:
    """The user tower's input tensors, in the dtypes of its configs."""
    return {
        "history": np.ascontiguousarray(history, np.int64),
        "history_rating": np.ascontiguousarray(ratings, np.float32),
        "demographics": np.ascontiguousarray(demographics, np.int64),
    }


def candidate_feeds(
    items: np.ndarray, retrieval_scores: np.ndarray, retrieval_ranks: np.ndarray, history: np.ndarray, ratings: np.ndarray
) -> dict[str, np.ndarray]:
    """The ranker's input tensors: candidates are the batch axis, per-row scalars have dims [1]."""
    n = len(items)
    return {
        "item": np.asarray(items, np.int64).reshape(n, 1),
        "retrieval_score": np.asarray(retrieval_scores, np.float32).reshape(n, 1),
        "retrieval_rank": np.asarray(retrieval_ranks, np.float32).reshape(n, 1),
        "history": np.ascontiguousarray(history, dtype=np.int64),
        "history_rating": np.ascontiguousarray(ratings, dtype=np.float32),
    }


def latest_version(repo: Path, models: tuple[str, ...]) -> int:
    """The highest version number every one of ``models`` has in ``repo``.

    Raises:
        FileNotFoundError: No common version (run ``recsys export``).
    """
    common: set[int] | None = None
    for m in models:
        folder = repo / m
        found = {int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()} if folder.is_dir() else set()
        common = found if common is None else common & found
    if not common:
        raise FileNotFoundError(f"{repo}: no version exported for all of {models} (run `recsys export`)")
    return max(common)


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
        leaves = (USER_TOWER, "ranker_features", "ranker")
        self.version = version or latest_version(repo, leaves)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self._sessions = {
            m: ort.InferenceSession(str(repo / m / str(self.version) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            for m in leaves
        }

    @property
    def model_version(self) -> str:
        return str(self.version)

    def ready(self, timeout_s: float) -> bool:  # noqa: ARG002 - loaded at construction
        return True

    def _run(self, model: str, output: str, feeds: dict[str, np.ndarray], timeout_s: float) -> np.ndarray:
        if timeout_s <= 0:
            raise ModelTimeout(f"{model}: no time left for the call")
        t0 = time.monotonic()
        try:
            out = self._sessions[model].run([output], feeds)[0]
        except Exception as exc:  # onnxruntime raises its own types for bad feeds: a defect here
            raise ModelError(f"{model}: onnxruntime failed: {type(exc).__name__}") from exc
        if time.monotonic() - t0 > timeout_s:
            raise ModelTimeout(f"{model}: answered after the {timeout_s:.3f} s timeout")
        return out

    def user_embedding(self, history, ratings, demographics, timeout_s):
        feeds = user_tower_feeds(history, ratings, demographics)
        return self._run(USER_TOWER, "user_embedding", feeds, timeout_s)

    def rank(self, items, retrieval_scores, retrieval_ranks, history, ratings, timeout_s):
        t0 = time.monotonic()
        feeds = candidate_feeds(items, retrieval_scores, retrieval_ranks, history, ratings)
        features = self._run("ranker_features", "features", feeds, timeout_s)
        left = timeout_s - (time.monotonic() - t0)
        return self._run("ranker", "score", {"features": features}, left).reshape(-1)

    def close(self) -> None:
        self._sessions.clear()


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
        self.client = grpcclient.InferenceServerClient(url)
        self._version = "unknown"
        self._lock = threading.Lock()

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
                with self._lock:
                    self._version = str(max(versions, key=int)) if versions else "unknown"
            return bool(ok)
        except Exception as exc:  # any failure to ask is "not ready", which is what health reports
            log.debug("triton at %s not ready: %r", self.url, exc)
            return False

    def _infer(self, model: str, feeds: dict[str, np.ndarray], output: str, timeout_s: float) -> np.ndarray:
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
                model, inputs, outputs=[self._grpc.InferRequestedOutput(output)], client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise triton_error(exc, model, timeout_s) from exc
        out = result.as_numpy(output)
        if out is None:
            raise ModelError(f"{model}: Triton returned no '{output}' tensor")
        return out

    def user_embedding(self, history, ratings, demographics, timeout_s):
        feeds = user_tower_feeds(history, ratings, demographics)
        return self._infer(USER_TOWER, feeds, "user_embedding", timeout_s)

    def rank(self, items, retrieval_scores, retrieval_ranks, history, ratings, timeout_s):
        feeds = candidate_feeds(items, retrieval_scores, retrieval_ranks, history, ratings)
        return self._infer(RANKER, feeds, "score", timeout_s).reshape(-1)

    def close(self) -> None:
        self.client.close()

