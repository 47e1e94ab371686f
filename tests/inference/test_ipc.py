"""The worker IPC protocol: frames, tensors, shared memory, real pipes and a real worker process.

Run as a module (``python -m tests.inference.test_ipc echo|exit-on-first READ_FD WRITE_FD PREFIX``),
this file is the worker end of the pipes: it reports Ready, then echoes InferCalls and answers
Pings until Shutdown or end of file (``exit-on-first``: dies at the first message without answering).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from inference.v1 import worker_ipc_pb2 as pb

from services.inference import ipc

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
BIG = 1 << 30  # a threshold no test tensor reaches: everything inline


def segments(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(ipc.SHM_DIR) if name.startswith(prefix))


def payload_of(frame: bytes) -> bytes:
    """The frame without its length prefix, after checking that the prefix is right."""
    (length,) = struct.unpack("<I", frame[:4])
    assert length == len(frame) - 4
    return frame[4:]


def round_trip(message: ipc.Message, *, threshold: int = BIG, prefix: str = "") -> ipc.Message:
    return ipc.decode(payload_of(ipc.encode(message, shm_threshold=threshold, shm_prefix=prefix)))


def bytes_array(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype, name
        assert actual.shape == expected.shape, name
        assert np.array_equal(actual, expected), name
        assert actual.flags.writeable, name


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A segment prefix of this test's own; whatever a test leaves under it is swept afterwards."""
    prefix = f"mlp-test-{os.getpid()}-{secrets.token_hex(4)}-"
    yield prefix
    ipc.sweep_segments(prefix)


# Messages and tensors


def tensors() -> dict[str, np.ndarray]:
    return {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([[1, -2]], dtype=np.int64),
        "text": bytes_array([b"abc", b"", b"\x00\xff"], (3,)),
    }


SIMPLE_MESSAGES = [
    ipc.Failure(7, "INVALID_ARGUMENT", "input 'x' must be 2-D"),
    ipc.Failure(8, "INTERNAL", ""),
    ipc.Ping(2**64 - 1),
    ipc.Pong(9, 4321, 123_456_789_012, 17),
    ipc.Ready(4321, "iris", "3"),
    ipc.LoadFailed("FileNotFoundError: model.onnx"),
    ipc.Shutdown(),
]


@pytest.mark.parametrize("message", SIMPLE_MESSAGES, ids=lambda message: type(message).__name__)
def test_round_trip_of_messages_without_tensors(message):
    assert round_trip(message) == message


