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
import contextvars
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
from prometheus_client import Counter, Histogram

from services.common.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from services.common.logs import fields
from services.inference import ipc, reasons
from services.inference.batching import BatchPolicy, SplitError, batch_key, join, split
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


_SERVING = frozenset({WorkerState.READY, WorkerState.BUSY})


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
    shm_arena_bytes: int = 0
    shm_arena_max_bytes: int = 64 * 1024 * 1024
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


@dataclass(eq=False)
class _Request:
    """One inference waiting for, or riding in, a worker call."""

    inputs: dict[str, np.ndarray]
    outputs: list[str]
    deadline: float
    traceparent: str
    key: Any  # what must match to share a batch; None: never batched
    rows: int
    future: asyncio.Future[ipc.InferResult]
    enqueued: float
    run: _Run | None = None
    gone: bool = False  # its caller gave up while it ran
    queued_ns: int = 0
    batch_size: int = 1
    batch_rows: int = 1
    leads: bool = True  # the first member of its batch: the one that counts the execution
    context: contextvars.Context | None = None

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            self.future.exception()  # retrieved: a caller that left does not leave a warning behind


@dataclass(eq=False)
class _Run:
    """A worker call carrying a batch of requests."""

    members: list[_Request]
    abandoned: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Done when every member's caller gave up."""
    reason: str = ""

    def fail(self, error: Exception) -> None:
        for request in self.members:
            request.fail(error)


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
        batching: BatchPolicy | None = None,
        cpu_budget: int = 0,
    ):
        self.model_name = model_name
        self.model_version = model_version
        self._model_dir = model_dir
        self._settings = settings
        self._metrics = metrics
        self._shm_prefix = shm_prefix
        self._on_change = on_change
        self._batching = batching or BatchPolicy()
        self._min = workers
        # Growing a CPU-bound pool past the cores it may use only adds contention: the autoscaler stops there.
        self._max = max(workers, min(max_workers or workers, cpu_budget) if cpu_budget > 0 else max_workers or workers)
        self._serial = workers
        self._slots = [_Slot(f"{model_name}-v{model_version}-{index}") for index in range(workers)]
        self._scale_task: asyncio.Task[None] | None = None
        self._last_scaled = time.monotonic()
        self._last_busy = time.monotonic()
        self._peak_waiting = 0
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._queue: deque[_Request] = deque()
        self._queue_gauge = metrics.queue_depth.labels(model_name)
        self._series: dict[str, tuple[Counter, Histogram]] = {}
        self._gauged = 0
        self._runs: set[asyncio.Task[None]] = set()
        self._delay_timer: asyncio.TimerHandle | None = None
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
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        while self._queue:
            self._queue.popleft().fail(Unavailable(f"model {self.model_name} is being unloaded"))
        self._gauge_queue()
        for run in list(self._runs):
            run.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        tasks = [slot.task for slot in self._slots if slot.task is not None]
        for task in tasks:
            task.cancel()  # each supervisor stops and reaps its own worker
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self._slots:
            self._set_state(slot, WorkerState.STOPPED)

    async def drain(self) -> None:
        """Let every accepted request finish (running or queued), then stop the workers."""
        while self._queue or any(slot.in_flight for slot in self._slots):
            self._idle_event.clear()
            await self._idle_event.wait()
        await self.stop()

    def _note_idle(self) -> None:
        if not self._queue and not any(slot.in_flight for slot in self._slots):
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
            waited, self._peak_waiting = max(self._peak_waiting, len(self._queue)), len(self._queue)
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
            flip = slot.state in _SERVING and state in _SERVING
            slot.state = state
            if not flip:  # ready <-> busy (twice per inference) changes neither readiness nor anything published
                self._on_change()

    def _spec(self, slot: _Slot) -> WorkerSpec:
        return WorkerSpec(
            model_name=self.model_name,
            model_version=self.model_version,
            model_dir=self._model_dir,
            worker_id=slot.worker_id,
            shm_threshold=self._settings.shm_threshold,
            shm_prefix=f"{self._shm_prefix}{slot.worker_id}-",
            shm_arena_bytes=self._settings.shm_arena_bytes,
            shm_arena_max_bytes=self._settings.shm_arena_max_bytes,
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
                self._schedule()
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
    #
    # A request joins the queue; whenever a worker is free, :meth:`_schedule` takes the oldest waiting
    # request and, when the model batches, the waiting requests that may ride with it, and runs them
    # as one worker call (:meth:`_run`). A request that finds a free worker and nobody waiting goes
    # at once; the queue delay only ever holds requests that were waiting already.

    def _idle(self) -> _Slot | None:
        count = len(self._slots)
        for offset in range(count):
            slot = self._slots[(self._next + offset) % count]
            if slot.state is WorkerState.READY and slot.in_flight == 0:
                self._next = (self._next + offset + 1) % count
                return slot
        return None

    def _take_batch(self, *, now: float, force: bool) -> list[_Request] | None:
        """The next batch from the queue head, or None if it should wait for more rows (queue delay)."""
        policy = self._batching
        head = self._queue[0]
        if not policy.enabled or head.key is None:
            return [self._queue.popleft()]
        batch, rows = [head], head.rows
        for request in list(self._queue)[1:]:
            if request.key == head.key and rows + request.rows <= policy.max_rows:
                batch.append(request)
                rows += request.rows
                if policy.full(rows):
                    break
        if not force and policy.max_queue_delay > 0 and not policy.full(rows):
            due = head.enqueued + policy.max_queue_delay
            if now < due:
                if self._delay_timer is None:
                    self._delay_timer = asyncio.get_running_loop().call_later(due - now, self._delay_passed)
                return None
        for request in batch:
            self._queue.remove(request)
        return batch

    def _gauge_queue(self) -> None:
        """The queue gauge is per model (every version's pool adds its own share)."""
        depth = len(self._queue)
        if depth != self._gauged:
            self._queue_gauge.inc(depth - self._gauged)
            self._gauged = depth

    def _delay_passed(self) -> None:
        self._delay_timer = None
        self._schedule()

    def _schedule(self, *, fresh: bool = False) -> None:
        """Give every free worker the next batch. ``fresh``: a request just arrived (no delay for it
        if it finds a free worker and nobody waiting)."""
        while self._queue and not self._stopping:
            slot = self._idle()
            if slot is None:
                break
            batch = self._take_batch(now=time.monotonic(), force=fresh and len(self._queue) == 1)
            if batch is None:
                break
            slot.in_flight = 1
            self._set_state(slot, WorkerState.BUSY)
            run = _Run(batch)
            dispatched = time.monotonic()
            rows = sum(member.rows for member in batch)
            for index, request in enumerate(batch):
                request.run = run
                request.queued_ns = int((dispatched - request.enqueued) * 1e9)
                request.batch_size, request.batch_rows, request.leads = len(batch), rows, index == 0
            # In the first member's context: its trace ID is on the worker's span and the log lines.
            task = asyncio.get_running_loop().create_task(self._run(slot, run), context=batch[0].context)
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)
        self._gauge_queue()

    def _release(self, slot: _Slot) -> None:
        slot.in_flight = 0
        self._last_busy = time.monotonic()
        if slot.state is WorkerState.BUSY:
            self._set_state(slot, WorkerState.READY)
        self._schedule()
        self._note_idle()

    def _abandon(self, slot: _Slot, process: WorkerProcess, pending: PendingInfer, reason: str, error: str) -> None:
        """The batch gave up on its answer; the slot stays busy until its supervisor decides."""
        if slot.process is process and not self._stopping:
            slot.events.put_nowait(_Abandoned(process, pending, reason, error))
        else:
            process.discard(pending)

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
        self._last_busy = time.monotonic()
        self._idle_event.clear()
        if len(self._queue) >= self._settings.queue_limit and not any(
            slot.state is WorkerState.READY and slot.in_flight == 0 for slot in self._slots
        ):  # (not _idle(): a check must not move the round robin on)
            raise ResourceExhausted(
                f"model {self.model_name} has {len(self._queue)} requests waiting; retry shortly",
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
        keyed = batch_key(inputs, outputs) if self._batching.enabled else None
        key, rows = keyed if keyed is not None else (None, 1)
        loop = asyncio.get_running_loop()
        request = _Request(inputs, outputs, deadline, traceparent, key, rows, loop.create_future(), time.monotonic())
        with _tracer.start_as_current_span("inference.dispatch", attributes={"model": self.model_name}) as span:
            if span.is_recording():
                carrier: dict[str, str] = {}
                propagate.inject(carrier)  # the worker's span becomes a child of this one
                request.traceparent = carrier.get("traceparent", traceparent)
            request.context = contextvars.copy_context()
            self._queue.append(request)
            self._schedule(fresh=True)
            self._peak_waiting = max(self._peak_waiting, len(self._queue))
            try:
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    result = await request.future  # cancelled with its caller: the batch then skips it
            except TimeoutError:
                running = self._leave(request, "timeout")
                if running:
                    self._metrics.timeouts.labels(self.model_name).inc()
                    raise DeadlineExceeded(f"model {self.model_name} did not answer before the deadline") from None
                raise DeadlineExceeded(f"no worker of model {self.model_name} came free before the deadline") from None
            except asyncio.CancelledError:
                self._leave(request, "cancelled")
                raise
            finally:
                self._note_idle()
            if span.is_recording():
                span.set_attribute("batch.size", request.batch_size)
                span.set_attribute("batch.rows", request.batch_rows)
        timer.add("queue", request.queued_ns)
        timer.add("compute_input", result.compute_input_ns)
        timer.add("compute_infer", result.compute_infer_ns)
        timer.add("compute_output", result.compute_output_ns)
        timer.batch_rows = request.batch_rows
        timer.executed = request.leads
        return result

    def _leave(self, request: _Request, reason: str) -> bool:
        """The caller of ``request`` gave up; True if it had been sent to a worker already."""
        if request.run is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(request)
                self._gauge_queue()
            return False
        request.gone = True
        if all(member.gone for member in request.run.members):
            request.run.reason = reason
            if not request.run.abandoned.done():
                request.run.abandoned.set_result(None)
        return True

    async def _run(self, slot: _Slot, run: _Run) -> None:
        """One worker call for a batch: join the rows, send, split the answer back to each request."""
        batch = run.members
        dispatched = time.monotonic()
        process = slot.process
        if process is None:
            self._release(slot)
            run.fail(Unavailable(f"model {self.model_name} lost its worker", retry_after_seconds=1))
            return
        if len(batch) > 1:
            self._metrics.batch_rows.labels(self.model_name).observe(batch[0].batch_rows)
        gone = Unavailable(
            f"the worker serving model {self.model_name} exited during the request; retry", retry_after_seconds=1
        )
        deadline = max(request.deadline for request in batch)  # the most patient member's
        try:
            pending = process.submit(
                join([request.inputs for request in batch]),
                batch[0].outputs,
                deadline=deadline,
                traceparent=batch[0].traceparent,
            )
        except WorkerGone:
            run.fail(gone)  # its supervisor sees the exit and frees the slot
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "worker.request_sent",
                extra=fields(worker_id=slot.worker_id, pid=process.pid, batch_size=len(batch)),
            )
        abandoned = run.abandoned
        try:
            await process.sent(pending)
            await asyncio.wait(
                (pending.future, abandoned),
                timeout=max(0.0, deadline - time.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except WorkerGone:
            process.discard(pending)
            run.fail(gone)
            return
        except asyncio.CancelledError:  # the pool stops
            process.discard(pending)
            run.fail(Unavailable(f"model {self.model_name} is being unloaded"))
            raise
        if not pending.future.done():
            reason = run.reason or "timeout"
            error = (
                "the client cancelled an inference" if reason == "cancelled" else "an inference ran past its deadline"
            )
            self._abandon(slot, process, pending, reason, error)
            run.fail(DeadlineExceeded(f"model {self.model_name} did not answer before the deadline"))
            return
        process.discard(pending)
        if pending.future.exception() is not None:
            run.fail(gone)
            return
        result = process.completed(pending)
        self._release(slot)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "worker.response_received",
                extra=fields(
                    worker_id=slot.worker_id,
                    model=self.model_name,
                    version=self.model_version,
                    batch_size=len(batch),
                    outcome="ok" if isinstance(result, ipc.InferResult) else result.code,
                    latency_ms=round((time.monotonic() - dispatched) * 1000, 3),
                ),
            )
        if isinstance(result, ipc.Failure):
            if result.code == "INVALID_ARGUMENT" and len(batch) > 1:
                self._run_alone(batch)
                return
            run.fail(self._failure(result))
            return
        slot.served += 1
        try:
            parts = split(result.outputs, [request.rows for request in batch])
        except SplitError as error:
            run.fail(Internal(f"model {self.model_name}: {error}"))
            return
        for request, outputs in zip(batch, parts, strict=True):
            if not request.future.done():
                request.future.set_result(
                    ipc.InferResult(
                        result.request_id,
                        outputs,
                        result.compute_input_ns,
                        result.compute_infer_ns,
                        result.compute_output_ns,
                    )
                )

    def _run_alone(self, batch: list[_Request]) -> None:
        """The model refused the input of a batch: some member's, not necessarily every member's. Each
        member still waiting goes back to the head of the queue, never to be batched again, so that the
        one at fault gets the refusal and the others their answers (at most one extra call per member)."""
        for request in reversed(batch):
            if request.gone or request.future.done():
                continue
            request.run, request.key, request.leads = None, None, True
            request.batch_size = request.batch_rows = 1
            self._queue.appendleft(request)
        self._schedule()

    def _failure(self, result: ipc.Failure) -> Exception:
        if result.code == "DEADLINE_EXCEEDED":
            return DeadlineExceeded(result.message)
        if result.code == "INVALID_ARGUMENT":
            return InvalidArgument(result.message, [("inputs", result.message)], reason=reasons.MODEL_REJECTED_INPUT)
        if result.code == "RESOURCE_EXHAUSTED":
            return ResourceExhausted(
                f"model {self.model_name} ran out of memory on this request; a smaller one may succeed",
                reason=reasons.MODEL_OUT_OF_MEMORY,
                retry_after_seconds=1,
            )
        return Internal(f"model {self.model_name}: {result.message}")

    def request_series(self, outcome: str) -> tuple[Counter, Histogram]:
        """This version's request counter for ``outcome`` and its latency histogram (label lookups cached)."""
        series = self._series.get(outcome)
        if series is None:
            series = self._series[outcome] = (
                self._metrics.requests.labels(self.model_name, self.model_version, outcome),
                self._metrics.request_seconds.labels(self.model_name),
            )
        return series

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
