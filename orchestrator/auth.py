"""API keys, their scopes and per-key rate limits: a gRPC server interceptor.

Keys come from :attr:`ServeSettings.api_keys_file` (one entry a line, ``#`` comments) and
:attr:`ServeSettings.api_keys` (the same entries comma-separated, ``RECSYS_API_KEYS``). An
entry is ``key[:requests_per_second][:scope]``::

    k3y-for-the-web-app:50            # scope "interact" (the default): read + RecordInteraction
    k3y-for-dashboards:10:read        # Recommend, Similar, Popular, BatchRecommend only
    k3y-for-operators:admin           # everything, DeleteUser included (no rate limit)

With no key configured authentication is off, no interceptor is installed and every RPC is
open (DeleteUser included): run without keys only on a trusted network.

Scopes (:data:`SCOPES`) are ordered, each includes the ones before it:

* ``read``: the RPCs that only read (:data:`RPC_SCOPES`);
* ``interact``: also ``RecordInteraction``, which appends one interaction to a history;
* ``admin``: also ``DeleteUser`` and every RPC that changes models or state beyond appending
  interactions. An RPC of the service missing from :data:`RPC_SCOPES` needs ``admin``: a
  new RPC is closed until someone decides otherwise.

An entry without a scope gets :data:`DEFAULT_SCOPE` (``interact``): keys files written before
scopes existed keep working for every RPC except DeleteUser, which now needs ``:admin``.

A call sends its key as ``x-api-key`` metadata. A missing or unknown key is UNAUTHENTICATED;
a known key whose scope does not cover the RPC is PERMISSION_DENIED; a key over its rate is
RESOURCE_EXHAUSTED. Rates are token buckets, one per key, holding one second of the rate (at
least one request): a client may burst that much, then is held to the rate. Refused calls
take no token. The health and reflection services stay open, so load balancers and
``grpcurl list`` need no key.

Keys are kept only as SHA-256 digests and logged as the first 8 hex digits of the digest,
never in clear.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from orchestrator.errors import PermissionDenied, RateLimited, RecsysError, Unauthenticated, abort
from orchestrator.settings import ServeSettings

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
"""The metadata key a call carries its API key in (gRPC metadata keys are lower case)."""

OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})
"""Services answered without a key: health probes and reflection."""

SCOPES = ("read", "interact", "admin")
"""Key scopes, weakest first; each includes the ones before it (see the module docstring)."""
DEFAULT_SCOPE = "interact"
"""The scope of an entry that names none (keys files written before scopes existed)."""
RPC_SCOPES: dict[str, str] = {
    "Recommend": "read",
    "Similar": "read",
    "Popular": "read",
    "BatchRecommend": "read",
    "RecordInteraction": "interact",
    "DeleteUser": "admin",
}
"""The weakest scope each ``recsys.v1.Recommender`` RPC needs; any other method needs ``admin``."""


def required_scope(method: str) -> str:
    """The scope a call to ``method`` (``/package.Service/Rpc``) needs; ``admin`` when unlisted."""
    rpc = method.rsplit("/", 1)[-1]
    return RPC_SCOPES.get(rpc, "admin")


def covers(scope: str, needed: str) -> bool:
    """Whether a key of ``scope`` may make a call that needs ``needed``."""
    return SCOPES.index(scope) >= SCOPES.index(needed)


def key_digest(key: str) -> bytes:
    """SHA-256 of a key: what the server keeps instead of the key."""
    return hashlib.sha256(key.encode()).digest()


def key_tag(key: str) -> str:
    """A short, non-reversible name for a key in logs: ``sha256:<8 hex digits>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ApiKey:
    """One configured key.

    Attributes:
        tag: :func:`key_tag` of the key (for logs).
        rate_per_s: Requests per second allowed; None: unlimited.
        scope: One of :data:`SCOPES`.
    """

    tag: str
    rate_per_s: float | None
    scope: str = DEFAULT_SCOPE


