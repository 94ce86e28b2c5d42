"""The gRPC service: requests in, validation, the pipeline, responses out.

:func:`create_server` builds everything (catalog, store, backend, servicer, health,
reflection) and binds the port; :meth:`Server.start` runs it. Tests bind port 0 and talk to
a real server.

Around the servicer: :class:`~orchestrator.metrics.MetricsInterceptor` counts and times
every call, :class:`~orchestrator.auth.ApiKeyInterceptor` (when keys are configured) admits
it, and every answered call is queued for the request log (:mod:`orchestrator.requestlog`)
under the ``x-request-id`` it returns in its trailing metadata.

Validation lives here, in ``parse_*`` functions that raise
:class:`~orchestrator.errors.InvalidArgument` with a message naming the field, its value
and its range. Every handler runs inside :func:`_handle`, the one place that turns an
exception into a status (:func:`orchestrator.errors.abort`).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.admission import Admission, AdmissionInterceptor
from orchestrator.auth import ApiKeyInterceptor, load_keys, server_credentials
from orchestrator.backends import InferenceBackend, InProcessBackend, TritonBackend
from orchestrator.catalog import YEAR_RANGE, Catalog, Filters
from orchestrator.deployment import ReloadWatcher, Router, start_version
from orchestrator.errors import Deadline, InvalidArgument, RecsysError, abort, describe
from orchestrator.metrics import Metrics, MetricsInterceptor
from orchestrator.pipeline import (
    HISTORY_UNAVAILABLE,
    MODEL_TIMEOUT,
    MODEL_UNAVAILABLE,
    NO_HISTORY,
    Query,
    Recommender,
    Result,
    prestart_threads,
)
from orchestrator.requestlog import LogRow, RequestLog
from orchestrator.rerank import Promotion, RerankOptions
from orchestrator.settings import ServeSettings
from orchestrator.store import HistoryStore, RedisHistoryStore, SqliteHistoryStore
from protos.recsys.v1 import recsys_pb2 as pb
from protos.recsys.v1 import recsys_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
"""``recsys.v1.Recommender``: the health service reports it and ``""``."""

FALLBACK_REASONS = {
    None: pb.FALLBACK_REASON_UNSPECIFIED,
    NO_HISTORY: pb.FALLBACK_REASON_NO_HISTORY,
    MODEL_UNAVAILABLE: pb.FALLBACK_REASON_MODEL_UNAVAILABLE,
    MODEL_TIMEOUT: pb.FALLBACK_REASON_MODEL_TIMEOUT,
    HISTORY_UNAVAILABLE: pb.FALLBACK_REASON_HISTORY_UNAVAILABLE,
}
REQUEST_ID_HEADER = "x-request-id"
"""Trailing metadata key of the call's request id (the request log's ``request_id``)."""
PIPELINE_RPCS = frozenset({"Recommend", "BatchRecommend"})
"""RPCs whose stage timings and fallbacks go into the metrics."""
MAX_EXCLUDED = 10_000
FUTURE_SLACK_S = 86_400

T = TypeVar("T")
Work = Callable[[Deadline, str], T]
"""A handler's body: ``(deadline, request_id) -> response``."""


# ---------------------------------------------------------------------------- validation


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return float(value)


def parse_k(k: int, max_k: int) -> int:
    """``k`` in ``1..max_k``."""
    if not 1 <= k <= max_k:
        raise InvalidArgument(f"k must be in 1..{max_k}, got {k}")
    return int(k)


def parse_user_id(user_id: int, field: str = "user_id") -> int:
    """A user id ``>= 1``."""
    if user_id < 1:
        raise InvalidArgument(f"{field} must be >= 1, got {user_id}")
    return int(user_id)


def parse_rating(rating: float, field: str = "rating") -> float:
    """0 (watched, unrated) or 0.5..5.0 stars."""
    r = _finite(field, rating)
    if r != 0.0 and not 0.5 <= r <= 5.0:
        raise InvalidArgument(f"{field} must be 0 (unrated) or in 0.5..5.0, got {rating}")
    return r


