"""Tests of `ease_jax.objectives` (docs/protocol.md sections 7-8): the assembled EASE and LNLN objectives.

Values are compared with float64 NumPy formulas of the protocol evaluated on real outputs of a tiny
EASE / LNLN; the weights with the presets' numbers written out by hand; gradients (one `jacrev` per
model: every term's gradient w.r.t. every parameter in one compiled call) for finiteness and for
which parameter groups each term reaches. LNLN's gradient reversal is checked against central
finite differences of the forward pass, which know nothing of the reversal.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax.anchors import AnchorState, init_anchors
from ease_jax.config import LossConfig, model_config
from ease_jax.models import build_model
from ease_jax.objectives import EASE_TERMS, LNLN_TERMS, ease_loss, lnln_loss, weighted_mean

from helpers import TINY_INPUTS, TINY_MODEL, random_model_params

# Cheaper XLA compilation for these small CPU programs (the result is the same computation).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

TINY = {**TINY_INPUTS, **TINY_MODEL}
B = 4
LABELS = np.array([-1.2, 0.05, 0.8, 2.0], np.float32)  # bins 0, 1, 2, 2

CODE = {"sp": 1.0, "ucmi": 0.5, "uada": 0.2, "anchor": 0.005, "cons": 2.0, "asym": 2.0}
PAPER = {"sp": 1.0, "ucmi": 0.5, "uada": 0.2, "anchor": 0.004, "cons": 0.5, "asym": 0.5}

# Batch axis of every model output (for slicing off padding rows).
BATCH_AXIS = {"pred": 0, "completeness": 0, "dominant": 0, "view_preds": 1, "view_keep": 1,
              "tokens": 1, "clean_tokens": 1, "imp_mean": 1, "imp_var": 1, "imp_sample": 1,
              "fused": 1, "uncertainty": 1, "gate": 1, "reconstruction": 1, "disc_logits": 1}


def make_batch(cfg, seed, drop=0.4):
    """(incomplete, clean) inputs: random clean features, frames zeroed with probability `drop`
    (never the first), `missing_rate` = the dropped fraction per modality."""
    rng = np.random.default_rng(seed)
    clean, incomplete, rates = {}, {}, []
    for key, t, f in (("text_features", cfg.text_len, cfg.text_dim),
                      ("audio", cfg.audio_len, cfg.audio_dim),
                      ("vision", cfg.vision_len, cfg.vision_dim)):
        x = rng.standard_normal((B, t, f)).astype(np.float32)
        dropped = rng.random((B, t)) < drop
        dropped[:, 0] = False
        clean[key] = jnp.asarray(x)
        incomplete[key] = jnp.asarray(np.where(dropped[..., None], 0.0, x))
        rates.append(dropped.mean(1))
    incomplete["missing_rate"] = jnp.asarray(np.stack(rates, 1), jnp.float32)
    clean["missing_rate"] = jnp.zeros((B, 3), jnp.float32)
    return incomplete, clean


def _group_norms(grads, groups):
    """{group: L2 norm of the gradient over the parameters whose top-level name starts with it}."""
    return {g: math.sqrt(sum(float(np.sum(np.square(v))) for k, sub in grads.items()
                             if k.startswith(g) for v in jax.tree_util.tree_leaves(sub)))
            for g in groups}


def _slice(outputs, rows):
    return {k: jnp.take(v, jnp.asarray(rows), axis=BATCH_AXIS[k]) for k, v in outputs.items()}


def _f64(x):
    return np.asarray(x, np.float64)


def _logsumexp(a):
    top = a.max()
    return top + np.log(np.exp(a - top).sum())


# --------------------------------------------------------------------------------------------
# Fixtures: one compiled call per model gives the outputs and every term's gradient
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ease_run():
    cfg = model_config("ease", "mosi", **TINY)
    model = build_model(cfg)
    params = random_model_params(cfg, seed=3)
    inputs, clean = make_batch(cfg, seed=4)
    batch = {"labels": jnp.asarray(LABELS), "missing_rate": inputs["missing_rate"]}
    order = EASE_TERMS + ("total",)

    def terms_vector(params):
        out = model.apply({"params": params}, inputs, clean, train=True,
                          rngs={"noise": jax.random.key(5), "views": jax.random.key(6)})
        _, terms, _ = ease_loss(out, batch, init_anchors(3, cfg.dim), LossConfig.preset("code"))
        return jnp.stack([terms[n] for n in order]), out

    jac, outputs = jax.jit(jax.jacrev(terms_vector, has_aux=True), compiler_options=FAST)(params)
    jac = jax.device_get(jac)  # NumPy from here on (no per-shape eager dispatch)
    grads = {n: jax.tree_util.tree_map(lambda g, i=i: g[i], jac) for i, n in enumerate(order)}
    return {"cfg": cfg, "params": params, "batch": batch, "outputs": outputs, "grads": grads}


# LNLN parameter groups for the gradient-reversal check: behind the GRL (the proxy generator and
# its tokens) and a control group downstream of h_d without reversal.
# The completeness check reaches h_d through w (and L_cc), also without reversal: this catches a
# GRL applied to the whole mix h_d instead of to h_p.
REVERSED = lambda name: name.startswith("proxy_")
CONTROL = lambda name: name in ("regressor", "cross", "language")
GATE = lambda name: name == "completeness"
FD_EPS = 1e-2


def _unit_direction(grads, rows, select):
    """NumPy: sum over `rows` of the unit gradient of that term restricted to the top-level
    parameters `select` picks (zero elsewhere), normalised. Along it every chosen term has a
    clearly non-zero derivative."""
    chosen = {k for k in grads[rows[0]] if select(k)}
    total = None
    for row in rows:
        part = {k: jax.tree_util.tree_map(lambda g, keep=float(k in chosen): g * keep, v)
                for k, v in grads[row].items()}
        norm = math.sqrt(sum(float(np.sum(g**2)) for g in jax.tree_util.tree_leaves(part)))
        part = jax.tree_util.tree_map(lambda g, n=norm: g / n, part)
        total = part if total is None else jax.tree_util.tree_map(np.add, total, part)
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in jax.tree_util.tree_leaves(total)))
    return jax.tree_util.tree_map(lambda g: g / norm, total)


@pytest.fixture(scope="module")
def lnln_run():
    cfg = model_config("lnln", "mosi", **TINY)
    model = build_model(cfg)
    params = random_model_params(cfg, seed=7)
    inputs, clean = make_batch(cfg, seed=8)
    batch = {"labels": jnp.asarray(LABELS), "missing_rate": inputs["missing_rate"]}
    order = LNLN_TERMS + ("total",)

    def terms_vector(params):
        out = model.apply({"params": params}, inputs, clean, train=True)
        _, terms, _ = lnln_loss(out, batch, None, LossConfig.preset("code"))
        return jnp.stack([terms[n] for n in order]), out

    def with_values(params):
        vector, out = terms_vector(params)
        return vector, (vector, out)

    jac_fn = jax.jit(jax.jacrev(with_values, has_aux=True), compiler_options=FAST)
    jac, (_, outputs) = jac_fn(params)
    jac = jax.device_get(jac)  # NumPy from here on (no per-shape eager dispatch)
    grads = {n: jax.tree_util.tree_map(lambda g, i=i: g[i], jac) for i, n in enumerate(order)}
    # Central finite differences of the FORWARD pass, where the GRL is the identity (the values
    # come from the same compiled function; a separate forward would cost a compilation).
    forward = lambda p: jac_fn(p)[1][0]
    leaves = jax.tree_util.tree_leaves
    directional = {}
    for name, select in (("reversed", REVERSED), ("control", CONTROL), ("gate", GATE)):
        d = _unit_direction(grads, ("sp", "total"), select)
        plus, minus = (np.asarray(forward(jax.tree_util.tree_map(
            lambda p, x, s=s: p + s * FD_EPS * x, params, d)), np.float64) for s in (1.0, -1.0))
        autodiff = {row: sum(float(np.sum(g * x)) for g, x in zip(leaves(grads[row]), leaves(d)))
                    for row in order}
        directional[name] = (autodiff, dict(zip(order, (plus - minus) / (2 * FD_EPS))))
    return {"cfg": cfg, "params": params, "batch": batch, "outputs": outputs, "grads": grads,
            "directional": directional}


# --------------------------------------------------------------------------------------------
# Presets and weights
# --------------------------------------------------------------------------------------------


def test_presets_hold_the_protocol_weights():
    for dataset in ("mosi", "mosei", "sims"):
        for name, weights in (("code", CODE), ("paper", PAPER)):
            cfg = LossConfig.preset(name, dataset)
            for term, w in weights.items():
                assert getattr(cfg, term) == pytest.approx(w, rel=1e-12), (name, term)
            assert (cfg.cc, cfg.rec, cfg.sp) == (0.9, 0.1, 1.0)
            assert cfg.adv == (0.6 if dataset == "sims" else 0.8)
    with pytest.raises(ValueError):
        LossConfig.preset("other")


def test_weighted_mean_by_hand():
    x = jnp.array([1.0, 2.0, 3.0, 10.0])
    assert float(weighted_mean(x, jnp.array([1.0, 1.0, 1.0, 0.0]))) == pytest.approx(2.0)
    assert float(weighted_mean(x, jnp.array([1.0, 0.0, 3.0, 0.0]))) == pytest.approx(2.5)
    assert float(weighted_mean(x, jnp.ones(4))) == pytest.approx(4.0)
    # All-zero weights: finite (0), not 0/0.
    assert float(weighted_mean(x, jnp.zeros(4))) == 0.0


# --------------------------------------------------------------------------------------------
# EASE: values
# --------------------------------------------------------------------------------------------


def test_ease_terms_finite_and_total_is_weighted_sum(ease_run):
    out, batch = ease_run["outputs"], ease_run["batch"]
    anchors = init_anchors(3, ease_run["cfg"].dim)
    for name, weights in (("code", CODE), ("paper", PAPER)):
        total, terms, _ = ease_loss(out, batch, anchors, LossConfig.preset(name, "mosi"))
        assert set(terms) == set(EASE_TERMS) | {"total"}
        values = {k: float(v) for k, v in terms.items()}
        assert all(np.isfinite(v) for v in values.values()), values
        want = sum(weights[k] * values[k] for k in EASE_TERMS)
        assert float(total) == pytest.approx(want, rel=1e-5)
        assert values["total"] == float(total)


def test_ease_terms_match_numpy(ease_run):
    out, cfg = ease_run["outputs"], ease_run["cfg"]
    y = _f64(LABELS)
    _, terms, new_anchors = ease_loss(out, ease_run["batch"], init_anchors(3, cfg.dim))
    got = {k: float(v) for k, v in terms.items()}
    pred, views = _f64(out["pred"]), _f64(out["view_preds"])
    clean, mean, var = _f64(out["clean_tokens"]), _f64(out["imp_mean"]), _f64(out["imp_var"])
    sample, u = _f64(out["imp_sample"]), _f64(out["imp_var"]).mean(axis=(2, 3))

    assert got["sp"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-5)
    # Eq. 4: Gaussian NLL of the clean tokens, mean over every element.
    nll = 0.5 * (np.log(2 * np.pi * var) + (clean - mean) ** 2 / var)
    assert got["ucmi"] == pytest.approx(nll.mean(), rel=1e-5)

    # Eq. 5-7 (un-squared CS, log space): clean pooled (u = 0) vs pooled samples (u = their u).
    def log_s(a, b, ua, ub):
        sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return _logsumexp(-sq / (2.0 * (1.0 + (ua[:, None] + ub[None, :]) / 2.0)))

    uada = []
    for m in range(3):
        z, z_hat, zero = clean[m].mean(1), sample[m].mean(1), np.zeros(B)
        uada.append(-log_s(z, z_hat, zero, u[m])
                    + 0.5 * (log_s(z, z, zero, zero) + log_s(z_hat, z_hat, u[m], u[m])))
    assert got["uada"] == pytest.approx(np.mean(uada), rel=1e-4, abs=1e-5)

    # Eq. 8, 24: fresh anchors copy this batch's per-bin statistics of the pooled clean tokens.
    pooled = clean.mean(2)  # [3, B, d]
    bins = np.array([0, 1, 2, 2])
    mu_y, var_y = np.zeros_like(pooled), np.zeros_like(pooled)
    for k in range(3):
        rows = bins == k
        mu_y[:, rows] = pooled[:, rows].mean(1, keepdims=True)
        var_y[:, rows] = np.maximum(pooled[:, rows].var(1, keepdims=True), 1e-4)
    np.testing.assert_allclose(np.asarray(new_anchors.mean)[:, bins], mu_y, rtol=1e-5, atol=1e-6)
    v_hat = np.maximum(0.1**2 + u, 1e-3)[..., None]
    mu_hat = mean.mean(2)
    cs = ((mu_hat - mu_y) ** 2 / (v_hat + var_y) + np.log(v_hat + var_y)
          - 0.5 * np.log(2 * v_hat) - 0.5 * np.log(2 * var_y)).sum(-1)
    assert got["anchor"] == pytest.approx(cs.mean(), rel=1e-4)

    # Eq. 10-11 (regression): pairs of [full, view 1, view 2]; views towards the full view.
    preds = np.concatenate([pred[None], views])
    cons = np.mean([np.mean((preds[i] - preds[j]) ** 2) for i, j in ((0, 1), (0, 2), (1, 2))])
    assert got["cons"] == pytest.approx(cons, rel=1e-5)
    assert got["asym"] == pytest.approx(np.mean((views - pred[None]) ** 2), rel=1e-5)


@pytest.mark.parametrize("preset", ["code", "paper"])
def test_ease_ablations_change_exactly_their_terms(ease_run, preset):
    """Every Table 4 loss ablation (`studies.ABLATIONS`) and every single weight at 0 removes
    exactly its terms from the total, computed by hand from the reported terms; the weights
    passed explicitly (a run's traced `hparams`) act as the config's."""
    from ease_jax.studies import ABLATIONS

    out, batch = ease_run["outputs"], ease_run["batch"]
    anchors = init_anchors(3, ease_run["cfg"].dim)
    base_cfg = LossConfig.preset(preset)
    weights = CODE if preset == "code" else PAPER
    base_total, base_terms, _ = ease_loss(out, batch, anchors, base_cfg)
    t = {k: float(v) for k, v in base_terms.items()}

    def check(changes, dropped):
        cfg = LossConfig(**{**base_cfg.__dict__, **changes})
        total, terms, _ = ease_loss(out, batch, anchors, cfg)
        for k in EASE_TERMS:  # every term is still reported, unchanged
            assert float(terms[k]) == pytest.approx(t[k], rel=1e-6), (changes, k)
        want = float(base_total) - sum(weights[k] * t[k] for k in dropped)
        assert float(total) == pytest.approx(want, rel=1e-5, abs=1e-6), changes

    for name, dropped in (("w/o UCSA", ("uada", "anchor")), ("w/o MIPC", ("cons", "asym")),
                          ("w/o L_cons", ("cons",))):
        check(ABLATIONS[name][1], dropped)
    for term in EASE_TERMS:
        check({term: 0.0}, (term,))
    explicit = {k: jnp.float32(v) for k, v in base_cfg.weights().items()} | {"cons": 0.0}
    total, _, _ = ease_loss(out, batch, anchors, base_cfg, weights=explicit)
    want = float(base_total) - weights["cons"] * t["cons"]
    assert float(total) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_ease_zero_weight_padding_leaves_every_term_unchanged(ease_run):
    out, cfg = ease_run["outputs"], ease_run["cfg"]
    rate = ease_run["batch"]["missing_rate"]
    loss_cfg = LossConfig.preset("code")
    anchors = init_anchors(3, cfg.dim)
    real = [0, 2, 3]  # row 1 (the only bin-1 label) becomes padding
    plain_batch = {"labels": jnp.asarray(LABELS[real]), "missing_rate": rate[np.array(real)]}
    weight = np.isin(np.arange(B), real).astype(np.float32)
    padded_batch = {**ease_run["batch"], "weight": jnp.asarray(weight)}
    _, plain, plain_anchors = ease_loss(_slice(out, real), plain_batch, anchors, loss_cfg)
    _, padded, padded_anchors = ease_loss(out, padded_batch, anchors, loss_cfg)
    for k in plain:
        assert float(padded[k]) == pytest.approx(float(plain[k]), rel=1e-5, abs=1e-6), k
    for a, b in zip(plain_anchors, padded_anchors):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert not np.asarray(padded_anchors.visited)[:, 1].any()


# --------------------------------------------------------------------------------------------
# EASE: gradients
# --------------------------------------------------------------------------------------------

GROUPS = ("encoder/text", "encoder/audio", "encoder/vision", "imputers/transformer",
          "imputers/gaussian", "gates", "fusion")
# Which parameter groups each term must reach (True) or must not touch at all (False).
REACH = {
    "sp": dict.fromkeys(GROUPS, True),
    "ucmi": {**dict.fromkeys(GROUPS, True), "gates": False, "fusion": False},
    "uada": {**dict.fromkeys(GROUPS, True), "gates": False, "fusion": False},
    "anchor": {**dict.fromkeys(GROUPS, True), "gates": False, "fusion": False},
    "cons": dict.fromkeys(GROUPS, True),
    "asym": dict.fromkeys(GROUPS, True),
    "total": dict.fromkeys(GROUPS, True),
}


def _ease_group_norms(grads):
    flat = {f"encoder/{m}": grads["encoder"][m] for m in ("text", "audio", "vision")}
    flat.update({f"imputers/{k}": v for k, v in grads["imputers"].items()})
    flat.update({k: v for k, v in grads.items() if k not in ("encoder", "imputers")})
    return _group_norms(flat, GROUPS)


def test_ease_gradients_finite_and_nonzero_everywhere(ease_run):
    total = ease_run["grads"]["total"]
    for path, g in jax.tree_util.tree_flatten_with_path(total)[0]:
        g = np.asarray(g)
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    for name, grads in ease_run["grads"].items():
        for g in jax.tree_util.tree_leaves(grads):
            assert np.isfinite(np.asarray(g)).all(), name


@pytest.mark.parametrize("term", list(REACH))
def test_ease_each_term_reaches_its_parameter_groups(ease_run, term):
    norms = _ease_group_norms(ease_run["grads"][term])
    for group, reaches in REACH[term].items():
        if reaches:
            assert norms[group] > 0, (term, group)
        else:
            assert norms[group] == 0.0, (term, group)
    # The Gaussian heads' variance branch is trained by the NLL (Eq. 4) and the sampled paths.
    if term != "total":
        var_grad = ease_run["grads"][term]["imputers"]["gaussian"]["var"]  # [3, ...] leaves
        for m in range(3):
            var_norm = _group_norms({"g": jax.tree_util.tree_map(lambda x, m=m: x[m], var_grad)},
                                    ("g",))["g"]
            assert var_norm > 0, (term, m)


def test_ease_asym_does_not_train_the_full_view(ease_run):
    out, batch = ease_run["outputs"], ease_run["batch"]
    anchors = init_anchors(3, ease_run["cfg"].dim)

    def term(name):
        def f(pred, view_preds):
            outputs = {**out, "pred": pred, "view_preds": view_preds}
            return ease_loss(outputs, batch, anchors)[1][name]
        return jax.grad(f, argnums=(0, 1))(out["pred"], out["view_preds"])

    d_pred, d_views = term("asym")
    np.testing.assert_array_equal(np.asarray(d_pred), 0.0)  # stop-gradient on the full view
    # A view that happens to keep all three modalities IS the full view (zero gradient there).
    partial = ~np.asarray(out["view_keep"]).all(-1)  # [V, B]
    assert partial.any() and np.abs(np.asarray(d_views))[partial].min() > 0
    # Reference: d/dv mean_{v,b} (v - p)^2 = 2 (v - p) / (V B).
    want = 2.0 * (_f64(out["view_preds"]) - _f64(out["pred"])[None]) / out["view_preds"].size
    np.testing.assert_allclose(np.asarray(d_views), want, rtol=1e-5, atol=1e-7)
    d_pred, _ = term("cons")  # the symmetric consistency does train it
    assert np.abs(np.asarray(d_pred)).min() > 0


def test_ease_anchor_statistics_receive_no_gradient(ease_run):
    out, batch, cfg = ease_run["outputs"], ease_run["batch"], ease_run["cfg"]
    rng = np.random.default_rng(9)
    visited = AnchorState(mean=jnp.asarray(rng.standard_normal((3, 3, cfg.dim)), jnp.float32),
                          var=jnp.asarray(rng.uniform(0.5, 2.0, (3, 3, cfg.dim)), jnp.float32),
                          visited=jnp.ones((3, 3), bool))

    def total(mean, var, clean_tokens):
        outputs = {**out, "clean_tokens": clean_tokens}
        return ease_loss(outputs, batch, AnchorState(mean, var, visited.visited))[0]

    def anchor_term(clean_tokens):
        return ease_loss({**out, "clean_tokens": clean_tokens}, batch, visited)[1]["anchor"]

    g_mean, g_var, g_clean = jax.grad(total, argnums=(0, 1, 2))(
        visited.mean, visited.var, out["clean_tokens"])
    np.testing.assert_array_equal(np.asarray(g_mean), 0.0)
    np.testing.assert_array_equal(np.asarray(g_var), 0.0)
    assert np.abs(np.asarray(g_clean)).max() > 0  # the clean tokens do get gradients (NLL, uada)
    # ... but not through the anchors: L_anchor sees them only as EMA statistics.
    np.testing.assert_array_equal(np.asarray(jax.grad(anchor_term)(out["clean_tokens"])), 0.0)


# --------------------------------------------------------------------------------------------
# LNLN
# --------------------------------------------------------------------------------------------

LNLN_WEIGHTS = {"mosi": {"sp": 1.0, "cc": 0.9, "adv": 0.8, "rec": 0.1},
                "sims": {"sp": 1.0, "cc": 0.9, "adv": 0.6, "rec": 0.1}}


@pytest.mark.parametrize("dataset", ["mosi", "sims"])
def test_lnln_terms_finite_and_total_is_weighted_sum(lnln_run, dataset):
    total, terms, passthrough = lnln_loss(lnln_run["outputs"], lnln_run["batch"], "anchors",
                                          LossConfig.preset("code", dataset))
    assert passthrough == "anchors"
    assert set(terms) == set(LNLN_TERMS) | {"total"}
    values = {k: float(v) for k, v in terms.items()}
    assert all(np.isfinite(v) for v in values.values()), values
    want = sum(w * values[k] for k, w in LNLN_WEIGHTS[dataset].items())
    assert float(total) == pytest.approx(want, rel=1e-5)
    for k in LNLN_TERMS:  # one weight at 0 drops exactly that term
        cfg = LossConfig(**{**LossConfig.preset("code", dataset).__dict__, k: 0.0})
        t0, terms0, _ = lnln_loss(lnln_run["outputs"], lnln_run["batch"], None, cfg)
        assert float(t0) == pytest.approx(want - LNLN_WEIGHTS[dataset][k] * values[k],
                                          rel=1e-5, abs=1e-6)
        assert float(terms0[k]) == pytest.approx(values[k], rel=1e-6)


def test_lnln_terms_match_numpy(lnln_run):
    out = lnln_run["outputs"]
    _, terms, _ = lnln_loss(out, lnln_run["batch"])
    got = {k: float(v) for k, v in terms.items()}
    y, rate = _f64(LABELS), _f64(lnln_run["batch"]["missing_rate"])
    assert got["sp"] == pytest.approx(np.mean((_f64(out["pred"]) - y) ** 2), rel=1e-5)
    assert got["cc"] == pytest.approx(
        np.mean((_f64(out["completeness"]) - (1.0 - rate[:, 0])) ** 2), rel=1e-5)
    # Cross-entropy over the 2 B K token rows: h_d tokens labelled 1, clean text tokens 0.
    logits = _f64(out["disc_logits"])  # [2, B, K, 2]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = np.concatenate([-log_p[0, ..., 1].ravel(), -log_p[1, ..., 0].ravel()])
    assert ce.size == 2 * B * lnln_run["cfg"].tokens
    assert got["adv"] == pytest.approx(ce.mean(), rel=1e-5)
    rec = np.mean((_f64(out["reconstruction"]) - _f64(out["clean_tokens"])) ** 2)
    assert got["rec"] == pytest.approx(rec, rel=1e-5)
    # The clean targets are not detached (section 8): d L_rec / d c = -2 (rec - c) / N.
    d_clean = jax.grad(lambda c: lnln_loss({**out, "clean_tokens": c}, lnln_run["batch"])[1]["rec"])(
        out["clean_tokens"])
    diff = _f64(out["reconstruction"]) - _f64(out["clean_tokens"])
    np.testing.assert_allclose(np.asarray(d_clean), -2.0 * diff / diff.size, rtol=1e-4, atol=1e-9)


def test_lnln_zero_weight_padding_leaves_every_term_unchanged(lnln_run):
    out, batch = lnln_run["outputs"], lnln_run["batch"]
    real = [0, 2, 3]
    plain_batch = {"labels": batch["labels"][np.array(real)],
                   "missing_rate": batch["missing_rate"][np.array(real)]}
    padded_batch = {**batch, "weight": jnp.asarray(np.isin(np.arange(B), real), jnp.float32)}
    _, plain, _ = lnln_loss(_slice(out, real), plain_batch)
    _, padded, _ = lnln_loss(out, padded_batch)
    for k in plain:
        assert float(padded[k]) == pytest.approx(float(plain[k]), rel=1e-5, abs=1e-6), k


def test_lnln_gradients_finite_and_reach(lnln_run):
    grads = lnln_run["grads"]
    for name, g in grads.items():
        for leaf in jax.tree_util.tree_leaves(g):
            assert np.isfinite(np.asarray(leaf)).all(), name
    groups = ("encoder", "completeness", "proxy_", "discriminator_", "reconstructors",
              "language", "hyper_", "cross", "regressor")
    norms = {name: _group_norms(g, groups) for name, g in grads.items()}
    assert all(v > 0 for v in norms["total"].values()), norms["total"]
    # The discriminator is trained by L_adv only; the reconstructors by L_rec only.
    assert norms["adv"]["discriminator_"] > 0
    assert norms["sp"]["discriminator_"] == norms["cc"]["discriminator_"] == 0.0
    assert norms["rec"]["reconstructors"] > 0
    assert norms["sp"]["reconstructors"] == norms["adv"]["reconstructors"] == 0.0
    # L_cc trains the completeness check (and the text encoder under it), nothing downstream.
    assert norms["cc"]["completeness"] > 0
    assert norms["cc"]["proxy_"] == norms["cc"]["regressor"] == 0.0
    assert norms["sp"]["proxy_"] > 0 and norms["adv"]["proxy_"] > 0


def test_lnln_gradient_reversal_flips_the_proxy_generator_gradient(lnln_run):
    """Forward, the GRL is the identity, so finite differences give the derivative WITHOUT the
    reversal. The gradient that L_sp (and the total) hands the proxy generator and its tokens must
    be its negative, while the groups downstream of h_d (and the completeness check, which mixes
    h_l into h_d) get the ordinary gradient."""
    for group, sign in (("reversed", -1.0), ("control", 1.0), ("gate", 1.0)):
        autodiff, finite_diff = lnln_run["directional"][group]
        for row in ("sp", "total"):
            assert autodiff[row] > 0.05, (group, row, autodiff[row])  # a clear signal
            assert finite_diff[row] == pytest.approx(sign * autodiff[row], rel=0.05), (
                group, row, autodiff[row], finite_diff[row])
