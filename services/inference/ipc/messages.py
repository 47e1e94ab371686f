"""The messages of the worker protocol and their frames (``inference.v1.WorkerFrame``).

:func:`encode` turns a message into one whole frame, putting large tensors in shared memory
(:mod:`services.inference.ipc.shm`); :func:`decode` turns a frame's payload back into a message.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
from google.protobuf.message import DecodeError
from inference.v1 import worker_ipc_pb2 as pb

from services.inference.ipc import shm
from services.inference.ipc.errors import ProtocolError

DEFAULT_SHM_THRESHOLD: Final = 64 * 1024
DEFAULT_MAX_FRAME_BYTES: Final = 256 * 1024 * 1024
BYTES_DTYPE: Final = "bytes"

# Failure.code: a gRPC status code name other than OK.
STATUS_CODES: Final = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

HEADER: Final = struct.Struct("<I")
"""The length prefix of a frame (and of each element of a bytes tensor)."""
_MAX_LENGTH = 2**32 - 1
_NUMERIC_DTYPES = frozenset(
    f"{order}{code}" for order in "<>" for code in ("i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8")
) | {"|b1", "|i1", "|u1"}


@dataclass(frozen=True, slots=True, eq=False)
class InferCall:
    """Supervisor to worker: run the model. ``deadline`` is in Unix seconds, 0 for none.
    Compared by identity, as InferResult is: arrays have no single truth value."""

    request_id: int
    traceparent: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    deadline: float


@dataclass(frozen=True, slots=True, eq=False)
class InferResult:
    """Worker to supervisor: the outputs of the call ``request_id`` and where the time went."""

    request_id: int
    outputs: dict[str, np.ndarray]
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


@dataclass(frozen=True, slots=True)
class Failure:
    """Worker to supervisor: the call ``request_id`` failed; ``code`` is a gRPC status code name."""

    request_id: int
    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in STATUS_CODES:
            raise ValueError(f"Failure.code must be a gRPC status code name other than OK, not {self.code!r}")


@dataclass(frozen=True, slots=True)
class Ping:
    """Supervisor to worker: are you alive?"""

    request_id: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Worker to supervisor: the answer to the ping ``request_id``."""

    request_id: int
    pid: int
    rss_bytes: int
    requests_served: int


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker to supervisor, first message: the model is loaded."""

    pid: int
    model_name: str
    model_version: str


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """Worker to supervisor, first and last message: the model could not be loaded."""

    message: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Supervisor to worker: finish the current call and exit."""


Message: TypeAlias = InferCall | InferResult | Failure | Ping | Pong | Ready | LoadFailed | Shutdown


# Encoding


def encode(message: Message, *, shm_threshold: int, shm_prefix: str, arena: shm.Arena | None = None) -> bytes:
    """One whole frame (length prefix included). Tensors of ``shm_threshold`` bytes or more go
    through shared memory under ``shm_prefix`` (empty: everything inline): into ``arena`` when one
    is given (reused, see :mod:`services.inference.ipc.shm`), else into a segment each. ValueError if
    a tensor cannot be sent (unsupported dtype, element too large) or the frame exceeds 4 GiB."""
    frame, _ = encode_frame(message, shm_threshold, shm_prefix, arena)
    return frame


def encode_frame(
    message: Message, shm_threshold: int, shm_prefix: str, arena: shm.Arena | None = None
) -> tuple[bytes, list[str]]:
    """The frame and the segments of their own created for it (the caller may unlink them if it
    cannot send the frame; an arena is never among them)."""
    if shm_prefix:
        shm.check_name(shm_prefix, "shm_prefix")
    created: list[str] = []
    try:
        body = _to_proto(message, _Placement(shm_threshold, shm_prefix, arena, created)).SerializeToString()
        if len(body) > _MAX_LENGTH:
            raise ValueError(f"a frame of {len(body)} bytes does not fit the 4-byte length prefix")
    except BaseException:
        shm.unlink_segments(created)
        raise
    return HEADER.pack(len(body)) + body, created


@dataclass(slots=True)
class _Placement:
    """Where the tensors of one message go."""

    threshold: int
    prefix: str
    arena: shm.Arena | None
    created: list[str]


