"""Tests of `ease_jax.layers` (docs/protocol.md sections 5, 6, 8).

Shapes are checked with chex; values against float64 NumPy re-implementations of the formulas in
the protocol, evaluated with the module's own (randomly perturbed) parameters; parameter counts
against hand arithmetic.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax import layers

from helpers import random_params

DIMS = chex.Dimensions(B=2, T=5, S=3, D=128, K=8, M=11)


# --------------------------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------------------------


def _np(tree):
    """Params pytree -> nested dict of float64 NumPy arrays."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _random_params(module, *args, seed, scale=0.3):
    """`helpers.random_params` with the parameter shapes of `module` applied to `args`."""
    return random_params(_param_shapes(module, *args), seed, scale_sd=scale, sd=scale)


def ref_layernorm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref_heads(q, k, v, heads):
    """softmax(q k^T / sqrt(e)) v per head; [B, Tq, H*e], [B, Tk, H*e] x2 -> [B, Tq, H*e]."""
    b, tq, inner = q.shape
    e = inner // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, e).transpose(0, 2, 1, 3)  # B H T e

    weights = ref_softmax(split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(e))
    return (weights @ split(v)).transpose(0, 2, 1, 3).reshape(b, tq, inner)


def ref_dense(x, p):
    return x @ p["kernel"] + p["bias"] if "bias" in p else x @ p["kernel"]


def ref_attention(p, x_q, x_kv, heads):
    q = ref_dense(ref_layernorm(x_q, p["norm_q"]), p["to_q"])
    k = ref_dense(ref_layernorm(x_kv, p["norm_k"]), p["to_k"])
    v = ref_dense(ref_layernorm(x_kv, p["norm_v"]), p["to_v"])
    return ref_dense(ref_heads(q, k, v, heads), p["to_out"])


_erf = np.vectorize(math.erf)


