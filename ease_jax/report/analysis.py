"""The Markdown and plots of `experiments.analyze` (docs/protocol.md section 11): calibration
(Fig. 4), elastic alignment (Fig. 5 / 8) and cross-view consistency (Fig. 6 / 9), given the
summary and arrays of `diagnostics.analyze_run`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The papers' numbers (docs/protocol.md section 11), quoted beside ours.
PAPER_KS = "MOSEI test: audio 0.076, vision 0.083 (condition not stated)"
PAPER_ELASTIC = "~0.4 for language (MOSEI / MOSI)"
PAPER_CONSISTENCY = {"w/o MIPC (paper, MOSEI)": (0.1748, 0.6153, None),
                     "with MIPC (paper, MOSEI)": (0.0288, 0.7328, 0.398)}



# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    v = float(v)
    return "nan" if not np.isfinite(v) else f"{v:.{digits}f}"


def _run_label(s: dict) -> str:
    name = s["model"].upper()
    if s.get("variant") and s["variant"] != "EASE":  # an ablation variant
        name += f" [{s['variant']}]"
    elif s["model"] == "ease":
        name += "" if s["use_ucmi"] else " w/o UCMI"
        name += "" if s["use_mipc"] else " w/o MIPC"
    return name


def analysis_markdown(s: dict) -> str:
    seeds = ", ".join(str(x) for x in s["seeds"])
    epochs = ", ".join(f"{v} (seed {k})" for k, v in s["epochs"].items())
    intro = (f"Run `{s['run']}`; {s['split']} split of `{s['data']['source']}` "
             f"({s['n_samples']} samples); seeds {seeds} (honest checkpoints of epoch {epochs}); "
             "numbers pooled over the seeds' samples (per seed in analysis.json). Condition of "
             f"the completed input: **{s['condition']['label']}** (evaluation masks of the LNLN "
             "protocol, seed 1111).")
    lines = [f"# Analyses of {_run_label(s)} on {s['dataset'].upper()} ({s['label']} data)", "",
             intro, ""]
    if s["data"].get("sha256_matches") is False:
        warning = (f"**WARNING**: the data's sha256 ({s['data']['sha256']}) is not the one the "
                   f"run was trained on ({s['data']['trained_on']['sha256']}).")
        lines += [warning, ""]
    if "calibration" in s:
        text = ("Standardized residuals (c - mu) / sqrt(var) of the imputed tokens against the "
                "clean tokens, per element; a calibrated imputer gives N(0, 1). KS = "
                "Kolmogorov-Smirnov statistic against N(0, 1) (0 = perfect). "
                f"Paper: {PAPER_KS}.")
        lines += ["## Calibration of the UCMI Gaussian (Fig. 4)", "", text, "",
                  "| modality | KS | KS per seed | mean | std | P(abs > 3) | n |",
                  "|---|---|---|---|---|---|---|"]
        for m, v in s["calibration"]["pooled"].items():
            per = " / ".join(_f(e[m]["ks"]) for e in s["calibration"]["per_seed"].values())
            lines.append(f"| {m} | {_f(v['ks'])} | {per} | {_f(v['mean'], 3)} | "
                         f"{_f(v['std'], 3)} | {_f(v['frac_abs_gt_3'])} | {v['n']} |")
        text = ("Difficulty e = ||pooled clean - pooled imputation||^2 per sample; rigid "
                f"penalty = e, elastic = e / psi, psi = 1 + alpha u / 2 (alpha = {s['alpha']:g}, "
                "u = the imputation's uncertainty). Ratio = mean(elastic) / mean(rigid) "
                f"(paper: {PAPER_ELASTIC}); corr(e, u) = Pearson of difficulty and "
                "uncertainty.")
        lines += ["", "## Elastic alignment (Fig. 5 / 8)", "", text, "",
                  "| modality | elastic / rigid | per seed | mean e | mean u | corr(e, u) | n |",
                  "|---|---|---|---|---|---|---|"]
        for m, v in s["elastic"]["pooled"].items():
            per = " / ".join(_f(e[m]["ratio"], 3) for e in s["elastic"]["per_seed"].values())
            lines.append(f"| {m} | {_f(v['ratio'], 3)} | {per} | {_f(v['mean_rigid'], 3)} | "
                         f"{_f(v['mean_uncertainty'], 3)} | "
                         f"{_f(v['pearson_difficulty_uncertainty'], 3)} | {v['n']} |")
        lines.append("")
    else:
        lines += [f"**Consistency only**: {s['note']}", ""]
    text = ("Predictions of the same samples from the observed full input (no masks) and from "
            f"the completed input ({s['condition']['label']}): 1-D Wasserstein distance between "
            "the two prediction distributions, instance Pearson correlation and MAE of the "
            "pairs.")
    lines += ["## Cross-view consistency (Fig. 6 / 9)", "", text, "",
              "| run | Wasserstein | Pearson | MAE | per seed (W / Pearson / MAE) | n |",
              "|---|---|---|---|---|---|"]
    rows = [("ours: " + _run_label(s), s)]
    if "baseline" in s:
        rows.append(("baseline: " + _run_label(s["baseline"]) + f" (`{s['baseline']['run']}`)",
                     s["baseline"]))
    for name, r in rows:
        c = r["consistency"]["pooled"]
        per = "; ".join(f"{_f(e['wasserstein'])} / {_f(e['pearson'])} / {_f(e['mae'])}"
                        for e in r["consistency"]["per_seed"].values())
        lines.append(f"| {name} | {_f(c['wasserstein'])} | {_f(c['pearson'])} | "
                     f"{_f(c['mae'])} | {per} | {c['n']} |")
    for name, (w, p, mae) in PAPER_CONSISTENCY.items():
        lines.append(f"| {name} | {_f(w)} | {_f(p)} | {_f(mae, 3)} | | |")
    if "baseline" in s and "calibration" in s["baseline"]:
        b = s["baseline"]
        ks = ", ".join(f"{m} {_f(v['ks'])}" for m, v in b["calibration"]["pooled"].items())
        ratio = ", ".join(f"{m} {_f(v['ratio'], 3)}" for m, v in b["elastic"]["pooled"].items())
        lines += ["", f"Baseline (pooled): calibration KS {ks}; elastic / rigid {ratio}."]
    lines += ["", "Files: " + ", ".join(s["files"]) + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(res: dict, path: Path, label: str) -> None:
    """Fig. 4: per modality a histogram of the pooled standardized residuals (density) with the
    N(0, 1) density and the KS statistic."""
    plt = _plt()
    s, residuals = res["summary"], res["arrays"]["residuals"]
    fig, axes = plt.subplots(1, len(residuals), figsize=(3.6 * len(residuals), 3.0))
    grid = np.linspace(-5, 5, 401)
    normal = np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi)
    for ax, (m, r) in zip(axes, residuals.items()):
        ax.hist(np.clip(r, -5, 5), bins=80, range=(-5, 5), density=True, alpha=0.6,
                label="residuals")
        ax.plot(grid, normal, "k-", lw=1.2, label="N(0, 1)")
        ks = s["calibration"]["pooled"][m]["ks"]
        ax.set_title(f"{m}: KS = {ks:.3f}", fontsize=9)
        ax.set_xlabel("(c - mu) / sqrt(var)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{s['dataset'].upper()} ({label}), {s['model'].upper()}, "
                 f"{s['condition']['label']}: UCMI calibration", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_elastic(res: dict, path: Path, label: str) -> None:
    """Fig. 5 / 8: per modality the rigid and elastic penalties (normalised by the largest rigid
    penalty) against the percentile rank of the difficulty, samples and binned means."""
    plt = _plt()
    s, pens = res["summary"], res["arrays"]["elastic"]
    fig, axes = plt.subplots(1, len(pens), figsize=(3.6 * len(pens), 3.0))
    for ax, (m, pen) in zip(axes, pens.items()):
        scale = float(np.max(pen["rigid"])) or 1.0
        order = np.argsort(pen["rank"], kind="stable")
        ax.plot(pen["rank"][order], pen["rigid"][order] / scale, "-", color="tab:gray", lw=1.2,
                label="rigid")
        ax.scatter(pen["rank"], pen["elastic"] / scale, s=3, color="tab:blue", alpha=0.35,
                   label="elastic")
        binned = s["elastic"]["pooled"][m]["binned"]
        ax.plot(binned["rank_centre"], np.asarray(binned["elastic"]) / scale, "o-",
                color="tab:blue", ms=3, lw=1.2, label="elastic (binned mean)")
        ratio = s["elastic"]["pooled"][m]["ratio"]
        ax.set_title(f"{m}: elastic / rigid = {ratio:.3f}", fontsize=9)
        ax.set_xlabel("difficulty percentile rank")
        ax.set_ylabel("penalty / max rigid")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{s['dataset'].upper()} ({label}), {s['model'].upper()}, "
                 f"{s['condition']['label']}: elastic vs rigid alignment", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_consistency(res: dict, baseline: dict | None, path: Path, label: str) -> None:
    """Fig. 6 / 9: scatter of (full-input, completed-input) predictions around the diagonal, ours
    and, with a baseline, the baseline's beside it (same axes)."""
    plt = _plt()
    panels = [("ours", res)] + ([("baseline", baseline)] if baseline is not None else [])
    lo = min(min(r["arrays"]["full"].min(), r["arrays"]["completed"].min()) for _, r in panels)
    hi = max(max(r["arrays"]["full"].max(), r["arrays"]["completed"].max()) for _, r in panels)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    for ax, (who, r) in zip(axes[0], panels):
        s = r["summary"]
        c = s["consistency"]["pooled"]
        ax.scatter(r["arrays"]["full"], r["arrays"]["completed"], s=5, alpha=0.5)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(f"{who}: {_run_label(s)}\nW {c['wasserstein']:.4f}, Pearson "
                     f"{c['pearson']:.4f}, MAE {c['mae']:.4f}", fontsize=8)
        ax.set_xlabel("prediction, full input")
        ax.set_ylabel(f"prediction, completed ({s['condition']['label']})")
    s = res["summary"]
    fig.suptitle(f"{s['dataset'].upper()} ({label}): cross-view consistency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


