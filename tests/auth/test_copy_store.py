"""``python -m services.auth copy-store``: from a live SQLite store to PostgreSQL, then served from there."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import grpc
from auth.v1 import auth_pb2 as pb

from services.auth import reasons
from tests.auth.conftest import bearer
from tests.auth.test_postgres import validate
from tests.rpc import details, rpc_error


def copy_store(data_dir, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTH_")}
    env["AUTH_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "services.auth", "copy-store", "--to", target, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_sqlite_store_moves_to_postgresql_and_serves_on(start_auth, postgres_url, tmp_path):
    old = await start_auth(lockout_threshold=2)
    await old.register("ada")
    tokens = await old.login("ada")
    await old.register("bob")
    for _ in range(2):
        await rpc_error(old.login("bob", "not the password at all"))  # bo is locked

    copied = copy_store(old.data_dir, postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert "MISMATCH" not in copied.stdout
    assert re.search(r"users\s+source\s+3\s+copied\s+3\s+target\s+3\s+ok", copied.stdout)  # with the admin
    assert re.search(r"login_failures\s+source\s+1\s+copied\s+1", copied.stdout)

    new = await start_auth(
        data_dir=tmp_path / "new",
        database_url=postgres_url,
        signing_key_file=old.data_dir / "signing_key.pem",  # the key the SQLite replica generated
        lockout_threshold=2,
    )
    assert (await validate(new, tokens.access_token)).username == "ada"  # its session came along
    await new.login("ada")
    error = await rpc_error(new.login("bob"))  # the lock came along
    assert "RetryInfo" in details(error)
    rotated = await new.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10)
    assert rotated.access_token
    admin = await new.admin_token()
    listed = await new.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=500), metadata=bearer(admin), timeout=10
    )
    ids = [int(event.event_id) for event in listed.events]
    assert ids == sorted(set(ids))  # the copied events kept their ids, and new ones number after them

    again = copy_store(old.data_dir, postgres_url)  # a second run refuses the non-empty target
    assert again.returncode == 2
    assert "is not empty" in again.stderr
    merged = copy_store(old.data_dir, postgres_url, "--into-non-empty")  # or adds only what it lacks
    assert merged.returncode == 0, merged.stderr
    assert re.search(r"audit_events\s+source\s+\d+\s+copied\s+0\s", merged.stdout)
    error = await rpc_error(new.stub.Logout(pb.LogoutRequest(), metadata=bearer("not a token"), timeout=10))
    assert details(error)["ErrorInfo"].reason == reasons.INVALID_TOKEN
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
