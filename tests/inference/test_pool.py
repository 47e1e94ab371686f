"""Supervision of real worker processes: crashes, hangs, deadlines, dispatch, health and readiness."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from inference.v1 import worker_pool_pb2 as admin_pb

from services.inference import codec
from tests.inference.conftest import eventually_async
from tests.rpc import rpc_error


def echo_request(value: float = 1.0, model: str = "echo"):
    return codec.make_infer_request(model, {"INPUT0": ("FP32", np.full((1, 1), value, dtype=np.float32))})


def is_worker_process(pid: int) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline")
    return cmdline.exists() and b"services.inference.worker" in cmdline.read_bytes()


async def test_worker_health_shows_real_processes(start_inference):
    inference = await start_inference(["echo", "iris"])
    workers = await inference.workers()
    assert {w.model_name for w in workers} == {"echo", "iris"}
    for worker in workers:
        assert worker.state == admin_pb.WORKER_STATE_READY
        assert worker.pid != os.getpid()
        assert is_worker_process(worker.pid)
        assert worker.uptime_seconds >= 0
        assert worker.rss_bytes >= 0
    only_echo = await inference.workers("echo")
    assert {w.model_name for w in only_echo} == {"echo"}


async def test_sigkilled_worker_is_replaced(start_inference):
    inference = await start_inference(["echo"])
    [before] = await inference.workers("echo")
    os.kill(before.pid, signal.SIGKILL)

    async def replaced():
        [now] = await inference.workers("echo")
        return now if now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY else None

    after = await eventually_async(replaced, within=30)
    assert after.restarts == 1
    assert "exited" in after.last_error
    assert (await inference.stub.ModelInfer(echo_request(3.0), timeout=10)).outputs


async def test_stopped_worker_is_detected_and_replaced(start_inference):
    inference = await start_inference(["echo"])
    [before] = await inference.workers("echo")
    os.kill(before.pid, signal.SIGSTOP)
    try:

        async def replaced():
            [now] = await inference.workers("echo")
            return now if now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY else None

        after = await eventually_async(replaced, within=30)
    finally:
        if is_worker_process(before.pid):
            os.kill(before.pid, signal.SIGKILL)
    assert "health check" in after.last_error
    assert not is_worker_process(before.pid)
    text = await asyncio.to_thread(scrape, inference)
    assert 'inference_worker_restarts_total{model="echo",reason="unresponsive"} 1.0' in text
    assert (await inference.stub.ModelInfer(echo_request(), timeout=10)).outputs


async def test_deadline_kills_the_stuck_worker_and_a_fresh_one_serves_next(start_inference):
    inference = await start_inference(["sleepy"], timeout_seconds=0.5)
    [before] = await inference.workers("sleepy")
    started = time.monotonic()
    error = await rpc_error(inference.stub.ModelInfer(echo_request(30.0, "sleepy"), timeout=10))
    elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.5 + 0.5  # the model would sleep 30 s: the server's deadline cut it short

    async def replaced():
        [now] = await inference.workers("sleepy")
        return now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY

    await eventually_async(replaced, within=30)
    answer = await inference.stub.ModelInfer(echo_request(0.0, "sleepy"), timeout=30)
    assert codec.response_arrays(answer)["OUTPUT0"].tolist() == [[0.0]]
    [after] = await inference.workers("sleepy")
    assert after.pid != before.pid
    assert after.restarts == 1
    assert not is_worker_process(before.pid)


async def test_client_deadline_shorter_than_the_default_is_honoured(start_inference):
    inference = await start_inference(["sleepy"])
    started = time.monotonic()
    error = await rpc_error(inference.stub.ModelInfer(echo_request(30.0, "sleepy"), timeout=0.3))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.3 + 0.5

    async def replaced():
        [now] = await inference.workers("sleepy")
        return now.restarts == 1 and now.state == admin_pb.WORKER_STATE_READY

    await eventually_async(replaced, within=30)


async def test_model_error_is_internal_and_the_worker_lives_on(start_inference):
    inference = await start_inference(["crashy"])
    [before] = await inference.workers("crashy")
    request = codec.make_infer_request("crashy", {"INPUT0": ("INT32", np.array([1], dtype=np.int32))})
    error = await rpc_error(inference.stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in error.details()
    ok = codec.make_infer_request("crashy", {"INPUT0": ("INT32", np.array([7], dtype=np.int32))})
    assert codec.response_arrays(await inference.stub.ModelInfer(ok, timeout=10))["OUTPUT0"].tolist() == [7]
    [after] = await inference.workers("crashy")
    assert after.pid == before.pid


async def test_worker_dying_mid_request_is_unavailable_and_replaced(start_inference):
    inference = await start_inference(["crashy"])
    [before] = await inference.workers("crashy")
    request = codec.make_infer_request("crashy", {"INPUT0": ("INT32", np.array([2], dtype=np.int32))})
    error = await rpc_error(inference.stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE

    async def replaced():
        [now] = await inference.workers("crashy")
        return now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY

    await eventually_async(replaced, within=30)
    ok = codec.make_infer_request("crashy", {"INPUT0": ("INT32", np.array([5], dtype=np.int32))})
    assert (await inference.stub.ModelInfer(ok, timeout=10)).outputs


async def test_concurrent_requests_are_spread_over_workers(start_inference):
    inference = await start_inference(["sleepy2"])
    await asyncio.gather(*(inference.stub.ModelInfer(echo_request(0.2, "sleepy2"), timeout=20) for _ in range(6)))
    served = [w.requests_served for w in await inference.workers("sleepy2")]
    assert len(served) == 2
    assert all(count >= 1 for count in served), served
    assert sum(served) == 6


async def test_full_queue_is_resource_exhausted(start_inference):
    inference = await start_inference(["sleepy"], queue_limit=1)
    calls = [inference.stub.ModelInfer(echo_request(0.5, "sleepy"), timeout=20) for _ in range(4)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert any(not isinstance(r, BaseException) for r in results)
    # The one that queued was counted while it waited, and is no longer.
    assert 'inference_queue_depth{model="sleepy"} 0.0' in await asyncio.to_thread(scrape, inference)


async def test_admin_restart_replaces_a_worker(start_inference):
    inference = await start_inference(["echo"])
    [before] = await inference.workers("echo")
    answer = await inference.admin.RestartWorker(admin_pb.RestartWorkerRequest(worker_id=before.worker_id), timeout=10)
    assert answer.worker.worker_id == before.worker_id

    async def replaced():
        [now] = await inference.workers("echo")
        return now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY

    await eventually_async(replaced, within=30)
    missing = await rpc_error(inference.admin.RestartWorker(admin_pb.RestartWorkerRequest(worker_id="nope"), timeout=5))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_readiness_follows_the_workers(start_inference):
    inference = await start_inference(["echo"], restart_backoff_seconds=2.0)
    assert await inference.readiness() == health_pb2.HealthCheckResponse.SERVING
    [worker] = await inference.workers("echo")
    os.kill(worker.pid, signal.SIGKILL)

    async def not_ready():
        return await inference.readiness() == health_pb2.HealthCheckResponse.NOT_SERVING

    await eventually_async(not_ready, within=10)
    await inference.wait_ready(within=30)


async def test_a_cancelled_request_frees_its_worker(start_inference):
    inference = await start_inference(["sleepy"])
    [before] = await inference.workers("sleepy")
    call = inference.stub.ModelInfer(echo_request(30.0, "sleepy"), timeout=20)

    async def busy():
        [now] = await inference.workers("sleepy")
        return now.state == admin_pb.WORKER_STATE_BUSY

    await eventually_async(busy, within=10)
    call.cancel()

    async def replaced():
        [now] = await inference.workers("sleepy")
        return now.pid not in (0, before.pid) and now.state == admin_pb.WORKER_STATE_READY

    await eventually_async(replaced, within=30)
    [after] = await inference.workers("sleepy")
    assert "cancelled" in after.last_error
    assert (await inference.stub.ModelInfer(echo_request(0.0, "sleepy"), timeout=10)).outputs


def scrape(inference) -> str:
    url = f"http://127.0.0.1:{inference.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def test_request_logs_and_metrics(start_inference, logs):
    inference = await start_inference(["echo"])
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    await inference.stub.ModelInfer(
        echo_request(2.0), timeout=10, metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    )
    [received] = [line for line in logs.events("worker.response_received") if line["trace_id"] == trace_id]
    assert received["latency_ms"] > 0
    assert received["worker_id"] == "echo-v1-0"

    text = await asyncio.to_thread(scrape, inference)
    assert 'inference_requests_total{model="echo",outcome="ok",version="1"} 1.0' in text
    assert 'inference_workers{model="echo",state="ready"} 1.0' in text
    assert 'inference_request_seconds_count{model="echo"} 1.0' in text
