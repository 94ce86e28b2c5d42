"""Typed client errors: one exception class per gRPC status code.

``except NotFound`` reads better than comparing ``e.code()`` and cannot misspell a code. The
class is chosen from the status code alone (:func:`from_rpc_error`); the server's message is
kept as :attr:`RecsysRpcError.details` and the original ``grpc.RpcError`` as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

REQUEST_ID_HEADER = "x-request-id"
"""Trailing metadata key of the id a call is kept under in the server's request log."""


def request_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The ``x-request-id`` of a call's trailing metadata, or None when it has none."""
    return next((str(v) for k, v in metadata or () if k == REQUEST_ID_HEADER), None)


class RecsysRpcError(Exception):
    """A call to the recommender failed.

    Attributes:
        code: The gRPC status code.
        details: The server's message (a person can act on it).
        request_id: The call's ``x-request-id`` (quote it to the operator), or None.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, request_id: str | None = None):
        super().__init__(f"{(code or self.code).name}: {details}")
        self.details = details
        self.request_id = request_id
        if code is not None:
            self.code = code


class Cancelled(RecsysRpcError):
    code = grpc.StatusCode.CANCELLED


class Unknown(RecsysRpcError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(RecsysRpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RecsysRpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(RecsysRpcError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RecsysRpcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RecsysRpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RecsysRpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RecsysRpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RecsysRpcError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(RecsysRpcError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(RecsysRpcError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(RecsysRpcError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(RecsysRpcError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(RecsysRpcError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(RecsysRpcError):
    code = grpc.StatusCode.UNAUTHENTICATED


ERRORS: dict[grpc.StatusCode, type[RecsysRpcError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
"""Status code -> exception class (every code except OK)."""


def from_rpc_error(exc: grpc.RpcError) -> RecsysRpcError:
    """The typed error for a failed call (raise it ``from exc``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    request_id = request_id_of(trailing)
    cls = ERRORS.get(code, RecsysRpcError)
    return cls(details, request_id=request_id) if cls is not RecsysRpcError else RecsysRpcError(details, code, request_id)
