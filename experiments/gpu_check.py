"""`python -m experiments.gpu_check`: one accelerator check in about 8 minutes on one GPU, written
as gpu_check.json and gpu_check.md under --out (README "Speed").

Three stages, each a command of this project:

1. speed (`experiments.benchmark`): train step, evaluation per sample, compile time and peak
   memory of EASE and LNLN, text features and BERT-base, at MOSI shapes;
2. populations (`experiments.benchmark --population 1,3,9`): run-samples/s of 1, 3 and 9 EASE
   runs vmapped in one program;
3. a short run (`experiments.mosi_sweep --synthetic full`): one EASE seed on synthetic data at the
   real MOSI sizes, a few epochs with the full protocol, its wall time extrapolated to the papers'
   3 seeds x 200 epochs (`extrapolate`).

`--quick` is the CPU smoke test the test suite runs: small shapes, features only, populations of 1
and 3, two epochs of the small synthetic run; its figures say nothing about MOSI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ease_jax.report.benchmark import device_name, population_table, table
from experiments import benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.gpu_check",
        description="One accelerator check (about 8 minutes on one GPU): speed, populations and "
                    "a short full-size run extrapolated to the papers' schedule.")
    p.add_argument("--out", default="runs/gpu_check", help="output directory (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="the CPU smoke test: small shapes, features only, two short epochs")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the short run (default 4; 2 with --quick)")
    p.add_argument("--stage-timeout", type=float, default=240.0,
                   help="seconds allowed per benchmark configuration and for the short run "
                        "(default %(default)s)")
    return p.parse_args(argv)


def extrapolate(results: dict, seeds: int = 3, epochs: int = 200) -> dict:
    """Wall time of `seeds` x `epochs` from a short one-seed sweep's results.json: the first
    epoch's extra time (compilation) once, then per seed `epochs` x the median later epoch
    (training + selection evaluation + host work) and the final protocol; runs one after another
    (a population would share the program and, on an accelerator, the device)."""
    (rec,) = results["seeds"].values()
    per_epoch = [h["seconds_train"] + h["seconds_eval"] + h.get("seconds_host", 0.0)
                 for h in rec["history"]]
    if len(per_epoch) < 2:
        raise ValueError("extrapolate: the short run needs at least 2 epochs")
    steady = sorted(per_epoch[1:])[len(per_epoch[1:]) // 2]
    compile_s = max(per_epoch[0] - steady, 0.0)
    protocol_s = rec["seconds"].get("protocol", 0.0)
    total = compile_s + seeds * (epochs * steady + protocol_s)
    return {"seeds": seeds, "epochs": epochs, "epoch_s": steady, "compile_s": compile_s,
            "protocol_s": protocol_s, "total_s": total, "measured_epochs": len(per_epoch)}


def short_run(out: Path, args) -> dict:
    """The short synthetic sweep (subprocess), its results and the extrapolation."""
    epochs = args.epochs or (2 if args.quick else 4)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.mosi_sweep", "--model", "ease", "--seeds", "1111",
           "--epochs", str(epochs), "--synthetic", "small" if args.quick else "full",
           "--text-encoder", "features", "--out", str(out), "--no-progress"]
    # Synthetic data for certain: run where the default data path (relative) cannot exist.
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout,
                              cwd=out, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"the short run took longer than {args.stage_timeout:.0f} s",
                "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": wall}
    results = json.loads((out / "results.json").read_text())
    return {"command": " ".join(cmd[2:]), "wall_s": wall, "epochs": epochs,
            "data": results["data"]["source"], "extrapolated": extrapolate(results),
            "error": None}


def markdown(check: dict) -> str:
    env = check["speed"]["environment"]
    lines = [f"# Accelerator check on {device_name(env)}", "",
             f"jax {env['jax']}, {env['platform']}; {check['total_s']:.0f} s in all"
             + (" (--quick: small shapes, a smoke test; the figures say nothing about MOSI)"
                if check["quick"] else "") + ".", "", "## Speed (one run)", "",
             table(check["speed"]["results"], env), "",
             "## Populations (runs vmapped in one program)", "",
             population_table(check["population"]["results"], env), "", "## Short run", ""]
    run = check["run"]
    if run.get("error"):
        lines.append(f"Failed: `{run['error'].strip().splitlines()[-1]}`")
    else:
        x = run["extrapolated"]
        lines += [f"`python -m {run['command']}`: {run['epochs']} epochs in {run['wall_s']:.0f} s "
                  f"(data {run['data']}).", "",
                  f"Extrapolated to {x['seeds']} seeds x {x['epochs']} epochs, runs one after "
                  f"another: **{x['total_s'] / 3600:.2f} h** (compile {x['compile_s']:.0f} s, "
                  f"{x['epoch_s']:.1f} s per epoch, final protocol {x['protocol_s']:.0f} s per "
                  "seed)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    common = ["--timeout", str(args.stage_timeout)]
    if args.quick:
        common += ["--quick", "--shapes", "small", "--steps", "1", "--warmup", "0",
                   "--eval-steps", "1"]
    encoders = "features" if args.quick else "features,bert"
    speed = benchmark.main(["--models", "ease,lnln", "--text-encoders", encoders,
                            "--out", str(out / "speed.json"), *common])
    population = benchmark.main(["--models", "ease", "--text-encoders", "features",
                                 "--population", "1,3" if args.quick else "1,3,9",
                                 "--epoch-steps", "1" if args.quick else "2",
                                 "--out", str(out / "population.json"), *common])
    run = short_run(out / "short_run", args)
    check = {"quick": args.quick, "speed": speed, "population": population, "run": run,
             "total_s": time.perf_counter() - t0}
    (out / "gpu_check.json").write_text(json.dumps(check, indent=2))
    (out / "gpu_check.md").write_text(markdown(check))
    print((out / "gpu_check.md").read_text())
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return check


if __name__ == "__main__":
    main()