def ref_gelu_exact(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def ref_feedforward(p, x):
    h = ref_dense(ref_layernorm(x, p["norm"]), p["fc1"])
    return ref_dense(ref_gelu_exact(h), p["fc2"])


def ref_transformer(p, x, token_len, depth, heads):
    """Returns the list of hidden states [input+pos, layer 1, ..., layer depth]."""
    b = x.shape[0]
    if token_len:
        tokens = np.broadcast_to(p["extra_tokens"], (b, *p["extra_tokens"].shape))
        x = np.concatenate([tokens, x], 1)
    x = x + p["pos_embedding"][None, : x.shape[1]]
    hidden = [x]
    for i in range(depth):
        x = x + ref_attention(p[f"attn_{i}"], x, x, heads)
        x = x + ref_feedforward(p[f"ff_{i}"], x)
        hidden.append(x)
    return hidden


def ref_relu_mlp(p, x, n_layers, act=lambda z: np.maximum(z, 0.0)):
    for i in range(n_layers):
        x = ref_dense(x, p[f"fc{i}"])
        if i < n_layers - 1:
            x = act(x)
    return x


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _param_shapes(module, *args):
    """Parameter shapes of `module` without allocating them."""
    return jax.eval_shape(lambda k: module.init(k, *args), jax.random.key(0))["params"]


# Cheaper XLA compilation for these small CPU programs (the result is the same computation).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(module, params, *args):
    """`module.apply` under `jax.jit` (one compilation is cheaper than op-by-op dispatch)."""
    return jax.jit(module.apply, compiler_options=FAST)({"params": params}, *args)


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Attention and FeedForward
# --------------------------------------------------------------------------------------------


def test_attention_shapes_and_param_layout():
    x_q, x_kv = _rand(0, *DIMS["BTD"]), _rand(1, *DIMS["BSD"])
    module = layers.Attention()  # defaults: d 128, 8 heads of width 64
    params = _random_params(module, x_q, x_kv, seed=0)
    chex.assert_shape(jax.eval_shape(module.apply, {"params": params}, x_q, x_kv), DIMS["BTD"])
    chex.assert_shape(jax.eval_shape(module.apply, {"params": params}, x_q, x_q), DIMS["BTD"])
    # q/k/v: no bias, 128 -> 512; output projection 512 -> 128 with bias; three LayerNorms.
    for name in ("to_q", "to_k", "to_v"):
        assert set(params[name]) == {"kernel"}
        chex.assert_shape(params[name]["kernel"], (128, 512))
    chex.assert_shape(params["to_out"]["kernel"], (512, 128))
    chex.assert_shape(params["to_out"]["bias"], (128,))
    assert {"norm_q", "norm_k", "norm_v"} <= set(params)


def test_init_values():
    # Dense: uniform with variance 1 / (3 fan_in) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias 0.
    params = layers.Dense(128).init(jax.random.key(3), jnp.zeros((1, 512)))["params"]
    kernel = np.asarray(params["kernel"])
    bound = 1.0 / math.sqrt(512)
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.var(), bound**2 / 3.0, rtol=0.05)
    np.testing.assert_array_equal(np.asarray(params["bias"]), 0.0)
    # LayerNorm: PyTorch's epsilon 1e-5 (Flax's default is 1e-6), unit scale, zero bias.
    assert layers.LayerNorm().epsilon == 1e-5
    # Transformer tokens start at 0, the positional table at N(0, 1) (depth 0: nothing else).
    params = layers.Transformer(200, 8, depth=0).init(jax.random.key(4), jnp.zeros((1, 200, 128)))
    params = params["params"]
    np.testing.assert_array_equal(np.asarray(params["extra_tokens"]), 0.0)
    pos = np.asarray(params["pos_embedding"])
    chex.assert_shape(pos, (208, 128))
    np.testing.assert_allclose([pos.mean(), pos.std()], [0.0, 1.0], atol=0.02)
    # CrossTransformer: one zero token, two N(0, 1) tables.
    params = layers.CrossTransformer(8, depth=0).init(
        jax.random.key(5), jnp.zeros((1, 8, 128)), jnp.zeros((1, 8, 128)))["params"]
    np.testing.assert_array_equal(np.asarray(params["extra_token"]), 0.0)
    assert not np.array_equal(np.asarray(params["pos_source"]), np.asarray(params["pos_target"]))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_matches_float64_numpy(cross):
    x_q = _rand(2, *DIMS["BTD"])
    x_kv = _rand(3, *DIMS["BSD"]) if cross else x_q
    module = layers.Attention()
    params = _random_params(module, x_q, x_kv, seed=4)
    got = _run(module, params, x_q, x_kv)
    want = ref_attention(_np(params), x_q.astype(np.float64), x_kv.astype(np.float64), heads=8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tq, tk, block", [(11, 13, 4), (8, 5, 4), (3, 7, 8), (9, 6, 9)])
def test_blockwise_attention_equals_plain_forward_and_gradients(tq, tk, block):
    """Blockwise (query blocks, custom backward pass recomputing the weights) against the float64
    reference and against autodiff of the plain attention; Tq not a multiple of the block is
    padded (11 rows in 3 blocks of 4)."""
    heads, e = 2, 4
    q, k, v = (_rand(10 + i, 2, t, heads * e) for i, t in enumerate((tq, tk, tk)))
    cotangent = _rand(13, 2, tq, heads * e)
    got = jax.jit(lambda q, k, v: layers.blockwise_attention(q, k, v, heads, block))(q, k, v)
    want = ref_heads(*(x.astype(np.float64) for x in (q, k, v)), heads)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent),
                                argnums=(0, 1, 2)))(q, k, v)

    plain = grads(lambda q, k, v: layers._attention_core(q, k, v, heads))
    blocked = grads(lambda q, k, v: layers.blockwise_attention(q, k, v, heads, block))
    for a, b in zip(blocked, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_long_sequences_use_the_blockwise_attention_with_equal_numbers(monkeypatch):
    """At the vision encoder's length (508 = 500 frames + 8 tokens) `multi_head_attention` takes
    the blockwise path (no (Tq, Tk) weights kept for the backward pass) with the plain numbers,
    forward and gradients."""
    q, k, v = (0.3 * _rand(20 + i, 1, 508, 8 * 64) for i in range(3))
    calls = []
    monkeypatch.setattr(layers, "blockwise_attention",
                        lambda *a: calls.append(a[-1]) or _BLOCKWISE(*a))
    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, 8) ** 2),
                                          argnums=(0, 1, 2)))(q, k, v)

    value, grads = value_and_grads(layers.multi_head_attention)
    assert calls == [layers.ATTENTION_BLOCK]  # 1 x 8 x 508 logits per row: one block
    monkeypatch.setattr(layers, "BLOCK_ELEMENTS", 100 * 8 * 508)  # now 100 rows per block
    value_blocks, grads_blocks = value_and_grads(layers.multi_head_attention)
    assert calls[-1] == 100
    np.testing.assert_allclose(float(value_blocks), float(value), rtol=1e-6)
    ref_value, ref_grads = value_and_grads(layers._attention_core)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for g, g_blocks, ref in zip(grads, grads_blocks, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g_blocks), np.asarray(ref), rtol=1e-5, atol=1e-5)