def _to_proto(message: Message, placement: _Placement) -> pb.WorkerFrame:
    frame = pb.WorkerFrame()
    match message:
        case InferCall():
            frame.request_id = message.request_id
            frame.traceparent = message.traceparent
            call = frame.infer_call
            call.inputs.extend(_tensors_to_proto(message.inputs, placement))
            call.outputs.extend(message.outputs)
            call.deadline_unix_seconds = message.deadline
        case InferResult():
            frame.request_id = message.request_id
            result = frame.infer_result
            result.outputs.extend(_tensors_to_proto(message.outputs, placement))
            result.timings.compute_input_ns = message.compute_input_ns
            result.timings.compute_infer_ns = message.compute_infer_ns
            result.timings.compute_output_ns = message.compute_output_ns
        case Failure():
            frame.request_id = message.request_id
            frame.failure.code = message.code
            frame.failure.message = message.message
        case Ping():
            frame.request_id = message.request_id
            frame.ping.SetInParent()
        case Pong():
            frame.request_id = message.request_id
            frame.pong.pid = message.pid
            frame.pong.rss_bytes = message.rss_bytes
            frame.pong.requests_served = message.requests_served
        case Ready():
            frame.ready.pid = message.pid
            frame.ready.model_name = message.model_name
            frame.ready.model_version = message.model_version
        case LoadFailed():
            frame.load_failed.message = message.message
        case Shutdown():
            frame.shutdown.SetInParent()
        case _:
            raise TypeError(f"not a worker message: {type(message).__name__}")
    return frame


def _tensors_to_proto(tensors: Mapping[str, Any], placement: _Placement) -> list[pb.WorkerFrame.Tensor]:
    serialized = []
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype, data = _serialize(name, array)
        serialized.append((pb.WorkerFrame.Tensor(name=name, dtype=dtype, shape=array.shape), data))
    threshold, prefix, arena = placement.threshold, placement.prefix, placement.arena
    shared = [(tensor, data) for tensor, data in serialized if prefix and len(data) and len(data) >= threshold]
    if arena is not None and shared and arena.reserve(sum(shm.aligned(len(data)) for _, data in shared)):
        offset = 0
        for tensor, data in shared:
            arena.write(offset, data)
            tensor.shm.name, tensor.shm.size, tensor.shm.offset, tensor.shm.arena = arena.name, len(data), offset, True
            offset += shm.aligned(len(data))
        shared = []
    placed = {id(tensor) for tensor, _ in shared}
    for tensor, data in serialized:
        if tensor.WhichOneof("data") == "shm":
            continue  # in the arena
        segment = shm.write_segment(prefix, data) if id(tensor) in placed else None
        if segment is None:
            tensor.inline = bytes(data)
        else:
            placement.created.append(segment)
            tensor.shm.name = segment
            tensor.shm.size = len(data)
    return [tensor for tensor, _ in serialized]


def _serialize(name: str, array: np.ndarray) -> tuple[str, bytes | memoryview]:
    if array.dtype.kind == "O":
        parts: list[bytes] = []
        for element in array.flat:
            if not isinstance(element, bytes):
                raise ValueError(f"tensor {name!r}: an object array must hold bytes, not {type(element).__name__}")
            if len(element) > _MAX_LENGTH:
                raise ValueError(f"tensor {name!r}: an element of {len(element)} bytes does not fit its length prefix")
            parts += (HEADER.pack(len(element)), element)
        return BYTES_DTYPE, b"".join(parts)
    if array.dtype.str not in _NUMERIC_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {array.dtype} (numbers, booleans or bytes objects)")
    return array.dtype.str, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


# Decoding


def decode(payload: bytes, *, shm_prefix: str | None = None, arena: shm.ArenaReader | None = None) -> Message:
    """The message in one frame (without its length prefix). Takes ownership of its segments of their
    own (see :mod:`services.inference.ipc.shm`); reads arena tensors through ``arena`` (a frame naming
    an arena without one is malformed); with ``shm_prefix``, refuses segments outside it.
    ProtocolError if the frame is malformed."""
    frame = pb.WorkerFrame()
    try:
        frame.ParseFromString(payload)
    except DecodeError as error:
        raise ProtocolError(f"not a WorkerFrame: {error}") from None
    kind = frame.WhichOneof("body")
    tensors = frame.infer_call.inputs if kind == "infer_call" else frame.infer_result.outputs
    try:
        return _from_proto(frame, kind, _Source(shm_prefix, arena))
    except BaseException:
        shm.unlink_segments(
            tensor.shm.name
            for tensor in tensors
            if tensor.WhichOneof("data") == "shm"
            and not tensor.shm.arena
            and shm.is_own_segment(tensor.shm.name, shm_prefix)
        )
        raise


