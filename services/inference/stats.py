"""Per model version inference statistics, as Triton reports them (the ModelStatistics RPC).

Plain Python: counts and cumulative nanoseconds, kept in the supervisor. One request is timed by a
:class:`RequestTimer` from its arrival (the model resolved) to its answer::

    with statistics.request(model, version) as timer:
        with timer.measure("compute_input"):
            ...                                  # decode the request
        result = await pool.infer(..., timer=timer)  # adds queue, hand-over and worker timings
        with timer.measure("compute_output"):
            ...                                  # encode the answer
        timer.succeeded(batch_size)

Leaving the block without :meth:`RequestTimer.succeeded` (an exception) records a failure.

What each duration covers, for successful requests:

* ``queue``: waiting for a free worker of the pool.
* ``compute_input``: decoding the protobuf tensors, writing them to the worker (pipe or shared
  memory) and the worker's decoding of that frame.
* ``compute_infer``: the model's ``predict`` in the worker.
* ``compute_output``: the worker's preparation of the outputs and the encoding of the answer.
* ``success``: the whole request in the service, from arrival to answer (the above, plus the
  transfer of the outputs back from the worker).

``fail`` counts failed requests with their duration up to the failure; ``inference_count`` counts
batch elements (the first dimension when the model has ``max_batch_size`` > 0, else 1 per request)
and ``execution_count`` model executions (worker calls: requests that rode in one dynamic batch
count one execution together). ``last_inference`` is the time of the last request, successful or not, in ms since the epoch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Literal

Phase = Literal["queue", "compute_input", "compute_infer", "compute_output"]


@dataclass(frozen=True, slots=True)
class Duration:
    """A count of events and their cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def plus(self, ns: int) -> Duration:
        return Duration(self.count + 1, self.ns + max(0, ns))


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    """The model executions of one batch size (rows per worker call) and their phases."""

    batch_size: int
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass(frozen=True, slots=True)
class VersionStatistics:
    """The cumulative statistics of one model version (a snapshot: immutable)."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: tuple[BatchStatistics, ...] = ()  # by batch size, ascending


@dataclass(slots=True)
class RequestTimer:
    """Where one request's time went; see the module docstring."""

    started_ns: int = field(default_factory=time.perf_counter_ns)
    phases: dict[str, int] = field(default_factory=dict)
    batch_size: int = 0
    ok: bool = False
    batch_rows: int = 1  # rows of the worker call this request rode in (dynamic batching)
    executed: bool = True  # this request counts its worker call (the first member of its batch)

    def add(self, phase: Phase, ns: int) -> None:
        self.phases[phase] = self.phases.get(phase, 0) + max(0, ns)

    @contextlib.contextmanager
    def measure(self, phase: Phase) -> Iterator[None]:
        """Add the time spent in the block to ``phase``, whether it raises or not."""
        started = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter_ns() - started)

    def succeeded(self, batch_size: int = 1) -> None:
        """Mark the request successful, with ``batch_size`` inferences in it."""
        self.ok, self.batch_size = True, max(1, batch_size)

    def elapsed_ns(self) -> int:
        return time.perf_counter_ns() - self.started_ns


class _Recording:
    """The context manager of :meth:`InferenceStatistics.request`."""

    def __init__(self, owner: InferenceStatistics, name: str, version: str):
        self._owner, self._name, self._version = owner, name, version
        self.timer = RequestTimer()

    def __enter__(self) -> RequestTimer:
        return self.timer

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._owner.record(self._name, self._version, self.timer)


def _add_execution(
    batches: tuple[BatchStatistics, ...], size: int, phases: dict[str, int]
) -> tuple[BatchStatistics, ...]:
    found = next((batch for batch in batches if batch.batch_size == size), BatchStatistics(size))
    updated = BatchStatistics(
        size,
        found.compute_input.plus(phases.get("compute_input", 0)),
        found.compute_infer.plus(phases.get("compute_infer", 0)),
        found.compute_output.plus(phases.get("compute_output", 0)),
    )
    return tuple(sorted([*(b for b in batches if b.batch_size != size), updated], key=lambda b: b.batch_size))


class InferenceStatistics:
    """Statistics of every model version that served a request, by (model, version)."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def request(self, name: str, version: str) -> _Recording:
        """Time one request of ``name`` version ``version``; recorded when the block ends."""
        return _Recording(self, name, version)

    def record(self, name: str, version: str, timer: RequestTimer) -> None:
        """Add one finished request: a success if ``timer.succeeded`` was called, else a failure."""
        current = self.get(name, version)
        elapsed = timer.elapsed_ns()
        now_ms = time.time_ns() // 1_000_000
        if not timer.ok:
            self._versions[(name, version)] = replace(
                current, last_inference_ms=now_ms, fail=current.fail.plus(elapsed)
            )
            return
        phases = timer.phases
        batches = current.batches
        if timer.executed:
            batches = _add_execution(batches, timer.batch_rows, phases)
        self._versions[(name, version)] = replace(
            current,
            last_inference_ms=now_ms,
            inference_count=current.inference_count + timer.batch_size,
            execution_count=current.execution_count + (1 if timer.executed else 0),
            success=current.success.plus(elapsed),
            queue=current.queue.plus(phases.get("queue", 0)),
            compute_input=current.compute_input.plus(phases.get("compute_input", 0)),
            compute_infer=current.compute_infer.plus(phases.get("compute_infer", 0)),
            compute_output=current.compute_output.plus(phases.get("compute_output", 0)),
            batches=batches,
        )

    def get(self, name: str, version: str) -> VersionStatistics:
        """The statistics of one version (all zero if it has served nothing yet)."""
        return self._versions.get((name, version)) or VersionStatistics(name, version)

    def forget(self, name: str) -> None:
        """Drop every version of ``name`` (the model was unloaded)."""
        for key in [key for key in self._versions if key[0] == name]:
            del self._versions[key]


__all__ = ["BatchStatistics", "Duration", "InferenceStatistics", "Phase", "RequestTimer", "VersionStatistics"]
