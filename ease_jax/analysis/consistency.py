"""Cross-view prediction consistency (EASE Fig. 6 MOSEI, Fig. 9 MOSI; docs/protocol.md section 11).

Predictions of the same test samples from the completed (incomplete, imputed) input and from the
observed full input: 1-D Wasserstein distance between the two prediction distributions, instance
Pearson correlation and MAE of the pairs. Paper, MOSEI: W 0.1748 -> 0.0288 with MIPC,
Pearson 0.6153 -> 0.7328, MAE 0.398 with MIPC.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ease_jax.analysis._arrays import as_finite_sample, as_float64

__all__ = ["pearson", "prediction_consistency", "wasserstein_1d"]


def wasserstein_1d(a: Any, b: Any) -> float:
    """1-Wasserstein distance between the empirical distributions of two samples.

    W_1 = integral over R of |F_a(t) - F_b(t)| dt, exact: both empirical CDFs are step functions,
    so the integral is a sum over the gaps of the merged sorted support (equals
    scipy.stats.wasserstein_distance(a, b)).

    Args:
      a: [...] sample, flattened to [n_a]; non-empty and finite.
      b: [...] sample, flattened to [n_b] (n_b may differ from n_a); non-empty and finite.

    Returns:
      W_1 >= 0 as a Python float, in the units of the samples.
    """
    a = np.sort(as_finite_sample(a, "a"))
    b = np.sort(as_finite_sample(b, "b"))
    support = np.sort(np.concatenate([a, b]))
    gaps = np.diff(support)
    # On [support_k, support_{k+1}) each CDF is constant: the fraction of its sample <= support_k.
    cdf_a = np.searchsorted(a, support[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, support[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * gaps))


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two paired vectors [n] (flattened); NaN when either is constant
    (including n = 1) instead of a division by zero."""
    x = as_float64(x, "x").ravel()
    y = as_float64(y, "y").ravel()
    if x.shape != y.shape:
        raise ValueError(f"y: {y.size} values do not pair with the {x.size} of x")
    if x.size == 0 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    r = np.sum(xc * yc) / np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    return float(np.clip(r, -1.0, 1.0))


def prediction_consistency(full: Any, partial: Any) -> dict[str, float | int]:
    """Agreement of paired predictions from the full and the completed input (Fig. 6 / 9).

    Args:
      full: [N] predictions from the observed full input (any shape; flattened).
      partial: [N] predictions of the same samples from the incomplete, imputed input; same shape.

    Returns:
      {"wasserstein": wasserstein_1d(full, partial), "pearson": Pearson r (NaN when either side is
      constant), "mae": mean |full - partial|, "n": N}.

    Raises:
      ValueError: shapes differ, or a side is empty or has a non-finite value.
    """
    full = as_float64(full, "full")
    partial = as_float64(partial, "partial")
    if partial.shape != full.shape:
        raise ValueError(f"partial: shape {partial.shape} does not match full {full.shape}")
    full = as_finite_sample(full, "full")
    partial = as_finite_sample(partial, "partial")
    return {
        "wasserstein": wasserstein_1d(full, partial),
        "pearson": pearson(full, partial),
        "mae": float(np.mean(np.abs(full - partial))),
        "n": int(full.size),
    }
