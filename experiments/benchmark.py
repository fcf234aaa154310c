"""`python -m experiments.benchmark --help`: speed and memory of EASE / LNLN at full MOSI shapes,
measured on the programs the fit loop runs (`ease_jax.population.PopulationProgram`).

For every (model, text encoder) pair, a population of one run:

* step s, steps/s, samples/s: the epoch program (`train_epoch`: a `lax.scan` over
  `--epoch-steps` steps with on-device data order and masks) called `--steps` times after the
  first (compiling) call and `--warmup` untimed ones; the median call / steps per call;
* compile s: the epoch program's ahead-of-time `lower(...).compile()` (nothing runs);
* GFLOP/step and GFLOP/s: XLA's cost analysis of the same programs traced without loops
  (`ModelConfig.loop_free`: XLA counts a loop body once whatever its trip count), over the median
  step time; the encode-once path skips about a quarter of the encoder work and the blockwise
  attention recomputes its weights, so this is the algorithm's work per second ("effective"
  GFLOP/s), comparable across implementations;
* s/epoch: a MOSI epoch is 1284 training samples = 21 steps of 64 (the last one padded);
* eval samples/s: the predict program (selection and the final protocol), masks at r = 0.5, on
  `--eval-batch-size` test rows per call;
* peak memory: `memory_stats()["peak_bytes_in_use"]` of device 0 where the backend reports it,
  else the worker process's max RSS, labelled as such; the JSON adds the peak before the
  evaluation ran (`train_peak_bytes`) and XLA's temporaries of the epoch program.

With `--population 1,3,9` it measures the whole fit loop (`ease_jax.fit.fit_population`) with P
runs per program, one worker per (model, text encoder, P): two epochs on a training split of
`--epoch-steps` batches (valid / test 32 rows each, no final protocol); the second is timed.
run-samples/s = P x batch / step s; host s/epoch = the loop's bookkeeping outside the device
calls; host % = host s / (host s + 21 steps).

Data are synthetic MOSI (`ease_jax.data.synthetic`) with the real sequence lengths and widths;
BERT mode uses a randomly initialised bert-base-uncased (`models.placeholder_params` unless
`--init flax`). Every configuration runs in its own worker process (unless `--no-isolate`), so
compile caches and peak memory do not leak between configurations. Writes a Markdown table
(`ease_jax.report.benchmark`) to stdout and JSON to `--out`, rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ease_jax.report.benchmark import (
    device_name,
    efficiency_table,
    fmt_mem,
    population_table,
    table,
)

MOSI_TRAIN = 1284  # training samples of MOSI (docs/protocol.md section 1)
DATASET = "mosi"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description="Compile time, training steps/s, s per MOSI epoch, evaluation samples/s and "
                    "peak memory of EASE / LNLN at full MOSI shapes (synthetic data).")
    p.add_argument("--models", default="ease,lnln", help="comma-separated: ease,lnln")
    p.add_argument("--text-encoders", default="features,bert",
                   help="comma-separated: bert (random bert-base-uncased, fine-tuned) and/or "
                        "features (precomputed 768-d text features)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed calls of the epoch program per configuration (default 20; 3 with "
                        "--quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls after the first (compiling) one (default 3; 1 with --quick)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="timed evaluation batches (default 10; 3 with --quick)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    p.add_argument("--eval-batch-size", type=int, default=256,
                   help="test rows per timed predict call (default 256); the program batches "
                        "them as the fit loop does (64 rows on a CPU, 256 on accelerators: "
                        "`population.default_eval_rows`)")
    p.add_argument("--parallel", choices=("pmap", "shard_map"), default="pmap")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="matmul precision of the model (bf16: for GPUs)")
    p.add_argument("--no-encode-once", action="store_true",
                   help="encode both passes in full instead of rows with equal clean and "
                        "incomplete inputs once (same numbers; for A/B comparisons)")
    p.add_argument("--init", choices=("shapes", "flax"), default="shapes",
                   help="parameters: 'shapes' = eval_shape + direct fill (fast; speed does not "
                        "depend on the values), 'flax' = jax.jit(init_params) (slow to compile)")
    p.add_argument("--population", default=None,
                   help="comma-separated run counts (e.g. 1,3,9): measure the population engine "
                        "(the fit loop with P runs per program) instead of one run's programs")
    p.add_argument("--run-batch", type=int, default=None,
                   help="--population: runs vmapped together (default: all on an accelerator, "
                        "one at a time on a CPU)")
    p.add_argument("--epoch-steps", type=int, default=None,
                   help="training steps per epoch call (default 1; 2 with --population)")
    p.add_argument("--out", default="runs/benchmark.json", help="JSON output path")
    p.add_argument("--quick", action="store_true", help="few steps (3 timed, 1 warm-up)")
    p.add_argument("--shapes", choices=("mosi", "small"), default="mosi",
                   help="mosi: the real MOSI lengths and the papers' model (default); small: "
                        "8 tokens / frames and the narrow synthetic model, a smoke test")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per configuration (worker process); none by default")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every configuration in this process (peak memory then accumulates)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "model:encoder"
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.eval_steps = args.eval_steps if args.eval_steps is not None else (3 if args.quick else 10)
    if args.epoch_steps is None:
        args.epoch_steps = 2 if args.population else 1
    args.model_list = _choices(args.models, ("ease", "lnln"), "--models")
    args.encoder_list = _choices(args.text_encoders, ("bert", "features"), "--text-encoders")
    try:
        args.population_list = ([int(x) for x in args.population.split(",") if x.strip()]
                                if args.population else [])
    except ValueError:
        p.error(f"--population: expected comma-separated run counts, got {args.population!r}")
    if any(n < 1 for n in args.population_list) or args.epoch_steps < 1:
        p.error("--population counts and --epoch-steps must be >= 1")
    if args.steps < 1 or args.warmup < 0 or args.eval_steps < 1 or args.batch_size < 1:
        p.error("--steps, --eval-steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {allowed}, got {text!r}")
    return items


def _log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# One configuration (runs inside a worker process unless --no-isolate).


def _flops(compiled) -> float | None:
    """FLOPs of one call of a lowered or compiled program, from XLA's cost analysis (None where
    the backend gives none). For a pmap program this is one device's share."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _temp_bytes(memory_analysis) -> int | None:
    """XLA's temporary buffer size of a compiled program (its working memory), where reported."""
    return getattr(memory_analysis, "temp_size_in_bytes", None) if memory_analysis else None


