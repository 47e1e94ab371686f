"""What a login costs on the real auth service: argon2id profiles, rate-limited rejections, unknown users.

Each auth server (``build_server`` with ``AuthSettings``, SQLite in a fresh temporary directory, two hash
threads, rate limits far out of reach unless measured) runs in its own process; the client talks gRPC over
loopback and times every RPC with ``time.perf_counter``. Three measurements:

1. Logins/s and p50/p99 latency of successful logins under the ``production`` and ``development`` hash
   profiles, the two servers driven alternately round by round (throughput is the median round).
2. A login rejected by the per-account rate limit (RESOURCE_EXHAUSTED, no hash) vs a successful login (one
   argon2id verify), interleaved on a third, production-profile server whose per-account limit is tiny.
3. Unknown username (dummy verify) vs wrong password (real verify), interleaved, production profile.

    python -m bench.auth_login                 # the measurements
    python -m bench.auth_login serve PROFILE   # one server (used by the measurements)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from auth.v1 import auth_pb2, auth_pb2_grpc

from bench.harness import quantile

PASSWORD = "a perfectly fine passphrase"  # noqa: S105  (the benchmark accounts' password)
WRONG_PASSWORD = "not the right passphrase"  # noqa: S105
UNLIMITED = "1000000/minute"
LOCKOUT_THRESHOLD = 100  # the highest AuthSettings accepts

# 1. throughput
CONCURRENCY = (1, 8)
ROUNDS = 5
LOGINS_PER_ROUND = {"production": {1: 32, 8: 80}, "development": {1: 300, 8: 480}}
# 2. rate-limited rejection: on the "limited" server every username may try LIMITED_PER_ACCOUNT times a minute
LIMITED_PER_ACCOUNT = 10
LIMITED_USERS = 8  # accounts sharing the successful logins, each staying under the limit
LIMITED_SAMPLES = 64  # of each kind
# 3. unknown user vs wrong password
ENUM_SAMPLES = 200  # of each kind
ENUM_NAMES = 4  # usernames of each kind, taking ENUM_SAMPLES / ENUM_NAMES failures each (< LOCKOUT_THRESHOLD)

SERVERS = {
    "production": {"hash_profile": "production"},
    "development": {"hash_profile": "development"},
    "limited": {"hash_profile": "production", "login_rate_per_account": f"{LIMITED_PER_ACCOUNT}/minute"},
}


async def serve(name: str, overrides: dict[str, Any]) -> None:
    """One auth server with ``overrides`` (bench/auth_reset.py starts its own through this too)."""
    from services.auth import AuthSettings, build_server

    with tempfile.TemporaryDirectory(prefix=f"bench-auth-{name}-") as data_dir:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "grace_seconds": 1.0,
            "data_dir": Path(data_dir),
            "hash_workers": 2,
            "login_rate_per_ip": UNLIMITED,
            "login_rate_per_account": UNLIMITED,
            "lockout_threshold": LOCKOUT_THRESHOLD,
            **overrides,
        }
        server = await build_server(AuthSettings(**values))
        await server.start()
        try:
            print(json.dumps({"port": server.port, "metrics_port": server.metrics_port}), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
        finally:
            await server.stop()


class Server:
    """One auth server process (``python -m MODULE serve NAME``) and a channel to it."""

    def __init__(self, name: str, module: str = "bench.auth_login", args: Sequence[str] = ()) -> None:
        self.name = name
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", module, "serve", name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def connect(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} auth server did not start (exit code {self.process.wait()})")
        ports = json.loads(line)
        self.metrics_port: int = ports["metrics_port"]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['port']}")
        self.stub = auth_pb2_grpc.AuthServiceStub(self.channel)

    async def register(self, username: str) -> None:
        request = auth_pb2.RegisterRequest(username=username, email=f"{username}@example.com", password=PASSWORD)
        await self.stub.Register(request, timeout=30)

    async def login(self, username: str, password: str = PASSWORD) -> float:
        """Seconds taken by one successful login."""
        request = auth_pb2.LoginRequest(username=username, password=password)
        start = time.perf_counter()
        response = await self.stub.Login(request, timeout=30)
        elapsed = time.perf_counter() - start
        assert response.access_token
        return elapsed

    async def refused(self, username: str, password: str, code: grpc.StatusCode) -> float:
        """Seconds taken by one login that must fail with ``code``."""
        request = auth_pb2.LoginRequest(username=username, password=password)
        start = time.perf_counter()
        try:
            await self.stub.Login(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            elapsed = time.perf_counter() - start
            if error.code() != code:
                raise
            return elapsed
        raise AssertionError(f"login of {username!r} succeeded, expected {code.name}")

    def hash_totals(self) -> tuple[float, float]:
        """(seconds, count) of every hash/verify so far, from the server's ``auth_hash_seconds`` histogram."""
        connection = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        values = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("auth_hash_seconds_"))
        return float(values["auth_hash_seconds_sum"]), float(values["auth_hash_seconds_count"])

    async def close(self) -> None:
        await self.channel.close()

    def stop(self) -> int:
        """Close its stdin (the server stops cleanly) and wait; the exit code."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=30)


async def _drive(login: Callable[[], Awaitable[float]], concurrency: int, calls: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            latencies.append(await login())

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


async def _throughput(servers: dict[str, Server]) -> None:
    profiles = ("production", "development")
    for name in profiles:
        await servers[name].register("bench-user")
        await _drive(lambda s=servers[name]: s.login("bench-user"), 2, 8)  # warm up channel, pool, caches
    print("## Auth login: successful logins, production vs development argon2id profile\n")
    print(
        "| concurrency | production logins/s | development logins/s | production/development"
        " | production p50/p99 ms | development p50/p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for concurrency in CONCURRENCY:
        rates: dict[str, list[float]] = {name: [] for name in profiles}
        lat: dict[str, list[float]] = {name: [] for name in profiles}
        for _ in range(ROUNDS):
            for name in profiles:
                server = servers[name]
                calls = LOGINS_PER_ROUND[name][concurrency]
                rate, latencies = await _drive(lambda s=server: s.login("bench-user"), concurrency, calls)
                rates[name].append(rate)
                lat[name].extend(latencies)
        production, development = (statistics.median(rates[name]) for name in profiles)
        cells = [f"{_ms(quantile(lat[n], 0.5))} / {_ms(quantile(lat[n], 0.99))}" for n in profiles]
        print(
            f"| {concurrency} | {production:.1f} | {development:.1f} | {production / development:.3f}"
            f" | {cells[0]} | {cells[1]} |"
        )
    print()


async def _rejection(server: Server) -> None:
    users = [f"limited-{i}" for i in range(LIMITED_USERS)]
    for user in ["throttled", *users]:
        await server.register(user)
    for _ in range(LIMITED_PER_ACCOUNT):  # use up the allowance of "throttled" (and warm up)
        await server.login("throttled")
    rejected: list[float] = []
    logins: list[float] = []
    hash_before = server.hash_totals()
    for i in range(LIMITED_SAMPLES):
        rejected.append(await server.refused("throttled", PASSWORD, grpc.StatusCode.RESOURCE_EXHAUSTED))
        logins.append(await server.login(users[i % LIMITED_USERS]))
    hash_after = server.hash_totals()
    hash_mean = (hash_after[0] - hash_before[0]) / (hash_after[1] - hash_before[1])
    rejected_p50, login_p50 = statistics.median(rejected), statistics.median(logins)
    print("## Auth login: rate-limited rejection vs successful login (production profile, concurrency 1)\n")
    print(
        "| samples each | rejected p50 ms | login p50 ms | server argon2id verify mean ms"
        " | rejection/login | rejection/verify |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {LIMITED_SAMPLES} | {_ms(rejected_p50)} | {_ms(login_p50)} | {_ms(hash_mean)}"
        f" | {rejected_p50 / login_p50:.3f} | {rejected_p50 / hash_mean:.3f} |"
    )
    print()


async def _enumeration(server: Server) -> None:
    known = [f"enum-known-{i}" for i in range(ENUM_NAMES)]
    ghosts = [f"enum-ghost-{i}" for i in range(ENUM_NAMES)]  # never registered
    for user in known:
        await server.register(user)
    unknown: list[float] = []
    wrong: list[float] = []
    code = grpc.StatusCode.UNAUTHENTICATED
    await server.refused("enum-warm-up", WRONG_PASSWORD, code)  # the first dummy verify also computes its hash
    for i in range(ENUM_SAMPLES):
        ghost, user = ghosts[i % ENUM_NAMES], known[i % ENUM_NAMES]
        if i % 2:  # alternate which goes first
            unknown.append(await server.refused(ghost, WRONG_PASSWORD, code))
            wrong.append(await server.refused(user, WRONG_PASSWORD, code))
        else:
            wrong.append(await server.refused(user, WRONG_PASSWORD, code))
            unknown.append(await server.refused(ghost, WRONG_PASSWORD, code))
    unknown_p50, wrong_p50 = statistics.median(unknown), statistics.median(wrong)
    print("## Auth login: unknown username vs wrong password (production profile, concurrency 1)\n")
    print(
        "| samples each | unknown-user p50 ms | wrong-password p50 ms | unknown/wrong"
        " | unknown-user p90 ms | wrong-password p90 ms |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {ENUM_SAMPLES} | {_ms(unknown_p50)} | {_ms(wrong_p50)} | {unknown_p50 / wrong_p50:.3f}"
        f" | {_ms(quantile(unknown, 0.9))} | {_ms(quantile(wrong, 0.9))} |"
    )
    print()


async def main() -> None:
    servers = {name: Server(name) for name in SERVERS}  # start together, then wait for each port
    try:
        for server in servers.values():
            server.connect()
        await _throughput(servers)
        await _rejection(servers["limited"])
        await _enumeration(servers["production"])
    finally:
        failed = []
        for server in servers.values():
            if hasattr(server, "channel"):
                await server.close()
            if server.stop() != 0:
                failed.append(server.name)
    if failed:
        raise RuntimeError(f"auth server(s) {failed} did not stop cleanly")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve(sys.argv[2], SERVERS[sys.argv[2]]))
    else:
        asyncio.run(main())
