"""Tests for ease_jax.data.mmsa: safe loading and validation of MMSA pickles."""

import hashlib
import os
import pickle
import pickletools
import time
import warnings

import numpy as np
import pytest

from ease_jax.data.mmsa import (
    SPLITS,
    MMSAData,
    MMSAFormatError,
    Split,
    UnsafePickleError,
    from_raw,
    load_mmsa,
)
from ease_jax.data.synthetic import synthetic

SHARED_SHA256 = "c2857d77973087bd11af9569383e1ddfbd7fd6b814557b77d484d03b53d23dbc"
CANONICAL = ("text_ids", "text_mask", "text_types", "text_features", "audio", "vision",
             "audio_lengths", "vision_lengths", "labels")


def tiny_raw(seed=0, **kw):
    sizes = {"n_train": 6, "n_valid": 4, "n_test": 5, "text_len": 8, "audio_len": 6,
             "vision_len": 5}
    sizes.update(kw)
    return synthetic("mosi", seed=seed, **sizes)


def write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def check_split_types(s: Split):
    n = s.n
    assert s.text_ids.dtype == np.int32 and s.text_ids.shape[0] == n
    assert s.text_mask.dtype == np.int32 and s.text_types.dtype == np.int32
    assert s.audio.dtype == np.float32 and s.vision.dtype == np.float32
    assert s.audio_lengths.dtype == np.int32 and s.vision_lengths.dtype == np.int32
    assert s.labels.dtype == np.float32 and s.labels.shape == (n,)
    assert s.ids.shape == (n,) and s.ids.dtype.kind == "U"
    assert np.all(np.isfinite(s.audio)) and np.all(np.isfinite(s.vision))


# --------------------------------------------------------------------------- real data


def test_load_shared_real_mosi(shared_mosi_path):
    t0 = time.perf_counter()
    data = load_mmsa(shared_mosi_path)
    elapsed = time.perf_counter() - t0
    print(f"\nload_mmsa(real mosi_utterance.pkl): {elapsed:.3f} s")
    assert isinstance(data, MMSAData)
    assert data.sha256 == SHARED_SHA256
    assert data.source == str(shared_mosi_path)
    assert (data.train.n, data.valid.n, data.test.n) == (1209, 238, 752)
    assert data.dims == {"L": 50, "L_f": 1, "D_t": 100, "T_a": 1, "D_a": 73, "T_v": 1,
                         "D_v": 100}
    for name in SPLITS:
        s = data.split(name)
        assert s.name == name
        check_split_types(s)
        assert s.text_features.dtype == np.float32
        assert np.all(s.text_ids[:, 0] == 101)
        last = s.text_mask.sum(1) - 1
        assert np.all(s.text_ids[np.arange(s.n), last] == 102)
        assert np.all(np.abs(s.labels) <= 3)
        assert s.nonfinite_replaced == 0
        assert tuple(s.arrays()) == CANONICAL
    assert data.train.ids[0] == "1DmNV9C1hbY_1"


# --------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_roundtrip_synthetic_file(tmp_path, protocol):
    raw = tiny_raw()
    path = write_pickle(tmp_path / "unaligned_50.pkl", raw, protocol)
    data = load_mmsa(path)
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    mem = from_raw(raw, source="synthetic:mosi(seed=0)")
    assert mem.sha256 is None and mem.source == "synthetic:mosi(seed=0)"
    assert data.dims == mem.dims == {"L": 8, "L_f": 8, "D_t": 768, "T_a": 6, "D_a": 5,
                                     "T_v": 5, "D_v": 20}
    for name in SPLITS:
        a, b = data.split(name), mem.split(name)
        check_split_types(a)
        for k, v in a.arrays().items():
            np.testing.assert_array_equal(v, b.arrays()[k])
        np.testing.assert_array_equal(a.ids, raw[name]["id"])
        np.testing.assert_array_equal(a.text_ids, raw[name]["text_bert"][:, 0])
        np.testing.assert_array_equal(a.text_mask, raw[name]["text_bert"][:, 1])
        np.testing.assert_array_equal(a.audio_lengths, raw[name]["audio_lengths"])
        np.testing.assert_array_equal(a.labels, raw[name]["regression_labels"])
        np.testing.assert_array_equal(a.text_features, raw[name]["text"])


def test_take_and_split_lookup():
    data = from_raw(tiny_raw(), source="mem")
    s = data.train.take([4, 1])
    assert s.n == 2 and len(s) == 2
    np.testing.assert_array_equal(s.audio, data.train.audio[[4, 1]])
    np.testing.assert_array_equal(s.ids, data.train.ids[[4, 1]])
    assert data.train.take(slice(0, 3)).n == 3
    assert data.train.take(np.arange(6) % 2 == 0).n == 3
    with pytest.raises(ValueError, match="name"):
        data.split("dev")


def test_optional_keys_absent():
    raw = tiny_raw()
    for name in SPLITS:
        for k in ("audio_lengths", "vision_lengths", "id", "text"):
            del raw[name][k]
    data = from_raw(raw, source="mem")
    assert data.train.text_features is None
    assert data.dims["L_f"] is None and data.dims["D_t"] is None
    assert "text_features" not in data.train.arrays()
    assert np.all(data.train.audio_lengths == 6) and np.all(data.train.vision_lengths == 5)
    assert data.valid.ids[2] == "valid$_$2"


# --------------------------------------------------------------------------- unsafe pickles


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemCall, _EvalCall])
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_refused(tmp_path, payload, nested):
    marker = tmp_path / "pwned"
    evil = payload(marker)
    obj = tiny_raw() if nested else evil
    if nested:
        obj["valid"]["audio"] = evil
    path = write_pickle(tmp_path / "evil.pkl", obj)
    # The file really references the dangerous global.
    ops = [a for op, a, _ in pickletools.genops(path.read_bytes()) if op.name == "SHORT_BINUNICODE"]
    assert "system" in ops or "eval" in ops
    with pytest.raises(UnsafePickleError) as info:
        load_mmsa(path)
    msg = str(info.value)
    assert str(path) in msg
    assert ("system" in msg) if payload is _SystemCall else ("builtins.eval" in msg)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_persistent_id_refused(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if isinstance(obj, str) and obj == "ext" else None

    path = tmp_path / "pid.pkl"
    with open(path, "wb") as f:
        P(f).dump({"train": "ext"})
    with pytest.raises(UnsafePickleError):
        load_mmsa(path)


# --------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="unaligned_50.pkl") as info:
        load_mmsa(tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl")
    assert "MMSA" in str(info.value)


def test_truncated_file(tmp_path):
    good = write_pickle(tmp_path / "good.pkl", tiny_raw())
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 10):
        bad = tmp_path / f"cut{cut}.pkl"
        bad.write_bytes(data[:cut])
        with pytest.raises(MMSAFormatError, match="truncated or corrupted") as info:
            load_mmsa(bad)
        assert str(bad) in str(info.value)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(MMSAFormatError, match="truncated or corrupted"):
        load_mmsa(junk)


# --------------------------------------------------------------------------- validation


def _expect_error(raw, split, key, match=None):
    with pytest.raises(MMSAFormatError) as info:
        from_raw(raw, source="/data/x.pkl")
    msg = str(info.value)
    assert "/data/x.pkl" in msg
    assert f"split {split!r}" in msg, msg
    assert f"key {key!r}" in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


def test_wrong_shape_in_file_names_file_split_key(tmp_path):
    raw = tiny_raw()
    raw["test"]["audio"] = raw["test"]["audio"][:, :, 0]
    path = write_pickle(tmp_path / "bad.pkl", raw)
    with pytest.raises(MMSAFormatError) as info:
        load_mmsa(path)
    msg = str(info.value)
    assert str(path) in msg and "split 'test'" in msg and "key 'audio'" in msg and "rank 3" in msg


def test_shape_errors():
    raw = tiny_raw()
    raw["train"]["text_bert"] = raw["train"]["text_bert"][:, :2]
    _expect_error(raw, "train", "text_bert", "(N, 3, L)")

    raw = tiny_raw()
    raw["valid"]["vision"] = raw["valid"]["vision"][:3]
    _expect_error(raw, "valid", "vision", "same N")

    raw = tiny_raw()
    raw["valid"]["audio"] = raw["valid"]["audio"][:, :, :4]
    _expect_error(raw, "valid", "audio", "D_a")

    raw = tiny_raw()
    raw["test"]["text_bert"] = raw["test"]["text_bert"][:, :, :7]
    _expect_error(raw, "test", "text_bert", "L = 7")

    raw = tiny_raw()
    raw["train"]["regression_labels"] = raw["train"]["regression_labels"][:, None, None]
    _expect_error(raw, "train", "regression_labels", "rank 1")

    raw = tiny_raw()
    raw["valid"]["id"] = raw["valid"]["id"][:2]
    _expect_error(raw, "valid", "id")


def test_structure_errors():
    raw = tiny_raw()
    del raw["valid"]
    with pytest.raises(MMSAFormatError, match="'valid' missing"):
        from_raw(raw, source="mem")
    with pytest.raises(MMSAFormatError, match="top level"):
        from_raw([1, 2], source="mem")
    raw = tiny_raw()
    del raw["test"]["regression_labels"]
    _expect_error(raw, "test", "regression_labels", "required key missing")
    raw = tiny_raw()
    raw["train"]["audio"] = np.array(["a"] * 6)
    _expect_error(raw, "train", "audio", "numeric")


def test_value_errors():
    raw = tiny_raw()
    raw["train"]["audio_lengths"] = raw["train"]["audio_lengths"].copy()
    raw["train"]["audio_lengths"][2] = 7
    _expect_error(raw, "train", "audio_lengths", "[0, 6]")

    raw = tiny_raw()
    raw["valid"]["vision_lengths"] = raw["valid"]["vision_lengths"] - 10
    _expect_error(raw, "valid", "vision_lengths")

    raw = tiny_raw()
    raw["test"]["regression_labels"] = raw["test"]["regression_labels"] * 0 + 3.5
    _expect_error(raw, "test", "regression_labels", "[-3, 3]")

    raw = tiny_raw()
    raw["train"]["text_bert"] = raw["train"]["text_bert"].copy()
    raw["train"]["text_bert"][0, 0, 1] = 5.5
    _expect_error(raw, "train", "text_bert", "integers")

    raw = tiny_raw()
    raw["train"]["text_bert"] = raw["train"]["text_bert"].copy()
    raw["train"]["text_bert"][0, 0, 1] = -3
    _expect_error(raw, "train", "text_bert", "non-negative")

    raw = tiny_raw()
    raw["valid"]["text_bert"] = raw["valid"]["text_bert"].copy()
    raw["valid"]["text_bert"][1, 1, 0] = 2
    _expect_error(raw, "valid", "text_bert", "0/1")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_labels_rejected(tmp_path, bad):
    raw = tiny_raw()
    raw["valid"]["regression_labels"] = raw["valid"]["regression_labels"].copy()
    raw["valid"]["regression_labels"][1] = bad
    path = write_pickle(tmp_path / "nanlabel.pkl", raw)
    with pytest.raises(MMSAFormatError) as info:
        load_mmsa(path)
    msg = str(info.value)
    assert str(path) in msg and "split 'valid'" in msg and "key 'regression_labels'" in msg
    assert "non-finite" in msg


def test_nonfinite_audio_vision_replaced_and_counted(tmp_path):
    raw = tiny_raw()
    a = raw["train"]["audio"].copy()
    a[0, 0, 0], a[1, 2, 3], a[2, 1, 1] = np.nan, np.inf, -np.inf
    raw["train"]["audio"] = a
    v = raw["test"]["vision"].astype(np.float64)
    v[0, 0, 0] = 1e39  # finite in float64, overflows float32 (as in MOSEI)
    v[3, 1, 2] = -1e300
    v[4, 0, 5] = np.nan
    raw["test"]["vision"] = v
    path = write_pickle(tmp_path / "inf.pkl", raw)
    with pytest.warns(RuntimeWarning, match="non-finite") as rec:
        data = load_mmsa(path)
    msg = str(rec[0].message)
    assert "train: audio 3, vision 0" in msg and "test: audio 0, vision 3" in msg
    assert "2 overflowed" in msg
    assert data.train.nonfinite_replaced == 3
    assert data.valid.nonfinite_replaced == 0
    assert data.test.nonfinite_replaced == 3
    assert data.train.audio[0, 0, 0] == 0 and data.train.audio[1, 2, 3] == 0
    assert data.test.vision[0, 0, 0] == 0 and data.test.vision[3, 1, 2] == 0
    assert data.test.vision.dtype == np.float32
    np.testing.assert_array_equal(data.train.audio[3], raw["train"]["audio"][3])
    np.testing.assert_allclose(data.test.vision[1], v[1].astype(np.float32))


def test_clean_data_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = from_raw(tiny_raw(), source="mem")
    assert all(data.split(s).nonfinite_replaced == 0 for s in SPLITS)
