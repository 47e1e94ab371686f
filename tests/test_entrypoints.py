"""The three services as real processes, started the way operators start them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import pytest
from auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2, grpc_service_pb2_grpc

from tests.processes import ServiceProcess, start_service


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """auth and inference, then the gateway pointed at them."""
    workdir = tmp_path_factory.mktemp("platform")
    started: list[ServiceProcess] = []
    try:
        auth = start_service("auth", workdir)
        started.append(auth)
        inference = start_service("inference", workdir)
        started.append(inference)
        gateway = start_service(
            "gateway",
            workdir,
            auth_target=f"dns:///{auth.address}",
            inference_target=f"dns:///{inference.address}",
        )
        started.append(gateway)
        yield {"auth": auth, "inference": inference, "gateway": gateway}
    finally:
        for service in reversed(started):
            service.stop()


def grpcurl_json(grpcurl: str, *args: str) -> dict:
    done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", ["auth", "inference", "gateway"])
@pytest.mark.parametrize("health_name", ["", "liveness", "readiness"])
def test_health_check_with_grpcurl(platform, grpcurl, name, health_name):
    answer = grpcurl_json(
        grpcurl, "-d", json.dumps({"service": health_name}), platform[name].address, "grpc.health.v1.Health/Check"
    )
    assert answer == {"status": "SERVING"}


def test_gateway_lists_its_services(platform, grpcurl):
    listed = subprocess.run(
        [grpcurl, "-plaintext", platform["gateway"].address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert {"gateway.v1.GatewayService", "grpc.health.v1.Health"} <= set(listed.stdout.split())


def test_every_log_line_is_json_with_the_schema(platform):
    for service in platform.values():
        assert service.lines, service.name
        for line in service.lines:
            assert {"ts", "level", "service", "event", "trace_id", "span_id"} <= set(line)
            assert line["service"] == service.name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flips_health_then_exits_zero_within_grace(sig, tmp_path):
    service = start_service("inference", tmp_path, grace_seconds="3")
    try:
        with grpc.insecure_channel(service.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=20
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            sent = time.monotonic()
            service.process.send_signal(sig)
            # The open Watch stream sees NOT_SERVING while the server is still up.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            code = service.process.wait(timeout=3 + 5)
            elapsed = time.monotonic() - sent
    finally:
        service.stop()
    assert code == 0
    events = [line["event"] for line in service.lines]
    assert events.index("server.stopping") < events.index("server.stopped")
    assert elapsed < 3 + 2, elapsed  # the grace bounds the wait for the open stream


def answers_its_own_rpc(name: str, channel: grpc.Channel) -> bool:
    """A call to the service's own API, answered by its handler (not refused by the server)."""
    if name == "inference":
        return bool(
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            .ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=5)
            .live
        )
    try:
        auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(auth_pb2.ValidateTokenRequest(access_token="x"), timeout=5)
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.UNAUTHENTICATED  # the handler looked at the token
    return False


@pytest.mark.parametrize("name", ["auth", "inference"])
def test_sigterm_reports_not_serving_and_serves_on_for_the_delay(name, tmp_path):
    service = start_service(name, tmp_path, shutdown_delay_seconds="5", grace_seconds="2")
    try:
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            service.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            for health_name in ("", "liveness", "readiness"):
                answer = health.Check(health_pb2.HealthCheckRequest(service=health_name), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING, health_name
            assert answers_its_own_rpc(name, channel)
            assert service.process.poll() is None
            assert "server.closing" not in [line.get("event") for line in service.lines]
            service.process.send_signal(signal.SIGTERM)  # again, as Docker or an impatient operator would
            service.wait_for_event("server.signal_ignored", timeout=5)
            assert answers_its_own_rpc(name, channel)  # still serving: the second signal did not kill it
    finally:
        service.stop(timeout=5 + 2 + 15)
    assert service.process.returncode == 0
    events = [line.get("event") for line in service.lines]
    assert events.index("server.stopping") < events.index("server.draining") < events.index("server.closing")


@pytest.mark.parametrize(
    ("module", "variable", "value"),
    [
        ("auth", "AUTH_PORT", "not-a-port"),
        ("inference", "INFERENCE_GRACE_SECONDS", "-1"),
        ("gateway", "GATEWAY_LOG_LEVEL", "LOUD"),
        ("gateway", "GATEWAY_MAX_MESSAGE_BYTES", "12"),
    ],
)
def test_invalid_setting_stops_start_up_naming_the_variable(module, variable, value):
    done = subprocess.run(
        [sys.executable, "-m", f"services.{module}"],
        env={"PATH": "", variable: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert variable in done.stderr
    assert "Traceback" not in done.stderr
