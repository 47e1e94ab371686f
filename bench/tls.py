"""What TLS costs: the gateway hop plaintext vs TLS vs mutual TLS, and an 8 MiB identity call plaintext vs TLS.

Three stacks, each auth + inference + gateway in processes of their own (``python -m bench.tls serve ROLE ...``,
built with ``build_server(Settings(...))`` like bench/gateway_hop.py, ``MALLOC_MMAP_THRESHOLD_=33554432``):

- plaintext: every port plaintext (``make run``);
- tls: every gRPC port TLS (``*_TLS_CERT_FILE``/``*_TLS_KEY_FILE``), the gateway's upstream calls TLS
  (``GATEWAY_UPSTREAM_TLS_CA_FILE``), the client TLS;
- mtls: as tls, and every server requires a client certificate (``*_TLS_CLIENT_CA_FILE``), which the gateway
  (``GATEWAY_UPSTREAM_TLS_CERT_FILE``/``_KEY_FILE``) and the client present.

Certificates: ECDSA P-256 from a CA made by ``services.devcerts`` in a temporary folder. Inference serves temporary
copies of ``models/iris`` and ``models/identity_fp32``, two workers each. A user registers and logs in through each
gateway; every gateway call carries its bearer token (2 s token cache). The client (``grpc.aio``, one channel per
server) warms every target up, then alternates rounds between the targets of a comparison (alternating which goes
first), and reports the median round's throughput, p50/p99 latency, and CPU ms per request of all processes of
that stack (client included).

1. The hop: ModelInfer on iris, one row, through the gateway of each stack, at concurrency 1, 8 and 32
   (ratios to plaintext in the same run).
2. 8 MiB: identity_fp32 with an FP32 [512, 4096] tensor (8 MiB in, 8 MiB out), straight to inference, plaintext vs
   TLS, concurrency 4 (ratios to plaintext; MB/s counts both ways, 1 MB = 10^6 bytes).

    python -m bench.tls                    # the measurements
    python -m bench.tls serve ROLE ...     # one server (settings from the environment; used by the above)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2 as admin_pb
from inference.v1 import worker_pool_pb2_grpc

from bench.gateway_hop import CHANNEL_OPTIONS, ROW, SERVER_ENV, Meter, Result, Target, _compare, _token
from bench.harness import bench_auth_settings, pinned_repository
from services.devcerts import write_certificates
from services.inference.codec import make_infer_request, response_arrays

MODELS = Path(__file__).resolve().parent.parent / "models"
SERVED = ["iris", "identity_fp32"]
WORKERS = 2
MODES = ("plaintext", "tls", "mtls")
HOP_CONCURRENCY = (1, 8, 32)
HOP_ROUNDS = 6
HOP_CALLS = {1: 300, 8: 600, 32: 640}
WARMUP_CALLS = 200
LARGE_SHAPE = (512, 4096)  # FP32: 8 MiB
LARGE_CONCURRENCY = 4
LARGE_ROUNDS = 6
LARGE_CALLS = 24
LARGE_WARMUP_CALLS = 8
_READY = (admin_pb.WORKER_STATE_READY, admin_pb.WORKER_STATE_BUSY)
MESSAGE_LIMIT = 128 << 20


def _tls_env(mode: str, role: str, certs: Path) -> dict[str, str]:
    if mode == "plaintext":
        return {}
    prefix = role.upper()
    env = {f"{prefix}_TLS_CERT_FILE": str(certs / f"{role}.crt"), f"{prefix}_TLS_KEY_FILE": str(certs / f"{role}.key")}
    if mode == "mtls":
        env[f"{prefix}_TLS_CLIENT_CA_FILE"] = str(certs / "ca.crt")
    if role == "gateway":
        env["GATEWAY_UPSTREAM_TLS_CA_FILE"] = str(certs / "ca.crt")
        if mode == "mtls":
            env["GATEWAY_UPSTREAM_TLS_CERT_FILE"] = str(certs / "gateway.crt")
            env["GATEWAY_UPSTREAM_TLS_KEY_FILE"] = str(certs / "gateway.key")
    return env


async def _serve(role: str, args: Sequence[str]) -> None:
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 1.0}
    with tempfile.TemporaryDirectory(prefix=f"bench-tls-{role}-") as root:
        if role == "auth":
            from services.auth.app import build_server as build_auth

            server = await build_auth(bench_auth_settings(Path(root), **common))
        elif role == "inference":
            from services.inference.app import build_server as build_inference
            from services.inference.settings import InferenceSettings

            repository = pinned_repository(Path(root), MODELS, SERVED, WORKERS)
            server = await build_inference(
                InferenceSettings(**common, model_repository=repository, max_message_bytes=MESSAGE_LIMIT)
            )
        elif role == "gateway":
            from services.gateway.app import build_server as build_gateway
            from services.gateway.settings import GatewaySettings

            server = await build_gateway(  # TLS from GATEWAY_* variables
                GatewaySettings(
                    **common,
                    auth_target=f"dns:///127.0.0.1:{args[0]}",
                    inference_target=f"dns:///127.0.0.1:{args[1]}",
                )
            )
        else:
            raise SystemExit(f"unknown role {role!r}: auth, inference or gateway")
        await server.start()
        try:
            print(json.dumps({"port": server.port, "transport": server.settings.tls_mode}), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
        finally:
            await server.stop()


class Server:
    """One server process of a stack, and a channel to it speaking the stack's transport."""

    def __init__(self, mode: str, role: str, certs: Path, *args: str) -> None:
        self.name = role
        self.mode = mode
        self._args = [sys.executable, "-m", "bench.tls", "serve", role, *args]
        self._env = {**os.environ, **SERVER_ENV, **_tls_env(mode, role, certs)}
        self._certs = certs

    async def start(self) -> None:
        self.popen = await asyncio.to_thread(
            subprocess.Popen,
            self._args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self._env,
        )
        assert self.popen.stdout is not None
        line = await asyncio.to_thread(self.popen.stdout.readline)
        if not line:
            raise RuntimeError(f"the {self.mode} {self.name} server did not start (exit code {self.popen.wait()})")
        info = json.loads(line)
        assert info["transport"] == self.mode, info
        self.port: int = info["port"]
        target = f"127.0.0.1:{self.port}"
        if self.mode == "plaintext":
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            ca = (self._certs / "ca.crt").read_bytes()
            key = cert = None
            if self.mode == "mtls":
                key, cert = (self._certs / "client.key").read_bytes(), (self._certs / "client.crt").read_bytes()
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
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

    async def worker_pids(self, within: float = 120.0) -> list[int]:
        admin = worker_pool_pb2_grpc.WorkerPoolServiceStub(self.channel)
        async with asyncio.timeout(within):
            while True:
                workers = (await admin.GetWorkerHealth(admin_pb.GetWorkerHealthRequest(), timeout=5)).workers
                if sum(worker.state in _READY for worker in workers) == WORKERS * len(SERVED):
                    return [worker.pid for worker in workers]
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.channel.close()
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        await asyncio.to_thread(self.popen.wait, 30)


