"""What the store costs auth: SQLite vs PostgreSQL, one replica vs two (issue 14).

Real auth servers (``build_server`` with ``AuthSettings`` through :func:`bench.auth_login.serve`, the
``development`` hash profile so that the store, not argon2id, is what is measured, two hash threads, rate limits
far out of reach), each in its own process, called over gRPC on loopback; every figure is ``time.perf_counter``
around a real RPC. The configurations:

Every configuration counts login attempts in the machine's Redis (one limiter for all, so the store is the
difference), except the two marked "limits in memory":

- ``SQLite x1``: one server on a SQLite file (the baseline);
- ``SQLite x1, limits in memory``: the same with the login limits in process memory (``make run``'s shape);
- ``SQLite x2 (one file)``: two server processes on one SQLite file (one machine only);
- ``PostgreSQL x1``: one server on PostgreSQL;
- ``PostgreSQL x1, no commit flush``: the same on sessions with ``synchronous_commit=off``, to tell the WAL
  flush at each commit (SQLite's WAL mode with ``synchronous=NORMAL`` does not fsync at commit) from the rest;
- ``PostgreSQL x1, limits in memory``: one server on PostgreSQL with the login limits in process memory;
- ``PostgreSQL x2``: two replicas on one database, one Redis and one signing key (the deployed shape).

1. Register + Login: each pair registers a new account and logs it in; with two servers the pair registers on
   one and logs in on the other (alternating), so every login reads what the other replica wrote. The
   configurations take turns round by round (the order rotating); pairs/s is the median round, p50/p99 pool every
   round's RPCs. Ratios are against ``SQLite x1`` in the same run.
2. ValidateToken (a signature check and one session read) on PostgreSQL vs SQLite, one server each, interleaved
   the same way.

The machine's PostgreSQL (127.0.0.1:5432, trust authentication, user ``postgres``) and Redis (127.0.0.1:6379)
are used, in a database and a key prefix of this run's own, dropped and deleted at the end. A configuration whose
server is not there is left out, and the output says so.

    python -m bench.auth_stores                         # the measurements
    python -m bench.auth_stores serve NAME SETTINGS     # one server (used by the measurements)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auth.v1 import auth_pb2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.auth_login import PASSWORD, Server, serve
from bench.harness import quantile

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

# 1. Register + Login
CONCURRENCY = (1, 16)
ROUNDS = 6
PAIRS_PER_ROUND = {1: 40, 16: 128}
# 2. ValidateToken
VALIDATE_CONCURRENCY = (1, 16)
VALIDATE_ROUNDS = 6
VALIDATIONS_PER_ROUND = {1: 200, 16: 512}
WARM_UP = 16  # pairs (or validations) per server before the first round, not counted


@dataclass
class Configuration:
    label: str
    servers: list[str]  # names in the run's server table; two = balanced as described above
    needs: set[str] = field(default_factory=set)  # "postgres", "redis"


# Every configuration counts login attempts in Redis (when it answers) but those marked "limits in memory": the
# same limiter for all, so that the store is the difference.
CONFIGURATIONS = [
    Configuration("SQLite x1", ["sqlite-a"]),
    Configuration("SQLite x1, limits in memory", ["sqlite-memory"], {"redis"}),
    Configuration("SQLite x2 (one file)", ["sqlite-a", "sqlite-b"]),
    Configuration("PostgreSQL x1", ["pg-a"], {"postgres"}),
    Configuration("PostgreSQL x1, no commit flush", ["pg-no-flush"], {"postgres"}),
    Configuration("PostgreSQL x1, limits in memory", ["pg-memory"], {"postgres", "redis"}),
    Configuration("PostgreSQL x2", ["pg-a", "pg-b"], {"postgres"}),
]
BASELINE = CONFIGURATIONS[0].label


def _reachable() -> dict[str, str | None]:
    """{"postgres": version or None, "redis": version or None}: what answers on this machine."""
    import psycopg
    import redis

    found: dict[str, str | None] = {"postgres": None, "redis": None}
    try:
        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3) as connection:
            row = connection.execute("SHOW server_version").fetchone()
            found["postgres"] = str(row[0]) if row else "?"
    except psycopg.Error:
        pass
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
        found["redis"] = str(client.info("server")["redis_version"])
        client.close()
    except redis.RedisError:
        pass
    return found


@contextmanager
def _postgres_database(available: bool) -> Iterator[str | None]:
    """A database of this run's own (its URL), dropped afterwards; None without PostgreSQL."""
    if not available:
        yield None
        return
    import psycopg

    name = f"bench_auth_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f"CREATE DATABASE {name}")  # a generated identifier, not input
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def _redis_prefix(available: bool) -> Iterator[str | None]:
    """A key prefix of this run's own, its keys deleted afterwards; None without Redis."""
    if not available:
        yield None
        return
    import redis

    prefix = f"bench-auth-{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _server_settings(workdir: Path, database: str | None, prefix: str | None) -> dict[str, dict[str, Any]]:
    """Each server's AuthSettings overrides (the ones whose stores are missing are left out)."""
    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    memory: dict[str, Any] = {"hash_profile": "development", "signing_key": key.decode()}
    limits = (
        memory if prefix is None else {**memory, "rate_limit_storage_uri": REDIS_URL, "rate_limit_key_prefix": prefix}
    )
    sqlite = f"sqlite:///{workdir / 'auth.db'}"  # absolute: sqlite:////tmp/...
    servers: dict[str, dict[str, Any]] = {
        "sqlite-a": {**limits, "database_url": sqlite},
        "sqlite-b": {**limits, "database_url": sqlite},
        "sqlite-memory": {**memory, "database_url": sqlite},
    }
    if database is not None:
        servers["pg-a"] = {**limits, "database_url": database}
        servers["pg-b"] = {**limits, "database_url": database}
        # What a commit's WAL flush costs: the same server on sessions with synchronous_commit off (SQLite's WAL
        # mode with synchronous=NORMAL does not fsync at commit either).
        servers["pg-no-flush"] = {**limits, "database_url": f"{database}?options=-csynchronous_commit%3Doff"}
        servers["pg-memory"] = {**memory, "database_url": database}
    return servers


