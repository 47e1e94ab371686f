"""Calling another service: channels with keepalive, retries and telemetry, and deadlines.

Python gRPC does not propagate deadlines from an incoming call to the calls it makes, so
every outgoing call takes :func:`outgoing_timeout`: the time left on the incoming call minus a
margin (kept back for the reply), capped by a configured default.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

from services.common.errors import DeadlineExceeded
from services.common.metrics import ClientMetricsInterceptor

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
) -> grpc.aio.Channel:
    """An insecure aio channel to ``target`` with tracing and client metrics interceptors.

    Use ``dns:///host:port`` targets so that every address behind a name (a Kubernetes headless
    Service) gets traffic through round-robin balancing.
    """
    interceptors = [*aio_client_interceptors(tracer_provider=tracer_provider), client_metrics]
    return grpc.aio.insecure_channel(
        target, options=channel_options(max_message_bytes, idempotent_methods), interceptors=interceptors
    )


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
