"""Model runtimes: they load a model version's artifact and run it, inside worker processes.

Each runtime module is imported only when a worker asks for it, so a worker serving a Python
model never imports onnxruntime or scikit-learn.
"""

from __future__ import annotations

import importlib

from services.inference.runtimes.base import (
    POLICY_PARAMETERS,
    InputPolicy,
    InvalidInput,
    ModelError,
    Runtime,
    input_policy,
    non_finite_input,
)

#: Runtime name (the config's ``runtime``) -> "module:class".
RUNTIMES = {
    "onnx": "services.inference.runtimes.onnx:OnnxRuntime",
    "python": "services.inference.runtimes.python:PythonRuntime",
    "sklearn": "services.inference.runtimes.sklearn:SklearnRuntime",
}


def create_runtime(name: str) -> Runtime:
    """A new, unloaded runtime of kind ``name``; ValueError if there is no such runtime."""
    target = RUNTIMES.get(name)
    if target is None:
        raise ValueError(f"unknown runtime {name!r} (known: {', '.join(sorted(RUNTIMES))})")
    module_name, _, class_name = target.partition(":")
    runtime: Runtime = getattr(importlib.import_module(module_name), class_name)()
    return runtime


__all__ = [
    "POLICY_PARAMETERS",
    "RUNTIMES",
    "InputPolicy",
    "InvalidInput",
    "ModelError",
    "Runtime",
    "create_runtime",
    "input_policy",
    "non_finite_input",
]
