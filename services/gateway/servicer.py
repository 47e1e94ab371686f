"""``gateway.v1.GatewayService``: ML health for operators, and streaming inference for callers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from gateway.v1 import gateway_pb2 as pb
from gateway.v1 import gateway_pb2_grpc
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2, worker_pool_pb2_grpc

from services.common.client import outgoing_timeout
from services.common.errors import ServiceError
from services.common.peer import peer_ip
from services.gateway.access import Access, TokenValidator
from services.gateway.forwarding import upstream_error
from services.gateway.monitor import summarize


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        *,
        inference: grpc.aio.Channel,
        validator: TokenValidator,
        default_timeout: float,
        margin: float,
        stream_concurrency: int,
    ):
        self._infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(inference)
        self._pool = worker_pool_pb2_grpc.WorkerPoolServiceStub(inference)
        self._validator = validator
        self._default_timeout = default_timeout
        self._margin = margin
        self._concurrency = stream_concurrency

    async def GetMLHealth(
        self, request: pb.GetMLHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMLHealthResponse:
        await self._validator.authorize(context, Access.ADMIN)
        try:
            answer = await self._pool.GetWorkerHealth(
                worker_pool_pb2.GetWorkerHealthRequest(),
                timeout=outgoing_timeout(context, self._default_timeout, self._margin),
            )
        except grpc.aio.AioRpcError as error:
            raise upstream_error("inference", error) from None
        healthy, models = summarize(answer.workers)
        return pb.GetMLHealthResponse(
            healthy=healthy,
            workers=list(answer.workers),
            models=[
                pb.ModelHealth(
                    model_name=model.model_name,
                    model_version=model.model_version,
                    ready_workers=model.ready_workers,
                    total_workers=model.total_workers,
                )
                for model in models
            ],
        )

    async def StreamInfer(
        self, request_iterator: AsyncIterator[pb.StreamInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamInferResponse]:
        """Answers in request order; a failed request is an error entry and the stream goes on.

        Up to ``stream_concurrency`` requests of the stream run at once upstream.
        """
        await self._validator.authorize(context, Access.USER)
        pending: asyncio.Queue[asyncio.Task[pb.StreamInferResponse] | None] = asyncio.Queue(self._concurrency)

        async def read() -> None:
            sequence = 0
            try:
                async for message in request_iterator:
                    task = asyncio.ensure_future(self._one(message, sequence, context))
                    await pending.put(task)
                    sequence += 1
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def _one(
        self, message: pb.StreamInferRequest, sequence: int, context: grpc.aio.ServicerContext
    ) -> pb.StreamInferResponse:
        try:
            if not message.HasField("request"):
                return pb.StreamInferResponse(
                    sequence=sequence,
                    error=pb.StreamInferError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="request is required"
                    ),
                )
            response = await self._infer.ModelInfer(
                message.request,
                timeout=outgoing_timeout(context, self._default_timeout, self._margin),
                metadata=[("x-forwarded-for", peer_ip(context.peer() or ""))],  # inference refuses shared memory
            )
            return pb.StreamInferResponse(sequence=sequence, response=response)
        except grpc.aio.AioRpcError as error:
            failure = upstream_error("inference", error)
            if isinstance(failure, ServiceError):
                return pb.StreamInferResponse(
                    sequence=sequence, error=pb.StreamInferError(code=failure.code.value[0], message=failure.message)
                )
            return pb.StreamInferResponse(
                sequence=sequence, error=pb.StreamInferError(code=error.code().value[0], message=error.details() or "")
            )
        except ServiceError as error:
            return pb.StreamInferResponse(
                sequence=sequence, error=pb.StreamInferError(code=error.code.value[0], message=error.message)
            )
