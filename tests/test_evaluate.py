"""Tests of `ease_jax.evaluate`: cached evaluation masks, batched prediction (padding of the last
batch, determinism), the two selection protocols, the paper protocol's table assembly and the
aggregation over seeds. The prediction tests use a TINY EASE (two compilations of its forward
pass); everything else runs on hand-made numbers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax import evaluate as E
from ease_jax.config import model_config
from ease_jax.data.missing import (
    INTER_MODAL_SUBSETS,
    apply_keep_masks,
    burst_keep_masks,
    eval_keep_masks,
    inter_modal_keep_masks,
)
from ease_jax.data.mmsa import from_raw
from ease_jax.data.synthetic import synthetic
from ease_jax.metrics import METRIC_KEYS
from ease_jax.models import build_model, init_params

from helpers import TINY_MODEL as TINY
from helpers import random_model_params

N_TEST = 11  # not a multiple of the batch size below
# Cheaper XLA compilation for the reference forward pass (the same computation).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def data():
    raw = synthetic(
        "mosi", seed=2, n_train=4, n_valid=4, n_test=N_TEST, text_len=4, audio_len=4, vision_len=3
    )
    # No text padding: every per-token feature row is then a valid position, so the observed text
    # missing rate is unambiguous (padded rows hit a library bug, see test_missing's
    # test_features_mode_padding_is_not_missing), and the two middle tokens can be dropped.
    raw["test"]["text_bert"][:, 1] = 1
    return from_raw(raw, source="synthetic:tiny")


@pytest.fixture(scope="module")
def model(data):
    d = data.dims
    cfg = model_config(
        "ease",
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
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def evaluators(data, model):
    cfg, _ = model
    masks = E.MaskBank(data.test)
    return {
        bs: E.Evaluator(cfg, data.test, "mosi", batch_size=bs, masks=masks) for bs in (4, N_TEST)
    }


def assert_masks_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------------------------
# MaskBank


def test_condition_names():
    assert E.condition_name("rate", 0.5) == "0.5"
    assert E.condition_name("rate", 0.0) == "0.0"
    assert E.condition_name("subset", "la") == "la"
    assert E.condition_name("burst", 0.3) == "burst:0.3"
    assert [E.condition_name("rate", r) for r in E.RATES] == [
        "0.0",
        "0.1",
        "0.2",
        "0.3",
        "0.4",
        "0.5",
        "0.6",
        "0.7",
        "0.8",
        "0.9",
    ]


def test_mask_bank_caches_and_matches_the_mask_makers(data):
    bank = E.MaskBank(data.test)
    first = bank.get("rate", 0.5)
    assert bank.get("rate", 0.5) is first  # cached: the identical object
    assert_masks_equal(first, eval_keep_masks(data.test, 0.5, seed=1111))
    assert set(first) == {"text", "text_features", "audio", "vision"}
    assert bank.get("rate", 0.2) is not first
    assert_masks_equal(bank.get("subset", "av"), inter_modal_keep_masks(data.test, "av"))
    assert bank.get("subset", "av") is bank.get("subset", "av")
    assert_masks_equal(
        bank.get("burst", 0.4), burst_keep_masks(data.test, 0.4, mean_burst=5.0, seed=1111)
    )
    other = E.MaskBank(data.test, seed=7, mean_burst=2.0)
    assert_masks_equal(other.get("rate", 0.5), eval_keep_masks(data.test, 0.5, seed=7))
    assert_masks_equal(
        other.get("burst", 0.4), burst_keep_masks(data.test, 0.4, mean_burst=2.0, seed=7)
    )
    with pytest.raises(ValueError, match="kind"):
        bank.get("gaussian", 0.5)


# ----------------------------------------------------------------------------------------------
# Evaluator (tiny EASE)


def test_predict_pads_the_last_batch_and_is_deterministic(data, model, evaluators):
    _, params = model
    keep = evaluators[4].masks.get("rate", 0.3)
    small = evaluators[4].predict(params, keep)
    whole = evaluators[N_TEST].predict(params, keep)
    assert small.shape == (N_TEST,) and whole.shape == (N_TEST,)
    assert np.all(np.isfinite(small))
    np.testing.assert_allclose(small, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(evaluators[4].predict(params, keep), small)  # deterministic
    np.testing.assert_array_equal(evaluators[N_TEST].predict(params, keep), whole)


def test_predictions_depend_on_the_masks(model, evaluators):
    _, params = model
    ev = evaluators[4]
    full = ev.predict(params, ev.masks.get("rate", 0.0))
    assert not np.allclose(full, ev.predict(params, ev.masks.get("rate", 0.9)))
    assert not np.allclose(
        ev.predict(params, ev.masks.get("subset", "l")),
        ev.predict(params, ev.masks.get("subset", "av")),
    )


def numpy_mosi_metrics(p, y):
    """PROTOCOL.md section 3 (MMSA `metricsTop`, MOSI/MOSEI) written out in float64 NumPy, with
    the support-weighted F1 counted by hand (true labels first)."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)

    def f1_weighted(t, q):
        total = 0.0
        for c in (False, True):
            tp = np.sum(t & q) if c else np.sum(~t & ~q)
            fp = np.sum(~t & q) if c else np.sum(t & ~q)
            fn = np.sum(t & ~q) if c else np.sum(~t & q)
            support = np.sum(t == c)
            if support:
                total += support * 2 * tp / (2 * tp + fp + fn)
        return total / len(t)

    nz = y != 0
    pc, yc = p - p.mean(), y - y.mean()
    return {
        "Has0_acc_2": np.mean((y >= 0) == (p >= 0)),
        "Has0_F1_score": f1_weighted(y >= 0, p >= 0),
        "Non0_acc_2": np.mean((y[nz] > 0) == (p[nz] > 0)),
        "Non0_F1_score": f1_weighted(y[nz] > 0, p[nz] > 0),
        "Mult_acc_5": np.mean(np.round(np.clip(p, -2, 2)) == np.round(np.clip(y, -2, 2))),
        "Mult_acc_7": np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(y, -3, 3))),
        "MAE": np.mean(np.abs(p - y)),
        "Corr": np.sum(pc * yc) / np.sqrt(np.sum(pc ** 2) * np.sum(yc ** 2)),
    }


