"""Inference vs MLServer, in the same run: the same trained estimators served by both, one load generator.

Servers, each in its own process, started here and stopped here by process id (SIGTERM), on free
loopback ports, all up at once and driven in turn:

* MLServer 1.7.1 with mlserver-sklearn, from a virtualenv of its own (``.venv-mlserver``, installed by
  ``make bench`` from ``bench/mlserver-requirements.lock``), ``mlserver start`` over a temporary folder:
  a ``settings.json`` that sets only its ports and host (127.0.0.1), and one model folder per model
  with a ``model-settings.json`` (``implementation: mlserver_sklearn.SKLearnModel``, ``uri`` the
  estimator saved with ``joblib.dump``). The iris estimator is the very one in ``models/iris/1/model.skops``
  (loaded with our runtime's trusted-types loader, then dumped); digits is served by us as ONNX only, so
  MLServer gets the scikit-learn pipeline ``make_models`` trains and converts (same code, fixed random
  state), and the answers are compared.

  - "MLServer default": its default settings (``parallel_workers`` 1: one inference worker process
    behind the gRPC process, access logs and metrics on, as ``debug`` and ``metrics_endpoint`` default).
  - "MLServer batching": the same with adaptive batching (``max_batch_size`` / ``max_batch_time`` in
    the model settings), one server per setting in ML_BATCHING; the table shows the best at each
    concurrency, a second table all of them.
* Our inference service as ``make run`` starts it (``build_server`` with the default settings but
  ports, logging configured as the runner does, console format as devrun sets it) over a temporary
  copy of ``models/iris`` and ``models/digits``, their configs as shipped:
  - "ours, no batching": the config without ``dynamic_batching``;
  - "ours": with ``dynamic_batching`` (from ``models/<name>/config.yaml``, or from ``make_models``'
    current config when the built one predates it); without batching support only "ours" runs.
* "ours via gateway": auth and a gateway (default settings) in front of "ours"; a user registers and logs
  in through the gateway, and its bearer token goes with every call.

What is computed: MLServer is asked for outputs ``predict`` and ``predict_proba`` (by default its sklearn
runtime answers ``predict`` only), ours for ``label`` (predict) and ``probabilities`` (predict_proba); both
run the scikit-learn pipeline's two methods on the decoded FP32 row (digits: ours runs the ONNX graph,
which computes both at once). Every server's answers are checked against ours on a few rows, one row per
request, before anything is timed.

The load: one ``grpc.aio`` client, one channel per server and model, N tasks each sending ModelInfer
with one FP32 [1, F] row as raw contents and waiting for the answer, for SECONDS; every server is warmed
up first, then ROUNDS rounds per concurrency, the order of the servers rotating each round. req/s is the
median round; p50/p99 over all rounds; CPU ms per request from /proc for the client and for the process
tree of the server (front process + its children, exited children included; through the gateway: the
gateway, auth and our server's trees).

    python -m bench.vs_mlserver                 # 6 rounds of 1.5 s; BENCH_QUICK=1: 2 of 1 s; or BENCH_ROUNDS, BENCH_SECONDS
    python -m bench.vs_mlserver serve ROLE ...  # one of our servers (used by the comparison)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc

from bench.harness import machine_busy, process_tree, quantile, tree_cpu
from services.inference.codec import make_infer_request, response_arrays

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"
LOCK = "bench/mlserver-requirements.lock"

QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2" if QUICK else "6"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "1" if QUICK else "1.5"))
WARMUP_SECONDS = 0.5 if QUICK else 1.5
CONCURRENCY = (1, 8, 32)
TIMEOUT = 10.0  # seconds a call may take
DIGITS_CONCURRENCY = 32
ML_BATCHING = ((8, 0.001), (16, 0.002), (32, 0.005))  # MLServer max_batch_size (rows), max_batch_time (s)
NAMES = ("iris", "digits")
OUTPUTS = {"mlserver": ("predict", "predict_proba"), "ours": ("label", "probabilities")}
CHECK_ROWS = {"iris": (0, 1, 50, 51, 100, 101), "digits": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)}
USERNAME = "bench-vs-mlserver"
PASSWORD = "a perfectly fine passphrase"  # noqa: S105  (the benchmark account's password)
CORES = os.cpu_count() or 1


# --- our servers (``python -m bench.vs_mlserver serve ROLE ARGS``) ------------------------------------


async def _serve(role: str, args: Sequence[str]) -> None:
    """One of our services built as ``python -m services.<role>`` builds it; prints its port; stops on SIGTERM."""
    from opentelemetry import trace

    from services.common.logs import configure_logging

    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
    if role == "inference":
        from services.inference.app import SERVICE, build_server
        from services.inference.settings import InferenceSettings

        settings: Any = InferenceSettings(**common, model_repository=Path(args[0]))
    elif role == "auth":
        from services.auth.app import SERVICE, build_server  # type: ignore[assignment]
        from services.auth.settings import AuthSettings

        settings = AuthSettings(**common, data_dir=Path(args[0]), trusted_proxies=["127.0.0.1/32", "::1/128"])
    elif role == "gateway":
        from services.gateway.app import SERVICE, build_server  # type: ignore[assignment]
        from services.gateway.settings import GatewaySettings

        settings = GatewaySettings(
            **common, auth_target=f"dns:///127.0.0.1:{args[0]}", inference_target=f"dns:///127.0.0.1:{args[1]}"
        )
    else:
        raise SystemExit(f"unknown role {role!r}: inference, auth or gateway")
    configure_logging(SERVICE, settings.log_level, settings.log_format)  # as services.common.runner does
    server = await build_server(settings)
    trace.set_tracer_provider(server.tracer_provider)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(json.dumps({"port": server.port}), flush=True)
        await stop.wait()
    finally:
        await server.stop()


# --- processes ----------------------------------------------------------------------------------------


class Process:
    """A server process this benchmark started; stopped by its pid."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None, announces: bool = False
    ) -> None:
        self.name = name
        self.popen = subprocess.Popen(  # noqa: S603
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if announces else subprocess.DEVNULL,  # MLServer logs every call to stdout
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        self.pid = self.popen.pid
        self.drain: threading.Thread | None = None

    async def announced_port(self) -> int:
        """The port our server prints once it listens (anything it prints later is read and dropped)."""
        stdout = self.popen.stdout
        assert stdout is not None
        while True:
            line = await asyncio.to_thread(stdout.readline)
            if not line:
                raise RuntimeError(f"{self.name} exited before listening (exit code {self.popen.wait()})")
            if line.startswith(b"{"):
                self.drain = threading.Thread(target=stdout.read, daemon=True)  # a full pipe would block it
                self.drain.start()
                return int(json.loads(line)["port"])

    def stop(self, within: float = 30.0) -> None:
        if self.popen.poll() is None:
            tree = process_tree(self.pid)
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                for pid in tree:  # its own workers, which it did not stop
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.popen.wait()
        if self.drain is not None:
            self.drain.join(5)
        if self.popen.stdout is not None and (self.drain is None or not self.drain.is_alive()):
            self.popen.stdout.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ours_env(prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault(f"{prefix}LOG_FORMAT", "console")  # as services.devrun sets it
    return env


def _start_ours(role: str, *args: str) -> Process:
    argv = [sys.executable, "-m", "bench.vs_mlserver", "serve", role, *args]
    return Process(f"{role} {' '.join(args)}", argv, _ours_env(role.upper() + "_"), announces=True)


# --- the model copies ---------------------------------------------------------------------------------


@dataclass
class Configs:
    plain: dict[str, dict[str, Any]]  # model -> config without dynamic_batching
    batched: dict[str, dict[str, Any]] | None  # model -> config with it; None: not supported
    source: str  # where the batching settings come from


def _configs() -> Configs:
    """The shipped configs of iris and digits, with and without dynamic batching."""
    from services.inference import make_models, repository

    shipped = {demo.name: demo.config for demo in make_models.DEMO_MODELS}
    plain: dict[str, dict[str, Any]] = {}
    batched: dict[str, dict[str, Any]] = {}
    sources = set()
    for name in NAMES:
        config = yaml.safe_load((MODELS / name / "config.yaml").read_text())
        plain[name] = {key: value for key, value in config.items() if key != "dynamic_batching"}
        if "dynamic_batching" in config:
            batched[name], source = config, f"models/{name}/config.yaml"
        elif "dynamic_batching" in shipped.get(name, {}):  # the built copy predates it
            fresh = shipped[name]
            batched[name] = {
                **config,
                "max_batch_size": fresh["max_batch_size"],
                "dynamic_batching": fresh["dynamic_batching"],
            }
            source = f"make_models' {name} config (models/{name} was built before it had dynamic_batching)"
        else:
            continue
        sources.add(source)
    supported = hasattr(repository, "DynamicBatching") and set(batched) == set(NAMES)
    for name in NAMES:  # never start a server with a config it would refuse
        repository.parse_config(name, plain[name], source=f"{name} config without batching")
        if supported:
            repository.parse_config(name, batched[name], source=f"{name} config with batching")
    return Configs(plain, batched if supported else None, "; ".join(sorted(sources)))


def _our_repository(root: Path, configs: dict[str, dict[str, Any]]) -> Path:
    import shutil

    repository = root
    for name in NAMES:
        target = repository / name
        shutil.copytree(MODELS / name, target)
        (target / "config.yaml").write_text(yaml.safe_dump(configs[name], sort_keys=False))
    return repository


def _estimators() -> dict[str, Any]:
    """The scikit-learn estimators MLServer serves: iris from our skops file, digits trained again."""
    from services.inference import make_models
    from services.inference.runtimes.sklearn import ARTIFACT, load_trusted

    return {
        "iris": load_trusted(MODELS / "iris" / "1" / ARTIFACT),
        "digits": make_models.DIGITS.train(*make_models.DIGITS.data()),
    }


def _mlserver_folder(root: Path, estimators: dict[str, Any], batching: tuple[int, float] | None) -> tuple[Path, int]:
    """A folder ``mlserver start`` serves: settings.json (ports, host) and one model folder per model."""
    import joblib  # type: ignore[import-untyped]

    root.mkdir(parents=True)
    for name, estimator in estimators.items():
        model_dir = root / name
        model_dir.mkdir()
        joblib.dump(estimator, model_dir / "model.joblib")
        settings: dict[str, Any] = {
            "name": name,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib"},
        }
        if batching is not None:
            settings |= {"max_batch_size": batching[0], "max_batch_time": batching[1]}
        (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=2))
    port = _free_port()
    ports = {"host": "127.0.0.1", "grpc_port": port, "http_port": _free_port(), "metrics_port": _free_port()}
    (root / "settings.json").write_text(json.dumps(ports, indent=2))
    return root, port


def _start_mlserver(name: str, folder: Path) -> Process:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH") and not key.startswith("MLSERVER_")
    }
    return Process(name, [str(MLSERVER), "start", str(folder)], env, cwd=folder)


