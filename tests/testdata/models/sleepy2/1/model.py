"""Sleeps float(INPUT0.flat[0]) seconds, then OUTPUT0 = INPUT0."""

import time

import numpy as np


class Model:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        value = inputs["INPUT0"]
        time.sleep(max(0.0, float(value.flat[0])))
        return {"OUTPUT0": value}
