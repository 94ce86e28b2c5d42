"""The orchestrator's Prometheus metrics, in a registry of its own.

One :class:`Metrics` per server (its own ``CollectorRegistry``, not the process-global one,
so several servers in one process do not clash). ``recsys serve --metrics-port`` exposes it
as a plain-HTTP ``/metrics`` page bound to the gRPC host. What it holds (times in seconds,
as Prometheus names them):

========================================  =========  ==========================================
``recsys_requests_total``                 counter    calls by ``rpc``, status ``code``, ``variant``
``recsys_request_latency_seconds``        histogram  server time per call, by ``rpc``
``recsys_stage_latency_seconds``          histogram  pipeline stage time, by ``stage``
``recsys_fallbacks_total``                counter    popular-movie answers, by ``reason``
``recsys_model_info``                     info       the served ``model_version``
``recsys_answers_total``                  counter    pipeline answers by A/B ``variant`` and ``model_version``
``recsys_triton_reachable``               gauge      1 when the last readiness poll succeeded
``recsys_request_log_dropped_total``      counter    request-log rows dropped (queue full)
``recsys_request_log_rows_total``         counter    request-log rows written
``recsys_shed_total``                     counter    calls refused by admission control, by ``rpc``
``recsys_drift_psi``                      gauge      PSI vs the export's reference, by ``distribution``
                                                     and ``model_version`` (``orchestrator/drift.py``)
``recsys_drift_window_answers``           gauge      answers the drift histograms hold, by ``model_version``
========================================  =========  ==========================================

Calls are counted by :class:`MetricsInterceptor`, the outermost interceptor, so refused
calls (UNAUTHENTICATED, RESOURCE_EXHAUSTED) are counted too. ``variant`` is the A/B variant
of the call, ``""`` until experiments exist. Recording is a few dictionary look-ups and
lock-protected additions per call (label children are cached).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.drift import DEFAULT_MIN_REQUESTS, DEFAULT_WINDOW_REQUESTS, DriftMonitor, DriftReference, DriftSample
from orchestrator.pipeline import HISTORY_UNAVAILABLE, MODEL_TIMEOUT, MODEL_UNAVAILABLE, NO_HISTORY

REQUEST_BUCKETS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Call latency buckets: dense over 1-100 ms, where Recommend lives, then a few for outliers."""

STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25)
"""Stage latency buckets: from 0.1 ms (a history read, MMR) to 100 ms and a little beyond."""

STAGES = ("history", "user_tower", "retrieval", "ranking", "reranking")
"""The pipeline's stage names (``Result.timings_ms`` keys)."""

FALLBACK_REASONS = (NO_HISTORY, MODEL_UNAVAILABLE, MODEL_TIMEOUT, HISTORY_UNAVAILABLE)


def rpc_name(method: str) -> str:
    """The ``rpc`` label of a full method name.

    ``/recsys.v1.Recommender/Recommend`` -> ``Recommend``; other services keep their short
    service name: ``/grpc.health.v1.Health/Check`` -> ``Health/Check``.
    """
    service, _, name = method.lstrip("/").partition("/")
    if service == "recsys.v1.Recommender":
        return name
    return f"{service.rsplit('.', 1)[-1]}/{name}"


class DriftCollector(Collector):
    """``recsys_drift_psi`` and ``recsys_drift_window_answers``, computed from the histograms at scrape time.

    The PSI is a function of the whole window, so it is computed when Prometheus asks (a few
    dozen bins per version), not on the request path.
    """

    def __init__(self, monitor: DriftMonitor):
        self.monitor = monitor

    def collect(self) -> Any:
        psi = GaugeMetricFamily(
            "recsys_drift_psi",
            "Population Stability Index of a served distribution against the export's reference (NaN: too few answers yet).",
            labels=("distribution", "model_version"),
        )
        answers = GaugeMetricFamily("recsys_drift_window_answers", "Model answers the drift histograms hold.", labels=("model_version",))
        for version, hist in sorted(self.monitor.histograms().items()):
            for d, value in hist.psi().items():
                psi.add_metric((d, version), value)
            answers.add_metric((version,), float(hist.requests))
        yield psi
        yield answers

    def describe(self) -> Any:
        yield GaugeMetricFamily("recsys_drift_psi", "", labels=("distribution", "model_version"))
        yield GaugeMetricFamily("recsys_drift_window_answers", "", labels=("model_version",))


