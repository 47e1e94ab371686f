"""Large tensors: 8 MiB and 64 MiB FP32 through ``identity_fp32`` and ``sum``, direct and through the gateway,
against a bare ``grpc.aio`` echo measured in the same run.

Servers, each in its own process (``python -m bench.large_tensors serve ROLE ...``,
``MALLOC_MMAP_THRESHOLD_=33554432`` in the environment):

* echo: a bare ``grpc.aio.server`` (no interceptors) with one generic unary handler, ``/bench.Echo/Echo``,
  that returns the request bytes unchanged (no deserializer, no serializer); 128 MiB message limits both
  ways, as our servers have by default.
* auth, inference and a gateway, built with ``build_server(Settings(...))`` and default settings
  (128 MiB limits, gateway passthrough), inference with Triton's system shared-memory extension on. The
  inference service serves temporary copies of ``models/identity_fp32`` and ``models/sum`` with
  ``instances`` min = max = 2.

Every server is polled until its ``readiness`` is SERVING (and all four workers are ready) before anything
is timed. A user registers and logs in through the gateway; its bearer token goes with every gateway call.

The client (``grpc.aio``, 256 MiB channel options, one channel per server) sends one FP32 tensor,
``[rows, 4096]``, raw (as tritonclient does) in a ``ModelInferRequest``, serialised per call by the
protobuf serializer; the echo gets the very same message (model ``identity_fp32``) and the client parses
the echoed bytes as a ``ModelInferRequest``, so both sides of the echo carry what ``identity_fp32``'s
carry. Targets: echo; identity_fp32 direct, through the gateway, and with system shared memory ("identity
shm": two POSIX shared-memory objects as large as the largest tensor, registered once as regions; each call
copies the tensor into the input region and sends a request naming both regions, the answer lands in the
output region, read there in place, as a co-located tritonclient user does); sum direct and through the gateway.
Each scenario (tensor size, concurrency) warms every target up, then runs ROUNDS rounds, alternating the
targets and the order they go in; throughput is the median round. MB/s counts payload (tensor bytes, 1 MB
= 10^6 bytes): both ways for the echo and identity_fp32, the request's only for sum. "vs echo" compares
calls per second. Latency is per call, over all timed calls. CPU time (user + system, from /proc) of the
client and each server process (inference with its workers) is summed over a target's timed rounds and
divided by its calls; the inference service's own ModelStatistics (queue, compute_input, compute_infer,
compute_output, success) are read around each round of a direct target and divided the same way.

Before starting the servers, the client times the steps of the path in its own process (single thread,
median of a few repetitions): a memcpy of the tensor, protobuf serialisation and parsing, the service's
decoding and encoding (``codec``) and the supervisor -> worker hand-over (``ipc``, a /dev/shm segment).

    python -m bench.large_tensors                               # the measurements
    python -m bench.large_tensors serve echo                    # the bare echo server
    python -m bench.large_tensors serve auth                    # the auth server
    python -m bench.large_tensors serve inference MODELS_DIR    # the inference server
    python -m bench.large_tensors serve gateway AUTH_PORT INF_PORT # the gateway
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as pb
from inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub as ShmStub
from inference.v1 import worker_pool_pb2 as admin_pb
from inference.v1 import worker_pool_pb2_grpc

from bench.harness import bench_auth_settings, machine_busy, pinned_repository, process_cpu
from services.inference import codec, ipc
from services.inference.codec import make_infer_request, response_arrays

MODELS = Path(__file__).resolve().parent.parent / "models"
IDENTITY, SUM = "identity_fp32", "sum"
WORKERS = 2  # per model
MiB = 1 << 20
MESSAGE_LIMIT = 128 * MiB  # the echo's, as the inference service's and the gateway's defaults
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
USERNAME = "bench-large-tensors"
PASSWORD = "a perfectly fine passphrase"  # noqa: S105  (the benchmark account's password)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 * MiB), ("grpc.max_receive_message_length", 256 * MiB)]
ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Echo"
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
COLUMNS = 4096  # the tensor is [rows, 4096] FP32: 16 KiB a row
SHM_IN, SHM_OUT = "bench-in", "bench-out"  # the shared-memory regions' names (keys: their objects in /dev/shm)


@dataclass(frozen=True)
class Scenario:
    mib: int
    concurrency: int
    rounds: int
    calls: int  # per target per round
    warmup: int  # calls per target


SCENARIOS = (
    Scenario(mib=8, concurrency=1, rounds=6, calls=12, warmup=4),
    Scenario(mib=64, concurrency=1, rounds=5, calls=2, warmup=1),
    Scenario(mib=8, concurrency=4, rounds=5, calls=16, warmup=8),
)
TARGET_RATIO = 0.80  # identity_fp32 vs the bare echo at 8 MiB, directly (issues 9 and 15)
GATEWAY_TARGET_RATIO = 0.60  # the same through the gateway (issue 15)
SHM_TARGET_RATIO = 3.0  # identity_fp32 with its tensors in system shared memory vs the echo over gRPC (issue 15)
MICRO_REPEATS = {8: 9, 64: 5}
_READY = (admin_pb.WORKER_STATE_READY, admin_pb.WORKER_STATE_BUSY)
PHASES = ("queue", "compute_input", "compute_infer", "compute_output", "success")


# --- the servers ----------------------------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _serve(role: str, args: Sequence[str]) -> None:
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_seconds": 1.0}
    with tempfile.TemporaryDirectory(prefix=f"bench-large-tensors-{role}-") as root:
        if role == "echo":
            server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_send_message_length", MESSAGE_LIMIT),
                    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
                ]
            )
            handler = grpc.unary_unary_rpc_method_handler(_echo)  # bytes in, the same bytes out
            server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_METHOD: handler})]
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                print(json.dumps({"port": port}), flush=True)
                await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
            finally:
                await server.stop(1.0)
            return
        if role == "auth":
            from services.auth.app import build_server as build_auth

            built = await build_auth(bench_auth_settings(Path(root), **common))
        elif role == "inference":
            from services.inference.app import build_server as build_inference
            from services.inference.settings import InferenceSettings

            repository = pinned_repository(Path(root), Path(args[0]) if args else MODELS, [IDENTITY, SUM], WORKERS)
            settings = InferenceSettings(**common, model_repository=repository, shared_memory_enabled=True)
            assert settings.max_message_bytes == MESSAGE_LIMIT, settings.max_message_bytes
            built = await build_inference(settings)
        elif role == "gateway":
            from services.gateway.app import build_server as build_gateway
            from services.gateway.settings import GatewaySettings

            gateway_settings = GatewaySettings(
                **common,
                auth_target=f"dns:///127.0.0.1:{args[0]}",
                inference_target=f"dns:///127.0.0.1:{args[1]}",
            )
            assert gateway_settings.max_message_bytes == MESSAGE_LIMIT, gateway_settings.max_message_bytes
            assert gateway_settings.inference_passthrough
            built = await build_gateway(gateway_settings)
        else:
            raise SystemExit(f"unknown role {role!r}: echo, auth, inference or gateway")
        await built.start()
        try:
            print(json.dumps({"port": built.port}), flush=True)
            await asyncio.to_thread(sys.stdin.read)
        finally:
            await built.stop()


class Server:
    """One server process, its port, and a channel to it."""

    def __init__(self, name: str, role: str, *args: str) -> None:
        self.name = name
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "bench.large_tensors", "serve", role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **SERVER_ENV},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} server did not start (exit code {self.process.wait()})")
        self.port: int = json.loads(line)["port"]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)

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

    async def close(self) -> None:
        await self.channel.close()
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.to_thread(self.process.wait, 30)


async def _wait_workers(inference: Server, within: float = 120.0) -> list[int]:
    """Wait until every worker of both models is ready: their process ids."""
    admin = worker_pool_pb2_grpc.WorkerPoolServiceStub(inference.channel)
    pids: list[int] = []
    async with asyncio.timeout(within):
        for model in (IDENTITY, SUM):
            while True:
                workers = (
                    await admin.GetWorkerHealth(admin_pb.GetWorkerHealthRequest(model_name=model), timeout=5)
                ).workers
                if sum(worker.state in _READY for worker in workers) == WORKERS:
                    pids += [worker.pid for worker in workers]
                    break
                await asyncio.sleep(0.05)
    return pids


async def _token(gateway: Server) -> str:
    """Register and log in a user through ``gateway``: its access token."""
    accounts = auth_pb2_grpc.AuthServiceStub(gateway.channel)
    await accounts.Register(
        auth_pb2.RegisterRequest(username=USERNAME, email=f"{USERNAME}@example.com", password=PASSWORD), timeout=30
    )
    login = await accounts.Login(auth_pb2.LoginRequest(username=USERNAME, password=PASSWORD), timeout=30)
    return str(login.access_token)


# --- the client -----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    call: grpc.aio.UnaryUnaryMultiCallable
    model: str  # the request's model_name (the echo carries identity_fp32's request)
    both_ways: bool  # the payload comes back (echo, identity_fp32) or not (sum)
    metadata: tuple[tuple[str, str], ...] = ()
    stats: bool = False  # read the inference service's ModelStatistics around its rounds
    outbound: np.ndarray | None = None  # where the answer lands (system shared memory), else in the response


class SharedMemoryCall:
    """ModelInfer with the input and the output in system shared memory (Triton's extension), as a client on
    the service's host uses it: each call writes the tensor into the input region (the client's copy, like
    serialisation for the others), sends a request that names both regions and leaves the answer in the output
    region, read there in place."""

    def __init__(self, infer: grpc.aio.UnaryUnaryMultiCallable, inbound: np.ndarray, tensor_of: dict[int, np.ndarray]):
        self._infer = infer
        self._inbound = inbound  # the input region, mapped here
        self._tensor_of = tensor_of  # the current scenario's tensor, by request identity

    async def __call__(
        self,
        request: pb.ModelInferRequest,
        timeout: float,  # noqa: ASYNC109  (the gRPC stub's signature)
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> pb.ModelInferResponse:
        tensor = self._tensor_of[id(request)]
        np.copyto(self._inbound[: tensor.size].reshape(tensor.shape), tensor)
        response: pb.ModelInferResponse = await self._infer(request, timeout=timeout, metadata=metadata)
        return response


class _Regions:
    """Two POSIX shared-memory objects of ``size`` bytes in /dev/shm (input, output), mapped here."""

    def __init__(self, size: int) -> None:
        import mmap

        self.keys = [f"/bench-large-tensors-{os.getpid()}-{which}" for which in ("in", "out")]
        self._maps = []
        for key in self.keys:
            fd = os.open(ipc.SHM_DIR + key, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                self._maps.append(mmap.mmap(fd, size))
            finally:
                os.close(fd)
        self.views = [np.frombuffer(mapping, dtype=np.float32) for mapping in self._maps]

    def close(self) -> None:
        del self.views
        for mapping in self._maps:
            with contextlib.suppress(BufferError):
                mapping.close()
        for key in self.keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ipc.SHM_DIR + key)


def _region_request(tensor: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=IDENTITY)
    tensor_in = request.inputs.add(name="INPUT0", datatype="FP32", shape=list(tensor.shape))
    tensor_in.parameters["shared_memory_region"].string_param = SHM_IN
    tensor_in.parameters["shared_memory_byte_size"].int64_param = tensor.nbytes
    tensor_out = request.outputs.add(name="OUTPUT0")
    tensor_out.parameters["shared_memory_region"].string_param = SHM_OUT
    tensor_out.parameters["shared_memory_byte_size"].int64_param = tensor.nbytes
    return request


class Meter:
    """CPU seconds so far of this client and of each server process (inference includes its workers):
    ``name`` user + system, ``name/sys`` system only."""

    def __init__(self, processes: dict[str, list[int]], inference: grpc.aio.Channel) -> None:
        self.processes = processes
        self.statistics = inference.unary_unary(
            "/inference.GRPCInferenceService/ModelStatistics",
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )

    def cpu(self) -> dict[str, float]:
        own = os.times()
        values = {"client": own.user + own.system, "client/sys": own.system}
        for name, pids in self.processes.items():
            times = [process_cpu(pid) for pid in pids]
            values[name] = sum(user + system for user, system in times)
            values[f"{name}/sys"] = sum(system for _, system in times)
        return values

    async def phases(self, model: str) -> dict[str, float]:
        """The model's cumulative ModelStatistics durations (seconds) and its success count."""
        answer = await self.statistics(pb.ModelStatisticsRequest(name=model), timeout=10)
        stats = answer.model_stats[0].inference_stats
        values = {phase: getattr(stats, phase).ns / 1e9 for phase in PHASES}
        values["count"] = stats.success.count
        return values


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds over the timed rounds
    phases: dict[str, float] = field(default_factory=dict)  # ModelStatistics over the timed rounds

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    def cpu_ms(self, *names: str) -> float:
        """CPU ms per call of the named processes (all of them when none are named; ``x/sys``: system only)."""
        chosen = names or tuple(name for name in self.cpu if "/" not in name)
        return sum(self.cpu.get(name, 0.0) for name in chosen) / self.calls * 1e3

    def kernel_share(self) -> float:
        """The share of all processes' CPU time spent in the kernel."""
        return sum(value for name, value in self.cpu.items() if name.endswith("/sys")) / max(
            1e-9, sum(value for name, value in self.cpu.items() if "/" not in name)
        )

    def phase_ms(self, phase: str) -> float:
        return self.phases[phase] / self.phases["count"] * 1e3


