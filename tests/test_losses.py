"""Tests of `ease_jax.losses` against independent float64 NumPy references.

References are numerical integrals of the densities (Cauchy-Schwarz divergences), direct products of
densities (Gaussian NLL), direct exp / sum / log evaluation of Eq. 5-7 (kernel CS) and hand-computed
small cases (consistency and distillation). Every value test runs with and without `jax.jit`.
"""

import functools
import math
import pydoc

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ease_jax.losses as L

DIMS = chex.Dimensions(B=4, V=3, C=5, D=6, N=7, M=9)


@pytest.fixture(params=["jit", "eager"])
def variant(request):
    """Wraps a function in `jax.jit` or leaves it as is (eager)."""
    if request.param == "jit":
        return jax.jit
    return lambda fn: fn


def _f32(x):
    return np.asarray(x, dtype=np.float32)


def _rel_close(actual, expected, rtol, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# Independent float64 references.
# ----------------------------------------------------------------------------------------------


def _normal_pdf_1d(x, mean, var):
    return np.exp(-((x - mean) ** 2) / (2.0 * var)) / np.sqrt(2.0 * np.pi * var)


def _normal_pdf_2d(points, mean, cov):
    """Bivariate normal density at points [..., 2]."""
    cov = np.asarray(cov, np.float64)
    det = cov[0, 0] * cov[1, 1] - cov[0, 1] * cov[1, 0]
    inv = np.array([[cov[1, 1], -cov[0, 1]], [-cov[1, 0], cov[0, 0]]]) / det
    diff = points - np.asarray(mean, np.float64)
    quad = np.einsum("...i,ij,...j->...", diff, inv, diff)
    return np.exp(-0.5 * quad) / (2.0 * np.pi * np.sqrt(det))


def _cs_from_integrals(int_pq, int_pp, int_qq):
    """Eq. 17: D_CS = -2 log int pq + log int p^2 + log int q^2."""
    return -2.0 * np.log(int_pq) + np.log(int_pp) + np.log(int_qq)


def _cs_quadrature_1d(m1, v1, m2, v2):
    m1, v1, m2, v2 = (float(a) for a in (m1, v1, m2, v2))
    sd_max, sd_min = math.sqrt(max(v1, v2)), math.sqrt(min(v1, v2))
    lo, hi = min(m1, m2) - 12.0 * sd_max, max(m1, m2) + 12.0 * sd_max
    num = int(min(max(8.0 * (hi - lo) / sd_min, 2001), 400001))
    grid = np.linspace(lo, hi, num)
    p, q = _normal_pdf_1d(grid, m1, v1), _normal_pdf_1d(grid, m2, v2)
    return _cs_from_integrals(*(np.trapezoid(f, grid) for f in (p * q, p * p, q * q)))


def _cs_quadrature_2d(m1, c1, m2, c2, num=601):
    sd_max = math.sqrt(max(np.linalg.eigvalsh(c1).max(), np.linalg.eigvalsh(c2).max()))
    lo = np.minimum(m1, m2) - 10.0 * sd_max
    hi = np.maximum(m1, m2) + 10.0 * sd_max
    xs, ys = np.linspace(lo[0], hi[0], num), np.linspace(lo[1], hi[1], num)
    points = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1)
    p, q = _normal_pdf_2d(points, m1, c1), _normal_pdf_2d(points, m2, c2)

    def integrate(f):
        return np.trapezoid(np.trapezoid(f, ys, axis=1), xs)

    return _cs_from_integrals(integrate(p * q), integrate(p * p), integrate(q * q))


def _kernel_cs_direct(x, y, u_x, u_y, tau, alpha, w_x=None, w_y=None):
    """Eq. 5-7 evaluated directly in float64: exp, plain sums, log."""
    x, y, u_x, u_y = (np.asarray(a, np.float64) for a in (x, y, u_x, u_y))
    w_x = np.ones(len(x)) if w_x is None else np.asarray(w_x, np.float64)
    w_y = np.ones(len(y)) if w_y is None else np.asarray(w_y, np.float64)

    def kernel_sum(a, b, u_a, u_b, w_a, w_b):
        total = 0.0
        for i in range(len(a)):
            for j in range(len(b)):
                psi = 1.0 + alpha * (u_a[i] + u_b[j]) / 2.0
                dist2 = np.sum((a[i] - b[j]) ** 2)
                total += w_a[i] * w_b[j] * np.exp(-dist2 / (2.0 * tau**2 * psi))
        return total

    s_xy = kernel_sum(x, y, u_x, u_y, w_x, w_y)
    s_xx = kernel_sum(x, x, u_x, u_x, w_x, w_x)
    s_yy = kernel_sum(y, y, u_y, u_y, w_y, w_y)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(s_xy / np.sqrt(s_xx * s_yy))


