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
# Gaussian NLL (Eq. 4).
# ----------------------------------------------------------------------------------------------


def test_gaussian_nll_matches_log_of_density_product(variant):
    rng = np.random.default_rng(0)
    target, mean = _f32(rng.normal(size=(DIMS.B, DIMS.D))), _f32(rng.normal(size=(DIMS.B, DIMS.D)))
    var = _f32(rng.uniform(0.2, 3.0, size=(DIMS.B, DIMS.D)))
    out = variant(L.gaussian_nll)(target, mean, var)
    chex.assert_shape(out, DIMS["B"])
    density = np.prod(_normal_pdf_1d(target.astype(np.float64), mean.astype(np.float64),
                                     var.astype(np.float64)), axis=-1)
    _rel_close(out, -np.log(density), rtol=1e-5)


def test_gaussian_nll_broadcasts_leading_axes(variant):
    rng = np.random.default_rng(1)
    target = _f32(rng.normal(size=(DIMS.N, DIMS.D)))
    mean = _f32(rng.normal(size=(2, 1, DIMS.D)))
    var = _f32(rng.uniform(0.5, 2.0, size=(DIMS.D,)))
    out = variant(L.gaussian_nll)(target, mean, var)
    chex.assert_shape(out, (2, DIMS.N))
    full = [np.broadcast_to(a, (2, DIMS.N, DIMS.D)) for a in (target, mean, var)]
    np.testing.assert_allclose(out, L.gaussian_nll(*full), rtol=1e-6)


def test_gaussian_nll_tiny_variance_is_finite_with_finite_grads(variant):
    target, mean, var = jnp.ones((3, 4)), jnp.zeros((3, 4)), jnp.full((3, 4), 1e-6)
    out = variant(L.gaussian_nll)(target, mean, var)
    chex.assert_tree_all_finite(out)
    grads = variant(jax.grad(lambda *a: jnp.sum(L.gaussian_nll(*a)), argnums=(0, 1, 2)))(
        target, mean, var)
    chex.assert_tree_all_finite(grads)


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


@pytest.mark.parametrize("m1,v1,m2,v2", CASES_1D)
def test_cs_divergence_diag_matches_1d_quadrature(variant, m1, v1, m2, v2):
    args = [_f32([a]) for a in (m1, v1, m2, v2)]
    out = variant(L.gaussian_cs_divergence)(*args)
    chex.assert_shape(out, ())
    _rel_close(out, _cs_quadrature_1d(*(a[0] for a in args)), rtol=1e-4)


def test_cs_divergence_diag_matches_2d_quadrature(variant):
    m1, v1, m2, v2 = _f32([0.3, -0.4]), _f32([0.8, 1.5]), _f32([-0.5, 0.6]), _f32([1.2, 0.4])
    out = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    expected = _cs_quadrature_2d(m1.astype(np.float64), np.diag(v1.astype(np.float64)),
                                 m2.astype(np.float64), np.diag(v2.astype(np.float64)))
    _rel_close(out, expected, rtol=1e-4)


def test_cs_divergence_diag_batch_matches_per_dim_quadrature(variant):
    # For product densities every integral factorises, so D_CS is the sum of 1-D divergences.
    rng = np.random.default_rng(2)
    m1, m2 = _f32(rng.normal(size=(3, 4))), _f32(rng.normal(size=(3, 4)))
    v1, v2 = _f32(rng.uniform(0.3, 2.0, (3, 4))), _f32(rng.uniform(0.3, 2.0, (3, 4)))
    out = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    chex.assert_shape(out, (3,))
    expected = np.array([
        sum(_cs_quadrature_1d(m1[b, d], v1[b, d], m2[b, d], v2[b, d]) for d in range(4))
        for b in range(3)])
    _rel_close(out, expected, rtol=1e-4)


def test_cs_divergence_diag_broadcasts_leading_axes(variant):
    rng = np.random.default_rng(3)
    m1 = _f32(rng.normal(size=(4, 1, DIMS.D)))
    v1 = _f32(rng.uniform(0.5, 2, size=(DIMS.D,)))
    m2 = _f32(rng.normal(size=(3, DIMS.D)))
    v2 = _f32(rng.uniform(0.5, 2, size=(1, 3, DIMS.D)))
    out = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    chex.assert_shape(out, (4, 3))
    full = [np.broadcast_to(a, (4, 3, DIMS.D)) for a in (m1, v1, m2, v2)]
    np.testing.assert_allclose(out, L.gaussian_cs_divergence(*full), rtol=1e-6)


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
    near = cs(m1, v1, m1, v1 * np.float32(1 + 1e-6))
    assert np.all(np.asarray(near) >= 0)
    # Zero iff equal: exactly zero at equality, positive when only the mean or the variance moves.
    np.testing.assert_array_equal(cs(m1, v1, m1, v1), 0.0)
    assert np.all(np.asarray(cs(m1, v1, m1 + np.float32(0.01), v1)) > 0)
    assert np.all(np.asarray(cs(m1, v1, m1, v1 * np.float32(1.1))) > 0)


