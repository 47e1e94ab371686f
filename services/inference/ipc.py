"""Messages between the inference supervisor and its worker processes, and the pipes they travel on.

Frame format
    A pipe carries frames back to back. A frame is a 4-byte little-endian unsigned length ``N``,
    then ``N`` bytes: one serialized ``inference.v1.WorkerFrame`` (protos/inference/v1/worker_ipc.proto).
    A reader refuses a length above its ``max_frame_bytes``: the pipe is then out of step for good.
    End of file between frames is a clean end; inside a frame, the peer died while writing.

Tensors
    ``dtype`` is a numpy dtype string for numbers and booleans (``"<f4"``, ``"|b1"``, ``">i8"``; byte
    order as sent) and the elements are the array's bytes in row-major order. ``"bytes"`` is an object
    array of ``bytes``: each element as a 4-byte little-endian length then its bytes, concatenated.
    Other dtypes (str, datetime, structured, object arrays of anything else) are refused.

Shared memory: who creates, who removes
    * A tensor whose serialized size is at least ``shm_threshold`` (and not 0) goes into a segment of
      its own: a file ``/dev/shm/<shm_prefix><random>`` that the *sender* creates with
      ``O_CREAT | O_EXCL`` and mode 0600, writes in full and closes before the frame names it.
      The sender never touches it again.
    * Once the frame is written, the segment belongs to the *receiver*. :func:`decode` opens it,
      unlinks it at once, and maps it copy-on-write: the decoded array is a zero-copy, writable view
      of the mapping, which lives exactly as long as the array (and any view of it) does. No name is
      left in /dev/shm after a decode, successful or not (a reader given a prefix leaves names
      outside it alone: they are not its segments).
    * A segment whose frame is never decoded (the peer died, the write failed, the frame was dropped)
      stays under its prefix. Both directions of one worker use the same prefix (e.g.
      ``mlp-<supervisor pid>-<worker id>-``), so the supervisor calls :func:`sweep_segments` with it
      once the worker has exited. End prefixes with a separator so that none is a prefix of another.
    * An empty prefix, or no /dev/shm (or a full one), sends every tensor inline instead.
    A decoded array holds its tmpfs pages until it is garbage-collected: keep large results short-lived.

Errors
    ValueError
     +-- ProtocolError         a malformed frame (decode, read): a buggy or hostile peer; replace it
          +-- FrameTooLargeError   a length prefix above ``max_frame_bytes``; the pipe is out of step
    EOFError                   the peer closed its end (read), possibly in the middle of a frame
    BrokenPipeError            the peer is gone (write, drain, send)
    ``encode`` raises ValueError for a tensor it cannot send (dtype, size) and then leaves no segment behind.

Supervisor side (asyncio): :func:`open_pipes` gives a :class:`FrameReader` and a :class:`FrameWriter`.
Worker side (threads): :class:`BlockingChannel`, whose :meth:`~BlockingChannel.send` may be called from
several threads at once (the worker answers pings from a reader thread while a model runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import mmap
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias

import numpy as np
from google.protobuf.message import DecodeError
from inference.v1 import worker_ipc_pb2 as pb

from services.common.logs import fields

log = logging.getLogger(__name__)

SHM_DIR: Final = "/dev/shm"  # noqa: S108  (a tmpfs for shared memory, not a temporary directory)
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

_HEADER = struct.Struct("<I")
_MAX_LENGTH = 2**32 - 1
_NUMERIC_DTYPES = frozenset(
    f"{order}{code}" for order in "<>" for code in ("i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8")
) | {"|b1", "|i1", "|u1"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SEGMENT_TRIES = 8
_STREAM_LIMIT = 1024 * 1024
_READ_BUFFER = 64 * 1024
_shm_warned = False


class ProtocolError(ValueError):
    """A frame that does not follow the protocol; the pipe cannot be trusted any more."""


class FrameTooLargeError(ProtocolError):
    """A length prefix above the reader's ``max_frame_bytes``."""


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


