"""OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1 (INT32, wrapping on overflow as Triton's does)."""

from __future__ import annotations

import numpy as np


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        left, right = inputs["INPUT0"], inputs["INPUT1"]
        if left.shape != right.shape:
            raise ValueError(f"INPUT0 has shape {left.shape}, INPUT1 {right.shape}: they must match")
        return {"OUTPUT0": left + right, "OUTPUT1": left - right}
