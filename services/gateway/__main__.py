"""``python -m services.gateway``: run the gateway until SIGTERM/SIGINT."""

import sys

from services.common.runner import run
from services.gateway.app import SERVICE, build_server
from services.gateway.settings import GatewaySettings

sys.exit(run(SERVICE, GatewaySettings, build_server))
