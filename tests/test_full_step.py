"""One EASE training step at full MOSI dimensions with BERT-base on this CPU (issue #5's check).

Slow (minutes on a 2-core CPU: BERT-base forward + backward on 2 x 64 sequences plus the full
375- and 500-frame encoders), so marked `slow`; run with `pytest -m slow tests/test_full_step.py`.
"""

import jax
import numpy as np
import pytest

from ease_jax.config import LossConfig, TrainConfig, model_config
from ease_jax.data.mmsa import from_raw
from ease_jax.data.synthetic import synthetic
from ease_jax.train import create_state, make_train_step, pad_batch


@pytest.mark.slow
def test_one_ease_step_bert_base_full_mosi_shapes():
    data = from_raw(synthetic("mosi", seed=0, n_train=64, n_valid=2, n_test=2), source="synthetic")
    arrays = data.train.arrays()
    assert arrays["audio"].shape[1:] == (375, 5) and arrays["vision"].shape[1:] == (500, 20)
    cfg = model_config("ease", "mosi")  # BERT mode, bert-base-uncased dimensions
    tcfg = TrainConfig(lr=1e-5, warmup_epochs=0)  # non-zero lr so the update is real
    state = create_state(cfg, tcfg, seed=1111, steps_per_epoch=1)
    step = jax.jit(make_train_step(cfg, LossConfig(), tcfg, steps_per_epoch=1, n_train=64,
                                   axis_name=None))
    batch = pad_batch({k: v for k, v in arrays.items() if k != "text_features"}, 64)
    batch["index"] = np.arange(64, dtype=np.int32)
    new_state, metrics = step(state, batch, jax.random.key_data(jax.random.key(0)))
    metrics = jax.device_get(metrics)
    print({k: float(v) for k, v in metrics.items()})
    for term in ("sp", "ucmi", "uada", "anchor", "cons", "asym", "total"):
        assert np.isfinite(metrics[term]), term
    assert metrics["nonfinite"] == 0.0
    moved = jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        state.params["encoder"]["bert"], new_state.params["encoder"]["bert"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0.0  # BERT is fine-tuned, not frozen