@pytest.mark.parametrize("threshold", [BIG, 0], ids=["inline", "shm"])
def test_round_trip_of_infer_call(threshold, shm_prefix):
    call = ipc.InferCall(5, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", tensors(), ["y"], 1.7e9 + 0.25)
    got = round_trip(call, threshold=threshold, prefix=shm_prefix)
    assert isinstance(got, ipc.InferCall)
    assert (got.request_id, got.traceparent, got.outputs, got.deadline) == (5, call.traceparent, ["y"], 1.7e9 + 0.25)
    assert_same_tensors(got.inputs, call.inputs)
    assert segments(shm_prefix) == []


@pytest.mark.parametrize("threshold", [BIG, 0], ids=["inline", "shm"])
def test_round_trip_of_infer_result(threshold, shm_prefix):
    result = ipc.InferResult(6, tensors(), 10, 2_000_000_000, 30)
    got = round_trip(result, threshold=threshold, prefix=shm_prefix)
    assert isinstance(got, ipc.InferResult)
    assert (got.request_id, got.compute_input_ns, got.compute_infer_ns, got.compute_output_ns) == (
        6,
        10,
        2_000_000_000,
        30,
    )
    assert_same_tensors(got.outputs, result.outputs)
    assert segments(shm_prefix) == []


def test_an_infer_call_may_carry_no_tensors():
    got = round_trip(ipc.InferCall(1, "", {}, [], 0.0))
    assert isinstance(got, ipc.InferCall)
    assert (got.inputs, got.outputs, got.deadline, got.traceparent) == ({}, [], 0.0, "")


NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
NUMERIC += ["float16", "float32", "float64", ">f4", ">i8", ">u2"]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    values = np.arange(-5, -5 + int(np.prod(shape)), dtype=np.int64).reshape(shape)
    if dtype == "bool":
        return values % 2 == 0
    if np.dtype(dtype).kind == "u":
        values = values + 5
    return values.astype(dtype)


@pytest.mark.parametrize("shape", [(2, 3), (0,), (4, 0, 2), ()], ids=["2x3", "empty", "empty-3d", "scalar"])
@pytest.mark.parametrize("threshold", [BIG, 0], ids=["inline", "shm"])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_numeric_tensors_keep_dtype_shape_and_values(dtype, shape, threshold, shm_prefix):
    array = sample(dtype, shape)
    got = round_trip(ipc.InferResult(1, {"t": array}, 0, 0, 0), threshold=threshold, prefix=shm_prefix)
    assert isinstance(got, ipc.InferResult)
    assert_same_tensors(got.outputs, {"t": array})
    assert got.outputs["t"].dtype.str == array.dtype.str  # byte order included


@pytest.mark.parametrize(
    ("values", "shape"),
    [([b"a", b"bc", b"", b"\x00" * 70_000], (2, 2)), ([], (0,)), ([], (3, 0)), ([b"only"], ())],
    ids=["2x2", "empty", "empty-2d", "scalar"],
)
@pytest.mark.parametrize("threshold", [BIG, 0], ids=["inline", "shm"])
def test_bytes_tensors_keep_their_elements(values, shape, threshold, shm_prefix):
    array = bytes_array(values, shape)
    got = round_trip(ipc.InferResult(1, {"t": array}, 0, 0, 0), threshold=threshold, prefix=shm_prefix)
    assert isinstance(got, ipc.InferResult)
    assert got.outputs["t"].dtype == object
    assert got.outputs["t"].shape == shape
    assert got.outputs["t"].tolist() == array.tolist()


def test_bytes_elements_are_length_prefixed_on_the_wire():
    frame = ipc.encode(
        ipc.InferResult(1, {"t": bytes_array([b"ab", b""], (2,))}, 0, 0, 0), shm_threshold=BIG, shm_prefix=""
    )
    message = pb.WorkerFrame.FromString(payload_of(frame))
    tensor = message.infer_result.outputs[0]
    assert (tensor.dtype, list(tensor.shape), tensor.inline) == ("bytes", [2], b"\x02\x00\x00\x00ab\x00\x00\x00\x00")


def test_non_contiguous_arrays_are_sent_in_row_major_order():
    array = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4))[:, ::2, 1:]
    got = round_trip(ipc.InferResult(1, {"t": array}, 0, 0, 0))
    assert isinstance(got, ipc.InferResult)
    assert_same_tensors(got.outputs, {"t": np.ascontiguousarray(array)})


@pytest.mark.parametrize(
    "array",
    [
        np.array(["text"]),
        np.array(["text", 1], dtype=object),
        np.array([1 + 2j], dtype=np.complex64),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
        np.array([b"fixed-width"], dtype="S11"),
    ],
    ids=["str", "object-str", "complex", "datetime", "structured", "fixed-width-bytes"],
)
def test_unsupported_dtypes_are_refused_and_leave_no_segment(array, shm_prefix):
    big = np.zeros(MiB, dtype=np.uint8)  # encoded first, into a segment that must then be removed
    with pytest.raises(ValueError, match="'bad'"):
        ipc.encode(ipc.InferResult(1, {"big": big, "bad": array}, 0, 0, 0), shm_threshold=1024, shm_prefix=shm_prefix)
    assert segments(shm_prefix) == []


@pytest.mark.parametrize("code", ["OK", "internal", "404", ""])
def test_failure_needs_a_grpc_status_code_name(code):
    with pytest.raises(ValueError, match="status code"):
        ipc.Failure(1, code, "message")


