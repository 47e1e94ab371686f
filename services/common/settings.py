"""Typed settings shared by every service, read once from the environment at start-up.

Each service subclasses :class:`ServiceSettings` with its own environment prefix
(``AUTH_``, ``GATEWAY_``, ``INFERENCE_``) and default ports. :func:`load_settings`
turns a validation failure into :class:`SettingsError`, whose message names the
environment variable at fault, so that start-up stops with a clear line instead of a
pydantic traceback.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has. Field names map to ``<PREFIX><FIELD>`` variables."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, validate_default=True)

    env: Literal["production", "development"] = Field(
        default="development",
        description="Where this runs; `production` refuses development-only shortcuts (and plaintext off loopback).",
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="Address the gRPC and metrics servers bind.")
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics HTTP port.")
    grace_seconds: float = Field(
        default=10.0, ge=0, le=300, description="On SIGTERM, how long in-flight RPCs may finish."
    )
    shutdown_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=300,
        description="On SIGTERM, how long the service reports NOT_SERVING while still serving, before it stops"
        " accepting (so load balancers and clients' round robin move away first).",
    )
    max_message_bytes: int = Field(
        default=4 * MiB, ge=1024, le=2**31 - 1, description="Largest gRPC message received or sent."
    )
    upstream_timeout_seconds: float = Field(
        default=5.0, gt=0, le=600, description="Default deadline of a call to another service."
    )
    deadline_margin_seconds: float = Field(
        default=0.05, ge=0, le=10, description="Kept back from the caller's deadline for the reply."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest level written to the log."
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="JSON lines, or a human-readable console rendering."
    )

    # Transport security (the files are checked when the server is built: services.common.tls)
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain of the gRPC port; with the key, the port serves TLS only. Re-read when"
        " the file changes.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of the certificate.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA certificates: every client must present a certificate that chains to one (mutual TLS).",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="With env production, serve plaintext on a non-loopback host anyway (a service mesh encrypts).",
    )
    metrics_tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate of the metrics HTTP port; with the key, it serves HTTPS only."
    )
    metrics_tls_key_file: Path | None = Field(default=None, description="PEM private key of that certificate.")
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="A plaintext port serving only grpc.health.v1.Health (Kubernetes gRPC probes speak no TLS);"
        " unset: none (0 picks a free port).",
    )

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServiceSettings:
        cls = type(self)
        for cert, key in (("tls_cert_file", "tls_key_file"), ("metrics_tls_cert_file", "metrics_tls_key_file")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                missing, given = (key, cert) if getattr(self, key) is None else (cert, key)
                raise ValueError(f"{env_name(cls, missing)} is required when {env_name(cls, given)} is set")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"{env_name(cls, 'tls_client_ca_file')} needs {env_name(cls, 'tls_cert_file')} and"
                f" {env_name(cls, 'tls_key_file')} (mutual TLS is TLS first)"
            )
        if self.plaintext_off_loopback and self.env == "production" and not self.allow_plaintext:
            raise ValueError(
                f"{env_name(cls, 'host')}={self.host} is not loopback and {env_name(cls, 'tls_cert_file')} is"
                f" unset: plaintext is refused when {env_name(cls, 'env')}=production (set the TLS files, or"
                f" {env_name(cls, 'allow_plaintext')}=true when a service mesh encrypts the traffic)"
            )
        return self

    @property
    def plaintext_off_loopback(self) -> bool:
        """The gRPC port speaks plaintext where other machines can reach it."""
        return self.tls_mode == "plaintext" and not is_loopback(self.host)

    @property
    def tls_mode(self) -> Literal["plaintext", "tls", "mtls"]:
        """What the gRPC port speaks."""
        if self.tls_cert_file is None:
            return "plaintext"
        return "mtls" if self.tls_client_ca_file is not None else "tls"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class SettingsError(Exception):
    """A setting from the environment is invalid; the message names the variable."""


S = TypeVar("S", bound=ServiceSettings)


def env_name(settings_cls: type[ServiceSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``settings_cls``."""
    prefix = settings_cls.model_config.get("env_prefix") or ""
    return f"{prefix}{field}".upper()


def load_settings(settings_cls: type[S]) -> S:
    """Read ``settings_cls`` from the environment, or raise :class:`SettingsError`."""
    try:
        return settings_cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            problems.append(f"{env_name(settings_cls, field)}: {error['msg']}" if field else error["msg"])
        raise SettingsError("invalid setting " + "; ".join(problems)) from None
