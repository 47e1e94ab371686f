"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe V2) endpoints.

The server endpoints (live, ready, metadata) answer now; the model endpoints answer
UNIMPLEMENTED (the generated base class) until the model repository and worker pool land.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Thin servicer: protobuf in, the inference core, protobuf out."""

    def __init__(self, *, name: str, version: str, extensions: Sequence[str], is_ready: Callable[[], bool]):
        self._metadata = pb.ServerMetadataResponse(name=name, version=version, extensions=list(extensions))
        self._is_ready = is_ready

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._metadata
