"""Calling another service: channels with keepalive, retries, telemetry and TLS, and deadlines.

Python gRPC does not propagate deadlines from an incoming call to the calls it makes, so
every outgoing call takes :func:`outgoing_timeout`: the time left on the incoming call minus a
margin (kept back for the reply), capped by a configured default.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

from services.common.errors import DeadlineExceeded
from services.common.metrics import ClientMetricsInterceptor
from services.common.tls import ClientCertificates

RELOAD_CHECK_SECONDS = 1.0  # how often a TLS channel looks at its certificate files (stat only)
# A channel replaced after a certificate rotation is closed once its calls are done, or after this: the longest
# a server of ours keeps a connection (grpc.max_connection_age_ms + grpc.max_connection_age_grace_ms).
RETIRED_CHANNEL_GRACE_SECONDS = 330.0
HEALTH_CHECK_SERVICE = ""  # the health name a channel watches on each address: SERVING until shutdown starts


def service_config(idempotent_methods: Iterable[tuple[str, str]] = ()) -> str:
    """gRPC service config: health-checked round robin over resolved addresses, retries for idempotent methods.

    Client-side health checking: the channel keeps a ``grpc.health.v1.Health/Watch`` open on each
    address for the name ``""``, and round robin chooses only addresses that answer SERVING. A
    server that begins shutting down reports NOT_SERVING and serves on for its shutdown delay, so
    calls move to the other addresses before it refuses any. (``""``, not ``readiness``: a replica
    whose models are loading still answers the calls that need no model, and operators can still
    reach one whose models failed.) An address whose server has no health service counts as healthy.

    ``idempotent_methods`` holds (full service name, method) pairs; an empty method name covers
    every method of the service. Only UNAVAILABLE is retried, up to 3 attempts in all. Other methods
    get gRPC's transparent retry only (a call the server refused before it began reading it, e.g.
    after its GOAWAY), never a second run.
    """
    config: dict[str, object] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": HEALTH_CHECK_SERVICE},
    }
    names = [
        {"service": service, "method": method} if method else {"service": service}
        for service, method in idempotent_methods
    ]
    if names:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def channel_options(
    max_message_bytes: int, idempotent_methods: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(idempotent_methods)),
    ]


def create_channel(
    target: str,
    *,
    max_message_bytes: int,
    tracer_provider: TracerProvider,
    client_metrics: ClientMetricsInterceptor,
    idempotent_methods: Sequence[tuple[str, str]] = (),
    tls: ClientCertificates | None = None,
    tls_server_name: str | None = None,
) -> grpc.aio.Channel:
    """An aio channel to ``target`` with tracing and client metrics interceptors: plaintext, or TLS with ``tls``.

    Use ``dns:///host:port`` targets so that every address behind a name (a Kubernetes headless
    Service) gets traffic through round-robin balancing. With ``tls`` the server's certificate is checked
    against its CA for the target's host name, or ``tls_server_name``
    (``grpc.ssl_target_name_override``), and the channel re-reads the certificate files when they change
    (:class:`ReloadingChannel`).
    """
    interceptors = [*aio_client_interceptors(tracer_provider=tracer_provider), client_metrics]
    options = channel_options(max_message_bytes, idempotent_methods)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))

    def connect(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

    return ReloadingChannel(connect, tls)


class _Rebinding:
    """A multi-callable that follows its :class:`ReloadingChannel` to the current inner channel."""

    def __init__(self, owner: ReloadingChannel, bind: Callable[[grpc.aio.Channel], Any]):
        self._owner, self._bind = owner, bind
        self._channel: grpc.aio.Channel | None = None
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if channel is not self._channel:
            self._channel, self._callable = channel, self._bind(channel)
        return self._callable(*args, **kwargs)


class ReloadingChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A TLS channel whose certificate files are re-read when they change (Python gRPC's client credentials
    are fixed once made).

    At most every :data:`RELOAD_CHECK_SECONDS`, a call looks at the files (a ``stat``); when they changed and
    check out, later calls go through a new inner channel, and the one before is closed once its calls (open
    streams included) are done, or after :data:`RETIRED_CHANNEL_GRACE_SECONDS`. Multi-callables made before a
    rotation (stubs) follow it.
    """

    def __init__(self, connect: Callable[[grpc.ChannelCredentials], grpc.aio.Channel], tls: ClientCertificates):
        self._connect, self._tls = connect, tls
        self._channel = connect(tls.credentials)
        self._next_check = time.monotonic() + RELOAD_CHECK_SECONDS
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def current(self) -> grpc.aio.Channel:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + RELOAD_CHECK_SECONDS
            credentials = self._tls.poll()
            if credentials is not None:
                retired, self._channel = self._channel, self._connect(credentials)
                task = asyncio.get_running_loop().create_task(retired.close(RETIRED_CHANNEL_GRACE_SECONDS))
                self._retiring[task] = retired
                task.add_done_callback(self._retired)
        return self._channel

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, lambda channel: channel.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, lambda channel: channel.unary_stream(method, *args, **kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, lambda channel: channel.stream_unary(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Rebinding(self, lambda channel: channel.stream_stream(method, *args, **kwargs))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel and any still retiring, all with ``grace``."""
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await asyncio.gather(*(channel.close(grace) for channel in (*retiring.values(), self._channel)))

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def outgoing_timeout(context: grpc.aio.ServicerContext | None, default: float, margin: float) -> float:
    """Deadline (seconds) for a call made while handling ``context``.

    min(time remaining on the incoming call - margin, default). With no incoming deadline gRPC
    reports a huge remaining time, which the default caps. Raises :class:`DeadlineExceeded` when
    nothing is left for the call.
    """
    if context is None:
        return default
    remaining = context.time_remaining()
    if remaining is None:
        return default
    timeout = min(remaining - margin, default)
    if timeout <= 0:
        raise DeadlineExceeded("the deadline expired before the upstream call could be made")
    return float(timeout)
