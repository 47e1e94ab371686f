"""Build the demo models into a model repository: ``python -m services.inference.make_models``.

Trained (the data ship with scikit-learn: nothing is downloaded; every random state is fixed):

* ``iris`` (sklearn runtime): standard scaling + logistic regression on scikit-learn's iris
  data, saved with skops. Input ``input`` FP32 [-1, 4]; outputs ``label`` INT64 [-1] and
  ``probabilities`` FP32 [-1, 3].
* ``digits`` (onnx runtime): the same pipeline on the 8x8 digits data, exported with skl2onnx.
  Input ``input`` FP32 [-1, 64]; outputs ``label`` INT64 [-1] and ``probabilities`` FP32 [-1, 10].

Written from source (python runtime; ``config.yaml`` and ``model.py`` under ``demo_models/<name>/``
in this package), with the inputs and outputs of Triton's example models of the same names:

* ``simple``: ``INPUT0``, ``INPUT1`` INT32 [-1, 16] -> ``OUTPUT0`` = sum, ``OUTPUT1`` = difference.
* ``simple_string``: the same on BYTES tensors of decimal integers, answered as BYTES strings.
* ``simple_identity``: ``INPUT0`` BYTES [-1, -1] -> ``OUTPUT0`` unchanged.
* ``sum``: ``INPUT0`` FP32 [-1, -1] -> ``OUTPUT0`` FP32 [-1], the sum of each row (large payloads).
* ``identity_fp32``: ``INPUT0`` FP32 [-1, -1] -> ``OUTPUT0`` unchanged (large payloads both ways).

A version that already has its config and artifact is skipped unless ``--force``. A version is
written to a hidden directory first and renamed into place, so a scan never sees half a model.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.inference.repository import parse_config

DEFAULT_REPOSITORY = Path("models")
RANDOM_STATE = 0
PROGRAM = "python -m services.inference.make_models"


# scikit-learn, skops and skl2onnx are imported on use: skipping existing models stays fast.


def _dataset(loader: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, as served) and target of a dataset bundled with scikit-learn."""
    from sklearn import datasets  # type: ignore[import-untyped]

    features, target = getattr(datasets, loader)(return_X_y=True)
    return np.asarray(features, dtype=np.float32), np.asarray(target)


def _train_classifier(features: np.ndarray, target: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=RANDOM_STATE))
    return model.fit(features, target)


def _save_skops(estimator: Any, path: Path) -> None:
    import skops.io  # type: ignore[import-untyped]

    skops.io.dump(estimator, path)


def _save_onnx(estimator: Any, path: Path) -> None:
    from skl2onnx import convert_sklearn  # type: ignore[import-untyped]  # a dev dependency
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]

    features = estimator.n_features_in_
    model = convert_sklearn(
        estimator,
        name="classifier",  # a fixed graph name (the default is random): rebuilding gives the same bytes
        initial_types=[("input", FloatTensorType([None, features]))],
        options={id(estimator): {"zipmap": False}},  # probabilities as a tensor, not a list of maps
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path.write_bytes(model.SerializeToString())


def _classifier_config(runtime: str, features: int, classes: int) -> dict[str, Any]:
    return {
        "runtime": runtime,
        "max_batch_size": 256,
        "dynamic_batching": {"max_queue_delay_microseconds": 100},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, features]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        ],
        "instances": {"min": 1, "max": 2},
        "version_policy": {"latest": 1},
    }


@dataclass(frozen=True, slots=True)
class DemoModel:
    """How to build one demo model version."""

    name: str
    version: int
    artifact: str
    config: dict[str, Any]
    data: Callable[[], tuple[np.ndarray, np.ndarray]]  # features (float32), target
    train: Callable[[np.ndarray, np.ndarray], Any]  # a fitted scikit-learn estimator
    save: Callable[[Any, Path], None]  # writes the artifact
    config_text: str = ""  # the config file as written; "" = generated from ``config``


