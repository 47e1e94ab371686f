"""Dynamic batching on real worker processes: who rides together, what each caller gets back, and what
a deadline, a cancellation, a raising model or a killed worker does to a batch."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import numpy as np
from inference import grpc_service_pb2 as pb
from inference.v1 import worker_pool_pb2 as admin_pb

from services.inference import codec
from tests.inference.conftest import eventually_async
from tests.rpc import rpc_error


def batchy(values: list[list[float]]) -> pb.ModelInferRequest:
    return codec.make_infer_request("batchy", {"INPUT0": ("FP32", np.array(values, dtype=np.float32))})


async def busy(inference) -> bool:
    [worker] = await inference.workers("batchy")
    return worker.state == admin_pb.WORKER_STATE_BUSY


async def statistics(inference, model: str) -> pb.ModelStatistics:
    answer = await inference.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    [stats] = answer.model_stats
    return stats


async def started_blocker(inference, seconds: float) -> asyncio.Task[pb.ModelInferResponse]:
    """A request that keeps the only worker busy for ``seconds``; returns once it runs."""
    blocker = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[seconds]]), timeout=30))
    await eventually_async(lambda: busy(inference), within=10)
    return blocker


async def queued(inference, count: int) -> None:
    """Wait until ``count`` requests wait for a worker (the pool's queue gauge)."""

    async def waiting() -> bool:
        text = await asyncio.to_thread(scrape, inference)
        return f'inference_queue_depth{{model="batchy"}} {float(count)}' in text

    await eventually_async(waiting, within=10)


def scrape(inference) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{inference.server.metrics_port}/metrics", timeout=5) as answer:
        return answer.read().decode()


async def test_waiting_requests_ride_one_call_and_each_gets_its_own_rows(start_inference):
    inference = await start_inference(["batchy"])
    blocker = await started_blocker(inference, 0.5)
    # Rows of 1, 2 and 3; distinct values so that a row sent back to the wrong caller shows.
    requests = [[[0.001 * (10 * i + j)] for j in range(1 + i % 3)] for i in range(9)]
    calls = [asyncio.ensure_future(inference.stub.ModelInfer(batchy(rows), timeout=30)) for rows in requests]
    await queued(inference, len(calls))
    await blocker
    answers = [codec.response_arrays(answer) for answer in await asyncio.gather(*calls)]
    total = sum(len(rows) for rows in requests)
    for rows, answer in zip(requests, answers, strict=True):
        assert answer["OUTPUT0"].tolist() == np.array(rows, dtype=np.float32).tolist()
        assert answer["OUTPUT1"].tolist() == [total] * len(rows)  # all nine rode one call of 18 rows
    stats = await statistics(inference, "batchy")
    assert stats.inference_count == 1 + total
    assert stats.execution_count == 2
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 1), (total, 1)]


async def test_batched_answers_equal_unbatched_ones_on_a_real_sklearn_model(start_inference):
    inference = await start_inference(["iris"])
    rng = np.random.default_rng(7)
    rows = [rng.uniform(0, 8, size=(1 + i % 3, 4)).astype(np.float32) for i in range(40)]

    def request(values: np.ndarray) -> pb.ModelInferRequest:
        return codec.make_infer_request("iris", {"input": ("FP32", values)})

    alone = [codec.response_arrays(await inference.stub.ModelInfer(request(r), timeout=10)) for r in rows]
    before = await statistics(inference, "iris")
    together = await asyncio.gather(*(inference.stub.ModelInfer(request(r), timeout=30) for r in rows))
    after = await statistics(inference, "iris")
    for one, batched in zip(alone, together, strict=True):
        got = codec.response_arrays(batched)
        assert got["label"].tolist() == one["label"].tolist()
        np.testing.assert_allclose(got["probabilities"], one["probabilities"], rtol=1e-5, atol=1e-7)
    rows_sent = sum(len(r) for r in rows)
    assert after.inference_count - before.inference_count == rows_sent
    assert after.execution_count - before.execution_count < len(rows)  # some rode together


async def test_requests_of_different_shapes_are_never_mixed(start_inference):
    inference = await start_inference(["batchy"])
    blocker = await started_blocker(inference, 0.3)
    narrow = [asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.0, 0.01]]), timeout=30)) for _ in range(3)]
    wide = [asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.0, 0.01, 0.02]]), timeout=30)) for _ in range(2)]
    await queued(inference, 5)
    await blocker
    for call in narrow:
        answer = codec.response_arrays(await call)
        assert answer["OUTPUT0"].tolist() == [[0.0, np.float32(0.01).item()]]
        assert answer["OUTPUT1"].tolist() == [3]  # with the other narrow ones only
    for call in wide:
        answer = codec.response_arrays(await call)
        assert answer["OUTPUT0"].tolist() == np.array([[0.0, 0.01, 0.02]], dtype=np.float32).tolist()
        assert answer["OUTPUT1"].tolist() == [2]