def test_cs_divergence_diag_gradients_match_analytic(variant):
    # Variance ratios on both sides of the log-cosh branch switch, up to e^40.
    log_ratio = np.array([0.0, 1e-3, 0.5, 7.9, 8.1, 20.0, -20.0, 40.0])
    v1 = np.exp(0.5 * log_ratio)
    v2 = np.exp(-0.5 * log_ratio)
    m1, m2 = np.full_like(v1, 0.7), np.full_like(v1, -0.2)
    args = [_f32(a)[:, None] for a in (m1, v1, m2, v2)]
    grads = variant(jax.grad(lambda *a: jnp.sum(L.gaussian_cs_divergence(*a)), argnums=(1, 3)))(
        *args)
    s = v1 + v2
    expected_v1 = -((m1 - m2) ** 2) / s**2 + 1.0 / s - 0.5 / v1
    expected_v2 = -((m1 - m2) ** 2) / s**2 + 1.0 / s - 0.5 / v2
    np.testing.assert_allclose(np.asarray(grads[0])[:, 0], expected_v1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1])[:, 0], expected_v2, rtol=1e-4, atol=1e-6)


def test_cs_divergence_diag_stable_for_tiny_variance_and_far_means(variant):
    m1, m2 = jnp.zeros((2, 128)), jnp.full((2, 128), 100.0)
    v1, v2 = jnp.full((2, 128), 1e-6), jnp.stack([jnp.full(128, 1e-6), jnp.full(128, 1e6)])
    fn = variant(L.gaussian_cs_divergence)
    out = fn(m1, v1, m2, v2)
    chex.assert_tree_all_finite(out)
    _rel_close(out[0], 128 * (100.0**2 / 2e-6), rtol=1e-5)
    grads = variant(jax.grad(lambda *a: jnp.sum(L.gaussian_cs_divergence(*a)),
                             argnums=(0, 1, 2, 3)))(m1, v1, m2, v2)
    chex.assert_tree_all_finite(grads)
    at_equality = variant(jax.grad(lambda *a: jnp.sum(L.gaussian_cs_divergence(*a)),
                                   argnums=(0, 1, 2, 3)))(m1, v1, m1, v1)
    for g in at_equality:
        np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------------
# Full-covariance CS divergence.
# ----------------------------------------------------------------------------------------------


def test_cs_divergence_full_matches_2d_quadrature_non_diagonal(variant):
    m1, m2 = _f32([0.0, 0.2]), _f32([1.0, -0.5])
    c1 = _f32([[1.0, 0.6], [0.6, 2.0]])
    c2 = _f32([[0.5, -0.3], [-0.3, 0.8]])
    out = variant(L.gaussian_cs_divergence_full)(m1, c1, m2, c2)
    chex.assert_shape(out, ())
    expected = _cs_quadrature_2d(*(a.astype(np.float64) for a in (m1, c1, m2, c2)))
    _rel_close(out, expected, rtol=1e-4)


def test_cs_divergence_full_agrees_with_diag(variant):
    rng = np.random.default_rng(5)
    m1, m2 = _f32(rng.normal(size=(DIMS.B, DIMS.D))), _f32(rng.normal(size=(DIMS.B, DIMS.D)))
    v1 = _f32(rng.uniform(0.1, 3.0, (DIMS.B, DIMS.D)))
    v2 = _f32(rng.uniform(0.1, 3.0, (DIMS.B, DIMS.D)))
    eye = np.eye(DIMS.D, dtype=np.float32)
    full = variant(L.gaussian_cs_divergence_full)(m1, eye * v1[..., None], m2, eye * v2[..., None])
    diag = variant(L.gaussian_cs_divergence)(m1, v1, m2, v2)
    chex.assert_shape(full, DIMS["B"])
    np.testing.assert_allclose(full, diag, rtol=1e-5, atol=1e-5)


def _random_spd(rng, batch, dim):
    a = rng.normal(size=(*batch, dim, dim))
    return _f32(a @ np.swapaxes(a, -1, -2) / dim + 0.5 * np.eye(dim))


