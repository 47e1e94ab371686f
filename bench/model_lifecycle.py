"""Model lifecycle: new versions under load (failed requests, time to serve them) and autoscaled vs fixed pools.

Every server is the real inference service (``build_server`` with ``InferenceSettings``) in its own
process, over a temporary repository holding one model copied from ``models/`` or
``tests/testdata/models/`` with its ``instances`` rewritten; its settings come from ``INFERENCE_*``
variables in its environment. The client is ``grpc.aio``, one channel per server, N concurrent tasks.

1. Hot reload under load: ``iris`` with ``instances`` min = max = 2, 8 clients calling ModelInfer
   (one row) in a loop. A new version (a copy of version 1) is published as an operator should: copied
   to a hidden ``.staging-N`` directory, then renamed to ``N`` (the clock starts at the rename). With
   ``INFERENCE_REPOSITORY_POLL_SECONDS=0.5``, versions 2, 3, 4 one after the other; then, on a second
   server with polling off, versions 2 and 3 through ``RepositoryModelLoad`` (the clock starts at the
   call). For each: the time to the first answer with the new ``model_version``, to the last answer from
   the old one (from then on every answer is the new version), and until GetWorkerHealth lists no worker
   of the old version (drained and stopped), and when it first shows each new-version worker ready
   (GetWorkerHealth is polled every 50 ms); the failed requests in that window by status code, the
   answers in it and the longest gap between two answers.
2. Throughput at concurrency 32, autoscaled (min 1, max 3, ``INFERENCE_AUTOSCALE_INTERVAL_SECONDS=0.5``,
   ``INFERENCE_SCALE_COOLDOWN_SECONDS=1``) vs fixed at min (min = max = 1), two servers in the same run:
   ``sleepy`` (sleeps 20 ms per request, releasing the CPU) and ``iris`` with a batch of 2,000 and of
   20,000 rows per request (IRIS_ROWS). The autoscaled server is driven until GetWorkerHealth shows max
   ready workers (at most 15 s); then rounds alternate between the two servers; throughput is the median
   round, and the autoscaled pool's size is sampled every 0.25 s during its rounds.

    python -m bench.model_lifecycle                                  # everything
    python -m bench.model_lifecycle serve MODEL SOURCE_DIR MIN MAX   # one server (used by the above)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2 as admin_pb
from inference.v1 import worker_pool_pb2_grpc

from bench.harness import CLOCK_TICKS, machine_busy, pinned_repository, quantile
from services.inference.codec import make_infer_request

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TEST_MODELS = ROOT / "tests" / "testdata" / "models"
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "INFERENCE_SCALE_DOWN_IDLE_SECONDS": "30"}
ROW = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)  # a setosa

RELOAD_WORKERS = 2
RELOAD_CLIENTS = 8
POLL_SECONDS = 0.5
POLL_VERSIONS = ("2", "3", "4")
RPC_VERSIONS = ("2", "3")
SETTLE_SECONDS = 1.0  # steady load on the old version before each publish

CONCURRENCY = 32
MAX_WORKERS = 3
SLEEP_SECONDS = 0.02
IRIS_ROWS = (2_000, 20_000)  # the sklearn runtime's predict in process: about 0.8 and 2.8 ms
GROW_WITHIN = 15.0
ROUNDS = 4
ROUND_SECONDS = 2.0
AUTOSCALE_ENV = {"INFERENCE_AUTOSCALE_INTERVAL_SECONDS": "0.5", "INFERENCE_SCALE_COOLDOWN_SECONDS": "1"}

CORES = os.cpu_count() or 1
_READY = (admin_pb.WORKER_STATE_READY, admin_pb.WORKER_STATE_BUSY)


# --- the server -----------------------------------------------------------------------------------


async def _serve(model: str, source: Path, low: int, high: int) -> None:
    from services.inference.app import build_server
    from services.inference.settings import InferenceSettings

    with tempfile.TemporaryDirectory(prefix="bench-model-lifecycle-") as root:
        repository = pinned_repository(Path(root), source, [model], low, high)
        settings = InferenceSettings(  # the rest (poll, autoscaling, timeout) from INFERENCE_* in the environment
            host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1, model_repository=repository
        )
        server = await build_server(settings)
        await server.start()
        print(json.dumps({"port": server.port, "repository": str(repository)}), flush=True)
        try:
            await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
        finally:
            await server.stop()  # stops the workers too


@dataclass
class _Server:
    model: str
    workers: int  # ready workers to wait for
    process: subprocess.Popen[str]
    port: int
    repository: Path
    channel: grpc.aio.Channel = field(init=False)
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub = field(init=False)
    admin: worker_pool_pb2_grpc.WorkerPoolServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.admin = worker_pool_pb2_grpc.WorkerPoolServiceStub(self.channel)

    async def pool(self) -> list[admin_pb.WorkerHealth]:
        request = admin_pb.GetWorkerHealthRequest(model_name=self.model)
        return list((await self.admin.GetWorkerHealth(request, timeout=5)).workers)

    async def wait_ready(self, within: float = 120.0) -> None:
        """Readiness SERVING, then ``workers`` workers of the pool ready."""
        health = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service="readiness")
        async with asyncio.timeout(within):
            while True:
                serving = (await health.Check(request, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
                if serving and sum(worker.state in _READY for worker in await self.pool()) >= self.workers:
                    return
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.channel.close()
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.to_thread(self.process.wait, 30)


def _start(model: str, source: Path, low: int, high: int, env: dict[str, str]) -> _Server:
    if not (source / model / "config.yaml").is_file():
        raise SystemExit(f"{source / model} is missing" + (": run `make models` first" if source == MODELS else ""))
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "bench.model_lifecycle", "serve", model, str(source), str(low), str(high)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **SERVER_ENV, **env},
    )
    assert process.stdout is not None
    started = json.loads(process.stdout.readline())
    return _Server(model, low, process, started["port"], Path(started["repository"]))


# --- CPU: ours (this process and every descendant) vs the whole machine ---------------------------


def _ours() -> float:
    """CPU seconds of this process, its live descendants and every descendant already reaped."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    children: dict[int, list[tuple[int, float]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_ = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = sum(int(value) for value in fields_[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
        children.setdefault(int(fields_[1]), []).append((int(stat.parent.name), seconds))
    pending = [os.getpid()]
    while pending:
        for pid, seconds in children.get(pending.pop(), []):
            total += seconds
            pending.append(pid)
    return total


