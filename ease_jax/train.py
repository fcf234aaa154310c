"""Training and the forward pass: TrainState, the ONE per-device train step, and THE evaluation
forward function.

The per-device step `(state, batch, rng) -> (state, metrics)` (docs/protocol.md section 9):
  1. draws the training keep masks on device from `rng` (per-sample rate U(0, 1), half the samples
     at rate 0, per modality), applies them, and measures each sample's missing fraction;
  2. runs the model on the incomplete inputs with the clean inputs beside them;
  3. computes the objective (global-batch normalised, see `ease_jax.objectives`) with the run's
     loss weights;
  4. averages gradients with `lax.pmean(..., "data")` and applies AdamW with the per-epoch
     warm-up + cosine schedule of the released code (`epoch_lr`; epoch 1 at lr 0).
Batches are padded to the global batch size with zero-weight rows, so the step compiles once and
a batch that does not divide by the device count costs nothing but the padding. The run's base lr
and loss weights are numbers in its state (`TrainState.hparams`), so `ease_jax.population` can vmap
this step over runs that differ in them; `epoch_rows` / `gather_rows` build its batches on device.

`forward` is the evaluation forward pass every reader of predictions uses: the selection and the
final protocol (`population.PopulationProgram.predict`), the analyses and predictions
(`diagnostics.Forward`, a host batcher) and the benchmark.
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

from ease_jax.anchors import init_anchors
from ease_jax.config import LOSS_WEIGHTS, LossConfig, ModelConfig, TrainConfig
from ease_jax.data.missing import (
    MODALITIES,
    apply_keep_masks,
    released_train_masks,
    train_keep_masks,
    train_missing_rates,
)
from ease_jax.models import build_model, init_params
from ease_jax.objectives import model_loss

AXIS = "data"


class TrainState(flax.struct.PyTreeNode):
    """step: [] int32 (optimizer steps taken); params; opt_state; anchors (EASE) or None;
    rng: the run's base key for per-step randomness (each step uses fold_in(rng, step));
    mask_rng: the base key of the training masks (epoch e uses fold_in(mask_rng, e));
    order_rng: the base key of the data order (epoch e shuffles with fold_in(order_rng, e));
    the keys are raw uint32 key data. hparams: the run's numbers that leave the program unchanged,
    float32 scalars `{"lr": base learning rate, <every LOSS_WEIGHTS name>: weight}` (so runs that
    differ only in them train as one population, `ease_jax.population`).
    fixed_masks: None (masks redrawn every epoch from `mask_rng`), or with
    `TrainConfig.train_masks = "released"` the run's fixed training masks of the whole split
    (`data.missing.released_train_masks`: "text" [N, L], ("text_features" [N, L_f]), "audio"
    [N, T_a], "vision" [N, T_v] bool, "rate" [N, 3] the drawn rates), set by `create_state`."""

    step: jax.Array
    params: Any
    opt_state: Any
    anchors: Any
    rng: jax.Array
    mask_rng: jax.Array
    order_rng: jax.Array
    hparams: Any
    fixed_masks: Any = None




def run_hparams(loss_cfg: LossConfig, lr: float) -> dict:
    """`TrainState.hparams` of a run: its base lr and every loss weight of `loss_cfg`
    (`config.LOSS_WEIGHTS`), float32 scalars."""
    return {k: np.float32(v) for k, v in dict(lr=lr, **loss_cfg.weights()).items()}


def epoch_lr(epoch: jax.Array, base_lr: float, warmup: int, total: int) -> jax.Array:
    """Learning rate of 0-based `epoch` e, exactly as the released code steps
    `GradualWarmupScheduler(multiplier=1, total_epoch=W)` + `CosineAnnealingLR(T_max=total - W)`
    (docs/protocol.md section 9): `base * e / W` for e <= W, then
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


