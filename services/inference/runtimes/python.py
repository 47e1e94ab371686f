"""Models written as a Python class: ``<version>/model.py``.

The file (``parameters.module``, default ``model.py``, a path inside the version directory) is
imported on its own under a unique module name; it cannot import files beside it (read them in
``load`` instead). The class (``parameters.class``, default ``Model``) is built with no
arguments and provides::

    class Model:
        def load(self, version_dir: Path) -> None: ...        # optional: read weights etc.
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
        def unload(self) -> None: ...                          # optional: release resources

``inputs`` holds every declared input (BYTES: object arrays of ``bytes``). ``predict`` returns
every declared output and nothing else; values are converted to the declared datatypes (str
becomes UTF-8 bytes for BYTES). An exception raised by the model code becomes
:class:`~services.inference.runtimes.base.ModelError` (INTERNAL), except
:class:`~services.inference.runtimes.base.InvalidInput`, which the model raises for input it
cannot take and which passes through (INVALID_ARGUMENT with its message)::

    from services.inference.runtimes import InvalidInput

    if not np.isfinite(x).all():
        raise InvalidInput("INPUT0 must be finite")

The code runs in the worker process with that process's rights: only serve model files you trust.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from services.common.logs import fields
from services.inference.repository import ModelConfig
from services.inference.runtimes.base import (
    InvalidInput,
    ModelError,
    cast_outputs,
    check_finite,
    input_policy,
    runtime_parameters,
)

DEFAULT_MODULE = "model.py"
DEFAULT_CLASS = "Model"
_PARAMETERS = frozenset({"module", "class"})
_counter = itertools.count(1)

log = logging.getLogger(__name__)


def _import(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


class PythonRuntime:
    def __init__(self) -> None:
        self._model: Any = None
        self._config: ModelConfig | None = None
        self._module_name = ""

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        if self._model is not None:
            self.unload()
        input_policy(config)
        parameters = runtime_parameters(config)
        unknown = sorted(set(parameters) - _PARAMETERS)
        if unknown:
            raise ModelError(f"parameters: unknown fields {unknown} (python takes module and class)")
        module_file = parameters.get("module", DEFAULT_MODULE)
        class_name = parameters.get("class", DEFAULT_CLASS)
        if not isinstance(module_file, str) or not module_file.endswith(".py"):
            raise ModelError(f"parameters.module: must be the name of a .py file, not {module_file!r}")
        if not isinstance(class_name, str) or not class_name.isidentifier():
            raise ModelError(f"parameters.class: must be a class name, not {class_name!r}")
        root = version_dir.resolve()
        path = (root / module_file).resolve()
        if not path.is_relative_to(root):
            raise ModelError(f"parameters.module: {module_file!r} is outside the version directory")
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
        module_name = f"_inference_model_{next(_counter)}_{config.name.replace('.', '_').replace('-', '_')}"
        try:
            module = _import(path, module_name)
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(f"{path}: import failed: {type(error).__name__}: {error}") from error
        try:
            model_class = getattr(module, class_name, None)
            if not isinstance(model_class, type):
                raise ModelError(f"{path}: has no class {class_name}")
            model = model_class()
            if not callable(getattr(model, "predict", None)):
                raise ModelError(f"{path}: {class_name} has no predict method")
            if callable(getattr(model, "load", None)):
                model.load(version_dir)
        except ModelError:
            del sys.modules[module_name]
            raise
        except Exception as error:
            del sys.modules[module_name]
            raise ModelError(f"{path}: {class_name} failed to load: {type(error).__name__}: {error}") from error
        self._model, self._config, self._module_name = model, config, module_name

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        config = self._config
        if config is None:
            raise ModelError("the model is not loaded")
        check_finite(config, inputs)
        try:
            outputs = self._model.predict(inputs)
        except InvalidInput:
            raise
        except Exception as error:
            raise ModelError(f"model {config.name}: {type(error).__name__}: {error}") from error
        return cast_outputs(config, outputs)

    def unload(self) -> None:
        """Call the model's ``unload`` (a failure is logged, not raised) and forget the module."""
        model, config, self._model, self._config = self._model, self._config, None, None
        if model is not None and callable(getattr(model, "unload", None)):
            try:
                model.unload()
            except Exception:
                log.exception("model.unload_failed", extra=fields(model=config.name if config else ""))
        sys.modules.pop(self._module_name, None)
        self._module_name = ""
