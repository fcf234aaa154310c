"""Tests of `ease_jax.models` (docs/protocol.md sections 5, 6, 8): output shapes at the three data sets'
feature dimensions, parameter counts (against the protocol's numbers and hand arithmetic), EASE's
randomness (imputation noise, subset views) and the subset views' masking.

Shape and count checks use `jax.eval_shape` (nothing is allocated or compiled); the behavioural
checks run a deliberately tiny EASE (d = 16, 2 tokens, depth-1 encoders and fusion) under `jit`.
"""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax.config import model_config, replace
from ease_jax.layers import CompletenessGate
from ease_jax.models import build_model, count_parameters, dummy_inputs, init_params
from ease_jax.models.ease import FusionHead, view_keep_flags

from helpers import TINY_INPUTS, TINY_MODEL, random_model_params, random_params

# Audio / vision feature widths of the MMSA files (docs/protocol.md section 1).
FEATURE_DIMS = {"mosi": (5, 20), "mosei": (74, 35), "sims": (33, 709)}
SHORT = {"text_encoder": "features", "text_len": 6, "audio_len": 7, "vision_len": 9,
         "text_dim": 16}

# A tiny EASE / LNLN for behavioural tests (real computation, compiled once each).
TINY = {**TINY_INPUTS, **TINY_MODEL}

EASE_EVAL_KEYS = {"pred", "tokens", "imp_mean", "imp_var", "imp_sample", "uncertainty", "gate",
                  "fused"}
EASE_TRAIN_KEYS = EASE_EVAL_KEYS | {"clean_tokens", "view_preds", "view_keep"}
LNLN_EVAL_KEYS = {"pred", "tokens", "completeness", "dominant"}  # reconstructions: training only
LNLN_TRAIN_KEYS = LNLN_EVAL_KEYS | {"clean_tokens", "disc_logits", "reconstruction"}


# Cheaper XLA compilation for these small CPU programs (the result is the same computation).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rngs(seed=0):
    k_params, k_noise, k_views = jax.random.split(jax.random.key(seed), 3)
    return {"params": k_params, "noise": k_noise, "views": k_views}


def _init_with_train_output(cfg, batch=2):
    """(train-mode outputs on clean inputs, params), as shapes (one trace, nothing computed)."""
    x = dummy_inputs(cfg, batch)
    model = build_model(cfg)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(_rngs(), x, x, train=True))
    return out, variables["params"]


def _param_shapes(cfg):
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def _count(tree):
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def make_batch(cfg, batch, seed, drop=0.4, full_drop=None):
    """(incomplete, clean) model inputs: clean features are random; the incomplete copy zeroes each
    frame with probability `drop` (never all of a row's text); `missing_rate` is the dropped
    fraction. `full_drop=(row, modality)` drops that whole modality of one row (r = 1)."""
    rng = np.random.default_rng(seed)
    keys = ("text_features", "audio", "vision")
    shapes = ((cfg.text_len, cfg.text_dim), (cfg.audio_len, cfg.audio_dim),
              (cfg.vision_len, cfg.vision_dim))
    clean, incomplete, rates = {}, {}, []
    for m, (key, (t, f)) in enumerate(zip(keys, shapes)):
        x = rng.standard_normal((batch, t, f)).astype(np.float32)
        dropped = rng.random((batch, t)) < drop
        dropped[:, 0] = False
        if full_drop is not None and full_drop[1] == m:
            dropped[full_drop[0]] = True
        clean[key] = jnp.asarray(x)
        incomplete[key] = jnp.asarray(np.where(dropped[..., None], 0.0, x))
        rates.append(dropped.mean(1))
    incomplete["missing_rate"] = jnp.asarray(np.stack(rates, 1), jnp.float32)
    clean["missing_rate"] = jnp.zeros((batch, 3), jnp.float32)
    return incomplete, clean


# --------------------------------------------------------------------------------------------
# Shapes at the data sets' dimensions (eval_shape: free)
# --------------------------------------------------------------------------------------------


# (text_dim, L, D_a, T_a, D_v, T_v), docs/protocol.md section 1; text_dim 768 = BERT features.
DATA_DIMS = {"mosi": (768, 50, 5, 375, 20, 500), "mosei": (768, 50, 74, 500, 35, 500),
             "sims": (768, 39, 33, 400, 709, 55)}


