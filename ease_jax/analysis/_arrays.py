"""Input conversion shared by the analysis modules (private)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_float64(x: Any, name: str) -> np.ndarray:
    """`x` (NumPy, JAX or nested sequences) as a float64 NumPy array; ValueError naming `name`
    when it cannot be converted."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not convertible to a float array ({e})") from e


def as_finite_sample(x: Any, name: str) -> np.ndarray:
    """`x` flattened to a non-empty, finite float64 vector [n]; ValueError naming `name`."""
    arr = as_float64(x, name).ravel()
    if arr.size == 0:
        raise ValueError(f"{name}: empty sample")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values")
    return arr