def _peak_memory() -> dict:
    import jax

    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except (RuntimeError, NotImplementedError, AttributeError):  # some backends raise
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "peak_kind": "device peak",
                "bytes_limit": stats.get("bytes_limit")}
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_bytes": int(rss_bytes), "peak_kind": "process max RSS", "bytes_limit": None}


def _params(mcfg, how: str):
    """"flax": `jax.jit(init_params)` (compiles the whole forward pass, about as long as the train
    step); "shapes": `models.placeholder_params` (same tree, shapes and dtypes; speed does not
    depend on the values)."""
    import jax

    from ease_jax.models import init_params, placeholder_params

    if how == "flax":
        return jax.jit(lambda k: init_params(mcfg, k))(jax.random.key(0))
    return placeholder_params(mcfg)


# `--shapes small`: the default CPU run's synthetic lengths and narrow model (a smoke test of
# the command on a CPU; its figures say nothing about MOSI).
SMALL_LENGTHS = dict(text_len=8, audio_len=8, vision_len=8)


def _data_shapes(args) -> dict:
    return SMALL_LENGTHS if args.shapes == "small" else {}


def _model_shapes(args) -> dict:
    from ease_jax.config import SYNTHETIC_SMALL_MODEL

    if args.shapes != "small":
        return {}
    return dict(SYNTHETIC_SMALL_MODEL, text_len=SMALL_LENGTHS["text_len"],
                audio_len=SMALL_LENGTHS["audio_len"], vision_len=SMALL_LENGTHS["vision_len"])


