"""Admission control on a real gRPC server: past ``max_in_flight`` calls are shed fast, marked
as safe to retry, counted; the client retries only marked refusals."""

from __future__ import annotations

import threading
import time

import grpc
import pandas as pd
import pytest

from clients import errors as E
from clients.client import RecsysClient, _shed_pushback_s
from orchestrator.admission import PUSHBACK_HEADER, SHED_HEADER, Admission, AdmissionInterceptor, Turns
from orchestrator.backends import InProcessBackend
from orchestrator.service import create_server
from orchestrator.settings import ServeSettings
from protos.recsys.v1 import recsys_pb2 as pb
from protos.recsys.v1 import recsys_pb2_grpc


class SlowBackend:
    """The in-process backend with a fixed delay before each user-tower call (a busy model);
    counts the user-tower calls in progress at once (``most_at_once``)."""

    def __init__(self, inner: InProcessBackend):
        self.inner = inner
        self.name = inner.name
        self.delay_s = 0.0
        self.at_once = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    def ready(self, timeout_s: float) -> bool:
        return True

    def user_embedding(self, *args, timeout_s, version=None):
        with self._lock:
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            time.sleep(self.delay_s)
            return self.inner.user_embedding(*args, timeout_s=timeout_s, version=version)
        finally:
            with self._lock:
                self.at_once -= 1

    def rank(self, *args, timeout_s, version=None):
        return self.inner.rank(*args, timeout_s=timeout_s, version=version)

    def load_version(self, version, timeout_s):
        self.inner.load_version(version, timeout_s)

    def live(self, timeout_s):
        return True

    def version_ready(self, version, timeout_s):
        return self.inner.version_ready(version, timeout_s)

    def close(self) -> None:
        self.inner.close()


def start_gated(tiny_artifacts, tiny_repository, tmp_path_factory, max_in_flight: int, max_running: int):
    backend = SlowBackend(InProcessBackend(tiny_repository))
    s = ServeSettings(
        artifacts_dir=tiny_artifacts,
        model_repository=tiny_repository,
        history_db_path=tmp_path_factory.mktemp("adm") / "h.sqlite",
        workers=16,
        max_in_flight=max_in_flight,
        max_running=max_running,
        admission_wait_ms=0.0,
        retry_after_ms=40,
        triton_timeout_s=5.0,
        warmup_calls=1,
    )
    server, port = create_server(s, backend=backend)
    server.start()
    RecsysClient(f"127.0.0.1:{port}").wait_until_serving(30)
    ratings = pd.read_parquet(tiny_artifacts / "interactions.parquet")
    counts = ratings.user_id.value_counts()
    user = int(counts[(counts >= 8) & (counts <= 20)].index[0])  # a moderate history: unseen movies left
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return backend, server, port, recsys_pb2_grpc.RecommenderStub(channel), user, channel


@pytest.fixture(scope="module")
def gated(tiny_artifacts, tiny_repository, tmp_path_factory):
    *parts, channel = start_gated(tiny_artifacts, tiny_repository, tmp_path_factory, max_in_flight=2, max_running=2)
    yield tuple(parts)
    channel.close()
    parts[1].stop()


@pytest.fixture(scope="module")
def one_at_a_time(tiny_artifacts, tiny_repository, tmp_path_factory):
    """Four calls admitted, one running at a time."""
    *parts, channel = start_gated(tiny_artifacts, tiny_repository, tmp_path_factory, max_in_flight=4, max_running=1)
    yield tuple(parts)
    channel.close()
    parts[1].stop()


def run_together(call, n: int, backend: SlowBackend) -> None:
    """``call`` on ``n`` threads (each waits at a barrier inside ``call``); the backend's delay reset after."""
    threads = [threading.Thread(target=call) for _ in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        backend.delay_s = 0.0


def test_admitted_calls_wait_their_turn_and_all_succeed(one_at_a_time):
    backend, server, _port, stub, user = one_at_a_time
    backend.delay_s, backend.most_at_once = 0.2, 0
    codes: list[str] = []
    start = threading.Barrier(4)

    def call() -> None:
        start.wait()
        try:
            stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=20)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)

    run_together(call, 4, backend)
    assert codes == ["OK"] * 4  # admitted, none shed: they queued for their turn
    assert backend.most_at_once == 1  # and ran one at a time
    assert server.admission.in_flight == 0


