"""``auth.v1.AuthService``: protobuf in, :class:`AuthCore`, protobuf out.

Transport facts are settled here and nowhere else: the bearer token comes from the
``authorization`` metadata, and the client IP is the peer address, or the ``x-forwarded-for``
value when the peer is a trusted proxy (the gateway).
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
from collections.abc import Sequence

import grpc
from auth.v1 import auth_pb2 as pb
from auth.v1 import auth_pb2_grpc
from google.protobuf import timestamp_pb2

from services.auth import reasons
from services.auth.core import AuthCore, Caller, TokenPair
from services.auth.store import AuditEvent, AuditQuery
from services.common.errors import InvalidArgument
from services.common.peer import peer_ip

_EVENT_PREFIX = "AUDIT_EVENT_TYPE_"


class ClientIdentity:
    """Reads the caller's IP and bearer token from a call."""

    def __init__(self, trusted_proxies: Sequence[str]):
        self._trusted = [ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies]

    def _trusted_peer(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        ip = peer_ip(context.peer() or "")
        forwarded = metadata.get("x-forwarded-for", "")
        if forwarded and self._trusted_peer(ip):
            candidate = forwarded.split(",")[-1].strip()  # the hop our trusted proxy added
            with contextlib.suppress(ValueError):  # not an IP: keep the peer's
                ip = str(ipaddress.ip_address(candidate))
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        return Caller(client_ip=ip, bearer=bearer)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _tokens(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "expires_in_seconds": pair.expires_in_seconds,
        "token_type": "Bearer",
        "refresh_expires_in_seconds": pair.refresh_expires_in_seconds,
    }


def _page_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode()


def _after_id(page_token: str) -> int:
    if not page_token:
        return 0
    try:
        prefix, _, value = base64.urlsafe_b64decode(page_token.encode()).decode().partition(":")
        if prefix != "after" or not value.isdigit():
            raise ValueError(page_token)
        return int(value)
    except ValueError:
        raise InvalidArgument(
            "the page token is invalid",
            [("page_token", "is not a token from a previous page")],
            reason=reasons.PAGE_TOKEN_INVALID,
        ) from None


def _event(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        event_id=str(event.id),
        event_type=pb.AuditEventType.Value(_EVENT_PREFIX + event.event_type),
        occurred_at=_timestamp(event.occurred_at),
        user_id=event.user_id,
        username=event.username,
        client_ip=event.client_ip,
        trace_id=event.trace_id,
        outcome=pb.AUDIT_OUTCOME_SUCCESS if event.outcome == "success" else pb.AUDIT_OUTCOME_FAILURE,
        reason=event.reason,
        details=event.details,
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, core: AuthCore, identity: ClientIdentity):
        self._core = core
        self._identity = identity

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterResponse:
        caller = self._identity.caller(context)
        user_id = await self._core.register(caller, request.username, request.email, request.password)
        return pb.RegisterResponse(user_id=user_id)

    async def Login(self, request: pb.LoginRequest, context: grpc.aio.ServicerContext) -> pb.LoginResponse:
        pair = await self._core.login(self._identity.caller(context), request.username, request.password)
        return pb.LoginResponse(**_tokens(pair))  # type: ignore[arg-type]

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshTokenResponse:
        pair = await self._core.refresh(self._identity.caller(context), request.refresh_token)
        return pb.RefreshTokenResponse(**_tokens(pair))  # type: ignore[arg-type]

    async def Logout(self, request: pb.LogoutRequest, context: grpc.aio.ServicerContext) -> pb.LogoutResponse:
        await self._core.logout(self._identity.caller(context))
        return pb.LogoutResponse()

    async def ValidateToken(
        self, request: pb.ValidateTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidateTokenResponse:
        claims = await self._core.authenticate(request.access_token)
        return pb.ValidateTokenResponse(
            user_id=claims.user_id,
            username=claims.username,
            roles=list(claims.roles),
            session_id=claims.session_id,
            expires_at=_timestamp(claims.expires_at),
        )

    async def ChangePassword(
        self, request: pb.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChangePasswordResponse:
        caller = self._identity.caller(context)
        await self._core.change_password(caller, request.current_password, request.new_password)
        return pb.ChangePasswordResponse()

    async def RequestPasswordReset(
        self, request: pb.RequestPasswordResetRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestPasswordResetResponse:
        await self._core.request_password_reset(self._identity.caller(context), request.email)
        return pb.RequestPasswordResetResponse()

    async def ResetPassword(
        self, request: pb.ResetPasswordRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetPasswordResponse:
        await self._core.reset_password(self._identity.caller(context), request.token, request.new_password)
        return pb.ResetPasswordResponse()

    async def UnlockAccount(
        self, request: pb.UnlockAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnlockAccountResponse:
        await self._core.unlock_account(self._identity.caller(context), request.username)
        return pb.UnlockAccountResponse()

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        caller = self._identity.caller(context)
        if request.page_size < 0:
            raise InvalidArgument(
                "the audit query is invalid",
                [("page_size", "must not be negative")],
                reason=reasons.PAGE_SIZE_OUT_OF_RANGE,
            )
        event_types = []
        for value in request.event_types:
            name = pb.AuditEventType.Name(value) if value in pb.AuditEventType.values() else ""
            if not name or value == pb.AUDIT_EVENT_TYPE_UNSPECIFIED:
                raise InvalidArgument(
                    "the audit query is invalid",
                    [("event_types", f"unknown event type {value}")],
                    reason=reasons.UNKNOWN_EVENT_TYPE,
                )
            event_types.append(name.removeprefix(_EVENT_PREFIX))
        query = AuditQuery(
            page_size=request.page_size,
            after_id=_after_id(request.page_token),
            user_id=request.user_id,
            username=request.username.lower(),
            event_types=tuple(event_types),
            start_time=request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else None,
            end_time=request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else None,
        )
        events = await self._core.list_audit_events(caller, query)
        page_size = query.page_size or len(events)
        next_token = _page_token(events[-1].id) if events and len(events) >= page_size else ""
        return pb.ListAuditEventsResponse(events=[_event(event) for event in events], next_page_token=next_token)
