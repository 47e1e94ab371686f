"""An inference replica shut down under load behind the gateway: no caller sees a failure.

Real processes (``python -m services.<name>``): auth, two inference replicas serving the same
repository, and a gateway whose inference target lists both. Clients keep ModelInfer calls going
through the gateway while one replica gets SIGTERM: it reports NOT_SERVING, the gateway's round
robin (client-side health checking) stops choosing it during its shutdown delay, the calls it had
accepted finish within its grace, and it exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from auth.v1 import auth_pb2 as auth_pb
from auth.v1 import auth_pb2_grpc
from inference import grpc_service_pb2 as infer_pb
from inference import grpc_service_pb2_grpc
from inference.v1 import worker_pool_pb2, worker_pool_pb2_grpc

from services.common.errors import Unavailable
from services.gateway.forwarding import upstream_error
from services.inference import codec
from tests.auth.conftest import PASSWORD
from tests.gateway.conftest import Platform, bearer
from tests.gateway.test_gateway import iris_request
from tests.inference.conftest import eventually_async, make_repository
from tests.polling import eventually
from tests.processes import ServiceProcess, start_service
from tests.rpc import details, rpc_error

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SHUTDOWN_DELAY = 3.0  # the replicas' INFERENCE_SHUTDOWN_DELAY_SECONDS
GRACE = 15.0  # the replicas' INFERENCE_GRACE_SECONDS
STRAGGLER = 4.0  # seconds a call sent straight to the stopping replica runs: longer than the delay
FAST_CALLERS = 4  # concurrent callers of the fast model through the gateway
MOVED_AWAY_AFTER = 30  # calls the other replica serves while the stopping one gets none


@dataclass
class Replicas:
    gateway: ServiceProcess
    inference: list[ServiceProcess]


@dataclass
class Load:
    succeeded: int = 0
    failures: list[str] = field(default_factory=list)


def served(replica: ServiceProcess) -> int:
    """ModelInfer calls the replica has answered (its request log)."""
    return sum(
        1 for line in list(replica.lines) if line.get("event") == "rpc.finished" and line["method"] == MODEL_INFER
    )


def events(service: ServiceProcess) -> list[str]:
    return [line.get("event", "") for line in list(service.lines)]


@pytest.fixture
def replicas(tmp_path: Path, demo_models: Path) -> Iterator[Replicas]:
    repository = make_repository(tmp_path, demo_models, ["simple", "sleepy"])
    started: list[ServiceProcess] = []
    try:
        auth = start_service("auth", tmp_path)
        started.append(auth)
        inference = []
        for _ in range(2):
            replica = start_service(
                "inference",
                tmp_path,
                model_repository=str(repository),
                shutdown_delay_seconds=str(SHUTDOWN_DELAY),
                grace_seconds=str(GRACE),
                timeout_seconds="30",  # sleepy's calls may queue behind the straggler for its one worker
            )
            started.append(replica)
            inference.append(replica)
        gateway = start_service(
            "gateway",
            tmp_path,
            auth_target=f"dns:///{auth.address}",
            inference_target="ipv4:" + ",".join(replica.address for replica in inference),
            upstream_check_interval_seconds="0.2",
            upstream_timeout_seconds="30",
        )
        started.append(gateway)
        yield Replicas(gateway, inference)
    finally:
        for service in reversed(started):
            service.stop()


async def keep_calling(
    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub,
    request: infer_pb.ModelInferRequest,
    token: str,
    load: Load,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        try:
            await stub.ModelInfer(request, timeout=30, metadata=bearer(token))
        except grpc.aio.AioRpcError as error:
            load.failures.append(f"{error.code().name}: {error.details()}")
        else:
            load.succeeded += 1


def sleepy(seconds: float) -> infer_pb.ModelInferRequest:
    return codec.make_infer_request("sleepy", {"INPUT0": ("FP32", np.full((1, 1), seconds, np.float32))})


async def test_sigterm_to_a_replica_under_load_fails_no_request(replicas: Replicas) -> None:
    first, second = replicas.inference
    async with (
        grpc.aio.insecure_channel(replicas.gateway.address) as channel,
        grpc.aio.insecure_channel(first.address) as direct,
    ):
        accounts = auth_pb2_grpc.AuthServiceStub(channel)
        await accounts.Register(
            auth_pb.RegisterRequest(username="drain", email="drain@example.com", password=PASSWORD), timeout=10
        )
        login = await accounts.Login(auth_pb.LoginRequest(username="drain", password=PASSWORD), timeout=10)
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        fast = codec.make_infer_request(
            "simple",
            {"INPUT0": ("INT32", np.arange(16, dtype=np.int32)[None]), "INPUT1": ("INT32", np.ones((1, 16), np.int32))},
        )
        load, stop = Load(), asyncio.Event()
        callers = [
            asyncio.ensure_future(keep_calling(stub, request, login.access_token, load, stop))
            for request in [fast] * FAST_CALLERS + [sleepy(1.0)]
        ]
        try:
            # Both replicas take traffic before one of them is told to stop.
            await eventually(lambda: served(first) >= 20 and served(second) >= 20, within=60)
            # A call the stopping replica accepts and is still running when the delay ends: it must finish.
            straggler = grpc_service_pb2_grpc.GRPCInferenceServiceStub(direct).ModelInfer(
                sleepy(STRAGGLER), timeout=STRAGGLER + GRACE
            )
            first.process.send_signal(signal.SIGTERM)
            await eventually(lambda: "server.draining" in events(first), within=10)

            async def only_the_other_replica_serves() -> bool:
                before_first, before_second = served(first), served(second)
                await eventually(lambda: served(second) >= before_second + MOVED_AWAY_AFTER, within=30)
                return served(first) == before_first

            # The gateway moves away while the replica still serves (NOT_SERVING, not a closed port, told it).
            await eventually_async(only_the_other_replica_serves, within=30)
            still_in_its_delay = "server.closing" not in events(first)
            assert still_in_its_delay, "the gateway kept choosing the replica until it stopped accepting"
            assert (await straggler).outputs
            await eventually(lambda: first.process.poll() is not None, within=SHUTDOWN_DELAY + GRACE + 20)
            after_exit = served(second)
            await eventually(lambda: served(second) >= after_exit + 50, within=30)  # the load went on
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert load.failures == [], f"{len(load.failures)} of {load.succeeded + len(load.failures)} failed"
    assert first.process.returncode == 0
    order = events(first)
    assert order.index("server.draining") < order.index("server.closing") < order.index("server.stopped")


# -- one upstream replica, in this process: what the gateway answers while it goes -------------------


async def sleepy_in_flight(platform: Platform) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{platform.inference.port}") as channel:
        answer = await worker_pool_pb2_grpc.WorkerPoolServiceStub(channel).GetWorkerHealth(
            worker_pool_pb2.GetWorkerHealthRequest(model_name="sleepy"), timeout=5
        )
    return any(worker.in_flight for worker in answer.workers)


async def test_a_call_the_upstream_stops_on_is_unavailable_with_retry_info(
    start_platform: Callable[..., Awaitable[Platform]],
) -> None:
    """The upstream's grace ran out with the call unfinished: UNAVAILABLE to retry, never CANCELLED."""
    platform = await start_platform(inference={"grace_seconds": 0.5})
    token = await platform.user_token("cora")
    call = asyncio.ensure_future(platform.infer.ModelInfer(sleepy(4.0), timeout=30, metadata=bearer(token)))
    await eventually_async(lambda: sleepy_in_flight(platform), within=10)
    await platform.inference.stop()
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "inference" in error.details()
    assert "RetryInfo" in details(error)


