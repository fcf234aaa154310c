"""Safe loading and validation of MMSA-layout pickles (MOSI / MOSEI / SIMS).

An MMSA pickle is ``{"train": split, "valid": split, "test": split}`` where every split is a dict of
NumPy arrays (docs/protocol.md section 1). This module turns such a dict into typed, validated
:class:`Split` objects:

* ``text_bert`` (N, 3, L) -> ``text_ids`` / ``text_mask`` / ``text_types`` (int32),
* ``text`` (N, L_f, D_t) -> ``text_features`` (float32, optional),
* ``audio`` / ``vision`` (N, T, D) -> float32 with every non-finite value (including float64 values
  that overflow float32) replaced by 0 and counted,
* ``audio_lengths`` / ``vision_lengths`` -> int32 (full length when absent),
* ``regression_labels`` -> float32 (finite, within [-3, 3]),
* ``id`` -> str (generated as ``"<split>$_$<i>"`` when absent).

A pickle is code, so :func:`load_mmsa` never calls :func:`pickle.load`: it uses an unpickler that
only resolves the handful of globals needed to rebuild NumPy arrays and raises
:class:`UnsafePickleError` for anything else, before it can run.

Every validation error is an :class:`MMSAFormatError` whose message names the file (or in-memory
source), the split and the key.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "valid", "test")
REQUIRED_KEYS = ("text_bert", "audio", "vision", "regression_labels")
LABEL_BOUND = 3.0

__all__ = [
    "SPLITS",
    "MMSAData",
    "MMSAFormatError",
    "Split",
    "UnsafePickleError",
    "from_raw",
    "load_mmsa",
]


class MMSAFormatError(ValueError):
    """The data does not follow the MMSA layout; the message names the file, split and key."""


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle references a global outside the NumPy-array allow-list; nothing was executed."""


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


# The arrays of a split every model step reads (text ids / mask / types are needed in features mode
# too: they locate the valid text positions of the missingness masks).
MODEL_KEYS = ("text_ids", "text_mask", "text_types", "audio", "vision", "audio_lengths",
              "vision_lengths")

