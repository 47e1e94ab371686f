"""A real auth server (in-process, real SQLite under tmp_path) and a client for it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession
from auth.v1 import auth_pb2 as pb
from auth.v1 import auth_pb2_grpc

from services.auth import AuthSettings
from services.auth import build_server as build_auth
from services.common.server import GrpcServer

REFUSED = "nobody@ml-platform.test"
ADMIN = ("admin", "operator passphrase for tests 7c1f")
PASSWORD = "a perfectly fine passphrase"


class Clock:
    """Time as the auth core sees it; tests move it forward instead of waiting."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class AuthClient:
    server: GrpcServer
    stub: auth_pb2_grpc.AuthServiceStub
    data_dir: Path
    clock: Clock

    def db(self) -> sqlite3.Connection:
        """A read-only look at the real database file."""
        connection = sqlite3.connect(f"file:{self.data_dir / 'auth.db'}?mode=ro", uri=True)
        connection.row_factory = sqlite3.Row
        return connection

    def query(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        with self.db() as connection:
            return list(connection.execute(sql, params))

    async def register(self, username: str, password: str = PASSWORD, email: str | None = None) -> str:
        response = await self.stub.Register(
            pb.RegisterRequest(username=username, email=email or f"{username}@example.com", password=password),
            timeout=10,
        )
        return response.user_id

    async def login(self, username: str, password: str = PASSWORD, **kwargs: Any) -> pb.LoginResponse:
        return await self.stub.Login(pb.LoginRequest(username=username, password=password), timeout=10, **kwargs)

    async def admin_token(self) -> str:
        return (await self.login(*ADMIN)).access_token


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def auth_settings(data_dir: Path, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "grace_seconds": 1.0,
        "data_dir": data_dir,
        "hash_profile": "development",
        "bootstrap_admin_username": ADMIN[0],
        "bootstrap_admin_password": ADMIN[1],
        "login_rate_per_ip": "1000/minute",
        "login_rate_per_account": "1000/minute",
    }
    values.update(overrides)
    return AuthSettings(**values)


@pytest.fixture
async def start_auth(tmp_path: Path, clock: Clock) -> AsyncIterator[Callable[..., Awaitable[AuthClient]]]:
    """Start a real auth server on tmp_path's database; any number, all stopped afterwards."""
    servers: list[GrpcServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(**overrides: Any) -> AuthClient:
        data_dir = overrides.pop("data_dir", tmp_path / "auth")
        server = await build_auth(auth_settings(data_dir, **overrides), clock=clock)
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return AuthClient(server, auth_pb2_grpc.AuthServiceStub(channel), data_dir, clock)

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop()


@pytest.fixture
async def auth(start_auth: Callable[..., Awaitable[AuthClient]]) -> AuthClient:
    return await start_auth()


class Collector:
    """aiosmtpd handler keeping every accepted message; refuses mail to REFUSED."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_RCPT(
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address == REFUSED:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


class LoopbackController(Controller):
    """Controller on 127.0.0.1 port 0: learns the bound port before its start-up probe connects."""

    def __init__(self, handler: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0)

    def _trigger_server(self) -> None:
        self.port = bound_port(self)
        super()._trigger_server()  # type: ignore[no-untyped-call]


def bound_port(controller: Controller) -> int:
    server = controller.server
    assert isinstance(server, asyncio.Server)
    port: int = server.sockets[0].getsockname()[1]
    return port


@pytest.fixture
def smtp_server() -> Iterator[tuple[Collector, int]]:
    collector = Collector()
    controller = LoopbackController(collector)
    controller.start()
    try:
        yield collector, bound_port(controller)
    finally:
        controller.stop()