def _softmax64(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl64(p, q):
    return float(np.sum(p * np.log(p / q)))


# ----------------------------------------------------------------------------------------------
# Gradient helpers, defined once so that repeated calls with the same shapes reuse compilations.
# ----------------------------------------------------------------------------------------------


def _summed(fn):
    return lambda *args: jnp.sum(fn(*args))


_NLL_GRADS = jax.grad(_summed(L.gaussian_nll), argnums=(0, 1, 2))
_CS_GRADS = jax.grad(_summed(L.gaussian_cs_divergence), argnums=(0, 1, 2, 3))
_CS_FULL_GRADS = jax.grad(_summed(L.gaussian_cs_divergence_full), argnums=(0, 1, 2, 3))


def _kernel_cs_with_u(x, y, u_x, u_y):
    return L.kernel_cs_divergence(x, y, u_x=u_x, u_y=u_y)


def _kernel_cs_tau_alpha(x, y, u_x, u_y, tau, alpha):
    return L.kernel_cs_divergence(x, y, u_x=u_x, u_y=u_y, tau=tau, alpha=alpha)


def _kernel_cs_weighted(x, y, u_x, u_y, weight_x, weight_y):
    return L.kernel_cs_divergence(x, y, u_x=u_x, u_y=u_y, weight_x=weight_x, weight_y=weight_y)


_KERNEL_CS_VALUE_AND_GRADS = jax.value_and_grad(_kernel_cs_with_u, argnums=(0, 1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Gaussian NLL (Eq. 4).
# ----------------------------------------------------------------------------------------------


def test_gaussian_nll_matches_log_of_density_product(variant):
    rng = np.random.default_rng(0)
    target, mean = _f32(rng.normal(size=(DIMS.B, DIMS.D))), _f32(rng.normal(size=(DIMS.B, DIMS.D)))
    var = _f32(rng.uniform(0.2, 3.0, size=(DIMS.B, DIMS.D)))
    fn = variant(L.gaussian_nll)
    out = fn(target, mean, var)
    chex.assert_shape(out, DIMS["B"])
    density = np.prod(_normal_pdf_1d(target.astype(np.float64), mean.astype(np.float64),
                                     var.astype(np.float64)), axis=-1)
    _rel_close(out, -np.log(density), rtol=1e-5)
    # Tiny variance: large but finite value, finite gradients.
    target, mean, var = np.ones((DIMS.B, DIMS.D), np.float32), 0 * target, 0 * var + 1e-6
    _rel_close(fn(target, mean, var), DIMS.D * 0.5 * (math.log(2e-6 * math.pi) + 1e6), rtol=1e-5)
    chex.assert_tree_all_finite(variant(_NLL_GRADS)(target, mean, var))


def test_gaussian_nll_broadcasts_leading_axes(variant):
    rng = np.random.default_rng(1)
    target = _f32(rng.normal(size=(DIMS.N, DIMS.D)))
    mean = _f32(rng.normal(size=(2, 1, DIMS.D)))
    var = _f32(rng.uniform(0.5, 2.0, size=(DIMS.D,)))
    out = variant(L.gaussian_nll)(target, mean, var)
    chex.assert_shape(out, (2, DIMS.N))
    density = np.prod(_normal_pdf_1d(target.astype(np.float64), mean.astype(np.float64),
                                     var.astype(np.float64)), axis=-1)
    _rel_close(out, -np.log(density), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Closed-form Cauchy-Schwarz divergence (Eq. 17, 24).
# ----------------------------------------------------------------------------------------------

CASES_1D = [
    (0.0, 1.0, 1.0, 2.0),
    (0.5, 0.3, -1.2, 1.7),
    (0.0, 1.0, 0.0, 4.0),  # same mean, different variance
    (0.0, 1.0, 3.0, 1.0),  # same variance, different mean
    (2.0, 0.01, 1.5, 0.5),
]


def test_cs_divergence_diag_matches_1d_quadrature(variant):
    fn = variant(L.gaussian_cs_divergence)
    for case in CASES_1D:
        args = [_f32([a]) for a in case]
        out = fn(*args)
        chex.assert_shape(out, ())
        _rel_close(out, _cs_quadrature_1d(*(a[0] for a in args)), rtol=1e-4, atol=0)


def test_cs_divergence_diag_matches_2d_quadrature(variant):
    m1, v1, m2, v2 = _f32([0.3, -0.4]), _f32([0.8, 1.5]), _f32([-0.5, 0.6]), _f32([1.2, 0.4])
    out = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    expected = _cs_quadrature_2d(m1.astype(np.float64), np.diag(v1.astype(np.float64)),
                                 m2.astype(np.float64), np.diag(v2.astype(np.float64)))
    _rel_close(out, expected, rtol=1e-4)


def test_cs_divergence_diag_broadcasts_and_matches_per_dim_quadrature(variant):
    # For product densities every integral factorises, so D_CS is the sum of 1-D divergences.
    rng = np.random.default_rng(2)
    d = 3
    m1, v1 = _f32(rng.normal(size=(4, 1, d))), _f32(rng.uniform(0.3, 2.0, size=(d,)))
    m2, v2 = _f32(rng.normal(size=(2, d))), _f32(rng.uniform(0.3, 2.0, size=(1, 2, d)))
    out = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    chex.assert_shape(out, (4, 2))
    expected = np.zeros((4, 2))
    for i in range(4):
        for j in range(2):
            expected[i, j] = sum(_cs_quadrature_1d(m1[i, 0, k], v1[k], m2[j, k], v2[0, j, k])
                                 for k in range(d))
    _rel_close(out, expected, rtol=1e-4)


def test_cs_divergence_diag_properties(variant):
    rng = np.random.default_rng(4)
    shape = (500, DIMS.D)
    m1, m2 = _f32(rng.normal(size=shape)), _f32(rng.normal(size=shape))
    v1 = _f32(np.exp(rng.uniform(-8, 8, size=shape)))
    v2 = _f32(np.exp(rng.uniform(-8, 8, size=shape)))
    cs = variant(L.gaussian_cs_divergence)
    forward, backward = cs(m1, v1, m2, v2), cs(m2, v2, m1, v1)
    np.testing.assert_allclose(forward, backward, rtol=1e-6)
    assert np.all(np.asarray(forward) >= 0)
    # Near-equal pairs: the log-variance term must not round below zero.
    assert np.all(np.asarray(cs(m1, v1, m1, v1 * np.float32(1 + 1e-6))) >= 0)
    # Zero iff equal: exactly zero at equality, positive when only the mean or the variance moves.
    np.testing.assert_array_equal(cs(m1, v1, m1, v1), 0.0)
    assert np.all(np.asarray(cs(m1, v1, m1 + np.float32(0.01), v1)) > 0)
    assert np.all(np.asarray(cs(m1, v1, m1, v1 * np.float32(1.1))) > 0)


def test_cs_divergence_diag_gradients_stable_and_match_analytic(variant):
    # Shapes [2, 128] throughout, so the gradient is compiled once for the whole test.
    grad_fn = variant(_CS_GRADS)
    # Variance ratios on both sides of the log-cosh branch switch (|log ratio| = 8), up to e^40,
    # tiled over the [2, 128] grid.
    log_ratio = np.resize([0.0, 1e-3, 0.5, 7.9, 8.1, 20.0, -20.0, 40.0], (2, 128))
    v1, v2 = np.exp(0.5 * log_ratio), np.exp(-0.5 * log_ratio)
    m1, m2 = np.full_like(v1, 0.7), np.full_like(v1, -0.2)
    grads = grad_fn(*(_f32(a) for a in (m1, v1, m2, v2)))
    s = v1 + v2
    expected = (2.0 * (m1 - m2) / s,
                -((m1 - m2) ** 2) / s**2 + 1.0 / s - 0.5 / v1,
                -2.0 * (m1 - m2) / s,
                -((m1 - m2) ** 2) / s**2 + 1.0 / s - 0.5 / v2)
    for actual, value in zip(grads, expected, strict=True):
        np.testing.assert_allclose(actual, value, rtol=1e-4, atol=1e-6)
    # Tiny variances (1e-6) with means 100 apart, and variances 12 orders of magnitude apart.
    m1, m2 = np.zeros((2, 128), np.float32), np.full((2, 128), 100.0, np.float32)
    v1 = np.full((2, 128), 1e-6, np.float32)
    v2 = np.stack([np.full(128, 1e-6), np.full(128, 1e6)]).astype(np.float32)
    out = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    chex.assert_tree_all_finite(out)
    _rel_close(out[0], 128 * (100.0**2 / 2e-6), rtol=1e-5)
    chex.assert_tree_all_finite(grad_fn(m1, v1, m2, v2))
    for g in grad_fn(m1, v1, m1, v1):  # the minimum: every gradient is exactly zero
        np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------------
# Full-covariance CS divergence.
# ----------------------------------------------------------------------------------------------


def _random_spd(rng, batch, dim):
    a = rng.normal(size=(*batch, dim, dim))
    return _f32(a @ np.swapaxes(a, -1, -2) / dim + 0.5 * np.eye(dim))


def test_cs_divergence_full_matches_2d_quadrature_non_diagonal(variant):
    m1, m2 = _f32([0.0, 0.2]), _f32([1.0, -0.5])
    c1 = _f32([[1.0, 0.6], [0.6, 2.0]])
    c2 = _f32([[0.5, -0.3], [-0.3, 0.8]])
    out = variant(L.gaussian_cs_divergence_full)(m1, c1, m2, c2)
    chex.assert_shape(out, ())
    expected = _cs_quadrature_2d(*(a.astype(np.float64) for a in (m1, c1, m2, c2)))
    _rel_close(out, expected, rtol=1e-4)


def test_cs_divergence_full_agrees_with_diag_and_properties(variant):
    rng = np.random.default_rng(5)
    m1, m2 = _f32(rng.normal(size=(DIMS.B, DIMS.D))), _f32(rng.normal(size=(DIMS.B, DIMS.D)))
    v1 = _f32(rng.uniform(0.1, 3.0, (DIMS.B, DIMS.D)))
    v2 = _f32(rng.uniform(0.1, 3.0, (DIMS.B, DIMS.D)))
    eye = np.eye(DIMS.D, dtype=np.float32)
    fn = variant(L.gaussian_cs_divergence_full)
    full = fn(m1, eye * v1[..., None], m2, eye * v2[..., None])
    diag = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    chex.assert_shape(full, DIMS["B"])
    np.testing.assert_allclose(full, diag, rtol=1e-5, atol=1e-5)
    # Symmetric, positive, zero at equality, with non-diagonal covariances (same shapes: cached).
    c1, c2 = _random_spd(rng, (DIMS.B,), DIMS.D), _random_spd(rng, (DIMS.B,), DIMS.D)
    forward = fn(m1, c1, m2, c2)
    np.testing.assert_allclose(forward, fn(m2, c2, m1, c1), rtol=1e-5)
    assert np.all(np.asarray(forward) > 0)
    np.testing.assert_allclose(fn(m1, c1, m1, c1), 0.0, atol=1e-5)


def test_cs_divergence_full_broadcasts_leading_axes(variant):
    rng = np.random.default_rng(6)
    d = 4  # as in the gradient test below: the per-pair calls share its compilation
    m1, c1 = _f32(rng.normal(size=(2, 1, d))), _random_spd(rng, (), d)
    m2, c2 = _f32(rng.normal(size=(4, d))), _random_spd(rng, (2, 4), d)
    fn = variant(L.gaussian_cs_divergence_full)
    out = fn(m1, c1, m2, c2)
    chex.assert_shape(out, (2, 4))
    per_pair = np.array([[fn(m1[i, 0], c1, m2[j], c2[i, j]) for j in range(4)] for i in range(2)])
    np.testing.assert_allclose(out, per_pair, rtol=1e-5)


def test_cs_divergence_full_stable_gradients(variant):
    d = 4
    m1, m2 = np.zeros(d, np.float32), np.full(d, 100.0, np.float32)
    c1 = _f32(np.eye(d) * 1e-6)
    c2 = _f32(np.eye(d) * 1e-6 + 1e-7 * np.ones((d, d)))
    out = variant(L.gaussian_cs_divergence_full)(m1, c1, m2, c2)
    chex.assert_tree_all_finite(out)
    assert float(out) > 1e9
    chex.assert_tree_all_finite(variant(_CS_FULL_GRADS)(m1, c1, m2, c2))


# ----------------------------------------------------------------------------------------------
# Adaptive kernel and kernel CS divergence (Eq. 5-7).
# ----------------------------------------------------------------------------------------------


def test_adaptive_log_gram_matches_formula(variant):
    rng = np.random.default_rng(7)
    x, y = _f32(rng.normal(size=(DIMS.N, DIMS.D))), _f32(rng.normal(size=(DIMS.M, DIMS.D)))
    u_x, u_y = _f32(rng.uniform(0, 2, DIMS.N)), _f32(rng.uniform(0, 2, DIMS.M))
    out = variant(functools.partial(L.adaptive_log_gram, tau=1.5, alpha=0.7))(x, y, u_x, u_y)
    chex.assert_shape(out, DIMS["NM"])
    expected = np.empty((DIMS.N, DIMS.M))
    for i in range(DIMS.N):
        for j in range(DIMS.M):
            psi = 1.0 + 0.7 * (float(u_x[i]) + float(u_y[j])) / 2.0
            dist2 = np.sum((x[i].astype(np.float64) - y[j]) ** 2)
            expected[i, j] = -dist2 / (2.0 * 1.5**2 * psi)
    _rel_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,scale", [(4, 1.0), (128, 0.08)])
def test_kernel_cs_matches_direct_evaluation(variant, dim, scale):
    rng = np.random.default_rng(dim)
    x = _f32(scale * rng.normal(size=(DIMS.N, dim)))
    y = _f32(scale * rng.normal(size=(DIMS.M, dim)) + 0.5 * scale)
    u_x, u_y = _f32(rng.uniform(0, 1, DIMS.N)), _f32(rng.uniform(0, 1, DIMS.M))
    fn = variant(_kernel_cs_tau_alpha)
    for tau, alpha in ((1.0, 1.0), (2.0, 0.5)):  # tau and alpha are traced: one compilation
        out = fn(x, y, u_x, u_y, tau, alpha)
        chex.assert_shape(out, ())
        expected = _kernel_cs_direct(x, y, u_x, u_y, tau, alpha)
        assert np.isfinite(expected) and abs(expected) > 1e-3
        _rel_close(out, expected, rtol=1e-4)


def test_kernel_cs_zero_for_identical_sets_and_none_means_zero_uncertainty(variant):
    rng = np.random.default_rng(8)
    x, y = _f32(rng.normal(size=(DIMS.N, 3))), _f32(rng.normal(size=(DIMS.N, 3)))
    u = _f32(rng.uniform(0, 1, DIMS.N))
    fn = variant(L.kernel_cs_divergence)
    assert float(fn(x, x)) == 0.0
    assert float(fn(x, x, u_x=u, u_y=u)) == 0.0
    perm = np.arange(DIMS.N)[::-1]
    assert float(fn(x, x[perm], u_x=u, u_y=u[perm])) == pytest.approx(0.0, abs=1e-6)
    zeros = np.zeros(DIMS.N, np.float32)
    np.testing.assert_allclose(fn(x, y), fn(x, y, u_x=zeros, u_y=zeros), rtol=1e-6)


def test_kernel_cs_finite_where_direct_formula_underflows(variant):
    rng = np.random.default_rng(9)
    dim = 128
    x = _f32(0.1 * rng.normal(size=(DIMS.N, dim)))
    y = _f32(0.1 * rng.normal(size=(DIMS.M, dim)) + 100.0)
    u_x, u_y = np.full(DIMS.N, 0.5, np.float32), np.zeros(DIMS.M, np.float32)
    with np.errstate(over="ignore", under="ignore"):
        direct = _kernel_cs_direct(x, y, u_x, u_y, 1.0, 1.0)
    assert not np.isfinite(direct)
    value_and_grads = variant(_KERNEL_CS_VALUE_AND_GRADS)
    out, grads = value_and_grads(x, y, u_x, u_y)
    chex.assert_tree_all_finite((out, grads))
    # Every cross distance^2 / (2 psi) is close to 128 * 100^2 / (2 * 1.25) = 512_000.
    _rel_close(out, dim * 100.0**2 / 2.5, rtol=0.01)
    # Constant sets, all x_i = a and all y_j = b, u = 0.4 on both sides: S_xx = N^2, S_yy = M^2,
    # S_xy = N M K(a, b), so L = -log K(a, b) = ||a - b||^2 / (2 tau^2 (1 + alpha u)) exactly.
    u_x, u_y = np.full(DIMS.N, 0.4, np.float32), np.full(DIMS.M, 0.4, np.float32)
    out, grads = value_and_grads(0 * x, 0 * y + 100.0, u_x, u_y)
    _rel_close(out, dim * 100.0**2 / (2.0 * 1.4), rtol=1e-5)
    chex.assert_tree_all_finite(grads)


def test_kernel_cs_weights(variant):
    rng = np.random.default_rng(10)
    x, y = _f32(rng.normal(size=(DIMS.N, 3))), _f32(rng.normal(size=(DIMS.M, 3)) + 0.5)
    u_x, u_y = _f32(rng.uniform(0, 1, DIMS.N)), _f32(rng.uniform(0, 1, DIMS.M))
    fn = variant(L.kernel_cs_divergence)
    base = fn(x, y, u_x=u_x, u_y=u_y)
    # Padding rows with zero weight (far away, with large uncertainty) change nothing.
    x_pad = np.concatenate([x, np.full((3, 3), 1e3, np.float32)])
    u_x_pad = np.concatenate([u_x, np.full(3, 5.0, np.float32)])
    y_pad = np.concatenate([y, np.full((2, 3), -7.0, np.float32)])
    u_y_pad = np.concatenate([u_y, np.zeros(2, np.float32)])
    w_x = np.concatenate([np.ones(DIMS.N), np.zeros(3)]).astype(np.float32)
    w_y = np.concatenate([np.ones(DIMS.M), np.zeros(2)]).astype(np.float32)

    value_and_grads = variant(jax.value_and_grad(_kernel_cs_weighted, argnums=(0, 1)))
    padded, grads = value_and_grads(x_pad, y_pad, u_x_pad, u_y_pad, w_x, w_y)
    np.testing.assert_allclose(padded, base, rtol=1e-6)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0][DIMS.N:], 0.0)
    np.testing.assert_array_equal(grads[1][DIMS.M:], 0.0)
    # A fully padded side gives 0 and zero (finite) gradients instead of nan.
    empty, grads = value_and_grads(x_pad, y_pad, u_x_pad, u_y_pad, np.zeros_like(w_x), w_y)
    np.testing.assert_array_equal(empty, 0.0)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
    # Fractional weights on one side (the other side None = ones) match the direct formula.
    frac_x = _f32(rng.uniform(0.1, 2, DIMS.N))
    weighted = fn(x, y, u_x=u_x, u_y=u_y, weight_x=frac_x)
    _rel_close(weighted, _kernel_cs_direct(x, y, u_x, u_y, 1.0, 1.0, frac_x), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Cross-view consistency and distillation (Eq. 10-11).
# ----------------------------------------------------------------------------------------------

PREDS = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]], np.float32)


