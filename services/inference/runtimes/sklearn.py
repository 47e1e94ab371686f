"""scikit-learn models saved with skops: ``<version>/model.skops``.

skops stores objects without pickle, but an artifact may still name types that skops does not
trust by default (for example the ``Tree`` of a random forest). Such a file is loaded only if
every one of those types is in :data:`ALLOWED_TYPES`, a list of scikit-learn/numpy internals
that carry data, not code. Anything else (``posix.system``, a custom class, ``builtins.eval``)
is refused before loading, so loading never runs code named by the artifact.

The config must declare exactly one input, passed to the estimator as ``X``. Each output is
computed by an estimator method: ``parameters.outputs.<name>.method`` or, by default,
``predict`` for an output named ``label`` or ``predictions`` and ``predict_proba`` for
``probabilities``::

    parameters:
      outputs:
        scores: {method: decision_function}

NaN and infinity in the input are refused (INVALID_ARGUMENT) before the estimator sees them,
unless ``parameters.allow_non_finite: true`` (for estimators that handle missing values, such as
``HistGradientBoostingClassifier``). Once they are refused here, scikit-learn is told so
(``assume_finite``) and does not scan the input again.

A :class:`~sklearn.pipeline.Pipeline` whose outputs call several methods runs its transforming steps
once per request and each method of its final step on their result, which is what each of the
pipeline's own methods does (``Pipeline.predict(X)`` is ``final.predict(transform(X))``), without
transforming the same rows once per method.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import sklearn  # type: ignore[import-untyped]
import skops.io  # type: ignore[import-untyped]
from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]

from services.inference.repository import ModelConfig
from services.inference.runtimes.base import (
    ModelError,
    cast_outputs,
    input_policy,
    refuse_non_finite,
    runtime_parameters,
)

ARTIFACT = "model.skops"

#: Types beyond skops' defaults that an artifact may contain: fitted data structures of
#: scikit-learn estimators and numpy dtypes. Extend it deliberately, one reviewed type at a time.
ALLOWED_TYPES = frozenset(
    {
        "numpy.dtype",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.metrics._dist_metrics.ChebyshevDistance64",
        "sklearn.metrics._dist_metrics.EuclideanDistance64",
        "sklearn.metrics._dist_metrics.ManhattanDistance64",
        "sklearn.metrics._dist_metrics.MinkowskiDistance64",
        "sklearn.neighbors._ball_tree.BallTree",
        "sklearn.neighbors._kd_tree.KDTree",
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
        "sklearn.tree._tree.Tree",
    }
)

#: Estimator methods an output may name (never fit, set_params, ...).
METHODS = frozenset(
    {"predict", "predict_proba", "predict_log_proba", "decision_function", "transform", "score_samples"}
)
DEFAULT_METHODS: Mapping[str, str] = {"label": "predict", "predictions": "predict", "probabilities": "predict_proba"}


def load_trusted(path: Path) -> Any:
    """The object saved in the skops file ``path``, if every type it names is trusted."""
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as error:
        raise ModelError(f"{path}: not a readable skops file: {error}") from error
    refused = sorted(set(untrusted) - ALLOWED_TYPES)
    if refused:
        raise ModelError(f"{path}: refused to load: untrusted types {refused} (not in the allow-list)")
    try:
        return skops.io.load(path, trusted=list(untrusted))
    except Exception as error:
        raise ModelError(f"{path}: cannot be loaded: {type(error).__name__}: {error}") from error


def output_methods(config: ModelConfig) -> dict[str, str]:
    """The estimator method of each declared output, from ``parameters`` or the defaults."""
    parameters = runtime_parameters(config)
    outputs = parameters.pop("outputs", {})
    if parameters:
        raise ModelError(f"parameters: unknown fields {sorted(parameters)} (sklearn takes only outputs)")
    if not isinstance(outputs, Mapping):
        raise ModelError("parameters.outputs: must map output names to {method: ...}")
    declared = [spec.name for spec in config.outputs]
    unknown = sorted(set(outputs) - set(declared))
    if unknown:
        raise ModelError(f"parameters.outputs: {unknown} are not declared outputs")
    methods = {}
    for name in declared:
        given = outputs.get(name, {})
        if not isinstance(given, Mapping) or set(given) - {"method"}:
            raise ModelError(f"parameters.outputs.{name}: must be {{method: <name>}}")
        method = given.get("method", DEFAULT_METHODS.get(name))
        if method is None:
            raise ModelError(f"parameters.outputs.{name}.method: required (no default for an output named {name})")
        if method not in METHODS:
            raise ModelError(f"parameters.outputs.{name}.method: {method!r} is not one of {sorted(METHODS)}")
        methods[name] = method
    return methods


class SklearnRuntime:
    def __init__(self) -> None:
        self._estimator: Any = None
        self._config: ModelConfig | None = None
        self._input = ""
        self._methods: dict[str, str] = {}
        self._finite = True  # non-finite input is refused before the estimator sees it
        self._transform: Any = None  # a pipeline's transforming steps, run once for all methods
        self._final: Any = None  # the estimator whose methods compute the outputs

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        if len(config.inputs) != 1:
            raise ModelError(
                f"model {config.name}: the sklearn runtime takes exactly one input, not {len(config.inputs)}"
            )
        input_policy(config)
        methods = output_methods(config)
        estimator = load_trusted(version_dir / ARTIFACT)
        missing = sorted({method for method in methods.values() if not hasattr(estimator, method)})
        if missing:
            raise ModelError(f"model {config.name}: {type(estimator).__name__} has no method {missing}")
        self._estimator, self._config, self._input, self._methods = estimator, config, config.inputs[0].name, methods
        self._finite = not input_policy(config).allow_non_finite
        self._transform, self._final = None, estimator
        if isinstance(estimator, Pipeline) and len(set(methods.values())) > 1 and len(estimator.steps) > 1:
            final = estimator.steps[-1][1]
            if final != "passthrough" and all(hasattr(final, method) for method in methods.values()):
                self._transform, self._final = estimator[:-1], final

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._config is None:
            raise ModelError("the model is not loaded")
        if self._input not in inputs:
            raise ModelError(f"input {self._input} is missing")
        if self._finite:
            refuse_non_finite(self._config.name, inputs)
        features = inputs[self._input]
        results: dict[str, Any] = {}
        with sklearn.config_context(assume_finite=self._finite):
            if self._transform is not None:
                try:
                    features = self._transform.transform(features)
                except Exception as error:
                    problem = f"{type(error).__name__}: {error}"
                    raise ModelError(
                        f"model {self._config.name}: the pipeline's transform failed: {problem}"
                    ) from error
            for method in sorted(set(self._methods.values())):  # each method once, even for several outputs
                try:
                    results[method] = getattr(self._final, method)(features)
                except Exception as error:
                    problem = f"{type(error).__name__}: {error}"
                    raise ModelError(f"model {self._config.name}: {method} failed: {problem}") from error
        return cast_outputs(self._config, {name: results[method] for name, method in self._methods.items()})

    def unload(self) -> None:
        self._estimator, self._config, self._methods = None, None, {}
        self._transform = self._final = None
