"""Rate limits, lockout, no user enumeration, and shedding load when hashing is saturated."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from auth.v1 import auth_pb2 as pb

from tests.auth.conftest import PASSWORD, bearer
from tests.rpc import details, rpc_error

WRONG = "definitely the wrong password"


def metric(server, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_unknown_user_and_wrong_password_answer_alike(auth):
    await auth.register("judy")
    unknown = await rpc_error(auth.login("nobody-here", WRONG))
    wrong = await rpc_error(auth.login("judy", WRONG))
    assert unknown.code() == wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.details() == wrong.details() == "invalid username or password"
    assert details(unknown) == details(wrong)


async def test_sixth_wrong_login_is_refused_as_locked(auth, clock):
    await auth.register("kim")
    for _ in range(5):
        error = await rpc_error(auth.login("kim", WRONG))
        assert "RetryInfo" not in details(error)
    # Locked: even the right password is refused, like a wrong one plus RetryInfo.
    locked = await rpc_error(auth.login("kim", PASSWORD))
    assert locked.code() == grpc.StatusCode.UNAUTHENTICATED
    assert locked.details() == "invalid username or password"
    retry = details(locked)["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
    assert 0 < retry <= 60
    assert metric(auth.server, "auth_lockouts_total") == 1
    clock.advance(61)  # the first lockout lasts a minute
    assert (await auth.login("kim")).access_token


async def test_lockouts_grow_longer(auth, clock):
    await auth.register("lee")
    for expected in (60, 120, 240):
        for _ in range(5):
            await rpc_error(auth.login("lee", WRONG))
        retry = (
            details(await rpc_error(auth.login("lee", WRONG)))["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
        )
        assert expected - 2 < retry <= expected
        clock.advance(expected + 1)


async def test_unknown_usernames_are_locked_the_same_way(auth):
    for _ in range(5):
        assert "RetryInfo" not in details(await rpc_error(auth.login("ghost-user", WRONG)))
    assert "RetryInfo" in details(await rpc_error(auth.login("ghost-user", WRONG)))


async def test_fifty_parallel_wrong_attempts_lock_exactly_once(auth):
    await auth.register("mallory")
    errors = await asyncio.gather(*(rpc_error(auth.login("mallory", WRONG)) for _ in range(50)))
    assert {error.code() for error in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    [row] = auth.query("SELECT failed_count, lockouts FROM login_failures WHERE username = 'mallory'")
    assert (row["failed_count"], row["lockouts"]) == (5, 1)
    assert metric(auth.server, "auth_lockouts_total") == 1
    locked = auth.query("SELECT COUNT(*) AS n FROM audit_events WHERE event_type = 'ACCOUNT_LOCKED'")
    assert locked[0]["n"] == 1


async def test_admin_unlocks_an_account(auth):
    await auth.register("nina")
    for _ in range(6):
        await rpc_error(auth.login("nina", WRONG))
    admin = await auth.admin_token()
    await auth.stub.UnlockAccount(pb.UnlockAccountRequest(username="nina"), metadata=bearer(admin), timeout=5)
    assert (await auth.login("nina")).access_token


async def test_unlock_needs_the_admin_role(auth):
    await auth.register("oscar")
    token = (await auth.login("oscar")).access_token
    denied = await rpc_error(
        auth.stub.UnlockAccount(pb.UnlockAccountRequest(username="oscar"), metadata=bearer(token), timeout=5)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    anonymous = await rpc_error(auth.stub.UnlockAccount(pb.UnlockAccountRequest(username="oscar"), timeout=5))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_per_ip_limit_refuses_before_hashing(start_auth):
    auth = await start_auth(login_rate_per_ip="3/minute")
    await auth.register("peggy")
    for _ in range(3):
        await rpc_error(auth.login("peggy", WRONG))
    hashed = metric(auth.server, "auth_hash_seconds_count")
    limited = await rpc_error(auth.login("peggy", WRONG))
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < details(limited)["RetryInfo"].retry_delay.ToTimedelta().total_seconds() <= 60
    assert metric(auth.server, "auth_hash_seconds_count") == hashed  # refused before any hash
    assert metric(auth.server, 'auth_rate_limited_total{scope="ip"}') == 1
    # Another account from the same IP is limited too.
    assert (await rpc_error(auth.login("someone-else", WRONG))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_per_account_limit(start_auth):
    auth = await start_auth(login_rate_per_account="2/minute")
    await auth.register("quinn")
    await auth.login("quinn")
    await auth.login("quinn")
    limited = await rpc_error(auth.login("quinn"))
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metric(auth.server, 'auth_rate_limited_total{scope="account"}') == 1


async def test_forwarded_ip_is_trusted_only_from_trusted_proxies(start_auth):
    trusting = await start_auth(login_rate_per_ip="2/minute", trusted_proxies=["127.0.0.1/32"])
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"):
        await rpc_error(trusting.login("rob", WRONG, metadata=(("x-forwarded-for", ip),)))
    third = await rpc_error(trusting.login("rob", WRONG, metadata=(("x-forwarded-for", "10.0.0.1"),)))
    assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ips = {
        r["client_ip"] for r in trusting.query("SELECT client_ip FROM audit_events WHERE event_type = 'LOGIN_FAILED'")
    }
    assert ips == {"10.0.0.1", "10.0.0.2"}


async def test_forwarded_ip_from_an_untrusted_peer_is_ignored(start_auth, tmp_path):
    auth = await start_auth(login_rate_per_ip="2/minute", data_dir=tmp_path / "other")
    for ip in ("10.0.0.1", "10.0.0.2"):
        await rpc_error(auth.login("sam", WRONG, metadata=(("x-forwarded-for", ip),)))
    limited = await rpc_error(auth.login("sam", WRONG, metadata=(("x-forwarded-for", "10.0.0.3"),)))
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ips = {r["client_ip"] for r in auth.query("SELECT client_ip FROM audit_events WHERE event_type = 'LOGIN_FAILED'")}
    assert ips == {"127.0.0.1"}


async def test_saturated_hashing_is_shed_not_queued_forever(start_auth):
    auth = await start_auth(hash_profile="production", hash_workers=1, hash_queue_limit=1)
    await auth.register("trent")
    results = await asyncio.gather(*(auth.login("trent") for _ in range(12)), return_exceptions=True)
    shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert shed, "no request was shed"
    assert {error.code() for error in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("RetryInfo" in details(error) for error in shed)
    assert any(not isinstance(r, BaseException) for r in results)


async def test_shed_hashing_is_counted(start_auth):
    auth = await start_auth(hash_profile="production", hash_workers=1, hash_queue_limit=0)
    await auth.register("ursula")
    results = await asyncio.gather(*(auth.login("ursula") for _ in range(8)), return_exceptions=True)
    shed = sum(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert shed > 0
    assert metric(auth.server, "auth_hash_rejected_total") == shed
