"""Tests for ease_jax.data.synthetic: layout, determinism and planted structure."""

import math

import numpy as np
import pytest

from ease_jax.data.mmsa import from_raw
from ease_jax.data.synthetic import PRESETS, synthetic

SPLITS = ("train", "valid", "test")
SMALL = {"n_train": 40, "n_valid": 10, "n_test": 12, "text_len": 12, "audio_len": 20,
         "vision_len": 16}


def test_presets_match_protocol_table():
    expect = {
        "mosi": (1284, 229, 686, 50, 375, 5, 500, 20),
        "mosei": (16326, 1871, 4659, 50, 500, 74, 500, 35),
        "sims": (1368, 456, 457, 39, 400, 33, 55, 709),
    }
    keys = ("n_train", "n_valid", "n_test", "text_len", "audio_len", "audio_dim", "vision_len",
            "vision_dim")
    for name, values in expect.items():
        assert tuple(PRESETS[name][k] for k in keys) == values
        assert PRESETS[name]["text_dim"] == 768


@pytest.mark.parametrize("preset", ["mosi", "mosei", "sims"])
def test_layout_and_dtypes(preset):
    raw = synthetic(preset, seed=3, **SMALL)
    cfg = PRESETS[preset]
    assert set(raw) == set(SPLITS)
    for name in SPLITS:
        s = raw[name]
        n = SMALL[f"n_{name}"]
        L, Ta, Tv = SMALL["text_len"], SMALL["audio_len"], SMALL["vision_len"]
        assert s["text_bert"].shape == (n, 3, L) and s["text_bert"].dtype == np.float64
        assert s["text"].shape == (n, L, 768) and s["text"].dtype == np.float32
        assert s["audio"].shape == (n, Ta, cfg["audio_dim"]) and s["audio"].dtype == np.float32
        assert s["vision"].shape == (n, Tv, cfg["vision_dim"]) and s["vision"].dtype == np.float32
        for k in ("audio_lengths", "vision_lengths", "classification_labels"):
            assert s[k].shape == (n,) and s[k].dtype == np.int64
        assert s["regression_labels"].shape == (n,) and s["regression_labels"].dtype == np.float32
        assert s["id"].shape == (n,) and s["raw_text"].shape == (n,)
        assert s["id"].dtype.kind == "U" and s["raw_text"].dtype.kind == "U"
    ids = np.concatenate([raw[s]["id"] for s in SPLITS])
    assert ids[0] == "synth$_$0" and len(set(ids)) == len(ids)
    assert ("regression_labels_T" in raw["train"]) == (preset == "sims")
    # Loads through the validating loader without warnings.
    data = from_raw(raw, source=f"synthetic:{preset}(seed=3)")
    assert data.dims["D_a"] == cfg["audio_dim"]


def test_deterministic_and_seed_dependent():
    a = synthetic("sims", seed=7, **SMALL)
    b = synthetic("sims", seed=7, **SMALL)
    c = synthetic("sims", seed=8, **SMALL)
    for name in SPLITS:
        for k, v in a[name].items():
            np.testing.assert_array_equal(v, b[name][k])
    assert not np.array_equal(a["train"]["audio"], c["train"]["audio"])
    # Changing one split's size leaves the other splits alone.
    d = synthetic("sims", seed=7, **{**SMALL, "n_train": 5})
    np.testing.assert_array_equal(d["valid"]["vision"], a["valid"]["vision"])


