"""`python -m experiments.analyze --run DIR`: the EASE paper's analyses of a finished sweep run
(docs/protocol.md section 11), on every seed's honest checkpoint (`DIR/seed_<s>/best`), pooled over
seeds (per-seed numbers in the JSON):

* calibration (Fig. 4): standardized residuals (c - mu) / sqrt(var) of the UCMI Gaussian against
  the clean tokens per modality, histograms against the N(0, 1) density, KS statistics;
* elastic alignment (Fig. 5 / 8): rigid and elastic penalties against the percentile rank of the
  reconstruction difficulty per modality, mean elastic / rigid ratio;
* cross-view consistency (Fig. 6 / 9): predictions from the observed full input vs the completed
  input under the condition: scatter, Wasserstein, Pearson, MAE; `--baseline DIR` (e.g. a run
  trained without MIPC) puts its numbers and scatter beside ours.

Calibration and elastic alignment need EASE's UCMI imputer: for an LNLN run (or EASE w/o UCMI)
only consistency is reported. Writes analysis.json, analysis.md, calibration.png, elastic.png,
consistency.png and analysis.log under --out (default DIR/analysis).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ease_jax import diagnostics as D
from ease_jax.evaluate import condition_label
from ease_jax.report.analysis import (
    analysis_markdown,
    plot_calibration,
    plot_consistency,
    plot_elastic,
)
from experiments import cli

DEFAULT_RUN = "runs/mosi/ease"

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.analyze",
        description="EASE's analyses of a trained run: calibration (Fig. 4), elastic alignment "
                    "(Fig. 5/8), cross-view consistency (Fig. 6/9); writes analysis.json / .md "
                    "and calibration.png, elastic.png, consistency.png.")
    p.add_argument("--run", default=DEFAULT_RUN,
                   help="a finished sweep run directory (results.json, seed_<s>/best); default "
                        f"{DEFAULT_RUN}, EASE of the default `python -m experiments.mosi_sweep`")
    p.add_argument("--condition", default="0.5",
                   help="missingness of the completed input: a missing rate (default 0.5), a "
                        "kept-modality subset (la, l, av, ...) or burst:<rate>")
    p.add_argument("--baseline", default=None,
                   help="a second run (e.g. trained without MIPC) analysed on the same data: its "
                        "consistency numbers and scatter beside ours")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--data", default=None,
                   help="MMSA pickle (default: the data the run was trained on, results.json "
                        "data.source)")
    p.add_argument("--seeds", default=None, help="comma-separated subset of the run's seeds "
                                                 "(default all)")
    p.add_argument("--alpha", type=float, default=None,
                   help="elasticity alpha of Eq. 6 (default: the run's, 1 in the papers)")
    p.add_argument("--model", choices=("ease", "lnln"), default=None,
                   help="fail unless --run is a run of this model")
    p.add_argument("--variant", default=None,
                   help="for an ablation directory (ablation.json) as --run: the variant "
                        "(default EASE)")
    p.add_argument("--baseline-variant", default=None,
                   help="for an ablation directory as --baseline: the variant (default EASE; "
                        "e.g. 'w/o MIPC')")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="output directory (default DIR/analysis)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return cli.exit_on_error(_main, argv)


def _main(argv) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    condition = cli.condition(args.condition, allow_none=False)
    try:
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")
                                                 if s.strip()]
    except ValueError:
        raise D.RunError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") \
            from None
    run = D.load_run(args.run, model=args.model, variant=args.variant,
                     purpose=f"--model {args.model}")
    baseline = None
    if args.baseline is not None:
        baseline = D.load_run(args.baseline, variant=args.baseline_variant)
        if baseline.dataset != run.dataset:
            raise D.RunError(f"--baseline {baseline.path} is a {baseline.dataset.upper()} run, "
                             f"--run {run.path} a {run.dataset.upper()} run")
    if seeds is not None:
        bad = [s for s in seeds if s not in run.seeds]
        if bad or not seeds:
            raise D.RunError(f"--seeds {args.seeds}: {run.path} has seeds {run.seeds}")
    out = Path(args.out) if args.out else run.path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    log = cli.logger(out / "analysis.log").info
    log(f"command: {' '.join(sys.argv)}")
    cli.enable_compilation_cache()
    data, data_info = D.load_run_data(run, args.data, log=log)
    label = "synthetic" if data_info["synthetic"] else "real"
    log(f"{run.name}: {args.split} split of {data.source} ({data.split(args.split).n} samples), "
        f"condition {condition_label(condition)}, seeds {seeds or run.seeds}")
    mine = D.analyze_run(run, data, split=args.split, condition=condition, alpha=args.alpha,
                         batch_size=args.batch_size, progress=not args.no_progress, log=log,
                         seeds=seeds)
    theirs = None
    if baseline is not None:
        D.check_data_fits(baseline, data)
        sha_b, sha_r = baseline.data.get("sha256"), run.data.get("sha256")
        if sha_b is not None and sha_r is not None and sha_b != sha_r:
            log(f"WARNING: the baseline {baseline.path} was trained on other data (sha256 "
                f"{sha_b}) than {run.path} ({sha_r}); both are analysed on {data.source}")
        theirs = D.analyze_run(baseline, data, split=args.split, condition=condition,
                               alpha=args.alpha, batch_size=args.batch_size,
                               progress=not args.no_progress, log=log)
    summary = dict(mine["summary"], data=data_info, label=label)
    if theirs is not None:
        summary["baseline"] = theirs["summary"]
    files = ["analysis.json", "analysis.md", "consistency.png"]
    plot_consistency(mine, theirs, out / "consistency.png", label)
    if "calibration" in summary:
        plot_calibration(mine, out / "calibration.png", label)
        plot_elastic(mine, out / "elastic.png", label)
        files[2:2] = ["calibration.png", "elastic.png"]
    summary["files"] = files
    summary["seconds_total"] = time.perf_counter() - t0
    from ease_jax.report import write_json

    write_json(out / "analysis.json", summary)
    (out / "analysis.md").write_text(analysis_markdown(summary))
    log(f"wrote {', '.join(str(out / f) for f in files)} ({summary['seconds_total']:.1f} s)")
    print((out / "analysis.md").read_text())
    return summary


if __name__ == "__main__":
    main()
