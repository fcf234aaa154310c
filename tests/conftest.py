"""Test configuration: fake CPU devices for the parallel tests and strict rank promotion."""

import os
from pathlib import Path

import jax
import pytest

# Must run before the first JAX computation: the parallel tests need several devices.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_MOSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mosi_utterance" / "mosi_utterance.pkl"
SHARED_MOSI = Path(os.environ.get("EASE_JAX_SHARED_MOSI", SHARED_MOSI))


@pytest.fixture(scope="session")
def shared_mosi_path():
    """Path of the real utterance-level MOSI pickle in ../shared; skips the test when it is absent."""
    if not SHARED_MOSI.is_file():
        pytest.skip(f"real MOSI data not found at {SHARED_MOSI}")
    return SHARED_MOSI


@pytest.fixture(scope="session")
def tiny_pickle(tmp_path_factory):
    """A tiny synthetic MOSI pickle (`helpers.tiny_raw`) on disk, shared by the command tests."""
    import pickle

    from helpers import tiny_raw

    path = tmp_path_factory.mktemp("data") / "tiny_mosi.pkl"
    with open(path, "wb") as f:
        pickle.dump(tiny_raw(), f)
    return path