def test_consistency_mse_hand_computed(variant):
    fn = variant(L.consistency_mse)
    out = fn(PREDS)
    chex.assert_shape(out, ())
    # Pairs (0,1): (4+9)/2, (0,2): (1+4)/2, (1,2): (9+25)/2 -> mean 26/3.
    np.testing.assert_allclose(out, 26.0 / 3.0, rtol=1e-6)
    # Per-sample means over pairs are 14/3 and 38/3; weights (1, 3) -> (14/3 + 38) / 4 = 32/3.
    np.testing.assert_allclose(fn(PREDS, np.array([1.0, 3.0], np.float32)), 32.0 / 3.0, rtol=1e-6)


def test_consistency_mse_gradients_reach_every_view(variant):
    grads = variant(jax.grad(L.consistency_mse))(PREDS)
    assert np.all(np.asarray(grads) != 0)
    # d/dp_0 of mean over 3 pairs and 2 samples: 2 * ((p0 - p1) + (p0 - p2)) / 6.
    np.testing.assert_allclose(grads[0], 2.0 * ((PREDS[0] - PREDS[1]) + PREDS[0]) / 6.0, rtol=1e-6)


def test_distillation_mse_hand_computed_and_stop_gradient(variant):
    views, full = PREDS[:2], np.array([0.0, 1.0], np.float32)
    fn = variant(L.distillation_mse)
    out = fn(views, full)
    chex.assert_shape(out, ())
    # View 0: (1, 1); view 1: (9, 16) -> mean 27/4.
    np.testing.assert_allclose(out, 6.75, rtol=1e-6)
    np.testing.assert_allclose(fn(views, full, np.array([0.0, 2.0], np.float32)), 8.5, rtol=1e-6)
    g_views, g_full = variant(jax.grad(L.distillation_mse, argnums=(0, 1)))(views, full)
    np.testing.assert_array_equal(g_full, 0.0)
    assert np.all(np.asarray(g_views) != 0)


