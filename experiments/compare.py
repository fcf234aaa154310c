"""`python -m experiments.compare NAME=RUN NAME=RUN ...`: finished sweep runs side by side, each
against the first paired by seed (README "Where this project differs from the released code").

A RUN is a sweep's output directory for one model (holding results.json) or the results.json
itself. The runs must be on the same data (same sha256); they may differ in model, behaviour
(`--behaviour`, `--train-masks`, `--rate-input`, `--eval-z`) or anything else. Writes
comparison.json, comparison.md and comparison.png under --out, as a multi-model sweep does:
per protocol every run's mean ± std, and every other run's difference from the first paired by
seed with its 95% t-interval (`evaluate.compare_models`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ease_jax.report import write_comparison
from experiments import cli


def run_arg(text: str) -> tuple[str, Path]:
    """NAME=RUN -> (name, path of its results.json)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN (a run directory or its "
                                         f"results.json), got {text!r}")
    p = Path(path)
    return name, p / "results.json" if p.is_dir() else p


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description="Compare finished sweep runs, each against the first, paired by seed; "
                    "writes comparison.json / .md / .png.")
    p.add_argument("runs", nargs="+", type=run_arg, metavar="NAME=RUN",
                   help="a name and a run directory (or its results.json); the first is the "
                        "reference")
    p.add_argument("--out", default="runs/compare", help="output directory (default %(default)s)")
    return p.parse_args(argv)


def load_results(runs: list[tuple[str, Path]]) -> dict:
    """{name: results dict}; a clear error for a missing or foreign file, a repeated name or
    runs on different data."""
    out: dict = {}
    for name, path in runs:
        if name in out:
            raise SystemExit(f"error: the name {name!r} is given twice")
        res = cli.read_results(path)
        cli.check_same_data(path, res, runs[0][1], next(iter(out.values()), res))
        out[name] = res
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    per_run = load_results(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = "synthetic" if next(iter(per_run.values()))["data"].get("synthetic") else "real"
    return write_comparison(out, per_run, label)


if __name__ == "__main__":
    cli.exit_on_error(main)