def parse_keys(lines: Iterable[str], source: str) -> dict[bytes, ApiKey]:
    """Keys by digest from ``key[:requests_per_second][:scope]`` entries.

    Args:
        lines: Entries; blank ones and ``#`` comments are skipped.
        source: Where they come from, for error messages (``keys.txt``, ``RECSYS_API_KEYS``).

    Raises:
        ValueError: An entry does not parse (the message names the source and entry number,
            never the key).
    """
    keys: dict[bytes, ApiKey] = {}
    for n, raw in enumerate(lines, 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        key, *fields = entry.split(":")
        where = f"{source} entry {n}"
        if not key or any(c.isspace() or not c.isprintable() or not c.isascii() or c == "," for c in key):
            raise ValueError(f"{where}: a key must be non-empty printable ASCII without spaces, ':', ',' or '#'")
        if len(fields) > 2:
            raise ValueError(f"{where}: expected key[:requests_per_second][:scope], got {len(fields) + 1} ':'-separated fields")
        scope = DEFAULT_SCOPE
        if fields and fields[-1].strip().lower() in SCOPES:
            scope = fields.pop().strip().lower()
        elif len(fields) == 2:
            raise ValueError(f"{where}: scope {fields[1]!r} is not one of {', '.join(SCOPES)}")
        rate = None
        if fields and fields[0]:
            try:
                rate = float(fields[0])
            except ValueError:
                raise ValueError(
                    f"{where}: {fields[0]!r} is neither a requests_per_second number nor a scope ({', '.join(SCOPES)})"
                ) from None
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{where}: requests_per_second must be a finite number > 0, got {fields[0]}")
        digest = key_digest(key)
        if digest in keys:
            raise ValueError(f"{where}: key {key_tag(key)} is listed twice")
        keys[digest] = ApiKey(key_tag(key), rate, scope)
    return keys


def load_keys(settings: ServeSettings) -> dict[bytes, ApiKey]:
    """Every key of the settings (file and ``api_keys``); empty: authentication off.

    Raises:
        ValueError: An entry does not parse, or a key is in both places.
        OSError: ``api_keys_file`` cannot be read.
    """
    keys: dict[bytes, ApiKey] = {}
    if settings.api_keys_file is not None:
        keys.update(parse_keys(settings.api_keys_file.read_text().splitlines(), str(settings.api_keys_file)))
    if settings.api_keys:
        from_env = parse_keys(settings.api_keys.split(","), "api_keys (RECSYS_API_KEYS)")
        for digest, key in from_env.items():
            if digest in keys:
                raise ValueError(f"key {key.tag} is in both api_keys_file and api_keys")
        keys.update(from_env)
    return keys


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` kept; one token per request.

    Args:
        rate_per_s: Refill rate.
        burst: Capacity (and the initial fill).
        clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Takes a token: 0.0 when granted, else the seconds until one is available."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate_per_s)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate_per_s


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Admits a call only with a known ``x-api-key`` under its rate (see the module docstring).

    Args:
        keys: Keys by digest (:func:`load_keys`); must not be empty.
        clock: Monotonic seconds for the buckets.
    """

    def __init__(self, keys: dict[bytes, ApiKey], clock: Callable[[], float] = time.monotonic):
        if not keys:
            raise ValueError("no API keys: leave the interceptor out to turn authentication off")
        self.keys = dict(keys)
        self.buckets = {
            digest: TokenBucket(k.rate_per_s, max(1.0, k.rate_per_s), clock) for digest, k in keys.items() if k.rate_per_s is not None
        }

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None, method: str = "") -> ApiKey:
        """The call's key, when it may run.

        Args:
            metadata: The call's invocation metadata.
            method: The full method name (``/recsys.v1.Recommender/DeleteUser``), for the scope.

        Raises:
            Unauthenticated: No key, or an unknown one.
            PermissionDenied: The key's scope does not cover ``method``.
            RateLimited: The key is over its rate.
        """
        key = next((v for k, v in metadata or () if k == API_KEY_HEADER), None)
        if key is None:
            raise Unauthenticated(f"this server requires an API key: send it as '{API_KEY_HEADER}' metadata")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        digest = key_digest(key)
        known = self.keys.get(digest)
        if known is None:
            log.warning("rejected unknown API key %s", key_tag(key))
            raise Unauthenticated(f"the '{API_KEY_HEADER}' metadata holds an unknown API key")
        needed = required_scope(method)
        if not covers(known.scope, needed):
            log.warning("API key %s (scope %s) refused %s, which needs %s", known.tag, known.scope, method, needed)
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1] or 'this call'} needs an API key of scope '{needed}';"
                f" this key's scope is '{known.scope}' (scopes are set in the server's keys file)"
            )
        bucket = self.buckets.get(digest)
        if bucket is not None:
            wait_s = bucket.take()
            if wait_s > 0:
                log.info("API key %s over its rate of %g requests/s", known.tag, bucket.rate_per_s)
                raise RateLimited(
                    f"rate limit of {bucket.rate_per_s:g} requests/s (burst {bucket.burst:g}) exceeded for this API key;"
                    f" retry in {wait_s:.2f} s"
                )
        return known

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        try:
            self.check(handler_call_details.invocation_metadata, handler_call_details.method)
        except RecsysError as exc:
            return _refusal(handler, exc)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, exc: RecsysError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``exc``'s status."""

    def refuse(request: Any, context: grpc.ServicerContext) -> None:
        abort(context, exc)

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


def read_pem(path: Path, what: str) -> bytes:
    """A PEM file's bytes.

    Raises:
        RuntimeError: It cannot be read or holds no PEM block (names the setting and path).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RuntimeError(f"{what} {path} cannot be read: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise RuntimeError(f"{what} {path} is not a PEM file")
    return data


def server_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert`` / ``tls_key``; None: plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (read_pem(settings.tls_key, "tls_key"), read_pem(settings.tls_cert, "tls_cert"))
    return grpc.ssl_server_credentials([pair])
