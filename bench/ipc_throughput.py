"""IPC payload throughput: FP32 tensors echoed by a real worker process.

Three ways to move a tensor there and back, measured in the same run, round by round:

* ``ipc``: the worker protocol (``services.inference.ipc``): tensors of 64 KiB or more travel
  through shared-memory segments, the frames on the pipe only name them;
* ``json``: the same pipes and length-prefixed framing, the tensor as a JSON list of floats;
* ``np.copy``: no process at all, two in-process copies (there and back): the ceiling.

Both workers are started the same way (``subprocess`` with the pipes passed by file descriptor,
``MALLOC_MMAP_THRESHOLD_`` set in their environment); the supervisor side runs on asyncio with
``open_pipes``, as the inference service does. Every echo is checked against what was sent, outside
the timed part; freeing the result is timed (for ``ipc`` that unmaps the segment and frees its pages).
Throughput counts the payload both ways: 2 x tensor bytes / echo time.

    python -m bench.ipc_throughput                        # the comparison
    python -m bench.ipc_throughput echo MODE R W PREFIX   # one echo worker (used by the comparison)
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from services.inference import ipc

MiB = 1024 * 1024
SIZES = (1 * MiB, 8 * MiB)
ROUNDS = 5
ECHOES_PER_ROUND = {"ipc": 20, "json": 1, "np.copy": 20}
METHODS = tuple(ECHOES_PER_ROUND)
SHM_THRESHOLD = 64 * 1024
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
_LENGTH = struct.Struct("<I")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    reader: ipc.FrameReader
    writer: ipc.FrameWriter


async def _start(mode: str, prefix: str) -> Worker:
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    try:
        process = subprocess.Popen(  # noqa: S603, ASYNC220  (our own module, no shell; started once)
            [sys.executable, "-m", "bench.ipc_throughput", "echo", mode, str(to_worker_r), str(from_worker_w), prefix],
            pass_fds=(to_worker_r, from_worker_w),
            env={**os.environ, **WORKER_ENV},
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(to_worker_r)
        os.close(from_worker_w)
    reader, writer = await ipc.open_pipes(from_worker_r, to_worker_w, shm_prefix=prefix)
    ready = await reader.read()
    assert isinstance(ready, ipc.Ready), ready
    return Worker(process, reader, writer)


async def _stop(worker: Worker) -> None:
    worker.writer.write(ipc.encode(ipc.Shutdown(), shm_threshold=0, shm_prefix=""))
    await worker.writer.drain()
    worker.writer.close()
    worker.reader.close()
    await asyncio.to_thread(worker.process.wait, 30)


async def _echo_ipc(worker: Worker, tensor: np.ndarray, prefix: str) -> np.ndarray:
    call = ipc.InferCall(1, "", {"x": tensor}, [], 0.0)
    worker.writer.write(ipc.encode(call, shm_threshold=SHM_THRESHOLD, shm_prefix=prefix))
    await worker.writer.drain()
    result = await worker.reader.read()
    assert isinstance(result, ipc.InferResult), result
    return result.outputs["x"]


async def _echo_json(worker: Worker, tensor: np.ndarray) -> np.ndarray:
    body = json.dumps(tensor.tolist()).encode()
    worker.writer.write(_LENGTH.pack(len(body)) + body)
    await worker.writer.drain()
    return np.asarray(json.loads(await worker.reader.read_payload()), dtype=np.float32)


async def _echo_copy(tensor: np.ndarray) -> np.ndarray:
    return np.copy(np.copy(tensor))


async def _seconds_per_echo(echo: Callable[[], Awaitable[np.ndarray]], times: int, sent: np.ndarray) -> float:
    """Mean time of an echo plus freeing its result (as a served request would); the check is not timed."""
    elapsed = 0.0
    for _ in range(times):
        start = time.perf_counter()
        result = await echo()
        received = time.perf_counter()
        assert result.dtype == sent.dtype
        assert np.array_equal(result, sent)
        checked = time.perf_counter()
        del result
        elapsed += (received - start) + (time.perf_counter() - checked)
    return elapsed / times


async def main() -> None:
    prefix = f"mlp-{os.getpid()}-bench-"
    workers = {mode: await _start(mode, prefix) for mode in ("ipc", "json")}
    try:
        table: list[tuple[int, dict[str, float]]] = []
        for size in SIZES:
            tensor = np.random.default_rng(size).random(size // 4, dtype=np.float32)
            echoes: dict[str, Callable[[], Awaitable[np.ndarray]]] = {
                "ipc": functools.partial(_echo_ipc, workers["ipc"], tensor, prefix),
                "json": functools.partial(_echo_json, workers["json"], tensor),
                "np.copy": functools.partial(_echo_copy, tensor),
            }
            for echo in echoes.values():  # warm up: first mappings, allocator, caches
                await _seconds_per_echo(echo, 1, tensor)
            rounds: dict[str, list[float]] = {method: [] for method in echoes}
            for _ in range(ROUNDS):
                for method, echo in echoes.items():
                    rounds[method].append(await _seconds_per_echo(echo, ECHOES_PER_ROUND[method], tensor))
            table.append((size, {method: statistics.median(values) for method, values in rounds.items()}))
    finally:
        for worker in workers.values():
            await _stop(worker)
        ipc.sweep_segments(prefix)
    env = " ".join(f"{key}={value}" for key, value in WORKER_ENV.items())
    print("## IPC throughput: FP32 tensor echoed by a worker process, worker protocol vs JSON vs np.copy\n")
    print(
        f"Workers run with `{env}`; median of {ROUNDS} rounds; MB/s = 2 x tensor bytes / echo time (1 MB = 10^6 B).\n"
    )
    print("| tensor | method | ms per echo | MB/s | vs JSON | vs np.copy |")
    print("|---|---|---|---|---|---|")
    for size, seconds in table:
        rate = {method: 2 * size / value / 1e6 for method, value in seconds.items()}
        for method in METHODS:
            cells = [seconds[method] * 1e3, rate[method], rate[method] / rate["json"], rate[method] / rate["np.copy"]]
            print(f"| {size // MiB} MiB | {method} | {' | '.join(_figure(cell) for cell in cells)} |")


def _figure(value: float) -> str:
    """Three significant digits, without exponents for large values."""
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def _serve(mode: str, read_fd: int, write_fd: int, prefix: str) -> int:
    """The echo worker, on the protocol's BlockingChannel; in ``json`` mode, frames starting with ``[`` are JSON."""
    with ipc.BlockingChannel(read_fd, write_fd, shm_threshold=SHM_THRESHOLD, shm_prefix=prefix) as channel:
        channel.send(ipc.Ready(os.getpid(), f"echo-{mode}", "1"))
        while True:
            try:
                payload = channel.read_payload()
            except EOFError:
                return 0
            if mode == "json" and payload.startswith(b"["):
                array = np.asarray(json.loads(payload), dtype=np.float32)
                body = json.dumps(array.tolist()).encode()
                channel.send_frame(_LENGTH.pack(len(body)) + body)
                continue
            message = ipc.decode(payload, shm_prefix=prefix)
            if isinstance(message, ipc.Shutdown):
                return 0
            if isinstance(message, ipc.InferCall):
                channel.send(ipc.InferResult(message.request_id, message.inputs, 0, 0, 0))


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        sys.exit(_serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    asyncio.run(main())