IRIS = DemoModel(
    name="iris",
    version=1,
    artifact="model.skops",
    config=_classifier_config("sklearn", features=4, classes=3),
    data=functools.partial(_dataset, "load_iris"),
    train=_train_classifier,
    save=_save_skops,
)
DIGITS = DemoModel(
    name="digits",
    version=1,
    artifact="model.onnx",
    config=_classifier_config("onnx", features=64, classes=10),
    data=functools.partial(_dataset, "load_digits"),
    train=_train_classifier,
    save=_save_onnx,
)


def _source(name: str) -> Traversable:
    """The packaged source directory of a python demo model."""
    return resources.files("services.inference") / "demo_models" / name


def _no_data() -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, 0), dtype=np.float32), np.empty(0)


def _no_training(features: np.ndarray, target: np.ndarray) -> None:
    return None


def _copy_from(source: Traversable) -> Callable[[Any, Path], None]:
    def save(estimator: Any, path: Path) -> None:
        path.write_bytes((source / path.name).read_bytes())

    return save


def python_demo(name: str) -> DemoModel:
    """A demo model written from its packaged ``config.yaml`` (copied as it is) and ``model.py``."""
    source = _source(name)
    text = (source / "config.yaml").read_text(encoding="utf-8")
    return DemoModel(
        name=name,
        version=1,
        artifact="model.py",
        config=yaml.safe_load(text),
        data=_no_data,
        train=_no_training,
        save=_copy_from(source),
        config_text=text,
    )


PYTHON_DEMO_NAMES = ("simple", "simple_string", "simple_identity", "sum", "identity_fp32")
PYTHON_DEMOS = tuple(python_demo(name) for name in PYTHON_DEMO_NAMES)
DEMO_MODELS = (IRIS, DIGITS, *PYTHON_DEMOS)


@dataclass(frozen=True, slots=True)
class BuildResult:
    name: str
    version: int
    path: Path  # the model directory
    built: bool  # False: skipped, it already existed
    estimator: Any  # the fitted estimator when built, else None
    seconds: float


def is_built(demo: DemoModel, repository: Path) -> bool:
    model_dir = repository / demo.name
    config = model_dir / "config.yaml"
    if not (config.is_file() and (model_dir / str(demo.version) / demo.artifact).is_file()):
        return False
    return bool(yaml.safe_load(config.read_text(encoding="utf-8")) == demo.config)  # a changed config: rebuilt


def build(demo: DemoModel, repository: Path, *, force: bool = False) -> BuildResult:
    """Train and write ``demo`` into ``repository`` unless it is there already (or ``force``)."""
    started = time.perf_counter()
    model_dir = repository / demo.name
    if not force and is_built(demo, repository):
        return BuildResult(demo.name, demo.version, model_dir, False, None, time.perf_counter() - started)
    parse_config(demo.name, demo.config, source=f"{demo.name} demo config")  # never write one the server refuses
    model_dir.mkdir(parents=True, exist_ok=True)
    estimator = demo.train(*demo.data())
    version_dir = model_dir / str(demo.version)
    staging = Path(tempfile.mkdtemp(prefix=f".{demo.version}-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        demo.save(estimator, staging / demo.artifact)
        config_text = demo.config_text or (
            f"# Written by {PROGRAM}.\n" + yaml.safe_dump(demo.config, sort_keys=False, default_flow_style=None)
        )
        (staging / "config.yaml").write_text(config_text, encoding="utf-8")
        (staging / "config.yaml").replace(model_dir / "config.yaml")
        if version_dir.exists():
            shutil.rmtree(version_dir)
        staging.rename(version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(demo.name, demo.version, model_dir, True, estimator, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.partition("\n")[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="default: %(default)s")
    parser.add_argument("--force", action="store_true", help="rebuild versions that already exist")
    args = parser.parse_args(argv)
    for demo in DEMO_MODELS:
        try:
            result = build(demo, args.repository, force=args.force)
        except Exception as error:
            print(f"failed {demo.name} version {demo.version}: {type(error).__name__}: {error}", file=sys.stderr)  # noqa: T201
            return 1
        if result.built:
            print(f"built {result.name} version {result.version} in {result.path} ({result.seconds:.1f}s)")  # noqa: T201
        else:
            print(f"skipped {result.name} version {result.version}: already in {result.path}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
