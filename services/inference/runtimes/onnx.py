"""ONNX models run by onnxruntime: ``<version>/model.onnx``.

One CPU session per worker with one intra-op and one inter-op thread: the pool scales with
processes, and threads inside each would oversubscribe the CPUs. At load, every declared input
and output must exist in the graph with the matching element type and rank, and every graph
input must be declared. Classifiers exported by skl2onnx need ``zipmap: False`` so that
probabilities are a tensor, not a list of maps. ``parameters`` takes no fields of its own (only
the server's ``allow_zero_size`` and ``allow_non_finite``, see :mod:`.base`); NaN and infinity in
float inputs are refused (INVALID_ARGUMENT) unless ``allow_non_finite: true``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # type: ignore[import-untyped]

from services.inference.repository import ModelConfig, TensorSpec
from services.inference.runtimes.base import ModelError, cast_outputs, check_finite, input_policy, runtime_parameters

ARTIFACT = "model.onnx"

#: ONNX tensor element types (as onnxruntime names them) of each OIP datatype.
ONNX_TYPES = {
    "BOOL": "tensor(bool)",
    "UINT8": "tensor(uint8)",
    "UINT16": "tensor(uint16)",
    "UINT32": "tensor(uint32)",
    "UINT64": "tensor(uint64)",
    "INT8": "tensor(int8)",
    "INT16": "tensor(int16)",
    "INT32": "tensor(int32)",
    "INT64": "tensor(int64)",
    "FP16": "tensor(float16)",
    "FP32": "tensor(float)",
    "FP64": "tensor(double)",
    "BYTES": "tensor(string)",
}


def _check(kind: str, specs: Sequence[TensorSpec], graph: dict[str, Any]) -> None:
    for spec in specs:
        node = graph.get(spec.name)
        if node is None:
            raise ModelError(f"{kind} {spec.name}: not in the ONNX graph (it has {sorted(graph)})")
        if node.type != ONNX_TYPES[spec.datatype]:
            raise ModelError(f"{kind} {spec.name}: declared {spec.datatype}, the graph has {node.type}")
        shape = node.shape
        if isinstance(shape, list) and len(shape) != len(spec.shape):
            raise ModelError(f"{kind} {spec.name}: declared rank {len(spec.shape)}, the graph has shape {shape}")
        for declared, actual in zip(spec.shape, shape or [], strict=False):
            if declared != -1 and isinstance(actual, int) and actual != declared:
                raise ModelError(f"{kind} {spec.name}: declared shape {list(spec.shape)}, the graph has {shape}")


def _feed(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    if spec.datatype != "BYTES":
        return value
    strings = np.empty(value.shape, dtype=object)  # onnxruntime takes str for tensor(string): UTF-8 only
    for index, item in np.ndenumerate(value):
        strings[index] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    return strings


class OnnxRuntime:
    def __init__(self) -> None:
        self._session: Any = None
        self._config: ModelConfig | None = None

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        input_policy(config)
        parameters = runtime_parameters(config)
        if parameters:
            raise ModelError(f"parameters: unknown fields {sorted(parameters)} (onnx takes none)")
        path = version_dir / ARTIFACT
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; warnings go to stderr otherwise
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ModelError(f"{path}: cannot be loaded: {error}") from error
        graph_inputs = {node.name: node for node in session.get_inputs()}
        undeclared = sorted(set(graph_inputs) - {spec.name for spec in config.inputs})
        if undeclared:
            raise ModelError(f"{path}: graph inputs {undeclared} are not declared in the config")
        _check("input", config.inputs, graph_inputs)
        _check("output", config.outputs, {node.name: node for node in session.get_outputs()})
        self._session, self._config = session, config

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        config = self._config
        if config is None:
            raise ModelError("the model is not loaded")
        missing = sorted({spec.name for spec in config.inputs} - set(inputs))
        if missing:
            raise ModelError(f"inputs {missing} are missing")
        check_finite(config, inputs)
        names = [spec.name for spec in config.outputs]
        try:
            feed = {spec.name: _feed(spec, inputs[spec.name]) for spec in config.inputs}
            results = self._session.run(names, feed)
        except Exception as error:
            raise ModelError(f"model {config.name}: {type(error).__name__}: {error}") from error
        return cast_outputs(config, dict(zip(names, results, strict=True)))

    def unload(self) -> None:
        self._session, self._config = None, None
