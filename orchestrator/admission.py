"""Admission control: past capacity, refuse fast instead of queueing without bound.

Two CPU cores serve a few hundred recommendations per second. Without a bound, every request
beyond that waits in the server's thread-pool queue and in Triton's queues, so *every*
caller's latency grows with the offered load (measured before this module: p50 176 ms at
concurrency 32). With it, at most ``max_in_flight`` model-backed calls run at once; a call
that finds no free slot within ``admission_wait_ms`` is answered at once with
``RESOURCE_EXHAUSTED``, a message that says when to retry, and two trailing metadata entries:

* ``grpc-retry-pushback-ms``: gRPC's own retry-pushback header (honoured by gRPC's built-in
  retry policy);
* ``recsys-shed: 1``: marks a refusal *before any work*, which is what makes retrying safe
  (:mod:`clients.client` retries only calls so marked, with jittered backoff).

The admitted calls keep a bounded latency (about ``max_in_flight`` calls' worth of work on
the cores). Each refusal is counted in ``recsys_shed_total{rpc}``.

Of the admitted calls, at most ``max_running`` run the pipeline at once; the others wait
their turn in arrival order (:class:`Turns`: threads parked on a lock cost no CPU),
within their own deadline (DEADLINE_EXCEEDED past it, nothing done). On two cores, sixteen
threads in the pipeline at once spend more in GIL hand-offs and thread switches than they
overlap: at concurrency 16 the orchestrator's CPU per call was 4.85 ms with 16 running and
2.9-3.1 ms with 2-3, and throughput 201 against 268-279 QPS (BENCHMARKS.md "The hot path").

A refused call is answered before its body is decoded (:class:`AdmissionInterceptor` hands
gRPC no deserializer and decodes only admitted bodies). grpc-python runs every handler on a
pool thread, refusals included, so the thread pool (``workers``) must be larger than
``max_in_flight`` so that a refused call gets a thread to be refused on at once; gRPC's ``maximum_concurrent_rpcs`` is set to the pool
size, the last guard: calls past it would otherwise wait in the executor's unbounded queue
before any interceptor sees them (gRPC refuses those itself, RESOURCE_EXHAUSTED without our
hint).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from orchestrator.metrics import rpc_name

SHED_HEADER = "recsys-shed"
"""Trailing metadata key set on a call refused before any work (safe to retry)."""
PUSHBACK_HEADER = "grpc-retry-pushback-ms"
"""gRPC's standard retry-pushback trailing metadata key."""
ADMITTED_RPCS = frozenset({"Recommend", "BatchRecommend", "Similar", "Popular"})
"""The read calls that use the models, FAISS or the catalog; writes, deletes, health and
reflection are cheap and never shed."""


class Turns:
    """``n`` turns handed out strictly in arrival order.

    ``threading.Semaphore`` lets a newcomer take a turn that was just released ahead of the
    threads already waiting (measured under overload: a few admitted calls waited 600 ms
    while later ones ran); here a released turn is handed directly to the oldest waiter.
    """

    def __init__(self, n: int):
        self._free = n
        self._lock = threading.Lock()
        self._queue: deque[threading.Lock] = deque()

    def acquire(self, timeout_s: float | None) -> bool:
        """True once this thread holds a turn; False when ``timeout_s`` passed first (None: no limit)."""
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._queue.append(waiter)
        if waiter.acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0.0)):
            return True
        with self._lock:
            if waiter in self._queue:  # still queued: give up the place
                self._queue.remove(waiter)
                return False
        return True  # handed a turn just as the wait ran out: it is this thread's now

    def release(self) -> None:
        """Hands the turn to the oldest waiter, or frees it."""
        with self._lock:
            if self._queue:
                self._queue.popleft().release()
            else:
                self._free += 1


class Admission:
    """A counting gate of ``limit`` slots; :meth:`try_enter` waits at most ``wait_s`` for one.

    Args:
        limit: Calls admitted at once (>= 1).
        wait_s: Longest wait for a slot before refusing (0: refuse at once).
        retry_after_ms: The retry hint given to refused callers.
        running: Admitted calls that run at once (:meth:`start`); None: all ``limit``.
    """

    def __init__(self, limit: int, wait_s: float = 0.0, retry_after_ms: int = 50, running: int | None = None):
        running = limit if running is None else running
        if limit < 1 or running < 1 or wait_s < 0 or retry_after_ms < 0:
            raise ValueError("limit and running must be >= 1, wait_s and retry_after_ms >= 0")
        self.limit = limit
        self.running = min(running, limit)
        self.wait_s = wait_s
        self.retry_after_ms = retry_after_ms
        self._slots = threading.BoundedSemaphore(limit)
        self._turns = Turns(self.running)
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet finished."""
        return self._in_flight

    def try_enter(self) -> bool:
        """Takes a slot (True) or gives up after ``wait_s`` (False)."""
        ok = self._slots.acquire(timeout=self.wait_s) if self.wait_s > 0 else self._slots.acquire(blocking=False)
        if ok:
            with self._lock:
                self._in_flight += 1
        return ok

    def leave(self) -> None:
        """Returns the slot taken by :meth:`try_enter`."""
        with self._lock:
            self._in_flight -= 1
        self._slots.release()

    def start(self, timeout_s: float | None) -> bool:
        """An admitted call's turn to run: True once one of ``running`` turns is free, False
        when ``timeout_s`` (its remaining deadline; None: no deadline) passes first."""
        return self._turns.acquire(timeout_s)

    def finish(self) -> None:
        """Gives back the turn taken by :meth:`start`."""
        self._turns.release()

    def refusal(self) -> str:
        """The RESOURCE_EXHAUSTED message: what happened and when to retry."""
        return (
            f"overloaded: {self.limit} requests already in progress (max_in_flight); nothing was done, "
            f"retry after {self.retry_after_ms} ms with jittered exponential backoff"
        )


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Sheds :data:`ADMITTED_RPCS` calls that find the :class:`Admission` gate full.

    Args:
        admission: The gate.
        on_shed: Called with the RPC name of each refused call (the metric).
    """

    def __init__(self, admission: Admission, on_shed: Callable[[str], None]):
        self.admission = admission
        self.on_shed = on_shed

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        rpc = rpc_name(handler_call_details.method)
        if handler is None or rpc not in ADMITTED_RPCS or handler.request_streaming or handler.response_streaming:
            return handler
        behaviour = handler.unary_unary
        decode = handler.request_deserializer
        gate = self.admission

        # gRPC gets no deserializer: the body arrives as bytes and is decoded only once a slot
        # is taken, so a refusal costs no protobuf parsing (a BatchRecommend body can be large)
        def admitted(body: bytes, context: grpc.ServicerContext) -> Any:
            if not gate.try_enter():
                self.on_shed(rpc)
                context.set_trailing_metadata(((SHED_HEADER, "1"), (PUSHBACK_HEADER, str(gate.retry_after_ms))))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, gate.refusal())
            try:
                if not gate.start(context.time_remaining()):
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc}: the deadline passed while waiting for a turn to run; nothing was done"
                    )
                try:
                    return behaviour(decode(body) if decode is not None else body, context)
                finally:
                    gate.finish()
            finally:
                gate.leave()

        return grpc.unary_unary_rpc_method_handler(admitted, request_deserializer=None, response_serializer=handler.response_serializer)
