"""Domain errors and the interceptor that turns them into gRPC statuses.

The core of each service raises these; it never imports gRPC status handling itself::

    ServiceError                 any error a caller should see, with a gRPC status code
    ├── InvalidArgument          INVALID_ARGUMENT + google.rpc.BadRequest field violations
    ├── NotFound                 NOT_FOUND
    ├── AlreadyExists            ALREADY_EXISTS
    ├── FailedPrecondition       FAILED_PRECONDITION
    ├── Unauthenticated          UNAUTHENTICATED
    ├── PermissionDenied         PERMISSION_DENIED
    ├── ResourceExhausted        RESOURCE_EXHAUSTED + google.rpc.RetryInfo
    ├── DeadlineExceeded         DEADLINE_EXCEEDED
    ├── Internal                 INTERNAL, with a message safe to show
    └── Unavailable              UNAVAILABLE (+ RetryInfo when a retry delay is known)

Every status carries a google.rpc.ErrorInfo (reason, domain = the service), and a
google.rpc.RetryInfo when the error knows when a retry may succeed. An exception
that is not a ServiceError becomes INTERNAL with a generic message and the trace ID; the
exception itself goes to the log only. A status received from an upstream call
(``grpc.aio.AioRpcError``) is passed on with its code, message and rich details.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from services.common.interception import ErrorHandling, RpcInfo
from services.common.logs import current_trace_ids, fields

log = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_UNDECODABLE = "REQUEST_UNDECODABLE"  # the ErrorInfo reason of a request message that cannot be parsed
TRACE_ID_KEY = "x-trace-id"  # in every response's trailers: the ID to quote and to grep the logs for


class ServiceError(Exception):
    """An error with a gRPC status code and a message that is safe to show to the caller."""

    code = grpc.StatusCode.UNKNOWN
    reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_seconds: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        """google.rpc detail messages beyond ErrorInfo: RetryInfo when a retry delay is known."""
        if self.retry_after_seconds is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(self.retry_after_seconds * 1e9)))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: Sequence[tuple[str, str]] = (), **kwargs: object):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in self.violations
            ]
        )
        return [_pack(bad_request), *super().details()]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    """A failure the caller cannot fix, with a message that is safe to show (e.g. a model raised)."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status_details(error: ServiceError, domain: str) -> bytes:
    """The serialized google.rpc.Status sent as ``grpc-status-details-bin``."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    status = status_pb2.Status(
        code=error.code.value[0],
        message=error.message,
        details=[_pack(info), *error.details()],
    )
    return bytes(status.SerializeToString())


def internal_message() -> str:
    trace_id, _ = current_trace_ids()
    return f"internal error (trace_id={trace_id})" if trace_id else "internal error"


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a request message that could not be decoded (e.g. a string that is not UTF-8)."""

    problem: str


class ErrorTranslation(ErrorHandling):
    """Turns what a handler raises into the gRPC status the caller sees.

    A unary request that cannot be decoded never reaches the handler: it is answered with
    INVALID_ARGUMENT (gRPC's own answer would be INTERNAL). Every answer, success or error,
    carries the request's trace ID in the ``x-trace-id`` trailer.
    """

    def __init__(self, domain: str):
        self._domain = domain

    def wrap_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        if deserializer is None:
            return None
        decode = deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError as error:
                return _Undecodable(str(error).rpartition(": ")[2] or "malformed message")

        return tolerant

    def check_request(self, request: Any) -> None:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(
                "the request message could not be decoded",
                [("request", f"is not a valid message: {request.problem}")],
                reason=REQUEST_UNDECODABLE,
            )

    async def failed(self, error: BaseException, info: RpcInfo, context: grpc.aio.ServicerContext) -> None:
        trace_id, _ = current_trace_ids()
        trace = ((TRACE_ID_KEY, trace_id),) if trace_id else ()
        if isinstance(error, grpc.aio.AbortError | asyncio.CancelledError) or not isinstance(error, Exception):
            return  # already a status (context.abort), the caller went away, or the process is exiting
        if isinstance(error, ServiceError):
            details = ((_DETAILS_KEY, to_status_details(error, self._domain)),)
            await context.abort(error.code, error.message, trailing_metadata=details + trace)
        elif isinstance(error, grpc.aio.AioRpcError):
            # An upstream call failed: pass its status on (rich details included).
            passed = tuple((k, v) for k, v in (error.trailing_metadata() or ()) if k == _DETAILS_KEY)
            log.info(
                "upstream.failed",
                extra=fields(method=info.full_method, code=error.code().name, upstream_message=error.details()),
            )
            await context.abort(error.code(), error.details() or "", trailing_metadata=passed + trace)
        elif isinstance(error, NotImplementedError):
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{info.method} is not implemented", trailing_metadata=trace
            )
        else:
            log.error("rpc.unexpected_error", exc_info=error, extra=fields(method=info.full_method))
            await context.abort(grpc.StatusCode.INTERNAL, internal_message(), trailing_metadata=trace)

    def succeeded(self, context: grpc.aio.ServicerContext) -> None:
        trace_id, _ = current_trace_ids()
        if trace_id:
            context.set_trailing_metadata((*(context.trailing_metadata() or ()), (TRACE_ID_KEY, trace_id)))


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "ErrorTranslation",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "to_status_details",
]
