"""Legacy SHA-256 accounts: import, login with silent migration, and wrapping at rest (real CLI)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.auth.test_abuse import metric

LEGACY_PASSWORD = "legacy users had passwords too"


def unsalted(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def salted(password: str, salt: str = "s4lt") -> str:
    return f"sha256${salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def cli(data_dir, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    environment.update({"AUTH_DATA_DIR": str(data_dir), "AUTH_HASH_PROFILE": "development", **env})
    return subprocess.run(
        [sys.executable, "-m", "services.auth", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def legacy_file(tmp_path):
    path = tmp_path / "users.jsonl"
    records = [
        {"username": "old.plain", "email": "plain@example.com", "hash": unsalted(LEGACY_PASSWORD), "roles": ["user"]},
        {"username": "old.salted", "email": "salted@example.com", "hash": salted(LEGACY_PASSWORD), "roles": ["user"]},
        {"username": "bad line", "email": "x@example.com", "hash": "zzz", "roles": ["user"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def hashes(auth) -> dict[str, tuple[str, str]]:
    return {r["username"]: (r["hash_scheme"], r["password_hash"]) for r in auth.query("SELECT * FROM users")}


async def test_imported_legacy_users_log_in_and_migrate(start_auth, tmp_path, legacy_file):
    data_dir = tmp_path / "auth"
    imported = cli(data_dir, "import-users", str(legacy_file))
    assert imported.returncode == 1  # one line refused
    assert "imported 2, skipped 1" in imported.stdout
    assert "line 3" in imported.stderr

    auth = await start_auth(data_dir=data_dir)
    assert hashes(auth)["old.plain"][0] == "sha256"
    assert metric(auth.server, 'auth_password_hashes{scheme="sha256"}') == 1
    for name in ("old.plain", "old.salted"):
        assert (await auth.login(name, LEGACY_PASSWORD)).access_token
        scheme, stored = hashes(auth)[name]
        assert scheme == "argon2"
        assert stored.startswith("$argon2id$")
    assert metric(auth.server, 'auth_password_hashes{scheme="sha256"}') == 0
    events = [r["event_type"] for r in auth.query("SELECT event_type FROM audit_events")]
    assert events.count("LEGACY_HASH_MIGRATED") == 2
    # Migrated once: the next login does not migrate again.
    assert (await auth.login("old.plain", LEGACY_PASSWORD)).access_token
    events = [r["event_type"] for r in auth.query("SELECT event_type FROM audit_events")]
    assert events.count("LEGACY_HASH_MIGRATED") == 2


async def test_wrapped_legacy_hashes_log_in_and_migrate(start_auth, tmp_path, legacy_file):
    data_dir = tmp_path / "auth"
    cli(data_dir, "import-users", str(legacy_file))
    wrapped = cli(data_dir, "wrap-legacy")
    assert wrapped.returncode == 0, wrapped.stderr
    assert "wrapped 2" in wrapped.stdout

    auth = await start_auth(data_dir=data_dir)
    stored = hashes(auth)
    for name in ("old.plain", "old.salted"):
        scheme, value = stored[name]
        assert scheme == "argon2_sha256_wrapped"
        assert not any(len(part) == 64 for part in value.split("$"))  # no fast hash left at rest
    assert metric(auth.server, 'auth_password_hashes{scheme="argon2_sha256_wrapped"}') == 2
    assert (await auth.login("old.salted", LEGACY_PASSWORD)).access_token
    assert hashes(auth)["old.salted"][0] == "argon2"


async def test_create_user_admin_from_the_cli(start_auth, tmp_path):
    data_dir = tmp_path / "auth"
    done = cli(
        data_dir,
        "create-user",
        "root.admin",
        "--email",
        "root@example.com",
        "--admin",
        AUTH_NEW_USER_PASSWORD="an admin passphrase for the cli",
    )
    assert done.returncode == 0, done.stderr
    auth = await start_auth(data_dir=data_dir)
    tokens = await auth.login("root.admin", "an admin passphrase for the cli")
    from auth.v1 import auth_pb2 as pb

    claims = await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=tokens.access_token), timeout=5)
    assert set(claims.roles) == {"user", "admin"}


def test_cli_refuses_a_weak_password(tmp_path):
    done = cli(tmp_path / "auth", "create-user", "weak.one", "--email", "w@example.com", AUTH_NEW_USER_PASSWORD="short")
    assert done.returncode == 1
    assert "password" in done.stderr