def numpy_incomplete_inputs(split, keep):
    """The incomplete model inputs of section 2 by hand: dropped features / frames zeroed, the
    observed missing rate = dropped valid positions / valid positions (features mode: the text
    rate is that of the feature rows; the split has no text padding, so every row is valid)."""
    a = split.arrays()
    assert np.all(a["text_mask"] == 1) and a["text_features"].shape[1] == a["text_ids"].shape[1]
    inputs, rates = {}, []
    k = keep["text_features"]
    inputs["text_features"] = a["text_features"] * k[:, :, None]
    rates.append((~k).sum(1) / k.shape[1])
    for m in ("audio", "vision"):
        k = keep[m]
        valid = np.arange(k.shape[1])[None, :] < a[f"{m}_lengths"][:, None]
        inputs[m] = a[m] * k[:, :, None]
        rates.append((valid & ~k).sum(1) / valid.sum(1))
    inputs["missing_rate"] = np.stack(rates, 1).astype(np.float32)
    # text ids -> [UNK] where dropped (unused by the features-mode model, checked for the record)
    ids = np.where(a["text_mask"].astype(bool) & ~keep["text"], 100, a["text_ids"])
    return inputs, ids


def test_metrics_against_an_independent_recomputation(data, model, evaluators):
    """Evaluator.metrics (masks applied on device, batches of 4 with the last one padded) equals
    masks applied in NumPy, ONE model.apply over the whole split and the metrics in NumPy."""
    cfg, _ = model
    split, ev, rate = data.test, evaluators[4], 0.5
    assert split.n % ev.batch_size != 0
    keep = eval_keep_masks(split, rate)
    inputs, ids = numpy_incomplete_inputs(split, keep)
    assert 0 < (ids == 100).sum() and np.any(inputs["missing_rate"][:, 0] > 0)  # text drops
    np.testing.assert_array_equal(
        np.asarray(apply_keep_masks(split.arrays(), keep, text_mode="features")["text_ids"]), ids)
    model_apply = jax.jit(lambda p, x: build_model(cfg).apply({"params": p}, x, train=False),
                          compiler_options=FAST)
    inputs = jax.tree_util.tree_map(jnp.asarray, inputs)
    # Random parameters with the regressor rescaled and shifted (by hand, from a first pass) so
    # the predictions spread over both signs and several Acc-7 classes, then far enough that many
    # are clipped: every metric informative.
    base = random_model_params(cfg, seed=3)
    reg = base["fusion"]["regressor"]
    z = np.asarray(model_apply(base, inputs)["pred"]) - float(reg["bias"][0])
    for spread in (1.5, 4.0):
        scale = spread / np.std(z)
        params = {**base, "fusion": {**base["fusion"], "regressor": {
            "kernel": reg["kernel"] * scale,
            "bias": jnp.full((1,), 0.05 - scale * np.median(z), jnp.float32)}}}
        want_pred = np.asarray(model_apply(params, inputs)["pred"], np.float64)
        assert want_pred.shape == (split.n,)
        assert 0.2 < np.mean(want_pred >= 0) < 0.8 and len(set(np.round(want_pred))) >= 3
        np.testing.assert_allclose(ev.predict(params, keep), want_pred, rtol=1e-5, atol=1e-5)
        got = ev.metrics(params, "rate", rate)
        want = numpy_mosi_metrics(want_pred, split.labels)
        assert set(got) == set(want) == set(METRIC_KEYS["mosi"])
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the missing rate reaches the model: without it the predictions differ
    wrong = dict(inputs, missing_rate=jnp.zeros_like(inputs["missing_rate"]))
    assert not np.allclose(np.asarray(model_apply(params, wrong)["pred"]), want_pred,
                           rtol=1e-4, atol=1e-4)


