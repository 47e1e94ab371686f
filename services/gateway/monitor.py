"""Watching the upstreams: the gateway's readiness and the ML health snapshot.

Every ``GATEWAY_UPSTREAM_CHECK_INTERVAL_SECONDS`` the monitor asks auth and inference for their
``readiness`` and inference for its workers. The gateway is ready only while both upstreams
are; its liveness never depends on them. The last worker snapshot serves
``GET /internal/ml/health`` on the metrics port (200 when every loaded model has a ready worker,
503 otherwise), from the HTTP thread without touching the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference.v1 import worker_pool_pb2, worker_pool_pb2_grpc

from services.common.logs import fields

log = logging.getLogger(__name__)

READY_STATES = (worker_pool_pb2.WORKER_STATE_READY, worker_pool_pb2.WORKER_STATE_BUSY)


@dataclass(frozen=True, slots=True)
class ModelSummary:
    model_name: str
    model_version: str
    ready_workers: int
    total_workers: int


def summarize(workers: Iterable[worker_pool_pb2.WorkerHealth]) -> tuple[bool, list[ModelSummary]]:
    """(every model version has a ready worker, per model version counts)."""
    counts: dict[tuple[str, str], list[int]] = {}
    for worker in workers:
        entry = counts.setdefault((worker.model_name, worker.model_version), [0, 0])
        entry[0] += worker.state in READY_STATES
        entry[1] += 1
    models = [ModelSummary(name, version, ready, total) for (name, version), (ready, total) in sorted(counts.items())]
    return all(model.ready_workers > 0 for model in models), models


@dataclass
class Snapshot:
    checked_at: float = 0.0
    error: str = "not checked yet"
    workers: list[worker_pool_pb2.WorkerHealth] = field(default_factory=list)

    def document(self) -> tuple[bool, dict[str, Any]]:
        healthy, models = summarize(self.workers)
        healthy = healthy and not self.error
        return healthy, {
            "healthy": healthy,
            "checked_at": self.checked_at,
            "error": self.error,
            "models": [_summary(model) for model in models],
            "workers": [_worker(worker) for worker in self.workers],
        }


def _summary(model: ModelSummary) -> dict[str, Any]:
    return {
        "model_name": model.model_name,
        "model_version": model.model_version,
        "ready_workers": model.ready_workers,
        "total_workers": model.total_workers,
    }


def _worker(worker: worker_pool_pb2.WorkerHealth) -> dict[str, Any]:
    return {
        "worker_id": worker.worker_id,
        "model_name": worker.model_name,
        "model_version": worker.model_version,
        "state": worker_pool_pb2.WorkerState.Name(worker.state).removeprefix("WORKER_STATE_").lower(),
        "pid": worker.pid,
        "uptime_seconds": round(worker.uptime_seconds, 3),
        "in_flight": worker.in_flight,
        "requests_served": worker.requests_served,
        "restarts": worker.restarts,
        "last_error": worker.last_error,
        "rss_bytes": worker.rss_bytes,
    }


class UpstreamMonitor:
    def __init__(
        self,
        *,
        auth: grpc.aio.Channel,
        inference: grpc.aio.Channel,
        interval: float,
        timeout: float,
        set_ready: Callable[[bool], Awaitable[None]],
    ):
        self._health = {
            "auth": health_pb2_grpc.HealthStub(auth),
            "inference": health_pb2_grpc.HealthStub(inference),
        }
        self._pool = worker_pool_pb2_grpc.WorkerPoolServiceStub(inference)
        self._interval = interval
        self._timeout = timeout
        self._set_ready = set_ready
        self._ready: bool | None = None
        self._snapshot = Snapshot()
        self._lock = threading.Lock()

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    async def check(self) -> None:
        results = await asyncio.gather(*(self._ready_upstream(name, stub) for name, stub in self._health.items()))
        down = [name for name, ok in zip(self._health, results, strict=True) if not ok]
        ready = not down
        if ready != self._ready:
            log.info("gateway.upstreams", extra=fields(ready=ready, down=down))
            self._ready = ready
            await self._set_ready(ready)
        snapshot = Snapshot(checked_at=time.time())
        try:
            response = await self._pool.GetWorkerHealth(worker_pool_pb2.GetWorkerHealthRequest(), timeout=self._timeout)
            snapshot.workers, snapshot.error = list(response.workers), ""
        except grpc.aio.AioRpcError as error:
            snapshot.error = f"inference: {error.code().name}"
        with self._lock:
            self._snapshot = snapshot

    async def _ready_upstream(self, name: str, stub: health_pb2_grpc.HealthStub) -> bool:
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=self._timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def http_health(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """WSGI: GET /internal/ml/health, the last worker snapshot as JSON (runs in the HTTP thread)."""
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"method not allowed\n"]
        with self._lock:
            snapshot = self._snapshot
        healthy, document = snapshot.document()
        body = json.dumps(document, sort_keys=True).encode()
        status = "200 OK" if healthy else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
        return [body]
