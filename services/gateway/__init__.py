"""The gateway: the one front door, authenticating and forwarding to auth and inference."""

from services.gateway.app import build_server
from services.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "build_server"]