_BLOCKWISE = layers.blockwise_attention


def test_feedforward_shape_and_exact_gelu():
    x = 2.0 * _rand(5, *DIMS["BTD"])
    module = layers.FeedForward()
    params = _random_params(module, x, seed=6)
    got = _run(module, params, x)
    chex.assert_shape(got, DIMS["BTD"])
    want = ref_feedforward(_np(params), x.astype(np.float64))
    # The tanh GELU differs from the erf one by up to ~1e-3: the tolerance tells them apart.
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_one_transformer_layer_parameter_count_by_hand():
    """d = 128, 8 x 64 heads, mlp 128: 3 LayerNorms 768 + q/k/v 196,608 + out 65,664 + FF 33,280."""
    frames = 10
    shapes = _param_shapes(layers.Transformer(frames, depth=1), jnp.zeros((1, frames, 128)))
    attn, ff = shapes["attn_0"], shapes["ff_0"]
    assert _count({k: attn[k] for k in ("norm_q", "norm_k", "norm_v")}) == 3 * 2 * 128 == 768
    assert _count({k: attn[k] for k in ("to_q", "to_k", "to_v")}) == 3 * 128 * 512 == 196_608
    assert _count(attn["to_out"]) == 512 * 128 + 128 == 65_664
    assert _count(ff) == 2 * 128 + 2 * (128 * 128 + 128) == 33_280
    assert _count(attn) + _count(ff) == 296_320
    assert _count(shapes) == 296_320 + frames * 128  # + the positional table
    assert set(shapes) == {"attn_0", "ff_0", "pos_embedding"}


LAYER = 296_320  # one LNLN block at d = 128 (see the test above)


@pytest.mark.parametrize(
    "name, module, args, expected",
    [
        # 8 extra tokens + (50 + 8) positions + 2 layers
        ("transformer_tokens", layers.Transformer(50, 8), ((1, 50, 128),),
         8 * 128 + 58 * 128 + 2 * LAYER),
        # one shared extra token + two positional tables of 8 + 1 rows + 2 layers
        ("cross", layers.CrossTransformer(8), ((1, 8, 128), (1, 8, 128)),
         128 + 2 * 9 * 128 + 2 * LAYER),
        # Linear(768 -> 128) + Transformer(50 frames, 8 tokens, depth 2)
        ("encoder", layers.ModalityEncoder(50), ((1, 50, 768),),
         768 * 128 + 128 + 8 * 128 + 58 * 128 + 2 * LAYER),
        # two MLPs 128 -> 128 -> 128
        ("gaussian", layers.GaussianHead(), ((1, 8, 128),), 4 * (128 * 128 + 128)),
        # Transformer(8 frames, 1 token, depth 2) + Linear(128 -> 64) + Linear(64 -> 1)
        ("gate", layers.CompletenessGate(), ((1, 8, 128),),
         128 + 9 * 128 + 2 * LAYER + 128 * 64 + 64 + 64 + 1),
        # 4 LayerNorms + q, k_a, v_a, k_v, v_v (128 -> 8 x 16) + out 128 -> 128 with bias
        ("hyper", layers.HyperModalityLayer(), ((1, 8, 128),) * 4,
         4 * 256 + 5 * 128 * 128 + 128 * 128 + 128),
    ],
)
def test_block_parameter_counts_by_hand(name, module, args, expected):
    shapes = _param_shapes(module, *(jnp.zeros(s) for s in args))
    assert _count(shapes) == expected, name


