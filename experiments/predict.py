"""`python -m experiments.predict --run DIR --out FILE.csv`: a trained model applied to a data set,
one CSV row per sample.

The model is one seed's honest checkpoint (`DIR/seed_<s>/best`; `--seed`, default the run's first
seed); the data is `--data PKL` or, by default, the data the run was trained on (results.json
`data.source`: the pickle, whose sha256 is checked against the run's, or the sweep's synthetic
data, rebuilt). `--split` (default test) and `--condition` (default none: the inputs as given; a
missing rate such as 0.5, a kept-modality subset such as la, or burst:<rate>) choose the rows and
the extra missingness.

Columns: id (the split's sample ids), label, prediction, missing_text / missing_audio /
missing_vision (the fraction of each modality's valid positions that is dropped, the model's r_m),
and the model's own diagnostics: EASE (with UCMI) gate_<m> (w * (1 - r_m), the weight of the
observed tokens) and uncertainty_<m> (mean variance of the UCMI imputation); LNLN completeness
(the completeness estimate w of the text).
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import numpy as np

from ease_jax import diagnostics as D
from ease_jax.evaluate import condition_json, condition_label
from experiments import cli

DEFAULT_RUN = "runs/mosi/ease"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.predict",
        description="Apply a trained run's honest checkpoint to a data split; writes one CSV row "
                    "per sample (prediction, observed missing fractions, gate / uncertainty or "
                    "completeness).")
    p.add_argument("--run", default=DEFAULT_RUN,
                   help="a finished sweep run directory (results.json, seed_<s>/best); default "
                        f"{DEFAULT_RUN}, EASE of the default `python -m experiments.mosi_sweep`")
    p.add_argument("--out", default=None,
                   help="the CSV file to write (default DIR/predictions_<split>_<condition>.csv)")
    p.add_argument("--data", default=None,
                   help="MMSA pickle (default: the data the run was trained on)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--condition", default="none",
                   help="extra missingness: none (default, the inputs as given), a missing rate "
                        "(0.5), a kept-modality subset (la, l, av, ...) or burst:<rate>")
    p.add_argument("--seed", type=int, default=None,
                   help="which seed's honest checkpoint (default: the first seed in results.json)")
    p.add_argument("--model", choices=("ease", "lnln"), default=None,
                   help="fail unless --run is a run of this model")
    p.add_argument("--variant", default=None,
                   help="for an ablation directory (ablation.json) as --run: the variant "
                        "(default EASE)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return cli.exit_on_error(_main, argv)


def _main(argv) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    log = cli.logger(None, "ease_jax.predict").info
    condition = cli.condition(args.condition, allow_none=True)
    run = D.load_run(args.run, model=args.model, variant=args.variant,
                     purpose=f"--model {args.model}")
    seed = run.seeds[0] if args.seed is None else args.seed
    if seed not in run.seeds:
        raise D.RunError(f"--seed {seed}: {run.path} has seeds {run.seeds}")
    default = f"predictions_{args.split}_{args.condition.replace(':', '-')}.csv"
    out = Path(args.out or Path(args.run) / default)
    if out.is_dir():
        raise D.RunError(f"--out {out} is a directory; give a file name such as predictions.csv")
    cli.enable_compilation_cache()
    data, data_info = D.load_run_data(run, args.data, log=log)
    split = data.split(args.split)
    params, record = D.restore_params(run, seed)
    epoch = record.get("epoch")
    log(f"{run.name} seed {seed} (honest checkpoint, epoch "
        f"{'?' if epoch is None else int(epoch) + 1}) on the {args.split} split of "
        f"{data.source} ({split.n} samples), condition {condition_label(condition)}")
    cols = D.prediction_table(run, params, split, condition, batch_size=args.batch_size,
                              progress=not args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, cols)
    from ease_jax.metrics import regression_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Corr of a constant prediction: NaN
        metrics = regression_metrics(cols["prediction"], cols["label"], run.dataset)
    seconds = time.perf_counter() - t0
    log(f"wrote {out}: {split.n} rows, columns {', '.join(cols)}; MAE {metrics['MAE']:.4f}, "
        f"Corr {metrics['Corr']:.4f} against the labels ({seconds:.1f} s)")
    return {"path": str(out), "columns": list(cols), "rows": split.n, "seed": seed,
            "condition": condition_json(condition), "data": data_info, "metrics": metrics,
            "seconds": seconds}


def write_csv(path: Path, cols: dict) -> None:
    """Columns (equal-length arrays) as CSV with a header; floats with 9 significant digits
    (float32 round trip)."""
    names = list(cols)
    n = len(next(iter(cols.values())))

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.9g}"
        if isinstance(v, np.integer):
            return str(int(v))
        return str(v)

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        columns = [np.asarray(cols[k]) for k in names]
        for i in range(n):
            w.writerow([cell(c[i]) for c in columns])


if __name__ == "__main__":
    main()
