"""Tests of `ease_jax.train`: schedule, run numbers, the device data order, the pmap / shard_map
wrappers, global-batch normalisation under padding and the non-finite guard. (The fit loop and
the population engine: tests/test_fit.py, tests/test_population.py.)

Compiling a train step costs minutes on a 2-core CPU, so every model here is TINY and the few
compiled steps are shared: one per-device EASE step (module fixture `tiny`) serves the pmap
tests on 4 devices; the LNLN variants of the pmap == shard_map test are marked `slow`.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ease_jax import train as T
from ease_jax.anchors import init_anchors
from ease_jax.config import LOSS_WEIGHTS, LossConfig, RunConfig, TrainConfig, model_config
from ease_jax.data.missing import train_keep_masks, train_missing_rates
from ease_jax.data.mmsa import from_raw
from ease_jax.data.synthetic import synthetic
from ease_jax.objectives import EASE_TERMS, LNLN_TERMS, ease_loss, lnln_loss, weighted_mean

from helpers import TINY_MODEL as TINY
from helpers import StepRunner, pad_batch


def tiny_data(n_train=24, n_valid=8, n_test=8):
    raw = synthetic(
        "mosi",
        seed=0,
        n_train=n_train,
        n_valid=n_valid,
        n_test=n_test,
        text_len=3,
        audio_len=3,
        vision_len=3,
    )
    return from_raw(raw, source="synthetic:tiny")


def tiny_model(model, data):
    d = data.dims
    return model_config(
        model,
        "mosi",
        text_encoder="features",
        text_len=d["L_f"],
        text_dim=d["D_t"],
        audio_len=d["T_a"],
        audio_dim=d["D_a"],
        vision_len=d["T_v"],
        vision_dim=d["D_v"],
        **TINY,
    )


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_trees_close(a, b, atol=0.0, rtol=0.0):
    la, ta = jax.tree_util.tree_flatten(host(a))
    lb, tb = jax.tree_util.tree_flatten(host(b))
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol)


# Cheaper XLA compilation for a one-off CPU program (the same computation, compiled faster).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tree_l2(a, b):
    """Euclidean norm of a - b over every leaf of two trees."""
    return math.sqrt(sum(
        float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
        for x, y in zip(jax.tree_util.tree_leaves(host(a)), jax.tree_util.tree_leaves(host(b)))))


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree_util.tree_leaves(host(a)), jax.tree_util.tree_leaves(host(b)))
    )


# ----------------------------------------------------------------------------------------------
# 1. Schedule, optimizer, batching (host only)


@pytest.mark.parametrize(
    "epoch, expected",
    [  # Released GradualWarmupScheduler(total_epoch=20) + CosineAnnealingLR(T_max=180), base 1e-5.
        (0, 0.0),  # epoch 1 (0-based 0) runs at lr 0
        (1, 5e-7),  # 1e-5 * 1 / 20
        (10, 5e-6),
        (19, 9.5e-6),
        (20, 1e-5),  # end of the warm-up: the base lr ...
        (21, 1e-5),  # ... and once more: the cosine starts at (e - 21) = 0
        (22, 9.99923848e-6),  # 0.5e-5 * (1 + cos(pi / 180))
        (111, 5e-6),  # (111 - 21) / 180 = 1/2: half the base lr
        (199, 3.04586490e-9),  # 0.5e-5 * (1 + cos(178 pi / 180)) = 3.05e-4 * base
        (250, 0.0),  # clipped after the end
    ],
)
def test_epoch_lr_hand_values(epoch, expected):
    lr = float(T.epoch_lr(epoch, 1e-5, 20, 200))
    assert lr == pytest.approx(expected, rel=1e-5, abs=1e-12)  # float32: |error| ~ 1e-5 * 6e-8


def test_epoch_lr_vectorised_and_monotone():
    epochs = np.arange(200)
    lr = np.asarray(T.epoch_lr(jnp.asarray(epochs), 1e-4, 20, 200))
    assert lr.shape == (200,) and lr.dtype == np.float32
    assert np.all(np.diff(lr[:21]) > 0)  # strictly rising warm-up, up to epoch 20
    assert np.all(np.diff(lr[20:]) <= 0)  # cosine never rises
    assert lr.max() == pytest.approx(1e-4, rel=1e-6) and int(np.argmax(lr)) == 20
    assert lr[21] == lr[20]  # 1-based epochs 21 and 22 both at the base lr
    # Without warm-up the first epoch already runs at the base lr.
    assert float(T.epoch_lr(0, 1e-3, 0, 10)) == pytest.approx(1e-3, rel=1e-6)


def test_optimizer_is_adamw_stepped_per_epoch():
    """lr 0 for every step of epoch 0 (no update at all, weight decay included), then AdamW with
    epoch 1's lr: the same update as a constant-lr AdamW that saw the same gradient history."""
    cfg = TrainConfig(lr=0.1, warmup_epochs=2, epochs=10, weight_decay=0.3)
    spe = 2
    tx = T.make_optimizer(cfg, spe)  # unit base lr: the step scales the updates by 0.1
    lr1 = 0.1 * 1 / 2  # epoch 1 of a 2-epoch warm-up
    ref = optax.adamw(lr1, weight_decay=0.3)
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    grads = [{"w": jnp.array([0.1 * k, -0.2, 0.3]), "b": jnp.array(0.05 * k)} for k in range(1, 4)]
    state, ref_state = tx.init(params), ref.init(params)
    for k, g in enumerate(grads):
        upd, state = tx.update(g, state, params)
        upd = jax.tree_util.tree_map(lambda u: 0.1 * u, upd)
        ref_upd, ref_state = ref.update(g, ref_state, params)
        if k < spe:
            assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree_util.tree_leaves(upd))
        else:
            assert_trees_close(upd, ref_upd, rtol=1e-6, atol=1e-9)
            assert float(jnp.max(jnp.abs(upd["w"]))) > 1e-3


def test_tx_lr_hand_values():
    """The lr of optimizer step s with 5 steps per epoch, warm-up 3 of 12 epochs, base 2e-3, by
    hand: epoch e = s // 5; e <= 3: base e / 3; else base 0.5 (1 + cos(pi (e - 4) / 9))."""
    cfg = TrainConfig(lr=2e-3, warmup_epochs=3, epochs=12)
    expected = {0: 0.0, 4: 0.0, 5: 2e-3 / 3, 9: 2e-3 / 3, 17: 2e-3, 20: 2e-3,
                35: 2e-3 * 0.5 * (1 + math.cos(math.pi / 3)), 59: 2e-3 * 0.5 * (1 + math.cos(
                    math.pi * 7 / 9))}
    for step, lr in expected.items():
        assert float(T.tx_lr(step, cfg, 5, 2e-3)) == pytest.approx(lr, rel=1e-6, abs=1e-12), step


def test_run_hparams_carry_the_weights_and_lr():
    hp = T.run_hparams(LossConfig(uada=0.3, cons=1.5), 2e-4)
    assert set(hp) == {"lr", *LOSS_WEIGHTS}
    assert all(v.dtype == np.float32 and v.shape == () for v in hp.values())
    assert float(hp["lr"]) == pytest.approx(2e-4) and float(hp["uada"]) == pytest.approx(0.3)
    off = T.run_hparams(LossConfig(uada=0.0, anchor=0.0, cons=0.0, asym=0.0), 1e-3)
    assert [float(off[k]) for k in ("uada", "anchor", "cons", "asym")] == [0.0] * 4
    assert float(off["ucmi"]) == 0.5 and float(off["sp"]) == 1.0
    # The model default lr lands in the state without an explicit one; a given one wins.
    data = tiny_data()
    for model, lr in (("ease", 1e-5), ("lnln", 1e-4)):
        state = T.create_state(tiny_model(model, data), TrainConfig(), 0, 3)
        assert float(state.hparams["lr"]) == pytest.approx(lr)
    state = T.create_state(tiny_model("ease", data), TrainConfig(lr=5e-4), 0, 3,
                           loss_cfg=LossConfig(uada=0.0), lr=2e-3)
    assert float(state.hparams["lr"]) == pytest.approx(2e-3)
    assert float(state.hparams["uada"]) == 0.0


def test_pad_batch_adds_zero_rows_and_weight():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(3, 2, 4)).astype(np.float32),
        "ids": rng.integers(1, 9, size=(3, 5)).astype(np.int32),
        "lengths": np.array([1, 2, 3], np.int64),
    }
    before = {k: v.copy() for k, v in batch.items()}
    out = pad_batch(batch, 5)
    assert set(out) == {"x", "ids", "lengths", "weight"}
    for k, v in batch.items():
        assert out[k].shape == (5, *v.shape[1:]) and out[k].dtype == v.dtype
        np.testing.assert_array_equal(out[k][:3], v)
        assert not np.any(out[k][3:])
        np.testing.assert_array_equal(v, before[k])  # input untouched
    assert out["weight"].dtype == np.float32
    np.testing.assert_array_equal(out["weight"], [1, 1, 1, 0, 0])
    full = pad_batch(batch, 3)
    np.testing.assert_array_equal(full["weight"], [1, 1, 1])
    np.testing.assert_array_equal(full["x"], batch["x"])
    with pytest.raises(ValueError, match="exceeds"):
        pad_batch(batch, 2)


@pytest.mark.parametrize(
    "bs, n, expected",
    [(64, 4, 64), (6, 4, 8), (5, 2, 6), (1, 4, 4), (8, 1, 8), (7, 3, 9), (63, 8, 64)],
)
def test_global_batch_size(bs, n, expected):
    assert T.global_batch_size(bs, n) == expected


@pytest.mark.parametrize(
    "n, bs, expected", [(24, 8, 3), (23, 8, 3), (25, 8, 4), (1, 64, 1), (1284, 64, 21)]
)
def test_steps_per_epoch(n, bs, expected):
    assert T.steps_per_epoch(n, bs) == expected


def test_epoch_rows_partition_padding_and_determinism():
    n, bs = 23, 8
    key = jax.random.key_data(jax.random.key(3))

    def rows(k, epoch, global_size=None):
        return np.asarray(T.epoch_rows(k, epoch, n, bs, global_size))

    r = rows(key, 0)
    assert r.shape == (3, 8) and r.dtype == np.int32
    assert list((r >= 0).sum(1)) == [8, 8, 7]  # last batch partial, one padding row at its end
    assert r[2, 7] == -1
    assert sorted(r[r >= 0].tolist()) == list(range(n))  # every row exactly once
    np.testing.assert_array_equal(rows(key, 0), r)  # deterministic in (key, epoch)
    assert not np.array_equal(rows(key, 1), r)
    assert not np.array_equal(rows(jax.random.key_data(jax.random.key(4)), 0), r)
    assert not np.array_equal(r[r >= 0], np.arange(n))  # shuffled
    wide = rows(key, 0, 12)  # global batch of 12 (3 devices): 4 more padding rows per step
    assert wide.shape == (3, 12)
    np.testing.assert_array_equal(wide[:, :8], r)
    assert np.all(wide[:, 8:] == -1)
    with pytest.raises(ValueError, match="global_size"):
        T.epoch_rows(key, 0, n, bs, 4)


def test_gather_rows_is_pad_batch_on_device():
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(5, 2, 3)).astype(np.float32),
              "ids": rng.integers(1, 9, size=(5, 4)).astype(np.int32),
              "labels": rng.normal(size=5).astype(np.float32)}
    rows = np.array([3, 0, 4, -1, -1], np.int32)
    out = jax.device_get(jax.jit(T.gather_rows)(arrays, rows))
    ref = pad_batch({k: v[[3, 0, 4]] for k, v in arrays.items()}, 5)
    assert set(out) == set(ref) | {"index"}
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])
        assert out[k].dtype == ref[k].dtype
    np.testing.assert_array_equal(out["index"], [3, 0, 4, 0, 0])


def test_check_finite_names_the_run_and_step():
    from ease_jax.fit import NonFiniteLossError, _check_finite
    from ease_jax.population import Run

    runs = [Run(1), Run(2, name="w/o MIPC")]
    ok = {"total": np.ones((2, 3)), "sp": np.ones((2, 3)), "lr": np.ones((2, 3)),
          "nonfinite": np.zeros((2, 3))}
    _check_finite(ok, runs, 40)  # no error
    bad = {k: v.copy() for k, v in ok.items()}
    bad["total"][1, 2] = bad["sp"][1, 2] = np.nan
    bad["nonfinite"][1, 2] = 1.0
    with pytest.raises(NonFiniteLossError, match=r"run w/o MIPC: non-finite loss at step 42") as e:
        _check_finite(bad, runs, 40)
    assert "sp" in str(e.value) and isinstance(e.value, FloatingPointError)


# ----------------------------------------------------------------------------------------------
# 2. The per-device step under pmap and shard_map (helpers.StepRunner) on a toy step (cheap compiles): numerics, placement, traces


def toy_step(counter=None, lr=0.1):
    """Weighted least squares with device-dependent noise in the target: checks the per-step
    key (same on every device, each folds in its index) and the global-batch gradient."""

    def step(state, batch, rng):
        if counter is not None:
            counter.append(1)
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), jax.lax.axis_index(T.AXIS))
        target = batch["y"] + 0.1 * jax.random.uniform(key, batch["y"].shape)

        def loss(w):
            return weighted_mean((batch["x"] @ w - target) ** 2, batch["weight"], T.AXIS)

        value, grad = jax.value_and_grad(loss)(state["w"])
        grad, value = jax.lax.pmean(grad, T.AXIS), jax.lax.pmean(value, T.AXIS)
        return {"w": state["w"] - lr * grad, "step": state["step"] + 1}, {"loss": value}

    return step


def toy_batches(n_real=6, steps=3):
    rng = np.random.default_rng(5)
    return [
        {
            "x": rng.normal(size=(n_real, 3)).astype(np.float32),
            "y": rng.normal(size=(n_real,)).astype(np.float32),
        }
        for _ in range(steps)
    ]


def toy_reference(batches, n, lr=0.1):
    """NumPy float64: the global weighted mean over the real rows, noise drawn per device."""
    w = np.zeros(3)
    losses = []
    for i, b in enumerate(batches):
        padded = pad_batch(b, T.global_batch_size(len(b["y"]), n))
        rows = len(padded["y"]) // n
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(3), i))
        noise = np.concatenate(
            [
                np.asarray(
                    jax.random.uniform(
                        jax.random.fold_in(jax.random.wrap_key_data(rng), d), (rows,)
                    )
                )
                for d in range(n)
            ]
        )
        x, wt = padded["x"].astype(np.float64), padded["weight"].astype(np.float64)
        r = x @ w - (padded["y"] + 0.1 * noise)
        losses.append(np.sum(wt * r**2) / np.sum(wt))
        w = w - lr * 2 * (x.T @ (wt * r)) / np.sum(wt)
    return w, losses


def run_toy(par, batches):
    state = par.put_state({"w": np.zeros(3, np.float32), "step": np.zeros((), np.int32)})
    losses = []
    for i, b in enumerate(batches):
        gbs = T.global_batch_size(len(b["y"]), par.n)
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(3), i))
        state, m = par(state, par.put_batch(pad_batch(b, gbs)), rng)
        losses.append(float(par.metrics(m)["loss"]))
    return host(par.get_state(state)), losses


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_toy_parallel_step_matches_global_reference(mode, n):
    batches = toy_batches()
    par = StepRunner(toy_step(), mode, devices=jax.devices()[:n])
    assert par.n == n
    state, losses = run_toy(par, batches)
    w_ref, loss_ref = toy_reference(batches, n)
    np.testing.assert_allclose(state["w"], w_ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(losses, loss_ref, rtol=2e-5)
    assert int(state["step"]) == 3 and state["step"].dtype == np.int32


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_put_state_get_state_round_trip(mode):
    par = StepRunner(toy_step(), mode, devices=jax.devices()[:2])
    state = {
        "w": np.array([1.5, -2.0], np.float32),
        "step": np.array(7, np.int32),
        "key": jax.random.key_data(jax.random.key(9)),
    }
    back = host(par.get_state(par.put_state(state)))
    assert_trees_close(back, state)
    batch = pad_batch({"x": np.arange(6, dtype=np.float32).reshape(3, 2)}, 4)
    placed = par.put_batch(batch)
    np.testing.assert_array_equal(np.asarray(placed["x"]).reshape(4, 2), batch["x"])
    np.testing.assert_array_equal(np.asarray(placed["weight"]).reshape(4), batch["weight"])


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_toy_step_traced_once(mode):
    """Three steps with different data: one trace (hence one compilation) of the step."""
    chex.clear_trace_counter()
    counter = []
    step = chex.assert_max_traces(toy_step(counter), n=1)
    par = StepRunner(step, mode, devices=jax.devices()[:2])
    state = par.put_state({"w": np.zeros(3, np.float32), "step": np.zeros((), np.int32)})
    for i, b in enumerate(toy_batches(steps=3)):
        rng = jax.random.key_data(jax.random.key(i))
        state, _ = par(state, par.put_batch(pad_batch(b, 6)), rng)
    jax.block_until_ready(state)
    assert len(counter) == 1


# ----------------------------------------------------------------------------------------------
# 3. Global-batch normalisation under uneven padding (objectives called with axis_name)


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), (T.AXIS,))


WEIGHTS = {
    "pad": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32),  # 4 devices: the last has no real row
    "random": np.array([0.3, 0.0, 1.7, 0.0, 0.0, 0.0, 2.5, 0.9], np.float32),
}


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_weighted_mean_is_global_under_pmap_and_shard_map(n, weights):
    w = WEIGHTS[weights]
    x = np.random.default_rng(1).normal(size=8).astype(np.float32) * 3
    expected = np.sum(w.astype(np.float64) * x) / np.sum(w)
    grad_expected = w / np.sum(w, dtype=np.float64)

    def value_and_grad(x, w):
        value, grad = jax.value_and_grad(weighted_mean)(x, w, T.AXIS)
        return jax.lax.pmean(value, T.AXIS), grad

    v_pmap, g_pmap = jax.pmap(value_and_grad, axis_name=T.AXIS, devices=jax.devices()[:n])(
        x.reshape(n, -1), w.reshape(n, -1)
    )
    np.testing.assert_allclose(np.asarray(v_pmap), expected, rtol=1e-6)
    # pmean of the per-device gradients = the gradient of the global objective.
    np.testing.assert_allclose(
        np.asarray(g_pmap).reshape(-1) / n, grad_expected, rtol=1e-6, atol=1e-8
    )
    sm = jax.jit(
        jax.shard_map(
            value_and_grad,
            mesh=_mesh(n),
            in_specs=(P(T.AXIS), P(T.AXIS)),
            out_specs=(P(), P(T.AXIS)),
            check_vma=False,
        )
    )
    v_sm, g_sm = sm(x, w)
    np.testing.assert_allclose(float(v_sm), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_sm) / n, grad_expected, rtol=1e-6, atol=1e-8)
    # Without an axis: the plain weighted mean.
    np.testing.assert_allclose(
        float(weighted_mean(jnp.asarray(x), jnp.asarray(w))), expected, rtol=1e-6
    )


def fake_outputs(model, b, seed, k=2, d=8, views=2):
    """Finite model outputs of the shapes `ease_loss` / `lnln_loss` read (batch axis noted)."""
    rng = np.random.default_rng(seed)

    def f(*shape, scale=1.0):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    if model == "ease":
        out = {
            "pred": f(b, scale=1.5),
            "clean_tokens": f(3, b, k, d),
            "imp_mean": f(3, b, k, d),
            "imp_var": np.exp(f(3, b, k, d, scale=0.3)),
            "imp_sample": f(3, b, k, d),
            "uncertainty": np.abs(f(3, b)) + 0.05,
            "view_preds": f(views, b, scale=1.5),
        }
    else:
        out = {
            "pred": f(b, scale=1.5),
            "completeness": f(b, scale=0.3),
            "disc_logits": f(2, b, k, 2),
            "reconstruction": f(3, b, k, d),
            "clean_tokens": f(3, b, k, d),
        }
    labels = np.array([-2.4, 0.0, 1.2, -0.6, 0.1, 2.8, -0.1, 0.4, 1.0, -3.0])[:b]
    labels = np.resize(labels, b).astype(np.float32)
    batch = {"labels": labels, "missing_rate": rng.uniform(size=(b, 3)).astype(np.float32)}
    return out, batch


BATCH_AXIS = {
    "pred": 0,
    "completeness": 0,
    "view_preds": 1,
    "disc_logits": 1,
    "clean_tokens": 1,
    "imp_mean": 1,
    "imp_var": 1,
    "imp_sample": 1,
    "uncertainty": 1,
    "reconstruction": 1,
}


def _concat(a, b):
    return {k: np.concatenate([a[k], b[k]], axis=BATCH_AXIS.get(k, 0)) for k in a}


def _spec(k):
    return P(*([None] * BATCH_AXIS[k]), T.AXIS)


