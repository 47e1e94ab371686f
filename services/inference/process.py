"""One worker process as the supervisor sees it: start, talk, ping, stop.

The process is started with ``subprocess`` (never forked from this gRPC process) running
``python -m services.inference.worker``, with two pipes passed by file descriptor. A reader
task routes every answer to the future of the request it answers; when the pipe closes (the
process died), every pending request fails with :class:`WorkerGone`.

Every way out (a failed or cancelled start, :meth:`WorkerProcess.kill`,
:meth:`WorkerProcess.shutdown`, :meth:`WorkerProcess.close`) reaps the process and closes
both pipes: no worker outlives the pool that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from services.common.logs import fields
from services.inference import ipc

log = logging.getLogger(__name__)


class WorkerGone(Exception):
    """The worker process exited or its pipe broke while a request was pending."""


class WorkerStartError(Exception):
    """The worker could not load its model (the message says why)."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process serves and how it talks."""

    model_name: str
    model_version: str
    model_dir: Path
    worker_id: str
    shm_threshold: int
    shm_prefix: str
    env: Mapping[str, str]
    log_level: str = "INFO"
    log_format: str = "json"
    shm_arena_bytes: int = 0
    shm_arena_max_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True)
class PendingInfer:
    """An inference written to a worker whose answer has not been read yet."""

    request_id: int
    future: asyncio.Future[Any]
    started_ns: int
    sent_ns: int = 0


