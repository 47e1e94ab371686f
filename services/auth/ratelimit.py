"""Login rate limits per client IP and per account, with the ``limits`` library.

Moving windows, so a burst at a window's edge cannot double the allowance. The storage comes
from a URI (``memory://`` by default; ``redis://host:6379`` shares the limits between replicas).
Both limits are checked before any password hash is computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string


@dataclass(frozen=True, slots=True)
class Limited:
    scope: str  # "ip" | "account"
    retry_after_seconds: float


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


class LoginLimiter:
    def __init__(self, *, per_ip: str, per_account: str, storage_uri: str = "memory://"):
        self._per_ip: RateLimitItem = parse(per_ip)
        self._per_account: RateLimitItem = parse(per_account)
        self._limiter = MovingWindowRateLimiter(storage_from_string(_async_uri(storage_uri)))

    async def check(self, *, client_ip: str, account: str) -> Limited | None:
        """Count one attempt; the first limit exceeded, or None if the attempt may proceed."""
        for scope, item, key in (("ip", self._per_ip, client_ip), ("account", self._per_account, account)):
            if not await self._limiter.hit(item, "login", scope, key):
                stats = await self._limiter.get_window_stats(item, "login", scope, key)
                return Limited(scope, max(0.0, stats.reset_time - time.time()))
        return None
