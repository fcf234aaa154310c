"""BERT text encoder in Flax Linen, and loading of Hugging Face BERT checkpoints without torch.

LNLN and EASE fine-tune a BERT (bert-base-uncased for MOSI / MOSEI, bert-base-chinese for SIMS) and
feed its last hidden states (B, L, 768) to the text encoder. transformers 5.x has no Flax models, so
the architecture is written here and reads the same `model.safetensors` files the PyTorch models use.

Architecture (post-LN BERT, Devlin et al. 2019), B = batch, L = tokens, H = hidden size:

    x = LayerNorm(word_emb[ids] + type_emb[types] + pos_emb[0..L-1])          (B, L, H)
    per layer:
        a = softmax(q k^T / sqrt(d_head) + mask_bias) v      (per head; softmax in float32)
        x = LayerNorm(x + Dense(a))
        x = LayerNorm(x + Dense(act(Dense(x))))                      (act: erf GELU for BERT)
    pooled = tanh(Dense(x[:, 0]))                                                  (B, H)

Parameter tree (`params` of `BertModel.init`; kernels are (in, out), i.e. PyTorch weights transposed):

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/layer_norm/{scale,bias}
    layers/attention/{query,key,value,output}/{kernel,bias}
    layers/attention_layer_norm/{scale,bias}
    layers/intermediate/{kernel,bias}         (H -> intermediate_size)
    layers/output/{kernel,bias}               (intermediate_size -> H)
    layers/output_layer_norm/{scale,bias}
    pooler/{kernel,bias}

Every `layers/...` leaf carries a leading axis of `num_hidden_layers` (layer i of the checkpoint at
index i): the layers are one `nn.scan`, so XLA compiles one layer instead of twelve.

Typical use:

    module, params = load_bert("/path/to/bert-base-uncased")
    batch = tokenize(["a fine movie"], "/path/to/bert-base-uncased", max_len=50)
    hidden = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch["token_type_ids"])                             # (1, 50, 768)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ease_jax.config import BertConfig

__all__ = ["BertConfig", "BertModel", "load_bert", "tokenize"]

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# BERT's own initialiser (truncation aside): N(0, 0.02) for every weight matrix and embedding table.
_INIT_STD = 0.02
# Seed of the pooler drawn when a checkpoint has none (see `load_bert`).
_POOLER_INIT_SEED = 0


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(_INIT_STD),
        name=name,
    )


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
    # Flax computes the statistics in float32 even for bfloat16 inputs.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32, name=name
    )


class BertEmbeddings(nn.Module):
    """Word + token type + absolute position embeddings, then LayerNorm: (B, L) ids -> (B, L, H)."""

    config: BertConfig
    dtype: Any = jnp.float32
    # Layers per iteration of the layer scan: 1 = one layer compiled once; 0 = all of them (a
    # program without loops, whose XLA cost analysis counts every layer's FLOPs).
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{c.max_position_embeddings}"
            )

        def embed(num, name):
            return nn.Embed(
                num,
                c.hidden_size,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(_INIT_STD),
                name=name,
            )

        words = embed(c.vocab_size, "word_embeddings")(input_ids)  # (B, L, H)
        types = embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)  # (B, L, H)
        positions = embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(length))
        x = words + types + positions[None]  # same summation order as the PyTorch model
        x = _layer_norm(c, self.dtype, "layer_norm")(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with output projection (no residual): (B, L, H) -> (B, L, H)."""

    config: BertConfig
    dtype: Any = jnp.float32
    # Layers per iteration of the layer scan: 1 = one layer compiled once; 0 = all of them (a
    # program without loops, whose XLA cost analysis counts every layer's FLOPs).
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool = True):
        """`mask_bias`: (B, 1, 1, L) float32, 0 for attended keys and a large negative otherwise."""
        c = self.config
        batch, length, _ = x.shape

        def heads(name):  # (B, L, H) -> (B, L, n_heads, d_head)
            y = _dense(c.hidden_size, self.dtype, name)(x)
            return y.reshape(batch, length, c.num_attention_heads, c.head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32)  # (B, n, L, L)
        scores = scores / math.sqrt(c.head_dim) + mask_bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)
        context = context.reshape(batch, length, c.hidden_size)
        return _dense(c.hidden_size, self.dtype, "output")(context)


