"""Synthetic data sets in the raw MMSA pickle layout, with planted cross-modal structure.

:func:`synthetic` returns the same dict a real MMSA pickle holds (``{"train": {...}, "valid": ...,
"test": ...}`` with ``text_bert`` (N, 3, L) float64, ``text`` (N, L, 768) float32, ``audio`` /
``vision`` (N, T, D) float32, ``audio_lengths`` / ``vision_lengths`` int64, ``regression_labels``
float32, ``classification_labels`` int64, ``id`` and ``raw_text`` strings), so it can be pickled and
read by :func:`ease_jax.data.mmsa.load_mmsa`, or passed to :func:`ease_jax.data.mmsa.from_raw`.

Generative model (per sample i; all projections are fixed per ``seed`` and shared by the splits):

* Shared latent ``s_i ~ N(0, I_4)``. The sentiment score is ``z_i = (s_i0 + 0.5 s_i1) / sqrt(1.25)``;
  the other two shared dims carry no sentiment but are still common to every modality.
* Label: ``y = label_max * tanh(0.75 z)`` with a dead zone ``|z| < 0.08 -> 0`` (a visible mass of
  exact zeros, ~7% after rounding), rounded to an annotation grid and clipped to
  ``[-label_max, label_max]``. MOSI mixes the grids 1/5, 1/4 and 1/3 (averages of 5, 4 or 3
  annotators, as in the real file), MOSEI uses 1/3, SIMS uses 0.2 on [-1, 1]. Up to this
  rounding the label is a deterministic function of ``s``.
* Every modality m (text features, audio, vision) sees ``s`` through a fixed random projection
  ``P_m`` plus a modality-specific nuisance latent ``n_im ~ N(0, I_4)`` through ``Q_m``, so a
  missing modality is partly imputable from the others but never exactly. Audio / vision frame t:
  ``x_it = bias_m + gain_m * ((c_m s_i P_m + 0.5 n_im Q_m + sigma_im (eta_im + eps_it)) B_m)`` on
  valid frames and 0 on padding, with ``c_audio = 1.3``, ``c_vision = 0.75`` (``SIGNAL``): each
  alone predicts the label clearly better than a constant (a ridge regression on mean-pooled
  frames of the default 8-frame sweep data reaches Corr ~0.7, audio + vision ~0.8), so the
  kept-modality conditions {a}, {v}, {a, v} measure something. ``sigma_im = exp(N(log 0.6, 0.5^2))`` is a per-sample,
  per-modality noise scale (heteroscedastic): ``eta_im ~ N(0, I)`` is per-sample noise that does not
  average out over frames, ``eps_it ~ N(0, I)`` per-frame noise. For narrow features ``B_m = I``;
  features wider than 64 (text 768, SIMS vision 709) are generated in a 48-dim code space and
  mapped out by a fixed random ``B_m`` (48, D): latents and noise share that space, so the noise
  cannot be projected away, generation stays fast, and the features are strongly correlated like
  real wide features. The scales are returned as ``noise_scale`` (N, 3) [text, audio, vision] and
  the shared latents as ``latent_shared`` (N, 4): extra keys that the loader ignores, there to
  test imputation and calibration.
* Text: valid length between ~L/5 and L (10% of rows fill all L positions, i.e. no padding), [CLS]
  = 101 first, [SEP] = 102 at the last valid position, padding 0, token types 0, attention mask 1 on
  valid positions. Words are ids in [1000, 30000); 300 of them are positive and 300 negative
  sentiment words whose frequency grows with ``max(+-y, 0) / label_max``; the rest are neutral with a
  skewed (Zipf-like) frequency. ``raw_text`` spells the words ("good12", "bad7", "w4711").
* Text features ``text`` (N, L, 768) of token l: ``(sigma_i0 (eta_i + eps_il) + e_l E +
  w_l (s_i P_t + n_i Q_t)) B_t`` with ``e_l`` a 16-dim token embedding (sentiment words shifted
  along a fixed direction), ``w_l = 1`` on word rows and 0 on the [CLS] / [SEP] rows, on valid
  tokens, zeros on padding. The features are token-local: [CLS] / [SEP], which the missingness
  protocol always keeps, carry no sentence information, so dropping words removes text evidence
  as [UNK] does in BERT mode, and the per-token noise ``eps_il`` averages out over the kept
  words. The frozen-feature text mode is learnable (a ridge regression on mean-pooled features
  reaches Corr ~0.7 at L = 8 and ~0.1 once 90% of the words are dropped).

Everything is drawn from ``numpy.random.SeedSequence(seed)`` (one child for the fixed world, one per
split), vectorised and in float32: full-size MOSI takes well under 10 s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ease_jax.data.mmsa import from_raw

__all__ = ["PRESETS", "SMALL", "synthetic", "synthetic_data"]

PRESETS: dict[str, dict[str, Any]] = {
    # docs/protocol.md section 1 shapes; labels in [-label_max, label_max] on the given grids.
    "mosi": {
        "n_train": 1284, "n_valid": 229, "n_test": 686, "text_len": 50,
        "audio_len": 375, "audio_dim": 5, "vision_len": 500, "vision_dim": 20, "text_dim": 768,
        "label_max": 3.0, "label_grids": (0.2, 0.25, 1.0 / 3.0), "label_grid_probs": (0.6, 0.2, 0.2),
    },
    "mosei": {
        "n_train": 16326, "n_valid": 1871, "n_test": 4659, "text_len": 50,
        "audio_len": 500, "audio_dim": 74, "vision_len": 500, "vision_dim": 35, "text_dim": 768,
        "label_max": 3.0, "label_grids": (1.0 / 3.0,), "label_grid_probs": (1.0,),
    },
    "sims": {
        "n_train": 1368, "n_valid": 456, "n_test": 457, "text_len": 39,
        "audio_len": 400, "audio_dim": 33, "vision_len": 55, "vision_dim": 709, "text_dim": 768,
        "label_max": 1.0, "label_grids": (0.2,), "label_grid_probs": (1.0,),
    },
}

# The sweep's small synthetic data set (the default CPU run without data): few samples and frames.
SMALL = dict(n_train=384, n_valid=128, n_test=256, text_len=8, audio_len=8, vision_len=8)
SIZES = ("small", "full")


def synthetic_data(dataset: str, size: str = "small", seed: int = 0):
    """The commands' synthetic stand-in for `dataset` as `MMSAData`: "small" (`SMALL`, the quick
    default) or "full" (the real data set's sizes and shapes, a speed check for accelerators).
    Its `source` ("synthetic:<dataset>(seed=0)" / "...(seed=0,full)") is recorded in results.json,
    from which `diagnostics` rebuilds it."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    if size == "full":
        return from_raw(synthetic(dataset, seed=seed), source=f"synthetic:{dataset}(seed={seed},full)")
    return from_raw(synthetic(dataset, seed=seed, **SMALL), source=f"synthetic:{dataset}(seed={seed})")


CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
WORD_LOW, WORD_HIGH = 1000, 30000
N_SENTIMENT_WORDS = 300
K_SHARED = 4
K_NUISANCE = 4
EMB_RANK = 16
WIDE = 64  # features wider than this are generated in a CODE_RANK-dim space, then projected
CODE_RANK = 48
# Strength of the shared latent in audio / vision frames and of the modality's own nuisance latent;
# per-token noise of text features relative to the per-sample noise (see the module docstring).
SIGNAL = {"audio": 1.3, "vision": 0.75}
NUISANCE = 0.5
TEXT_SIGNAL = 1.0
TEXT_TOKEN_NOISE = 1.0
_SPLITS = ("train", "valid", "test")


def _world(rng: np.random.Generator, cfg: dict[str, Any]) -> dict[str, Any]:
    """Fixed projections and vocabulary shared by all splits."""
    f32 = np.float32
    k = K_SHARED + K_NUISANCE

    def proj(rows: int, dim: int) -> np.ndarray:
        return (rng.standard_normal((rows, dim)) / math.sqrt(k)).astype(f32)

    words = rng.permutation(np.arange(WORD_LOW, WORD_HIGH))
    pos_words = np.sort(words[:N_SENTIMENT_WORDS])
    neg_words = np.sort(words[N_SENTIMENT_WORDS : 2 * N_SENTIMENT_WORDS])
    neutral = words[2 * N_SENTIMENT_WORDS :]  # random order = frequency rank

    emb = (rng.standard_normal((WORD_HIGH, EMB_RANK)) * 0.5).astype(f32)
    direction = rng.standard_normal(EMB_RANK)
    direction = (direction / np.linalg.norm(direction)).astype(f32)
    emb[pos_words] += 1.5 * direction
    emb[neg_words] -= 1.5 * direction
    names = np.array([f"w{i}" for i in range(WORD_HIGH)], dtype=object)
    names[pos_words] = [f"good{j}" for j in range(N_SENTIMENT_WORDS)]
    names[neg_words] = [f"bad{j}" for j in range(N_SENTIMENT_WORDS)]
    names[CLS_ID], names[SEP_ID] = "[CLS]", "[SEP]"

    world: dict[str, Any] = {"pos_words": pos_words, "neg_words": neg_words,
                             "neutral": neutral, "emb": emb, "names": names}
    for m, dim in (("text", cfg["text_dim"]), ("audio", cfg["audio_dim"]),
                   ("vision", cfg["vision_dim"])):
        code = _code_dim(dim)
        world[f"P_{m}"] = proj(K_SHARED, code)
        world[f"Q_{m}"] = proj(K_NUISANCE, code)
        world[f"bias_{m}"] = (rng.standard_normal(dim) * 0.5).astype(f32)
        world[f"gain_{m}"] = np.exp(rng.normal(0.0, 0.5, dim)).astype(f32)
        if code < dim:
            basis = rng.standard_normal((code, dim)) / math.sqrt(code)
            world[f"basis_{m}"] = basis.astype(f32)
    # Text: [noise | token embedding | (s, n)] -> code space -> 768, as one (72, 768) matrix.
    code_t = _code_dim(cfg["text_dim"])
    emb_out = rng.standard_normal((EMB_RANK, code_t)) / 2.0
    to_code = np.concatenate([np.eye(code_t), emb_out, TEXT_SIGNAL * world["P_text"],
                              TEXT_SIGNAL * world["Q_text"]])
    basis_t = world.get("basis_text", np.eye(code_t))
    world["text_out"] = (to_code @ basis_t).astype(f32)
    return world


def _code_dim(dim: int) -> int:
    """Dimension of the space a modality's latents and noise live in before the output basis."""
    return dim if dim <= WIDE else CODE_RANK


def _frames(rng: np.random.Generator, n: int, t_len: int, base: np.ndarray, sigma: np.ndarray,
            bias: np.ndarray, gain: np.ndarray,
            basis: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``bias + gain * ((base + sigma (eta + eps)) @ basis)`` on valid frames, else 0."""
    code = base.shape[1]
    low = max(1, math.ceil(0.3 * t_len))
    lengths = rng.integers(low, t_len + 1, size=n)
    eta = rng.standard_normal((n, code), dtype=np.float32)
    # Noise is drawn for valid frames only (padding stays exactly 0), which also saves ~1/3 time.
    valid = np.arange(t_len)[None, :] < lengths[:, None]
    row = np.nonzero(valid)[0]  # boolean-mask order; assigning via the mask is the fast scatter
    vals = rng.standard_normal((row.size, code), dtype=np.float32)
    vals += eta[row]
    vals *= sigma[row, None]
    vals += base[row]
    if basis is not None:
        vals = vals @ basis
    vals *= gain
    vals += bias
    x = np.zeros((n, t_len, bias.shape[0]), np.float32)
    x[valid] = vals
    return x, lengths.astype(np.int64)


def _split(rng: np.random.Generator, n: int, offset: int, cfg: dict[str, Any],
           world: dict[str, Any], preset: str) -> dict[str, np.ndarray]:
    f32 = np.float32
    L, label_max = cfg["text_len"], cfg["label_max"]

    # --- latents and labels
    s = rng.standard_normal((n, K_SHARED), dtype=f32)
    nuis = {m: rng.standard_normal((n, K_NUISANCE), dtype=f32) for m in ("text", "audio", "vision")}
    sigma = np.exp(rng.normal(math.log(0.6), 0.5, size=(n, 3))).astype(f32)
    z = (s[:, 0].astype(np.float64) + 0.5 * s[:, 1]) / math.sqrt(1.25)
    y = label_max * np.tanh(0.75 * z)
    y[np.abs(z) < 0.08] = 0.0
    grids = np.asarray(cfg["label_grids"])
    grid = grids[rng.choice(len(grids), size=n, p=cfg["label_grid_probs"])]
    y = np.clip(np.round(y / grid) * grid, -label_max, label_max)
    labels = y.astype(f32)

    # --- tokens: [CLS] words... [SEP] padding
    full = rng.random(n) < 0.1
    valid_len = rng.integers(min(L, max(2, L // 5)), L + 1, size=n)
    valid_len = np.where(full, L, valid_len)
    yn = (labels / label_max).astype(np.float64)[:, None]
    p_pos = 0.04 + 0.3 * np.maximum(yn, 0.0)
    p_neg = 0.04 + 0.3 * np.maximum(-yn, 0.0)
    u = rng.random((n, L))
    n_neutral = len(world["neutral"])
    neutral_rank = np.minimum((rng.random((n, L)) ** 2.5 * n_neutral).astype(np.int64),
                              n_neutral - 1)
    words = np.where(
        u < p_pos,
        world["pos_words"][rng.integers(0, N_SENTIMENT_WORDS, size=(n, L))],
        np.where(u < p_pos + p_neg,
                 world["neg_words"][rng.integers(0, N_SENTIMENT_WORDS, size=(n, L))],
                 world["neutral"][neutral_rank]),
    )
    pos = np.arange(L)[None, :]
    last = (valid_len - 1)[:, None]
    ids = np.where(pos == 0, CLS_ID, np.where(pos == last, SEP_ID,
                                             np.where(pos < last, words, PAD_ID)))
    mask = (pos <= last).astype(np.int64)
    text_bert = np.stack([ids, mask, np.zeros_like(ids)], axis=1).astype(np.float64)
    names = world["names"]
    raw_text = np.array([" ".join(names[ids[i, 1 : valid_len[i] - 1]]) for i in range(n)])

    # --- text features (N, L, 768): every term is low rank, so one matmul writes them all:
    # [sigma (eps + eta) | token embedding | 0.7 (s, n)] @ [noise basis; emb_out; 0.7 [P; Q]].
    row, col = np.nonzero(mask)
    code = _code_dim(cfg["text_dim"])
    eta_t = rng.standard_normal((n, code), dtype=f32)
    coef = np.empty((row.size, code + EMB_RANK + K_SHARED + K_NUISANCE), f32)
    noise = coef[:, :code]
    noise[...] = rng.standard_normal((row.size, code), dtype=f32)
    noise *= TEXT_TOKEN_NOISE
    noise += eta_t[row]
    noise *= sigma[row, 0, None]
    coef[:, code : code + EMB_RANK] = world["emb"][ids[row, col]]
    # Token-local: only word rows carry the sentence latent; [CLS] / [SEP] rows (always kept by the
    # missingness protocol) carry none, so dropping words really removes text information.
    is_word = ((col > 0) & (col < valid_len[row] - 1)).astype(f32)[:, None]
    coef[:, code + EMB_RANK :] = np.concatenate([s, nuis["text"]], axis=1)[row] * is_word
    text = np.zeros((n, L, cfg["text_dim"]), f32)
    text[mask.astype(bool)] = coef @ world["text_out"]

    # --- audio / vision frames
    out: dict[str, np.ndarray] = {}
    for j, m in enumerate(("audio", "vision"), start=1):
        base = SIGNAL[m] * (s @ world[f"P_{m}"]) + NUISANCE * (nuis[m] @ world[f"Q_{m}"])
        out[m], out[f"{m}_lengths"] = _frames(
            rng, n, cfg[f"{m}_len"], base, sigma[:, j], world[f"bias_{m}"], world[f"gain_{m}"],
            world.get(f"basis_{m}"))

    split = {
        "id": np.array([f"synth$_${offset + i}" for i in range(n)]),
        "raw_text": raw_text,
        "text": text,
        "text_bert": text_bert,
        "audio": out["audio"],
        "vision": out["vision"],
        "audio_lengths": out["audio_lengths"],
        "vision_lengths": out["vision_lengths"],
        "regression_labels": labels,
        "classification_labels": (labels >= 0).astype(np.int64),
        "noise_scale": sigma,
        "latent_shared": s,
    }
    if preset == "sims":
        # Unimodal labels (unused by LNLN/EASE): the label plus rater disagreement, on the grid.
        for m in ("T", "A", "V"):
            um = np.round((y + rng.normal(0.0, 0.2, size=n)) / 0.2) * 0.2
            split[f"regression_labels_{m}"] = np.clip(um, -1.0, 1.0).astype(f32)
    return split


def synthetic(
    preset: str,
    *,
    seed: int,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    text_len: int | None = None,
    audio_len: int | None = None,
    vision_len: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """A raw MMSA-layout dict for ``preset`` in ``PRESETS`` ("mosi", "mosei", "sims").

    Sizes and sequence lengths default to the real data set's and can be overridden for fast
    tests (feature widths cannot). The same ``seed`` (and overrides) always gives the same arrays;
    changing one split's size leaves the other splits unchanged.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    cfg = dict(PRESETS[preset])
    for key, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test),
                       ("text_len", text_len), ("audio_len", audio_len),
                       ("vision_len", vision_len)):
        if value is not None:
            if int(value) != value or value < 0:
                raise ValueError(f"{key}: expected a non-negative integer, got {value!r}")
            cfg[key] = int(value)
    if cfg["text_len"] < 2:
        raise ValueError(f"text_len: needs room for [CLS] and [SEP], got {cfg['text_len']}")
    for key in ("audio_len", "vision_len"):
        if cfg[key] < 1:
            raise ValueError(f"{key}: expected >= 1, got {cfg[key]}")

    ss = np.random.SeedSequence(int(seed))
    world_ss, *split_ss = ss.spawn(1 + len(_SPLITS))
    world = _world(np.random.default_rng(world_ss), cfg)
    raw: dict[str, dict[str, np.ndarray]] = {}
    offset = 0
    for name, child in zip(_SPLITS, split_ss, strict=True):
        n = cfg[f"n_{name}"]
        raw[name] = _split(np.random.default_rng(child), n, offset, cfg, world, preset)
        offset += n
    return raw