class WorkerProcess:
    """A started worker process and its pipes. Not restartable: the pool makes a new one."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.pid = 0
        self.started_at = 0.0
        self.requests_served = 0
        self.rss_bytes = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: ipc.FrameReader | None = None
        self._writer: ipc.FrameWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._read_task: asyncio.Task[None] | None = None
        self._exit_task: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()
        self.pipe_closed = False  # the worker's end of the pipe is gone: it exited (or is exiting)
        self.exit_code: int | None = None
        # The calls' tensors go to the worker through one reusable arena (one call at a time per worker).
        self._arena = (
            ipc.Arena(spec.shm_prefix, "in", spec.shm_arena_bytes, spec.shm_arena_max_bytes)
            if spec.shm_prefix and spec.shm_arena_max_bytes
            else None
        )

    async def start(self, limit_seconds: float) -> None:
        """Spawn the process and wait until it reports its model loaded (or failed to).

        On any failure, cancellation included, the process is killed and reaped before this returns.
        """
        try:
            await self._start(limit_seconds)
        except BaseException as error:
            reason = "cancelled_start" if isinstance(error, asyncio.CancelledError) else "start_failed"
            await asyncio.shield(self.kill(reason))
            raise

    async def _start(self, limit_seconds: float) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        command = [
            sys.executable,
            "-m",
            "services.inference.worker",
            "--read-fd",
            str(to_worker_r),
            "--write-fd",
            str(from_worker_w),
            "--model-dir",
            str(self.spec.model_dir),
            "--version",
            self.spec.model_version,
            "--worker-id",
            self.spec.worker_id,
            "--shm-threshold",
            str(self.spec.shm_threshold),
            "--shm-prefix",
            self.spec.shm_prefix,
            "--shm-arena-bytes",
            str(self.spec.shm_arena_bytes),
            "--shm-arena-max-bytes",
            str(self.spec.shm_arena_max_bytes),
            "--log-level",
            self.spec.log_level,
            "--log-format",
            self.spec.log_format,
        ]
        try:
            try:
                # Not cancellable half-way: a process spawned but not recorded could not be reaped.
                self._process = await asyncio.shield(
                    asyncio.create_subprocess_exec(
                        *command,
                        pass_fds=(to_worker_r, from_worker_w),
                        env=dict(self.spec.env),
                        stdin=subprocess.DEVNULL,
                        close_fds=True,
                    )
                )
            finally:
                os.close(to_worker_r)
                os.close(from_worker_w)
        except BaseException:
            os.close(from_worker_r)
            os.close(to_worker_w)
            raise
        self.pid = self._process.pid
        self.started_at = time.time()
        self._exit_task = asyncio.get_running_loop().create_task(self._watch_exit(self._process))
        self._reader, self._writer = await ipc.open_pipes(from_worker_r, to_worker_w, shm_prefix=self.spec.shm_prefix)
        log.info(
            "worker.started",
            extra=fields(
                worker_id=self.spec.worker_id, pid=self.pid, model=self.spec.model_name, version=self.spec.model_version
            ),
        )
        try:
            first = await asyncio.wait_for(self._reader.read(), limit_seconds)
        except (TimeoutError, EOFError) as error:
            raise WorkerStartError(
                "the worker exited while loading the model"
                if isinstance(error, EOFError)
                else f"the model did not load within {limit_seconds:g}s"
            ) from None
        if isinstance(first, ipc.LoadFailed):
            raise WorkerStartError(first.message)
        if not isinstance(first, ipc.Ready):
            raise WorkerStartError(f"unexpected first message {type(first).__name__}")
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        reader = self._reader
        if reader is None:
            return
        try:
            while True:
                message = await reader.read()
                request_id = getattr(message, "request_id", 0)
                future = self._pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (EOFError, OSError, ValueError):
            self.pipe_closed = True
        finally:
            self._fail_pending(WorkerGone("the worker process exited"))

    async def _watch_exit(self, process: asyncio.subprocess.Process) -> None:
        self.exit_code = await process.wait()
        self.exited.set()

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a request already given up leaves no warning at exit

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None and not self.exited.is_set()

    @property
    def gone(self) -> bool:
        """The process exited, or closed its pipe (it is dying): not a hang."""
        return (
            self.pipe_closed
            or self.exited.is_set()
            or (self._process is not None and self._process.returncode is not None)
        )

    def _write(self, message: Any, request_id: int) -> asyncio.Future[Any]:
        """Queue ``message`` on the pipe; the future of its answer."""
        if not self.alive or self._writer is None:
            raise WorkerGone("the worker process is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            frame = ipc.encode(
                message, shm_threshold=self.spec.shm_threshold, shm_prefix=self.spec.shm_prefix, arena=self._arena
            )
            self._writer.write(frame)
        except (OSError, ConnectionError, RuntimeError) as error:
            self._pending.pop(request_id, None)
            raise WorkerGone(f"cannot write to the worker: {type(error).__name__}") from None
        return future

    async def _drain(self, request_id: int) -> None:
        try:
            if self._writer is None:
                raise ConnectionError("closed")
            await self._writer.drain()
        except (OSError, ConnectionError, RuntimeError) as error:
            self._pending.pop(request_id, None)
            raise WorkerGone(f"cannot write to the worker: {type(error).__name__}") from None

    def submit(
        self, inputs: dict[str, np.ndarray], outputs: list[str], *, deadline: float, traceparent: str
    ) -> PendingInfer:
        """Write one inference to the worker (without waiting for the pipe to drain)."""
        request_id = next(self._ids)
        started = time.perf_counter_ns()
        future = self._write(ipc.InferCall(request_id, traceparent, inputs, outputs, deadline), request_id)
        return PendingInfer(request_id, future, started)

    async def sent(self, pending: PendingInfer) -> None:
        """Wait until ``pending`` has been handed to the pipe."""
        await self._drain(pending.request_id)
        pending.sent_ns = time.perf_counter_ns()

    def discard(self, pending: PendingInfer) -> None:
        """Forget ``pending``: its answer, if one comes, is dropped."""
        self._pending.pop(pending.request_id, None)

    def completed(self, pending: PendingInfer) -> ipc.InferResult | ipc.Failure:
        """The answer of a finished ``pending`` with the supervisor-side timings filled in.

        ``compute_input_ns`` adds the hand-over (encoding the call, shared-memory writes, the pipe),
        and ``compute_output_ns`` becomes everything between the hand-over and the answer that was
        not the worker's input decoding or the model (the worker's output encoding and the way back).
        """
        result = pending.future.result()
        if not isinstance(result, ipc.InferResult):
            return result  # type: ignore[no-any-return]
        answered = time.perf_counter_ns()
        sent = pending.sent_ns or pending.started_ns
        self.requests_served += 1
        in_worker = result.compute_input_ns + result.compute_infer_ns
        return replace(
            result,
            compute_input_ns=result.compute_input_ns + sent - pending.started_ns,
            compute_output_ns=max(result.compute_output_ns, answered - sent - in_worker),
        )

    async def ping(self, limit_seconds: float) -> ipc.Pong:
        request_id = next(self._ids)
        future = self._write(ipc.Ping(request_id), request_id)
        try:
            await self._drain(request_id)
            pong = await asyncio.wait_for(future, limit_seconds)
        finally:
            self._pending.pop(request_id, None)
        self.rss_bytes = pong.rss_bytes
        return pong  # type: ignore[no-any-return]

    async def kill(self, reason: str, grace: float = 0.0) -> None:
        """Stop the process: SIGTERM, then SIGKILL after ``grace`` seconds (0 = at once); reap it."""
        process = self._process
        if process is not None and process.returncode is None:
            if grace > 0:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    process.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reaped()), grace)
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await self._reaped()
            log.info(
                "worker.killed",
                extra=fields(worker_id=self.spec.worker_id, pid=self.pid, reason=reason, exit_code=process.returncode),
            )
        self._fail_pending(WorkerGone(f"the worker was stopped ({reason})"))
        await self.close()

    async def _reaped(self) -> None:
        if self._exit_task is not None:
            await asyncio.shield(self._exit_task)
        elif self._process is not None:
            await self._process.wait()

    async def shutdown(self, grace: float) -> None:
        """Ask the worker to finish and exit; kill it if it does not within ``grace``."""
        if self.alive and self._writer is not None:
            with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                self._writer.write(ipc.encode(ipc.Shutdown(), shm_threshold=0, shm_prefix=self.spec.shm_prefix))
                await self._writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exited.wait(), grace)
        await self.kill("shutdown", grace=grace)

    async def close(self) -> None:
        """Reap the process (killing it if it still runs), close both pipes, remove its segments."""
        process = self._process
        if process is not None and process.returncode is None and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        if process is not None:
            await asyncio.shield(self._reaped())
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
            self._read_task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._fail_pending(WorkerGone("the worker was stopped"))
        if self._arena is not None:
            self._arena.close()
        ipc.sweep_segments(self.spec.shm_prefix)