def parse_filters(msg: pb.Filters) -> Filters:
    """:class:`Filters` from the message; genres are checked against the catalog later."""
    min_year = msg.min_year if msg.HasField("min_year") else None
    max_year = msg.max_year if msg.HasField("max_year") else None
    for name, year in (("min_year", min_year), ("max_year", max_year)):
        if year is not None and not YEAR_RANGE[0] <= year <= YEAR_RANGE[1]:
            raise InvalidArgument(f"filters.{name} must be in {YEAR_RANGE[0]}..{YEAR_RANGE[1]}, got {year}")
    if min_year is not None and max_year is not None and min_year > max_year:
        raise InvalidArgument(f"filters.min_year ({min_year}) is after filters.max_year ({max_year})")
    min_rating = None
    if msg.HasField("min_mean_rating"):
        min_rating = _finite("filters.min_mean_rating", msg.min_mean_rating)
        if not 0.0 <= min_rating <= 5.0:
            raise InvalidArgument(f"filters.min_mean_rating must be in 0.0..5.0, got {min_rating:g}")
    if len(msg.exclude_movie_ids) > MAX_EXCLUDED:
        raise InvalidArgument(f"filters.exclude_movie_ids holds {len(msg.exclude_movie_ids)} ids, at most {MAX_EXCLUDED}")
    genres = tuple(g for g in msg.genres)
    if any(not g.strip() for g in genres):
        raise InvalidArgument("filters.genres holds an empty name")
    return Filters(genres, min_year, max_year, min_rating, tuple(msg.exclude_movie_ids), bool(msg.include_seen))


def parse_rerank(msg: pb.Rerank, k: int, settings: ServeSettings, default_lambda: float | None = None) -> RerankOptions:
    """:class:`RerankOptions` with the settings' defaults for unset fields."""
    lam = default_lambda if default_lambda is not None else settings.mmr_lambda
    if msg.HasField("mmr_lambda"):
        lam = _finite("rerank.mmr_lambda", msg.mmr_lambda)
        if not 0.0 <= lam <= 1.0:
            raise InvalidArgument(f"rerank.mmr_lambda must be in 0.0..1.0, got {lam:g}")
    # MMR needs at least k candidates to choose k from, whatever the default pool says
    pool = max(k, settings.mmr_pool)
    if msg.HasField("candidate_pool"):
        pool = msg.candidate_pool
        if not k <= pool <= max(k, settings.retrieve_k):
            raise InvalidArgument(f"rerank.candidate_pool must be in k..{max(k, settings.retrieve_k)} (k = {k}), got {pool}")
    fresh = 0.0
    if msg.HasField("freshness_weight"):
        fresh = _finite("rerank.freshness_weight", msg.freshness_weight)
        if not 0.0 <= fresh <= 1.0:
            raise InvalidArgument(f"rerank.freshness_weight must be in 0.0..1.0, got {fresh:g}")
    quota = None
    if msg.HasField("max_per_genre"):
        quota = msg.max_per_genre
        if not 1 <= quota <= 500:
            raise InvalidArgument(f"rerank.max_per_genre must be in 1..500, got {quota}")
    return RerankOptions(lam, int(pool), fresh, quota, parse_promotions(msg.promotions, k), settings.mmr_penalty)


PROMOTION_KIND_NAMES = {pb.PROMOTION_KIND_SPONSORED: "sponsored", pb.PROMOTION_KIND_EDITORIAL: "editorial"}


def parse_promotions(msgs: Sequence[pb.Promotion], k: int) -> tuple[Promotion, ...]:
    """Promotion slots: positions 1..k, each movie and each position once, a kind set.

    Whether the movies exist is checked against the answering catalog by the pipeline.
    """
    if len(msgs) > k:
        raise InvalidArgument(f"rerank.promotions holds {len(msgs)} entries, at most k ({k})")
    out: list[Promotion] = []
    positions: dict[int, int] = {}
    movies: dict[int, int] = {}
    for n, m in enumerate(msgs):
        where = f"rerank.promotions[{n}]"
        if not 1 <= m.position <= k:
            raise InvalidArgument(f"{where}.position must be in 1..k ({k}), got {m.position}")
        if m.position in positions:
            raise InvalidArgument(f"{where}.position {m.position} is already taken by rerank.promotions[{positions[m.position]}]")
        if m.movie_id in movies:
            raise InvalidArgument(f"{where}.movie_id {m.movie_id} is already promoted by rerank.promotions[{movies[m.movie_id]}]")
        if m.kind not in PROMOTION_KIND_NAMES:
            raise InvalidArgument(f"{where}.kind must be PROMOTION_KIND_SPONSORED or PROMOTION_KIND_EDITORIAL, got {m.kind}")
        positions[m.position], movies[m.movie_id] = n, n
        out.append(Promotion(int(m.movie_id), int(m.position) - 1, PROMOTION_KIND_NAMES[m.kind]))
    return tuple(out)


