"""Typed clients of ``recsys.v1.Recommender``: :class:`RecsysClient` (sync) and :class:`AsyncRecsysClient`.

Both have the same surface and the same policy:

* every call has a deadline (``timeout_s``, default 5 s per client, overridable per call);
* only calls that did nothing are retried, with jittered exponential backoff, inside the
  same deadline: UNAVAILABLE (the server was not reachable or not ready) and
  RESOURCE_EXHAUSTED *marked as shed* by the server's admission control (trailing metadata
  ``recsys-shed: 1``; the wait is at least its ``grpc-retry-pushback-ms`` hint); every other
  status, RESOURCE_EXHAUSTED without the mark included, is final;
* failures raise the class of their status code (:mod:`clients.errors`);
* ``api_key`` is sent as ``x-api-key`` metadata on every call; ``tls_ca`` (a PEM root
  certificate, or ``tls=True`` for the system's roots) turns on TLS.

Responses are the generated protobuf messages (``protos/recsys/v1/recsys_pb2.pyi`` types
them)::

    with RecsysClient("127.0.0.1:50051") as client:
        for item in client.recommend(42, k=10, genres=["Action"]).items:
            print(item.title, item.explanation)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.errors import DeadlineExceeded, from_rpc_error, request_id_of
from protos.recsys.v1 import recsys_pb2 as pb
from protos.recsys.v1 import recsys_pb2_grpc

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
SHED_HEADER = "recsys-shed"
"""Trailing metadata of a call the server refused before doing anything (orchestrator/admission.py)."""
PUSHBACK_HEADER = "grpc-retry-pushback-ms"
API_KEY_HEADER = "x-api-key"

R = TypeVar("R")


class FilterArgs(TypedDict, total=False):
    """Keyword filters (see ``Filters`` in recsys.proto)."""

    genres: Sequence[str]
    min_year: int
    max_year: int
    min_mean_rating: float
    exclude_movie_ids: Sequence[int]
    include_seen: bool


class Promoted(NamedTuple):
    """A promotion slot of Recommend (see ``Promotion`` in recsys.proto).

    Attributes:
        movie_id: MovieLens movie id.
        position: 1-based position in the answer, 1..k.
        kind: ``"sponsored"`` or ``"editorial"``.
    """

    movie_id: int
    position: int
    kind: str = "sponsored"


PROMOTION_KINDS = {"sponsored": pb.PROMOTION_KIND_SPONSORED, "editorial": pb.PROMOTION_KIND_EDITORIAL}


def promotion(slot: Promoted | pb.Promotion) -> pb.Promotion:
    """The ``Promotion`` message of a slot.

    Raises:
        ValueError: An unknown kind.
    """
    if isinstance(slot, pb.Promotion):
        return slot
    if slot.kind not in PROMOTION_KINDS:
        raise ValueError(f"promotion kind must be one of {sorted(PROMOTION_KINDS)}, got {slot.kind!r}")
    return pb.Promotion(movie_id=slot.movie_id, position=slot.position, kind=PROMOTION_KINDS[slot.kind])


class RerankArgs(TypedDict, total=False):
    """Keyword MMR and rules (see ``Rerank`` in recsys.proto)."""

    mmr_lambda: float
    candidate_pool: int
    freshness_weight: float
    max_per_genre: int
    promotions: Sequence[Promoted | pb.Promotion]


class RecommendArgs(FilterArgs, RerankArgs, total=False):
    """Filters and re-ranking options of Recommend / Similar."""


_FILTER_KEYS = frozenset(FilterArgs.__annotations__)
_RERANK_KEYS = frozenset(RerankArgs.__annotations__)


def _split(options: dict[str, Any]) -> tuple[pb.Filters, pb.Rerank]:
    unknown = set(options) - _FILTER_KEYS - _RERANK_KEYS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    filters = pb.Filters(**{k: v for k, v in options.items() if k in _FILTER_KEYS and v is not None})
    rerank_args = {k: v for k, v in options.items() if k in _RERANK_KEYS and v is not None}
    if "promotions" in rerank_args:
        rerank_args["promotions"] = [promotion(p) for p in rerank_args["promotions"]]
    rerank = pb.Rerank(**rerank_args)
    return filters, rerank


def recommend_request(
    user_id: int | None = None,
    *,
    history: Sequence[int] | None = None,
    ratings: Sequence[float] | None = None,
    k: int = 10,
    **options: Unpack[RecommendArgs],
) -> pb.RecommendRequest:
    """A RecommendRequest for a user id or an explicit history (exactly one of them)."""
    if (user_id is None) == (history is None):
        raise TypeError("pass exactly one of user_id and history")
    filters, rerank = _split(dict(options))
    req = pb.RecommendRequest(k=k, filters=filters, rerank=rerank)
    if user_id is not None:
        req.user_id = user_id
    else:
        req.history.CopyFrom(pb.History(movie_ids=list(history or ()), ratings=list(ratings or ())))
    return req


def similar_request(movie_id: int, *, k: int = 10, user_id: int | None = None, **options: Unpack[RecommendArgs]) -> pb.SimilarRequest:
    """A SimilarRequest."""
    filters, rerank = _split(dict(options))
    req = pb.SimilarRequest(movie_id=movie_id, k=k, filters=filters, rerank=rerank)
    if user_id is not None:
        req.user_id = user_id
    return req


def popular_request(*, k: int = 10, recent: bool = False, **filters: Unpack[FilterArgs]) -> pb.PopularRequest:
    """A PopularRequest (all time, or the recent window)."""
    flt, _ = _split(dict(filters))
    window = pb.POPULARITY_WINDOW_RECENT if recent else pb.POPULARITY_WINDOW_ALL_TIME
    return pb.PopularRequest(k=k, window=window, filters=flt)


ReadRequest = pb.RecommendRequest | pb.SimilarRequest | pb.PopularRequest
"""The requests :meth:`RecsysClient.answer` sends (the read-only RPCs)."""


class Answer(NamedTuple):
    """A response with the id the server logged the call under.

    Attributes:
        response: The RPC's response message.
        request_id: The call's ``x-request-id`` (32 hex digits), or None when the server sent none.
    """

    response: Any
    request_id: str | None


def channel_credentials(tls: bool = False, tls_ca: str | Path | bytes | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel: None (plaintext) unless ``tls`` or ``tls_ca``.

    Args:
        tls: Use TLS with the system's root certificates.
        tls_ca: PEM root certificate(s) to trust instead (a path or the bytes); implies TLS.
    """
    if tls_ca is None:
        return grpc.ssl_channel_credentials() if tls else None
    root = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root)


