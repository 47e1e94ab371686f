"""Accounts, login, tokens and sessions on a real auth server with real SQLite."""

from __future__ import annotations

import grpc
import jwt
from auth.v1 import auth_pb2 as pb
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.auth.conftest import PASSWORD, bearer
from tests.rpc import details, rpc_error


async def test_register_login_validate(auth):
    user_id = await auth.register("alice")
    tokens = await auth.login("alice")
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in_seconds == 900
    assert tokens.refresh_token
    assert tokens.access_token
    header = jwt.get_unverified_header(tokens.access_token)
    assert header["alg"] == "EdDSA"
    assert header["kid"]
    claims = await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=tokens.access_token), timeout=5)
    assert (claims.user_id, claims.username, list(claims.roles)) == (user_id, "alice", ["user"])
    assert claims.session_id
    assert claims.expires_at.seconds > 0


async def test_usernames_are_case_insensitive(auth):
    await auth.register("Bob.Smith")
    assert (await auth.login("bob.smith")).access_token
    error = await rpc_error(auth.register("BOB.SMITH", email="other@example.com"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_duplicate_email_is_refused(auth):
    await auth.register("carol", email="carol@example.com")
    error = await rpc_error(auth.register("carol2", email="CAROL@example.com"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_logout_revokes_the_session_at_once(auth):
    await auth.register("dave")
    tokens = await auth.login("dave")
    await auth.stub.Logout(pb.LogoutRequest(), metadata=bearer(tokens.access_token), timeout=5)
    error = await rpc_error(
        auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=tokens.access_token), timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    refreshed = await rpc_error(
        auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=5)
    )
    assert refreshed.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_logout_needs_a_bearer_token(auth):
    error = await rpc_error(auth.stub.Logout(pb.LogoutRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(error)["ErrorInfo"].reason == "MISSING_TOKEN"


async def test_refresh_rotates_and_reuse_revokes_the_family(auth):
    await auth.register("erin")
    first = await auth.login("erin")
    second = await auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token), timeout=5)
    assert second.refresh_token != first.refresh_token
    claims = await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=second.access_token), timeout=5)
    # The stolen first token comes back: the whole session ends.
    reuse = await rpc_error(
        auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token), timeout=5)
    )
    assert reuse.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in (second.refresh_token,):
        error = await rpc_error(auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=token), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await rpc_error(
        auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=second.access_token), timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    [row] = auth.query("SELECT revoked_reason FROM sessions WHERE id = ?", claims.session_id)
    assert row["revoked_reason"] == "refresh_reuse"
    events = [r["event_type"] for r in auth.query("SELECT event_type FROM audit_events ORDER BY id")]
    assert "REFRESH_REUSE_DETECTED" in events


async def test_expired_access_token_is_refused(auth, clock):
    await auth.register("frank")
    tokens = await auth.login("frank")
    clock.advance(900 + 60)
    error = await rpc_error(
        auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=tokens.access_token), timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_forged_and_malformed_tokens_are_refused(auth, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await auth.register("grace")
    tokens = await auth.login("grace")
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    header = jwt.get_unverified_header(tokens.access_token)
    forged = jwt.encode(
        {**claims, "roles": ["user", "admin"]},
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": header["kid"]},
    )
    for token in (forged, "not-a-token", tokens.access_token[:-4] + "AAAA"):
        error = await rpc_error(auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=token), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, token


async def test_change_password_needs_the_current_one_and_ends_other_sessions(auth):
    await auth.register("heidi")
    here = await auth.login("heidi")
    elsewhere = await auth.login("heidi")
    wrong = await rpc_error(
        auth.stub.ChangePassword(
            pb.ChangePasswordRequest(current_password="not the password at all", new_password="a brand new passphrase"),
            metadata=bearer(here.access_token),
            timeout=10,
        )
    )
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
    await auth.stub.ChangePassword(
        pb.ChangePasswordRequest(current_password=PASSWORD, new_password="a brand new passphrase"),
        metadata=bearer(here.access_token),
        timeout=10,
    )
    await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=here.access_token), timeout=5)
    error = await rpc_error(
        auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=elsewhere.access_token), timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await rpc_error(auth.login("heidi"))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await auth.login("heidi", "a brand new passphrase")).access_token


async def test_a_restart_loses_no_account_session_or_audit_event(start_auth):
    first = await start_auth()
    await first.register("ivan")
    tokens = await first.login("ivan")
    audit_before = len(first.query("SELECT id FROM audit_events"))
    await first.server.stop()

    second = await start_auth()
    assert (await second.login("ivan")).access_token
    claims = await second.stub.ValidateToken(pb.ValidateTokenRequest(access_token=tokens.access_token), timeout=5)
    assert claims.username == "ivan"
    refreshed = await second.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=5)
    assert refreshed.access_token
    assert len(second.query("SELECT id FROM audit_events")) > audit_before
    assert second.query("SELECT MAX(version) AS v FROM schema_migrations")[0]["v"] == 1


async def test_database_is_in_wal_mode(auth):
    assert auth.query("PRAGMA journal_mode")[0][0] == "wal"


async def test_tokens_with_absurd_time_claims_are_unauthenticated_everywhere(start_auth, clock):
    """Signed with the service's real key: exp or iat of 10**400 once crashed validation (INTERNAL)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    auth = await start_auth(signing_key=pem.decode())
    await auth.register("zoe")
    genuine = (await auth.login("zoe")).access_token
    header = jwt.get_unverified_header(genuine)
    claims = jwt.decode(genuine, options={"verify_signature": False})
    for claim in ("exp", "iat"):
        forged = jwt.encode({**claims, claim: 10**400}, key, algorithm="EdDSA", headers={"kid": header["kid"]})
        calls = (
            auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=forged), timeout=5),
            auth.stub.Logout(pb.LogoutRequest(), metadata=bearer(forged), timeout=5),
            auth.stub.ChangePassword(
                pb.ChangePasswordRequest(current_password=PASSWORD, new_password="another fine passphrase"),
                metadata=bearer(forged),
                timeout=5,
            ),
        )
        for call in calls:
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (claim, error.details())
    padded = await rpc_error(auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=genuine + "=="), timeout=5))
    assert padded.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await auth.stub.ValidateToken(pb.ValidateTokenRequest(access_token=genuine), timeout=5)).username == "zoe"
