"""Waiting for a condition: poll it with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(condition: Callable[[], T], within: float = 10.0, interval: float = 0.02) -> T:
    """The first truthy value of ``condition()``; TimeoutError if none comes ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            value = condition()
            if value:
                return value
            await asyncio.sleep(interval)
