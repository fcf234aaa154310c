"""Tests of `ease_jax.evaluate`: cached evaluation masks, batched prediction (padding of the last
batch, determinism), the two selection protocols, the paper protocol's table assembly and the
aggregation over seeds, and the paired differences (models against the first, paper protocol
against honest) recomputed independently with scipy's t quantiles. The prediction tests use a
TINY EASE (two compilations of its forward pass); everything else runs on hand-made numbers."""

from __future__ import annotations

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
from helpers import HostEvaluator, random_model_params

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
        bs: HostEvaluator(cfg, data.test, "mosi", batch_size=bs, masks=masks) for bs in (4, N_TEST)
    }


def assert_masks_equal(a, b):
    a = {k: v for k, v in a.items() if k != "nominal_rate"}  # MaskBank's rate label
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
    assert set(first) == {"text", "text_features", "audio", "vision", "nominal_rate"}
    np.testing.assert_array_equal(first["nominal_rate"],
                                  np.full((data.test.n, 3), 0.5, np.float32))
    assert_masks_equal(first, eval_keep_masks(data.test, 0.5, seed=1111))
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
# The host batcher (`diagnostics.Forward` over `train.forward`, tiny EASE)


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
    """docs/protocol.md section 3 (MMSA `metricsTop`, MOSI/MOSEI) written out in float64 NumPy, with
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
    """The forward pass's metrics (masks applied on device, batches of 4 with the last one padded) equals
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


def test_forward_batch_size_is_capped_by_the_split(data, model):
    ev = HostEvaluator(model[0], data.test, "mosi")
    assert ev.batch_size == N_TEST


def test_parse_condition_and_labels():
    assert E.parse_condition("0.5") == ("rate", 0.5)
    assert E.parse_condition("0") == ("rate", 0.0)
    assert E.parse_condition("al") == ("subset", "la")  # canonical letter order
    assert E.parse_condition("v") == ("subset", "v")
    assert E.parse_condition("burst:0.3") == ("burst", 0.3)
    assert E.parse_condition("none") is None
    for bad in ("1.5", "lx", "ll", "", "burst:x", "-0.1"):
        with pytest.raises(ValueError, match="condition"):
            E.parse_condition(bad)
    with pytest.raises(ValueError, match="none"):
        E.parse_condition("none", allow_none=False)
    assert E.condition_label(("subset", "la")) == "kept {l,a}"
    assert E.condition_label(("rate", 0.5)) == "r = 0.5"


# ----------------------------------------------------------------------------------------------
# Paired differences (models, protocols), checked against scipy's Student-t quantiles


def reference_interval(values, reference):
    """Independent recomputation: mean of the paired differences and its 95% t-interval."""
    from scipy.stats import t

    d = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
    half = t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return d.mean(), d.mean() - half, d.mean() + half


def assert_interval(got, values, reference):
    mean, lo, hi = reference_interval(values, reference)
    assert got["n"] == len(values)
    np.testing.assert_allclose([got["mean"], got["lo"], got["hi"]], [mean, lo, hi], rtol=0,
                               atol=1e-9)


def test_paired_difference_by_hand_and_against_scipy():
    from scipy.stats import t

    # d = [1, 2, 3]: mean 2, sample sd 1 -> half width t_{0.975, 2} / sqrt(3).
    d = E.paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0)
    assert d["hi"] - d["mean"] == pytest.approx(t.ppf(0.975, 2) / np.sqrt(3), abs=1e-12)
    one = E.paired_difference([0.5], [0.2])
    assert one["mean"] == pytest.approx(0.3) and np.isnan(one["lo"]) and one["n"] == 1
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 31):  # df 1 ... 30: the table, exact to the printed digits
        x, y = rng.normal(size=n), rng.normal(size=n)
        assert_interval(E.paired_difference(x, y), x, y)
    for df in (31, 40, 120, 1000):  # beyond the table: the Cornish-Fisher expansion
        assert E.t975(df) == pytest.approx(t.ppf(0.975, df), abs=3e-8)
    with pytest.raises(ValueError):
        E.paired_difference([], [])


def seed_means(tables, section, metric):
    """Each seed's mean over a section's conditions (independent of `evaluate.condition_mean`)."""
    return [np.mean([row[metric] for row in t[section].values()]) for t in tables]


@pytest.mark.parametrize("dataset", ["mosi", "sims"])
def test_compare_models_pairs_by_seed(dataset):
    from helpers import fake_sweep_results

    ease = fake_sweep_results(dataset, "ease", [1, 2, 3, 4], seed=1)
    lnln = fake_sweep_results(dataset, "lnln", [3, 1, 2, 9], seed=2)  # other order, seed 4 absent
    lnln["behaviour"] = {"train_masks": "redrawn"}
    comp = E.compare_models({"ease": ease, "lnln": lnln})
    assert comp["behaviour"] == {"ease": None, "lnln": {"train_masks": "redrawn"}}
    assert comp["paired"]["reference"] == "ease"
    entry = comp["paired"]["models"]["lnln"]
    assert entry["seeds"] == ["1", "2", "3"]  # shared seeds in the first model's order
    for proto in ("honest", "paper"):
        mine = [lnln["seeds"][s][proto] for s in ("1", "2", "3")]
        ref = [ease["seeds"][s][proto] for s in ("1", "2", "3")]
        got = entry["protocols"][proto]
        assert list(got["per_rate"]) == [f"{r:.1f}" for r in E.RATES]
        assert set(got["inter_modal"]) == {"l", "a", "v", "la", "lv", "av"}
        for m in METRIC_KEYS[dataset]:
            for section in ("per_rate", "inter_modal"):
                for cond, d in got[section].items():
                    assert_interval(d[m], [t[section][cond][m] for t in mine],
                                    [t[section][cond][m] for t in ref])
            for section, summary in (("per_rate", "mean_over_rates"),
                                     ("inter_modal", "mean_over_subsets")):
                assert_interval(got[summary][m], seed_means(mine, section, m),
                                seed_means(ref, section, m))


def test_selection_inflation_is_paper_minus_honest_paired_by_seed():
    from helpers import fake_sweep_results

    res = fake_sweep_results("mosi", "ease", [1, 2, 3], seed=3)
    infl = res["selection_inflation"]
    assert set(infl) == {"per_rate_mean", "subset_mean"}
    paper = [s["paper"] for s in res["seeds"].values()]
    honest = [s["honest"] for s in res["seeds"].values()]
    for key, section in (("per_rate_mean", "per_rate"), ("subset_mean", "inter_modal")):
        assert set(infl[key]) == set(METRIC_KEYS["mosi"])
        for m in METRIC_KEYS["mosi"]:
            assert_interval(infl[key][m], seed_means(paper, section, m),
                            seed_means(honest, section, m))
    # Without kept-subset results only the 10-rate mean; one seed has no interval.
    no_subsets = [{"per_rate": t["per_rate"]} for t in paper[:1]]
    one = E.selection_inflation(no_subsets, [{"per_rate": t["per_rate"]} for t in honest[:1]])
    assert set(one) == {"per_rate_mean"}
    assert one["per_rate_mean"]["MAE"]["n"] == 1 and np.isnan(one["per_rate_mean"]["MAE"]["lo"])
