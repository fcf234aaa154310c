"""Missingness simulation (docs/protocol.md section 2): keep masks and their application.

A *keep mask* is a bool array per modality, True = observed:

* ``"text"`` (N, L) over BERT token positions,
* ``"text_features"`` (N, L_f) over rows of the precomputed text features (when present),
* ``"audio"`` (N, T_a) and ``"vision"`` (N, T_v) over frames.

Mask makers:

* :func:`eval_keep_masks` -- the reference evaluation masks, bit for bit (legacy NumPy seeding).
* :func:`inter_modal_keep_masks` -- whole modalities present / absent (the six subsets).
* :func:`burst_keep_masks` -- temporally correlated missingness (two-state Markov chain).
* :func:`train_keep_masks` -- the training protocol, in JAX: rates halved over the whole split,
  redrawn from a PRNG key every epoch, per-sample noise.
* :func:`released_train_masks` -- the released code's training masks (NumPy, reseeded, fixed).

:func:`apply_keep_masks` turns a batch (canonical keys of :meth:`ease_jax.data.mmsa.Split.arrays`)
and keep masks into the incomplete batch the models see, plus the observed per-sample missing rate.

Validity: text position j of row i is valid iff ``text_mask[i, j] == 1``; frame t iff
``t < lengths[i]``; every text-feature row is valid. Only valid positions are ever dropped. Text
position 0 ([CLS]) and the last valid token ([SEP]) are always kept. As in the reference, the last
valid index is ``argmin(text_mask) - 1``, which is ``-1`` (the last position) for a row without
padding; for a degenerate all-padding row the forced positions are padding and stay untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "INTER_MODAL_SUBSETS",
    "MODALITIES",
    "UNK_ID",
    "apply_keep_masks",
    "burst_keep_masks",
    "burst_transition_probs",
    "eval_keep_masks",
    "inter_modal_keep_masks",
    "released_train_masks",
    "train_keep_masks",
    "train_missing_rates",
    "valid_masks",
]

MODALITIES = ("text", "audio", "vision")
INTER_MODAL_SUBSETS = ("l", "a", "v", "la", "lv", "av")
UNK_ID = 100  # [UNK] in both bert-base-uncased and bert-base-chinese
TEXT_MODES = ("bert", "features")
_LETTER = {"l": "text", "a": "audio", "v": "vision"}


# ---------------------------------------------------------------------------------------------
# Host-side helpers (NumPy)
# ---------------------------------------------------------------------------------------------


def _host_arrays(split: Any) -> Mapping[str, Any]:
    """Canonical arrays of a Split or of a batch dict."""
    if hasattr(split, "arrays") and callable(split.arrays):
        return split.arrays()
    if isinstance(split, Mapping):
        return split
    raise TypeError(f"split: expected a Split or a dict of arrays, got {type(split).__name__}")


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: expected a missing rate in [0, 1], got {rate}")
    return rate


def _np_text_valid(arrays: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(arrays["text_mask"]).astype(np.int64)


def _np_frame_valid(arrays: Mapping[str, Any], m: str) -> np.ndarray:
    t_len = np.shape(arrays[m])[1]
    lengths = np.asarray(arrays[f"{m}_lengths"])
    return np.arange(t_len)[None, :] < lengths[:, None]


def _np_force_text_ends(keep: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Keep [CLS] (position 0) and the last valid token (argmin(mask) - 1, -1 = last position)."""
    keep = keep.copy()
    n = keep.shape[0]
    if keep.shape[1] == 0:
        return keep
    keep[:, 0] = True
    keep[np.arange(n), np.argmin(attention_mask, axis=1) - 1] = True
    return keep


def _features_shape(arrays: Mapping[str, Any]) -> tuple[int, int] | None:
    tf = arrays.get("text_features")
    return None if tf is None else (int(np.shape(tf)[0]), int(np.shape(tf)[1]))


# ---------------------------------------------------------------------------------------------
# Evaluation masks (reference protocol, bit-exact)
# ---------------------------------------------------------------------------------------------


