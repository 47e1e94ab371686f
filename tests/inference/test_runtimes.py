"""Runtimes on real artifacts: the demo models against their scikit-learn originals, skops'
type allow-list, ONNX graph checks, and Python models (the test models and ad hoc ones)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import skops.io
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from services.inference import make_models
from services.inference.repository import ModelConfig, load_config, parse_config
from services.inference.runtimes import (
    RUNTIMES,
    InputPolicy,
    InvalidInput,
    ModelError,
    Runtime,
    create_runtime,
    input_policy,
)
from services.inference.runtimes.sklearn import ALLOWED_TYPES
from tests.conftest import REPO

TEST_MODELS = REPO / "tests" / "testdata" / "models"


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, make_models.BuildResult]:
    """iris and digits built once per session by make_models, with their fitted estimators."""
    repository = tmp_path_factory.mktemp("demo")
    return {model.name: make_models.build(model, repository) for model in make_models.DEMO_MODELS}


def loaded(model_dir: Path, version: int = 1, config: ModelConfig | None = None) -> Runtime:
    config = config or load_config(model_dir)
    runtime = create_runtime(config.runtime)
    runtime.load(model_dir / str(version), config)
    return runtime


def with_config(model_dir: Path, destination: Path, **changes: Any) -> ModelConfig:
    """The config of ``model_dir`` with some top-level fields replaced (named after ``destination``)."""
    config = load_config(model_dir)
    data = {
        "runtime": config.runtime,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in config.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in config.outputs],
        "parameters": config.parameters,
    }
    return parse_config(destination.name, {**data, **changes})


def test_create_runtime_knows_the_three_runtimes():
    assert sorted(RUNTIMES) == ["onnx", "python", "sklearn"]
    for name in RUNTIMES:
        assert isinstance(create_runtime(name), Runtime)
    with pytest.raises(ValueError, match="unknown runtime 'torch'"):
        create_runtime("torch")


def test_a_python_worker_imports_neither_onnxruntime_nor_sklearn():
    code = textwrap.dedent(
        """
        import sys
        from services.inference.runtimes import create_runtime
        create_runtime("python")
        print(sorted(name for name in ("onnxruntime", "sklearn", "skops") if name in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["iris", "digits"])
def test_demo_models_predict_like_the_original_estimator(demo, name):
    built = demo[name]
    features, _ = make_models.IRIS.data() if name == "iris" else make_models.DIGITS.data()
    runtime = loaded(built.path)
    outputs = runtime.predict({"input": features})
    assert set(outputs) == {"label", "probabilities"}
    assert outputs["label"].dtype == np.int64
    assert outputs["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(outputs["label"], built.estimator.predict(features))
    np.testing.assert_allclose(outputs["probabilities"], built.estimator.predict_proba(features), atol=1e-4)
    single = runtime.predict({"input": features[:1]})
    assert single["label"].shape == (1,)
    runtime.unload()
    with pytest.raises(ModelError, match="not loaded"):
        runtime.predict({"input": features})


def test_sklearn_output_methods_can_be_configured(demo, tmp_path):
    iris = demo["iris"]
    config = with_config(
        iris.path,
        tmp_path / "iris",
        outputs=[{"name": "scores", "datatype": "FP64", "shape": [-1, 3]}],
        parameters={"outputs": {"scores": {"method": "decision_function"}}},
    )
    features, _ = make_models.IRIS.data()
    outputs = loaded(iris.path, config=config).predict({"input": features})
    np.testing.assert_allclose(outputs["scores"], iris.estimator.decision_function(features))


def test_a_pipeline_answers_what_its_own_methods_answer(demo, tmp_path):
    """The runtime transforms once and calls the final step's methods: the same as each pipeline method."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features, target = make_models.IRIS.data()
    pipeline = make_pipeline(StandardScaler(), "passthrough", LogisticRegression(max_iter=500)).fit(features, target)
    model_dir = copy_with_artifact(demo["iris"].path, tmp_path / "iris", "model.skops", pipeline)
    config = with_config(
        model_dir,
        tmp_path / "iris",
        outputs=[
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]},
            {"name": "scores", "datatype": "FP64", "shape": [-1, 3]},
        ],
        parameters={"outputs": {"scores": {"method": "decision_function"}}},
    )
    outputs = loaded(model_dir, config=config).predict({"input": features})
    np.testing.assert_array_equal(outputs["label"], pipeline.predict(features))
    np.testing.assert_array_equal(outputs["probabilities"], pipeline.predict_proba(features))
    np.testing.assert_array_equal(outputs["scores"], pipeline.decision_function(features))
    with pytest.raises(ModelError, match="the pipeline's transform failed: ValueError"):
        loaded(model_dir, config=config).predict({"input": features[:, :3]})  # the scaler wants 4 features


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"inputs": [{"name": n, "datatype": "FP32", "shape": [-1, 2]} for n in ("a", "b")]},
            "exactly one input",
        ),
        ({"outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1]}]}, r"outputs\.scores\.method: required"),
        ({"parameters": {"outputs": {"label": {"method": "fit"}}}}, "'fit' is not one of"),
        ({"parameters": {"outputs": {"nope": {"method": "predict"}}}}, r"\['nope'\] are not declared outputs"),
        ({"parameters": {"threads": 2}}, r"unknown fields \['threads'\]"),
        ({"parameters": {"outputs": {"label": {"method": "transform"}}}}, r"has no method \['transform'\]"),
    ],
)
def test_sklearn_refuses_a_config_it_cannot_serve(demo, tmp_path, changes, problem):
    config = with_config(demo["iris"].path, tmp_path / "iris", **changes)
    with pytest.raises(ModelError, match=problem):
        loaded(demo["iris"].path, config=config)


def copy_with_artifact(source: Path, destination: Path, artifact: str, estimator: Any) -> Path:
    shutil.copytree(source, destination)
    skops.io.dump(estimator, destination / "1" / artifact)
    return destination


def test_skops_refuses_an_artifact_with_a_type_outside_the_allow_list(demo, tmp_path):
    malicious = make_pipeline(FunctionTransformer(os.system), RandomForestClassifier(n_estimators=2, random_state=0))
    model_dir = copy_with_artifact(demo["iris"].path, tmp_path / "iris", "model.skops", malicious)
    with pytest.raises(ModelError, match=r"refused to load: untrusted types \['(posix|nt)\.system'\]"):
        loaded(model_dir)


def test_skops_loads_allowed_scikit_learn_types(demo, tmp_path):
    features, target = make_models.IRIS.data()
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(features, target)
    model_dir = copy_with_artifact(demo["iris"].path, tmp_path / "iris", "model.skops", forest)
    assert set(skops.io.get_untrusted_types(file=model_dir / "1" / "model.skops")) <= ALLOWED_TYPES
    outputs = loaded(model_dir).predict({"input": features})
    np.testing.assert_array_equal(outputs["label"], forest.predict(features))


def test_sklearn_refuses_a_file_that_is_not_skops(demo, tmp_path):
    shutil.copytree(demo["iris"].path, tmp_path / "iris")
    (tmp_path / "iris" / "1" / "model.skops").write_bytes(b"not a zip file")
    with pytest.raises(ModelError, match="not a readable skops file"):
        loaded(tmp_path / "iris")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 64]}]}, r"declared FP64, the graph has"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]}, r"declared shape \[-1, 8\]"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}]}, "declared rank 1"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]}, r"graph inputs \['input'\]"),
        ({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}, "logits: not in the ONNX graph"),
        ({"parameters": {"threads": 4}}, "onnx takes none"),
    ],
)
def test_onnx_checks_the_config_against_the_graph(demo, tmp_path, changes, problem):
    config = with_config(demo["digits"].path, tmp_path / "digits", **changes)
    with pytest.raises(ModelError, match=problem):
        loaded(demo["digits"].path, config=config)


def test_onnx_serves_a_subset_of_the_outputs(demo, tmp_path):
    config = with_config(
        demo["digits"].path, tmp_path / "digits", outputs=[{"name": "label", "datatype": "INT64", "shape": [-1]}]
    )
    features, _ = make_models.DIGITS.data()
    outputs = loaded(demo["digits"].path, config=config).predict({"input": features[:5]})
    assert list(outputs) == ["label"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["iris", "digits"], ids=["sklearn", "onnx"])
def test_sklearn_and_onnx_refuse_non_finite_input_as_invalid(demo, name, bad):
    features, _ = make_models.IRIS.data() if name == "iris" else make_models.DIGITS.data()
    runtime = loaded(demo[name].path)
    spoiled = features[:3].copy()
    spoiled[1, 2] = bad
    with pytest.raises(InvalidInput, match="'input' holds NaN or infinity"):
        runtime.predict({"input": spoiled})
    assert runtime.predict({"input": features[:3]})["label"].shape == (3,)  # and it serves on


def test_allow_non_finite_lets_nan_reach_the_model(demo, tmp_path):
    config = with_config(demo["digits"].path, tmp_path / "digits", parameters={"allow_non_finite": True})
    features, _ = make_models.DIGITS.data()
    spoiled = features[:2].copy()
    spoiled[0, 0] = np.nan
    assert loaded(demo["digits"].path, config=config).predict({"input": spoiled})["label"].shape == (2,)


def test_the_input_policy_parameters_are_the_servers(demo, tmp_path):
    iris = demo["iris"].path
    assert input_policy(load_config(iris)) == InputPolicy(allow_zero_size=False, allow_non_finite=False)
    assert input_policy(load_config(TEST_MODELS / "echo")) == InputPolicy(allow_zero_size=False, allow_non_finite=True)
    relaxed = with_config(iris, tmp_path / "iris", parameters={"allow_zero_size": True, "allow_non_finite": True})
    assert input_policy(relaxed) == InputPolicy(allow_zero_size=True, allow_non_finite=True)
    assert isinstance(loaded(iris, config=relaxed), Runtime)  # the runtime does not count them as its own
    wrong = with_config(iris, tmp_path / "iris", parameters={"allow_zero_size": "yes"})
    with pytest.raises(ModelError, match=r"parameters\.allow_zero_size: must be true or false, not 'yes'"):
        loaded(iris, config=wrong)


def test_onnx_refuses_a_corrupt_model(demo, tmp_path):
    shutil.copytree(demo["digits"].path, tmp_path / "digits")
    (tmp_path / "digits" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="cannot be loaded"):
        loaded(tmp_path / "digits")


# --- the python runtime ---


def test_echo_returns_its_input():
    runtime = loaded(TEST_MODELS / "echo")
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    outputs = runtime.predict({"INPUT0": value})
    np.testing.assert_array_equal(outputs["OUTPUT0"], value)
    assert outputs["OUTPUT0"].dtype == np.float32
    runtime.unload()
    runtime.unload()
    with pytest.raises(ModelError, match="not loaded"):
        runtime.predict({"INPUT0": value})


def test_allkinds_round_trips_every_datatype():
    inputs = {
        "BOOL_IN": np.array([True, False]),
        "INT32_IN": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "INT64_IN": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        "FP32_IN": np.array([1.5, -np.inf], dtype=np.float32),
        "FP64_IN": np.array([np.pi, 1e-300]),
        "BYTES_IN": np.array([b"", b"\x00\xffbytes"], dtype=object),
    }
    outputs = loaded(TEST_MODELS / "allkinds").predict(inputs)
    assert set(outputs) == {name.replace("_IN", "_OUT") for name in inputs}
    for name, value in inputs.items():
        result = outputs[name.replace("_IN", "_OUT")]
        assert result.dtype == value.dtype
        np.testing.assert_array_equal(result, value)
    assert [type(item) for item in outputs["BYTES_OUT"]] == [bytes, bytes]


def test_sleepy_sleeps_as_long_as_asked():
    started = time.perf_counter()
    outputs = loaded(TEST_MODELS / "sleepy").predict({"INPUT0": np.array([[0.05]], dtype=np.float32)})
    assert time.perf_counter() - started >= 0.05
    assert outputs["OUTPUT0"].tolist() == [[np.float32(0.05)]]


def test_crashy_fails_on_request():
    runtime = loaded(TEST_MODELS / "crashy")
    np.testing.assert_array_equal(runtime.predict({"INPUT0": np.array([0, 7], dtype=np.int32)})["OUTPUT0"], [0, 7])
    with pytest.raises(ModelError, match="RuntimeError: model failed on purpose"):
        runtime.predict({"INPUT0": np.array([1], dtype=np.int32)})
    np.testing.assert_array_equal(runtime.predict({"INPUT0": np.array([4], dtype=np.int32)})["OUTPUT0"], [4])
    with pytest.raises(ModelError, match="MemoryError"):
        runtime.predict({"INPUT0": np.array([3], dtype=np.int32)})


def test_crashy_kills_its_process_with_exit_code_3():
    code = textwrap.dedent(
        f"""
        import numpy as np
        from pathlib import Path
        from services.inference.repository import load_config
        from services.inference.runtimes import create_runtime
        config = load_config(Path({str(TEST_MODELS / "crashy")!r}))
        runtime = create_runtime(config.runtime)
        runtime.load(Path({str(TEST_MODELS / "crashy" / "1")!r}), config)
        runtime.predict({{"INPUT0": np.array([2], dtype=np.int32)}})
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 3, done.stderr


STATEFUL_MODEL = """
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


@dataclass
class Scale:
    factor: float


class Doubler:
    def load(self, version_dir: Path) -> None:
        self.version_dir = version_dir
        self.scale = Scale(json.loads((version_dir / "weights.json").read_text())["factor"])

    def predict(self, inputs):
        return {"y": inputs["x"] * self.scale.factor, "text": ["scaled"] * len(inputs["x"])}

    def unload(self) -> None:
        (self.version_dir / "unloaded").write_text("yes")
"""


def stateful_model(tmp_path: Path, source: str = STATEFUL_MODEL, **parameters: Any) -> tuple[Path, ModelConfig]:
    version_dir = tmp_path / "stateful" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "code.py").write_text(source)
    (version_dir / "weights.json").write_text(json.dumps({"factor": 2.0}))
    config = parse_config(
        "stateful",
        {
            "runtime": "python",
            "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1]}],
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [-1]},
                {"name": "text", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {"module": "code.py", "class": "Doubler", **parameters},
        },
    )
    return version_dir, config


def test_python_model_lifecycle_load_predict_unload(tmp_path):
    version_dir, config = stateful_model(tmp_path)
    runtime = create_runtime("python")
    runtime.load(version_dir, config)
    outputs = runtime.predict({"x": np.array([1.0, 2.5])})
    assert outputs["y"].dtype == np.float32
    np.testing.assert_array_equal(outputs["y"], [2.0, 5.0])
    assert outputs["text"].tolist() == [b"scaled", b"scaled"]
    assert not (version_dir / "unloaded").exists()
    runtime.unload()
    assert (version_dir / "unloaded").read_text() == "yes"


def test_two_versions_of_a_python_model_load_side_by_side(tmp_path):
    version_dir, config = stateful_model(tmp_path)
    first, second = create_runtime("python"), create_runtime("python")
    first.load(version_dir, config)
    (version_dir / "weights.json").write_text(json.dumps({"factor": 3.0}))
    second.load(version_dir, config)
    assert first.predict({"x": np.array([1.0])})["y"].tolist() == [2.0]
    assert second.predict({"x": np.array([1.0])})["y"].tolist() == [3.0]


@pytest.mark.parametrize(
    ("source", "parameters", "problem"),
    [
        (STATEFUL_MODEL, {"class": "Missing"}, "has no class Missing"),
        (STATEFUL_MODEL, {"class": "os.system"}, "must be a class name"),
        (STATEFUL_MODEL, {"module": "../../outside.py"}, "outside the version directory"),
        (STATEFUL_MODEL, {"module": "other.py"}, "no such file"),
        (STATEFUL_MODEL, {"module": "weights.json"}, "must be the name of a .py file"),
        (STATEFUL_MODEL, {"threads": 1}, r"unknown fields \['threads'\]"),
        ("import no_such_module_here\n", {}, "import failed: ModuleNotFoundError"),
        ("class Doubler:\n    pass\n", {}, "has no predict method"),
        (
            "class Doubler:\n    def load(self, d):\n        raise OSError('no weights')\n    def predict(self, i):\n        return i\n",
            {},
            "failed to load: OSError: no weights",
        ),
    ],
)
def test_python_model_load_failures_are_model_errors(tmp_path, source, parameters, problem):
    version_dir, config = stateful_model(tmp_path, source, **parameters)
    with pytest.raises(ModelError, match=problem):
        create_runtime("python").load(version_dir, config)


def test_python_model_raising_invalid_input_passes_it_on(tmp_path):
    source = (
        "from services.inference.runtimes import InvalidInput\n"
        "class Doubler:\n"
        "    def predict(self, inputs):\n"
        "        raise InvalidInput('x must be positive')\n"
    )
    version_dir, config = stateful_model(tmp_path, source, allow_zero_size=True)
    runtime = create_runtime("python")
    runtime.load(version_dir, config)
    with pytest.raises(InvalidInput, match=r"^x must be positive$"):
        runtime.predict({"x": np.array([-1.0])})


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ("{'y': x}", r"missing \['text'\], undeclared \[\]"),
        ("{'y': x, 'text': [b'a'], 'extra': x}", r"undeclared \['extra'\]"),
        ("[x]", "returned list, not a mapping"),
        ("{'y': x.reshape(1, 1), 'text': [b'a']}", r"output y: shape \[1, 1\] does not match the declared \[-1\]"),
        ("{'y': x, 'text': [1]}", "output text: cannot be returned as BYTES"),
        ("{'y': ['a'], 'text': [b'a']}", "output y: cannot be returned as FP32"),
    ],
)
def test_python_model_outputs_must_match_the_config(tmp_path, result, problem):
    source = f"class Doubler:\n    def predict(self, inputs):\n        x = inputs['x']\n        return {result}\n"
    version_dir, config = stateful_model(tmp_path, source)
    runtime = create_runtime("python")
    runtime.load(version_dir, config)
    with pytest.raises(ModelError, match=problem):
        runtime.predict({"x": np.array([1.0])})


