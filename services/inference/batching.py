"""Dynamic batching, the plain part: which requests may ride together, and how their rows are joined and split.

Triton's semantics: requests to the same model version whose tensors agree in everything but the
first (batch) dimension, and that ask for the same outputs, are concatenated along that dimension
into one worker call of at most ``max_batch_size`` rows; each request gets exactly its own rows of
every output back. The scheduling (when a batch goes, deadlines, cancellation) is the pool's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a pool batches: ``max_rows`` 0 = never (every request is its own worker call)."""

    max_rows: int = 0
    max_queue_delay: float = 0.0  # seconds a batch may wait for more rows, counted from its oldest request
    preferred: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.max_rows > 0

    def full(self, rows: int) -> bool:
        """A batch of ``rows`` need not wait for more."""
        return rows >= self.max_rows or rows in self.preferred or (bool(self.preferred) and rows >= max(self.preferred))


def batch_key(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple[Hashable, int] | None:
    """What must match for requests to share a batch, and this request's rows; None if it cannot batch.

    Every input must have at least one dimension and all must agree on the first (the rows).
    """
    rows = -1
    parts = []
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0:
            return None
        if rows < 0:
            rows = int(array.shape[0])
        elif array.shape[0] != rows:
            return None
        parts.append((name, array.dtype.str, array.shape[1:]))
    if rows < 1:
        return None
    return (tuple(parts), tuple(outputs)), rows


def join(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The inputs of several requests as one: each tensor concatenated along the first dimension."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([inputs[name] for inputs in requests]) for name in requests[0]}


class SplitError(ValueError):
    """The model answered a batch with outputs that do not have one row per input row."""


def split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output (views, not copies), in the order of ``rows``."""
    if len(rows) == 1:
        return [dict(outputs)]
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise SplitError(f"output {name} has shape {list(array.shape)} for a batch of {total} rows")
    parts = []
    start = 0
    for count in rows:
        parts.append({name: array[start : start + count] for name, array in outputs.items()})
        start += count
    return parts
