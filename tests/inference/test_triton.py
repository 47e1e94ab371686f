"""Triton's side of the protocol, driven by the official tritonclient: the python demo models (INT32,
BYTES, FP32), the ModelConfig and ModelStatistics extensions, ModelStreamInfer, 64 MiB tensors, and
raw or typed answers (tritonclient reads raw ones only; grpcurl users read typed numbers)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time

import grpc
import numpy as np
from inference import grpc_service_pb2 as pb

from services.inference import codec
from tests.inference.conftest import triton
from tests.inference.demos import PYTHON_DEMOS, check_answer, check_stream, demo_cases, stream_command
from tests.rpc import rpc_error


async def test_tritonclient_runs_every_demo_model_and_a_stream(start_inference):
    inference = await start_inference(PYTHON_DEMOS)
    cases = demo_cases(inference.address)
    answers = await asyncio.to_thread(triton, [command for command, _ in cases] + [stream_command(inference.address)])
    for (command, expected), answer in zip(cases, answers, strict=False):
        assert answer.get("model_version") == "1", command["model"]
        check_answer(answer, expected)
    check_stream(answers[-1])
    metadata = await inference.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert {"model_configuration", "statistics"} <= set(metadata.extensions)


async def test_model_config_in_tritons_layout(start_inference):
    inference = await start_inference(["simple", "sum", "iris"])
    url = inference.address
    simple, total, iris, missing = await asyncio.to_thread(
        triton,
        [{"url": url, "action": "config", "model": name} for name in ("simple", "sum", "iris", "ghost")],
    )
    assert simple == {
        "config": {
            "name": "simple",
            "platform": "python",
            "backend": "python",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": 8,
            "input": [
                {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": ["16"]},
                {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": ["16"]},
            ],
            "output": [
                {"name": "OUTPUT0", "data_type": "TYPE_INT32", "dims": ["16"]},
                {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": ["16"]},
            ],
            "instance_group": [{"name": "simple", "kind": "KIND_CPU", "count": 1}],
            "default_model_filename": "model.py",
            "parameters": {"instances_max": {"string_value": "2"}},
            "dynamic_batching": {"max_queue_delay_microseconds": "100"},
        }
    }
    assert "max_batch_size" not in total["config"]  # 0: JSON leaves defaults out
    assert total["config"]["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": ["-1", "-1"]}]
    assert total["config"]["output"] == [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": ["-1"]}]
    assert total["config"]["parameters"]["timeout_seconds"] == {"string_value": "10"}
    assert (iris["config"]["platform"], iris["config"]["backend"]) == ("sklearn", "sklearn")
    assert iris["config"]["default_model_filename"] == "model.skops"
    assert iris["config"]["output"][0] == {"name": "label", "data_type": "TYPE_INT64"}  # [batch]: no other dims
    assert iris["config"]["max_batch_size"] == 256
    assert iris["config"]["dynamic_batching"] == {"max_queue_delay_microseconds": "100"}
    assert missing["error"]["status"] == "StatusCode.NOT_FOUND"


def simple_request(batch: int, value: int = 1) -> pb.ModelInferRequest:
    array = np.full((batch, 16), value, dtype=np.int32)
    return codec.make_infer_request("simple", {"INPUT0": ("INT32", array), "INPUT1": ("INT32", array)})


async def statistics(inference, name: str = "simple") -> pb.ModelStatistics:
    response = await inference.stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=5)
    [stats] = response.model_stats
    return stats


async def test_statistics_count_real_requests(start_inference):
    inference = await start_inference(["simple", "sum"])
    before = await statistics(inference)
    assert (before.name, before.version, before.inference_count, before.last_inference) == ("simple", "1", 0, 0)
    started_ms = time.time() * 1000
    for batch in (1, 2, 4):
        await inference.stub.ModelInfer(simple_request(batch), timeout=10)
    too_big = await rpc_error(inference.stub.ModelInfer(simple_request(9), timeout=10))
    assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "<= 8" in too_big.details()
    ended_ms = time.time() * 1000

    stats = await statistics(inference)
    infer = stats.inference_stats
    assert stats.inference_count == 7  # batch elements
    assert stats.execution_count == 3
    assert started_ms - 1 <= stats.last_inference <= ended_ms + 1
    assert (infer.success.count, infer.fail.count) == (3, 1)
    for part in (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
        assert part.count == 3
        assert part.ns > 0
    parts = infer.queue.ns + infer.compute_input.ns + infer.compute_infer.ns + infer.compute_output.ns
    assert parts <= infer.success.ns
    assert infer.fail.ns > 0
    # One request at a time: every execution carried one request, of 1, 2 and 4 rows (Triton's batch_stats).
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 1), (2, 1), (4, 1)]
    assert all(b.compute_infer.ns > 0 for b in stats.batch_stats)

    everything = await inference.stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=5)
    assert [(s.name, s.version) for s in everything.model_stats] == [("simple", "1"), ("sum", "1")]
    assert everything.model_stats[1].inference_count == 0
    for request in (pb.ModelStatisticsRequest(name="ghost"), pb.ModelStatisticsRequest(name="simple", version="7")):
        error = await rpc_error(inference.stub.ModelStatistics(request, timeout=5))
        assert error.code() == grpc.StatusCode.NOT_FOUND

    answer = await asyncio.to_thread(triton, {"url": inference.address, "action": "statistics", "model": "simple"})
    [seen] = answer["model_stats"]
    assert seen["inference_count"] == "7"
    assert seen["execution_count"] == "3"
    assert seen["inference_stats"]["success"]["count"] == "3"
    assert seen["inference_stats"]["fail"]["count"] == "1"
    assert int(seen["inference_stats"]["compute_infer"]["ns"]) == infer.compute_infer.ns

    await inference.stub.ModelInfer(simple_request(8), timeout=10)
    after = await statistics(inference)
    assert (after.inference_count, after.execution_count) == (15, 4)
    assert after.inference_stats.compute_infer.ns > infer.compute_infer.ns
    assert after.last_inference >= stats.last_inference


async def test_64_mib_tensors_through_identity_and_sum(start_inference):
    inference = await start_inference(["identity_fp32", "sum"])
    identity, total = await asyncio.to_thread(
        triton,
        [
            {"url": inference.address, "action": "large", "model": model, "mib": 64, "timeout": 60}
            for model in ("identity_fp32", "sum")
        ],
    )
    assert identity["correct"], identity
    assert identity["bytes"] == 64 << 20
    assert total["correct"], total
    stats = await statistics(inference, "identity_fp32")
    assert stats.execution_count == 1
    assert stats.inference_stats.compute_input.ns > 0


# --- raw or typed answers -------------------------------------------------------------------------------


async def test_tritonclient_sending_typed_contents_reads_raw_answers_it_asks_for(start_inference):
    """Clients written for Triton read raw_output_contents whatever they sent; ``raw_output`` asks for them."""
    inference = await start_inference(PYTHON_DEMOS)
    cases = demo_cases(inference.address)
    commands = [
        {
            **command,
            "inputs": [{**spec, "typed": True} for spec in command["inputs"]],
            "parameters": {codec.RAW_OUTPUT_PARAMETER: True},
        }
        for command, _ in cases
    ]
    answers = await asyncio.to_thread(triton, commands)
    for (_, expected), answer in zip(cases, answers, strict=True):
        check_answer(answer, expected)


def grpcurl_infer(grpcurl: str, address: str, request: dict) -> dict:
    done = subprocess.run(
        [grpcurl, "-plaintext", "-d", json.dumps(request), address, "inference.GRPCInferenceService/ModelInfer"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


async def test_grpcurl_reads_numbers_and_can_ask_for_either_form(start_inference, grpcurl):
    inference = await start_inference(["iris"])
    features = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    typed = {
        "model_name": "iris",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [2, 4],
                "contents": {"fp32_contents": np.ravel(features).tolist()},
            }
        ],
        "outputs": [{"name": "label"}],
    }
    raw = {
        "model_name": "iris",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4]}],
        "raw_input_contents": [base64.b64encode(np.array(features, np.float32).tobytes()).decode()],
        "outputs": [{"name": "label"}],
    }

    def asked(request: dict, raw_output: bool) -> dict:
        return {**request, "parameters": {codec.RAW_OUTPUT_PARAMETER: {"bool_param": raw_output}}}

    address = inference.address
    answers = await asyncio.gather(
        *(
            asyncio.to_thread(grpcurl_infer, grpcurl, address, request)
            for request in (typed, asked(raw, False), asked(typed, True), raw)
        )
    )
    for answer in answers[:2]:  # typed contents: numbers in the JSON
        [label] = answer["outputs"]
        assert [int(value) for value in label["contents"]["int64_contents"]] == [0, 2]
        assert "raw_output_contents" not in answer
    for answer in answers[2:]:  # raw: one base64 entry per output
        [label] = answer["outputs"]
        assert "contents" not in label
        [entry] = answer["raw_output_contents"]
        assert np.frombuffer(base64.b64decode(entry), "<i8").tolist() == [0, 2]


async def test_raw_output_must_be_a_bool(start_inference):
    inference = await start_inference(["sum"])
    request = codec.make_infer_request(
        "sum",
        {"INPUT0": ("FP32", np.ones((1, 2), np.float32))},
        parameters={codec.RAW_OUTPUT_PARAMETER: "yes"},
    )
    error = await rpc_error(inference.stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_output" in error.details()
