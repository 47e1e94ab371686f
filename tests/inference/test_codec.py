"""Open Inference Protocol tensors <-> numpy: round trips, wire layout, and every validation error."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
from inference import grpc_service_pb2 as pb

from services.common.errors import InvalidArgument, ResourceExhausted
from services.inference import codec, reasons

Input = pb.ModelInferRequest.InferInputTensor


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


SAMPLES = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[1.5, -np.inf, 65504.0], [np.nan, -0.0, 6e-8]], dtype=np.float16),
    "BF16": np.array([[0x3F80, 0xC000, 0x7F80]], dtype=np.uint16),  # 1.0, -2.0, inf as bfloat16 bits
    "FP32": np.array([[1.5, -0.25, 3e38], [np.nan, np.inf, 1e-45]], dtype=np.float32),
    "FP64": np.array([[1e300, -2.5, np.nan]], dtype=np.float64),
    "BYTES": np.array([[b"", b"\x00\xff\x00", "héllo".encode(), b"\x00\x00\x00\x00"]], dtype=object),
}
TYPED = [datatype for datatype in SAMPLES if datatype not in codec.RAW_ONLY]


def spec_for(name: str, datatype: str, array: np.ndarray) -> Spec:
    return Spec(name, datatype, (-1, *array.shape[1:]))


def over_the_wire(message):
    return type(message).FromString(message.SerializeToString())


def assert_same(actual: np.ndarray, expected: np.ndarray, datatype: str) -> None:
    assert actual.dtype == codec.DATATYPES[datatype]
    assert actual.shape == expected.shape
    if datatype == "BYTES":
        assert actual.tolist() == expected.tolist()
    else:
        np.testing.assert_array_equal(actual, expected)


def rejected(request: pb.ModelInferRequest, specs: list[Spec], reason: str | None = None, **kwargs) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        codec.decode_request(request, specs, **kwargs)
    if reason is not None:
        assert caught.value.reason == reason
    return caught.value


def assert_names(error: InvalidArgument, name: str, field: str) -> None:
    assert repr(name) in error.message
    assert field in dict(error.violations), error.violations


# --- tables -----------------------------------------------------------------------------------------


def test_datatype_tables_follow_the_protocol():
    sizes = dict(
        zip(
            ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"],
            [1, 1, 2, 4, 8, 1, 2, 4, 8],
            strict=True,
        )
    )
    sizes |= {"FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8}
    assert dict(codec.ELEMENT_SIZES) == sizes
    assert set(codec.DATATYPES) == {*sizes, "BYTES"}
    assert codec.DATATYPES["BYTES"] == np.dtype(object)
    assert codec.DATATYPES["BF16"] == np.dtype(np.uint16)
    assert set(codec.CONTENTS_FIELDS) == set(codec.DATATYPES) - codec.RAW_ONLY


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_request_round_trip(datatype, raw):
    array = SAMPLES[datatype]
    request = over_the_wire(codec.make_infer_request("m", {"x": (datatype, array)}, raw=raw))
    goes_raw = raw or datatype in codec.RAW_ONLY
    assert len(request.raw_input_contents) == (1 if goes_raw else 0)
    assert request.inputs[0].HasField("contents") is not goes_raw

    decoded = codec.decode_request(request, [spec_for("x", datatype, array)])

    assert decoded.raw is goes_raw
    assert_same(decoded.inputs["x"], array, datatype)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_response_round_trip(datatype, raw):
    array = SAMPLES[datatype]
    response = over_the_wire(
        codec.encode_response(
            model_name="m",
            model_version="3",
            request_id="req-1",
            outputs={"y": array},
            specs=[spec_for("y", datatype, array)],
            requested=[],
            raw=raw,
        )
    )
    goes_raw = raw or datatype in codec.RAW_ONLY
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert len(response.raw_output_contents) == (1 if goes_raw else 0)
    [tensor] = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("y", datatype, list(array.shape))
    assert_same(codec.response_arrays(response)["y"], array, datatype)


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_response_uses_the_field_of_the_datatype(datatype):
    array = SAMPLES[datatype]
    response = codec.encode_response(
        model_name="m",
        model_version="1",
        request_id="",
        outputs={"y": array},
        specs=[spec_for("y", datatype, array)],
        requested=[],
        raw=False,
    )
    [(field, values)] = [(descriptor.name, values) for descriptor, values in response.outputs[0].contents.ListFields()]
    assert field == codec.CONTENTS_FIELDS[datatype]
    assert len(values) == array.size


def test_raw_layout_is_little_endian_row_major():
    big_endian = np.array([[1, 2], [3, 4]], dtype=">i4")
    fortran = np.asfortranarray(np.array([[1, 2], [3, 4]], dtype=np.int16))
    request = codec.make_infer_request(
        "m", {"a": ("INT32", big_endian), "b": ("INT16", fortran), "c": ("BOOL", np.array([True, False]))}
    )
    assert request.raw_input_contents[0] == b"\x01\0\0\0\x02\0\0\0\x03\0\0\0\x04\0\0\0"
    assert request.raw_input_contents[1] == b"\x01\0\x02\0\x03\0\x04\0"
    assert request.raw_input_contents[2] == b"\x01\x00"


def test_bytes_raw_layout_and_str_elements():
    array = np.array(["ab", "", "é"], dtype=object)
    request = codec.make_infer_request("m", {"s": ("BYTES", array)})
    assert request.raw_input_contents[0] == b"\x02\0\0\0ab" + b"\0\0\0\0" + b"\x02\0\0\0\xc3\xa9"
    decoded = codec.decode_request(request, [Spec("s", "BYTES", (-1,))])
    assert decoded.inputs["s"].tolist() == [b"ab", b"", "é".encode()]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_bytes_edge_cases_round_trip(raw):
    cases = {
        "empty_elements": np.array([[b"", b""], [b"", b""]], dtype=object),
        "binary": np.array([bytes(range(256)), b"\xff" * 1000], dtype=object),
        "no_elements": np.empty((0, 3), dtype=object),
        "fixed_width": np.array([b"a\x00b", b"cd"]),  # numpy S dtype
        "unicode": np.array(["x", "ÿ"]),  # numpy U dtype
    }
    for name, array in cases.items():
        request = over_the_wire(codec.make_infer_request("m", {name: ("BYTES", array)}, raw=raw))
        decoded = codec.decode_request(request, [Spec(name, "BYTES", (-1,) * array.ndim)]).inputs[name]
        expected = [item.encode() if isinstance(item, str) else item for item in array.reshape(-1).tolist()]
        assert decoded.shape == array.shape, name
        assert decoded.reshape(-1).tolist() == expected, name


def test_scalar_and_zero_sized_tensors():
    scalar = np.array(7, dtype=np.int64)
    empty = np.zeros((0, 4), dtype=np.float32)
    request = codec.make_infer_request("m", {"s": ("INT64", scalar), "e": ("FP32", empty)})
    decoded = codec.decode_request(request, [Spec("s", "INT64", ()), Spec("e", "FP32", (-1, 4))])
    assert decoded.inputs["s"].shape == ()
    assert int(decoded.inputs["s"]) == 7
    assert decoded.inputs["e"].shape == (0, 4)


def test_raw_entries_belong_to_inputs_without_typed_contents_in_order():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = np.array([b"x", b""], dtype=object)
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[
            Input(name="C", datatype="BYTES", shape=[2]),
            Input(name="B", datatype="INT32", shape=[3], contents=pb.InferTensorContents(int_contents=[7, 8, 9])),
            Input(name="A", datatype="FP32", shape=[2, 3]),
        ],
        raw_input_contents=[b"\x01\0\0\0x\0\0\0\0", a.tobytes()],
    )
    specs = [Spec("A", "FP32", (-1, 3)), Spec("B", "INT32", (3,)), Spec("C", "BYTES", (-1,))]

    decoded = codec.decode_request(over_the_wire(request), specs)

    assert decoded.raw
    np.testing.assert_array_equal(decoded.inputs["A"], a)
    assert decoded.inputs["B"].tolist() == [7, 8, 9]
    assert decoded.inputs["C"].tolist() == c.tolist()


def test_decoded_request_carries_id_outputs_and_parameters():
    request = codec.make_infer_request(
        "m",
        {"x": ("INT32", np.array([1], dtype=np.int32))},
        version="2",
        outputs=["b", "a"],
        request_id="abc",
        parameters={"flag": True, "timeout": 1500, "priority": 2**64 - 1, "ratio": 0.5, "user": "ada"},
    )
    request.parameters["unset"].CopyFrom(pb.InferParameter())
    decoded = codec.decode_request(over_the_wire(request), [Spec("x", "INT32", (1,))])
    assert decoded.id == "abc"
    assert decoded.requested_outputs == ["b", "a"]
    assert decoded.parameters == {"flag": True, "timeout": 1500, "priority": 2**64 - 1, "ratio": 0.5, "user": "ada"}
    assert isinstance(decoded.parameters["flag"], bool)
    assert request.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert request.model_version == "2"


def test_raw_decode_does_not_copy():
    array = np.arange(1024, dtype=np.float64).reshape(32, 32)
    request = codec.make_infer_request("m", {"x": ("FP64", array)})
    decoded = codec.decode_request(request, [Spec("x", "FP64", (-1, 32))]).inputs["x"]

    assert not decoded.flags.owndata
    assert not decoded.flags.writeable
    root = decoded.base
    while isinstance(root, np.ndarray):
        root = root.base
    assert isinstance(root, bytes)
    assert np.shares_memory(decoded, np.frombuffer(root, dtype=np.uint8))
    np.testing.assert_array_equal(decoded, array)


def test_64_mib_fp32_tensor_round_trips():
    array = np.arange(16 * 1024 * 1024, dtype=np.float32).reshape(4096, 4096)
    request = over_the_wire(codec.make_infer_request("big", {"x": ("FP32", array)}))
    assert len(request.raw_input_contents[0]) == 64 * 1024 * 1024
    decoded = codec.decode_request(request, [Spec("x", "FP32", (-1, 4096))]).inputs["x"]
    assert np.array_equal(decoded, array)

    response = over_the_wire(
        codec.encode_response(
            model_name="big",
            model_version="1",
            request_id="",
            outputs={"y": decoded},
            specs=[Spec("y", "FP32", (-1, -1))],
            requested=[],
            raw=True,
        )
    )
    assert np.array_equal(codec.response_arrays(response)["y"], array)


# --- validation errors ------------------------------------------------------------------------------

FP32_SPEC = [Spec("A", "FP32", (-1, 3))]


def fp32_request(shape=(2, 3), **kwargs) -> pb.ModelInferRequest:
    return codec.make_infer_request("m", {"A": ("FP32", np.zeros(shape, dtype=np.float32))}, **kwargs)


def test_unknown_input():
    request = codec.make_infer_request(
        "m", {"A": ("FP32", np.zeros((1, 3), dtype=np.float32)), "Z": ("FP32", np.zeros(1, dtype=np.float32))}
    )
    assert_names(rejected(request, FP32_SPEC, reasons.UNKNOWN_INPUT), "Z", "inputs[Z]")


def test_missing_input():
    request = fp32_request()
    error = rejected(request, [*FP32_SPEC, Spec("B", "INT64", (1,))], reasons.MISSING_INPUT)
    assert_names(error, "B", "inputs[B]")


def test_duplicate_input():
    request = fp32_request()
    request.inputs.append(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    assert_names(rejected(request, FP32_SPEC, reasons.DUPLICATE_INPUT), "A", "inputs[A]")


def test_datatype_differs_from_the_declared_one():
    request = codec.make_infer_request("m", {"A": ("FP64", np.zeros((2, 3)))})
    error = rejected(request, FP32_SPEC, reasons.DATATYPE_MISMATCH)
    assert_names(error, "A", "inputs[A].datatype")
    assert "FP32" in error.message


@pytest.mark.parametrize(
    ("shape", "declared"),
    [
        pytest.param((2, 3), (-1, 3, 1), id="rank"),
        pytest.param((2, 4), (-1, 3), id="fixed dimension"),
        pytest.param((3,), (), id="scalar expected"),
    ],
)
def test_shape_not_matching_the_declared_one(shape, declared):
    error = rejected(fp32_request(shape), [Spec("A", "FP32", declared)], reasons.SHAPE_MISMATCH)
    assert_names(error, "A", "inputs[A].shape")


def test_variable_dimensions_match_any_size_including_zero():
    for shape in [(0, 3), (1, 3), (1000, 3)]:
        assert codec.decode_request(fp32_request(shape), FP32_SPEC).inputs["A"].shape == shape


def test_negative_dimension():
    request = fp32_request((0, 3))
    request.inputs[0].shape[0] = -2
    assert_names(rejected(request, FP32_SPEC, reasons.NEGATIVE_DIMENSION), "A", "inputs[A].shape")


def test_element_count_overflow():
    request = fp32_request((0, 3))
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([2**62, 2**62, 3])
    error = rejected(request, [Spec("A", "FP32", (-1, -1, 3))], reasons.SHAPE_OVERFLOW)
    assert_names(error, "A", "inputs[A].shape")
    assert "overflow" in error.message


def test_more_elements_than_the_limit_is_resource_exhausted():
    with pytest.raises(ResourceExhausted) as caught:
        codec.decode_request(fp32_request((4, 3)), FP32_SPEC, max_elements=11)
    assert "'A'" in caught.value.message
    assert caught.value.reason == reasons.TOO_MANY_INPUT_ELEMENTS
    assert codec.decode_request(fp32_request((4, 3)), FP32_SPEC, max_elements=12).inputs["A"].shape == (4, 3)


def test_the_element_limit_counts_every_input_before_reading_data():
    request = codec.make_infer_request(
        "m", {"A": ("FP32", np.zeros((2, 3), np.float32)), "B": ("FP32", np.zeros((2, 3), np.float32))}
    )
    specs = [Spec("A", "FP32", (-1, 3)), Spec("B", "FP32", (-1, 3))]
    with pytest.raises(ResourceExhausted, match="'B' brings the request to 12 input elements"):
        codec.decode_request(request, specs, max_elements=11)
    no_data = pb.ModelInferRequest(model_name="m", inputs=[Input(name="A", datatype="FP32", shape=[2**40, 3])])
    with pytest.raises(ResourceExhausted):
        codec.decode_request(no_data, FP32_SPEC, max_elements=2**30)


def test_zero_size_dimensions_can_be_refused():
    assert codec.decode_request(fp32_request((0, 3)), FP32_SPEC).inputs["A"].shape == (0, 3)
    error = rejected(fp32_request((0, 3)), FP32_SPEC, reasons.ZERO_SIZE_DIMENSION, allow_zero_size=False)
    assert_names(error, "A", "inputs[A].shape")
    assert codec.decode_request(fp32_request((1, 3)), FP32_SPEC, allow_zero_size=False).inputs["A"].shape == (1, 3)


def test_long_names_are_refused_by_position_and_echoed_strings_are_cut():
    long_input = codec.make_infer_request("m", {"A" * 300: ("FP32", np.zeros((1, 3), np.float32))})
    error = rejected(long_input, FP32_SPEC, reasons.NAME_TOO_LONG)
    assert list(dict(error.violations)) == ["inputs[0].name"]
    assert "AAAA" not in error.message
    long_output = fp32_request(outputs=["y", "o" * 300])
    error = rejected(long_output, FP32_SPEC, reasons.NAME_TOO_LONG)
    assert list(dict(error.violations)) == ["outputs[1].name"]
    with pytest.raises(InvalidArgument) as caught:
        codec.check_requested_outputs(["o" * 300], [Spec("y", "FP32", (1,))])
    assert caught.value.reason == reasons.NAME_TOO_LONG
    unknown = codec.make_infer_request("m", {"Z" * 256: ("FP32", np.zeros((1, 3), np.float32))})
    error = rejected(unknown, FP32_SPEC, reasons.UNKNOWN_INPUT)
    assert "Z" * 63 + "…" in error.message
    assert "Z" * 64 not in error.message
    assert f"inputs[{'Z' * 256}]" in dict(error.violations)  # the field names it exactly
    odd_datatype = fp32_request()
    odd_datatype.inputs[0].datatype = "X" * 10_000
    assert len(rejected(odd_datatype, FP32_SPEC, reasons.DATATYPE_MISMATCH).message) < 200


@pytest.mark.parametrize(
    ("raw_inputs", "always_raw", "parameter", "expected"),
    [
        (True, False, None, True),
        (False, False, None, False),
        (False, True, None, True),
        (True, False, False, False),
        (False, False, True, True),
        (True, True, False, False),
    ],
)
def test_raw_outputs_follow_the_parameter_else_the_inputs_or_the_server(raw_inputs, always_raw, parameter, expected):
    parameters = {} if parameter is None else {codec.RAW_OUTPUT_PARAMETER: parameter}
    decoded = codec.decode_request(fp32_request(raw=raw_inputs, parameters=parameters), FP32_SPEC)
    assert codec.raw_outputs(decoded, always_raw) is expected


@pytest.mark.parametrize("value", [1, "true", 1.0])
def test_raw_output_parameter_must_be_a_bool(value):
    decoded = codec.decode_request(fp32_request(parameters={codec.RAW_OUTPUT_PARAMETER: value}), FP32_SPEC)
    with pytest.raises(InvalidArgument) as caught:
        codec.raw_outputs(decoded, False)
    assert caught.value.reason == reasons.INVALID_PARAMETER


@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
def test_raw_byte_length_must_match_the_shape(delta):
    request = fp32_request((2, 3))
    data = request.raw_input_contents[0]
    request.raw_input_contents[0] = data[:delta] if delta < 0 else data + b"\0" * delta
    error = rejected(request, FP32_SPEC)
    assert_names(error, "A", "inputs[A].raw_input_contents")
    assert "24" in error.message


def test_more_raw_entries_than_raw_inputs():
    request = fp32_request()
    request.raw_input_contents.append(b"\0" * 24)
    request.inputs.append(
        Input(name="B", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[1]))
    )
    request.inputs.append(
        Input(name="C", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[1]))
    )
    specs = [*FP32_SPEC, Spec("B", "INT32", (1,)), Spec("C", "INT32", (1,))]
    error = rejected(request, specs, reasons.RAW_COUNT_MISMATCH)
    assert "raw_input_contents" in dict(error.violations)
    assert "2 entries" in error.message


def test_fewer_raw_entries_than_raw_inputs():
    request = codec.make_infer_request(
        "m", {"A": ("FP32", np.zeros((1, 3), dtype=np.float32)), "B": ("INT32", np.zeros(1, dtype=np.int32))}
    )
    del request.raw_input_contents[1]
    error = rejected(request, [*FP32_SPEC, Spec("B", "INT32", (1,))], reasons.MISSING_DATA)
    assert_names(error, "B", "inputs[B]")


def test_input_with_both_typed_contents_and_raw_data():
    request = codec.make_infer_request(
        "m", {"A": ("FP32", np.zeros((1, 3), dtype=np.float32)), "B": ("INT32", np.zeros(1, dtype=np.int32))}
    )
    request.inputs[1].contents.int_contents.append(0)
    error = rejected(request, [*FP32_SPEC, Spec("B", "INT32", (1,))], reasons.RAW_AND_TYPED_CONTENTS)
    assert_names(error, "B", "inputs[B].contents")


def test_input_without_any_data():
    request = pb.ModelInferRequest(model_name="m", inputs=[Input(name="A", datatype="FP32", shape=[1, 3])])
    assert_names(rejected(request, FP32_SPEC, reasons.MISSING_DATA), "A", "inputs[A].contents")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        pytest.param(b"\x01\0\0\0abcd", "ends after 1 of 2", id="too few elements"),
        pytest.param(b"\x01\0\0\0a\x00\0\0\0\x01\0\0\0b", "trailing", id="trailing element"),
        pytest.param(b"\x01\0\0\0a\0\0\0\0\xff", "trailing", id="trailing bytes"),
        pytest.param(b"\x03\0\0\0abc\x05\0", "ends after 1 of 2", id="truncated length prefix"),
        pytest.param(b"\x01\0\0\0a\x05\0\0\0abc", "element 1 is 5 bytes", id="element past the end"),
        pytest.param(b"\x01\0\0", "too few", id="shorter than the prefixes"),
    ],
)
def test_malformed_raw_bytes(raw, problem):
    request = pb.ModelInferRequest(
        model_name="m", inputs=[Input(name="S", datatype="BYTES", shape=[2])], raw_input_contents=[raw]
    )
    error = rejected(request, [Spec("S", "BYTES", (2,))], reasons.RAW_SIZE_MISMATCH)
    assert_names(error, "S", "inputs[S].raw_input_contents")
    assert problem in error.message


def test_raw_bool_must_be_zero_or_one():
    request = pb.ModelInferRequest(
        model_name="m", inputs=[Input(name="F", datatype="BOOL", shape=[2])], raw_input_contents=[b"\x01\x02"]
    )
    error = rejected(request, [Spec("F", "BOOL", (2,))], reasons.VALUE_OUT_OF_RANGE)
    assert_names(error, "F", "inputs[F].raw_input_contents")


def test_typed_count_must_match_the_shape():
    request = fp32_request((2, 3), raw=False)
    request.inputs[0].contents.fp32_contents.append(1.0)
    error = rejected(request, FP32_SPEC, reasons.CONTENTS_SIZE_MISMATCH)
    assert_names(error, "A", "inputs[A].contents")
    assert "7 elements, expected 6" in error.message


def test_typed_contents_in_the_wrong_field():
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[
            Input(name="A", datatype="FP32", shape=[1, 3], contents=pb.InferTensorContents(int_contents=[1, 2, 3]))
        ],
    )
    error = rejected(request, FP32_SPEC, reasons.CONTENTS_FIELD_MISMATCH)
    assert_names(error, "A", "inputs[A].contents")
    assert "fp32_contents" in error.message


@pytest.mark.parametrize(
    ("datatype", "contents"),
    [
        ("INT8", pb.InferTensorContents(int_contents=[1, 128])),
        ("INT8", pb.InferTensorContents(int_contents=[-129, 0])),
        ("INT16", pb.InferTensorContents(int_contents=[-40000, 0])),
        ("UINT8", pb.InferTensorContents(uint_contents=[256, 0])),
        ("UINT16", pb.InferTensorContents(uint_contents=[0, 65536])),
    ],
)
def test_typed_values_out_of_range(datatype, contents):
    request = pb.ModelInferRequest(
        model_name="m", inputs=[Input(name="N", datatype=datatype, shape=[2], contents=contents)]
    )
    error = rejected(request, [Spec("N", datatype, (2,))], reasons.VALUE_OUT_OF_RANGE)
    assert_names(error, "N", "inputs[N].contents")
    assert "range" in error.message


@pytest.mark.parametrize("datatype", sorted(codec.RAW_ONLY))
def test_half_precision_cannot_be_typed(datatype):
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[Input(name="H", datatype=datatype, shape=[1], contents=pb.InferTensorContents(fp32_contents=[1.0]))],
    )
    error = rejected(request, [Spec("H", datatype, (1,))], reasons.CONTENTS_FIELD_MISMATCH)
    assert_names(error, "H", "inputs[H].contents")
    assert "raw" in error.message


# --- requested outputs ------------------------------------------------------------------------------

OUTPUT_SPECS = [Spec("a", "FP32", (-1,)), Spec("b", "INT64", (-1,)), Spec("c", "BYTES", (-1,))]
MODEL_OUTPUTS = {
    "c": np.array([b"x"], dtype=object),
    "a": np.array([1.0], dtype=np.float32),
    "b": np.array([2], dtype=np.int64),
    "undeclared": np.array([0]),
}


def test_check_requested_outputs():
    codec.check_requested_outputs([], OUTPUT_SPECS)
    codec.check_requested_outputs(["c", "a"], OUTPUT_SPECS)
    with pytest.raises(InvalidArgument) as unknown:
        codec.check_requested_outputs(["a", "z"], OUTPUT_SPECS)
    assert_names(unknown.value, "z", "outputs[z]")
    with pytest.raises(InvalidArgument) as twice:
        codec.check_requested_outputs(["a", "a"], OUTPUT_SPECS)
    assert_names(twice.value, "a", "outputs[a]")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [([], ["a", "b", "c"]), (["b"], ["b"]), (["c", "a"], ["a", "c"])],
)
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_outputs_follow_the_declared_order_filtered_by_the_request(requested, expected, raw):
    response = codec.encode_response(
        model_name="m",
        model_version="1",
        request_id="",
        outputs=MODEL_OUTPUTS,
        specs=OUTPUT_SPECS,
        requested=requested,
        raw=raw,
    )
    assert [tensor.name for tensor in response.outputs] == expected
    assert len(response.raw_output_contents) == (len(expected) if raw else 0)
    arrays = codec.response_arrays(response)
    for name in expected:
        assert arrays[name].tolist() == MODEL_OUTPUTS[name].tolist()


def test_a_half_precision_output_makes_the_whole_response_raw():
    specs = [Spec("a", "FP32", (-1,)), Spec("h", "FP16", (-1,))]
    outputs = {"a": np.array([1.0], dtype=np.float32), "h": np.array([0.5], dtype=np.float16)}
    response = codec.encode_response(
        model_name="m", model_version="1", request_id="", outputs=outputs, specs=specs, requested=[], raw=False
    )
    assert len(response.raw_output_contents) == 2
    assert codec.response_arrays(response)["h"].tolist() == [0.5]


def test_outputs_are_cast_to_the_declared_datatype():
    specs = [Spec("f", "FP32", (-1,)), Spec("i", "INT8", (-1,)), Spec("b", "BF16", (-1,)), Spec("s", "BYTES", (-1,))]
    outputs = {
        "f": np.array([0.5, 2.0]),  # float64
        "i": np.array([1, -3]),  # int64
        "b": np.array([1.0, -2.0], dtype=np.float32),  # floats become bfloat16 bits
        "s": ["yes", "no"],  # a list of str
    }
    response = codec.encode_response(
        model_name="m", model_version="1", request_id="", outputs=outputs, specs=specs, requested=[], raw=True
    )
    assert [len(raw) for raw in response.raw_output_contents] == [8, 2, 4, 4 + 3 + 4 + 2]
    arrays = codec.response_arrays(response)
    assert arrays["f"].dtype == np.float32
    assert arrays["i"].dtype == np.int8
    assert arrays["b"].tolist() == [0x3F80, 0xC000]
    assert arrays["s"].tolist() == [b"yes", b"no"]


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        pytest.param({"a": np.array([1.0])}, "no output 'b'", id="missing"),
        pytest.param({"a": np.array([1.0]), "b": np.array([[1]])}, "shape [1, 1]", id="wrong rank"),
        pytest.param({"a": np.array([1.0]), "b": np.array([1, 2, 3])}, "shape [3]", id="wrong fixed dimension"),
        pytest.param({"a": np.array(["x"]), "b": np.array([1, 2])}, "<U1", id="strings for FP32"),
    ],
)
def test_model_output_errors(outputs, problem):
    specs = [Spec("a", "FP32", (-1,)), Spec("b", "INT64", (2,))]
    with pytest.raises(codec.ModelOutputError, match=re.escape(problem)):
        codec.encode_response(
            model_name="m", model_version="1", request_id="", outputs=outputs, specs=specs, requested=[], raw=True
        )


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize(
    "value", [np.array([1, 2]), np.array([b"ok", 3], dtype=object)], ids=["numeric array", "int element"]
)
def test_bytes_output_needs_bytes_or_str(value, raw):
    with pytest.raises(codec.ModelOutputError, match="'s'"):
        codec.encode_response(
            model_name="m",
            model_version="1",
            request_id="",
            outputs={"s": value},
            specs=[Spec("s", "BYTES", (-1,))],
            requested=[],
            raw=raw,
        )


# --- client helpers and BF16 ------------------------------------------------------------------------


def test_make_infer_request_refuses_what_it_cannot_send():
    with pytest.raises(ValueError, match="unknown datatype"):
        codec.make_infer_request("m", {"x": ("FLOAT", np.zeros(1))})
    with pytest.raises(ValueError, match="BYTES"):
        codec.make_infer_request("m", {"x": ("BYTES", np.zeros(1))})


def test_response_arrays_refuses_a_raw_count_mismatch():
    response = codec.encode_response(
        model_name="m",
        model_version="1",
        request_id="",
        outputs=MODEL_OUTPUTS,
        specs=OUTPUT_SPECS,
        requested=[],
        raw=True,
    )
    del response.raw_output_contents[2]
    with pytest.raises(ValueError, match="2 raw_output_contents entries for 3 outputs"):
        codec.response_arrays(response)


def test_bf16_conversion_rounds_to_nearest_even():
    values = np.array([1.0, -2.0, 1 + 2**-8, 1 + 3 * 2**-8, np.inf, 3.4e38, np.nan], dtype=np.float32)
    bits = codec.float32_to_bf16_bits(values)
    assert bits.dtype == np.uint16
    assert bits[:6].tolist() == [0x3F80, 0xC000, 0x3F80, 0x3F82, 0x7F80, 0x7F80]
    assert math.isnan(codec.bf16_bits_to_float32(bits)[6])
    assert codec.bf16_bits_to_float32(bits[:4]).tolist() == [1.0, -2.0, 1.0, 1 + 2**-6]
    assert codec.float32_to_bf16_bits(np.float32(-0.0)).tolist() == 0x8000


def test_batch_size_is_the_shared_first_dimension_within_the_limit():
    rows = {"a": np.zeros((3, 16)), "b": np.zeros((3, 2))}
    assert codec.batch_size(rows, max_batch_size=0) == 1  # the model does not batch
    assert codec.batch_size(rows, max_batch_size=8) == 3
    assert codec.batch_size(rows, max_batch_size=3) == 3
    with pytest.raises(InvalidArgument, match=r"must be <= 2 for simple, got 3") as too_big:
        codec.batch_size(rows, max_batch_size=2, model_name="simple")
    assert ("inputs[a].shape", "first dimension must be <= 2") in too_big.value.violations
    assert too_big.value.reason == reasons.BATCH_TOO_LARGE
    with pytest.raises(InvalidArgument, match="same batch size") as mixed:
        codec.batch_size({"a": np.zeros((3, 16)), "b": np.zeros((2, 16))}, max_batch_size=8)
    assert {field for field, _ in mixed.value.violations} == {"inputs[a].shape", "inputs[b].shape"}
    assert mixed.value.reason == reasons.BATCH_SIZE_MISMATCH
