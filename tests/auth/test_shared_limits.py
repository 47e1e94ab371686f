"""Login limits in real Redis: shared by two replicas, and per replica while Redis does not answer.

Two real auth servers in this process count in one Redis under this test's own key prefix. A TcpProxy in
front of Redis cuts it off mid-run: the limits then hold per replica (logged, counted, the gauge at 0), and
come back to Redis by themselves once it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.auth.conftest import AuthClient
from tests.rpc import details, rpc_error


def metric(auth: AuthClient, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{auth.server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def refused(auth: AuthClient, username: str) -> grpc.StatusCode:
    return (await rpc_error(auth.login(username))).code()


async def test_two_replicas_count_logins_together(start_auth, redis_server, redis_prefix, tmp_path: Path):
    shared = {
        "rate_limit_storage_uri": redis_server.url,
        "rate_limit_key_prefix": redis_prefix,
        "login_rate_per_account": "4/minute",
    }
    a = await start_auth(data_dir=tmp_path / "a", **shared)
    b = await start_auth(data_dir=tmp_path / "b", **shared)
    await a.register("kai")
    await b.register("kai", email="kai@b.example.com")  # each replica has its own SQLite: one account each
    for auth in (a, b, a, b):
        await auth.login("kai")
    for auth in (a, b):  # 4 attempts split over A and B: the fifth is refused on either
        error = await rpc_error(auth.login("kai"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "RetryInfo" in details(error)
    assert metric(a, "auth_rate_limit_shared") == 1
    assert redis_server.client.keys(f"{redis_prefix}*")  # counted in Redis, under this test's prefix


async def test_while_redis_is_cut_off_limits_hold_per_replica_then_return(
    start_auth, redis_server, redis_prefix, tcp_proxy, logs
):
    proxy = await tcp_proxy(*redis_server.target())
    auth = await start_auth(
        rate_limit_storage_uri=f"redis://127.0.0.1:{proxy.port}/0",
        rate_limit_key_prefix=redis_prefix,
        login_rate_per_account="3/minute",
        rate_limit_storage_timeout_seconds=0.5,
        rate_limit_storage_retry_seconds=0.2,
    )
    await auth.register("noor")
    await auth.login("noor")

    proxy.cut()
    for _ in range(3):  # counted afresh in this replica's memory: 3 more, then refused
        await auth.login("noor")
    assert await refused(auth, "noor") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metric(auth, "auth_rate_limit_shared") == 0
    assert metric(auth, "auth_rate_limit_storage_errors_total") >= 1
    [warning] = logs.events("auth.rate_limit_fallback")
    assert warning["limits"] == "per replica"

    proxy.restore()
    await auth.register("omar")
    async with asyncio.timeout(15):  # each login tries Redis again, at most every 0.2 s
        for _ in range(300):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await auth.login("omar")
            if metric(auth, "auth_rate_limit_shared") == 1:
                break
            await asyncio.sleep(0.05)
    assert logs.events("auth.rate_limit_shared")
    await auth.login("noor")  # Redis holds noor's one attempt from before the cut, not the replica's four
