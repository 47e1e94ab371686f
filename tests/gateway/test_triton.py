"""tritonclient through the gateway with a bearer token: the python demo models, Triton's extensions
(ModelConfig, ModelStatistics), ModelStreamInfer, a 64 MiB tensor, and the message size limit."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from inference import grpc_service_pb2

from services.gateway.access import Access
from services.gateway.app import INFERENCE_ACCESS, SHARED_MEMORY_METHODS
from services.inference import codec
from tests.gateway.conftest import bearer
from tests.inference.conftest import triton
from tests.inference.demos import PYTHON_DEMOS, check_answer, check_stream, demo_cases, stream_command
from tests.rpc import rpc_error


async def test_tritonclient_through_the_gateway(start_platform):
    platform = await start_platform(models=tuple(PYTHON_DEMOS))
    token = await platform.user_token("tess")
    url, headers = platform.address, {"authorization": f"Bearer {token}"}
    cases = demo_cases(url, headers)
    commands = [
        *(command for command, _ in cases),
        stream_command(url, headers),
        {"url": url, "action": "config", "model": "simple_string", "headers": headers},
        {"url": url, "action": "statistics", "model": "simple", "headers": headers},
        {"url": url, "action": "large", "model": "identity_fp32", "mib": 64, "headers": headers, "timeout": 60},
        {"url": url, "action": "config", "model": "simple"},
        {"url": url, "action": "statistics"},
        {**stream_command(url), "requests": stream_command(url)["requests"][:1]},
    ]
    answers = await asyncio.to_thread(triton, commands)
    for (_, expected), answer in zip(cases, answers, strict=False):
        check_answer(answer, expected)
    stream, config, statistics, large, *anonymous = answers[len(cases) :]
    check_stream(stream)
    assert config["config"]["input"][0] == {"name": "INPUT0", "data_type": "TYPE_STRING", "dims": ["16"]}
    assert config["config"]["max_batch_size"] == 8
    [simple] = statistics["model_stats"]
    assert (simple["execution_count"], simple["inference_count"]) == ("5", "6")  # one batch of 2, a stream of 4
    assert int(simple["inference_stats"]["compute_infer"]["ns"]) > 0
    assert large["correct"], large
    assert large["bytes"] == 64 << 20
    for refused in anonymous[:2]:
        assert refused["error"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert "UNAUTHENTICATED" in anonymous[2]["answers"][0]["error"]["status"]


async def test_a_message_over_the_limit_is_resource_exhausted(start_platform):
    platform = await start_platform(models=("identity_fp32",))
    token = await platform.user_token("lars")
    rows = (129 << 20) // (4 * 4096)  # 129 MiB: over the 128 MiB default of the gateway and the service
    request = codec.make_infer_request("identity_fp32", {"INPUT0": ("FP32", np.zeros((rows, 4096), np.float32))})
    error = await rpc_error(platform.infer.ModelInfer(request, timeout=30, metadata=bearer(token)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_inference_rpc_is_forwarded_with_an_access_rule_or_refused():
    methods = {m.name for m in grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert set(INFERENCE_ACCESS) | set(SHARED_MEMORY_METHODS) == methods
    assert not set(INFERENCE_ACCESS) & set(SHARED_MEMORY_METHODS)
    assert INFERENCE_ACCESS["ModelConfig"] is INFERENCE_ACCESS["ModelStatistics"] is Access.USER
