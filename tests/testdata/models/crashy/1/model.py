"""Fails on request: INPUT0[0] == 1 raises, == 2 kills the worker process (exit code 3), == 3 runs out of memory."""

import os

import numpy as np


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        value = inputs["INPUT0"]
        first = int(value[0]) if value.size else 0
        if first == 1:
            raise RuntimeError("model failed on purpose")
        if first == 2:
            os._exit(3)
        if first == 3:
            raise MemoryError
        return {"OUTPUT0": value}
