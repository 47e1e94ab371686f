"""The gRPC server bootstrap every service uses.

A :class:`GrpcServer` is one service's process-level shell: a ``grpc.aio`` server with the
standard health service, reflection, message limits and the interceptor chain (tracing ->
request log -> metrics -> errors), a Prometheus ``/metrics`` endpoint, the channels the
service opens to others, and a fixed shutdown order::

    signal -> health NOT_SERVING on every name -> serve on for the shutdown delay -> server.stop(grace)
    (no new RPCs, accepted ones finish) -> close channels and pools -> flush telemetry

The delay (``*_SHUTDOWN_DELAY_SECONDS``) lets whoever watches health move away before RPCs are
refused: Kubernetes endpoints, and other services' channels, which check health on the client
side (:func:`services.common.client.service_config`). Logged as ``server.stopping``,
``server.draining`` (the delay), ``server.closing`` (the grace) and ``server.stopped``.

Health names: ``""`` and ``liveness`` mean "the process is alive and not shutting down";
``readiness`` and each of the service's own full names mean "able to do its job now"
(:meth:`GrpcServer.set_ready`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import error_details_pb2  # noqa: F401  (lets reflection describe rich error details)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from services.common import reflection
from services.common.client import create_channel
from services.common.errors import ErrorTranslation
from services.common.interception import ChassisInterceptor
from services.common.logs import bind_service, fields, reset_service
from services.common.metrics import (
    ClientMetricsInterceptor,
    HttpsCertificate,
    MetricsEndpoint,
    ServerMetrics,
    WsgiApp,
)
from services.common.request_log import RequestLog
from services.common.settings import ServiceSettings, env_name
from services.common.telemetry import create_tracer_provider
from services.common.tls import ClientCertificates, PemFile, ServerCertificates

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Closer = Callable[[], Awaitable[None]]
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GrpcServer:
    """One service's gRPC server, metrics endpoint and lifecycle."""

    def __init__(self, settings: ServiceSettings, service: str):
        self.settings = settings
        self.service = service
        # First: a bad certificate file is a SettingsError before anything is made.
        self._certificates = ServerCertificates.from_settings(settings)
        https = None
        if settings.metrics_tls_cert_file is not None and settings.metrics_tls_key_file is not None:
            settings_cls = type(settings)
            https = HttpsCertificate(
                PemFile(settings.metrics_tls_cert_file, env_name(settings_cls, "metrics_tls_cert_file")),
                PemFile(settings.metrics_tls_key_file, env_name(settings_cls, "metrics_tls_key_file")),
            )
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):  # memory, CPU, fds, start time, GC
            collector(registry=self.registry)
        self.tracer_provider = create_tracer_provider(service)
        self._server = grpc.aio.server(
            interceptors=[
                aio_server_interceptor(tracer_provider=self.tracer_provider),
                ChassisInterceptor(
                    [RequestLog(service), ServerMetrics(self.registry)], ErrorTranslation(domain=service)
                ),
            ],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                # Clients re-resolve DNS only on reconnect: ageing connections out lets new replicas
                # behind a headless Service get traffic.
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_connection_age_grace_ms", 30_000),
            ],
        )
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        # Kubernetes' gRPC probes speak no TLS: a plaintext port with health only, the same answers.
        self._health_server: grpc.aio.Server | None = None
        if settings.health_port is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
        self._service_names: list[str] = []
        self._closers: list[Closer] = []
        self._metrics = MetricsEndpoint(self.registry, settings.host, settings.metrics_port, https)
        self._ready = False
        self._started = False
        self._after_start: list[Callable[[], Awaitable[None]]] = []
        self._client_metrics: ClientMetricsInterceptor | None = None
        self._background: list[asyncio.Task[None]] = []
        self.initially_ready = True
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0

    # -- assembly (before start) ------------------------------------------------------------

    def add_service(
        self, descriptor: ServiceDescriptor, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any
    ) -> None:
        """Serve ``servicer``; its full name joins health and reflection."""
        add_to_server(servicer, self._server)
        self._service_names.append(descriptor.full_name)

    def add_generic_handlers(self, full_name: str, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Serve generic handlers (for example a pass-through proxy) under ``full_name``."""
        self._server.add_generic_rpc_handlers(tuple(handlers))
        self._service_names.append(full_name)

    def add_http_route(self, path: str, app: WsgiApp) -> None:
        """Serve a WSGI app at ``path`` on the metrics port (beside ``/metrics``)."""
        self._metrics.add_route(path, app)

    def after_start(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` in the background once serving (e.g. loading models); cancelled at stop."""
        self._after_start.append(job)

    def on_close(self, closer: Closer) -> None:
        """Run ``closer`` after the server has stopped (pools, stores); last added, first run."""
        self._closers.append(closer)

    def connect(
        self,
        target: str,
        idempotent_methods: Sequence[tuple[str, str]] = (),
        *,
        tls: ClientCertificates | None = None,
        tls_server_name: str | None = None,
    ) -> grpc.aio.Channel:
        """A channel to another service, traced and measured, closed at shutdown; TLS with ``tls``."""
        if self._client_metrics is None:  # registered once, on the first channel
            self._client_metrics = ClientMetricsInterceptor(self.registry)
        channel = create_channel(
            target,
            max_message_bytes=self.settings.max_message_bytes,
            tracer_provider=self.tracer_provider,
            client_metrics=self._client_metrics,
            idempotent_methods=idempotent_methods,
            tls=tls,
            tls_server_name=tls_server_name,
        )

        async def close() -> None:
            await channel.close()

        self.on_close(close)
        return channel

    @property
    def service_names(self) -> list[str]:
        return list(self._service_names)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, *, ready: bool | None = None) -> None:
        """Bind, start serving, and set health: alive, and ready if ``ready`` (default: initially_ready)."""
        if ready is None:
            ready = self.initially_ready
        token = bind_service(self.service)
        try:
            reflection.enable(
                [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], self._server
            )
            address = f"{self.settings.host}:{self.settings.port}"
            if self._certificates is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, self._certificates.credentials())
            if self.port == 0:
                raise OSError(f"cannot bind the gRPC port at {address}")
            if self._health_server is not None:
                health_address = f"{self.settings.host}:{self.settings.health_port}"
                self.health_port = self._health_server.add_insecure_port(health_address)
                if self.health_port == 0:
                    raise OSError(f"cannot bind the health port at {health_address}")
            await self._server.start()
            self._started = True
            if self._health_server is not None:
                await self._health_server.start()
            self.metrics_port = self._metrics.start()
            await self._health.set("", _SERVING)
            await self._health.set(LIVENESS, _SERVING)
            await self.set_ready(ready)
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(self._run_job(job)) for job in self._after_start]
            log.info(
                "server.started",
                extra=fields(
                    host=self.settings.host,
                    port=self.port,
                    transport=self.settings.tls_mode,
                    plaintext_off_loopback=self.settings.plaintext_off_loopback,
                    health_port=self.health_port or None,
                    metrics_port=self.metrics_port,
                    metrics_scheme=self._metrics.scheme,
                    services=self._service_names,
                    ready=ready,
                ),
            )
        finally:
            reset_service(token)

    async def _run_job(self, job: Callable[[], Awaitable[None]]) -> None:
        token = bind_service(self.service)
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("server.background_job_failed")
        finally:
            reset_service(token)

    async def set_ready(self, ready: bool) -> None:
        """Flip ``readiness`` and the service names between SERVING and NOT_SERVING."""
        self._ready = ready
        status = _SERVING if ready else _NOT_SERVING
        for name in (READINESS, *self._service_names):
            await self._health.set(name, status)

    @property
    def ready(self) -> bool:
        return self._ready

    async def stop(self) -> None:
        """Shut down in order: health NOT_SERVING, serve on for the shutdown delay, stop(grace) (no new RPCs,
        accepted ones finish), closers, metrics, telemetry.

        Runs once: a second call waits for the first, and a caller that is cancelled does not cut the
        shutdown short (it goes on to the end).
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        token = bind_service(self.service)
        try:
            grace = self.settings.grace_seconds
            log.info("server.stopping", extra=fields(grace_seconds=grace))
            await self._health.enter_graceful_shutdown()  # every health name NOT_SERVING, and it stays so
            delay = self.settings.shutdown_delay_seconds
            if delay > 0 and self._started:
                # Still serving: callers that look at health (load balancers, round robin) move away meanwhile.
                log.info("server.draining", extra=fields(delay_seconds=delay))
                await asyncio.sleep(delay)
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            if self._started:
                log.info("server.closing", extra=fields(grace_seconds=grace))  # no new RPCs; accepted ones finish
                await self._server.stop(grace)
                if self._health_server is not None:  # probes see NOT_SERVING until the main port is gone
                    await self._health_server.stop(grace)
            for closer in reversed(self._closers):
                try:
                    await closer()
                except Exception:
                    log.exception("server.close_failed")
            self._metrics.stop()
            log.info("server.stopped")
            self.tracer_provider.shutdown()
        finally:
            reset_service(token)
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve_until_signal(server: GrpcServer) -> None:
    """Start ``server``, run until SIGTERM or SIGINT, then shut it down in order.

    The handlers stay until the shutdown is over: a second signal (Docker and people send more than
    one) is logged and changes nothing, where the default action would kill the process mid-drain.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.info("server.signal_ignored", extra=fields(signal=sig.name, reason="already stopping"))
        stop.set()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
        await stop.wait()
    finally:
        try:
            await server.stop()
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)
