"""Helpers for asserting on gRPC errors and their google.rpc details."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Await ``call``, which must fail; return its error."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of an error, by type name (BadRequest, RetryInfo, ErrorInfo)."""
    status = rpc_status.from_call(error)
    found: dict[str, Any] = {}
    if status is None:
        return found
    for packed in status.details:
        for message_type in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            message = message_type()
            if packed.Unpack(message):
                found[message_type.DESCRIPTOR.name] = message
    return found


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    bad_request = details(error).get("BadRequest")
    return {v.field: v.description for v in bad_request.field_violations} if bad_request else {}