@pytest.mark.parametrize("prefix", ["../etc-", "a/b-", "-x", ".hidden", "x" * 201])
def test_unsafe_segment_prefixes_are_refused(prefix):
    with pytest.raises(ValueError, match="shm_prefix"):
        ipc.encode(ipc.Ping(1), shm_threshold=0, shm_prefix=prefix)


# Shared memory


def test_large_tensor_goes_through_shared_memory(shm_prefix):
    array = np.random.default_rng(0).random((512, 512), dtype=np.float32)  # 1 MiB
    frame = ipc.encode(ipc.InferCall(1, "", {"x": array}, [], 0.0), shm_threshold=64 * 1024, shm_prefix=shm_prefix)
    assert len(frame) < 200
    [name] = segments(shm_prefix)
    assert os.stat(os.path.join(ipc.SHM_DIR, name)).st_mode & 0o777 == 0o600
    got = ipc.decode(payload_of(frame))
    assert segments(shm_prefix) == []
    assert isinstance(got, ipc.InferCall)
    assert_same_tensors(got.inputs, {"x": array})
    got.inputs["x"][0, 0] = -1.0  # a private, writable copy-on-write mapping
    assert array[0, 0] != -1.0


def test_threshold_is_inclusive(shm_prefix):
    at = np.zeros(1024, dtype=np.uint8)
    below = np.zeros(1023, dtype=np.uint8)
    frame = ipc.encode(
        ipc.InferResult(1, {"at": at, "below": below}, 0, 0, 0), shm_threshold=1024, shm_prefix=shm_prefix
    )
    sent = pb.WorkerFrame.FromString(payload_of(frame)).infer_result.outputs
    assert [tensor.WhichOneof("data") for tensor in sent] == ["shm", "inline"]
    assert ipc.decode(payload_of(frame))  # and removes the segment
    assert segments(shm_prefix) == []


def test_empty_prefix_sends_everything_inline():
    array = np.ones(MiB, dtype=np.uint8)
    frame = ipc.encode(ipc.InferResult(1, {"t": array}, 0, 0, 0), shm_threshold=0, shm_prefix="")
    assert len(frame) > MiB


def test_falls_back_to_inline_without_shared_memory(monkeypatch, tmp_path, shm_prefix):
    monkeypatch.setattr(ipc.shm, "SHM_DIR", str(tmp_path / "no-such-dir"))
    array = np.arange(MiB, dtype=np.float32)
    frame = ipc.encode(ipc.InferResult(1, {"t": array}, 0, 0, 0), shm_threshold=1024, shm_prefix=shm_prefix)
    assert len(frame) > array.nbytes
    got = ipc.decode(payload_of(frame))
    assert isinstance(got, ipc.InferResult)
    assert_same_tensors(got.outputs, {"t": array})


def test_a_segment_is_decoded_once(shm_prefix):
    frame = ipc.encode(ipc.InferResult(1, {"t": np.ones(10)}, 0, 0, 0), shm_threshold=0, shm_prefix=shm_prefix)
    ipc.decode(payload_of(frame))
    with pytest.raises(ipc.ProtocolError, match="cannot be opened"):
        ipc.decode(payload_of(frame))


def test_reader_refuses_segments_outside_its_prefix(shm_prefix):
    frame = ipc.encode(ipc.InferResult(1, {"t": np.ones(10)}, 0, 0, 0), shm_threshold=0, shm_prefix=shm_prefix)
    with pytest.raises(ipc.ProtocolError, match="not a segment under"):
        ipc.decode(payload_of(frame), shm_prefix="mlp-someone-else-")
    assert len(segments(shm_prefix)) == 1  # not the reader's to remove
    assert ipc.decode(payload_of(frame), shm_prefix=shm_prefix)


def test_failed_decode_removes_every_segment_of_the_frame(shm_prefix):
    inputs = {"a": np.ones(1000), "b": np.ones(1000), "c": np.ones(1000)}
    frame = ipc.encode(ipc.InferCall(1, "", inputs, [], 0.0), shm_threshold=0, shm_prefix=shm_prefix)
    message = pb.WorkerFrame.FromString(payload_of(frame))
    message.infer_call.inputs[1].dtype = "<U4"
    assert len(segments(shm_prefix)) == 3
    with pytest.raises(ipc.ProtocolError, match="unsupported dtype"):
        ipc.decode(message.SerializeToString())
    assert segments(shm_prefix) == []