def test_consistency_kl_hand_computed(variant):
    p0, p1 = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    logits = _f32(np.log(np.stack([p0, p1]))[:, None, :] + 3.0)  # shift: softmax is invariant
    kl_01 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_10 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    out = variant(L.consistency_kl)(logits)
    chex.assert_shape(out, ())
    np.testing.assert_allclose(out, kl_01, rtol=1e-5)
    symmetric = variant(functools.partial(L.consistency_kl, symmetric=True))(logits)
    np.testing.assert_allclose(symmetric, 0.5 * (kl_01 + kl_10), rtol=1e-5)


def test_consistency_kl_pairs_and_weights(variant):
    rng = np.random.default_rng(11)
    logits = _f32(rng.normal(size=(DIMS.V, DIMS.B, DIMS.C)))
    weight = _f32([1.0, 0.5, 0.0, 2.0])
    probs = _softmax64(logits)
    per_sample = np.array([
        np.mean([_kl64(probs[i, b], probs[j, b])
                 for i in range(DIMS.V) for j in range(i + 1, DIMS.V)])
        for b in range(DIMS.B)])
    fn = variant(L.consistency_kl)
    np.testing.assert_allclose(fn(logits), per_sample.mean(), rtol=1e-5)
    np.testing.assert_allclose(fn(logits, weight), np.sum(weight * per_sample) / np.sum(weight),
                               rtol=1e-5)
    grads = variant(jax.grad(L.consistency_kl))(logits)
    assert all(np.any(np.asarray(grads[v]) != 0) for v in range(DIMS.V))


