"""Real PostgreSQL and Redis for the tests: the machine's own when they answer, else private ones.

The machine's servers are expected at 127.0.0.1:5432 (trust authentication, user ``postgres``) and
127.0.0.1:6379. Where one does not answer, a private server is started from the installed binaries in a
temporary directory, listening on a Unix socket only (no port to collide on), and stopped afterwards.

Every test run names its databases ``authtest_<run>_<n>`` and its Redis keys ``authtest:<run>:<n>:``;
each test gets a database and a key prefix of its own, dropped and deleted when it ends, and whatever a
crashed test left under the run's names goes when the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis

RUN = uuid.uuid4().hex[:8]
SYSTEM_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM_REDIS = "redis://127.0.0.1:6379/0"
_names = itertools.count(1)


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    pytest.fail(f"{name} not found: install PostgreSQL (Debian: postgresql) or run one at 127.0.0.1:5432")


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` account Debian's package creates."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@dataclass
class Postgres:
    """A PostgreSQL server: URLs of new databases on it."""

    host: str  # an address, or the directory of the Unix socket
    port: int
    created: list[str] = field(default_factory=list)

    def url(self, dbname: str) -> str:
        if self.host.startswith("/"):
            return f"postgresql://postgres@/{dbname}?host={self.host}&port={self.port}"
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def target(self) -> tuple[str, int]:
        """Where a TcpProxy reaches this server."""
        if self.host.startswith("/"):
            return f"{self.host}/.s.PGSQL.{self.port}", 0
        return self.host, self.port

    def terminate_backends(self, dbname: str) -> int:
        """End every connection to ``dbname`` (as a failover or an operator would); how many."""
        with self.admin() as connection:
            rows = connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchall()
        return len(rows)

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        name = f"authtest_{RUN}_{next(_names)}"
        with self.admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_run(self) -> None:
        with self.admin() as connection:
            rows = connection.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"authtest\\_{RUN}\\_%",)
            ).fetchall()
            for (name,) in rows:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _system_postgres() -> Postgres | None:
    try:
        with psycopg.connect(SYSTEM_POSTGRES, connect_timeout=3):
            return Postgres("127.0.0.1", 5432)
    except psycopg.OperationalError:
        return None


@contextlib.contextmanager
def _private_postgres(workdir: Path) -> Iterator[Postgres]:
    data, sockets = workdir / "data", workdir / "sockets"
    sockets.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run(
        _as_postgres_user([_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-k {sockets} -c listen_addresses='' -c fsync=off -c max_connections=200"
    ctl = _binary("pg_ctl")
    subprocess.run(
        _as_postgres_user([ctl, "-D", str(data), "-o", options, "-l", str(workdir / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield Postgres(str(sockets), 5432)
    finally:
        subprocess.run(
            _as_postgres_user([ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True, timeout=60
        )


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """The PostgreSQL server of this test session."""
    server = _system_postgres()
    with contextlib.ExitStack() as stack:
        if server is None:
            server = stack.enter_context(_private_postgres(tmp_path_factory.mktemp("postgres")))
        try:
            yield server
        finally:
            server.drop_run()


@pytest.fixture
def postgres_url(postgres: Postgres) -> Iterator[str]:
    """The URL of a new, empty database of this test's own (dropped afterwards)."""
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


@dataclass
class Redis:
    url: str  # redis://... or redis+unix://...
    client: redis.Redis
    socket: str = ""  # a private server's Unix socket

    def target(self) -> tuple[str, int]:
        """Where a TcpProxy reaches this server."""
        return (self.socket, 0) if self.socket else ("127.0.0.1", 6379)

    def delete_prefix(self, prefix: str) -> None:
        keys = list(self.client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            self.client.delete(*keys)


def _private_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    socket = workdir / "redis.sock"
    process = subprocess.Popen(
        [
            shutil.which("redis-server") or pytest.fail("redis-server not found: install it (Debian: redis-server)"),
            "--port",
            "0",
            "--unixsocket",
            str(socket),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"redis+unix://{socket}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    """The Redis server of this test session."""
    client = redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError:
        client.close()
        workdir = tmp_path_factory.mktemp("redis")
        process, url = _private_redis(workdir)
        client = redis.Redis(unix_socket_path=str(workdir / "redis.sock"))
        try:
            _wait_for_redis(client, process)
            yield Redis(url, client, str(workdir / "redis.sock"))
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=30)
        return
    server = Redis(SYSTEM_REDIS, client)
    try:
        yield server
    finally:
        server.delete_prefix(f"authtest:{RUN}:")
        client.close()


def _wait_for_redis(client: redis.Redis, process: subprocess.Popen[bytes]) -> None:
    """Ask until it answers: the socket appears once redis-server has started."""
    for _ in range(600):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited with {process.returncode}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)
    pytest.fail("redis-server did not answer within 30 s")


@pytest.fixture
def redis_prefix(redis_server: Redis) -> Iterator[str]:
    """A key prefix of this test's own (its keys deleted afterwards)."""
    prefix = f"authtest:{RUN}:{next(_names)}:"
    try:
        yield prefix
    finally:
        redis_server.delete_prefix(prefix)


class TcpProxy:
    """A loopback TCP proxy in front of a real server (host and port, or a Unix socket path and 0), to cut it off.

    ``cut()`` drops every open connection and refuses new ones (connections are accepted and closed at
    once, as a dead server's would fail); ``restore()`` forwards again. Port 0: ``port`` is the one bound.
    """

    def __init__(self, target_host: str, target_port: int):
        self._host, self._port = target_host, target_port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._port == 0:  # a Unix socket
            return await asyncio.open_unix_connection(self._host)
        return await asyncio.open_connection(self._host, self._port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        upstream_reader, upstream_writer = await self._connect()
        self._open.update((writer, upstream_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        self._open.difference_update((writer, upstream_writer))

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._open):
            writer.transport.abort()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[str, int], Awaitable[TcpProxy]]]:
    """Start proxies in front of real servers; all closed afterwards."""
    proxies: list[TcpProxy] = []

    async def start(host: str, port: int) -> TcpProxy:
        proxy = await TcpProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.close()