def test_protocol_structure(model, evaluators):
    _, params = model
    ev = evaluators[4]
    res = ev.protocol(params, burst_rates=(0.2,))
    assert set(res) == {"per_rate", "inter_modal", "burst"}
    assert list(res["per_rate"]) == [f"{r:.1f}" for r in E.RATES]
    assert list(res["inter_modal"]) == list(INTER_MODAL_SUBSETS)
    assert list(res["burst"]) == ["0.2"]
    for row in (*res["per_rate"].values(), *res["inter_modal"].values(), *res["burst"].values()):
        assert set(row) == set(METRIC_KEYS["mosi"])
    for r in (0.0, 0.5, 0.9):
        for k, v in ev.metrics(params, "rate", r).items():
            np.testing.assert_equal(res["per_rate"][f"{r:.1f}"][k], v)
    for k, v in ev.metrics(params, "subset", "lv").items():
        np.testing.assert_equal(res["inter_modal"]["lv"][k], v)
    for k, v in ev.metrics(params, "burst", 0.2).items():
        np.testing.assert_equal(res["burst"]["0.2"][k], v)
    assert ev.protocol(params)["burst"] == {}


def test_evaluator_batch_size_is_capped_by_the_split(data, model):
    ev = E.Evaluator(model[0], data.test, "mosi")
    assert ev.batch_size == N_TEST


def test_host_params():
    """An independently built tree: device arrays made from known NumPy arrays come back as
    exactly those values, dtypes and shapes, as NumPy (not JAX) arrays, and the host copy keeps
    its values after the device arrays are donated to (consumed by) a jitted update."""
    rng = np.random.default_rng(0)
    known = {
        "dense": {"kernel": rng.standard_normal((3, 2)).astype(np.float32),
                  "bias": np.array([1.5, -2.25], np.float32)},
        "table": [np.arange(6, dtype=np.int32).reshape(2, 3), np.array(7.0, np.float32)],
        "flag": np.array([True, False]),
        "half": np.array([0.5, -3.0, 65504.0], jnp.bfloat16),
    }
    device = jax.tree_util.tree_map(jnp.asarray, known)
    hp = E.host_params(device)
    assert jax.tree_util.tree_structure(hp) == jax.tree_util.tree_structure(known)
    for got, want in zip(jax.tree_util.tree_leaves(hp), jax.tree_util.tree_leaves(known),
                         strict=True):
        assert type(got) is np.ndarray and not isinstance(got, jax.Array)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # The training step donates its state: the host copy must outlive the device buffers.
    bump = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + jnp.ones((), x.dtype), t),
                   donate_argnums=0)
    floats = {"kernel": device["dense"]["kernel"], "bias": device["dense"]["bias"]}
    host = E.host_params(floats)
    new = bump(floats)
    np.testing.assert_array_equal(np.asarray(new["bias"]), known["dense"]["bias"] + 1)
    np.testing.assert_array_equal(host["kernel"], known["dense"]["kernel"])
    np.testing.assert_array_equal(host["bias"], known["dense"]["bias"])


