"""Settings of the auth service (environment prefix ``AUTH_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_")

    port: int = Field(default=50052, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus /metrics HTTP port.")