@functools.cache
def _abstract_model(model, dataset):
    """(train outputs, params, eval outputs) as shapes for `model` at the full dimensions of
    `dataset` in features mode (B = 2): traced once, shared by the shape and count tests."""
    cfg = model_config(model, dataset, text_encoder="features")
    train, params = _init_with_train_output(cfg, 2)
    x = dummy_inputs(cfg, 2)
    evaluation = jax.eval_shape(lambda p: build_model(cfg).apply({"params": p}, x), params)
    return train, params, evaluation


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
@pytest.mark.parametrize("model", ["ease", "lnln"])
def test_output_shapes(model, dataset):
    text_dim, text_len, d_a, t_a, d_v, t_v = DATA_DIMS[dataset]
    assert (d_a, d_v) == FEATURE_DIMS[dataset]
    dims = chex.Dimensions(B=2, K=8, D=128, V=2, M=3, C=2, P=2)
    train, params, evaluation = _abstract_model(model, dataset)
    enc = params["encoder"]
    for m, d, t in (("text", text_dim, text_len), ("audio", d_a, t_a), ("vision", d_v, t_v)):
        chex.assert_shape(enc[m]["proj"]["kernel"], (d, 128))
        chex.assert_shape(enc[m]["transformer"]["pos_embedding"], (t + 8, 128))  # T + 8 tokens

    if model == "ease":
        assert set(train) == EASE_TRAIN_KEYS and set(evaluation) == EASE_EVAL_KEYS
        chex.assert_shape([train["view_preds"]], dims["VB"])
        chex.assert_shape(train["view_keep"], dims["VBM"])
        assert train["view_keep"].dtype == jnp.bool_
        for out in (train, evaluation):
            chex.assert_shape([out[k] for k in ("tokens", "imp_mean", "imp_var", "imp_sample",
                                                "fused")], dims["MBKD"])
            chex.assert_shape([out["uncertainty"], out["gate"]], dims["MB"])
    else:
        assert set(train) == LNLN_TRAIN_KEYS and set(evaluation) == LNLN_EVAL_KEYS
        chex.assert_shape(train["disc_logits"], dims["PBKC"])  # row 0 h_d, row 1 clean text
        chex.assert_shape(train["reconstruction"], dims["MBKD"])
        for out in (train, evaluation):
            chex.assert_shape(out["tokens"], dims["MBKD"])
            chex.assert_shape(out["dominant"], dims["BKD"])
            chex.assert_shape(out["completeness"], dims["B"])
        depth = 2 if dataset == "mosi" else 4  # cross Transformer depth (section 8)
        assert {k for k in params["cross"] if k.startswith("attn_")} == {
            f"attn_{i}" for i in range(depth)}
    chex.assert_shape(train["pred"], dims["B"])
    chex.assert_shape(train["clean_tokens"], dims["MBKD"])
    chex.assert_shape(evaluation["pred"], dims["B"])
    for out in (train, evaluation):
        assert all(v.dtype in (jnp.float32, jnp.bool_) for v in out.values())


@pytest.mark.parametrize("model", ["ease", "lnln"])
def test_initial_learnable_tokens(model):
    """Sections 6.4 and 8: EASE's CLS token and LNLN's extra tokens start at 0, LNLN's proxy and
    hyper tokens at 1. Only these leaves of `init_params` are returned, so XLA drops the rest of
    the initialisation and the compilation stays small."""
    cfg = model_config(model, "mosi", **TINY)
    if model == "ease":
        pick = lambda p: {"cls": p["fusion"]["cls_token"],
                          "enc": p["encoder"]["audio"]["transformer"]["extra_tokens"],
                          "gate": p["gates"]["transformer"]["extra_tokens"]}  # [3, 1, d]
        want = {"cls": 0.0, "enc": 0.0, "gate": 0.0}
    else:
        pick = lambda p: {"proxy": p["proxy_tokens"], "hyper": p["hyper_tokens"],
                          "cross": p["cross"]["extra_token"],
                          "generator": p["proxy_generator"]["extra_tokens"]}
        want = {"proxy": 1.0, "hyper": 1.0, "cross": 0.0, "generator": 0.0}
    got = jax.jit(lambda k: pick(init_params(cfg, k)), compiler_options=FAST)(jax.random.key(0))
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)