def make_optimizer(train_cfg: TrainConfig, steps_per_epoch: int):
    """AdamW over all parameters (BERT included), lr stepped once per epoch, no clipping, at a
    UNIT base learning rate: the step multiplies the updates by the run's base lr
    (`hparams["lr"]`), so runs with different learning rates share one program. AdamW's update
    is `-lr * (adam + wd * param)`, linear in lr, so this is AdamW at lr = base * schedule."""

    def schedule(count):
        return epoch_lr(count // steps_per_epoch, 1.0, train_cfg.warmup_epochs, train_cfg.epochs)

    return optax.adamw(schedule, weight_decay=train_cfg.weight_decay)


def create_state(model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int, steps_per_epoch: int,
                 params: Any = None, loss_cfg: LossConfig | None = None,
                 lr: float | None = None, train_split: Any = None) -> TrainState:
    """A fresh TrainState for `seed` (params initialised from it unless given, e.g. with
    pretrained BERT weights already inserted); `loss_cfg` (default `LossConfig()`) and `lr`
    (default the train config's) give its `hparams`. With `train_cfg.train_masks = "released"`
    the state holds the run's fixed training masks of `train_split` (a `Split` or its arrays),
    which is then required."""
    k_init, k_run, k_masks, k_order = jax.random.split(jax.random.key(seed), 4)
    if params is None:
        params = init_params(model_cfg, k_init)
    tx = make_optimizer(train_cfg, steps_per_epoch)
    anchors = init_anchors(3, model_cfg.dim) if model_cfg.model == "ease" else None
    lr = train_cfg.learning_rate(model_cfg.model) if lr is None else lr
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      anchors=anchors, rng=jax.random.key_data(k_run),
                      mask_rng=jax.random.key_data(k_masks),
                      order_rng=jax.random.key_data(k_order),
                      hparams=run_hparams(loss_cfg or LossConfig(), lr),
                      fixed_masks=_fixed_masks(train_cfg, train_split, seed))


