"""What every command of `experiments/` shares: the training options, logging, the compilation
cache, the data (or its synthetic stand-in), the run configuration and the clear-error exit.

The commands parse arguments, call the library and write what it returns through
`ease_jax.report`; the numbers are the library's (docs/design.md "Layout").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ease_jax.config import BEHAVIOURS, RATE_INPUTS, TRAIN_MASKS

DEFAULT_DATA = {
    "mosi": "data/MOSI/Processed/unaligned_50.pkl",
    "mosei": "data/MOSEI/Processed/unaligned_50.pkl",
    "sims": "data/SIMS/Processed/unaligned_39.pkl",
}
BERT_NAMES = {"mosi": "bert-base-uncased", "mosei": "bert-base-uncased", "sims": "bert-base-chinese"}


def add_run_arguments(p: argparse.ArgumentParser, dataset: str | None) -> None:
    """The options every training command shares (data, seeds, optimisation, text encoder,
    precision, devices, populations, resume). `dataset=None`: --data defaults to None (the
    command fills in its data set's default path)."""
    p.add_argument("--data", default=None,
                   help="MMSA pickle; a path given here must exist (default: "
                        + (DEFAULT_DATA[dataset] if dataset else
                           "the data set's data/<DATASET>/Processed pickle")
                        + ", and synthetic data, said loudly, when that default is absent)")
    p.add_argument("--synthetic", choices=("small", "full"), default="small",
                   help="without the pickle: small = the quick configuration (few samples and "
                        "frames, a narrower model, 24 epochs; default), full = synthetic data at "
                        "the real data set's sizes and shapes with the papers' model and "
                        "training settings (a speed check for accelerators)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 1111,1112,1113)")
    p.add_argument("--epochs", type=int, default=None, help="default 200")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 1e-5 EASE, 1e-4 LNLN")
    p.add_argument("--text-encoder", choices=("bert", "features"), default=None,
                   help="bert: fine-tune BERT from text ids (the papers, default); features: "
                        "precomputed MMSA `text` features (frozen BERT)")
    p.add_argument("--bert", default=None,
                   help="Hugging Face checkpoint directory (default: "
                        + (BERT_NAMES[dataset] if dataset else "the data set's BERT")
                        + " in the local Hugging Face cache)")
    p.add_argument("--loss-preset", choices=("code", "paper"), default="code")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="matmul precision: bf16 = bfloat16 matmuls with float32 parameters, "
                        "softmax, normalisation and losses (for GPUs; default fp32)")
    p.add_argument("--parallel", choices=("pmap", "shard_map"), default=None,
                   help="pmap (default in one process) or shard_map (the only path with "
                        "several processes, and their default)")
    p.add_argument("--population", type=population_arg, default=None,
                   help="how many runs share one compiled program: N, or auto (as many as the "
                        "device memory holds, from the compiled program's footprint); default "
                        "all runs of a program; 1 trains the runs one after another")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="save the resumable state at most this often (and after the last "
                        "epoch); 0 = every epoch (default %(default)s)")
    g = p.add_argument_group(
        "released behaviour (README \"Where this project differs from the released code\"; "
        "docs/protocol.md section 12)")
    g.add_argument("--behaviour", choices=tuple(BEHAVIOURS), default="default",
                   help="default: this project's choices; released: the released code's "
                        "training masks, drawn-rate input and sampled EASE evaluation (the "
                        "three options below, each of which overrides it)")
    g.add_argument("--train-masks", choices=TRAIN_MASKS, default=None,
                   help="redrawn: new training masks every epoch from the run's key (default); "
                        "released: the released generate_m masks, fixed for the run")
    g.add_argument("--rate-input", choices=RATE_INPUTS, default=None,
                   help="what EASE's gate and LNLN's L_cc target read: observed missing "
                        "fraction (default) or drawn rate label (evaluation: the condition's "
                        "nominal rate)")
    g.add_argument("--eval-z", choices=("mean", "sampled"), default=None,
                   help="EASE evaluation: z_hat = mu (default) or sampled as released")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("many processes (README \"Many machines\")")
    g.add_argument("--distributed", action="store_true",
                   help="join a jax.distributed job: with the three options below, or detected "
                        "from the cluster environment (SLURM, Open MPI, ...) without them")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")
    g.add_argument("--distributed-timeout", type=int, default=120,
                   help="seconds to wait for the coordinator and the peers at start-up, and "
                        "(a quarter of it, at least 10) for a silent peer before the job stops "
                        "(default %(default)s)")


