"""Sleeps max(INPUT0) seconds, then returns INPUT0 and, per row, how many rows the call carried."""

import time

import numpy as np


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        if (values < 0).any():
            raise ValueError("negative input")
        time.sleep(float(values.max()))
        rows = values.shape[0]
        return {"OUTPUT0": values, "OUTPUT1": np.full(rows, rows, dtype=np.int32)}
