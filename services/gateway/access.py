"""Who may call what through the gateway, and checking the caller's token with auth.

Tokens are checked by auth's ValidateToken, so a revoked session (logout, password change,
reset) is refused as soon as auth knows. A small cache keeps the answer for
``GATEWAY_TOKEN_CACHE_SECONDS`` (at most 5 s): that is the longest a revoked token can still
pass the gateway. Only successful validations are cached, keyed by a digest of the token.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from auth.v1 import auth_pb2, auth_pb2_grpc

from services.common.client import outgoing_timeout
from services.common.errors import PermissionDenied, Unauthenticated, Unavailable


class Access(enum.Enum):
    OPEN = "open"  # no token needed
    USER = "user"  # any valid token
    ADMIN = "admin"  # a valid token with the admin role


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    username: str
    roles: tuple[str, ...]
    session_id: str


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class TokenValidator:
    def __init__(
        self,
        stub: auth_pb2_grpc.AuthServiceStub,
        *,
        cache_seconds: float,
        cache_size: int,
        default_timeout: float,
        margin: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._stub = stub
        self._ttl = cache_seconds
        self._size = cache_size
        self._default_timeout = default_timeout
        self._margin = margin
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    async def authorize(self, context: grpc.aio.ServicerContext, access: Access) -> Principal | None:
        """The caller, if ``access`` needs one: UNAUTHENTICATED or PERMISSION_DENIED otherwise."""
        if access is Access.OPEN:
            return None
        token = bearer_token(context)
        if not token:
            raise Unauthenticated(
                "this call needs an `authorization: Bearer <access token>` header", reason="MISSING_TOKEN"
            )
        principal = await self._validate(token, context)
        if access is Access.ADMIN and "admin" not in principal.roles:
            raise PermissionDenied("this call needs the admin role", reason="ADMIN_REQUIRED")
        return principal

    async def _validate(self, token: str, context: grpc.aio.ServicerContext) -> Principal:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return cached[1]
        try:
            claims = await self._stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(access_token=token),
                timeout=outgoing_timeout(context, self._default_timeout, self._margin),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                raise Unauthenticated(
                    "the access token is invalid, expired or revoked", reason="INVALID_TOKEN"
                ) from None
            raise Unavailable(
                f"cannot check the access token: the auth service answered {error.code().name}", retry_after_seconds=1
            ) from None
        principal = Principal(claims.user_id, claims.username, tuple(claims.roles), claims.session_id)
        if self._ttl > 0 and self._size > 0:
            self._cache[key] = (now + self._ttl, principal)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return principal