def test_text_layout():
    raw = synthetic("mosi", seed=0, n_train=300, n_valid=2, n_test=2, audio_len=4, vision_len=4)
    tb = raw["train"]["text_bert"]
    ids, mask, types = tb[:, 0], tb[:, 1], tb[:, 2]
    n, L = ids.shape
    valid_len = mask.sum(1).astype(int)
    # mask is a prefix of ones
    np.testing.assert_array_equal(mask, np.arange(L)[None, :] < valid_len[:, None])
    assert np.all(ids[:, 0] == 101)
    assert np.all(ids[np.arange(n), valid_len - 1] == 102)
    words = np.where((np.arange(L)[None, :] > 0) & (np.arange(L)[None, :] < valid_len[:, None] - 1))
    assert np.all((ids[words] >= 1000) & (ids[words] < 30000))
    assert np.all(ids[mask == 0] == 0) and np.all(types == 0)
    assert np.any(valid_len == L) and np.any(valid_len < L // 2)  # with and without padding
    # raw_text spells the words
    assert len(raw["train"]["raw_text"][0].split()) == valid_len[0] - 2
    # text features vanish on padding only
    feats = raw["train"]["text"]
    assert np.all(feats[mask == 0] == 0)
    assert np.all(np.abs(feats[mask == 1]).sum(-1) > 0)


def test_frames_lengths_and_padding():
    raw = synthetic("sims", seed=1, n_train=200, n_valid=2, n_test=2, text_len=8)
    for m in ("audio", "vision"):
        x, ln = raw["train"][m], raw["train"][f"{m}_lengths"]
        t_len = x.shape[1]
        assert ln.min() >= math.ceil(0.3 * t_len) and ln.max() <= t_len
        assert ln.min() < 0.5 * t_len and ln.max() > 0.9 * t_len  # spread
        valid = np.arange(t_len)[None, :] < ln[:, None]
        assert np.all(x[~valid] == 0)
        assert np.all(np.abs(x[valid]).sum(-1) > 0)


def test_label_distributions():
    raw = synthetic("mosi", seed=2, n_train=1500, n_valid=2, n_test=2, text_len=6, audio_len=2,
                    vision_len=2)
    y = raw["train"]["regression_labels"].astype(np.float64)
    assert y.min() >= -3 and y.max() <= 3 and y.min() < -2.5 and y.max() > 2.5
    assert 0.03 < np.mean(y == 0) < 0.15  # visible mass of exact zeros
    on_grid = np.zeros(y.shape, bool)
    for g in (0.2, 0.25, 1 / 3):
        on_grid |= np.abs(y / g - np.round(y / g)) < 1e-4
    assert np.all(on_grid)
    assert np.mean(np.abs(y / 0.2 - np.round(y / 0.2)) < 1e-4) > 0.5
    assert 0.35 < np.mean(y > 0) < 0.65

    sims = synthetic("sims", seed=2, n_train=800, n_valid=2, n_test=2, text_len=6, audio_len=2,
                     vision_len=2)["train"]["regression_labels"]
    assert np.all(np.abs(sims * 5 - np.round(sims * 5)) < 1e-5)
    assert sims.min() == -1 and sims.max() == 1 and np.any(sims == 0)

    mosei = synthetic("mosei", seed=2, n_train=800, n_valid=2, n_test=2, text_len=6,
                      audio_len=2, vision_len=2)["train"]["regression_labels"]
    assert np.all(np.abs(mosei * 3 - np.round(mosei * 3)) < 1e-4)


def _ridge_corr(x_tr, y_tr, x_te, y_te, lam=1.0):
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y_tr - y_tr.mean()))
    return float(np.corrcoef(b @ w, y_te)[0, 1])


def _pooled(s, m):
    x = s[m].astype(np.float64)
    ln = s[f"{m}_lengths"] if m != "text" else s["text_bert"][:, 1].sum(1)
    return x.sum(1) / ln[:, None]


def test_planted_structure_is_learnable_and_cross_modal():
    raw = synthetic("mosi", seed=4, n_train=600, n_valid=2, n_test=300, text_len=20,
                    audio_len=20, vision_len=20)
    tr, te = raw["train"], raw["test"]
    corr = {m: _ridge_corr(_pooled(tr, m), tr["regression_labels"], _pooled(te, m),
                           te["regression_labels"]) for m in ("text", "audio", "vision")}
    assert corr["text"] > 0.6, corr
    assert corr["audio"] > 0.2 and corr["vision"] > 0.15, corr
    # A missing modality is partly imputable from the others: the shared latent is recoverable
    # from audio + vision (R^2 well above 0), but not perfectly.
    av_tr = np.concatenate([_pooled(tr, "audio"), _pooled(tr, "vision")], 1)
    av_te = np.concatenate([_pooled(te, "audio"), _pooled(te, "vision")], 1)
    s_te = te["latent_shared"]
    r = [_ridge_corr(av_tr, tr["latent_shared"][:, k], av_te, s_te[:, k]) for k in range(4)]
    assert min(r) > 0.3 and max(r) < 0.99, r
    # Sentiment words: positive samples use more "good" words than negative ones.
    y = tr["regression_labels"]
    n_good = np.array([sum(w.startswith("good") for w in t.split()) for t in tr["raw_text"]])
    n_bad = np.array([sum(w.startswith("bad") for w in t.split()) for t in tr["raw_text"]])
    assert n_good[y > 1].mean() > 2 * n_good[y < -1].mean()
    assert n_bad[y < -1].mean() > 2 * n_bad[y > 1].mean()


def test_heteroscedastic_noise_scale():
    raw = synthetic("mosi", seed=5, n_train=300, n_valid=2, n_test=2, text_len=6,
                    audio_len=100, vision_len=100)
    s = raw["train"]
    sigma = s["noise_scale"]
    assert sigma.shape == (300, 3) and np.std(np.log(sigma), axis=0).min() > 0.3
    # Within-sequence frame spread follows the per-sample noise scale (vision: 20 dims).
    x, ln = s["vision"].astype(np.float64), s["vision_lengths"]
    valid = (np.arange(x.shape[1])[None, :] < ln[:, None])[:, :, None]
    mean = (x * valid).sum(1) / ln[:, None]
    spread = np.sqrt((((x - mean[:, None]) * valid) ** 2).sum((1, 2)) / ln)
    assert np.corrcoef(np.log(spread), np.log(sigma[:, 2]))[0, 1] > 0.9


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        synthetic("iemocap", seed=0)
    with pytest.raises(ValueError, match="n_train"):
        synthetic("mosi", seed=0, n_train=-1)
    with pytest.raises(ValueError, match="text_len"):
        synthetic("mosi", seed=0, text_len=1, n_train=1, n_valid=1, n_test=1)
