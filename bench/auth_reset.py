"""Whether RequestPasswordReset's latency tells a registered e-mail address from an unknown one.

Both answer OK; the answer waits for the same step for both (one read) and the write transaction (the reset
token with its audit event, or the audit event alone) and the mail follow in the background. This measures
what a caller sees: one real auth server (``build_server`` with ``AuthSettings`` through
:func:`bench.auth_login.serve`, default production hash profile, SQLite in a fresh temporary directory, the
outbox file as mail transport) in its own process, called over gRPC on loopback, ``time.perf_counter``
around each RPC. Requests for registered and unknown addresses are interleaved, the order alternating, at
concurrency 1; the unknown address is the baseline.

A second measurement times the two write transactions alone, in this process on a fresh
:class:`~services.auth.sqlite_store.SqliteStore`: ``create_reset_token`` with its audit event (registered)
vs ``append_audit`` (unknown), interleaved the same way.

    python -m bench.auth_reset                 # the measurement
    python -m bench.auth_reset serve NAME      # the server (used by the measurement)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from auth.v1 import auth_pb2

from bench.auth_login import Server, serve
from bench.harness import quantile

SERVERS = {"reset": {"hash_profile": "production"}}
SAMPLES = 400  # of each kind
ADDRESSES = 8  # addresses of each kind, taking SAMPLES / ADDRESSES requests each
WARM_UP = 20  # of each kind, not counted
STORE_SAMPLES = 2000  # of each kind, for the write transactions alone


async def _request(server: Server, email: str) -> float:
    """Seconds taken by one RequestPasswordReset (which must answer OK)."""
    start = time.perf_counter()
    await server.stub.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email), timeout=30)
    return time.perf_counter() - start


async def _oracle(server: Server) -> None:
    known = [f"reset-known-{i}" for i in range(ADDRESSES)]
    for user in known:
        await server.register(user)
    known_emails = [f"{user}@example.com" for user in known]
    ghost_emails = [f"reset-ghost-{i}@example.com" for i in range(ADDRESSES)]  # never registered
    for i in range(WARM_UP):
        await _request(server, known_emails[i % ADDRESSES])
        await _request(server, ghost_emails[i % ADDRESSES])
    registered: list[float] = []
    unknown: list[float] = []
    for i in range(SAMPLES):
        pair = (known_emails[i % ADDRESSES], ghost_emails[i % ADDRESSES])
        if i % 2:  # alternate which goes first
            unknown.append(await _request(server, pair[1]))
            registered.append(await _request(server, pair[0]))
        else:
            registered.append(await _request(server, pair[0]))
            unknown.append(await _request(server, pair[1]))
    known_p50, unknown_p50 = statistics.median(registered), statistics.median(unknown)
    known_p90, unknown_p90 = quantile(registered, 0.9), quantile(unknown, 0.9)
    print("## Auth password reset: registered vs unknown e-mail address (concurrency 1)\n")
    print(
        "| samples each | registered p50 ms | unknown p50 ms | registered/unknown p50"
        " | registered p90 ms | unknown p90 ms | registered/unknown p90 |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {SAMPLES} | {known_p50 * 1e3:.2f} | {unknown_p50 * 1e3:.2f} | {known_p50 / unknown_p50:.3f}"
        f" | {known_p90 * 1e3:.2f} | {unknown_p90 * 1e3:.2f} | {known_p90 / unknown_p90:.3f} |"
    )
    print()


async def _writes() -> None:
    from services.auth.sqlite_store import SqliteStore
    from services.auth.store import AuditEvent, ResetToken, User
    from services.auth.tokens import new_opaque_token, token_digest

    with tempfile.TemporaryDirectory(prefix="bench-auth-reset-store-") as data_dir:
        store = SqliteStore(Path(data_dir) / "auth.db")
        await store.open()
        try:
            users = [
                User(str(uuid.uuid4()), f"store-{i}", f"store-{i}@example.com", "-", "argon2", ("user",), time.time())
                for i in range(ADDRESSES)
            ]
            for user in users:
                await store.create_user(user)

            async def registered(user: User) -> float:
                now = time.time()
                token = ResetToken(token_digest(new_opaque_token()), user.id, now, now + 1800)
                event = AuditEvent("PASSWORD_RESET_REQUESTED", now, "success", user.id, user.username)
                start = time.perf_counter()
                await store.create_reset_token(token, event)
                return time.perf_counter() - start

            async def unknown() -> float:
                event = AuditEvent("PASSWORD_RESET_REQUESTED", time.time(), "failure", reason="unknown_email")
                start = time.perf_counter()
                await store.append_audit(event)
                return time.perf_counter() - start

            known_writes: list[float] = []
            unknown_writes: list[float] = []
            for i in range(WARM_UP + STORE_SAMPLES):
                user = users[i % ADDRESSES]
                if i % 2:  # alternate which goes first
                    alone = await unknown()
                    with_token = await registered(user)
                else:
                    with_token = await registered(user)
                    alone = await unknown()
                if i >= WARM_UP:
                    known_writes.append(with_token)
                    unknown_writes.append(alone)
        finally:
            await store.close()
    known_p50, unknown_p50 = statistics.median(known_writes), statistics.median(unknown_writes)
    print("## Auth password reset: the write transaction alone (SqliteStore in-process)\n")
    print("| samples each | token + event p50 us | event alone p50 us | difference us | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| {STORE_SAMPLES} | {known_p50 * 1e6:.0f} | {unknown_p50 * 1e6:.0f}"
        f" | {(known_p50 - unknown_p50) * 1e6:.0f} | {known_p50 / unknown_p50:.2f} |"
    )
    print()


async def main() -> None:
    server = Server("reset", module="bench.auth_reset")
    try:
        server.connect()
        await _oracle(server)
        await _writes()
    finally:
        if hasattr(server, "channel"):
            await server.close()
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"the reset auth server did not stop cleanly (exit code {code})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve(sys.argv[2], SERVERS[sys.argv[2]]))
    else:
        asyncio.run(main())
