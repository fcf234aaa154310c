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
from collections.abc import Sequence

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
        """The condition's keep masks (`data.missing`) plus "nominal_rate" [N, 3] float32: its
        rate per modality (text, audio, vision) as the released code labels it (the rate of a
        rate or burst condition; 1.0 for a modality a kept subset leaves out, 0 for a kept one),
        which a model with `ModelConfig.rate_input = "drawn"` reads."""
        key = condition_name(kind, value)
        if key not in self._cache:
            if kind == "rate":
                masks = eval_keep_masks(self.split, value, seed=self.seed)
                nominal = [value] * 3
            elif kind == "subset":
                masks = inter_modal_keep_masks(self.split, value)
                nominal = [0.0 if letter in value else 1.0 for letter in "lav"]
            elif kind == "burst":
                masks = burst_keep_masks(self.split, value, mean_burst=self.mean_burst,
                                         seed=self.seed)
                nominal = [value] * 3
            else:
                raise ValueError(f"unknown evaluation condition kind {kind!r}")
            rate = np.broadcast_to(np.asarray(nominal, np.float32), (self.split.n, 3))
            self._cache[key] = masks | {"nominal_rate": np.ascontiguousarray(rate)}
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


# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1 ... 30 (scipy.stats.t.ppf).
_T975 = (12.706204736174694, 4.302652729749462, 3.1824463052837078, 2.7764451051977934,
         2.5705818356363146, 2.4469118511449786, 2.364624251592784, 2.306004135204166,
         2.262157162798205, 2.228138851986274, 2.200985160091639, 2.1788128296672284,
         2.1603686564627913, 2.144786687917804, 2.131449545559776, 2.1199052992212546,
         2.1098155778333156, 2.1009220402410382, 2.0930240544083087, 2.085963447265864,
         2.0796138447276795, 2.0738730679040254, 2.0686576104190486, 2.0638985616280245,
         2.0595385527532972, 2.0555294386428735, 2.0518305164802846, 2.0484071417952454,
         2.045229642132703, 2.0422724563012378)
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """t_{0.975, df}: the table above, beyond it the Cornish-Fisher expansion in 1/df (within
    3e-8 of the exact quantile at df = 31, closer for more), so no scipy is needed."""
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict:
    """Mean of the paired differences `values[i] - reference[i]` (the same seed i) with a 95%
    Student-t interval: {"mean", "lo", "hi", "n"}; the interval is NaN with one pair. The one
    implementation of a paired comparison (models, protocols, ablation variants)."""
    d = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"paired_difference: expected two equal-length vectors, got {d.shape}")
    mean = float(d.mean())
    if d.size < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    half = t975(d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(d.size)}


_SUMMARIES = (("per_rate", "mean_over_rates"), ("inter_modal", "mean_over_subsets"))


def paired_tables(tables: list[dict], reference: list[dict]) -> dict:
    """Paired differences `tables[i] - reference[i]` of two lists of per-seed protocol tables
    (`protocol_table`, same seed i): {"per_rate": {rate: {metric: d}}, "mean_over_rates":
    {metric: d}, "inter_modal": {subset: {metric: d}}, "mean_over_subsets": {metric: d}}, d a
    `paired_difference`; the means are each seed's mean over the conditions, then paired. A
    section the reference lacks (no kept-subset results) is left out."""
    if len(tables) != len(reference):
        raise ValueError(f"paired_tables: {len(tables)} tables vs {len(reference)} reference")

    def paired_rows(rows: list[dict], ref_rows: list[dict]) -> dict:
        return {m: paired_difference([r[m] for r in rows], [r[m] for r in ref_rows])
                for m in ref_rows[0]}

    out: dict = {}
    for section, summary in _SUMMARIES:
        conds = reference[0].get(section, {})
        if not conds:
            continue
        out[section] = {c: paired_rows([t[section][c] for t in tables],
                                       [t[section][c] for t in reference]) for c in conds}
        out[summary] = paired_rows([condition_mean(t[section]) for t in tables],
                                   [condition_mean(t[section]) for t in reference])
    return out


def selection_inflation(paper: list[dict], honest: list[dict]) -> dict:
    """How much selecting checkpoints on the test split flatters each number: the paper
    protocol's minus the honest protocol's condition mean, paired by seed (`paper[i]`, `honest[i]`
    one seed's protocol tables): {"per_rate_mean": {metric: d}, "subset_mean": {metric: d}}, d a
    `paired_difference`; "subset_mean" only with kept-subset results. Negative for MAE and
    positive for the others = the paper protocol reads better."""
    d = paired_tables(paper, honest)
    out = {"per_rate_mean": d["mean_over_rates"]}
    if "mean_over_subsets" in d:
        out["subset_mean"] = d["mean_over_subsets"]
    return out


def summarize_seeds(seeds: dict) -> dict:
    """A run's over-seed summary from its per-seed protocol tables (`seeds[seed]["paper"]` and
    `["honest"]`, `protocol_table`s, in the dict's order): {"protocols": {protocol: `aggregate`},
    "selection_inflation": `selection_inflation`}. The one place a sweep's results.json gets
    these, whether its seeds trained in one program or were pooled from several runs."""
    tables = {p: [s[p] for s in seeds.values()] for p in ("paper", "honest")}
    return {"protocols": {p: aggregate(t) for p, t in tables.items()},
            "selection_inflation": selection_inflation(tables["paper"], tables["honest"])}


def compare_models(per_model: dict) -> dict:
    """Side-by-side view of several models' results on the same data (`per_model[model]` a
    sweep's results dict, with its per-seed tables in results["seeds"][seed]["honest" / "paper"]):
    per protocol, each model's per-rate test metrics, 10-rate mean, inter-modal rows and mean,
    and the constant baseline; "seeds" {model: [seed]}; "behaviour" {model: results'
    "behaviour" or None}; and "paired": {"reference": the first model, "models": {other model:
    {"seeds": [the seeds both have, in the first model's order], "protocols": {protocol:
    `paired_tables`(other, first)}}}} (a model sharing no seed with the first is left out)."""
    first_name, first = next(iter(per_model.items()))
    out = {"dataset": first["dataset"], "data": first["data"],
           "baselines": first["baselines"], "protocols": {}}
    for proto in ("honest", "paper"):
        out["protocols"][proto] = {
            model: {key: res["protocols"][proto].get(key, {}) for key in
                    ("per_rate", "mean_over_rates", "inter_modal", "mean_over_subsets")}
            for model, res in per_model.items()}
    out["seeds"] = {model: list(res["seeds"]) for model, res in per_model.items()}
    out["behaviour"] = {model: res.get("behaviour") for model, res in per_model.items()}
    paired = {}
    for model, res in list(per_model.items())[1:]:
        # Pair by seed, not by position: only seeds both models ran count.
        seeds = [s for s in first["seeds"] if s in res["seeds"]]
        if seeds:
            paired[model] = {"seeds": seeds, "protocols": {
                proto: paired_tables([res["seeds"][s][proto] for s in seeds],
                                     [first["seeds"][s][proto] for s in seeds])
                for proto in ("honest", "paper")}}
    out["paired"] = {"reference": first_name, "models": paired}
    return out