@pytest.mark.parametrize("model", ["ease", "lnln"])
def test_objective_ignores_padding_and_device_count(model):
    """6 real rows alone == the same rows plus 2 zero-weight garbage rows, unsplit and split over
    2 or 4 devices (4: one device holds padding only): every term, the updated anchors, and the
    gradient w.r.t. the model outputs (device gradients / n = the global gradient)."""
    loss = ease_loss if model == "ease" else lnln_loss
    names = EASE_TERMS if model == "ease" else LNLN_TERMS
    cfg = LossConfig()
    anchors = init_anchors(3, 8) if model == "ease" else None
    out6, batch6 = fake_outputs(model, 6, seed=0)
    out_pad, batch_pad = fake_outputs(model, 2, seed=1)
    out8, batch8 = _concat(out6, out_pad), _concat(batch6, batch_pad)
    batch8["weight"] = np.array([1] * 6 + [0] * 2, np.float32)

    def total_terms_grad(o, b, a, axis_name=None):
        def objective(o):
            total, terms, new_anchors = loss(o, b, a, cfg, axis_name=axis_name)
            return total, (terms, new_anchors)

        grads, (terms, new_anchors) = jax.grad(objective, has_aux=True)(o)
        if axis_name is not None:
            terms = jax.lax.pmean(terms, axis_name)
        return terms, new_anchors, grads

    ref_terms, ref_anchors, ref_grads = jax.jit(total_terms_grad)(out6, batch6, anchors)
    assert set(ref_terms) == set(names) | {"total"}
    results = {"unsplit": jax.jit(total_terms_grad)(out8, batch8, anchors)}
    for n in (2, 4):
        in_specs = ({k: _spec(k) for k in out8}, P(T.AXIS), P())
        out_specs = (P(), P(), {k: _spec(k) for k in out8})
        fn = jax.shard_map(
            lambda o, b, a: total_terms_grad(o, b, a, T.AXIS),
            mesh=_mesh(n),
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=False,
        )
        terms, new_anchors, grads = jax.jit(fn)(out8, batch8, anchors)
        results[f"{n} devices"] = (terms, new_anchors, {k: g / n for k, g in grads.items()})
    for where, (terms, new_anchors, grads) in results.items():
        for name in ref_terms:
            np.testing.assert_allclose(
                float(terms[name]),
                float(ref_terms[name]),
                rtol=2e-5,
                atol=1e-6,
                err_msg=f"{where}: term {name}",
            )
        if model == "ease":
            assert_trees_close(new_anchors, ref_anchors, rtol=1e-5, atol=1e-6)
        for k, g in grads.items():
            g = np.asarray(g)
            real = np.take(g, np.arange(6), axis=BATCH_AXIS[k])
            pad = np.take(g, np.arange(6, 8), axis=BATCH_AXIS[k])
            np.testing.assert_allclose(
                real,
                np.asarray(ref_grads[k]),
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{where}: d total / d {k}",
            )
            assert not np.any(pad), f"{where}: padding rows get a gradient in {k}"


# ----------------------------------------------------------------------------------------------
# 4. The real EASE step (tiny model): pmap == shard_map, one trace, padding, non-finite flag


def counted(fn):
    """`fn` with a trace counter (the Python body only runs while JAX traces it)."""

    def step(state, batch, rng):
        step.traces += 1
        return fn(state, batch, rng)

    step.traces = 0
    return step


@pytest.fixture(scope="module")
def tiny():
    """Tiny EASE on 24 / 8 / 8 synthetic rows; one train-config for the step tests and fit_seed
    (lr > 0 from the first step: warm-up 0)."""
    data = tiny_data()
    mcfg = tiny_model("ease", data)
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=0, seeds=(1111,))
    run = RunConfig(dataset="mosi", model=mcfg, loss=LossConfig(), train=tcfg)
    spe = T.steps_per_epoch(data.train.n, tcfg.batch_size)
    base = T.make_train_step(mcfg, run.loss, tcfg, spe, data.train.n)
    arrays = data.train.model_arrays(mcfg.text_encoder)
    # 7 real rows padded to 8: on 4 devices the last one holds 1 real row and 1 padding row.
    order = np.asarray(T.epoch_rows(jax.random.key_data(jax.random.key(0)), 0, data.train.n, 7))
    batches = [{k: v[r[r >= 0]] for k, v in arrays.items()} | {"index": r[r >= 0]}
               for r in order[:3]]
    return SimpleNamespace(
        data=data,
        mcfg=mcfg,
        tcfg=tcfg,
        run=run,
        spe=spe,
        arrays=arrays,
        batches=batches,
        state0=host(T.create_state(mcfg, tcfg, 0, spe)),
        rngs=[jax.random.key_data(jax.random.fold_in(jax.random.key(7), i)) for i in range(3)],
        # pmap caches its compilation per function: every pmap user (fit_seed included) shares
        # `steps["pmap"]`; shard_map compiles per StepRunner anyway.
        steps={"pmap": counted(base), "shard_map": counted(base)},
        step_key=(mcfg, run.loss, tcfg, spe, data.train.n),
        predict_cache={},
    )


def run_steps(tiny, mode, n, batches=None, state=None, step=None, pad_to=8):
    par = StepRunner(step or tiny.steps[mode], mode, devices=jax.devices()[:n])
    st = par.put_state(tiny.state0 if state is None else state)
    metrics = []
    for b, rng in zip(batches or tiny.batches, tiny.rngs):
        st, m = par(st, par.put_batch(pad_batch(b, T.global_batch_size(pad_to, n))), rng)
        metrics.append(par.metrics(m))
    return host(par.get_state(st)), host(metrics)


@pytest.fixture(scope="module")
def ease_runs(tiny):
    return {mode: run_steps(tiny, mode, 4) for mode in ("pmap", "shard_map")}