def test_per_modality_modules_are_stacked_with_independent_parameters():
    """EASE's three imputers and gates and LNLN's three reconstructors are one module each over a
    leading modality axis: every leaf has a leading 3, and the three slices are initialised
    independently (as three separate modules would be)."""
    for model, names in (("ease", ("imputers", "gates")), ("lnln", ("reconstructors",))):
        cfg = model_config(model, "mosi", **TINY)
        shapes = _param_shapes(cfg)
        for name in names:
            assert all(x.shape[0] == 3 for x in jax.tree_util.tree_leaves(shapes[name])), name
    cfg = model_config("ease", "mosi", **TINY)
    kernel = jax.jit(lambda k: init_params(cfg, k)["imputers"]["gaussian"]["mean"]["fc0"]["kernel"],
                     compiler_options=FAST)(jax.random.key(0))
    chex.assert_shape(kernel, (3, cfg.dim, cfg.dim))
    assert len({np.asarray(kernel[m]).tobytes() for m in range(3)}) == 3


def test_dummy_inputs_layout():
    cfg = model_config("ease", "sims", text_len=7)
    x = dummy_inputs(cfg, 3)
    assert set(x) == {"text_ids", "text_mask", "text_types", "audio", "vision", "missing_rate"}
    chex.assert_shape([x["text_ids"], x["text_mask"], x["text_types"]], (3, 7))
    assert x["text_ids"].dtype == jnp.int32
    chex.assert_shape(x["audio"], (3, 400, 33))
    chex.assert_shape(x["vision"], (3, 55, 709))
    chex.assert_shape(x["missing_rate"], (3, 3))
    x = dummy_inputs(model_config("lnln", "mosi", **SHORT), 2)
    assert set(x) == {"text_features", "audio", "vision", "missing_rate"}
    chex.assert_shape(x["text_features"], (2, 6, 16))


# --------------------------------------------------------------------------------------------
# Parameter counts (eval_shape: free) against the protocol and hand arithmetic
# --------------------------------------------------------------------------------------------

LAYER = 296_320  # one block at d = 128 (see tests/test_layers.py)


def _transformer(frames, tokens, depth):
    return tokens * 128 + (frames + tokens) * 128 + depth * LAYER


def _encoders(text_dim, text_len, d_a, t_a, d_v, t_v):
    return sum(d * 128 + 128 + _transformer(t, 8, 2)
               for d, t in ((text_dim, text_len), (d_a, t_a), (d_v, t_v)))


GATE = _transformer(8, 1, 2) + 128 * 64 + 64 + 64 + 1
GAUSSIAN = 4 * (128 * 128 + 128)
IMPUTER = _transformer(16, 0, 2)
FUSION = 128 + _transformer(25, 0, 4) + 128 + 1
HYPER = 4 * 256 + 5 * 128 * 128 + 128 * 128 + 128


def _ease_by_hand(dims, use_ucmi=True):
    return _encoders(*dims) + FUSION + (3 * (IMPUTER + GAUSSIAN + GATE) if use_ucmi else 0)


def _lnln_by_hand(dims, cross_depth):
    return (_encoders(*dims) + GATE  # completeness check
            + 8 * 128 + _transformer(24, 8, 2)  # proxy tokens + proxy generator
            + 128 * 64 + 64 + 64 * 2 + 2  # effectiveness discriminator
            + 3 * _transformer(8, 0, 2)  # reconstructors
            + _transformer(8, 0, 2)  # language Transformer
            + 8 * 128 + 3 * HYPER  # hyper tokens + hyper-modality learner
            + 128 + 2 * 9 * 128 + cross_depth * LAYER  # cross Transformer
            + 128 + 1)  # regressor


def test_parameter_counts_features_mode_mosi():
    ease = count_parameters("ease", "mosi", text_encoder="features")
    lnln = count_parameters("lnln", "mosi", text_encoder="features")
    assert ease == {"total": 6_982_020, "bert": 0, "non_bert": 6_982_020}
    assert lnln == {"total": 6_483_012, "bert": 0, "non_bert": 6_483_012}
    assert _ease_by_hand(DATA_DIMS["mosi"]) == 6_982_020
    assert _lnln_by_hand(DATA_DIMS["mosi"], cross_depth=2) == 6_483_012
    assert _count(_abstract_model("ease", "mosi")[1]) == 6_982_020
    assert _count(_abstract_model("lnln", "mosi")[1]) == 6_483_012


