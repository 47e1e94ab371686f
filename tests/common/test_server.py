"""The server bootstrap on each real service: health, reflection, readiness, shutdown order."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import reflection
from tests.inference.conftest import eventually_async
from tests.polling import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

OWN_SERVICES = {
    "auth": ["auth.v1.AuthService"],
    "inference": ["inference.GRPCInferenceService", "inference.v1.WorkerPoolService"],
    "gateway": ["gateway.v1.GatewayService"],
}


async def check(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


@pytest.mark.parametrize("name", sorted(OWN_SERVICES))
async def test_health_serving_for_every_name(name, start_service, channel_to):
    server = await start_service(name)
    channel = channel_to(server)
    for service in ["", "liveness", "readiness", *OWN_SERVICES[name]]:
        assert await check(channel, service) == SERVING, service


async def test_unknown_health_name_is_not_found(start_service, channel_to):
    server = await start_service("auth")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(channel_to(server), "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_not_ready_flips_readiness_but_not_liveness(start_service, channel_to):
    server = await start_service("inference")
    channel = channel_to(server)
    await server.set_ready(False)
    assert await check(channel, "readiness") == NOT_SERVING
    assert await check(channel, "inference.GRPCInferenceService") == NOT_SERVING
    assert await check(channel, "liveness") == SERVING
    assert await check(channel, "") == SERVING
    await server.set_ready(True)
    assert await check(channel, "readiness") == SERVING


async def test_stop_sets_not_serving_before_the_server_goes(start_service, channel_to):
    server = await start_service("auth", grace_seconds=2.0)
    channel = channel_to(server)
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="liveness"))
    first = await watch.read()
    assert first.status == SERVING
    stopping = asyncio.ensure_future(server.stop())
    update = await asyncio.wait_for(watch.read(), timeout=5)
    assert update.status == NOT_SERVING
    await stopping
    watch.cancel()


@pytest.mark.parametrize("name", sorted(OWN_SERVICES))
async def test_grpcurl_lists_services_through_reflection(name, start_service, grpcurl):
    server = await start_service(name)
    listed = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", f"127.0.0.1:{server.port}", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    services = set(listed.stdout.split())
    assert {*OWN_SERVICES[name], "grpc.health.v1.Health"} <= services


async def test_grpcurl_describes_and_calls_without_proto_files(start_service, grpcurl):
    server = await start_service("inference")
    address = f"127.0.0.1:{server.port}"
    described = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", address, "describe", "inference.ModelInferRequest"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "raw_input_contents" in described.stdout
    health = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", "-d", '{"service": "readiness"}', address, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(health.stdout) == {"status": "SERVING"}
    metadata = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", address, "inference.GRPCInferenceService/ServerMetadata"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(metadata.stdout)["name"] == "ml-platform-inference"


async def test_message_size_limit_from_settings(start_service, channel_to):
    from inference import grpc_service_pb2 as pb
    from inference import grpc_service_pb2_grpc

    server = await start_service("inference", max_message_bytes=64 * 1024)
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel_to(server))
    too_big = pb.ModelInferRequest(model_name="x", raw_input_contents=[b"\0" * (128 * 1024)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(too_big, timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("name", sorted(OWN_SERVICES))
async def test_reflection_v1_answers_like_v1alpha(name, start_service, channel_to):
    """Newer grpcurl, grpcui and Postman ask grpc.reflection.v1 first."""
    server = await start_service(name)
    request_class = reflection.v1_message("ServerReflectionRequest")
    response_class = reflection.v1_message("ServerReflectionResponse")
    call = channel_to(server).stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    own = sorted(OWN_SERVICES[name])[0]
    stream = call(iter([request_class(list_services=""), request_class(file_containing_symbol=own)]), timeout=10)
    listing, files = [answer async for answer in stream]
    listed = {service.name for service in listing.list_services_response.service}
    assert {*OWN_SERVICES[name], "grpc.health.v1.Health", reflection.V1_SERVICE_NAME} <= listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed
    described = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in files.file_descriptor_response.file_descriptor_proto
    ]
    assert any(own.rsplit(".", 1)[-1] in {s.name for s in fd.service} for fd in described)
    # The v1 service can describe itself, as grpcurl's `describe` needs.
    stream = call(iter([request_class(file_containing_symbol=reflection.V1_SERVICE_NAME)]), timeout=10)
    [itself] = [answer async for answer in stream]
    [proto] = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in itself.file_descriptor_response.file_descriptor_proto
    ]
    assert proto.package == "grpc.reflection.v1"


async def test_the_gateways_worker_health_polling_logs_at_debug(start_service, logs):
    """The gateway asks inference for worker health every interval: those lines must not fill the INFO log."""
    await start_service("gateway")

    def polls() -> list[dict]:
        return [
            line
            for line in logs.lines
            if line["event"] == "rpc.finished"
            and line.get("method") == "/inference.v1.WorkerPoolService/GetWorkerHealth"
        ]

    await eventually(lambda: len(polls()) >= 3, within=30)
    assert {line["level"] for line in polls()} == {"debug"}


@pytest.mark.parametrize("name", sorted(OWN_SERVICES))
async def test_on_stop_health_says_not_serving_while_rpcs_are_still_served(name, start_service, channel_to):
    """The shutdown delay: health NOT_SERVING first, RPCs still answered, then the stop."""
    server = await start_service(name, shutdown_delay_seconds=2.0)
    health = health_pb2_grpc.HealthStub(channel_to(server))
    stopping = asyncio.ensure_future(server.stop())

    async def not_serving() -> bool:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return answer.status == NOT_SERVING

    await eventually_async(not_serving, within=5)
    # Still accepted and answered during the delay (the stop has not got to refusing RPCs yet).
    for _ in range(3):
        answer = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert answer.status == NOT_SERVING
    assert not stopping.done()
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_runs_once_to_the_end_even_if_its_caller_is_cancelled(start_service, channel_to, logs):
    server = await start_service("auth", shutdown_delay_seconds=1.0)
    health = health_pb2_grpc.HealthStub(channel_to(server))
    first = asyncio.ensure_future(server.stop())
    await eventually(lambda: logs.events("server.draining"))
    first.cancel()  # e.g. a test's or a supervisor's timeout: the shutdown goes on regardless
    await server.stop()  # waits for the same shutdown
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(logs.events("server.stopping")) == 1
    assert len(logs.events("server.stopped")) == 1
