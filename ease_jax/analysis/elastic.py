"""Elastic vs rigid alignment penalties (EASE Fig. 5 MOSEI, Fig. 8 MOSI; Appendix A.6).

Per test sample and modality, the reconstruction difficulty e = ||z - z_hat||^2 between the pooled
clean tokens z and the pooled imputation z_hat (mean over tokens, as in L_uada, docs/protocol.md section
7). A rigid (uncertainty-blind) kernel penalises e as is; the elastic kernel of Eq. 6 divides it by
psi = 1 + alpha * (u + u_hat) / 2 with the clean side at u = 0, so uncertain imputations are
penalised less. The paper plots both against the percentile rank of e and reports
mean(elastic) / mean(rigid) ~ 0.4 for language.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ease_jax.analysis._arrays import as_float64

__all__ = ["elastic_penalty", "elastic_ratio", "percentile_rank"]


def percentile_rank(values: Any) -> np.ndarray:
    """Percentile ranks in [0, 100] of a vector: 0 for the smallest, 100 for the largest.

    rank_i = 100 * (r_i - 1) / (n - 1) with r_i the 1-based rank of values_i; tied values share the
    mean of their ranks (scipy.stats.rankdata(method="average")). A single value gets 0.

    Args:
      values: [n] finite values, n >= 1.

    Returns:
      [n] float64 percentile ranks.
    """
    values = as_float64(values, "values")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values: expected a non-empty vector [n], got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values: contains non-finite values")
    n = values.size
    if n == 1:
        return np.zeros(1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    mean_rank = first + (counts - 1) / 2.0
    return 100.0 * mean_rank[inverse] / (n - 1)


def elastic_penalty(
    clean: Any, imputed: Any, uncertainty: Any, *, alpha: float = 1.0
) -> dict[str, np.ndarray]:
    """Rigid and elastic penalties of imputations (Eq. 6; Fig. 5 / 8; Appendix A.6).

    difficulty_i = ||clean_i - imputed_i||^2 (squared Euclidean over D),
    psi_i = 1 + alpha * (0 + u_i) / 2 (Eq. 6, the clean side at u = 0),
    rigid_i = difficulty_i, elastic_i = difficulty_i / psi_i,
    rank_i = percentile rank of difficulty_i in [0, 100] (ties: mean rank; see `percentile_rank`).

    Args:
      clean: [N, D] pooled clean features z.
      imputed: [N, D] pooled imputations z_hat (sampled or the mean, the caller's choice).
      uncertainty: [N] sample uncertainties u_hat >= 0 (mean of the imputer's variance).
      alpha: >= 0, the elasticity of Eq. 6 (paper: 1).

    Returns:
      dict of float64 [N] arrays: "difficulty", "psi", "rigid", "elastic", "rank".

    Raises:
      ValueError: bad shapes, N = 0, non-finite features, a negative (or NaN) `uncertainty`, or a
        negative `alpha`.
    """
    clean = as_float64(clean, "clean")
    imputed = as_float64(imputed, "imputed")
    uncertainty = as_float64(uncertainty, "uncertainty")
    if clean.ndim != 2 or clean.shape[0] == 0:
        raise ValueError(f"clean: expected [N, D] with N >= 1, got shape {clean.shape}")
    if imputed.shape != clean.shape:
        raise ValueError(f"imputed: shape {imputed.shape} does not match clean {clean.shape}")
    if uncertainty.shape != clean.shape[:1]:
        raise ValueError(
            f"uncertainty: expected shape {clean.shape[:1]}, got {uncertainty.shape}")
    if not (np.all(np.isfinite(clean)) and np.all(np.isfinite(imputed))):
        raise ValueError("clean / imputed: contain non-finite values")
    if not np.all(uncertainty >= 0):
        raise ValueError("uncertainty: every value must be >= 0 (and not NaN)")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: must be finite and >= 0, got {alpha}")
    difficulty = np.sum((clean - imputed) ** 2, axis=-1)
    psi = 1.0 + alpha * (0.0 + uncertainty) / 2.0
    return {
        "difficulty": difficulty,
        "psi": psi,
        "rigid": difficulty.copy(),
        "elastic": difficulty / psi,
        "rank": percentile_rank(difficulty),
    }


def elastic_ratio(pen: dict[str, Any]) -> float:
    """mean(elastic) / mean(rigid) of an `elastic_penalty` result (paper: ~0.4 for language).

    NaN when every difficulty is 0. ValueError naming `pen` when a key is missing or a shape is
    wrong.
    """
    if not all(k in pen for k in ("elastic", "rigid")):
        raise ValueError("pen: needs the keys 'elastic' and 'rigid' (an elastic_penalty result)")
    elastic = as_float64(pen["elastic"], "pen['elastic']")
    rigid = as_float64(pen["rigid"], "pen['rigid']")
    if elastic.shape != rigid.shape or elastic.size == 0:
        raise ValueError(f"pen: 'elastic' {elastic.shape} and 'rigid' {rigid.shape} must be "
                         "non-empty and of one shape")
    mean_rigid = float(np.mean(rigid))
    if mean_rigid == 0.0:
        return float("nan")
    return float(np.mean(elastic)) / mean_rigid
