"""OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1, every element a decimal integer as a string.

An element that is not a decimal integer is the client's mistake: ``InvalidInput`` answers it with
INVALID_ARGUMENT (reason ``MODEL_REJECTED_INPUT``) instead of INTERNAL.
"""

from __future__ import annotations

import numpy as np

from services.inference.runtimes import InvalidInput


def _integers(name: str, strings: np.ndarray) -> np.ndarray:
    try:
        values = [int(item) for item in strings.flat]  # int() takes b"42" as well as "42"
    except ValueError:
        raise InvalidInput(f"{name} must hold decimal integers") from None
    return np.array(values, dtype=np.int64).reshape(strings.shape)


def _strings(values: np.ndarray) -> np.ndarray:
    strings = np.empty(values.shape, dtype=object)
    strings.flat[:] = [str(value).encode() for value in values.flat]
    return strings


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        left, right = _integers("INPUT0", inputs["INPUT0"]), _integers("INPUT1", inputs["INPUT1"])
        if left.shape != right.shape:
            raise InvalidInput(f"INPUT0 has shape {left.shape}, INPUT1 {right.shape}: they must match")
        return {"OUTPUT0": _strings(left + right), "OUTPUT1": _strings(left - right)}
