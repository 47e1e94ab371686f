"""What every runtime provides, and the output conversion they share.

A runtime runs inside a worker process (never in the gRPC server process) and serves one
model version::

    runtime = create_runtime(config.runtime)
    runtime.load(version_dir, config)      # raises if the version cannot be served
    outputs = runtime.predict(inputs)      # {input name: array} -> {output name: array}
    runtime.unload()

``predict`` receives inputs already checked against ``config.inputs`` (every declared input,
declared dtype and shape; BYTES = numpy object arrays of ``bytes``) and returns every declared
output with its declared dtype. It raises :class:`ModelError` when the model fails, which the
caller turns into INTERNAL for that request only, and :class:`InvalidInput` when the input is
the problem (INVALID_ARGUMENT, reason ``MODEL_REJECTED_INPUT`` or ``NON_FINITE_INPUT``).

Two ``parameters`` of every model config are the server's, not the runtime's (:func:`input_policy`)::

    parameters:
      allow_zero_size: true     # accept tensors with a 0 dimension (default: refused, ZERO_SIZE_DIMENSION)
      allow_non_finite: false   # refuse NaN/inf in float inputs (default: false for sklearn and onnx,
                                # true for python models)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from services.inference.repository import ModelConfig, TensorSpec


class ModelError(Exception):
    """The model (its artifact or its code) failed to load or to predict."""


class InvalidInput(ModelError):
    """The input is what is wrong, not the model: the client gets INVALID_ARGUMENT with this message.

    A :class:`ModelError` (the prediction failed), which the worker answers as the client's fault.

    Model code raises it from ``predict`` (``from services.inference.runtimes import InvalidInput``);
    the message reaches the client (cut to 512 characters), so it must not carry secrets.
    """


POLICY_PARAMETERS = frozenset({"allow_zero_size", "allow_non_finite"})
"""The ``parameters`` every runtime leaves to the server (:func:`input_policy`)."""
_FINITE_BY_DEFAULT = frozenset({"sklearn", "onnx"})


@dataclass(frozen=True, slots=True)
class InputPolicy:
    """What a model accepts beyond its declared inputs' datatypes and shapes."""

    allow_zero_size: bool = False
    """Tensors with a 0 dimension may reach the model."""
    allow_non_finite: bool = True
    """NaN and infinity in floating-point inputs may reach the model."""


def input_policy(config: ModelConfig) -> InputPolicy:
    """The :class:`InputPolicy` of ``config``; ModelError for a policy parameter that is not a bool."""
    values: dict[str, bool] = {"allow_non_finite": config.runtime not in _FINITE_BY_DEFAULT}
    for name in sorted(POLICY_PARAMETERS):
        if name in config.parameters:
            value = config.parameters[name]
            if not isinstance(value, bool):
                raise ModelError(f"parameters.{name}: must be true or false, not {value!r}")
            values[name] = value
    return InputPolicy(**values)


def runtime_parameters(config: ModelConfig) -> dict[str, object]:
    """``config.parameters`` without the server's :data:`POLICY_PARAMETERS` (the runtime's own)."""
    return {key: value for key, value in config.parameters.items() if key not in POLICY_PARAMETERS}


def non_finite_input(inputs: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first floating-point input holding NaN or infinity, or None."""
    for name, array in inputs.items():
        if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
            return name
    return None


def check_finite(config: ModelConfig, inputs: Mapping[str, np.ndarray]) -> None:
    """Raise InvalidInput if ``config`` refuses non-finite values and an input holds some."""
    if not input_policy(config).allow_non_finite:
        refuse_non_finite(config.name, inputs)


def refuse_non_finite(model: str, inputs: Mapping[str, np.ndarray]) -> None:
    """Raise InvalidInput if an input holds NaN or infinity (for a runtime that decided at load to refuse them)."""
    name = non_finite_input(inputs)
    if name is not None:
        raise InvalidInput(f"input {name!r} holds NaN or infinity, which model {model} does not take")


@runtime_checkable
class Runtime(Protocol):
    def load(self, version_dir: Path, config: ModelConfig) -> None:
        """Load the artifact of ``version_dir``; ModelError if it cannot be served."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; ModelError if it fails."""

    def unload(self) -> None:
        """Release the model; calling it twice is harmless."""


def _to_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview | np.bytes_):
        return bytes(item)
    raise TypeError(f"{type(item).__name__} is not bytes or str")


def as_bytes_array(value: object) -> np.ndarray:
    """An object array of ``bytes`` from bytes, str (UTF-8 encoded) or arrays of them."""
    array = np.asarray(value, dtype=object)
    result = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        result[index] = _to_bytes(item)
    return result


def cast_output(spec: TensorSpec, value: object) -> np.ndarray:
    """``value`` as an array of the declared datatype and shape; ModelError if it does not fit.

    Numeric casts must stay within the same kind or go to a wider one (float64 -> FP32 is fine,
    float -> INT64 is not: a model that returns fractions for an integer output is wrong).
    """
    try:
        if spec.datatype == "BYTES":
            array = as_bytes_array(value)
        else:
            array = np.asarray(value)
            if array.dtype == object:
                raise TypeError("an object array for a numeric output")
            array = array.astype(spec.dtype, casting="same_kind", copy=False)
    except (TypeError, ValueError) as error:
        raise ModelError(f"output {spec.name}: cannot be returned as {spec.datatype}: {error}") from error
    if not spec.accepts_shape(array.shape):
        raise ModelError(
            f"output {spec.name}: shape {list(array.shape)} does not match the declared {list(spec.shape)}"
        )
    return array


def cast_outputs(config: ModelConfig, values: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Every declared output of ``config`` from ``values``, cast; ModelError if one is missing or extra."""
    declared = {spec.name for spec in config.outputs}
    if not isinstance(values, Mapping):
        raise ModelError(f"the model returned {type(values).__name__}, not a mapping of output name to array")
    missing = sorted(declared - set(values))
    extra = sorted(str(name) for name in set(values) - declared)
    if missing or extra:
        raise ModelError(f"the model's outputs do not match the config: missing {missing}, undeclared {extra}")
    return {spec.name: cast_output(spec, values[spec.name]) for spec in config.outputs}
