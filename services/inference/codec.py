"""Open Inference Protocol tensors <-> numpy arrays.

Plain Python and numpy over the generated ``inference`` messages; nothing here knows gRPC.

Decoding a request (:func:`decode_request`) validates every input against the model's declared
inputs and raises :class:`~services.common.errors.InvalidArgument` naming the tensor in the message
and in a field violation (``inputs[NAME]``, ``inputs[NAME].datatype``, ``inputs[NAME].shape``,
``inputs[NAME].contents``, ``inputs[NAME].raw_input_contents``), with an ErrorInfo reason from
:mod:`services.inference.reasons` (``SHAPE_MISMATCH``, ``RAW_SIZE_MISMATCH``, ...). Names longer
than :data:`~services.inference.reasons.MAX_NAME_CHARS` are refused first (``NAME_TOO_LONG``,
field ``inputs[INDEX].name``); client strings in messages are cut (:func:`~services.inference.reasons.clip`).
Inputs with more than ``max_elements`` elements together raise
:class:`~services.common.errors.ResourceExhausted` (``TOO_MANY_INPUT_ELEMENTS``) before their data
is read; a 0 dimension is ``ZERO_SIZE_DIMENSION`` unless ``allow_zero_size``.

Wire rules (see ``docs/OPEN_INFERENCE_PROTOCOL.md``):

* Raw data is little-endian, row-major, no padding; BOOL is one byte (0/1); BYTES is, per element,
  a 4-byte little-endian length then the bytes. ``raw_input_contents[k]`` belongs to the k-th input
  without typed ``contents``. Raw numeric tensors are decoded without copying (``np.frombuffer``):
  the arrays are **read-only** views of the request's bytes.
* Typed contents use one field per datatype (:data:`CONTENTS_FIELDS`); FP16 and BF16 travel raw only.
* BF16: numpy has no bfloat16, so a BF16 tensor is a ``uint16`` array holding the raw bfloat16 bits
  (:func:`bf16_bits_to_float32` widens them). On encode, a BF16 tensor may be given as those
  ``uint16`` bits, as an ``ml_dtypes.bfloat16`` array, or as any float/int array (rounded to nearest
  even by :func:`float32_to_bf16_bits`).
* BYTES tensors are numpy ``object`` arrays of ``bytes``; ``str`` elements (and ``S``/``U`` arrays)
  are accepted on encode and sent UTF-8 encoded.

Encoding a response (:func:`encode_response`) answers raw (``raw_output_contents``, one entry per
output, in order) when asked to or when any returned output is FP16/BF16, since tritonclient
matches raw entries to outputs by position; typed contents otherwise. :func:`raw_outputs` decides
for a request: its ``raw_output`` parameter (a bool) if set, else raw when the inputs were raw or
the server always answers raw (Triton does). A model result that does not fit the declared
outputs raises :class:`ModelOutputError` (a server-side fault).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from inference import grpc_service_pb2 as pb

from services.common.errors import InvalidArgument, ResourceExhausted
from services.inference import reasons
from services.inference.reasons import check_name, clip

Array = npt.NDArray[Any]
ParameterValue = bool | int | str | float

DATATYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "BOOL": np.dtype(np.bool_),
        "UINT8": np.dtype("u1"),
        "UINT16": np.dtype("<u2"),
        "UINT32": np.dtype("<u4"),
        "UINT64": np.dtype("<u8"),
        "INT8": np.dtype("i1"),
        "INT16": np.dtype("<i2"),
        "INT32": np.dtype("<i4"),
        "INT64": np.dtype("<i8"),
        "FP16": np.dtype("<f2"),
        "BF16": np.dtype("<u2"),  # raw bfloat16 bits: numpy has no bfloat16
        "FP32": np.dtype("<f4"),
        "FP64": np.dtype("<f8"),
        "BYTES": np.dtype(object),
    }
)
"""OIP datatype -> the numpy dtype of decoded arrays (little-endian on the wire)."""

ELEMENT_SIZES: Mapping[str, int] = MappingProxyType(
    {name: dtype.itemsize for name, dtype in DATATYPES.items() if name != "BYTES"}
)
"""Bytes per element in raw contents; BYTES is variable-sized and absent."""

RAW_ONLY: frozenset[str] = frozenset({"FP16", "BF16"})
"""Datatypes that have no typed-contents field."""

CONTENTS_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }
)
"""OIP datatype -> the ``InferTensorContents`` field that carries it."""

# The numpy dtype of each typed-contents field (values are read at this width, then range-checked).
_FIELD_DTYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "bool_contents": np.dtype(np.bool_),
        "int_contents": np.dtype(np.int32),
        "int64_contents": np.dtype(np.int64),
        "uint_contents": np.dtype(np.uint32),
        "uint64_contents": np.dtype(np.uint64),
        "fp32_contents": np.dtype(np.float32),
        "fp64_contents": np.dtype(np.float64),
    }
)
_MAX_ELEMENTS = 2**63 - 1
_LENGTH = struct.Struct("<I")
RAW_OUTPUT_PARAMETER = "raw_output"
"""Request parameter (bool_param): true = answer in ``raw_output_contents``, false = typed contents."""


class _DataError(ValueError):
    """Tensor data that does not fit its shape or datatype; ``reason`` is its ErrorInfo reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _quoted(name: str) -> str:
    return repr(clip(name))


