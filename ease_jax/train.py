"""Training: TrainState, the ONE per-device train step, and its pmap / shard_map wrappers.

The per-device step `(state, batch, rng) -> (state, metrics)` (section 9 of PROTOCOL.md):
  1. draws the training keep masks on device from `rng` (per-sample rate U(0, 1), half the samples
     at rate 0, per modality), applies them, and measures each sample's missing fraction;
  2. runs the model on the incomplete inputs with the clean inputs beside them;
  3. computes the objective (global-batch normalised, see `ease_jax.objectives`);
  4. averages gradients with `lax.pmean(..., "data")` and applies AdamW with the per-epoch
     warm-up + cosine schedule of the released code (`epoch_lr`; epoch 1 at lr 0).
Batches are padded to the global batch size with zero-weight rows, so the step compiles once and
a batch that does not divide by the device count costs nothing but the padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ease_jax.anchors import init_anchors
from ease_jax.config import LossConfig, ModelConfig, TrainConfig
from ease_jax.data.missing import apply_keep_masks, train_keep_masks
from ease_jax.models import build_model, init_params
from ease_jax.objectives import model_loss

AXIS = "data"


class TrainState(flax.struct.PyTreeNode):
    """step: [] int32 (optimizer steps taken); params; opt_state; anchors (EASE) or None;
    rng: the run's base key for per-step randomness (each step uses fold_in(rng, step));
    mask_rng: the base key of the training masks (epoch e uses fold_in(mask_rng, e)). Both are raw
    uint32 key data."""

    step: jax.Array
    params: Any
    opt_state: Any
    anchors: Any
    rng: jax.Array
    mask_rng: jax.Array


def epoch_lr(epoch: jax.Array, base_lr: float, warmup: int, total: int) -> jax.Array:
    """Learning rate of 0-based `epoch` e, exactly as the released code steps
    `GradualWarmupScheduler(multiplier=1, total_epoch=W)` + `CosineAnnealingLR(T_max=total - W)`
    (PROTOCOL.md section 9): `base * e / W` for e <= W, then
    `base * 0.5 * (1 + cos(pi * (e - W - 1) / (total - W)))`. So epoch 0 runs at lr 0, the
    1-based epochs W + 1 and W + 2 both run at the base lr, and with W = 20, total = 200 the last
    epoch runs at 3.05e-4 * base. `warmup = 0` starts the cosine at e = 0 (no warm-up)."""
    epoch = jnp.asarray(epoch, jnp.float32)
    if warmup <= 0:
        return 0.5 * base_lr * (1.0 + jnp.cos(jnp.pi * epoch / max(total, 1)))
    warm = base_lr * epoch / warmup
    progress = jnp.clip((epoch - warmup - 1) / max(total - warmup, 1), 0.0, 1.0)  # 1 past the end
    cosine = 0.5 * base_lr * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(epoch <= warmup, warm, cosine)


def make_optimizer(train_cfg: TrainConfig, model: str, steps_per_epoch: int):
    """AdamW over all parameters (BERT included), lr stepped once per epoch, no clipping."""
    base = train_cfg.learning_rate(model)

    def schedule(count):
        return epoch_lr(count // steps_per_epoch, base, train_cfg.warmup_epochs, train_cfg.epochs)

    return optax.adamw(schedule, weight_decay=train_cfg.weight_decay)


def create_state(model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int, steps_per_epoch: int,
                 params: Any = None) -> TrainState:
    """A fresh TrainState for `seed` (params initialised from it unless given, e.g. with
    pretrained BERT weights already inserted)."""
    k_init, k_run, k_masks = jax.random.split(jax.random.key(seed), 3)
    if params is None:
        params = init_params(model_cfg, k_init)
    tx = make_optimizer(train_cfg, model_cfg.model, steps_per_epoch)
    anchors = init_anchors(3, model_cfg.dim) if model_cfg.model == "ease" else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      anchors=anchors, rng=jax.random.key_data(k_run),
                      mask_rng=jax.random.key_data(k_masks))


def make_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig,
                    steps_per_epoch: int, n_train: int, axis_name: str | None = AXIS) -> Callable:
    """The per-device step `(state, batch, rng) -> (state, metrics)`.

    `batch`: the data layer's canonical arrays for this device's rows plus `weight` [B] and
    `index` [B] (each row's position in the training split of `n_train` samples; padding rows
    any index, weight 0); `rng`: a key (raw uint32 key data) for this step, identical on every
    device. The training masks come from `fold_in(state.mask_rng, epoch)` and the rows' indices
    (rates halved over the whole split, section 2), imputation noise and subset views from the
    step key and the indices: all per sample, so the step does not depend on how the global batch
    is split over devices. Only BERT dropout (its own stream, folded with the device index) is
    drawn per device. `metrics`: every loss term, the learning rate, and `nonfinite` (1.0 when
    the total is not finite), all averaged over devices.
    """
    model = build_model(model_cfg)
    loss_fn = model_loss(model_cfg.model)
    tx = make_optimizer(train_cfg, model_cfg.model, steps_per_epoch)
    text_mode = model_cfg.text_encoder

    def step(state: TrainState, batch: dict, rng: jax.Array):
        if "index" not in batch:
            raise KeyError("train step: batch needs 'index' (rows' positions in the training "
                           "split; see `epoch_batches`)")
        key = jax.random.wrap_key_data(rng)
        k_noise, k_views, k_dropout = jax.random.split(key, 3)
        if axis_name is not None:
            k_dropout = jax.random.fold_in(k_dropout, jax.lax.axis_index(axis_name))
        inputs, _ = train_inputs(state, batch, n_train=n_train, steps_per_epoch=steps_per_epoch,
                                 text_mode=text_mode)
        target = dict(batch, missing_rate=inputs["missing_rate"])

        def objective(params):
            outputs = model.apply({"params": params}, inputs, batch, train=True,
                                  rngs={"noise": k_noise, "views": k_views, "dropout": k_dropout})
            total, terms, anchors = loss_fn(outputs, target, state.anchors, loss_cfg,
                                            axis_name=axis_name)
            return total, (terms, anchors)

        grads, (terms, anchors) = jax.grad(objective, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            terms = jax.lax.pmean(terms, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms, nonfinite=1.0 - jnp.isfinite(terms["total"]).astype(jnp.float32),
                       lr=tx_lr(state.step, train_cfg, model_cfg.model, steps_per_epoch))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  anchors=anchors)
        return new_state, metrics

    return step


def epoch_mask_key(mask_rng: jax.Array, epoch) -> jax.Array:
    """The key of epoch `epoch`'s training masks: `fold_in(mask_rng, epoch)` (shared by every
    batch and device of the epoch, so the split-level rate halving holds)."""
    return jax.random.fold_in(jax.random.wrap_key_data(mask_rng), epoch)


def train_inputs(state: TrainState, batch: dict, *, n_train: int, steps_per_epoch: int,
                 text_mode: str) -> tuple[dict, dict]:
    """The incomplete inputs the train step feeds the model, and the keep masks behind them:
    masks of the batch's rows (`batch["index"]`) from the current epoch's key, applied; the
    inputs' `missing_rate` [B, 3] is the OBSERVED missing fraction (what EASE's gate and LNLN's
    completeness target read; section 7), not the drawn rate."""
    epoch = state.step // steps_per_epoch
    keep = train_keep_masks(epoch_mask_key(state.mask_rng, epoch), batch, n_split=n_train,
                            text_mode=text_mode)
    return apply_keep_masks(batch, keep, text_mode=text_mode), keep


def tx_lr(step, train_cfg: TrainConfig, model: str, steps_per_epoch: int) -> jax.Array:
    return epoch_lr(step // steps_per_epoch, train_cfg.learning_rate(model),
                    train_cfg.warmup_epochs, train_cfg.epochs)


class ParallelStep:
    """Runs the per-device step on all local devices with `jax.pmap` (default) or `jax.shard_map`.

    Both take the state as the host sees it (unreplicated) via `put_state`, a host batch padded to
    the global batch size via `put_batch`, and a per-step key; `get_state` returns a single copy.
    """

    def __init__(self, step_fn: Callable, mode: str = "pmap", devices=None):
        if mode not in ("pmap", "shard_map"):
            raise ValueError(f"parallel mode must be 'pmap' or 'shard_map', got {mode!r}")
        self.mode = mode
        self.devices = list(devices or jax.local_devices())
        self.n = len(self.devices)
        if mode == "pmap":
            self._fn = jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None),
                                devices=self.devices, donate_argnums=(0,))
        else:
            self.mesh = Mesh(np.array(self.devices), (AXIS,))
            mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                                   out_specs=(P(), P()), check_vma=False)
            self._fn = jax.jit(mapped, donate_argnums=(0,))
            self._replicated = NamedSharding(self.mesh, P())
            self._sharded = NamedSharding(self.mesh, P(AXIS))

    def __call__(self, state, batch, rng):
        return self._fn(state, batch, rng)

    def lower(self, state, batch, rng):
        """The step traced and lowered for these (device) arguments (`jax.stages.Lowered`)."""
        return self._fn.lower(state, batch, rng)

    def compile(self, state, batch, rng):
        """The step compiled ahead of time for these (device) arguments: a callable with the
        same signature, whose `cost_analysis()` reports XLA's FLOP count."""
        return self.lower(state, batch, rng).compile()

    def put_state(self, state):
        if self.mode == "pmap":
            # Place the stacked copies with the sharding pmap's outputs carry: handing pmap host
            # arrays first and device arrays later would compile the step twice.
            host = jax.device_get(state)
            sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P(AXIS))
            return jax.tree_util.tree_map(
                lambda x: jax.device_put(np.broadcast_to(x, (self.n, *np.shape(x))), sharding), host)
        return jax.device_put(state, self._replicated)

    def get_state(self, state):
        """One copy of the state: pmap mode fetches device 0's shard of every leaf to the host in
        one transfer (indexing `x[0]` leaf by leaf would dispatch one gather per leaf)."""
        if self.mode == "pmap":
            shards = jax.device_get(
                jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data, state))
            return jax.tree_util.tree_map(lambda x: x[0], shards)
        return state

    def put_batch(self, batch: dict) -> dict:
        if self.mode == "pmap":
            return {k: v.reshape(self.n, v.shape[0] // self.n, *v.shape[1:]) for k, v in batch.items()}
        return jax.device_put(batch, self._sharded)

    def metrics(self, metrics):
        """Device metrics -> the single copy (still on device; fetch when logging)."""
        return jax.tree_util.tree_map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics


def pad_batch(batch: dict, size: int) -> dict:
    """Pad host arrays [b, ...] to [size, ...] with zero rows and add `weight` (1 real, 0 pad)."""
    b = next(iter(batch.values())).shape[0]
    if b > size:
        raise ValueError(f"batch of {b} rows exceeds the padded size {size}")
    out = {k: np.concatenate([v, np.zeros((size - b, *v.shape[1:]), v.dtype)]) if b < size else v
           for k, v in batch.items()}
    out["weight"] = (np.arange(size) < b).astype(np.float32)
    return out


def global_batch_size(batch_size: int, n_devices: int) -> int:
    """Smallest multiple of the device count that holds `batch_size` rows."""
    return int(math.ceil(batch_size / n_devices) * n_devices)


def epoch_batches(arrays: dict, batch_size: int, seed: int, epoch: int):
    """Shuffled mini-batches of host arrays for one epoch (deterministic in (seed, epoch), so a
    resumed run sees the same order). Yields dicts of [<= batch_size, ...] arrays plus `index`
    (int32 rows of the split, which the train step's masks and noise are keyed by); the last
    batch may be partial (kept, padded by the caller)."""
    n = next(iter(arrays.values())).shape[0]
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        idx = np.sort(order[start : start + batch_size])
        yield {k: v[idx] for k, v in arrays.items()} | {"index": idx.astype(np.int32)}


def steps_per_epoch(n: int, batch_size: int) -> int:
    return int(math.ceil(n / batch_size))



# ----------------------------------------------------------------------------------------------
# The fit loop: one seed, epoch by epoch, with selection, full-protocol evaluation and checkpoints.


class NonFiniteLossError(FloatingPointError):
    """Raised when a training step produced a non-finite objective."""


def _check_finite(history: list[dict], first_step: int) -> None:
    for i, m in enumerate(history):
        if m["nonfinite"] > 0:
            bad = {k: float(v) for k, v in m.items() if k != "lr" and not np.isfinite(v)}
            raise NonFiniteLossError(
                f"non-finite loss at step {first_step + i}: terms {bad or m} "
                "(lower the learning rate or check the data for extreme values)")


def fit_seed(run, data, seed: int, out_dir, *, parallel: str = "pmap", resume: bool = False,
             params=None, burst_rates=(), log=print, progress: bool = True) -> dict:
    """Train `run.model` on `data.train` for `run.train.epochs` epochs with `seed`; after every
    epoch evaluate valid and test at r = `run.train.eval_rate`, update both selection protocols
    (saving the parameters of newly selected epochs under `out_dir/selected`) and checkpoint the
    full state to `out_dir/latest`. At the end, run the full robustness protocol on test once per
    distinct selected epoch, and save the honest choice to `out_dir/best`.

    Returns {"selected": {criterion: protocol results}, "selection": {...}, "history": [...],
    "seconds": {...}}. With `resume`, continues from `out_dir/latest` if it exists.
    """
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from ease_jax import checkpoint
    from ease_jax.evaluate import Evaluator, Selector

    out_dir = Path(out_dir)
    mcfg, tcfg = run.model, run.train
    train_arrays = _model_arrays(data.train, mcfg)
    n_train = data.train.n
    spe = steps_per_epoch(n_train, tcfg.batch_size)
    step_fn = make_train_step(mcfg, run.loss, tcfg, spe, n_train)
    par = ParallelStep(step_fn, parallel)
    gbs = global_batch_size(tcfg.batch_size, par.n)
    state = create_state(mcfg, tcfg, seed, spe, params=params)
    selector = Selector(run.dataset)
    record = {"epoch": -1, "selected": {}, "history": [], "seconds": {"train": 0.0, "eval": 0.0}}
    if resume and checkpoint.latest_step(out_dir / "latest") is not None:
        state, record = checkpoint.restore(out_dir / "latest", state)
        selector.load_state_dict(record["selection"])
        log(f"seed {seed}: resumed after epoch {record['epoch'] + 1} from {out_dir / 'latest'}")
    selected_dir = out_dir / "selected"
    if not resume and selected_dir.exists():  # a fresh run must not pick up an older run's epochs
        log(f"seed {seed}: starting afresh; replacing the checkpoints in {out_dir}")
        _prune_selected(selected_dir, set())
    valid_eval = Evaluator(mcfg, data.valid, run.dataset)
    test_eval = Evaluator(mcfg, data.test, run.dataset)
    dev_state = par.put_state(state)
    base_key = jax.random.wrap_key_data(np.asarray(state.rng))

    epochs = range(record["epoch"] + 1, tcfg.epochs)
    bar = tqdm(epochs, desc=f"{mcfg.model} seed {seed}", unit="epoch", disable=not progress,
               initial=record["epoch"] + 1, total=tcfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        step0 = epoch * spe
        metrics = []
        for i, batch in enumerate(epoch_batches(train_arrays, tcfg.batch_size, seed, epoch)):
            rng = jax.random.key_data(jax.random.fold_in(base_key, step0 + i))
            dev_state, m = par(dev_state, par.put_batch(pad_batch(batch, gbs)), rng)
            metrics.append(par.metrics(m))
        metrics = jax.device_get(metrics)  # one host transfer per epoch
        _check_finite(metrics, step0)
        t1 = time.perf_counter()
        params_now = par.get_state(dev_state).params
        valid = valid_eval.metrics(params_now, "rate", tcfg.eval_rate)
        test = test_eval.metrics(params_now, "rate", tcfg.eval_rate)
        improved = selector.update(epoch, valid, test)
        if improved:  # keep this epoch's parameters until no criterion selects it any more
            checkpoint.save(selected_dir / f"epoch_{epoch}", epoch, params_now, {"epoch": epoch})
            _prune_selected(selected_dir, set(selector.epoch.values()) - {None})
        t2 = time.perf_counter()
        train_loss = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
        summary = {"epoch": epoch + 1, "train": train_loss, "valid": valid, "test": test,
                   "improved": improved, "seconds_train": t1 - t0, "seconds_eval": t2 - t1}
        record["history"].append(summary)
        record["seconds"]["train"] += t1 - t0
        record["seconds"]["eval"] += t2 - t1
        record["epoch"] = epoch
        record["selection"] = selector.state_dict()
        log(f"seed {seed} epoch {epoch + 1}/{tcfg.epochs} loss {train_loss['total']:.4f} "
            f"lr {train_loss['lr']:.2e} valid MAE {valid['MAE']:.4f} test@{tcfg.eval_rate} MAE "
            f"{test['MAE']:.4f} improved {','.join(improved) or '-'} "
            f"({t1 - t0:.1f}s train, {t2 - t1:.1f}s eval)")
        bar.set_postfix(loss=f"{train_loss['total']:.3f}", val_mae=f"{valid['MAE']:.3f}")
        checkpoint.save(out_dir / "latest", epoch, par.get_state(dev_state), record)
    # Full robustness protocol, once per distinct selected epoch (section 4).
    t0 = time.perf_counter()
    final = par.get_state(dev_state)
    record["selected"] = {}
    # A criterion whose metric was never finite (e.g. Corr of a constant predictor) selected no
    # epoch; its metrics read NaN in the paper table (`protocol_table`).
    for epoch in sorted({e for e in selector.epoch.values() if e is not None}):
        params_sel, _ = checkpoint.restore(selected_dir / f"epoch_{epoch}", final.params)
        full = test_eval.protocol(params_sel, burst_rates=burst_rates)
        for c, e in selector.epoch.items():
            if e == epoch:
                record["selected"][c] = dict(full, epoch=epoch)
        if selector.epoch["honest"] == epoch:
            checkpoint.save(out_dir / "best", epoch, params_sel, {"epoch": epoch, "seed": seed})
    record["seconds"]["protocol"] = time.perf_counter() - t0
    record["final_state"] = final
    return record


def _prune_selected(selected_dir, keep_epochs: set) -> None:
    """Delete saved parameters of epochs that no selection criterion points at any more."""
    import shutil

    for d in selected_dir.glob("epoch_*"):
        if int(d.name.split("_")[1]) not in keep_epochs:
            shutil.rmtree(d, ignore_errors=True)


def _model_arrays(split, mcfg: ModelConfig) -> dict:
    """The host arrays the train step reads (labels included), per text mode."""
    arrays = split.arrays()
    keys = ["text_ids", "text_mask", "text_types", "audio", "vision", "audio_lengths",
            "vision_lengths", "labels"]
    if mcfg.text_encoder == "features":
        keys.append("text_features")
    return {k: arrays[k] for k in keys}
