"""Loads for a minute, then returns its input."""

import time

import numpy as np

time.sleep(60)


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"]}