def _shed_pushback_s(code: grpc.StatusCode, trailers: Any) -> float | None:
    """The server's retry hint in seconds when the call was shed before any work, else None."""
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not trailers:
        return None
    meta = {k: v for k, v in trailers}
    if meta.get(SHED_HEADER) != "1":
        return None
    try:
        return max(0.0, float(meta.get(PUSHBACK_HEADER, 0))) / 1e3
    except ValueError:
        return 0.0


def _backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    # "full jitter": spreads the retries of many clients hitting one restarting server
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2**attempt)


class _Base:
    def __init__(self, timeout_s: float, retries: int, backoff_s: float, max_backoff_s: float, api_key: str | None):
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata = ((API_KEY_HEADER, api_key),) if api_key else None

    def _read_rpc(self, request: ReadRequest) -> Any:
        """The stub method of a Recommend, Similar or Popular request (for ``answer``)."""
        stub = self._stub  # type: ignore[attr-defined]  # set by each subclass
        rpc = {pb.RecommendRequest: stub.Recommend, pb.SimilarRequest: stub.Similar, pb.PopularRequest: stub.Popular}
        try:
            return rpc[type(request)]
        except KeyError:
            raise TypeError(f"answer() sends Recommend, Similar or Popular requests, not {type(request).__name__}") from None

    def _next_wait(self, exc: grpc.RpcError, attempt: int, expires: float, trailers: Any = None) -> float | None:
        """Seconds to wait before retrying, or None when the error is final."""
        # UNAVAILABLE and a shed call mean the call did not run; any other status may have had effects
        pushback_s = _shed_pushback_s(exc.code(), trailers)
        if (exc.code() not in RETRYABLE and pushback_s is None) or attempt >= self.retries:
            return None
        wait = max(_backoff_s(attempt, self.backoff_s, self.max_backoff_s), pushback_s or 0.0)
        return wait if time.monotonic() + wait < expires else None


