"""Hostile and malformed input: INVALID_ARGUMENT with field violations, and nothing stored."""

from __future__ import annotations

import grpc
import pytest
from auth.v1 import auth_pb2 as pb

from tests.auth.conftest import PASSWORD
from tests.rpc import details, rpc_error, violations

MiB = 1024 * 1024

REGISTRATIONS = {
    "empty username": (pb.RegisterRequest(username="", email="a@example.com", password=PASSWORD), "username"),
    "long username": (pb.RegisterRequest(username="u" * 65, email="a@example.com", password=PASSWORD), "username"),
    "control char": (pb.RegisterRequest(username="bad\x00name", email="a@example.com", password=PASSWORD), "username"),
    "sql username": (
        pb.RegisterRequest(username="x'; DROP TABLE users;--", email="a@example.com", password=PASSWORD),
        "username",
    ),
    "sql email": (pb.RegisterRequest(username="sqlmail", email="a' OR '1'='1@example.com", password=PASSWORD), "email"),
    "empty email": (pb.RegisterRequest(username="noemail", email="", password=PASSWORD), "email"),
    "long email": (
        pb.RegisterRequest(username="longmail", email="a" * 250 + "@example.com", password=PASSWORD),
        "email",
    ),
    "empty password": (pb.RegisterRequest(username="nopass", email="a@example.com", password=""), "password"),
    "short password": (pb.RegisterRequest(username="shortpw", email="a@example.com", password="short"), "password"),
    "1 MiB password": (pb.RegisterRequest(username="hugepw", email="a@example.com", password="p" * MiB), "password"),
    "common password": (
        pb.RegisterRequest(username="commonpw", email="a@example.com", password="password1234"),
        "password",
    ),
    "password with username": (
        pb.RegisterRequest(username="victoria", email="a@example.com", password="victoria-rules-forever"),
        "password",
    ),
    "control char password": (
        pb.RegisterRequest(username="ctrlpw", email="a@example.com", password="pass\x07word-long-enough"),
        "password",
    ),
}


def users(auth) -> int:
    return auth.query("SELECT COUNT(*) AS n FROM users")[0]["n"]


@pytest.mark.parametrize("case", sorted(REGISTRATIONS))
async def test_bad_registration_is_refused_and_nothing_stored(auth, case):
    request, field = REGISTRATIONS[case]
    before = users(auth)
    error = await rpc_error(auth.stub.Register(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(error)
    if request.password:
        assert request.password not in (error.details() or "")
        assert all(request.password not in text for text in violations(error).values())
    assert users(auth) == before


@pytest.mark.parametrize(
    "request_",
    [
        pb.LoginRequest(username="", password=PASSWORD),
        pb.LoginRequest(username="someone", password=""),
        pb.LoginRequest(username="someone", password="p" * MiB),
        pb.LoginRequest(username="x' OR 1=1 --", password=PASSWORD),
    ],
)
async def test_bad_login_is_invalid_argument(auth, request_):
    error = await rpc_error(auth.stub.Login(request_, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error)


async def test_bad_tokens_are_invalid_argument(auth):
    for call in (
        auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=""), timeout=5),
        auth.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token="x" * 5000), timeout=5),
        auth.stub.ResetPassword(pb.ResetPasswordRequest(token="", new_password=PASSWORD), timeout=5),
        auth.stub.RequestPasswordReset(pb.RequestPasswordResetRequest(email="not an address"), timeout=5),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_invalid_utf8_is_invalid_argument(auth):
    # RegisterRequest with field 1 (username) holding bytes that are not UTF-8.
    raw = b"\x0a\x02\xff\xfe" + pb.RegisterRequest(email="a@example.com", password=PASSWORD).SerializeToString()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{auth.server.port}")
    try:
        call = channel.unary_unary("/auth.v1.AuthService/Register")
        error = await rpc_error(call(raw, timeout=5))
    finally:
        await channel.close()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error)
    assert users(auth) == 1  # the bootstrap admin only


async def test_reserved_usernames_cannot_be_registered(start_auth):
    auth = await start_auth(reserved_usernames="admin,root,Support")
    for name in ("admin", "ROOT", "support", "\uff21\uff44\uff4d\uff49\uff4e"):  # case and width (NFKC) folded
        error = await rpc_error(
            auth.stub.Register(
                pb.RegisterRequest(username=name, email=f"{abs(hash(name))}@example.com", password=PASSWORD), timeout=5
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(error) == {"username": "is reserved; choose another"}
        assert details(error)["ErrorInfo"].reason == "USERNAME_RESERVED"
    assert await auth.register("administrator2")  # not on this list
