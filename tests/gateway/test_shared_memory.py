"""Triton's shared memory through the gateway: never forwarded. The shared-memory methods are answered by the
gateway itself, and an inference that names a region is refused by inference, since it came through a proxy."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from gateway.v1 import gateway_pb2
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc

from tests.gateway.conftest import bearer
from tests.inference.regions import Objects, descriptors, reason, register, simple_in_regions, triton_shm
from tests.rpc import details, rpc_error

NOT_LOCAL = "shared memory needs a client on the same host as the inference service"


async def test_shared_memory_is_refused_through_the_gateway(start_platform):
    platform = await start_platform(models=("simple",), inference={"shared_memory_enabled": True})
    token = await platform.user_token("shm")
    objects = Objects()
    try:
        left = np.arange(16, dtype=np.int32).reshape(1, 16)
        key = objects.make("in", 128, left.tobytes() * 2)
        url = platform.address
        answers = await asyncio.to_thread(
            triton_shm,
            [
                {"url": url, "action": "register", "name": "in", "key": key, "byte_size": 128},
                {"url": url, "action": "status"},
                {"url": url, "action": "unregister"},
            ],
        )
        for answer in answers:
            assert answer["error"]["status"] == "StatusCode.FAILED_PRECONDITION", answer
            assert NOT_LOCAL in answer["error"]["message"]

        # Every shared-memory method, with or without a token: the gateway's own answer, nothing forwarded.
        stub = platform.infer
        calls = [
            stub.SystemSharedMemoryRegister(register("in", key, 128), timeout=5, metadata=bearer(token)),
            stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5),
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5),
            stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=5),
            stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="g"), timeout=5),
            stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(), timeout=5),
        ]
        for call in calls:
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = details(error)["ErrorInfo"]
            assert (info.reason, info.domain) == ("SHARED_MEMORY_NOT_LOCAL", "gateway")
        assert descriptors(objects.prefix) == []  # inference never saw a registration

        # A region registered directly (a client on the inference host) cannot be named through the gateway.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{platform.inference.port}") as channel:
            direct = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await direct.SystemSharedMemoryRegister(register("in", key, 128), timeout=5)
            request = simple_in_regions(out=None)
            assert (await direct.ModelInfer(request, timeout=10)).outputs  # it works directly
            error = await rpc_error(stub.ModelInfer(request, timeout=10, metadata=bearer(token)))
            assert (error.code(), reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_NOT_LOCAL")

            async def one() -> object:
                yield request

            [streamed] = [answer async for answer in stub.ModelStreamInfer(one(), timeout=10, metadata=bearer(token))]
            assert "FAILED_PRECONDITION" in streamed.error_message

            async def wrapped() -> object:
                yield gateway_pb2.StreamInferRequest(request=request)

            answers = [a async for a in platform.ops.StreamInfer(wrapped(), timeout=10, metadata=bearer(token))]
            assert answers[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert NOT_LOCAL in answers[0].error.message
            await direct.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5)
    finally:
        objects.cleanup()