def test_host_params_does_not_pin_device_buffers():
    """On CPU `device_get` returns views of the device buffers: host_params must copy, or the
    copy pins them and a step that donates them silently cannot."""
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    host = E.host_params({"w": x})["w"]
    assert host.__array_interface__["data"][0] != x.unsafe_buffer_pointer()
    jax.jit(lambda t: t + 1, donate_argnums=0)(x)
    assert x.is_deleted()  # the donation went through
    np.testing.assert_array_equal(host, np.arange(6).reshape(2, 3))


# ----------------------------------------------------------------------------------------------
# Selection


def test_better():
    assert E.better("MAE", 0.9, 1.0) and not E.better("MAE", 1.1, 1.0)
    assert E.better("Corr", 0.6, 0.5) and not E.better("Corr", 0.4, 0.5)
    assert not E.better("Corr", 0.5, 0.5) and not E.better("MAE", 1.0, 1.0)  # strict
    assert E.better("Has0_acc_2", 0.1, None)
    assert not E.better("Corr", float("nan"), None)  # NaN never improves ...
    assert not E.better("Corr", float("nan"), 0.2)
    assert not E.better("MAE", float("inf"), None)
    assert not E.better("MAE", None, 1.0)
    assert E.better("Corr", -0.9, float("nan"))  # ... and never blocks a finite value


def metrics(**changes):
    base = {k: 0.5 for k in METRIC_KEYS["mosi"]}
    base["MAE"] = 1.2
    return dict(base, **changes)


def test_selector_protocols():
    sel = E.Selector("mosi")
    assert sel.criteria == [
        "honest",
        "paper:Has0_acc_2",
        "paper:Non0_acc_2",
        "paper:Mult_acc_5",
        "paper:Mult_acc_7",
        "paper:MAE",
        "paper:Corr",
    ]
    nan = float("nan")
    # Epoch 0: everything finite improves from nothing; Corr is NaN and does not.
    improved = sel.update(0, metrics(MAE=1.0), metrics(Corr=nan))
    assert improved == [c for c in sel.criteria if c != "paper:Corr"]
    assert sel.epoch["paper:Corr"] is None and sel.best["paper:Corr"] is None
    # Epoch 1: valid MAE worse, test MAE better -> only the PAPER MAE moves (honest reads valid);
    # test accuracy up; Corr finite now.
    improved = sel.update(1, metrics(MAE=1.1), metrics(MAE=1.0, Has0_acc_2=0.6, Corr=0.1))
    assert improved == ["paper:Has0_acc_2", "paper:MAE", "paper:Corr"]
    # Epoch 2: valid MAE better (honest), valid accuracy far better (ignored: honest is MAE
    # only), test all equal or worse, Corr NaN (never improves, keeps epoch 1).
    improved = sel.update(
        2, metrics(MAE=0.9, Has0_acc_2=0.99), metrics(MAE=1.0, Corr=nan, Mult_acc_7=0.4)
    )
    assert improved == ["honest"]
    assert sel.epoch == {
        "honest": 2,
        "paper:Has0_acc_2": 1,
        "paper:Non0_acc_2": 0,
        "paper:Mult_acc_5": 0,
        "paper:Mult_acc_7": 0,
        "paper:MAE": 1,
        "paper:Corr": 1,
    }
    assert sel.best["honest"] == 0.9 and sel.best["paper:MAE"] == 1.0
    assert sel.best["paper:Corr"] == 0.1 and sel.best["paper:Has0_acc_2"] == 0.6
    assert all(isinstance(v, float) for v in sel.best.values())
    # The state survives JSON (the checkpoint record) and the selection continues identically.
    clone = E.Selector("mosi")
    clone.load_state_dict(json.loads(json.dumps(sel.state_dict())))
    assert clone.state_dict() == sel.state_dict()
    step3 = (metrics(MAE=0.95), metrics(MAE=0.8, Non0_acc_2=0.7))
    assert (
        clone.update(3, *step3)
        == sel.update(3, *step3)
        == ["paper:Non0_acc_2", "paper:MAE", "paper:Corr"]
    )
    assert clone.state_dict() == sel.state_dict()