def test_parameter_counts_mosei_and_sims():
    """Features mode = the non-BERT parameters; summed over the same `init_params` shapes that
    `count_parameters` sums (checked against it at MOSI above), traced once for the shape tests."""
    spec = {("ease", "mosei"): 7.01e6, ("ease", "sims"): 7.02e6,
            ("lnln", "mosei"): 7.10e6, ("lnln", "sims"): 7.11e6}
    counts = {key: _count(_abstract_model(*key)[1]) for key in spec}
    print("non-BERT parameter counts: " + ", ".join(
        f"{m.upper()} {d.upper()} {n:,}" for (m, d), n in counts.items()))
    for (model, dataset), n in counts.items():
        assert abs(n - spec[model, dataset]) <= 0.01 * spec[model, dataset], (model, dataset, n)
        by_hand = (_ease_by_hand(DATA_DIMS[dataset]) if model == "ease"
                   else _lnln_by_hand(DATA_DIMS[dataset], cross_depth=4))
        assert n == by_hand, (model, dataset)


def test_parameter_counts_bert_mode():
    pytest.importorskip("ease_jax.bert")
    ease = count_parameters("ease", "mosi")
    lnln = count_parameters("lnln", "mosi")
    assert ease == {"total": 116_464_260, "bert": 109_482_240, "non_bert": 6_982_020}
    assert lnln == {"total": 115_965_252, "bert": 109_482_240, "non_bert": 6_483_012}
    sims = count_parameters("ease", "sims")
    # bert-base-chinese = bert-base-uncased with a 21,128-word instead of 30,522-word vocabulary.
    assert sims["bert"] == 109_482_240 - (30_522 - 21_128) * 768 == 102_267_648
    assert abs(sims["bert"] - 102.27e6) <= 0.01 * 102.27e6
    assert sims["non_bert"] == _ease_by_hand(DATA_DIMS["sims"])
    print(f"BERT mode: EASE SIMS total {sims['total']:,} (bert-base-chinese {sims['bert']:,})")


def test_without_ucmi_removes_imputer_gate_and_outputs():
    cfg = model_config("ease", "mosi", text_encoder="features", use_ucmi=False)
    x = dummy_inputs(cfg)
    model = build_model(cfg)
    rngs = {"params": jax.random.key(0), "views": jax.random.key(1)}  # no "noise": no sampling
    out, variables = jax.eval_shape(lambda: model.init_with_output(rngs, x, x, train=True))
    assert set(variables["params"]) == {"encoder", "fusion"}
    assert _count(variables) == _ease_by_hand(DATA_DIMS["mosi"], use_ucmi=False) == 3_193_089
    assert set(out) == {"pred", "tokens", "clean_tokens", "view_preds", "view_keep"}
    assert set(jax.eval_shape(lambda p: model.apply(p, x), variables)) == {"pred", "tokens"}


def test_zero_views_removes_view_outputs_but_no_parameters():
    cfg = model_config("ease", "mosi", **SHORT, n_views=0)
    x = dummy_inputs(cfg)
    model = build_model(cfg)
    rngs = {"params": jax.random.key(0), "noise": jax.random.key(1)}  # no "views" stream
    out, variables = jax.eval_shape(lambda: model.init_with_output(rngs, x, x, train=True))
    assert set(out) == EASE_TRAIN_KEYS - {"view_preds", "view_keep"}
    # Views reuse the fusion head: the same parameters as with views.
    assert _count(variables["params"]) == _ease_by_hand((16, 6, 5, 7, 20, 9))


# --------------------------------------------------------------------------------------------
# Subset-view keep flags
# --------------------------------------------------------------------------------------------


def test_view_keep_flags_statistics():
    n_views, batch = 3, 8192
    keep = np.asarray(view_keep_flags(jax.random.key(0), n_views, batch, 0.5))
    assert keep.shape == (n_views, batch, 3) and keep.dtype == np.bool_
    kept = keep.sum(-1)
    assert kept.min() >= 1  # every row keeps at least one modality
    # P(keep m) = 1/2 + P(none) / 3 = 1/2 + 1/24; P(all three) = 1/8; P(exactly one) = 3/8 + 1/8.
    n = n_views * batch
    tol = lambda p: 4.5 * math.sqrt(p * (1 - p) / n)
    for m in range(3):
        assert abs(keep[..., m].mean() - 13 / 24) < tol(13 / 24), m
    assert abs((kept == 3).mean() - 1 / 8) < tol(1 / 8)
    assert abs((kept == 1).mean() - 1 / 2) < tol(1 / 2)
    # Views and rows are drawn independently of each other.
    assert not np.array_equal(keep[0], keep[1])


