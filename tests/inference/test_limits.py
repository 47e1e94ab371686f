"""What one inference may cost: output shapes estimated from the config, the limits, bounded echoes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.inference import limits, reasons
from services.inference.limits import RequestPolicy
from services.inference.settings import InferenceSettings


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


SUM_IN = [Spec("INPUT0", "FP32", (-1, -1))]
SUM_OUT = [Spec("OUTPUT0", "FP32", (-1,))]


def test_a_variable_output_dimension_follows_the_inputs_at_its_position():
    estimate = limits.output_estimate(SUM_OUT, SUM_IN, {"INPUT0": np.empty((2**24, 0), np.float32)}, batch=None)
    assert estimate.shapes == {"OUTPUT0": (2**24,)}
    assert (estimate.elements, estimate.answer_bytes) == (2**24, 2**26)
    wide = limits.output_estimate(SUM_OUT, SUM_IN, {"INPUT0": np.empty((0, 2**24), np.float32)}, batch=None)
    assert wide.shapes == {"OUTPUT0": (0,)}


def test_the_batch_dimension_and_fixed_dimensions():
    inputs = [Spec("input", "FP32", (-1, 4))]
    outputs = [Spec("label", "INT64", (-1,)), Spec("probabilities", "FP32", (-1, 3)), Spec("text", "BYTES", (-1, -1))]
    arrays = {"input": np.zeros((5, 4), np.float32)}
    estimate = limits.output_estimate(outputs, inputs, arrays, batch=5, returned=["probabilities", "text"])
    assert estimate.shapes == {"label": (5,), "probabilities": (5, 3), "text": (5, 1)}  # no input has -1 there: 1
    assert estimate.elements == 5 + 15 + 5
    assert estimate.answer_bytes == 15 * 4 + 5 * limits.BYTES_ELEMENT_SIZE  # only the returned outputs


def test_check_outputs_refuses_too_many_elements_and_answers_that_cannot_be_sent():
    arrays = {"INPUT0": np.empty((1000, 0), np.float32)}
    estimate = limits.output_estimate(SUM_OUT, SUM_IN, arrays, batch=None)
    limits.check_outputs(estimate, RequestPolicy(max_output_elements=1000, max_answer_bytes=4001), "sum")
    with pytest.raises(ResourceExhausted) as caught:
        limits.check_outputs(estimate, RequestPolicy(max_output_elements=999), "sum")
    assert caught.value.reason == reasons.TOO_MANY_OUTPUT_ELEMENTS
    assert caught.value.retry_after_seconds is None
    with pytest.raises(ResourceExhausted) as caught:
        limits.check_outputs(estimate, RequestPolicy(max_answer_bytes=4000), "sum")
    assert caught.value.reason == reasons.OUTPUT_TOO_LARGE


def test_check_answer_bytes_looks_at_what_the_model_returned():
    outputs = {"a": np.zeros(100, np.float32), "b": np.array([b"x"] * 10, dtype=object)}
    limits.check_answer_bytes(outputs, RequestPolicy(max_answer_bytes=441), "m")
    with pytest.raises(ResourceExhausted) as caught:
        limits.check_answer_bytes(outputs, RequestPolicy(max_answer_bytes=440), "m")
    assert caught.value.reason == reasons.OUTPUT_TOO_LARGE


def test_check_finite_names_the_input():
    limits.check_finite({"ints": np.array([1, 2]), "floats": np.array([1.5, -0.0], np.float32)}, "m")
    with pytest.raises(InvalidArgument) as caught:
        limits.check_finite({"ok": np.ones(2), "bad": np.array([1.0, np.nan])}, "m")
    assert caught.value.reason == reasons.NON_FINITE_INPUT
    assert dict(caught.value.violations) == {"inputs[bad]": "must hold finite numbers only"}


def test_the_policy_comes_from_the_settings():
    settings = InferenceSettings(
        max_request_elements=10, max_output_elements=20, max_message_bytes=4096, always_raw_outputs=True
    )
    assert RequestPolicy.from_settings(settings) == RequestPolicy(10, 20, 4096, True)
    assert RequestPolicy.from_settings(InferenceSettings()) == RequestPolicy()


def test_the_defaults_carry_a_128_mib_fp32_tensor():
    policy = RequestPolicy()
    assert policy.max_request_elements * 4 == policy.max_answer_bytes == InferenceSettings().max_message_bytes


def test_clip_and_check_name():
    assert reasons.clip("short") == "short"
    assert reasons.clip("x" * 100) == "x" * 63 + "…"
    assert len(reasons.clip("é" * 10_000, 10)) == 10
    reasons.check_name("model_name", "m" * reasons.MAX_NAME_CHARS)
    with pytest.raises(InvalidArgument) as caught:
        reasons.check_name("model_name", "m" * 10_000)
    assert caught.value.reason == reasons.NAME_TOO_LONG
    assert "mmm" not in caught.value.message
    assert list(dict(caught.value.violations)) == ["model_name"]


def test_reasons_are_distinct_upper_case_names():
    assert len(set(reasons.ALL)) == len(reasons.ALL)
    for reason in reasons.ALL:
        assert reason == getattr(reasons, reason)
        assert reason.isupper()


async def test_the_element_limit_setting_reaches_the_server(start_inference):
    """INFERENCE_MAX_REQUEST_ELEMENTS is the server's limit, not only the built-in default."""
    import grpc
    import numpy as np

    from services.inference import codec
    from tests.rpc import rpc_error

    inference = await start_inference(["echo"], max_request_elements=8)
    small = codec.make_infer_request("echo", {"INPUT0": ("FP32", np.ones((2, 4), dtype=np.float32))})
    assert (await inference.stub.ModelInfer(small, timeout=10)).outputs
    large = codec.make_infer_request("echo", {"INPUT0": ("FP32", np.ones((3, 4), dtype=np.float32))})
    error = await rpc_error(inference.stub.ModelInfer(large, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