def test_cs_divergence_full_broadcasts_and_properties(variant):
    rng = np.random.default_rng(6)
    d = 3
    m1, c1 = _f32(rng.normal(size=(2, 1, d))), _random_spd(rng, (), d)
    m2, c2 = _f32(rng.normal(size=(4, d))), _random_spd(rng, (2, 4), d)
    fn = variant(L.gaussian_cs_divergence_full)
    out = fn(m1, c1, m2, c2)
    chex.assert_shape(out, (2, 4))
    full_args = (np.broadcast_to(m1, (2, 4, d)), np.broadcast_to(c1, (2, 4, d, d)),
                 np.broadcast_to(m2, (2, 4, d)), c2)
    np.testing.assert_allclose(out, L.gaussian_cs_divergence_full(*full_args), rtol=1e-6)
    np.testing.assert_allclose(out, fn(m2, c2, m1, c1), rtol=1e-5)
    assert np.all(np.asarray(out) > 0)
    np.testing.assert_allclose(fn(m2, c2, m2, c2), 0.0, atol=1e-5)


def test_cs_divergence_full_stable_gradients(variant):
    d = 4
    m1, m2 = jnp.zeros(d), jnp.full(d, 100.0)
    c1 = jnp.eye(d) * 1e-6
    c2 = jnp.eye(d) * 1e-6 + 1e-7 * jnp.ones((d, d))
    out = variant(L.gaussian_cs_divergence_full)(m1, c1, m2, c2)
    chex.assert_tree_all_finite(out)
    assert float(out) > 1e9
    grads = variant(jax.grad(L.gaussian_cs_divergence_full, argnums=(0, 1, 2, 3)))(m1, c1, m2, c2)
    chex.assert_tree_all_finite(grads)


# ----------------------------------------------------------------------------------------------
# Adaptive kernel and kernel CS divergence (Eq. 5-7).
# ----------------------------------------------------------------------------------------------


def test_adaptive_log_gram_matches_formula(variant):
    rng = np.random.default_rng(7)
    x, y = _f32(rng.normal(size=(DIMS.N, DIMS.D))), _f32(rng.normal(size=(DIMS.M, DIMS.D)))
    u_x, u_y = _f32(rng.uniform(0, 2, DIMS.N)), _f32(rng.uniform(0, 2, DIMS.M))
    fn = variant(functools.partial(L.adaptive_log_gram, tau=1.5, alpha=0.7))
    out = fn(x, y, u_x, u_y)
    chex.assert_shape(out, DIMS["NM"])
    expected = np.empty((DIMS.N, DIMS.M))
    for i in range(DIMS.N):
        for j in range(DIMS.M):
            psi = 1.0 + 0.7 * (float(u_x[i]) + float(u_y[j])) / 2.0
            dist2 = np.sum((x[i].astype(np.float64) - y[j]) ** 2)
            expected[i, j] = -dist2 / (2.0 * 1.5**2 * psi)
    _rel_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,scale,tau,alpha", [(4, 1.0, 1.0, 1.0), (4, 1.0, 2.0, 0.5),
                                                 (128, 0.08, 1.0, 1.0)])
def test_kernel_cs_matches_direct_evaluation(variant, dim, scale, tau, alpha):
    rng = np.random.default_rng(dim)
    x = _f32(scale * rng.normal(size=(DIMS.N, dim)))
    y = _f32(scale * rng.normal(size=(DIMS.M, dim)) + 0.5 * scale)
    u_x, u_y = _f32(rng.uniform(0, 1, DIMS.N)), _f32(rng.uniform(0, 1, DIMS.M))
    fn = variant(functools.partial(L.kernel_cs_divergence, tau=tau, alpha=alpha))
    out = fn(x, y, u_x=u_x, u_y=u_y)
    chex.assert_shape(out, ())
    expected = _kernel_cs_direct(x, y, u_x, u_y, tau, alpha)
    assert np.isfinite(expected) and abs(expected) > 1e-3
    _rel_close(out, expected, rtol=1e-4)
    # u = None means zero uncertainty on that side.
    no_u = fn(x, y)
    _rel_close(no_u, _kernel_cs_direct(x, y, np.zeros(DIMS.N), np.zeros(DIMS.M), tau, alpha),
               rtol=1e-4)


def test_kernel_cs_zero_for_identical_sets(variant):
    rng = np.random.default_rng(8)
    x = _f32(rng.normal(size=(DIMS.N, DIMS.D)))
    u = _f32(rng.uniform(0, 1, DIMS.N))
    fn = variant(L.kernel_cs_divergence)
    assert float(fn(x, x)) == 0.0
    assert float(fn(x, x, u_x=u, u_y=u)) == 0.0
    assert float(fn(x, x[::-1].copy(), u_x=u, u_y=u[::-1].copy())) == pytest.approx(0.0, abs=1e-6)


