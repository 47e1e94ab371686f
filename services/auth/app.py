"""Assembles the auth server from its settings.

The ``auth.v1.AuthService`` contract is served with the generated base class for now: every
RPC answers UNIMPLEMENTED until the auth behaviour lands, and tools see the whole contract
through reflection.
"""

from __future__ import annotations

from auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth.settings import AuthSettings
from services.common.server import GrpcServer

SERVICE = "auth"


async def build_server(settings: AuthSettings) -> GrpcServer:
    server = GrpcServer(settings, SERVICE)
    server.add_service(
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
        auth_pb2_grpc.AuthServiceServicer(),  # type: ignore[abstract]  # all UNIMPLEMENTED for now
    )
    return server
