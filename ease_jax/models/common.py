"""Parts shared by EASE and LNLN: the three modality encoders (PROTOCOL.md section 5).

Model inputs are dicts of arrays with the data layer's canonical keys: `text_ids`, `text_mask`,
`text_types` [B, L] (BERT mode) or `text_features` [B, L_f, D_t] (features mode), `audio`
[B, T_a, D_a], `vision` [B, T_v, D_v], and `missing_rate` [B, 3] (observed missing fraction of
text, audio, vision). Modality order everywhere: 0 text (l), 1 audio (a), 2 vision (v).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ease_jax.config import ModelConfig
from ease_jax.layers import ModalityEncoder

TEXT, AUDIO, VISION = 0, 1, 2
ENCODER_KEYS = {
    "bert": ("text_ids", "text_mask", "text_types", "audio", "vision"),
    "features": ("text_features", "audio", "vision"),
}


def encoder_inputs(batch: dict, text_encoder: str) -> dict:
    """The subset of `batch` the encoders read; raises KeyError naming a missing key."""
    missing = [k for k in ENCODER_KEYS[text_encoder] if k not in batch]
    if missing:
        raise KeyError(f"model inputs lack {missing} (text_encoder={text_encoder!r})")
    return {k: batch[k] for k in ENCODER_KEYS[text_encoder]}


def concat_batches(a: dict, b: dict) -> dict:
    """Row-wise concatenation of two input dicts with the same keys: [B, ...] + [B, ...] -> [2B, ...]."""
    return {k: jnp.concatenate([a[k], b[k]], 0) for k in a}


class MultimodalEncoder(nn.Module):
    """Text (BERT or feature projection), audio and vision encoders -> tokens [3, B, K, d].

    BERT mode: BERT's last hidden state [B, L, H] is the text sequence fed to Linear(H -> d);
    features mode: the precomputed text features are. BERT is fine-tuned (no stop-gradient) and,
    with `train`, runs with its config's dropout (rng stream "dropout"; section 5).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: dict, train: bool = False) -> jax.Array:
        cfg = self.cfg
        if cfg.text_encoder == "bert":
            from ease_jax.bert import BertModel  # imported lazily: features mode needs no BERT

            text = BertModel(cfg.bert_config(), name="bert")(
                inputs["text_ids"], inputs["text_mask"], inputs["text_types"],
                deterministic=not train,
            )
        else:
            text = inputs["text_features"]
        kw = dict(tokens=cfg.tokens, dim=cfg.dim, depth=cfg.encoder_depth, heads=cfg.heads,
                  dim_head=cfg.dim_head, mlp_dim=cfg.mlp_dim)
        h_l = ModalityEncoder(cfg.text_len, name="text", **kw)(text)
        h_a = ModalityEncoder(cfg.audio_len, name="audio", **kw)(inputs["audio"])
        h_v = ModalityEncoder(cfg.vision_len, name="vision", **kw)(inputs["vision"])
        return jnp.stack([h_l, h_a, h_v])


def encode(encoder: MultimodalEncoder, inputs: dict, clean: dict | None, train: bool = False):
    """Run the encoders on the incomplete inputs and, when given, the clean ones in ONE call.

    Returns (h [3, B, K, d], c [3, B, K, d] or None). The clean pass is not detached (section 6).
    In one call the two passes still draw independent BERT dropout masks (one draw over 2B rows).
    """
    keys = ENCODER_KEYS[encoder.cfg.text_encoder]
    x = encoder_inputs(inputs, encoder.cfg.text_encoder)
    if clean is None:
        return encoder(x, train), None
    b = x[keys[-1]].shape[0]
    both = encoder(concat_batches(x, encoder_inputs(clean, encoder.cfg.text_encoder)), train)
    return both[:, :b], both[:, b:]
