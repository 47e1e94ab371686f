"""The request log: one JSON line per RPC, written inside the RPC's trace.

Health checks (the standard health service, and the worker-health query the gateway polls every
second) and reflection are logged at DEBUG, so that probes do not drown the log; everything else at
INFO (WARNING for server-side failures).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from services.common.interception import RpcInfo, ScopeInterceptor, outcome_code
from services.common.logs import bind_service, fields, reset_service

log = logging.getLogger(__name__)

_QUIET_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
_QUIET_METHODS = frozenset({"/inference.v1.WorkerPoolService/GetWorkerHealth"})
_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE}
)


class RequestLogInterceptor(ScopeInterceptor):
    """Binds the service name for the RPC's log lines and logs how each RPC ended."""

    def __init__(self, service: str):
        super().__init__()
        self._service = service

    @contextlib.asynccontextmanager
    async def scope(self, info: RpcInfo, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        token = bind_service(self._service)
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            code = outcome_code(context, error)
            level = logging.INFO
            if info.service in _QUIET_SERVICES or info.full_method in _QUIET_METHODS:
                level = logging.DEBUG
            elif code in _SERVER_FAULTS:
                level = logging.WARNING
            log.log(
                level,
                "rpc.finished",
                extra=fields(
                    method=info.full_method,
                    grpc_type=info.rpc_type,
                    code=code.name,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                    peer=context.peer(),
                ),
            )
            reset_service(token)
