"""The main job, shared by `mosi_sweep`, `mosei_sweep` and `sims_sweep`: train EASE or LNLN under
the LNLN missingness protocol on several seeds, evaluate every missing rate and modality subset,
select checkpoints by both protocols (PROTOCOL.md section 4), and write results.json, results.md,
curves.png and run.log under --out.

Without the MMSA pickle the job says where to put it and runs on embedded synthetic data with a
small configuration (labelled "synthetic" everywhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = {
    "mosi": "data/MOSI/Processed/unaligned_50.pkl",
    "mosei": "data/MOSEI/Processed/unaligned_50.pkl",
    "sims": "data/SIMS/Processed/unaligned_39.pkl",
}
BERT_NAMES = {"mosi": "bert-base-uncased", "mosei": "bert-base-uncased", "sims": "bert-base-chinese"}
# Small synthetic run: finishes in minutes on a 2-core CPU (see README).
SYNTHETIC = dict(n_train=384, n_valid=128, n_test=256, text_len=8, audio_len=8, vision_len=8)
SYNTHETIC_TRAIN = dict(epochs=24, warmup_epochs=3, lr=1e-3, seeds=(1111,))
# ... and a narrower model (the papers' depths and token counts, width 64 and 4 heads of 16 instead
# of 128 and 8 heads of 64): 8x fewer FLOPs per position, so both models train in minutes.
SYNTHETIC_MODEL = dict(dim=64, heads=4, dim_head=16, mlp_dim=64)

# Paper numbers (PROTOCOL.md section 10; EASE paper Tables 1-2): 10-rate means, paper protocol.
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


def parse_args(dataset: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}_sweep",
        description=f"Train and evaluate EASE / LNLN on {dataset.upper()} under the LNLN "
                    "missingness protocol; writes results.json, results.md, curves.png, run.log.")
    p.add_argument("--data", default=DEFAULT_DATA[dataset],
                   help="MMSA pickle (default: %(default)s); synthetic data when absent")
    p.add_argument("--model", type=_model_list, default=("ease", "lnln"),
                   help="ease, lnln or a comma-separated list (default: ease,lnln); several "
                        "models each write under --out/<model> plus a comparison there")
    p.add_argument("--seeds", default=None, help="comma-separated (default 1111,1112,1113)")
    p.add_argument("--epochs", type=int, default=None, help="default 200")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 1e-5 EASE, 1e-4 LNLN")
    p.add_argument("--text-encoder", choices=("bert", "features"), default=None,
                   help="bert: fine-tune BERT from text ids (the papers, default); features: "
                        "precomputed MMSA `text` features (frozen BERT)")
    p.add_argument("--bert", default=None,
                   help=f"Hugging Face checkpoint directory (default: {BERT_NAMES[dataset]} in "
                        "the local Hugging Face cache)")
    p.add_argument("--loss-preset", choices=("code", "paper"), default="code")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="matmul precision: bf16 = bfloat16 matmuls with float32 parameters, "
                        "softmax, normalisation and losses (for GPUs; default fp32)")
    p.add_argument("--parallel", choices=("pmap", "shard_map"), default="pmap")
    p.add_argument("--population", type=_population, default=None,
                   help="how many runs (seeds) share one compiled program: N, or auto (as many "
                        "as the device memory holds, from the compiled program's footprint); "
                        "default all seeds; 1 trains the seeds one after another")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="save the resumable state at most this often (and after the last "
                        "epoch); 0 = every epoch (default %(default)s)")
    p.add_argument("--burst", action="store_true",
                   help="also evaluate burst (temporally correlated) missingness at every rate")
    p.add_argument("--out", default=None,
                   help=f"output directory (default runs/{dataset}_<model> for one model, "
                        f"runs/{dataset} for several)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _population(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of runs >= 1 or 'auto', got {text!r}")
    return n


def _model_list(text: str) -> tuple[str, ...]:
    models = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in models if m not in ("ease", "lnln")]
    if not models or bad or len(set(models)) != len(models):
        raise argparse.ArgumentTypeError(
            f"expected ease, lnln or a comma-separated list of them without repeats, got {text!r}")
    return models


def find_bert(dataset: str, given: str | None) -> Path:
    """The BERT checkpoint directory: --bert, else the Hugging Face cache's snapshot."""
    if given:
        return Path(given)
    import os

    hub = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get(
        "HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"))
    name = BERT_NAMES[dataset]
    snaps = sorted((hub / f"models--{name}" / "snapshots").glob("*/config.json"))
    if not snaps:
        raise SystemExit(
            f"BERT mode needs {name} weights: pass --bert DIR (a directory with config.json and "
            f"model.safetensors) or put {name} in the Hugging Face cache ({hub}); or run with "
            "--text-encoder features to use the pickle's precomputed text features.")
    return snaps[-1].parent