def test_kernel_cs_finite_where_direct_formula_underflows(variant):
    rng = np.random.default_rng(9)
    dim = 128
    x = _f32(0.1 * rng.normal(size=(DIMS.N, dim)))
    y = _f32(0.1 * rng.normal(size=(DIMS.M, dim)) + 100.0)
    with np.errstate(over="ignore", under="ignore"):
        direct = _kernel_cs_direct(x, y, np.zeros(DIMS.N), np.zeros(DIMS.M), 1.0, 1.0)
    assert not np.isfinite(direct)
    fn = variant(L.kernel_cs_divergence)
    out = fn(x, y)
    chex.assert_tree_all_finite(out)
    # Every cross distance^2 / 2 is close to 128 * 100^2 / 2 = 640_000.
    _rel_close(out, dim * 100.0**2 / 2.0, rtol=0.01)
    grads = variant(jax.grad(L.kernel_cs_divergence, argnums=(0, 1)))(x, y)
    chex.assert_tree_all_finite(grads)
    u_grads = variant(jax.grad(lambda u_x, u_y: L.kernel_cs_divergence(x, y, u_x=u_x, u_y=u_y),
                               argnums=(0, 1)))(jnp.full(DIMS.N, 0.5), jnp.zeros(DIMS.M))
    chex.assert_tree_all_finite(u_grads)


def test_kernel_cs_constant_sets_exact_value(variant):
    # All x_i = a and all y_j = b: S_xx = N^2, S_yy = M^2, S_xy = N M K(a, b), so L = -log K(a, b).
    dim, tau, alpha, u = 128, 1.0, 1.0, 0.4
    x = jnp.zeros((DIMS.N, dim))
    y = jnp.full((DIMS.M, dim), 100.0)
    fn = variant(functools.partial(L.kernel_cs_divergence, tau=tau, alpha=alpha))
    out = fn(x, y, u_x=jnp.full(DIMS.N, u), u_y=jnp.full(DIMS.M, u))
    _rel_close(out, dim * 100.0**2 / (2.0 * tau**2 * (1.0 + alpha * u)), rtol=1e-5)


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
    padded = fn(x_pad, y_pad, u_x=u_x_pad, u_y=u_y_pad, weight_x=w_x, weight_y=w_y)
    np.testing.assert_allclose(padded, base, rtol=1e-6)
    # Only one side weighted.
    one_side = fn(x_pad, y, u_x=u_x_pad, u_y=u_y, weight_x=w_x)
    np.testing.assert_allclose(one_side, base, rtol=1e-6)
    # Unit weights equal no weights; fractional weights match the direct weighted formula.
    ones = fn(x, y, u_x=u_x, u_y=u_y, weight_x=np.ones(DIMS.N, np.float32),
              weight_y=np.ones(DIMS.M, np.float32))
    np.testing.assert_allclose(ones, base, rtol=1e-6)
    frac_x, frac_y = _f32(rng.uniform(0.1, 2, DIMS.N)), _f32(rng.uniform(0.1, 2, DIMS.M))
    weighted = fn(x, y, u_x=u_x, u_y=u_y, weight_x=frac_x, weight_y=frac_y)
    _rel_close(weighted, _kernel_cs_direct(x, y, u_x, u_y, 1.0, 1.0, frac_x, frac_y), rtol=1e-4)
    # Gradients stay finite, and padding rows get none.
    grads = variant(jax.grad(
        lambda a, b: L.kernel_cs_divergence(a, b, u_x=u_x_pad, u_y=u_y_pad, weight_x=w_x,
                                            weight_y=w_y), argnums=(0, 1)))(x_pad, y_pad)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0][DIMS.N:], 0.0)


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
    np.testing.assert_allclose(fn(PREDS[:2]), 6.5, rtol=1e-6)


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
    views = _f32(rng.normal(size=(2, DIMS.B, DIMS.C)))
    full = _f32(rng.normal(size=(DIMS.B, DIMS.C)))
    probs_v, probs_f = _softmax64(views), _softmax64(full)
    per_sample = np.array([np.mean([_kl64(probs_v[v, b], probs_f[b]) for v in range(2)])
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
    np.testing.assert_allclose(fn(*padded_args, weight), expected, rtol=1e-6)
    # All-ones weights give the plain mean of weight=None.
    np.testing.assert_allclose(fn(*unpadded_args, np.ones(b, np.float32)), expected, rtol=1e-6)
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
