"""`python -m experiments.pool RUN RUN ... --out DIR`: one run's results from the seeds of several
runs of the same configuration, e.g. seeds trained as separate jobs or on separate machines, or
seeds added to a finished run (README "Measured results").

A RUN is a sweep's output directory for one model (holding results.json), that results.json, or a
multi-model sweep's directory (one sub-directory per model). Every RUN must hold the same models;
per model the runs must be on the same data (sha256) with the same configuration apart from the
seeds, and no seed may appear twice. A seed's numbers do not depend on the other seeds it trained
beside (tests/test_population.py), so the pooled run reads as one run of all the seeds would, up
to floating-point rounding. Writes, per model, results.json / .md, curves.png and training.png as
a sweep does (the over-seed summary, paired selection inflation included, recomputed from the
per-seed tables by `evaluate.summarize_seeds`), and with several models the paired comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ease_jax.evaluate import summarize_seeds
from ease_jax.report import write_comparison, write_run_reports
from experiments import cli
from experiments.sweep import seed_seconds

# Keys of results.json that must agree between pooled runs (config: all but the seeds).
SAME = ("dataset", "model", "behaviour")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.pool",
        description="Pool the seeds of several finished sweep runs of one configuration into "
                    "one run's results (results.json / .md / curves.png / training.png, and "
                    "comparison.* with several models).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="a one-model run directory or its results.json, or a multi-model "
                        "sweep directory; at least two")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    return p.parse_args(argv)


def models_of(run: Path) -> dict[str, Path]:
    """{model: results.json path} of one RUN argument."""
    if run.is_file() or (run / "results.json").is_file():
        path = run if run.is_file() else run / "results.json"
        return {cli.read_results(path)["model"]: path}
    if not run.is_dir():
        raise SystemExit(f"error: {run}: no such file or directory")
    found = {d.name: d / "results.json" for d in sorted(run.iterdir())
             if (d / "results.json").is_file()}
    if not found:
        raise SystemExit(f"error: {run}: holds no results.json, neither itself nor in a "
                         "sub-directory per model")
    return found


def _difference(a, b, where: str = "") -> str | None:
    """The first key path at which two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}{k} (only in one run)"
            d = _difference(a[k], b[k], f"{where}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{where.rstrip('.')} ({a!r} vs {b!r})"


def _without_seeds(config: dict) -> dict:
    return config | {"train": {k: v for k, v in config.get("train", {}).items() if k != "seeds"}}


def pool_results(runs: list[tuple[Path, dict]]) -> dict:
    """One results dict from several runs' results (`runs`: (path, results)) of one model: their
    seeds in numeric order, the over-seed summary recomputed, timings summed, and "pooled_from"
    [{"path", "seeds"}]. Raises SystemExit naming the run and key that differ or the seed given
    twice."""
    (first_path, first), seeds, sources = runs[0], {}, []
    for path, res in runs:
        for key in SAME:
            if res.get(key) != first.get(key):
                raise SystemExit(f"error: {path}: {key} {res.get(key)!r} differs from "
                                 f"{first_path} ({first.get(key)!r}); only runs of one "
                                 "configuration pool")
        cli.check_same_data(path, res, first_path, first)
        diff = _difference(_without_seeds(res["config"]), _without_seeds(first["config"]))
        if diff:
            raise SystemExit(f"error: {path}: config differs from {first_path} at {diff}; only "
                             "the seeds may differ between pooled runs")
        for seed in res["seeds"]:
            if seed in seeds:
                raise SystemExit(f"error: seed {seed} is in {path} and in "
                                 f"{seeds[seed][0]}; each seed may be pooled once")
            seeds[seed] = (path, res["seeds"][seed])
        sources.append({"path": str(path), "seeds": [int(s) for s in res["seeds"]]})
    order = sorted(seeds, key=int)
    seeds_out = {s: seeds[s][1] for s in order}
    config = first["config"] | {"train": first["config"]["train"] | {"seeds": [int(s)
                                                                               for s in order]}}
    timings = {"total_seconds": sum(r.get("timings", {}).get("total_seconds", 0.0)
                                    for _, r in runs)}
    if all("seconds" in s for s in seeds_out.values()):
        timings |= seed_seconds(seeds_out.values())
    return {"dataset": first["dataset"], "model": first["model"], "data": first["data"],
            "config": config, "behaviour": first.get("behaviour"),
            **summarize_seeds(seeds_out),
            "baselines": first["baselines"], "seeds": seeds_out, "timings": timings,
            "pooled_from": sources}


def main(argv=None) -> dict:
    """Pool; returns {model: pooled results} (and "comparison" with several models)."""
    args = parse_args(argv)
    if len(args.runs) < 2:
        raise SystemExit("error: give at least two runs to pool")
    per_run = [models_of(run) for run in args.runs]
    models = list(per_run[0])
    for run, found in zip(args.runs, per_run):
        if set(found) != set(models):
            raise SystemExit(f"error: {run} holds the models {sorted(found)}, {args.runs[0]} "
                             f"holds {sorted(models)}; every run must hold the same models")
    pooled = {m: pool_results([(found[m], cli.read_results(found[m])) for found in per_run])
              for m in models}
    label = "synthetic" if pooled[models[0]]["data"].get("synthetic") else "real"
    for m, res in pooled.items():
        out = args.out if len(models) == 1 else args.out / m
        out.mkdir(parents=True, exist_ok=True)
        write_run_reports(out, res, label)
    if len(models) > 1:
        pooled["comparison"] = write_comparison(args.out, {m: pooled[m] for m in models}, label)
    return pooled


if __name__ == "__main__":
    cli.exit_on_error(main)
