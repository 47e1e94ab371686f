"""Login rate limits per client IP and per account, with the ``limits`` library.

Moving windows, so a burst at a window's edge cannot double the allowance. The storage comes from a URI:
``memory://`` (the default) counts in this process; ``redis://host:6379/N`` (or ``rediss://``,
``redis+unix://``) counts in Redis through redis-py's asyncio client, so that the limits hold across every
replica. Both limits are checked before any password hash is computed.

While the shared storage does not answer (refused, timed out after ``timeout_seconds``), the limits fall
back to counting in this process: each replica then allows up to the limit on its own (N replicas: up to N
times the limit), which still bounds the hashing work each replica takes on. The fallback is logged once
(``auth.rate_limit_fallback``), counted (``auth_rate_limit_storage_errors_total``) and shown by the gauge
``auth_rate_limit_shared`` (0 while falling back). After ``retry_seconds`` the shared storage is tried again;
the first answer ends the fallback (``auth.rate_limit_shared``). Attempts counted in the fallback are not
carried over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from services.common.logs import fields

log = logging.getLogger(__name__)

SHARED_SCHEMES = ("redis://", "rediss://", "redis+unix://")


@dataclass(frozen=True, slots=True)
class Limited:
    scope: str  # "ip" | "account"
    retry_after_seconds: float


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


def _redacted(uri: str) -> str:
    """The URI without a password (``redis://:secret@host`` -> ``redis://host``)."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class LoginLimiter:
    def __init__(
        self,
        *,
        per_ip: str,
        per_account: str,
        storage_uri: str = "memory://",
        key_prefix: str = "ml-platform-auth",
        timeout_seconds: float = 0.5,
        retry_seconds: float = 5.0,
        on_shared_change: Callable[[bool], None] = lambda shared: None,
        on_storage_error: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._per_ip: RateLimitItem = parse(per_ip)
        self._per_account: RateLimitItem = parse(per_account)
        self._local = MovingWindowRateLimiter(storage_from_string("async+memory://"))
        self._shared: MovingWindowRateLimiter | None = None
        self._connections: redis.asyncio.ConnectionPool | None = None
        storage_uri = storage_uri.removeprefix("async+")
        self._where = _redacted(storage_uri)
        if storage_uri.startswith(SHARED_SCHEMES):
            # Our own pool (closed by close()), handed to limits' storage.
            self._connections = redis.asyncio.ConnectionPool.from_url(
                storage_uri.replace("redis+unix://", "unix://", 1),
                socket_connect_timeout=timeout_seconds,
                socket_timeout=timeout_seconds,
            )
            options: dict[str, Any] = {"connection_pool": self._connections}  # limits passes it to redis-py
            storage = storage_from_string(
                _async_uri(storage_uri),
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                **options,
            )
            self._shared = MovingWindowRateLimiter(storage)
        elif storage_uri != "memory://":
            raise ValueError("must be memory:// or redis://host:port/db (rediss://, redis+unix:// also)")
        self._timeout = timeout_seconds
        self._retry = retry_seconds
        self._on_shared_change = on_shared_change
        self._on_storage_error = on_storage_error
        self._clock = clock
        self._falling_back_since: float | None = None

    async def close(self) -> None:
        if self._connections is not None:
            await self._connections.aclose()

    @property
    def shared(self) -> bool:
        """Whether attempts are counted in the shared storage right now."""
        return self._shared is not None and self._falling_back_since is None

    async def check(self, *, client_ip: str, account: str) -> Limited | None:
        """Count one attempt; the first limit exceeded, or None if the attempt may proceed."""
        if self._shared is not None and self._should_try_shared():
            try:
                async with asyncio.timeout(self._timeout):
                    limited = await self._check(self._shared, client_ip, account)
            except (StorageError, TimeoutError) as error:
                self._fall_back(error)
            else:
                self._recovered()
                return limited
        return await self._check(self._local, client_ip, account)

    def _should_try_shared(self) -> bool:
        since = self._falling_back_since
        return since is None or self._clock() - since >= self._retry

    def _fall_back(self, error: Exception) -> None:
        self._on_storage_error()
        cause = error.storage_error if isinstance(error, StorageError) else error
        if self._falling_back_since is None:
            log.warning(
                "auth.rate_limit_fallback",
                extra=fields(storage=self._where, error=type(cause).__name__, limits="per replica"),
            )
            self._on_shared_change(False)
        self._falling_back_since = self._clock()

    def _recovered(self) -> None:
        if self._falling_back_since is not None:
            self._falling_back_since = None
            log.warning("auth.rate_limit_shared", extra=fields(storage=self._where))
            self._on_shared_change(True)

    async def _check(self, limiter: MovingWindowRateLimiter, client_ip: str, account: str) -> Limited | None:
        for scope, item, key in (("ip", self._per_ip, client_ip), ("account", self._per_account, account)):
            if not await limiter.hit(item, "login", scope, key):
                stats = await limiter.get_window_stats(item, "login", scope, key)
                return Limited(scope, max(0.0, stats.reset_time - time.time()))
        return None