# --- readiness ----------------------------------------------------------------------------------------


async def _until(check: Any, what: str, within: float = 300.0) -> None:
    try:
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if await check():
                        return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise RuntimeError(f"{what} not ready within {within:.0f} s") from None


async def _models_ready(port: int, process: Process) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def ready() -> bool:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited (code {process.popen.returncode})")
            answers = [await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=2) for name in NAMES]
            return all(answer.ready for answer in answers)

        await _until(ready, process.name)


async def _serving(port: int, name: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="readiness")

        async def ready() -> bool:
            answer = await health.Check(request, timeout=2)
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

        await _until(ready, name)


async def _token(port: int) -> str:
    """Register and log in through the gateway: the access token."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        accounts = auth_pb2_grpc.AuthServiceStub(channel)
        register = auth_pb2.RegisterRequest(username=USERNAME, email=f"{USERNAME}@example.com", password=PASSWORD)
        await accounts.Register(register, timeout=30)
        login = await accounts.Login(auth_pb2.LoginRequest(username=USERNAME, password=PASSWORD), timeout=30)
        return str(login.access_token)


# --- the client ---------------------------------------------------------------------------------------


@dataclass
class Stats:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0
    client: float = 0.0  # CPU seconds
    front: float = 0.0  # the server's front process(es)
    children: float = 0.0  # their descendants (workers)
    busy: float = 0.0  # the whole machine
    failures: Counter[str] = field(default_factory=Counter)  # status code -> calls

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def ms(self, q: float) -> float:
        return quantile(self.latencies, q) * 1e3 if self.latencies else float("nan")

    def cpu_ms(self, seconds: float) -> float:
        return seconds / self.calls * 1e3 if self.calls else float("nan")


@dataclass
class Target:
    name: str
    kind: str  # mlserver | ours
    model: str
    port: int
    roots: list[int]  # the process trees charged to it
    metadata: tuple[tuple[str, str], ...] = ()
    stats: dict[int, Stats] = field(default_factory=dict)
    channel: grpc.aio.Channel | None = None

    @property
    def outputs(self) -> tuple[str, str]:
        return OUTPUTS[self.kind]

    def stub(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def request(self, rows: np.ndarray) -> pb.ModelInferRequest:
        return make_infer_request(self.model, {"input": ("FP32", rows)}, outputs=list(self.outputs))

    async def answer(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) for one row."""
        arrays = response_arrays(await self.stub().ModelInfer(self.request(row), timeout=30, metadata=self.metadata))
        label, probabilities = (np.asarray(arrays[name]) for name in self.outputs)
        return label.reshape(-1), probabilities.reshape(1, -1)


