"""Settings of the gateway (environment prefix ``GATEWAY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import MiB, ServiceSettings, env_name


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(
        default=9101, ge=0, le=65535, description="HTTP port of /metrics and /internal/ml/health."
    )
    max_message_bytes: int = Field(
        default=128 * MiB, ge=1024, le=2**31 - 1, description="Largest gRPC message received or sent."
    )
    auth_target: str = Field(
        default="dns:///127.0.0.1:50052", min_length=1, description="gRPC target of the auth service."
    )
    inference_target: str = Field(
        default="dns:///127.0.0.1:50053", min_length=1, description="gRPC target of the inference service."
    )
    token_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        le=5,
        description="How long a validated token is trusted without asking auth again: the longest a revoked "
        "session can still pass (0 = ask every time).",
    )
    token_cache_size: int = Field(default=10_000, ge=0, description="Most validated tokens kept in the cache.")
    upstream_check_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often auth and inference health (and worker health) are checked."
    )
    inference_passthrough: bool = Field(
        default=True, description="Forward inference messages as raw bytes (false: decode and re-encode them)."
    )
    stream_concurrency: int = Field(
        default=8, ge=1, le=256, description="StreamInfer requests of one stream in flight at once."
    )
    upstream_tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA certificates; set: the calls to auth and inference use TLS, their certificates checked"
        " against it.",
    )
    upstream_tls_cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate the gateway presents upstream (mutual TLS); re-read when it changes.",
    )
    upstream_tls_key_file: Path | None = Field(default=None, description="PEM private key of that certificate.")
    upstream_tls_server_name: str | None = Field(
        default=None,
        min_length=1,
        description="The name checked in both upstreams' certificates instead of the targets' host names"
        " (grpc.ssl_target_name_override).",
    )

    @model_validator(mode="after")
    def _upstream_tls(self) -> GatewaySettings:
        cls = type(self)
        cert, key = self.upstream_tls_cert_file, self.upstream_tls_key_file
        if (cert is None) != (key is None):
            missing, given = ("upstream_tls_key_file", "upstream_tls_cert_file")
            if key is not None:
                missing, given = given, missing
            raise ValueError(f"{env_name(cls, missing)} is required when {env_name(cls, given)} is set")
        ca = env_name(cls, "upstream_tls_ca_file")
        if self.upstream_tls_ca_file is None:
            for field in ("upstream_tls_cert_file", "upstream_tls_server_name"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{env_name(cls, field)} needs {ca} (the CA the upstreams are checked against)")
        return self
