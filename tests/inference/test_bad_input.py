"""Bad requests to the inference service: a clear status naming what is wrong, and nothing else harmed.

Each refusal carries a specific ErrorInfo reason (:mod:`services.inference.reasons`); what can be
checked before the model runs is refused without running it; client strings come back bounded.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from inference import grpc_service_pb2 as pb

from services.inference import codec, reasons
from tests.rpc import details, rpc_error, violations

TRAILER_BUDGET = 4096  # bytes of trailing metadata an error may take; gRPC clients accept 8 KiB by default


@pytest.fixture
async def iris(start_inference):
    return await start_inference(["iris"], max_message_bytes=1 << 20)


def iris_request(array, datatype="FP32", **kwargs):
    return codec.make_infer_request("iris", {"input": (datatype, array)}, **kwargs)


def reason(error: grpc.aio.AioRpcError) -> str:
    return details(error)["ErrorInfo"].reason


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    return sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())


def empty_tensor_request(model: str, name: str, shape: list[int]) -> pb.ModelInferRequest:
    """A request whose one FP32 input has ``shape`` and no data (right for a shape with a 0 in it)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=shape)
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[b""])


def allow_zero_size(model: str):
    def prepare(repository: Path) -> None:
        config_file = repository / model / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config.setdefault("parameters", {})["allow_zero_size"] = True
        config_file.write_text(yaml.safe_dump(config))

    return prepare


async def served(client) -> int:
    return sum(worker.requests_served for worker in await client.workers())