def parse_recommend(msg: pb.RecommendRequest, settings: ServeSettings) -> Query:
    """A validated :class:`Query` (subject, k, filters, rerank)."""
    k = parse_k(msg.k, settings.max_k)
    filters = parse_filters(msg.filters)
    options = parse_rerank(msg.rerank, k, settings)
    subject = msg.WhichOneof("subject")
    if subject == "user_id":
        return Query(k, filters, options, user_id=parse_user_id(msg.user_id))
    if subject != "history":
        raise InvalidArgument("set user_id or history")
    movies, ratings = list(msg.history.movie_ids), list(msg.history.ratings)
    if not movies:
        raise InvalidArgument("history.movie_ids is empty; send at least one movie id (or a user_id)")
    if len(movies) > settings.max_history:
        raise InvalidArgument(f"history.movie_ids holds {len(movies)} ids, at most {settings.max_history}")
    if ratings and len(ratings) != len(movies):
        raise InvalidArgument(f"history.ratings has {len(ratings)} values for {len(movies)} movie ids (send one each, or none)")
    ratings = [parse_rating(r, f"history.ratings[{i}]") for i, r in enumerate(ratings)]
    return Query(k, filters, options, history=tuple(movies), ratings=tuple(ratings) or None)


# ---------------------------------------------------------------------------- responses


def _items(catalog: Catalog, result: Result) -> list[pb.RecommendedItem]:
    catalog = result.catalog or catalog  # the catalog the answer was computed on (hot reload may have swapped)
    return [
        pb.RecommendedItem(
            movie_id=int(catalog.movie_ids[i]),
            title=str(catalog.titles[i]),
            genres=catalog.genres[i],
            year=int(catalog.years[i]),
            score=float(s),
            explanation=e,
        )
        for i, s, e in zip(result.items.tolist(), result.scores.tolist(), result.explanations)
    ]


def recommend_response(catalog: Catalog, result: Result, started: float) -> pb.RecommendResponse:
    """The RecommendResponse of a pipeline :class:`Result`."""
    t = result.timings_ms
    return pb.RecommendResponse(
        items=_items(catalog, result),
        model_version=result.model_version,
        is_fallback=result.fallback is not None,
        fallback_reason=FALLBACK_REASONS[result.fallback],
        latency_ms=(time.perf_counter() - started) * 1e3,
        timings=pb.StageTimings(
            history_ms=t.get("history", 0.0),
            user_tower_ms=t.get("user_tower", 0.0),
            retrieval_ms=t.get("retrieval", 0.0),
            ranking_ms=t.get("ranking", 0.0),
            reranking_ms=t.get("reranking", 0.0),
        ),
        ignored_movie_ids=result.ignored_movie_ids,
        history_length=result.history_length,
        variant=result.variant,
        dropped_promotion_ids=result.dropped_promotions,
    )


# ---------------------------------------------------------------------------- the servicer


