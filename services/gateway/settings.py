"""Settings of the gateway (environment prefix ``GATEWAY_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import MiB, ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="Prometheus /metrics HTTP port.")
    max_message_bytes: int = Field(
        default=128 * MiB, ge=1024, le=2**31 - 1, description="Largest gRPC message received or sent."
    )
    auth_target: str = Field(
        default="dns:///127.0.0.1:50052", min_length=1, description="gRPC target of the auth service."
    )
    inference_target: str = Field(
        default="dns:///127.0.0.1:50053", min_length=1, description="gRPC target of the inference service."
    )