@dataclass
class _Cpu:
    start: float = field(default_factory=time.perf_counter)
    ours: float = field(default_factory=_ours)
    machine: float = field(default_factory=machine_busy)

    def since(self) -> tuple[float, float, float]:
        """Wall seconds, then our and the other processes' mean busy cores since ``start``."""
        wall = time.perf_counter() - self.start
        ours = (_ours() - self.ours) / wall
        return wall, ours, max(0.0, (machine_busy() - self.machine) / wall - ours)


# --- 1. hot reload under load ---------------------------------------------------------------------


class _Load:
    """Clients calling ModelInfer in a loop; every answer's (time, version) and every failure's (time, code)."""

    def __init__(self, stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> None:
        self._stub = stub
        self._request = request
        self.answers: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        while not self._stop.is_set():
            try:
                answer = await self._stub.ModelInfer(self._request, timeout=10)
                self.answers.append((time.perf_counter(), answer.model_version))
            except grpc.aio.AioRpcError as error:
                self.failures.append((time.perf_counter(), error.code().name))

    def start(self, clients: int) -> None:
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@dataclass
class _Reload:
    trigger: str
    version: str
    first_new: float  # seconds from the trigger
    last_old: float
    old_stopped: float
    new_ready: list[float]  # when each new-version worker was first seen ready
    rpc: float | None  # RepositoryModelLoad's own duration
    answers: int
    longest_gap: float
    failed: Counter[str]


def _stage(model_dir: Path, version: str) -> Path:
    staging = model_dir / f".staging-{version}"
    shutil.copytree(model_dir / "1", staging)
    return staging


async def _reload(server: _Server, load: _Load, version: str, *, rpc: bool) -> _Reload:
    """Publish ``version`` under load (rename; then RepositoryModelLoad if ``rpc``) and follow the switch."""
    await asyncio.sleep(SETTLE_SECONDS)
    staging = await asyncio.to_thread(_stage, server.repository / server.model, version)
    answers_before = len(load.answers)
    start = time.perf_counter()
    staging.rename(staging.parent / version)
    rpc_seconds = None
    if rpc:
        start = time.perf_counter()
        await server.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=server.model), timeout=120)
        rpc_seconds = time.perf_counter() - start

    ready_at: dict[int, float] = {}  # k -> when GetWorkerHealth first showed k ready new-version workers
    stopped = None  # when it first showed no old-version worker (and a new-version answer had come)
    async with asyncio.timeout(120):
        while stopped is None or len(ready_at) < server.workers:
            workers = await server.pool()
            now = time.perf_counter()
            ready = sum(worker.model_version == version and worker.state in _READY for worker in workers)
            for k in range(1, ready + 1):
                ready_at.setdefault(k, now)
            served = any(v == version for _, v in load.answers[answers_before:])
            if stopped is None and served and all(worker.model_version == version for worker in workers):
                stopped = now
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # answers already in flight land
    end = time.perf_counter()
    window = [(t, v) for t, v in load.answers[answers_before:] if start <= t <= end]
    times = [start, *(t for t, _ in window), end]
    old = [t for t, v in window if v != version]
    return _Reload(
        trigger="RepositoryModelLoad, polling off" if rpc else f"repository poll every {POLL_SECONDS} s",
        version=version,
        first_new=min(t for t, v in window if v == version) - start,
        last_old=(max(old) - start) if old else 0.0,
        old_stopped=stopped - start,
        new_ready=[ready_at[k] - start for k in sorted(ready_at)],
        rpc=rpc_seconds,
        answers=len(window),
        longest_gap=max(b - a for a, b in itertools.pairwise(times)),
        failed=Counter(code for t, code in load.failures if start <= t <= end),
    )


