"""LNLN (docs/protocol.md section 8): encoders -> dominant modality correction (completeness check,
proxy generator behind a gradient-reversal layer, effectiveness discriminator) -> reconstructor ->
dominant-modality-based multimodal learning (language Transformer, hyper-modality learner, cross
Transformer) -> regressor.

`LNLN(cfg).apply(variables, inputs, clean=None, train=False)` returns a dict:
  pred [B]; tokens [3, B, K, d] (h_l, h_a, h_v); clean_tokens [3, B, K, d] (when `clean` given);
  completeness [B] (w); dominant [B, K, d] (h_d); reconstruction [3, B, K, d] (order l, a, v; only
  when `clean` is given: its one reader is the objective);
  disc_logits [2, B, K, 2] (row 0: h_d tokens, row 1: clean language tokens; when `clean` given).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ease_jax.config import ModelConfig
from ease_jax.layers import (
    CompletenessGate,
    CrossTransformer,
    Dense,
    HyperModalityLayer,
    Transformer,
    gradient_reversal,
    per_modality,
)
from ease_jax.models.common import AUDIO, TEXT, VISION, MultimodalEncoder, encode


class LNLN(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: dict, clean: dict | None = None, *, train: bool = False) -> dict:
        cfg = self.cfg
        dt = cfg.compute_dtype
        tf = dict(dim=cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, mlp_dim=cfg.mlp_dim, dtype=dt)
        h, c = encode(MultimodalEncoder(cfg, name="encoder"), inputs, clean, train)
        _, b, k, d = h.shape
        h_l, h_a, h_v = h[TEXT], h[AUDIO], h[VISION]

        w = CompletenessGate(k, depth=2, name="completeness", **tf)(h_l)  # [B]
        proxy = self.param("proxy_tokens", nn.initializers.ones, (k, d))
        proxy_in = jnp.concatenate([jnp.broadcast_to(proxy, (b, k, d)), h_a, h_v], 1)
        h_p = Transformer(3 * k, k, depth=2, outputs=k, name="proxy_generator", **tf)(proxy_in)
        wb = w[:, None, None]
        h_d = (1.0 - wb) * gradient_reversal(h_p) + wb * h_l

        out = {"tokens": h, "completeness": w, "dominant": h_d}
        if c is not None:
            out["clean_tokens"] = c
            disc_in = jnp.stack([h_d, c[TEXT]])  # [2, B, K, d]
            hidden = nn.leaky_relu(Dense(64, name="discriminator_fc1", dtype=dt)(disc_in), 0.1)
            out["disc_logits"] = Dense(2, name="discriminator_fc2")(hidden)  # float32 read-out
        if c is not None:  # read only by the objective (L_rec, against the clean tokens)
            reconstructors = per_modality(Transformer)(k, 0, depth=2, name="reconstructors", **tf)
            out["reconstruction"] = reconstructors(h)  # [3, B, K, d], one module per modality

        states = Transformer(k, 0, depth=2, return_hidden=True, name="language", **tf)(h_d)
        hyper = jnp.broadcast_to(self.param("hyper_tokens", nn.initializers.ones, (k, d)), (b, k, d))
        for i in range(cfg.hyper_layers):
            hyper = HyperModalityLayer(d, cfg.heads, cfg.hyper_dim_head, dt, name=f"hyper_{i}")(
                states[min(i, len(states) - 1)], h_a, h_v, hyper
            )
        target = CrossTransformer(k, depth=cfg.cross_depth, name="cross", **tf)(hyper, states[-1])
        out["pred"] = Dense(1, name="regressor")(target[:, 1:].mean(1))[:, 0]  # float32 read-out
        return out
