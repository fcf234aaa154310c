"""Tests of `ease_jax.checkpoint`: exact TrainState round trips (parameters, AdamW state, anchors,
step, key), the JSON record, `latest_step`, and errors. No model is compiled: the states are
built by hand from the real pieces (optax AdamW, `init_anchors`, `TrainState`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ease_jax import checkpoint
from ease_jax.anchors import AnchorState, init_anchors, update_anchors
from ease_jax.train import TrainState


def make_state(seed: int, steps: int = 2) -> TrainState:
    """A TrainState whose every leaf holds seed-dependent, non-trivial values: AdamW moments and
    count after `steps` updates, visited anchors, a raw key."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {
            "dense": {
                "kernel": rng.normal(size=(5, 4)).astype(np.float32),
                "bias": rng.normal(size=(4,)).astype(np.float32),
            },
            "pos": rng.normal(size=(3, 4)).astype(np.float32),
        },
        "head": {
            "kernel": rng.normal(size=(4, 1)).astype(np.float32),
            "scale": np.float32(rng.normal()),
        },
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tx = optax.adamw(1e-2, weight_decay=1e-4)
    opt_state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32), params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    anchors = init_anchors(3, 4)
    feats = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    labels = jnp.asarray([-1.0, -0.5, 0.0, 0.05, 1.5, 2.0], jnp.float32)
    anchors = update_anchors(anchors, feats, labels)
    return TrainState(
        step=jnp.asarray(steps * 3, jnp.int32),
        params=params,
        opt_state=opt_state,
        anchors=anchors,
        rng=jax.random.key_data(jax.random.key(seed)),
        mask_rng=jax.random.key_data(jax.random.key(seed + 1)),
        order_rng=jax.random.key_data(jax.random.key(seed + 2)),
        hparams={"lr": np.float32(1e-3), "sp": np.float32(1.0), "cons": np.float32(0.5)},
    )


def assert_same_tree(restored, expected):
    leaves_r, tree_r = jax.tree_util.tree_flatten(restored)
    leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_r == tree_e
    for r, e in zip(leaves_r, leaves_e):
        r, e = np.asarray(r), np.asarray(jax.device_get(e))
        assert r.dtype == e.dtype and r.shape == e.shape
        np.testing.assert_array_equal(r, e)