class Metrics:
    """The metrics of one server (see the module docstring).

    Args:
        drift_window_requests: Answers per generation of the drift histograms.
        drift_min_requests: Fewer answers give NaN PSIs.

    Attributes:
        registry: The server's own registry.
        drift: The serving-side drift histograms.
        port: The bound ``/metrics`` port once :meth:`serve` ran, else None.
    """

    def __init__(self, drift_window_requests: int = DEFAULT_WINDOW_REQUESTS, drift_min_requests: int = DEFAULT_MIN_REQUESTS) -> None:
        r = self.registry = CollectorRegistry()
        self.drift = DriftMonitor(drift_window_requests, drift_min_requests)
        r.register(DriftCollector(self.drift))
        self.requests = Counter(
            "recsys_requests", "Calls, by RPC, gRPC status code and A/B variant.", ("rpc", "code", "variant"), registry=r
        )
        self.latency = Histogram(
            "recsys_request_latency_seconds", "Server-side time of a call, in seconds.", ("rpc",), buckets=REQUEST_BUCKETS_S, registry=r
        )
        self.stage_latency = Histogram(
            "recsys_stage_latency_seconds", "Wall time of one pipeline stage, in seconds.", ("stage",), buckets=STAGE_BUCKETS_S, registry=r
        )
        self.answers = Counter(
            "recsys_answers",
            "Pipeline answers by A/B variant and the model version that made them.",
            ("variant", "model_version"),
            registry=r,
        )
        self.fallbacks = Counter("recsys_fallbacks", "Answers that are the popular movies, by reason.", ("reason",), registry=r)
        self.shed = Counter("recsys_shed", "Calls refused with RESOURCE_EXHAUSTED by admission control, by RPC.", ("rpc",), registry=r)
        self.model = Info("recsys_model", "The served model set: model_version is the model repository version.", registry=r)
        self.triton_reachable = Gauge("recsys_triton_reachable", "1 when the inference backend passed its last readiness poll.", registry=r)
        self.request_log_dropped = Counter(
            "recsys_request_log_dropped", "Request-log rows dropped because the writer's queue was full.", registry=r
        )
        self.request_log_rows = Counter("recsys_request_log_rows", "Request-log rows written.", registry=r)
        self.version_load_failures = Counter(
            "recsys_version_load_failures", "Failed attempts to load a model version (start-up, hot reload, retries).", registry=r
        )
        # zero series from the start: rate() over a series that appears late misses its first step
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        for rpc in ("Recommend", "BatchRecommend", "Similar", "Popular"):  # zero series before the first shed
            self.shed.labels(rpc)
        for stage in STAGES:
            self.stage_latency.labels(stage)
        self._calls: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._stages = {stage: self.stage_latency.labels(stage) for stage in STAGES}
        self._http: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def count_shed(self, rpc: str) -> None:
        """One call of ``rpc`` refused by admission control."""
        self.shed.labels(rpc).inc()

    def observe_call(self, rpc: str, code: grpc.StatusCode, seconds: float, variant: str = "") -> None:
        """Counts one finished call and its latency."""
        key = (rpc, code.name, variant)
        children = self._calls.get(key)
        if children is None:
            children = self._calls[key] = (self.requests.labels(rpc, code.name, variant), self.latency.labels(rpc))
        children[0].inc()
        children[1].observe(seconds)

    def observe_result(self, timings_ms: Mapping[str, float], fallback: str | None, variant: str = "", model_version: str = "") -> None:
        """Records the stage times (milliseconds, as in ``Result.timings_ms``), a fallback, and the arm/version that answered."""
        self.answers.labels(variant, model_version).inc()
        for stage, ms in timings_ms.items():
            child = self._stages.get(stage)
            if child is None:  # a stage added later still gets a series
                child = self._stages[stage] = self.stage_latency.labels(stage)
            child.observe(ms / 1e3)
        if fallback is not None:
            self.fallbacks.labels(fallback).inc()

    def observe_drift(self, model_version: str, reference: DriftReference | None, sample: DriftSample | None) -> None:
        """Counts a model answer's drift sample (nothing for fallbacks or a version without a reference)."""
        if reference is not None and sample is not None:
            self.drift.observe(model_version, reference, sample)

    def observe_backend(self, reachable: bool, model_version: str) -> None:
        """The readiness poll's outcome and the model version it saw."""
        self.triton_reachable.set(1.0 if reachable else 0.0)
        self.model.info({"model_version": str(model_version)})

    def text(self) -> str:
        """The exposition page, as Prometheus would scrape it."""
        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int) -> int:
        """Starts the ``/metrics`` HTTP server on ``host:port`` (0: a free port); the bound port.

        Raises:
            RuntimeError: The port cannot be bound.
        """
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot bind the metrics port {host}:{port}: {exc.strerror}") from exc
        self.port = int(self._http.server_port)
        return self.port

    def stop(self) -> None:
        """Stops the HTTP server (if started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times and counts every unary call by RPC and final status code.

    Streaming calls (health Watch, reflection) pass through uncounted: their duration is
    how long a client listens, not how fast the server answers.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        behaviour = handler.unary_unary
        rpc = rpc_name(handler_call_details.method)
        observe = self.metrics.observe_call

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = behaviour(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN  # raised without abort: UNKNOWN
                raise
            finally:
                observe(rpc, code, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