def test_selector_compares_rounded_metrics_and_keeps_the_earlier_epoch_on_a_tie():
    """The released `get_best_results` compares `metricsTop`'s 4-decimal values and replaces only
    on a strict improvement: differences below 5e-5 are ties, and ties keep the earlier epoch."""
    sel = E.Selector("mosi")
    sel.update(0, metrics(MAE=1.00004), metrics(MAE=1.00004, Mult_acc_7=0.30004))
    # 1.00001 and 0.99996 both round to 1.0 (a tie); 0.30001 rounds to 0.3 (a tie).
    assert sel.update(1, metrics(MAE=1.00001), metrics(MAE=0.99996, Mult_acc_7=0.30001)) == []
    assert sel.epoch["honest"] == 0 and sel.epoch["paper:MAE"] == 0
    assert sel.best["honest"] == 1.0 and sel.best["paper:Mult_acc_7"] == 0.3
    # 0.99994 rounds to 0.9999 and 0.30006 to 0.3001: strict improvements.
    improved = sel.update(2, metrics(MAE=0.99994), metrics(MAE=0.99994, Mult_acc_7=0.30006))
    assert improved == ["honest", "paper:Mult_acc_7", "paper:MAE"]
    assert sel.best["honest"] == 0.9999 and sel.best["paper:Mult_acc_7"] == 0.3001


def test_selector_sims():
    sel = E.Selector("sims")
    assert sel.criteria == [
        "honest",
        "paper:Mult_acc_2",
        "paper:Mult_acc_3",
        "paper:Mult_acc_5",
        "paper:MAE",
        "paper:Corr",
    ]
    m = {k: 0.5 for k in METRIC_KEYS["sims"]}
    assert sel.update(0, m, m) == sel.criteria
    assert sel.update(1, dict(m, MAE=0.4), dict(m, Mult_acc_3=0.6)) == [
        "honest",
        "paper:Mult_acc_3",
    ]


# ----------------------------------------------------------------------------------------------
# Tables and aggregation


# Which checkpoint each reported metric comes from under the paper protocol (section 4).
OWNER = {
    "mosi": {
        "Has0_acc_2": "Has0_acc_2",
        "Has0_F1_score": "Has0_acc_2",
        "Non0_acc_2": "Non0_acc_2",
        "Non0_F1_score": "Non0_acc_2",
        "Mult_acc_5": "Mult_acc_5",
        "Mult_acc_7": "Mult_acc_7",
        "MAE": "MAE",
        "Corr": "Corr",
    },
    "sims": {
        "Mult_acc_2": "Mult_acc_2",
        "F1_score": "Mult_acc_2",
        "Mult_acc_3": "Mult_acc_3",
        "Mult_acc_5": "Mult_acc_5",
        "MAE": "MAE",
        "Corr": "Corr",
    },
}


def code(criterion_index, metric_index, cond_index):
    """A value that says where it came from."""
    return 1000.0 * criterion_index + 10.0 * metric_index + 0.1 * cond_index


def hand_selected(dataset):
    keys = METRIC_KEYS[dataset]
    criteria = ["honest"] + [f"paper:{c}" for c in E.PAPER_SELECTION[dataset]]
    selected = {}
    for ci, c in enumerate(criteria):
        selected[c] = {
            "per_rate": {
                f"{r:.1f}": {m: code(ci, mi, ri) for mi, m in enumerate(keys)}
                for ri, r in enumerate(E.RATES)
            },
            "inter_modal": {
                s: {m: code(ci, mi, 20 + si) for mi, m in enumerate(keys)}
                for si, s in enumerate(INTER_MODAL_SUBSETS)
            },
            "burst": {},
            "epoch": ci,
        }
    return criteria, selected


