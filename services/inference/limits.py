"""What one inference may cost, checked before the model runs.

Plain Python over the model config and the decoded inputs; nothing here knows gRPC.

* Inputs: at most ``max_request_elements`` elements together (checked by
  :func:`~services.inference.codec.decode_request` from the shapes, before any data is read).
* Outputs: :func:`output_estimate` computes each output's shape from the model config before the
  model runs: a -1 dimension is the batch (the first dimension of a batching model), else the
  largest dimension that the inputs have at the same position where they too declare -1 (``sum``:
  ``OUTPUT0 [-1]`` is as long as ``INPUT0 [-1, -1]`` has rows), else 1. :func:`check_outputs` refuses
  (RESOURCE_EXHAUSTED) more than ``max_output_elements`` elements together, or an answer of
  ``max_answer_bytes`` or more (it could not be sent), so a 30-byte request cannot make a 100 MB
  answer. A model that returns more than the estimate is caught after it runs
  (:func:`check_answer_bytes`).
* Values: NaN and infinity are refused for models that do not take them (:func:`check_finite`:
  sklearn and onnx unless ``parameters.allow_non_finite``), and a 0 dimension unless
  ``parameters.allow_zero_size`` (:func:`~services.inference.runtimes.input_policy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.settings import MiB
from services.inference import reasons
from services.inference.codec import ELEMENT_SIZES, SpecLike
from services.inference.runtimes import non_finite_input

if TYPE_CHECKING:
    from services.inference.settings import InferenceSettings

DEFAULT_MAX_REQUEST_ELEMENTS = 2**25
"""32 Mi elements: a 128 MiB FP32 tensor, the most one default-sized message carries."""
DEFAULT_MAX_OUTPUT_ELEMENTS = 2**25
DEFAULT_MAX_ANSWER_BYTES = 128 * MiB
"""``INFERENCE_MAX_MESSAGE_BYTES``' default."""
BYTES_ELEMENT_SIZE = 4
"""The least a BYTES element takes in an answer (its length prefix)."""


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """The service's limits on one inference and how it answers (from :class:`InferenceSettings`)."""

    max_request_elements: int = DEFAULT_MAX_REQUEST_ELEMENTS
    max_output_elements: int = DEFAULT_MAX_OUTPUT_ELEMENTS
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    """The largest message the service sends (``INFERENCE_MAX_MESSAGE_BYTES``)."""
    always_raw_outputs: bool = False
    """Answer in ``raw_output_contents`` even when the inputs came as typed contents (Triton's way)."""

    @classmethod
    def from_settings(cls, settings: InferenceSettings) -> RequestPolicy:
        """The policy of an :class:`~services.inference.settings.InferenceSettings`."""
        return cls(
            max_request_elements=settings.max_request_elements,
            max_output_elements=settings.max_output_elements,
            max_answer_bytes=settings.max_message_bytes,
            always_raw_outputs=settings.always_raw_outputs,
        )


@dataclass(frozen=True, slots=True)
class OutputEstimate:
    shapes: dict[str, tuple[int, ...]]
    """Output name -> its expected shape."""
    elements: int
    """Elements of all outputs together (the model computes every output)."""
    answer_bytes: int
    """The least the returned outputs take in the answer (raw layout; BYTES: 4 bytes an element)."""


def _resolve(dimension: int, position: int, inputs: Sequence[tuple[Sequence[int], tuple[int, ...]]]) -> int:
    if dimension != -1:
        return dimension
    candidates = [
        shape[position]
        for declared, shape in inputs
        if position < len(declared) and declared[position] == -1 and position < len(shape)
    ]
    return max(candidates, default=1)


def output_estimate(
    outputs: Sequence[SpecLike],
    inputs: Sequence[SpecLike],
    arrays: Mapping[str, npt.NDArray[Any]],
    *,
    batch: int | None,
    returned: Sequence[str] = (),
) -> OutputEstimate:
    """The outputs' shapes and sizes for ``arrays``, from the declared shapes (see the module doc).

    ``batch`` is the batch size of a batching model (None if it does not batch); ``returned``
    names the outputs that go into the answer (empty: all).
    """
    pairs = [(spec.shape, arrays[spec.name].shape) for spec in inputs if spec.name in arrays]
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in outputs:
        dims = []
        for position, dimension in enumerate(spec.shape):
            if position == 0 and batch is not None:
                dims.append(batch)
            else:
                dims.append(_resolve(dimension, position, pairs))
        shapes[spec.name] = tuple(dims)
    wanted = set(returned)
    answer = sum(
        math.prod(shapes[spec.name]) * ELEMENT_SIZES.get(spec.datatype, BYTES_ELEMENT_SIZE)
        for spec in outputs
        if not wanted or spec.name in wanted
    )
    return OutputEstimate(shapes, sum(math.prod(shape) for shape in shapes.values()), answer)


def check_outputs(estimate: OutputEstimate, policy: RequestPolicy, model_name: str) -> None:
    """RESOURCE_EXHAUSTED if the estimated outputs are over the policy's limits."""
    if estimate.elements > policy.max_output_elements:
        raise ResourceExhausted(
            f"model {model_name} would answer with {estimate.elements} output elements for these inputs, more than "
            f"the limit of {policy.max_output_elements} per request",
            reason=reasons.TOO_MANY_OUTPUT_ELEMENTS,
        )
    if estimate.answer_bytes >= policy.max_answer_bytes:
        raise ResourceExhausted(
            f"model {model_name} would answer with at least {estimate.answer_bytes} bytes for these inputs, more "
            f"than the largest message the service sends ({policy.max_answer_bytes} bytes)",
            reason=reasons.OUTPUT_TOO_LARGE,
        )


def check_answer_bytes(outputs: Mapping[str, npt.NDArray[Any]], policy: RequestPolicy, model_name: str) -> None:
    """RESOURCE_EXHAUSTED if the outputs a model returned cannot fit in one answer (before encoding them)."""
    size = sum(array.nbytes if array.dtype != object else array.size * BYTES_ELEMENT_SIZE for array in outputs.values())
    if size >= policy.max_answer_bytes:
        raise ResourceExhausted(
            f"model {model_name} returned {size} bytes of outputs, more than the largest message the service "
            f"sends ({policy.max_answer_bytes} bytes)",
            reason=reasons.OUTPUT_TOO_LARGE,
        )


def check_finite(arrays: Mapping[str, np.ndarray], model_name: str) -> None:
    """INVALID_ARGUMENT (``NON_FINITE_INPUT``) if a floating-point input holds NaN or infinity."""
    name = non_finite_input(arrays)
    if name is not None:
        raise InvalidArgument(
            f"input {reasons.clip(name)!r} holds NaN or infinity, which model {model_name} does not take",
            [(f"inputs[{name}]", "must hold finite numbers only")],
            reason=reasons.NON_FINITE_INPUT,
        )


__all__ = [
    "DEFAULT_MAX_OUTPUT_ELEMENTS",
    "DEFAULT_MAX_REQUEST_ELEMENTS",
    "OutputEstimate",
    "RequestPolicy",
    "check_answer_bytes",
    "check_finite",
    "check_outputs",
    "output_estimate",
]
