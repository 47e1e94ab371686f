"""Our model configs and statistics in Triton's message layouts."""

from __future__ import annotations

import pytest
from google.protobuf.json_format import MessageToDict
from inference import model_config_pb2 as config_pb

from services.inference import converters
from services.inference.repository import DEFAULT_PLATFORMS, NUMPY_DTYPES, parse_config
from services.inference.runtimes import RUNTIMES
from services.inference.stats import InferenceStatistics, RequestTimer

CONFIG = {
    "runtime": "python",
    "max_batch_size": 8,
    "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1, 16]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP16", "shape": [-1, 3, -1]}],
    "instances": {"min": 2, "max": 4},
    "timeout_seconds": 1.5,
    "version_policy": {"specific": [3, 1]},
    "parameters": {"class": "Doubler", "module": "doubler.py"},
}


@pytest.mark.parametrize("datatype", sorted(NUMPY_DTYPES))
def test_every_datatype_has_its_triton_type(datatype):
    expected = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    assert config_pb.DataType.Name(converters.data_type(datatype)) == expected


def test_a_batched_python_model():
    config = converters.model_config(parse_config("doubler", CONFIG))
    assert MessageToDict(config, preserving_proto_field_name=True) == {
        "name": "doubler",
        "platform": "python",
        "backend": "python",
        "version_policy": {"specific": {"versions": ["1", "3"]}},
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_STRING", "dims": ["16"]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP16", "dims": ["3", "-1"]}],
        "instance_group": [{"name": "doubler", "kind": "KIND_CPU", "count": 2}],
        "default_model_filename": "doubler.py",
        "parameters": {
            "class": {"string_value": "Doubler"},
            "module": {"string_value": "doubler.py"},
            "instances_max": {"string_value": "4"},
            "timeout_seconds": {"string_value": "1.5"},
        },
    }


@pytest.mark.parametrize(
    ("policy", "expected"),
    [({"latest": 2}, {"latest": {"num_versions": 2}}), ({"all": True}, {"all": {}})],
)
def test_version_policies(policy, expected):
    unbatched = {**CONFIG, "max_batch_size": 0, "version_policy": policy, "parameters": {}}
    config = converters.model_config(parse_config("m", unbatched))
    assert MessageToDict(config.version_policy, preserving_proto_field_name=True) == expected
    assert list(config.input[0].dims) == [-1, 16]  # no batch dimension to leave out
    assert config.default_model_filename == "model.py"


def test_every_runtime_has_a_backend_and_its_artifact():
    assert set(converters.BACKENDS) == set(converters.ARTIFACTS) == set(RUNTIMES) == set(DEFAULT_PLATFORMS)
    from services.inference.runtimes import onnx, python, sklearn

    assert converters.ARTIFACTS["onnx"] == onnx.ARTIFACT
    assert converters.ARTIFACTS["sklearn"] == sklearn.ARTIFACT
    assert converters.ARTIFACTS["python"] == python.DEFAULT_MODULE


def test_statistics_response():
    statistics = InferenceStatistics()
    timer = RequestTimer()
    timer.add("compute_infer", 42)
    timer.succeeded(3)
    statistics.record("m", "1", timer)
    statistics.record("m", "1", RequestTimer())
    response = converters.model_statistics([statistics.get("m", "1"), statistics.get("m", "2")])
    first, second = response.model_stats
    assert (first.name, first.version, first.inference_count, first.execution_count) == ("m", "1", 3, 1)
    assert first.last_inference > 0
    assert (first.inference_stats.compute_infer.count, first.inference_stats.compute_infer.ns) == (1, 42)
    assert (first.inference_stats.success.count, first.inference_stats.fail.count) == (1, 1)
    assert (second.version, second.execution_count, second.last_inference) == ("2", 0, 0)