class _Names:
    """Fresh usernames, unique over the run."""

    def __init__(self) -> None:
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"bench-{next(self._count)}"


async def _pairs(
    servers: list[Server], names: _Names, concurrency: int, pairs: int
) -> tuple[float, list[float], list[float]]:
    """Run ``pairs`` Register + Login pairs at ``concurrency``; (pairs/s, Register latencies, Login latencies)."""
    registers: list[float] = []
    logins: list[float] = []
    turn = itertools.count()

    async def pair() -> None:
        n = next(turn)
        on, then = servers[n % len(servers)], servers[(n + 1) % len(servers)]
        username = names()
        request = auth_pb2.RegisterRequest(username=username, email=f"{username}@example.com", password=PASSWORD)
        start = time.perf_counter()
        await on.stub.Register(request, timeout=30)
        registers.append(time.perf_counter() - start)
        logins.append(await then.login(username))

    async def worker(count: int) -> None:
        for _ in range(count):
            await pair()

    start = time.perf_counter()
    await asyncio.gather(*(worker(pairs // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(registers) / elapsed, registers, logins


async def _validations(server: Server, token: str, concurrency: int, calls: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    request = auth_pb2.ValidateTokenRequest(access_token=token)

    async def worker(count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            response = await server.stub.ValidateToken(request, timeout=30)
            latencies.append(time.perf_counter() - start)
            assert response.user_id

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), latencies


def _rotations(items: list[Any], rounds: int) -> Iterator[list[Any]]:
    """``items`` in a different order each round (each first once every len(items) rounds)."""
    for r in range(rounds):
        shift = r % len(items)
        yield items[shift:] + items[:shift]


def _ms(values: list[float], q: float) -> str:
    return f"{quantile(values, q) * 1e3:.2f}"


async def _register_login(configurations: list[Configuration], servers: dict[str, Server]) -> None:
    names = _Names()
    for configuration in configurations:
        await _pairs([servers[name] for name in configuration.servers], names, 2, WARM_UP)
    print("## Auth stores: Register + Login, SQLite vs PostgreSQL, one replica vs two (development hash profile)\n")
    print(
        f"| concurrency | configuration | pairs/s | pairs/s vs {BASELINE} | Register p50/p99 ms | Login p50/p99 ms"
        f" | p99 vs {BASELINE} (Register / Login) |"
    )
    print("|---|---|---|---|---|---|---|")
    for concurrency in CONCURRENCY:
        rates: dict[str, list[float]] = {c.label: [] for c in configurations}
        registers: dict[str, list[float]] = {c.label: [] for c in configurations}
        logins: dict[str, list[float]] = {c.label: [] for c in configurations}
        for order in _rotations(configurations, ROUNDS):
            for configuration in order:
                rate, register, login = await _pairs(
                    [servers[name] for name in configuration.servers], names, concurrency, PAIRS_PER_ROUND[concurrency]
                )
                rates[configuration.label].append(rate)
                registers[configuration.label].extend(register)
                logins[configuration.label].extend(login)
        base_rate = statistics.median(rates[BASELINE])
        base_register, base_login = quantile(registers[BASELINE], 0.99), quantile(logins[BASELINE], 0.99)
        for configuration in configurations:
            label = configuration.label
            rate = statistics.median(rates[label])
            register, login = registers[label], logins[label]
            print(
                f"| {concurrency} | {label} | {rate:.0f} | {rate / base_rate:.2f}"
                f" | {_ms(register, 0.5)} / {_ms(register, 0.99)} | {_ms(login, 0.5)} / {_ms(login, 0.99)}"
                f" | {quantile(register, 0.99) / base_register:.2f} / {quantile(login, 0.99) / base_login:.2f} |"
            )
    print()


async def _validate(servers: dict[str, Server]) -> None:
    stores = {"SQLite": servers["sqlite-a"], "PostgreSQL": servers["pg-a"]}
    tokens: dict[str, str] = {}
    for label, server in stores.items():
        username = f"validate-{label.lower()}"
        await server.register(username)
        request = auth_pb2.LoginRequest(username=username, password=PASSWORD)
        tokens[label] = (await server.stub.Login(request, timeout=30)).access_token
        await _validations(server, tokens[label], 2, WARM_UP)
    print("## Auth stores: ValidateToken, PostgreSQL vs SQLite (one server each)\n")
    print(
        "| concurrency | SQLite calls/s | PostgreSQL calls/s | PostgreSQL/SQLite | SQLite p50/p99 ms"
        " | PostgreSQL p50/p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for concurrency in VALIDATE_CONCURRENCY:
        rates: dict[str, list[float]] = {label: [] for label in stores}
        latencies: dict[str, list[float]] = {label: [] for label in stores}
        for order in _rotations(list(stores), VALIDATE_ROUNDS):
            for label in order:
                rate, values = await _validations(
                    stores[label], tokens[label], concurrency, VALIDATIONS_PER_ROUND[concurrency]
                )
                rates[label].append(rate)
                latencies[label].extend(values)
        sqlite, postgres = statistics.median(rates["SQLite"]), statistics.median(rates["PostgreSQL"])
        print(
            f"| {concurrency} | {sqlite:.0f} | {postgres:.0f} | {postgres / sqlite:.2f}"
            f" | {_ms(latencies['SQLite'], 0.5)} / {_ms(latencies['SQLite'], 0.99)}"
            f" | {_ms(latencies['PostgreSQL'], 0.5)} / {_ms(latencies['PostgreSQL'], 0.99)} |"
        )
    print()


async def _measure(settings: dict[str, dict[str, Any]], found: set[str]) -> None:
    configurations = [c for c in CONFIGURATIONS if all(name in settings for name in c.servers) and c.needs <= found]
    used = {name for c in configurations for name in c.servers}
    servers = {name: Server(name, "bench.auth_stores", [json.dumps(settings[name])]) for name in sorted(used)}
    try:
        for server in servers.values():
            server.connect()
        await _register_login(configurations, servers)
        if "pg-a" in servers:
            await _validate(servers)
    finally:
        failed = []
        for server in servers.values():
            if hasattr(server, "channel"):
                await server.close()
            if server.stop() != 0:
                failed.append(server.name)
    if failed:
        raise RuntimeError(f"auth server(s) {failed} did not stop cleanly")


async def main() -> None:
    found = _reachable()
    print(
        f"Auth stores on this machine: {os.cpu_count()} cores shared by the client, the auth servers and the stores;"
        f" PostgreSQL {found['postgres'] or 'NOT REACHABLE at 127.0.0.1:5432'},"
        f" Redis {found['redis'] or 'NOT REACHABLE at 127.0.0.1:6379'}.\n"
    )
    missing = [
        f"{c.label} (needs {', '.join(sorted(need for need in c.needs if not found[need]))})"
        for c in CONFIGURATIONS
        if any(not found[need] for need in c.needs)
    ]
    if missing:
        print(f"**Left out, their store is not there:** {'; '.join(missing)}.\n")
    if not found["redis"]:
        print("**Every configuration counts login attempts in memory** (per process): Redis is not there.\n")
    with (
        tempfile.TemporaryDirectory(prefix="bench-auth-stores-") as workdir,
        _postgres_database(found["postgres"] is not None) as database,
        _redis_prefix(found["redis"] is not None) as prefix,
    ):
        await _measure(_server_settings(Path(workdir), database, prefix), {k for k, v in found.items() if v})


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve(sys.argv[2], json.loads(sys.argv[3])))
    else:
        asyncio.run(main())
