"""Assembles the gateway: channels to auth and inference, forwarding, access rules, monitoring."""

from __future__ import annotations

from pathlib import Path

from auth.v1 import auth_pb2, auth_pb2_grpc
from gateway.v1 import gateway_pb2, gateway_pb2_grpc
from inference import grpc_service_pb2

from services.common.errors import FailedPrecondition
from services.common.server import GrpcServer
from services.common.settings import env_name
from services.common.tls import ClientCertificates, PemFile
from services.gateway.access import Access, TokenValidator
from services.gateway.forwarding import Upstream, forwarding_handler, refusing_handler
from services.gateway.monitor import UpstreamMonitor
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings

SERVICE = "gateway"
ML_HEALTH_PATH = "/internal/ml/health"

AUTH_ACCESS = {
    "Register": Access.OPEN,
    "Login": Access.OPEN,
    "RefreshToken": Access.OPEN,
    "Logout": Access.OPEN,  # auth checks the forwarded bearer token itself
    "ChangePassword": Access.OPEN,  # likewise
    "RequestPasswordReset": Access.OPEN,
    "ResetPassword": Access.OPEN,
    "ValidateToken": Access.ADMIN,
    "UnlockAccount": Access.ADMIN,
    "ListAuditEvents": Access.ADMIN,
}

INFERENCE_ACCESS = {
    "ServerLive": Access.OPEN,
    "ServerReady": Access.OPEN,
    "ServerMetadata": Access.USER,
    "ModelReady": Access.USER,
    "ModelMetadata": Access.USER,
    "ModelInfer": Access.USER,
    "ModelStreamInfer": Access.USER,
    "ModelConfig": Access.USER,
    "ModelStatistics": Access.USER,
    "RepositoryIndex": Access.USER,
    "RepositoryModelLoad": Access.ADMIN,
    "RepositoryModelUnload": Access.ADMIN,
}

# Triton's shared memory needs the client on the inference service's host: answered here, never forwarded.
SHARED_MEMORY_METHODS = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
)
SHARED_MEMORY_NOT_LOCAL = "SHARED_MEMORY_NOT_LOCAL"


def _shared_memory_refused() -> FailedPrecondition:
    return FailedPrecondition(
        "shared memory needs a client on the same host as the inference service: the gateway does not forward "
        "the shared memory methods; call the inference service directly",
        reason=SHARED_MEMORY_NOT_LOCAL,
    )


_INFERENCE = "inference.GRPCInferenceService"
AUTH_IDEMPOTENT = [("auth.v1.AuthService", "ValidateToken"), ("grpc.health.v1.Health", "")]
INFERENCE_IDEMPOTENT = [
    (_INFERENCE, name)
    for name in (
        "ServerLive",
        "ServerReady",
        "ServerMetadata",
        "ModelReady",
        "ModelMetadata",
        "ModelConfig",
        "ModelStatistics",
    )
] + [("inference.v1.WorkerPoolService", "GetWorkerHealth"), ("grpc.health.v1.Health", "")]


def upstream_tls(settings: GatewaySettings) -> ClientCertificates | None:
    """The CA (and client certificate) of the calls to auth and inference; SettingsError for a bad file."""
    if settings.upstream_tls_ca_file is None:
        return None

    def pem(path: Path | None, field: str) -> PemFile | None:
        return None if path is None else PemFile(path, env_name(GatewaySettings, field))

    return ClientCertificates(
        PemFile(settings.upstream_tls_ca_file, env_name(GatewaySettings, "upstream_tls_ca_file")),
        pem(settings.upstream_tls_cert_file, "upstream_tls_cert_file"),
        pem(settings.upstream_tls_key_file, "upstream_tls_key_file"),
    )


async def build_server(settings: GatewaySettings) -> GrpcServer:
    tls, name = upstream_tls(settings), settings.upstream_tls_server_name
    server = GrpcServer(settings, SERVICE)
    server.initially_ready = False  # ready once both upstreams answer
    auth_channel = server.connect(
        settings.auth_target, idempotent_methods=AUTH_IDEMPOTENT, tls=tls, tls_server_name=name
    )
    inference_channel = server.connect(
        settings.inference_target, idempotent_methods=INFERENCE_IDEMPOTENT, tls=tls, tls_server_name=name
    )
    timeout, margin = settings.upstream_timeout_seconds, settings.deadline_margin_seconds
    validator = TokenValidator(
        auth_pb2_grpc.AuthServiceStub(auth_channel),
        cache_seconds=settings.token_cache_seconds,
        cache_size=settings.token_cache_size,
        default_timeout=timeout,
        margin=margin,
    )
    auth_descriptor = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
    server.add_generic_handlers(
        auth_descriptor.full_name,
        [
            forwarding_handler(
                auth_descriptor,
                Upstream("auth", auth_channel, timeout, margin, forward_authorization=True),
                validator,
                AUTH_ACCESS,
            )
        ],
    )
    inference_descriptor = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    server.add_generic_handlers(
        inference_descriptor.full_name,
        [
            forwarding_handler(
                inference_descriptor,
                Upstream("inference", inference_channel, timeout, margin, forward_authorization=False),
                validator,
                INFERENCE_ACCESS,
                decode=not settings.inference_passthrough,
            ),
            refusing_handler(inference_descriptor, SHARED_MEMORY_METHODS, _shared_memory_refused),
        ],
    )
    server.add_service(
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        GatewayServicer(
            inference=inference_channel,
            validator=validator,
            default_timeout=timeout,
            margin=margin,
            stream_concurrency=settings.stream_concurrency,
        ),
    )
    monitor = UpstreamMonitor(
        auth=auth_channel,
        inference=inference_channel,
        interval=settings.upstream_check_interval_seconds,
        timeout=min(timeout, max(settings.upstream_check_interval_seconds, 0.5)),
        set_ready=server.set_ready,
    )
    server.after_start(monitor.run)
    server.add_http_route(ML_HEALTH_PATH, monitor.http_health)
    return server
