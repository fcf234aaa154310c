"""Whole models: `build_model(cfg)` -> EASE or LNLN; `count_parameters` without allocation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ease_jax.config import ModelConfig, model_config
from ease_jax.models.ease import EASE
from ease_jax.models.lnln import LNLN

__all__ = ["EASE", "LNLN", "build_model", "count_parameters", "dummy_inputs", "init_params"]


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


def _size(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def count_parameters(model: str, dataset: str, text_encoder: str = "bert", **overrides) -> dict:
    """Parameter counts `{"total", "bert", "non_bert"}` of `model` ("ease" | "lnln") at the
    dimensions of `dataset` ("mosi" | "mosei" | "sims"), with BERT-base (bert-base-chinese for
    SIMS) in BERT mode. Uses `jax.eval_shape`: nothing is allocated."""
    if text_encoder == "bert" and dataset == "sims" and "bert" not in overrides:
        from ease_jax.bert import BertConfig

        overrides["bert"] = BertConfig.base_chinese()
    cfg = model_config(model, dataset, text_encoder=text_encoder, **overrides)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    bert = _size(shapes["encoder"].get("bert", {}))
    total = _size(shapes)
    return {"total": total, "bert": bert, "non_bert": total - bert}