def population_arg(text: str):
    """`--population`: "auto" or a number of runs >= 1."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of runs >= 1 or 'auto', got {text!r}")
    return n


def model_list(text: str) -> tuple[str, ...]:
    """`--model`: ease, lnln or a comma-separated list of them without repeats."""
    models = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in models if m not in ("ease", "lnln")]
    if not models or bad or len(set(models)) != len(models):
        raise argparse.ArgumentTypeError(
            f"expected ease, lnln or a comma-separated list of them without repeats, got {text!r}")
    return models


def logger(path: Path | None, name: str = "ease_jax", stderr: bool = True) -> logging.Logger:
    """A logger writing plain lines to stderr (unless `stderr` is False) and, with `path`,
    time-stamped lines to that file."""
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.propagate = False  # libraries that configure the root logger would print twice
    log.handlers.clear()
    if path is not None:
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    return log


def start_distributed(args) -> None:
    """With --distributed, join the job (before any other JAX call) and settle --parallel:
    shard_map with several processes (pmap is single-process), pmap otherwise by default."""
    from ease_jax import distributed

    if getattr(args, "distributed", False):
        timeout = args.distributed_timeout
        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   timeout_s=timeout, heartbeat_timeout_s=max(10, timeout // 4))
        except distributed.DistributedError as e:
            raise SystemExit(f"error: {e}") from None
    several = distributed.process_count() > 1 if getattr(args, "distributed", False) else False
    if getattr(args, "parallel", "pmap") is None:
        args.parallel = "shard_map" if several else "pmap"
    elif args.parallel == "pmap" and several:
        raise SystemExit("error: --parallel pmap runs in one process; with several processes "
                         "use --parallel shard_map (the default there)")


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (compiling the train step takes minutes on a CPU).
    Off with EASE_JAX_NO_COMPILATION_CACHE=1; location EASE_JAX_CACHE_DIR."""
    import jax

    if os.environ.get("EASE_JAX_NO_COMPILATION_CACHE"):
        return
    cache = os.environ.get("EASE_JAX_CACHE_DIR", str(Path.home() / ".cache" / "ease_jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def load_data(args, dataset: str, log):
    """(MMSAData, is_synthetic): the pickle at --data, or at the data set's default path; only when
    --data is not given and the default is absent, the synthetic stand-in of --synthetic
    (`data.synthetic.synthetic_data`), said loudly. A --data path that does not exist, or a file
    that is not a valid MMSA pickle, ends the command with one `error: ...` line naming it."""
    from ease_jax.data.mmsa import MMSAFormatError, load_mmsa
    from ease_jax.data.synthetic import synthetic_data

    path = Path(args.data or DEFAULT_DATA[dataset])
    if args.data is not None and not path.is_file():
        raise SystemExit(f"error: --data {path}: no such file (give the path of an MMSA pickle; "
                         f"without --data the default {DEFAULT_DATA[dataset]} is read, and "
                         "synthetic data are used only when that default is absent)")
    if path.is_file():
        try:
            return load_mmsa(path), False
        except MMSAFormatError as e:
            raise SystemExit(f"error: {e}") from None
    size = getattr(args, "synthetic", "small")
    log(f"NOTE: {path} not found. Put the MMSA pickle there ({DEFAULT_DATA[dataset]}: a dict "
        "with train/valid/test splits holding text_bert, text, audio, vision, audio_lengths, "
        "vision_lengths, regression_labels; see data/README.md) or pass --data PATH. "
        "Running on SYNTHETIC data with "
        + ("the real data set's sizes and the papers' settings (--synthetic full)"
           if size == "full" else "a small configuration") + " instead.")
    return synthetic_data(dataset, size), True


def find_bert(dataset: str, given: str | None) -> Path:
    """The BERT checkpoint directory: --bert, else the Hugging Face cache's snapshot."""
    if given:
        return Path(given)
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


def build_run(args, dataset: str, data, is_synthetic: bool, model: str | None = None):
    """(ModelConfig, LossConfig, TrainConfig) of `model` (default: the first of --model) for
    these arguments and this data."""
    from ease_jax.config import (
        SYNTHETIC_SMALL_MODEL,
        SYNTHETIC_SMALL_TRAIN,
        LossConfig,
        TrainConfig,
        model_config,
        scaled_warmup,
    )

    dims = data.dims
    text_encoder = args.text_encoder or ("features" if is_synthetic else "bert")
    overrides = dict(audio_len=dims["T_a"], audio_dim=dims["D_a"], vision_len=dims["T_v"],
                     vision_dim=dims["D_v"], text_encoder=text_encoder,
                     precision=getattr(args, "precision", "fp32"))
    if text_encoder == "features":
        if data.train.text_features is None:
            raise SystemExit(f"error: --text-encoder features needs the `text` key in "
                             f"{data.source}")
        overrides.update(text_len=dims["L_f"], text_dim=dims["D_t"])
    else:
        overrides.update(text_len=dims["L"])
    small = is_synthetic and getattr(args, "synthetic", "small") == "small"
    train_kw = dict(SYNTHETIC_SMALL_TRAIN) if small else {}
    if args.epochs is not None:
        train_kw["epochs"] = args.epochs
        train_kw["warmup_epochs"] = scaled_warmup(args.epochs, train_kw.get("warmup_epochs", 20))
    if args.lr is not None:
        train_kw["lr"] = args.lr
    if args.seeds:
        train_kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    train_kw["batch_size"] = args.batch_size
    loss = LossConfig.preset(args.loss_preset, dataset)
    if small:
        overrides.update(SYNTHETIC_SMALL_MODEL)
    switches = behaviour_switches(args)
    overrides.update(rate_input=switches["rate_input"], sample_at_eval=switches["sample_at_eval"])
    train_kw["train_masks"] = switches["train_masks"]
    mcfg = model_config(model or args.model[0], dataset, **overrides)
    return mcfg, loss, TrainConfig(**train_kw)


def behaviour_switches(args) -> dict:
    """{"train_masks", "rate_input", "sample_at_eval"} of --behaviour, each overridden by its own
    option when given (commands without these options get the default behaviour)."""
    switches = dict(BEHAVIOURS[getattr(args, "behaviour", "default")])
    for option, key in (("train_masks", "train_masks"), ("rate_input", "rate_input")):
        if getattr(args, option, None) is not None:
            switches[key] = getattr(args, option)
    if getattr(args, "eval_z", None) is not None:
        switches["sample_at_eval"] = args.eval_z == "sampled"
    return switches


def start_command(args, dataset: str, default_out: str):
    """The start every training command shares: the output directory (--out or `default_out`),
    its run.log logger, the persistent compilation cache, and the data (or the synthetic
    stand-in): (out, log, data, is_synthetic). With several processes (--distributed) process 0
    logs to run.log and stderr, process i only to run.log.<i>, and the processes must have read
    the same data."""
    from ease_jax import distributed

    start_distributed(args)
    out = Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)
    rank = distributed.process_index()
    log = logger(out / ("run.log" if rank == 0 else f"run.log.{rank}"), stderr=rank == 0).info
    log(f"command: {' '.join(sys.argv)}")
    enable_compilation_cache()
    data, is_synthetic = load_data(args, dataset, log)
    try:
        distributed.check_same_data(data.sha256, data.source)
    except distributed.DistributedError as e:
        raise SystemExit(f"error: {e}") from None
    if distributed.process_count() > 1:
        import jax

        log(f"process {rank} of {distributed.process_count()}: {jax.local_device_count()} local "
            f"device(s), {len(distributed.global_devices())} in the job")
    return out, log, data, is_synthetic


def prepare_run(args, dataset: str, data, is_synthetic: bool, model: str, log):
    """(RunConfig, pretrained BERT parameters or None) of `model` for these arguments: the
    configs of `build_run`, BERT loaded in BERT mode."""
    from ease_jax.config import RunConfig, behaviour, replace

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
    switches = behaviour(mcfg, tcfg)
    log(f"{model}: behaviour {switches['name']}: training masks {switches['train_masks']}, "
        f"missing-rate input {switches['rate_input']}, EASE evaluation z = "
        f"{switches['eval_z']}")
    return RunConfig(dataset=dataset, model=mcfg, loss=loss, train=tcfg), bert_params


def is_primary() -> bool:
    """Whether this process writes the reports: always in one process, process 0 of several."""
    from ease_jax import distributed

    return distributed.is_primary()


def train_runs(args, run, data, runs, out: Path, log, bert_params=None, burst_rates=()) -> dict:
    """`fit.fit_runs` with the command-line options: {run label: record}."""
    from ease_jax.fit import fit_runs
    from ease_jax.models import initial_params
    from ease_jax.population import plan_population

    size = plan_population(args.population, run,
                           data.train.model_arrays(run.model.text_encoder), len(runs), log)
    return fit_runs(run, data, runs, out, population=size, parallel=args.parallel,
                    resume=args.resume,
                    params=lambda r: initial_params(r.model or run.model, r.seed, bert_params),
                    burst_rates=burst_rates, log=log, progress=not args.no_progress,
                    checkpoint_seconds=args.checkpoint_seconds)


def condition(text: str, *, allow_none: bool):
    """`--condition` text -> an evaluation condition (`evaluate.parse_condition`); a RunError
    naming the option otherwise."""
    from ease_jax.diagnostics import RunError
    from ease_jax.evaluate import parse_condition

    try:
        return parse_condition(text, allow_none=allow_none)
    except ValueError as e:
        raise RunError(f"--{e}") from None


RESULTS_KEYS = ("dataset", "model", "data", "config", "seeds", "protocols", "baselines")


def read_results(path: Path) -> dict:
    """A sweep's results.json (`path`), with one clear error for a missing, damaged or foreign
    file (used by the commands that read finished runs: compare, pool)."""
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (give a sweep's output directory for one "
                         "model, or its results.json)")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: not JSON ({e})") from None
    missing = [k for k in RESULTS_KEYS if not isinstance(res, dict) or k not in res]
    if missing:
        raise SystemExit(f"error: {path}: not a sweep's results.json (no {' / '.join(missing)})")
    return res


def check_same_data(path: Path, res: dict, ref_path: Path, ref: dict) -> None:
    """Stop with an error unless the run at `path` trained on the same data (sha256) as the one
    at `ref_path` (their results dicts `res`, `ref`)."""
    if res["data"].get("sha256") != ref["data"].get("sha256"):
        raise SystemExit(f"error: {path}: trained on other data ({res['data'].get('source')}, "
                         f"sha256 {res['data'].get('sha256')}) than {ref_path} "
                         f"({ref['data'].get('source')})")


def exit_on_error(main_fn, argv=None):
    """Run `main_fn(argv)`; the project's own errors about inputs (a run directory, a data file,
    a condition) end the command with one `error: ...` line and a non-zero exit."""
    from ease_jax.data.mmsa import MMSAFormatError
    from ease_jax.diagnostics import RunError

    try:
        return main_fn(argv)
    except (RunError, MMSAFormatError) as e:
        raise SystemExit(f"error: {e}") from None
