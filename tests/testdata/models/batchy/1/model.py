"""Sleeps max(INPUT0) seconds, then returns INPUT0 and, per row, how many rows the call carried.

A negative value makes it raise (a model fault); a value above 100 makes it refuse the input (InvalidInput).
"""

import time

import numpy as np

from services.inference.runtimes import InvalidInput


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        if (values < 0).any():
            raise ValueError("negative input")
        if (values > 100).any():
            raise InvalidInput("INPUT0 holds a value above 100")
        time.sleep(float(values.max()))
        rows = values.shape[0]
        return {"OUTPUT0": values, "OUTPUT1": np.full(rows, rows, dtype=np.int32)}
