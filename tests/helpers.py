"""Helpers shared by the test modules: the tiny model configuration and generic random parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np

# A tiny EASE / LNLN: every code path of the paper models, compiled in seconds on a CPU.
TINY_MODEL = {
    "dim": 16,
    "heads": 2,
    "dim_head": 8,
    "mlp_dim": 16,
    "tokens": 2,
    "encoder_depth": 1,
    "fusion_depth": 1,
    "cross_depth": 1,
    "hyper_layers": 1,
    "hyper_dim_head": 4,
}
# Small input shapes (features text mode) with every width distinct, so a swapped axis fails.
TINY_INPUTS = {"text_encoder": "features", "text_len": 4, "text_dim": 6, "audio_len": 5,
               "audio_dim": 5, "vision_len": 6, "vision_dim": 7}


def random_params(shapes, seed: int, *, scale_sd: float = 0.3, sd: float = 0.3):
    """Random float32 parameters with the structure of `shapes` (e.g. from `jax.eval_shape`, so
    nothing is compiled): kernels ~ N(0, 1/fan_in) (activations stay O(1)), LayerNorm scales
    1 + N(0, scale_sd^2), everything else (biases, tokens, positional tables) N(0, sd^2). Zero
    biases, unit scales and zero tokens would hide a reference that ignores them."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            # fan_in = the kernel's input axis (-2; stacked kernels carry leading axes)
            value = rng.standard_normal(s.shape) / math.sqrt(s.shape[-2])
        elif name == "scale":
            value = 1.0 + scale_sd * rng.standard_normal(s.shape)
        else:
            value = sd * rng.standard_normal(s.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_model_params(cfg, seed: int):
    """`random_params` with the parameter shapes of the EASE / LNLN model `cfg` (LayerNorm scales
    1 + N(0, 0.01))."""
    from ease_jax.models import init_params

    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return random_params(shapes, seed, scale_sd=0.1)


def tiny_data_and_model(model: str = "ease", n_train: int = 24):
    """Synthetic MOSI-like data (n_train / 8 / 8 rows, 3 text tokens, 3 audio and 3 vision
    frames) and the TINY `model` in features mode at its shapes: (data, ModelConfig)."""
    from ease_jax.config import model_config
    from ease_jax.data.mmsa import from_raw
    from ease_jax.data.synthetic import synthetic

    raw = synthetic("mosi", seed=0, n_train=n_train, n_valid=8, n_test=8, text_len=3,
                    audio_len=3, vision_len=3)
    data = from_raw(raw, source="synthetic:tiny")
    d = data.dims
    mcfg = model_config(model, "mosi", text_encoder="features", text_len=d["L_f"],
                        text_dim=d["D_t"], audio_len=d["T_a"], audio_dim=d["D_a"],
                        vision_len=d["T_v"], vision_dim=d["D_v"], **TINY_MODEL)
    return data, mcfg
