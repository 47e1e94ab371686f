"""Every error auth answers with names a specific, documented ErrorInfo reason.

docs/errors.md lists exactly the reasons of ``services.auth.reasons`` (and of ``services.inference.reasons``);
each auth reason is produced here by a real call to a real auth server; and auth's sources raise no error
without a reason from that module.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from auth.v1 import auth_pb2 as pb

from services.auth import reasons
from services.common import errors
from services.inference import reasons as inference_reasons
from tests.auth.conftest import PASSWORD, AuthClient, bearer
from tests.conftest import REPO
from tests.rpc import details, rpc_error, violations

CATALOGUE = REPO / "docs" / "errors.md"
MiB = 1024 * 1024


def documented() -> dict[str, list[tuple[str, str]]]:
    """(reason, code) of each row of each `| reason | code | meaning |` table in docs/errors.md, by section."""
    sections: dict[str, list[tuple[str, str]]] = {}
    section, in_table = "", False
    for line in CATALOGUE.read_text().splitlines():
        if line.startswith("## "):
            section, in_table = line[3:].strip(), False
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if [cell.lower() for cell in cells] == ["reason", "code", "meaning"]:
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        assert len(cells) == 3, f"docs/errors.md: a row needs 3 cells (no '|' in the text): {line}"
        reason = cells[0].strip("`")
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", reason), f"docs/errors.md: not a reason: {cells[0]}"
        assert cells[1] in grpc.StatusCode.__members__, f"docs/errors.md: {reason}: unknown code {cells[1]!r}"
        sections.setdefault(section, []).append((reason, cells[1]))
    return sections


@pytest.mark.parametrize(("section", "module"), [("auth", reasons), ("inference", inference_reasons)])
def test_the_catalogue_lists_exactly_the_reasons_of_the_code(section, module):
    rows = [reason for reason, _ in documented()[section]]
    assert len(rows) == len(set(rows)), f"docs/errors.md ## {section}: a reason twice"
    assert len(module.ALL) == len(set(module.ALL)), f"{module.__name__}.ALL: a reason twice"
    assert set(rows) - set(module.ALL) == set(), f"documented, not in {module.__name__}.ALL"
    assert set(module.ALL) - set(rows) == set(), f"in {module.__name__}.ALL, not documented in docs/errors.md"


def test_every_reason_constant_is_in_all():
    constants = {value for name, value in vars(reasons).items() if name.isupper() and isinstance(value, str)}
    assert constants == set(reasons.ALL)


ERROR_CLASSES = {
    name
    for name in errors.__all__
    if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), errors.ServiceError)
}


def test_auth_raises_no_error_without_a_listed_reason():
    """Each ServiceError auth builds passes ``reason=`` (never a string literal: a constant of reasons), and every
    ``reasons.X`` auth's code names is a listed reason that some code uses."""
    used: set[str] = set()
    for path in sorted((REPO / "services" / "auth").glob("*.py")):
        if path.name == "reasons.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"services/auth/{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "reasons":
                assert node.attr in reasons.__all__, f"{where}: reasons.{node.attr} is not a listed reason"
                used.add(getattr(reasons, node.attr))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERROR_CLASSES:
                reason = next((keyword.value for keyword in node.keywords if keyword.arg == "reason"), None)
                assert reason is not None, f"{where}: {node.func.id}(...) without reason="
                assert not isinstance(reason, ast.Constant), f"{where}: a literal reason; use services.auth.reasons"
    assert used == set(reasons.ALL), f"listed but never raised: {set(reasons.ALL) - used}"


# -- every reason over real gRPC -------------------------------------------------------------------------------


@dataclass
class Accounts:
    auth: AuthClient
    user: pb.LoginResponse  # a session of "rhea", whose password is PASSWORD
    admin: str  # an admin's access token

    @property
    def stub(self) -> Any:
        return self.auth.stub


Call = Callable[[Accounts], Awaitable[Any]]


def register(username: str = "newcomer", email: str = "newcomer@example.com", password: str = PASSWORD) -> Call:
    return lambda c: c.stub.Register(pb.RegisterRequest(username=username, email=email, password=password), timeout=10)


def login(username: str = "rhea", password: str = PASSWORD) -> Call:
    return lambda c: c.stub.Login(pb.LoginRequest(username=username, password=password), timeout=10)


def change_password(current: str = PASSWORD, new: str = "a new and better passphrase") -> Call:
    request = pb.ChangePasswordRequest(current_password=current, new_password=new)
    return lambda c: c.stub.ChangePassword(request, metadata=bearer(c.user.access_token), timeout=10)


def refresh(token: str) -> Call:
    return lambda c: c.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=token), timeout=5)


