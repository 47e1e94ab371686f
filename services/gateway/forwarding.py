"""Forwarding whole services to an upstream: auth.v1.AuthService and inference.GRPCInferenceService.

Each forwarded method is a generic handler: the caller is authorized for the method's
:class:`Access`, then the request goes upstream with a deadline of min(time left - margin,
the default), the caller's IP as ``x-forwarded-for`` and (for auth) the ``authorization``
header; traceparent travels through the client interceptor. By default messages pass as raw
bytes, never decoded (large tensors cost a copy, not a parse); ``decode=True`` parses and
re-serialises them instead (kept for measuring the difference). Methods that must not be
forwarded (Triton's shared memory: it needs a client on the inference service's host) get a
handler that answers with a fixed error (:func:`refusing_handler`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from services.common.client import outgoing_timeout
from services.common.errors import DeadlineExceeded, ServiceError, Unavailable
from services.common.peer import peer_ip
from services.gateway.access import Access, TokenValidator

_DETAILS_KEY = "grpc-status-details-bin"  # every error our services answer carries google.rpc details


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str  # for messages: "auth", "inference"
    channel: grpc.aio.Channel
    default_timeout: float
    margin: float
    forward_authorization: bool


def upstream_error(upstream: str, error: grpc.aio.AioRpcError) -> Exception:
    """A clear status for a failed upstream call; the upstream's own answers pass unchanged.

    UNAVAILABLE that the upstream did not answer itself (no rich details: no healthy address, a
    refused or broken connection) and CANCELLED (the gateway's own caller going away cancels the
    gateway's handler instead, so this one came from the upstream: a server that stopped with the
    call unfinished) both become UNAVAILABLE with RetryInfo. A caller never sees CANCELLED for a
    call it did not cancel.
    """
    details = error.details() or ""
    code = error.code()
    answered = any(key == _DETAILS_KEY for key, _ in error.trailing_metadata() or ())
    if code is grpc.StatusCode.CANCELLED or (code is grpc.StatusCode.UNAVAILABLE and not answered):
        return Unavailable(
            f"the {upstream} service is unreachable or shutting down; retry shortly", retry_after_seconds=1
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and details in ("Deadline Exceeded", ""):
        return DeadlineExceeded(f"the {upstream} service did not answer before the deadline")
    passed_on: Exception = error
    return passed_on


def _metadata(context: grpc.aio.ServicerContext, upstream: Upstream) -> list[tuple[str, str]]:
    metadata = [("x-forwarded-for", peer_ip(context.peer() or ""))]
    if upstream.forward_authorization:
        metadata += [(key, value) for key, value in (context.invocation_metadata() or ()) if key == "authorization"]
    return metadata


def forwarding_handler(
    descriptor: ServiceDescriptor,
    upstream: Upstream,
    validator: TokenValidator,
    access: Mapping[str, Access],
    *,
    decode: bool = False,
) -> grpc.GenericRpcHandler:
    """Generic handlers for every method of ``descriptor`` listed in ``access``."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        if method.name not in access:
            continue
        path = f"/{descriptor.full_name}/{method.name}"
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        serializers: dict[str, Callable[..., Any] | None] = {
            "request_serializer": request_cls.SerializeToString if decode else None,
            "response_deserializer": response_cls.FromString if decode else None,
        }
        server_side: dict[str, Callable[..., Any] | None] = {
            "request_deserializer": request_cls.FromString if decode else None,
            "response_serializer": response_cls.SerializeToString if decode else None,
        }
        needed = access[method.name]
        if method.client_streaming and method.server_streaming:
            call = upstream.channel.stream_stream(path, **serializers)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _bidi(call, upstream, validator, needed), **server_side
            )
        elif not method.client_streaming and not method.server_streaming:
            unary = upstream.channel.unary_unary(path, **serializers)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(unary, upstream, validator, needed), **server_side
            )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def refusing_handler(
    descriptor: ServiceDescriptor, methods: Sequence[str], error: Callable[[], ServiceError]
) -> grpc.GenericRpcHandler:
    """Generic handlers for the unary ``methods`` of ``descriptor`` that answer ``error()`` at once,
    whoever calls (nothing goes upstream, so nothing needs authorizing)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error()

    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        if method.name in methods:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                refuse,
                request_deserializer=GetMessageClass(method.input_type).FromString,
                response_serializer=GetMessageClass(method.output_type).SerializeToString,
            )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def _unary(
    call: grpc.aio.UnaryUnaryMultiCallable, upstream: Upstream, validator: TokenValidator, access: Access
) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    async def forward(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await validator.authorize(context, access)
        try:
            return await call(
                request,
                timeout=outgoing_timeout(context, upstream.default_timeout, upstream.margin),
                metadata=_metadata(context, upstream),
            )
        except grpc.aio.AioRpcError as error:
            raise upstream_error(upstream.name, error) from None

    return forward


def _bidi(
    call: grpc.aio.StreamStreamMultiCallable, upstream: Upstream, validator: TokenValidator, access: Access
) -> Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def forward(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await validator.authorize(context, access)
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > 1e6 else max(0.0, remaining - upstream.margin)
        responses = call(requests, timeout=timeout, metadata=_metadata(context, upstream))
        try:
            async for response in responses:
                yield response
        except grpc.aio.AioRpcError as error:
            raise upstream_error(upstream.name, error) from None

    return forward
