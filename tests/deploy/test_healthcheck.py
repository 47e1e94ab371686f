"""deploy/docker/healthcheck.py, the compose healthcheck: against a real service and a health server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.conftest import DEPLOY
from tests.processes import start_service

SCRIPT = DEPLOY / "docker" / "healthcheck.py"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_a_running_service_is_live_and_ready(tmp_path):
    auth = start_service("auth", tmp_path)
    try:
        out = check(auth.address, "liveness", "readiness")
        assert out.returncode == 0, out.stderr
        assert check(auth.address).returncode == 0
    finally:
        auth.stop()
    out = check(auth.address, "liveness", "--timeout", "1")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr


def test_every_named_service_must_be_serving(health_server):
    address, servicer = health_server
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert check(address, "liveness").returncode == 0
    out = check(address, "liveness", "readiness")
    assert out.returncode == 1
    assert "'readiness': NOT_SERVING" in out.stderr


def test_an_unknown_name_is_unhealthy(health_server):
    address, _ = health_server
    out = check(address, "no-such-service")
    assert out.returncode == 1
    assert "NOT_FOUND" in out.stderr


def test_nothing_listening_is_unhealthy():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = check(f"127.0.0.1:{port}", "--timeout", "1")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr
