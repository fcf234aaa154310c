"""Tests of `ease_jax.anchors` (docs/protocol.md section 7, L_anchor): class-conditional Gaussian
anchors updated by an exponential moving average of the pooled clean features of each label bin.

References are float64 NumPy: per-bin mean and population variance (ddof 0) of the rows of that
bin, floored at 1e-4, EMA with momentum 0.99 after a first visit that copies the batch statistics.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax.anchors import AnchorState, anchors_for, init_anchors, label_bins, update_anchors

M, D = 3, 4
# Bins: 0 (y <= -0.1), 1 (-0.1 < y <= 0.1), 2 (y > 0.1); three rows in bin 0, two in 1, three in 2.
LABELS = np.array([-2.0, 0.05, 1.5, -0.1, 0.1, 3.0, -0.7, 0.2], np.float32)
BINS = np.array([0, 1, 2, 0, 1, 2, 0, 2])
N = len(LABELS)


def _features(seed, b=N, m=M, d=D):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, b, d)) * rng.uniform(0.5, 2.0, (m, 1, d))
            + rng.standard_normal((m, 1, d))).astype(np.float32)


def _np_bin_stats(features, bins, n_bins=3, floor=1e-4, weight=None):
    """float64 reference: per (modality, bin) weighted mean and population variance (floored);
    NaN for bins without (positively weighted) rows."""
    f = features.astype(np.float64)
    w = np.ones(f.shape[1]) if weight is None else np.asarray(weight, np.float64)
    mean = np.full((f.shape[0], n_bins, f.shape[2]), np.nan)
    var = np.full_like(mean, np.nan)
    for k in range(n_bins):
        rows = (bins == k) & (w > 0)
        if rows.any():
            wk = w[rows][None, :, None]
            mean[:, k] = (wk * f[:, rows]).sum(1) / wk.sum()
            var[:, k] = (wk * (f[:, rows] - mean[:, k][:, None]) ** 2).sum(1) / wk.sum()
    return mean, np.maximum(var, floor)


def _assert_state(state, mean, var, visited, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(state.var), var, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.asarray(state.visited), visited)


def test_init_anchors_values_and_shapes():
    state = init_anchors()
    assert isinstance(state, AnchorState)
    dims = chex.Dimensions(M=3, K=3, D=128)
    chex.assert_shape([state.mean, state.var], dims["MKD"])
    chex.assert_shape(state.visited, dims["MK"])
    assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32
    assert state.visited.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(state.mean), 0.0)
    np.testing.assert_array_equal(np.asarray(state.var), 1.0)
    assert not np.asarray(state.visited).any()
    small = init_anchors(2, 5, 4)
    chex.assert_shape(small.mean, (2, 4, 5))


def test_label_bins_at_exact_edges():
    labels = jnp.array([-3.0, -0.100001, -0.1, -0.099999, 0.0, 0.1, 0.100001, 3.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(label_bins(labels)), [0, 0, 0, 1, 1, 1, 2, 2])
    assert label_bins(labels).dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(label_bins(jnp.asarray(LABELS))), BINS)


def test_first_visit_copies_batch_mean_and_population_variance():
    f = _features(0)
    state = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(LABELS))
    mean, var = _np_bin_stats(f, BINS)
    _assert_state(state, mean, var, np.ones((M, 3), bool))
    # Population (ddof 0), not the unbiased estimator: they differ by n / (n - 1) >= 4/3 here.
    assert not np.allclose(np.asarray(state.var)[:, 1], f[:, BINS == 1].var(1, ddof=1), rtol=0.1)


def test_second_update_is_ema_with_momentum_099():
    f1, f2 = _features(1), _features(2)
    labels2 = LABELS[::-1].copy()
    state = update_anchors(init_anchors(M, D), jnp.asarray(f1), jnp.asarray(LABELS))
    state = update_anchors(state, jnp.asarray(f2), jnp.asarray(labels2))
    m1, v1 = _np_bin_stats(f1, BINS)
    m2, v2 = _np_bin_stats(f2, BINS[::-1])
    _assert_state(state, 0.99 * m1 + 0.01 * m2, 0.99 * v1 + 0.01 * v2, np.ones((M, 3), bool))
    # A custom momentum is honoured.
    state = update_anchors(init_anchors(M, D), jnp.asarray(f1), jnp.asarray(LABELS))
    state = update_anchors(state, jnp.asarray(f2), jnp.asarray(labels2), momentum=0.5)
    _assert_state(state, 0.5 * m1 + 0.5 * m2, 0.5 * v1 + 0.5 * v2, np.ones((M, 3), bool))


def test_variance_floor_for_constant_features():
    f = np.broadcast_to(np.arange(D, dtype=np.float32), (M, len(LABELS), D)).copy()
    state = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(LABELS))
    np.testing.assert_allclose(np.asarray(state.var), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.mean), np.broadcast_to(np.arange(D), (M, 3, D)))
    state = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(LABELS), var_floor=0.5)
    np.testing.assert_allclose(np.asarray(state.var), 0.5, rtol=1e-6)
    # A single-row bin has zero variance: floored too.
    one_row = np.array([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    state = update_anchors(init_anchors(M, D), jnp.asarray(_features(3)), jnp.asarray(one_row))
    np.testing.assert_allclose(np.asarray(state.var)[:, 0], 1e-4, rtol=1e-6)


def test_bins_absent_from_the_batch_are_unchanged():
    f = _features(4)
    no_middle = np.array([-1.0, 2.0, -0.5, 0.5, -0.2, 0.3, -3.0, 1.0], np.float32)  # bins 0, 2
    bins = np.array([0, 2, 0, 2, 0, 2, 0, 2])
    state = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(no_middle))
    mean, var = _np_bin_stats(f, bins)
    mean[:, 1], var[:, 1] = 0.0, 1.0  # the initial prior
    visited = np.array([[True, False, True]] * M)
    _assert_state(state, mean, var, visited)
    # A visited bin keeps its values exactly when a later batch lacks it.
    f2 = _features(5)
    state2 = update_anchors(state, jnp.asarray(f2), jnp.full((8,), 0.0, jnp.float32))  # bin 1
    np.testing.assert_array_equal(np.asarray(state2.mean)[:, [0, 2]],
                                  np.asarray(state.mean)[:, [0, 2]])
    np.testing.assert_array_equal(np.asarray(state2.var)[:, [0, 2]],
                                  np.asarray(state.var)[:, [0, 2]])
    m2, v2 = _np_bin_stats(f2, np.ones(8, int))
    np.testing.assert_allclose(np.asarray(state2.mean)[:, 1], m2[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state2.var)[:, 1], v2[:, 1], rtol=1e-5, atol=1e-6)
    assert np.asarray(state2.visited).all()


def test_zero_weight_rows_are_ignored():
    f = _features(6)
    pad = np.full((M, 4, D), 1e3, np.float32)  # wild values in the padding rows
    f_padded = np.concatenate([f, pad], 1)
    labels_padded = np.concatenate([LABELS, np.array([0.0, 0.0, -5.0, 5.0], np.float32)])
    weight = np.concatenate([np.ones(8), np.zeros(4)]).astype(np.float32)
    plain = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(LABELS))
    padded = update_anchors(init_anchors(M, D), jnp.asarray(f_padded), jnp.asarray(labels_padded),
                            jnp.asarray(weight))
    for a, b in zip(plain, padded):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    # A bin holding only zero-weight rows counts as absent.
    only_pad = np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float32)  # row 4 (label 0.1, bin 1) padded
    labels = np.array([-1.0, -1.0, 1.0, 1.0, 0.1, 1.0, -1.0, 1.0], np.float32)
    state = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(labels),
                           jnp.asarray(only_pad))
    np.testing.assert_array_equal(np.asarray(state.visited)[:, 1], False)
    np.testing.assert_array_equal(np.asarray(state.mean)[:, 1], 0.0)
    np.testing.assert_array_equal(np.asarray(state.var)[:, 1], 1.0)


def test_integer_weights_equal_repeated_rows():
    f = _features(7)
    weight = np.array([1, 2, 3, 1, 1, 2, 1, 1], np.float32)
    repeat = np.repeat(np.arange(8), weight.astype(int))
    weighted = update_anchors(init_anchors(M, D), jnp.asarray(f), jnp.asarray(LABELS),
                              jnp.asarray(weight))
    repeated = update_anchors(init_anchors(M, D), jnp.asarray(f[:, repeat]),
                              jnp.asarray(LABELS[repeat]))
    for a, b in zip(weighted, repeated):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_update_is_jittable_and_matches_eager():
    f1, f2 = _features(8), _features(9)
    step = jax.jit(functools.partial(update_anchors, momentum=0.9))
    eager = update_anchors(init_anchors(M, D), jnp.asarray(f1), jnp.asarray(LABELS), momentum=0.9)
    state = step(init_anchors(M, D), jnp.asarray(f1), jnp.asarray(LABELS))
    for a, b in zip(eager, state):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    state = step(state, jnp.asarray(f2), jnp.asarray(LABELS[::-1].copy()))
    m1, v1 = _np_bin_stats(f1, BINS)
    m2, v2 = _np_bin_stats(f2, BINS[::-1])
    _assert_state(state, 0.9 * m1 + 0.1 * m2, 0.9 * v1 + 0.1 * v2, np.ones((M, 3), bool))


def test_shape_errors():
    state = init_anchors(M, D)
    with pytest.raises(ValueError):
        update_anchors(state, jnp.zeros((M, 8, D + 1)), jnp.asarray(LABELS))
    with pytest.raises(ValueError):
        update_anchors(state, jnp.zeros((M + 1, 8, D)), jnp.asarray(LABELS))
    with pytest.raises(ValueError):
        update_anchors(state, jnp.zeros((M, 8, D)), jnp.zeros((7,)))


def test_anchors_for_picks_each_samples_bin():
    rng = np.random.default_rng(10)
    state = AnchorState(mean=jnp.asarray(rng.standard_normal((M, 3, D)), jnp.float32),
                        var=jnp.asarray(rng.uniform(0.1, 2.0, (M, 3, D)), jnp.float32),
                        visited=jnp.ones((M, 3), bool))
    mean, var = anchors_for(state, jnp.asarray(LABELS))
    chex.assert_shape([mean, var], (M, len(LABELS), D))
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(state.mean)[:, BINS])
    np.testing.assert_array_equal(np.asarray(var), np.asarray(state.var)[:, BINS])


@pytest.mark.skipif(jax.local_device_count() < 4, reason="needs 4 (fake) devices")
def test_pmap_pooling_equals_the_unsplit_batch():
    n_dev, per_dev = 4, 3
    rng = np.random.default_rng(11)
    f = rng.standard_normal((M, n_dev * per_dev, D)).astype(np.float32) + 2.0
    # Uneven bins across devices: device 0 holds only bin 0, device 3 only bins 1 and 2.
    labels = np.array([-1, -2, -3, 0, 1, -1, 0.05, 2, -0.5, 0.0, 0.5, 0.1], np.float32)
    weight = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1], np.float32)
    prior = update_anchors(init_anchors(M, D), jnp.asarray(_features(12, b=8)),
                           jnp.asarray(LABELS))  # visited: the EMA path is exercised
    want = update_anchors(prior, jnp.asarray(f), jnp.asarray(labels), jnp.asarray(weight))

    def per_device(features, y, w):
        return update_anchors(prior, features, y, w, axis_name="data")

    split_f = np.stack(np.split(f, n_dev, axis=1))  # [n_dev, M, per_dev, D]
    got = jax.pmap(per_device, axis_name="data")(
        jnp.asarray(split_f), jnp.asarray(labels.reshape(n_dev, per_dev)),
        jnp.asarray(weight.reshape(n_dev, per_dev)))
    for dev in range(n_dev):
        for a, b in zip(want, got):
            np.testing.assert_allclose(np.asarray(b)[dev], np.asarray(a), rtol=1e-5, atol=1e-6)
    # Without pooling, device 0 (bin 0 only) would not update bins 1 and 2: the test can tell.
    local = update_anchors(prior, jnp.asarray(split_f[0]), jnp.asarray(labels[:3]),
                           jnp.asarray(weight[:3]))
    assert not np.allclose(np.asarray(local.mean), np.asarray(want.mean))


def test_no_gradient_flows_through_the_anchors():
    f = jnp.asarray(_features(13))
    labels = jnp.asarray(LABELS)
    visited = update_anchors(init_anchors(M, D), f, labels)

    def through_update(features, state):
        new = update_anchors(state, features, labels)
        mean, var = anchors_for(new, labels)
        return jnp.sum(mean * 3.0) + jnp.sum(var**2) + jnp.sum(new.mean) + jnp.sum(new.var)

    for state in (init_anchors(M, D), visited):
        grad = jax.grad(through_update)(f, state)
        np.testing.assert_array_equal(np.asarray(grad), 0.0)

    def through_lookup(mean, var):
        a_mean, a_var = anchors_for(AnchorState(mean, var, visited.visited), labels)
        return jnp.sum(a_mean * 2.0) + jnp.sum(jnp.log(a_var))

    g_mean, g_var = jax.grad(through_lookup, argnums=(0, 1))(visited.mean, visited.var)
    np.testing.assert_array_equal(np.asarray(g_mean), 0.0)
    np.testing.assert_array_equal(np.asarray(g_var), 0.0)
