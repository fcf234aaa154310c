"""`python -m experiments.ablation`: EASE's component and loss-term ablations (Table 4; docs/protocol.md
section 11) over several seeds, under both selection protocols, with every variant's paired
difference from full EASE (same seeds, 95% interval). Writes ablation.json, ablation.md (Table 4's
layout, the paper's MOSI rows beside ours), ablation.png and run.log under --out; each run's files
(selected epochs, honest choice, resumable state) go under --out/<variant>_seed_<s>.

The variants that differ only in loss weights train as one population (one compiled program);
w/o UCMI and w/o ALL (no imputer, no gate) as a second. Without the MMSA pickle it runs on
synthetic data with the sweep's small configuration and two seeds (labelled "synthetic").
"""

from __future__ import annotations

import argparse

from ease_jax.config import DATASETS, behaviour
from ease_jax.studies import ABLATIONS
from experiments import cli

SYNTHETIC_SEEDS = "1111,1112"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.ablation",
        description="EASE Table 4: component and loss-term ablations over seeds, both "
                    "protocols, paired differences from full EASE; writes ablation.json / .md / "
                    ".png.")
    p.add_argument("--dataset", choices=DATASETS, default="mosi")
    p.add_argument("--variants", default=",".join(ABLATIONS),
                   help="comma-separated subset of: " + ", ".join(ABLATIONS)
                        + " (default all; EASE is added when missing: it is the reference)")
    cli.add_run_arguments(p, None)
    p.add_argument("--out", default=None, help="output directory (default runs/<dataset>_ablation)")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in ABLATIONS]
    if unknown or not args.variant_list:
        p.error(f"--variants: unknown {unknown or args.variants!r}; choose from {list(ABLATIONS)}")
    if "EASE" not in args.variant_list:
        args.variant_list.insert(0, "EASE")
    return args


def main(argv=None) -> dict:
    from ease_jax import report
    from ease_jax.studies import ablation_runs, slug, summarize_groups

    args = parse_args(argv)
    ds = args.dataset
    out, log, data, is_synthetic = cli.start_command(args, ds, f"runs/{ds}_ablation")
    if is_synthetic and args.synthetic == "small" and args.seeds is None:
        args.seeds = SYNTHETIC_SEEDS
    run, bert_params = cli.prepare_run(args, ds, data, is_synthetic, "ease", log)
    seeds = list(run.train.seeds)
    runs = ablation_runs(run.model, run.loss, seeds, args.variant_list)
    log(f"ablation: {len(args.variant_list)} variants x {len(seeds)} seed(s) = {len(runs)} runs")
    records = cli.train_runs(args, run, data, runs, out, log, bert_params)
    groups = {v: [records[f"{slug(v)}_seed_{s}"] for s in seeds] for v in args.variant_list}
    label = "synthetic" if is_synthetic else "real"
    results = {
        "dataset": ds, "data": {"source": data.source, "sha256": data.sha256,
                                "synthetic": is_synthetic},
        "seeds": seeds, "config": run.to_dict(), "behaviour": behaviour(run.model, run.train),
        "variants": {v: dict(summary, runs=[f"{slug(v)}_seed_{s}" for s in seeds],
                             change=ABLATIONS[v])
                     for v, summary in summarize_groups(ds, groups, reference="EASE").items()},
    }
    if cli.is_primary():  # with several processes, process 0 writes the reports
        report.write_outputs(out, "ablation", results, report.ablation_markdown(results, label),
                             lambda path: report.plot_ablation(results, path, label), log)
    return results


if __name__ == "__main__":
    main()
