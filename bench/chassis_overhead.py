"""What the chassis costs per RPC: the full interceptor chain vs a bare ``grpc.aio`` server.

Both servers run the same servicer (``ServerLive``) in their own process; the client drives
them alternately, round by round, so that machine noise hits both alike. Reported: calls per
second and p50/p99 latency at several concurrencies, and the chassis/bare throughput ratio.

    python -m bench.chassis_overhead            # the comparison
    python -m bench.chassis_overhead serve MODE # one server (used by the comparison)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc

from bench.harness import quantile

CONCURRENCY = (1, 16)
ROUNDS = 5
CALLS_PER_ROUND = 2000


class _LiveOnly(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """The same ServerLive answer as the inference service, with nothing around it."""

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)


async def _serve(mode: str) -> None:
    import tempfile

    from services.inference.app import build_server
    from services.inference.settings import InferenceSettings

    if mode == "chassis":
        empty = tempfile.mkdtemp(prefix="bench-empty-repository-")
        settings = InferenceSettings(port=0, metrics_port=0, grace_seconds=1, model_repository=empty)
        server = await build_server(settings)
        await server.start()
        port = server.port
    else:
        bare = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        servicer = _LiveOnly()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, bare)
        port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
    print(json.dumps({"port": port}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin


async def _drive(port: int, concurrency: int, calls: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)  # connect before timing

        async def worker(n: int) -> None:
            for _ in range(n):
                start = time.perf_counter()
                await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


def _start(mode: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "bench.chassis_overhead", "serve", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    port = json.loads(process.stdout.readline())["port"]
    return process, port


async def main() -> None:
    servers = {mode: _start(mode) for mode in ("bare", "chassis")}
    try:
        print("## Chassis overhead: ServerLive, full interceptor chain vs bare grpc.aio\n")
        print("| concurrency | bare calls/s | chassis calls/s | ratio | bare p50/p99 ms | chassis p50/p99 ms |")
        print("|---|---|---|---|---|---|")
        for concurrency in CONCURRENCY:
            rates: dict[str, list[float]] = {"bare": [], "chassis": []}
            lat: dict[str, list[float]] = {"bare": [], "chassis": []}
            for _ in range(ROUNDS):
                for mode, (_, port) in servers.items():
                    rate, latencies = await _drive(port, concurrency, CALLS_PER_ROUND)
                    rates[mode].append(rate)
                    lat[mode].extend(latencies)
            bare, chassis = statistics.median(rates["bare"]), statistics.median(rates["chassis"])
            cells = [
                f"{quantile(lat[m], 0.5) * 1e3:.2f} / {quantile(lat[m], 0.99) * 1e3:.2f}" for m in ("bare", "chassis")
            ]
            print(f"| {concurrency} | {bare:.0f} | {chassis:.0f} | {chassis / bare:.2f} | {cells[0]} | {cells[1]} |")
    finally:
        for process, _ in servers.values():
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=30)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(sys.argv[2]))
    else:
        asyncio.run(main())