def run_config(model: str, text_encoder: str, args) -> dict:
    """Measure one (model, text encoder) pair on the fit loop's own programs
    (`population.PopulationProgram` of one run: the epoch program and the predict program);
    returns one JSON row."""
    import jax
    import numpy as np

    from ease_jax.config import LossConfig, TrainConfig, model_config
    from ease_jax.data.missing import eval_keep_masks
    from ease_jax.data.mmsa import from_raw
    from ease_jax.data.synthetic import synthetic
    from ease_jax.population import PopulationProgram, stack
    from ease_jax.train import create_state, steps_per_epoch

    tag = f"{model}/{text_encoder}"
    t_start = time.perf_counter()
    mcfg = model_config(model, DATASET, text_encoder=text_encoder, precision=args.precision,
                        encode_once=not args.no_encode_once, **_model_shapes(args))
    loss_cfg = LossConfig.preset("code", DATASET)
    tcfg = TrainConfig(batch_size=args.batch_size)
    spe = steps_per_epoch(MOSI_TRAIN, args.batch_size)  # the schedule of a real MOSI run
    n_train = args.epoch_steps * args.batch_size
    raw = synthetic(DATASET, seed=0, n_train=n_train, n_valid=8, n_test=args.eval_batch_size,
                    **_data_shapes(args))
    data = from_raw(raw, source="synthetic:mosi(seed=0)")

    def program(cfg):
        return PopulationProgram(cfg, loss_cfg, tcfg, n_train, 1, parallel=args.parallel)

    prog = program(mcfg)
    _log(f"{tag}: initialising parameters ({len(prog.devices)} {jax.devices()[0].platform} "
         f"device(s), {args.parallel})")
    t0 = time.perf_counter()
    params = _params(mcfg, args.init)
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    host_state = stack([jax.device_get(create_state(mcfg, tcfg, 1111, spe, params=params,
                                                    loss_cfg=loss_cfg))])
    del params
    dev_state = jax.block_until_ready(prog.put_state(host_state))
    dev_train = prog.put_train(data.train.model_arrays(text_encoder))
    init_s = time.perf_counter() - t0
    _log(f"{tag}: {n_params:,} parameters, init {init_s:.1f}s; compiling the epoch program "
         f"({args.epoch_steps} step(s) per call)")

    # Compile ahead of time (nothing runs), so compile time is its own figure and XLA's memory
    # analysis describes exactly the program that is timed (the epoch program `train_epoch` calls).
    t0 = time.perf_counter()
    compiled = prog.lower_epoch(dev_state, dev_train).compile()
    compile_s = time.perf_counter() - t0

    def one_epoch():
        nonlocal dev_state
        dev_state, metrics = compiled(dev_state, dev_train)
        return np.asarray(jax.device_get(metrics["total"])).reshape(-1)  # [steps] of the run

    t0 = time.perf_counter()
    loss0 = float(one_epoch()[0])
    first_s = time.perf_counter() - t0
    warmup_times = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        one_epoch()
        warmup_times.append(time.perf_counter() - t0)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses = one_epoch()
        times.append((time.perf_counter() - t0) / args.epoch_steps)
        if i == 0 or time.perf_counter() - t_start > 60:
            _log(f"{tag}: epoch call {i + 1}/{args.steps}: {times[-1]:.3f}s per step")
    step_s = statistics.median(times)
    loss_last = float(losses[-1])
    step_temp = _temp_bytes(compiled.memory_analysis())
    train_mem = _peak_memory()  # before the evaluation program exists (max RSS only grows)

    _log(f"{tag}: median step {step_s:.4f}s; the evaluation (predict program, r = 0.5)")
    test_rows = data.test.model_arrays(text_encoder, labels=False)
    test_keep = eval_keep_masks(data.test, 0.5)
    rows, keep = prog.put_rows(test_rows, 1), prog.put_rows(test_keep, 1)
    n_test = data.test.n
    t0 = time.perf_counter()
    jax.block_until_ready(prog.predict(dev_state.params, rows, keep, n_test))
    eval_first_s = time.perf_counter() - t0
    eval_times = []
    for _ in range(args.eval_steps):
        t0 = time.perf_counter()
        jax.block_until_ready(prog.predict(dev_state.params, rows, keep, n_test))
        eval_times.append(time.perf_counter() - t0)
    eval_s = statistics.median(eval_times)

    # FLOPs: the same programs traced without loops (`ModelConfig.loop_free`; XLA's cost analysis
    # counts a loop body once), one step per epoch call.
    # (The free predict program takes all test rows as one batch: a map over batches is a loop.)
    free = PopulationProgram(mcfg.loop_free(), loss_cfg, tcfg, args.batch_size, 1,
                             parallel=args.parallel, eval_rows=args.eval_batch_size)
    one_step = free.put_train({k: v[: args.batch_size] for k, v in
                               data.train.model_arrays(text_encoder).items()})
    step_flops = _flops(free.lower_epoch(dev_state, one_step))
    eval_flops = _flops(free.lower_predict(dev_state.params, free.put_rows(test_rows, 1),
                                           free.put_rows(test_keep, 1)))
    mem = _peak_memory()
    row = {
        "model": model, "text_encoder": text_encoder, "parallel": args.parallel,
        "n_devices": len(prog.devices), "batch_size": args.batch_size,
        "global_batch": prog.global_batch, "eval_batch_size": args.eval_batch_size,
        "eval_rows": prog.eval_rows,
        "epoch_steps": args.epoch_steps, "n_params": n_params, "init_s": init_s,
        "compile_s": compile_s, "first_step_s": first_s / args.epoch_steps,
        "step_flops": step_flops,
        "step_gflops_per_s": step_flops / step_s / 1e9 if step_flops else None,
        "step_s_median": step_s, "step_s_mean": statistics.fmean(times),
        "step_s_min": min(times), "step_s_max": max(times), "step_times": times,
        "warmup_times": warmup_times, "steps_per_s": 1.0 / step_s,
        "samples_per_s": args.batch_size / step_s, "steps_per_epoch": spe,
        "epoch_s": spe * step_s, "eval_compile_s": eval_first_s - eval_s,
        "eval_batch_s_median": eval_s, "eval_flops": eval_flops,
        "eval_gflops_per_s": eval_flops / eval_s / 1e9 if eval_flops else None,
        "eval_samples_per_s": n_test / eval_s, "loss_first": loss0, "loss_last": loss_last,
        **mem, "train_peak_bytes": train_mem["peak_bytes"], "step_temp_bytes": step_temp,
        "wall_s": time.perf_counter() - t_start, "error": None,
    }
    _log(f"{tag}: done in {row['wall_s']:.0f}s: {row['steps_per_s']:.3f} steps/s, "
         f"{row['epoch_s']:.2f} s/epoch, eval {row['eval_samples_per_s']:.1f} samples/s, "
         f"{fmt_mem(row)}")
    return row