def reset(token: str, new: str = PASSWORD) -> Call:
    return lambda c: c.stub.ResetPassword(pb.ResetPasswordRequest(token=token, new_password=new), timeout=10)


def request_reset(email: str) -> Call:
    return lambda c: c.stub.RequestPasswordReset(pb.RequestPasswordResetRequest(email=email), timeout=5)


def audit(**fields: Any) -> Call:
    request = pb.ListAuditEventsRequest(**fields)
    return lambda c: c.stub.ListAuditEvents(request, metadata=bearer(c.admin), timeout=5)


def unlock(username: str, token: Callable[[Accounts], str] = lambda c: c.admin) -> Call:
    request = pb.UnlockAccountRequest(username=username)
    return lambda c: c.stub.UnlockAccount(request, metadata=bearer(token(c)), timeout=5)


async def logged_out(c: Accounts) -> Any:
    session = await c.stub.Login(pb.LoginRequest(username="rhea", password=PASSWORD), timeout=10)
    await c.stub.Logout(pb.LogoutRequest(), metadata=bearer(session.access_token), timeout=5)
    return await c.stub.ValidateToken(pb.ValidateTokenRequest(access_token=session.access_token), timeout=5)


# (reason, the field BadRequest names or "" for no BadRequest, the call), one or more per reason
CASES = [
    pytest.param(reasons.FIELD_REQUIRED, "username", register(username=""), id="register-no-username"),
    pytest.param(reasons.FIELD_REQUIRED, "email", register(email=""), id="register-no-email"),
    pytest.param(reasons.FIELD_REQUIRED, "password", register(password=""), id="register-no-password"),
    pytest.param(reasons.FIELD_REQUIRED, "password", login(password=""), id="login-no-password"),
    pytest.param(reasons.FIELD_REQUIRED, "current_password", change_password(current=""), id="change-no-current"),
    pytest.param(reasons.FIELD_REQUIRED, "refresh_token", refresh(""), id="refresh-no-token"),
    pytest.param(reasons.FIELD_REQUIRED, "token", reset(""), id="reset-no-token"),
    pytest.param(reasons.FIELD_REQUIRED, "email", request_reset(""), id="request-reset-no-email"),
    pytest.param(reasons.FIELD_TOO_LONG, "username", register(username="u" * 65), id="long-username"),
    pytest.param(reasons.FIELD_TOO_LONG, "email", register(email="a" * 250 + "@example.com"), id="long-email"),
    pytest.param(reasons.USERNAME_INVALID, "username", register(username="bad\x00name"), id="register-username"),
    pytest.param(reasons.USERNAME_INVALID, "username", login(username="x' OR 1=1 --"), id="login-username"),
    pytest.param(reasons.USERNAME_INVALID, "username", unlock("no"), id="unlock-username"),
    pytest.param(reasons.USERNAME_RESERVED, "username", register(username="admin"), id="reserved"),
    pytest.param(reasons.EMAIL_INVALID, "email", register(email="a' OR '1'='1@example.com"), id="register-email"),
    pytest.param(reasons.EMAIL_INVALID, "email", request_reset("not an address"), id="request-reset-email"),
    pytest.param(reasons.TOKEN_MALFORMED, "refresh_token", refresh("x" * 5000), id="refresh-token"),
    pytest.param(reasons.TOKEN_MALFORMED, "token", reset("not a token"), id="reset-token"),
    pytest.param(reasons.PASSWORD_TOO_SHORT, "password", register(password="short"), id="register-short"),
    pytest.param(reasons.PASSWORD_TOO_SHORT, "new_password", change_password(new="short"), id="change-short"),
    pytest.param(reasons.PASSWORD_TOO_LONG, "password", register(password="p" * MiB), id="register-long"),
    pytest.param(reasons.PASSWORD_TOO_LONG, "password", login(password="p" * 129), id="login-long"),
    pytest.param(
        reasons.PASSWORD_INVALID_CHARACTERS,
        "password",
        register(password="pass\x07word-long-enough"),
        id="register-bel",
    ),
    pytest.param(reasons.PASSWORD_INVALID_CHARACTERS, "password", login(password="pass\tword"), id="login-tab"),
    pytest.param(reasons.PASSWORD_TOO_COMMON, "password", register(password="password1234"), id="common"),
    pytest.param(
        reasons.PASSWORD_CONTAINS_USERNAME,
        "password",
        register(username="victoria", password="victoria-rules-forever"),
        id="contains-username",
    ),
    pytest.param(
        reasons.WRONG_CURRENT_PASSWORD, "current_password", change_password(current="not the password"), id="wrong"
    ),
    pytest.param(reasons.RESET_TOKEN_INVALID, "token", reset("a" * 43), id="unknown-reset-token"),
    pytest.param(reasons.PAGE_SIZE_OUT_OF_RANGE, "page_size", audit(page_size=-1), id="negative-page-size"),
    pytest.param(reasons.PAGE_SIZE_OUT_OF_RANGE, "page_size", audit(page_size=100000), id="huge-page-size"),
    pytest.param(reasons.PAGE_TOKEN_INVALID, "page_token", audit(page_token="garbage!"), id="page-token"),
    pytest.param(reasons.UNKNOWN_EVENT_TYPE, "event_types", audit(event_types=[999]), id="event-type"),
    pytest.param(reasons.INVALID_CREDENTIALS, "", login(password="not the password"), id="credentials"),
    pytest.param(reasons.MISSING_TOKEN, "", lambda c: c.stub.Logout(pb.LogoutRequest(), timeout=5), id="missing-token"),
    pytest.param(
        reasons.INVALID_TOKEN,
        "",
        lambda c: c.stub.ValidateToken(pb.ValidateTokenRequest(access_token="not-a-token"), timeout=5),
        id="invalid-token",
    ),
    pytest.param(reasons.SESSION_REVOKED, "", logged_out, id="session-revoked"),
    pytest.param(reasons.INVALID_REFRESH_TOKEN, "", refresh("a" * 43), id="refresh-unknown"),
    pytest.param(reasons.ADMIN_REQUIRED, "", unlock("rhea", token=lambda c: c.user.access_token), id="admin"),
    pytest.param(reasons.ACCOUNT_NOT_FOUND, "", unlock("nobody-at-all"), id="account-not-found"),
    pytest.param(reasons.ALREADY_EXISTS, "", register(username="rhea", email="rhea2@example.com"), id="exists"),
]
CODES = dict(documented()["auth"])


