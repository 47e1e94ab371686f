"""The model repository: config files (YAML and JSON), version policies, scanning with broken models."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.inference.repository import (
    AllVersions,
    ConfigError,
    LatestVersions,
    ModelConfig,
    SpecificVersions,
    TensorSpec,
    available_versions,
    config_digest,
    load_config,
    parse_config,
    scan,
    select_versions,
)
from tests.conftest import REPO

TEST_MODELS = REPO / "tests" / "testdata" / "models"

VALID: dict[str, Any] = {
    "runtime": "sklearn",
    "platform": "",
    "max_batch_size": 0,
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ],
    "instances": {"min": 1, "max": 2},
    "timeout_seconds": 2.0,
    "version_policy": {"latest": 1},
    "parameters": {"outputs": {"label": {"method": "predict"}}},
}


def write_model(root: Path, name: str, config: Any, *, fmt: str = "yaml", versions: tuple[int, ...] = (1,)) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True)
    text = json.dumps(config) if fmt == "json" else yaml.safe_dump(config)
    (model_dir / f"config.{fmt}").write_text(text)
    for version in versions:
        (model_dir / str(version)).mkdir()
    return model_dir


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_full_config_is_read(tmp_path, fmt):
    config = load_config(write_model(tmp_path, "iris", VALID, fmt=fmt))
    assert config == ModelConfig(
        name="iris",
        runtime="sklearn",
        platform="sklearn",
        max_batch_size=0,
        inputs=(TensorSpec("input", "FP32", (-1, 4)),),
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
        min_workers=1,
        max_workers=2,
        timeout_seconds=2.0,
        version_policy=LatestVersions(1),
        parameters={"outputs": {"label": {"method": "predict"}}},
    )
    assert hash(config) == hash(load_config(tmp_path / "iris"))


def test_a_minimal_config_gets_the_defaults(tmp_path):
    minimal = {
        "runtime": "onnx",
        "inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "BOOL", "shape": [2, -1]}],
    }
    config = load_config(write_model(tmp_path, "m.v2-final_1", minimal, fmt="json"))
    assert config.name == "m.v2-final_1"
    assert config.platform == "onnxruntime_onnx"
    assert (config.max_batch_size, config.min_workers, config.max_workers) == (0, 1, 1)
    assert config.timeout_seconds is None
    assert config.version_policy == LatestVersions(1)
    assert config.parameters == {}
    assert config.inputs[0].dtype == object
    assert config.outputs[0].dtype == bool


def test_an_explicit_platform_and_the_other_policies(tmp_path):
    config = parse_config("m", {**VALID, "platform": "my-platform", "version_policy": {"all": True}})
    assert config.platform == "my-platform"
    assert config.version_policy == AllVersions()
    config = parse_config("m", {**VALID, "version_policy": {"specific": [3, 1, 3]}})
    assert config.version_policy == SpecificVersions((1, 3))


def test_batching_needs_a_leading_variable_dimension():
    config = parse_config("m", {**VALID, "max_batch_size": 8})
    assert config.max_batch_size == 8


def changed(path: str, value: Any) -> dict[str, Any]:
    """VALID with the field at a dotted path (list indexes as digits) set, or removed if value is ...."""
    config = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    target: Any = config
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is ...:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return config


INVALID = [
    # (changed field, new value (... = removed), text the error must contain)
    ("batch_size", 8, "batch_size: unknown field"),
    ("inputs.0.dtype", "FP32", "inputs[0].dtype: unknown field"),
    ("version_policy.newest", 1, "version_policy.newest: unknown field"),
    ("runtime", "tensorflow", "runtime: Input should be 'sklearn', 'onnx' or 'python'"),
    ("runtime", ..., "runtime: Field required"),
    ("inputs", ..., "inputs: Field required"),
    ("outputs", [], "outputs: List should have at least 1 item"),
    ("inputs.0.name", "", "inputs[0].name: String should have at least 1 character"),
    ("inputs.0.datatype", "FLOAT32", "inputs[0].datatype: Input should be 'BOOL'"),
    ("inputs.0.datatype", "BF16", "inputs[0].datatype"),
    ("outputs.1.shape", [-1, 0], "outputs[1].shape: dimensions must be positive or -1"),
    ("inputs.0.shape", [], "inputs[0].shape: List should have at least 1 item"),
    ("inputs.0.shape", ["-1", 4], "inputs[0].shape[0]: Input should be a valid integer"),
    ("outputs.1.name", "label", "outputs: duplicate tensor names ['label']"),
    ("max_batch_size", -1, "max_batch_size: Input should be greater than or equal to 0"),
    ("max_batch_size", True, "max_batch_size: Input should be a valid integer"),
    ("max_batch_size", 4, "max_batch_size > 0 needs -1"),
    ("instances.min", 3, "instances: min (3) must not exceed max (2)"),
    ("instances.min", 0, "instances.min: Input should be greater than or equal to 1"),
    ("instances.max", 17, "instances.max: Input should be less than or equal to 16"),
    ("timeout_seconds", 0, "timeout_seconds: Input should be greater than 0"),
    ("timeout_seconds", "2s", "timeout_seconds: Input should be a valid number"),
    ("version_policy", {"latest": 0}, "version_policy.latest: Input should be greater than or equal to 1"),
    ("version_policy", {"latest": 1, "all": True}, "version_policy: give exactly one of latest, all, specific"),
    ("version_policy", {}, "version_policy: give exactly one of latest, all, specific (got none)"),
    ("version_policy", {"all": False}, "version_policy: all must be true"),
    ("version_policy", {"specific": []}, "version_policy.specific: List should have at least 1 item"),
    ("version_policy", {"specific": [0]}, "version_policy: specific versions must be positive"),
    ("parameters", [], "parameters: Input should be a valid dictionary"),
]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize(("path", "value", "expected"), INVALID)
def test_an_invalid_config_names_the_file_and_the_field(tmp_path, fmt, path, value, expected):
    config = changed(path, value)
    if path == "max_batch_size" and value == 4:
        config["inputs"][0]["shape"] = [4]
    model_dir = write_model(tmp_path, "m", config, fmt=fmt)
    with pytest.raises(ConfigError) as raised:
        load_config(model_dir)
    message = str(raised.value)
    assert message.startswith(f"{model_dir / f'config.{fmt}'}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("file", "text", "expected"),
    [
        ("config.yaml", "runtime: [unclosed", "cannot be read"),
        ("config.yaml", "", "must be a mapping of fields, got NoneType"),
        ("config.yaml", "- runtime: python", "must be a mapping of fields, got list"),
        ("config.json", '{"runtime": ', "cannot be read"),
        ("config.json", b"\xff\xfe", "cannot be read"),
    ],
)
def test_an_unreadable_config_is_a_config_error(tmp_path, file, text, expected):
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / file
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=r"cannot be read|must be a mapping") as raised:
        load_config(tmp_path / "m")
    assert str(raised.value).startswith(str(path))
    assert expected in str(raised.value)


def test_a_model_needs_exactly_one_config_file(tmp_path):
    model_dir = write_model(tmp_path, "m", VALID)
    (model_dir / "config.json").write_text(json.dumps(VALID))
    with pytest.raises(ConfigError, match=r"both config\.yaml and config\.json"):
        load_config(model_dir)
    (model_dir / "config.yaml").unlink()
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.yaml or config\.json"):
        load_config(model_dir)


def test_a_model_name_is_limited_to_safe_characters(tmp_path):
    with pytest.raises(ConfigError, match="invalid model name 'a b'"):
        load_config(write_model(tmp_path, "a b", VALID))


@pytest.mark.parametrize(
    ("declared", "shape", "accepted"),
    [
        ((-1, 4), (3, 4), True),
        ((-1, 4), (0, 4), True),
        ((-1, 4), (3, 5), False),
        ((-1, 4), (12,), False),
        ((-1, -1), (1, 9), True),
        ((2,), (2,), True),
        ((2,), (-1,), False),
    ],
)
def test_tensor_shapes(declared, shape, accepted):
    assert TensorSpec("x", "FP32", declared).accepts_shape(shape) is accepted


def test_available_versions_are_positive_integer_directories(tmp_path):
    for name in ["3", "1", "10", "0", "01", "v2", ".4", "2.tmp"]:
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("a file, not a version")
    assert available_versions(tmp_path) == [1, 3, 10]
    assert available_versions(tmp_path / "missing") == []


def policy(version_policy: dict[str, Any]) -> ModelConfig:
    return parse_config("m", {**VALID, "version_policy": version_policy})


@pytest.mark.parametrize(
    ("version_policy", "available", "selected"),
    [
        ({"latest": 1}, [1, 2, 10], [10]),
        ({"latest": 2}, [10, 1, 2], [2, 10]),
        ({"latest": 5}, [1, 2], [1, 2]),
        ({"latest": 1}, [], []),
        ({"all": True}, [3, 1, 2], [1, 2, 3]),
        ({"all": True}, [], []),
        ({"specific": [1, 3]}, [1, 2, 3, 4], [1, 3]),
        ({"specific": [1, 3]}, [2, 3], [3]),
        ({"specific": [5]}, [1, 2], []),
    ],
)
def test_select_versions(version_policy, available, selected):
    assert select_versions(policy(version_policy), available) == selected


def test_scan_reports_broken_models_beside_good_ones(tmp_path):
    shutil.copytree(TEST_MODELS / "echo", tmp_path / "echo")
    write_model(tmp_path, "multi", {**VALID, "version_policy": {"latest": 2}}, versions=(1, 2, 3))
    write_model(tmp_path, "bad-field", {**VALID, "colour": "red"})
    write_model(tmp_path, "no-versions", VALID, versions=())
    write_model(tmp_path, "gone", {**VALID, "version_policy": {"specific": [7]}}, versions=(1,))
    write_model(tmp_path, "bad name", VALID)
    (tmp_path / "no-config").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.md").write_text("not a model")

    entries = scan(tmp_path)

    assert list(entries) == sorted(entries)
    assert set(entries) == {"echo", "multi", "bad-field", "no-versions", "gone", "bad name", "no-config"}
    assert entries["echo"].ok
    assert entries["echo"].versions == [1]
    assert entries["echo"].path == tmp_path / "echo"
    assert entries["echo"].config is not None
    assert entries["echo"].config.runtime == "python"
    assert entries["multi"].ok
    assert entries["multi"].versions == [2, 3]
    problems = {
        "bad-field": "colour: unknown field",
        "no-versions": "no version directories",
        "gone": "none of the versions of the policy are present (present: [1])",
        "bad name": "invalid model name",
        "no-config": r"no config.yaml or config.json",
    }
    for name, problem in problems.items():
        entry = entries[name]
        assert not entry.ok
        assert problem in entry.error, entry.error
        assert entry.versions == []
    assert entries["bad-field"].config is None
    assert entries["no-versions"].config is not None  # the config is fine, the model is not servable


def test_scan_of_the_test_models():
    entries = scan(TEST_MODELS)
    assert {name for name, entry in entries.items() if entry.ok} == {
        "allkinds",
        "batchy",
        "crashy",
        "echo",
        "failload",
        "sleepy",
        "sleepy2",
        "slowload",
    }
    assert "batch_size: unknown field" in entries["broken"].error
    for entry in entries.values():
        if entry.config is not None:
            workers = 2 if entry.name == "sleepy2" else 1
            assert (entry.config.dynamic_batching is not None) == (entry.name == "batchy")
            assert (entry.config.runtime, entry.config.min_workers, entry.config.max_workers) == (
                "python",
                workers,
                workers,
            )
            assert entry.config.timeout_seconds is None


def test_scan_needs_a_repository_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        scan(tmp_path / "file")


def test_config_digest_follows_the_config_bytes(tmp_path):
    model_dir = write_model(tmp_path, "m", VALID)
    first = config_digest(model_dir)
    assert len(first) == 64
    assert scan(tmp_path)["m"].digest == first
    assert config_digest(model_dir) == first
    (model_dir / "config.yaml").write_text(yaml.safe_dump({**VALID, "timeout_seconds": 3.0}))
    assert config_digest(model_dir) not in ("", first)
    assert scan(tmp_path)["m"].digest == config_digest(model_dir)
    (model_dir / "config.yaml").unlink()
    assert config_digest(model_dir) == ""