def run_population(model: str, text_encoder: str, n_runs: int, args) -> dict:
    """Measure the population engine for (model, text encoder) with `n_runs` runs per program:
    two epochs of `fit_population` (the fit loop itself); returns one JSON row."""
    import jax

    from ease_jax.config import LossConfig, RunConfig, TrainConfig, model_config
    from ease_jax.data.mmsa import from_raw
    from ease_jax.data.synthetic import synthetic
    from ease_jax.fit import fit_population
    from ease_jax.population import Run

    tag = f"{model}/{text_encoder} x{n_runs}"
    t_start = time.perf_counter()
    mcfg = model_config(model, DATASET, text_encoder=text_encoder, precision=args.precision,
                        **_model_shapes(args))
    tcfg = TrainConfig(batch_size=args.batch_size, epochs=2, warmup_epochs=1)
    run_cfg = RunConfig(dataset=DATASET, model=mcfg, loss=LossConfig.preset("code", DATASET),
                        train=tcfg)
    raw = synthetic(DATASET, seed=0, n_train=args.epoch_steps * args.batch_size, n_valid=32,
                    n_test=32, **_data_shapes(args))
    data = from_raw(raw, source="synthetic:mosi(seed=0)")
    _log(f"{tag}: initialising parameters ({jax.local_device_count()} "
         f"{jax.devices()[0].platform} device(s), {args.parallel})")
    params = _params(mcfg, args.init)
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    runs = [Run(1111 + i) for i in range(n_runs)]
    with tempfile.TemporaryDirectory() as tmp:
        _log(f"{tag}: {n_params:,} parameters per run; 2 epochs of {args.epoch_steps} steps "
             "(the first compiles)")
        records = fit_population(run_cfg, data, runs, [Path(tmp) / r.label for r in runs],
                                 Path(tmp) / "population", parallel=args.parallel,
                                 params=[params] * n_runs, log=lambda _: None, progress=False,
                                 protocol=False, run_batch=args.run_batch)
    first, second = (h for h in records[0]["history"])
    train_s = [h["seconds_train"] * n_runs for h in (first, second)]
    step_s = train_s[1] / args.epoch_steps
    host_s = second["seconds_host"] * n_runs
    epoch_train_s = math.ceil(MOSI_TRAIN / args.batch_size) * step_s
    mem = _peak_memory()
    row = {
        "model": model, "text_encoder": text_encoder, "parallel": args.parallel,
        "population": n_runs, "run_batch": args.run_batch, "n_devices": jax.local_device_count(),
        "batch_size": args.batch_size, "epoch_steps": args.epoch_steps, "n_params": n_params,
        "compile_s": train_s[0] - train_s[1], "step_s": step_s,
        "run_samples_per_s": n_runs * args.batch_size / step_s,
        "epoch_s": epoch_train_s, "eval_s": second["seconds_eval"] * n_runs,
        "host_s": host_s, "host_fraction": host_s / (host_s + epoch_train_s),
        **mem, "peak_bytes_per_run": None if mem["peak_bytes"] is None
        else mem["peak_bytes"] / n_runs,
        "loss_last": [r["history"][-1]["train"]["total"] for r in records],
        "wall_s": time.perf_counter() - t_start, "error": None,
    }
    _log(f"{tag}: step {step_s:.3f}s, {row['run_samples_per_s']:.1f} run-samples/s, host "
         f"{host_s:.2f}s/epoch ({100 * row['host_fraction']:.2f}%), {fmt_mem(row)}")
    return row


