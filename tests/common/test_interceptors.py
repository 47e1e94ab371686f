"""The chassis interceptors, driven through real servers: errors, metrics, logs, traces, deadlines.

A test servicer for ``auth.v1.AuthService`` is served through the real chassis
(:class:`GrpcServer`): each RPC exercises one behaviour of the interceptor chain.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import pytest
from auth.v1 import auth_pb2, auth_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference import grpc_service_pb2 as infer_pb
from inference import grpc_service_pb2_grpc as infer_grpc

from services.common import InvalidArgument, ResourceExhausted, outgoing_timeout
from services.common.server import GrpcServer
from services.common.settings import ServiceSettings

SECRET = "hunter2-do-not-leak"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
LONGER_THAN_ANY_DEADLINE = 3600.0


class ChassisTestServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, server: GrpcServer, upstream_target: str | None):
        self._server = server
        self._upstream = (
            infer_grpc.GRPCInferenceServiceStub(server.connect(upstream_target)) if upstream_target else None
        )

    async def Register(self, request, context):
        raise ValueError(f"connection string with password={SECRET}")

    async def Login(self, request, context):
        raise InvalidArgument("the request is invalid", violations=[("username", "must not be empty")])

    async def RefreshToken(self, request, context):
        raise ResourceExhausted("too many attempts", retry_after_seconds=1.5)

    async def ValidateToken(self, request, context):
        import logging

        logging.getLogger("tests.handler").info("handler.ran")
        return auth_pb2.ValidateTokenResponse(username="ok")

    async def ChangePassword(self, request, context):
        """Calls the upstream with the chassis' deadline; reports the timeout it used."""
        remaining = context.time_remaining() or 0.0
        timeout = outgoing_timeout(context, default=5.0, margin=0.05)
        await self._upstream.ServerLive(infer_pb.ServerLiveRequest(), timeout=timeout)
        await context.send_initial_metadata(
            (("x-upstream-timeout", f"{timeout:.6f}"), ("x-time-remaining", f"{remaining:.6f}"))
        )
        return auth_pb2.ChangePasswordResponse()

    async def RequestPasswordReset(self, request, context):
        """Like ChangePassword, but keeps back more than any caller here allows: nothing is left for the call."""
        timeout = outgoing_timeout(context, default=5.0, margin=LONGER_THAN_ANY_DEADLINE)
        await self._upstream.ServerLive(infer_pb.ServerLiveRequest(), timeout=timeout)
        return auth_pb2.RequestPasswordResetResponse()

    async def ResetPassword(self, request, context):
        """An upstream error passes through with its status."""
        await self._upstream.ModelInfer(infer_pb.ModelInferRequest(model_name="m"), timeout=5)
        return auth_pb2.ResetPasswordResponse()


@pytest.fixture
async def chassis(start_service):
    """(test server, its stub, the real inference server it calls)."""
    upstream = await start_service("inference")
    settings = ServiceSettings(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1.0)
    server = GrpcServer(settings, "chassis-test")
    server.add_service(
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
        ChassisTestServicer(server, f"dns:///127.0.0.1:{upstream.port}"),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, auth_pb2_grpc.AuthServiceStub(channel), upstream
    await channel.close()
    await server.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def scrape_until(port: int, *lines: str, within: float = 10.0) -> str:
    """The metrics page once it shows every one of ``lines``; AssertionError naming the absent ones if it never does.

    A client call's code is counted by a task that awaits the call's end, so the page may lag the call.
    """
    text = ""
    try:
        async with asyncio.timeout(within):
            while True:
                text = await asyncio.to_thread(scrape, port)
                if all(line in text for line in lines):
                    return text
                await asyncio.sleep(0.02)
    except TimeoutError:
        absent = [line for line in lines if line not in text]
        raise AssertionError(f"not on the metrics page within {within}s: {absent}") from None


async def test_unexpected_exception_is_internal_without_its_text(chassis, logs):
    _, stub, _ = chassis
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(auth_pb2.RegisterRequest(), timeout=5, metadata=(("traceparent", TRACEPARENT),))
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (error.details() or "")
    assert "ValueError" not in (error.details() or "")
    assert TRACE_ID in error.details()
    logged = logs.events("rpc.unexpected_error")
    assert len(logged) == 1
    assert logged[0]["trace_id"] == TRACE_ID
    assert logged[0]["exc_type"] == "ValueError"


async def test_invalid_argument_carries_field_violations_and_error_info(chassis):
    _, stub, _ = chassis
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Login(auth_pb2.LoginRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    kinds = {detail.TypeName(): detail for detail in status.details}
    bad_request = error_details_pb2.BadRequest()
    kinds["google.rpc.BadRequest"].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("username", "must not be empty")]
    info = error_details_pb2.ErrorInfo()
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "chassis-test")


