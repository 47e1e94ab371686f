"""All three real services in this process: auth, inference (real workers), and the gateway in front."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from auth.v1 import auth_pb2 as auth_pb
from auth.v1 import auth_pb2_grpc
from gateway.v1 import gateway_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2_grpc

from services.auth.app import build_server as build_auth
from services.common.server import GrpcServer
from services.gateway.app import build_server as build_gateway
from services.gateway.settings import GatewaySettings
from services.inference.app import build_server as build_inference
from tests.auth.conftest import ADMIN, PASSWORD, auth_settings
from tests.inference.conftest import eventually_async, fast_settings, make_repository

CACHE_SECONDS = 1.0  # the gateway's token cache in these tests: the bound on a revoked token


@dataclass
class Platform:
    auth: GrpcServer
    inference: GrpcServer
    gateway: GrpcServer
    channel: grpc.aio.Channel
    tmp_path: Path
    repository: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def accounts(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def infer(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def ops(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self.channel)

    async def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

    async def wait_ready(self, within: float = 60.0) -> None:
        async def ready() -> bool:
            return await self.health("readiness") == health_pb2.HealthCheckResponse.SERVING

        await eventually_async(ready, within)

    async def user_token(self, username: str, password: str = PASSWORD) -> str:
        await self.accounts.Register(
            auth_pb.RegisterRequest(username=username, email=f"{username}@example.com", password=password), timeout=10
        )
        return (
            await self.accounts.Login(auth_pb.LoginRequest(username=username, password=password), timeout=10)
        ).access_token

    async def admin_token(self) -> str:
        login = await self.accounts.Login(auth_pb.LoginRequest(username=ADMIN[0], password=ADMIN[1]), timeout=10)
        return login.access_token


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def start_platform(tmp_path: Path, demo_models: Path) -> AsyncIterator[Callable[..., Awaitable[Platform]]]:
    servers: list[GrpcServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(
        *,
        models: tuple[str, ...] = ("iris", "sleepy"),
        auth: dict[str, Any] | None = None,
        inference: dict[str, Any] | None = None,
        client_credentials: grpc.ChannelCredentials | None = None,
        **gateway: Any,
    ) -> Platform:
        auth_server = await build_auth(
            auth_settings(tmp_path / "auth", trusted_proxies=["127.0.0.1/32"], **(auth or {}))
        )
        await auth_server.start()
        servers.append(auth_server)
        repository = make_repository(tmp_path, demo_models, list(models))
        inference_server = await build_inference(fast_settings(repository, **(inference or {})))
        await inference_server.start()
        servers.append(inference_server)
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "grace_seconds": 1.0,
            "auth_target": f"dns:///127.0.0.1:{auth_server.port}",
            "inference_target": f"dns:///127.0.0.1:{inference_server.port}",
            "token_cache_seconds": CACHE_SECONDS,
            "upstream_check_interval_seconds": 0.2,
        }
        values.update(gateway)
        gateway_server = await build_gateway(GatewaySettings(**values))
        await gateway_server.start()
        servers.append(gateway_server)
        address = f"127.0.0.1:{gateway_server.port}"
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
        channel = (
            grpc.aio.insecure_channel(address, options=options)
            if client_credentials is None
            else grpc.aio.secure_channel(address, client_credentials, options=options)
        )
        channels.append(channel)
        platform = Platform(auth_server, inference_server, gateway_server, channel, tmp_path, repository)
        await platform.wait_ready()
        return platform

    yield start
    for channel in channels:
        await channel.close()
    for server in reversed(servers):
        await server.stop()