def encode(message: Message, *, shm_threshold: int, shm_prefix: str) -> bytes:
    """One whole frame (length prefix included). Tensors of ``shm_threshold`` bytes or more go
    through shared memory under ``shm_prefix`` (empty: everything inline). ValueError if a tensor
    cannot be sent (unsupported dtype, element too large) or the frame exceeds 4 GiB."""
    frame, _ = _encode(message, shm_threshold, shm_prefix)
    return frame


def _encode(message: Message, shm_threshold: int, shm_prefix: str) -> tuple[bytes, list[str]]:
    """The frame and the segments created for it (the caller may unlink them if it cannot send it)."""
    if shm_prefix:
        _check_name(shm_prefix, "shm_prefix")
    created: list[str] = []
    try:
        body = _to_proto(message, shm_threshold, shm_prefix, created).SerializeToString()
        if len(body) > _MAX_LENGTH:
            raise ValueError(f"a frame of {len(body)} bytes does not fit the 4-byte length prefix")
    except BaseException:
        _unlink_segments(created)
        raise
    return _HEADER.pack(len(body)) + body, created


def _to_proto(message: Message, threshold: int, prefix: str, created: list[str]) -> pb.WorkerFrame:
    frame = pb.WorkerFrame()
    match message:
        case InferCall():
            frame.request_id = message.request_id
            frame.traceparent = message.traceparent
            call = frame.infer_call
            call.inputs.extend(_tensors_to_proto(message.inputs, threshold, prefix, created))
            call.outputs.extend(message.outputs)
            call.deadline_unix_seconds = message.deadline
        case InferResult():
            frame.request_id = message.request_id
            result = frame.infer_result
            result.outputs.extend(_tensors_to_proto(message.outputs, threshold, prefix, created))
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


def _tensors_to_proto(
    tensors: Mapping[str, Any], threshold: int, prefix: str, created: list[str]
) -> Iterable[pb.WorkerFrame.Tensor]:
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype, data = _serialize(name, array)
        tensor = pb.WorkerFrame.Tensor(name=name, dtype=dtype, shape=array.shape)
        size = len(data)
        segment = _write_segment(prefix, data) if prefix and size and size >= threshold else None
        if segment is None:
            tensor.inline = bytes(data)
        else:
            created.append(segment)
            tensor.shm.name = segment
            tensor.shm.size = size
        yield tensor


def _serialize(name: str, array: np.ndarray) -> tuple[str, bytes | memoryview]:
    if array.dtype.kind == "O":
        parts: list[bytes] = []
        for element in array.flat:
            if not isinstance(element, bytes):
                raise ValueError(f"tensor {name!r}: an object array must hold bytes, not {type(element).__name__}")
            if len(element) > _MAX_LENGTH:
                raise ValueError(f"tensor {name!r}: an element of {len(element)} bytes does not fit its length prefix")
            parts += (_HEADER.pack(len(element)), element)
        return BYTES_DTYPE, b"".join(parts)
    if array.dtype.str not in _NUMERIC_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {array.dtype} (numbers, booleans or bytes objects)")
    return array.dtype.str, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _write_segment(prefix: str, data: bytes | memoryview) -> str | None:
    """Name of a new segment holding ``data``; None if shared memory is unavailable."""
    for _ in range(_SEGMENT_TRIES):
        name = f"{prefix}{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as error:
            _warn_no_shm(error)
            return None
        try:
            _write_all(fd, data)
        except OSError as error:  # e.g. ENOSPC: /dev/shm is full
            _unlink_segments([name])
            _warn_no_shm(error)
            return None
        finally:
            os.close(fd)
        return name
    raise FileExistsError(f"no free segment name under {prefix!r} after {_SEGMENT_TRIES} tries")


def _warn_no_shm(error: OSError) -> None:
    global _shm_warned
    if not _shm_warned:
        _shm_warned = True
        log.warning("ipc.shm_unavailable", extra=fields(directory=SHM_DIR, error=error.strerror or str(error)))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# Decoding