def load_data(args, dataset: str, log):
    from ease_jax.data.mmsa import from_raw, load_mmsa
    from ease_jax.data.synthetic import synthetic

    path = Path(args.data)
    if path.is_file():
        return load_mmsa(path), False
    log(f"NOTE: {path} not found. Put the MMSA pickle there ({DEFAULT_DATA[dataset]}: a dict "
        "with train/valid/test splits holding text_bert, text, audio, vision, audio_lengths, "
        "vision_lengths, regression_labels; see data/README.md) or pass --data PATH. "
        "Running on SYNTHETIC data with a small configuration instead.")
    raw = synthetic(dataset, seed=0, **SYNTHETIC)
    return from_raw(raw, source=f"synthetic:{dataset}(seed=0)"), True


def build_run(args, dataset: str, data, is_synthetic: bool, model: str | None = None):
    """(ModelConfig, LossConfig, TrainConfig) of `model` (default: the first of --model)."""
    from ease_jax.config import LossConfig, TrainConfig, model_config

    dims = data.dims
    text_encoder = args.text_encoder or ("features" if is_synthetic else "bert")
    overrides = dict(audio_len=dims["T_a"], audio_dim=dims["D_a"], vision_len=dims["T_v"],
                     vision_dim=dims["D_v"], text_encoder=text_encoder,
                     precision=getattr(args, "precision", "fp32"))
    if text_encoder == "features":
        if data.train.text_features is None:
            raise SystemExit(f"--text-encoder features needs the `text` key in {args.data}")
        overrides.update(text_len=dims["L_f"], text_dim=dims["D_t"])
    else:
        overrides.update(text_len=dims["L"])
    train_kw = dict(SYNTHETIC_TRAIN) if is_synthetic else {}
    if args.epochs is not None:
        train_kw["epochs"] = args.epochs
        train_kw["warmup_epochs"] = min(train_kw.get("warmup_epochs", 20), max(args.epochs // 10, 1))
    if args.lr is not None:
        train_kw["lr"] = args.lr
    if args.seeds:
        train_kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    train_kw["batch_size"] = args.batch_size
    loss = LossConfig.preset(args.loss_preset, dataset)
    model = model or args.model[0]
    if is_synthetic:
        overrides.update(SYNTHETIC_MODEL)
    return model_config(model, dataset, **overrides), loss, TrainConfig(**train_kw)


def main(dataset: str, argv=None) -> dict:
    """Run the sweep; returns the model's results (one model) or {"models": {model: results},
    "comparison": {...}} (several models, each written under --out/<model>)."""
    args = parse_args(dataset, argv)
    models = args.model
    single = len(models) == 1
    out = Path(args.out or (f"runs/{dataset}_{models[0]}" if single else f"runs/{dataset}"))
    out.mkdir(parents=True, exist_ok=True)
    logger = _logger(out / "run.log")
    log = logger.info
    log(f"command: {' '.join(sys.argv)}")

    import jax

    _enable_compilation_cache(jax)
    data, is_synthetic = load_data(args, dataset, log)
    label = "synthetic" if is_synthetic else "real"
    log(f"data: {data.source} ({label}; sha256 {data.sha256}); train/valid/test "
        f"{data.train.n}/{data.valid.n}/{data.test.n}; devices: {jax.devices()}")
    per_model = {}
    for model in models:
        model_out = out if single else out / model
        model_out.mkdir(parents=True, exist_ok=True)
        per_model[model] = run_model(args, dataset, data, is_synthetic, model, model_out, log)
    if single:
        return per_model[models[0]]
    comparison = compare_models(per_model)
    (out / "comparison.json").write_text(json.dumps(_jsonable(comparison), indent=1,
                                                    allow_nan=True))
    (out / "comparison.md").write_text(comparison_markdown(comparison, label))
    plot_comparison(per_model, out / "comparison.png", label)
    log(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'}, {out / 'comparison.png'}")
    print((out / "comparison.md").read_text())
    return {"models": per_model, "comparison": comparison}


def initial_params(mcfg, seed: int, bert_params=None):
    """Parameters a seed starts from: None (the train state initialises them from the seed) or,
    in BERT mode with a checkpoint, the seed's initialisation with the pretrained BERT inserted."""
    if bert_params is None:
        return None
    import jax

    from ease_jax.models import init_params

    params = init_params(mcfg, jax.random.key(seed))
    if jax.tree_util.tree_structure(params["encoder"]["bert"]) != \
            jax.tree_util.tree_structure(bert_params):
        raise ValueError("the BERT checkpoint's parameter tree does not match the model's BERT")
    params["encoder"]["bert"] = bert_params
    return params


def run_model(args, dataset: str, data, is_synthetic: bool, model: str, out: Path, log) -> dict:
    """Train and evaluate one model on every seed; writes results.json / .md and curves.png under
    `out` and returns the results dict."""
    from ease_jax.config import RunConfig, replace
    from ease_jax.evaluate import aggregate, protocol_table
    from ease_jax.fit import fit_population
    from ease_jax.metrics import regression_metrics
    from ease_jax.population import Run

    mcfg, loss, tcfg = build_run(args, dataset, data, is_synthetic, model)
    bert_params = None
    if mcfg.text_encoder == "bert":
        from ease_jax.bert import load_bert

        bert_dir = find_bert(dataset, args.bert)
        bert_module, bert_params = load_bert(bert_dir)
        mcfg = replace(mcfg, bert=bert_module.config, text_dim=bert_module.config.hidden_size)
        log(f"{model}: text encoder BERT fine-tuned from {bert_dir} (dropout "
            f"{mcfg.bert_config().hidden_dropout_prob} / "
            f"{mcfg.bert_config().attention_probs_dropout_prob} in training)")
    else:
        log(f"{model}: text encoder = precomputed text FEATURES (frozen BERT), not the papers' "
            "fine-tuned BERT")
    if not loss.use_mipc:
        mcfg = replace(mcfg, n_views=0)
    run = RunConfig(dataset=dataset, model=mcfg, loss=loss, train=tcfg)
    label = "synthetic" if is_synthetic else "real"

    seeds_out, seed_tables, t_start = {}, {"paper": [], "honest": []}, time.perf_counter()
    burst_rates = tuple(round(0.1 * i, 1) for i in range(10)) if args.burst else ()
    seeds = list(tcfg.seeds)
    size = population_size(args.population, run, data, len(seeds), log)
    for start in range(0, len(seeds), size):
        group = seeds[start : start + size]
        runs = [Run(seed) for seed in group]
        if len(group) > 1:
            log(f"{model}: seeds {', '.join(map(str, group))} train as one population")
        records = fit_population(
            run, data, runs, [out / r.label for r in runs],
            out / state_dir_name(runs), parallel=args.parallel, resume=args.resume,
            params=[initial_params(mcfg, seed, bert_params) for seed in group],
            burst_rates=burst_rates, log=log, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds)
        for seed, rec in zip(group, records):
            for protocol in seed_tables:
                seed_tables[protocol].append(protocol_table(dataset, rec["selected"], protocol))
            seeds_out[str(seed)] = {
                "selected_epochs": {c: r["epoch"] + 1 for c, r in rec["selected"].items()},
                "paper": seed_tables["paper"][-1], "honest": seed_tables["honest"][-1],
                "history": rec["history"], "seconds": rec["seconds"], "population": group,
            }

    median = float(np.median(data.train.labels))
    constant = regression_metrics(np.full(data.test.n, median), data.test.labels, dataset)
    results = {
        "dataset": dataset, "model": model,
        "data": {"source": data.source, "sha256": data.sha256, "synthetic": is_synthetic,
                 "sizes": [data.train.n, data.valid.n, data.test.n]},
        "config": run.to_dict() | {"model": _jsonable(dataclasses.asdict(mcfg))},
        "protocols": {p: aggregate(t) for p, t in seed_tables.items()},
        "baselines": {"constant": constant | {"value": median}},
        "seeds": seeds_out,
        "timings": {"total_seconds": time.perf_counter() - t_start,
                    "train_seconds": sum(s["seconds"]["train"] for s in seeds_out.values()),
                    "eval_seconds": sum(s["seconds"]["eval"] for s in seeds_out.values()),
                    "host_seconds": sum(s["seconds"]["host"] for s in seeds_out.values()),
                    "protocol_seconds": sum(s["seconds"]["protocol"] for s in seeds_out.values())},
    }
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1, allow_nan=True))
    (out / "results.md").write_text(results_markdown(results, model, label))
    plot_curves(results, out / "curves.png", label)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    print((out / "results.md").read_text())
    return results


def state_dir_name(runs) -> str:
    """The directory of a population's resumable state: the run's own directory for one run,
    else `population-<run>+<run>...` (a resume must group the runs the same way)."""
    if len(runs) == 1:
        return runs[0].label
    return "population-" + "+".join(r.label for r in runs)


def population_size(requested, run, data, n_runs: int, log) -> int:
    """How many runs share one program: all (default), N, or `auto`: the device memory (GPU
    `bytes_limit`, else 80% of the host RAM) over the per-run footprint of the compiled epoch
    program of one run (arguments + temporaries, XLA's memory analysis)."""
    if requested is None:
        return n_runs
    if requested != "auto":
        return max(1, min(int(requested), n_runs))
    from ease_jax.population import run_footprint_bytes
    from ease_jax.train import model_arrays

    per_run, shared = run_footprint_bytes(run, model_arrays(data.train, run.model))
    limit = device_memory_bytes() - shared
    size = max(1, min(n_runs, int(limit // max(per_run, 1))))
    log(f"--population auto: {per_run / 2**30:.2f} GiB per run (+{shared / 2**30:.2f} GiB of "
        f"data), {limit / 2**30:.1f} GiB available -> {size} run(s) per program")
    return size


def device_memory_bytes() -> float:
    """Memory one program may use: the accelerator's `bytes_limit`, else 80% of the host RAM."""
    import os

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.9 * float(stats["bytes_limit"])
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def comparison_markdown(comparison: dict, label: str) -> str:
    ds = comparison["dataset"]
    head = [name for name, _ in TABLE_COLUMNS[ds]]
    models = list(comparison["seeds"])
    lines = [f"# {' vs '.join(m.upper() for m in models)} on {ds.upper()} ({label} data: "
             f"{comparison['data']['source']})", "",
             "Test metrics, mean over seeds (" + ", ".join(
                 f"{m.upper()}: {len(s)} seed(s)" for m, s in comparison["seeds"].items())
             + "). Accuracies and F1 in %. Each model's own results.md has the paper rows, the "
               "per-seed spread and the other protocol's details.", ""]
    constant = _row(ds, comparison["baselines"]["constant"])
    for proto, desc in (("honest", "honest protocol (valid-selected)"),
                        ("paper", "paper protocol (test-selected)")):
        rows = comparison["protocols"][proto]
        lines += [f"## 10-rate mean and kept-modality mean, {desc}", "",
                  "| model | condition | " + " | ".join(head) + " |",
                  "|---|---|" + "---|" * len(head)]
        for model in models:
            lines.append(f"| {model.upper()} | mean over r | "
                         + " | ".join(_row(ds, rows[model]["mean_over_rates"], True)) + " |")
            if rows[model]["mean_over_subsets"]:
                lines.append(f"| {model.upper()} | mean over kept subsets | "
                             + " | ".join(_row(ds, rows[model]["mean_over_subsets"], True)) + " |")
        lines.append("| constant (train median) | - | " + " | ".join(constant) + " |")
        lines += ["", f"## MAE and Corr per missing rate, {desc}", "",
                  "| r | " + " | ".join(f"{m.upper()} MAE | {m.upper()} Corr" for m in models)
                  + " |", "|---|" + "---|---|" * len(models)]
        for r in rows[models[0]]["per_rate"]:
            cells = []
            for m in models:
                v = rows[m]["per_rate"][r]
                cells += [_fmt("MAE", v["MAE"]["mean"]), _fmt("Corr", v["Corr"]["mean"])]
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
                    cells += [_fmt("MAE", v["MAE"]["mean"]), _fmt("Corr", v["Corr"]["mean"])]
                lines.append(f"| {{{','.join(sub)}}} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Constant predictor MAE: {_fmt('MAE', comparison['baselines']['constant']['MAE'])}"
                 f"; Corr is undefined for it (NaN).")
    return "\n".join(lines) + "\n"


def plot_comparison(per_model: dict, path: Path, label: str) -> None:
    """All models' curves in one figure: metric vs missing rate, honest protocol solid and paper
    protocol dashed, mean ± std over seeds, the constant predictor dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(per_model.values()))
    ds = first["dataset"]
    metrics = [m for _, ms in TABLE_COLUMNS[ds] for m in ms[:1]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, metrics):
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


def _fmt(metric: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.3f}" if metric in ("MAE", "Corr") else f"{100 * v:.2f}"


def _row(dataset: str, values: dict, std: bool = False) -> list[str]:
    cells = []
    for _, metrics in TABLE_COLUMNS[dataset]:
        parts = []
        for m in metrics:
            v = values[m]
            if isinstance(v, dict):
                s = _fmt(m, v["mean"])
                if std:
                    s += f" ± {_fmt(m, v['std'])}"
            else:
                s = _fmt(m, v)
            parts.append(s)
        cells.append(" / ".join(parts))
    return cells


def results_markdown(results: dict, model: str, label: str) -> str:
    ds = results["dataset"]
    head = [name for name, _ in TABLE_COLUMNS[ds]]
    n_seeds = len(results["seeds"])
    lines = [f"# {model.upper()} on {ds.upper()} ({label} data: {results['data']['source']})", "",
             f"Intra-modal missingness, mean over r = 0.0 ... 0.9; {n_seeds} seed(s), mean ± std "
             "over seeds. Accuracies and F1 in %. Paper rows are the papers' numbers (paper "
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
        lines.append(f"| {model.upper()} (ours) | {desc} | "
                     + " | ".join(_row(ds, results["protocols"][proto]["mean_over_rates"], True))
                     + " |")
    lines.append("| constant (train median) | - | "
                 + " | ".join(_row(ds, results["baselines"]["constant"])) + " |")
    for proto in ("honest", "paper"):
        agg = results["protocols"][proto]
        lines += ["", f"## Per missing rate, {proto} protocol", "",
                  "| r | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for r, vals in agg["per_rate"].items():
            lines.append(f"| {r} | " + " | ".join(_row(ds, vals)) + " |")
        if agg.get("inter_modal"):
            lines += ["", f"## Inter-modal (kept modalities), {proto} protocol", "",
                      "| kept | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
            for s, vals in agg["inter_modal"].items():
                lines.append(f"| {{{','.join(s)}}} | " + " | ".join(_row(ds, vals)) + " |")
            lines.append("| mean | " + " | ".join(_row(ds, agg["mean_over_subsets"])) + " |")
        if agg.get("burst"):
            lines += ["", f"## Burst missingness (beyond the papers), {proto} protocol", "",
                      "| r | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
            for r, vals in agg["burst"].items():
                lines.append(f"| {r} | " + " | ".join(_row(ds, vals)) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path, label: str) -> None:
    """Metric vs missing rate (like the EASE paper's Fig. 3), both protocols, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = results["dataset"]
    metrics = [m for _, ms in TABLE_COLUMNS[ds] for m in ms[:1]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0))
    for ax, m in zip(axes, metrics):
        for proto, style in (("honest", "-o"), ("paper", "--s")):
            per_rate = results["protocols"][proto]["per_rate"]
            rates = [float(r) for r in per_rate]
            mean = np.array([per_rate[r][m]["mean"] for r in per_rate])
            std = np.array([per_rate[r][m]["std"] for r in per_rate])
            ax.plot(rates, mean, style, ms=3, label=proto)
            ax.fill_between(rates, mean - std, mean + std, alpha=0.2)
        ax.axhline(results["baselines"]["constant"][m], color="gray", lw=0.8, ls=":",
                   label="constant")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("missing rate r")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds.upper()} ({label} data)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    return str(x)


def _enable_compilation_cache(jax) -> None:
    """Persist compiled train / eval steps across runs (compiling the train step takes minutes on
    a CPU). Off with EASE_JAX_NO_COMPILATION_CACHE=1; location EASE_JAX_CACHE_DIR."""
    import os

    if os.environ.get("EASE_JAX_NO_COMPILATION_CACHE"):
        return
    cache = os.environ.get("EASE_JAX_CACHE_DIR", str(Path.home() / ".cache" / "ease_jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _logger(path: Path) -> logging.Logger:
    logger = logging.getLogger("ease_jax.sweep")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # libraries that configure the root logger would print twice
    logger.handlers.clear()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    logger.addHandler(sh)
    return logger
