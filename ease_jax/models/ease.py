"""EASE (docs/protocol.md section 6): encoders -> UCMI imputation -> completeness gate -> fusion,
plus the cross-view consistency views used in training.

`EASE(cfg).apply(variables, inputs, clean=None, train=False, rngs=...)` returns a dict:
  pred [B]                 sentiment score of the full view
  tokens [3, B, K, d]      encoder tokens of the incomplete inputs (h_l, h_a, h_v)
  clean_tokens [3, B, K, d]  encoder tokens of the clean inputs (only when `clean` is given)
  imp_mean, imp_var, imp_sample [3, B, K, d]  UCMI Gaussian per target modality (Eq. 1-3)
  uncertainty [3, B]       sample uncertainty u = mean of var over tokens and dims
  gate [3, B]              w * (1 - r_m), the weight of the observed tokens
  fused [3, B, K, d]       w h_m + (1 - w) z_hat_m
  view_preds [V, B], view_keep [V, B, 3]  subset views (train with V = cfg.n_views > 0)
RNG streams: "noise" (imputation samples; training, or evaluation with `sample_at_eval`),
"views" (which modalities a subset view keeps) and, in BERT mode during training, "dropout".
When `inputs` has `index` [B] (the rows' positions in the training split, as the train step
passes), noise and views are drawn per sample from the stream's key folded with the index, so
they do not depend on the batch composition or the number of devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ease_jax.config import ModelConfig
from ease_jax.layers import CompletenessGate, Dense, GaussianHead, Transformer, per_modality
from ease_jax.models.common import MultimodalEncoder, encode

# For each target modality, the two modalities it is imputed from (section 6.2).
SOURCES = ((1, 2), (0, 2), (0, 1))


def view_keep_flags(key: jax.Array, n_views: int, batch: int, keep_prob: float,
                    index: jax.Array | None = None) -> jax.Array:
    """Subset views' keep flags [V, B, 3] (bool): each modality kept with prob `keep_prob`; a row
    that would keep none keeps one modality chosen uniformly at random (section 6.5). With
    `index` [B] (rows' positions in the split) row b draws from `fold_in(key, index[b])`, so a
    sample's views do not depend on the batch or device it is in."""

    def draw(k, shape):
        k_keep, k_one = jax.random.split(k)
        keep = jax.random.bernoulli(k_keep, keep_prob, (*shape, 3))
        rescue = jax.nn.one_hot(jax.random.randint(k_one, shape, 0, 3), 3, dtype=bool)
        return jnp.where(keep.any(-1, keepdims=True), keep, rescue)

    if index is None:
        return draw(key, (n_views, batch))
    per_sample = jax.vmap(lambda i: draw(jax.random.fold_in(key, i), (n_views,)))(index)
    return jnp.moveaxis(per_sample, 0, 1)  # [B, V, 3] -> [V, B, 3]


def standard_normal(key: jax.Array, shape: tuple[int, ...], index: jax.Array | None = None):
    """N(0, 1) noise of `shape` = (M, B, ...); with `index` [B], sample b's slice [:, b] comes
    from `fold_in(key, index[b])` (independent of batch composition and device count)."""
    if index is None:
        return jax.random.normal(key, shape)
    rows = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                                (shape[0], *shape[2:])))(index)
    return jnp.moveaxis(rows, 0, 1)


class Imputer(nn.Module):
    """UCMI for one target modality (Eq. 1-2): Transformer(depth 2) over the 2K tokens of its two
    source modalities -> the first K rows -> Gaussian head. `[B, 2K, d] -> ([B, K, d], [B, K, d])`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, ctx: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        k, d = cfg.tokens, cfg.dim
        h = Transformer(2 * k, 0, d, 2, cfg.heads, cfg.dim_head, cfg.mlp_dim, outputs=k,
                        dtype=cfg.compute_dtype, name="transformer")(ctx)
        return GaussianHead(d, dtype=cfg.compute_dtype, name="gaussian")(h)


class FusionHead(nn.Module):
    """Zero-initialised CLS token + fused tokens -> Transformer(depth 4) -> CLS -> Linear(d -> 1).

    `[N, 3K, d] -> [N]`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, cfg.dim)), tokens], 1)
        x = Transformer(3 * cfg.tokens + 1, 0, cfg.dim, cfg.fusion_depth, cfg.heads, cfg.dim_head,
                        cfg.mlp_dim, outputs=1, dtype=cfg.compute_dtype, name="transformer")(x)
        return Dense(1, name="regressor")(x[:, 0])[:, 0]  # float32 read-out


class EASE(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: dict, clean: dict | None = None, *, train: bool = False) -> dict:
        cfg = self.cfg
        h, c = encode(MultimodalEncoder(cfg, name="encoder"), inputs, clean, train)
        _, b, k, d = h.shape
        index = inputs.get("index")  # [B] rows' positions in the split: per-sample noise keys
        out = {"tokens": h}
        if c is not None:
            out["clean_tokens"] = c

        if cfg.use_ucmi:
            # The three imputers and the three gates share shapes: each trio is one module over a
            # leading modality axis (own parameters per modality, compiled once).
            ctx = jnp.stack([jnp.concatenate([h[s1], h[s2]], 1) for s1, s2 in SOURCES])
            mean, var = per_modality(Imputer)(cfg, name="imputers")(ctx)  # [3, B, K, d] each
            if train or cfg.sample_at_eval:
                eps = standard_normal(self.make_rng("noise"), mean.shape, index).astype(mean.dtype)
                sample = mean + jnp.sqrt(var) * eps  # Eq. 3, reparameterised
            else:
                sample = mean  # deterministic evaluation (project decision, section 7)
            rate = inputs["missing_rate"]  # [B, 3]
            gates = per_modality(CompletenessGate)(k, d, 2, cfg.heads, cfg.dim_head, cfg.mlp_dim,
                                                   cfg.compute_dtype, name="gates")
            gate = gates(h) * (1.0 - rate.T)  # [3, B]
            w = gate[..., None, None]
            fused = w * h + (1.0 - w) * sample
            out.update(imp_mean=mean, imp_var=var, imp_sample=sample, gate=gate, fused=fused,
                       uncertainty=var.mean(axis=(2, 3)))
        else:
            fused = h  # ablation "w/o UCMI": the fusion sees the incomplete tokens directly

        full = jnp.moveaxis(fused, 0, 1).reshape(b, 3 * k, d)  # [B, 3K, d] in order l, a, v
        fusion = FusionHead(cfg, name="fusion")
        if train and cfg.n_views > 0:
            keep = view_keep_flags(self.make_rng("views"), cfg.n_views, b, cfg.view_keep_prob,
                                   index)
            views = fused[None] * jnp.moveaxis(keep, 2, 1)[..., None, None]  # [V, 3, B, K, d]
            views = jnp.moveaxis(views, 1, 2).reshape(cfg.n_views * b, 3 * k, d)
            preds = fusion(jnp.concatenate([full, views], 0))  # one pass over all views
            out["pred"] = preds[:b]
            out["view_preds"] = preds[b:].reshape(cfg.n_views, b)
            out["view_keep"] = keep
        else:
            out["pred"] = fusion(full)
        return out