def test_ease_step_pmap_equals_shard_map(tiny, ease_runs):
    (s_p, m_p), (s_s, m_s) = ease_runs["pmap"], ease_runs["shard_map"]
    assert int(s_p.step) == int(s_s.step) == 3
    assert max_abs_diff(s_p.params, tiny.state0.params) > 1e-4  # lr > 0: parameters moved
    assert_trees_close(s_p.params, s_s.params, atol=1e-5, rtol=1e-5)
    assert_trees_close(s_p.opt_state, s_s.opt_state, atol=1e-5, rtol=1e-5)
    assert_trees_close(s_p.anchors, s_s.anchors, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(s_p.rng, tiny.state0.rng)  # the base key never changes
    for a, b in zip(m_p, m_s):
        assert set(a) == set(EASE_TERMS) | {"total", "lr", "nonfinite"}
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert float(a["nonfinite"]) == 0.0
        assert float(a["lr"]) == pytest.approx(1e-3, rel=1e-6)


@pytest.mark.slow  # the fit loop's program: tests/test_population.py (1 vs 4 devices, 2 x 2 mesh)
def test_step_does_not_depend_on_the_device_count_or_the_padding(tiny, ease_runs):
    """Masks, imputation noise and subset views are drawn per sample (keyed by its index in the
    split; section 2), so 3 steps on 4 devices with 1 padding row, on 1 device, and on 2 devices
    with 5 padding rows end with the same parameters (up to float summation order)."""
    ref_state, ref_metrics = ease_runs["pmap"]  # 4 devices, 7 rows + 1 padding row
    step = T.make_train_step(*tiny.step_key)  # not tiny.steps: their trace counts are tested
    for n, pad_to in ((1, 8), (2, 12)):
        state, metrics = run_steps(tiny, "shard_map", n, pad_to=pad_to, step=step)
        # The first step's loss terms see identical masks, noise and views: equal to float
        # rounding (a per-device draw changes them by orders of magnitude more).
        for k in metrics[0]:
            np.testing.assert_allclose(metrics[0][k], ref_metrics[0][k], rtol=1e-5, atol=1e-6,
                                       err_msg=k)
        # After 3 AdamW steps: Adam divides by sqrt(v), so on entries whose gradient is ~0 the
        # summation order alone can flip an update of size lr; compare the trajectories as a
        # whole (a per-device draw moves every parameter: a difference of the order of the step).
        assert tree_l2(state.params, ref_state.params) < 0.02 * tree_l2(ref_state.params,
                                                                         tiny.state0.params)
        assert_trees_close(state.anchors, ref_state.anchors, atol=1e-5, rtol=1e-5)
        for a, b in zip(metrics, ref_metrics):
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_step_feeds_the_model_the_observed_missing_fraction(tiny, monkeypatch):
    """The model (EASE's gate, LNLN's completeness target) reads the OBSERVED missing fraction of
    this step's training masks (dropped valid positions / valid positions, recomputed here in
    NumPy from the masks of the step's epoch key), not the drawn rate r."""
    recorded = []

    class Recording:
        def __init__(self, model):
            self.model = model

        def apply(self, variables, inputs, *args, **kwargs):
            jax.debug.callback(lambda r, i: recorded.append((np.asarray(r), np.asarray(i))),
                               inputs["missing_rate"], inputs["index"])
            return self.model.apply(variables, inputs, *args, **kwargs)

    real_build = T.build_model
    monkeypatch.setattr(T, "build_model", lambda cfg: Recording(real_build(cfg)))
    n = tiny.data.train.n
    step = jax.jit(T.make_train_step(tiny.mcfg, LossConfig(), tiny.tcfg, tiny.spe, n,
                                     axis_name=None), compiler_options=FAST)
    state = tiny.state0.replace(step=jnp.asarray(tiny.spe, jnp.int32))  # epoch 1's masks
    batch = pad_batch(tiny.batches[1], 8)
    jax.block_until_ready(step(state, batch, tiny.rngs[0]))
    (rate, index), = recorded
    np.testing.assert_array_equal(index, batch["index"])
    key = T.epoch_mask_key(tiny.state0.mask_rng, 1)
    keep = {m: np.asarray(v) for m, v in
            train_keep_masks(key, batch, n_split=n, text_mode="features").items()}
    drawn = {m: np.asarray(r)[batch["index"]] for m, r in train_missing_rates(key, n).items()}
    t_len = batch["audio"].shape[1]
    valid = {"text_features": batch["text_mask"] != 0,  # per-token features: L_f == L
             "audio": np.arange(t_len)[None] < batch["audio_lengths"][:, None],
             "vision": np.arange(batch["vision"].shape[1])[None] < batch["vision_lengths"][:, None]}
    for j, m in enumerate(("text_features", "audio", "vision")):
        v, k = valid[m], keep[m]
        observed = (v & ~k).sum(1) / np.maximum(v.sum(1), 1)
        np.testing.assert_allclose(rate[:, j], observed, rtol=1e-6, atol=1e-7, err_msg=m)
    # ... which is not the drawn rate (only rows at r = 0, or whose draws happen to match, agree).
    assert np.abs(rate[:7, 1] - drawn["audio"][:7]).max() > 0.05


def test_ease_step_traced_once_per_mode(tiny, ease_runs):
    """Three steps with different data: one trace of the per-device step per parallel mode."""
    assert tiny.steps["pmap"].traces == 1
    assert tiny.steps["shard_map"].traces == 1


def test_padding_rows_do_not_change_the_update(tiny, ease_runs):
    """Same 7 real rows; the padding row filled with large finite garbage instead of zeros:
    parameters, optimizer state, anchors and metrics after 3 steps are unchanged."""
    rng = np.random.default_rng(3)
    garbage = []
    for b in tiny.batches:
        g = {k: v[:1].copy() for k, v in b.items()}
        for k in ("audio", "vision", "text_features"):
            g[k] = (5 * rng.normal(size=g[k].shape)).astype(g[k].dtype)
        g["labels"] = np.array([2.9], np.float32)
        g["audio_lengths"][:], g["vision_lengths"][:] = 1, 2
        padded = pad_batch(b, 8)
        for k, value in g.items():
            padded[k][7:] = value
        garbage.append(padded)
    par = StepRunner(tiny.steps["pmap"], "pmap", devices=jax.devices()[:4])
    st = par.put_state(tiny.state0)
    metrics = []
    for b, r in zip(garbage, tiny.rngs):
        assert b["weight"][7] == 0
        st, m = par(st, par.put_batch(b), r)
        metrics.append(par.metrics(m))
    state, metrics = host(par.get_state(st)), host(metrics)
    ref_state, ref_metrics = ease_runs["pmap"]
    assert_trees_close(state, ref_state, atol=1e-6, rtol=1e-6)
    for a, b in zip(metrics, ref_metrics):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_step_flags_a_nan_label(tiny, ease_runs):
    batch = {k: v.copy() for k, v in tiny.batches[0].items()}
    batch["labels"][2] = np.nan
    par = StepRunner(tiny.steps["pmap"], "pmap", devices=jax.devices()[:4])
    st = par.put_state(tiny.state0)
    _, m = par(st, par.put_batch(pad_batch(batch, 8)), tiny.rngs[0])
    m = host(par.metrics(m))
    assert float(m["nonfinite"]) == 1.0 and not np.isfinite(m["total"])
    from ease_jax.fit import NonFiniteLossError, _check_finite
    from ease_jax.population import Run

    with pytest.raises(NonFiniteLossError, match="step 12"):
        _check_finite({k: np.reshape(v, (1, 1)) for k, v in m.items()}, [Run(0)], 12)
    assert tiny.steps["pmap"].traces == 1  # same shapes: no new compilation


@pytest.mark.parametrize("model, n", [  # EASE on 2 devices: see also the device-count test
    pytest.param("ease", 2, marks=pytest.mark.slow),
    pytest.param("lnln", 2, marks=pytest.mark.slow),
    pytest.param("lnln", 4, marks=pytest.mark.slow),
])
def test_step_pmap_equals_shard_map_on_n_devices(tiny, model, n):
    mcfg = tiny.mcfg if model == "ease" else tiny_model("lnln", tiny.data)
    tcfg = dataclasses.replace(tiny.tcfg, lr=1e-2)
    base = T.make_train_step(mcfg, LossConfig(), tcfg, tiny.spe, tiny.data.train.n)
    state0 = host(T.create_state(mcfg, tcfg, 0, tiny.spe))
    local = SimpleNamespace(**{**vars(tiny), "state0": state0})
    runs = {mode: run_steps(local, mode, n, step=counted(base)) for mode in ("pmap", "shard_map")}
    (s_p, m_p), (s_s, m_s) = runs["pmap"], runs["shard_map"]
    assert max_abs_diff(s_p.params, state0.params) > 1e-4
    assert_trees_close(s_p.params, s_s.params, atol=1e-5, rtol=1e-5)
    assert_trees_close(s_p.opt_state, s_s.opt_state, atol=1e-5, rtol=1e-5)
    if model == "ease":
        assert_trees_close(s_p.anchors, s_s.anchors, atol=1e-5, rtol=1e-5)
    for a, b in zip(m_p, m_s):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