# --------------------------------------------------------------------------------------------
# Transformer and CrossTransformer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_len", [0, 3])
def test_transformer_shapes_init_and_reference(token_len):
    d = chex.Dimensions(B=2, T=5, N=7, D=16, L=5 + token_len)
    x = _rand(7, *d["BTD"])
    module = layers.Transformer(num_frames=d.N, token_len=token_len, dim=16, depth=2, heads=2,
                                dim_head=8, mlp_dim=12)
    params = _random_params(module, x, seed=8)
    chex.assert_shape(params["pos_embedding"], (d.N + token_len, d.D))
    if token_len:
        chex.assert_shape(params["extra_tokens"], (token_len, d.D))
    else:
        assert "extra_tokens" not in params
    with_hidden = layers.Transformer(d.N, token_len, 16, 2, 2, 8, 12, return_hidden=True)
    out, hidden = jax.jit(lambda p: (module.apply(p, x), with_hidden.apply(p, x)),
                          compiler_options=FAST)({"params": params})
    chex.assert_shape(out, d["BLD"])
    assert isinstance(hidden, (list, tuple)) and len(hidden) == 2 + 1  # depth + 1 states
    chex.assert_shape(list(hidden), d["BLD"])
    want = ref_transformer(_np(params), x.astype(np.float64), token_len, depth=2, heads=2)
    for got_i, want_i in zip(hidden, want):
        np.testing.assert_allclose(np.asarray(got_i), want_i, rtol=5e-5, atol=5e-5)
    # return_hidden's last state is the ordinary output.
    np.testing.assert_allclose(np.asarray(hidden[-1]), np.asarray(out), rtol=1e-6, atol=1e-6)