@dataclass(frozen=True, eq=False)
class Split:
    """One validated split. Shapes: N samples, L BERT tokens, T_a / T_v frames.

    ``nonfinite_replaced`` counts the audio and vision values that were non-finite (or overflowed
    float32) in the source and were set to 0. ``take`` keeps the count of the split it came from.
    Equality and hashing are by identity (the fields are arrays).
    """

    name: str
    text_ids: np.ndarray  # (N, L) int32
    text_mask: np.ndarray  # (N, L) int32
    text_types: np.ndarray  # (N, L) int32
    text_features: np.ndarray | None  # (N, L_f, D_t) float32
    audio: np.ndarray  # (N, T_a, D_a) float32
    vision: np.ndarray  # (N, T_v, D_v) float32
    audio_lengths: np.ndarray  # (N,) int32
    vision_lengths: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) float32
    ids: np.ndarray  # (N,) str
    nonfinite_replaced: int = 0

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.n

    def arrays(self) -> dict[str, np.ndarray]:
        """The canonical batch dict (``text_features`` only when present)."""
        out = {
            "text_ids": self.text_ids,
            "text_mask": self.text_mask,
            "text_types": self.text_types,
        }
        if self.text_features is not None:
            out["text_features"] = self.text_features
        out.update(
            audio=self.audio,
            vision=self.vision,
            audio_lengths=self.audio_lengths,
            vision_lengths=self.vision_lengths,
            labels=self.labels,
        )
        return out

    def model_arrays(self, text_encoder: str, *, labels: bool = True) -> dict[str, np.ndarray]:
        """The arrays a model step reads in `text_encoder` mode ("bert" | "features"; features
        mode adds ``text_features``), with ``labels`` unless `labels` is False (evaluation)."""
        arrays = self.arrays()
        keys = list(MODEL_KEYS) + (["text_features"] if text_encoder == "features" else [])
        return {k: arrays[k] for k in keys + (["labels"] if labels else [])}

    def take(self, index: Any) -> Split:
        """A new split holding the rows ``index`` (integer array, slice or boolean mask)."""
        if isinstance(index, slice):
            index = np.arange(self.n)[index]
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (self.n,):
                raise ValueError(f"index: boolean mask must have shape ({self.n},), got {index.shape}")
            index = np.flatnonzero(index)
        if index.ndim == 0:
            index = index[None]
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"index: expected 1-D integer indices, got {index.dtype} {index.shape}")

        def rows(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return replace(
            self,
            text_ids=rows(self.text_ids),
            text_mask=rows(self.text_mask),
            text_types=rows(self.text_types),
            text_features=rows(self.text_features),
            audio=rows(self.audio),
            vision=rows(self.vision),
            audio_lengths=rows(self.audio_lengths),
            vision_lengths=rows(self.vision_lengths),
            labels=rows(self.labels),
            ids=rows(self.ids),
        )


@dataclass(frozen=True, eq=False)
class MMSAData:
    """The three validated splits plus where they came from."""

    train: Split
    valid: Split
    test: Split
    source: str
    sha256: str | None = None

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"name: unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    @property
    def dims(self) -> dict[str, int | None]:
        """L, L_f, D_t, T_a, D_a, T_v, D_v (L_f and D_t are None without text features)."""
        s = self.train
        tf = s.text_features
        return {
            "L": int(s.text_ids.shape[1]),
            "L_f": None if tf is None else int(tf.shape[1]),
            "D_t": None if tf is None else int(tf.shape[2]),
            "T_a": int(s.audio.shape[1]),
            "D_a": int(s.audio.shape[2]),
            "T_v": int(s.vision.shape[1]),
            "D_v": int(s.vision.shape[2]),
        }


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------


def _numpy_multiarray_attr(name: str) -> Any:
    core = getattr(np, "_core", None)  # NumPy >= 2 (and a shim in 1.26)
    mod = getattr(core, "multiarray", None) if core is not None else None
    if mod is None or not hasattr(mod, name):
        mod = np.core.multiarray  # pragma: no cover - NumPy 1.x only
    return getattr(mod, name)


def _numpy_numeric_frombuffer() -> Any:
    core = getattr(np, "_core", None)
    mod = getattr(core, "numeric", None) if core is not None else None
    if mod is None or not hasattr(mod, "_frombuffer"):
        mod = np.core.numeric  # pragma: no cover - NumPy 1.x only
    return mod._frombuffer


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    import builtins
    import collections

    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _numpy_multiarray_attr("_reconstruct")
        allowed[(mod, "scalar")] = _numpy_multiarray_attr("scalar")
        # Protocol 5 rebuilds arrays with _frombuffer(bytes, dtype, shape, order): no code runs.
        allowed[(mod.replace("multiarray", "numeric"), "_frombuffer")] = _numpy_numeric_frombuffer()
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"): a pure function.
    allowed[("_codecs", "encode")] = _codecs.encode
    for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str",
                 "int", "float", "complex", "bool", "slice"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, source: str) -> None:
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to unpickle global {module}.{name}; an MMSA data file "
                "only needs NumPy arrays, so this file is not a data file (or was tampered with). "
                "Nothing from it was executed."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused persistent id {pid!r}")


class _HashingReader(io.RawIOBase):
    """File wrapper that feeds every byte the unpickler reads into a sha256 (one pass)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        b = self._f.read(size)
        self.hash.update(b)
        return b

    def readinto(self, buf: Any) -> int:
        n = self._f.readinto(buf)
        if n:
            self.hash.update(memoryview(buf)[:n])
        return n

    def readline(self, size: int = -1) -> bytes:
        b = self._f.readline(size)
        self.hash.update(b)
        return b

    def finish(self) -> str:
        for chunk in iter(lambda: self._f.read(1 << 20), b""):
            self.hash.update(chunk)
        return self.hash.hexdigest()


def load_mmsa(path: str | os.PathLike[str]) -> MMSAData:
    """Load and validate an MMSA pickle without executing code from it.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message says what file is expected).
      UnsafePickleError: the pickle references anything but NumPy-array reconstruction.
      MMSAFormatError: truncated / corrupted file or any layout violation (names split and key).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"MMSA data file not found: {str(p)!r}. Expected an MMSA-layout pickle "
            "{'train','valid','test'} of arrays, e.g. MOSI/Processed/unaligned_50.pkl, "
            "MOSEI/Processed/unaligned_50.pkl or SIMS/Processed/unaligned_39.pkl from the MMSA "
            "release; see data/README.md for where to put it."
        )
    source = str(p)
    with open(p, "rb") as f:
        reader = _HashingReader(f)
        try:
            raw = _RestrictedUnpickler(io.BufferedReader(reader, 1 << 16), source=source).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, OverflowError, MemoryError) as e:
            raise MMSAFormatError(
                f"{source}: the pickle is truncated or corrupted ({type(e).__name__}: {e}); "
                "download it again and compare its sha256 with the published one."
            ) from e
        digest = reader.finish()
    return from_raw(raw, source=source, sha256=digest)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _err(source: str, split: str, key: str, msg: str) -> MMSAFormatError:
    return MMSAFormatError(f"{source}: split {split!r}, key {key!r}: {msg}")


