"""No secret in any log line: passwords, access and refresh tokens, reset tokens, authorization headers."""

from __future__ import annotations

import json
import subprocess
import sys

from auth.v1 import auth_pb2 as pb

from tests.auth.conftest import ADMIN, bearer
from tests.auth.test_reset import wait_for_outbox
from tests.rpc import rpc_error

PASSWORD = "secret-passphrase-one-a1b2"
NEW_PASSWORD = "secret-passphrase-two-c3d4"
RESET_PASSWORD = "secret-passphrase-three-e5f6"


async def test_no_secret_is_ever_logged(auth, logs):
    secrets = {PASSWORD, NEW_PASSWORD, RESET_PASSWORD, ADMIN[1]}
    await auth.register("leaky", PASSWORD)
    await rpc_error(auth.login("leaky", "wrong-" + PASSWORD))
    secrets.add("wrong-" + PASSWORD)
    first = await auth.login("leaky", PASSWORD)
    refreshed = await auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token), timeout=5)
    await rpc_error(auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token), timeout=5))
    second = await auth.login("leaky", PASSWORD)
    await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=second.access_token), timeout=5)
    await auth.stub.ChangePassword(
        pb.ChangePasswordRequest(current_password=PASSWORD, new_password=NEW_PASSWORD),
        metadata=bearer(second.access_token),
        timeout=10,
    )
    await auth.stub.RequestPasswordReset(pb.RequestPasswordResetRequest(email="leaky@example.com"), timeout=5)
    [reset_token] = await wait_for_outbox(auth, 1)
    await auth.stub.ResetPassword(pb.ResetPasswordRequest(token=reset_token, new_password=RESET_PASSWORD), timeout=10)
    third = await auth.login("leaky", RESET_PASSWORD)
    await auth.stub.Logout(pb.LogoutRequest(), metadata=bearer(third.access_token), timeout=5)
    admin = await auth.admin_token()
    await auth.stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=bearer(admin), timeout=5)
    await auth.stub.UnlockAccount(pb.UnlockAccountRequest(username="leaky"), metadata=bearer(admin), timeout=5)

    for response in (first, refreshed, second, third):
        secrets.update({response.access_token, response.refresh_token})
    secrets.update({reset_token, admin})
    text = "\n".join(json.dumps(line) for line in logs.lines)
    assert len(logs.lines) > 20
    leaked = [secret for secret in secrets if secret in text]
    assert not leaked
    assert "Bearer" not in text


def test_production_env_refuses_the_development_profile(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "services.auth"],
        env={"AUTH_ENV": "production", "AUTH_HASH_PROFILE": "development", "AUTH_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "AUTH_HASH_PROFILE=development is refused when AUTH_ENV=production" in done.stderr


def test_production_env_refuses_the_plaintext_outbox(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "services.auth"],
        env={"AUTH_ENV": "production", "AUTH_DATA_DIR": str(tmp_path), "AUTH_PORT": "0", "AUTH_METRICS_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "AUTH_SMTP_HOST is required when AUTH_ENV=production" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outbox.jsonl").exists()


def test_production_env_needs_a_signing_key(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "services.auth"],
        env={
            "AUTH_ENV": "production",
            "AUTH_SMTP_HOST": "smtp.example.com",
            "AUTH_DATA_DIR": str(tmp_path),
            "AUTH_PORT": "0",
            "AUTH_METRICS_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "AUTH_SIGNING_KEY" in done.stderr
    assert "Traceback" not in done.stderr
