"""Results as files, shared by every command: JSON, the papers' Markdown tables, plots.

Numbers come from the library (`ease_jax.evaluate`, `ease_jax.analysis`); this module only lays
them out: `results_markdown` (Table 1 layout with the papers' rows, per rate, inter-modal, Table 6,
bursts, selection inflation), `comparison_markdown` (with paired differences), `plot_curves` /
`plot_comparison` (Fig. 3 style), `plot_training` (loss and MAE per epoch), `write_json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

# Paper numbers (docs/protocol.md section 10; EASE paper Tables 1-2): 10-rate means, paper protocol.
PAPER_ROWS = {
    "mosi": {"EASE (paper)": [73.60, 74.71, 73.66, 74.79, 39.57, 35.75, 0.995, 0.573],
             "LNLN (paper)": [70.94, 72.55, 71.25, 72.73, 38.27, 34.26, 1.046, 0.527]},
    "mosei": {"EASE (paper)": [79.43, 79.14, 80.04, 79.67, 47.69, 46.17, 0.645, 0.610],
              "LNLN (paper)": [78.19, 76.30, 79.95, 77.77, 46.17, 45.42, 0.692, 0.530]},
    "sims": {"EASE (paper)": [74.72, 75.13, 58.08, 35.62, 0.486, 0.451],
             "LNLN (paper)": [72.73, 79.43, 57.14, 34.64, 0.514, 0.397]},
}
TABLE_COLUMNS = {
    "mosi": (("Acc-2 has0/non0", ("Has0_acc_2", "Non0_acc_2")),
             ("F1 has0/non0", ("Has0_F1_score", "Non0_F1_score")),
             ("Acc-5", ("Mult_acc_5",)), ("Acc-7", ("Mult_acc_7",)), ("MAE", ("MAE",)),
             ("Corr", ("Corr",))),
    "sims": (("Acc-2", ("Mult_acc_2",)), ("F1", ("F1_score",)), ("Acc-3", ("Mult_acc_3",)),
             ("Acc-5", ("Mult_acc_5",)), ("MAE", ("MAE",)), ("Corr", ("Corr",))),
}
TABLE_COLUMNS["mosei"] = TABLE_COLUMNS["mosi"]



def comparison_markdown(comparison: dict, label: str) -> str:
    """comparison.md from `evaluate.compare_models`: per protocol the models' means (± std over
    seeds), MAE and Corr per rate and kept subset, and each model's paired difference from the
    first model (same seeds, 95% t-interval)."""
    ds = comparison["dataset"]
    head = [name for name, _ in TABLE_COLUMNS[ds]]
    models = list(comparison["seeds"])
    n_seeds = {m: len(s) for m, s in comparison["seeds"].items()}
    paired = comparison.get("paired", {"reference": models[0], "models": {}})
    ref = paired["reference"].upper()
    lines = [f"# {' vs '.join(m.upper() for m in models)} on {ds.upper()} ({label} data: "
             f"{comparison['data']['source']})", "",
             "Test metrics, mean over seeds (" + ", ".join(
                 f"{m.upper()}: {len(s)} seed(s)" for m, s in comparison["seeds"].items())
             + "). Accuracies and F1 in %. Each model's own results.md has the paper rows, the "
               "per-seed spread and the other protocol's details.", ""]
    behaviours = {m: behaviour_line(b) for m, b in comparison.get("behaviour", {}).items() if b}
    if len(set(behaviours.values())) == 1 and len(behaviours) == len(models):
        lines += [next(iter(behaviours.values())), ""]
    else:
        lines += [f"{m.upper()}: {b}" for m, b in behaviours.items()] + [""] * bool(behaviours)
    if max(n_seeds.values()) == 1:
        lines += [ONE_SEED, ""]
    for m in models[1:]:
        n = len(paired["models"].get(m, {}).get("seeds", []))
        if n < 2 and max(n_seeds.values()) > 1:
            lines += [f"{m.upper()} and {ref} share {n} seed(s): no paired comparison with an "
                      "interval; a single seed cannot compare models.", ""]
    constant = row_cells(ds, comparison["baselines"]["constant"])
    for proto, desc in (("honest", "honest protocol (valid-selected)"),
                        ("paper", "paper protocol (test-selected)")):
        rows = comparison["protocols"][proto]
        lines += [f"## 10-rate mean and kept-modality mean, {desc}", "",
                  "| model | condition | " + " | ".join(head) + " |",
                  "|---|---|" + "---|" * len(head)]
        for model in models:
            lines.append(f"| {model.upper()} | mean over r | " + " | ".join(
                row_cells(ds, rows[model]["mean_over_rates"], True, n_seeds[model])) + " |")
            if rows[model]["mean_over_subsets"]:
                lines.append(f"| {model.upper()} | mean over kept subsets | " + " | ".join(
                    row_cells(ds, rows[model]["mean_over_subsets"], True, n_seeds[model])) + " |")
        lines.append("| constant (train median) | - | " + " | ".join(constant) + " |")
        lines += ["", f"## MAE and Corr per missing rate, {desc}", "",
                  "| r | " + " | ".join(f"{m.upper()} MAE | {m.upper()} Corr" for m in models)
                  + " |", "|---|" + "---|---|" * len(models)]
        for r in rows[models[0]]["per_rate"]:
            cells = []
            for m in models:
                v = rows[m]["per_rate"][r]
                cells += [fmt("MAE", v["MAE"]["mean"]), fmt("Corr", v["Corr"]["mean"])]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        subsets = list(rows[models[0]]["inter_modal"])
        if subsets:
            lines += ["", f"## MAE and Corr per kept-modality subset, {desc}", "",
                      "| kept | " + " | ".join(f"{m.upper()} MAE | {m.upper()} Corr"
                                               for m in models) + " |",
                      "|---|" + "---|---|" * len(models)]
            for sub in subsets:
                cells = []
                for m in models:
                    v = rows[m]["inter_modal"][sub]
                    cells += [fmt("MAE", v["MAE"]["mean"]), fmt("Corr", v["Corr"]["mean"])]
                lines.append(f"| {{{','.join(sub)}}} | " + " | ".join(cells) + " |")
        # Only with two or more shared seeds: one seed's difference has no interval to read.
        others = {m: v for m, v in paired["models"].items() if len(v["seeds"]) >= 2}
        if others:
            shared = ", ".join(f"{m.upper()}: {len(v['seeds'])}" for m, v in others.items())
            lines += ["", f"## Paired difference from {ref}, {desc}", "",
                      f"Model minus {ref} on the same seeds ({shared} seeds), "
                      "mean [95% Student-t interval] over seeds; accuracies and F1 in points. "
                      "An interval that excludes 0 is a difference the seeds agree on.", "",
                      "| model | condition | " + " | ".join(head) + " |",
                      "|---|---|" + "---|" * len(head)]
            for m, v in others.items():
                lines += paired_rows(ds, v["protocols"][proto], f"{m.upper()} - {ref}")
        lines.append("")
    lines.append(f"Constant predictor MAE: {fmt('MAE', comparison['baselines']['constant']['MAE'])}"
                 f"; Corr is undefined for it (NaN).")
    return "\n".join(lines) + "\n"



def plot_comparison(per_model: dict, path: Path, label: str, paired: dict | None = None) -> None:
    """All models' curves in one figure: metric vs missing rate, honest protocol solid and paper
    protocol dashed, mean ± std over seeds, the constant predictor dotted. With `paired`
    (comparison["paired"] of `evaluate.compare_models`) one more panel: each other model's MAE
    minus the first model's per rate, paired by seed, with its 95% interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(per_model.values()))
    ds = first["dataset"]
    metrics = [m for _, ms in TABLE_COLUMNS[ds] for m in ms[:1]]
    extra = bool(paired and paired["models"])
    fig, axes = plt.subplots(1, len(metrics) + extra, figsize=(3.2 * (len(metrics) + extra), 3.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if extra:
        ax = axes[-1]
        for color, model in zip(colors[1:], list(per_model)[1:]):
            if model not in paired["models"]:
                continue
            for proto, style in (("honest", "-o"), ("paper", "--s")):
                per_rate = paired["models"][model]["protocols"][proto]["per_rate"]
                rates = [float(r) for r in per_rate]
                d = [per_rate[r]["MAE"] for r in per_rate]
                ax.plot(rates, [x["mean"] for x in d], style, color=color, ms=3,
                        label=f"{model.upper()} {proto}")
                # NaN bounds (one shared seed) draw no band.
                ax.fill_between(rates, [x["lo"] for x in d], [x["hi"] for x in d], color=color,
                                alpha=0.15)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_title(f"Δ MAE vs {paired['reference'].upper()} (paired, 95% CI)", fontsize=9)
        ax.set_xlabel("missing rate r")
        ax.legend(fontsize=6)
    for ax, m in zip(axes, metrics):  # zip stops before the paired panel
        for color, (model, res) in zip(colors, per_model.items()):
            for proto, style in (("honest", "-o"), ("paper", "--s")):
                per_rate = res["protocols"][proto]["per_rate"]
                rates = [float(r) for r in per_rate]
                mean = np.array([per_rate[r][m]["mean"] for r in per_rate])
                std = np.array([per_rate[r][m]["std"] for r in per_rate])
                ax.plot(rates, mean, style, color=color, ms=3, label=f"{model.upper()} {proto}")
                ax.fill_between(rates, mean - std, mean + std, color=color, alpha=0.15)
        ax.axhline(first["baselines"]["constant"][m], color="gray", lw=0.8, ls=":",
                   label="constant")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("missing rate r")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{ds.upper()} ({label} data): " + " vs ".join(m.upper() for m in per_model),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def fmt(metric: str, v: float) -> str:
    """A metric as the tables print it: MAE / Corr with 3 decimals, accuracies and F1 in %."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.3f}" if metric in ("MAE", "Corr") else f"{100 * v:.2f}"


def mean_std(metric: str, v: dict, n_seeds: int | None = None) -> str:
    """{"mean", "std"} as "mean ± std"; with one seed only the mean (a spread of one is no
    spread, and "± 0.00" would read as a measured one)."""
    return fmt(metric, v["mean"]) + ("" if n_seeds == 1 else f" ± {fmt(metric, v['std'])}")


def row_cells(dataset: str, values: dict, std: bool = False,
              n_seeds: int | None = None) -> list[str]:
    """The cells of one table row in the `TABLE_COLUMNS` layout; `values[m]` a number or
    {"mean", "std"} (with `std`: "mean ± std", unless `n_seeds` is 1)."""
    cells = []
    for _, metrics in TABLE_COLUMNS[dataset]:
        parts = []
        for m in metrics:
            v = values[m]
            if isinstance(v, dict):
                parts.append(mean_std(m, v, n_seeds) if std else fmt(m, v["mean"]))
            else:
                parts.append(fmt(m, v))
        cells.append(" / ".join(parts))
    return cells


ONE_SEED = ("One seed: no spread and no interval; a single seed cannot compare models or "
            "measure how much selecting on the test split flatters a number.")

_BEHAVIOUR_WORDS = {"train_masks": "training masks", "rate_input": "missing-rate input",
                    "eval_z": "EASE evaluation z ="}


def behaviour_line(behaviour: dict | None) -> str | None:
    """results' "behaviour" dict (`config.behaviour`) as one line, e.g. {"train_masks":
    "redrawn", "eval_z": "mean", "name": "default"} -> "Behaviour (default): training masks
    redrawn, EASE evaluation z = mean"; None without one."""
    if not behaviour:
        return None
    name = f" ({behaviour['name']})" if behaviour.get("name") else ""
    return f"Behaviour{name}: " + ", ".join(f"{_BEHAVIOUR_WORDS.get(k, k)} {v}"
                                           for k, v in behaviour.items() if k != "name")


def paired_rows(dataset: str, paired: dict, name: str) -> list[str]:
    """Table rows "| name | condition | cells |" of a `evaluate.paired_tables` dict: the 10-rate
    and kept-subset means, then every rate and subset; cells "mean [lo, hi]" per metric."""
    def row(cond: str, d: dict) -> str:
        cells = [" / ".join(_interval(m, d[m]) for m in ms) for _, ms in TABLE_COLUMNS[dataset]]
        return f"| {name} | {cond} | " + " | ".join(cells) + " |"

    lines = [row("mean over r", paired["mean_over_rates"])]
    if "mean_over_subsets" in paired:
        lines.append(row("mean over kept subsets", paired["mean_over_subsets"]))
    lines += [row(f"r = {r}", d) for r, d in paired["per_rate"].items()]
    lines += [row(f"kept {{{','.join(sub)}}}", d)
              for sub, d in paired.get("inter_modal", {}).items()]
    return lines



def pooled_line(sources: list[dict]) -> str:
    """The header line of a run pooled by `experiments.pool` from several runs' seeds."""
    parts = ", ".join(f"{src['path']} (seeds {', '.join(map(str, src['seeds']))})"
                      for src in sources)
    return (f"Seeds pooled from {len(sources)} runs of the same configuration on the same data "
            f"(`python -m experiments.pool`): {parts}.")


def results_markdown(results: dict, model: str, label: str) -> str:
    ds = results["dataset"]
    head = [name for name, _ in TABLE_COLUMNS[ds]]
    n_seeds = len(results["seeds"])
    behaviour = behaviour_line(results.get("behaviour"))
    lines = [f"# {model.upper()} on {ds.upper()} ({label} data: {results['data']['source']})", "",
             *([behaviour, ""] if behaviour else []),
             *([pooled_line(results["pooled_from"]), ""] if results.get("pooled_from") else []),
             *([ONE_SEED, ""] if n_seeds == 1 else []),
             f"Intra-modal missingness, mean over r = 0.0 ... 0.9; {n_seeds} seed(s)"
             + (", mean ± std over seeds" if n_seeds > 1 else "")
             + ". Accuracies and F1 in %. Paper rows are the papers' numbers (paper "
             "protocol, real MMSA data); they are comparable to ours only on the same data.", "",
             "| row | protocol | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(head)]
    for name, vals in PAPER_ROWS[ds].items():
        cells = [f"{v:.3f}" if i >= len(vals) - 2 else f"{v:.2f}" for i, v in enumerate(vals)]
        merged, i = [], 0
        for _, metrics in TABLE_COLUMNS[ds]:
            merged.append(" / ".join(cells[i:i + len(metrics)]))
            i += len(metrics)
        lines.append(f"| {name} | paper (test-selected) | " + " | ".join(merged) + " |")
    for proto, desc in (("paper", "paper (test-selected)"), ("honest", "honest (valid MAE)")):
        lines.append(f"| {model.upper()} (ours) | {desc} | " + " | ".join(
            row_cells(ds, results["protocols"][proto]["mean_over_rates"], True, n_seeds)) + " |")
    lines.append("| constant (train median) | - | "
                 + " | ".join(row_cells(ds, results["baselines"]["constant"])) + " |")
    inflation = results.get("selection_inflation")
    if inflation:
        lines += ["", "## Selection inflation: how much selecting on the test split flatters each "
                  "number", "",
                  "Paper protocol minus honest protocol, paired by seed, mean [95% Student-t "
                  "interval]; accuracies and F1 in points. Negative MAE and positive accuracy, F1 "
                  "and Corr: the test-selected number reads better than the valid-selected one."
                  + (" One seed: the difference of that seed, no interval." if n_seeds == 1
                     else ""), "",
                  "| condition | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for key, cond in (("per_rate_mean", "mean over r"),
                          ("subset_mean", "mean over kept subsets")):
            if key in inflation:
                cells = [" / ".join(_interval(m, inflation[key][m]) for m in ms)
                         for _, ms in TABLE_COLUMNS[ds]]
                lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    for proto in ("honest", "paper"):
        agg = results["protocols"][proto]
        lines += ["", f"## Per missing rate, {proto} protocol", "",
                  "| r | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for r, vals in agg["per_rate"].items():
            lines.append(f"| {r} | " + " | ".join(row_cells(ds, vals)) + " |")
        if agg.get("inter_modal"):
            lines += ["", f"## Inter-modal (kept modalities), {proto} protocol", "",
                      "| kept | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
            for s, vals in agg["inter_modal"].items():
                lines.append(f"| {{{','.join(s)}}} | " + " | ".join(row_cells(ds, vals)) + " |")
            lines.append("| mean | " + " | ".join(row_cells(ds, agg["mean_over_subsets"])) + " |")
            lines += single_modality_table(ds, agg, proto, n_seeds)
        if agg.get("burst"):
            lines += ["", f"## Burst missingness (beyond the papers), {proto} protocol", "",
                      "| r | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
            for r, vals in agg["burst"].items():
                lines.append(f"| {r} | " + " | ".join(row_cells(ds, vals)) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path, label: str) -> None:
    """Metric vs missing rate (like the EASE paper's Fig. 3), both protocols, mean ± std."""
    plot_comparison({results.get('model', 'model'): results}, path, label)


def plot_training(results: dict, path: Path, label: str) -> None:
    """Training as it went, one line per seed: training loss, valid MAE and test MAE at the
    selection rate per epoch, from results["seeds"][seed]["history"] (entries {"epoch" (1-based),
    "train": {"total" (or "loss"), ...}, "valid": {metric: v}, "test": {metric: v}}). The honest
    protocol's epoch (selected_epochs["honest"], 1-based) is a star on the valid curve, the paper
    protocol's MAE choice (selected_epochs["paper:MAE"]) a cross on the test curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate = results.get("config", {}).get("train", {}).get("eval_rate", 0.5)
    panels = (("training loss", lambda h: h["train"].get("total", h["train"].get("loss"))),
              ("valid MAE", lambda h: h["valid"]["MAE"]),
              (f"test MAE at r = {rate:g}", lambda h: h["test"]["MAE"]))
    marks = {1: ("honest", "*"), 2: ("paper:MAE", "x")}  # panel -> (criterion, marker)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (seed, entry) in enumerate(results["seeds"].items()):
        history = entry.get("history") or []
        epochs = [h["epoch"] for h in history]
        color = colors[k % len(colors)]
        for i, (ax, (title, value)) in enumerate(zip(axes, panels)):
            ys = [value(h) for h in history]
            ax.plot(epochs, ys, "-", color=color, lw=1, label=f"seed {seed}" if i == 0 else None)
            crit, marker = marks.get(i, (None, None))
            chosen = entry.get("selected_epochs", {}).get(crit)
            if chosen in epochs:  # one legend entry per criterion, not per seed
                ax.plot([chosen], [ys[epochs.index(chosen)]], marker, color=color, ms=9,
                        label=f"{crit} choice" if k == 0 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{results.get('model', 'model').upper()} on {results['dataset'].upper()} "
                 f"({label} data): training, {len(results['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def jsonable(x):
    """`x` with NumPy scalars, tuples and dataclasses turned into JSON types."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if dataclasses.is_dataclass(x):
        return jsonable(dataclasses.asdict(x))
    return str(x)


# Table 6 (docs/protocol.md section 11): removing one modality = keeping the other two.
SINGLE_MODALITY_ROWS = (("all (r = 0)", "per_rate", "0.0"), ("w/o {v}", "inter_modal", "la"),
                        ("w/o {a}", "inter_modal", "lv"), ("w/o {l}", "inter_modal", "av"))


def single_modality_table(dataset: str, agg: dict, proto: str,
                          n_seeds: int | None = None) -> list[str]:
    """Table 6 (single-modality ablation) as a view of the inter-modal results: no retraining,
    the same model with one modality removed at test time (mean ± std over seeds)."""
    head = [name for name, _ in TABLE_COLUMNS[dataset]]
    lines = ["", f"## Single-modality ablation (Table 6 view of the rows above), {proto} protocol",
             "", "| input | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, section, cond in SINGLE_MODALITY_ROWS:
        if cond in agg.get(section, {}):
            lines.append(f"| {name} | " + " | ".join(
                row_cells(dataset, agg[section][cond], True, n_seeds)) + " |")
    return lines


def write_outputs(out: Path, stem: str, results: dict, markdown: str, plot, log=print) -> None:
    """A study command's files: `<stem>.json` (results), `<stem>.md` (markdown, also printed)
    and `<stem>.png` (`plot(path)`), under `out`."""
    out = Path(out)
    write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(markdown)
    plot(out / f"{stem}.png")
    log(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}, {out / f'{stem}.png'}")
    print(markdown)


def write_run_reports(out: Path, results: dict, label: str, log=print) -> None:
    """A sweep's files for one model under `out`: results.json, results.md (also printed),
    curves.png and training.png."""
    out = Path(out)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(results, results["model"], label))
    plot_curves(results, out / "curves.png", label)
    plot_training(results, out / "training.png", label)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}, "
        f"{out / 'training.png'}")
    print((out / "results.md").read_text())


def write_comparison(out: Path, per_model: dict, label: str, log=print) -> dict:
    """comparison.json / .md (also printed) / .png under `out` for several runs' results
    (`per_model` {name: results}, the first the reference); returns `evaluate.compare_models`."""
    from ease_jax.evaluate import compare_models

    comparison = compare_models(per_model)
    write_outputs(out, "comparison", comparison, comparison_markdown(comparison, label),
                  lambda path: plot_comparison(per_model, path, label,
                                               paired=comparison["paired"]), log)
    return comparison


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON (NaN allowed, as the metrics of a constant predictor need)."""
    Path(path).write_text(json.dumps(jsonable(obj), indent=1, allow_nan=True))


# Table 4 columns (docs/protocol.md section 11) and the metric whose paired difference is shown.
ABLATION_COLUMNS = {
    "mosi": (("F1 has0/non0", ("Has0_F1_score", "Non0_F1_score")), ("Acc-5", ("Mult_acc_5",)),
             ("MAE", ("MAE",))),
    "sims": (("F1", ("F1_score",)), ("Acc-5", ("Mult_acc_5",)), ("MAE", ("MAE",))),
}
ABLATION_COLUMNS["mosei"] = ABLATION_COLUMNS["mosi"]


def _interval(metric: str, d: dict) -> str:
    scale = 1.0 if metric in ("MAE", "Corr") else 100.0
    digits = 3 if metric in ("MAE", "Corr") else 2
    mean = f"{scale * d['mean']:+.{digits}f}"
    if d["n"] < 2 or not np.isfinite(d["lo"]):
        return mean
    return f"{mean} [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]"


# The paper's MOSI rows of Table 4: F1 has0, F1 non0, Acc-5 (10-rate means, paper protocol).
PAPER_ABLATION_MOSI = {
    "EASE": (73.66, 74.79, 39.57), "w/o UCMI": (72.15, 72.98, 37.26),
    "w/o UCSA": (72.80, 73.84, 38.65), "w/o MIPC": (72.67, 73.41, 38.02),
    "w/o ALL": (71.47, 72.38, 36.53), "w/o L_uada": (73.14, 74.23, 39.06),
    "w/o L_anchor": (72.95, 73.96, 38.81), "w/o L_cons": (73.15, 73.92, 38.77),
    "w/o L_asym": (72.88, 73.68, 38.40),
}


def ablation_markdown(results: dict, label: str) -> str:
    """Table 4's layout: per protocol, every variant's 10-rate means (mean ± std over seeds),
    its paired difference from EASE with a 95% interval, and the paper's MOSI row."""

    ds = results["dataset"]
    cols = ABLATION_COLUMNS[ds]
    diff_metrics = [(name, ms[-1]) for name, ms in cols]
    n = len(results["seeds"])
    lines = [f"# EASE ablations (Table 4) on {ds.upper()} ({label} data: "
             f"{results['data']['source']})", "",
             f"10-rate means over r = 0.0 ... 0.9, {n} seed(s) ({', '.join(map(str, results['seeds']))}),"
             " mean ± std over seeds; Δ = variant - EASE, paired by seed, mean [95% t-interval] "
             "(no interval with one seed). Accuracies and F1 in %. Paper rows: the EASE paper's "
             "MOSI Table 4 (paper protocol, real data), comparable to ours only on the same data.",
             ""]
    diff_names = {"Non0_F1_score": "Δ F1 non0", "F1_score": "Δ F1", "Mult_acc_5": "Δ Acc-5",
                  "MAE": "Δ MAE"}
    head = [name for name, _ in cols] + [diff_names[m] for _, m in diff_metrics]
    for proto, desc in (("honest", "honest protocol (valid-selected)"),
                        ("paper", "paper protocol (test-selected)")):
        lines += [f"## {desc}", "", "| variant | " + " | ".join(head)
                  + (" | paper F1 has0/non0 | paper Acc-5 |" if ds == "mosi" else " |"),
                  "|---|" + "---|" * (len(head) + (2 if ds == "mosi" else 0))]
        for v, entry in results["variants"].items():
            means = entry["protocols"][proto]["mean_over_rates"]
            cells = [" / ".join(mean_std(m, means[m], n) for m in ms) for _, ms in cols]
            paired = entry.get("paired", {}).get(proto)
            cells += ["-" if v == "EASE" or paired is None else _interval(m, paired[m])
                      for _, m in diff_metrics]
            if ds == "mosi":
                paper = PAPER_ABLATION_MOSI.get(v)
                cells += [f"{paper[0]:.2f} / {paper[1]:.2f}", f"{paper[2]:.2f}"] if paper \
                    else ["-", "-"]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_ablation(results: dict, path: Path, label: str) -> None:
    """Every variant's paired difference from EASE (95% interval bars), one panel per Table 4
    metric, both protocols."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = results["dataset"]
    metrics = [(name, ms[-1]) for name, ms in ABLATION_COLUMNS[ds]]
    variants = [v for v in results["variants"] if v != "EASE"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 0.45 * len(variants) + 1.6))
    y = np.arange(len(variants))
    for ax, (name, m) in zip(np.atleast_1d(axes), metrics):
        scale = 1.0 if m in ("MAE", "Corr") else 100.0
        for k, (proto, color) in enumerate((("honest", "C0"), ("paper", "C1"))):
            d = [results["variants"][v]["paired"][proto][m] for v in variants]
            mean = np.array([x["mean"] for x in d]) * scale
            lo = np.array([x["lo"] for x in d]) * scale
            hi = np.array([x["hi"] for x in d]) * scale
            err = np.nan_to_num(np.stack([mean - lo, hi - mean]), nan=0.0)
            ax.errorbar(mean, y + (k - 0.5) * 0.25, xerr=err, fmt="o", color=color, ms=4,
                        capsize=2, label=proto)
        ax.axvline(0.0, color="gray", lw=0.8)
        ax.set_yticks(y, variants, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"Δ {name} ({m}) vs EASE", fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"EASE ablations on {ds.upper()} ({label} data), {len(results['seeds'])} seed(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SENSITIVITY_METRICS = (("Acc-5", "Mult_acc_5"), ("MAE", "MAE"))


def sensitivity_markdown(results: dict, label: str) -> str:
    """Fig. 7 as tables: per protocol and weight, Acc-5 and MAE (10-rate means, mean ± std over
    seeds) against the weight's value, the other two at the preset."""
    ds = results["dataset"]
    lines = [f"# EASE loss-weight sensitivity (Fig. 7) on {ds.upper()} ({label} data: "
             f"{results['data']['source']})", "",
             "Eq. 13: L_sp + l1 L_ucmi + l2 (L_uada + 0.02 L_anchor) + l3 (L_cons + L_asym); one "
             "weight varies, the others stay at l1 = 0.5, l2 = 0.2, l3 = 0.5. 10-rate means, "
             f"{len(results['seeds'])} seed(s), mean ± std over seeds; Acc-5 in %.", ""]
    for proto, desc in (("honest", "honest protocol (valid-selected)"),
                        ("paper", "paper protocol (test-selected)")):
        lines += [f"## {desc}", "", "| value | " + " | ".join(
            f"{w} {name}" for w in ("l1", "l2", "l3") for name, _ in SENSITIVITY_METRICS) + " |",
                  "|---|" + "---|" * 6]
        by = {(pt["weight"], pt["value"]): pt["protocols"][proto] for pt in results["points"]}
        for v in results["values"]:
            cells = []
            for w in ("l1", "l2", "l3"):
                for _, m in SENSITIVITY_METRICS:
                    x = by[(w, float(v))][m]
                    cells.append(mean_std(m, x, len(results["seeds"])))
            lines.append(f"| {v:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sensitivity(results: dict, path: Path, label: str) -> None:
    """Acc-5 and MAE against each weight (log-scaled value axis), both protocols, ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(10, 5.4), sharex=True)
    for col, w in enumerate(("l1", "l2", "l3")):
        pts = sorted((pt for pt in results["points"] if pt["weight"] == w),
                     key=lambda pt: pt["value"])
        values = [pt["value"] for pt in pts]
        for row, (name, m) in enumerate(SENSITIVITY_METRICS):
            ax = axes[row, col]
            scale = 100.0 if m != "MAE" else 1.0
            for proto, style in (("honest", "-o"), ("paper", "--s")):
                mean = np.array([pt["protocols"][proto][m]["mean"] for pt in pts]) * scale
                std = np.array([pt["protocols"][proto][m]["std"] for pt in pts]) * scale
                ax.plot(values, mean, style, ms=3, label=proto)
                ax.fill_between(values, mean - std, mean + std, alpha=0.2)
            ax.set_xscale("log")
            ax.set_title(f"{name} vs {w}", fontsize=9)
            if row == 1:
                ax.set_xlabel(f"{w} (others at the preset)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"EASE loss-weight sensitivity on {results['dataset'].upper()} ({label} data), "
                 f"{len(results['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
