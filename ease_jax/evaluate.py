"""Robust evaluation (docs/protocol.md sections 2-4): the evaluation conditions (missing rates,
kept-modality subsets, bursts) in one vocabulary, their masks, the two checkpoint-selection
protocols, and aggregation over seeds. Host-side numbers only: the forward pass is
`train.forward`.

A condition is `(kind, value)`: ("rate", 0.5), ("subset", "la") (the kept modalities), ("burst",
0.5); None is the inputs as given (every valid position kept). `condition_name` gives its key in
results.json ("0.5", "la", "burst:0.5"), `parse_condition` reads the command-line form,
`condition_label` the human one. Evaluation masks are NumPy, bit-exact with the reference
protocol, computed once per split and condition (`MaskBank`) and shared by every model and seed.
"""

from __future__ import annotations

import math

import numpy as np

from ease_jax.data.missing import (
    burst_keep_masks,
    eval_keep_masks,
    inter_modal_keep_masks,
)
from ease_jax.data.mmsa import Split
from ease_jax.metrics import LOWER_IS_BETTER, regression_metrics

RATES = tuple(round(0.1 * i, 1) for i in range(10))  # the protocol's missing rates (section 2)

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


_LETTERS = "lav"


def parse_condition(text: str | None, *, allow_none: bool = True):
    """Command-line condition -> (kind, value), or None for "none" (the inputs as given).

    "0.5" -> ("rate", 0.5) (a missing rate in [0, 1]); "la" / "l" / "av" -> ("subset", "la")
    (the kept modalities, letters from l, a, v, put in that order); "burst:0.5" -> ("burst", 0.5);
    "none" -> None (only when `allow_none`). Raises ValueError naming the text otherwise.
    """
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("none", "full"):
        if not allow_none:
            raise ValueError("condition: 'none' is not allowed here (give a missing rate such as "
                             "0.5 or a kept-modality subset such as la)")
        return None
    kind, value = ("burst", t[len("burst:"):]) if t.startswith("burst:") else ("rate", t)
    try:
        rate = float(value)
    except ValueError:
        rate = None
    if rate is not None:
        if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise ValueError(f"condition: a missing rate must be in [0, 1], got {text!r}")
        return kind, rate
    if kind == "burst" or not t or any(c not in _LETTERS for c in t) or len(set(t)) != len(t):
        raise ValueError(f"condition: expected a missing rate in [0, 1] (e.g. 0.5), "
                         f"burst:<rate>, a kept-modality subset from the letters l, a, v (e.g. "
                         f"la, l, av) or none; got {text!r}")
    return "subset", "".join(c for c in _LETTERS if c in t)


def condition_label(condition) -> str:
    """Human-readable condition: "r = 0.5", "kept {l,a}", "burst r = 0.5", "none (inputs as
    given)"."""
    if condition is None:
        return "none (inputs as given)"
    kind, value = condition
    if kind == "rate":
        return f"r = {value:g}"
    if kind == "burst":
        return f"burst r = {value:g}"
    return "kept {" + ",".join(value) + "}"


def condition_json(condition) -> dict:
    """{"kind", "value", "label"} of a condition (None: kind "none")."""
    if condition is None:
        return {"kind": "none", "value": None, "label": condition_label(None)}
    return {"kind": condition[0], "value": condition[1], "label": condition_label(condition)}


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

    def keep(self, condition) -> dict:
        """The keep masks of a condition `(kind, value)`; None = every valid position kept (the
        observed full input, the masks of the kept subset "lav")."""
        return self.get("subset", "lav") if condition is None else self.get(*condition)


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


def constant_baseline(train_labels: np.ndarray, test_labels: np.ndarray, dataset: str) -> dict:
    """The metrics of predicting the median training label for every test sample (what a model
    that learned nothing scores), plus that "value"."""
    median = float(np.median(train_labels))
    constant = regression_metrics(np.full(len(test_labels), median), test_labels, dataset)
    return constant | {"value": median}


def compare_models(per_model: dict) -> dict:
    """Side-by-side view of several models' results on the same data: per protocol, each model's
    per-rate test metrics, 10-rate mean, inter-modal rows and mean, and the constant baseline."""
    first = next(iter(per_model.values()))
    out = {"dataset": first["dataset"], "data": first["data"],
           "baselines": first["baselines"], "protocols": {}}
    for proto in ("honest", "paper"):
        out["protocols"][proto] = {
            model: {key: res["protocols"][proto].get(key, {}) for key in
                    ("per_rate", "mean_over_rates", "inter_modal", "mean_over_subsets")}
            for model, res in per_model.items()}
    out["seeds"] = {model: list(res["seeds"]) for model, res in per_model.items()}
    return out