def _worker(args) -> None:
    model, text_encoder, *n_runs = args.worker.split(":")
    row = (run_population(model, text_encoder, int(n_runs[0]), args) if n_runs
           else run_config(model, text_encoder, args))
    Path(args.worker_out).write_text(json.dumps(row))


def _run_isolated(model: str, text_encoder: str, args, n_runs: int | None = None) -> dict:
    """Run one configuration in a fresh Python process and read back its row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        spec = f"{model}:{text_encoder}" + ("" if n_runs is None else f":{n_runs}")
        cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", spec,
               "--worker-out", str(out), "--epoch-steps", str(args.epoch_steps),
               *(["--run-batch", str(args.run_batch)] if args.run_batch else []),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--eval-steps", str(args.eval_steps), "--batch-size", str(args.batch_size),
               "--eval-batch-size", str(args.eval_batch_size), "--parallel", args.parallel,
               "--shapes", args.shapes,
               "--precision", args.precision,
               *(["--no-encode-once"] if args.no_encode_once else []),
               "--init", args.init]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {args.timeout:.0f}s"
        if code == -9:  # SIGKILL: on a host without swap, almost always the kernel's OOM killer
            code = "killed by SIGKILL, most likely out of host memory; try a smaller --batch-size"
        if out.is_file():
            return json.loads(out.read_text())
        return _failed_row(model, text_encoder, args,
                           f"worker failed ({code}) after {time.perf_counter() - t0:.0f}s", n_runs)


def _failed_row(model, text_encoder, args, error: str, n_runs: int | None = None) -> dict:
    return {"model": model, "text_encoder": text_encoder, "parallel": args.parallel,
            "batch_size": args.batch_size, "population": n_runs, "error": error}


# ----------------------------------------------------------------------------------------------
# Environment, table, main.


def environment() -> dict:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    env = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
           "platform": dev.platform, "device_kind": dev.device_kind,
           "n_devices": jax.local_device_count(), "host_cpus": os.cpu_count(),
           "host": platform.node()}
    try:
        env["platform_version"] = dev.client.platform_version
    except AttributeError:
        env["platform_version"] = None
    if dev.platform == "cpu":
        env["cpu_model"] = _cpu_model()
        env["load_average"] = os.getloadavg()
    for name in ("flax", "optax"):
        try:
            env[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            env[name] = None
    return env


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return None
    env = environment()
    _log(f"jax {env['jax']} on {device_name(env)} ({env['platform_version']}); "
         f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, "
         f"{args.parallel}")
    if env["platform"] == "cpu":
        _log(f"host load average {env['load_average']}")
    configs = [(m, e, p) for m in args.model_list for e in args.encoder_list
               for p in (args.population_list or [None])]
    rows: list[dict] = []
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> dict:  # after every configuration, so a run cut short keeps what it measured
        result = _result(args, env, rows, time.perf_counter() - t0, len(configs))
        out.write_text(json.dumps(result, indent=2))
        return result

    for i, (model, enc, n_runs) in enumerate(configs, 1):
        _log(f"[{i}/{len(configs)}] {model} / text encoder {enc}"
             + ("" if n_runs is None else f" / {n_runs} run(s) per program"))
        if args.no_isolate:
            try:
                row = (run_config(model, enc, args) if n_runs is None
                       else run_population(model, enc, n_runs, args))
            except Exception as exc:
                row = _failed_row(model, enc, args, f"{type(exc).__name__}: {exc}", n_runs)
        else:
            row = _run_isolated(model, enc, args, n_runs)
        rows.append(row)
        if row.get("error"):
            _log(f"[{i}/{len(configs)}] {model}/{enc} FAILED: {row['error']}")
        result = write()
    if args.population_list:
        print(f"\njax {env['jax']}, {env['platform']} ({env['platform_version']}), device kind "
              f"{env['device_kind']}; batch {args.batch_size}, population engine, second epoch "
              f"of {args.epoch_steps} steps; s/epoch = "
              f"{math.ceil(MOSI_TRAIN / args.batch_size)} steps\n")
        print(population_table(rows, env))
    else:
        print(f"\njax {env['jax']}, {env['platform']} ({env['platform_version']}), "
              f"device kind {env['device_kind']}; batch {args.batch_size}, median of "
              f"{args.steps} steps; s/epoch = {math.ceil(MOSI_TRAIN / args.batch_size)} steps\n")
        print(table(rows, env))
    print("\nTable 5 layout (efficiency):\n")
    print(efficiency_table(rows, env))
    print(f"\nwrote {out}")
    return result


def _result(args, env: dict, rows: list[dict], total_s: float, n_configs: int) -> dict:
    return {
        "benchmark": "ease_jax train/eval speed at full MOSI shapes (synthetic data)",
        "shapes": {"L": 50, "T_a": 375, "D_a": 5, "T_v": 500, "D_v": 20, "text_dim": 768,
                   "mosi_train_samples": MOSI_TRAIN},
        "settings": {"steps": args.steps, "warmup": args.warmup, "eval_steps": args.eval_steps,
                     "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                     "parallel": args.parallel, "isolated": not args.no_isolate,
                     "population": args.population_list or None,
                     "epoch_steps": args.epoch_steps, "run_batch": args.run_batch,
                     "precision": args.precision, "encode_once": not args.no_encode_once,
                     "init": args.init, "shapes": args.shapes,
                     "loss_preset": "code", "bert": "bert-base-uncased shape, random weights"},
        "environment": env, "device": device_name(env), "total_s": total_s,
        "complete": len(rows) == n_configs, "results": rows,
    }


if __name__ == "__main__":
    main()
