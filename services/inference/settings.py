"""Settings of the inference service (environment prefix ``INFERENCE_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import MiB, ServiceSettings


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INFERENCE_")

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(default=9103, ge=0, le=65535, description="Prometheus /metrics HTTP port.")
    max_message_bytes: int = Field(
        default=128 * MiB, ge=1024, le=2**31 - 1, description="Largest gRPC message received or sent."
    )
