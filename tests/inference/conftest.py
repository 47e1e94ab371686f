"""A real inference server (in-process supervisor, real worker processes) over a temporary repository."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2 as admin_pb
from inference.v1 import worker_pool_pb2_grpc

from services.common.server import GrpcServer
from services.inference.app import build_server as build_inference
from services.inference.settings import InferenceSettings
from tests.conftest import REPO

TEST_MODELS = REPO / "tests" / "testdata" / "models"
CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"


def make_repository(root: Path, demo: Path, names: list[str]) -> Path:
    repository = root / "models"
    repository.mkdir(exist_ok=True)
    for name in names:
        source = demo / name if (demo / name).exists() else TEST_MODELS / name
        shutil.copytree(source, repository / name)
    return repository


@dataclass
class InferenceClient:
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    admin: worker_pool_pb2_grpc.WorkerPoolServiceStub
    repository: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def readiness(self) -> int:
        health = health_pb2_grpc.HealthStub(self.channel)
        return (await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)).status

    async def workers(self, model: str = "") -> list[admin_pb.WorkerHealth]:
        response = await self.admin.GetWorkerHealth(admin_pb.GetWorkerHealthRequest(model_name=model), timeout=5)
        return list(response.workers)

    async def wait_ready(self, within: float = 60.0) -> None:
        async def ready() -> bool:
            return await self.readiness() == health_pb2.HealthCheckResponse.SERVING

        await eventually_async(ready, within)


async def eventually_async(condition: Callable[[], Awaitable[Any]], within: float = 30.0) -> Any:
    """The first truthy result of the coroutine ``condition()``, polled until ``within`` runs out."""
    async with asyncio.timeout(within):
        while True:
            value = await condition()
            if value:
                return value
            await asyncio.sleep(0.05)


def fast_settings(repository: Path, **overrides: Any) -> InferenceSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "grace_seconds": 1.0,
        "model_repository": repository,
        "health_interval_seconds": 0.2,
        "health_timeout_seconds": 0.5,
        "restart_backoff_seconds": 0.1,
        "restart_backoff_max_seconds": 1.0,
        "worker_stop_grace_seconds": 0.5,
    }
    values.update(overrides)
    return InferenceSettings(**values)


@pytest.fixture
async def start_inference(
    tmp_path: Path, demo_models: Path
) -> AsyncIterator[Callable[..., Awaitable[InferenceClient]]]:
    started: list[tuple[GrpcServer, grpc.aio.Channel]] = []

    async def start(
        models: list[str], *, wait: bool = True, prepare: Callable[[Path], None] | None = None, **overrides: Any
    ) -> InferenceClient:
        repository = make_repository(tmp_path, demo_models, models)
        if prepare is not None:
            prepare(repository)  # edit the repository before the server reads it
        server = await build_inference(fast_settings(repository, **overrides))
        await server.start()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)],
        )
        started.append((server, channel))
        client = InferenceClient(
            server,
            channel,
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel),
            worker_pool_pb2_grpc.WorkerPoolServiceStub(channel),
            repository,
        )
        if wait:
            await client.wait_ready()
        return client

    yield start
    for server, channel in reversed(started):
        await channel.close()
        await server.stop()


def triton(command: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """Run the official tritonclient (its own venv and process) with one command, or a list of them
    on one client (one answer per command)."""
    done = subprocess.run(
        [str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "triton.py")],
        input=json.dumps(command),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