def test_distillation_kl_hand_computed_and_stop_gradient(variant):
    p_view, p_full = np.array([0.25, 0.75]), np.array([0.5, 0.5])
    view_logits = _f32(np.log(p_view)[None, None, :])
    full_logits = _f32(np.log(p_full)[None, :] - 1.0)
    fn = variant(L.distillation_kl)
    out = fn(view_logits, full_logits)
    chex.assert_shape(out, ())
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-5)

    rng = np.random.default_rng(12)
    views = _f32(rng.normal(size=(DIMS.V, DIMS.B, DIMS.C)))
    full = _f32(rng.normal(size=(DIMS.B, DIMS.C)))
    probs_v, probs_f = _softmax64(views), _softmax64(full)
    per_sample = np.array([np.mean([_kl64(probs_v[v, b], probs_f[b]) for v in range(DIMS.V)])
                           for b in range(DIMS.B)])
    np.testing.assert_allclose(fn(views, full), per_sample.mean(), rtol=1e-5)
    g_views, g_full = variant(jax.grad(L.distillation_kl, argnums=(0, 1)))(views, full)
    np.testing.assert_array_equal(g_full, 0.0)
    assert np.any(np.asarray(g_views) != 0)


# Per function: shapes of the arguments, with the batch axis given by its position of "B".
BATCH_LOSSES = {
    "consistency_mse": (("V", "B"),),
    "distillation_mse": (("V", "B"), ("B",)),
    "consistency_kl": (("V", "B", "C"),),
    "distillation_kl": (("V", "B", "C"), ("B", "C")),
}


