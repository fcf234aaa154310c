"""Robust evaluation (PROTOCOL.md sections 2-4): missing rates, modality subsets, burst masks,
the two checkpoint-selection protocols, and aggregation over seeds.

Evaluation masks are NumPy, bit-exact with the reference protocol, computed once per split and
condition (`MaskBank`) and shared by every model and seed; the forward pass is jitted over
fixed-size batches (the last partial batch is padded and its padding dropped) and deterministic
(imputation = mean) unless the model config asks for sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import numpy as np

from ease_jax.config import ModelConfig
from ease_jax.data.missing import (
    INTER_MODAL_SUBSETS,
    apply_keep_masks,
    burst_keep_masks,
    eval_keep_masks,
    inter_modal_keep_masks,
)
from ease_jax.data.mmsa import Split
from ease_jax.metrics import LOWER_IS_BETTER, regression_metrics
from ease_jax.models import build_model
from ease_jax.train import eval_arrays

RATES = tuple(round(0.1 * i, 1) for i in range(10))

# Paper protocol (section 4): one checkpoint per selection metric; F1 comes with its accuracy.
PAPER_SELECTION = {
    "mosi": {"Has0_acc_2": ("Has0_acc_2", "Has0_F1_score"),
             "Non0_acc_2": ("Non0_acc_2", "Non0_F1_score"),
             "Mult_acc_5": ("Mult_acc_5",), "Mult_acc_7": ("Mult_acc_7",),
             "MAE": ("MAE",), "Corr": ("Corr",)},
    "sims": {"Mult_acc_2": ("Mult_acc_2", "F1_score"), "Mult_acc_3": ("Mult_acc_3",),
             "Mult_acc_5": ("Mult_acc_5",), "MAE": ("MAE",), "Corr": ("Corr",)},
}
PAPER_SELECTION["mosei"] = PAPER_SELECTION["mosi"]
HONEST_METRIC = "MAE"
SELECTION_DECIMALS = 4  # the released `metricsTop` rounds every metric before `get_best_results`


def condition_name(kind: str, value) -> str:
    """Stable string keys: rate conditions "0.5", subsets "la", bursts "burst:0.5"."""
    return f"{value:.1f}" if kind == "rate" else (value if kind == "subset" else f"burst:{value:.1f}")


class MaskBank:
    """Evaluation keep masks of one split, computed on first use and cached."""

    def __init__(self, split: Split, *, seed: int = 1111, mean_burst: float = 5.0):
        self.split, self.seed, self.mean_burst = split, seed, mean_burst
        self._cache: dict[str, dict] = {}

    def get(self, kind: str, value) -> dict:
        key = condition_name(kind, value)
        if key not in self._cache:
            if kind == "rate":
                self._cache[key] = eval_keep_masks(self.split, value, seed=self.seed)
            elif kind == "subset":
                self._cache[key] = inter_modal_keep_masks(self.split, value)
            elif kind == "burst":
                self._cache[key] = burst_keep_masks(self.split, value, mean_burst=self.mean_burst,
                                                    seed=self.seed)
            else:
                raise ValueError(f"unknown evaluation condition kind {kind!r}")
        return self._cache[key]


def make_predict_fn(model_cfg: ModelConfig) -> Callable:
    """jitted `(params, batch, keep, rng) -> pred [B]`: masks applied on device, then the model
    in evaluation mode. `rng` is only used when `model_cfg.sample_at_eval` is set."""
    model = build_model(model_cfg)

    @jax.jit
    def predict(params, batch, keep, rng):
        inputs = apply_keep_masks(batch, keep, text_mode=model_cfg.text_encoder)
        rngs = {"noise": rng} if model_cfg.sample_at_eval else {}
        return model.apply({"params": params}, inputs, train=False, rngs=rngs)["pred"]

    return predict


class Evaluator:
    """Predictions and metrics of one model config on one split under named conditions."""

    def __init__(self, model_cfg: ModelConfig, split: Split, dataset: str, *,
                 batch_size: int = 256, seed: int = 1111, masks: MaskBank | None = None):
        self.model_cfg, self.split, self.dataset = model_cfg, split, dataset
        self.batch_size = min(batch_size, split.n)
        self.masks = masks or MaskBank(split, seed=seed)
        self._predict = make_predict_fn(model_cfg)
        self._arrays = eval_arrays(split, model_cfg)

    def predict(self, params, keep: dict, rng=None) -> np.ndarray:
        """Predictions [N] for the split under `keep` masks (host arrays)."""
        n, bs = self.split.n, self.batch_size
        rng = jax.random.key(0) if rng is None else rng
        preds = []
        for i in range(math.ceil(n / bs)):
            sl = slice(i * bs, min((i + 1) * bs, n))
            batch = {k: _pad(v[sl], bs) for k, v in self._arrays.items()}
            kb = {k: _pad(v[sl], bs) for k, v in keep.items()}
            preds.append(self._predict(params, batch, kb, jax.random.fold_in(rng, i)))
        out = np.concatenate([np.asarray(p) for p in jax.device_get(preds)])[:n]
        return out

    def metrics(self, params, kind: str = "rate", value=0.0) -> dict:
        preds = self.predict(params, self.masks.get(kind, value))
        return regression_metrics(preds, self.split.labels, self.dataset)

    def protocol(self, params, *, rates: Iterable[float] = RATES, subsets=INTER_MODAL_SUBSETS,
                 burst_rates: Iterable[float] = ()) -> dict:
        """The full robustness protocol of one checkpoint:
        {"per_rate": {"0.0": metrics, ...}, "inter_modal": {"l": metrics, ...}, "burst": {...}}."""
        return {
            "per_rate": {condition_name("rate", r): self.metrics(params, "rate", r) for r in rates},
            "inter_modal": {s: self.metrics(params, "subset", s) for s in subsets},
            "burst": {condition_name("rate", r): self.metrics(params, "burst", r)
                      for r in burst_rates},
        }


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


def better(metric: str, new: float, old: float | None) -> bool:
    """Strict improvement; NaN never improves; lower is better for MAE."""
    if new is None or not np.isfinite(new):
        return False
    if old is None or not np.isfinite(old):
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


class Selector:
    """Both checkpoint-selection protocols of section 4, tracked epoch by epoch.

    honest: one checkpoint, best VALID MAE at r = 0.5. paper: for each selection metric, the best
    TEST value at r = 0.5. As the released `get_best_results`, metrics are compared rounded to
    4 decimals and an epoch replaces the kept one only on a strict improvement, so a tie keeps the
    earlier epoch. `update` returns the criteria an epoch improved; the caller then runs the full
    protocol for that epoch's parameters once and stores it under each of them.
    """

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.criteria = ["honest"] + [f"paper:{m}" for m in PAPER_SELECTION[dataset]]
        self.best = {c: None for c in self.criteria}
        self.epoch = {c: None for c in self.criteria}

    def update(self, epoch: int, valid: dict, test: dict) -> list[str]:
        improved = []
        for c in self.criteria:
            metric, source = (HONEST_METRIC, valid) if c == "honest" else (c[6:], test)
            value = source[metric]
            value = None if value is None else round(float(value), SELECTION_DECIMALS)
            if better(metric, value, self.best[c]):
                self.best[c], self.epoch[c] = value, epoch
                improved.append(c)
        return improved

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.epoch = dict(d["best"]), dict(d["epoch"])


def protocol_table(dataset: str, selected: dict, protocol: str) -> dict:
    """One seed's table under `protocol` ("paper" | "honest") from the full-protocol results of
    its selected checkpoints (`selected[criterion]`): {"per_rate": {rate: {metric: v}},
    "inter_modal": {...}, "burst": {...}}. Paper: metric k read from the checkpoint chosen by k
    (F1 with its accuracy); honest: every metric from the one honest checkpoint. A criterion that
    selected nothing (its metric never finite) contributes NaN."""
    if not selected:
        raise ValueError("protocol_table: no selected checkpoint (was any epoch trained?)")
    template = next(iter(selected.values()))
    nan_table = {section: {cond: {m: float("nan") for m in values} for cond, values in
                           template.get(section, {}).items()}
                 for section in ("per_rate", "inter_modal", "burst")}
    if protocol == "honest":
        return selected.get("honest", nan_table)
    out: dict = {}
    for crit, metrics in PAPER_SELECTION[dataset].items():
        res = selected.get(f"paper:{crit}", nan_table)
        for section in ("per_rate", "inter_modal", "burst"):
            for cond, values in res.get(section, {}).items():
                row = out.setdefault(section, {}).setdefault(cond, {})
                for m in metrics:
                    row[m] = values[m]
    return out


def aggregate(seed_tables: list[dict]) -> dict:
    """Mean and std over seeds: {section: {cond: {metric: {"mean", "std"}}}} plus
    "mean_over_rates" / "mean_over_subsets": per seed the mean over conditions, then over seeds."""
    summary_names = {"per_rate": "mean_over_rates", "inter_modal": "mean_over_subsets",
                     "burst": "burst_mean_over_rates"}
    out: dict = {}
    for section, summary in summary_names.items():
        conds = seed_tables[0].get(section, {})
        out[section] = {c: _mean_std([t[section][c] for t in seed_tables]) for c in conds}
        if conds:
            out[summary] = _mean_std([_mean_dicts(list(t[section].values())) for t in seed_tables])
    return out


def condition_mean(section: dict) -> dict:
    """One seed's mean over the conditions of a table section, e.g. the 10-rate mean of
    `table["per_rate"]`: {metric: value}."""
    return _mean_dicts(list(section.values()))


def _mean_dicts(rows: list[dict]) -> dict:
    return {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}


def _mean_std(rows: list[dict]) -> dict:
    return {m: {"mean": float(np.mean([r[m] for r in rows])),
                "std": float(np.std([r[m] for r in rows]))} for m in rows[0]}


def host_params(params):
    """Parameters as host NumPy arrays (for keeping a copy without holding device memory).
    `np.array` copies: on CPU `device_get` returns views of the device buffers, which would pin
    them (and defeat donation)."""
    return jax.tree_util.tree_map(np.array, jax.device_get(params))