async def main() -> None:
    for name in SERVED:
        if not (MODELS / name / "config.yaml").is_file():
            raise SystemExit(f"{MODELS / name} is missing: run `make models` first")
    began = time.perf_counter()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-certs-") as folder:
        certs = Path(folder)
        write_certificates(certs)
        try:
            stacks: dict[str, dict[str, Server]] = {}
            for mode in MODES:
                auth, inference = Server(mode, "auth", certs), Server(mode, "inference", certs)
                for server in (auth, inference):
                    await server.start()
                gateway = Server(mode, "gateway", certs, str(auth.port), str(inference.port))
                await gateway.start()
                stacks[mode] = {"auth": auth, "inference": inference, "gateway": gateway}
                servers += [auth, inference, gateway]
            for server in servers:
                await server.wait_ready()
            meters, hop_targets, direct_targets = {}, [], []
            small = make_infer_request("iris", {"input": ("FP32", ROW)})
            large_tensor = np.arange(LARGE_SHAPE[0] * LARGE_SHAPE[1], dtype=np.float32).reshape(LARGE_SHAPE) % 1000
            large = make_infer_request("identity_fp32", {"INPUT0": ("FP32", large_tensor)})
            for mode, stack in stacks.items():
                pids = {name: [server.popen.pid] for name, server in stack.items()}
                pids["inference"] += await stack["inference"].worker_pids()
                meters[mode] = Meter(pids)
                bearer = (("authorization", f"Bearer {await _token(stack['gateway'])}"),)
                hop = Target(mode, stack["gateway"].stub, bearer)
                direct = Target(mode, stack["inference"].stub)
                answer = response_arrays(await hop.stub.ModelInfer(small, timeout=30, metadata=bearer))
                assert answer["label"].tolist() == [0], (mode, answer)
                echoed = response_arrays(await direct.stub.ModelInfer(large, timeout=60))
                assert np.array_equal(echoed["OUTPUT0"], large_tensor), mode
                hop_targets.append(hop)
                direct_targets.append(direct)

            class Combined(Meter):
                """Every stack's processes: a round only runs one stack, the others stay idle."""

                def __init__(self) -> None:
                    super().__init__({f"{m}-{n}": p for m, meter in meters.items() for n, p in meter.processes.items()})

            meter = Combined()
            for target in hop_targets:
                await _drive_warm(target, small, WARMUP_CALLS)
            hop_results = {
                concurrency: await _compare(hop_targets, small, concurrency, HOP_ROUNDS, HOP_CALLS[concurrency], meter)
                for concurrency in HOP_CONCURRENCY
            }
            large_targets = direct_targets[:2]  # plaintext, tls
            for target in large_targets:
                await _drive_warm(target, large, LARGE_WARMUP_CALLS, concurrency=LARGE_CONCURRENCY)
            large_results = await _compare(large_targets, large, LARGE_CONCURRENCY, LARGE_ROUNDS, LARGE_CALLS, meter)
        finally:
            for server in reversed(servers):
                await server.close()
    elapsed = time.perf_counter() - began

    print("## TLS: ModelInfer on iris (1 row) through the gateway, plaintext vs TLS vs mutual TLS on every hop\n")
    print(
        "| concurrency | plaintext req/s | TLS req/s | mTLS req/s | TLS/plaintext | mTLS/plaintext "
        "| p50 / p99 ms: plaintext, TLS, mTLS | CPU ms/req plaintext / TLS / mTLS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for concurrency, results in hop_results.items():
        p, t, m = results["plaintext"], results["tls"], results["mtls"]
        print(
            f"| {concurrency} | {p.rate:.0f} | {t.rate:.0f} | {m.rate:.0f} | {t.rate / p.rate:.2f} "
            f"| {m.rate / p.rate:.2f} | {p.cell()}, {t.cell()}, {m.cell()} "
            f"| {_cpu(p, 'plaintext'):.2f} / {_cpu(t, 'tls'):.2f} / {_cpu(m, 'mtls'):.2f} |"
        )
    request_bytes, response_bytes = large.ByteSize(), large.ByteSize()  # identity: the same tensor back
    print(
        f"\n| identity_fp32, 8 MiB each way, direct, concurrency {LARGE_CONCURRENCY} | req/s | MB/s | vs plaintext "
        "| p50/p99 ms | CPU ms/req |"
    )
    print("|---|---|---|---|---|---|")
    base = large_results["plaintext"].rate
    for mode in ("plaintext", "tls"):
        result = large_results[mode]
        print(
            f"| {mode} | {result.rate:.1f} | {result.rate * (request_bytes + response_bytes) / 1e6:.0f} "
            f"| {result.rate / base:.2f} | {result.cell()} | {_cpu(result, mode):.1f} |"
        )
    print(f"\nWhole run: {elapsed:.0f} s.")


def _cpu(result: Result, mode: str) -> float:
    """CPU ms per request of the client and of this stack's processes."""
    used = sum(value for name, value in result.used.items() if name == "client" or name.startswith(f"{mode}-"))
    return used / result.calls * 1e3


async def _drive_warm(target: Target, request: Any, calls: int, concurrency: int = 8) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            await target.stub.ModelInfer(request, timeout=60, metadata=target.metadata)

    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(sys.argv[2], sys.argv[3:]))
    else:
        asyncio.run(main())