class BertLayer(nn.Module):
    """One post-LN encoder layer: attention + residual + LN, feed-forward + residual + LN.

    A scan body: `(x (B, L, H), mask_bias) -> (x, None)`."""

    config: BertConfig
    dtype: Any = jnp.float32
    # Layers per iteration of the layer scan: 1 = one layer compiled once; 0 = all of them (a
    # program without loops, whose XLA cost analysis counts every layer's FLOPs).
    scan_unroll: int = 1
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask_bias):
        c, deterministic = self.config, self.deterministic
        drop = nn.Dropout(c.hidden_dropout_prob)
        attended = BertSelfAttention(c, self.dtype, name="attention")(
            x, mask_bias, deterministic
        )
        x = _layer_norm(c, self.dtype, "attention_layer_norm")(
            x + drop(attended, deterministic=deterministic)
        )
        hidden = _ACTIVATIONS[c.hidden_act](
            _dense(c.intermediate_size, self.dtype, "intermediate")(x)
        )
        out = _dense(c.hidden_size, self.dtype, "output")(hidden)
        x = _layer_norm(c, self.dtype, "output_layer_norm")(
            x + drop(out, deterministic=deterministic)
        )
        return x, None


class BertModel(nn.Module):
    """BERT encoder with pooler, as Hugging Face's `BertModel` (no prediction heads).

    Attributes:
      config: the architecture.
      dtype: computation dtype (e.g. jnp.bfloat16 on GPU); parameters stay float32, the attention
        softmax and LayerNorm statistics are computed in float32 and outputs are returned in float32.
        On GPU, float32 matmuls run at reduced (TF32-like) precision by default: on an H100 the
        MiniLM hidden states then differ from PyTorch by ~2e-3 (~4e-6 under
        `jax.default_matmul_precision("highest")`); bfloat16 differs by ~4e-2.
    Dropout (the config's `hidden_dropout_prob` after the embeddings and on both residual branches,
    `attention_probs_dropout_prob` on the attention probabilities) is applied only when
    `deterministic=False` and then needs a "dropout" rng. The papers' code fine-tunes BERT in train
    mode, so training uses the checkpoint's rates (0.1) and evaluation none (docs/protocol.md section 5).
    """

    config: BertConfig
    dtype: Any = jnp.float32
    # Layers per iteration of the layer scan: 1 = one layer compiled once; 0 = all of them (a
    # program without loops, whose XLA cost analysis counts every layer's FLOPs).
    scan_unroll: int = 1

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        deterministic: bool = True,
        return_pooled: bool = False,
    ):
        """Encodes token ids.

        Args:
          input_ids: (B, L) int token ids, L <= max_position_embeddings.
          attention_mask: (B, L), 1 (or True) for real tokens and 0 for padding; None = all ones.
            Padded positions are still computed (as in PyTorch) but no position attends to them.
          token_type_ids: (B, L) int segment ids; None = all zeros.
          deterministic: disables dropout (irrelevant when both dropout rates are 0).
          return_pooled: also return the pooled output.

        Returns:
          last hidden state (B, L, H) float32; with `return_pooled`, the pair
          (last hidden state (B, L, H), pooled output tanh(Dense(h[:, 0])) (B, H)), both float32.
        """
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if arr.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {arr.shape}, expected input_ids' shape {input_ids.shape}"
                )

        # Additive key mask, broadcast over heads and queries: (B, 1, 1, L).
        neg = jnp.finfo(jnp.float32).min
        mask_bias = jnp.where(attention_mask[:, None, None, :] != 0, 0.0, neg).astype(jnp.float32)

        x = BertEmbeddings(c, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        # The identical layers are one `nn.scan` (compiled once, parameters stacked on a leading
        # layer axis) of a rematerialised layer: the backward pass recomputes each layer's
        # activations from its input instead of keeping them, so memory grows by one (B, L, H)
        # array per layer, not by every intermediate (the papers' batch of 2 x 64 sentences
        # then fits in a few GiB).
        layers = nn.scan(
            nn.remat(BertLayer, prevent_cse=False),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=c.num_hidden_layers,
            unroll=self.scan_unroll or c.num_hidden_layers,
        )
        x, _ = layers(c, self.dtype, deterministic, name="layers")(x, mask_bias)
        # The pooler always runs so that its parameters always exist (as in the checkpoints);
        # under jit it is dead code when only the hidden states are used.
        pooled = jnp.tanh(_dense(c.hidden_size, self.dtype, "pooler")(x[:, 0]))
        hidden = x.astype(jnp.float32)
        if return_pooled:
            return hidden, pooled.astype(jnp.float32)
        return hidden


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints


def _checkpoint_layout(config: BertConfig) -> list[tuple[str, tuple[str, ...], str, int | None]]:
    """(checkpoint module prefix, Flax module path, kind, layer) for every parameterised module;
    `layer` is the index on the stacked layer axis of `layers/...` (None outside the layers)."""
    layout = [
        ("embeddings.word_embeddings", ("embeddings", "word_embeddings"), "embed", None),
        ("embeddings.position_embeddings", ("embeddings", "position_embeddings"), "embed", None),
        ("embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings"), "embed", None),
        ("embeddings.LayerNorm", ("embeddings", "layer_norm"), "norm", None),
    ]
    for i in range(config.num_hidden_layers):
        hf = f"encoder.layer.{i}"
        layout += [
            (f"{hf}.attention.self.query", ("layers", "attention", "query"), "dense", i),
            (f"{hf}.attention.self.key", ("layers", "attention", "key"), "dense", i),
            (f"{hf}.attention.self.value", ("layers", "attention", "value"), "dense", i),
            (f"{hf}.attention.output.dense", ("layers", "attention", "output"), "dense", i),
            (f"{hf}.attention.output.LayerNorm", ("layers", "attention_layer_norm"), "norm", i),
            (f"{hf}.intermediate.dense", ("layers", "intermediate"), "dense", i),
            (f"{hf}.output.dense", ("layers", "output"), "dense", i),
            (f"{hf}.output.LayerNorm", ("layers", "output_layer_norm"), "norm", i),
        ]
    layout.append(("pooler.dense", ("pooler",), "dense", None))
    return layout


