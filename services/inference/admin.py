"""``inference.v1.WorkerPoolService``: worker health and restarts, for operators and the gateway."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from inference.v1 import worker_pool_pb2 as pb
from inference.v1 import worker_pool_pb2_grpc

from services.common.errors import InvalidArgument
from services.inference import reasons
from services.inference.manager import ModelManager
from services.inference.pool import WorkerHealth, WorkerState
from services.inference.reasons import check_name

_STATES = {
    WorkerState.STARTING: pb.WORKER_STATE_STARTING,
    WorkerState.READY: pb.WORKER_STATE_READY,
    WorkerState.BUSY: pb.WORKER_STATE_BUSY,
    WorkerState.UNHEALTHY: pb.WORKER_STATE_UNHEALTHY,
    WorkerState.RESTARTING: pb.WORKER_STATE_RESTARTING,
    WorkerState.STOPPED: pb.WORKER_STATE_STOPPED,
}


def worker_health(view: WorkerHealth) -> pb.WorkerHealth:
    started = timestamp_pb2.Timestamp()
    if view.started_at:
        started.FromNanoseconds(int(view.started_at * 1e9))
    return pb.WorkerHealth(
        worker_id=view.worker_id,
        model_name=view.model_name,
        model_version=view.model_version,
        state=_STATES[view.state],
        pid=view.pid,
        uptime_seconds=view.uptime_seconds,
        in_flight=view.in_flight,
        requests_served=view.requests_served,
        restarts=view.restarts,
        last_error=view.last_error,
        rss_bytes=view.rss_bytes,
        started_at=started if view.started_at else None,
    )


class WorkerPoolServicer(worker_pool_pb2_grpc.WorkerPoolServiceServicer):
    def __init__(self, manager: ModelManager):
        self._manager = manager

    async def GetWorkerHealth(
        self, request: pb.GetWorkerHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWorkerHealthResponse:
        if request.model_name:
            self._manager.model(request.model_name)  # NOT_FOUND for an unknown model
        return pb.GetWorkerHealthResponse(
            workers=[worker_health(view) for view in self._manager.health(request.model_name)]
        )

    async def RestartWorker(
        self, request: pb.RestartWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RestartWorkerResponse:
        if not request.worker_id:
            raise InvalidArgument(
                "worker_id is required", [("worker_id", "must not be empty")], reason=reasons.WORKER_ID_REQUIRED
            )
        check_name("worker_id", request.worker_id)
        view = await self._manager.restart_worker(request.worker_id)
        return pb.RestartWorkerResponse(worker=worker_health(view))