async def _reloads(rpc: bool) -> tuple[list[_Reload], int, int]:
    """All reloads on one fresh server; also the answers and failures over the whole load."""
    env = {"INFERENCE_REPOSITORY_POLL_SECONDS": "0" if rpc else str(POLL_SECONDS)}
    server = _start("iris", MODELS, RELOAD_WORKERS, RELOAD_WORKERS, env)
    try:
        await server.wait_ready()
        load = _Load(server.stub, make_infer_request("iris", {"input": ("FP32", ROW)}))
        load.start(RELOAD_CLIENTS)
        try:
            results = [
                await _reload(server, load, version, rpc=rpc) for version in (RPC_VERSIONS if rpc else POLL_VERSIONS)
            ]
        finally:
            await load.stop()
        return results, len(load.answers), len(load.failures)
    finally:
        await server.close()


# --- 2. throughput, autoscaled vs fixed -----------------------------------------------------------


@dataclass
class _Rounds:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    sizes: list[int] = field(default_factory=list)  # workers listed by GetWorkerHealth during the rounds


async def _drive(server: _Server, request: pb.ModelInferRequest, seconds: float, into: _Rounds | None) -> int:
    """CONCURRENCY clients for ``seconds``; records the round's rate, latencies and pool sizes into ``into``."""
    latencies: list[float] = []
    failed: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                await server.stub.ModelInfer(request, timeout=30)
                latencies.append(time.perf_counter() - sent)
            except grpc.aio.AioRpcError as error:
                failed[error.code().name] += 1

    async def watch() -> None:
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
            if into is not None:
                into.sizes.append(len(await server.pool()))

    start = time.perf_counter()
    await asyncio.gather(watch(), *(client() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    if into is not None:
        into.rates.append(len(latencies) / elapsed)
        into.latencies.extend(latencies)
        into.failed.update(failed)
    return len(latencies)


async def _grow(server: _Server, request: pb.ModelInferRequest) -> float | None:
    """Drive the autoscaled server until MAX_WORKERS workers are ready; seconds taken (None: not within GROW_WITHIN)."""
    start = time.perf_counter()
    while time.perf_counter() - start < GROW_WITHIN:
        await _drive(server, request, 0.5, None)
        if sum(worker.state in _READY for worker in await server.pool()) >= MAX_WORKERS:
            return time.perf_counter() - start
    return None


@dataclass
class _Scaling:
    label: str
    autoscaled: _Rounds
    fixed: _Rounds
    grown_in: float | None
    cpu: tuple[float, float, float]


async def _scaling(label: str, model: str, source: Path, request: pb.ModelInferRequest) -> _Scaling:
    env = {"INFERENCE_REPOSITORY_POLL_SECONDS": "0", "INFERENCE_TIMEOUT_SECONDS": "30", **AUTOSCALE_ENV}
    servers = {"autoscaled": _start(model, source, 1, MAX_WORKERS, env), "fixed": _start(model, source, 1, 1, env)}
    try:
        await asyncio.gather(*(server.wait_ready() for server in servers.values()))
        await _drive(servers["fixed"], request, 1.0, None)  # warm-up: the channel, the server's code paths
        grown_in = await _grow(servers["autoscaled"], request)
        results = {mode: _Rounds() for mode in servers}
        cpu = _Cpu()
        for round_ in range(ROUNDS):
            for mode in ("autoscaled", "fixed") if round_ % 2 == 0 else ("fixed", "autoscaled"):
                await _drive(servers[mode], request, ROUND_SECONDS, results[mode])
        return _Scaling(label, results["autoscaled"], results["fixed"], grown_in, cpu.since())
    finally:
        await asyncio.gather(*(server.close() for server in servers.values()))


# --- report ---------------------------------------------------------------------------------------


def _failed(counter: Counter[str]) -> str:
    return ", ".join(f"{count} {code}" for code, count in sorted(counter.items())) or "0"


def _reload_rows(rows: list[_Reload]) -> None:
    for row in rows:
        rpc = f"{row.rpc:.2f}" if row.rpc is not None else "-"
        print(
            f"| {row.trigger} | {row.version} | {rpc} | {' / '.join(f'{t:.2f}' for t in row.new_ready)} "
            f"| {row.first_new:.2f} | {row.last_old:.2f} "
            f"| {row.old_stopped:.2f} | {row.answers} | {row.longest_gap * 1e3:.0f} | {_failed(row.failed)} |"
        )
    rpcs = [row.rpc for row in rows if row.rpc is not None]
    print(
        f"| {rows[0].trigger}, median | | {f'{statistics.median(rpcs):.2f}' if rpcs else '-'} | "
        + " / ".join(f"{statistics.median(r.new_ready[k] for r in rows):.2f}" for k in range(len(rows[0].new_ready)))
        + " "
        f"| {statistics.median(r.first_new for r in rows):.2f} | {statistics.median(r.last_old for r in rows):.2f} "
        f"| {statistics.median(r.old_stopped for r in rows):.2f} | {statistics.median(r.answers for r in rows):.0f} "
        f"| {statistics.median(r.longest_gap for r in rows) * 1e3:.0f} | {sum(sum(r.failed.values()) for r in rows)} |"
    )


def _ms(rounds: _Rounds, q: float) -> str:
    return f"{quantile(rounds.latencies, q) * 1e3:.1f}"


async def main() -> None:
    load_before = os.getloadavg()[0]
    cpu = _Cpu()
    polled, polled_answers, polled_failures = await _reloads(rpc=False)
    loaded, loaded_answers, loaded_failures = await _reloads(rpc=True)
    reload_cpu = cpu.since()
    sleepy = make_infer_request("sleepy", {"INPUT0": ("FP32", np.full((1, 1), SLEEP_SECONDS, np.float32))})
    scalings = [await _scaling(f"sleepy, {SLEEP_SECONDS * 1e3:.0f} ms sleep", "sleepy", TEST_MODELS, sleepy)]
    for rows in IRIS_ROWS:
        iris = make_infer_request("iris", {"input": ("FP32", np.tile(ROW, (rows, 1)))})
        scalings.append(await _scaling(f"iris, {rows:,} rows", "iris", MODELS, iris))
    wall, ours, other = cpu.since()

    print(f"## Model lifecycle: hot reload of iris under load ({RELOAD_CLIENTS} clients, {RELOAD_WORKERS} workers)\n")
    print(
        "| trigger | new version | RPC returned s | new workers seen ready s | first new-version answer s "
        "| last old-version answer s "
        "| old workers stopped s | answers in window | longest gap between answers ms | failed in window |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    _reload_rows(polled)
    _reload_rows(loaded)
    print(
        f"\nWhole load: {polled_answers + loaded_answers} answers, {polled_failures + loaded_failures} failed; "
        f"machine busy meanwhile {reload_cpu[1]:.2f} cores ours + {reload_cpu[2]:.2f} other."
    )

    print(f"\n## Throughput at concurrency {CONCURRENCY}: autoscaled (1-{MAX_WORKERS} workers) vs fixed (1 worker)\n")
    print(
        "| model, work per request | autoscaled req/s | fixed req/s | autoscaled/fixed | autoscaled p50/p99 ms "
        "| fixed p50/p99 ms | pool size seen (autoscaled) | max workers ready after s | failed "
        "| machine busy, cores: ours + other |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in scalings:
        auto, fixed = statistics.median(s.autoscaled.rates), statistics.median(s.fixed.rates)
        sizes = f"{min(s.autoscaled.sizes)}-{max(s.autoscaled.sizes)}" if s.autoscaled.sizes else "?"
        grown = f"{s.grown_in:.1f}" if s.grown_in is not None else f"not within {GROW_WITHIN:.0f}"
        print(
            f"| {s.label} | {auto:.1f} | {fixed:.1f} | {auto / fixed:.2f} "
            f"| {_ms(s.autoscaled, 0.5)} / {_ms(s.autoscaled, 0.99)} | {_ms(s.fixed, 0.5)} / {_ms(s.fixed, 0.99)} "
            f"| {sizes} | {grown} | {_failed(s.autoscaled.failed + s.fixed.failed)} | {s.cpu[1]:.2f} + {s.cpu[2]:.2f} |"
        )
    print(
        f"\nRun: {wall:.0f} s, {CORES} cores busy {ours:.2f} ours + {other:.2f} other on average; "
        f"load average before the run {load_before:.2f}."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
    else:
        asyncio.run(main())
