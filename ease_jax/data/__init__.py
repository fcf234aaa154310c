"""Data layer: MMSA loading / validation, synthetic data, missingness masks.

The generator function is NOT re-exported here: ``ease_jax.data.synthetic`` stays the module
(``from ease_jax.data.synthetic import synthetic`` gets the function), so that
``import ease_jax.data.synthetic as m`` and ``from ease_jax.data import synthetic`` agree.
"""

from ease_jax.data.missing import (
    INTER_MODAL_SUBSETS,
    MODALITIES,
    UNK_ID,
    apply_keep_masks,
    burst_keep_masks,
    burst_transition_probs,
    eval_keep_masks,
    inter_modal_keep_masks,
    released_train_masks,
    train_keep_masks,
    train_missing_rates,
    valid_masks,
)
from ease_jax.data.mmsa import (
    SPLITS,
    MMSAData,
    MMSAFormatError,
    Split,
    UnsafePickleError,
    from_raw,
    load_mmsa,
)
from ease_jax.data.synthetic import PRESETS

__all__ = [
    "INTER_MODAL_SUBSETS",
    "MODALITIES",
    "PRESETS",
    "SPLITS",
    "UNK_ID",
    "MMSAData",
    "MMSAFormatError",
    "Split",
    "UnsafePickleError",
    "apply_keep_masks",
    "burst_keep_masks",
    "burst_transition_probs",
    "eval_keep_masks",
    "from_raw",
    "inter_modal_keep_masks",
    "released_train_masks",
    "load_mmsa",
    "train_keep_masks",
    "train_missing_rates",
    "valid_masks",
]
