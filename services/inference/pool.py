"""The supervised pool of worker processes serving one model version.

Each worker slot has one supervising task, the only owner of its worker's state: it starts a
process, waits for it to load the model, and starts a new one whenever it ends. Everything else
only reports events to it (one queue per slot), and the supervisor decides, one event at a time:

    exit of the process            -> "crashed" (whatever else was reported about that process)
    ping timed out (pipe still up) -> "unresponsive": killed (hung or stopped)
    ping failed, pipe closed       -> nothing: the exit follows and is recorded as such
    request abandoned (deadline    -> the worker may finish within ``abandon_grace`` (its answer
      passed, client cancelled)       is dropped, the worker serves on); if not: killed
                                      ("timeout" / "cancelled")
    operator's restart             -> "admin": killed
    cancellation (stop, scale-down)-> the worker is asked to exit, then killed, and reaped

Kills for a crash, a hang, a deadline or a cancellation back off exponentially (a worker that
stays up ``HEALTHY_RESET_SECONDS`` clears it), so neither a model that cannot stay up nor a
caller who cancels every request can keep a model reloading.

Dispatch: a request takes an idle ready worker (round robin among the idle ones), or waits in
a bounded queue for the next one to come free; a full queue is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry import propagate, trace

from services.common.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from services.common.logs import fields
from services.inference import ipc
from services.inference.metrics import InferenceMetrics
from services.inference.process import PendingInfer, WorkerGone, WorkerProcess, WorkerSpec, WorkerStartError
from services.inference.stats import RequestTimer

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

HEALTHY_RESET_SECONDS = 30.0  # a worker up this long clears the crash backoff
BACKED_OFF = frozenset({"crashed", "unresponsive", "timeout", "cancelled"})  # kills that count toward the backoff


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class PoolSettings:
    queue_limit: int
    health_interval: float
    health_timeout: float
    start_timeout: float
    stop_grace: float
    backoff: float
    backoff_max: float
    shm_threshold: int
    env: Mapping[str, str]
    log_level: str = "INFO"
    log_format: str = "json"
    scale_interval: float = 1.0
    scale_cooldown: float = 5.0
    scale_down_idle: float = 30.0
    abandon_grace: float = 0.5


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    worker_id: str
    model_name: str
    model_version: str
    state: WorkerState
    pid: int
    uptime_seconds: float
    in_flight: int
    requests_served: int
    restarts: int
    last_error: str
    rss_bytes: int
    started_at: float


@dataclass(frozen=True, slots=True)
class _Unresponsive:
    process: WorkerProcess


@dataclass(frozen=True, slots=True)
class _Abandoned:
    process: WorkerProcess
    pending: PendingInfer
    reason: str  # "timeout" or "cancelled"
    error: str


@dataclass(frozen=True, slots=True)
class _Restart:
    process: WorkerProcess


_Event = _Unresponsive | _Abandoned | _Restart


@dataclass
class _Slot:
    worker_id: str
    state: WorkerState = WorkerState.STARTING
    process: WorkerProcess | None = None
    in_flight: int = 0
    served: int = 0
    restarts: int = 0
    failures: int = 0  # consecutive crashes, for the backoff
    last_error: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue, repr=False)


class WorkerPool:
    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        model_dir: Path,
        workers: int,
        max_workers: int | None = None,
        settings: PoolSettings,
        metrics: InferenceMetrics,
        shm_prefix: str,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.model_name = model_name
        self.model_version = model_version
        self._model_dir = model_dir
        self._settings = settings
        self._metrics = metrics
        self._shm_prefix = shm_prefix
        self._on_change = on_change
        self._min = workers
        self._max = max(workers, max_workers or workers)
        self._serial = workers
        self._slots = [_Slot(f"{model_name}-v{model_version}-{index}") for index in range(workers)]
        self._scale_task: asyncio.Task[None] | None = None
        self._last_scaled = time.monotonic()
        self._last_busy = time.monotonic()
        self._peak_waiting = 0
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._waiters: deque[asyncio.Future[_Slot]] = deque()
        self._next = 0
        self._stopping = False
        self._health_task: asyncio.Task[None] | None = None
        self._first_ready = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._first_failure = asyncio.Event()  # a load failed before any worker was ready
        self._start_error = ""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            slot.task = loop.create_task(self._supervise(slot), name=f"supervise-{slot.worker_id}")
        self._health_task = loop.create_task(self._health_loop(), name=f"health-{self.model_name}")
        if self._max > self._min:
            self._scale_task = loop.create_task(self._scale_loop(), name=f"scale-{self.model_name}")

    async def wait_ready(self, limit_seconds: float, *, every_worker: bool = False) -> bool:
        """True once a worker (or, with ``every_worker``, each one) is ready.

        False if the model fails to load, or nothing is ready in time.
        """
        ready = asyncio.ensure_future((self._all_ready if every_worker else self._first_ready).wait())
        failed = asyncio.ensure_future(self._first_failure.wait())
        try:
            await asyncio.wait((ready, failed), timeout=limit_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            failed.cancel()
        return (self._all_ready if every_worker else self._first_ready).is_set()

    @property
    def ready_workers(self) -> int:
        return sum(slot.state in (WorkerState.READY, WorkerState.BUSY) for slot in self._slots)

    @property
    def last_error(self) -> str:
        return next((slot.last_error for slot in self._slots if slot.last_error), "")

    async def stop(self) -> None:
        """Stop every worker (asking first, then SIGTERM/SIGKILL), reap it, and fail whoever still waits."""
        self._stopping = True
        for task in (self._health_task, self._scale_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Unavailable(f"model {self.model_name} is being unloaded"))
        tasks = [slot.task for slot in self._slots if slot.task is not None]
        for task in tasks:
            task.cancel()  # each supervisor stops and reaps its own worker
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self._slots:
            self._set_state(slot, WorkerState.STOPPED)

    async def drain(self) -> None:
        """Let every accepted request finish (running or queued), then stop the workers."""
        while self._waiters or any(slot.in_flight for slot in self._slots):
            self._idle_event.clear()
            await self._idle_event.wait()
        await self.stop()

    def _note_idle(self) -> None:
        if not self._waiters and not any(slot.in_flight for slot in self._slots):
            self._idle_event.set()

    # -- autoscaling ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._slots)

    async def _scale_loop(self) -> None:
        """Grow towards max while requests queue; shrink towards min after an idle period."""
        while not self._stopping:
            await asyncio.sleep(self._settings.scale_interval)
            now = time.monotonic()
            waited, self._peak_waiting = max(self._peak_waiting, len(self._waiters)), len(self._waiters)
            cooled = now - self._last_scaled >= self._settings.scale_cooldown
            if waited and len(self._slots) < self._max and cooled:
                self._add_slot(f"{waited} requests waited for a worker")
            elif len(self._slots) > self._min and cooled and now - self._last_busy >= self._settings.scale_down_idle:
                await self._remove_slot(f"idle for {now - self._last_busy:.0f}s")

    def _scaled(self, direction: str, reason: str) -> None:
        self._last_scaled = time.monotonic()
        self._metrics.scaling.labels(self.model_name, direction).inc()
        log.info(
            "pool.scaled",
            extra=fields(
                model=self.model_name,
                version=self.model_version,
                direction=direction,
                workers=len(self._slots),
                reason=reason,
            ),
        )
        self._on_change()

    def _add_slot(self, reason: str) -> None:
        slot = _Slot(f"{self.model_name}-v{self.model_version}-{self._serial}")
        self._serial += 1
        self._slots.append(slot)
        slot.task = asyncio.get_running_loop().create_task(self._supervise(slot), name=f"supervise-{slot.worker_id}")
        self._scaled("up", reason)

    async def _remove_slot(self, reason: str) -> None:
        slot = next(
            (s for s in reversed(self._slots) if s.state is WorkerState.READY and s.in_flight == 0 and s.process), None
        )
        if slot is None:
            return
        self._slots.remove(slot)
        self._scaled("down", reason)
        if slot.task is not None:
            slot.task.cancel()  # its supervisor stops and reaps the worker
            with contextlib.suppress(asyncio.CancelledError):
                await slot.task

    # -- supervision ----------------------------------------------------------------------

    def _set_state(self, slot: _Slot, state: WorkerState) -> None:
        if slot.state is not state:
            slot.state = state
            self._on_change()

    def _spec(self, slot: _Slot) -> WorkerSpec:
        return WorkerSpec(
            model_name=self.model_name,
            model_version=self.model_version,
            model_dir=self._model_dir,
            worker_id=slot.worker_id,
            shm_threshold=self._settings.shm_threshold,
            shm_prefix=f"{self._shm_prefix}{slot.worker_id}-",
            env=self._settings.env,
            log_level=self._settings.log_level,
            log_format=self._settings.log_format,
        )

    def _backoff(self, slot: _Slot) -> float:
        if slot.failures == 0:
            return 0.0
        return float(min(self._settings.backoff * 2.0 ** (slot.failures - 1), self._settings.backoff_max))

    async def _supervise(self, slot: _Slot) -> None:
        process: WorkerProcess | None = None
        try:
            while not self._stopping:
                delay = self._backoff(slot)
                if delay:
                    self._set_state(slot, WorkerState.RESTARTING)
                    log.info("worker.restart_delayed", extra=fields(worker_id=slot.worker_id, delay_seconds=delay))
                    await asyncio.sleep(delay)
                process = WorkerProcess(self._spec(slot))
                slot.process = process
                self._set_state(slot, WorkerState.STARTING)
                try:
                    await process.start(self._settings.start_timeout)
                except WorkerStartError as error:
                    slot.failures += 1
                    slot.last_error = f"load failed: {error}"
                    self._start_error = slot.last_error
                    if not self._first_ready.is_set():
                        self._first_failure.set()
                    self._metrics.restarts.labels(self.model_name, "load_failed").inc()
                    self._set_state(slot, WorkerState.UNHEALTHY)
                    continue
                ready_at = time.monotonic()
                self._set_state(slot, WorkerState.READY)
                self._first_ready.set()
                if self.ready_workers == len(self._slots):
                    self._all_ready.set()
                self._hand_over(slot)
                reason, why = await self._watch(slot, process)
                if reason in BACKED_OFF:
                    slot.failures = 0 if time.monotonic() - ready_at > HEALTHY_RESET_SECONDS else slot.failures + 1
                slot.last_error = why
                if reason == "crashed":
                    log.warning(
                        "worker.exited",
                        extra=fields(worker_id=slot.worker_id, pid=process.pid, exit_code=process.exit_code),
                    )
                await process.close()
                if self._stopping:
                    break
                slot.restarts += 1
                slot.in_flight = 0
                self._note_idle()
                self._metrics.restarts.labels(self.model_name, reason).inc()
                self._set_state(slot, WorkerState.RESTARTING)
                log.info(
                    "worker.restarting", extra=fields(worker_id=slot.worker_id, reason=reason, restarts=slot.restarts)
                )
        finally:
            # Stopped (pool stop, scale-down) or failed: this worker ends with its supervisor.
            if process is not None:
                await asyncio.shield(process.shutdown(self._settings.stop_grace))

    async def _watch(self, slot: _Slot, process: WorkerProcess) -> tuple[str, str]:
        """Serve events about ``process`` until it ends; why it ended (a restart reason) and the error to show."""
        exited = asyncio.ensure_future(process.exited.wait())
        try:
            while True:
                next_event = asyncio.ensure_future(slot.events.get())
                try:
                    await asyncio.wait((exited, next_event), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    next_event.cancel()
                if exited.done():
                    return "crashed", f"exited with code {process.exit_code}"
                event = next_event.result()
                if event.process is not process:
                    continue  # about a process that is gone already
                outcome = await self._handle(slot, process, event, exited)
                if outcome is not None:
                    return outcome
        finally:
            exited.cancel()

    async def _handle(
        self, slot: _Slot, process: WorkerProcess, event: _Event, exited: asyncio.Future[Any]
    ) -> tuple[str, str] | None:
        """Act on one event; the restart reason and error if the process is to end, else None."""
        if isinstance(event, _Abandoned):
            return await self._abandoned(slot, process, event, exited)
        if isinstance(event, _Unresponsive):
            if slot.in_flight or slot.state is not WorkerState.READY:
                return None  # it took a request meanwhile: that request's deadline watches it now
            if process.gone:  # the ping failed because the process is exiting: that is not a hang
                await exited
                return "crashed", f"exited with code {process.exit_code}"
            log.warning("worker.unresponsive", extra=fields(worker_id=slot.worker_id, pid=process.pid))
            return await self._kill(
                slot,
                process,
                "unresponsive",
                f"did not answer a health check within {self._settings.health_timeout:g}s",
            )
        return await self._kill(slot, process, "admin", "restarted by an operator")

    async def _abandoned(
        self, slot: _Slot, process: WorkerProcess, event: _Abandoned, exited: asyncio.Future[Any]
    ) -> tuple[str, str] | None:
        """A request gave up on this worker: let it finish within the grace, or kill it."""
        answer = event.pending.future
        await asyncio.wait((answer, exited), timeout=self._settings.abandon_grace, return_when=asyncio.FIRST_COMPLETED)
        process.discard(event.pending)
        if answer.done() and not answer.cancelled() and answer.exception() is None and not process.gone:
            self._metrics.abandoned.labels(self.model_name, "finished").inc()
            log.info(
                "worker.abandoned_answer_dropped",
                extra=fields(worker_id=slot.worker_id, reason=event.reason),
            )
            self._release(slot)
            return None
        if process.gone:
            await exited
            return "crashed", f"exited with code {process.exit_code}"
        self._metrics.abandoned.labels(self.model_name, "killed").inc()
        return await self._kill(slot, process, event.reason, event.error)

    async def _kill(self, slot: _Slot, process: WorkerProcess, reason: str, error: str) -> tuple[str, str]:
        slot.last_error = error
        self._set_state(slot, WorkerState.UNHEALTHY)
        await process.kill(reason, grace=min(self._settings.stop_grace, 0.2))
        return reason, error

    async def restart(self, worker_id: str) -> bool:
        """An operator's restart; False if there is no such worker."""
        for slot in self._slots:
            if slot.worker_id == worker_id:
                if slot.process is not None:
                    slot.events.put_nowait(_Restart(slot.process))
                return True
        return False

    async def _health_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._settings.health_interval)
            # Idle workers only: a busy one is bounded by its request's deadline.
            await asyncio.gather(
                *(
                    self._check(slot)
                    for slot in self._slots
                    if slot.process is not None and slot.state is WorkerState.READY and slot.in_flight == 0
                )
            )

    async def _check(self, slot: _Slot) -> None:
        """Ping the slot's worker; a ping that times out is reported to its supervisor."""
        process = slot.process
        if process is None:
            return
        try:
            await process.ping(self._settings.health_timeout)
        except WorkerGone:
            return  # the process exited: its supervisor sees the exit itself
        except TimeoutError:
            if not self._stopping:
                slot.events.put_nowait(_Unresponsive(process))

    # -- dispatch -------------------------------------------------------------------------

    def _idle(self) -> _Slot | None:
        count = len(self._slots)
        for offset in range(count):
            slot = self._slots[(self._next + offset) % count]
            if slot.state is WorkerState.READY and slot.in_flight == 0:
                self._next = (self._next + offset + 1) % count
                return slot
        return None

    def _hand_over(self, slot: _Slot) -> None:
        """Give a free worker to the longest-waiting request, if any."""
        while self._waiters and slot.state is WorkerState.READY and slot.in_flight == 0:
            waiter = self._waiters.popleft()
            if not waiter.done():
                slot.in_flight = 1
                waiter.set_result(slot)
                return

    async def _acquire(self, deadline: float) -> _Slot:
        self._last_busy = time.monotonic()
        self._idle_event.clear()
        slot = self._idle()
        if slot is not None:
            slot.in_flight = 1
            return slot
        if len(self._waiters) >= self._settings.queue_limit:
            raise ResourceExhausted(
                f"model {self.model_name} has {len(self._waiters)} requests waiting; retry shortly",
                retry_after_seconds=0.5,
            )
        if (
            self.ready_workers == 0
            and self._start_error
            and all(s.state is not WorkerState.STARTING for s in self._slots)
        ):
            raise Unavailable(
                f"model {self.model_name} has no ready worker: {self._start_error}", retry_after_seconds=1
            )
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._peak_waiting = max(self._peak_waiting, len(self._waiters))
        gauge = self._metrics.queue_depth.labels(self.model_name)
        gauge.inc()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - time.time()))
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # a worker came free just as we gave up
            raise DeadlineExceeded(f"no worker of model {self.model_name} came free before the deadline") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise
        finally:
            gauge.dec()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if not waiter.done():
                waiter.cancel()
            self._note_idle()

    def _abandon(self, slot: _Slot, process: WorkerProcess, pending: PendingInfer, reason: str, error: str) -> None:
        """The request gave up on its answer; the slot stays busy until its supervisor decides."""
        if slot.process is process and not self._stopping:
            slot.events.put_nowait(_Abandoned(process, pending, reason, error))
        else:
            process.discard(pending)

    def _release(self, slot: _Slot) -> None:
        slot.in_flight = 0
        self._last_busy = time.monotonic()
        if slot.state is WorkerState.BUSY:
            self._set_state(slot, WorkerState.READY)
        self._hand_over(slot)
        self._note_idle()

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        *,
        deadline: float,
        traceparent: str,
        timer: RequestTimer | None = None,
    ) -> ipc.InferResult:
        """Run one inference on a worker of this pool, within ``deadline`` (unix seconds).

        ``timer`` gets the wait for a worker (queue) and the worker's timings (compute_*).
        """
        timer = timer or RequestTimer()
        with (
            _tracer.start_as_current_span("inference.queue", attributes={"model": self.model_name}),
            timer.measure("queue"),
        ):
            slot = await self._acquire(deadline)
        with _tracer.start_as_current_span(
            "inference.dispatch", attributes={"model": self.model_name, "worker.id": slot.worker_id}
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # the worker's span becomes a child of this one
            result = await self._dispatch(slot, inputs, outputs, deadline, carrier.get("traceparent", traceparent))
        timer.add("compute_input", result.compute_input_ns)
        timer.add("compute_infer", result.compute_infer_ns)
        timer.add("compute_output", result.compute_output_ns)
        return result

    async def _dispatch(
        self, slot: _Slot, inputs: dict[str, np.ndarray], outputs: list[str], deadline: float, traceparent: str
    ) -> ipc.InferResult:
        process = slot.process
        if process is None:
            self._release(slot)
            raise Unavailable(f"model {self.model_name} lost its worker")
        self._set_state(slot, WorkerState.BUSY)
        sent = time.perf_counter()
        log.debug("worker.request_sent", extra=fields(worker_id=slot.worker_id, pid=process.pid))
        gone = Unavailable(
            f"the worker serving model {self.model_name} exited during the request; retry", retry_after_seconds=1
        )
        try:
            pending = process.submit(inputs, outputs, deadline=deadline, traceparent=traceparent)
        except WorkerGone:
            raise gone from None  # its supervisor sees the exit and frees the slot
        try:
            await process.sent(pending)
            await asyncio.wait_for(asyncio.shield(pending.future), max(0.0, deadline - time.time()))
        except TimeoutError:
            self._metrics.timeouts.labels(self.model_name).inc()
            self._abandon(slot, process, pending, "timeout", "an inference ran past its deadline")
            raise DeadlineExceeded(f"model {self.model_name} did not answer before the deadline") from None
        except asyncio.CancelledError:
            self._abandon(slot, process, pending, "cancelled", "the client cancelled an inference")
            raise
        except WorkerGone:
            process.discard(pending)
            raise gone from None
        process.discard(pending)
        result = process.completed(pending)
        self._release(slot)
        log.info(
            "worker.response_received",
            extra=fields(
                worker_id=slot.worker_id,
                model=self.model_name,
                version=self.model_version,
                outcome="ok" if isinstance(result, ipc.InferResult) else result.code,
                latency_ms=round((time.perf_counter() - sent) * 1000, 3),
            ),
        )
        if isinstance(result, ipc.InferResult):
            slot.served += 1
        if isinstance(result, ipc.Failure):
            if result.code == "DEADLINE_EXCEEDED":
                raise DeadlineExceeded(result.message)
            if result.code == "INVALID_ARGUMENT":
                raise InvalidArgument(result.message, [("inputs", result.message)])
            raise Internal(f"model {self.model_name}: {result.message}")
        return result

    # -- views ----------------------------------------------------------------------------

    def health(self) -> list[WorkerHealth]:
        now = time.time()
        views = []
        for slot in self._slots:
            process = slot.process
            alive = process is not None and process.alive
            views.append(
                WorkerHealth(
                    worker_id=slot.worker_id,
                    model_name=self.model_name,
                    model_version=self.model_version,
                    state=slot.state,
                    pid=process.pid if alive and process else 0,
                    uptime_seconds=max(0.0, now - process.started_at) if alive and process else 0.0,
                    in_flight=slot.in_flight,
                    requests_served=slot.served,
                    restarts=slot.restarts,
                    last_error=slot.last_error,
                    rss_bytes=process.rss_bytes if alive and process else 0,
                    started_at=process.started_at if alive and process else 0.0,
                )
            )
        return views

    def states(self) -> dict[WorkerState, int]:
        counts = dict.fromkeys(WorkerState, 0)
        for slot in self._slots:
            counts[slot.state] += 1
        return counts