def test_view_keep_flags_extremes():
    keep = np.asarray(view_keep_flags(jax.random.key(1), 3, 8192, 0.0))
    np.testing.assert_array_equal(keep.sum(-1), 1)  # nothing kept -> exactly one rescued
    shares = keep.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.02)  # uniformly chosen
    np.testing.assert_array_equal(np.asarray(view_keep_flags(jax.random.key(2), 3, 8192, 1.0)),
                                  True)


# --------------------------------------------------------------------------------------------
# EASE behaviour on a tiny model (compiled)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ease():
    cfg = model_config("ease", "mosi", **TINY)
    return cfg, build_model(cfg), random_model_params(cfg, seed=1)


@pytest.fixture(scope="module")
def train_apply(tiny_ease):
    model = tiny_ease[1]

    @jax.jit(compiler_options=FAST)
    def run(params, inputs, clean, k_noise, k_views):
        return model.apply({"params": params}, inputs, clean, train=True,
                           rngs={"noise": k_noise, "views": k_views})

    return run


@pytest.fixture(scope="module")
def eval_apply(tiny_ease):
    """Evaluation of the tiny EASE as configured (deterministic: no rng passed) and with
    `sample_at_eval=True` (rng passed), in one compiled function that may trace only once."""
    cfg, model, _ = tiny_ease
    sampling = build_model(replace(cfg, sample_at_eval=True))

    @jax.jit(compiler_options=FAST)
    @chex.assert_max_traces(n=1)
    def evaluate(params, inputs, key):
        return (model.apply({"params": params}, inputs),  # no rngs: none may be needed
                sampling.apply({"params": params}, inputs, rngs={"noise": key}))

    return evaluate


def test_ease_eval_is_deterministic_needs_no_rng_and_compiles_once(tiny_ease, eval_apply):
    cfg, _, params = tiny_ease
    inputs, _ = make_batch(cfg, 3, seed=0)
    key = jax.random.key(0)
    first, second = eval_apply(params, inputs, key)[0], eval_apply(params, inputs, key)[0]
    for k in EASE_EVAL_KEYS:
        np.testing.assert_array_equal(np.asarray(first[k]), np.asarray(second[k]))
    np.testing.assert_array_equal(np.asarray(first["imp_sample"]), np.asarray(first["imp_mean"]))
    assert np.isfinite(np.asarray(first["pred"])).all()
    preds = [first["pred"]]
    for seed in (1, 2):  # new data, same shapes: no retrace
        preds.append(eval_apply(params, make_batch(cfg, 3, seed=seed)[0], key)[0]["pred"])
    assert not np.allclose(np.asarray(preds[0]), np.asarray(preds[1]))
    with pytest.raises(AssertionError):  # a new shape would retrace: the guard is live
        eval_apply(params, make_batch(cfg, 5, seed=3)[0], key)


def test_ease_train_sampling_depends_on_noise_rng(tiny_ease, train_apply):
    cfg, model, params = tiny_ease
    inputs, clean = make_batch(cfg, 4, seed=4)
    keys = jax.random.split(jax.random.key(7), 3)
    base = train_apply(params, inputs, clean, keys[0], keys[1])
    again = train_apply(params, inputs, clean, keys[0], keys[1])
    new_noise = train_apply(params, inputs, clean, keys[2], keys[1])
    new_views = train_apply(params, inputs, clean, keys[0], keys[2])
    for key in EASE_TRAIN_KEYS:
        np.testing.assert_array_equal(np.asarray(base[key]), np.asarray(again[key]))
    a = lambda out, k: np.asarray(out[k])
    assert not np.allclose(a(base, "imp_sample"), a(new_noise, "imp_sample"))
    assert not np.allclose(a(base, "pred"), a(new_noise, "pred"))
    np.testing.assert_array_equal(a(base, "imp_mean"), a(new_noise, "imp_mean"))
    np.testing.assert_array_equal(a(base, "view_keep"), a(new_noise, "view_keep"))
    # The "views" stream moves the keep flags only.
    assert not np.array_equal(a(base, "view_keep"), a(new_views, "view_keep"))
    np.testing.assert_array_equal(a(base, "imp_sample"), a(new_views, "imp_sample"))
    # Eq. 3: z_hat = mu + sqrt(var) * eps, eps ~ N(0, 1) (not var * eps).
    eps = (a(base, "imp_sample") - a(base, "imp_mean")) / np.sqrt(a(base, "imp_var"))
    assert abs(eps.mean()) < 0.2 and 0.85 < eps.std() < 1.15, (eps.mean(), eps.std())
    # Train mode without the "noise" stream fails loudly.
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda p: model.apply({"params": p}, inputs, clean, train=True,
                                             rngs={"views": keys[1]}), params)


