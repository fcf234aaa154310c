"""Tests of `ease_jax.population`: a run trained inside a population equals the same run trained
alone (1 and 4 fake CPU devices, pmap and shard_map), one compile for all P runs, the checks on
what may share a program, and the memory footprint.

Tolerance. Alone and in a population the same run computes the same numbers, but vmap batches
the matmuls over runs (and the data-parallel layouts split the batch differently), so float
reductions round differently. Losses then agree to ~1e-7 relative; parameters agree to ~1e-4 in
relative L2 after 6 AdamW steps, with single entries off by up to ~lr: Adam divides by the root
of the second moment, so a parameter whose gradient is float noise moves by +-lr either way.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from ease_jax import population as Pop
from ease_jax import train as T
from ease_jax.config import LossConfig, RunConfig, TrainConfig
from ease_jax.data.missing import eval_keep_masks

from helpers import tiny_data_and_model

EPOCHS = 2
LOSS_RTOL, PARAM_REL_L2, PRED_ATOL = 1e-5, 1e-3, 1e-3


def tiny_setup():
    data, mcfg = tiny_data_and_model("ease", n_train=20)
    # 20 rows in batches of 7: 3 steps per epoch, the last one partial (6 real rows).
    tcfg = TrainConfig(epochs=4, batch_size=7, lr=1e-3, warmup_epochs=0)
    variants = [(LossConfig(), None), (LossConfig(ucmi=1.0, cons=0.5, uada=0.0, asym=3.0), 3e-3)]
    runs = [Pop.Run(seed, loss=loss, lr=lr, name=f"s{seed}_v{v}")
            for seed in (1111, 1112, 1113) for v, (loss, lr) in enumerate(variants)]
    return SimpleNamespace(data=data, mcfg=mcfg, tcfg=tcfg, loss=LossConfig(), runs=runs,
                           arrays=data.train.model_arrays(mcfg.text_encoder))


def train(s, runs, parallel, n_devices, run_batch=None):
    """EPOCHS epochs of `runs` as one population: (host state, per-epoch metrics, test preds,
    program)."""
    prog = Pop.get_program(s.mcfg, s.loss, s.tcfg, s.data.train.n, len(runs), parallel=parallel,
                           devices=jax.devices()[:n_devices], run_batch=run_batch)
    state = prog.put_state(Pop.init_population(s.mcfg, s.tcfg, s.loss, runs, prog.steps))
    train_arrays = prog.put_train(s.arrays)
    metrics = []
    for _ in range(EPOCHS):
        state, m = prog.train_epoch(state, train_arrays)
        metrics.append(jax.device_get(m))
    test = s.data.test.model_arrays(s.mcfg.text_encoder, labels=False)
    keep = eval_keep_masks(s.data.test, 0.5)
    preds = prog.predict(state.params, prog.put_rows(test, len(runs)),
                         prog.put_rows(keep, len(runs)), s.data.test.n)
    return prog.get_state(state), metrics, np.asarray(preds), prog


def rel_l2(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.float64(x) - np.float64(y)) ** 2)) for x, y in zip(la, lb))
    return math.sqrt(num / sum(float(np.sum(np.float64(y) ** 2)) for y in lb))


@pytest.fixture(scope="module")
def setup():
    s = tiny_setup()
    s.alone = [train(s, [r], "pmap", 1) for r in s.runs]  # one program for all six
    return s


# (parallel mode, devices, runs vmapped together): on a CPU the default maps the runs in turn;
# 6 vmaps all six (the accelerator default), 2 maps over vmapped pairs.
LAYOUTS = [("pmap", 1, None), ("pmap", 1, 6), ("shard_map", 4, 3),
           pytest.param(("pmap", 4, 2), marks=pytest.mark.slow),
           pytest.param(("shard_map", 4, None), marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}-{x[1]}-batch{x[2]}")
def test_population_member_equals_the_run_alone(setup, layout):
    parallel, n, run_batch = layout
    state, metrics, preds, prog = train(setup, setup.runs, parallel, n, run_batch)
    assert prog.traces["epoch"] == 1 and prog.traces["predict"] == 1  # one compile for all six
    assert prog.run_batch == min(run_batch or 1, 6 // prog.r)
    if parallel == "shard_map":
        assert (prog.r, prog.d) == (2, 2)  # 3 runs on each of 2 device pairs, data over 2
    for i, (alone_state, alone_metrics, alone_preds, _) in enumerate(setup.alone):
        assert int(state.step[i]) == EPOCHS * prog.steps == int(alone_state.step[0])
        for m, ma in zip(metrics, alone_metrics):
            assert set(m) == set(ma)
            for k in m:
                np.testing.assert_allclose(m[k][i], ma[k][0], rtol=LOSS_RTOL, atol=1e-6,
                                           err_msg=f"run {i} term {k}")
        for part in ("params", "opt_state", "anchors"):
            err = rel_l2(Pop.unstack(getattr(state, part), i),
                         Pop.unstack(getattr(alone_state, part), 0))
            assert err < PARAM_REL_L2, (i, part, err)
        np.testing.assert_allclose(preds[i], alone_preds[0], atol=PRED_ATOL)
        for key in ("rng", "mask_rng", "order_rng"):
            np.testing.assert_array_equal(getattr(state, key)[i], getattr(alone_state, key)[0])
        for k, v in alone_state.hparams.items():
            assert state.hparams[k][i] == v[0]


def test_population_runs_really_differ(setup):
    """The equality above is not vacuous: seeds and loss weights change the numbers."""
    states = [a[0] for a in setup.alone]
    assert rel_l2(states[0].params, states[2].params) > 0.05  # seeds 1111 vs 1112
    assert rel_l2(states[0].params, states[1].params) > 1e-3  # weights / lr, same seed
    losses = [a[1][0]["ucmi"][0] for a in setup.alone]  # [steps] of epoch 0
    assert losses[1][0] == losses[0][0]  # same seed: same initialisation and first batch
    assert np.all(losses[1][1:] != losses[0][1:])  # then the updates differ


def test_program_is_shared_and_compiles_once(setup):
    runs = setup.runs[:1]
    prog = train(setup, runs, "pmap", 1)[3]
    assert prog is setup.alone[0][3]  # the cached program of the six solo runs
    assert prog.traces["epoch"] == 1  # seven populations, one trace


def test_check_population_rejects_what_changes_the_program():
    base = LossConfig()
    Pop.check_population([Pop.Run(1, loss=LossConfig(uada=0.0, cons=0.0)), Pop.Run(2)],
                         base)
    with pytest.raises(ValueError, match="tau"):
        Pop.check_population([Pop.Run(1, loss=LossConfig(tau=2.0))], base)
    with pytest.raises(ValueError, match="unique"):
        Pop.check_population([Pop.Run(1), Pop.Run(1)], base)
    with pytest.raises(ValueError, match="at least one"):
        Pop.check_population([], base)


@pytest.mark.parametrize("args, expected", [
    ((6, 4, "pmap", None), (1, 4)), ((6, 4, "shard_map", None), (2, 2)),
    ((3, 4, "shard_map", None), (1, 4)), ((4, 4, "shard_map", None), (4, 1)),
    ((4, 4, "shard_map", 2), (2, 2)), ((1, 1, "pmap", None), (1, 1)),
])
def test_mesh_shape(args, expected):
    assert Pop.mesh_shape(*args) == expected


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="divide"):
        Pop.mesh_shape(3, 4, "shard_map", 2)
    with pytest.raises(ValueError, match="pmap"):
        Pop.mesh_shape(4, 4, "pmap", 2)


def test_stack_unstack_round_trip():
    trees = [{"a": np.full((2,), i, np.float32), "b": {"c": np.int32(i)}} for i in range(3)]
    stacked = Pop.stack(trees)
    assert stacked["a"].shape == (3, 2) and stacked["b"]["c"].shape == (3,)
    for i, t in enumerate(trees):
        got = Pop.unstack(stacked, i)
        np.testing.assert_array_equal(got["a"], t["a"])
        assert got["b"]["c"] == t["b"]["c"]


def test_run_footprint_bytes(setup):
    run = RunConfig(dataset="mosi", model=setup.mcfg, loss=setup.loss, train=setup.tcfg)
    mem = Pop.run_footprint_bytes(run, setup.arrays)
    state = jax.device_get(T.create_state(setup.mcfg, setup.tcfg, 0, 3))
    assert mem["state"] == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(state))
    assert mem["temp"] > 0
    assert mem["data"] == sum(np.asarray(v).nbytes for v in setup.arrays.values())