def eval_keep_masks(split: Any, rate: float, *, seed: int = 1111) -> dict[str, np.ndarray]:
    """Reference evaluation keep masks at missing rate ``rate`` (docs/protocol.md section 2).

    For text ``np.random.seed(seed); u = np.random.uniform(size=(N, L))``,
    ``keep = (u > rate) * attention_mask``, then [CLS] and the last valid token are forced kept;
    audio and vision each reseed with ``seed`` and draw ``uniform(size=(N, T))``,
    ``keep = (u > rate) * (arange(T) < lengths)``. Identical masks for every model and training
    seed, bit for bit with the LNLN/EASE code.

    ``"text_features"`` (project decision; the reference has no such mode): when the features are
    per token (L_f == L) the mask is the text token mask itself; otherwise (e.g. utterance-level
    features, L_f = 1) reseed with ``seed`` and ``keep = uniform(size=(N, L_f)) > rate`` (every row
    valid, nothing forced). The global NumPy RNG state is restored afterwards.

    Args:
      split: a :class:`~ease_jax.data.mmsa.Split` or a dict with the canonical keys.
      rate: missing rate in [0, 1].
    Returns:
      dict of bool arrays ``text`` (N, L), ``audio`` (N, T_a), ``vision`` (N, T_v) and, with text
      features, ``text_features`` (N, L_f).
    """
    rate = _check_rate(rate)
    arrays = _host_arrays(split)
    attention = _np_text_valid(arrays)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        u = np.random.uniform(size=attention.shape)
        keep_text = _np_force_text_ends((u > rate) * attention > 0, attention)
        out = {"text": keep_text}
        for m in ("audio", "vision"):
            valid = _np_frame_valid(arrays, m)
            np.random.seed(seed)
            u = np.random.uniform(size=valid.shape)
            out[m] = (u > rate) * valid
        fshape = _features_shape(arrays)
        if fshape is not None:
            if fshape[1] == attention.shape[1]:
                out["text_features"] = keep_text.copy()
            else:
                np.random.seed(seed)
                out["text_features"] = np.random.uniform(size=fshape) > rate
    finally:
        np.random.set_state(state)
    return {k: out[k] for k in ("text", "text_features", "audio", "vision") if k in out}


