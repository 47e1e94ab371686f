"""Each change and the audit event that records it commit in one transaction, or neither does.

A real SQLite trigger, created by the test beside the service's own append-only triggers, makes the insert
of one event type fail. The RPC whose change that event records must then fail (INTERNAL) and leave the
change undone too: no new password, no revoked session, no counted failure, no lifted lock. Once the trigger
is dropped, the same call succeeds and leaves the change and its event.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import grpc
import pytest
from auth.v1 import auth_pb2 as pb

from tests.auth.conftest import PASSWORD, bearer
from tests.auth.test_abuse import WRONG, metric
from tests.auth.test_legacy import LEGACY_PASSWORD, cli, unsalted
from tests.auth.test_reset import NEW, request_reset, wait_for_outbox
from tests.rpc import details, rpc_error


@contextlib.contextmanager
def audit_refused(auth, event_type: str, outcome: str = "") -> Iterator[None]:
    """While inside, the database refuses to append ``event_type`` events (of ``outcome``, if given)."""
    assert event_type.isidentifier()
    assert outcome in ("", "success", "failure")
    condition = f"NEW.event_type = '{event_type}'" + (f" AND NEW.outcome = '{outcome}'" if outcome else "")
    writer = sqlite3.connect(auth.data_dir / "auth.db")
    try:
        with writer:
            writer.execute(
                f"CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events WHEN {condition}"
                " BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
            )
        yield
        with writer:
            writer.execute("DROP TRIGGER refuse_audit")
    finally:
        writer.close()


async def internal(call) -> None:
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INTERNAL, error.details()
    assert "audit refused" not in (error.details() or "")  # the cause goes to the log only


def audited(auth, event_type: str, username: str) -> list[sqlite3.Row]:
    return auth.query(
        "SELECT * FROM audit_events WHERE event_type = ? AND username = ? AND outcome = 'success' ORDER BY id",
        event_type,
        username,
    )


def failures(auth, username: str) -> tuple[int, float | None] | None:
    rows = auth.query("SELECT failed_count, locked_until FROM login_failures WHERE username = ?", username)
    return (rows[0]["failed_count"], rows[0]["locked_until"]) if rows else None


def password_hash(auth, username: str) -> tuple[str, str]:
    [row] = auth.query("SELECT hash_scheme, password_hash FROM users WHERE username = ?", username)
    return row["hash_scheme"], row["password_hash"]


async def valid(auth, access_token: str) -> bool:
    try:
        await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=access_token), timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return False
    return True


async def test_a_password_change_commits_with_its_event(auth, logs):
    await auth.register("amos")
    here, elsewhere = await auth.login("amos"), await auth.login("amos")
    before = password_hash(auth, "amos")

    def change():
        request = pb.ChangePasswordRequest(current_password=PASSWORD, new_password=NEW)
        return auth.stub.ChangePassword(request, metadata=bearer(here.access_token), timeout=10)

    with audit_refused(auth, "PASSWORD_CHANGED", "success"):
        await internal(change())
    assert password_hash(auth, "amos") == before
    assert await valid(auth, elsewhere.access_token)
    assert not audited(auth, "PASSWORD_CHANGED", "amos")

    await change()
    assert password_hash(auth, "amos") != before
    assert not await valid(auth, elsewhere.access_token)
    assert await valid(auth, here.access_token)
    [event] = audited(auth, "PASSWORD_CHANGED", "amos")
    assert event["details"] == '{"sessions_revoked": "1"}'
    [line] = [line for line in logs.events("audit") if line["event_type"] == "PASSWORD_CHANGED"]
    assert line["audit_id"] == event["id"]


async def test_a_reset_commits_with_its_event(auth):
    await auth.register("bella")
    session = await auth.login("bella")
    for _ in range(2):
        await rpc_error(auth.login("bella", WRONG))
    await request_reset(auth, "bella@example.com")
    [token] = await wait_for_outbox(auth, 1)
    before = password_hash(auth, "bella")

    def reset():
        return auth.stub.ResetPassword(pb.ResetPasswordRequest(token=token, new_password=NEW), timeout=10)

    with audit_refused(auth, "PASSWORD_RESET_COMPLETED", "success"):
        await internal(reset())
    assert [row["used_at"] for row in auth.query("SELECT used_at FROM reset_tokens")] == [None]
    assert password_hash(auth, "bella") == before
    assert await valid(auth, session.access_token)
    assert failures(auth, "bella") == (2, None)
    assert not audited(auth, "PASSWORD_RESET_COMPLETED", "bella")

    await reset()  # the same token: the refused attempt did not use it
    assert password_hash(auth, "bella") != before
    assert not await valid(auth, session.access_token)
    assert failures(auth, "bella") is None
    [event] = audited(auth, "PASSWORD_RESET_COMPLETED", "bella")
    assert event["details"] == '{"sessions_revoked": "1"}'
    assert (await auth.login("bella", NEW)).access_token


@pytest.mark.parametrize("username", ["carla", "no-such-user"])
async def test_a_failed_login_is_counted_with_its_event(auth, username):
    await auth.register("carla")
    with audit_refused(auth, "LOGIN_FAILED"):
        await internal(auth.login(username, WRONG))
    assert failures(auth, username) is None
    assert not auth.query("SELECT id FROM audit_events WHERE event_type = 'LOGIN_FAILED'")

    assert (await rpc_error(auth.login(username, WRONG))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert failures(auth, username) == (1, None)
    assert len(auth.query("SELECT id FROM audit_events WHERE event_type = 'LOGIN_FAILED'")) == 1


async def test_a_lockout_commits_with_its_event(auth):
    await auth.register("dora")
    for _ in range(4):
        await rpc_error(auth.login("dora", WRONG))
    with audit_refused(auth, "ACCOUNT_LOCKED"):
        await internal(auth.login("dora", WRONG))
    assert failures(auth, "dora") == (4, None)  # the fifth failure was not counted, nor did it lock
    assert len(auth.query("SELECT id FROM audit_events WHERE event_type = 'LOGIN_FAILED'")) == 4
    assert metric(auth.server, "auth_lockouts_total") == 0

    assert (await rpc_error(auth.login("dora", WRONG))).code() == grpc.StatusCode.UNAUTHENTICATED
    count, locked_until = failures(auth, "dora")
    assert count == 5
    assert locked_until is not None
    assert len(audited(auth, "ACCOUNT_LOCKED", "dora")) == 1
    assert "RetryInfo" in details(await rpc_error(auth.login("dora", PASSWORD)))


async def test_a_successful_login_commits_with_its_event(auth):
    user_id = await auth.register("edna")
    await rpc_error(auth.login("edna", WRONG))
    with audit_refused(auth, "LOGIN_SUCCEEDED"):
        await internal(auth.login("edna"))
    assert not auth.query("SELECT id FROM sessions WHERE user_id = ?", user_id)
    assert failures(auth, "edna") == (1, None)

    assert await valid(auth, (await auth.login("edna")).access_token)
    assert len(auth.query("SELECT id FROM sessions WHERE user_id = ?", user_id)) == 1
    assert failures(auth, "edna") is None
    assert len(audited(auth, "LOGIN_SUCCEEDED", "edna")) == 1


async def test_a_logout_commits_with_its_event(auth):
    await auth.register("fred")
    session = await auth.login("fred")

    def logout():
        return auth.stub.Logout(pb.LogoutRequest(), metadata=bearer(session.access_token), timeout=5)

    with audit_refused(auth, "LOGGED_OUT"):
        await internal(logout())
    assert await valid(auth, session.access_token)

    await logout()
    assert not await valid(auth, session.access_token)
    assert len(audited(auth, "LOGGED_OUT", "fred")) == 1


async def test_a_refresh_rotates_with_its_event(auth):
    await auth.register("gina")
    session = await auth.login("gina")

    def refresh():
        return auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=session.refresh_token), timeout=5)

    with audit_refused(auth, "TOKEN_REFRESHED"):
        await internal(refresh())
    assert [row["rotated_at"] for row in auth.query("SELECT rotated_at FROM refresh_tokens")] == [None]

    refreshed = await refresh()  # not rotated by the refused call, so not a reuse now
    assert await valid(auth, refreshed.access_token)
    assert len(audited(auth, "TOKEN_REFRESHED", "gina")) == 1


async def test_a_refresh_reuse_revokes_with_its_event(auth):
    user_id = await auth.register("hugo")
    first = await auth.login("hugo")
    second = await auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token), timeout=5)

    def reuse():
        return auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token), timeout=5)

    with audit_refused(auth, "REFRESH_REUSE_DETECTED"):
        await internal(reuse())
    assert await valid(auth, second.access_token)

    assert (await rpc_error(reuse())).code() == grpc.StatusCode.UNAUTHENTICATED
    assert not await valid(auth, second.access_token)
    events = auth.query("SELECT user_id FROM audit_events WHERE event_type = 'REFRESH_REUSE_DETECTED'")
    assert [row["user_id"] for row in events] == [user_id]


async def test_a_hash_migration_commits_with_its_event(start_auth, tmp_path):
    data_dir = tmp_path / "legacy"
    users = tmp_path / "users.jsonl"
    users.write_text(f'{{"username": "ida", "email": "ida@example.com", "hash": "{unsalted(LEGACY_PASSWORD)}"}}\n')
    assert cli(data_dir, "import-users", str(users)).returncode == 0
    auth = await start_auth(data_dir=data_dir)
    before = password_hash(auth, "ida")
    assert before[0] == "sha256"

    with audit_refused(auth, "LEGACY_HASH_MIGRATED"):
        await internal(auth.login("ida", LEGACY_PASSWORD))
    assert password_hash(auth, "ida") == before

    assert (await auth.login("ida", LEGACY_PASSWORD)).access_token
    assert password_hash(auth, "ida")[0] == "argon2"
    [event] = audited(auth, "LEGACY_HASH_MIGRATED", "ida")
    assert event["details"] == '{"from": "sha256", "to": "argon2"}'


async def test_an_unlock_commits_with_its_event(auth):
    await auth.register("jack")
    for _ in range(5):
        await rpc_error(auth.login("jack", WRONG))
    admin = await auth.admin_token()

    def unlock():
        return auth.stub.UnlockAccount(pb.UnlockAccountRequest(username="jack"), metadata=bearer(admin), timeout=5)

    with audit_refused(auth, "ACCOUNT_UNLOCKED"):
        await internal(unlock())
    count, locked_until = failures(auth, "jack")
    assert count == 5
    assert locked_until is not None
    assert "RetryInfo" in details(await rpc_error(auth.login("jack", PASSWORD)))

    await unlock()
    assert failures(auth, "jack") is None
    assert (await auth.login("jack")).access_token
    assert len(audited(auth, "ACCOUNT_UNLOCKED", "jack")) == 1
