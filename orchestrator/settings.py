"""The orchestrator's settings: one frozen object, validated on construction.

Units are in the names (``_s`` seconds, ``_k`` counts of items). Every field can come from an
environment variable ``RECSYS_<FIELD>`` (:meth:`ServeSettings.from_env`); command-line flags
override those (``recsys serve``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from orchestrator.drift import DEFAULT_MIN_REQUESTS, DEFAULT_WINDOW_REQUESTS
from orchestrator.mmr import PENALTIES

ENV_PREFIX = "RECSYS_"
HISTORY_STORES = ("sqlite", "redis")
CANDIDATE_MODES = ("merged", "two_tower")
"""``candidate_sources`` values: every source merged (the default), or the ANN list alone."""
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _boolean(raw: str) -> bool:
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"expected one of {sorted(_BOOLEANS)}") from None


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/triton-recsys`` (``~/.local/state/triton-recsys``): where the history lives.

    Not inside the artifacts folder: deployments mount it read-only.
    """
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "triton-recsys"


@dataclass(frozen=True)
class ServeSettings:
    """Everything that shapes the online path.

    Attributes:
        artifacts_dir: Folder written by ``recsys train`` (item table, embeddings,
            interactions, optional ``faiss/`` bundle).
        model_repository: Triton model repository (the in-process backend runs its ONNX
            files; ``recsys serve`` starts the embedded Triton on it).
        triton_url: ``host:port`` of Triton's gRPC endpoint; None: in-process backend.
        host: Address the gRPC API binds to.
        port: gRPC port; 0 picks a free one.
        metrics_port: Port of the Prometheus ``/metrics`` page (plain HTTP, bound to
            ``host``); None: no exporter; 0 picks a free port.
        workers: Server threads, and gRPC's ``maximum_concurrent_rpcs`` (calls past it are
            refused by gRPC itself). Should exceed ``max_in_flight``: the spare threads answer
            shed calls at once (the gate is capped at ``workers``).
        max_in_flight: Model-backed calls (Recommend, BatchRecommend, Similar, Popular) run at
            once; past it calls are shed with RESOURCE_EXHAUSTED and a retry hint
            (``orchestrator/admission.py``). About the calls two cores finish in a few tens of ms.
        max_running: Of the admitted calls, how many run the pipeline at once; the others wait
            their turn in arrival order within their deadline (``orchestrator/admission.py``).
            Two or three on two cores: more threads at once cost more in GIL hand-offs and
            thread switches than they overlap.
        admission_wait_ms: Longest wait for a free slot before a call is shed.
        retry_after_ms: The retry hint of a shed call (``grpc-retry-pushback-ms``).
        gil_switch_ms: The interpreter's thread switch interval (``sys.setswitchinterval``,
            process-wide, set when the server is built). A thread waiting for the GIL waits up
            to this long while another runs Python; every gRPC call, a refusal too, needs the
            GIL several times (BENCHMARKS.md "Tuning" measures it).
        history_store: ``sqlite`` (default, a file) or ``redis``.
        history_db_path: SQLite file; None: one per artifacts set under :func:`default_state_dir`.
        redis_url: Redis URL when ``history_store == "redis"``.
        default_deadline_s: Deadline of a call whose client set none.
        triton_timeout_s: Longest one Triton call may take before Recommend falls back to
            the popular movies (the caller's deadline caps it further).
        health_poll_s: How often Triton's readiness is polled for the health service.
        retrieve_k: Merged candidates the ranker scores (FAISS' list and every other source's
            are up to this long; the ranker was trained on 200 merged candidates).
        candidate_sources: ``merged`` (default): every candidate source merged by the published
            budgets. ``two_tower``: the ANN list alone, no other source computed (their
            ``candidate_sources`` rank columns -1): the retrieval before issue 12, kept to
            measure what the merge costs (``recsys bench e2e --quick``); the ranker was
            trained on merged candidates, so it is a latency baseline, not a quality setting.
        overlap_user_tower: Compute the candidate sources that do not need the user vector
            (item neighbours, genre and popular lists) while the user-tower call is in flight
            on a pool thread, instead of after it (same candidates either way; the timed
            ``user_tower`` stage then covers both).
        batch_rank_users: Users per ranker call in BatchRecommend (each call carries
            ``batch_rank_users * retrieve_k`` rows, padded to that shape, at most
            ``RANKER_MAX_ROWS``). On the CPU the trees' matrices of a few hundred rows stay in
            cache: measured in process, 0.7 ms a user at 1-4 users a call, 1.1 ms at 20.
        batch_rank_lanes: Ranker calls one BatchRecommend keeps in flight at once (the CPU
            config runs two ranker instances; 1: one call after another).
        mmr_lambda: Default MMR trade-off (1 relevance only, 0 diversity only).
        mmr_pool: Default number of ranked candidates MMR chooses from.
        mmr_penalty: How MMR counts similarity to the items already picked, one of
            :data:`orchestrator.mmr.PENALTIES` (``sum``: the summed similarity, which is what
            ILD measures; ``max``: Carbonell & Goldstein's closest item).
        mmr_genre_weight: Share of genre cosine (vs embedding cosine) in MMR's similarity.
        max_k: Largest ``k`` a request may ask for.
        max_batch: Largest BatchRecommend.
        max_history: Longest explicit history a request may carry.
        warmup_calls: Full model paths run on a synthetic history before health first
            turns SERVING (and again after Triton comes back), so no user pays the cold
            start (~100 ms on the first call otherwise).
        reload_poll_s: How often the model repository is polled for a newer version to
            hot-reload (``orchestrator/deployment.py``); 0 turns hot reload off.
        reload_timeout_s: Longest a new version may take to become ready in the backend.
        reload_retry_s: Delay before retrying a version that failed to load; doubles per
            failure up to ``reload_retry_max_s``.
        reload_retry_max_s: Longest delay between two load attempts of one version.
        reload_max_attempts: Attempts at a newer version before it is left alone until a
            newer one appears (the pinned version is retried without a limit).
        ab_version: The model version of the A/B ``treatment`` arm (None: no experiment);
            it must be one of the two newest published versions (Triton serves those).
        ab_share: Share of users (by a stable hash of the id) routed to ``ab_version``.
        ab_salt: Salt of that hash: a new salt reshuffles users between arms.
        api_keys_file: File of API keys, one ``key[:requests_per_second][:scope]`` a line
            (``#`` comments; scope ``read``, ``interact`` (the default) or ``admin``, see
            ``orchestrator/auth.py``); with :attr:`api_keys`, the keys a call must send as
            ``x-api-key`` metadata. No key configured at all: authentication is off.
        api_keys: The same entries comma-separated (``RECSYS_API_KEYS``); never printed.
        tls_cert: PEM certificate chain of the gRPC port; with ``tls_key``: TLS on.
        tls_key: PEM private key of ``tls_cert``.
        request_log: Whether answered Recommend / Similar / Popular calls are logged.
        request_log_path: The request log's SQLite file; None: beside the history DB
            (:meth:`request_log_db`).
        request_log_queue: Rows waiting for the log writer at most; more are dropped
            (counted in ``recsys_request_log_dropped_total``), never waited for.
        request_log_max_age_s: Request-log rows older than this are deleted (checked every
            minute by the writer); 0: kept forever. Default 30 days.
        request_log_max_rows: The request log keeps at most this many rows, the newest;
            0: no bound. Default 5,000,000 (about 1-2 GB with its indexes; the file stops
            growing at the bound, SQLite reusing freed pages).
        drift_window_requests: Answers per generation of the drift histograms: the
            ``recsys_drift_psi`` gauges describe the last 1-2 windows (``orchestrator/drift.py``).
        drift_min_requests: Fewer answers in the drift window give NaN PSIs (no alert on noise).
    """

    artifacts_dir: Path = Path("artifacts")
    model_repository: Path = Path("model_repository")
    triton_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    workers: int = 64
    max_in_flight: int = 16
    max_running: int = 3
    admission_wait_ms: float = 2.0
    retry_after_ms: int = 50
    gil_switch_ms: float = 5.0
    history_store: str = "sqlite"
    history_db_path: Path | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    default_deadline_s: float = 5.0
    triton_timeout_s: float = 1.0
    health_poll_s: float = 1.0
    retrieve_k: int = 200
    candidate_sources: str = "merged"
    overlap_user_tower: bool = True
    batch_rank_users: int = 4
    batch_rank_lanes: int = 2
    # the operating point of the offline evaluation (export/evaluate.py EvalSettings), chosen
    # without relevance labels on the rolling evaluation of ml-100k (BENCHMARKS.md, "Diversity:
    # the MMR operating point"): of the served penalties' points that reach ILD@10 +20 %, the one
    # that keeps the most of the ranker's own expected DCG@10 (benchmarks/diversity_frontier.py
    # label_free_choice; lambda 0.9 / pool 30 before: +14 % ILD, chosen on windows 1-3's labels)
    mmr_lambda: float = 0.88
    mmr_pool: int = 100
    mmr_penalty: str = "sum"
    mmr_genre_weight: float = 1.0
    max_k: int = 500
    max_batch: int = 256
    max_history: int = 1000
    warmup_calls: int = 20
    reload_poll_s: float = 2.0
    reload_timeout_s: float = 120.0
    reload_retry_s: float = 5.0
    reload_retry_max_s: float = 60.0
    reload_max_attempts: int = 6
    ab_version: int | None = None
    ab_share: float = 0.0
    ab_salt: str = "recsys-ab"
    api_keys_file: Path | None = None
    api_keys: str | None = field(default=None, repr=False)  # secrets stay out of logs and tracebacks
    tls_cert: Path | None = None
    tls_key: Path | None = None
    request_log: bool = True
    request_log_path: Path | None = None
    request_log_queue: int = 10_000
    request_log_max_age_s: float = 30 * 86_400.0
    request_log_max_rows: int = 5_000_000
    drift_window_requests: int = DEFAULT_WINDOW_REQUESTS
    drift_min_requests: int = DEFAULT_MIN_REQUESTS

    def __post_init__(self) -> None:
        # paths may arrive as strings (env, flags); normalise so the object stays hashable
        object.__setattr__(self, "artifacts_dir", Path(self.artifacts_dir))
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        for name in ("history_db_path", "api_keys_file", "tls_cert", "tls_key", "request_log_path"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port {self.metrics_port} is not in 0..65535")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.batch_rank_users < 1 or self.batch_rank_lanes < 1:
            problems.append(f"batch_rank_users and batch_rank_lanes must be >= 1, got {self.batch_rank_users}, {self.batch_rank_lanes}")
        if self.max_running < 1:
            problems.append(f"max_running must be >= 1, got {self.max_running}")
        if self.max_in_flight < 1:
            problems.append(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.admission_wait_ms < 0 or self.retry_after_ms < 0:
            problems.append("admission_wait_ms and retry_after_ms must be >= 0")
        if not 0 < self.gil_switch_ms <= 1000:
            problems.append(f"gil_switch_ms must be in (0, 1000], got {self.gil_switch_ms}")
        if self.history_store not in HISTORY_STORES:
            problems.append(f"history_store must be one of {HISTORY_STORES}, got {self.history_store!r}")
        for name in ("default_deadline_s", "triton_timeout_s", "health_poll_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.max_k <= 500:
            problems.append(f"max_k must be in 1..500 (the API's range), got {self.max_k}")
        if self.retrieve_k < 1:
            problems.append(f"retrieve_k must be >= 1, got {self.retrieve_k}")
        if self.candidate_sources not in CANDIDATE_MODES:
            problems.append(f"candidate_sources must be one of {CANDIDATE_MODES}, got {self.candidate_sources!r}")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            problems.append(f"mmr_lambda must be in [0, 1], got {self.mmr_lambda}")
        if not 1 <= self.mmr_pool <= self.retrieve_k:
            problems.append(f"mmr_pool must be in 1..retrieve_k ({self.retrieve_k}), got {self.mmr_pool}")
        if self.mmr_penalty not in PENALTIES:
            problems.append(f"mmr_penalty must be one of {PENALTIES}, got {self.mmr_penalty!r}")
        if not 0.0 <= self.mmr_genre_weight <= 1.0:
            problems.append(f"mmr_genre_weight must be in [0, 1], got {self.mmr_genre_weight}")
        if self.reload_poll_s < 0 or not self.reload_timeout_s > 0:
            problems.append("reload_poll_s must be >= 0 (0: off) and reload_timeout_s > 0")
        if not 0 < self.reload_retry_s <= self.reload_retry_max_s or self.reload_max_attempts < 1:
            problems.append("reload_retry_s must be in (0, reload_retry_max_s] and reload_max_attempts >= 1")
        if not 0.0 <= self.ab_share <= 1.0:
            problems.append(f"ab_share must be in [0, 1], got {self.ab_share}")
        if self.ab_share > 0 and self.ab_version is None:
            problems.append("ab_share > 0 needs ab_version (the treatment's model version)")
        if self.warmup_calls < 0:
            problems.append(f"warmup_calls must be >= 0, got {self.warmup_calls}")
        if self.max_batch < 1 or self.max_history < 1:
            problems.append("max_batch and max_history must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together: set both (TLS) or neither (plaintext)")
        if self.request_log_queue < 1:
            problems.append(f"request_log_queue must be >= 1, got {self.request_log_queue}")
        if self.request_log_max_age_s < 0 or self.request_log_max_rows < 0:
            problems.append("request_log_max_age_s and request_log_max_rows must be >= 0 (0: no limit)")
        if self.drift_window_requests < 1 or self.drift_min_requests < 1:
            problems.append("drift_window_requests and drift_min_requests must be >= 1")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def history_db(self) -> Path:
        """The SQLite file: the configured one, or one per artifacts folder in the state dir."""
        if self.history_db_path is not None:
            return self.history_db_path
        key = hashlib.sha256(str(self.artifacts_dir.resolve()).encode()).hexdigest()[:12]
        return default_state_dir() / f"history-{key}.sqlite"

    def request_log_db(self) -> Path:
        """The request log's SQLite file: the configured one, or ``<history db>-requests.sqlite``."""
        if self.request_log_path is not None:
            return self.request_log_path
        db = self.history_db()
        return db.with_name(f"{db.stem}-requests.sqlite")

    def with_(self, **changes: Any) -> ServeSettings:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from ``RECSYS_*`` variables, then ``overrides`` (None values are skipped).

        Args:
            env: The environment (default ``os.environ``).
            **overrides: Field values that win over the environment (e.g. parsed flags).

        Raises:
            ValueError: A variable does not parse, or the result is invalid.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = str(f.type)
            try:
                if kind.startswith("bool"):
                    values[f.name] = _boolean(raw)
                elif kind.startswith("int"):
                    values[f.name] = int(raw)
                elif kind.startswith("float"):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: not a {kind}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
