"""``python -m services.auth``: run the auth service until SIGTERM/SIGINT."""

import sys

from services.auth.app import SERVICE, build_server
from services.auth.settings import AuthSettings
from services.common.runner import run

sys.exit(run(SERVICE, AuthSettings, build_server))