def _fixed_masks(train_cfg: TrainConfig, train_split: Any, seed: int) -> dict | None:
    if train_cfg.train_masks == "redrawn":
        return None
    if train_split is None:
        raise ValueError("create_state: TrainConfig.train_masks='released' fixes the masks of the "
                         "training split, so pass train_split")
    return released_train_masks(train_split, seed)


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
    tx = make_optimizer(train_cfg, steps_per_epoch)
    text_mode = model_cfg.text_encoder

    def step(state: TrainState, batch: dict, rng: jax.Array):
        if "index" not in batch:
            raise KeyError("train step: batch needs 'index' (rows' positions in the training "
                           "split; see `epoch_rows` and `gather_rows`)")
        key = jax.random.wrap_key_data(rng)
        k_noise, k_views, k_dropout = jax.random.split(key, 3)
        if axis_name is not None:
            k_dropout = jax.random.fold_in(k_dropout, jax.lax.axis_index(axis_name))
        inputs, _ = train_inputs(state, batch, n_train=n_train, steps_per_epoch=steps_per_epoch,
                                 text_mode=text_mode, rate_input=model_cfg.rate_input)
        target = dict(batch, missing_rate=inputs["missing_rate"])
        weights = {k: state.hparams[k] for k in LOSS_WEIGHTS}

        def objective(params):
            outputs = model.apply({"params": params}, inputs, batch, train=True,
                                  rngs={"noise": k_noise, "views": k_views, "dropout": k_dropout})
            total, terms, anchors = loss_fn(outputs, target, state.anchors, loss_cfg,
                                            weights=weights, axis_name=axis_name)
            return total, (terms, anchors)

        grads, (terms, anchors) = jax.grad(objective, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            terms = jax.lax.pmean(terms, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        base_lr = state.hparams["lr"]
        updates = jax.tree_util.tree_map(lambda u: (base_lr * u).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms, nonfinite=1.0 - jnp.isfinite(terms["total"]).astype(jnp.float32),
                       lr=tx_lr(state.step, train_cfg, steps_per_epoch, base_lr))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  anchors=anchors)
        return new_state, metrics

    return step


def epoch_mask_key(mask_rng: jax.Array, epoch) -> jax.Array:
    """The key of epoch `epoch`'s training masks: `fold_in(mask_rng, epoch)` (shared by every
    batch and device of the epoch, so the split-level rate halving holds)."""
    return jax.random.fold_in(jax.random.wrap_key_data(mask_rng), epoch)


def train_inputs(state: TrainState, batch: dict, *, n_train: int, steps_per_epoch: int,
                 text_mode: str, rate_input: str = "observed") -> tuple[dict, dict]:
    """The incomplete inputs the train step feeds the model, and the keep masks behind them:
    masks of the batch's rows (`batch["index"]`), from the current epoch's key or, in released
    mode, the run's fixed masks (`TrainState.fixed_masks`), applied. The inputs' `missing_rate`
    [B, 3] (what EASE's gate and LNLN's completeness target read; section 7) is the OBSERVED
    missing fraction, or with `rate_input="drawn"` the rows' drawn rates (section 12 item 2)."""
    index = jnp.asarray(batch["index"], jnp.int32)
    if state.fixed_masks is not None:
        keep = {k: v[index] for k, v in state.fixed_masks.items() if k != "rate"}
        drawn = state.fixed_masks["rate"][index]
    else:
        key = epoch_mask_key(state.mask_rng, state.step // steps_per_epoch)
        keep = train_keep_masks(key, batch, n_split=n_train, text_mode=text_mode)
        drawn = None
        if rate_input == "drawn":  # the same rates `train_keep_masks` drew (same key)
            rates = train_missing_rates(key, n_train)
            drawn = jnp.stack([rates[m] for m in MODALITIES], axis=1)[index]
    inputs = apply_keep_masks(batch, keep, text_mode=text_mode)
    if rate_input == "drawn":
        inputs["missing_rate"] = drawn.astype(jnp.float32)
    return inputs, keep


def tx_lr(step, train_cfg: TrainConfig, steps_per_epoch: int, base_lr) -> jax.Array:
    """The learning rate the optimizer applies at `step` for a run of base lr `base_lr`."""
    return epoch_lr(step // steps_per_epoch, 1.0, train_cfg.warmup_epochs,
                    train_cfg.epochs) * base_lr


def global_batch_size(batch_size: int, n_devices: int) -> int:
    """Smallest multiple of the device count that holds `batch_size` rows."""
    return int(math.ceil(batch_size / n_devices) * n_devices)


def epoch_rows(order_rng: jax.Array, epoch, n: int, batch_size: int,
               global_size: int | None = None) -> jax.Array:
    """The data order of one epoch, drawn on device (jit-able): `[steps, global_size]` int32 rows
    of the training split of `n` samples. A uniformly random permutation from
    `fold_in(order_rng, epoch)` (so a resumed run sees the same order) cut into `steps =
    ceil(n / batch_size)` batches of `batch_size` (the last one partial), each padded with -1 (a
    padding row: zero inputs, weight 0) to `global_size` (default `batch_size`; the global batch
    is a multiple of the data-device count, `global_batch_size`)."""
    global_size = batch_size if global_size is None else global_size
    if global_size < batch_size:
        raise ValueError(f"global_size {global_size} < batch_size {batch_size}")
    key = jax.random.fold_in(jax.random.wrap_key_data(order_rng), epoch)
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    steps = steps_per_epoch(n, batch_size)
    rows = jnp.pad(perm, (0, steps * batch_size - n), constant_values=-1)
    rows = rows.reshape(steps, batch_size)
    return jnp.pad(rows, ((0, 0), (0, global_size - batch_size)), constant_values=-1)


def gather_rows(arrays: dict, rows: jax.Array) -> dict:
    """A batch of device-resident split arrays: `arrays[k][rows]` with the -1 rows of
    `epoch_rows` as zero rows, plus `index` (the rows, padding at 0) and `weight` (1 real, 0
    padding) -- the batch `pad_batch` builds on the host. `rows [B] -> {k: [B, ...]}`."""
    real = rows >= 0
    index = jnp.where(real, rows, 0)
    out = {k: jnp.where(real.reshape(-1, *[1] * (v.ndim - 1)), v[index], jnp.zeros((), v.dtype))
           for k, v in arrays.items()}
    return out | {"index": index, "weight": real.astype(jnp.float32)}


def steps_per_epoch(n: int, batch_size: int) -> int:
    return int(math.ceil(n / batch_size))


# Outputs `forward` passes on when the model has them (besides "pred" and "missing_rate").
DIAGNOSTICS = ("gate", "uncertainty", "completeness")
CLEAN_DIAGNOSTICS = ("clean_tokens", "imp_mean", "imp_var", "imp_sample")


def eval_noise_key(batch_index) -> jax.Array:
    """The imputation-noise key of evaluation batch `batch_index` (read only with
    `ModelConfig.sample_at_eval`): `fold_in(key(0), batch_index)`."""
    return jax.random.fold_in(jax.random.key(0), batch_index)


def forward(cfg: ModelConfig, params: Any, batch: dict, keep: dict, key: jax.Array | None = None,
            *, clean: bool = False, full_keep: dict | None = None) -> dict:
    """The evaluation forward pass: `keep` masks applied to `batch` on device, then the model in
    evaluation mode (z_hat = mu unless `cfg.sample_at_eval`, then noise from `key`).

    `batch`: a split's model arrays for B rows (`data.model_arrays(..., labels=False)`), `keep`:
    the condition's keep masks of those rows (`evaluate.MaskBank`). Returns {"pred" [B],
    "missing_rate" [B, 3] (observed dropped fraction per modality)} plus the diagnostics the model
    has: EASE with UCMI "gate", "uncertainty" [3, B]; LNLN "completeness" [B]; with `clean` (the
    clean inputs encoded beside the incomplete ones) also "clean_tokens", "imp_mean", "imp_var",
    "imp_sample" [3, B, K, d] where the model has them; with `full_keep` also "pred_full" [B], the
    prediction under those masks. Jit it; XLA drops what the caller does not read.
    """
    model = build_model(cfg)
    rngs = {"noise": key} if cfg.sample_at_eval else {}
    inputs = eval_inputs(cfg, batch, keep)
    out = model.apply({"params": params}, inputs, batch if clean else None, train=False, rngs=rngs)
    res = {"pred": out["pred"], "missing_rate": inputs["missing_rate"]}
    res.update({k: out[k] for k in DIAGNOSTICS + (CLEAN_DIAGNOSTICS if clean else ()) if k in out})
    if full_keep is not None:
        full = eval_inputs(cfg, batch, full_keep)
        res["pred_full"] = model.apply({"params": params}, full, train=False, rngs=rngs)["pred"]
    return res


def eval_inputs(cfg: ModelConfig, batch: dict, keep: dict) -> dict:
    """The incomplete evaluation inputs: `keep` applied; their `missing_rate` [B, 3] is the
    observed fraction, or with `cfg.rate_input == "drawn"` the condition's nominal rate
    `keep["nominal_rate"]` (what `evaluate.MaskBank` gives every condition)."""
    inputs = apply_keep_masks(batch, keep, text_mode=cfg.text_encoder)
    if cfg.rate_input == "drawn":
        if "nominal_rate" not in keep:
            raise KeyError("keep: rate_input='drawn' needs keep['nominal_rate'] [B, 3], the "
                           "condition's rate per modality (evaluate.MaskBank adds it)")
        inputs["missing_rate"] = jnp.asarray(keep["nominal_rate"], jnp.float32)
    return inputs