def _reading(target: Target) -> tuple[float, float, float, float]:
    """CPU seconds so far: this client, the target's front processes, their descendants, the whole machine."""
    own = os.times()
    trees = [tree_cpu(pid) for pid in target.roots]
    return own.user + own.system, sum(t[0] for t in trees), sum(t[1] for t in trees), machine_busy()


async def _round(target: Target, concurrency: int, seconds: float, row: np.ndarray, stats: Stats | None) -> None:
    stub = target.stub()
    request = target.request(row)
    latencies: list[float] = []

    failed: list[str] = []

    async def loop(deadline: float) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await stub.ModelInfer(request, timeout=TIMEOUT, metadata=target.metadata)
            except grpc.aio.AioRpcError as error:  # counted, and the call's time stays out of the latencies
                failed.append(error.code().name)
                print(f"{target.name} {target.model} c={concurrency}: {error.code().name}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - started)

    before = _reading(target)
    began = time.perf_counter()
    await asyncio.gather(*(loop(began + seconds) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    after = _reading(target)
    if stats is None:  # warm-up
        return
    stats.failures.update(failed)
    stats.rates.append(len(latencies) / elapsed)
    stats.latencies += latencies
    stats.calls += len(latencies)
    stats.seconds += elapsed
    used = [end - start for start, end in zip(before, after, strict=True)]
    stats.client += used[0]
    stats.front += used[1]
    stats.children += used[2]
    stats.busy += used[3]


async def _measure(targets: list[Target], concurrencies: Sequence[int], row: np.ndarray) -> None:
    """ROUNDS rounds per concurrency, every target once a round, the order rotating each round."""
    for concurrency in concurrencies:
        for target in targets:
            target.stats[concurrency] = Stats()
        for index in range(ROUNDS):
            shift = index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                await _round(target, concurrency, SECONDS, row, target.stats[concurrency])


async def _verify(targets: list[Target], rows: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """Every target answers each row (one per request) as ``reference`` says: labels equal, probabilities
    within 1e-4 (digits: ONNX in float32 vs scikit-learn in float64). The largest probability difference."""
    labels, probabilities = reference
    largest = 0.0
    for target in targets:
        for index in range(len(rows)):
            label, probability = await target.answer(rows[index : index + 1])
            if label.tolist() != [labels[index]]:
                raise SystemExit(f"{target.name} {target.model}: row {index} label {label} != {labels[index]}")
            difference = float(np.max(np.abs(probability[0] - probabilities[index])))
            if difference > 1e-4:
                raise SystemExit(f"{target.name} {target.model}: row {index} probabilities differ by {difference}")
            largest = max(largest, difference)
    return largest


# --- the report ---------------------------------------------------------------------------------------


def _batching(configs: Configs) -> str:
    if configs.batched is None:
        return "not supported"
    settings = "; ".join(
        f"{name} max_batch_size {config['max_batch_size']}, dynamic_batching {json.dumps(config['dynamic_batching'])}"
        for name, config in configs.batched.items()
    )
    return f"{settings} (from {configs.source})"


def _batch_name(setting: tuple[int, float]) -> str:
    return f"MLServer batching {setting[0]} rows / {setting[1] * 1e3:g} ms"


def _best(candidates: list[Target], concurrency: int) -> Target:
    return max(candidates, key=lambda target: target.stats[concurrency].rate)


def _rows(targets: list[Target], default: Target, batching: list[Target], concurrency: int) -> list[str]:
    best = _best(batching, concurrency)
    lines = []
    for target in targets:
        stats = target.stats[concurrency]
        name = f"{target.name} (best)" if target is best else target.name
        lines.append(
            f"| {concurrency} | {name} | {stats.rate:.0f} | {stats.ms(0.5):.2f} | {stats.ms(0.99):.2f} "
            f"| {stats.cpu_ms(stats.client):.2f} | {stats.cpu_ms(stats.front + stats.children):.2f} "
            f"({stats.cpu_ms(stats.front):.2f} + {stats.cpu_ms(stats.children):.2f}) "
            f"| {stats.rate / default.stats[concurrency].rate:.2f} | {stats.rate / best.stats[concurrency].rate:.2f} |"
        )
    return lines


HEADER = (
    "| concurrency | server | req/s | p50 ms | p99 ms | client CPU ms/req | server CPU ms/req (front + children) "
    "| vs MLServer default | vs MLServer batching (best) |\n|---|---|---|---|---|---|---|---|---|"
)


def _report(
    iris: list[Target],
    digits: list[Target],
    configs: Configs,
    differences: dict[str, float],
    children: dict[str, int],
    seconds: float,
) -> None:
    def split(targets: list[Target]) -> tuple[Target, list[Target], list[Target]]:
        default = next(target for target in targets if target.name == "MLServer default")
        batching = [target for target in targets if target.name.startswith("MLServer batching")]
        return default, batching, [target for target in targets if target.kind == "ours"]

    default, batching, ours = split(iris)
    print("## Inference vs MLServer (`bench/vs_mlserver.py`)\n")
    print(
        f"iris, one FP32 [1, 4] row per request, {ROUNDS} rounds of {SECONDS:g} s per server and concurrency, "
        "interleaved; req/s is the median round. MLServer batching: the best of its settings at that "
        "concurrency (all of them in the next table).\n"
    )
    print(HEADER)
    for concurrency in CONCURRENCY:
        shown = [default, _best(batching, concurrency), *ours]
        print("\n".join(_rows(shown, default, batching, concurrency)))

    print("\n| MLServer adaptive batching, iris | " + " | ".join(f"c={c} req/s, p50 ms" for c in CONCURRENCY) + " |")
    print("|---|" + "---|" * len(CONCURRENCY))
    for target in [default, *batching]:
        cells = [f"{target.stats[c].rate:.0f}, {target.stats[c].ms(0.5):.2f}" for c in CONCURRENCY]
        print(f"| {target.name} | " + " | ".join(cells) + " |")

    default, batching, ours = split(digits)
    print(
        f"\ndigits, one FP32 [1, 64] row per request, concurrency {DIGITS_CONCURRENCY} (ours: ONNX; MLServer: the "
        "scikit-learn pipeline it was converted from, trained again with the same code and random state):\n"
    )
    print(HEADER)
    print(
        "\n".join(_rows([default, _best(batching, DIGITS_CONCURRENCY), *ours], default, batching, DIGITS_CONCURRENCY))
    )

    failures = [
        f"{target.name} ({target.model}, c={concurrency}): "
        + ", ".join(f"{count} {code}" for code, count in stats.failures.items())
        for target in iris + digits
        for concurrency, stats in target.stats.items()
        if stats.failures
    ]
    print(f"\nFailed calls (left out of the latencies): {'; '.join(failures) if failures else 'none'}.")
    everything = [stats for target in iris + digits for stats in target.stats.values()]
    timed = sum(stats.seconds for stats in everything)
    busy = sum(stats.busy for stats in everything) / timed
    measured = sum(stats.client + stats.front + stats.children for stats in everything) / timed
    print(
        f"\nAnswers checked before timing: iris {len(CHECK_ROWS['iris'])} rows, digits {len(CHECK_ROWS['digits'])}, "
        f"labels equal everywhere; largest probability difference from the reference: iris "
        f"{differences['iris']:.1e} (the estimator in process), digits {differences['digits']:.1e} (ours, ONNX). "
        f"Dynamic batching of ours: {_batching(configs)}. "
        f"Child processes of each server at the end: {', '.join(f'{k} {v}' for k, v in children.items())}. "
        f"Machine: {CORES} cores, busy {busy:.2f} cores on average during the timed rounds, of which the client and "
        f"the server under test {measured:.2f}. Run: {seconds:.0f} s."
    )


# --- main ---------------------------------------------------------------------------------------------


async def main() -> None:
    began = time.perf_counter()
    if not MLSERVER.exists():
        raise SystemExit(f"{MLSERVER} is missing: `make bench` installs it from {LOCK}")
    for name in NAMES:
        if not (MODELS / name / "config.yaml").is_file():
            raise SystemExit(f"{MODELS / name} is missing: run `make models` first")
    from services.inference import make_models

    configs = _configs()
    estimators = _estimators()
    data = {"iris": make_models.IRIS.data()[0], "digits": make_models.DIGITS.data()[0]}
    timed_rows = {name: data[name][:1] for name in NAMES}
    processes: list[Process] = []
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-mlserver-") as scratch:
        root = Path(scratch)
        try:
            servers: list[tuple[str, str, Process, int | None]] = []  # name, kind, process, port (None: announced)
            mlserver_settings: list[tuple[int, float] | None] = [None, *ML_BATCHING]
            for index, batching in enumerate(mlserver_settings):
                name = "MLServer default" if batching is None else _batch_name(batching)
                folder, port = _mlserver_folder(root / f"mlserver-{index}", estimators, batching)
                process = _start_mlserver(name, folder)
                processes.append(process)
                servers.append((name, "mlserver", process, port))
            ours_configs = (
                {"ours": configs.plain}
                if configs.batched is None
                else {
                    "ours, no batching": configs.plain,
                    "ours": configs.batched,
                }
            )
            for index, (name, model_configs) in enumerate(ours_configs.items()):
                process = _start_ours("inference", str(_our_repository(root / f"ours-{index}", model_configs)))
                processes.append(process)
                servers.append((name, "ours", process, None))
            ports = {}
            for name, _, process, port in servers:
                ports[name] = port if port is not None else await process.announced_port()
            await asyncio.gather(*(_models_ready(ports[name], process) for name, _, process, _ in servers))

            (root / "auth").mkdir()
            auth = _start_ours("auth", str(root / "auth"))
            processes.append(auth)
            auth_port = await auth.announced_port()
            ours_process = next(process for name, _, process, _ in servers if name == "ours")
            gateway = _start_ours("gateway", str(auth_port), str(ports["ours"]))
            processes.append(gateway)
            gateway_port = await gateway.announced_port()
            await _serving(auth_port, "auth")
            await _serving(gateway_port, "gateway")
            bearer = (("authorization", f"Bearer {await _token(gateway_port)}"),)

            for model in NAMES:
                for name, kind, process, _ in servers:
                    targets.append(Target(name, kind, model, ports[name], [process.pid]))
            gateway_target = Target(
                "ours via gateway", "ours", "iris", gateway_port, [gateway.pid, auth.pid, ours_process.pid], bearer
            )
            targets.append(gateway_target)
            iris = [target for target in targets if target.model == "iris"]
            digits = [target for target in targets if target.model == "digits"]

            estimator = estimators["iris"]
            iris_rows = data["iris"][list(CHECK_ROWS["iris"])]
            iris_reference = (estimator.predict(iris_rows), estimator.predict_proba(iris_rows))
            digits_rows = data["digits"][list(CHECK_ROWS["digits"])]
            ours_digits = next(target for target in digits if target.kind == "ours")
            answers = [await ours_digits.answer(digits_rows[index : index + 1]) for index in range(len(digits_rows))]
            digits_reference = (
                np.concatenate([label for label, _ in answers]),
                np.concatenate([probability for _, probability in answers]),
            )
            differences = {
                "iris": await _verify(iris, iris_rows, iris_reference),
                "digits": await _verify(digits, digits_rows, digits_reference),
            }
            sklearn_digits = estimators["digits"]
            assert sklearn_digits.predict(digits_rows).tolist() == digits_reference[0].tolist()

            for target in targets:  # warm-up: every channel, server and worker
                await _round(target, 8, WARMUP_SECONDS, timed_rows[target.model], None)
            await _measure(iris, CONCURRENCY, timed_rows["iris"])
            await _measure(digits, (DIGITS_CONCURRENCY,), timed_rows["digits"])
            children = {name: len(process_tree(process.pid)) - 1 for name, _, process, _ in servers}
        finally:
            for target in targets:
                if target.channel is not None:
                    await target.channel.close()
            for process in reversed(processes):
                process.stop()
    _report(iris, digits, configs, differences, children, time.perf_counter() - began)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(sys.argv[2], sys.argv[3:]))
    else:
        asyncio.run(main())
