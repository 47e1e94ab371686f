"""The worker process: loads one model version and runs its inferences.

Started by the supervisor (``python -m services.inference.worker --read-fd R --write-fd W ...``)
with two inherited pipes. A reader thread answers pings at once, so a long inference does not
look like a hang; the main thread runs inferences one at a time. Model code runs here only:
if it crashes or hangs, the supervisor replaces this process and carries on. A model that raises
``InvalidInput`` answers INVALID_ARGUMENT with its message (cut to 512 characters), a MemoryError
RESOURCE_EXHAUSTED; any other exception is INTERNAL naming only the exception type.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace

from services.common.logs import configure_logging, fields
from services.common.telemetry import create_tracer_provider
from services.inference import ipc
from services.inference.reasons import MAX_MODEL_MESSAGE_CHARS, clip
from services.inference.repository import load_config
from services.inference.runtimes import InvalidInput, create_runtime

log = logging.getLogger("services.inference.worker")

SERVICE = "inference-worker"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker:
    def __init__(self, args: argparse.Namespace):
        self._args = args
        self._channel = ipc.BlockingChannel(
            args.read_fd,
            args.write_fd,
            shm_threshold=args.shm_threshold,
            shm_prefix=args.shm_prefix,
            arena=args.shm_arena_max_bytes > 0,
            arena_bytes=args.shm_arena_bytes,
            arena_max_bytes=args.shm_arena_max_bytes,
        )
        self._calls: queue.Queue[tuple[ipc.InferCall, int] | None] = queue.Queue()  # with its decoding ns
        self._served = 0
        self._tracer = trace.get_tracer(__name__)

    def _send(self, message: Any) -> None:
        self._channel.send(message)

    def _read_loop(self) -> None:
        """Answer pings at once; queue inferences for the main thread; stop on Shutdown or EOF."""
        try:
            while True:
                payload = self._channel.read_payload()
                decoding = time.perf_counter_ns()
                message = self._channel.decode(payload)
                if isinstance(message, ipc.Ping):
                    self._send(ipc.Pong(message.request_id, os.getpid(), _rss_bytes(), self._served))
                elif isinstance(message, ipc.InferCall):
                    self._calls.put((message, time.perf_counter_ns() - decoding))
                elif isinstance(message, ipc.Shutdown):
                    break
        except (EOFError, OSError):
            pass
        finally:
            self._calls.put(None)

    def run(self) -> int:
        args = self._args
        model_dir = Path(args.model_dir)
        try:
            config = load_config(model_dir)
            runtime = create_runtime(config.runtime)
            runtime.load(model_dir / args.version, config)
        except Exception as error:
            log.exception("worker.load_failed", extra=fields(model_dir=str(model_dir), version=args.version))
            self._send(ipc.LoadFailed(f"{type(error).__name__}: {error}"))
            return 1
        self._send(ipc.Ready(os.getpid(), config.name, args.version))
        log.info("worker.ready", extra=fields(worker_id=args.worker_id, model=config.name, version=args.version))
        threading.Thread(target=self._read_loop, name="ipc-reader", daemon=True).start()
        while (queued := self._calls.get()) is not None:
            self._serve(runtime, *queued)
        runtime.unload()
        log.info("worker.stopping", extra=fields(worker_id=args.worker_id, served=self._served))
        return 0

    def _serve(self, runtime: Any, call: ipc.InferCall, decode_ns: int) -> None:
        context = propagate.extract({"traceparent": call.traceparent}) if call.traceparent else None
        with self._tracer.start_as_current_span("model.predict", context=context) as span:
            span.set_attribute("worker.id", self._args.worker_id)
            if call.deadline and time.time() >= call.deadline:
                self._send(
                    ipc.Failure(call.request_id, "DEADLINE_EXCEEDED", "the deadline passed before the model ran")
                )
                return
            started = time.perf_counter_ns()
            try:
                outputs = runtime.predict(call.inputs)
            except InvalidInput as error:  # the client's input, not the model, is at fault
                message = clip(str(error) or "the model refused the input", MAX_MODEL_MESSAGE_CHARS)
                log.info("worker.invalid_input", extra=fields(worker_id=self._args.worker_id, error=message))
                self._send(ipc.Failure(call.request_id, "INVALID_ARGUMENT", message))
                return
            except Exception as error:
                cause = error.__cause__ or error  # runtimes wrap model code's exceptions in ModelError
                if isinstance(cause, MemoryError):  # the request asked for more than this worker could allocate
                    log.warning("worker.out_of_memory", extra=fields(worker_id=self._args.worker_id))
                    self._send(ipc.Failure(call.request_id, "RESOURCE_EXHAUSTED", "the model ran out of memory"))
                    return
                log.exception("worker.model_error", extra=fields(worker_id=self._args.worker_id))
                span.record_exception(error)
                self._send(ipc.Failure(call.request_id, "INTERNAL", f"the model raised {type(cause).__name__}"))
                return
            inferred = time.perf_counter_ns()
            if call.outputs:
                outputs = {name: value for name, value in outputs.items() if name in call.outputs}
            prepared = time.perf_counter_ns()
            if log.isEnabledFor(logging.DEBUG):  # the supervisor logs every RPC at INFO already
                log.debug(
                    "worker.inference",
                    extra=fields(worker_id=self._args.worker_id, compute_ms=round((inferred - started) / 1e6, 3)),
                )
            try:
                self._send(
                    ipc.InferResult(call.request_id, outputs, decode_ns, inferred - started, prepared - inferred)
                )
            except ValueError as error:  # outputs the protocol cannot carry (e.g. str arrays)
                log.warning("worker.bad_outputs", extra=fields(worker_id=self._args.worker_id, error=str(error)))
                self._send(ipc.Failure(call.request_id, "INTERNAL", "the model returned outputs that cannot be sent"))
                return
            self._served += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.inference.worker")
    parser.add_argument("--read-fd", type=int, required=True)
    parser.add_argument("--write-fd", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--shm-threshold", type=int, default=64 * 1024)
    parser.add_argument("--shm-prefix", required=True)
    parser.add_argument("--shm-arena-bytes", type=int, default=0)
    parser.add_argument("--shm-arena-max-bytes", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args(argv)
    configure_logging(SERVICE, args.log_level, args.log_format)
    provider = create_tracer_provider(SERVICE)
    trace.set_tracer_provider(provider)
    # The supervisor stops us with Shutdown or SIGTERM; Ctrl-C in a terminal reaches the supervisor first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        return Worker(args).run()
    finally:
        provider.shutdown()


if __name__ == "__main__":
    sys.exit(main())
