"""The main job, shared by `mosi_sweep`, `mosei_sweep` and `sims_sweep`: train EASE or LNLN under
the LNLN missingness protocol on several seeds, evaluate every missing rate and modality subset,
select checkpoints by both protocols (docs/protocol.md section 4), and write results.json,
results.md, curves.png, training.png and run.log under --out (with several models, also the paired
comparison: comparison.json / .md / .png).

Without the MMSA pickle the job says where to put it and runs on synthetic data with a small
configuration (labelled "synthetic" everywhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ease_jax.config import behaviour
from ease_jax.report import jsonable, write_comparison, write_run_reports
from experiments import cli


def parse_args(dataset: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}_sweep",
        description=f"Train and evaluate EASE / LNLN on {dataset.upper()} under the LNLN "
                    "missingness protocol; writes results.json, results.md, curves.png, run.log.")
    p.add_argument("--model", type=cli.model_list, default=("ease", "lnln"),
                   help="ease, lnln or a comma-separated list (default: ease,lnln); several "
                        "models each write under --out/<model> plus a comparison there")
    cli.add_run_arguments(p, dataset)
    p.add_argument("--burst", action="store_true",
                   help="also evaluate burst (temporally correlated) missingness at every rate")
    p.add_argument("--out", default=None,
                   help=f"output directory (default runs/{dataset}_<model> for one model, "
                        f"runs/{dataset} for several)")
    return p.parse_args(argv)


def main(dataset: str, argv=None) -> dict:
    """Run the sweep; returns the model's results (one model) or {"models": {model: results},
    "comparison": {...}} (several models, each written under --out/<model>)."""
    args = parse_args(dataset, argv)
    models = args.model
    single = len(models) == 1
    out = Path(args.out or (f"runs/{dataset}_{models[0]}" if single else f"runs/{dataset}"))
    out, log, data, is_synthetic = cli.start_command(args, dataset, str(out))
    import jax

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
    if cli.is_primary():  # with several processes, process 0 writes the reports
        comparison = write_comparison(out, per_model, label, log)
    else:
        from ease_jax.evaluate import compare_models

        comparison = compare_models(per_model)
    return {"models": per_model, "comparison": comparison}


def run_model(args, dataset: str, data, is_synthetic: bool, model: str, out: Path, log) -> dict:
    """Train and evaluate one model on every seed; writes results.json / .md, curves.png and
    training.png under `out` and returns the results dict (with "selection_inflation":
    `evaluate.selection_inflation` of the per-seed paper and honest tables)."""
    from ease_jax.evaluate import RATES, constant_baseline, protocol_table, summarize_seeds
    from ease_jax.population import Run

    run, bert_params = cli.prepare_run(args, dataset, data, is_synthetic, model, log)
    mcfg = run.model
    label = "synthetic" if is_synthetic else "real"

    seeds_out, t_start = {}, time.perf_counter()
    burst_rates = RATES if args.burst else ()
    runs = [Run(seed) for seed in run.train.seeds]
    records = cli.train_runs(args, run, data, runs, out, log, bert_params, burst_rates)
    for r in runs:
        rec = records[r.label]
        seeds_out[str(r.seed)] = {
            "selected_epochs": {c: res["epoch"] + 1 for c, res in rec["selected"].items()},
            "paper": protocol_table(dataset, rec["selected"], "paper"),
            "honest": protocol_table(dataset, rec["selected"], "honest"),
            "history": rec["history"], "seconds": rec["seconds"],
            "population": rec["population"],
        }

    results = {
        "dataset": dataset, "model": model,
        "data": {"source": data.source, "sha256": data.sha256, "synthetic": is_synthetic,
                 "sizes": [data.train.n, data.valid.n, data.test.n]},
        "config": run.to_dict() | {"model": jsonable(dataclasses.asdict(mcfg))},
        "behaviour": behaviour(mcfg, run.train),
        **summarize_seeds(seeds_out),
        "baselines": {"constant": constant_baseline(data.train.labels, data.test.labels, dataset)},
        "seeds": seeds_out,
        "timings": {"total_seconds": time.perf_counter() - t_start,
                    **seed_seconds(seeds_out.values())},
    }
    if cli.is_primary():  # with several processes, process 0 writes the reports
        write_run_reports(out, results, label, log)
    return results


def seed_seconds(seeds) -> dict:
    """The summed per-seed seconds of training, selection evaluation, host work and the final
    protocol (`seeds`: per-seed results entries with "seconds")."""
    return {f"{k}_seconds": sum(s["seconds"][k] for s in seeds)
            for k in ("train", "eval", "host", "protocol")}