def _f64(out):
    return {k: np.asarray(v, np.float64) if v.dtype != jnp.bool_ else np.asarray(v)
            for k, v in out.items()}


def test_ease_gate_fusion_and_uncertainty(tiny_ease, train_apply):
    """Gate, fused tokens and uncertainty checked by explicit loops, by properties of the rate
    and against the completeness estimator run on its own (train mode: z_hat is a sample)."""
    cfg, _, params = tiny_ease
    b, k, d = 4, cfg.tokens, cfg.dim
    inputs, clean = make_batch(cfg, b, seed=5)
    keys = jax.random.key(1), jax.random.key(2)
    run = lambda rate: _f64(train_apply(params, dict(inputs, missing_rate=jnp.asarray(
        rate, jnp.float32)), clean, *keys))
    # Different rates per sample and modality (columns l, a, v).
    rate = np.array([[0.1, 0.5, 0.8], [0.7, 0.2, 0.4], [0.3, 0.9, 0.0], [0.6, 0.05, 0.35]])
    out, out0 = run(rate), run(np.zeros((b, 3)))
    assert not np.allclose(out["imp_sample"], out["imp_mean"])  # a real sample

    # w does not depend on the rate, and gate[m] uses rate column m: gate / (1 - r) = gate at 0.
    np.testing.assert_allclose(out["gate"] / (1.0 - rate.T), out0["gate"], rtol=2e-6)
    # ... and w is the completeness estimator of modality m run on h_m with gate_m's parameters.
    estimator = jax.jit(CompletenessGate(k, d, 2, cfg.heads, cfg.dim_head, cfg.mlp_dim).apply,
                        compiler_options=FAST)  # one compile: the three share their shapes
    for m in range(3):
        gate_m = jax.tree_util.tree_map(lambda x, m=m: x[m], params["gates"])  # slice m of the stack
        w = estimator({"params": gate_m}, jnp.asarray(out["tokens"][m], jnp.float32))
        np.testing.assert_allclose(out0["gate"][m], np.asarray(w), rtol=1e-5, atol=1e-6)
    assert np.all((out0["gate"] > 0) & (out0["gate"] < 1))  # rate 0: strictly inside (0, 1)

    # One (modality, sample) by explicit loops in float64: fused and the sample uncertainty.
    m, i = 2, 1
    g = out["gate"][m, i]
    total = 0.0
    for kk in range(k):
        for j in range(d):
            want = g * out["tokens"][m, i, kk, j] + (1.0 - g) * out["imp_sample"][m, i, kk, j]
            assert abs(out["fused"][m, i, kk, j] - want) <= 1e-5 * (1 + abs(want)), (kk, j)
            total += out["imp_var"][m, i, kk, j]
    assert out["uncertainty"][m, i] == pytest.approx(total / (k * d), rel=1e-5)
    for mm in range(3):  # every (modality, sample): uncertainty = sum over K and d / (K d)
        for ii in range(b):
            want = sum(out["imp_var"][mm, ii, kk, j] for kk in range(k) for j in range(d))
            assert out["uncertainty"][mm, ii] == pytest.approx(want / (k * d), rel=1e-5)
    assert np.all(out["imp_var"] >= np.float32(1e-6))

    # Rate 1 for (audio, sample 2): gate 0 and the fused tokens ARE the sampled imputation, bit
    # for bit; every other (modality, sample) is unchanged bit for bit.
    full = rate.copy()
    full[2, 1] = 1.0
    out1 = run(full)
    assert out1["gate"][1, 2] == 0.0
    np.testing.assert_array_equal(out1["fused"][1, 2], out1["imp_sample"][1, 2])
    assert not np.allclose(out1["fused"][1, 2], out1["tokens"][1, 2])
    other = np.ones((3, b), bool)
    other[1, 2] = False
    np.testing.assert_array_equal(out1["gate"][other], out["gate"][other])
    np.testing.assert_array_equal(out1["fused"][other], out["fused"][other])
    for key in ("tokens", "imp_mean", "imp_var", "imp_sample", "uncertainty"):
        np.testing.assert_array_equal(out1[key], out[key], err_msg=key)


