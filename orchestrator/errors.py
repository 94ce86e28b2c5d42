"""One exception tree, one status table, one place that aborts.

Every failure inside the orchestrator is one of the classes below; :data:`STATUS` maps each
to its gRPC status code and :func:`abort` is the only code that ends an RPC with an error.
Nothing a client can cause maps to INTERNAL: bad input is :class:`InvalidArgument` or
:class:`NotFound`, time is :class:`DeadlineExceeded`, an unreachable dependency with no
fallback is :class:`Unavailable`; a missing or unknown API key is :class:`Unauthenticated`
a key whose scope does not cover the RPC :class:`PermissionDenied`, and a key over its rate
:class:`RateLimited` (``orchestrator/auth.py``).

Backend (Triton) failures are :class:`ModelError` subclasses, chosen from the status code of
the Triton call (never from its message text) by the backend, with the original exception
kept as ``__cause__``. The pipeline turns :class:`ModelUnavailable` into the popular-movies
fallback; only a :class:`ModelError` that escapes reaches :func:`abort`.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

log = logging.getLogger(__name__)


class RecsysError(Exception):
    """Base of every orchestrator error; ``str(exc)`` is the message the caller sees."""


class InvalidArgument(RecsysError):
    """A request field is out of its documented range."""


class NotFound(RecsysError):
    """A movie the request names is not in the catalog."""


class DeadlineExceeded(RecsysError):
    """The caller's deadline expired before an answer was ready."""


class Unavailable(RecsysError):
    """Nothing can answer right now (history store down, server not ready); retryable."""


class Unauthenticated(RecsysError):
    """The call carries no API key, or one the server does not know."""


class PermissionDenied(RecsysError):
    """The call's API key is known but its scope does not cover this RPC (e.g. DeleteUser needs ``admin``)."""


class RateLimited(RecsysError):
    """The call's API key is over its request rate; retry after a moment."""


class ModelError(RecsysError):
    """A model call failed in a way that is the server's problem (e.g. a tensor contract)."""


class ModelUnavailable(ModelError):
    """The models cannot be reached or failed; Recommend serves the popular fallback."""


class ModelTimeout(ModelUnavailable):
    """The models did not answer within ``triton_timeout_s`` (the caller still has time)."""


STATUS: dict[type[RecsysError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelError: grpc.StatusCode.INTERNAL,
}
"""The status table: the most specific class in an exception's MRO decides."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an exception (INTERNAL for anything outside the tree)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def describe(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """``(code, message)`` for a caller: the error's own message, or an opaque one with an id.

    Unexpected exceptions are logged with their traceback under an id that the message
    carries, so that an operator can find it; the caller never sees internals.
    """
    code = status_of(exc)
    if isinstance(exc, RecsysError) and code != grpc.StatusCode.INTERNAL:
        return code, str(exc)
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", ref, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (reference {ref}); the server log has the details"


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Ends the RPC with the status of ``exc``; the only place the service aborts.

    Raises:
        Exception: Always (``context.abort`` raises to unwind the handler).
    """
    code, message = describe(exc)
    context.abort(code, message)


class Deadline:
    """The time a request has left, from the caller's gRPC deadline or the server default.

    Args:
        remaining_s: Seconds left now (``context.time_remaining()``); None: no caller
            deadline, ``default_s`` applies.
        default_s: The server's default deadline.
    """

    def __init__(self, remaining_s: float | None, default_s: float):
        # gRPC reports "no deadline" as None; a huge client deadline is capped to stay finite
        budget = default_s if remaining_s is None else min(remaining_s, 10 * 365 * 86400.0)
        self.expires = time.monotonic() + budget

    def remaining(self) -> float:
        """Seconds left (negative once expired)."""
        return self.expires - time.monotonic()

    def check(self, stage: str) -> float:
        """Seconds left; raises :class:`DeadlineExceeded` naming ``stage`` if none are."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"deadline exceeded before {stage}")
        return left
