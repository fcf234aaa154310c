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


def tiny_raw(seed: int = 0):
    """The raw MMSA dict of the tiny synthetic MOSI the command tests write as a pickle (16 / 8 / 8
    rows, 3 text tokens, 3 audio and 3 vision frames)."""
    from ease_jax.data.synthetic import synthetic

    return synthetic("mosi", seed=seed, n_train=16, n_valid=8, n_test=8, text_len=3, audio_len=3,
                     vision_len=3)


def pad_batch(batch: dict, size: int) -> dict:
    """Host arrays [b, ...] padded to [size, ...] with zero rows, plus `weight` (1 real, 0 pad):
    the batch the train step expects (the oracle of `train.gather_rows`)."""
    b = next(iter(batch.values())).shape[0]
    if b > size:
        raise ValueError(f"batch of {b} rows exceeds the padded size {size}")
    out = {k: np.concatenate([v, np.zeros((size - b, *v.shape[1:]), v.dtype)]) if b < size else v
           for k, v in batch.items()}
    out["weight"] = (np.arange(size) < b).astype(np.float32)
    return out


class StepRunner:
    """Test harness: the per-device train step on `devices` under `jax.pmap` or `jax.shard_map`
    on a 1-D ("data",) mesh, fed host batches (the library runs the step inside the population's
    epoch program; this runs single steps, to test the step itself in both modes).

    `put_state` (host state -> devices), `put_batch` (a padded host batch -> devices),
    `get_state` (one host copy), `metrics` (one copy), `__call__(state, batch, rng)`.
    """

    def __init__(self, step_fn, mode: str = "pmap", devices=None):
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        if mode not in ("pmap", "shard_map"):
            raise ValueError(f"parallel mode must be 'pmap' or 'shard_map', got {mode!r}")
        self.mode = mode
        self.devices = list(devices or jax.local_devices())
        self.n = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._sharded = NamedSharding(self.mesh, P("data"))
        self._replicated = NamedSharding(self.mesh, P())
        if mode == "pmap":
            self._fn = jax.pmap(step_fn, axis_name="data", in_axes=(0, 0, None),
                                devices=self.devices, donate_argnums=(0,))
        else:
            mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P("data"), P()),
                                   out_specs=(P(), P()), check_vma=False)
            self._fn = jax.jit(mapped, donate_argnums=(0,))

    def __call__(self, state, batch, rng):
        return self._fn(state, batch, rng)

    def put_state(self, state):
        host = jax.device_get(state)
        if self.mode == "pmap":  # committed as pmap's outputs are: one compile, not two
            return jax.tree_util.tree_map(
                lambda x: jax.device_put(np.broadcast_to(x, (self.n, *np.shape(x))),
                                         self._sharded), host)
        return jax.device_put(host, self._replicated)

    def get_state(self, state):
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), jax.device_get(state))
        return state

    def put_batch(self, batch: dict) -> dict:
        if self.mode == "pmap":
            return {k: v.reshape(self.n, v.shape[0] // self.n, *v.shape[1:])
                    for k, v in batch.items()}
        return jax.device_put(batch, self._sharded)

    def metrics(self, metrics):
        return jax.tree_util.tree_map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics


class HostEvaluator:
    """Test harness: predictions and metrics of one model config on one split under named
    conditions, through the library's host batcher (`diagnostics.Forward` over
    `train.forward`) one checkpoint at a time: the reference the batched protocol of
    `fit.protocol_results` is checked against."""

    def __init__(self, model_cfg, split, dataset: str, *, batch_size: int = 256, masks=None):
        from ease_jax.diagnostics import Forward
        from ease_jax.evaluate import MaskBank

        self.split, self.dataset = split, dataset
        self.masks = masks or MaskBank(split)
        self.forward = Forward(model_cfg, split.n, batch_size=batch_size)
        self.batch_size = self.forward.batch_size

    def predict(self, params, keep: dict) -> np.ndarray:
        return self.forward(params, self.split, keep)["pred"]

    def metrics(self, params, kind: str = "rate", value=0.0) -> dict:
        from ease_jax.metrics import regression_metrics

        preds = self.predict(params, self.masks.get(kind, value))
        return regression_metrics(preds, self.split.labels, self.dataset)

    def protocol(self, params, *, burst_rates=()) -> dict:
        from ease_jax.data.missing import INTER_MODAL_SUBSETS
        from ease_jax.evaluate import RATES, condition_name

        return {
            "per_rate": {condition_name("rate", r): self.metrics(params, "rate", r)
                         for r in RATES},
            "inter_modal": {s: self.metrics(params, "subset", s) for s in INTER_MODAL_SUBSETS},
            "burst": {condition_name("rate", r): self.metrics(params, "burst", r)
                      for r in burst_rates},
        }


def fake_sweep_results(dataset: str, model: str, seeds, seed: int = 0, epochs: int = 4) -> dict:
    """A sweep's results dict built by hand (no training): per seed random "honest" and "paper"
    tables (every rate and kept subset), a short "history" and "selected_epochs"; "protocols" and
    "selection_inflation" computed from them as `experiments.sweep.run_model` does
    (`evaluate.summarize_seeds`)."""
    from ease_jax import evaluate as E
    from ease_jax.metrics import METRIC_KEYS

    keys = METRIC_KEYS[dataset]
    rng = np.random.default_rng(seed)

    def rows(conds):
        return {c: {m: float(rng.uniform(0.3, 0.9)) for m in keys} for c in conds}

    def table():
        return {"per_rate": rows(f"{r:.1f}" for r in E.RATES),
                "inter_modal": rows(("l", "a", "v", "la", "lv", "av"))}

    seeds_out = {}
    for s in seeds:
        history = [{"epoch": e + 1, "train": {"total": float(2.0 / (e + 1)), "lr": 1e-3},
                    "valid": {"MAE": float(rng.uniform(0.8, 1.2))},
                    "test": {"MAE": float(rng.uniform(0.8, 1.2))}} for e in range(epochs)]
        seeds_out[str(s)] = {"honest": table(), "paper": table(), "history": history,
                             "selected_epochs": {"honest": 2, "paper:MAE": epochs}}
    return {"dataset": dataset, "model": model, "data": {"source": "fake.pkl"},
            "config": {"dataset": dataset, "train": {"seeds": [int(s) for s in seeds]}},
            **E.summarize_seeds(seeds_out),
            "baselines": {"constant": {m: 0.5 for m in keys} | {"value": 0.0}},
            "seeds": seeds_out}