def decode(payload: bytes, *, shm_prefix: str | None = None) -> Message:
    """The message in one frame (without its length prefix). Takes ownership of its shared-memory
    segments (see the module docstring); with ``shm_prefix``, refuses segments outside it.
    ProtocolError if the frame is malformed."""
    frame = pb.WorkerFrame()
    try:
        frame.ParseFromString(payload)
    except DecodeError as error:
        raise ProtocolError(f"not a WorkerFrame: {error}") from None
    kind = frame.WhichOneof("body")
    tensors = frame.infer_call.inputs if kind == "infer_call" else frame.infer_result.outputs
    try:
        return _from_proto(frame, kind, shm_prefix)
    except BaseException:
        _unlink_segments(
            tensor.shm.name
            for tensor in tensors
            if tensor.WhichOneof("data") == "shm" and _is_own_segment(tensor.shm.name, shm_prefix)
        )
        raise


def _from_proto(frame: pb.WorkerFrame, kind: str | None, prefix: str | None) -> Message:
    request_id = frame.request_id
    if kind == "infer_call":
        call = frame.infer_call
        inputs = _tensors_from_proto(call.inputs, prefix)
        return InferCall(request_id, frame.traceparent, inputs, list(call.outputs), call.deadline_unix_seconds)
    if kind == "infer_result":
        result, timings = frame.infer_result, frame.infer_result.timings
        outputs = _tensors_from_proto(result.outputs, prefix)
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


