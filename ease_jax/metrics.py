"""MMSA-exact regression metrics (docs/protocol.md section 3; MMSA ``metricsTop``).

MOSI / MOSEI, with p = predictions and y = labels (flattened):

* ``Mult_acc_7``: clip p and y to [-3, 3], round both half to even (``np.round``), fraction equal.
* ``Mult_acc_5``: the same after clipping to [-2, 2].
* ``Has0_acc_2`` / ``Has0_F1_score``: negative vs non-negative, ``y >= 0`` vs ``p >= 0``.
* ``Non0_acc_2`` / ``Non0_F1_score``: only samples with ``y != 0``; ``y > 0`` vs ``p > 0``
  (NaN with a warning when every label is 0).
* ``MAE`` = mean |p - y| (unclipped); ``Corr`` = Pearson correlation (NaN with a warning when p or y
  is constant).

SIMS: clip p and y to [-1, 1] first; MAE and Corr on the clipped values; classes from left-open,
right-closed bins (``np.digitize(x, edges, right=True)``): ``Mult_acc_2`` edges {0} (a label of 0
is negative), ``Mult_acc_3`` edges {-0.1, 0.1}, ``Mult_acc_5`` edges {-0.7, -0.1, 0.1, 0.7};
``F1_score`` = weighted F1 of the 2-class labels.

F1 is support-weighted with the TRUE labels as ``y_true`` (the MMSA call order; passing the
predictions first was a historic bug that inflated SIMS F1). Values are unrounded Python floats,
accuracies in [0, 1].

Precision: float32 inputs stay float32 for clipping and binning, so a float32 prediction that
prints as 0.1 falls in the same SIMS bin as in the reference (whose tensors are float32 and whose
edges are compared in float32); other inputs are used as float64. MAE and Corr use float64.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["LOWER_IS_BETTER", "METRIC_KEYS", "regression_metrics", "weighted_f1"]

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "mosi": ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5",
             "Mult_acc_7", "MAE", "Corr"),
    "mosei": ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5",
              "Mult_acc_7", "MAE", "Corr"),
    "sims": ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"),
}
LOWER_IS_BETTER = frozenset({"MAE"})

SIMS_EDGES = {
    2: (0.0,),
    3: (-0.1, 0.1),
    5: (-0.7, -0.1, 0.1, 0.7),
}


def _as_vector(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as e:
        raise ValueError(f"{name}: not convertible to an array ({e})") from e
    if arr.dtype.name in ("bfloat16", "float16"):  # ml_dtypes / half: exact in float32
        arr = arr.astype(np.float32)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if sum(d > 1 for d in arr.shape) > 1:
        raise ValueError(f"{name}: expected one value per sample (1-D after flattening size-1 "
                         f"axes), got shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError(f"{name}: empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {int(np.sum(~np.isfinite(arr)))} non-finite value(s)")
    return arr


def weighted_f1(y_true: Any, y_pred: Any) -> float:
    """Support-weighted F1 over the classes of ``y_true`` (sklearn ``average='weighted'``).

    Per class c: ``F1_c = 2 TP / (2 TP + FP + FN)``, weighted by the number of true samples of c.
    Classes that occur only in ``y_pred`` have weight 0. A class with no true sample never gets
    weight, so no 0/0 arises for a non-empty ``y_true``; an empty input gives 0.0 (sklearn's
    ``zero_division`` default, without its warning).
    """
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_pred: length {p.size} differs from y_true length {t.size}")
    if t.size == 0:
        return 0.0
    total = 0.0
    for c in np.unique(t):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        total += np.sum(t == c) * (2.0 * tp / (2.0 * tp + fp + fn))
    return float(total / t.size)


def _accuracy(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def _pearson(p: np.ndarray, y: np.ndarray) -> float:
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    if np.all(p == p[0]) or np.all(y == y[0]):
        which = "predictions" if np.all(p == p[0]) else "labels"
        warnings.warn(f"Corr is NaN: the {which} are constant", RuntimeWarning, stacklevel=3)
        return float("nan")
    pc = p - p.mean()
    yc = y - y.mean()
    r = np.sum(pc * yc) / np.sqrt(np.sum(pc * pc) * np.sum(yc * yc))
    return float(np.clip(r, -1.0, 1.0))


def _mae(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(p.astype(np.float64) - y.astype(np.float64))))


def _mosi_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    out["Has0_acc_2"] = _accuracy(y >= 0, p >= 0)
    out["Has0_F1_score"] = weighted_f1(y >= 0, p >= 0)
    nz = y != 0
    if np.any(nz):
        out["Non0_acc_2"] = _accuracy(y[nz] > 0, p[nz] > 0)
        out["Non0_F1_score"] = weighted_f1(y[nz] > 0, p[nz] > 0)
    else:
        warnings.warn("Non0 metrics are NaN: every label is 0", RuntimeWarning, stacklevel=3)
        out["Non0_acc_2"] = out["Non0_F1_score"] = float("nan")
    out["Mult_acc_5"] = _accuracy(np.round(np.clip(p, -2.0, 2.0)), np.round(np.clip(y, -2.0, 2.0)))
    out["Mult_acc_7"] = _accuracy(np.round(np.clip(p, -3.0, 3.0)), np.round(np.clip(y, -3.0, 3.0)))
    out["MAE"] = _mae(p, y)
    out["Corr"] = _pearson(p, y)
    return out


def _bins(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Left-open, right-closed classes: c such that edges[c-1] < x <= edges[c]."""
    return np.digitize(x, np.asarray(edges, dtype=x.dtype), right=True)


def _sims_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    p = np.clip(p, -1.0, 1.0)
    y = np.clip(y, -1.0, 1.0)
    cls = {k: (_bins(p, e), _bins(y, e)) for k, e in SIMS_EDGES.items()}
    return {
        "Mult_acc_2": _accuracy(*cls[2]),
        "Mult_acc_3": _accuracy(*cls[3]),
        "Mult_acc_5": _accuracy(*cls[5]),
        "F1_score": weighted_f1(cls[2][1], cls[2][0]),
        "MAE": _mae(p, y),
        "Corr": _pearson(p, y),
    }


def regression_metrics(preds: Any, labels: Any, dataset: str) -> dict[str, float]:
    """MMSA regression metrics of ``preds`` against ``labels`` for ``dataset``.

    Args:
      preds: predictions, any shape with N elements (flattened).
      labels: true labels, N elements.
      dataset: "mosi", "mosei" or "sims".
    Returns:
      dict with exactly the keys ``METRIC_KEYS[dataset]``, unrounded Python floats.
    Raises:
      ValueError naming the argument: unknown dataset, non-numeric / empty / non-finite input, or
      different numbers of elements.
    """
    if dataset not in METRIC_KEYS:
        raise ValueError(f"dataset: expected one of {tuple(METRIC_KEYS)}, got {dataset!r}")
    p = _as_vector(preds, "preds")
    y = _as_vector(labels, "labels")
    if p.size != y.size:
        raise ValueError(f"preds: {p.size} elements but labels has {y.size}")
    out = _sims_metrics(p, y) if dataset == "sims" else _mosi_metrics(p, y)
    return {k: out[k] for k in METRIC_KEYS[dataset]}
