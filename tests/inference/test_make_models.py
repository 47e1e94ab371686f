"""make_models: the demo repository it writes, the python demos' answers, idempotence, --force, failure exit code."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.inference import make_models
from services.inference.repository import TensorSpec, load_config, scan
from services.inference.runtimes import ModelError, Runtime, create_runtime

NAMES = ["iris", "digits", "simple", "simple_string", "simple_identity", "sum", "identity_fp32"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A repository written by one run of the command (in-process), and what it printed."""
    repository = tmp_path_factory.mktemp("models")
    assert make_models.main(["--repository", str(repository)]) == 0
    return repository


def loaded(model_dir) -> Runtime:
    config = load_config(model_dir)
    runtime = create_runtime(config.runtime)
    runtime.load(model_dir / "1", config)
    return runtime


def snapshot(repository):
    return {path: path.read_bytes() for path in sorted(repository.rglob("*")) if path.is_file()}


def test_the_demo_repository_scans_clean_with_the_documented_io(built):
    entries = scan(built)
    assert sorted(entries) == sorted(["digits", "iris", *make_models.PYTHON_DEMO_NAMES])
    for name, features, classes, runtime, artifact in [
        ("iris", 4, 3, "sklearn", "model.skops"),
        ("digits", 64, 10, "onnx", "model.onnx"),
    ]:
        entry = entries[name]
        assert entry.ok, entry.error
        assert entry.versions == [1]
        assert (entry.path / "1" / artifact).is_file()
        config = entry.config
        assert config is not None
        assert config.runtime == runtime
        assert config.inputs == (TensorSpec("input", "FP32", (-1, features)),)
        assert config.outputs == (
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, classes)),
        )
        assert (config.min_workers, config.max_workers) == (1, 2)
    assert not [path for path in built.rglob(".*")], "no staging directory is left behind"


PYTHON_IO = {
    "simple": (8, [("INPUT0", "INT32", (-1, 16)), ("INPUT1", "INT32", (-1, 16))], "INT32", (-1, 16)),
    "simple_string": (8, [("INPUT0", "BYTES", (-1, 16)), ("INPUT1", "BYTES", (-1, 16))], "BYTES", (-1, 16)),
    "simple_identity": (8, [("INPUT0", "BYTES", (-1, -1))], "BYTES", (-1, -1)),
    "sum": (0, [("INPUT0", "FP32", (-1, -1))], "FP32", (-1,)),
    "identity_fp32": (0, [("INPUT0", "FP32", (-1, -1))], "FP32", (-1, -1)),
}


@pytest.mark.parametrize("name", sorted(PYTHON_IO))
def test_the_python_demos_declare_tritons_example_io(built, name):
    batch, inputs, datatype, shape = PYTHON_IO[name]
    config = load_config(built / name)
    assert (config.runtime, config.max_batch_size) == ("python", batch)
    assert config.inputs == tuple(TensorSpec(*spec) for spec in inputs)
    assert [spec.name for spec in config.outputs] == [f"OUTPUT{i}" for i in range(len(config.outputs))]
    assert {(spec.datatype, spec.shape) for spec in config.outputs} == {(datatype, shape)}
    source = make_models.python_demo(name)
    assert (built / name / "config.yaml").read_text() == source.config_text  # copied with its comments
    assert (built / name / "1" / "model.py").is_file()


def test_the_python_demos_compute_what_they_promise(built):
    left = np.arange(32, dtype=np.int32).reshape(2, 16)
    right = np.full((2, 16), 2**31 - 1, dtype=np.int32)
    simple = loaded(built / "simple").predict({"INPUT0": left, "INPUT1": right})
    np.testing.assert_array_equal(simple["OUTPUT0"], left + right)  # INT32 wraps, as in Triton
    np.testing.assert_array_equal(simple["OUTPUT1"], left - right)

    def strings(array):
        return np.array([str(value).encode() for value in array.flat], dtype=object).reshape(array.shape)

    text = loaded(built / "simple_string").predict({"INPUT0": strings(left), "INPUT1": strings(left * -3)})
    assert text["OUTPUT0"].tolist() == strings(left * -2).tolist()
    assert text["OUTPUT1"].tolist() == strings(left * 4).tolist()
    with pytest.raises(ModelError, match="decimal integers"):
        loaded(built / "simple_string").predict({"INPUT0": strings(left), "INPUT1": np.full((2, 16), b"x", object)})

    words = np.array([[b"a", b"", "é".encode()]], dtype=object)
    assert loaded(built / "simple_identity").predict({"INPUT0": words})["OUTPUT0"].tolist() == words.tolist()
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert loaded(built / "sum").predict({"INPUT0": matrix})["OUTPUT0"].tolist() == [6.0, 22.0, 38.0]
    np.testing.assert_array_equal(loaded(built / "identity_fp32").predict({"INPUT0": matrix})["OUTPUT0"], matrix)


def test_a_second_run_skips_what_exists(built, capsys):
    before = snapshot(built)
    assert make_models.main(["--repository", str(built)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"skipped {name} version 1: already in {built / name}" for name in NAMES
    ]
    assert snapshot(built) == before


def test_force_rebuilds_deterministically(built, tmp_path, capsys):
    repository = tmp_path / "models"
    shutil.copytree(built, repository)
    assert make_models.main(["--repository", str(repository), "--force"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" in ")[0] for line in lines] == [f"built {name} version 1" for name in NAMES]
    after = snapshot(repository)
    for name in ("iris/config.yaml", "digits/config.yaml", "digits/1/model.onnx", "simple/1/model.py"):
        assert after[repository / name] == (built / name).read_bytes(), name
    features, _ = make_models.IRIS.data()  # skops files carry timestamps: compare what they predict
    rebuilt, original = (loaded(path / "iris").predict({"input": features}) for path in (repository, built))
    np.testing.assert_array_equal(rebuilt["probabilities"], original["probabilities"])


def test_a_version_without_its_artifact_is_rebuilt(built, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(built, repository)
    (repository / "iris" / "1" / "model.skops").unlink()
    result = make_models.build(make_models.IRIS, repository)
    assert result.built
    assert result.estimator is not None
    assert (repository / "iris" / "1" / "model.skops").is_file()
    assert not make_models.build(make_models.IRIS, repository).built


def test_a_failure_exits_non_zero(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the repository should be")
    assert make_models.main(["--repository", str(blocker)]) == 1
    assert capsys.readouterr().err.startswith("failed iris version 1: ")