def _tensors_from_proto(tensors: Iterable[pb.WorkerFrame.Tensor], prefix: str | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise ProtocolError(f"two tensors named {tensor.name!r}")
        arrays[tensor.name] = _tensor_from_proto(tensor, prefix)
    return arrays


def _tensor_from_proto(tensor: pb.WorkerFrame.Tensor, prefix: str | None) -> np.ndarray:
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise ProtocolError(f"tensor {tensor.name!r}: negative dimension in {shape}")
    count = math.prod(shape)
    in_shm = tensor.WhichOneof("data") == "shm"
    if tensor.dtype == BYTES_DTYPE:
        raw = _read_segment(tensor.shm, prefix) if in_shm else tensor.inline
        return _parse_bytes(tensor.name, raw, count).reshape(shape)
    if tensor.dtype not in _NUMERIC_DTYPES:
        raise ProtocolError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype!r}")
    dtype = np.dtype(tensor.dtype)
    size = count * dtype.itemsize
    if in_shm:
        if tensor.shm.size != size:
            raise ProtocolError(f"tensor {tensor.name!r}: segment of {tensor.shm.size} bytes, expected {size}")
        return np.frombuffer(_map_segment(tensor.shm, prefix), dtype=dtype, count=count).reshape(shape)
    data = tensor.inline
    if len(data) != size:
        raise ProtocolError(f"tensor {tensor.name!r}: {len(data)} bytes inline, expected {size}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).copy()


def _parse_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    if count * _HEADER.size > len(raw):
        raise ProtocolError(f"tensor {name!r}: {len(raw)} bytes cannot hold {count} elements")
    array = np.empty(count, dtype=object)
    position = 0
    for index in range(count):
        if position + _HEADER.size > len(raw):
            raise ProtocolError(f"tensor {name!r}: truncated element {index}")
        (length,) = _HEADER.unpack_from(raw, position)
        position += _HEADER.size
        if position + length > len(raw):
            raise ProtocolError(f"tensor {name!r}: truncated element {index}")
        array[index] = raw[position : position + length]
        position += length
    if position != len(raw):
        raise ProtocolError(f"tensor {name!r}: {len(raw) - position} bytes after the last element")
    return array


def _open_segment(ref: pb.WorkerFrame.SharedMemoryRef, prefix: str | None) -> int:
    """A read-only descriptor of the segment, whose name is already unlinked."""
    if not _is_own_segment(ref.name, prefix):
        raise ProtocolError(f"segment name {ref.name!r} is not a segment under {prefix!r}")
    path = os.path.join(SHM_DIR, ref.name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ProtocolError(f"segment {ref.name!r} cannot be opened: {error.strerror}") from None
    try:
        os.unlink(path)
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size != ref.size or ref.size == 0:
            raise ProtocolError(f"segment {ref.name!r} is not a file of {ref.size} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map_segment(ref: pb.WorkerFrame.SharedMemoryRef, prefix: str | None) -> mmap.mmap:
    fd = _open_segment(ref, prefix)
    try:
        return mmap.mmap(fd, ref.size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def _read_segment(ref: pb.WorkerFrame.SharedMemoryRef, prefix: str | None) -> bytes:
    with _map_segment(ref, prefix) as mapping:
        return mapping[:]


def _is_own_segment(name: str, prefix: str | None) -> bool:
    return _NAME.fullmatch(name) is not None and (prefix is None or name.startswith(prefix))


def _check_name(prefix: str, what: str) -> None:
    if _NAME.fullmatch(prefix) is None:
        raise ValueError(f"{what} must be 1-200 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)")


def _unlink_segments(names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))


def sweep_segments(prefix: str) -> int:
    """Remove every segment under ``prefix`` (left by a worker that died); how many were removed."""
    _check_name(prefix, "prefix")
    removed = 0
    try:
        with os.scandir(SHM_DIR) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
    return removed


# Supervisor side: asyncio


class _WriteProtocol(asyncio.BaseProtocol):
    """Flow control of a write pipe: ``drain`` waits while the transport's buffer is full."""

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost: BaseException | None = None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or BrokenPipeError("the pipe to the peer is closed")
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()
        if self.lost is not None:
            raise BrokenPipeError("the pipe to the peer is closed") from self.lost


class FrameReader:
    """Reads frames from a pipe on the event loop."""

    def __init__(
        self,
        stream: asyncio.StreamReader,
        transport: asyncio.ReadTransport,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        shm_prefix: str | None = None,
    ) -> None:
        self._stream = stream
        self._transport = transport
        self._max_frame_bytes = max_frame_bytes
        self._shm_prefix = shm_prefix
        self._broken: ProtocolError | None = None

    async def read_payload(self) -> bytes:
        """The next frame without its length prefix. EOFError at the end of the pipe."""
        if self._broken is not None:
            raise ProtocolError("the pipe is out of step after an earlier error") from self._broken
        try:
            header = await self._stream.readexactly(_HEADER.size)
        except asyncio.IncompleteReadError as error:
            raise EOFError("the pipe closed inside a frame" if error.partial else "the peer closed the pipe") from None
        (length,) = _HEADER.unpack(header)
        if length > self._max_frame_bytes:
            self._broken = FrameTooLargeError(f"a frame of {length} bytes exceeds the limit of {self._max_frame_bytes}")
            raise self._broken
        try:
            return await self._stream.readexactly(length)
        except asyncio.IncompleteReadError:
            raise EOFError("the pipe closed inside a frame") from None

    async def read(self) -> Message:
        """The next message. EOFError at the end of the pipe, ProtocolError on a malformed frame."""
        return decode(await self.read_payload(), shm_prefix=self._shm_prefix)

    def close(self) -> None:
        self._transport.close()


class FrameWriter:
    """Writes frames to a pipe on the event loop: ``write`` whole frames, then ``await drain()``."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: _WriteProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def write(self, frame: bytes) -> None:
        """Queue one whole frame (from :func:`encode`). BrokenPipeError if the pipe is closed."""
        if self._protocol.lost is not None or self._transport.is_closing():
            raise BrokenPipeError("the pipe to the peer is closed")
        self._transport.write(frame)

    async def drain(self) -> None:
        """Wait until the pipe has room again. BrokenPipeError if the peer is gone."""
        await self._protocol.drain()

    def close(self) -> None:
        """Close the pipe once what is queued has been written."""
        self._transport.close()


def _pipe_file(fd: int, mode: Literal["r", "w"]) -> io.FileIO:
    """An unbuffered file object owning ``fd`` (a pipe end: opening it does not block)."""
    return io.FileIO(fd, mode)


async def open_pipes(
    read_fd: int, write_fd: int, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, shm_prefix: str | None = None
) -> tuple[FrameReader, FrameWriter]:
    """Reader and writer over two pipe ends, which they own (and close) from now on.
    With ``shm_prefix``, the reader refuses segments outside it."""
    loop = asyncio.get_running_loop()
    read_pipe, write_pipe = _pipe_file(read_fd, "r"), _pipe_file(write_fd, "w")
    stream = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
    try:
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), read_pipe)
    except BaseException:
        read_pipe.close()
        write_pipe.close()
        raise
    try:
        write_transport, protocol = await loop.connect_write_pipe(_WriteProtocol, write_pipe)
    except BaseException:
        read_transport.close()
        write_pipe.close()
        raise
    reader = FrameReader(stream, read_transport, max_frame_bytes=max_frame_bytes, shm_prefix=shm_prefix)
    return reader, FrameWriter(write_transport, protocol)


# Worker side: blocking, thread-safe


class BlockingChannel:
    """Both pipe ends of a worker, with blocking reads and thread-safe sends. Owns (and closes) them.

    ``shm_threshold`` and ``shm_prefix`` are the defaults of :meth:`send` (no prefix: all inline);
    with ``shm_prefix``, :meth:`read` refuses segments outside it too.
    """

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        shm_threshold: int = DEFAULT_SHM_THRESHOLD,
        shm_prefix: str = "",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self._reader = open(read_fd, "rb", buffering=_READ_BUFFER)  # noqa: SIM115  (closed by close())
        self._write_fd = write_fd
        self._shm_threshold = shm_threshold
        self._shm_prefix = shm_prefix
        self._max_frame_bytes = max_frame_bytes
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._broken: ProtocolError | None = None

    def read_payload(self) -> bytes:
        """The next frame without its length prefix; blocks. EOFError at the end of the pipe."""
        with self._read_lock:
            if self._broken is not None:
                raise ProtocolError("the pipe is out of step after an earlier error") from self._broken
            header = self._reader.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise EOFError("the pipe closed inside a frame" if header else "the peer closed the pipe")
            (length,) = _HEADER.unpack(header)
            if length > self._max_frame_bytes:
                self._broken = FrameTooLargeError(
                    f"a frame of {length} bytes exceeds the limit of {self._max_frame_bytes}"
                )
                raise self._broken
            payload = self._reader.read(length)
            if len(payload) < length:
                raise EOFError("the pipe closed inside a frame")
            return payload

    def read(self) -> Message:
        """The next message; blocks. EOFError at the end of the pipe, ProtocolError on a malformed frame."""
        return self.decode(self.read_payload())

    def decode(self, payload: bytes) -> Message:
        """The message in a frame from :meth:`read_payload` (with this channel's segment prefix)."""
        return decode(payload, shm_prefix=self._shm_prefix or None)

    def send(self, message: Message, *, shm_threshold: int | None = None, shm_prefix: str | None = None) -> None:
        """Encode and write one message; safe to call from several threads. OSError if the pipe broke."""
        threshold = self._shm_threshold if shm_threshold is None else shm_threshold
        prefix = self._shm_prefix if shm_prefix is None else shm_prefix
        frame, segments = _encode(message, threshold, prefix)
        try:
            self.send_frame(frame)
        except BaseException:
            _unlink_segments(segments)
            raise

    def send_frame(self, frame: bytes) -> None:
        """Write one whole frame (from :func:`encode`); safe to call from several threads."""
        with self._write_lock:
            _write_all(self._write_fd, frame)

    def close(self) -> None:
        with self._write_lock:
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1
        self._reader.close()

    def __enter__(self) -> BlockingChannel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
