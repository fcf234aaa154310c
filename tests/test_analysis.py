"""Tests for ease_jax.analysis: hand-computed cases and scipy as the independent reference."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ease_jax.analysis import (
    elastic_penalty,
    elastic_ratio,
    ks_normal,
    normal_cdf,
    pearson,
    percentile_rank,
    prediction_consistency,
    standardized_residuals,
    wasserstein_1d,
)

# --------------------------------------------------------------------------- calibration


def test_standardized_residuals_by_hand_and_shape():
    target = np.array([[1.0, 2.0], [3.0, -1.0]])
    mean = np.array([[0.0, 2.0], [1.0, 1.0]])
    var = np.array([[4.0, 1.0], [0.25, 16.0]])
    r = standardized_residuals(target, mean, var)
    assert r.shape == (2, 2) and r.dtype == np.float64
    np.testing.assert_allclose(r, [[0.5, 0.0], [4.0, -0.5]])


def test_standardized_residuals_accepts_jax_arrays():
    r = standardized_residuals(jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4)), 4 * jnp.ones((2, 3, 4)))
    assert isinstance(r, np.ndarray) and r.shape == (2, 3, 4)
    np.testing.assert_allclose(r, 0.5)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan])
def test_standardized_residuals_rejects_non_positive_var(bad):
    var = np.array([1.0, bad])
    with pytest.raises(ValueError, match="var"):
        standardized_residuals(np.zeros(2), np.zeros(2), var)


def test_standardized_residuals_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mean"):
        standardized_residuals(np.zeros(3), np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match="var"):
        standardized_residuals(np.zeros(3), np.zeros(3), np.ones((3, 1)))


def test_normal_cdf_known_values():
    np.testing.assert_allclose(normal_cdf([0.0, 1.0, -1.96]),
                               [0.5, 0.8413447460685429, 0.024997895148220435], rtol=1e-12)
    x = np.linspace(-8, 8, 101)
    np.testing.assert_allclose(normal_cdf(x), stats.norm.cdf(x), atol=1e-15)


def test_ks_normal_by_hand():
    assert ks_normal([0.0]) == pytest.approx(0.5)
    # Sorted [-1, 1]: max(1/2 - Phi(-1), Phi(1) - 1/2, 1 - Phi(1), Phi(-1) - 0) = Phi(1) - 1/2.
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert ks_normal([1.0, -1.0]) == pytest.approx(phi1 - 0.5)
    # Far from N(0, 1): D -> 1.
    assert ks_normal([50.0, 60.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["normal", "shifted", "scaled", "uniform", "ties"])
@pytest.mark.parametrize("n", [1, 7, 500])
def test_ks_normal_matches_scipy(kind, n):
    rng = np.random.default_rng(n)
    x = {
        "normal": lambda: rng.standard_normal(n),
        "shifted": lambda: rng.standard_normal(n) + 0.3,
        "scaled": lambda: 2.0 * rng.standard_normal(n),
        "uniform": lambda: rng.uniform(-1.0, 1.0, n),
        "ties": lambda: np.round(rng.standard_normal(n), 1),
    }[kind]()
    expected = stats.kstest(x, "norm").statistic
    assert ks_normal(x) == pytest.approx(expected, abs=1e-12)


def test_ks_normal_flattens_and_accepts_jax():
    x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
    assert ks_normal(jnp.asarray(x)) == pytest.approx(stats.kstest(x.ravel(), "norm").statistic,
                                                      abs=1e-12)


@pytest.mark.parametrize("bad", [[], [0.0, np.nan], [np.inf]])
def test_ks_normal_rejects_empty_and_non_finite(bad):
    with pytest.raises(ValueError, match="^x:"):
        ks_normal(np.asarray(bad, dtype=np.float64))


def test_calibrated_residuals_have_small_ks_and_misestimated_var_large():
    rng = np.random.default_rng(42)
    n = 20000
    mean = rng.normal(0.0, 3.0, n)
    var = rng.uniform(0.1, 5.0, n)
    target = mean + np.sqrt(var) * rng.standard_normal(n)
    assert ks_normal(standardized_residuals(target, mean, var)) < 0.03
    # Variance overestimated 4x: residuals ~ N(0, 1/4); underestimated 4x: ~ N(0, 4).
    assert ks_normal(standardized_residuals(target, mean, 4.0 * var)) > 0.15
    assert ks_normal(standardized_residuals(target, mean, var / 4.0)) > 0.15


# --------------------------------------------------------------------------- elastic


def test_elastic_penalty_two_samples_by_hand():
    clean = np.array([[0.0, 0.0], [1.0, 1.0]])
    imputed = np.array([[3.0, 4.0], [1.0, 2.0]])
    u = np.array([2.0, 0.0])
    pen = elastic_penalty(clean, imputed, u, alpha=1.0)
    # e = [9 + 16, 0 + 1]; psi = 1 + (0 + u) / 2 = [2, 1].
    np.testing.assert_allclose(pen["difficulty"], [25.0, 1.0])
    np.testing.assert_allclose(pen["rigid"], [25.0, 1.0])
    np.testing.assert_allclose(pen["psi"], [2.0, 1.0])
    np.testing.assert_allclose(pen["elastic"], [12.5, 1.0])
    np.testing.assert_allclose(pen["rank"], [100.0, 0.0])
    assert elastic_ratio(pen) == pytest.approx((12.5 + 1.0) / (25.0 + 1.0))
    # alpha scales psi: alpha = 0.5 gives psi = 1 + 0.5 * 2 / 2 = 1.5.
    pen = elastic_penalty(clean, imputed, u, alpha=0.5)
    np.testing.assert_allclose(pen["psi"], [1.5, 1.0])
    # alpha = 0: elastic == rigid.
    pen = elastic_penalty(clean, imputed, u, alpha=0.0)
    np.testing.assert_allclose(pen["elastic"], pen["rigid"])
    assert elastic_ratio(pen) == pytest.approx(1.0)


def test_elastic_penalty_shapes_and_random_reference():
    rng = np.random.default_rng(3)
    n, d = 50, 16
    clean = rng.standard_normal((n, d)).astype(np.float32)
    imputed = clean + rng.standard_normal((n, d)).astype(np.float32)
    u = rng.uniform(0.0, 3.0, n)
    pen = elastic_penalty(jnp.asarray(clean), jnp.asarray(imputed), u, alpha=1.0)
    assert set(pen) == {"difficulty", "psi", "rigid", "elastic", "rank"}
    for v in pen.values():
        assert v.shape == (n,) and v.dtype == np.float64
    e = np.array([sum((float(c) - float(z)) ** 2 for c, z in zip(cr, zr, strict=True))
                  for cr, zr in zip(clean, imputed, strict=True)])
    np.testing.assert_allclose(pen["difficulty"], e, rtol=1e-12)
    np.testing.assert_allclose(pen["elastic"], e / (1.0 + u / 2.0), rtol=1e-12)
    assert np.all(pen["elastic"] <= pen["rigid"])
    np.testing.assert_allclose(pen["rank"], 100.0 * (stats.rankdata(e) - 1) / (n - 1))


def test_percentile_rank_ties_and_single():
    np.testing.assert_allclose(percentile_rank([3.0, 1.0, 3.0, 2.0, 5.0]),
                               [62.5, 0.0, 62.5, 25.0, 100.0])
    x = np.random.default_rng(1).integers(0, 5, 40).astype(float)
    np.testing.assert_allclose(percentile_rank(x), 100.0 * (stats.rankdata(x) - 1) / 39)
    np.testing.assert_allclose(percentile_rank([7.0]), [0.0])
    with pytest.raises(ValueError, match="values"):
        percentile_rank([])


def test_elastic_penalty_errors():
    clean, imputed, u = np.zeros((3, 2)), np.ones((3, 2)), np.ones(3)
    with pytest.raises(ValueError, match="uncertainty"):
        elastic_penalty(clean, imputed, np.array([0.1, -0.1, 0.0]))
    with pytest.raises(ValueError, match="uncertainty"):
        elastic_penalty(clean, imputed, np.array([0.1, np.nan, 0.0]))
    with pytest.raises(ValueError, match="uncertainty"):
        elastic_penalty(clean, imputed, np.ones(4))
    with pytest.raises(ValueError, match="imputed"):
        elastic_penalty(clean, np.ones((3, 3)), u)
    with pytest.raises(ValueError, match="clean"):
        elastic_penalty(np.zeros(3), np.ones(3), u)
    with pytest.raises(ValueError, match="clean"):
        elastic_penalty(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="alpha"):
        elastic_penalty(clean, imputed, u, alpha=-1.0)


def test_elastic_ratio_edge_cases():
    pen = elastic_penalty(np.ones((2, 3)), np.ones((2, 3)), np.ones(2))
    assert math.isnan(elastic_ratio(pen))
    with pytest.raises(ValueError, match="pen"):
        elastic_ratio({"rigid": np.ones(2)})


# --------------------------------------------------------------------------- consistency


def test_wasserstein_by_hand():
    assert wasserstein_1d([0.0], [1.0]) == pytest.approx(1.0)
    assert wasserstein_1d([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.0)
    # Shifting a sample by c moves it by exactly |c|.
    assert wasserstein_1d([0.0, 1.0, 5.0], [2.5, 3.5, 7.5]) == pytest.approx(2.5)
    # F_a - F_b = 1/2 on [0, 1), 0 after: W = 0.5.
    assert wasserstein_1d([0.0, 1.0], [1.0]) == pytest.approx(0.5)


@pytest.mark.parametrize("n_a,n_b", [(1, 1), (5, 5), (10, 3), (200, 77)])
@pytest.mark.parametrize("ties", [False, True])
def test_wasserstein_matches_scipy(n_a, n_b, ties):
    rng = np.random.default_rng(n_a * 1000 + n_b)
    a = rng.normal(0.0, 1.0, n_a)
    b = rng.normal(0.5, 2.0, n_b)
    if ties:
        a, b = np.round(a), np.round(b)
    expected = stats.wasserstein_distance(a, b)
    assert wasserstein_1d(a, b) == pytest.approx(expected, abs=1e-12)
    assert wasserstein_1d(b, a) == pytest.approx(expected, abs=1e-12)


def test_wasserstein_errors():
    with pytest.raises(ValueError, match="^a:"):
        wasserstein_1d([], [1.0])
    with pytest.raises(ValueError, match="^b:"):
        wasserstein_1d([1.0], [np.nan])


def test_pearson_matches_scipy_and_constant_is_nan():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(100)
    y = 0.6 * x + rng.standard_normal(100)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert math.isnan(pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert math.isnan(pearson([1.0], [2.0]))


def test_prediction_consistency_against_references():
    rng = np.random.default_rng(9)
    full = rng.normal(0.0, 1.5, 300)
    partial = 0.7 * full + rng.normal(0.0, 0.5, 300)
    out = prediction_consistency(jnp.asarray(full, dtype=jnp.float32), partial.astype(np.float32))
    f32, p32 = full.astype(np.float32), partial.astype(np.float32)
    assert set(out) == {"wasserstein", "pearson", "mae", "n"}
    assert out["n"] == 300 and isinstance(out["n"], int)
    assert out["wasserstein"] == pytest.approx(stats.wasserstein_distance(f32, p32), abs=1e-9)
    assert out["pearson"] == pytest.approx(stats.pearsonr(f32, p32).statistic, abs=1e-9)
    assert out["mae"] == pytest.approx(np.mean(np.abs(f32.astype(float) - p32)), abs=1e-12)


def test_prediction_consistency_by_hand_and_constant():
    out = prediction_consistency([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert out["wasserstein"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(1.0)
    assert out["mae"] == pytest.approx(1.0)
    out = prediction_consistency([0.0, 1.0], [0.5, 0.5])  # constant partial: no crash
    assert math.isnan(out["pearson"])
    assert out["mae"] == pytest.approx(0.5)
    assert out["wasserstein"] == pytest.approx(0.5)


def test_prediction_consistency_errors():
    with pytest.raises(ValueError, match="partial"):
        prediction_consistency(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="partial"):
        prediction_consistency(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="full"):
        prediction_consistency([], [])
    with pytest.raises(ValueError, match="full"):
        prediction_consistency([np.inf, 0.0], [0.0, 0.0])
