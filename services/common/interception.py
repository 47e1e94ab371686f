"""The base of our server interceptors: run every RPC's behaviour inside a scope.

An interceptor subclasses :class:`ScopeInterceptor` and implements :meth:`scope`, an async
context manager entered before the handler runs and left when it returns, raises or (for
server-streaming RPCs) when its last message is sent. The four handler kinds (unary and
streaming requests and responses) are wrapped the same way, so each interceptor is about its
one concern only.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

RPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


@dataclass(frozen=True, slots=True)
class RpcInfo:
    """What an interceptor knows of the RPC it wraps."""

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


class ScopeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each RPC behaviour in :meth:`scope`. Wrapped handlers are built once per method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def wrap_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        """Hook: replace how request messages are decoded (default: unchanged)."""
        return deserializer

    def check_request(self, request: Any) -> None:
        """Hook: inspect a unary request inside the scope, before the handler runs."""

    @abc.abstractmethod
    def scope(self, info: RpcInfo, context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager[Any]:
        """The async context manager one RPC's behaviour runs in."""

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
        scope = self.scope
        check_request = self.check_request

        if handler.response_streaming:

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with scope(info, context):
                    if not handler.request_streaming:
                        check_request(request)
                    result = behaviour(request, context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    elif inspect.isawaitable(result):
                        await result

            wrapped: Callable[..., Any] = streaming
        else:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with scope(info, context):
                    if not handler.request_streaming:
                        check_request(request)
                    result = behaviour(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result

            wrapped = unary

        deserializer = handler.request_deserializer
        if not handler.request_streaming:
            deserializer = self.wrap_deserializer(deserializer)
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
