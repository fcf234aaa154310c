"""Whole models: `build_model(cfg)` -> EASE or LNLN; `count_parameters` without allocation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ease_jax.config import BertConfig, ModelConfig, model_config
from ease_jax.models.ease import EASE
from ease_jax.models.lnln import LNLN

__all__ = ["EASE", "LNLN", "build_model", "count_parameters", "dummy_inputs", "init_params",
           "initial_params", "placeholder_params"]


def build_model(cfg: ModelConfig):
    """The Flax module for `cfg.model` ("ease" or "lnln")."""
    return {"ease": EASE, "lnln": LNLN}[cfg.model](cfg)


def dummy_inputs(cfg: ModelConfig, batch: int = 2) -> dict:
    """Zero inputs with the shapes `cfg` describes (for `init` and shape checks)."""
    x = {
        "audio": jnp.zeros((batch, cfg.audio_len, cfg.audio_dim), jnp.float32),
        "vision": jnp.zeros((batch, cfg.vision_len, cfg.vision_dim), jnp.float32),
        "missing_rate": jnp.zeros((batch, 3), jnp.float32),
    }
    if cfg.text_encoder == "bert":
        ids = jnp.zeros((batch, cfg.text_len), jnp.int32)
        x.update(text_ids=ids, text_mask=jnp.ones_like(ids), text_types=ids)
    else:
        x["text_features"] = jnp.zeros((batch, cfg.text_len, cfg.text_dim), jnp.float32)
    return x


def init_params(cfg: ModelConfig, key: jax.Array, batch: int = 2) -> dict:
    """Freshly initialised parameters of the model `cfg` describes."""
    inputs = dummy_inputs(cfg, batch)
    k_params, k_noise, k_views = jax.random.split(key, 3)
    rngs = {"params": k_params, "noise": k_noise, "views": k_views,
            "dropout": jax.random.fold_in(k_noise, 1)}
    return build_model(cfg).init(rngs, inputs, inputs, train=True)["params"]


def initial_params(cfg: ModelConfig, seed: int, bert_params=None):
    """The parameters a run of `seed` starts from: None (the train state initialises them from the
    seed) or, in BERT mode with a pretrained checkpoint, the seed's initialisation with the
    pretrained BERT (`bert.load_bert`) in place of the random one."""
    if bert_params is None:
        return None
    params = init_params(cfg, jax.random.key(seed))
    if jax.tree_util.tree_structure(params["encoder"]["bert"]) != \
            jax.tree_util.tree_structure(bert_params):
        raise ValueError("the BERT checkpoint's parameter tree does not match the model's BERT")
    params["encoder"]["bert"] = bert_params
    return params


def placeholder_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Parameters with the tree, shapes and dtypes of `init_params` at a fraction of its set-up
    time (only `jax.eval_shape` traces; nothing compiles): LayerNorm scales 1, biases 0,
    everything else N(0, 0.02) drawn on the host. For speed measurements, whose timings do not
    depend on the values."""
    import numpy as np

    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)

    leaves = [jnp.asarray(fill(path, leaf)) for path, leaf in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _size(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def count_parameters(model: str, dataset: str, text_encoder: str = "bert", **overrides) -> dict:
    """Parameter counts `{"total", "bert", "non_bert"}` of `model` ("ease" | "lnln") at the
    dimensions of `dataset` ("mosi" | "mosei" | "sims"), with BERT-base (bert-base-chinese for
    SIMS) in BERT mode. Uses `jax.eval_shape`: nothing is allocated."""
    if text_encoder == "bert" and dataset == "sims" and "bert" not in overrides:
        overrides["bert"] = BertConfig.base_chinese()
    cfg = model_config(model, dataset, text_encoder=text_encoder, **overrides)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    bert = _size(shapes["encoder"].get("bert", {}))
    total = _size(shapes)
    return {"total": total, "bert": bert, "non_bert": total - bert}
