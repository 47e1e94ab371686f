"""Model lifecycle on real workers: versions, hot reload under load, failed loads, autoscaling."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import yaml
from inference import grpc_service_pb2 as pb

from services.inference import codec
from tests.inference.conftest import eventually_async
from tests.inference.test_pool import echo_request
from tests.rpc import rpc_error


def iris_request(version: str = ""):
    return codec.make_infer_request(
        "iris", {"input": ("FP32", np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))}, version=version
    )


def add_version(model_dir: Path, source: str, version: str) -> None:
    """Publish a version the way an operator should: copy under a hidden name, then rename."""
    staging = model_dir / f".staging-{version}"
    shutil.copytree(model_dir / source, staging)
    staging.rename(model_dir / version)


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))


class Load:
    """Several clients calling ModelInfer in a loop; counts answers by version and every failure."""

    def __init__(self, stub, clients: int = 4):
        self._stub = stub
        self._clients = clients
        self.versions: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        while not self._stop.is_set():
            try:
                answer = await self._stub.ModelInfer(iris_request(), timeout=10)
                self.versions[answer.model_version] = self.versions.get(answer.model_version, 0) + 1
            except grpc.aio.AioRpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()}")

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(self._clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_new_version_dropped_in_is_served_with_no_failed_request(start_inference):
    inference = await start_inference(["iris"], repository_poll_seconds=0.2)
    load = Load(inference.stub)
    load.start()
    try:
        await eventually_async(lambda: asyncio.sleep(0, result=load.versions.get("1", 0) > 20), within=30)
        await asyncio.to_thread(add_version, inference.repository / "iris", "1", "2")
        await eventually_async(lambda: asyncio.sleep(0, result=load.versions.get("2", 0) > 20), within=60)
    finally:
        await load.stop()
    assert load.failures == []

    async def only_version_2():
        index = await inference.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
        return [(m.version, m.state) for m in index.models if m.name == "iris"] == [("2", "READY")]

    await eventually_async(only_version_2, within=30)
    metadata = await inference.stub.ModelMetadata(pb.ModelMetadataRequest(name="iris"), timeout=5)
    assert list(metadata.versions) == ["2"]


async def test_repository_model_load_switches_versions_with_no_failed_request(start_inference):
    inference = await start_inference(["iris"])
    load = Load(inference.stub)
    load.start()
    try:
        await asyncio.to_thread(add_version, inference.repository / "iris", "1", "2")
        await inference.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), timeout=60)
        await eventually_async(lambda: asyncio.sleep(0, result=load.versions.get("2", 0) > 20), within=30)
    finally:
        await load.stop()
    assert load.failures == []
    assert load.versions.get("1", 0) > 0


async def test_a_broken_new_version_leaves_the_old_one_serving(start_inference):
    inference = await start_inference(["iris"])
    await asyncio.to_thread(add_version, inference.repository / "iris", "1", "2")
    (inference.repository / "iris" / "2" / "model.skops").write_bytes(b"this is not a model")
    error = await rpc_error(
        inference.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), timeout=60)
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to load" in error.details()
    answer = await inference.stub.ModelInfer(iris_request(), timeout=10)
    assert answer.model_version == "1"
    index = await inference.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    rows = {(m.version, m.state): m.reason for m in index.models if m.name == "iris"}
    assert ("1", "READY") in rows
    assert rows[("2", "UNAVAILABLE")]


async def test_latest_two_keeps_two_versions_addressable(start_inference):
    def two_versions(repository: Path) -> None:
        add_version(repository / "iris", "1", "2")
        edit_config(repository / "iris", version_policy={"latest": 2})

    inference = await start_inference(["iris"], prepare=two_versions)
    for version in ("1", "2"):
        assert (await inference.stub.ModelInfer(iris_request(version), timeout=10)).model_version == version
    assert (await inference.stub.ModelInfer(iris_request(), timeout=10)).model_version == "2"
    metadata = await inference.stub.ModelMetadata(pb.ModelMetadataRequest(name="iris"), timeout=5)
    assert list(metadata.versions) == ["1", "2"]


async def test_a_model_removed_from_the_repository_is_unloaded(start_inference):
    inference = await start_inference(["iris", "echo"], repository_poll_seconds=0.2)
    await asyncio.to_thread(shutil.rmtree, inference.repository / "echo")

    async def gone():
        try:
            await inference.stub.ModelInfer(echo_request(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually_async(gone, within=30)
    assert (await inference.stub.ModelInfer(iris_request(), timeout=10)).outputs


async def test_a_burst_grows_the_pool_and_idleness_shrinks_it(start_inference):
    inference = await start_inference(
        ["sleepy"],
        prepare=lambda repository: edit_config(repository / "sleepy", instances={"min": 1, "max": 3}),
        autoscale_interval_seconds=0.2,
        worker_cpu_budget=4,  # sleepy sleeps: not CPU-bound
        scale_cooldown_seconds=0.2,
        scale_down_idle_seconds=1.5,
        timeout_seconds=30.0,  # the burst queues for a while: let it
    )
    burst = [inference.stub.ModelInfer(echo_request(0.4, "sleepy"), timeout=30) for _ in range(24)]
    sizes = []

    async def grown():
        sizes.append(len(await inference.workers("sleepy")))
        return sizes[-1] >= 2

    results = await asyncio.gather(eventually_async(grown, within=30), *burst)
    assert all(result.outputs for result in results[1:])

    async def shrunk():
        return len(await inference.workers("sleepy")) == 1

    await eventually_async(shrunk, within=30)