# Flax parameter name -> checkpoint tensor names (first found wins; gamma / beta are legacy names).
_PARAM_NAMES = {
    "embed": {"embedding": ("weight",)},
    "dense": {"kernel": ("weight",), "bias": ("bias",)},
    "norm": {"scale": ("weight", "gamma"), "bias": ("bias", "beta")},
}


def _abstract_params(module: BertModel) -> dict:
    """Parameter shapes of `module` (ShapeDtypeStructs), without allocating anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids, ids, ids)["params"]


def _init_pooler(config: BertConfig) -> dict:
    # NumPy, not jax.random: drawing with a JAX key compiles a PRNG kernel (seconds on CPU).
    rng = np.random.default_rng(_POOLER_INIT_SEED)
    h = config.hidden_size
    kernel = rng.normal(0.0, _INIT_STD, size=(h, h)).astype(np.float32)
    return {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((h,), jnp.float32)}


def load_bert(path: str | Path, *, dtype: Any = jnp.float32) -> tuple[BertModel, dict]:
    """Builds a `BertModel` from a Hugging Face checkpoint directory, without torch.

    The directory must hold `config.json` (model_type "bert") and `model.safetensors`. Tensor names
    may carry the `bert.` prefix (task models such as BertForSequenceClassification) or not
    (BertModel); prediction heads (`cls.*`, `classifier.*`) and `position_ids` buffers are ignored.
    PyTorch Linear weights (out, in) become Flax kernels (in, out); LayerNorm weight / bias (or the
    legacy gamma / beta) become scale / bias. A checkpoint without a pooler gets one drawn from
    N(0, 0.02) (NumPy, fixed seed; bias 0) with a warning (the EASE / LNLN models use only the hidden states).

    Args:
      path: the checkpoint directory.
      dtype: computation dtype of the returned module; parameters are always float32.

    Returns:
      (module, params): use as `module.apply({"params": params}, input_ids, attention_mask,
      token_type_ids)` -> (B, L, H).

    Raises:
      FileNotFoundError: the directory, `config.json` or `model.safetensors` is missing.
      ValueError: a non-BERT config, a missing tensor (named) or a tensor of the wrong shape (named,
        with the expected and the found shape, both in the checkpoint's (out, in) layout).
    """
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"BERT checkpoint directory {root} not found; expected a Hugging Face directory "
            "with config.json and model.safetensors"
        )
    config_file = root / "config.json"
    weights_file = root / "model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; a BERT checkpoint directory needs it")
    if not weights_file.is_file():
        hint = ""
        if (root / "pytorch_model.bin").is_file():
            hint = " (only pytorch_model.bin is present: convert it to safetensors, loading it needs torch)"
        raise FileNotFoundError(f"{weights_file} not found{hint}")

    config = BertConfig.from_json(config_file)
    module = BertModel(config, dtype=dtype)
    shapes = _abstract_params(module)

    with safe_open(str(weights_file), framework="np") as f:
        keys = set(f.keys())
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""

        def find(module_key: str, names: Sequence[str]) -> str | None:
            for name in names:
                if f"{prefix}{module_key}.{name}" in keys:
                    return f"{prefix}{module_key}.{name}"
            return None

        params: dict = {}
        used = set()
        for hf_module, flax_path, kind, layer in _checkpoint_layout(config):
            found = {p: find(hf_module, names) for p, names in _PARAM_NAMES[kind].items()}
            if hf_module == "pooler.dense" and not any(found.values()):
                warnings.warn(
                    f"{weights_file} has no pooler; it is initialised randomly "
                    f"(kernel N(0, {_INIT_STD}) from NumPy seed {_POOLER_INIT_SEED}, bias 0); "
                    "the hidden states are unaffected",
                    stacklevel=2,
                )
                params["pooler"] = _init_pooler(config)
                continue
            node = params
            for part in flax_path:
                node = node.setdefault(part, {})
            expected_node = shapes
            for part in flax_path:
                expected_node = expected_node[part]
            for flax_name, names in _PARAM_NAMES[kind].items():
                key = found[flax_name]
                if key is None:
                    tried = " or ".join(f"{prefix}{hf_module}.{n}" for n in names)
                    raise ValueError(f"{weights_file}: missing tensor {tried}")
                tensor = f.get_tensor(key)
                expected = tuple(expected_node[flax_name].shape)
                if layer is not None:  # one slice of the stacked layer axis
                    expected = expected[1:]
                if flax_name == "kernel":
                    expected = expected[::-1]  # checkpoint stores Linear weights as (out, in)
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"{weights_file}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                        f"{expected} for the config in {config_file}"
                    )
                tensor = np.asarray(tensor, dtype=np.float32)
                tensor = tensor.T if flax_name == "kernel" else tensor
                if layer is None:
                    node[flax_name] = jnp.asarray(tensor)
                else:  # layers arrive in order; stacked below
                    node.setdefault(flax_name, []).append(tensor)
                used.add(key)
    params["layers"] = jax.tree_util.tree_map(
        lambda slices: jnp.asarray(np.stack(slices)), params["layers"],
        is_leaf=lambda x: isinstance(x, list))

    ignored_heads = ("cls.", "classifier.", "qa_outputs.")
    unused = sorted(
        k for k in keys - used if not k.endswith("position_ids") and not k.startswith(ignored_heads)
    )
    if unused:
        warnings.warn(
            f"{weights_file}: {len(unused)} tensors not used by BertModel, e.g. {unused[:5]}",
            stacklevel=2,
        )
    return module, params


# ----------------------------------------------------------------------------------------------
# Tokenisation


@functools.lru_cache(maxsize=4)
def _tokenizer(directory: str):
    from transformers import BertTokenizerFast

    # from_pretrained reads the directory's own tokenizer settings (lower-casing: bert-base-uncased
    # lower-cases, bert-base-chinese does not; default lower-case when only vocab.txt is present).
    return BertTokenizerFast.from_pretrained(directory, local_files_only=True)


def tokenize(texts: Sequence[str], vocab_or_dir: str | Path, max_len: int) -> dict[str, np.ndarray]:
    """WordPiece-tokenises `texts` with a local BERT vocabulary (never downloads).

    Args:
      texts: N strings.
      vocab_or_dir: a `vocab.txt` file or a directory containing it (and optionally the
        checkpoint's tokenizer files, whose settings are then used).
      max_len: every row is padded with [PAD] (0) or truncated to this length, keeping
        [CLS] first and [SEP] as the last real token.

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"}: int32 arrays of shape (N, max_len).
    """
    path = Path(vocab_or_dir)
    directory = path.parent if path.is_file() else path
    if not (directory / "vocab.txt").is_file():
        raise FileNotFoundError(f"{directory / 'vocab.txt'} not found; expected a BERT vocabulary")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    encoded = _tokenizer(str(directory.resolve()))(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="np",
    )
    return {
        k: np.asarray(encoded[k], dtype=np.int32)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }
