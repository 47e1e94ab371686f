"""Triton's system shared-memory extension: tritonclient's utilities end to end on `simple` and `identity_fp32`,
every hostile region answered with a clear status, and no descriptor, mapping or /dev/shm file left behind.

Objects in /dev/shm are made by the tests (or by tritonclient in its own process) under a prefix of their own, so
counting the files under that prefix, and the service's own segments (``mlp-<this pid>-``: the server runs in this
process), shows what the service left behind even while other suites use /dev/shm.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as pb

from services.inference import codec
from services.inference.shared_memory import Caller, SharedMemoryPolicy, SharedMemoryRegistry
from tests.inference.regions import (
    SHM,
    Objects,
    descriptors,
    held,
    in_region,
    mappings,
    reason,
    register,
    service_segments,
    simple_in_regions,
    simple_inputs,
    triton_shm,
)
from tests.rpc import rpc_error, violations

LOCAL = Caller("127.0.0.1")


@pytest.fixture
def objects() -> Iterator[Objects]:
    made = Objects()
    yield made
    made.cleanup()


async def test_tritonclient_shared_memory_end_to_end_on_simple_and_identity(start_inference, objects):
    before = service_segments()
    inference = await start_inference(["simple", "identity_fp32"], shared_memory_enabled=True)
    metadata = await inference.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert "system_shared_memory" in metadata.extensions
    url, prefix = inference.address, objects.prefix
    simple, identity = await asyncio.to_thread(
        triton_shm,
        [
            {"url": url, "action": "roundtrip", "model": "simple", "prefix": prefix, "rows": 3},
            {"url": url, "action": "roundtrip", "model": "identity_fp32", "prefix": prefix, "rows": 2048, "cols": 1024},
        ],
    )
    for answer, outputs in ((simple, ["OUTPUT0", "OUTPUT1"]), (identity, ["OUTPUT0"])):
        assert answer["cuda_status"] == {}
        assert set(answer["status"]["regions"]) == {"in", "out"}
        assert answer["status"]["regions"]["in"]["key"] == f"/{prefix}in"
        assert set(answer["status_in"]["regions"]) == {"in"}
        for case in ("all_in_regions", "last_output_raw", "stream"):
            assert answer[case]["correct"] == dict.fromkeys(outputs, True), (case, answer[case])
        # Outputs in a region: their parameters echoed, an empty raw entry each; the raw one carries its bytes.
        size = 3 * 16 * 4 if answer is simple else 8 << 20
        assert answer["all_in_regions"]["raw_lengths"] == [0] * len(outputs)
        assert answer["all_in_regions"]["parameters"]["OUTPUT0"] == {
            "shared_memory_region": "out",
            "shared_memory_byte_size": size,
        }
        assert answer["last_output_raw"]["raw_lengths"][-1] == size
        assert answer["last_output_raw"]["parameters"][outputs[-1]] == {}
        assert set(answer["status_after_one"]["regions"]) == {"out"}
        assert answer["status_after_all"] == {}
        assert answer["mapped_after"] == []
    assert simple["all_in_regions"]["parameters"]["OUTPUT1"] == {
        "shared_memory_region": "out",
        "shared_memory_byte_size": 192,
        "shared_memory_offset": 192,
    }
    assert objects.files() == []  # tritonclient destroyed its objects; the service made none
    assert held(prefix) == []  # and holds no descriptor or mapping of them
    await inference.server.stop()
    assert service_segments() == before  # nor any segment of its own


async def test_disabled_by_default_and_cuda_answers_as_triton_without_gpus(start_inference, objects):
    inference = await start_inference(["simple"])
    metadata = await inference.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert "system_shared_memory" not in metadata.extensions
    key = objects.make("in", 128)
    stub = inference.stub
    for call in (
        stub.SystemSharedMemoryRegister(register("in", key, 128), timeout=5),
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5),
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5),
        stub.ModelInfer(simple_in_regions(), timeout=5),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason(error) == "SHARED_MEMORY_DISABLED"
        assert "INFERENCE_SHARED_MEMORY_ENABLED" in error.details()
    status = await stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(), timeout=5)
    assert dict(status.regions) == {}
    await stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(), timeout=5)
    await stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name="gpu0"), timeout=5)
    error = await rpc_error(stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name="gpu0"), timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.NOT_FOUND, "SHARED_MEMORY_REGION_NOT_FOUND")
    request = pb.CudaSharedMemoryRegisterRequest(name="gpu0", raw_handle=b"x" * 64, device_id=0, byte_size=64)
    error = await rpc_error(stub.CudaSharedMemoryRegister(request, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "CUDA_SHARED_MEMORY_UNSUPPORTED"
    assert "CUDA shared memory is not supported on this server" in error.details()
    # A plain request still works, and nothing was opened.
    left, right = simple_inputs()
    plain = codec.make_infer_request("simple", {"INPUT0": ("INT32", left), "INPUT1": ("INT32", right)})
    answer = codec.response_arrays(await stub.ModelInfer(plain, timeout=10))
    np.testing.assert_array_equal(answer["OUTPUT0"], left + right)
    assert held(objects.prefix) == []


BAD_KEYS = {
    "": "SHARED_MEMORY_KEY_INVALID",
    "/": "SHARED_MEMORY_KEY_INVALID",
    "../x": "SHARED_MEMORY_KEY_INVALID",
    "/../etc/passwd": "SHARED_MEMORY_KEY_INVALID",
    "/a/b": "SHARED_MEMORY_KEY_INVALID",
    "..": "SHARED_MEMORY_KEY_INVALID",
    "/.": "SHARED_MEMORY_KEY_INVALID",
    "/nul\x00byte": "SHARED_MEMORY_KEY_INVALID",
    "/" + "k" * 256: "SHARED_MEMORY_KEY_INVALID",
    f"/mlp-{os.getpid()}-0-in": "SHARED_MEMORY_KEY_NOT_ALLOWED",  # the service's own worker segments
    "mlp-1-0-arena": "SHARED_MEMORY_KEY_NOT_ALLOWED",
}


async def test_keys_that_are_not_one_allowed_name_are_refused(start_inference):
    inference = await start_inference([], shared_memory_enabled=True)
    for key, expected in BAD_KEYS.items():
        error = await rpc_error(inference.stub.SystemSharedMemoryRegister(register("r", key, 64), timeout=5))
        assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, expected), key
        assert "key" in violations(error), key
        assert len(error.details()) < 400, key  # the key is clipped, not echoed whole


async def test_hostile_objects_and_ranges_at_registration(start_inference, objects):
    inference = await start_inference(["identity_fp32"], shared_memory_enabled=True)
    stub = inference.stub
    matrix = np.ones((256, 1024), np.float32)  # 1 MiB: through the workers' segments
    await stub.ModelInfer(codec.make_infer_request("identity_fp32", {"INPUT0": ("FP32", matrix)}), timeout=10)

    async def refused(request: pb.SystemSharedMemoryRegisterRequest) -> tuple[grpc.StatusCode, str]:
        error = await rpc_error(stub.SystemSharedMemoryRegister(request, timeout=5))
        return error.code(), reason(error)

    assert await refused(register("r", f"/{objects.prefix}missing", 64)) == (
        grpc.StatusCode.NOT_FOUND,
        "SHARED_MEMORY_OBJECT_NOT_FOUND",
    )
    secret = objects.path(objects.make("secret", 64, b"not yours"))
    link = objects.path(f"/{objects.prefix}link")
    link.symlink_to(secret)
    (SHM / f"{objects.prefix}dir").mkdir()
    alias = objects.path(f"/{objects.prefix}alias")
    os.link(secret, alias)
    for name in ("link", "dir", "alias"):
        code = await refused(register("r", f"/{objects.prefix}{name}", 8))
        assert code == (grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_OBJECT_UNUSABLE"), name
    alias.unlink()

    key = objects.make("data", 4096)
    out_of_range = (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_OUT_OF_RANGE")
    assert await refused(register("r", key, 4097)) == out_of_range
    assert await refused(register("r", key, 1, offset=4096)) == out_of_range
    assert await refused(register("r", key, 8, offset=2**64 - 1)) == out_of_range  # no wrap-around
    too_many = (grpc.StatusCode.RESOURCE_EXHAUSTED, "SHARED_MEMORY_TOO_MANY_BYTES")
    assert await refused(register("r", key, 2**64 - 1)) == too_many  # before the object is opened
    assert await refused(register("r", key, 0)) == out_of_range
    assert await refused(register("", key, 64)) == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_NAME_REQUIRED")
    assert await refused(register("n" * 300, key, 64)) == (grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG")

    await stub.SystemSharedMemoryRegister(register("r", key, 4096), timeout=5)
    assert await refused(register("r", key, 64)) == (grpc.StatusCode.ALREADY_EXISTS, "SHARED_MEMORY_REGION_EXISTS")
    error = await rpc_error(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="ghost"), timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.NOT_FOUND, "SHARED_MEMORY_REGION_NOT_FOUND")
    await stub.SystemSharedMemoryUnregister(
        pb.SystemSharedMemoryUnregisterRequest(name="ghost"), timeout=5
    )  # as Triton

    # Through a proxy (the gateway sets x-forwarded-for): not a client on this host.
    forwarded = (("x-forwarded-for", "203.0.113.9"),)
    error = await rpc_error(stub.SystemSharedMemoryRegister(register("p", key, 64), timeout=5, metadata=forwarded))
    assert (error.code(), reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_NOT_LOCAL")
    assert "same host as the inference service" in error.details()

    # The service's own segments, when it has some in /dev/shm (its workers' arenas), are refused by name too.
    for segment in service_segments():
        assert await refused(register("own", f"/{segment}", 1)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "SHARED_MEMORY_KEY_NOT_ALLOWED",
        )
    status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5)
    assert list(status.regions) == ["r"]
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5)
    assert held(objects.prefix) == []


async def test_the_key_prefix_and_the_per_client_bounds(start_inference, objects):
    inference = await start_inference(
        [],
        shared_memory_enabled=True,
        shared_memory_key_prefix=f"/{objects.prefix}ok-",
        shared_memory_max_regions_per_client=2,
        shared_memory_max_bytes_per_client=1000,
    )
    stub = inference.stub
    outside = objects.make("other", 64)
    error = await rpc_error(stub.SystemSharedMemoryRegister(register("x", outside, 64), timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_KEY_NOT_ALLOWED")
    assert f"{objects.prefix}ok-" in error.details()

    key = objects.make("ok-a", 4096)
    await stub.SystemSharedMemoryRegister(register("a", key, 600), timeout=5)
    error = await rpc_error(stub.SystemSharedMemoryRegister(register("b", key, 401, offset=600), timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SHARED_MEMORY_TOO_MANY_BYTES")
    await stub.SystemSharedMemoryRegister(register("b", key, 400, offset=600), timeout=5)
    error = await rpc_error(stub.SystemSharedMemoryRegister(register("c", key, 1), timeout=5))
    assert (error.code(), reason(error)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SHARED_MEMORY_TOO_MANY_REGIONS")
    assert len(descriptors(objects.prefix)) == 2  # one per region
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"), timeout=5)
    await stub.SystemSharedMemoryRegister(register("c", key, 600), timeout=5)  # room again
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5)
    assert held(objects.prefix) == []


async def test_hostile_tensors_in_regions(start_inference, objects):
    inference = await start_inference(["simple"], shared_memory_enabled=True)
    stub = inference.stub
    left, right = simple_inputs()
    in_key = objects.make("in", 128, left.tobytes() + right.tobytes())
    out_key = objects.make("out", 128, b"\xee" * 128)
    await stub.SystemSharedMemoryRegister(register("in", in_key, 128), timeout=5)
    await stub.SystemSharedMemoryRegister(register("out", out_key, 100), timeout=5)  # too small for both outputs

    async def refused(request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        error = await rpc_error(stub.ModelInfer(request, timeout=10))
        return error.code(), reason(error), violations(error)

    code, why, fields = await refused(simple_in_regions())
    assert (code, why) == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_OUT_OF_RANGE")  # OUTPUT1 at 64 + 64 > 100
    assert "outputs[OUTPUT1].parameters[shared_memory_byte_size]" in fields

    ghost = simple_in_regions(region="ghost", out=None)
    assert (await refused(ghost))[:2] == (grpc.StatusCode.NOT_FOUND, "SHARED_MEMORY_REGION_NOT_FOUND")

    past = simple_in_regions(out=None)
    past.inputs[1].parameters["shared_memory_offset"].int64_param = 129
    code, why, fields = await refused(past)
    assert (code, why) == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_OUT_OF_RANGE")
    assert "inputs[INPUT1].parameters[shared_memory_offset]" in fields
    past.inputs[1].parameters["shared_memory_offset"].int64_param = 65  # 65 + 64 > 128
    code, why, fields = await refused(past)
    assert "inputs[INPUT1].parameters[shared_memory_byte_size]" in fields
    past.inputs[1].parameters["shared_memory_offset"].int64_param = 2**63 - 1
    assert (await refused(past))[1] == "SHARED_MEMORY_OUT_OF_RANGE"

    short = simple_in_regions(out=None)
    short.inputs[0].parameters["shared_memory_byte_size"].int64_param = 60
    code, why, fields = await refused(short)
    assert (code, why) == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_SIZE_MISMATCH")
    assert fields == {"inputs[INPUT0].parameters[shared_memory_byte_size]": "must be 64"}

    for broken in range(4):
        request = simple_in_regions(out=None)
        parameters = request.inputs[0].parameters
        if broken == 0:
            parameters["shared_memory_byte_size"].string_param = "64"
        elif broken == 1:
            parameters["shared_memory_offset"].int64_param = -1
        elif broken == 2:
            del parameters["shared_memory_byte_size"]
        else:
            del parameters["shared_memory_region"]
        assert (await refused(request))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_PARAMETER_INVALID")
    typed_too = simple_in_regions(out=None)
    typed_too.inputs[0].contents.int_contents.extend([1] * 16)
    assert (await refused(typed_too))[1] == "SHARED_MEMORY_PARAMETER_INVALID"

    forwarded = (("x-forwarded-for", "203.0.113.9"),)
    error = await rpc_error(stub.ModelInfer(simple_in_regions(out=None), timeout=10, metadata=forwarded))
    assert (error.code(), reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_NOT_LOCAL")

    # An output larger than its bytes is refused after the model ran, and nothing is written.
    too_small = simple_in_regions(out=None)
    in_region(too_small.outputs[0], "out", 60)
    code, why, fields = await refused(too_small)
    assert (code, why) == (grpc.StatusCode.INVALID_ARGUMENT, "SHARED_MEMORY_OUTPUT_TOO_LARGE")
    assert fields == {"outputs[OUTPUT0].parameters[shared_memory_byte_size]": "must be at least 64"}
    assert objects.path(out_key).read_bytes() == b"\xee" * 128

    # The inputs from the region, one output into it and one raw: right, and the region holds the answer.
    mixed = simple_in_regions(out=None)
    in_region(mixed.outputs[1], "out", 64, 36)
    response = await stub.ModelInfer(mixed, timeout=10)
    assert [len(raw) for raw in response.raw_output_contents] == [64, 0]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.int32), (left + right).ravel())
    written = objects.path(out_key).read_bytes()
    np.testing.assert_array_equal(np.frombuffer(written[36:100], np.int32), (left - right).ravel())
    assert written[:36] == b"\xee" * 36

    # Over ModelStreamInfer a refusal is that request's error_message; the stream goes on.
    async def requests() -> Any:
        yield simple_in_regions(region="ghost", out=None)
        yield mixed

    answers = [answer async for answer in stub.ModelStreamInfer(requests(), timeout=10)]
    assert "NOT_FOUND" in answers[0].error_message
    assert not answers[1].error_message
    assert answers[1].infer_response.outputs[1].parameters["shared_memory_region"].string_param == "out"


async def test_an_object_shrunk_after_registering_fails_its_request_not_the_service(start_inference, objects):
    inference = await start_inference(["simple"], shared_memory_enabled=True)
    stub = inference.stub
    left, right = simple_inputs()
    in_key = objects.make("in", 128, left.tobytes() + right.tobytes())
    out_key = objects.make("out", 128)
    await stub.SystemSharedMemoryRegister(register("in", in_key, 128), timeout=5)
    await stub.SystemSharedMemoryRegister(register("out", out_key, 128), timeout=5)
    os.truncate(objects.path(in_key), 100)  # INPUT1 (64..128) now ends past the object's end
    error = await rpc_error(stub.ModelInfer(simple_in_regions(out=None), timeout=10))
    assert (error.code(), reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_OBJECT_UNUSABLE")
    os.truncate(objects.path(in_key), 128)
    objects.path(in_key).write_bytes(left.tobytes() + right.tobytes())
    os.truncate(objects.path(out_key), 10)
    error = await rpc_error(stub.ModelInfer(simple_in_regions(), timeout=10))
    assert (error.code(), reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_OBJECT_UNUSABLE")
    assert objects.path(out_key).stat().st_size == 10  # not written, not grown
    os.truncate(objects.path(out_key), 128)
    await stub.ModelInfer(simple_in_regions(), timeout=10)  # serves on
    written = np.frombuffer(objects.path(out_key).read_bytes(), np.int32)
    np.testing.assert_array_equal(written, np.concatenate([(left + right).ravel(), (left - right).ravel()]))


async def test_regions_are_closed_at_unregister_and_at_shutdown(start_inference, objects):
    inference = await start_inference([], shared_memory_enabled=True)
    keys = [objects.make(name, 256) for name in ("a", "b", "c")]
    for name, key in zip("abc", keys, strict=True):
        await inference.stub.SystemSharedMemoryRegister(register(name, key, 256), timeout=5)
    assert len(descriptors(objects.prefix)) == 3
    assert mappings(objects.prefix) == []  # read and written with pread/pwrite, never mapped
    await inference.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"), timeout=5)
    assert len(descriptors(objects.prefix)) == 2
    await inference.server.stop()  # b and c still registered
    assert held(objects.prefix) == []
    assert len(objects.files()) == 3  # the client's objects are the client's to remove


def test_a_region_unregistered_during_a_request_stays_open_until_the_request_ends(objects):
    registry = SharedMemoryRegistry(SharedMemoryPolicy(enabled=True))
    key = objects.make("in", 128, bytes(range(128)))
    registry.register(LOCAL, "in", key, 0, 128)
    request = simple_in_regions(out=None)
    with registry.bind(request, lambda: LOCAL) as regions:
        registry.unregister(LOCAL, "")
        assert registry.status(LOCAL, "") == []
        assert registry.open_regions == 1  # still leased by this request
        assert regions.read("INPUT1", "INT32", 16) == bytes(range(64, 128))
        registry.register(LOCAL, "in", key, 0, 64)  # the name is free again meanwhile
    assert registry.open_regions == 1  # the old region closed with the request; the new one stays
    registry.close()
    assert registry.open_regions == 0
    assert held(objects.prefix) == []
