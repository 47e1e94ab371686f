"""Assembles the inference server from its settings."""

from __future__ import annotations

from importlib import metadata

from inference import grpc_service_pb2, grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2, worker_pool_pb2_grpc

from services.common.server import GrpcServer
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings

SERVICE = "inference"
SERVER_NAME = "ml-platform-inference"


async def build_server(settings: InferenceSettings) -> GrpcServer:
    server = GrpcServer(settings, SERVICE)
    servicer = InferenceServicer(  # type: ignore[abstract]  # model RPCs UNIMPLEMENTED for now
        name=SERVER_NAME,
        version=metadata.version("ml-platform"),
        extensions=[],
        is_ready=lambda: server.ready,
    )
    server.add_service(
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        servicer,
    )
    server.add_service(
        worker_pool_pb2.DESCRIPTOR.services_by_name["WorkerPoolService"],
        worker_pool_pb2_grpc.add_WorkerPoolServiceServicer_to_server,
        worker_pool_pb2_grpc.WorkerPoolServiceServicer(),  # type: ignore[abstract]  # all UNIMPLEMENTED for now
    )
    return server