def test_sweep_removes_leftovers_under_the_prefix_only(shm_prefix):
    other = f"{shm_prefix}other-"  # a longer prefix is swept too: prefixes end with a separator
    unrelated = f"mlp-test-unrelated-{secrets.token_hex(4)}"
    for _ in range(3):
        ipc.encode(ipc.InferResult(1, {"t": np.ones(100)}, 0, 0, 0), shm_threshold=0, shm_prefix=shm_prefix)
    ipc.encode(ipc.InferResult(1, {"t": np.ones(100)}, 0, 0, 0), shm_threshold=0, shm_prefix=other)
    Path(ipc.SHM_DIR, unrelated).write_bytes(b"x")
    try:
        assert ipc.sweep_segments(shm_prefix) == 4
        assert segments(shm_prefix) == []
        assert Path(ipc.SHM_DIR, unrelated).exists()
        assert ipc.sweep_segments(shm_prefix) == 0
    finally:
        Path(ipc.SHM_DIR, unrelated).unlink()


# Arenas: one reusable segment per sender and direction


def assert_same_values(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """As assert_same_tensors, but read-only arrays pass: the supervisor's copies out of an arena are bytes."""
    assert list(got) == list(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert np.array_equal(got[name], expected), name


def arena_call(request_id: int, size: int, value: float) -> ipc.InferCall:
    inputs = {"a": np.full(size // 4, value, dtype=np.float32), "b": np.full(size // 8, value, dtype=np.float64)}
    return ipc.InferCall(request_id, "", inputs, [], 0.0)


def test_an_arena_is_reused_from_one_message_to_the_next(shm_prefix):
    arena = ipc.Arena(shm_prefix, "in")
    reader = ipc.ArenaReader(shm_prefix)
    try:
        names = set()
        for request_id, value in enumerate((1.0, 2.0, 3.0), start=1):
            frame = ipc.encode(
                arena_call(request_id, MiB, value), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena
            )
            assert len(frame) < 1024  # the tensors are in the arena, not in the frame
            decoded = ipc.decode(payload_of(frame), shm_prefix=shm_prefix, arena=reader)
            assert_same_values(decoded.inputs, arena_call(request_id, MiB, value).inputs)
            names.add(arena.name)
            assert segments(shm_prefix) == [arena.name]  # one file, never unlinked by the reader
        assert len(names) == 1
        small_size = arena.size
        ipc.decode(
            payload_of(ipc.encode(arena_call(4, 4 * MiB, 4.0), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena)),
            shm_prefix=shm_prefix,
            arena=reader,
        )
        assert arena.size > small_size
        assert segments(shm_prefix) == [arena.name]  # grown: the old one is gone
    finally:
        arena.close()
        reader.close()
    assert segments(shm_prefix) == []


@pytest.mark.parametrize("writable", [False, True])
def test_arena_tensors_are_copies_that_survive_the_next_message(shm_prefix, writable):
    """Whatever the receiver decoded stays as it was when the sender reuses the arena: the supervisor may hold
    an answer while the worker writes the next one, and a model may keep (or, writable, change) its inputs."""
    arena = ipc.Arena(shm_prefix, "out")
    reader = ipc.ArenaReader(shm_prefix, writable=writable)
    try:
        first = ipc.decode(
            payload_of(ipc.encode(arena_call(1, MiB, 1.0), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena)),
            shm_prefix=shm_prefix,
            arena=reader,
        )
        ipc.encode(arena_call(2, MiB, 2.0), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena)
        assert (first.inputs["a"] == 1.0).all()
        assert first.inputs["a"].flags.writeable is writable
        if writable:
            first.inputs["a"][:] = 7.0
            again = ipc.decode(
                payload_of(ipc.encode(arena_call(3, MiB, 3.0), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena)),
                shm_prefix=shm_prefix,
                arena=reader,
            )
            assert (again.inputs["a"] == 3.0).all()
    finally:
        arena.close()
        reader.close()


def test_an_arena_frame_is_refused_by_a_reader_without_an_arena_or_outside_its_prefix(shm_prefix):
    arena = ipc.Arena(shm_prefix, "in")
    try:
        frame = payload_of(ipc.encode(arena_call(1, MiB, 1.0), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena))
        with pytest.raises(ipc.ProtocolError, match="reads no arena"):
            ipc.decode(frame, shm_prefix=shm_prefix)
        with pytest.raises(ipc.ProtocolError, match="is not a segment under"):
            ipc.decode(frame, shm_prefix="mlp-someone-else-", arena=ipc.ArenaReader("mlp-someone-else-"))
        assert segments(shm_prefix) == [arena.name]  # a refused frame never removes the sender's arena
    finally:
        arena.close()


def test_a_message_larger_than_the_arena_limit_uses_segments_of_its_own(shm_prefix):
    arena = ipc.Arena(shm_prefix, "in", maximum_bytes=MiB)
    try:
        frame = ipc.encode(arena_call(1, 2 * MiB, 1.0), shm_threshold=1024, shm_prefix=shm_prefix, arena=arena)
        assert arena.name == ""
        assert len(segments(shm_prefix)) == 2  # one per tensor, for the receiver to remove
        decoded = ipc.decode(payload_of(frame), shm_prefix=shm_prefix, arena=ipc.ArenaReader(shm_prefix))
        assert_same_values(decoded.inputs, arena_call(1, 2 * MiB, 1.0).inputs)
        assert segments(shm_prefix) == []
    finally:
        arena.close()


def test_an_arena_that_cannot_be_allocated_leaves_nothing_and_the_tensors_go_another_way(shm_prefix):
    """posix_fallocate failing (here: a file size limit; in production: a full tmpfs) is an error at once,
    never a SIGBUS on a later write, and leaves no file behind."""
    code = f"""
import resource, signal, numpy as np
from services.inference import ipc
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
arena = ipc.Arena({shm_prefix!r}, "in")
assert not arena.reserve(4 << 20) and arena.name == ""
call = ipc.InferCall(1, "", {{"a": np.ones(1 << 20, dtype=np.float32)}}, [], 0.0)
frame = ipc.encode(call, shm_threshold=1024, shm_prefix={shm_prefix!r}, arena=arena)
print(len(frame) > (4 << 20))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # inline: the segment of its own could not be written either
    assert segments(shm_prefix) == []


@pytest.mark.parametrize("prefix", ["", "/", "../"])
def test_sweep_refuses_an_empty_or_unsafe_prefix(prefix):
    with pytest.raises(ValueError, match="prefix"):
        ipc.sweep_segments(prefix)


# Malformed frames


def frame_with(tensor: pb.WorkerFrame.Tensor) -> bytes:
    return pb.WorkerFrame(request_id=1, infer_result=pb.WorkerFrame.InferResult(outputs=[tensor])).SerializeToString()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\xff\xff\xff", "not a WorkerFrame"),
        (b"", "without a body"),
        (pb.WorkerFrame(failure=pb.WorkerFrame.Failure(code="OK")).SerializeToString(), "unknown status code"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="<f4", shape=[3], inline=b"\0" * 8)), "expected 12"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="<f4", shape=[-1], inline=b"")), "negative"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="|O", shape=[1], inline=b"\0" * 8)), "unsupported dtype"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="bytes", shape=[2], inline=b"\1\0\0\0a")), "cannot hold"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="bytes", shape=[1], inline=b"\5\0\0\0a")), "truncated"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="bytes", shape=[1], inline=b"\1\0\0\0ab")), "after the last"),
        (frame_with(pb.WorkerFrame.Tensor(name="t", dtype="bytes", shape=[10**12], inline=b"")), "cannot hold"),
        (
            frame_with(
                pb.WorkerFrame.Tensor(name="t", dtype="<f4", shape=[1], shm={"name": "../../etc/passwd", "size": 4})
            ),
            "not a segment",
        ),
        (
            pb.WorkerFrame(
                infer_call=pb.WorkerFrame.InferCall(
                    inputs=[pb.WorkerFrame.Tensor(name="t", dtype="|u1", shape=[0])] * 2
                )
            ).SerializeToString(),
            "two tensors",
        ),
    ],
    ids=[
        "garbage",
        "no-body",
        "code-ok",
        "size",
        "negative-dim",
        "object-dtype",
        "bytes-count",
        "bytes-truncated",
        "bytes-trailing",
        "bytes-huge-shape",
        "segment-path",
        "duplicate-name",
    ],
)
def test_malformed_frames_are_refused(payload, error):
    with pytest.raises(ipc.ProtocolError, match=error):
        ipc.decode(payload)


def test_a_segment_of_the_wrong_size_is_refused(shm_prefix):
    frame = ipc.encode(ipc.InferResult(1, {"t": np.ones(10)}, 0, 0, 0), shm_threshold=0, shm_prefix=shm_prefix)
    message = pb.WorkerFrame.FromString(payload_of(frame))
    message.infer_result.outputs[0].shape[:] = [11]
    message.infer_result.outputs[0].shm.size = 88
    with pytest.raises(ipc.ProtocolError, match="not a file of 88 bytes"):
        ipc.decode(message.SerializeToString())
    assert segments(shm_prefix) == []


# Pipes


@dataclass
class Pipe:
    """Both ends of one real pipe, closed afterwards unless a channel took them over."""

    read_fd: int
    write_fd: int


@pytest.fixture
def make_pipe() -> Iterator[Callable[[], Pipe]]:
    fds: list[int] = []

    def make() -> Pipe:
        read_fd, write_fd = os.pipe()
        fds.extend((read_fd, write_fd))
        return Pipe(read_fd, write_fd)

    yield make
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def test_oversized_length_prefix_is_refused_by_the_async_reader(make_pipe):
    incoming, outgoing = make_pipe(), make_pipe()
    reader, writer = await ipc.open_pipes(incoming.read_fd, outgoing.write_fd, max_frame_bytes=1024)
    try:
        os.write(incoming.write_fd, ipc.encode(ipc.LoadFailed("x" * 1000), shm_threshold=0, shm_prefix=""))
        assert await reader.read() == ipc.LoadFailed("x" * 1000)  # up to the limit is fine
        os.write(incoming.write_fd, struct.pack("<I", 0xFFFFFFFF))
        with pytest.raises(ipc.FrameTooLargeError, match="4294967295 bytes exceeds the limit of 1024"):
            await reader.read()
        with pytest.raises(ipc.ProtocolError, match="out of step"):
            await reader.read()
    finally:
        reader.close()
        writer.close()


def test_oversized_length_prefix_is_refused_by_the_blocking_channel(make_pipe):
    incoming, outgoing = make_pipe(), make_pipe()
    with ipc.BlockingChannel(incoming.read_fd, outgoing.write_fd, max_frame_bytes=1024) as channel:
        os.write(incoming.write_fd, struct.pack("<I", 1025))
        with pytest.raises(ipc.FrameTooLargeError, match="1025 bytes"):
            channel.read()
        with pytest.raises(ipc.ProtocolError, match="out of step"):
            channel.read()


def test_blocking_channel_end_of_file(make_pipe):
    incoming, outgoing = make_pipe(), make_pipe()
    with ipc.BlockingChannel(incoming.read_fd, outgoing.write_fd) as channel:
        frame = ipc.encode(ipc.Ping(3), shm_threshold=0, shm_prefix="")
        os.write(incoming.write_fd, frame + frame[:-1])  # one whole frame, then the writer dies mid-frame
        os.close(incoming.write_fd)
        assert channel.read() == ipc.Ping(3)
        with pytest.raises(EOFError, match="inside a frame"):
            channel.read()


def test_blocking_channel_clean_end_of_file_and_broken_pipe(make_pipe):
    incoming, outgoing = make_pipe(), make_pipe()
    with ipc.BlockingChannel(incoming.read_fd, outgoing.write_fd) as channel:
        os.close(incoming.write_fd)
        with pytest.raises(EOFError, match="peer closed"):
            channel.read()
        os.close(outgoing.read_fd)
        with pytest.raises(BrokenPipeError):
            channel.send(ipc.Pong(1, 2, 3, 4))


def test_a_frame_that_cannot_be_sent_leaves_no_segment(make_pipe, shm_prefix):
    incoming, outgoing = make_pipe(), make_pipe()
    with ipc.BlockingChannel(incoming.read_fd, outgoing.write_fd, shm_threshold=0, shm_prefix=shm_prefix) as channel:
        os.close(outgoing.read_fd)
        with pytest.raises(BrokenPipeError):
            channel.send(ipc.InferResult(1, {"t": np.ones(1000)}, 0, 0, 0))
    assert segments(shm_prefix) == []


def test_concurrent_sends_from_two_threads_do_not_interleave(make_pipe):
    """Frames far larger than the pipe's buffer take many writes each; the lock keeps them whole."""
    pipe, unused = make_pipe(), make_pipe()
    frames_per_thread = 40
    sender = ipc.BlockingChannel(unused.read_fd, pipe.write_fd)  # no prefix: 300 KB inline frames
    receiver = ipc.BlockingChannel(pipe.read_fd, unused.write_fd)

    def send_all(thread: int) -> None:
        for sequence in range(frames_per_thread):
            tensor = np.full(75_000, thread * 1000 + sequence, dtype=np.int32)
            sender.send(ipc.InferResult(thread, {"t": tensor}, 0, 0, 0))

    threads = [threading.Thread(target=send_all, args=(thread,)) for thread in (1, 2)]
    for thread in threads:
        thread.start()
    try:
        seen: dict[int, list[int]] = {1: [], 2: []}
        for _ in range(2 * frames_per_thread):
            message = receiver.read()
            assert isinstance(message, ipc.InferResult)
            values = np.unique(message.outputs["t"])
            assert values.size == 1
            assert values[0] // 1000 == message.request_id
            seen[message.request_id].append(int(values[0]) % 1000)
    finally:
        for thread in threads:
            thread.join(timeout=30)
        sender.close()
        receiver.close()
    assert seen == {1: list(range(frames_per_thread)), 2: list(range(frames_per_thread))}


# A real worker process


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    reader: ipc.FrameReader
    writer: ipc.FrameWriter

    async def call(self, message: ipc.Message, prefix: str) -> ipc.Message:
        self.writer.write(ipc.encode(message, shm_threshold=64 * 1024, shm_prefix=prefix))
        await self.writer.drain()
        return await self.reader.read()

    async def exit_code(self) -> int:
        return await asyncio.to_thread(self.process.wait, 30)


def spawn_worker(mode: str, prefix: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """The process and the supervisor's pipe ends (read from it, write to it); the worker's are closed here."""
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.inference.test_ipc", mode, str(to_worker_r), str(from_worker_w), prefix],
            pass_fds=(to_worker_r, from_worker_w),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        for fd in (to_worker_w, from_worker_r):
            os.close(fd)
        raise
    finally:
        os.close(to_worker_r)
        os.close(from_worker_w)
    return process, from_worker_r, to_worker_w


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[[str, str], Awaitable[Worker]]]:
    """Spawn this module as a worker (subprocess, pipes by file descriptor); stopped afterwards."""
    started: list[Worker] = []

    async def start(mode: str, prefix: str) -> Worker:
        process, from_worker_r, to_worker_w = spawn_worker(mode, prefix)
        reader, writer = await ipc.open_pipes(from_worker_r, to_worker_w, shm_prefix=prefix)
        worker = Worker(process, reader, writer)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.writer.close()
        worker.reader.close()
        if worker.process.poll() is None:
            worker.process.kill()
        await worker.exit_code()


async def test_real_worker_echoes_8_mib_tensors(start_worker, shm_prefix):
    worker = await start_worker("echo", shm_prefix)
    async with asyncio.timeout(60):
        ready = await worker.reader.read()
        assert ready == ipc.Ready(worker.process.pid, "echo", "1")
        rng = np.random.default_rng(1)
        inputs = {
            "fp32": rng.random(2 * MiB, dtype=np.float32).reshape(2048, 1024),
            "u8": rng.integers(0, 256, 8 * MiB, dtype=np.uint8),
            "fp64": rng.random(MiB, dtype=np.float64),
            "small": np.arange(10, dtype=np.int16),
            "text": bytes_array([b"x" * MiB, b"hello"], (2,)),
        }
        for request_id in (1, 2, 3):
            result = await worker.call(ipc.InferCall(request_id, "", inputs, [], 0.0), shm_prefix)
            assert isinstance(result, ipc.InferResult)
            assert result.request_id == request_id
            assert_same_tensors(result.outputs, inputs)
            assert segments(shm_prefix) == []
        pong = await worker.call(ipc.Ping(99), shm_prefix)
        assert pong == ipc.Pong(99, worker.process.pid, 0, 3)
        worker.writer.write(ipc.encode(ipc.Shutdown(), shm_threshold=0, shm_prefix=shm_prefix))
        await worker.writer.drain()
        with pytest.raises(EOFError, match="peer closed"):
            await worker.reader.read()
        assert await worker.exit_code() == 0


async def test_worker_exits_at_end_of_file_and_supervisor_sees_it(start_worker, shm_prefix):
    worker = await start_worker("echo", shm_prefix)
    async with asyncio.timeout(30):
        assert isinstance(await worker.reader.read(), ipc.Ready)
        worker.writer.close()  # the worker's read end sees end of file
        with pytest.raises(EOFError, match="peer closed"):
            await worker.reader.read()
        assert await worker.exit_code() == 0


async def test_supervisor_sees_a_dead_worker_as_eof_and_broken_pipe(start_worker, shm_prefix):
    worker = await start_worker("exit-on-first", shm_prefix)
    async with asyncio.timeout(30):
        assert isinstance(await worker.reader.read(), ipc.Ready)
        big = {"t": np.ones(MiB, dtype=np.float32)}  # its segment is never decoded: a leftover to sweep
        worker.writer.write(ipc.encode(ipc.InferCall(1, "", big, [], 0.0), shm_threshold=1024, shm_prefix=shm_prefix))
        await worker.writer.drain()
        with pytest.raises(EOFError):
            await worker.reader.read()
        assert await worker.exit_code() == 3
        frame = ipc.encode(ipc.Ping(2), shm_threshold=0, shm_prefix=shm_prefix)
        with pytest.raises(BrokenPipeError):
            await write_until_broken(worker.writer, frame)
    assert ipc.sweep_segments(shm_prefix) == 1


async def write_until_broken(writer: ipc.FrameWriter, frame: bytes) -> None:
    """The event loop notices a closed pipe on its next turn at the latest (the test has a timeout)."""
    while True:
        writer.write(frame)
        await writer.drain()


def _worker_main(mode: str, read_fd: int, write_fd: int, prefix: str) -> int:
    with ipc.BlockingChannel(read_fd, write_fd, shm_prefix=prefix) as channel:
        channel.send(ipc.Ready(os.getpid(), "echo", "1"))
        served = 0
        while True:
            if mode == "exit-on-first":
                channel.read_payload()  # not decoded: its segments stay behind
                os._exit(3)
            try:
                message = channel.read()
            except EOFError:
                return 0
            if isinstance(message, ipc.InferCall):
                served += 1
                channel.send(ipc.InferResult(message.request_id, message.inputs, 0, 0, 0))
            elif isinstance(message, ipc.Ping):
                channel.send(ipc.Pong(message.request_id, os.getpid(), 0, served))
            elif isinstance(message, ipc.Shutdown):
                return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