def test_transformer_shorter_input_uses_first_positions_and_longer_raises():
    module = layers.Transformer(num_frames=6, token_len=2, dim=16, depth=1, heads=2, dim_head=8,
                                mlp_dim=16, return_hidden=True)
    params = _random_params(module, jnp.zeros((1, 6, 16)), seed=1)
    x = _rand(9, 2, 3, 16)  # 3 < 6 frames
    first = _run(module, params, x)[0]
    chex.assert_shape(first, (2, 5, 16))
    p = _np(params)
    np.testing.assert_allclose(np.asarray(first[:, :2]),
                               np.broadcast_to(p["extra_tokens"] + p["pos_embedding"][:2],
                                               (2, 2, 16)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(first[:, 2:]), x + p["pos_embedding"][2:5],
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        _run(module, params, jnp.zeros((1, 7, 16)))


@pytest.mark.parametrize("outputs", [1, 4])
def test_transformer_outputs_equal_the_full_output_sliced(outputs):
    """`outputs = n` prunes the last layer's queries; the float64 reference runs every row."""
    d = chex.Dimensions(B=2, T=5, D=16, N=outputs)
    x = _rand(21, *d["BTD"])
    module = layers.Transformer(num_frames=5, token_len=2, dim=16, depth=2, heads=2, dim_head=8,
                                mlp_dim=12, outputs=outputs)
    params = _random_params(module, x, seed=22)
    got = _run(module, params, x)
    chex.assert_shape(got, d["BND"])
    want = ref_transformer(_np(params), x.astype(np.float64), token_len=2, depth=2, heads=2)[-1]
    np.testing.assert_allclose(np.asarray(got), want[:, :outputs], rtol=5e-5, atol=5e-5)
    with pytest.raises(ValueError, match="exclude"):
        layers.Transformer(5, 2, 16, 2, 2, 8, 12, return_hidden=True, outputs=1).init(
            jax.random.key(0), x)


def test_cross_transformer_shapes_and_reference():
    d = chex.Dimensions(B=2, S=4, T=5, U=6, D=16)  # U = T + 1 (the extra token)
    source, target = _rand(10, *d["BSD"]), _rand(11, *d["BTD"])
    module = layers.CrossTransformer(num_frames=5, dim=16, depth=2, heads=2, dim_head=8,
                                     mlp_dim=16)
    params = _random_params(module, source, target, seed=12)
    chex.assert_shape(params["extra_token"], (1, d.D))  # ONE token, shared by both streams
    chex.assert_shape([params["pos_source"], params["pos_target"]], (5 + 1, d.D))
    got = _run(module, params, source, target)
    chex.assert_shape(got, d["BUD"])

    p = _np(params)
    tok = np.broadcast_to(p["extra_token"], (2, 1, 16))
    src = np.concatenate([tok, source], 1) + p["pos_source"][None, :5]
    tgt = np.concatenate([tok, target], 1) + p["pos_target"][None, :6]
    for i in range(2):
        tgt = tgt + ref_attention(p[f"attn_{i}"], tgt, src, heads=2)
        tgt = tgt + ref_feedforward(p[f"ff_{i}"], tgt)
    np.testing.assert_allclose(np.asarray(got), tgt, rtol=5e-5, atol=5e-5)


# --------------------------------------------------------------------------------------------
# Encoder, heads, gate, hyper-modality layer, MLP
# --------------------------------------------------------------------------------------------


def test_modality_encoder_shape_and_reference():
    d = chex.Dimensions(B=2, T=6, M=11, K=3, D=16)
    x = _rand(13, *d["BTM"])
    module = layers.ModalityEncoder(num_frames=6, tokens=3, dim=16, depth=1, heads=2, dim_head=8,
                                    mlp_dim=16)
    params = _random_params(module, x, seed=14)
    got = _run(module, params, x)
    chex.assert_shape(got, d["BKD"])
    p = _np(params)
    h = ref_dense(x.astype(np.float64), p["proj"])
    want = ref_transformer(p["transformer"], h, token_len=3, depth=1, heads=2)[-1][:, :3]
    np.testing.assert_allclose(np.asarray(got), want, rtol=5e-5, atol=5e-5)


def test_gaussian_head_shapes_positive_variance_and_reference():
    x = 3.0 * _rand(15, *DIMS["BKD"])
    module = layers.GaussianHead()
    params = _random_params(module, x, seed=16)
    mean, var = _run(module, params, x)
    chex.assert_shape([mean, var], DIMS["BKD"])
    assert np.all(np.asarray(var) > 0) and np.all(np.asarray(var) >= np.float32(1e-6))
    p = _np(params)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(mean), ref_relu_mlp(p["mean"], x64, 2),
                               rtol=1e-4, atol=1e-4)
    want_var = np.logaddexp(0.0, ref_relu_mlp(p["var"], x64, 2)) + 1e-6
    np.testing.assert_allclose(np.asarray(var), want_var, rtol=1e-4, atol=1e-5)


def test_gaussian_head_variance_floor():
    """A hugely negative pre-activation gives softplus == 0: var is exactly the 1e-6 floor."""
    x = _rand(17, 2, 4, 128)
    module = layers.GaussianHead()
    params = _random_params(module, x, seed=0)
    params["var"]["fc1"]["kernel"] = jnp.zeros_like(params["var"]["fc1"]["kernel"])
    params["var"]["fc1"]["bias"] = jnp.full_like(params["var"]["fc1"]["bias"], -1000.0)
    _, var = _run(module, params, x)
    assert np.all(np.asarray(var) >= np.float32(1e-6))
    np.testing.assert_allclose(np.asarray(var), 1e-6, rtol=1e-6)


def test_completeness_gate_in_unit_interval_and_reference():
    x = _rand(18, *DIMS["BKD"])
    module = layers.CompletenessGate()
    params = _random_params(module, x, seed=19)
    got = _run(module, params, x)
    chex.assert_shape(got, DIMS["B"])
    got = np.asarray(got)
    assert np.all((got > 0) & (got < 1))
    p = _np(params)
    token = ref_transformer(p["transformer"], x.astype(np.float64), 1, depth=2, heads=8)[-1][:, 0]
    h = ref_dense(token, p["fc1"])
    logit = ref_dense(np.where(h > 0, h, 0.1 * h), p["fc2"])[:, 0]  # LeakyReLU(0.1)
    np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-logit)), rtol=1e-4, atol=1e-5)


