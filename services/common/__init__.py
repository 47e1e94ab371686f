"""The chassis every service is built on: settings, server bootstrap, interceptors, clients."""

from services.common.client import create_channel, outgoing_timeout
from services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from services.common.logs import configure_logging, fields
from services.common.runner import run
from services.common.server import LIVENESS, READINESS, GrpcServer, serve_until_signal
from services.common.settings import MiB, ServiceSettings, SettingsError, load_settings

__all__ = [
    "LIVENESS",
    "READINESS",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GrpcServer",
    "Internal",
    "InvalidArgument",
    "MiB",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "ServiceSettings",
    "SettingsError",
    "Unauthenticated",
    "Unavailable",
    "configure_logging",
    "create_channel",
    "fields",
    "load_settings",
    "outgoing_timeout",
    "run",
    "serve_until_signal",
]
