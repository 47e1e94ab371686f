"""``python -m services.inference``: run the inference service until SIGTERM/SIGINT."""

import sys

from services.common.runner import run
from services.inference.app import SERVICE, build_server
from services.inference.settings import InferenceSettings

sys.exit(run(SERVICE, InferenceSettings, build_server))