@pytest.fixture
async def accounts(auth: AuthClient) -> Accounts:
    await auth.register("rhea")
    return Accounts(auth, await auth.login("rhea"), await auth.admin_token())


@pytest.mark.parametrize(("reason", "field", "call"), CASES)
async def test_each_refusal_names_its_reason(accounts: Accounts, reason: str, field: str, call: Call) -> None:
    error = await rpc_error(call(accounts))
    info = details(error)["ErrorInfo"]
    assert (error.code().name, info.reason, info.domain) == (CODES[reason], reason, "auth")
    if field:
        assert field in violations(error)
        assert violations(error)[field]  # BadRequest keeps its description


async def test_login_limits_name_their_reason(start_auth):
    auth = await start_auth(login_rate_per_account="1/minute")
    await auth.register("sven")
    await auth.login("sven")
    error = await rpc_error(auth.login("sven"))
    assert (error.code(), details(error)["ErrorInfo"].reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reasons.RESOURCE_EXHAUSTED,
    )
    assert "RetryInfo" in details(error)


def test_every_documented_auth_reason_has_a_case():
    # the rate limit and a store outage: tests of their own (above, and tests/auth/test_postgres_outage.py)
    covered = {param.values[0] for param in CASES} | {reasons.RESOURCE_EXHAUSTED, reasons.STORE_UNAVAILABLE}
    assert covered == {reason for reason, _ in documented()["auth"]}


async def test_several_violations_take_the_reason_of_the_first(auth: AuthClient) -> None:
    request = pb.RegisterRequest(username="", email="not an address", password="short")
    error = await rpc_error(auth.stub.Register(request, timeout=10))
    assert details(error)["ErrorInfo"].reason == reasons.FIELD_REQUIRED
    assert set(violations(error)) == {"username", "email", "password"}


async def test_an_undecodable_request_has_the_chassis_reason(auth: AuthClient) -> None:
    # RegisterRequest with field 1 (username) holding bytes that are not UTF-8.
    raw = b"\x0a\x02\xff\xfe" + pb.RegisterRequest(email="a@example.com", password=PASSWORD).SerializeToString()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{auth.server.port}")
    try:
        error = await rpc_error(channel.unary_unary("/auth.v1.AuthService/Register")(raw, timeout=5))
    finally:
        await channel.close()
    [(reason, code)] = documented()["Every service"]
    assert (error.code().name, details(error)["ErrorInfo"].reason) == (code, reason)