@pytest.mark.parametrize("name", sorted(BATCH_LOSSES))
def test_zero_weight_padding_matches_unpadded(variant, name):
    rng = np.random.default_rng(13)
    b, pad = DIMS.B, 3
    sizes = {"V": DIMS.V, "B": b + pad, "C": DIMS.C}
    padded_args, unpadded_args = [], []
    for layout in BATCH_LOSSES[name]:
        axis = layout.index("B")
        a = _f32(rng.normal(size=[sizes[k] for k in layout]))
        kept = np.take(a, np.arange(b), axis=axis)
        # Large values in the padded rows must not leak into the value.
        garbage = np.full_like(np.take(a, np.arange(pad), axis=axis), 1e4)
        padded_args.append(np.concatenate([kept, garbage], axis=axis))
        unpadded_args.append(kept)
    weight = np.concatenate([np.ones(b), np.zeros(pad)]).astype(np.float32)
    fn = variant(getattr(L, name))
    expected = fn(*unpadded_args)
    chex.assert_shape(expected, ())
    # Unit weights on the kept rows reproduce the plain mean of weight=None.
    np.testing.assert_allclose(fn(*padded_args, weight), expected, rtol=1e-6)
    # All-zero weights give 0, not nan.
    np.testing.assert_array_equal(fn(*padded_args, np.zeros(b + pad, np.float32)), 0.0)