async def test_while_the_only_upstream_drains_callers_get_unavailable_with_retry_info(
    start_platform: Callable[..., Awaitable[Platform]],
) -> None:
    platform = await start_platform(inference={"shutdown_delay_seconds": 5.0})
    token = await platform.user_token("dora")
    assert (await platform.infer.ModelInfer(iris_request(), timeout=10, metadata=bearer(token))).outputs
    stopping = asyncio.ensure_future(platform.inference.stop())
    try:

        async def refused() -> grpc.aio.AioRpcError | None:
            try:
                await platform.infer.ModelInfer(iris_request(), timeout=10, metadata=bearer(token))
            except grpc.aio.AioRpcError as error:
                return error
            return None

        error = await eventually_async(refused, within=10)
        assert not stopping.done()  # still in its delay: NOT_SERVING told the gateway, not a closed port
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "inference" in error.details()
        assert "RetryInfo" in details(error)
    finally:
        await stopping


def test_upstream_statuses_the_caller_sees() -> None:
    """Only what the upstream answered itself passes unchanged; its going away is UNAVAILABLE to retry."""
    empty = grpc.aio.Metadata()
    cancelled = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, empty, empty, "CANCELLED")
    unhealthy = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, empty, empty, "connections to all backends failing; last error: backend unhealthy"
    )
    for error in (cancelled, unhealthy):
        mapped = upstream_error("inference", error)
        assert isinstance(mapped, Unavailable), error
        assert mapped.retry_after_seconds
        assert "inference" in mapped.message
    answered = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        empty,
        grpc.aio.Metadata(("grpc-status-details-bin", b"\x08\x0e")),
        "model iris is loading",
    )
    assert upstream_error("inference", answered) is answered
