"""make_models: the demo repository it writes, idempotence, --force, failure exit code."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.inference import make_models
from services.inference.repository import TensorSpec, load_config, scan
from services.inference.runtimes import Runtime, create_runtime


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
    assert sorted(entries) == ["digits", "iris"]
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


def test_a_second_run_skips_what_exists(built, capsys):
    before = snapshot(built)
    assert make_models.main(["--repository", str(built)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"skipped iris version 1: already in {built / 'iris'}",
        f"skipped digits version 1: already in {built / 'digits'}",
    ]
    assert snapshot(built) == before


def test_force_rebuilds_deterministically(built, tmp_path, capsys):
    repository = tmp_path / "models"
    shutil.copytree(built, repository)
    assert make_models.main(["--repository", str(repository), "--force"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["built iris version 1", "built digits version 1"]
    after = snapshot(repository)
    for name in ("iris/config.yaml", "digits/config.yaml", "digits/1/model.onnx"):
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
