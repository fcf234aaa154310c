"""Pure loss functions of EASE (and friends) over arrays; depends only on `jax`.

Every function is a pure, `jax.jit`-able function of arrays. Shapes are checked eagerly from the
static `.shape` of the inputs (so the checks also fire while tracing under `jax.jit`) and a wrong
rank or mismatched size raises `ValueError` naming the offending argument. Like `jax.nn`, the
numerical work of each function is itself jitted (one compiled program per shape when called
outside `jax.jit`; inlined when called inside). Equation numbers refer to the EASE paper.

Public functions (shapes in brackets; `...` = leading axes that broadcast against each other):

- `gaussian_nll(target, mean, var)`: `[..., D] x3 -> [...]`, diagonal Gaussian NLL (Eq. 4).
- `gaussian_cs_divergence(mean1, var1, mean2, var2)`: `[..., D] x4 -> [...]`, closed-form
  Cauchy-Schwarz divergence between diagonal Gaussians (Eq. 17, 24).
- `gaussian_cs_divergence_full(mean1, cov1, mean2, cov2)`: `[..., D], [..., D, D] -> [...]`, the
  same for full covariances.
- `adaptive_log_gram(x, y, u_x, u_y, *, tau, alpha)`: `[N, D], [M, D], [N], [M] -> [N, M]`, log of
  the uncertainty-adaptive Gaussian kernel (Eq. 5-6).
- `kernel_cs_divergence(x, y, *, u_x, u_y, tau, alpha, weight_x, weight_y)`:
  `[N, D], [M, D] -> []`, empirical kernel Cauchy-Schwarz divergence (Eq. 7), in log space.
- `consistency_mse(preds, weight)`: `[V, B] -> []`, cross-view consistency, regression (Eq. 10).
- `distillation_mse(view_preds, full_pred, weight)`: `[V, B], [B] -> []`, asymmetric
  full-to-subset distillation, regression (Eq. 11).
- `consistency_kl(logits, weight, *, symmetric)`: `[V, B, C] -> []`, KL form of Eq. 10.
- `distillation_kl(view_logits, full_logits, weight)`: `[V, B, C], [B, C] -> []`, KL form of Eq. 11.
- `weighted_mean(per_example_loss, weight)`: `[B], [B] -> []`, the batch mean every per-sample
  term uses (Eq. 4, 8, 10, 11), zero-weight (padding) rows excluded.

Batch-wise losses take an optional per-sample `weight` of shape `[B]` (the training engine pads
batches with zero-weight rows). With weights, "mean over the batch" is
`sum_b w_b l_b / max(sum_b w_b, tiny)`; `weight=None` gives the plain mean. Padded rows must still
hold finite values (their gradients are multiplied by zero, and `0 * nan` is `nan`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "adaptive_log_gram",
    "consistency_kl",
    "consistency_mse",
    "distillation_kl",
    "distillation_mse",
    "gaussian_cs_divergence",
    "gaussian_cs_divergence_full",
    "gaussian_nll",
    "kernel_cs_divergence",
    "weighted_mean",
]

_LOG_2 = math.log(2.0)
_LOG_2PI = math.log(2.0 * math.pi)
# Below this |x|, log cosh x is evaluated as 0.5 * log1p(sinh(x)^2) (accurate to full relative
# precision near 0); above it as |x| + log1p(exp(-2|x|)) - log 2 (no overflow). Both are accurate
# in between, so the exact switch point does not matter.
_LOG_COSH_SWITCH = 4.0


# --------------------------------------------------------------------------------------------
# Validation helpers: static shapes only (np.shape works on arrays, tracers, lists and scalars).
# --------------------------------------------------------------------------------------------

Shape = tuple[int, ...]


def _require_rank(fn: str, name: str, shape: Shape, layout: str, *, rank: int | None = None,
                  min_rank: int | None = None) -> None:
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{fn}: `{name}` must have rank {rank} ({layout}), got shape {shape}")
    if min_rank is not None and len(shape) < min_rank:
        raise ValueError(
            f"{fn}: `{name}` must have rank >= {min_rank} ({layout}), got shape {shape}")


def _require_size(fn: str, name: str, shape: Shape, axis: int, size: int, what: str) -> None:
    if shape[axis] != size:
        raise ValueError(
            f"{fn}: `{name}` has shape {shape}, but axis {axis} must have size {size} ({what})")


def _require_broadcastable(fn: str, leading: dict[str, Shape]) -> None:
    try:
        np.broadcast_shapes(*leading.values())
    except ValueError:
        described = ", ".join(f"`{name}` {shape}" for name, shape in leading.items())
        raise ValueError(f"{fn}: leading axes do not broadcast together: {described}") from None


def _require_weight(fn: str, name: str, weight: ArrayLike | None, size: int, what: str) -> None:
    if weight is None:
        return
    shape = np.shape(weight)
    _require_rank(fn, name, shape, "[B]" if name == "weight" else "one entry per row", rank=1)
    _require_size(fn, name, shape, 0, size, what)


# --------------------------------------------------------------------------------------------
# Numerical helpers (run inside the jitted cores).
# --------------------------------------------------------------------------------------------


def _as_float(x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _broadcast_leading(arrays: Sequence[jax.Array], core_ndims: Sequence[int]) -> list[jax.Array]:
    """Broadcast the leading axes explicitly (rank promotion may be set to "raise")."""
    batch = jnp.broadcast_shapes(
        *(a.shape[: a.ndim - k] for a, k in zip(arrays, core_ndims, strict=True)))
    return [jnp.broadcast_to(a, (*batch, *a.shape[a.ndim - k:]))
            for a, k in zip(arrays, core_ndims, strict=True)]


def weighted_mean(per_example_loss: ArrayLike, weight: ArrayLike | None = None) -> jax.Array:
    """The batch mean of a per-sample loss, with optional per-sample weights: the "mean over the
    batch" of every per-sample term (Eq. 4, 8, 10, 11 and L_sp).

        mean = sum_b w_b l_b / max(sum_b w_b, tiny)     (plain mean when `weight` is None)

    Zero-weight rows (batch padding) contribute nothing, even when they hold non-finite values.

    Args:
      per_example_loss: `[B]` the loss of each sample.
      weight: optional `[B]` non-negative weights (1 real row, 0 padding).

    Returns:
      `[]` the weighted mean.
    """
    per_example_loss = jnp.asarray(per_example_loss)
    if per_example_loss.ndim != 1:
        raise ValueError(f"per_example_loss: expected [B], got shape {per_example_loss.shape}")
    if weight is not None and jnp.shape(weight) != per_example_loss.shape:
        raise ValueError(f"weight: expected shape {per_example_loss.shape}, got "
                         f"{jnp.shape(weight)}")
    if weight is None:
        return jnp.mean(per_example_loss)
    weight = _as_float(weight)
    # `where` keeps non-finite values in zero-weight rows out of the value.
    weighted = jnp.where(weight != 0, weight * per_example_loss, 0)
    tiny = jnp.finfo(weighted.dtype).tiny
    return jnp.sum(weighted) / jnp.maximum(jnp.sum(weight), tiny)


def _log_cosh(x: jax.Array) -> jax.Array:
    abs_x = jnp.abs(x)
    # The clip keeps the unused branch finite, so `where` does not leak nan into gradients.
    small = 0.5 * jnp.log1p(jnp.square(jnp.sinh(jnp.minimum(abs_x, _LOG_COSH_SWITCH))))
    large = abs_x + jnp.log1p(jnp.exp(-2.0 * abs_x)) - _LOG_2
    return jnp.where(abs_x < _LOG_COSH_SWITCH, small, large)


def _view_pairs(num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """Static indices (i, j) of the V(V-1)/2 unordered view pairs, i < j."""
    first, second = np.triu_indices(num_views, k=1)
    return first, second


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) over the last axis."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


# --------------------------------------------------------------------------------------------
# Gaussian losses.
# --------------------------------------------------------------------------------------------


def gaussian_nll(target: ArrayLike, mean: ArrayLike, var: ArrayLike) -> jax.Array:
    """Negative log-likelihood of a diagonal Gaussian, summed over the last axis (EASE Eq. 4).

    nll = sum_d 0.5 * [ log(2 pi var_d) + (target_d - mean_d)^2 / var_d ]

    The model-level L_ucmi averages over all elements; divide by D (and average) at the call site.

    Args:
      target: `[..., D]` observed values (e.g. the clean tokens c_m).
      mean: `[..., D]` Gaussian mean mu.
      var: `[..., D]` Gaussian variance (> 0), not a standard deviation.
      Leading axes of the three broadcast against each other; D must match exactly.

    Returns:
      `[...]` NLL per leading index (the broadcast leading shape).
    """
    fn = "gaussian_nll"
    shapes = {"target": np.shape(target), "mean": np.shape(mean), "var": np.shape(var)}
    for name, shape in shapes.items():
        _require_rank(fn, name, shape, "[..., D]", min_rank=1)
    for name in ("mean", "var"):
        _require_size(fn, name, shapes[name], -1, shapes["target"][-1], "D of `target`")
    _require_broadcastable(fn, {name: shape[:-1] for name, shape in shapes.items()})
    return _gaussian_nll(target, mean, var)


@jax.jit
def _gaussian_nll(target, mean, var):
    target, mean, var = _broadcast_leading([_as_float(a) for a in (target, mean, var)], (1, 1, 1))
    per_dim = 0.5 * (_LOG_2PI + jnp.log(var) + jnp.square(target - mean) / var)
    return jnp.sum(per_dim, axis=-1)


def gaussian_cs_divergence(mean1: ArrayLike, var1: ArrayLike, mean2: ArrayLike,
                           var2: ArrayLike) -> jax.Array:
    """Closed-form Cauchy-Schwarz divergence between two diagonal Gaussians (EASE Eq. 17, 24).

    Uses the paper's squared definition (Eq. 17) for densities p = N(mean1, diag var1) and
    q = N(mean2, diag var2):

        D_CS(p, q) = -2 log int p q + log int p^2 + log int q^2.

    With int N(x; m1, v1) N(x; m2, v2) dx = N(m1; m2, v1 + v2) and int N(x; m, v)^2 dx =
    (4 pi v)^(-1/2), the 2 pi constants cancel and (Eq. 24)

        D_CS = sum_d [ (m1 - m2)^2 / (v1 + v2) + log(v1 + v2) - 0.5 log(2 v1) - 0.5 log(2 v2) ].

    The log terms equal log cosh((log v1 - log v2) / 2) >= 0, which is how they are evaluated
    (no cancellation, no overflow for far-apart variances). D_CS >= 0, symmetric, and 0 iff the
    two Gaussians are equal. The un-squared convention (Eq. 7 style) is half of this value.

    Args:
      mean1: `[..., D]` mean of p.
      var1: `[..., D]` variance of p (> 0).
      mean2: `[..., D]` mean of q.
      var2: `[..., D]` variance of q (> 0).
      Leading axes broadcast against each other; D must match exactly.

    Returns:
      `[...]` divergence per leading index.
    """
    fn = "gaussian_cs_divergence"
    shapes = {"mean1": np.shape(mean1), "var1": np.shape(var1), "mean2": np.shape(mean2),
              "var2": np.shape(var2)}
    for name, shape in shapes.items():
        _require_rank(fn, name, shape, "[..., D]", min_rank=1)
    for name in ("var1", "mean2", "var2"):
        _require_size(fn, name, shapes[name], -1, shapes["mean1"][-1], "D of `mean1`")
    _require_broadcastable(fn, {name: shape[:-1] for name, shape in shapes.items()})
    return _gaussian_cs_divergence(mean1, var1, mean2, var2)


@jax.jit
def _gaussian_cs_divergence(mean1, var1, mean2, var2):
    arrays = [_as_float(a) for a in (mean1, var1, mean2, var2)]
    mean1, var1, mean2, var2 = _broadcast_leading(arrays, (1, 1, 1, 1))
    mean_term = jnp.square(mean1 - mean2) / (var1 + var2)
    var_term = _log_cosh(0.5 * (jnp.log(var1) - jnp.log(var2)))
    return jnp.sum(mean_term + var_term, axis=-1)


def gaussian_cs_divergence_full(mean1: ArrayLike, cov1: ArrayLike, mean2: ArrayLike,
                                cov2: ArrayLike) -> jax.Array:
    """Closed-form Cauchy-Schwarz divergence between full-covariance Gaussians (EASE Eq. 17).

    Same squared definition as `gaussian_cs_divergence`; for p = N(m1, S1), q = N(m2, S2):

        D_CS = (m1 - m2)^T (S1 + S2)^{-1} (m1 - m2)
               + log det(S1 + S2) - 0.5 log det(2 S1) - 0.5 log det(2 S2),

    evaluated with Cholesky factors (log det S = 2 sum log diag chol(S)) and a triangular solve.
    On diagonal covariances it agrees with `gaussian_cs_divergence` (Eq. 24).

    Args:
      mean1: `[..., D]` mean of p.
      cov1: `[..., D, D]` covariance of p (symmetric positive definite).
      mean2: `[..., D]` mean of q.
      cov2: `[..., D, D]` covariance of q (symmetric positive definite).
      Leading axes broadcast against each other; D must match exactly. A covariance that is not
      positive definite gives nan (Cholesky failure), as in `jnp.linalg.cholesky`.

    Returns:
      `[...]` divergence per leading index.
    """
    fn = "gaussian_cs_divergence_full"
    shapes = {"mean1": np.shape(mean1), "cov1": np.shape(cov1), "mean2": np.shape(mean2),
              "cov2": np.shape(cov2)}
    for name in ("mean1", "mean2"):
        _require_rank(fn, name, shapes[name], "[..., D]", min_rank=1)
    for name in ("cov1", "cov2"):
        _require_rank(fn, name, shapes[name], "[..., D, D]", min_rank=2)
    dim = shapes["mean1"][-1]
    _require_size(fn, "mean2", shapes["mean2"], -1, dim, "D of `mean1`")
    for name in ("cov1", "cov2"):
        _require_size(fn, name, shapes[name], -2, dim, "D of `mean1`")
        _require_size(fn, name, shapes[name], -1, dim, "D of `mean1`")
    _require_broadcastable(fn, {name: shape[: len(shape) - (2 if name.startswith("cov") else 1)]
                                for name, shape in shapes.items()})
    return _gaussian_cs_divergence_full(mean1, cov1, mean2, cov2)


@jax.jit
def _gaussian_cs_divergence_full(mean1, cov1, mean2, cov2):
    arrays = [_as_float(a) for a in (mean1, cov1, mean2, cov2)]
    mean1, cov1, mean2, cov2 = _broadcast_leading(arrays, (1, 2, 1, 2))
    dim = mean1.shape[-1]

    def half_log_det(chol: jax.Array) -> jax.Array:
        return jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)

    chol_sum = jnp.linalg.cholesky(cov1 + cov2)
    whitened = jax.scipy.linalg.solve_triangular(
        chol_sum, (mean1 - mean2)[..., None], lower=True)[..., 0]
    mahalanobis = jnp.sum(jnp.square(whitened), axis=-1)
    log_det_term = (2.0 * half_log_det(chol_sum)
                    - half_log_det(jnp.linalg.cholesky(cov1))
                    - half_log_det(jnp.linalg.cholesky(cov2))
                    - dim * _LOG_2)
    return mahalanobis + log_det_term


# --------------------------------------------------------------------------------------------
# Uncertainty-adaptive kernel CS divergence.
# --------------------------------------------------------------------------------------------


def _check_sets(fn: str, x, y, u_x, u_y, tau) -> tuple[Shape, Shape]:
    x_shape, y_shape = np.shape(x), np.shape(y)
    _require_rank(fn, "x", x_shape, "[N, D]", rank=2)
    _require_rank(fn, "y", y_shape, "[M, D]", rank=2)
    _require_size(fn, "y", y_shape, 1, x_shape[1], "D of `x`")
    for name, u, rows, of in (("u_x", u_x, x_shape[0], "N of `x`"),
                              ("u_y", u_y, y_shape[0], "M of `y`")):
        if u is not None:
            _require_rank(fn, name, np.shape(u), "one entry per row", rank=1)
            _require_size(fn, name, np.shape(u), 0, rows, of)
    if isinstance(tau, (int, float)) and not tau > 0:
        raise ValueError(f"{fn}: `tau` must be > 0, got {tau}")
    return x_shape, y_shape


def adaptive_log_gram(x: ArrayLike, y: ArrayLike, u_x: ArrayLike, u_y: ArrayLike, *,
                      tau: float = 1.0, alpha: float = 1.0) -> jax.Array:
    """Log of the uncertainty-adaptive Gaussian kernel matrix (EASE Eq. 5-6).

        log K(x_i, y_j) = -||x_i - y_j||^2 / (2 tau^2 psi_ij),
        psi_ij = 1 + alpha * (u_i + u_j) / 2,

    so more uncertain pairs get a wider kernel. The kernel is written for one pair of vectors and
    vmapped over both sets; squared distances are computed pairwise (not via
    ||x||^2 + ||y||^2 - 2 x.y), so they are exact and never negative.

    Args:
      x: `[N, D]` first set of points.
      y: `[M, D]` second set of points.
      u_x: `[N]` scalar uncertainty of each x_i (>= 0; 0 for a clean/certain point).
      u_y: `[M]` scalar uncertainty of each y_j (>= 0).
      tau: kernel bandwidth (> 0).
      alpha: strength of the uncertainty adaptation (>= 0; 0 gives the plain Gaussian kernel).

    Returns:
      `[N, M]` log-gram matrix `log K(x_i, y_j)`.
    """
    fn = "adaptive_log_gram"
    for name, u in (("u_x", u_x), ("u_y", u_y)):
        if u is None:
            raise ValueError(f"{fn}: `{name}` is required (pass zeros for certain points)")
    _check_sets(fn, x, y, u_x, u_y, tau)
    return _adaptive_log_gram_jit(x, y, u_x, u_y, tau, alpha)


def _adaptive_log_gram(x, y, u_x, u_y, tau, alpha):
    x, y, u_x, u_y = (_as_float(a) for a in (x, y, u_x, u_y))

    def pair(x_i: jax.Array, y_j: jax.Array, u_i: jax.Array, u_j: jax.Array) -> jax.Array:
        psi = 1.0 + alpha * 0.5 * (u_i + u_j)
        return -jnp.sum(jnp.square(x_i - y_j)) / (2.0 * tau**2 * psi)

    against_all_y = jax.vmap(pair, in_axes=(None, 0, None, 0))
    return jax.vmap(against_all_y, in_axes=(0, None, 0, None))(x, y, u_x, u_y)


_adaptive_log_gram_jit = jax.jit(_adaptive_log_gram)


def kernel_cs_divergence(x: ArrayLike, y: ArrayLike, *, u_x: ArrayLike | None = None,
                         u_y: ArrayLike | None = None, tau: float = 1.0, alpha: float = 1.0,
                         weight_x: ArrayLike | None = None,
                         weight_y: ArrayLike | None = None) -> jax.Array:
    """Empirical kernel Cauchy-Schwarz divergence with the adaptive kernel (EASE Eq. 7).

    Un-squared form of Eq. 7, with S_ab = sum_ij K(a_i, b_j) and K from `adaptive_log_gram`
    (each side with its own uncertainties):

        L = -log( S_xy / sqrt(S_xx * S_yy) )
          = -lse(G_xy) + 0.5 * (lse(G_xx) + lse(G_yy)),

    where G_ab = log K(a_i, b_j) and lse = logsumexp over all entries. The log-space form stays
    finite where the kernel values themselves underflow (e.g. D = 128, tau = 1, sets far apart);
    elsewhere it equals the direct formula. It is half of the squared estimator
    -2 log S_xy + log S_xx + log S_yy, and exactly 0 for identical sets with identical
    uncertainties.

    Optional non-negative weights multiply kernel entries: K(a_i, b_j) -> w_i w_j K(a_i, b_j) in
    every sum, so zero-weight (padding) rows do not count. If either side's weights are all zero
    (a fully padded shard) the result is 0 with zero gradients, like the batch-wise losses.

    Args:
      x: `[N, D]` first set (e.g. pooled clean features z).
      y: `[M, D]` second set (e.g. pooled imputed features z_hat).
      u_x: `[N]` uncertainties of x, or None for zeros.
      u_y: `[M]` uncertainties of y, or None for zeros.
      tau: kernel bandwidth (> 0).
      alpha: strength of the uncertainty adaptation.
      weight_x: `[N]` non-negative row weights of x, or None for ones.
      weight_y: `[M]` non-negative row weights of y, or None for ones.

    Returns:
      `[]` scalar divergence.
    """
    fn = "kernel_cs_divergence"
    x_shape, y_shape = _check_sets(fn, x, y, u_x, u_y, tau)
    _require_weight(fn, "weight_x", weight_x, x_shape[0], "N of `x`")
    _require_weight(fn, "weight_y", weight_y, y_shape[0], "M of `y`")
    return _kernel_cs_divergence(x, y, u_x, u_y, tau, alpha, weight_x, weight_y)


@jax.jit
def _kernel_cs_divergence(x, y, u_x, u_y, tau, alpha, weight_x, weight_y):
    x, y = _as_float(x), _as_float(y)
    u_x = jnp.zeros(x.shape[:1], x.dtype) if u_x is None else u_x
    u_y = jnp.zeros(y.shape[:1], y.dtype) if u_y is None else u_y
    weighted = weight_x is not None or weight_y is not None
    if weighted:
        weight_x = jnp.ones(x.shape[:1], x.dtype) if weight_x is None else _as_float(weight_x)
        weight_y = jnp.ones(y.shape[:1], y.dtype) if weight_y is None else _as_float(weight_y)
        # A side with no weight at all (e.g. a fully padded device shard) would give nan; such a
        # call returns 0 instead, evaluated on unit weights so that gradients stay finite (zero).
        has_mass = (jnp.sum(weight_x) > 0) & (jnp.sum(weight_y) > 0)
        weight_x = jnp.where(has_mass, weight_x, 1)
        weight_y = jnp.where(has_mass, weight_y, 1)

    def log_sum(a, b, u_a, u_b, w_a, w_b):
        log_gram = _adaptive_log_gram(a, b, u_a, u_b, tau, alpha)
        # logsumexp's `b` scales entries and drops zero-scaled ones before taking the max.
        scale = w_a[:, None] * w_b[None, :] if weighted else None
        return jax.nn.logsumexp(log_gram, b=scale)

    log_s_xy = log_sum(x, y, u_x, u_y, weight_x, weight_y)
    log_s_xx = log_sum(x, x, u_x, u_x, weight_x, weight_x)
    log_s_yy = log_sum(y, y, u_y, u_y, weight_y, weight_y)
    divergence = -log_s_xy + 0.5 * (log_s_xx + log_s_yy)
    return jnp.where(has_mass, divergence, 0) if weighted else divergence


# --------------------------------------------------------------------------------------------
# Cross-view consistency and asymmetric distillation.
# --------------------------------------------------------------------------------------------


def _check_views(fn: str, name: str, shape: Shape, layout: str, min_views: int) -> None:
    _require_rank(fn, name, shape, layout, rank=layout.count(",") + 1)
    if shape[0] < min_views:
        raise ValueError(f"{fn}: `{name}` must hold at least {min_views} view(s) "
                         f"(V >= {min_views}), got shape {shape}")


def consistency_mse(preds: ArrayLike, weight: ArrayLike | None = None) -> jax.Array:
    """Cross-view consistency for a regression head (EASE Eq. 10, regression form).

        L_cons = mean_{i<j} mean_b (preds[i, b] - preds[j, b])^2

    over the V(V-1)/2 unordered pairs of views; gradients flow into both views of each pair.

    Args:
      preds: `[V, B]` predictions of V >= 2 views (e.g. the full view and the subset views).
      weight: `[B]` per-sample weights, or None for ones (weighted mean over the batch).

    Returns:
      `[]` scalar loss.
    """
    fn = "consistency_mse"
    shape = np.shape(preds)
    _check_views(fn, "preds", shape, "[V, B]", min_views=2)
    _require_weight(fn, "weight", weight, shape[1], "B of `preds`")
    return _consistency_mse(preds, weight)


@jax.jit
def _consistency_mse(preds, weight):
    preds = _as_float(preds)
    first, second = _view_pairs(preds.shape[0])
    per_pair = jnp.square(preds[first] - preds[second])  # [P, B]
    return weighted_mean(jnp.mean(per_pair, axis=0), weight)


def distillation_mse(view_preds: ArrayLike, full_pred: ArrayLike,
                     weight: ArrayLike | None = None) -> jax.Array:
    """Asymmetric full-to-subset distillation for a regression head (EASE Eq. 11).

        L_asym = mean_v mean_b (view_preds[v, b] - sg(full_pred[b]))^2,

    sg = stop_gradient: the full view is the teacher and receives no gradient from this loss.

    Args:
      view_preds: `[V, B]` predictions of V >= 1 subset views.
      full_pred: `[B]` prediction of the full view.
      weight: `[B]` per-sample weights, or None for ones (weighted mean over the batch).

    Returns:
      `[]` scalar loss.
    """
    fn = "distillation_mse"
    view_shape, full_shape = np.shape(view_preds), np.shape(full_pred)
    _check_views(fn, "view_preds", view_shape, "[V, B]", min_views=1)
    _require_rank(fn, "full_pred", full_shape, "[B]", rank=1)
    _require_size(fn, "full_pred", full_shape, 0, view_shape[1], "B of `view_preds`")
    _require_weight(fn, "weight", weight, view_shape[1], "B of `view_preds`")
    return _distillation_mse(view_preds, full_pred, weight)


@jax.jit
def _distillation_mse(view_preds, full_pred, weight):
    view_preds = _as_float(view_preds)
    teacher = jax.lax.stop_gradient(_as_float(full_pred))
    per_view = jnp.square(view_preds - jnp.broadcast_to(teacher, view_preds.shape))  # [V, B]
    return weighted_mean(jnp.mean(per_view, axis=0), weight)


def consistency_kl(logits: ArrayLike, weight: ArrayLike | None = None, *,
                   symmetric: bool = False) -> jax.Array:
    """Cross-view consistency for a classification head (EASE Eq. 10, KL form).

    With p_v = softmax(logits[v]) over the classes, the loss averages over the V(V-1)/2 unordered
    view pairs i < j, in the direction the paper writes, KL(p_S1 || p_S2):

        L_cons = mean_{i<j} mean_b KL(p_i[b] || p_j[b]),  KL(p || q) = sum_c p_c log(p_c / q_c),

    computed from `log_softmax`; gradients flow into both views. KL is asymmetric, so the order of
    the views matters (view i is the "p" side of every pair with a later view j). With
    `symmetric=True` each pair instead uses 0.5 * [KL(p_i || p_j) + KL(p_j || p_i)], which does not
    depend on the order.

    Args:
      logits: `[V, B, C]` unnormalised class scores of V >= 2 views (finite).
      weight: `[B]` per-sample weights, or None for ones (weighted mean over the batch).
      symmetric: average both KL directions per pair (a static Python bool).

    Returns:
      `[]` scalar loss.
    """
    fn = "consistency_kl"
    shape = np.shape(logits)
    _check_views(fn, "logits", shape, "[V, B, C]", min_views=2)
    _require_weight(fn, "weight", weight, shape[1], "B of `logits`")
    return _consistency_kl(logits, weight, symmetric=bool(symmetric))


@functools.partial(jax.jit, static_argnames="symmetric")
def _consistency_kl(logits, weight, *, symmetric):
    log_p = jax.nn.log_softmax(_as_float(logits), axis=-1)
    first, second = _view_pairs(log_p.shape[0])
    per_pair = _kl_from_log_probs(log_p[first], log_p[second])  # [P, B]
    if symmetric:
        per_pair = 0.5 * (per_pair + _kl_from_log_probs(log_p[second], log_p[first]))
    return weighted_mean(jnp.mean(per_pair, axis=0), weight)


def distillation_kl(view_logits: ArrayLike, full_logits: ArrayLike,
                    weight: ArrayLike | None = None) -> jax.Array:
    """Asymmetric full-to-subset distillation for a classification head (EASE Eq. 11, KL form).

        L_asym = mean_v mean_b KL(p_v[b] || sg(p_full[b])),

    in the direction the paper writes, KL(p_S || sg(p_full)) (note: the reverse of the usual
    knowledge-distillation KL(teacher || student)). p = softmax over the classes, computed from
    `log_softmax`; sg = stop_gradient, so the full view receives no gradient from this loss.

    Args:
      view_logits: `[V, B, C]` class scores of V >= 1 subset views (finite).
      full_logits: `[B, C]` class scores of the full view (finite).
      weight: `[B]` per-sample weights, or None for ones (weighted mean over the batch).

    Returns:
      `[]` scalar loss.
    """
    fn = "distillation_kl"
    view_shape, full_shape = np.shape(view_logits), np.shape(full_logits)
    _check_views(fn, "view_logits", view_shape, "[V, B, C]", min_views=1)
    _require_rank(fn, "full_logits", full_shape, "[B, C]", rank=2)
    _require_size(fn, "full_logits", full_shape, 0, view_shape[1], "B of `view_logits`")
    _require_size(fn, "full_logits", full_shape, 1, view_shape[2], "C of `view_logits`")
    _require_weight(fn, "weight", weight, view_shape[1], "B of `view_logits`")
    return _distillation_kl(view_logits, full_logits, weight)


@jax.jit
def _distillation_kl(view_logits, full_logits, weight):
    log_p_view = jax.nn.log_softmax(_as_float(view_logits), axis=-1)
    log_p_full = jax.lax.stop_gradient(jax.nn.log_softmax(_as_float(full_logits), axis=-1))
    per_view = _kl_from_log_probs(log_p_view, jnp.broadcast_to(log_p_full, log_p_view.shape))
    return weighted_mean(jnp.mean(per_view, axis=0), weight)
