"""Tests of `ease_jax.config`: validation with clear errors, the presets' numbers, the execution
options (part of the configs' equality, so of every program cache key) and the warm-up rule."""

from __future__ import annotations

import dataclasses

import pytest

from ease_jax.config import (
    LOSS_WEIGHTS,
    BertConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    model_config,
    scaled_warmup,
)


def test_model_config_rejects_bad_values_by_name():
    for field, value, match in (("model", "bert", "model"), ("text_encoder", "x", "text_encoder"),
                                ("precision", "fp16", "precision"), ("audio_len", 0, "audio_len"),
                                ("long_sequence", 0, "long_sequence"),
                                ("scan_unroll", -1, "scan_unroll"),
                                ("bert_dropout", 1.0, "bert_dropout")):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{field: value})


def test_execution_options_are_part_of_the_program_key():
    base = model_config("ease", "mosi")
    free = base.loop_free()
    assert (free.encode_once, free.scan_unroll) == (False, 0) and free.long_sequence > 10**6
    assert free != base and hash(free) != hash(base)  # a cache keyed by the config sees them
    same = dataclasses.replace(free, encode_once=True, long_sequence=128, scan_unroll=1)
    assert same == base


def test_model_config_data_set_shapes():
    assert (model_config("ease", "mosei").audio_dim, model_config("lnln", "sims").vision_dim) == (
        74, 709)
    assert model_config("lnln", "mosi").cross_depth == 2
    assert model_config("lnln", "mosei").cross_depth == 4
    with pytest.raises(ValueError, match="dataset"):
        model_config("ease", "iemocap")


def test_bert_config_and_dropout_override():
    cfg = ModelConfig(bert_dropout=0.0)
    assert cfg.bert_config().hidden_dropout_prob == 0.0
    assert ModelConfig().bert_config() == BertConfig.base_uncased()
    with pytest.raises(ValueError, match="text_dim"):
        ModelConfig(text_dim=384).bert_config()


def test_loss_presets_and_weights():
    code, paper = LossConfig.preset("code"), LossConfig.preset("paper", "sims")
    assert code.weights() == {"sp": 1.0, "ucmi": 0.5, "uada": 0.2, "anchor": 0.005, "cons": 2.0,
                              "asym": 2.0, "cc": 0.9, "adv": 0.8, "rec": 0.1}
    assert tuple(code.weights()) == LOSS_WEIGHTS
    assert paper.anchor == pytest.approx(0.2 * 0.02) and (paper.cons, paper.asym) == (0.5, 0.5)
    assert paper.adv == 0.6  # SIMS
    with pytest.raises(ValueError, match="preset"):
        LossConfig.preset("released")


def test_scaled_warmup_and_default_learning_rates():
    # 10% of the epochs, at least 1, at most the given warm-up: 200 -> 20, 50 -> 5, 5 -> 1.
    assert [scaled_warmup(e) for e in (200, 50, 5, 1)] == [20, 5, 1, 1]
    assert scaled_warmup(24, 3) == 2 and scaled_warmup(100, 3) == 3
    assert (TrainConfig().learning_rate("ease"), TrainConfig().learning_rate("lnln")) == (1e-5,
                                                                                          1e-4)
    assert TrainConfig(lr=3e-4).learning_rate("ease") == 3e-4