class RecommenderService(recsys_pb2_grpc.RecommenderServicer):
    """``recsys.v1.Recommender`` over a :class:`Recommender` pipeline.

    Args:
        recommender: The pipeline.
        metrics: Where stage timings and fallbacks are recorded (a private one if None).
        request_log: Where answered calls are queued; None: not logged.
    """

    def __init__(self, recommender: Recommender | Router, metrics: Metrics | None = None, request_log: RequestLog | None = None):
        self.rec = recommender
        self.settings = recommender.settings
        self.metrics = metrics or Metrics()
        self.request_log = request_log

    @property
    def catalog(self) -> Catalog:
        """The served catalog now (the router swaps it on a hot reload)."""
        return self.rec.catalog

    def _handle(self, context: grpc.ServicerContext, work: Work[T]) -> T:
        """Runs ``work`` under the call's deadline and request id; the one place errors become statuses."""
        # the deadline starts here, so parsing and store reads count against it too
        deadline = Deadline(context.time_remaining(), self.settings.default_deadline_s)
        request_id = uuid.uuid4().hex
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))  # errors carry it too
        try:
            return work(deadline, request_id)
        except Exception as exc:
            abort(context, exc)
            raise  # unreachable: abort raises

    def _observe(
        self, request_id: str, rpc: str, user_id: int | None, result: Result, items: Sequence[pb.RecommendedItem], latency_ms: float
    ) -> None:
        """Metrics of a pipeline answer, and its request-log row (queued, never waited for)."""
        if rpc in PIPELINE_RPCS:
            self.metrics.observe_result(result.timings_ms, result.fallback, result.variant, result.model_version)
            if result.drift is not None and result.catalog is not None:
                self.metrics.observe_drift(result.model_version, result.catalog.drift_reference, result.drift)
        if self.request_log is not None:
            row = LogRow(
                request_id,
                time.time(),
                user_id,
                rpc,
                [i.movie_id for i in items],
                [i.score for i in items],
                latency_ms,
                result.model_version,
                result.fallback,
                result.variant,
                result.drift,
            )
            self.request_log.log(row)

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RecommendResponse:
        """Top-k for a user or a history; the popular fallback when the models cannot answer."""
        started = time.perf_counter()

        def work(deadline: Deadline, request_id: str) -> pb.RecommendResponse:
            query = parse_recommend(request, self.settings)
            result = self.rec.recommend(query, deadline)
            response = recommend_response(self.catalog, result, started)
            self._observe(request_id, "Recommend", query.user_id, result, response.items, response.latency_ms)
            return response

        return self._handle(context, work)

    def Similar(self, request: pb.SimilarRequest, context: grpc.ServicerContext) -> pb.SimilarResponse:
        """Nearest movies by item embedding; needs FAISS only, so it answers while Triton is down."""
        started = time.perf_counter()

        def work(deadline: Deadline, request_id: str) -> pb.SimilarResponse:
            k = parse_k(request.k, self.settings.max_k)
            filters = parse_filters(request.filters)
            if request.rerank.promotions:
                raise InvalidArgument("rerank.promotions apply to Recommend and BatchRecommend, not Similar")
            options = parse_rerank(request.rerank, k, self.settings, default_lambda=1.0)
            user = parse_user_id(request.user_id) if request.HasField("user_id") else None
            result = self.rec.similar(request.movie_id, k, filters, options, user, deadline)
            response = pb.SimilarResponse(
                items=_items(self.catalog, result),
                model_version=result.model_version,
                latency_ms=(time.perf_counter() - started) * 1e3,
            )
            self._observe(request_id, "Similar", user, result, response.items, response.latency_ms)
            return response

        return self._handle(context, work)

    def Popular(self, request: pb.PopularRequest, context: grpc.ServicerContext) -> pb.PopularResponse:
        """The most rated movies (precomputed orders, filtered per request)."""
        started = time.perf_counter()

        def work(deadline: Deadline, request_id: str) -> pb.PopularResponse:
            k = parse_k(request.k, self.settings.max_k)
            if request.window not in (pb.POPULARITY_WINDOW_ALL_TIME, pb.POPULARITY_WINDOW_RECENT):
                raise InvalidArgument(f"window {request.window} is not a PopularityWindow")
            result = self.rec.popular(k, request.window == pb.POPULARITY_WINDOW_RECENT, parse_filters(request.filters))
            response = pb.PopularResponse(items=_items(self.catalog, result), latency_ms=(time.perf_counter() - started) * 1e3)
            self._observe(request_id, "Popular", None, result, response.items, response.latency_ms)
            return response

        return self._handle(context, work)

    def BatchRecommend(self, request: pb.BatchRecommendRequest, context: grpc.ServicerContext) -> pb.BatchRecommendResponse:
        """Recommend per request, in order; a request's error becomes its Failure, not the batch's."""
        started = time.perf_counter()

        def work(deadline: Deadline, request_id: str) -> pb.BatchRecommendResponse:
            n = len(request.requests)
            if not 1 <= n <= self.settings.max_batch:
                raise InvalidArgument(f"requests must hold 1..{self.settings.max_batch} requests, got {n}")
            # parse every request first (a bad one becomes its Failure), then run the valid
            # ones through the batched pipeline: one user-tower call, few ranker calls
            results: dict[int, pb.BatchRecommendResult] = {}
            queries: list[tuple[int, Query]] = []
            for i, sub in enumerate(request.requests):
                try:
                    queries.append((i, parse_recommend(sub, self.settings)))
                except RecsysError as exc:
                    code, message = describe(exc)
                    results[i] = pb.BatchRecommendResult(index=i, failure=pb.Failure(code=code.value[0], message=message))
            if queries:
                deadline.check("the batch")  # an expired batch fails whole
                t0 = time.perf_counter()
                try:
                    answers = self.rec.recommend_many([q for _, q in queries], deadline)
                except RecsysError as exc:
                    code, message = describe(exc)
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise  # the caller stops listening: partial results would reach nobody
                    answers = [exc] * len(queries)
                for (i, query), result in zip(queries, answers):
                    if isinstance(result, RecsysError):
                        code, message = describe(result)
                        results[i] = pb.BatchRecommendResult(index=i, failure=pb.Failure(code=code.value[0], message=message))
                        continue
                    res = recommend_response(self.catalog, result, t0)
                    self._observe(request_id, "BatchRecommend", query.user_id, result, res.items, res.latency_ms)
                    results[i] = pb.BatchRecommendResult(index=i, response=res)
            ordered = [results[i] for i in range(n)]
            return pb.BatchRecommendResponse(results=ordered, latency_ms=(time.perf_counter() - started) * 1e3)

        return self._handle(context, work)

    def RecordInteraction(self, request: pb.RecordInteractionRequest, context: grpc.ServicerContext) -> pb.RecordInteractionResponse:
        """Appends one interaction, acknowledged only once it is durable."""

        def work(deadline: Deadline, request_id: str) -> pb.RecordInteractionResponse:
            user = parse_user_id(request.user_id)
            rating = parse_rating(request.rating)
            now = int(time.time())
            ts = request.timestamp_s or now  # proto3 cannot tell 0 from unset: both mean "now"
            if ts < 0 or ts > now + FUTURE_SLACK_S:
                raise InvalidArgument(f"timestamp_s must be in 0..now + 1 day ({now + FUTURE_SLACK_S}), got {ts}")
            deadline.check("recording")
            created, length = self.rec.record(user, request.movie_id, rating, ts)
            return pb.RecordInteractionResponse(created=created, history_length=length, timestamp_s=ts)

        return self._handle(context, work)

    def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.ServicerContext) -> pb.DeleteUserResponse:
        """Erases the user's history and request-log rows (rows queued before the call included).

        A Recommend for the user still in flight while this runs may log its row afterwards.
        """

        def work(deadline: Deadline, request_id: str) -> pb.DeleteUserResponse:
            user = parse_user_id(request.user_id)
            deadline.check("deleting")
            interactions = self.rec.store.delete_user(user)
            rows = 0
            if self.request_log is not None:
                rows = self.request_log.delete_user(user, timeout_s=max(0.05, deadline.remaining()))
            log.info("DeleteUser %s (request %s): %d interactions, %d request-log rows", user, request_id, interactions, rows)
            return pb.DeleteUserResponse(interactions_deleted=interactions, request_log_rows_deleted=rows)

        return self._handle(context, work)