async def _drive(
    target: Target, request: pb.ModelInferRequest, concurrency: int, calls: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await target.call(request, timeout=60, metadata=target.metadata)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


async def _compare(
    targets: Sequence[Target], requests: dict[str, pb.ModelInferRequest], scenario: Scenario, meter: Meter
) -> dict[str, Result]:
    """``scenario.rounds`` rounds of each target, alternating, and alternating which goes first."""
    results = {target.name: Result() for target in targets}
    for round_ in range(scenario.rounds):
        for target in targets if round_ % 2 == 0 else list(reversed(targets)):
            request = requests[target.name] if target.name in requests else requests[target.model]
            phases_before = await meter.phases(target.model) if target.stats else {}
            before = meter.cpu()
            rate, latencies = await _drive(target, request, scenario.concurrency, scenario.calls)
            after = meter.cpu()
            phases_after = await meter.phases(target.model) if target.stats else {}
            result = results[target.name]
            result.rates.append(rate)
            result.latencies.extend(latencies)
            result.calls += len(latencies)
            for name, value in after.items():
                result.cpu[name] = result.cpu.get(name, 0.0) + value - before[name]
            for name, value in phases_after.items():
                result.phases[name] = result.phases.get(name, 0.0) + value - phases_before[name]
    return results


def _tensor(mib: int) -> np.ndarray:
    rows = mib * MiB // (4 * COLUMNS)
    rng = np.random.default_rng(mib)
    return rng.standard_normal((rows, COLUMNS), dtype=np.float32)


# --- the steps, in this process -------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


def _timed(step: Callable[[], object], repeats: int) -> float:
    """Median ms of ``step``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _steps(mib: int) -> dict[str, float]:
    """ms per step of the path for one tensor of ``mib`` MiB, each timed alone in this process."""
    repeats = MICRO_REPEATS[mib]
    tensor = _tensor(mib)
    request = make_infer_request(IDENTITY, {"INPUT0": ("FP32", tensor)})
    serialized = request.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(serialized)
    specs_in = [_Spec("INPUT0", "FP32", (-1, -1))]
    specs_out = [_Spec("OUTPUT0", "FP32", (-1, -1))]
    decoded = codec.decode_request(parsed, specs_in)
    output = decoded.inputs["INPUT0"]

    def encode() -> pb.ModelInferResponse:
        return codec.encode_response(
            model_name=IDENTITY,
            model_version="1",
            request_id="",
            outputs={"OUTPUT0": output},
            specs=specs_out,
            requested=[],
            raw=True,
        )

    response = encode()
    encoded_response = response.SerializeToString()
    destination = np.empty_like(tensor)
    prefix = f"bench-lt-{os.getpid()}-"

    def ipc_hop() -> None:
        call = ipc.InferCall(request_id=1, traceparent="", inputs={"INPUT0": output}, outputs=[], deadline=0.0)
        frame = ipc.encode(call, shm_threshold=ipc.DEFAULT_SHM_THRESHOLD, shm_prefix=prefix)
        message = ipc.decode(frame[4:], shm_prefix=prefix)
        assert isinstance(message, ipc.InferCall)
        float(message.inputs["INPUT0"][:, 0].sum())  # touch one element of every row: map the pages in

    steps: dict[str, Callable[[], object]] = {
        "memcpy of the tensor (np.copyto, warm destination)": lambda: np.copyto(destination, tensor),
        "request SerializeToString (client; the gateway forwards bytes)": request.SerializeToString,
        "request FromString (inference service)": lambda: pb.ModelInferRequest.FromString(serialized),
        "codec.decode_request (raw -> numpy)": lambda: codec.decode_request(parsed, specs_in),
        "ipc hand-over: /dev/shm segment written, mapped, pages touched": ipc_hop,
        "codec.encode_response (numpy -> raw bytes)": encode,
        "response SerializeToString (inference service)": response.SerializeToString,
        "response FromString (client)": lambda: pb.ModelInferResponse.FromString(encoded_response),
    }
    return {name: _timed(step, repeats) for name, step in steps.items()}


# --- the run --------------------------------------------------------------------------------------


async def _check(targets: Sequence[Target], requests: dict[str, pb.ModelInferRequest], tensor: np.ndarray) -> None:
    """Every target answers right, once, outside the timing."""
    sums = tensor.sum(axis=1, dtype=np.float32)
    for target in targets:
        request = requests[target.name] if target.name in requests else requests[target.model]
        answer = await target.call(request, timeout=60, metadata=target.metadata)
        if target.outbound is not None:
            assert np.array_equal(target.outbound[: tensor.size].reshape(tensor.shape), tensor), target.name
        elif target.model == IDENTITY and isinstance(answer, pb.ModelInferRequest):  # the echo
            assert answer == requests[IDENTITY], target.name
        elif target.model == IDENTITY:
            assert np.array_equal(response_arrays(answer)["OUTPUT0"], tensor), target.name
        else:
            np.testing.assert_allclose(response_arrays(answer)["OUTPUT0"], sums, rtol=1e-4, atol=1e-2)


async def main() -> None:
    for model in (IDENTITY, SUM):
        if not (MODELS / model / "config.yaml").is_file():
            raise SystemExit(f"{MODELS / model} is missing: run `make models` first")
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    steps = {mib: _steps(mib) for mib in sorted({scenario.mib for scenario in SCENARIOS})}

    servers: list[Server] = []
    cleanup: list[Callable[[], None]] = []
    results: dict[Scenario, dict[str, Result]] = {}
    sizes: dict[int, int] = {}
    try:
        echo = Server("echo", "echo")
        servers.append(echo)
        auth = Server("auth", "auth")
        servers.append(auth)
        inference = Server("inference", "inference", str(MODELS))
        servers.append(inference)
        gateway = Server("gateway", "gateway", str(auth.port), str(inference.port))
        servers.append(gateway)
        for server in servers:
            if server is not echo:
                await server.wait_ready()
        worker_pids = await _wait_workers(inference)
        processes = {server.name: [server.process.pid] for server in servers}
        processes["inference"] += worker_pids
        meter = Meter(processes, inference.channel)

        bearer = (("authorization", f"Bearer {await _token(gateway)}"),)

        def infer(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
            return channel.unary_unary(
                INFER_PATH,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )

        bare = echo.channel.unary_unary(
            f"/{ECHO_SERVICE}/{ECHO_METHOD}",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferRequest.FromString,  # the echo returns the request
        )
        largest = max(scenario.mib for scenario in SCENARIOS) * MiB
        regions = _Regions(largest)
        cleanup.append(regions.close)
        shm_rpc = ShmStub(inference.channel)
        for name, key in ((SHM_IN, regions.keys[0]), (SHM_OUT, regions.keys[1])):
            await shm_rpc.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=0, byte_size=largest), timeout=10
            )
        tensor_of: dict[int, np.ndarray] = {}
        shm_call = SharedMemoryCall(infer(inference.channel), regions.views[0], tensor_of)
        targets = [
            Target("echo", bare, IDENTITY, both_ways=True),
            Target("identity shm", shm_call, IDENTITY, both_ways=True, outbound=regions.views[1]),
            Target("identity direct", infer(inference.channel), IDENTITY, both_ways=True, stats=True),
            Target("identity gateway", infer(gateway.channel), IDENTITY, both_ways=True, metadata=bearer),
            Target("sum direct", infer(inference.channel), SUM, both_ways=False, stats=True),
            Target("sum gateway", infer(gateway.channel), SUM, both_ways=False, metadata=bearer),
        ]

        measuring = time.perf_counter()
        ours_before, busy_before = sum(v for k, v in meter.cpu().items() if "/" not in k), machine_busy()
        for scenario in SCENARIOS:
            tensor = _tensor(scenario.mib)
            sizes[scenario.mib] = tensor.nbytes
            requests = {model: make_infer_request(model, {"INPUT0": ("FP32", tensor)}) for model in (IDENTITY, SUM)}
            requests["identity shm"] = _region_request(tensor)
            tensor_of.clear()
            tensor_of[id(requests["identity shm"])] = tensor
            await _check(targets, requests, tensor)
            for target in targets:  # warm-up: channels, every worker, every code path
                request = requests[target.name] if target.name in requests else requests[target.model]
                await _drive(target, request, scenario.concurrency, scenario.warmup)
            results[scenario] = await _compare(targets, requests, scenario, meter)
            del tensor, requests
        seconds = time.perf_counter() - measuring
        ours = (sum(v for k, v in meter.cpu().items() if "/" not in k) - ours_before) / seconds
        machine = f"{ours:.2f} cores ours + {(machine_busy() - busy_before) / seconds - ours:.2f} other"
    finally:
        for server in reversed(servers):
            await server.close()
        for close in cleanup:
            close()
    elapsed = time.perf_counter() - began
    _report(results, sizes, steps, elapsed)
    print(f"Machine busy during the measurements: {machine}; load average before the run {load_before:.2f}.")


def _report(
    results: dict[Scenario, dict[str, Result]],
    sizes: dict[int, int],
    steps: dict[int, dict[str, float]],
    elapsed: float,
) -> None:
    print("## Large tensors: FP32 [rows, 4096] through identity_fp32 and sum vs a bare grpc.aio echo\n")
    for scenario, by_target in results.items():
        echo = by_target["echo"]
        print(
            f"\n| {scenario.mib} MiB, concurrency {scenario.concurrency} | req/s | MB/s | vs echo | p50 / p90 ms "
            "| CPU ms/call, all processes | in the kernel | client | echo | inference + workers | gateway |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, result in by_target.items():
            both_ways = not name.startswith("sum")
            mb = result.rate * sizes[scenario.mib] * (2 if both_ways else 1) / 1e6
            print(
                f"| {name} | {result.rate:.1f} | {mb:.0f} | {result.rate / echo.rate:.2f} "
                f"| {result.ms(0.5):.1f} / {result.ms(0.9):.1f} | {result.cpu_ms():.1f} "
                f"| {result.kernel_share():.0%} | "
                + " | ".join(f"{result.cpu_ms(process):.1f}" for process in ("client", "echo", "inference", "gateway"))
                + " |"
            )

    print(
        "\n| in the inference service, ms/call (ModelStatistics) | queue | compute_input | compute_infer "
        "| compute_output | success (whole service) | client p50 | outside the service (p50 - success) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scenario, by_target in results.items():
        for name in ("identity direct", "sum direct"):
            result = by_target[name]
            cells = " | ".join(f"{result.phase_ms(phase):.1f}" for phase in PHASES)
            label = f"{name.split()[0]}, {scenario.mib} MiB, c={scenario.concurrency}"
            print(f"| {label} | {cells} | {result.ms(0.5):.1f} | {result.ms(0.5) - result.phase_ms('success'):.1f} |")

    mibs = sorted(steps)
    print("\n| one step, alone, in one process (median ms) | " + " | ".join(f"{mib} MiB" for mib in mibs) + " |")
    print("|---|" + "---|" * len(mibs))
    for step in steps[mibs[0]]:
        print(f"| {step} | " + " | ".join(f"{steps[mib][step]:.1f}" for mib in mibs) + " |")

    for scenario, by_target in results.items():
        if scenario.mib == 8:
            ratio = by_target["identity direct"].rate / by_target["echo"].rate
            via = by_target["identity gateway"].rate / by_target["echo"].rate
            verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
            shm = by_target["identity shm"].rate / by_target["echo"].rate
            print(
                f"\nTarget identity_fp32 >= {TARGET_RATIO:.0%} of the echo at 8 MiB, concurrency {scenario.concurrency}: "
                f"direct {ratio:.0%} ({verdict}), through the gateway {via:.0%} "
                f"({'met' if via >= GATEWAY_TARGET_RATIO else 'NOT met'} against {GATEWAY_TARGET_RATIO:.0%}); "
                f"with system shared memory {shm:.1f}x the echo "
                f"({'met' if shm >= SHM_TARGET_RATIO else 'NOT met'} against {SHM_TARGET_RATIO:.0f}x)."
            )
    print(f"\nWhole run: {elapsed:.0f} s.")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(sys.argv[2], sys.argv[3:]))
    else:
        asyncio.run(main())