async def test_unknown_model_and_version_are_not_found(iris):
    unknown = codec.make_infer_request("nope", {"input": ("FP32", np.zeros((1, 4), dtype=np.float32))})
    assert (await rpc_error(iris.stub.ModelInfer(unknown, timeout=5))).code() == grpc.StatusCode.NOT_FOUND
    version = iris_request(np.zeros((1, 4), dtype=np.float32), version="7")
    assert (await rpc_error(iris.stub.ModelInfer(version, timeout=5))).code() == grpc.StatusCode.NOT_FOUND
    metadata = await rpc_error(iris.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=5))
    assert metadata.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        pytest.param(
            iris_request(np.zeros((1, 4), dtype=np.float64), "FP64"), reasons.DATATYPE_MISMATCH, id="wrong datatype"
        ),
        pytest.param(iris_request(np.zeros((1, 5), dtype=np.float32)), reasons.SHAPE_MISMATCH, id="wrong shape"),
        pytest.param(iris_request(np.zeros((4,), dtype=np.float32)), reasons.SHAPE_MISMATCH, id="wrong rank"),
        pytest.param(iris_request(np.zeros((300, 4), dtype=np.float32)), reasons.BATCH_TOO_LARGE, id="batch"),
        pytest.param(
            iris_request(np.zeros((1, 4), dtype=np.float32), raw=False, outputs=["label", "label"]),
            reasons.DUPLICATE_OUTPUT,
            id="output twice",
        ),
    ],
)
async def test_wrong_tensor_is_invalid_argument_naming_it(iris, request_, expected):
    error = await rpc_error(iris.stub.ModelInfer(request_, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error)
    assert all(field.startswith(("inputs[", "outputs[")) for field in violations(error))
    assert reason(error) == expected


async def test_wrong_raw_length_is_invalid_argument(iris):
    request = iris_request(np.zeros((2, 4), dtype=np.float32))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    error = await rpc_error(iris.stub.ModelInfer(request, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in error.details()
    assert reason(error) == reasons.RAW_SIZE_MISMATCH
    typed = iris_request(np.zeros((2, 4), dtype=np.float32), raw=False)
    del typed.inputs[0].contents.fp32_contents[-1]
    assert reason(await rpc_error(iris.stub.ModelInfer(typed, timeout=5))) == reasons.CONTENTS_SIZE_MISMATCH


async def test_missing_and_unknown_inputs(iris):
    empty = pb.ModelInferRequest(model_name="iris")
    error = await rpc_error(iris.stub.ModelInfer(empty, timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.MISSING_INPUT)
    extra = codec.make_infer_request(
        "iris",
        {"input": ("FP32", np.zeros((1, 4), dtype=np.float32)), "other": ("FP32", np.zeros((1,), dtype=np.float32))},
    )
    error = await rpc_error(iris.stub.ModelInfer(extra, timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.UNKNOWN_INPUT)
    unknown_output = iris_request(np.zeros((1, 4), dtype=np.float32), outputs=["nope"])
    error = await rpc_error(iris.stub.ModelInfer(unknown_output, timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.UNKNOWN_OUTPUT)


async def test_too_large_is_resource_exhausted(iris):
    huge = iris_request(np.zeros((70_000, 4), dtype=np.float32))  # > 1 MiB limit of this server
    assert (await rpc_error(iris.stub.ModelInfer(huge, timeout=10))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fine = iris_request(np.zeros((1, 4), dtype=np.float32))
    assert (await iris.stub.ModelInfer(fine, timeout=10)).outputs


async def test_empty_model_name_is_invalid_argument(iris):
    error = await rpc_error(iris.stub.ModelInfer(pb.ModelInferRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == reasons.MODEL_NAME_REQUIRED


# --- what models would fail on is refused before they run (issue 13) ----------------------------------


async def test_a_zero_size_batch_is_invalid_argument_before_the_model_runs(iris):
    error = await rpc_error(iris.stub.ModelInfer(iris_request(np.zeros((0, 4), dtype=np.float32)), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == reasons.ZERO_SIZE_DIMENSION
    assert "inputs[input].shape" in violations(error)
    assert await served(iris) == 0
    assert (await iris.stub.ModelInfer(iris_request(np.zeros((1, 4), dtype=np.float32)), timeout=10)).outputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
async def test_non_finite_input_to_a_scikit_learn_model_is_invalid_argument(iris, bad, raw):
    features = np.array([[5.1, 3.5, 1.4, 0.2], [6.0, bad, 4.0, 1.2]], dtype=np.float32)
    error = await rpc_error(iris.stub.ModelInfer(iris_request(features, raw=raw), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == reasons.NON_FINITE_INPUT
    assert "NaN or infinity" in error.details()
    assert await served(iris) == 0  # refused before the worker, so it fails no batch it would have joined


async def test_a_python_model_refusing_its_input_is_invalid_argument(start_inference):
    client = await start_inference(["simple_string"])
    numbers = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    words = numbers.copy()
    words[0, 3] = b"three"
    request = codec.make_infer_request("simple_string", {"INPUT0": ("BYTES", numbers), "INPUT1": ("BYTES", words)})
    error = await rpc_error(client.stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == reasons.MODEL_REJECTED_INPUT
    assert "INPUT1 must hold decimal integers" in error.details()
    fine = codec.make_infer_request("simple_string", {"INPUT0": ("BYTES", numbers), "INPUT1": ("BYTES", numbers)})
    assert codec.response_arrays(await client.stub.ModelInfer(fine, timeout=10))["OUTPUT0"][0, 3] == b"6"
    assert {worker.restarts for worker in await client.workers()} == {0}


async def test_a_model_out_of_memory_is_resource_exhausted_and_the_worker_serves_on(start_inference):
    client = await start_inference(["crashy"])
    request = codec.make_infer_request("crashy", {"INPUT0": ("INT32", np.array([3], dtype=np.int32))})
    error = await rpc_error(client.stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == reasons.MODEL_OUT_OF_MEMORY
    assert "RetryInfo" in details(error)
    fine = codec.make_infer_request("crashy", {"INPUT0": ("INT32", np.array([7], dtype=np.int32))})
    assert codec.response_arrays(await client.stub.ModelInfer(fine, timeout=10))["OUTPUT0"].tolist() == [7]
    assert {worker.restarts for worker in await client.workers()} == {0}


async def test_restart_worker_refuses_a_missing_or_long_worker_id_without_echoing_it(start_inference):
    from inference.v1 import worker_pool_pb2 as admin_pb

    client = await start_inference(["echo"])
    empty = await rpc_error(client.admin.RestartWorker(admin_pb.RestartWorkerRequest(), timeout=5))
    assert (empty.code(), reason(empty)) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.WORKER_ID_REQUIRED)
    long = await rpc_error(client.admin.RestartWorker(admin_pb.RestartWorkerRequest(worker_id="w" * 10_000), timeout=5))
    assert (long.code(), reason(long)) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.NAME_TOO_LONG)
    assert "w" * 100 not in long.details()
    unknown = await rpc_error(client.admin.RestartWorker(admin_pb.RestartWorkerRequest(worker_id="w" * 200), timeout=5))
    assert (unknown.code(), reason(unknown)) == (grpc.StatusCode.NOT_FOUND, reasons.WORKER_NOT_FOUND)
    assert len(unknown.details()) < 120


@pytest.mark.parametrize("rows", [2**24, 2**50])
async def test_zero_size_shapes_to_sum_are_refused(start_inference, rows):
    client = await start_inference(["sum"])
    error = await rpc_error(client.stub.ModelInfer(empty_tensor_request("sum", "INPUT0", [rows, 0]), timeout=10))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, reasons.ZERO_SIZE_DIMENSION)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (2**25, reasons.OUTPUT_TOO_LARGE),
        (2**26, reasons.TOO_MANY_OUTPUT_ELEMENTS),
        (2**50, reasons.TOO_MANY_OUTPUT_ELEMENTS),
    ],
)
async def test_output_amplification_is_refused_before_the_model_runs(start_inference, rows, expected):
    """``sum`` of a [rows, 0] matrix answers ``rows`` zeros: 30 bytes in, rows x 4 bytes out."""
    client = await start_inference(["sum"], prepare=allow_zero_size("sum"))
    error = await rpc_error(client.stub.ModelInfer(empty_tensor_request("sum", "INPUT0", [rows, 0]), timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == expected
    assert "RetryInfo" not in details(error)  # the same request fails the same way
    assert await served(client) == 0
    small = await client.stub.ModelInfer(empty_tensor_request("sum", "INPUT0", [3, 0]), timeout=10)
    assert codec.response_arrays(small)["OUTPUT0"].tolist() == [0.0, 0.0, 0.0]  # allowed: the model takes them


async def test_too_many_input_elements_is_resource_exhausted_before_reading_data(start_inference):
    client = await start_inference(["identity_fp32"])
    request = empty_tensor_request("identity_fp32", "INPUT0", [2**13, 2**13])  # 2**26 elements, no data sent
    error = await rpc_error(client.stub.ModelInfer(request, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == reasons.TOO_MANY_INPUT_ELEMENTS
    assert await served(client) == 0


# --- client strings come back bounded ----------------------------------------------------------------


async def test_a_very_long_model_name_is_refused_without_echoing_it(iris):
    name = "m" * 10_000
    for call in (
        iris.stub.ModelInfer(
            codec.make_infer_request(name, {"input": ("FP32", np.zeros((1, 4), np.float32))}), timeout=5
        ),
        iris.stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=5),
        iris.stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=5),
        iris.stub.ModelInfer(iris_request(np.zeros((1, 4), np.float32), version="9" * 5_000), timeout=5),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(error) == reasons.NAME_TOO_LONG
        assert "256" in error.details()
        assert trailer_bytes(error) < TRAILER_BUDGET


async def test_long_input_output_and_datatype_strings_are_bounded(iris):
    long_input = codec.make_infer_request("iris", {"i" * 4_000: ("FP32", np.zeros((1, 4), np.float32))})
    error = await rpc_error(iris.stub.ModelInfer(long_input, timeout=5))
    assert (reason(error), list(violations(error))) == (reasons.NAME_TOO_LONG, ["inputs[0].name"])
    long_output = iris_request(np.zeros((1, 4), np.float32), outputs=["label", "o" * 4_000])
    error = await rpc_error(iris.stub.ModelInfer(long_output, timeout=5))
    assert (reason(error), list(violations(error))) == (reasons.NAME_TOO_LONG, ["outputs[1].name"])
    for model_name in ("i" * 200, "iris"):  # near the name limit: echoed names are cut in messages
        unknown = codec.make_infer_request(model_name, {"x" * 250: ("FP32", np.zeros((1, 4), np.float32))})
        error = await rpc_error(iris.stub.ModelInfer(unknown, timeout=5))
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert trailer_bytes(error) < TRAILER_BUDGET
    strange = iris_request(np.zeros((1, 4), np.float32))
    strange.inputs[0].datatype = "é" * 3_000
    error = await rpc_error(iris.stub.ModelInfer(strange, timeout=5))
    assert reason(error) == reasons.DATATYPE_MISMATCH
    assert "…" in error.details()
    assert trailer_bytes(error) < TRAILER_BUDGET