@pytest.mark.parametrize("perturbed", [0, 1, 2])
def test_ucmi_imputers_read_the_other_two_modalities(tiny_ease, eval_apply, perturbed):
    """Section 6.2: text is imputed from [h_a; h_v], audio from [h_l; h_v], vision from
    [h_l; h_a]. Perturbing one modality's input moves its own tokens and the two OTHER
    imputations; its own imputation stays bit-identical (evaluation mode: no sampling)."""
    cfg, _, params = tiny_ease
    inputs, _ = make_batch(cfg, 3, seed=8)  # B = 3: the shape eval_apply is compiled for
    key = ("text_features", "audio", "vision")[perturbed]
    noise = np.random.default_rng(perturbed).standard_normal(inputs[key].shape)
    moved = dict(inputs, **{key: inputs[key] + jnp.asarray(noise, jnp.float32)})
    base = _f64(eval_apply(params, inputs, jax.random.key(0))[0])
    pert = _f64(eval_apply(params, moved, jax.random.key(0))[0])
    for m in range(3):
        same = m == perturbed
        for name in ("imp_mean", "imp_var"):
            if same:
                np.testing.assert_array_equal(pert[name][m], base[name][m], err_msg=(name, m))
            else:
                assert not np.allclose(pert[name][m], base[name][m], rtol=1e-4, atol=1e-6), (
                    name, m)
        # The perturbation reaches modality `perturbed`'s encoder only.
        if same:
            assert not np.allclose(pert["tokens"][m], base["tokens"][m])
        else:
            np.testing.assert_array_equal(pert["tokens"][m], base["tokens"][m])


def test_ease_views_zero_the_dropped_modalities(tiny_ease, train_apply):
    cfg, _, params = tiny_ease
    b, k, d = 4, cfg.tokens, cfg.dim
    inputs, clean = make_batch(cfg, b, seed=6)
    out = train_apply(params, inputs, clean, jax.random.key(3), jax.random.key(4))
    fused = np.asarray(out["fused"])  # [3, B, K, d]
    keep = np.asarray(out["view_keep"])  # [V, B, 3]
    assert keep.shape == (cfg.n_views, b, 3) and keep.sum(-1).min() >= 1
    assert not keep.all()  # this key drops something (else the test would prove nothing)
    rows = [np.concatenate([fused[m, i] for m in range(3)], 0) for i in range(b)]  # l, a, v
    masked = [np.concatenate([fused[m, i] * keep[v, i, m] for m in range(3)], 0)
              for v in range(cfg.n_views) for i in range(b)]
    tokens = jnp.asarray(np.stack(rows + masked))  # [(1 + V) B, 3K, d]
    assert tokens.shape == ((1 + cfg.n_views) * b, 3 * k, d)
    fusion = jax.jit(FusionHead(cfg).apply, compiler_options=FAST)({"params": params["fusion"]}, tokens)
    np.testing.assert_allclose(np.asarray(out["pred"]), np.asarray(fusion[:b]),
                               rtol=1e-5, atol=1e-5)
    view_preds = np.asarray(out["view_preds"])
    np.testing.assert_allclose(view_preds, np.asarray(fusion[b:]).reshape(cfg.n_views, b),
                               rtol=1e-5, atol=1e-5)
    # Views that drop a modality predict differently from the full view.
    dropped = ~keep.all(-1)
    assert not np.allclose(view_preds[dropped],
                           np.broadcast_to(np.asarray(out["pred"]), view_preds.shape)[dropped])


def test_sample_at_eval_makes_evaluation_random(tiny_ease, eval_apply):
    cfg, _, params = tiny_ease
    inputs, _ = make_batch(cfg, 3, seed=7)
    (plain, a), (_, b) = (eval_apply(params, inputs, jax.random.key(s)) for s in (0, 1))
    again = eval_apply(params, inputs, jax.random.key(0))[1]
    np.testing.assert_array_equal(np.asarray(a["pred"]), np.asarray(again["pred"]))
    assert not np.allclose(np.asarray(a["pred"]), np.asarray(b["pred"]))
    assert not np.allclose(np.asarray(a["imp_sample"]), np.asarray(a["imp_mean"]))
    # Sampling moves the imputation only: the Gaussian itself is the deterministic one.
    np.testing.assert_allclose(np.asarray(a["imp_mean"]), np.asarray(plain["imp_mean"]),
                               rtol=1e-6, atol=1e-6)
    assert "view_preds" not in a  # views are a training-only device
    sampling = build_model(replace(cfg, sample_at_eval=True))
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda p: sampling.apply({"params": p}, inputs), params)