def nan_equal(a, b):
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(nan_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, list) and len(a) == len(b) and all(nan_equal(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_train_state_round_trip_is_exact(tmp_path):
    state = make_state(0)
    assert bool(np.any(np.asarray(state.anchors.visited)))  # the anchors were really updated
    assert int(state.opt_state[0].count) == 2
    record = {"epoch": 4, "selection": {"best": {"honest": 0.8123456789012345}}}
    checkpoint.save(tmp_path / "latest", 4, state, record)
    target = make_state(1, steps=1)  # same structure, other values
    restored, rec = checkpoint.restore(tmp_path / "latest", target)
    assert type(restored) is TrainState
    assert type(restored.anchors) is AnchorState
    assert type(restored.opt_state) is type(state.opt_state)
    assert_same_tree(restored, state)
    assert restored.anchors.visited.dtype == np.bool_
    assert restored.rng.dtype == np.uint32 and restored.step.dtype == np.int32
    assert rec == record
    # Restored leaves are host arrays: a run can resume from them directly.
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(restored))
    # And it continues exactly like the original: one more AdamW step on both.
    tx = optax.adamw(1e-2, weight_decay=1e-4)
    grads = jax.tree_util.tree_map(lambda p: jnp.full(np.shape(p), 0.3, jnp.float32), state.params)
    u1, _ = tx.update(grads, state.opt_state, state.params)
    u2, _ = tx.update(
        grads,
        jax.tree_util.tree_map(jnp.asarray, restored.opt_state),
        jax.tree_util.tree_map(jnp.asarray, restored.params),
    )
    assert_same_tree(u2, u1)


def test_params_only_and_device_arrays_round_trip(tmp_path):
    """The fit loop saves bare parameter trees too; device (and multi-device) arrays are accepted."""
    devices = jax.devices()[:2]
    replicated = NamedSharding(Mesh(np.array(devices), ("data",)), P())
    params = {
        "a": jax.device_put(jnp.arange(6, dtype=jnp.float32).reshape(2, 3), replicated),
        "b": {"c": jnp.asarray([True, False]), "d": jnp.asarray(7, jnp.int32)},
    }
    checkpoint.save(str(tmp_path / "p"), 0, params)  # str paths work too
    restored, rec = checkpoint.restore(str(tmp_path / "p"), params)
    assert rec == {}
    assert_same_tree(restored, params)


def test_record_json_round_trip(tmp_path):
    record = {
        "epoch": 2,
        "selected": {},
        "flag": True,
        "none": None,
        "name": "seed 1111",
        "floats": [0.1, 1 / 3, 1e-300, -2.5e17, 0.0],
        "nan": float("nan"),
        "history": [
            {
                "epoch": 1,
                "improved": ["honest", "paper:MAE"],
                "valid": {"MAE": 1.2345678901234567, "Corr": float("nan")},
            }
        ],
        "selection": {
            "best": {"honest": 0.9, "paper:Corr": None},
            "epoch": {"honest": 0, "paper:Corr": None},
        },
        "nested": {"deeper": {"list": [1, [2, [3]]]}},
    }
    checkpoint.save(tmp_path / "r", 1, {"x": np.zeros(2, np.float32)}, record)
    _, rec = checkpoint.restore(tmp_path / "r", {"x": np.zeros(2, np.float32)})
    assert nan_equal(rec, record)
    assert rec["floats"][1] == 1 / 3  # floats survive bit for bit


def test_tuples_come_back_as_lists(tmp_path):
    checkpoint.save(tmp_path / "t", 0, {"x": np.ones(1)}, {"seeds": (1111, 1112)})
    _, rec = checkpoint.restore(tmp_path / "t", {"x": np.ones(1)})
    assert rec == {"seeds": [1111, 1112]}


def test_latest_step_and_one_checkpoint_kept(tmp_path):
    d = tmp_path / "latest"
    assert checkpoint.latest_step(d) is None
    assert not d.exists()  # asking does not create the directory
    d.mkdir()
    assert checkpoint.latest_step(d) is None
    s3, s5 = make_state(3), make_state(5)
    checkpoint.save(d, 3, s3, {"epoch": 3})
    assert checkpoint.latest_step(d) == 3
    checkpoint.save(d, 5, s5, {"epoch": 5})
    assert checkpoint.latest_step(d) == 5
    restored, rec = checkpoint.restore(d, s3)
    assert_same_tree(restored, s5)
    assert rec == {"epoch": 5}
    steps = sorted(p.name for p in d.iterdir() if p.name.isdigit())
    assert steps == ["5"]  # max_to_keep=1: the previous epoch's checkpoint is gone


def test_restore_without_checkpoint_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "empty", {"x": np.zeros(1)})
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_path / "missing", {"x": np.zeros(1)})


def test_save_replaces_an_existing_step(tmp_path):
    checkpoint.save(tmp_path / "c", 0, {"x": np.zeros(2, np.float32)}, {"v": 1})
    checkpoint.save(tmp_path / "c", 0, {"x": np.ones(2, np.float32)}, {"v": 2})
    restored, rec = checkpoint.restore(tmp_path / "c", {"x": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(restored["x"], np.ones(2, np.float32))
    assert rec == {"v": 2}
    # A lower step replaces a higher one too (a fresh run into an old run's directory).
    checkpoint.save(tmp_path / "c", 3, {"x": np.ones(2, np.float32)}, {"v": 3})
    checkpoint.save(tmp_path / "c", 1, {"x": np.zeros(2, np.float32)}, {"v": 4})
    assert checkpoint.latest_step(tmp_path / "c") == 1
    assert checkpoint.restore(tmp_path / "c", {"x": np.ones(2, np.float32)})[1] == {"v": 4}