def test_hyper_modality_layer_shape_and_reference():
    lang, audio, vision, hyper = (_rand(20 + i, *DIMS["BKD"]) for i in range(4))
    module = layers.HyperModalityLayer()  # 8 heads of width 16
    params = _random_params(module, lang, audio, vision, hyper, seed=21)
    got = _run(module, params, lang, audio, vision, hyper)
    chex.assert_shape(got, DIMS["BKD"])
    chex.assert_shape(params["to_q"]["kernel"], (128, 8 * 16))
    p = _np(params)
    f64 = lambda a: a.astype(np.float64)
    lang_n = ref_layernorm(f64(lang), p["norm_lang"])
    audio_n = ref_layernorm(f64(audio), p["norm_audio"])
    vision_n = ref_layernorm(f64(vision), p["norm_vision"])
    hyper_n = ref_layernorm(f64(hyper), p["norm_hyper"])
    q = ref_dense(lang_n, p["to_q"])
    from_audio = ref_heads(q, ref_dense(audio_n, p["to_k_audio"]),
                           ref_dense(audio_n, p["to_v_audio"]), 8)
    from_vision = ref_heads(q, ref_dense(vision_n, p["to_k_vision"]),
                            ref_dense(vision_n, p["to_v_vision"]), 8)
    want = hyper_n + ref_dense(from_audio + from_vision, p["to_out"])  # residual on LN(hyper)
    np.testing.assert_allclose(np.asarray(got), want, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_shape_and_reference(activation):
    d = chex.Dimensions(B=3, T=2, I=6, O=3)
    x = 2.0 * _rand(25, *d["BTI"])
    act_jax = {"relu": jax.nn.relu, "tanh": jnp.tanh}[activation]
    act_np = {"relu": lambda z: np.maximum(z, 0.0), "tanh": np.tanh}[activation]
    module = layers.MLP((5, 4, 3), activation=act_jax)
    params = _random_params(module, x, seed=26)
    got = _run(module, params, x)
    chex.assert_shape(got, d["BTO"])
    want = ref_relu_mlp(_np(params), x.astype(np.float64), 3, act=act_np)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.any(np.asarray(got) < 0)  # no activation after the last layer


# --------------------------------------------------------------------------------------------
# Gradient reversal
# --------------------------------------------------------------------------------------------


def test_gradient_reversal_forward_is_identity():
    x = _rand(30, 3, 4)
    for fn in (layers.gradient_reversal, jax.jit(layers.gradient_reversal)):
        y = fn(jnp.asarray(x))
        assert y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(y), x)


def test_gradient_reversal_negates_the_gradient_exactly():
    x, c = jnp.asarray(_rand(31, 3, 4)), jnp.asarray(_rand(32, 3, 4))
    plain = jax.grad(lambda z: jnp.sum(z * c))(x)
    reversed_ = jax.grad(lambda z: jnp.sum(layers.gradient_reversal(z) * c))(x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(reversed_), -np.asarray(c))
    # Inside a chain (jitted): d/dx sum(GRL(sin x) * c) = -cos(x) c.
    chain = jax.jit(jax.grad(lambda z: jnp.sum(layers.gradient_reversal(jnp.sin(z)) * c)))(x)
    plain_chain = jax.jit(jax.grad(lambda z: jnp.sum(jnp.sin(z) * c)))(x)
    np.testing.assert_array_equal(np.asarray(chain), -np.asarray(plain_chain))
    np.testing.assert_allclose(np.asarray(chain), -np.cos(np.asarray(x, np.float64)) * c,
                               rtol=1e-6, atol=1e-6)
