"""Typed settings shared by every service, read once from the environment at start-up.

Each service subclasses :class:`ServiceSettings` with its own environment prefix
(``AUTH_``, ``GATEWAY_``, ``INFERENCE_``) and default ports. :func:`load_settings`
turns a validation failure into :class:`SettingsError`, whose message names the
environment variable at fault, so that start-up stops with a clear line instead of a
pydantic traceback.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has. Field names map to ``<PREFIX><FIELD>`` variables."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, validate_default=True)

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