@pytest.mark.parametrize("dataset", ["mosi", "sims"])
def test_protocol_table_paper_reads_each_metric_from_its_checkpoint(dataset):
    keys = METRIC_KEYS[dataset]
    criteria, selected = hand_selected(dataset)
    table = E.protocol_table(dataset, selected, "paper")
    assert set(table) == {"per_rate", "inter_modal"}
    assert list(table["per_rate"]) == [f"{r:.1f}" for r in E.RATES]
    for ri, r in enumerate(table["per_rate"]):
        row = table["per_rate"][r]
        assert set(row) == set(keys)
        for mi, m in enumerate(keys):
            owner = criteria.index(f"paper:{OWNER[dataset][m]}")
            assert row[m] == code(owner, mi, ri), (r, m)
    for si, s in enumerate(INTER_MODAL_SUBSETS):
        for mi, m in enumerate(keys):
            owner = criteria.index(f"paper:{OWNER[dataset][m]}")
            assert table["inter_modal"][s][m] == code(owner, mi, 20 + si)
    honest = E.protocol_table(dataset, selected, "honest")
    assert honest == selected["honest"]


def random_table(rng, keys, burst=False):
    t = {
        "per_rate": {f"{r:.1f}": {m: float(rng.normal()) for m in keys} for r in E.RATES},
        "inter_modal": {s: {m: float(rng.normal()) for m in keys} for s in INTER_MODAL_SUBSETS},
    }
    if burst:
        t["burst"] = {f"{r:.1f}": {m: float(rng.normal()) for m in keys} for r in (0.2, 0.6)}
    return t


@pytest.mark.parametrize("burst", [False, True])
def test_aggregate_against_numpy(burst):
    rng = np.random.default_rng(0)
    keys = METRIC_KEYS["mosi"]
    tables = [random_table(rng, keys, burst) for _ in range(3)]
    agg = E.aggregate(tables)
    expected_keys = {"per_rate", "inter_modal", "burst", "mean_over_rates", "mean_over_subsets"}
    if burst:
        expected_keys.add("burst_mean_over_rates")
    assert set(agg) == expected_keys
    if burst:
        assert set(agg["burst"]) == {"0.2", "0.6"}
    else:
        assert agg["burst"] == {}

    def arr(section, cond, m):
        return np.array([t[section][cond][m] for t in tables])

    for section in ("per_rate", "inter_modal") + (("burst",) if burst else ()):
        for cond in tables[0][section]:
            for m in keys:
                assert agg[section][cond][m]["mean"] == pytest.approx(arr(section, cond, m).mean())
                assert agg[section][cond][m]["std"] == pytest.approx(arr(section, cond, m).std())
    for summary, section in (("mean_over_rates", "per_rate"), ("mean_over_subsets", "inter_modal")):
        for m in keys:
            per_seed = np.array([np.mean([row[m] for row in t[section].values()]) for t in tables])
            assert len(tables[0][section]) == (10 if section == "per_rate" else 6)
            assert agg[summary][m]["mean"] == pytest.approx(per_seed.mean(), abs=1e-12)
            assert agg[summary][m]["std"] == pytest.approx(per_seed.std(), abs=1e-12)
    # One seed: std 0, mean = the value.
    one = E.aggregate(tables[:1])
    assert one["per_rate"]["0.3"]["MAE"] == {
        "mean": tables[0]["per_rate"]["0.3"]["MAE"],
        "std": 0.0,
    }


def test_aggregate_of_paper_tables_end_to_end():
    """protocol_table + aggregate as the sweep chains them."""
    _, selected = hand_selected("mosi")
    seeds = []
    for shift in (0.0, 1.0, 3.0):
        s = json.loads(json.dumps(selected))
        for crit in s.values():
            for section in ("per_rate", "inter_modal"):
                for row in crit[section].values():
                    for m in row:
                        row[m] += shift
        seeds.append(E.protocol_table("mosi", s, "paper"))
    agg = E.aggregate(seeds)
    single = E.protocol_table("mosi", selected, "paper")
    for m in METRIC_KEYS["mosi"]:
        rates_mean = np.mean([single["per_rate"][r][m] for r in single["per_rate"]])
        assert agg["mean_over_rates"][m]["mean"] == pytest.approx(rates_mean + 4.0 / 3.0)
        assert agg["mean_over_rates"][m]["std"] == pytest.approx(np.std([0.0, 1.0, 3.0]))
