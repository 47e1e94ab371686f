"""The chassis' server interceptor: every RPC's cross-cutting concerns in one layer.

Each concern (the request log, the server metrics, the translation of errors into statuses) is a
:class:`RpcConcern` in a module of its own. :class:`ChassisInterceptor` wraps every handler once
per method and runs all concerns around each call in a single wrapper: every concern's
:meth:`MethodScope.begin` before the handler, the error translation around it, every
:meth:`MethodScope.end` (in reverse order) with the final status once it has returned, raised or
(server streaming) sent its last message. One layer instead of one gRPC interceptor per concern
keeps the per-call cost of the chassis low: gRPC runs each interceptor's ``intercept_service``
and wrapper on every call, and a concern prepares what it can (metric label children, say) once
per method in :meth:`RpcConcern.for_method`.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

RPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


@dataclass(frozen=True, slots=True)
class RpcInfo:
    """What a concern knows of the RPC it wraps."""

    full_method: str  # "/package.Service/Method"
    service: str
    method: str
    rpc_type: str  # unary | client_stream | server_stream | bidi_stream


def split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class MethodScope(abc.ABC):
    """A concern's part in every call of one method (made once per method)."""

    @abc.abstractmethod
    def begin(self, context: grpc.aio.ServicerContext) -> Any:
        """Before the handler runs; what it returns is passed to :meth:`end`."""

    @abc.abstractmethod
    def end(self, state: Any, context: grpc.aio.ServicerContext, code: grpc.StatusCode, seconds: float) -> None:
        """After the call ended with ``code``, ``seconds`` after it began. Must not raise."""


class RpcConcern(abc.ABC):
    """One cross-cutting concern of every RPC."""

    @abc.abstractmethod
    def for_method(self, info: RpcInfo) -> MethodScope:
        """This concern's scope for every call of ``info``'s method."""


class ErrorHandling(Protocol):
    """How a handler's failures become statuses (one per server; see ``errors.ErrorTranslation``)."""

    def wrap_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        """Replace how request messages are decoded."""

    def check_request(self, request: Any) -> None:
        """Inspect a unary request before the handler runs (raise to refuse it)."""

    async def failed(self, error: BaseException, info: RpcInfo, context: grpc.aio.ServicerContext) -> None:
        """The handler raised ``error``: end the call with its status (``context.abort``) or return to re-raise."""

    def succeeded(self, context: grpc.aio.ServicerContext) -> None:
        """The handler returned (or sent its last message)."""


class ChassisInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs ``concerns`` and ``errors`` around every handler. Wrapped handlers are built once per method."""

    def __init__(self, concerns: Sequence[RpcConcern], errors: ErrorHandling) -> None:
        self._concerns = tuple(concerns)
        self._errors = errors
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None:
            cached = self._wrap(method, handler)
            self._wrapped[method] = cached
        return cached

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = (bool(handler.request_streaming), bool(handler.response_streaming))
        service, method = split_method(full_method)
        info = RpcInfo(full_method, service, method, RPC_TYPES[kind])
        behaviour = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        scopes = tuple(concern.for_method(info) for concern in self._concerns)
        closing = tuple(reversed(scopes))
        errors = self._errors
        check_request = errors.check_request if not handler.request_streaming else None
        clock = time.perf_counter

        def end(
            states: list[Any], context: grpc.aio.ServicerContext, error: BaseException | None, began: float
        ) -> None:
            code = outcome_code(context, error)
            seconds = clock() - began
            for scope, state in zip(closing, reversed(states), strict=True):
                scope.end(state, context, code, seconds)

        if handler.response_streaming:

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                began = clock()
                states = [scope.begin(context) for scope in scopes]
                error: BaseException | None = None
                try:
                    try:
                        if check_request is not None:
                            check_request(request)
                        result = behaviour(request, context)
                        if inspect.isasyncgen(result):
                            async for response in result:
                                yield response
                        elif inspect.isawaitable(result):
                            await result
                    except BaseException as exc:
                        await errors.failed(exc, info, context)
                        raise
                    errors.succeeded(context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    end(states, context, error, began)

            wrapped: Callable[..., Any] = streaming
        else:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                began = clock()
                states = [scope.begin(context) for scope in scopes]
                error: BaseException | None = None
                try:
                    try:
                        if check_request is not None:
                            check_request(request)
                        result = behaviour(request, context)
                        if inspect.isawaitable(result):
                            result = await result
                    except BaseException as exc:
                        await errors.failed(exc, info, context)
                        raise
                    errors.succeeded(context)
                    return result
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    end(states, context, error, began)

            wrapped = unary

        deserializer = handler.request_deserializer
        if not handler.request_streaming:
            deserializer = errors.wrap_deserializer(deserializer)
        return _FACTORIES[kind](
            wrapped,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )


def outcome_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with, given what (if anything) its behaviour raised."""
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED  # the caller's deadline ran out, not the caller's choice
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