async def test_resource_exhausted_carries_retry_info(chassis):
    _, stub, _ = chassis
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RefreshToken(auth_pb2.RefreshTokenRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.ToMilliseconds() == 1500


async def test_unimplemented_method_is_unimplemented_not_internal(chassis):
    _, stub, _ = chassis
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Logout(auth_pb2.LogoutRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_log_lines_during_a_request_carry_its_trace_id(chassis, logs):
    _, stub, _ = chassis
    await stub.ValidateToken(auth_pb2.ValidateTokenRequest(), timeout=5, metadata=(("traceparent", TRACEPARENT),))
    [handler_line] = logs.events("handler.ran")
    assert handler_line["trace_id"] == TRACE_ID
    assert re.fullmatch(r"[0-9a-f]{16}", handler_line["span_id"])
    assert handler_line["service"] == "chassis-test"
    finished = [line for line in logs.events("rpc.finished") if line["method"].endswith("/ValidateToken")]
    assert finished[0]["trace_id"] == TRACE_ID
    assert finished[0]["code"] == "OK"
    assert set(finished[0]) >= {"ts", "level", "service", "event", "trace_id", "span_id"}


async def test_without_traceparent_each_request_gets_its_own_trace(chassis, logs):
    _, stub, _ = chassis
    await stub.ValidateToken(auth_pb2.ValidateTokenRequest(), timeout=5)
    await stub.ValidateToken(auth_pb2.ValidateTokenRequest(), timeout=5)
    ids = [line["trace_id"] for line in logs.events("handler.ran")]
    assert len(ids) == 2
    assert all(re.fullmatch(r"[0-9a-f]{32}", trace_id) for trace_id in ids)
    assert ids[0] != ids[1]


async def test_metrics_count_the_call_just_made(chassis):
    server, stub, _ = chassis
    await stub.ValidateToken(auth_pb2.ValidateTokenRequest(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Login(auth_pb2.LoginRequest(), timeout=5)
    text = await asyncio.to_thread(scrape, server.metrics_port)
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="ValidateToken",'
        'grpc_service="auth.v1.AuthService",grpc_type="unary"} 1.0'
    ) in text
    assert (
        'grpc_server_handled_total{grpc_code="INVALID_ARGUMENT",grpc_method="Login",'
        'grpc_service="auth.v1.AuthService",grpc_type="unary"} 1.0'
    ) in text
    assert (
        'grpc_server_started_total{grpc_method="Login",grpc_service="auth.v1.AuthService",grpc_type="unary"} 1.0'
        in text
    )
    assert 'grpc_server_handling_seconds_count{grpc_method="ValidateToken"' in text


async def test_outgoing_call_propagates_trace_deadline_and_counts_client_metrics(chassis, logs):
    server, stub, _ = chassis
    call = stub.ChangePassword(auth_pb2.ChangePasswordRequest(), timeout=3.0, metadata=(("traceparent", TRACEPARENT),))
    await call
    metadata = dict(await call.initial_metadata())
    timeout, remaining = float(metadata["x-upstream-timeout"]), float(metadata["x-time-remaining"])
    # What the server had left of the caller's 3 s, minus the 50 ms margin, and not the 5 s default. The
    # server's remaining time is not compared with 3 s: gRPC rounds the grpc-timeout header up when it encodes
    # it, so the server can see slightly more than the client asked for.
    assert 0 < timeout <= remaining - 0.05
    assert remaining < 4.0

    upstream_lines = [
        line
        for line in logs.events("rpc.finished")
        if line["service"] == "inference" and line["method"].endswith("/ServerLive")
    ]
    assert upstream_lines[0]["trace_id"] == TRACE_ID  # traceparent crossed the hop

    await scrape_until(
        server.metrics_port,
        'grpc_client_started_total{grpc_method="ServerLive",grpc_service="inference.GRPCInferenceService",'
        'grpc_type="unary"} 1.0',
        'grpc_client_handled_total{grpc_code="OK",grpc_method="ServerLive",'
        'grpc_service="inference.GRPCInferenceService",grpc_type="unary"} 1.0',
    )


async def test_outgoing_timeout_is_the_default_without_a_client_deadline(chassis):
    _, stub, _ = chassis
    call = stub.ChangePassword(auth_pb2.ChangePasswordRequest())
    await call
    assert float(dict(await call.initial_metadata())["x-upstream-timeout"]) == 5.0


async def test_less_time_than_the_margin_refuses_the_upstream_call(chassis):
    server, stub, _ = chassis
    # The caller allows 10 s, far more than the handler needs to run, and far less than its margin. The answer
    # is the handler's own refusal (ErrorInfo from this server, its message), not the client giving up.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == "the deadline expired before the upstream call could be made"
    status = rpc_status.from_call(caught.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert (info.reason, info.domain) == ("DEADLINE_EXCEEDED", "chassis-test")

    text = await scrape_until(
        server.metrics_port,
        'grpc_server_handled_total{grpc_code="DEADLINE_EXCEEDED",grpc_method="RequestPasswordReset",'
        'grpc_service="auth.v1.AuthService",grpc_type="unary"} 1.0',
    )
    assert "grpc_client_started_total{" not in text  # no upstream call was even started


async def test_upstream_status_passes_through(chassis):
    _, stub, _ = chassis
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ResetPassword(auth_pb2.ResetPasswordRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # the inference server's answer, passed on
    assert "not served" in caught.value.details()


async def test_every_answer_carries_the_trace_id(chassis):
    _, stub, _ = chassis
    call = stub.ValidateToken(auth_pb2.ValidateTokenRequest(), timeout=5, metadata=(("traceparent", TRACEPARENT),))
    await call
    assert dict(await call.trailing_metadata())["x-trace-id"] == TRACE_ID
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Login(auth_pb2.LoginRequest(), timeout=5, metadata=(("traceparent", TRACEPARENT),))
    assert dict(caught.value.trailing_metadata())["x-trace-id"] == TRACE_ID
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(auth_pb2.RegisterRequest(), timeout=5)
    trace_id = dict(caught.value.trailing_metadata())["x-trace-id"]
    assert trace_id in caught.value.details()  # the INTERNAL message quotes the same ID