class RecsysClient(_Base):
    """Blocking client.

    Args:
        target: ``host:port`` of the orchestrator.
        timeout_s: Default deadline of every call.
        retries: Extra attempts after UNAVAILABLE.
        backoff_s: First retry delay (doubles per retry, jittered).
        max_backoff_s: Longest retry delay.
        channel: An existing channel (the client then does not close it; ``tls`` and
            ``tls_ca`` are ignored).
        api_key: Sent as ``x-api-key`` metadata with every call (servers with API keys).
        tls: TLS with the system's root certificates.
        tls_ca: PEM root certificate (path or bytes) the server's certificate must chain
            to, e.g. a self-signed one; implies TLS.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | bytes | None = None,
    ):
        super().__init__(timeout_s, retries, backoff_s, max_backoff_s, api_key)
        self._own = channel is None
        if channel is None:
            creds = channel_credentials(tls, tls_ca)
            channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self.channel = channel
        self._stub = recsys_pb2_grpc.RecommenderStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _call(self, method: Callable[..., R], request: Any, timeout_s: float | None) -> R:
        # one deadline for all attempts: retries never stretch what the caller asked for
        expires = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            left = expires - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the deadline expired between retries")
            try:
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:
                trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
                wait = self._next_wait(exc, attempt, expires, trailers)
                if wait is None:
                    raise from_rpc_error(exc) from exc
                time.sleep(wait)
                attempt += 1

    def recommend(
        self,
        user_id: int | None = None,
        *,
        history: Sequence[int] | None = None,
        ratings: Sequence[float] | None = None,
        k: int = 10,
        timeout_s: float | None = None,
        **options: Unpack[RecommendArgs],
    ) -> pb.RecommendResponse:
        """Top-``k`` for a user id or an explicit history (see RecommendRequest)."""
        req = recommend_request(user_id, history=history, ratings=ratings, k=k, **options)
        return self._call(self._stub.Recommend, req, timeout_s)

    def similar(
        self, movie_id: int, *, k: int = 10, user_id: int | None = None, timeout_s: float | None = None, **options: Unpack[RecommendArgs]
    ) -> pb.SimilarResponse:
        """Movies similar to ``movie_id``."""
        return self._call(self._stub.Similar, similar_request(movie_id, k=k, user_id=user_id, **options), timeout_s)

    def popular(
        self, *, k: int = 10, recent: bool = False, timeout_s: float | None = None, **filters: Unpack[FilterArgs]
    ) -> pb.PopularResponse:
        """The most rated movies."""
        return self._call(self._stub.Popular, popular_request(k=k, recent=recent, **filters), timeout_s)

    def batch_recommend(self, requests: Sequence[pb.RecommendRequest], *, timeout_s: float | None = None) -> pb.BatchRecommendResponse:
        """Many Recommends in one call (build them with :func:`recommend_request`)."""
        return self._call(self._stub.BatchRecommend, pb.BatchRecommendRequest(requests=list(requests)), timeout_s)

    def answer(self, request: ReadRequest, *, timeout_s: float | None = None) -> Answer:
        """Recommend, Similar or Popular (by the request's type) with the call's request id.

        For tools that show a person where to find the call in the request log (build the
        request with :func:`recommend_request`, :func:`similar_request`, :func:`popular_request`).
        Failures raise like the other methods; their ``request_id`` is on the exception.
        """
        # with_call: the same call, plus the Call object whose trailing metadata carries the id
        response, call = self._call(self._read_rpc(request).with_call, request, timeout_s)
        return Answer(response, request_id_of(call.trailing_metadata()))

    def record_interaction(
        self, user_id: int, movie_id: int, rating: float = 0.0, timestamp_s: int = 0, *, timeout_s: float | None = None
    ) -> pb.RecordInteractionResponse:
        """Appends one interaction (idempotent, so retrying it is safe)."""
        req = pb.RecordInteractionRequest(user_id=user_id, movie_id=movie_id, rating=rating, timestamp_s=timestamp_s)
        return self._call(self._stub.RecordInteraction, req, timeout_s)

    def delete_user(self, user_id: int, *, timeout_s: float | None = None) -> pb.DeleteUserResponse:
        """Erases the user's history and request-log rows (idempotent, so retrying it is safe)."""
        return self._call(self._stub.DeleteUser, pb.DeleteUserRequest(user_id=user_id), timeout_s)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... of the standard health service."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> None:
        """Blocks until health is SERVING.

        Raises:
            DeadlineExceeded: Not serving within ``timeout_s``.
        """
        expires = time.monotonic() + timeout_s
        status = "UNKNOWN"
        while time.monotonic() < expires:
            try:
                status = self.health(timeout_s=max(0.1, min(2.0, expires - time.monotonic())))
                if status == "SERVING":
                    return
            except Exception as exc:  # not up yet: keep polling until the deadline
                status = type(exc).__name__
            time.sleep(poll_s)
        raise DeadlineExceeded(f"not SERVING after {timeout_s:.0f} s (last: {status})")

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self) -> RecsysClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRecsysClient(_Base):
    """asyncio client with the surface, policy and arguments of :class:`RecsysClient` (``await`` each call)."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        channel: grpc.aio.Channel | None = None,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | bytes | None = None,
    ):
        super().__init__(timeout_s, retries, backoff_s, max_backoff_s, api_key)
        self._own = channel is None
        if channel is None:
            creds = channel_credentials(tls, tls_ca)
            channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self.channel = channel
        self._stub = recsys_pb2_grpc.RecommenderStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(self, method: Callable[..., Any], request: Any, timeout_s: float | None) -> Any:
        expires = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            left = expires - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the deadline expired between retries")
            try:
                return await method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:
                trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
                wait = self._next_wait(exc, attempt, expires, trailers)
                if wait is None:
                    raise from_rpc_error(exc) from exc
                await asyncio.sleep(wait)
                attempt += 1

    async def recommend(
        self,
        user_id: int | None = None,
        *,
        history: Sequence[int] | None = None,
        ratings: Sequence[float] | None = None,
        k: int = 10,
        timeout_s: float | None = None,
        **options: Unpack[RecommendArgs],
    ) -> pb.RecommendResponse:
        """See :meth:`RecsysClient.recommend`."""
        req = recommend_request(user_id, history=history, ratings=ratings, k=k, **options)
        return await self._call(self._stub.Recommend, req, timeout_s)

    async def similar(
        self, movie_id: int, *, k: int = 10, user_id: int | None = None, timeout_s: float | None = None, **options: Unpack[RecommendArgs]
    ) -> pb.SimilarResponse:
        """See :meth:`RecsysClient.similar`."""
        return await self._call(self._stub.Similar, similar_request(movie_id, k=k, user_id=user_id, **options), timeout_s)

    async def popular(
        self, *, k: int = 10, recent: bool = False, timeout_s: float | None = None, **filters: Unpack[FilterArgs]
    ) -> pb.PopularResponse:
        """See :meth:`RecsysClient.popular`."""
        return await self._call(self._stub.Popular, popular_request(k=k, recent=recent, **filters), timeout_s)

    async def batch_recommend(
        self, requests: Sequence[pb.RecommendRequest], *, timeout_s: float | None = None
    ) -> pb.BatchRecommendResponse:
        """See :meth:`RecsysClient.batch_recommend`."""
        return await self._call(self._stub.BatchRecommend, pb.BatchRecommendRequest(requests=list(requests)), timeout_s)

    async def answer(self, request: ReadRequest, *, timeout_s: float | None = None) -> Answer:
        """See :meth:`RecsysClient.answer`."""
        method = self._read_rpc(request)

        async def with_call(req: Any, timeout: float, metadata: Any) -> tuple[Any, Any]:
            call = method(req, timeout=timeout, metadata=metadata)
            return await call, await call.trailing_metadata()

        response, trailing = await self._call(with_call, request, timeout_s)
        return Answer(response, request_id_of(trailing))

    async def record_interaction(
        self, user_id: int, movie_id: int, rating: float = 0.0, timestamp_s: int = 0, *, timeout_s: float | None = None
    ) -> pb.RecordInteractionResponse:
        """See :meth:`RecsysClient.record_interaction`."""
        req = pb.RecordInteractionRequest(user_id=user_id, movie_id=movie_id, rating=rating, timestamp_s=timestamp_s)
        return await self._call(self._stub.RecordInteraction, req, timeout_s)

    async def delete_user(self, user_id: int, *, timeout_s: float | None = None) -> pb.DeleteUserResponse:
        """See :meth:`RecsysClient.delete_user`."""
        return await self._call(self._stub.DeleteUser, pb.DeleteUserRequest(user_id=user_id), timeout_s)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """See :meth:`RecsysClient.health`."""
        resp = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def __aenter__(self) -> AsyncRecsysClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
