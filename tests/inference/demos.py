"""tritonclient commands for the python demo models, and what they must answer.

Shared by the inference service's tests and the gateway's (the same client, with a token there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

PYTHON_DEMOS = ["simple", "simple_string", "simple_identity", "sum", "identity_fp32"]

_LEFT = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 - 50
_RIGHT = np.arange(32, dtype=np.int32).reshape(2, 16)[::-1] * 3
_MATRIX = np.array([[1.5, -2.25, 4.0], [3e38, 0.0, -1e-30]], dtype=np.float32)


def _strings(array: np.ndarray) -> list[list[str]]:
    return [[str(int(value)) for value in row] for row in array]


def demo_cases(url: str, headers: dict[str, str] | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(infer command, expected outputs {name: (shape, data)}) for every python demo model."""
    common: dict[str, Any] = {"url": url, "action": "infer", "headers": headers or {}, "timeout": 30}
    return [
        (
            {
                **common,
                "model": "simple",
                "inputs": [
                    {"name": "INPUT0", "datatype": "INT32", "data": _LEFT.tolist()},
                    {"name": "INPUT1", "datatype": "INT32", "data": _RIGHT.tolist()},
                ],
                "outputs": ["OUTPUT0", "OUTPUT1"],
            },
            {"OUTPUT0": ([2, 16], (_LEFT + _RIGHT).tolist()), "OUTPUT1": ([2, 16], (_LEFT - _RIGHT).tolist())},
        ),
        (
            {
                **common,
                "model": "simple_string",
                "inputs": [
                    {"name": "INPUT0", "datatype": "BYTES", "data": _strings(_LEFT)},
                    {"name": "INPUT1", "datatype": "BYTES", "data": _strings(_RIGHT)},
                ],
                "outputs": ["OUTPUT0", "OUTPUT1"],
            },
            {
                "OUTPUT0": ([2, 16], [item for row in _strings(_LEFT + _RIGHT) for item in row]),
                "OUTPUT1": ([2, 16], [item for row in _strings(_LEFT - _RIGHT) for item in row]),
            },
        ),
        (
            {
                **common,
                "model": "simple_identity",
                "inputs": [{"name": "INPUT0", "datatype": "BYTES", "data": [["héllo", "", "wörld"], ["a", "bb", "c"]]}],
                "outputs": ["OUTPUT0"],
            },
            {"OUTPUT0": ([2, 3], ["héllo", "", "wörld", "a", "bb", "c"])},
        ),
        (
            {
                **common,
                "model": "sum",
                "inputs": [{"name": "INPUT0", "datatype": "FP32", "data": _MATRIX.tolist()}],
                "outputs": ["OUTPUT0"],
            },
            {"OUTPUT0": ([2], _MATRIX.sum(axis=1, dtype=np.float32).tolist())},
        ),
        (
            {
                **common,
                "model": "identity_fp32",
                "inputs": [{"name": "INPUT0", "datatype": "FP32", "data": _MATRIX.tolist()}],
                "outputs": ["OUTPUT0"],
            },
            {"OUTPUT0": ([2, 3], _MATRIX.tolist())},
        ),
    ]


def check_answer(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    assert "error" not in answer, answer
    for name, (shape, data) in expected.items():
        assert answer["outputs"][name]["shape"] == shape, name
        assert answer["outputs"][name]["data"] == data, name


def stream_command(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Five requests on one ModelStreamInfer stream; the third names a model that does not exist."""
    requests = []
    for index in range(5):
        model = "no_such_model" if index == 2 else "simple"
        values = np.full((1, 16), index, dtype=np.int32).tolist()
        requests.append(
            {
                "model": model,
                "id": str(index),
                "inputs": [
                    {"name": "INPUT0", "datatype": "INT32", "data": values},
                    {"name": "INPUT1", "datatype": "INT32", "data": values},
                ],
            }
        )
    return {"url": url, "action": "stream", "headers": headers or {}, "requests": requests}


def check_stream(answer: dict[str, Any]) -> None:
    answers = answer["answers"]
    assert len(answers) == 5
    assert "NOT_FOUND" in answers[2]["error"]["message"]
    for index in (0, 1, 3, 4):
        assert answers[index]["id"] == str(index)
        assert answers[index]["outputs"]["OUTPUT0"]["data"] == [[2 * index] * 16]
        assert answers[index]["outputs"]["OUTPUT1"]["data"] == [[0] * 16]
