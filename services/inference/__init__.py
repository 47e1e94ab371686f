"""The inference service: the Open Inference Protocol over a supervised pool of model workers."""

from services.inference.app import build_server
from services.inference.settings import InferenceSettings

__all__ = ["InferenceSettings", "build_server"]
