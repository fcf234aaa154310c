"""Tests for ease_jax.data.missing: reference eval masks, inter-modal, burst and training masks."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax.data.missing import (
    INTER_MODAL_SUBSETS,
    MODALITIES,
    apply_keep_masks,
    burst_keep_masks,
    burst_transition_probs,
    eval_keep_masks,
    inter_modal_keep_masks,
    train_keep_masks,
    train_missing_rates,
    valid_masks,
)
from ease_jax.data.mmsa import from_raw, load_mmsa
from ease_jax.data.synthetic import synthetic

RATES = [round(0.1 * i, 1) for i in range(10)]


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def mosi_small():
    raw = synthetic("mosi", seed=11, n_train=4, n_valid=4, n_test=47)  # odd B for floor(B/2)
    return from_raw(raw, source="synthetic:mosi(seed=11)").test


@pytest.fixture(scope="module")
def sims_small():
    raw = synthetic("sims", seed=12, n_train=4, n_valid=4, n_test=40)
    return from_raw(raw, source="synthetic:sims(seed=12)").test


@pytest.fixture(scope="module")
def real_mosi(shared_mosi_path):
    return load_mmsa(shared_mosi_path)


def reference_eval_masks(split, rate, seed=1111):
    """Straightforward row-by-row re-implementation of the LNLN evaluation masks."""
    mask = np.asarray(split.text_mask)
    n, L = mask.shape
    out = {}
    np.random.seed(seed)
    u = np.random.uniform(size=(n, L))
    text = np.zeros((n, L), bool)
    for i in range(n):
        row = mask[i]
        text[i] = (u[i] > rate) & (row == 1)
        zeros = np.flatnonzero(row == 0)
        first_zero = zeros[0] if len(zeros) else 0  # argmin of the mask row
        text[i, 0] = True
        text[i, first_zero - 1] = True  # -1 wraps to the last position (no padding)
    out["text"] = text
    for m, lengths in (("audio", split.audio_lengths), ("vision", split.vision_lengths)):
        t_len = getattr(split, m).shape[1]
        np.random.seed(seed)
        u = np.random.uniform(size=(n, t_len))
        keep = np.zeros((n, t_len), bool)
        for i in range(n):
            for t in range(lengths[i]):
                keep[i, t] = u[i, t] > rate
        out[m] = keep
    if split.text_features is not None:
        l_f = split.text_features.shape[1]
        if l_f == L:
            out["text_features"] = text.copy()
        else:
            np.random.seed(seed)
            out["text_features"] = np.random.uniform(size=(n, l_f)) > rate
    return out


def protocol_eval_masks(split, rate, seed=1111):
    """docs/protocol.md section 2 written out with legacy NumPy, vectorised (independent of both the
    library and the row-by-row `reference_eval_masks`): text, then audio, then vision, each after
    its own `np.random.seed(seed)`."""
    attention = np.asarray(split.text_mask)
    n, L = attention.shape
    np.random.seed(seed)
    u = np.random.uniform(size=(n, L))
    text = (u > rate) * attention
    text[:, 0] = 1
    text[np.arange(n), np.argmin(attention, axis=1) - 1] = 1
    out = {"text": text.astype(bool)}
    for m in ("audio", "vision"):
        t_len = np.shape(getattr(split, m))[1]
        np.random.seed(seed)
        u = np.random.uniform(size=(n, t_len))
        out[m] = ((u > rate) * (np.arange(t_len)[None, :] < np.asarray(
            getattr(split, f"{m}_lengths"))[:, None])).astype(bool)
    return out


def assert_rng_state_equal(got, want):
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert tuple(got[2:]) == tuple(want[2:])


def assert_masks_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == bool, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def forced_text(split):
    """(N, L) bool: [CLS] and the last valid token."""
    mask = np.asarray(split.text_mask)
    out = np.zeros(mask.shape, bool)
    out[:, 0] = True
    out[np.arange(mask.shape[0]), mask.sum(1) - 1] = True
    return out


def np_valid(split):
    out = {"text": split.text_mask == 1}
    for m in ("audio", "vision"):
        t_len = getattr(split, m).shape[1]
        out[m] = np.arange(t_len)[None, :] < getattr(split, f"{m}_lengths")[:, None]
    return out


# --------------------------------------------------------------------------- eval masks


def test_eval_masks_match_reference_on_real_data(real_mosi):
    for name in ("train", "valid", "test"):
        split = real_mosi.split(name)
        for rate in RATES:
            assert_masks_equal(eval_keep_masks(split, rate), reference_eval_masks(split, rate))


@pytest.mark.parametrize("which", ["mosi_small", "sims_small"])
def test_eval_masks_match_reference_on_synthetic(which, request):
    split = request.getfixturevalue(which)
    assert split.text_features.shape[1] == split.text_ids.shape[1]  # per-token features
    for rate in RATES:
        assert_masks_equal(eval_keep_masks(split, rate), reference_eval_masks(split, rate))
    # Other seeds and dict input work the same.
    assert_masks_equal(eval_keep_masks(split.arrays(), 0.3, seed=7),
                       reference_eval_masks(split, 0.3, seed=7))


def test_eval_masks_restore_global_rng(mosi_small):
    np.random.seed(123)
    expected = np.random.uniform(size=5)
    np.random.seed(123)
    eval_keep_masks(mosi_small, 0.5)
    np.testing.assert_array_equal(np.random.uniform(size=5), expected)


def test_eval_mask_properties(mosi_small):
    split = mosi_small
    valid = np_valid(split)
    forced = forced_text(split)
    for rate in (0.0, 0.3, 0.7):
        keep = eval_keep_masks(split, rate)
        assert not np.any(keep["text"] & ~valid["text"])  # padding never kept
        assert np.all(keep["text"][forced])
        for m in ("audio", "vision"):
            assert not np.any(keep[m] & ~valid[m])
            n_valid = valid[m].sum()
            observed = keep[m].sum() / n_valid
            se = np.sqrt(rate * (1 - rate) / n_valid)
            assert abs(observed - (1 - rate)) < 4 * se + 1e-9, (m, rate, observed)
        free = valid["text"] & ~forced
        observed = keep["text"][free].mean()
        assert abs(observed - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / free.sum()) + 1e-9
    keep0 = eval_keep_masks(split, 0.0)
    for m in ("text", "audio", "vision"):
        np.testing.assert_array_equal(keep0[m], valid[m])
    keep1 = eval_keep_masks(split, 1.0)
    np.testing.assert_array_equal(keep1["text"], forced)
    assert not keep1["audio"].any() and not keep1["vision"].any()
    # Bit for bit against the protocol's own recipe (vectorised, legacy NumPy), and the global
    # NumPy RNG state is exactly what it was before the call.
    np.random.seed(2024)
    np.random.uniform(size=3)  # some state that is neither fresh nor seeded 1111
    before = np.random.get_state()
    got = eval_keep_masks(split, 0.4)
    assert_rng_state_equal(np.random.get_state(), before)
    want = protocol_eval_masks(split, 0.4)
    for m in ("text", "audio", "vision"):
        assert got[m].dtype == bool, m
        np.testing.assert_array_equal(got[m], want[m], err_msg=m)
    assert not np.array_equal(eval_keep_masks(split, 0.4, seed=1)["audio"],
                              eval_keep_masks(split, 0.4)["audio"])
    with pytest.raises(ValueError, match="rate"):
        eval_keep_masks(split, 1.5)


# The first legacy-NumPy uniforms after np.random.seed(1111) (MT19937; NumPy keeps this stream
# fixed): u[0, :5] and u[1, :5] of a (2, 5) draw. A (2, T) draw is the same stream row-major.
U1111 = [0.0955492, 0.9250037, 0.34357342, 0.31047694, 0.00200984,
         0.23559472, 0.23779172, 0.73591587, 0.49546808, 0.78442535]


def test_eval_masks_tiny_case_by_hand():
    """Individual values worked out by hand from U1111. Row 0 has padding (valid_len 3, [SEP] at
    2); row 1 has none (argmin = 0, so index -1 = the last position is forced)."""
    np.testing.assert_allclose(np.random.RandomState(1111).uniform(size=10), U1111, rtol=1e-7)
    batch = {
        "text_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
        "audio": np.zeros((2, 3, 1), np.float32), "audio_lengths": np.array([3, 1]),
        "vision": np.zeros((2, 4, 1), np.float32), "vision_lengths": np.array([2, 4]),
    }
    keep = eval_keep_masks(batch, 0.3)
    assert set(keep) == {"text", "audio", "vision"}
    # text u: [.096 .925 .344 .310 .002] / [.236 .238 .736 .495 .784]; position 3 of row 0 has
    # u = .310 > .3 but is padding; [CLS] (u = .096, .236) forced; row 1 drops only position 1.
    np.testing.assert_array_equal(keep["text"], [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    # audio reseeds: u = [.096 .925 .344] / [.310 .002 .236]; row 1 has 1 frame (u .310 > .3).
    np.testing.assert_array_equal(keep["audio"], [[0, 1, 1], [1, 0, 0]])
    # vision reseeds: u = [.096 .925 .344 .310] / [.002 .236 .238 .736]; row 0 has 2 frames.
    np.testing.assert_array_equal(keep["vision"], [[0, 1, 0, 0], [0, 0, 0, 1]])
    # At 0.8 only position 1 of row 0 (u .925) survives the draw; row 1's last position (u .784)
    # is kept only because it is the forced last token of a row without padding.
    keep = eval_keep_masks(batch, 0.8)
    np.testing.assert_array_equal(keep["text"], [[1, 1, 1, 0, 0], [1, 0, 0, 0, 1]])
    np.testing.assert_array_equal(keep["audio"], [[0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(keep["vision"], [[0, 1, 0, 0], [0, 0, 0, 0]])
    for k in keep.values():
        assert k.dtype == bool


def test_eval_masks_utterance_features(real_mosi):
    """L_f = 1 != L: text_features are drawn by reseeding, nothing forced."""
    split = real_mosi.test
    keep = eval_keep_masks(split, 0.5)
    assert keep["text_features"].shape == (split.n, 1)
    np.random.seed(1111)
    np.testing.assert_array_equal(keep["text_features"],
                                  np.random.uniform(size=(split.n, 1)) > 0.5)


# --------------------------------------------------------------------------- apply


def tiny_batch():
    return {
        "text_ids": np.array([[101, 5, 6, 102, 0], [101, 7, 8, 9, 102]], np.int32),
        "text_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32),
        "text_types": np.zeros((2, 5), np.int32),
        "text_features": np.arange(8, dtype=np.float32).reshape(2, 1, 4) + 1,
        "audio": np.arange(12, dtype=np.float32).reshape(2, 3, 2) + 1,
        "vision": -np.arange(6, dtype=np.float32).reshape(2, 3, 1) - 1,
        "audio_lengths": np.array([2, 0], np.int32),
        "vision_lengths": np.array([3, 1], np.int32),
        "labels": np.array([0.5, -1.0], np.float32),
    }


def tiny_keep():
    return {
        "text": np.array([[1, 0, 1, 1, 0], [1, 0, 0, 1, 1]], bool),
        "text_features": np.array([[True], [False]]),
        "audio": np.array([[1, 0, 0], [0, 0, 0]], bool),
        "vision": np.array([[0, 0, 1], [1, 0, 0]], bool),
    }


@pytest.mark.parametrize("use_jit", [False, True])
def test_apply_keep_masks_by_hand(use_jit):
    batch, keep = tiny_batch(), tiny_keep()
    fn = jax.jit(apply_keep_masks, static_argnames="text_mode") if use_jit else apply_keep_masks
    out = fn(batch, keep)
    np.testing.assert_array_equal(out["text_ids"], [[101, 100, 6, 102, 0],
                                                    [101, 100, 100, 9, 102]])
    assert out["text_ids"].dtype == jnp.int32
    np.testing.assert_array_equal(out["text_mask"], batch["text_mask"])
    np.testing.assert_array_equal(out["text_types"], batch["text_types"])
    np.testing.assert_array_equal(out["labels"], batch["labels"])
    np.testing.assert_array_equal(out["audio_lengths"], batch["audio_lengths"])
    np.testing.assert_array_equal(out["audio"], [[[1, 2], [0, 0], [0, 0]],
                                                 [[0, 0], [0, 0], [0, 0]]])
    np.testing.assert_array_equal(out["vision"], [[[0], [0], [-3]], [[-4], [0], [0]]])
    np.testing.assert_array_equal(out["text_features"], [[[1, 2, 3, 4]], [[0, 0, 0, 0]]])
    # text: 1 of 4 valid and 2 of 5 dropped; audio: 1 of 2 and 0 of 0; vision: 2 of 3, 0 of 1
    np.testing.assert_allclose(out["missing_rate"], [[1 / 4, 1 / 2, 2 / 3], [2 / 5, 0.0, 0.0]],
                               rtol=1e-6)
    assert out["missing_rate"].dtype == jnp.float32
    feat = fn(batch, keep, text_mode="features")
    np.testing.assert_allclose(feat["missing_rate"][:, 0], [0.0, 1.0])
    # the input batch is not modified
    assert batch["text_ids"][0, 1] == 5 and batch["audio"][0, 1, 0] == 3


def test_apply_keep_masks_errors():
    batch, keep = tiny_batch(), tiny_keep()
    with pytest.raises(ValueError, match="text_mode"):
        apply_keep_masks(batch, keep, text_mode="glove")
    del batch["text_features"]
    with pytest.raises(ValueError, match="features"):
        apply_keep_masks(batch, keep, text_mode="features")
    keep["audio"] = keep["audio"][:, :2]
    with pytest.raises(ValueError, match="audio"):
        apply_keep_masks(batch, keep)


def test_valid_masks():
    v = valid_masks(tiny_batch())
    np.testing.assert_array_equal(v["text"], tiny_batch()["text_mask"] == 1)
    np.testing.assert_array_equal(v["audio"], [[1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(v["vision"], [[1, 1, 1], [1, 0, 0]])
    assert v["text_features"].shape == (2, 1) and bool(v["text_features"].all())


def test_apply_eval_masks_on_split(mosi_small):
    keep = eval_keep_masks(mosi_small, 0.5)
    out = apply_keep_masks(mosi_small.arrays(), keep)
    valid = np_valid(mosi_small)
    dropped = valid["text"] & ~keep["text"]
    assert np.all(np.asarray(out["text_ids"])[dropped] == 100)
    np.testing.assert_array_equal(np.asarray(out["text_ids"])[~dropped],
                                  mosi_small.text_ids[~dropped])
    want = (dropped.sum(1) / valid["text"].sum(1))
    np.testing.assert_allclose(out["missing_rate"][:, 0], want, rtol=1e-6)
    assert abs(float(jnp.mean(out["missing_rate"][:, 1])) - 0.5) < 0.05


def test_features_mode_padding_is_not_missing(mosi_small):
    """Section 7: r_m = dropped valid positions / valid positions, so at rate 0 nothing is
    missing: with per-token features (L_f == L) the padding rows are not valid positions."""
    assert not np.all(mosi_small.text_mask == 1)  # the split has padded rows
    out = apply_keep_masks(mosi_small.arrays(), eval_keep_masks(mosi_small, 0.0),
                           text_mode="features")
    np.testing.assert_array_equal(np.asarray(out["missing_rate"]), 0.0)


# --------------------------------------------------------------------------- inter-modal


@pytest.mark.parametrize("present", INTER_MODAL_SUBSETS)
def test_inter_modal_masks(mosi_small, present):
    split = mosi_small
    keep = inter_modal_keep_masks(split, present)
    valid = np_valid(split)
    names = {"l": "text", "a": "audio", "v": "vision"}
    here = {names[c] for c in present}
    for m in ("audio", "vision"):
        np.testing.assert_array_equal(keep[m], valid[m] if m in here else np.zeros_like(valid[m]))
    if "text" in here:
        np.testing.assert_array_equal(keep["text"], valid["text"])
    else:
        np.testing.assert_array_equal(keep["text"], forced_text(split))
    # per-token features (L_f == L) follow the token mask, as the eval masks do
    np.testing.assert_array_equal(keep["text_features"], keep["text"])
    # same as the eval masks at rate 0 (present) / 1 (absent) per modality
    for m in ("text", "text_features", "audio", "vision"):
        ref = eval_keep_masks(split, 0.0 if m.split("_")[0] in here else 1.0)[m]
        np.testing.assert_array_equal(keep[m], ref)
    out = apply_keep_masks(split.arrays(), keep)
    rate = np.asarray(out["missing_rate"])
    for j, m in enumerate(MODALITIES):
        if m in here:
            assert np.all(rate[:, j] == 0)
        elif m != "text":
            assert np.all(rate[:, j] == 1) and not np.any(np.asarray(out[m]))
    assert inter_modal_keep_masks(split, sorted(here))["audio"].shape == keep["audio"].shape


def test_inter_modal_bad_subset(mosi_small):
    with pytest.raises(ValueError, match="present"):
        inter_modal_keep_masks(mosi_small, "lx")


# --------------------------------------------------------------------------- burst


def long_batch(n=300, t_len=1500, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.full((n,), t_len)
    lengths[: n // 4] = rng.integers(1, t_len, n // 4)  # some padded rows
    mask = (np.arange(40)[None, :] < rng.integers(3, 41, n)[:, None]).astype(np.int32)
    return {
        "text_mask": mask,
        "audio": np.zeros((n, t_len, 1), np.float32),
        "vision": np.zeros((n, t_len, 1), np.float32),
        "audio_lengths": lengths,
        "vision_lengths": lengths,
    }


def run_lengths(keep, valid):
    """Lengths of maximal dropped runs inside the valid prefix of each row."""
    runs = []
    for k_row, v_row in zip(keep, valid, strict=True):
        d = (~k_row[v_row]).astype(np.int8)
        edges = np.diff(np.concatenate([[0], d, [0]]))
        runs.extend(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    return np.asarray(runs)


@pytest.mark.parametrize("rate,mean_burst", [(0.3, 5.0), (0.5, 3.0), (0.9, 5.0)])
def test_burst_rate_and_run_length(rate, mean_burst):
    batch = long_batch()
    keep = burst_keep_masks(batch, rate, mean_burst=mean_burst, seed=3)
    valid = np.arange(1500)[None, :] < batch["audio_lengths"][:, None]
    _, _, eff = burst_transition_probs(rate, mean_burst)
    for m in ("audio", "vision"):
        assert not np.any(keep[m] & ~valid)
        dropped = (~keep[m])[valid].mean()
        assert abs(dropped - rate) < 0.02, (m, dropped)
        runs = run_lengths(keep[m], valid)
        # complete runs only are unbiased; edge effects are small at T = 1500
        assert abs(runs.mean() - eff) < 0.08 * eff, (m, runs.mean(), eff)
    if rate == 0.9:
        assert eff == pytest.approx(9.0)  # rate > 5 / 6: bursts lengthen so the rate holds
    assert not np.array_equal(keep["audio"], keep["vision"])


def test_burst_transition_probs():
    a, b, eff = burst_transition_probs(0.2, 4.0)
    assert b == pytest.approx(0.25) and a / (a + b) == pytest.approx(0.2) and eff == 4.0
    a, b, eff = burst_transition_probs(0.95, 5.0)
    assert a == 1.0 and a / (a + b) == pytest.approx(0.95) and eff == pytest.approx(19.0)
    assert burst_transition_probs(0.0, 5.0)[0] == 0.0
    assert burst_transition_probs(1.0, 5.0)[:2] == (1.0, 0.0)
    with pytest.raises(ValueError, match="mean_burst"):
        burst_transition_probs(0.5, 0.5)


def test_burst_masks_on_split(mosi_small):
    split = mosi_small
    keep = burst_keep_masks(split, 0.6, seed=5)
    again = burst_keep_masks(split, 0.6, seed=5)
    assert_masks_equal(keep, again)
    assert not np.array_equal(keep["vision"], burst_keep_masks(split, 0.6, seed=6)["vision"])
    valid = np_valid(split)
    assert np.all(keep["text"][forced_text(split)])
    for m in ("text", "audio", "vision"):
        assert keep[m].shape == valid[m].shape
        assert not np.any(keep[m] & ~valid[m])
    np.testing.assert_array_equal(keep["text_features"], keep["text"])  # L_f == L
    zero = burst_keep_masks(split, 0.0)
    for m in ("text", "audio", "vision"):
        np.testing.assert_array_equal(zero[m], valid[m])
    one = burst_keep_masks(split, 1.0)
    np.testing.assert_array_equal(one["text"], forced_text(split))
    assert not one["audio"].any()


# --------------------------------------------------------------------------- training masks


@partial(jax.jit, static_argnames="text_mode")
@partial(chex.assert_max_traces, n=2)
def jit_train(key, batch, text_mode="bert"):
    """Masks and the rates behind them, in one compiled function (compiles are slow on CPU)."""
    rates = train_missing_rates(key, batch["text_mask"].shape[0])
    return train_keep_masks(key, batch, text_mode=text_mode), rates


def test_train_rates_exactly_half_of_the_split_zero(mosi_small):
    batch = mosi_small.arrays()
    n = mosi_small.n  # odd: floor(47 / 2) = 23
    zero_sets = []
    for key in jax.random.split(jax.random.key(0), 4):
        _, rates = jit_train(key, batch)
        assert set(rates) == set(MODALITIES)
        for m, r in rates.items():
            r = np.asarray(r)
            assert r.shape == (n,)
            assert np.sum(r == 0) == n // 2, m
            assert np.all((r >= 0) & (r < 1))
            assert np.std(r[r > 0]) > 0.12  # the others are spread over (0, 1)
        zeros = [tuple(np.asarray(r) == 0) for r in rates.values()]
        assert len(set(zeros)) == 3  # independent per modality
        zero_sets.append(zeros[0])
    assert len(set(zero_sets)) == 4  # and per key
    # the public helper (its own compile) gives the same rates as inside the step
    for m, r in train_missing_rates(key, n).items():
        np.testing.assert_array_equal(r, rates[m])


def test_train_keep_masks(mosi_small):
    batch = mosi_small.arrays()
    n = mosi_small.n
    key = jax.random.key(42)
    keep, rates = jit_train(key, batch)
    keep2, _ = jit_train(key, batch)  # no retrace; same masks for the same key
    other, _ = jit_train(jax.random.key(43), batch)
    chex.assert_shape(keep["text"], (n, 50))
    chex.assert_shape(keep["audio"], (n, 375))
    chex.assert_shape(keep["vision"], (n, 500))
    chex.assert_shape(keep["text_features"], (n, 50))
    for m in keep:
        assert keep[m].dtype == jnp.bool_
        np.testing.assert_array_equal(keep[m], keep2[m])
    assert not np.array_equal(keep["audio"], other["audio"])

    valid = np_valid(mosi_small)
    forced = forced_text(mosi_small)
    for m in MODALITIES:
        k = np.asarray(keep[m])
        expected_valid = valid[m] | forced if m == "text" else valid[m]
        assert not np.any(k & ~expected_valid)
        r = np.asarray(rates[m])
        assert np.sum(r == 0) == n // 2
        # rows whose rate is 0 keep every valid position: at least floor(B/2) complete rows
        np.testing.assert_array_equal(k[r == 0], expected_valid[r == 0])
        assert np.all(k == expected_valid, axis=1).sum() >= n // 2
        # the other rows drop about their own rate
        frac = (valid[m] & ~k).sum(1) / np.maximum(valid[m].sum(1), 1)
        if m != "text":
            assert np.corrcoef(frac[r > 0], r[r > 0])[0, 1] > 0.9
    assert np.all(np.asarray(keep["text"])[forced])
    np.testing.assert_array_equal(keep["text_features"], keep["text"])  # L_f == L reuses text

    # Overall: half the rows keep everything, the others keep 1 - r, r ~ U(0, 1): 0.75.
    kept = [np.asarray(jit_train(k, batch)[0]["vision"])[valid["vision"]].mean()
            for k in jax.random.split(jax.random.key(7), 6)]
    assert abs(np.mean(kept) - 0.75) < 0.05, kept


def test_train_masks_are_per_sample_over_the_split(mosi_small):
    """Section 2: the rate halving is over the whole split and a sample's masks depend only on
    (key, its index, N): any batch holding sample i, in any order, with padding rows or not,
    gives it the masks it gets in the whole-split draw."""
    arrays = mosi_small.arrays()
    n = mosi_small.n
    key = jax.random.key(5)
    whole = {m: np.asarray(v) for m, v in train_keep_masks(key, arrays).items()}
    rates = {m: np.asarray(r) for m, r in train_missing_rates(key, n).items()}
    for m in MODALITIES:
        assert np.sum(rates[m] == 0) == n // 2  # int(N / 2) over the split, not per batch
    rows = np.array([40, 3, 17, 3, 0, 46], np.int32)  # shuffled, a repeat (as padding reuses 0)
    batch = {k: v[rows] for k, v in arrays.items()} | {"index": rows}
    part = train_keep_masks(key, batch, n_split=n)
    for m, v in part.items():
        np.testing.assert_array_equal(np.asarray(v), whole[m][rows], err_msg=m)
    # A batch of the first rows alone keeps their masks too: halving did not happen in the batch.
    first = {k: v[:8] for k, v in arrays.items()} | {"index": np.arange(8, dtype=np.int32)}
    for m, v in train_keep_masks(key, first, n_split=n).items():
        np.testing.assert_array_equal(np.asarray(v), whole[m][:8], err_msg=m)
    # The split size matters (the permutation is over N), so it must be given with an index.
    with pytest.raises(ValueError, match="n_split"):
        train_keep_masks(key, batch)
    with pytest.raises(ValueError, match="n_split"):
        train_keep_masks(key, {k: v[:8] for k, v in arrays.items()}, n_split=n)
    # Rows at rate 0 keep every valid position, the others drop about their rate.
    valid = np_valid(mosi_small)
    for m in ("audio", "vision"):
        np.testing.assert_array_equal(whole[m][rates[m] == 0], valid[m][rates[m] == 0])


def test_train_keep_masks_utterance_features(real_mosi):
    split = real_mosi.valid.take(np.arange(64))
    keep, rates = jit_train(jax.random.key(0), split.arrays(), text_mode="features")
    chex.assert_shape(keep["text_features"], (64, 1))
    r = np.asarray(rates["text"])
    assert np.all(np.asarray(keep["text_features"])[r == 0])
    assert 0.1 < 1 - np.asarray(keep["text_features"]).mean() < 0.5
    out = apply_keep_masks(split.arrays(), keep, text_mode="features")
    np.testing.assert_array_equal(np.asarray(out["missing_rate"][:, 0]),
                                  1.0 - np.asarray(keep["text_features"][:, 0], np.float32))
    with pytest.raises(ValueError, match="text_mode"):
        train_keep_masks(jax.random.key(0), split.arrays(), text_mode="x")
    with pytest.raises(ValueError, match="text_features"):
        train_keep_masks(jax.random.key(0), real_mosi.valid.take([0]).arrays() | {
            "text_features": None}, text_mode="features")
