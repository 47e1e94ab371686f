"""Assembles the gateway server from its settings.

``gateway.v1.GatewayService`` is served with the generated base class until the gateway's
behaviour lands, so its RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

from gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.server import GrpcServer
from services.gateway.settings import GatewaySettings

SERVICE = "gateway"


async def build_server(settings: GatewaySettings) -> GrpcServer:
    server = GrpcServer(settings, SERVICE)
    server.add_service(
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        gateway_pb2_grpc.GatewayServiceServicer(),  # type: ignore[abstract]  # all UNIMPLEMENTED for now
    )
    return server
