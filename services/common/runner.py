"""The entry point shared by the services' ``__main__`` modules."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry import trace

from services.common.logs import configure_logging
from services.common.server import GrpcServer, serve_until_signal
from services.common.settings import ServiceSettings, SettingsError, load_settings

S = TypeVar("S", bound=ServiceSettings)

EXIT_BAD_SETTINGS = 2


def run(service: str, settings_cls: type[S], build: Callable[[S], Awaitable[GrpcServer]]) -> int:
    """Read settings, configure logging, build the server and serve until SIGTERM/SIGINT.

    Returns the process exit code: 0 after a clean shutdown, 2 for an invalid setting.
    """
    try:
        settings = load_settings(settings_cls)
    except SettingsError as error:
        print(f"{service}: {error}", file=sys.stderr)  # noqa: T201  (logging is not configured yet)
        return EXIT_BAD_SETTINGS
    configure_logging(service, settings.log_level, settings.log_format)

    async def main() -> None:
        server = await build(settings)
        trace.set_tracer_provider(server.tracer_provider)
        await serve_until_signal(server)

    try:
        asyncio.run(main())
    except SettingsError as error:  # found while building (keys, files, bootstrap values)
        print(f"{service}: {error}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_SETTINGS
    return 0
