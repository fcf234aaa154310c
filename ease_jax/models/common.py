"""Parts shared by EASE and LNLN: the three modality encoders (docs/protocol.md section 5).

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


def encode_rows_once(module: nn.Module, x_inc: jax.Array, x_clean: jax.Array,
                     chunks: int = 8) -> tuple[jax.Array, jax.Array]:
    """`(module(x_inc), module(x_clean))` for a deterministic row-wise `module`, encoding every
    row whose incomplete input equals its clean input ONCE.

    In training half of the samples are at rate 0 for each modality (section 2), so their two
    inputs are identical. The clean rows and the incomplete rows that differ (found by comparing
    the inputs, not the rates) are packed first into `chunks` equal row chunks; a `lax.map` over
    the chunks runs the module under `lax.cond` and skips the chunks that hold no needed row. An
    unchanged row's incomplete output is its clean output, so its gradient is the sum of both
    uses, exactly as when it is encoded twice. `x_* [B, ...] -> ([B, ...], [B, ...])`.
    """
    b = x_inc.shape[0]
    changed = jnp.any((x_inc != x_clean).reshape(b, -1), axis=1)  # [B]
    order = jnp.argsort(~changed, stable=True)  # changed rows first
    rows = jnp.concatenate([x_clean, x_inc[order]])  # [2B, ...]: clean, changed, unchanged
    per_chunk = -(-2 * b // chunks)
    rows = jnp.pad(rows, [(0, chunks * per_chunk - 2 * b)] + [(0, 0)] * (rows.ndim - 1))
    rows = rows.reshape(chunks, per_chunk, *rows.shape[1:])
    run = jnp.arange(chunks) * per_chunk < b + changed.sum()  # chunk holds a needed row
    variables = module.variables
    pure = module.clone(parent=None)

    def apply(x):
        return pure.apply(variables, x)

    out_shape = jax.eval_shape(apply, rows[0])

    def one_chunk(args):
        x, go = args
        return jax.lax.cond(go, apply, lambda x: jnp.zeros(out_shape.shape, out_shape.dtype), x)

    out = jax.lax.map(one_chunk, (rows, run))
    out = out.reshape(chunks * per_chunk, *out.shape[2:])[: 2 * b]
    h_clean, h_changed = out[:b], out[b:][jnp.argsort(order)]
    keep_changed = changed.reshape(b, *([1] * (h_clean.ndim - 1)))
    return jnp.where(keep_changed, h_changed, h_clean), h_clean


class MultimodalEncoder(nn.Module):
    """Text (BERT or feature projection), audio and vision encoders -> tokens [3, B, K, d].

    `__call__(inputs, clean=None, train=False) -> (h [3, B, K, d], c [3, B, K, d] or None)`: the
    tokens of the incomplete inputs and, when `clean` is given, of the clean ones (not detached,
    section 6). BERT mode: BERT's last hidden state [B, L, H] is the text sequence fed to
    Linear(H -> d); features mode: the precomputed text features are. BERT is fine-tuned (no
    stop-gradient) and, with `train`, runs with its config's dropout (rng stream "dropout";
    section 5) over the 2B rows of both passes at once, so the two passes draw independent masks.
    The modality encoders (deterministic) encode a row whose two inputs are equal once
    (`encode_rows_once`) when `cfg.encode_once` (the same numbers either way).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: dict, clean: dict | None = None,
                 train: bool = False) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.cfg
        b = inputs["audio"].shape[0]
        both = inputs if clean is None else concat_batches(
            encoder_inputs(inputs, cfg.text_encoder), encoder_inputs(clean, cfg.text_encoder))
        if cfg.text_encoder == "bert":
            from ease_jax.bert import BertModel  # imported lazily: features mode needs no BERT

            text = BertModel(cfg.bert_config(), dtype=cfg.compute_dtype,
                             scan_unroll=cfg.scan_unroll, name="bert")(
                both["text_ids"], both["text_mask"], both["text_types"], deterministic=not train,
            )
        else:
            text = both["text_features"]
        kw = dict(tokens=cfg.tokens, dim=cfg.dim, depth=cfg.encoder_depth, heads=cfg.heads,
                  dim_head=cfg.dim_head, mlp_dim=cfg.mlp_dim, dtype=cfg.compute_dtype,
                  long_sequence=cfg.long_sequence)
        encoders = (ModalityEncoder(cfg.text_len, name="text", **kw),
                    ModalityEncoder(cfg.audio_len, name="audio", **kw),
                    ModalityEncoder(cfg.vision_len, name="vision", **kw))
        sequences = (text, both["audio"], both["vision"])
        if clean is None:
            return jnp.stack([enc(x) for enc, x in zip(encoders, sequences)]), None
        if self.is_initializing() or not cfg.encode_once:  # (init: create the parameters)
            tokens = jnp.stack([enc(x) for enc, x in zip(encoders, sequences)])
            return tokens[:, :b], tokens[:, b:]
        pairs = [encode_rows_once(enc, x[:b], x[b:], cfg.encode_chunks)
                 for enc, x in zip(encoders, sequences)]
        return jnp.stack([h for h, _ in pairs]), jnp.stack([c for _, c in pairs])


def encode(encoder: MultimodalEncoder, inputs: dict, clean: dict | None, train: bool = False):
    """The encoders' tokens of the incomplete inputs and, when given, of the clean ones:
    (h [3, B, K, d], c [3, B, K, d] or None); see `MultimodalEncoder`."""
    return encoder(encoder_inputs(inputs, encoder.cfg.text_encoder), clean, train)
