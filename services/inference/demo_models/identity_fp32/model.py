"""OUTPUT0 = INPUT0, an FP32 matrix of any size."""

from __future__ import annotations

import numpy as np


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"]}
