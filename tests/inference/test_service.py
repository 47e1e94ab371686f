"""The Open Inference Protocol with real models and real workers, driven by the official tritonclient."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from inference import grpc_service_pb2 as pb
from sklearn.datasets import load_digits, load_iris

from services.inference import codec
from tests.inference.conftest import triton
from tests.rpc import rpc_error


async def test_tritonclient_end_to_end_on_iris_and_digits(start_inference):
    inference = await start_inference(["iris", "digits"])
    url = inference.address
    assert (await asyncio.to_thread(triton, {"url": url, "action": "live"})) == {"live": True}
    assert (await asyncio.to_thread(triton, {"url": url, "action": "ready"})) == {"ready": True}
    metadata = await asyncio.to_thread(triton, {"url": url, "action": "metadata", "model": "iris"})
    assert metadata["name"] == "iris"
    assert metadata["versions"] == ["1"]
    assert [i["name"] for i in metadata["inputs"]] == ["input"]
    assert {o["name"] for o in metadata["outputs"]} == {"label", "probabilities"}

    iris = load_iris()
    answer = await asyncio.to_thread(
        triton,
        {
            "url": url,
            "action": "infer",
            "model": "iris",
            "inputs": [{"name": "input", "datatype": "FP32", "data": iris.data.astype("float32").tolist()}],
            "outputs": ["label", "probabilities"],
        },
    )
    labels = np.array(answer["outputs"]["label"]["data"])
    assert (labels == iris.target).mean() > 0.9
    probabilities = np.array(answer["outputs"]["probabilities"]["data"])
    assert probabilities.shape == (150, 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)

    digits = load_digits()
    answer = await asyncio.to_thread(
        triton,
        {
            "url": url,
            "action": "infer",
            "model": "digits",
            "inputs": [{"name": "input", "datatype": "FP32", "data": digits.data[:200].astype("float32").tolist()}],
            "outputs": ["label"],
        },
    )
    assert (np.array(answer["outputs"]["label"]["data"]) == digits.target[:200]).mean() > 0.9


async def test_typed_contents_get_typed_answers(start_inference):
    inference = await start_inference(["iris"])
    request = codec.make_infer_request(
        "iris", {"input": ("FP32", np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))}, raw=False
    )
    response = await inference.stub.ModelInfer(request, timeout=10)
    assert not response.raw_output_contents
    assert codec.response_arrays(response)["label"].tolist() == [0]


async def test_every_datatype_round_trips(start_inference):
    inference = await start_inference(["allkinds"])
    arrays = {
        "BOOL_IN": ("BOOL", np.array([True, False, True])),
        "INT32_IN": ("INT32", np.array([1, -2, 2**31 - 1], dtype=np.int32)),
        "INT64_IN": ("INT64", np.array([2**40, -1, 0], dtype=np.int64)),
        "FP32_IN": ("FP32", np.array([1.5, -0.25, 3e38], dtype=np.float32)),
        "FP64_IN": ("FP64", np.array([1e300, -2.5, 0.0], dtype=np.float64)),
        "BYTES_IN": ("BYTES", np.array([b"", b"\x00\xff", "héllo".encode()], dtype=object)),
    }
    for raw in (True, False):
        response = await inference.stub.ModelInfer(codec.make_infer_request("allkinds", arrays, raw=raw), timeout=10)
        outputs = codec.response_arrays(response)
        for name, (_, array) in arrays.items():
            assert outputs[name.replace("_IN", "_OUT")].tolist() == array.tolist(), (name, raw)


async def test_server_metadata_and_model_ready(start_inference):
    inference = await start_inference(["iris"])
    metadata = await inference.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert metadata.name == "ml-platform-inference"
    assert (await inference.stub.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=5)).ready
    assert not (await inference.stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=5)).ready


async def test_repository_index_reports_a_broken_model_with_its_reason(start_inference):
    inference = await start_inference(["iris", "broken"])
    index = await inference.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    states = {(m.name, m.state) for m in index.models}
    assert ("iris", "READY") in states
    [broken] = [m for m in index.models if m.name == "broken"]
    assert broken.state == "UNAVAILABLE"
    assert broken.reason
    ready_only = await inference.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5)
    assert {m.name for m in ready_only.models} == {"iris"}


async def test_unload_and_load_through_the_repository_api(start_inference):
    inference = await start_inference(["iris"])
    await inference.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="iris"), timeout=30)
    request = codec.make_infer_request("iris", {"input": ("FP32", np.zeros((1, 4), dtype=np.float32))})
    assert (await rpc_error(inference.stub.ModelInfer(request, timeout=5))).code() == grpc.StatusCode.NOT_FOUND
    await inference.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), timeout=60)
    assert (await inference.stub.ModelInfer(request, timeout=10)).outputs
    missing = await rpc_error(
        inference.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"), timeout=10)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_stream_infer_answers_each_request_in_order(start_inference):
    inference = await start_inference(["echo"])

    async def requests():
        for index in range(5):
            if index == 2:
                yield pb.ModelInferRequest(model_name="nope")
            else:
                yield codec.make_infer_request(
                    "echo", {"INPUT0": ("FP32", np.full((1, 2), index, dtype=np.float32))}, request_id=str(index)
                )

    answers = [answer async for answer in inference.stub.ModelStreamInfer(requests(), timeout=30)]
    assert len(answers) == 5
    assert "NOT_FOUND" in answers[2].error_message
    for index in (0, 1, 3, 4):
        assert answers[index].infer_response.id == str(index)
        assert codec.response_arrays(answers[index].infer_response)["OUTPUT0"].tolist() == [[index, index]]