async def test_a_queued_request_past_its_deadline_never_reaches_the_worker(start_inference):
    inference = await start_inference(["batchy"])
    blocker = await started_blocker(inference, 0.6)
    error = await rpc_error(inference.stub.ModelInfer(batchy([[0.0]]), timeout=0.2))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await blocker
    await inference.stub.ModelInfer(batchy([[0.0]]), timeout=10)  # the worker is free again
    stats = await statistics(inference, "batchy")
    assert (stats.inference_count, stats.execution_count) == (2, 2)  # the blocker and the last one only


async def test_a_member_past_its_deadline_is_answered_on_time_and_the_others_get_their_rows(start_inference):
    inference = await start_inference(["batchy"])
    [before] = await inference.workers("batchy")
    blocker = await started_blocker(inference, 0.3)
    hasty = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.8]]), timeout=0.6))
    patient = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.1]]), timeout=30))
    await queued(inference, 2)
    await blocker
    assert (await rpc_error(hasty)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    answer = codec.response_arrays(await patient)
    assert answer["OUTPUT0"].tolist() == [[np.float32(0.1).item()]]
    assert answer["OUTPUT1"].tolist() == [2]  # it rode with the hasty one
    [after] = await inference.workers("batchy")
    assert after.pid == before.pid  # the batch as a whole kept its deadline: nobody was killed


async def test_a_cancelled_member_leaves_its_batch(start_inference):
    inference = await start_inference(["batchy"])
    blocker = await started_blocker(inference, 0.3)
    leaving = inference.stub.ModelInfer(batchy([[0.0]]), timeout=30)
    staying = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.0]]), timeout=30))
    leaving_task = asyncio.ensure_future(leaving)
    await queued(inference, 2)
    leaving.cancel()
    await blocker
    answer = codec.response_arrays(await staying)
    assert answer["OUTPUT1"].tolist() == [1]  # the cancelled one left the queue before its batch went
    assert leaving_task.cancelled() or leaving.cancelled()


async def test_a_raising_model_fails_only_its_batch(start_inference):
    inference = await start_inference(["batchy"])
    [before] = await inference.workers("batchy")
    blocker = await started_blocker(inference, 0.3)
    bad = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[-1.0]]), timeout=30))
    mate = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.0]]), timeout=30))
    await queued(inference, 2)
    assert codec.response_arrays(await blocker)["OUTPUT0"].tolist() == [[np.float32(0.3).item()]]
    for call in (bad, mate):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INTERNAL
    after = codec.response_arrays(await inference.stub.ModelInfer(batchy([[0.0]]), timeout=10))
    assert after["OUTPUT1"].tolist() == [1]
    [worker] = await inference.workers("batchy")
    assert worker.pid == before.pid


async def test_input_the_model_refuses_fails_only_its_own_request(start_inference):
    """One member's bad input must not fail its batch mates: the batch is run again, each member alone."""
    inference = await start_inference(["batchy"])
    blocker = await started_blocker(inference, 0.3)
    bad = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[500.0]]), timeout=30))
    mates = [asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.0], [0.0]]), timeout=30)) for _ in range(2)]
    await queued(inference, 3)
    await blocker
    error = await rpc_error(bad)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "above 100" in error.details()
    for mate in mates:
        answer = codec.response_arrays(await mate)
        assert answer["OUTPUT0"].tolist() == [[0.0], [0.0]]
        assert answer["OUTPUT1"].tolist() == [2, 2]  # each ran on its own the second time
    stats = await statistics(inference, "batchy")
    assert stats.inference_stats.fail.count == 1


async def test_a_worker_killed_mid_batch_fails_only_that_batch_and_is_replaced(start_inference):
    inference = await start_inference(["batchy"], timeout_seconds=60)
    [before] = await inference.workers("batchy")
    blocker = await started_blocker(inference, 0.2)
    riders = [asyncio.ensure_future(inference.stub.ModelInfer(batchy([[20.0]]), timeout=60)) for _ in range(2)]
    await queued(inference, 2)
    await blocker
    await eventually_async(lambda: busy(inference), within=10)  # the riders' batch runs
    later = asyncio.ensure_future(inference.stub.ModelInfer(batchy([[0.0]]), timeout=60))
    await queued(inference, 1)
    os.kill(before.pid, signal.SIGKILL)
    for call in riders:
        assert (await rpc_error(call)).code() == grpc.StatusCode.UNAVAILABLE
    answer = codec.response_arrays(await later)  # waited for the replacement
    assert answer["OUTPUT1"].tolist() == [1]
    [after] = await inference.workers("batchy")
    assert after.pid != before.pid
    assert after.last_error == "exited with code -9"
