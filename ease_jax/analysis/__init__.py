"""Analyses of trained models (EASE Sec. 4.4-4.5, Appendix A.6; docs/protocol.md section 11).

Pure NumPy functions of model outputs (NumPy or JAX arrays in, float64 NumPy / Python floats out):

* `calibration`: standardized residuals of the UCMI Gaussian and their KS statistic (Fig. 4).
* `elastic`: rigid vs elastic alignment penalties against the difficulty rank (Fig. 5 / 8).
* `consistency`: Wasserstein / Pearson / MAE between full and completed predictions (Fig. 6 / 9).
"""

from ease_jax.analysis.calibration import ks_normal, normal_cdf, standardized_residuals
from ease_jax.analysis.consistency import pearson, prediction_consistency, wasserstein_1d
from ease_jax.analysis.elastic import elastic_penalty, elastic_ratio, percentile_rank

__all__ = [
    "elastic_penalty",
    "elastic_ratio",
    "ks_normal",
    "normal_cdf",
    "pearson",
    "percentile_rank",
    "prediction_consistency",
    "standardized_residuals",
    "wasserstein_1d",
]
