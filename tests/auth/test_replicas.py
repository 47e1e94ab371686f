"""Two real auth processes on one PostgreSQL and one Redis, behind one gateway that balances over both.

Each replica is ``python -m services.auth`` with the same AUTH_DATABASE_URL, AUTH_SIGNING_KEY and
AUTH_RATE_LIMIT_STORAGE_URI; the gateway's auth target lists both (round robin, token cache off so that
every gateway call asks a replica). The database and the Redis key prefix are this module's own. The kill -9
test comes last: it leaves replica B alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from auth.v1 import auth_pb2 as pb
from auth.v1 import auth_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from inference import grpc_service_pb2 as infer_pb
from inference import grpc_service_pb2_grpc

from services.auth import reasons
from tests.auth.conftest import ADMIN, PASSWORD, bearer
from tests.processes import ServiceProcess, start_service
from tests.rpc import details, rpc_error

LIMIT = 6  # login attempts per account per minute, shared by both replicas


@dataclass
class Stack:
    auth: list[ServiceProcess]
    gateway: ServiceProcess


@pytest.fixture(scope="module")
def stack(postgres, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("replicas")
    database = postgres.create_database()
    prefix = f"authtest:replicas:{uuid.uuid4().hex[:8]}:"
    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    shared = {
        "database_url": postgres.url(database),
        "signing_key": key.decode(),
        "rate_limit_storage_uri": redis_server.url,
        "rate_limit_key_prefix": prefix,
        "login_rate_per_account": f"{LIMIT}/minute",
        "login_rate_per_ip": "1000/minute",
        "trusted_proxies": '["127.0.0.1/32"]',
        "bootstrap_admin_username": ADMIN[0],
        "bootstrap_admin_password": ADMIN[1],
    }
    started: list[ServiceProcess] = []
    try:
        for name in ("a", "b"):
            started.append(start_service("auth", workdir / name, **shared))
        inference = start_service("inference", workdir / "inference")
        started.append(inference)
        gateway = start_service(
            "gateway",
            workdir / "gateway",
            auth_target="ipv4:" + ",".join(replica.address for replica in started[:2]),
            inference_target=f"dns:///{inference.address}",
            token_cache_seconds="0",
            upstream_check_interval_seconds="0.2",
        )
        started.append(gateway)
        yield Stack(started[:2], gateway)
    finally:
        for service in reversed(started):
            service.stop()
        postgres.drop_database(database)
        redis_server.delete_prefix(prefix)


@pytest.fixture
async def stubs(stack: Stack):
    channels = [grpc.aio.insecure_channel(service.address) for service in [*stack.auth, stack.gateway]]
    yield [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels[:2]], channels[2]
    for channel in channels:
        await channel.close()


async def register(stub, username: str) -> pb.RegisterResponse:
    request = pb.RegisterRequest(username=username, email=f"{username}@example.com", password=PASSWORD)
    return await stub.Register(request, timeout=10)


async def login(stub, username: str, password: str = PASSWORD) -> pb.LoginResponse:
    return await stub.Login(pb.LoginRequest(username=username, password=password), timeout=10)


async def test_an_account_and_its_sessions_are_the_same_on_both_replicas(stubs):
    (a, b), gateway = stubs
    await register(a, "hana")
    tokens = await login(b, "hana")  # registered on A, logged in on B
    inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(gateway)
    for _ in range(4):  # round robin: both replicas validate B's token for the gateway
        await inference.ServerMetadata(
            infer_pb.ServerMetadataRequest(), metadata=bearer(tokens.access_token), timeout=10
        )
    await a.Logout(pb.LogoutRequest(), metadata=bearer(tokens.access_token), timeout=10)
    error = await rpc_error(b.ValidateToken(pb.ValidateTokenRequest(access_token=tokens.access_token), timeout=10))
    assert details(error)["ErrorInfo"].reason == reasons.SESSION_REVOKED  # refused on B at once
    for _ in range(2):  # and through the gateway (its cache is off here: at once)
        error = await rpc_error(
            inference.ServerMetadata(infer_pb.ServerMetadataRequest(), metadata=bearer(tokens.access_token), timeout=10)
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_login_limit_counts_attempts_on_both_replicas_together(stubs):
    (a, b), _ = stubs
    await register(a, "ivan")
    for i in range(LIMIT):
        await login((a, b)[i % 2], "ivan")
    for stub in (a, b):
        error = await rpc_error(login(stub, "ivan"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_concurrent_registrations_of_one_name_over_both_replicas_make_one_account(stubs):
    (a, b), _ = stubs
    results = await asyncio.gather(
        *(
            (a, b)[i % 2].Register(
                pb.RegisterRequest(username="jade", email=f"jade{i}@example.com", password=PASSWORD), timeout=10
            )
            for i in range(10)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(result, pb.RegisterResponse) for result in results) == 1
    codes = {result.code() for result in results if isinstance(result, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.ALREADY_EXISTS}


async def test_one_refresh_token_used_on_both_replicas_at_once_rotates_once_and_ends_the_session(stubs):
    (a, b), _ = stubs
    await register(a, "kira")
    tokens = await login(a, "kira")
    request = pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    results = await asyncio.gather(
        a.RefreshToken(request, timeout=10), b.RefreshToken(request, timeout=10), return_exceptions=True
    )
    [rotated] = [result for result in results if isinstance(result, pb.RefreshTokenResponse)]
    [reused] = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert reused.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await rpc_error(b.RefreshToken(pb.RefreshTokenRequest(refresh_token=rotated.refresh_token), timeout=10))
    assert details(error)["ErrorInfo"].reason == reasons.INVALID_REFRESH_TOKEN  # reuse ended the whole family


async def test_kill_9_of_a_replica_during_a_registration_burst_loses_no_answered_registration(stubs, stack: Stack):
    (_, b), gateway = stubs
    accounts = auth_pb2_grpc.AuthServiceStub(gateway)
    answered: list[str] = []
    failed: list[grpc.StatusCode] = []

    async def burst(worker: int) -> None:
        for i in range(15):
            name = f"burst-{worker}-{i}"
            try:
                await register(accounts, name)
            except grpc.aio.AioRpcError as error:
                failed.append(error.code())
            else:
                answered.append(name)
            if worker == 0 and i == 4:
                os.kill(stack.auth[0].process.pid, signal.SIGKILL)

    await asyncio.gather(*(burst(worker) for worker in range(4)))
    stack.auth[0].process.wait(timeout=10)
    assert set(failed) <= {grpc.StatusCode.UNAVAILABLE}  # in flight on A when it died: never INTERNAL
    assert len(answered) >= 60 - 4 * 2  # the gateway moved to B within a few calls per caller
    logins = await asyncio.gather(*(login(b, name) for name in answered))
    assert all(response.access_token for response in logins)  # every answered registration can log in on B
