"""Assembles the inference service: model manager, worker pools, and the two gRPC services."""

from __future__ import annotations

import asyncio
import os
from importlib import metadata

from inference import grpc_service_pb2, grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2, worker_pool_pb2_grpc

from services.common.server import GrpcServer
from services.inference.admin import WorkerPoolServicer
from services.inference.limits import RequestPolicy
from services.inference.manager import ModelManager
from services.inference.metrics import InferenceMetrics
from services.inference.pool import PoolSettings
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from services.inference.shared_memory import EXTENSION as SHARED_MEMORY_EXTENSION
from services.inference.shared_memory import SharedMemoryPolicy, SharedMemoryRegistry

SERVICE = "inference"
SERVER_NAME = "ml-platform-inference"
EXTENSIONS = ("model_repository", "schedule_policy", "model_configuration", "statistics")
# glibc's allocator makes multi-MiB message throughput erratic; a high mmap threshold keeps it steady.
WORKER_ENV_DEFAULTS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "OMP_NUM_THREADS": "1"}


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in WORKER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env.pop("OTEL_SERVICE_NAME", None)  # workers name themselves inference-worker
    return env


async def build_server(settings: InferenceSettings) -> GrpcServer:
    server = GrpcServer(settings, SERVICE)
    server.initially_ready = False  # ready once the models' workers are
    metrics = InferenceMetrics(server.registry)
    readiness: set[asyncio.Task[None]] = set()

    def on_readiness(ready: bool) -> None:
        task = asyncio.get_running_loop().create_task(server.set_ready(ready))
        readiness.add(task)
        task.add_done_callback(readiness.discard)

    manager = ModelManager(
        repository=settings.model_repository,
        pool_settings=PoolSettings(
            queue_limit=settings.queue_limit,
            health_interval=settings.health_interval_seconds,
            health_timeout=settings.health_timeout_seconds,
            start_timeout=settings.worker_start_timeout_seconds,
            stop_grace=settings.worker_stop_grace_seconds,
            backoff=settings.restart_backoff_seconds,
            backoff_max=settings.restart_backoff_max_seconds,
            shm_threshold=settings.shm_threshold_bytes,
            shm_arena_bytes=settings.shm_arena_bytes,
            shm_arena_max_bytes=settings.shm_arena_max_bytes,
            env=worker_env(),
            log_level=settings.log_level,
            log_format=settings.log_format,
            scale_interval=settings.autoscale_interval_seconds,
            scale_cooldown=settings.scale_cooldown_seconds,
            scale_down_idle=settings.scale_down_idle_seconds,
            abandon_grace=settings.abandon_grace_seconds,
        ),
        metrics=metrics,
        on_readiness=on_readiness,
        start_timeout=settings.worker_start_timeout_seconds,
        poll_seconds=settings.repository_poll_seconds,
        cpu_budget=settings.worker_cpu_budget or max(1, len(os.sched_getaffinity(0)) - 1),
    )
    server.after_start(manager.run)
    server.on_close(manager.close)
    shared = SharedMemoryRegistry(SharedMemoryPolicy.from_settings(settings))
    server.on_close(shared.aclose)  # closers run last first: regions before the pools
    server.add_service(
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        InferenceServicer(
            manager=manager,
            name=SERVER_NAME,
            version=metadata.version("ml-platform"),
            extensions=(*EXTENSIONS, SHARED_MEMORY_EXTENSION) if shared.enabled else EXTENSIONS,
            default_timeout=settings.timeout_seconds,
            is_ready=lambda: manager.ready,
            policy=RequestPolicy.from_settings(settings),
            shared=shared,
        ),
    )
    server.add_service(
        worker_pool_pb2.DESCRIPTOR.services_by_name["WorkerPoolService"],
        worker_pool_pb2_grpc.add_WorkerPoolServiceServicer_to_server,
        WorkerPoolServicer(manager),
    )
    return server
