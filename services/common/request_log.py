"""The request log: one JSON line per RPC, written inside the RPC's trace.

Health checks (the standard health service, and the worker-health query the gateway polls every
second) and reflection are logged at DEBUG, so that probes do not drown the log; everything else at
INFO (WARNING for server-side failures).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from services.common.interception import MethodScope, RpcConcern, RpcInfo
from services.common.logs import bind_service, fields, reset_service

log = logging.getLogger(__name__)

_QUIET_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
_QUIET_METHODS = frozenset({"/inference.v1.WorkerPoolService/GetWorkerHealth"})
_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE}
)


class RequestLog(RpcConcern):
    """Binds the service name for the RPC's log lines and logs how each RPC ended."""

    def __init__(self, service: str):
        self._service = service

    def for_method(self, info: RpcInfo) -> MethodScope:
        quiet = info.service in _QUIET_SERVICES or info.full_method in _QUIET_METHODS
        return _MethodLog(self._service, info, quiet)


class _MethodLog(MethodScope):
    def __init__(self, service: str, info: RpcInfo, quiet: bool):
        self._service = service
        self._info = info
        self._quiet = quiet

    def begin(self, context: grpc.aio.ServicerContext) -> Any:
        return bind_service(self._service)

    def end(self, state: Any, context: grpc.aio.ServicerContext, code: grpc.StatusCode, seconds: float) -> None:
        level = logging.DEBUG if self._quiet else logging.WARNING if code in _SERVER_FAULTS else logging.INFO
        if log.isEnabledFor(level):
            info = self._info
            log.log(
                level,
                "rpc.finished",
                extra=fields(
                    method=info.full_method,
                    grpc_type=info.rpc_type,
                    code=code.name,
                    duration_ms=round(seconds * 1000, 3),
                    peer=context.peer(),
                ),
            )
        reset_service(state)