# --------------------------------------------------------------------------------------------
# Encoding rows whose clean and incomplete inputs are equal once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [8, 3])
def test_encoding_equal_rows_once_equals_encoding_twice(chunks):
    """`MultimodalEncoder(inputs, clean)` encodes a row whose two inputs are equal once: its
    tokens and the gradients of any function of (h, c) equal two independent plain calls (on the
    incomplete and on the clean inputs), for rows unchanged in some modalities and not in others,
    and a batch that leaves some chunks empty."""
    from ease_jax.models import common

    cfg = model_config("ease", "mosi", encode_chunks=chunks, **{**TINY, "text_len": 5})
    b = 7
    inc, clean = make_batch(cfg, b, seed=5)
    # Rows 0, 3, 4 keep all their audio, rows 1, 4, 6 all their vision, row 2 all its text.
    for key, rows in (("audio", [0, 3, 4]), ("vision", [1, 4, 6]), ("text_features", [2])):
        inc[key] = inc[key].at[jnp.asarray(rows)].set(clean[key][jnp.asarray(rows)])
    assert not np.array_equal(inc["audio"][1], clean["audio"][1])
    encoder = common.MultimodalEncoder(cfg)
    x_inc, x_clean = (common.encoder_inputs(x, "features") for x in (inc, clean))
    params = random_params(
        jax.eval_shape(lambda: encoder.init(jax.random.key(0), x_inc, x_clean))["params"], seed=3)
    rng = np.random.default_rng(9)
    w_h, w_c = (jnp.asarray(rng.standard_normal((3, b, cfg.tokens, cfg.dim)), jnp.float32)
                for _ in range(2))

    def once(p):
        h, c = encoder.apply({"params": p}, x_inc, x_clean)
        return jnp.sum(w_h * h) + jnp.sum(w_c * jnp.tanh(c)), (h, c)

    def twice(p):
        h, _ = encoder.apply({"params": p}, x_inc)
        c, _ = encoder.apply({"params": p}, x_clean)
        return jnp.sum(w_h * h) + jnp.sum(w_c * jnp.tanh(c)), (h, c)

    (_, (h1, c1)), g1 = jax.jit(jax.value_and_grad(once, has_aux=True))(params)
    (_, (h2, c2)), g2 = jax.jit(jax.value_and_grad(twice, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c1), np.asarray(c2), rtol=1e-5, atol=1e-6)
    for (path, a), ref in zip(jax.tree_util.tree_leaves_with_path(g1),
                              jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["ease", "lnln"])
def test_bf16_precision_runs_matmuls_in_bf16_and_keeps_float32_elsewhere(model):
    """`precision="bf16"`: every matmul (dot_general) of the train-mode forward pass but the
    scalar read-outs (regressor, gate / discriminator logits: <= 2 outputs) takes bfloat16
    operands, parameters and outputs stay float32, and the outputs are the float32 model's within
    bfloat16 rounding (same parameters; the regressor's random weights cancel, so its relative
    error is the largest)."""
    cfg32 = model_config(model, "mosi", **TINY)
    cfg16 = replace(cfg32, precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        replace(cfg32, precision="fp16")
    params = random_model_params(cfg32, seed=2)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        _param_shapes(cfg16))
    inc, clean = make_batch(cfg32, 4, seed=3)

    def forward(cfg):
        return lambda p: build_model(cfg).apply({"params": p}, inc, clean, train=True,
                                                 rngs=_rngs(1))

    jaxpr = jax.make_jaxpr(forward(cfg16))(params)
    dots = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
    bf16 = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    read_outs = [e for e in dots if e not in bf16]
    assert len(bf16) > 10 * len(read_outs) > 0, (len(bf16), len(read_outs))
    assert all(e.outvars[0].aval.shape[-1] <= 2 for e in read_outs)
    out32 = jax.jit(forward(cfg32), compiler_options=FAST)(params)
    out16 = jax.jit(forward(cfg16), compiler_options=FAST)(params)
    for key, tol in (("pred", 0.15), ("tokens", 0.02), ("clean_tokens", 0.02)):
        assert out16[key].dtype == jnp.float32
        scale = float(np.abs(np.asarray(out32[key])).max())
        np.testing.assert_allclose(np.asarray(out16[key]), np.asarray(out32[key]),
                                   atol=tol * scale, err_msg=key)
        assert not np.array_equal(np.asarray(out16[key]), np.asarray(out32[key])), key


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, nested sub-jaxprs (scan, cond, custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)
