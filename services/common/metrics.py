"""Prometheus metrics for gRPC servers and clients, with the go-grpc-prometheus names.

Server side: ``grpc_server_started_total``, ``grpc_server_handled_total`` and the
``grpc_server_handling_seconds`` histogram, labelled by ``grpc_type``, ``grpc_service``,
``grpc_method`` (and ``grpc_code`` once handled). Client side: the same with ``grpc_client_``.

Each service owns a :class:`~prometheus_client.CollectorRegistry`, so that several services can
run in one process (tests) without sharing or double-registering metrics.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app

from services.common.interception import MethodScope, RpcConcern, RpcInfo, split_method
from services.common.logs import fields
from services.common.settings import SettingsError
from services.common.tls import PemFile, check_key_pair

log = logging.getLogger(__name__)

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class _RpcMetrics:
    def __init__(self, side: str, registry: CollectorRegistry):
        self.started = Counter(
            f"grpc_{side}_started_total",
            f"Total number of RPCs started on the {side}.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            f"grpc_{side}_handled_total",
            f"Total number of RPCs completed on the {side}, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            f"grpc_{side}_handling_seconds",
            f"Histogram of response latency (seconds) of gRPC that had been application-level handled by the {side}.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class ServerMetrics(RpcConcern):
    """Counts and times every RPC the server handles, by final status code."""

    def __init__(self, registry: CollectorRegistry):
        self._metrics = _RpcMetrics("server", registry)

    def for_method(self, info: RpcInfo) -> MethodScope:
        return _MethodMetrics(self._metrics, (info.rpc_type, info.service, info.method))


class _MethodMetrics(MethodScope):
    """One method's series; the label children are looked up once (per status code for ``handled``)."""

    def __init__(self, metrics: _RpcMetrics, labels: tuple[str, str, str]):
        self._metrics = metrics
        self._labels = labels
        self._started = metrics.started.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def begin(self, context: grpc.aio.ServicerContext) -> Any:
        self._started.inc()
        return None

    def end(self, state: Any, context: grpc.aio.ServicerContext, code: grpc.StatusCode, seconds: float) -> None:
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._metrics.handled.labels(*self._labels, code.name)
        handled.inc()
        self._seconds.observe(seconds)


class ClientMetricsInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Counts and times every call made through a channel, by final status code."""

    def __init__(self, registry: CollectorRegistry):
        self._metrics = _RpcMetrics("client", registry)
        self._methods: dict[tuple[str, str], _MethodMetrics] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def _method(self, details: grpc.aio.ClientCallDetails, rpc_type: str) -> _MethodMetrics:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        found = self._methods.get((method, rpc_type))
        if found is None:
            service, name = split_method(method)
            found = self._methods[(method, rpc_type)] = _MethodMetrics(self._metrics, (rpc_type, service, name))
        return found

    def _observe(self, details: grpc.aio.ClientCallDetails, call: Any, rpc_type: str) -> Any:
        """A streaming call: its status comes when the caller has read it all, so a task waits for it."""
        series = self._method(details, rpc_type)
        series.begin(call)
        start = time.perf_counter()

        async def record() -> None:
            code = await call.code()
            series.end(None, call, code, time.perf_counter() - start)

        task = asyncio.get_running_loop().create_task(record())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return call

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        # A unary call's status is awaited here (as the OpenTelemetry interceptor does): no task per call.
        series = self._method(details, "unary")
        series.begin(None)
        start = time.perf_counter()
        try:
            call = await continuation(details, request)
            code = await call.code()
        except asyncio.CancelledError:
            series.end(None, None, grpc.StatusCode.CANCELLED, time.perf_counter() - start)
            raise
        series.end(None, call, code, time.perf_counter() - start)
        return call

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._observe(details, await continuation(details, request), "server_stream")

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._observe(details, await continuation(details, request_iterator), "client_stream")

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._observe(details, await continuation(details, request_iterator), "bidi_stream")


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class HttpsCertificate:
    """The metrics port's certificate: an SSL context, its files re-read when they change."""

    def __init__(self, cert: PemFile, key: PemFile):
        self._cert, self._key = cert, key
        check_key_pair(cert, key)  # SettingsError at start-up
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(cert.path, key.path)
        self._seen = self._signature()
        self._lock = threading.Lock()

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (self._cert.signature(), self._key.signature())

    def poll(self) -> None:
        """Before each accepted connection: load the files again if they changed and check out."""
        with self._lock:
            signature = self._signature()
            if signature == self._seen:
                return
            self._seen = signature
            try:
                check_key_pair(self._cert, self._key)
                self.context.load_cert_chain(self._cert.path, self._key.path)  # new connections only
            except (SettingsError, OSError, ssl.SSLError) as error:
                log.warning("tls.reload_failed", extra=fields(error=str(error), kept="the previous certificate"))
                return
            log.info("tls.reloaded", extra=fields(cert_file=str(self._cert.path)))


class _ThreadingWSGISServer(_ThreadingWSGIServer):
    """HTTPS: the TLS handshake runs in the connection's own thread (never in the accepting one)."""

    certificate: HttpsCertificate

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        self.certificate.poll()
        return self.certificate.context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        ), address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (OSError, ssl.SSLError):  # a plaintext or refused client: nothing to serve
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        return


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsEndpoint:
    """The HTTP side of a service: ``/metrics`` for Prometheus, plus routes a service adds.

    Served from a thread, so a busy event loop never delays a scrape.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, https: HttpsCertificate | None = None):
        self._host = host
        self._https = https
        self._requested_port = port
        self._routes: dict[str, WsgiApp] = {"/metrics": make_wsgi_app(registry)}
        self._server: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add_route(self, path: str, app: WsgiApp) -> None:
        """Serve the WSGI ``app`` at ``path`` (before :meth:`start`)."""
        self._routes[path] = app

    def _dispatch(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        app = self._routes.get(environ.get("PATH_INFO", ""))
        if app is None:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found\n"]
        return app(environ, start_response)

    @property
    def scheme(self) -> str:
        return "https" if self._https is not None else "http"

    def start(self) -> int:
        server = make_server(
            self._host,
            self._requested_port,
            self._dispatch,
            server_class=_ThreadingWSGIServer if self._https is None else _ThreadingWSGISServer,
            handler_class=_QuietHandler,
        )
        if isinstance(server, _ThreadingWSGISServer) and self._https is not None:
            server.certificate = self._https  # before the first accept
        self._server = server
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics-http", daemon=True
        )
        self._thread.start()
        return self.port

    @property
    def port(self) -> int:
        return int(self._server.server_port) if self._server else 0

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
