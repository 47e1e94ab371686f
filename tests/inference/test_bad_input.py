"""Bad requests to the inference service: a clear status naming what is wrong, and nothing else harmed."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as pb

from services.inference import codec
from tests.rpc import rpc_error, violations


@pytest.fixture
async def iris(start_inference):
    return await start_inference(["iris"], max_message_bytes=1 << 20)


def iris_request(array, datatype="FP32", **kwargs):
    return codec.make_infer_request("iris", {"input": (datatype, array)}, **kwargs)


async def test_unknown_model_and_version_are_not_found(iris):
    unknown = codec.make_infer_request("nope", {"input": ("FP32", np.zeros((1, 4), dtype=np.float32))})
    assert (await rpc_error(iris.stub.ModelInfer(unknown, timeout=5))).code() == grpc.StatusCode.NOT_FOUND
    version = iris_request(np.zeros((1, 4), dtype=np.float32), version="7")
    assert (await rpc_error(iris.stub.ModelInfer(version, timeout=5))).code() == grpc.StatusCode.NOT_FOUND
    metadata = await rpc_error(iris.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=5))
    assert metadata.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(iris_request(np.zeros((1, 4), dtype=np.float64), "FP64"), id="wrong datatype"),
        pytest.param(iris_request(np.zeros((1, 5), dtype=np.float32)), id="wrong shape"),
        pytest.param(iris_request(np.zeros((4,), dtype=np.float32)), id="wrong rank"),
    ],
)
async def test_wrong_tensor_is_invalid_argument_naming_it(iris, request_):
    error = await rpc_error(iris.stub.ModelInfer(request_, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in error.details()
    assert violations(error)


async def test_wrong_raw_length_is_invalid_argument(iris):
    request = iris_request(np.zeros((2, 4), dtype=np.float32))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    error = await rpc_error(iris.stub.ModelInfer(request, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in error.details()


async def test_missing_and_unknown_inputs(iris):
    empty = pb.ModelInferRequest(model_name="iris")
    assert (await rpc_error(iris.stub.ModelInfer(empty, timeout=5))).code() == grpc.StatusCode.INVALID_ARGUMENT
    extra = codec.make_infer_request(
        "iris",
        {"input": ("FP32", np.zeros((1, 4), dtype=np.float32)), "other": ("FP32", np.zeros((1,), dtype=np.float32))},
    )
    assert (await rpc_error(iris.stub.ModelInfer(extra, timeout=5))).code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown_output = iris_request(np.zeros((1, 4), dtype=np.float32), outputs=["nope"])
    assert (await rpc_error(iris.stub.ModelInfer(unknown_output, timeout=5))).code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_too_large_is_resource_exhausted(iris):
    huge = iris_request(np.zeros((70_000, 4), dtype=np.float32))  # > 1 MiB limit of this server
    assert (await rpc_error(iris.stub.ModelInfer(huge, timeout=10))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fine = iris_request(np.zeros((1, 4), dtype=np.float32))
    assert (await iris.stub.ModelInfer(fine, timeout=10)).outputs


async def test_empty_model_name_is_invalid_argument(iris):
    error = await rpc_error(iris.stub.ModelInfer(pb.ModelInferRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