def test_an_integer_output_refuses_fractions(tmp_path):
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.py").write_text("class Model:\n    def predict(self, inputs):\n        return {'n': [0.5]}\n")
    config = parse_config(
        "m",
        {
            "runtime": "python",
            "inputs": [{"name": "x", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": "n", "datatype": "INT64", "shape": [-1]}],
        },
    )
    runtime = create_runtime("python")
    runtime.load(version_dir, config)
    with pytest.raises(ModelError, match="output n: cannot be returned as INT64"):
        runtime.predict({"x": np.array([1])})


def test_onnx_passes_bytes_as_strings_and_back(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["text_in"], ["text_out"])],
        "identity",
        [onnx.helper.make_tensor_value_info("text_in", onnx.TensorProto.STRING, [None])],
        [onnx.helper.make_tensor_value_info("text_out", onnx.TensorProto.STRING, [None])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    (tmp_path / "1").mkdir()
    onnx.save(model, tmp_path / "1" / "model.onnx")
    config = parse_config(
        "text",
        {
            "runtime": "onnx",
            "inputs": [{"name": "text_in", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "text_out", "datatype": "BYTES", "shape": [-1]}],
        },
    )
    runtime = create_runtime("onnx")
    runtime.load(tmp_path / "1", config)
    outputs = runtime.predict({"text_in": np.array([b"caf\xc3\xa9", b""], dtype=object)})
    assert outputs["text_out"].tolist() == [b"caf\xc3\xa9", b""]
