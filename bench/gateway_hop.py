"""What the gateway hop costs: ModelInfer through the gateway vs straight to the inference service.

Five real servers, each in its own process (``python -m bench.gateway_hop serve ROLE ...``, built with
``build_server(Settings(...))``, ``MALLOC_MMAP_THRESHOLD_=33554432`` in the environment): auth (SQLite in
a temporary directory, ``development`` hash profile, login limits out of reach, 127.0.0.1 a trusted
proxy), inference (a temporary copy of ``models/iris`` with ``instances`` min = max = 2) and three
gateways in front of those two, differing only in ``GATEWAY_INFERENCE_PASSTHROUGH`` and
``GATEWAY_TOKEN_CACHE_SECONDS``. Every server is polled until its ``readiness`` is SERVING (and both
iris workers are ready) before anything is timed. A user registers and logs in through the gateway;
its bearer token goes with every gateway call. The client (``grpc.aio``, one channel per server, N
concurrent tasks) warms each target up, then alternates rounds between the targets of a
comparison (alternating which goes first); throughput is the median round. CPU time (user + system,
from /proc) of the client and of every server process (inference with its workers) is summed over
each target's timed rounds and divided by its requests.

1. The hop: ModelInfer on iris, one row, raw contents, through the default gateway (passthrough,
   2 s token cache) vs direct, at concurrency 1, 8 and 32. Target: gateway/direct >= 0.70 at 32.
2. Passthrough vs re-serialising: a batch of BIG_ROWS rows through the default gateway vs one with
   ``GATEWAY_INFERENCE_PASSTHROUGH=false`` (every message parsed and re-encoded), and direct as the
   reference, concurrency 8.
   MB/s = (request + response bytes) per second, 1 MB = 10^6 bytes.
3. The token check: the default gateway (2 s cache) vs one with ``GATEWAY_TOKEN_CACHE_SECONDS=0``
   (auth's ValidateToken on every call), one row, concurrency 8. ValidateToken calls per request are
   counted from auth's ``grpc_server_handled_total``.

    python -m bench.gateway_hop                                 # the measurements
    python -m bench.gateway_hop serve auth                      # the auth server
    python -m bench.gateway_hop serve inference MODELS_DIR      # the inference server
    python -m bench.gateway_hop serve gateway AUTH_PORT INF_PORT # a gateway (settings from GATEWAY_*)
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2 as admin_pb
from inference.v1 import worker_pool_pb2_grpc

from bench.harness import bench_auth_settings, pinned_repository, process_cpu
from services.inference.codec import make_infer_request, response_arrays

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = "iris"
WORKERS = 2
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
USERNAME = "bench-gateway"
PASSWORD = "a perfectly fine passphrase"  # noqa: S105  (the benchmark account's password)
GATEWAYS = {  # name -> its GATEWAY_* environment
    "gateway": {"GATEWAY_INFERENCE_PASSTHROUGH": "true", "GATEWAY_TOKEN_CACHE_SECONDS": "2"},
    "reserialising": {"GATEWAY_INFERENCE_PASSTHROUGH": "false", "GATEWAY_TOKEN_CACHE_SECONDS": "2"},
    "no-cache": {"GATEWAY_INFERENCE_PASSTHROUGH": "true", "GATEWAY_TOKEN_CACHE_SECONDS": "0"},
}
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]

ROW = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)  # a setosa: label 0
BIG_ROWS = 50_000  # FP32 [50000, 4]: 800 KB in, 400 KB labels + 600 KB probabilities out

# 1. the hop
HOP_CONCURRENCY = (1, 8, 32)
HOP_ROUNDS = 6
HOP_CALLS = {1: 300, 8: 600, 32: 640}
# 2. passthrough vs re-serialising
BIG_CONCURRENCY = 8
BIG_ROUNDS = 6
BIG_CALLS = 48
# 3. the token check
TOKEN_CONCURRENCY = 8
TOKEN_ROUNDS = 4
TOKEN_CALLS = 600

WARMUP_CALLS = 200
BIG_WARMUP_CALLS = 16
_READY = (admin_pb.WORKER_STATE_READY, admin_pb.WORKER_STATE_BUSY)
VALIDATED = ("grpc_server_handled_total", 'grpc_method="ValidateToken"', 'grpc_code="OK"')


# --- the servers ----------------------------------------------------------------------------------


async def _serve(role: str, args: Sequence[str]) -> None:
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 1.0}
    with tempfile.TemporaryDirectory(prefix=f"bench-gateway-hop-{role}-") as root:
        described: dict[str, Any] = {}
        if role == "auth":
            from services.auth.app import build_server as build_auth

            server = await build_auth(bench_auth_settings(Path(root), **common))
        elif role == "inference":
            from services.inference.app import build_server as build_inference
            from services.inference.settings import InferenceSettings

            repository = pinned_repository(Path(root), Path(args[0]) if args else MODELS, [MODEL], WORKERS)
            server = await build_inference(InferenceSettings(**common, model_repository=repository))
        elif role == "gateway":
            from services.gateway.app import build_server as build_gateway
            from services.gateway.settings import GatewaySettings

            settings = GatewaySettings(  # the rest (passthrough, token cache) from GATEWAY_* variables
                **common,
                auth_target=f"dns:///127.0.0.1:{args[0]}",
                inference_target=f"dns:///127.0.0.1:{args[1]}",
            )
            described = {
                "inference_passthrough": settings.inference_passthrough,
                "token_cache_seconds": settings.token_cache_seconds,
            }
            server = await build_gateway(settings)
        else:
            raise SystemExit(f"unknown role {role!r}: auth, inference or gateway")
        await server.start()
        try:
            print(json.dumps({"port": server.port, "metrics_port": server.metrics_port, **described}), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
        finally:
            await server.stop()


class Server:
    """One server process, its ports, and a channel to it."""

    def __init__(self, name: str, role: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "bench.gateway_hop", "serve", role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **SERVER_ENV, **(env or {})},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} server did not start (exit code {self.process.wait()})")
        self.info: dict[str, Any] = json.loads(line)
        self.port: int = self.info["port"]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def wait_ready(self, within: float = 120.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service="readiness")
        async with asyncio.timeout(within):
            while True:
                try:
                    if (await health.Check(request, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)

    def scrape(self, metric: str, *labels: str) -> float:
        """The sum of the /metrics samples of ``metric`` that carry every one of ``labels`` (``name="value"``)."""
        url = f"http://127.0.0.1:{self.info['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(metric + "{") and all(label in line for label in labels)
        )

    async def close(self) -> None:
        await self.channel.close()
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.to_thread(self.process.wait, 30)


async def _wait_workers(inference: Server, within: float = 120.0) -> list[int]:
    """Wait until every iris worker is ready: their process ids."""
    admin = worker_pool_pb2_grpc.WorkerPoolServiceStub(inference.channel)
    request = admin_pb.GetWorkerHealthRequest(model_name=MODEL)
    async with asyncio.timeout(within):
        while True:
            workers = (await admin.GetWorkerHealth(request, timeout=5)).workers
            if sum(worker.state in _READY for worker in workers) == WORKERS:
                return [worker.pid for worker in workers]
            await asyncio.sleep(0.05)


# --- the client -----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    metadata: tuple[tuple[str, str], ...] = ()


class Meter:
    """CPU seconds so far of this client and each server process (inference includes its workers);
    with ``auth``, also the ValidateToken calls auth has answered."""

    def __init__(self, processes: dict[str, list[int]], auth: Server | None = None) -> None:
        self.processes = processes
        self.auth = auth

    async def read(self) -> dict[str, float]:
        own = os.times()
        values = {"client": own.user + own.system}
        values |= {name: sum(sum(process_cpu(pid)) for pid in pids) for name, pids in self.processes.items()}
        if self.auth is not None:
            values["validations"] = await asyncio.to_thread(self.auth.scrape, *VALIDATED)
        return values


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    used: dict[str, float] = field(default_factory=dict)  # Meter differences over the timed rounds

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    def cell(self) -> str:
        return f"{self.ms(0.5):.2f} / {self.ms(0.99):.2f}"

    def per_call(self, name: str, scale: float = 1e3) -> float:
        """Meter reading ``name`` per request (CPU: ms)."""
        return self.used.get(name, 0.0) / self.calls * scale

    def cpu(self) -> float:
        """CPU ms per request, all our processes."""
        return sum(value for name, value in self.used.items() if name != "validations") / self.calls * 1e3


async def _drive(
    target: Target, request: pb.ModelInferRequest, concurrency: int, calls: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await target.stub.ModelInfer(request, timeout=30, metadata=target.metadata)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


async def _compare(
    targets: Sequence[Target], request: pb.ModelInferRequest, concurrency: int, rounds: int, calls: int, meter: Meter
) -> dict[str, Result]:
    """``rounds`` rounds of each target, alternating, and alternating which goes first."""
    results = {target.name: Result() for target in targets}
    for round_ in range(rounds):
        for target in targets if round_ % 2 == 0 else list(reversed(targets)):
            before = await meter.read()
            rate, latencies = await _drive(target, request, concurrency, calls)
            after = await meter.read()
            result = results[target.name]
            result.rates.append(rate)
            result.latencies.extend(latencies)
            result.calls += len(latencies)
            for name, value in after.items():
                result.used[name] = result.used.get(name, 0.0) + value - before[name]
    return results


async def _token(gateway: Server) -> str:
    """Register and log in a user through ``gateway``: its access token."""
    accounts = auth_pb2_grpc.AuthServiceStub(gateway.channel)
    await accounts.Register(
        auth_pb2.RegisterRequest(username=USERNAME, email=f"{USERNAME}@example.com", password=PASSWORD), timeout=30
    )
    login = await accounts.Login(auth_pb2.LoginRequest(username=USERNAME, password=PASSWORD), timeout=30)
    return login.access_token


async def main() -> None:
    if not (MODELS / MODEL / "config.yaml").is_file():
        raise SystemExit(f"{MODELS / MODEL} is missing: run `make models` first")
    began = time.perf_counter()
    servers: list[Server] = []
    try:
        auth = Server("auth", "auth")
        servers.append(auth)
        inference = Server("inference", "inference", str(MODELS))
        servers.append(inference)
        gateways = {}
        for name, env in GATEWAYS.items():
            gateways[name] = Server(name, "gateway", str(auth.port), str(inference.port), env=env)
            servers.append(gateways[name])
        for server in servers:
            await server.wait_ready()
        worker_pids = await _wait_workers(inference)
        for name, env in GATEWAYS.items():  # the gateways run with the settings we meant
            info = gateways[name].info
            assert info["inference_passthrough"] == (env["GATEWAY_INFERENCE_PASSTHROUGH"] == "true"), info
            assert info["token_cache_seconds"] == float(env["GATEWAY_TOKEN_CACHE_SECONDS"]), info
        processes = {server.name: [server.process.pid] for server in servers}
        processes["inference"] += worker_pids
        meter = Meter(processes)

        token = await _token(gateways["gateway"])
        bearer = (("authorization", f"Bearer {token}"),)
        direct = Target("direct", inference.stub)
        via = {name: Target(name, server.stub, bearer) for name, server in gateways.items()}

        small = make_infer_request(MODEL, {"input": ("FP32", ROW)})  # raw, as tritonclient sends it
        pair = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)  # setosa, virginica
        big = make_infer_request(MODEL, {"input": ("FP32", np.tile(pair, (BIG_ROWS // 2, 1)))})

        # correctness, once each, outside the timing; and no token, no inference through the gateway
        for target in (direct, *via.values()):
            answer = response_arrays(await target.stub.ModelInfer(small, timeout=30, metadata=target.metadata))
            assert answer["label"].tolist() == [0], (target.name, answer)
        refused = None
        try:
            await via["gateway"].stub.ModelInfer(small, timeout=30)
        except grpc.aio.AioRpcError as error:
            refused = error.code()
        assert refused is grpc.StatusCode.UNAUTHENTICATED, f"ModelInfer without a token through the gateway: {refused}"
        big_response = await via["reserialising"].stub.ModelInfer(big, timeout=30, metadata=bearer)
        labels = response_arrays(big_response)["label"]
        assert labels.tolist() == [0, 2] * (BIG_ROWS // 2), labels[:4]
        big_bytes = big.ByteSize() + big_response.ByteSize()

        for target in (direct, *via.values()):  # warm-up: channels, both workers, every code path
            await _drive(target, small, 8, WARMUP_CALLS)
        for target in (direct, via["gateway"], via["reserialising"]):
            await _drive(target, big, BIG_CONCURRENCY, BIG_WARMUP_CALLS)

        hop = {
            concurrency: await _compare(
                [direct, via["gateway"]], small, concurrency, HOP_ROUNDS, HOP_CALLS[concurrency], meter
            )
            for concurrency in HOP_CONCURRENCY
        }
        big_results = await _compare(
            [direct, via["gateway"], via["reserialising"]], big, BIG_CONCURRENCY, BIG_ROUNDS, BIG_CALLS, meter
        )
        token_results = await _compare(
            [via["gateway"], via["no-cache"]],
            small,
            TOKEN_CONCURRENCY,
            TOKEN_ROUNDS,
            TOKEN_CALLS,
            Meter(processes, auth),
        )
    finally:
        for server in reversed(servers):
            await server.close()
    elapsed = time.perf_counter() - began

    print("## Gateway hop: ModelInfer on iris (1 row) through the gateway vs direct to inference\n")
    print(
        "| concurrency | direct req/s | gateway req/s | gateway/direct | direct p50/p99 ms | gateway p50/p99 ms "
        "| CPU ms/req, all processes: direct / gateway | of which the gateway process |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for concurrency, results in hop.items():
        d, g = results["direct"], results["gateway"]
        print(
            f"| {concurrency} | {d.rate:.0f} | {g.rate:.0f} | {g.rate / d.rate:.2f} | {d.cell()} | {g.cell()} "
            f"| {d.cpu():.2f} / {g.cpu():.2f} | {g.per_call('gateway'):.2f} |"
        )
    top = max(HOP_CONCURRENCY)
    ratio = hop[top]["gateway"].rate / hop[top]["direct"].rate
    print(f"\nTarget gateway/direct >= 0.70 at concurrency {top}: {ratio:.2f}, {'met' if ratio >= 0.7 else 'NOT met'}.")

    print(
        f"\n| iris {BIG_ROWS:,} rows, concurrency {BIG_CONCURRENCY} | req/s | MB/s | vs direct | p50/p99 ms "
        "| CPU ms/req, all processes | of which the gateway process |"
    )
    print("|---|---|---|---|---|---|---|")
    names = {"direct": "direct", "gateway": "gateway, passthrough", "reserialising": "gateway, re-serialising"}
    for name, label in names.items():
        result = big_results[name]
        gateway_cpu = f"{result.per_call(name):.2f}" if name != "direct" else "-"
        print(
            f"| {label} | {result.rate:.1f} | {result.rate * big_bytes / 1e6:.0f} "
            f"| {result.rate / big_results['direct'].rate:.2f} | {result.cell()} | {result.cpu():.1f} | {gateway_cpu} |"
        )
    passthrough_ratio = big_results["gateway"].rate / big_results["reserialising"].rate
    print(
        f"\nPer call {big.ByteSize() / 1e6:.2f} MB request + {big_response.ByteSize() / 1e6:.2f} MB response. "
        f"passthrough/re-serialising throughput: {passthrough_ratio:.2f}."
    )

    print(
        f"\n| token check, concurrency {TOKEN_CONCURRENCY} | req/s | p50/p99 ms | ValidateToken per request "
        "| gateway CPU ms/req | auth CPU ms/req | CPU ms/req, all processes |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, label in (("gateway", "2 s cache (default)"), ("no-cache", "every call (cache 0)")):
        result = token_results[name]
        print(
            f"| {label} | {result.rate:.0f} | {result.cell()} | {result.per_call('validations', 1):.3f} "
            f"| {result.per_call(name):.2f} | {result.per_call('auth'):.2f} | {result.cpu():.2f} |"
        )
    token_ratio = token_results["no-cache"].rate / token_results["gateway"].rate
    print(f"\nEvery call / cached throughput: {token_ratio:.2f}. Whole run: {elapsed:.0f} s.")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(sys.argv[2], sys.argv[3:]))
    else:
        asyncio.run(main())