@dataclass(frozen=True, slots=True)
class _Source:
    """Where the tensors of one frame are read from."""

    prefix: str | None
    arena: shm.ArenaReader | None

    def read(self, ref: pb.WorkerFrame.SharedMemoryRef) -> Any:
        """The tensor's bytes (arena: a copy; a segment of its own: its mapping)."""
        if ref.arena:
            if self.arena is None:
                raise ProtocolError(f"tensor in arena {ref.name!r}, and this reader reads no arena")
            return self.arena.read(ref)
        if ref.offset:
            raise ProtocolError(f"segment {ref.name!r}: an offset outside an arena")
        return shm.map_segment(ref, self.prefix)


def _from_proto(frame: pb.WorkerFrame, kind: str | None, source: _Source) -> Message:
    request_id = frame.request_id
    if kind == "infer_call":
        call = frame.infer_call
        inputs = _tensors_from_proto(call.inputs, source)
        return InferCall(request_id, frame.traceparent, inputs, list(call.outputs), call.deadline_unix_seconds)
    if kind == "infer_result":
        result, timings = frame.infer_result, frame.infer_result.timings
        outputs = _tensors_from_proto(result.outputs, source)
        return InferResult(
            request_id, outputs, timings.compute_input_ns, timings.compute_infer_ns, timings.compute_output_ns
        )
    if kind == "failure":
        if frame.failure.code not in STATUS_CODES:
            raise ProtocolError(f"Failure with an unknown status code {frame.failure.code!r}")
        return Failure(request_id, frame.failure.code, frame.failure.message)
    if kind == "ping":
        return Ping(request_id)
    if kind == "pong":
        pong = frame.pong
        return Pong(request_id, pong.pid, pong.rss_bytes, pong.requests_served)
    if kind == "ready":
        return Ready(frame.ready.pid, frame.ready.model_name, frame.ready.model_version)
    if kind == "load_failed":
        return LoadFailed(frame.load_failed.message)
    if kind == "shutdown":
        return Shutdown()
    raise ProtocolError("a frame without a body")


def _tensors_from_proto(tensors: Iterable[pb.WorkerFrame.Tensor], source: _Source) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise ProtocolError(f"two tensors named {tensor.name!r}")
        arrays[tensor.name] = _tensor_from_proto(tensor, source)
    return arrays


def _tensor_from_proto(tensor: pb.WorkerFrame.Tensor, source: _Source) -> np.ndarray:
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise ProtocolError(f"tensor {tensor.name!r}: negative dimension in {shape}")
    count = math.prod(shape)
    in_shm = tensor.WhichOneof("data") == "shm"
    if tensor.dtype == BYTES_DTYPE:
        raw = bytes(source.read(tensor.shm)) if in_shm else tensor.inline
        return _parse_bytes(tensor.name, raw, count).reshape(shape)
    if tensor.dtype not in _NUMERIC_DTYPES:
        raise ProtocolError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype!r}")
    dtype = np.dtype(tensor.dtype)
    size = count * dtype.itemsize
    if in_shm:
        if tensor.shm.size != size:
            raise ProtocolError(f"tensor {tensor.name!r}: segment of {tensor.shm.size} bytes, expected {size}")
        return np.frombuffer(source.read(tensor.shm), dtype=dtype, count=count).reshape(shape)
    data = tensor.inline
    if len(data) != size:
        raise ProtocolError(f"tensor {tensor.name!r}: {len(data)} bytes inline, expected {size}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).copy()


def _parse_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    if count * HEADER.size > len(raw):
        raise ProtocolError(f"tensor {name!r}: {len(raw)} bytes cannot hold {count} elements")
    array = np.empty(count, dtype=object)
    position = 0
    for index in range(count):
        if position + HEADER.size > len(raw):
            raise ProtocolError(f"tensor {name!r}: truncated element {index}")
        (length,) = HEADER.unpack_from(raw, position)
        position += HEADER.size
        if position + length > len(raw):
            raise ProtocolError(f"tensor {name!r}: truncated element {index}")
        array[index] = raw[position : position + length]
        position += length
    if position != len(raw):
        raise ProtocolError(f"tensor {name!r}: {len(raw) - position} bytes after the last element")
    return array