def _numeric(a: Any, source: str, split: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as e:  # ragged object sequences and the like
        raise _err(source, split, key, f"not convertible to an array ({e})") from e
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise _err(source, split, key, f"expected numbers, got dtype object ({e})") from e
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise _err(source, split, key, f"expected a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise _err(source, split, key, f"expected real numbers, got dtype {arr.dtype}")
    return arr


def _rank(arr: np.ndarray, rank: int, what: str, source: str, split: str, key: str) -> None:
    if arr.ndim != rank:
        raise _err(source, split, key, f"expected rank {rank} {what}, got shape {arr.shape}")


def _integral(arr: np.ndarray, source: str, split: str, key: str, what: str) -> np.ndarray:
    """Check that ``arr`` holds finite integers fitting int32; returns int32."""
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise _err(source, split, key, f"{what} contains non-finite values")
        if not np.all(arr == np.floor(arr)):
            bad = arr[arr != np.floor(arr)].ravel()[0]
            raise _err(source, split, key, f"{what} must be integers, found {bad!r}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise _err(source, split, key, f"{what} out of int32 range")
    return arr.astype(np.int32)


def _to_float32(arr: np.ndarray) -> tuple[np.ndarray, int, int]:
    """float32 copy with non-finite values set to 0; returns (array, n_nonfinite, n_overflow).

    Values finite in the (wider) source that overflow float32 count as overflow (MOSEI audio has
    such values); they are non-finite after the cast and are zeroed too. Works in row chunks to
    bound temporary memory on large files.
    """
    out = np.empty(arr.shape, np.float32)
    n_bad = 0
    n_overflow = 0
    rows = max(1, (1 << 22) // max(1, int(np.prod(arr.shape[1:]))))
    wide = np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize > 4
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, arr.shape[0], rows):
            src = arr[s : s + rows]
            chunk = src.astype(np.float32)
            bad = ~np.isfinite(chunk)
            nb = int(bad.sum())
            if nb:
                if wide:
                    n_overflow += int(np.isfinite(src[bad]).sum())
                chunk[bad] = 0.0
                n_bad += nb
            out[s : s + rows] = chunk
    return out, n_bad, n_overflow


def _split_from_raw(raw: Any, name: str, source: str) -> tuple[Split, dict[str, int]]:
    if not isinstance(raw, Mapping):
        raise _err(source, name, "*", f"expected a dict of arrays, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise _err(source, name, missing[0],
                   f"required key missing (split has keys {sorted(map(str, raw))})")

    # --- text_bert (N, 3, L): ids, attention mask, token types
    tb = _numeric(raw["text_bert"], source, name, "text_bert")
    _rank(tb, 3, "(N, 3, L)", source, name, "text_bert")
    if tb.shape[1] != 3:
        raise _err(source, name, "text_bert",
                   f"expected shape (N, 3, L) [ids, mask, types], got {tb.shape}")
    n = tb.shape[0]
    tb = _integral(tb, source, name, "text_bert", "token ids / mask / types")
    ids, mask, types = tb[:, 0], tb[:, 1], tb[:, 2]
    if ids.size and ids.min() < 0:
        raise _err(source, name, "text_bert", "token ids (row 0) must be non-negative")
    if mask.size and not np.all((mask == 0) | (mask == 1)):
        raise _err(source, name, "text_bert", "attention mask (row 1) must be 0/1")
    if types.size and types.min() < 0:
        raise _err(source, name, "text_bert", "token types (row 2) must be non-negative")
    ids, mask, types = (np.ascontiguousarray(x) for x in (ids, mask, types))

    counts = {"audio": 0, "vision": 0, "text": 0, "overflow": 0}

    def check_n(arr: np.ndarray, key: str) -> None:
        if arr.shape[0] != n:
            raise _err(source, name, key,
                       f"has {arr.shape[0]} rows but text_bert has {n} (same N for every key)")

    # --- text features (optional)
    text_features = None
    if raw.get("text") is not None:
        tf = _numeric(raw["text"], source, name, "text")
        _rank(tf, 3, "(N, L_f, D_t)", source, name, "text")
        check_n(tf, "text")
        text_features, counts["text"], ov = _to_float32(tf)
        counts["overflow"] += ov

    # --- audio / vision and their lengths
    feats: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    for m in ("audio", "vision"):
        a = _numeric(raw[m], source, name, m)
        _rank(a, 3, "(N, T, D)", source, name, m)
        check_n(a, m)
        feats[m], counts[m], ov = _to_float32(a)
        counts["overflow"] += ov
        t = a.shape[1]
        lk = f"{m}_lengths"
        if raw.get(lk) is None:
            lengths[m] = np.full((n,), t, np.int32)
        else:
            ln = _numeric(raw[lk], source, name, lk)
            if ln.ndim == 2 and ln.shape[1] == 1:
                ln = ln[:, 0]
            _rank(ln, 1, "(N,)", source, name, lk)
            check_n(ln, lk)
            ln = _integral(ln, source, name, lk, "lengths")
            if ln.size and (ln.min() < 0 or ln.max() > t):
                raise _err(source, name, lk,
                           f"lengths must lie in [0, {t}] (T of {m!r}), got range "
                           f"[{ln.min()}, {ln.max()}]")
            lengths[m] = ln

    # --- labels
    y = _numeric(raw["regression_labels"], source, name, "regression_labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    _rank(y, 1, "(N,)", source, name, "regression_labels")
    check_n(y, "regression_labels")
    y = y.astype(np.float32)
    if not np.all(np.isfinite(y)):
        bad = int(np.sum(~np.isfinite(y)))
        raise _err(source, name, "regression_labels", f"{bad} non-finite label(s) (NaN/inf)")
    if y.size and np.abs(y).max() > LABEL_BOUND:
        raise _err(source, name, "regression_labels",
                   f"labels must lie in [-3, 3], got range [{y.min()}, {y.max()}]")

    # --- ids
    if raw.get("id") is None:
        sample_ids = np.array([f"{name}$_${i}" for i in range(n)])
    else:
        sample_ids = np.asarray(raw["id"])
        if sample_ids.ndim == 2 and sample_ids.shape[1] == 1:
            sample_ids = sample_ids[:, 0]
        _rank(sample_ids, 1, "(N,)", source, name, "id")
        check_n(sample_ids, "id")
        sample_ids = sample_ids.astype(str)

    split = Split(
        name=name,
        text_ids=ids,
        text_mask=mask,
        text_types=types,
        text_features=text_features,
        audio=feats["audio"],
        vision=feats["vision"],
        audio_lengths=lengths["audio"],
        vision_lengths=lengths["vision"],
        labels=y,
        ids=sample_ids,
        nonfinite_replaced=counts["audio"] + counts["vision"],
    )
    return split, counts


def _shape_signature(s: Split) -> dict[str, tuple[str, int | None]]:
    tf = s.text_features
    return {
        "L": ("text_bert", s.text_ids.shape[1]),
        "L_f": ("text", None if tf is None else tf.shape[1]),
        "D_t": ("text", None if tf is None else tf.shape[2]),
        "T_a": ("audio", s.audio.shape[1]),
        "D_a": ("audio", s.audio.shape[2]),
        "T_v": ("vision", s.vision.shape[1]),
        "D_v": ("vision", s.vision.shape[2]),
    }


def from_raw(raw: Any, *, source: str, sha256: str | None = None) -> MMSAData:
    """Validate an MMSA-layout dict (from a file or :mod:`ease_jax.data.synthetic`).

    Non-finite audio / vision / text-feature values are replaced by 0; the audio + vision count is
    stored per split in ``Split.nonfinite_replaced`` and all counts are reported with
    ``warnings.warn``.
    """
    if not isinstance(raw, Mapping):
        raise MMSAFormatError(
            f"{source}: top level must be a dict with keys {SPLITS}, got {type(raw).__name__}")
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise MMSAFormatError(
            f"{source}: split {missing[0]!r} missing at top level (found keys "
            f"{sorted(map(str, raw))}; expected {SPLITS})")

    splits: dict[str, Split] = {}
    report = []
    for name in SPLITS:
        split, counts = _split_from_raw(raw[name], name, source)
        splits[name] = split
        if counts["audio"] or counts["vision"] or counts["text"]:
            report.append(
                f"{name}: audio {counts['audio']}, vision {counts['vision']}, text "
                f"{counts['text']} (of which {counts['overflow']} overflowed float32)")

    ref = _shape_signature(splits["train"])
    for name in SPLITS[1:]:
        sig = _shape_signature(splits[name])
        for dim, (key, value) in sig.items():
            if value != ref[dim][1]:
                raise _err(source, name, key,
                           f"{dim} = {value} differs from split 'train' ({ref[dim][1]}); "
                           "every split must share L / T / D")

    if report:
        warnings.warn(
            f"{source}: replaced non-finite values by 0 -- " + "; ".join(report),
            RuntimeWarning,
            stacklevel=2,
        )
    return MMSAData(train=splits["train"], valid=splits["valid"], test=splits["test"],
                    source=source, sha256=sha256)
