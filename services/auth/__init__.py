"""The auth service: accounts, sessions and tokens behind ``auth.v1.AuthService``."""

from services.auth.app import build_server
from services.auth.settings import AuthSettings

__all__ = ["AuthSettings", "build_server"]