# ---------------------------------------------------------------------------- the server


class HealthWatcher:
    """Polls the backend's readiness and publishes it on the standard health service.

    NOT_SERVING until the first successful check (the catalog and the index are loaded
    before the server exists), then follows the backend: a Recommend still answers with the
    popular fallback while it is NOT_SERVING, but load balancers should prefer another
    replica. Given the :class:`~orchestrator.deployment.Router`, "ready" also means that
    every pinned version is READY in the backend (:meth:`Router.ready`).
    """

    def __init__(
        self,
        servicer: health.HealthServicer,
        backend: InferenceBackend | Router,
        poll_s: float,
        warm_up: Callable[[], object] | None = None,
        metrics: Metrics | None = None,
    ):
        self.servicer = servicer
        self.backend = backend
        self.poll_s = poll_s
        self.warm_up = warm_up
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsys-health", daemon=True)
        self.serving = False
        self._publish(False)

    def _publish(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.servicer.set(name, status)
        if ok != self.serving:
            log.info("health: %s", "SERVING" if ok else "NOT_SERVING")
        self.serving = ok

    def check(self) -> bool:
        """One readiness check, published."""
        ok = self.backend.ready(timeout_s=min(2.0, self.poll_s * 2))
        if ok and not self.serving and self.warm_up is not None:
            self.warm_up()  # a (re)started backend is cold: pay its first calls before SERVING
        self._publish(ok)
        if self.metrics is not None:
            self.metrics.observe_backend(ok, self.backend.model_version)
        return ok

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.servicer.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so


class Server:
    """A built gRPC server and the resources it owns; :meth:`stop` releases them all.

    Attributes:
        grpc_server: The ``grpc.Server``.
        port: The bound port.
        recommender: The pipeline (catalog, store, backend).
        health: The health watcher.
        metrics: The server's Prometheus metrics (served on ``settings.metrics_port``).
        request_log: The request log, or None when it is off.
        admission: The admission gate (``orchestrator/admission.py``), set by :func:`create_server`.
    """

    admission: Admission | None = None

    def __init__(
        self,
        grpc_server: grpc.Server,
        port: int,
        recommender: Recommender | Router,
        watcher: HealthWatcher,
        metrics: Metrics | None = None,
        request_log: RequestLog | None = None,
        reloader: ReloadWatcher | None = None,
    ):
        self.grpc_server = grpc_server
        self.reloader = reloader
        self.port = port
        self.recommender = recommender
        self.health = watcher
        self.metrics = metrics or Metrics()
        self.request_log = request_log

    @property
    def metrics_port(self) -> int | None:
        """The bound ``/metrics`` port once started (None: no exporter)."""
        return self.metrics.port

    @property
    def address(self) -> str:
        """``host:port`` clients dial."""
        host = self.recommender.settings.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{self.port}"

    def start(self) -> Server:
        """Starts the metrics page (when ``metrics_port`` is set), serving and the health polling.

        Raises:
            RuntimeError: The metrics port cannot be bound.
        """
        settings = self.recommender.settings
        if settings.metrics_port is not None and self.metrics.port is None:
            self.metrics.serve(settings.host, settings.metrics_port)
        self.grpc_server.start()
        self.health.start()
        if self.reloader is not None:
            self.reloader.start()
        return self

    def stop(self, grace_s: float | None = 2.0) -> None:
        """Health NOT_SERVING, in-flight calls get ``grace_s``, then the request log is written
        out and the backend, store and metrics page close."""
        if self.reloader is not None:
            self.reloader.stop()
        self.health.stop()
        self.grpc_server.stop(grace_s).wait()
        if self.request_log is not None:
            self.request_log.close()
        self.recommender.backend.close()
        self.recommender.store.close()
        self.metrics.stop()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server stops (True) or ``timeout_s`` passes (False)."""
        return self.grpc_server.wait_for_termination(timeout_s)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Undecodable:
    """A request body that is not a valid message of its RPC (kept to answer INVALID_ARGUMENT)."""

    def __init__(self, error: str):
        self.error = error


def add_servicer(servicer: RecommenderService, server: grpc.Server) -> None:
    """Registers ``recsys.v1.Recommender`` like the generated ``add_RecommenderServicer_to_server``,
    but with deserializers that never raise.

    grpc-python answers a body its deserializer cannot parse with INTERNAL ("Exception
    deserializing request!"), i.e. blames the server for the caller's bytes. Here such a
    body reaches the handler as :class:`Undecodable` and is answered INVALID_ARGUMENT.
    """

    def tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
        def deserialize(data: bytes) -> object:
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError, and whatever a hostile body triggers
                return Undecodable(f"{type(exc).__name__}: {exc}")

        return deserialize

    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Recommender"].methods:
        request_cls, response_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)

        def behaviour(
            request: Any,
            context: grpc.ServicerContext,
            impl: Any = getattr(servicer, method.name),
            rpc: str = method.name,
            kind: str = method.input_type.full_name,
        ) -> Any:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{rpc}: the request body is not a valid {kind} ({request.error})")
            return impl(request, context)

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=tolerant(request_cls.FromString), response_serializer=response_cls.SerializeToString
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def make_store(settings: ServeSettings) -> HistoryStore:
    """The configured history store, seeded from the artifacts' interactions on first start."""
    seed = settings.artifacts_dir / "interactions.parquet"
    seed_from = seed if seed.is_file() else None
    if settings.history_store == "redis":
        return RedisHistoryStore(settings.redis_url, seed_from)
    return SqliteHistoryStore(settings.history_db(), seed_from)


def make_backend(settings: ServeSettings) -> InferenceBackend:
    """Triton when ``triton_url`` is set, else onnxruntime on the repository's graphs."""
    if settings.triton_url:
        return TritonBackend(settings.triton_url)
    return InProcessBackend(settings.model_repository)


def create_server(
    settings: ServeSettings,
    *,
    backend: InferenceBackend | None = None,
    store: HistoryStore | None = None,
    catalog: Catalog | None = None,
) -> tuple[Server, int]:
    """Builds the server (not started): catalog, store, backend, servicer, health, reflection.

    Args:
        settings: Serving settings.
        backend: Overrides :func:`make_backend` (tests inject slow or failing ones).
        store: Overrides :func:`make_store`.
        catalog: A catalog already loaded (several servers over one artifacts folder).

    Returns:
        ``(server, port)``: call ``server.start()``; ``port`` is the bound one (port 0 in
        the settings picks a free port).

    Raises:
        RuntimeError: The port cannot be bound, or a TLS file cannot be read.
        StartupError: No published version's catalog matches the artifacts (a RuntimeError:
            ``recsys serve`` exits 1 with its message).
        ValueError: The API keys do not parse.
    """
    # keys and certificates first: a typo there should fail before minutes of loading
    keys = load_keys(settings)
    credentials = server_credentials(settings)
    own_backend = backend is None
    backend = backend or make_backend(settings)
    try:
        # the newest version the artifacts can serve, hash-checked like a hot reload's
        version, folder = start_version(settings.model_repository, settings.artifacts_dir, backend)
    except Exception:
        if own_backend:
            backend.close()
        raise
    catalog = catalog or Catalog.load(folder, settings.mmr_genre_weight)
    store = store or make_store(settings)
    recommender = Router(settings, catalog, store, backend, version)
    metrics = Metrics(settings.drift_window_requests, settings.drift_min_requests)
    # metrics outermost: calls the key check refuses are counted too
    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if keys:
        interceptors.append(ApiKeyInterceptor(keys))
    sys.setswitchinterval(settings.gil_switch_ms / 1e3)  # process-wide: see ServeSettings.gil_switch_ms
    # after the key check: an unauthenticated caller never takes a slot
    admission = Admission(
        min(settings.max_in_flight, settings.workers), settings.admission_wait_ms / 1e3, settings.retry_after_ms, settings.max_running
    )
    interceptors.append(AdmissionInterceptor(admission, metrics.count_shed))
    # so_reuseport off: a second server on a taken port must fail, not share it silently;
    # maximum_concurrent_rpcs = the pool: no call waits in the executor's unbounded queue
    pool = futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="recsys")
    prestart_threads(pool, settings.workers)
    server = grpc.server(
        pool,
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=settings.workers,
    )
    request_log = None
    if settings.request_log:
        request_log = RequestLog(
            settings.request_log_db(),
            settings.request_log_queue,
            on_drop=metrics.request_log_dropped.inc,
            on_write=metrics.request_log_rows.inc,
            max_age_s=settings.request_log_max_age_s or None,  # 0: no limit
            max_rows=settings.request_log_max_rows or None,
        )
    add_servicer(RecommenderService(recommender, metrics, request_log), server)
    # non-blocking: Watch streams must not each hold one of the worker threads
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        if request_log is not None:
            request_log.close()
        raise RuntimeError(f"cannot bind {address}")
    watcher = HealthWatcher(
        health_servicer, recommender, settings.health_poll_s, lambda: recommender.warm_up(settings.warmup_calls), metrics
    )
    # with hot reload off the watcher still keeps the pinned version loaded
    reloader = ReloadWatcher(
        recommender,
        settings.model_repository,
        settings.reload_poll_s or settings.health_poll_s,
        follow_newer=settings.reload_poll_s > 0,
        retry_s=settings.reload_retry_s,
        retry_max_s=settings.reload_retry_max_s,
        max_attempts=settings.reload_max_attempts,
        on_failure=metrics.version_load_failures.inc,
    )
    built = Server(server, port, recommender, watcher, metrics, request_log, reloader)
    built.admission = admission  # the gate, for operators' introspection and tests
    return built, port