def released_train_masks(split: Any, seed: int) -> dict[str, np.ndarray]:
    """The released code's training masks (`generate_m`, docs/protocol.md sections 2 and 12
    item 1), bit for bit: drawn once and fixed for the whole run (`TrainConfig.train_masks =
    "released"`).

    The released loader, after `setup_seed(seed)` (NumPy's and Python's generators both seeded
    with the run's seed), draws the rates ``r_m = np.random.uniform(size=(N, 1))`` for text,
    audio and vision in that order; then per modality, in the same order, ``random.sample(range(N),
    int(N / 2))`` (Python's generator) picks the samples set to r = 0; then each modality's
    `generate_m` call reseeds NumPy with the seed and draws ``uniform(size=(N, T_m))``, keeping
    ``u > r_m`` at valid positions (text: [CLS] and the last valid token forced kept). Reseeding
    gives every modality the same uniforms (for one-row modalities the same single number) and
    every epoch the same masks. Text features (this project's mode) follow `eval_keep_masks`: the
    text mask when L_f == L, else their own reseeded ``uniform(size=(N, L_f)) > r_text``. NumPy's
    and Python's global generators are left untouched.

    Returns bool masks ``text`` [N, L], (``text_features`` [N, L_f]), ``audio`` [N, T_a],
    ``vision`` [N, T_v] and ``rate`` [N, 3] float32, the drawn rates (text, audio, vision).
    """
    import random

    arrays = _host_arrays(split)
    attention = _np_text_valid(arrays)
    n = attention.shape[0]
    gen = np.random.RandomState(seed)
    rates = [gen.uniform(size=(n, 1)) for _ in MODALITIES]
    halving = random.Random(seed)
    for r in rates:
        r[halving.sample(range(n), n // 2)] = 0.0

    def reseeded(shape):  # `generate_m`: np.random.seed(seed) before every draw
        return np.random.RandomState(seed).uniform(size=shape)

    keep_text = _np_force_text_ends((reseeded(attention.shape) > rates[0]) * attention > 0,
                                    attention)
    out = {"text": keep_text}
    fshape = _features_shape(arrays)
    if fshape is not None:
        out["text_features"] = (keep_text.copy() if fshape[1] == attention.shape[1]
                                else reseeded(fshape) > rates[0])
    for m, r in zip(("audio", "vision"), rates[1:]):
        valid = _np_frame_valid(arrays, m)
        out[m] = (reseeded(valid.shape) > r) & valid
    out["rate"] = np.concatenate(rates, axis=1).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Inter-modal masks
# ---------------------------------------------------------------------------------------------


def _parse_present(present: str | Iterable[str]) -> frozenset[str]:
    if isinstance(present, str):
        if present in MODALITIES:
            return frozenset({present})
        if not present or any(c not in _LETTER for c in present):
            raise ValueError(
                f"present: expected letters from 'lav' (one of {INTER_MODAL_SUBSETS}) or "
                f"modality names {MODALITIES}, got {present!r}")
        return frozenset(_LETTER[c] for c in present)
    names = frozenset(present)
    bad = names - set(MODALITIES)
    if bad or not names:
        raise ValueError(f"present: unknown modalities {sorted(bad)}; expected from {MODALITIES}")
    return names


def inter_modal_keep_masks(split: Any, present: str | Iterable[str]) -> dict[str, np.ndarray]:
    """Keep masks for the inter-modal protocol: ``present`` fully observed, the rest at rate 1.0.

    ``present`` is one of ``INTER_MODAL_SUBSETS`` ("l", "a", "v", "la", "lv", "av"; l = language)
    or an iterable of modality names. Present modalities keep every valid position; absent text
    keeps only [CLS] and the last valid token (all other tokens become [UNK]); absent per-token
    text features (L_f == L) keep the same two rows, other absent text features and absent
    audio / vision are dropped entirely. Equals :func:`eval_keep_masks` at rate 0 / rate 1 per
    modality (no random draw is needed).
    """
    names = _parse_present(present)
    arrays = _host_arrays(split)
    attention = _np_text_valid(arrays)
    text_present = "text" in names
    keep_text = attention > 0 if text_present else np.zeros(attention.shape, bool)
    out = {"text": _np_force_text_ends(keep_text, attention)}
    fshape = _features_shape(arrays)
    if fshape is not None:
        # As eval_keep_masks at rate 0 / 1: per-token features (L_f == L) follow the token mask
        # ([CLS] / [SEP] rows kept), other features are all kept or all dropped.
        same_len = fshape[1] == attention.shape[1]
        out["text_features"] = out["text"].copy() if same_len else np.full(fshape, text_present)
    for m in ("audio", "vision"):
        valid = _np_frame_valid(arrays, m)
        out[m] = valid.copy() if m in names else np.zeros(valid.shape, bool)
    return out


# ---------------------------------------------------------------------------------------------
# Burst (Markov) masks
# ---------------------------------------------------------------------------------------------


def burst_transition_probs(rate: float, mean_burst: float) -> tuple[float, float, float]:
    """Transition probabilities of the observed/dropped chain for a target ``rate``.

    With ``a = P(observed -> dropped)`` and ``b = P(dropped -> observed)`` the stationary drop
    probability is ``a / (a + b)`` and the mean dropped-run length is ``1 / b``. Solving for
    ``rate`` and ``mean_burst`` gives ``b = 1 / mean_burst`` and ``a = b * rate / (1 - rate)``.
    ``a`` is a probability only while ``rate <= mean_burst / (1 + mean_burst)`` (0.833 for bursts
    of 5); above that the rate wins: ``a = 1`` and ``b = (1 - rate) / rate``, i.e. bursts grow to
    mean length ``rate / (1 - rate)`` (9 at rate 0.9) and observed runs have length exactly 1.
    ``rate = 1`` drops everything.

    Returns:
      (a, b, effective mean burst length).
    """
    rate = _check_rate(rate)
    mean_burst = float(mean_burst)
    if not mean_burst >= 1.0:
        raise ValueError(f"mean_burst: expected a mean run length >= 1, got {mean_burst}")
    if rate == 0.0:
        return 0.0, 1.0 / mean_burst, mean_burst
    if rate == 1.0:
        return 1.0, 0.0, float("inf")
    b = 1.0 / mean_burst
    a = b * rate / (1.0 - rate)
    if a > 1.0:
        a = 1.0
        b = (1.0 - rate) / rate
    return a, b, 1.0 / b


def _markov_drops(rng: np.random.Generator, shape: tuple[int, int], rate: float, a: float,
                  b: float) -> np.ndarray:
    """(N, T) bool dropped states of independent stationary two-state chains."""
    n, t_len = shape
    u = rng.random((n, t_len))
    dropped = np.empty((n, t_len), bool)
    if t_len == 0:
        return dropped
    dropped[:, 0] = u[:, 0] < rate  # start in the stationary distribution
    for t in range(1, t_len):
        prev = dropped[:, t - 1]
        dropped[:, t] = np.where(prev, u[:, t] >= b, u[:, t] < a)
    return dropped


def burst_keep_masks(split: Any, rate: float, *, mean_burst: float = 5.0,
                     seed: int = 1111) -> dict[str, np.ndarray]:
    """Temporally correlated missingness: bursts of consecutive dropped tokens / frames.

    Per sequence a two-state (observed / dropped) Markov chain runs over positions, started in its
    stationary distribution, with stationary drop probability ``rate`` and mean dropped-run length
    ``mean_burst`` (see :func:`burst_transition_probs`, also for what happens at high rates). Only
    valid positions can be dropped (a chain over the whole row restricted to the valid prefix is
    again a stationary chain); text [CLS] and the last valid token are kept, so the text drop rate
    is slightly below ``rate`` exactly as in the i.i.d. protocol. Text features with L_f == L use
    the text mask; otherwise their own chain over the L_f rows. Each modality draws from its own
    child of ``numpy.random.SeedSequence(seed)``: deterministic, independent of the global RNG.
    """
    rate = _check_rate(rate)
    a, b, _ = burst_transition_probs(rate, mean_burst)
    arrays = _host_arrays(split)
    attention = _np_text_valid(arrays)
    rngs = [np.random.default_rng(c) for c in np.random.SeedSequence(seed).spawn(4)]
    keep_text = ~_markov_drops(rngs[0], attention.shape, rate, a, b) & (attention > 0)
    out = {"text": _np_force_text_ends(keep_text, attention)}
    fshape = _features_shape(arrays)
    if fshape is not None:
        if fshape[1] == attention.shape[1]:
            out["text_features"] = out["text"].copy()
        else:
            out["text_features"] = ~_markov_drops(rngs[3], fshape, rate, a, b)
    for rng, m in zip(rngs[1:3], ("audio", "vision"), strict=True):
        valid = _np_frame_valid(arrays, m)
        out[m] = ~_markov_drops(rng, valid.shape, rate, a, b) & valid
    return out


# ---------------------------------------------------------------------------------------------
# Device-side (jnp): validity, application, training masks
# ---------------------------------------------------------------------------------------------


def _lengths_valid(lengths: jax.Array, t_len: int) -> jax.Array:
    return jnp.arange(t_len)[None, :] < jnp.asarray(lengths)[:, None]


def valid_masks(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Bool validity per modality: the positions that can be dropped (jnp; jit-able).

    ``text`` (N, L) = attention mask, ``audio`` / ``vision`` (N, T) = ``t < length``,
    ``text_features`` (N, L_f) = the attention mask for per-token features (L_f == L), all True
    otherwise. Missing inputs are skipped.
    """
    out: dict[str, jax.Array] = {}
    if "text_mask" in batch:
        out["text"] = jnp.asarray(batch["text_mask"]) != 0
    if batch.get("text_features") is not None:
        out["text_features"] = _features_valid(batch)
    for m in ("audio", "vision"):
        if m in batch and f"{m}_lengths" in batch:
            out[m] = _lengths_valid(batch[f"{m}_lengths"], jnp.shape(batch[m])[1])
    return out


def _dropped_fraction(valid: jax.Array, keep: jax.Array) -> jax.Array:
    n_valid = jnp.sum(valid, axis=1)
    n_dropped = jnp.sum(valid & ~keep, axis=1)
    return jnp.where(n_valid > 0, n_dropped / jnp.maximum(n_valid, 1), 0.0).astype(jnp.float32)


def _features_valid(x: Mapping[str, Any]) -> jax.Array:
    """Valid rows of the text features: per-token features (L_f == L) are valid where the text
    attention mask is (padding rows are not "missing"); other features (e.g. one utterance-level
    row) are always valid."""
    shape = jnp.shape(x["text_features"])[:2]
    mask = x.get("text_mask")
    if mask is not None and jnp.shape(mask) == shape:
        return jnp.asarray(mask) != 0
    return jnp.ones(shape, bool)


def _check_mask(name: str, keep: Any, shape: tuple[int, ...]) -> None:
    if tuple(jnp.shape(keep)) != tuple(shape):
        raise ValueError(f"keep[{name!r}]: expected shape {tuple(shape)}, got {jnp.shape(keep)}")


@partial(jax.jit, static_argnames="text_mode")
def _apply_core(x: dict[str, Any], keep: dict[str, Any], text_mode: str) -> dict[str, jax.Array]:
    out: dict[str, jax.Array] = {}
    rates = []
    if "text_features" in x:
        feats = x["text_features"]
        k = keep["text_features"].astype(bool)
        out["text_features"] = feats * k[:, :, None].astype(feats.dtype)
        feat_rate = _dropped_fraction(_features_valid(x), k)
    if "text_ids" in x:
        ids = x["text_ids"]
        valid = x["text_mask"] != 0
        k = keep["text"].astype(bool)
        out["text_ids"] = jnp.where(valid & ~k, jnp.asarray(UNK_ID, ids.dtype), ids)
        text_rate = _dropped_fraction(valid, k)
    rates.append(feat_rate if text_mode == "features" else text_rate)
    for m in ("audio", "vision"):
        k = keep[m].astype(bool)
        out[m] = x[m] * k[:, :, None].astype(x[m].dtype)
        rates.append(_dropped_fraction(_lengths_valid(x[f"{m}_lengths"], k.shape[1]), k))
    out["missing_rate"] = jnp.stack(rates, axis=1)
    return out


def apply_keep_masks(batch: Mapping[str, Any], keep: Mapping[str, Any], *,
                     text_mode: str = "bert") -> dict[str, Any]:
    """The incomplete batch: dropped inputs replaced, plus the observed missing rate.

    * ``text_ids``: dropped valid tokens -> 100 ([UNK]); ``text_mask`` / ``text_types`` unchanged.
    * ``audio`` / ``vision``: frames multiplied by their keep mask (dropped frames -> 0).
    * ``text_features``: rows not kept -> 0.
    * ``missing_rate`` (N, 3) float32, [text, audio, vision]: dropped valid positions / valid
      positions (0 for a sequence without valid positions). Text uses the attention mask and
      ``keep["text"]`` in ``text_mode="bert"``, the valid feature rows (the attention mask when
      L_f == L, else all L_f rows) and ``keep["text_features"]`` in ``text_mode="features"``.

    Text ids are replaced whenever ``batch`` has ``text_ids`` and ``keep`` has ``"text"``, text
    features whenever both sides have ``"text_features"``, whatever ``text_mode``. Keys not
    listed are passed through untouched. jnp throughout: works inside ``jit`` and on NumPy inputs
    (the array work is itself one jitted function, so eager calls compile once per shape).
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode: expected one of {TEXT_MODES}, got {text_mode!r}")
    x: dict[str, Any] = {}
    k: dict[str, Any] = {}
    if batch.get("text_features") is not None and "text_features" in keep:
        x["text_features"] = batch["text_features"]
        k["text_features"] = keep["text_features"]
        if "text_mask" in batch:
            x["text_mask"] = batch["text_mask"]
        _check_mask("text_features", k["text_features"], jnp.shape(x["text_features"])[:2])
    elif text_mode == "features":
        raise ValueError("keep: text_mode='features' needs batch['text_features'] and "
                         "keep['text_features']")
    if "text_ids" in batch and "text" in keep:
        x["text_ids"], x["text_mask"] = batch["text_ids"], batch["text_mask"]
        k["text"] = keep["text"]
        _check_mask("text", k["text"], jnp.shape(x["text_ids"]))
    elif text_mode == "bert":
        raise ValueError("keep: text_mode='bert' needs batch['text_ids'], batch['text_mask'] "
                         "and keep['text']")
    for m in ("audio", "vision"):
        x[m], x[f"{m}_lengths"], k[m] = batch[m], batch[f"{m}_lengths"], keep[m]
        _check_mask(m, k[m], jnp.shape(x[m])[:2])
    out = dict(batch)
    out.update(_apply_core(x, k, text_mode=text_mode))
    return out


def _modality_keys(key: jax.Array, i: int) -> tuple[jax.Array, jax.Array]:
    """(rate key, position-noise key) of modality i: ``split(fold_in(key, i))``."""
    k_rate, k_noise = jax.random.split(jax.random.fold_in(key, i))
    return k_rate, k_noise


def _per_modality_uniform(key: jax.Array, n_modalities: int, shape: tuple[int, ...],
                          which: int) -> jax.Array:
    """(n_modalities, *shape) uniforms, row i from ``split(fold_in(key, i))[which]``.

    One vmapped draw instead of one per modality: the keys stay per modality, but XLA compiles a
    single random-bits kernel (compile time dominates on CPU).
    """
    keys = jax.vmap(lambda i: _modality_keys(key, i)[which])(jnp.arange(n_modalities))
    return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)


@partial(jax.jit, static_argnames=("n_split", "n_modalities"))
def _rates_core(key: jax.Array, n_split: int, n_modalities: int) -> jax.Array:
    u = _per_modality_uniform(key, n_modalities, (2, n_split), 0)
    # Rank of a second uniform = a uniformly random permutation (argsort is stable, so exactly
    # floor(N/2) ranks fall below N // 2 even with ties). Cheaper to compile than
    # jax.random.permutation + scatter.
    rank = jnp.argsort(jnp.argsort(u[:, 1], axis=1), axis=1)
    return jnp.where(rank < n_split // 2, 0.0, u[:, 0])


def train_missing_rates(key: jax.Array, n_split: int) -> dict[str, jax.Array]:
    """Training missing rates (N,) of every sample of the training split, for "text", "audio",
    "vision" (docs/protocol.md section 2, the released `generate_m`).

    r ~ U(0, 1) per sample, then exactly ``int(N / 2)`` samples of the WHOLE split (a uniformly
    random subset, drawn independently per modality) get r = 0. Modality i draws from the first
    half of ``split(fold_in(key, i))``; :func:`train_keep_masks` uses the same derivation, so the
    two agree for the same key. Redraw per epoch by folding the epoch into ``key``.
    """
    rates = _rates_core(key, int(n_split), len(MODALITIES))
    return {m: rates[i] for i, m in enumerate(MODALITIES)}


def _per_sample_uniform(key: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[B, *shape] uniforms, row b from ``fold_in(key, index[b])``: a sample's noise depends on
    which sample it is, not on the batch (or device) it lands in."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), shape))(index)


def _jnp_force_text_ends(keep: jax.Array, attention: jax.Array) -> jax.Array:
    b, l_len = keep.shape
    last = (jnp.argmin(attention, axis=1) - 1) % l_len  # -1 -> last position, as in NumPy
    keep = keep.at[:, 0].set(True)
    return keep.at[jnp.arange(b), last].set(True)


@partial(jax.jit, static_argnames=("n_split", "t_audio", "t_vision", "l_feat"))
def _train_core(key: jax.Array, index: jax.Array, text_mask: jax.Array, audio_lengths: jax.Array,
                vision_lengths: jax.Array, n_split: int, t_audio: int, t_vision: int,
                l_feat: int | None) -> dict[str, jax.Array]:
    l_len = text_mask.shape[1]
    rates = _rates_core(key, n_split, len(MODALITIES))[:, index]  # [3, B]
    # Position noise per sample and modality, from the modality's key folded with the sample's
    # index, padded to the longest axis (one vmapped draw: compile time dominates on CPU).
    t_max = max(l_len, t_audio, t_vision)
    pos_keys = jax.vmap(lambda i: _modality_keys(key, i)[1])(jnp.arange(len(MODALITIES)))
    u = jax.vmap(lambda k: _per_sample_uniform(k, index, (t_max,)))(pos_keys)  # [3, B, t_max]
    valid = (text_mask != 0, _lengths_valid(audio_lengths, t_audio),
             _lengths_valid(vision_lengths, t_vision))
    keep = [(u[i, :, : v.shape[1]] > rates[i][:, None]) & v for i, v in enumerate(valid)]
    keep_text = _jnp_force_text_ends(keep[0], text_mask)
    out = {"text": keep_text}
    if l_feat is not None:
        if l_feat == l_len:
            out["text_features"] = keep_text
        else:
            u_feat = _per_sample_uniform(jax.random.fold_in(key, len(MODALITIES)), index, (l_feat,))
            out["text_features"] = u_feat > rates[0][:, None]
    out["audio"], out["vision"] = keep[1], keep[2]
    return out


def train_keep_masks(key: jax.Array, batch: Mapping[str, Any], *, n_split: int | None = None,
                     text_mode: str = "bert") -> dict[str, jax.Array]:
    """Training keep masks (LNLN protocol; jit-able) of the batch's rows of a training split.

    ``batch["index"]`` [B] int gives each row's position in the training split of ``n_split``
    samples (without it the batch is the whole split: index = 0 .. B - 1, n_split = B). The rate
    of sample i is row i of :func:`train_missing_rates` ``(key, n_split)`` (r ~ U(0, 1), exactly
    ``int(N / 2)`` samples of the split at r = 0 per modality); ``keep = (u > r) & valid`` with
    u ~ U(0, 1) per position drawn from the modality's sub-key folded with i. So a sample's masks
    depend only on (key, i, n_split): not on the batch size, the batch order, padding rows or the
    number of devices. Text also keeps [CLS] and the last valid token. Text features (when
    present) share the text rate r (one "language" modality) with their own noise
    (``fold_in(key, 3)``) over the L_f rows, or reuse the text mask when L_f == L, mirroring
    :func:`eval_keep_masks`. ``text_mode`` only checks that the inputs that mode needs are
    present. Reads ``index``, ``text_mask``, the lengths and the shapes of ``audio`` / ``vision``
    / ``text_features``. Pass the same ``key`` to every batch of an epoch (fold in the epoch).
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode: expected one of {TEXT_MODES}, got {text_mode!r}")
    has_features = batch.get("text_features") is not None
    if text_mode == "features" and not has_features:
        raise ValueError("batch: text_mode='features' needs batch['text_features']")
    b = int(jnp.shape(batch["text_mask"])[0])
    if "index" in batch:
        if n_split is None:
            raise ValueError("n_split: batch['index'] given, so the split size is needed too")
        index = jnp.asarray(batch["index"], jnp.int32)
    else:
        index, n_split = jnp.arange(b, dtype=jnp.int32), b if n_split is None else n_split
        if n_split != b:
            raise ValueError(f"n_split={n_split} but the batch has {b} rows and no 'index'")
    if int(n_split) < 1:
        raise ValueError(f"n_split: expected a split size >= 1, got {n_split}")
    l_feat = int(jnp.shape(batch["text_features"])[1]) if has_features else None
    return _train_core(key, index, jnp.asarray(batch["text_mask"]),
                       jnp.asarray(batch["audio_lengths"]), jnp.asarray(batch["vision_lengths"]),
                       n_split=int(n_split), t_audio=int(jnp.shape(batch["audio"])[1]),
                       t_vision=int(jnp.shape(batch["vision"])[1]), l_feat=l_feat)