class SpecLike(Protocol):
    """A declared tensor: the model repository's ``TensorSpec`` fits. A -1 dimension matches any size."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    """A validated ``ModelInferRequest``."""

    inputs: dict[str, Array]
    """Input name -> array (raw numeric inputs are read-only views of the request bytes)."""
    raw: bool
    """True if the request used ``raw_input_contents``."""
    requested_outputs: list[str]
    """Names of the requested outputs in request order; empty means all."""
    id: str
    parameters: dict[str, ParameterValue]
    """Request parameters; a parameter without a value is left out."""


class ModelOutputError(Exception):
    """A model returned outputs that do not fit its declared outputs (a server-side fault)."""


class SuppliedInputs(Protocol):
    """Inputs whose raw bytes come from outside the request (Triton's shared memory regions).

    :func:`decode_request` calls ``read`` once per such input, after its datatype, shape and the
    element limit have been checked; the bytes have the raw layout and are checked as raw contents.
    """

    def __contains__(self, name: object, /) -> bool: ...
    def read(self, name: str, datatype: str, count: int) -> bytes: ...


# --- requests -------------------------------------------------------------------------------------


def decode_request(
    request: pb.ModelInferRequest,
    inputs: Sequence[SpecLike],
    max_elements: int | None = None,
    *,
    allow_zero_size: bool = True,
    supplied: SuppliedInputs | None = None,
) -> DecodedRequest:
    """Validate ``request`` against the declared ``inputs`` and decode its tensors.

    ``max_elements`` bounds the elements of all inputs together; ``allow_zero_size`` False refuses
    tensors with a 0 dimension (the protocol allows them; many models fail on them). Inputs in
    ``supplied`` take their bytes from it instead of the request (and make the request raw).
    """
    for index, tensor in enumerate(request.inputs):
        check_name(f"inputs[{index}].name", tensor.name)
    for index, output in enumerate(request.outputs):
        check_name(f"outputs[{index}].name", output.name)
    declared = {spec.name: spec for spec in inputs}
    raw_entries = list(request.raw_input_contents)  # one bytes object per entry, read once
    if raw_entries:
        _check_raw_count(request, len(raw_entries), supplied)
    arrays: dict[str, Array] = {}
    next_raw = 0
    total = 0
    for tensor in request.inputs:
        name = tensor.name
        spec = declared.get(name)
        if spec is None:
            known = ", ".join(repr(n) for n in declared) or "none"
            raise InvalidArgument(
                f"unknown input {_quoted(name)}; the model's inputs are: {known}",
                [(f"inputs[{name}]", "is not an input of the model")],
                reason=reasons.UNKNOWN_INPUT,
            )
        if name in arrays:
            raise InvalidArgument(
                f"input {_quoted(name)} is given more than once",
                [(f"inputs[{name}]", "is a duplicate")],
                reason=reasons.DUPLICATE_INPUT,
            )
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input {_quoted(name)} has datatype {_quoted(tensor.datatype)}, the model expects {spec.datatype}",
                [(f"inputs[{name}].datatype", f"must be {spec.datatype}")],
                reason=reasons.DATATYPE_MISMATCH,
            )
        shape = tuple(tensor.shape)
        count = _check_shape(name, shape, spec.shape)
        if not allow_zero_size and 0 in shape:
            raise InvalidArgument(
                f"input {_quoted(name)} has shape {list(shape)}: a 0 dimension (no elements) is not accepted "
                "by this model",
                [(f"inputs[{name}].shape", "dimensions must be > 0")],
                reason=reasons.ZERO_SIZE_DIMENSION,
            )
        total += count
        if max_elements is not None and total > max_elements:
            raise ResourceExhausted(
                f"input {_quoted(name)} brings the request to {total} input elements, more than the limit of "
                f"{max_elements} per request",
                reason=reasons.TOO_MANY_INPUT_ELEMENTS,
            )
        has_contents = tensor.HasField("contents")
        try:
            if supplied is not None and name in supplied:
                where = f"inputs[{name}].parameters"
                data = supplied.read(name, spec.datatype, count)
                array = _raw_to_array(data, spec.datatype, shape, count, "the data in shared memory")
            elif raw_entries and not has_contents:
                where = f"inputs[{name}].raw_input_contents"
                array = _raw_to_array(
                    raw_entries[next_raw], spec.datatype, shape, count, f"raw_input_contents[{next_raw}]"
                )
                next_raw += 1
            else:
                where = f"inputs[{name}].contents"
                if not has_contents and count:
                    raise _DataError(reasons.MISSING_DATA, "has no data: neither typed contents nor raw_input_contents")
                array = _contents_to_array(tensor.contents, spec.datatype, shape, count)
        except _DataError as error:
            raise InvalidArgument(
                f"input {_quoted(name)}: {error}", [(where, str(error))], reason=error.reason
            ) from None
        arrays[name] = array
    missing = [name for name in declared if name not in arrays]
    if missing:
        raise InvalidArgument(
            f"missing input {missing[0]!r}; the model needs: {', '.join(repr(n) for n in declared)}",
            [(f"inputs[{name}]", "is required") for name in missing],
            reason=reasons.MISSING_INPUT,
        )
    return DecodedRequest(
        inputs=arrays,
        raw=bool(raw_entries) or supplied is not None,
        requested_outputs=[output.name for output in request.outputs],
        id=request.id,
        parameters=_decode_parameters(request.parameters),
    )


def check_requested_outputs(names: Sequence[str], outputs: Sequence[SpecLike]) -> None:
    """Raise InvalidArgument for a requested output the model does not have, or one asked twice."""
    declared = {spec.name for spec in outputs}
    seen: set[str] = set()
    for index, name in enumerate(names):
        check_name(f"outputs[{index}].name", name)
        if name not in declared:
            known = ", ".join(repr(spec.name) for spec in outputs) or "none"
            raise InvalidArgument(
                f"unknown output {_quoted(name)}; the model's outputs are: {known}",
                [(f"outputs[{name}]", "is not an output of the model")],
                reason=reasons.UNKNOWN_OUTPUT,
            )
        if name in seen:
            raise InvalidArgument(
                f"output {_quoted(name)} is requested more than once",
                [(f"outputs[{name}]", "is a duplicate")],
                reason=reasons.DUPLICATE_OUTPUT,
            )
        seen.add(name)


def raw_outputs(decoded: DecodedRequest, always_raw: bool) -> bool:
    """Whether to answer ``decoded`` in ``raw_output_contents``: its ``raw_output`` parameter if
    given (must be a bool, else InvalidArgument), else raw when its inputs were or ``always_raw``."""
    if RAW_OUTPUT_PARAMETER not in decoded.parameters:
        return always_raw or decoded.raw
    value = decoded.parameters[RAW_OUTPUT_PARAMETER]
    if not isinstance(value, bool):
        raise InvalidArgument(
            f"parameter {RAW_OUTPUT_PARAMETER!r} must be a bool_param (true: raw_output_contents, false: typed "
            f"contents), not {type(value).__name__}",
            [(f"parameters[{RAW_OUTPUT_PARAMETER}]", "must be a bool_param")],
            reason=reasons.INVALID_PARAMETER,
        )
    return value


def batch_size(inputs: Mapping[str, Array], max_batch_size: int, model_name: str = "the model") -> int:
    """The number of inferences in a request: its batch (the first dimension, the same for every
    input, at most ``max_batch_size``) when the model batches (``max_batch_size`` > 0), else 1.
    Raises InvalidArgument for a batch that is too large or differs between inputs."""
    if max_batch_size <= 0:
        return 1
    sizes = {name: array.shape[0] for name, array in inputs.items() if array.ndim}
    batches = sorted(set(sizes.values()))
    if len(batches) > 1:
        raise InvalidArgument(
            f"the inputs of a request to {model_name} must have the same batch size (first dimension), "
            f"got {', '.join(f'{name}: {size}' for name, size in sizes.items())}",
            [(f"inputs[{name}].shape", "must have the same first dimension as the other inputs") for name in sizes],
            reason=reasons.BATCH_SIZE_MISMATCH,
        )
    batch = batches[0] if batches else 1
    if batch > max_batch_size:
        raise InvalidArgument(
            f"the batch size (first dimension) must be <= {max_batch_size} for {model_name}, got {batch}",
            [(f"inputs[{name}].shape", f"first dimension must be <= {max_batch_size}") for name in sizes],
            reason=reasons.BATCH_TOO_LARGE,
        )
    return int(batch)


def _check_raw_count(request: pb.ModelInferRequest, entries: int, supplied: SuppliedInputs | None = None) -> None:
    carriers = [
        tensor.name
        for tensor in request.inputs
        if not tensor.HasField("contents") and (supplied is None or tensor.name not in supplied)
    ]
    if entries == len(carriers):
        return
    if entries > len(carriers) and entries == len(request.inputs):
        both = next(tensor.name for tensor in request.inputs if tensor.HasField("contents"))
        raise InvalidArgument(
            f"input {_quoted(both)} has both typed contents and raw data in raw_input_contents",
            [(f"inputs[{both}].contents", "must not be set when the data is in raw_input_contents")],
            reason=reasons.RAW_AND_TYPED_CONTENTS,
        )
    if entries < len(carriers):
        name = carriers[entries]
        raise InvalidArgument(
            f"input {_quoted(name)} has no data: raw_input_contents has {entries} entries "
            f"for {len(carriers)} inputs without typed contents",
            [(f"inputs[{name}]", "has neither typed contents nor a raw_input_contents entry")],
            reason=reasons.MISSING_DATA,
        )
    raise InvalidArgument(
        f"raw_input_contents has {entries} entries but only {len(carriers)} inputs carry raw data",
        [("raw_input_contents", f"must have one entry per input without typed contents ({len(carriers)})")],
        reason=reasons.RAW_COUNT_MISMATCH,
    )


def _check_shape(name: str, shape: tuple[int, ...], declared: Sequence[int]) -> int:
    field = f"inputs[{name}].shape"
    if len(shape) != len(declared):
        raise InvalidArgument(
            f"input {_quoted(name)} has {len(shape)} dimensions, the model expects {list(declared)} (-1 = any size)",
            [(field, f"must match {list(declared)}")],
            reason=reasons.SHAPE_MISMATCH,
        )
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(
            f"input {_quoted(name)} has a negative dimension in shape {list(shape)}",
            [(field, "dimensions must be >= 0")],
            reason=reasons.NEGATIVE_DIMENSION,
        )
    if not _shape_fits(shape, declared):
        raise InvalidArgument(
            f"input {_quoted(name)} has shape {list(shape)}, the model expects {list(declared)} (-1 = any size)",
            [(field, f"must match {list(declared)}")],
            reason=reasons.SHAPE_MISMATCH,
        )
    count = math.prod(shape)
    if count > _MAX_ELEMENTS:
        raise InvalidArgument(
            f"input {_quoted(name)}: the element count of shape {list(shape)} overflows",
            [(field, "has too many elements")],
            reason=reasons.SHAPE_OVERFLOW,
        )
    return count


def _shape_fits(shape: Sequence[int], declared: Sequence[int]) -> bool:
    return len(shape) == len(declared) and all(want in (-1, got) for got, want in zip(shape, declared, strict=True))


def _decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    decoded: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice == "bool_param":
            decoded[key] = parameter.bool_param
        elif choice == "int64_param":
            decoded[key] = parameter.int64_param
        elif choice == "uint64_param":
            decoded[key] = parameter.uint64_param
        elif choice == "double_param":
            decoded[key] = parameter.double_param
        elif choice == "string_param":
            decoded[key] = parameter.string_param
    return decoded


# --- responses ------------------------------------------------------------------------------------


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, Array],
    specs: Sequence[SpecLike],
    requested: Sequence[str],
    raw: bool,
    placed: Mapping[str, Mapping[str, ParameterValue]] | None = None,
) -> pb.ModelInferResponse:
    """The response for ``outputs``: the declared ``specs`` in order, filtered by ``requested`` (empty = all).

    ``requested`` is expected to have passed :func:`check_requested_outputs`; outputs the model
    returns beyond the selected specs are left out. Each array is cast to its spec's datatype.
    Outputs in ``placed`` were written elsewhere (Triton's shared memory): they carry the given
    parameters, no contents, and an empty raw entry (raw entries match outputs by position).
    """
    wanted = set(requested)
    selected = [spec for spec in specs if not wanted or spec.name in wanted]
    arrays: list[Array] = []
    for spec in selected:
        if spec.name not in outputs:
            raise ModelOutputError(f"the model returned no output {spec.name!r}")
        array = np.asarray(outputs[spec.name])
        if not _shape_fits(array.shape, spec.shape):
            raise ModelOutputError(
                f"model output {spec.name!r} has shape {list(array.shape)}, the model declares {list(spec.shape)}"
            )
        try:
            arrays.append(_coerce(array, spec.datatype))
        except ValueError as error:
            raise ModelOutputError(f"model output {spec.name!r}: {error}") from None
    raw = raw or any(spec.datatype in RAW_ONLY for spec in selected)
    tensors: list[pb.ModelInferResponse.InferOutputTensor] = []
    raw_contents: list[bytes] = []
    for spec, array in zip(selected, arrays, strict=True):
        tensor = pb.ModelInferResponse.InferOutputTensor(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if placed and spec.name in placed:
            _placed_output(tensor, placed[spec.name], raw_contents if raw else None)
            tensors.append(tensor)
            continue
        try:
            if raw:
                raw_contents.append(_array_to_raw(array, spec.datatype))
            else:
                _fill_contents(tensor.contents, array, spec.datatype)
        except ValueError as error:
            raise ModelOutputError(f"model output {spec.name!r}: {error}") from None
        tensors.append(tensor)
    return pb.ModelInferResponse(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        outputs=tensors,
        raw_output_contents=raw_contents,
    )


def raw_output(array: Array, spec: SpecLike) -> bytes | memoryview:
    """One model output in the raw layout, checked against its declared ``spec`` as
    :func:`encode_response` checks it (ModelOutputError if it does not fit); numeric outputs are not copied."""
    array = np.asarray(array)
    if not _shape_fits(array.shape, spec.shape):
        raise ModelOutputError(
            f"model output {spec.name!r} has shape {list(array.shape)}, the model declares {list(spec.shape)}"
        )
    try:
        coerced = _coerce(array, spec.datatype)
        if spec.datatype == "BYTES":
            return _array_to_raw(coerced, spec.datatype)
        return np.ascontiguousarray(coerced).reshape(-1).data.cast("B")
    except ValueError as error:
        raise ModelOutputError(f"model output {spec.name!r}: {error}") from None


def _placed_output(
    tensor: pb.ModelInferResponse.InferOutputTensor,
    parameters: Mapping[str, ParameterValue],
    raw_contents: list[bytes] | None,
) -> None:
    for key, value in parameters.items():
        tensor.parameters[key].CopyFrom(_parameter(value))
    if raw_contents is not None:
        raw_contents.append(b"")


# --- client side: numpy -> request, response -> numpy ---------------------------------------------


def make_infer_request(
    model_name: str,
    inputs: Mapping[str, tuple[str, Array]],
    raw: bool = True,
    version: str = "",
    outputs: Sequence[str] = (),
    request_id: str = "",
    parameters: Mapping[str, ParameterValue] | None = None,
) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` from ``{name: (datatype, array)}``.

    Inputs go raw when ``raw`` is True (as tritonclient sends them), typed otherwise; FP16/BF16 inputs
    always go raw. Raises ValueError for an unknown datatype or an array that cannot take it.
    """
    tensors: list[pb.ModelInferRequest.InferInputTensor] = []
    raw_contents: list[bytes] = []
    for name, (datatype, value) in inputs.items():
        _datatype_known(datatype)
        array = _coerce(np.asarray(value), datatype)
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
        if raw or datatype in RAW_ONLY:
            raw_contents.append(_array_to_raw(array, datatype))
        else:
            _fill_contents(tensor.contents, array, datatype)
        tensors.append(tensor)
    return pb.ModelInferRequest(
        model_name=model_name,
        model_version=version,
        id=request_id,
        parameters={key: _parameter(value) for key, value in (parameters or {}).items()},
        inputs=tensors,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
        raw_input_contents=raw_contents,
    )


def response_arrays(response: pb.ModelInferResponse) -> dict[str, Array]:
    """Output name -> array, from raw or typed contents. Raises ValueError for malformed data."""
    raw_entries = list(response.raw_output_contents)
    if raw_entries and len(raw_entries) != len(response.outputs):
        raise ValueError(f"{len(raw_entries)} raw_output_contents entries for {len(response.outputs)} outputs")
    arrays: dict[str, Array] = {}
    for index, tensor in enumerate(response.outputs):
        try:
            _datatype_known(tensor.datatype)
            shape = tuple(tensor.shape)
            if any(dim < 0 for dim in shape):
                raise ValueError(f"negative dimension in shape {list(shape)}")
            count = math.prod(shape)
            if raw_entries:
                where = f"raw_output_contents[{index}]"
                arrays[tensor.name] = _raw_to_array(raw_entries[index], tensor.datatype, shape, count, where)
            else:
                arrays[tensor.name] = _contents_to_array(tensor.contents, tensor.datatype, shape, count)
        except ValueError as error:
            raise ValueError(f"output {tensor.name!r}: {error}") from None
    return arrays


# --- BF16 -----------------------------------------------------------------------------------------


def float32_to_bf16_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """bfloat16 bits of ``values`` (rounded to nearest even; NaN stays NaN)."""
    wide = np.asarray(values, dtype=np.float32)
    flat = wide.reshape(-1)  # 1-d: array arithmetic wraps silently where scalar arithmetic would warn
    bits = flat.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(flat), quiet_nan, rounded).astype(np.uint16).reshape(wide.shape)


def bf16_bits_to_float32(bits: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """float32 values of bfloat16 ``bits`` (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- tensor data ----------------------------------------------------------------------------------


def _datatype_known(datatype: str) -> None:
    if datatype not in DATATYPES:
        raise ValueError(f"unknown datatype {datatype!r}")


def _raw_to_array(raw: bytes, datatype: str, shape: tuple[int, ...], count: int, where: str) -> Array:
    if datatype == "BYTES":
        return _split_bytes(raw, count, where).reshape(shape)
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise _DataError(
            reasons.RAW_SIZE_MISMATCH, f"{where} has {len(raw)} bytes, expected {expected} ({count} x {datatype})"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and int(octets.max()) > 1:
            raise _DataError(reasons.VALUE_OUT_OF_RANGE, f"{where}: BOOL elements must be 0 or 1")
        return octets.view(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _split_bytes(raw: bytes, count: int, where: str) -> Array:
    if len(raw) < 4 * count:
        raise _DataError(reasons.RAW_SIZE_MISMATCH, f"{where} has {len(raw)} bytes, too few for {count} BYTES elements")
    items: list[bytes] = []
    offset, end = 0, len(raw)
    for index in range(count):
        if offset + 4 > end:
            raise _DataError(reasons.RAW_SIZE_MISMATCH, f"{where} ends after {index} of {count} BYTES elements")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if length > end - offset:
            raise _DataError(
                reasons.RAW_SIZE_MISMATCH,
                f"{where}: BYTES element {index} is {length} bytes long, only {end - offset} remain",
            )
        items.append(raw[offset : offset + length])
        offset += length
    if offset != end:
        raise _DataError(
            reasons.RAW_SIZE_MISMATCH, f"{where} has {end - offset} trailing bytes after {count} BYTES elements"
        )
    return _object_array(items)


def _contents_to_array(contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], count: int) -> Array:
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise _DataError(
            reasons.CONTENTS_FIELD_MISMATCH, f"{datatype} has no typed contents; it must be sent as raw contents"
        )
    others = [descriptor.name for descriptor, _ in contents.ListFields() if descriptor.name != field]
    if others:
        raise _DataError(
            reasons.CONTENTS_FIELD_MISMATCH, f"a {datatype} tensor takes contents.{field}, not contents.{others[0]}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise _DataError(
            reasons.CONTENTS_SIZE_MISMATCH, f"contents.{field} has {len(values)} elements, expected {count}"
        )
    if datatype == "BYTES":
        return _object_array(list(values)).reshape(shape)
    array = np.array(values, dtype=_FIELD_DTYPES[field])
    target = DATATYPES[datatype]
    if array.dtype != target:
        limits = np.iinfo(target)
        if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
            raise _DataError(
                reasons.VALUE_OUT_OF_RANGE,
                f"contents.{field} has values outside the {datatype} range [{limits.min}, {limits.max}]",
            )
        array = array.astype(target)
    return array.reshape(shape)


def _object_array(items: list[bytes]) -> Array:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _coerce(array: Array, datatype: str) -> Array:
    """``array`` as the numpy dtype of ``datatype`` (no copy when it already is); ValueError if it cannot be."""
    if datatype == "BYTES":
        if array.dtype.kind not in "OSU":
            raise ValueError(f"a BYTES tensor needs bytes or str elements, not {array.dtype}")
        return array
    if datatype == "BF16":
        if array.dtype == np.uint16:
            return array.astype(DATATYPES["BF16"], copy=False)
        if array.dtype.name == "bfloat16" and array.dtype.itemsize == 2:
            return array.view(np.uint16).astype(DATATYPES["BF16"], copy=False)
        if array.dtype.kind in "fiu":
            return float32_to_bf16_bits(array)
        raise ValueError(f"cannot send a {array.dtype} array as BF16")
    if array.dtype.kind in "SUVcmM":
        raise ValueError(f"cannot send a {array.dtype} array as {datatype}")
    try:
        return array.astype(DATATYPES[datatype], copy=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot send a {array.dtype} array as {datatype}: {error}") from None


def _bytes_elements(array: Array) -> list[bytes]:
    elements: list[bytes] = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, bytes):
            elements.append(item)
        elif isinstance(item, str):
            elements.append(item.encode())
        else:
            raise ValueError(f"BYTES elements must be bytes or str, not {type(item).__name__}")
    return elements


def _whole_buffer(array: Array) -> bytes | None:
    """The ``bytes`` object ``array`` views from its first byte to its last, in order, if it is one
    (an output copied out of a worker's arena): answering with it saves a copy of the tensor."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, bytes) or len(base) != array.nbytes or not array.flags.c_contiguous:
        return None
    if array.nbytes and array.ctypes.data != np.frombuffer(base, dtype=np.uint8).ctypes.data:
        return None  # a view that starts elsewhere in the buffer
    return base


def _array_to_raw(array: Array, datatype: str) -> bytes:
    if datatype != "BYTES":
        whole = _whole_buffer(array)
        return whole if whole is not None else array.tobytes()  # C order, the little-endian dtype already
    parts: list[bytes] = []
    for element in _bytes_elements(array):
        if len(element) > 0xFFFFFFFF:
            raise ValueError("a BYTES element is longer than 4 GiB")
        parts.append(_LENGTH.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


def _fill_contents(contents: pb.InferTensorContents, array: Array, datatype: str) -> None:
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise ValueError(f"{datatype} has no typed contents; it travels raw only")
    values = _bytes_elements(array) if datatype == "BYTES" else array.reshape(-1).tolist()
    getattr(contents, field).extend(values)


def _parameter(value: ParameterValue) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if value >= 2**63:
            return pb.InferParameter(uint64_param=value)
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise TypeError(f"unsupported parameter type {type(value).__name__}")


__all__ = [
    "CONTENTS_FIELDS",
    "DATATYPES",
    "ELEMENT_SIZES",
    "RAW_ONLY",
    "RAW_OUTPUT_PARAMETER",
    "DecodedRequest",
    "ModelOutputError",
    "ParameterValue",
    "SpecLike",
    "SuppliedInputs",
    "batch_size",
    "bf16_bits_to_float32",
    "check_requested_outputs",
    "decode_request",
    "encode_response",
    "float32_to_bf16_bits",
    "make_infer_request",
    "raw_output",
    "raw_outputs",
    "response_arrays",
]
