"""What one inference costs: ModelInfer on the ``iris`` demo model vs ServerLive, on the same server.

The real inference service runs in its own process over a temporary repository holding only a
copy of ``models/iris`` (``instances`` set to min = max = 2, so two worker processes serve it;
``MALLOC_MMAP_THRESHOLD_=33554432`` in its environment). Each request is one row, ``input`` FP32
[1, 4], sent as raw contents the way tritonclient sends it. The baseline is ``ServerLive`` on the
same server: the same gRPC path and interceptor chain, no model work. The client (``grpc.aio``,
one channel, N concurrent tasks) alternates rounds between the two so that machine noise hits
both alike. Reported: requests per second and p50/p99 latency at several concurrencies, the
ModelInfer/ServerLive throughput ratio, and the server's own mean time from dispatch to answer
(``inference_request_seconds`` sum/count from its ``/metrics``, over the timed ModelInfer rounds).
A second table says where the CPU goes per call (client, server process, worker processes, from
``/proc``) and how busy the whole machine was, ours and other processes'; a last line gives the
model alone (the sklearn runtime's predict on one row, in this process, before the server starts).

    python -m bench.inference_iris                    # the comparison
    python -m bench.inference_iris serve [MODELS_DIR] # the server (used by the comparison)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2 as admin_pb
from inference.v1 import worker_pool_pb2_grpc

from bench.harness import machine_busy, pinned_repository, process_cpu, quantile
from services.inference.codec import make_infer_request, response_arrays
from services.inference.repository import load_config

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = "iris"
WORKERS = 2
CONCURRENCY = (1, 8, 32)
ROUNDS = 6
CALLS_PER_ROUND = {"infer": 512, "live": 1024}
MODEL_CALLS = 2000
WARMUP_CALLS = 200
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
ROW = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)  # a setosa: label 0
CORES = os.cpu_count() or 1
_READY = (admin_pb.WORKER_STATE_READY, admin_pb.WORKER_STATE_BUSY)


# --- the server -----------------------------------------------------------------------------------


async def _serve(models: Path) -> None:
    from services.inference.app import build_server
    from services.inference.settings import InferenceSettings

    with tempfile.TemporaryDirectory(prefix="bench-inference-iris-") as root:
        settings = InferenceSettings(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            grace_seconds=1,
            model_repository=pinned_repository(Path(root), models, [MODEL], WORKERS),
        )
        server = await build_server(settings)
        await server.start()
        print(json.dumps({"port": server.port, "metrics_port": server.metrics_port}), flush=True)
        try:
            await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
        finally:
            await server.stop()  # stops the workers too


def _start() -> tuple[subprocess.Popen[str], int, int]:
    if not (MODELS / MODEL / "config.yaml").is_file():
        raise SystemExit(f"{MODELS / MODEL} is missing: run `make models` first")
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "bench.inference_iris", "serve", str(MODELS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **SERVER_ENV},
    )
    assert process.stdout is not None
    ports = json.loads(process.stdout.readline())
    return process, ports["port"], ports["metrics_port"]


async def _wait_ready(channel: grpc.aio.Channel, within: float = 120.0) -> None:
    """Readiness SERVING (one worker up), then every worker of the pool ready."""
    health = health_pb2_grpc.HealthStub(channel)
    admin = worker_pool_pb2_grpc.WorkerPoolServiceStub(channel)
    request = health_pb2.HealthCheckRequest(service="readiness")

    async def ready() -> bool:
        if (await health.Check(request, timeout=5)).status != health_pb2.HealthCheckResponse.SERVING:
            return False
        return sum(worker.state in _READY for worker in await _workers(admin)) == WORKERS

    async with asyncio.timeout(within):
        while True:
            if await ready():
                return
            await asyncio.sleep(0.05)


async def _workers(admin: worker_pool_pb2_grpc.WorkerPoolServiceStub) -> list[admin_pb.WorkerHealth]:
    response = await admin.GetWorkerHealth(admin_pb.GetWorkerHealthRequest(model_name=MODEL), timeout=5)
    return list(response.workers)


def _cpu(pids: list[int]) -> list[float]:
    """CPU seconds so far (user + system, all threads): this client, the server, its workers, the whole machine."""
    own = os.times()
    server, *workers = (sum(process_cpu(pid)) for pid in pids)
    return [own.user + own.system, server, sum(workers), machine_busy()]


def _scrape(metrics_port: int) -> tuple[float, float]:
    """``inference_request_seconds`` (sum, count) for the model, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for kind in values:
            if line.startswith(f'inference_request_seconds_{kind}{{model="{MODEL}"}} '):
                values[kind] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def _model_ms() -> float:
    """The worker's model work alone, in this process: the sklearn runtime's predict on one row, ms per call."""
    from services.inference.runtimes import create_runtime

    config = load_config(MODELS / MODEL)
    runtime = create_runtime(config.runtime)
    runtime.load(MODELS / MODEL / "1", config)
    inputs = {"input": ROW}
    for _ in range(MODEL_CALLS // 10):
        runtime.predict(inputs)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(MODEL_CALLS // 5):
            runtime.predict(inputs)
        times.append((time.perf_counter() - start) / (MODEL_CALLS // 5))
    return statistics.median(times) * 1e3


# --- the client -----------------------------------------------------------------------------------


async def _drive(
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, kind: str, concurrency: int, calls: int
) -> tuple[float, list[float]]:
    infer_request = make_infer_request(MODEL, {"input": ("FP32", ROW)})  # raw, as tritonclient sends it
    live_request = pb.ServerLiveRequest()
    latencies: list[float] = []

    async def infer() -> None:
        await stub.ModelInfer(infer_request, timeout=10)

    async def live() -> None:
        await stub.ServerLive(live_request, timeout=10)

    call = infer if kind == "infer" else live

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


@dataclass
class _Result:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=lambda: [0.0] * 4)  # seconds: client, server, workers, machine
    seconds: float = 0.0  # wall time of the timed rounds
    server_sum: float = 0.0  # inference_request_seconds over the rounds
    server_count: float = 0.0


async def _measure(
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, concurrency: int, pids: list[int], metrics_port: int
) -> dict[str, _Result]:
    """ROUNDS rounds of each kind at ``concurrency``, alternating (and alternating which goes first)."""
    results = {kind: _Result() for kind in ("infer", "live")}
    for round_ in range(ROUNDS):
        for kind in ("infer", "live") if round_ % 2 == 0 else ("live", "infer"):
            result = results[kind]
            metrics_before = await asyncio.to_thread(_scrape, metrics_port)
            cpu_before = _cpu(pids)
            rate, latencies = await _drive(stub, kind, concurrency, CALLS_PER_ROUND[kind])
            cpu_after = _cpu(pids)
            metrics_after = await asyncio.to_thread(_scrape, metrics_port)
            result.rates.append(rate)
            result.seconds += len(latencies) / rate
            result.latencies.extend(latencies)
            result.cpu = [
                total + after - before for total, before, after in zip(result.cpu, cpu_before, cpu_after, strict=True)
            ]
            result.server_sum += metrics_after[0] - metrics_before[0]
            result.server_count += metrics_after[1] - metrics_before[1]
    return results


def _ms(result: _Result, q: float) -> float:
    return quantile(result.latencies, q) * 1e3


async def main() -> None:
    model_ms = _model_ms()  # before the server starts, so that nothing else runs
    process, port, metrics_port = _start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_ready(channel)
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            answer = response_arrays(await stub.ModelInfer(make_infer_request(MODEL, {"input": ("FP32", ROW)})))
            assert answer["label"].tolist() == [0], answer
            assert answer["probabilities"].shape == (1, 3), answer
            for kind in ("infer", "live"):  # warm-up: both workers, the channel, the server's code paths
                await _drive(stub, kind, 8, WARMUP_CALLS)
            admin = worker_pool_pb2_grpc.WorkerPoolServiceStub(channel)
            workers = await _workers(admin)
            served_before = sum(worker.requests_served for worker in workers)
            pids = [process.pid, *(worker.pid for worker in workers)]
            measured = {
                concurrency: await _measure(stub, concurrency, pids, metrics_port) for concurrency in CONCURRENCY
            }
            workers = await _workers(admin)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)

    print("## Inference on iris: ModelInfer (1 row, 2 workers) vs ServerLive on the same server\n")
    print(
        "| concurrency | ServerLive calls/s | ModelInfer req/s | ModelInfer/ServerLive "
        "| ServerLive p50/p99 ms | ModelInfer p50/p99 ms | ModelInfer mean ms | server dispatch->answer mean ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for concurrency, results in measured.items():
        live, infer = results["live"], results["infer"]
        live_rate, infer_rate = statistics.median(live.rates), statistics.median(infer.rates)
        server_mean = infer.server_sum / infer.server_count * 1e3 if infer.server_count else float("nan")
        print(
            f"| {concurrency} | {live_rate:.0f} | {infer_rate:.0f} | {infer_rate / live_rate:.2f} "
            f"| {_ms(live, 0.5):.2f} / {_ms(live, 0.99):.2f} | {_ms(infer, 0.5):.2f} / {_ms(infer, 0.99):.2f} "
            f"| {statistics.fmean(infer.latencies) * 1e3:.2f} | {server_mean:.2f} |"
        )

    print(
        "\n| concurrency | ServerLive CPU ms/call: client / server | ModelInfer CPU ms/request: client / server / workers "
        f"| ModelInfer CPU ms/request, all | {CORES} cores / that, req/s | machine busy during ModelInfer, cores: ours + other |"
    )
    print("|---|---|---|---|---|---|")
    for concurrency, results in measured.items():
        live, infer = results["live"], results["infer"]
        live_cpu = [seconds / len(live.latencies) * 1e3 for seconds in live.cpu]
        infer_cpu = [seconds / len(infer.latencies) * 1e3 for seconds in infer.cpu[:3]]
        ours, machine = sum(infer.cpu[:3]) / infer.seconds, infer.cpu[3] / infer.seconds
        print(
            f"| {concurrency} | {live_cpu[0]:.2f} / {live_cpu[1]:.2f} "
            f"| {infer_cpu[0]:.2f} / {infer_cpu[1]:.2f} / {infer_cpu[2]:.2f} "
            f"| {sum(infer_cpu):.2f} | {CORES / sum(infer_cpu) * 1e3:.0f} | {ours:.2f} + {max(0.0, machine - ours):.2f} |"
        )

    served = [worker.requests_served for worker in workers]
    print(
        f"\nWorkers: {len(workers)}, requests served {' + '.join(map(str, served))} "
        f"({sum(served) - served_before} in the timed rounds), restarts {sum(w.restarts for w in workers)}. "
        f"The model alone (the sklearn runtime's predict on one row, in process): {model_ms:.3f} ms."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(Path(sys.argv[2]) if len(sys.argv) > 2 else MODELS))
    else:
        asyncio.run(main())