def test_a_call_whose_deadline_passes_in_the_queue_is_answered_deadline_exceeded(one_at_a_time):
    backend, server, _port, stub, user = one_at_a_time
    backend.delay_s = 1.5
    blocker = threading.Thread(target=lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=20))
    blocker.start()
    try:
        expires = time.monotonic() + 20
        while backend.at_once == 0:  # the first call holds the one turn
            assert time.monotonic() < expires
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=0.3)
        assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        blocker.join(30)
        backend.delay_s = 0.0
    assert server.admission.in_flight == 0
    stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10)  # the turn is free again


def test_calls_past_the_limit_are_shed_fast_with_a_retry_hint(gated):
    backend, server, _port, stub, user = gated
    backend.delay_s = 1.0
    outcomes: list[tuple[str, float, object]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def call() -> None:
        start.wait()
        try:
            stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=20)
            out = ("ok", time.perf_counter(), None)
        except grpc.RpcError as exc:
            out = (exc.code().name, time.perf_counter(), exc)
        with lock:
            outcomes.append(out)

    run_together(call, 6, backend)
    codes = sorted(o[0] for o in outcomes)
    assert codes == ["RESOURCE_EXHAUSTED"] * 4 + ["ok"] * 2, codes
    # refused at once: every refusal arrives before the first admitted call (1 s of model time) ends
    # (an order, not a duration: this test must not depend on how busy the machine is)
    assert max(end for code, end, _ in outcomes if code != "ok") < min(end for code, end, _ in outcomes if code == "ok")
    for code, _end, exc in outcomes:
        if code == "RESOURCE_EXHAUSTED":
            assert "retry after 40 ms" in exc.details()
            meta = dict(exc.trailing_metadata())
            assert meta[SHED_HEADER] == "1" and meta[PUSHBACK_HEADER] == "40"
    assert server.metrics.shed.labels("Recommend")._value.get() == 4
    # the gate is free again afterwards
    stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10)


def wait_full(server, timeout_s: float = 20.0) -> None:
    """Until both admission slots are taken (the blocking calls reached the server)."""
    expires = time.monotonic() + timeout_s
    while server.admission.in_flight < server.admission.limit:
        assert time.monotonic() < expires, "the blocking calls never reached the server"
        time.sleep(0.01)


def test_client_retries_shed_calls_until_admitted(gated):
    backend, server, port, stub, user = gated
    backend.delay_s = 0.5
    blockers = [
        threading.Thread(target=stub.Recommend, args=(pb.RecommendRequest(user_id=user, k=3),), kwargs={"timeout": 10}) for _ in range(2)
    ]
    try:
        for t in blockers:
            t.start()
        wait_full(server)
        with RecsysClient(f"127.0.0.1:{port}", retries=30, backoff_s=0.05, max_backoff_s=0.2) as client:
            resp = client.recommend(user, k=3, timeout_s=20)  # shed, retried, admitted once a slot frees
            assert len(resp.items) == 3
        with RecsysClient(f"127.0.0.1:{port}", retries=0) as client:
            for t in blockers:
                t.join(5)
            blockers = [
                threading.Thread(target=stub.Recommend, args=(pb.RecommendRequest(user_id=user, k=3),), kwargs={"timeout": 10})
                for _ in range(2)
            ]
            for t in blockers:
                t.start()
            wait_full(server)
            with pytest.raises(E.ResourceExhausted) as excinfo:  # no retries left: the refusal reaches the caller
                client.recommend(user, k=3, timeout_s=20)
            assert "overloaded" in str(excinfo.value)
    finally:
        for t in blockers:
            t.join(10)
        backend.delay_s = 0.0