# ----------------------------------------------------------------------------------------------
# Validation: every wrong shape raises ValueError naming the argument (also while tracing).
# ----------------------------------------------------------------------------------------------

_z = np.zeros
ERROR_CASES = [
    # (function, args, kwargs, argument named in the message)
    (L.gaussian_nll, (_z(()), _z(3), _z(3)), {}, "target"),
    (L.gaussian_nll, (_z(3), _z(4), _z(3)), {}, "mean"),
    (L.gaussian_nll, (_z(3), _z(3), _z((2, 4))), {}, "var"),
    (L.gaussian_nll, (_z((2, 3)), _z((4, 3)), _z(3)), {}, "mean"),
    (L.gaussian_cs_divergence, (_z(()), _z(3), _z(3), _z(3)), {}, "mean1"),
    (L.gaussian_cs_divergence, (_z(3), _z(2), _z(3), _z(3)), {}, "var1"),
    (L.gaussian_cs_divergence, (_z(3), _z(3), _z(4), _z(3)), {}, "mean2"),
    (L.gaussian_cs_divergence, (_z(3), _z(3), _z(3), _z((5, 2))), {}, "var2"),
    (L.gaussian_cs_divergence, (_z((2, 3)), _z(3), _z((5, 3)), _z(3)), {}, "mean2"),
    (L.gaussian_cs_divergence_full, (_z(()), _z((3, 3)), _z(3), _z((3, 3))), {}, "mean1"),
    (L.gaussian_cs_divergence_full, (_z(3), _z(3), _z(3), _z((3, 3))), {}, "cov1"),
    (L.gaussian_cs_divergence_full, (_z(3), _z((3, 3)), _z(2), _z((3, 3))), {}, "mean2"),
    (L.gaussian_cs_divergence_full, (_z(3), _z((3, 3)), _z(3), _z((3, 4))), {}, "cov2"),
    (L.gaussian_cs_divergence_full, (_z(3), _z((4, 3)), _z(3), _z((3, 3))), {}, "cov1"),
    (L.gaussian_cs_divergence_full, (_z((2, 3)), _z((3, 3)), _z(3), _z((5, 3, 3))), {}, "cov2"),
    (L.adaptive_log_gram, (_z(3), _z((2, 3)), _z(1), _z(2)), {}, "x"),
    (L.adaptive_log_gram, (_z((4, 3)), _z((2, 5)), _z(4), _z(2)), {}, "y"),
    (L.adaptive_log_gram, (_z((4, 3)), _z((2, 3)), _z(3), _z(2)), {}, "u_x"),
    (L.adaptive_log_gram, (_z((4, 3)), _z((2, 3)), _z(4), _z((2, 1))), {}, "u_y"),
    (L.adaptive_log_gram, (_z((4, 3)), _z((2, 3)), _z(4), _z(2)), {"tau": 0.0}, "tau"),
    (L.adaptive_log_gram, (_z((4, 3)), _z((2, 3)), None, _z(2)), {}, "u_x"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z((2, 3))), {"tau": -1.0}, "tau"),
    (L.kernel_cs_divergence, (_z((4, 3, 1)), _z((2, 3))), {}, "x"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z(3)), {}, "y"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z((2, 4))), {}, "y"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z((2, 3))), {"u_x": _z(2)}, "u_x"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z((2, 3))), {"u_y": _z((2, 1))}, "u_y"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z((2, 3))), {"weight_x": _z(2)}, "weight_x"),
    (L.kernel_cs_divergence, (_z((4, 3)), _z((2, 3))), {"weight_y": _z((2, 1))}, "weight_y"),
    (L.consistency_mse, (_z(4),), {}, "preds"),
    (L.consistency_mse, (_z((1, 4)),), {}, "preds"),
    (L.consistency_mse, (_z((2, 4)), _z(3)), {}, "weight"),
    (L.consistency_mse, (_z((2, 4)), _z((4, 1))), {}, "weight"),
    (L.distillation_mse, (_z(4), _z(4)), {}, "view_preds"),
    (L.distillation_mse, (_z((0, 4)), _z(4)), {}, "view_preds"),
    (L.distillation_mse, (_z((2, 4)), _z(3)), {}, "full_pred"),
    (L.distillation_mse, (_z((2, 4)), _z((4, 1))), {}, "full_pred"),
    (L.distillation_mse, (_z((2, 4)), _z(4), _z(5)), {}, "weight"),
    (L.consistency_kl, (_z((2, 4)),), {}, "logits"),
    (L.consistency_kl, (_z((1, 4, 3)),), {}, "logits"),
    (L.consistency_kl, (_z((2, 4, 3)), _z(2)), {}, "weight"),
    (L.distillation_kl, (_z((4, 3)), _z((4, 3))), {}, "view_logits"),
    (L.distillation_kl, (_z((0, 4, 3)), _z((4, 3))), {}, "view_logits"),
    (L.distillation_kl, (_z((2, 4, 3)), _z(3)), {}, "full_logits"),
    (L.distillation_kl, (_z((2, 4, 3)), _z((5, 3))), {}, "full_logits"),
    (L.distillation_kl, (_z((2, 4, 3)), _z((4, 2))), {}, "full_logits"),
    (L.distillation_kl, (_z((2, 4, 3)), _z((4, 3)), _z(3)), {}, "weight"),
]


@pytest.mark.parametrize(
    "fn,args,kwargs,arg_name", ERROR_CASES,
    ids=[f"{case[0].__name__}-{case[3]}-{i}" for i, case in enumerate(ERROR_CASES)])
def test_shape_errors_name_the_argument(variant, fn, args, kwargs, arg_name):
    with pytest.raises(ValueError, match=f"`{arg_name}`"):
        variant(functools.partial(fn, **kwargs))(*args)


def test_public_api_is_documented():
    assert sorted(L.__all__) == sorted(name for name in dir(L) if not name.startswith("_")
                                       and callable(getattr(L, name))
                                       and getattr(L, name).__module__ == L.__name__)
    assert all(name in L.__doc__ for name in L.__all__)
    for name in L.__all__:
        doc = getattr(L, name).__doc__
        assert "Eq." in doc and "Args:" in doc and "Returns:" in doc and "[" in doc, name
    rendered = pydoc.render_doc(L, renderer=pydoc.plaintext)
    assert all(name in rendered for name in L.__all__)
