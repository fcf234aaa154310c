"""`python -m experiments.sensitivity`: EASE's loss-weight sensitivity (Fig. 7; docs/protocol.md
section 11). Eq. 13 written as L_sp + l1 L_ucmi + l2 (L_uada + 0.02 L_anchor) + l3 (L_cons +
L_asym); each of l1, l2, l3 varies over {0.05, 0.1, 0.2, 0.5, 1, 2} with the others at the paper's
optimum (0.5, 0.2, 0.5). Every setting x seed is a run of ONE population (they differ only in
weights). Writes sensitivity.json, sensitivity.md (Acc-5 and MAE, 10-rate means, mean ± std over
seeds, both protocols) and sensitivity.png (one panel per weight and metric) under --out.

The paper's figure is on MOSEI, so --dataset defaults to mosei; without the pickle it runs on
synthetic MOSEI-shaped data with the sweep's small configuration (labelled "synthetic").
"""

from __future__ import annotations

import argparse

from ease_jax.config import DATASETS, behaviour
from ease_jax.studies import SENSITIVITY_VALUES
from experiments import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sensitivity",
        description="EASE Fig. 7: Acc-5 and MAE against each loss weight l1, l2, l3 of Eq. 13; "
                    "writes sensitivity.json / .md / .png.")
    p.add_argument("--dataset", choices=DATASETS, default="mosei")
    p.add_argument("--values", default=",".join(f"{v:g}" for v in SENSITIVITY_VALUES),
                   help="comma-separated weight values (default %(default)s)")
    cli.add_run_arguments(p, None)
    p.add_argument("--out", default=None,
                   help="output directory (default runs/<dataset>_sensitivity)")
    args = p.parse_args(argv)
    try:
        args.value_list = [float(v) for v in args.values.split(",") if v.strip()]
    except ValueError:
        p.error(f"--values: expected comma-separated numbers, got {args.values!r}")
    if not args.value_list or any(v < 0 for v in args.value_list):
        p.error(f"--values: expected non-negative numbers, got {args.values!r}")
    return args


def main(argv=None) -> dict:
    from ease_jax import report
    from ease_jax.config import LossConfig
    from ease_jax.studies import (
        point_name,
        point_weights,
        sensitivity_points,
        sensitivity_runs,
        summarize_groups,
    )

    args = parse_args(argv)
    ds = args.dataset
    out, log, data, is_synthetic = cli.start_command(args, ds, f"runs/{ds}_sensitivity")
    if args.loss_preset != "paper":
        log("sensitivity: using the paper's loss preset (Eq. 13), whose weights the grid varies")
    args.loss_preset = "paper"
    run, bert_params = cli.prepare_run(args, ds, data, is_synthetic, "ease", log)
    seeds = list(run.train.seeds)
    runs = sensitivity_runs(run.loss, seeds, args.value_list)
    log(f"sensitivity: {len(runs) // len(seeds)} weight settings x {len(seeds)} seed(s) = "
        f"{len(runs)} runs, one population")
    records = cli.train_runs(args, run, data, runs, out, log, bert_params)
    names = sorted({point_name(point_weights(w, v))
                    for w, v in sensitivity_points(args.value_list)})
    summary = summarize_groups(ds, {n: [records[f"{n}_seed_{s}"] for s in seeds] for n in names})
    points = [{"weight": w, "value": v, "setting": point_name(point_weights(w, v)),
               "weights": point_weights(w, v),
               "protocols": {p: {m: summary[point_name(point_weights(w, v))]["protocols"][p]
                                 ["mean_over_rates"][m] for m in ("Mult_acc_5", "MAE")}
                             for p in ("honest", "paper")}}
              for w, v in sensitivity_points(args.value_list)]
    label = "synthetic" if is_synthetic else "real"
    results = {"dataset": ds, "data": {"source": data.source, "sha256": data.sha256,
                                       "synthetic": is_synthetic},
               "seeds": seeds, "config": run.to_dict(),
               "behaviour": behaviour(run.model, run.train), "base_loss": LossConfig.preset("paper", ds),
               "values": args.value_list, "points": points, "settings": summary}
    if cli.is_primary():  # with several processes, process 0 writes the reports
        report.write_outputs(out, "sensitivity", results, report.sensitivity_markdown(results, label),
                             lambda path: report.plot_sensitivity(results, path, label), log)
    return results


if __name__ == "__main__":
    main()