def test_only_marked_refusals_are_retryable():
    shed = ((SHED_HEADER, "1"), (PUSHBACK_HEADER, "40"))
    assert _shed_pushback_s(grpc.StatusCode.RESOURCE_EXHAUSTED, shed) == pytest.approx(0.04)
    assert _shed_pushback_s(grpc.StatusCode.RESOURCE_EXHAUSTED, ()) is None  # e.g. gRPC's own limit: may not be safe
    assert _shed_pushback_s(grpc.StatusCode.RESOURCE_EXHAUSTED, None) is None
    assert _shed_pushback_s(grpc.StatusCode.INTERNAL, shed) is None


def test_admission_gate_counts_and_refuses():
    gate = Admission(2, wait_s=0.0, retry_after_ms=10)
    assert gate.try_enter() and gate.try_enter()
    assert gate.in_flight == 2
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()
    with pytest.raises(ValueError):
        Admission(0)
    with pytest.raises(ValueError):
        Admission(2, running=0)


def test_turns_are_limited_and_given_in_arrival_order():
    gate = Admission(8, running=1)
    assert gate.start(None)
    assert not gate.start(0.01)  # the one turn is taken: a short wait gives up
    order: list[int] = []
    waiting = []
    for n in range(3):
        t = threading.Thread(target=lambda n=n: (gate.start(10), order.append(n), gate.finish()))
        t.start()
        waiting.append(t)
        time.sleep(0.05)  # queued one after another
    gate.finish()
    for t in waiting:
        t.join(10)
    assert order == [0, 1, 2]


def test_a_released_turn_goes_to_the_oldest_waiter_not_a_newcomer():
    turns = Turns(1)
    assert turns.acquire(None)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: turns.acquire(10) and got.set())
    waiter.start()
    expires = time.monotonic() + 10
    while not turns._queue:  # the waiter is queued
        assert time.monotonic() < expires
        time.sleep(0.005)
    turns.release()  # handed to the waiter at once...
    assert not turns.acquire(0)  # ...so a newcomer finds none free
    waiter.join(10)
    assert got.is_set()
    turns.release()
    assert turns.acquire(0)  # free again, nobody waiting


class _Context:
    """The ``grpc.ServicerContext`` calls a refusal makes, recorded (abort raises, as gRPC's does)."""

    def __init__(self):
        self.trailers: tuple = ()
        self.code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, trailers: tuple) -> None:
        self.trailers = trailers

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise RuntimeError(details)


def test_refused_bodies_are_never_decoded_admitted_ones_once():
    """The gate runs before the request body is parsed: gRPC gets no deserializer from the interceptor."""
    decoded: list[bytes] = []

    def decode(body: bytes) -> pb.RecommendRequest:
        decoded.append(body)
        return pb.RecommendRequest.FromString(body)

    inner = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req.user_id, request_deserializer=decode)
    gate = Admission(1, wait_s=0.0, retry_after_ms=7)
    shed: list[str] = []
    details = type("Details", (), {"method": "/recsys.v1.Recommender/Recommend", "invocation_metadata": ()})()
    handler = AdmissionInterceptor(gate, shed.append).intercept_service(lambda _d: inner, details)
    assert handler.request_deserializer is None  # gRPC hands the behaviour raw bytes
    body = pb.RecommendRequest(user_id=5, k=3).SerializeToString()
    assert handler.unary_unary(body, _Context()) == 5 and decoded == [body]  # admitted: decoded once
    assert gate.in_flight == 0
    gate.try_enter()  # the one slot taken
    ctx = _Context()
    with pytest.raises(RuntimeError, match="overloaded"):
        handler.unary_unary(b"\xff" * 10_000, ctx)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and (PUSHBACK_HEADER, "7") in ctx.trailers
    assert decoded == [body] and shed == ["Recommend"]  # refused: never decoded, counted
