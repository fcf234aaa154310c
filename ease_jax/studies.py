"""The papers' studies as sets of runs (docs/protocol.md section 11): Table 4's ablation variants and
Fig. 7's loss-weight sensitivity grid, plus their summaries over seeds (the paired statistics
are `evaluate.paired_difference`).

A study is a list of `population.Run`s handed to `fit.fit_runs`, which trains every group of runs
that share a program (same model, same program-shaping loss fields) as one population: the
weight-only variants and every sensitivity value train together; w/o UCMI and w/o ALL (no imputer,
no gate) are a second program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ease_jax.config import LossConfig, ModelConfig
from ease_jax.evaluate import (  # paired_difference: the one implementation, re-exported
    aggregate,
    condition_mean,
    paired_difference,
    protocol_table,
)
from ease_jax.population import Run

# Table 4 (EASE, MOSI), the one definition of every variant: name -> (ModelConfig changes,
# LossConfig changes). Graph changes live in ModelConfig (w/o UCMI: no imputer, no gate), term
# removals are weights at 0. "w/o MIPC" zeroes the two view terms' weights: the subset views then
# feed nothing, so the model trains as without them (up to float rounding) in the full model's
# program (docs/protocol.md section 12); the sweeps never drop the views either.
_UCSA_OFF = {"uada": 0.0, "anchor": 0.0}
_MIPC_OFF = {"cons": 0.0, "asym": 0.0}
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "EASE": ({}, {}),
    "w/o UCMI": ({"use_ucmi": False}, {}),
    "w/o UCSA": ({}, _UCSA_OFF),
    "w/o MIPC": ({}, _MIPC_OFF),
    "w/o ALL": ({"use_ucmi": False}, _UCSA_OFF | _MIPC_OFF),
    "w/o L_uada": ({}, {"uada": 0.0}),
    "w/o L_anchor": ({}, {"anchor": 0.0}),
    "w/o L_cons": ({}, {"cons": 0.0}),
    "w/o L_asym": ({}, {"asym": 0.0}),
}

# Fig. 7: Eq. 13 as L_sp + l1 L_ucmi + l2 (L_uada + 0.02 L_anchor) + l3 (L_cons + L_asym).
SENSITIVITY_VALUES = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
SENSITIVITY_PRESET = {"l1": 0.5, "l2": 0.2, "l3": 0.5}


def slug(name: str) -> str:
    """A directory-safe name: "w/o L_uada" -> "wo_l_uada"."""
    out = name.lower().replace("w/o", "wo").replace("/", "_").replace(" ", "_").replace(".", "p")
    return "".join(c for c in out if c.isalnum() or c in "_-")


def ablation_runs(model_cfg: ModelConfig, loss_cfg: LossConfig, seeds: Sequence[int],
                  variants: Sequence[str] = tuple(ABLATIONS)) -> list[Run]:
    """One run per (variant, seed), named `<variant slug>_seed_<seed>`."""
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(ABLATIONS)}")
    runs = []
    for v in variants:
        model_changes, loss_changes = ABLATIONS[v]
        model = dataclasses.replace(model_cfg, **model_changes) if model_changes else None
        loss = dataclasses.replace(loss_cfg, **loss_changes)
        runs += [Run(s, loss=loss, model=model, name=f"{slug(v)}_seed_{s}") for s in seeds]
    return runs


def eq13_loss(base: LossConfig, l1: float, l2: float, l3: float) -> LossConfig:
    """`base` with the Eq. 13 weights: ucmi = l1, uada = l2, anchor = 0.02 l2, cons = asym = l3."""
    return dataclasses.replace(base, ucmi=l1, uada=l2, anchor=0.02 * l2, cons=l3, asym=l3)


def sensitivity_points(values: Sequence[float] = SENSITIVITY_VALUES) -> list[tuple[str, float]]:
    """(weight, value) of Fig. 7: each of l1, l2, l3 over `values`, the others at the preset."""
    return [(w, float(v)) for w in SENSITIVITY_PRESET for v in values]


def point_weights(weight: str, value: float) -> dict[str, float]:
    return dict(SENSITIVITY_PRESET, **{weight: value})


def point_name(weights: dict[str, float]) -> str:
    return "_".join(f"{k}_{v:g}" for k, v in weights.items()).replace(".", "p")


def sensitivity_runs(loss_cfg: LossConfig, seeds: Sequence[int],
                     values: Sequence[float] = SENSITIVITY_VALUES) -> list[Run]:
    """One run per distinct weight setting of the grid and seed (the preset, which every weight's
    grid passes through, once), named `l1_<v>_l2_<v>_l3_<v>_seed_<s>`."""
    settings = {point_name(point_weights(w, v)): point_weights(w, v)
                for w, v in sensitivity_points(values)}
    return [Run(s, loss=eq13_loss(loss_cfg, **ws), name=f"{name}_seed_{s}")
            for name, ws in settings.items() for s in seeds]


PROTOCOLS = ("honest", "paper")


def summarize_groups(dataset: str, groups: dict[str, list[dict]],
                     reference: str | None = None) -> dict:
    """Per group of runs (the seeds of one variant or weight setting, each a `fit` record, in the
    same seed order in every group): both protocols' aggregates over seeds (`evaluate.aggregate`),
    each seed's 10-rate means, and, with `reference`, every metric's paired difference of the
    10-rate means from the reference group (same seeds)."""
    out = {}
    for name, records in groups.items():
        tables = {p: [protocol_table(dataset, r["selected"], p) for r in records]
                  for p in PROTOCOLS}
        out[name] = {"protocols": {p: aggregate(t) for p, t in tables.items()},
                     "per_seed": {p: [condition_mean(t["per_rate"]) for t in tables[p]]
                                  for p in PROTOCOLS}}
    if reference is not None:
        if reference not in out:
            raise ValueError(f"reference group {reference!r} is not among {list(out)}")
        ref = out[reference]["per_seed"]
        for entry in out.values():
            entry["paired"] = {
                p: {m: paired_difference([s[m] for s in entry["per_seed"][p]],
                                         [s[m] for s in ref[p]]) for m in ref[p][0]}
                for p in PROTOCOLS}
    return out
