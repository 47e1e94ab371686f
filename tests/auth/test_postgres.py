"""Auth on PostgreSQL over real gRPC: two replicas on one database, a shared key, and the database's outages.

The two replicas are two real auth servers in this process on the same PostgreSQL database (tests/test_replicas.py
runs them as processes behind the gateway). A TcpProxy in front of PostgreSQL cuts the database off mid-run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from auth.v1 import auth_pb2 as pb
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.conninfo import conninfo_to_dict

from services.auth import build_server as build_auth
from services.auth import reasons
from services.common.settings import SettingsError
from tests.auth.conftest import auth_settings, bearer
from tests.polling import eventually
from tests.rpc import details, rpc_error

SECRET = "pw-never-shown-3f9a"


@pytest.fixture(scope="module")
def signing_key() -> str:
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def via(proxy_port: int, url: str) -> str:
    """``url``'s database through the proxy, with a password (trust authentication ignores it)."""
    return f"postgresql://postgres:{SECRET}@127.0.0.1:{proxy_port}/{conninfo_to_dict(url)['dbname']}"


async def validate(auth, token: str) -> pb.ValidateTokenResponse:
    return await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=token), timeout=10)


async def test_two_replicas_share_accounts_sessions_and_limits(start_auth, postgres_url, signing_key, tmp_path: Path):
    shared = {"database_url": postgres_url, "signing_key": signing_key}
    a = await start_auth(data_dir=tmp_path / "a", **shared)
    b = await start_auth(data_dir=tmp_path / "b", **shared)
    await a.register("mia")
    tokens = await b.login("mia")  # registered on A, logs in on B
    assert (await validate(a, tokens.access_token)).username == "mia"  # issued by B, valid on A
    await a.stub.Logout(pb.LogoutRequest(), metadata=bearer(tokens.access_token), timeout=10)
    error = await rpc_error(validate(b, tokens.access_token))  # logged out on A: refused on B at once
    assert details(error)["ErrorInfo"].reason == reasons.SESSION_REVOKED
    error = await rpc_error(b.register("mia", email="other@example.com"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_parallel_wrong_passwords_over_two_replicas_lock_at_the_threshold(
    start_auth, postgres_url, signing_key, tmp_path: Path
):
    shared = {"database_url": postgres_url, "signing_key": signing_key, "lockout_threshold": 5}
    a = await start_auth(data_dir=tmp_path / "a", **shared)
    b = await start_auth(data_dir=tmp_path / "b", **shared)
    await a.register("leo")
    calls = [(a if i % 2 else b).login("leo", "wrong password " + "x" * (i % 3)) for i in range(50)]
    errors = await asyncio.gather(*(rpc_error(call) for call in calls))
    assert {error.code() for error in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    admin = await a.admin_token()
    listed = await b.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=500, username="leo"), metadata=bearer(admin), timeout=10
    )
    kinds = [pb.AuditEventType.Name(event.event_type) for event in listed.events]
    assert kinds.count("AUDIT_EVENT_TYPE_ACCOUNT_LOCKED") == 1
    counted = [event for event in listed.events if event.reason in ("bad_password",)]
    assert len(counted) == 5  # exactly the threshold counted; the rest found the account locked
    error = await rpc_error(a.login("leo"))  # the right password, but locked
    assert "RetryInfo" in details(error)


async def test_a_shared_store_refuses_to_start_without_a_shared_key(postgres_url, tmp_path: Path):
    with pytest.raises(SettingsError, match="AUTH_SIGNING_KEY"):
        await build_auth(auth_settings(tmp_path, database_url=postgres_url))


async def test_an_unreachable_database_stops_the_start_without_its_password(
    postgres, postgres_url, tcp_proxy, signing_key, tmp_path: Path
):
    proxy = await tcp_proxy(*postgres.target())
    proxy.cut()
    settings = auth_settings(
        tmp_path,
        database_url=via(proxy.port, postgres_url),
        signing_key=signing_key,
        database_connect_timeout_seconds=1,
    )
    with pytest.raises(SettingsError, match=r"cannot open the store at postgresql://postgres@127\.0\.0\.1") as refused:
        await build_auth(settings)
    assert SECRET not in str(refused.value)


async def test_a_cut_database_is_unavailable_with_retry_info_then_auth_recovers(
    start_auth, postgres, postgres_url, tcp_proxy, signing_key, logs
):
    proxy = await tcp_proxy(*postgres.target())
    auth = await start_auth(
        database_url=via(proxy.port, postgres_url),
        signing_key=signing_key,
        database_pool_timeout_seconds=1,
        database_connect_timeout_seconds=1,
        database_check_interval_seconds=0.1,
    )
    await auth.register("ava")
    tokens = await auth.login("ava")

    proxy.cut()
    for call in (validate(auth, tokens.access_token), auth.login("ava"), auth.register("ben")):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert details(error)["ErrorInfo"].reason == reasons.STORE_UNAVAILABLE
        assert "RetryInfo" in details(error)
    await eventually(lambda: not auth.server.ready, within=10)  # readiness reports the store's state

    proxy.restore()

    refused: list[grpc.StatusCode] = []
    async with asyncio.timeout(30):  # the pool reconnects by itself (with back-off)
        for _ in range(3000):
            try:
                await validate(auth, tokens.access_token)
                break
            except grpc.aio.AioRpcError as error:
                refused.append(error.code())
            await asyncio.sleep(0.1)
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE}
    await eventually(lambda: auth.server.ready, within=10)
    text = "\n".join(str(line) for line in logs.lines)
    assert "auth.store_unavailable" in text
    assert SECRET not in text


async def test_terminated_connections_mid_run_are_unavailable_never_internal(
    start_auth, postgres, postgres_url, signing_key
):
    auth = await start_auth(database_url=postgres_url, signing_key=signing_key, database_pool_min_size=4)
    await auth.register("cyd")
    tokens = await auth.login("cyd")
    dbname = conninfo_to_dict(postgres_url)["dbname"]
    refused: list[grpc.aio.AioRpcError] = []

    async def load() -> None:
        for i in range(60):
            try:
                if i % 3:
                    await validate(auth, tokens.access_token)
                else:
                    await auth.login("cyd")
            except grpc.aio.AioRpcError as error:
                refused.append(error)

    async def cut() -> None:
        for _ in range(5):
            await asyncio.to_thread(postgres.terminate_backends, dbname)
            await asyncio.sleep(0)

    await asyncio.gather(load(), load(), cut())
    for error in refused:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "RetryInfo" in details(error)
    assert (await validate(auth, tokens.access_token)).username == "cyd"  # recovered by itself
