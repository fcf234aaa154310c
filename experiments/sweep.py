"""The main job, shared by `mosi_sweep`, `mosei_sweep` and `sims_sweep`: train EASE or LNLN under
the LNLN missingness protocol on several seeds, evaluate every missing rate and modality subset,
select checkpoints by both protocols (PROTOCOL.md section 4), and write results.json, results.md,
curves.png and run.log under --out.

Without the MMSA pickle the job says where to put it and runs on embedded synthetic data with a
small configuration (labelled "synthetic" everywhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ease_jax.report import (
    comparison_markdown,
    jsonable,
    plot_comparison,
    plot_curves,
    results_markdown,
    write_json,
)

DEFAULT_DATA = {
    "mosi": "data/MOSI/Processed/unaligned_50.pkl",
    "mosei": "data/MOSEI/Processed/unaligned_50.pkl",
    "sims": "data/SIMS/Processed/unaligned_39.pkl",
}
BERT_NAMES = {"mosi": "bert-base-uncased", "mosei": "bert-base-uncased", "sims": "bert-base-chinese"}
# Small synthetic run: finishes in minutes on a 2-core CPU (see README).
SYNTHETIC = dict(n_train=384, n_valid=128, n_test=256, text_len=8, audio_len=8, vision_len=8)
SYNTHETIC_TRAIN = dict(epochs=24, warmup_epochs=3, lr=1e-3, seeds=(1111,))
# ... and a narrower model (the papers' depths and token counts, width 64 and 4 heads of 16 instead
# of 128 and 8 heads of 64): 8x fewer FLOPs per position, so both models train in minutes.
SYNTHETIC_MODEL = dict(dim=64, heads=4, dim_head=16, mlp_dim=64)

def parse_args(dataset: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}_sweep",
        description=f"Train and evaluate EASE / LNLN on {dataset.upper()} under the LNLN "
                    "missingness protocol; writes results.json, results.md, curves.png, run.log.")
    p.add_argument("--model", type=_model_list, default=("ease", "lnln"),
                   help="ease, lnln or a comma-separated list (default: ease,lnln); several "
                        "models each write under --out/<model> plus a comparison there")
    add_run_arguments(p, dataset)
    p.add_argument("--burst", action="store_true",
                   help="also evaluate burst (temporally correlated) missingness at every rate")
    p.add_argument("--out", default=None,
                   help=f"output directory (default runs/{dataset}_<model> for one model, "
                        f"runs/{dataset} for several)")
    return p.parse_args(argv)


def add_run_arguments(p: argparse.ArgumentParser, dataset: str | None) -> None:
    """The options every training command shares (data, seeds, optimisation, text encoder,
    precision, devices, populations, resume). `dataset=None`: --data defaults to None (the
    command fills in its data set's default path)."""
    p.add_argument("--data", default=DEFAULT_DATA[dataset] if dataset else None,
                   help="MMSA pickle (default: " + (DEFAULT_DATA[dataset] if dataset else
                                                    "the data set's data/<DATASET>/Processed "
                                                    "pickle") + "); synthetic data when absent")
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
    p.add_argument("--parallel", choices=("pmap", "shard_map"), default="pmap")
    p.add_argument("--population", type=_population, default=None,
                   help="how many runs share one compiled program: N, or auto (as many as the "
                        "device memory holds, from the compiled program's footprint); default "
                        "all runs of a program; 1 trains the runs one after another")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="save the resumable state at most this often (and after the last "
                        "epoch); 0 = every epoch (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _population(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of runs >= 1 or 'auto', got {text!r}")
    return n


def _model_list(text: str) -> tuple[str, ...]:
    models = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in models if m not in ("ease", "lnln")]
    if not models or bad or len(set(models)) != len(models):
        raise argparse.ArgumentTypeError(
            f"expected ease, lnln or a comma-separated list of them without repeats, got {text!r}")
    return models


def find_bert(dataset: str, given: str | None) -> Path:
    """The BERT checkpoint directory: --bert, else the Hugging Face cache's snapshot."""
    if given:
        return Path(given)
    import os

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


def load_data(args, dataset: str, log):
    from ease_jax.data.mmsa import from_raw, load_mmsa
    from ease_jax.data.synthetic import synthetic

    path = Path(args.data)
    if path.is_file():
        return load_mmsa(path), False
    full = getattr(args, "synthetic", "small") == "full"
    log(f"NOTE: {path} not found. Put the MMSA pickle there ({DEFAULT_DATA[dataset]}: a dict "
        "with train/valid/test splits holding text_bert, text, audio, vision, audio_lengths, "
        "vision_lengths, regression_labels; see data/README.md) or pass --data PATH. "
        "Running on SYNTHETIC data with "
        + ("the real data set's sizes and the papers' settings (--synthetic full)" if full
           else "a small configuration") + " instead.")
    if full:
        raw = synthetic(dataset, seed=0)
        return from_raw(raw, source=f"synthetic:{dataset}(seed=0,full)"), True
    raw = synthetic(dataset, seed=0, **SYNTHETIC)
    return from_raw(raw, source=f"synthetic:{dataset}(seed=0)"), True


def build_run(args, dataset: str, data, is_synthetic: bool, model: str | None = None):
    """(ModelConfig, LossConfig, TrainConfig) of `model` (default: the first of --model)."""
    from ease_jax.config import LossConfig, TrainConfig, model_config

    dims = data.dims
    text_encoder = args.text_encoder or ("features" if is_synthetic else "bert")
    overrides = dict(audio_len=dims["T_a"], audio_dim=dims["D_a"], vision_len=dims["T_v"],
                     vision_dim=dims["D_v"], text_encoder=text_encoder,
                     precision=getattr(args, "precision", "fp32"))
    if text_encoder == "features":
        if data.train.text_features is None:
            raise SystemExit(f"--text-encoder features needs the `text` key in {args.data}")
        overrides.update(text_len=dims["L_f"], text_dim=dims["D_t"])
    else:
        overrides.update(text_len=dims["L"])
    small = is_synthetic and getattr(args, "synthetic", "small") == "small"
    train_kw = dict(SYNTHETIC_TRAIN) if small else {}
    if args.epochs is not None:
        train_kw["epochs"] = args.epochs
        train_kw["warmup_epochs"] = min(train_kw.get("warmup_epochs", 20), max(args.epochs // 10, 1))
    if args.lr is not None:
        train_kw["lr"] = args.lr
    if args.seeds:
        train_kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    train_kw["batch_size"] = args.batch_size
    loss = LossConfig.preset(args.loss_preset, dataset)
    model = model or args.model[0]
    if small:
        overrides.update(SYNTHETIC_MODEL)
    return model_config(model, dataset, **overrides), loss, TrainConfig(**train_kw)


def main(dataset: str, argv=None) -> dict:
    """Run the sweep; returns the model's results (one model) or {"models": {model: results},
    "comparison": {...}} (several models, each written under --out/<model>)."""
    args = parse_args(dataset, argv)
    models = args.model
    single = len(models) == 1
    out = Path(args.out or (f"runs/{dataset}_{models[0]}" if single else f"runs/{dataset}"))
    out.mkdir(parents=True, exist_ok=True)
    logger = _logger(out / "run.log")
    log = logger.info
    log(f"command: {' '.join(sys.argv)}")

    import jax

    _enable_compilation_cache(jax)
    data, is_synthetic = load_data(args, dataset, log)
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
    comparison = compare_models(per_model)
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(comparison_markdown(comparison, label))
    plot_comparison(per_model, out / "comparison.png", label)
    log(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'}, {out / 'comparison.png'}")
    print((out / "comparison.md").read_text())
    return {"models": per_model, "comparison": comparison}


def initial_params(mcfg, seed: int, bert_params=None):
    """Parameters a seed starts from: None (the train state initialises them from the seed) or,
    in BERT mode with a checkpoint, the seed's initialisation with the pretrained BERT inserted."""
    if bert_params is None:
        return None
    import jax

    from ease_jax.models import init_params

    params = init_params(mcfg, jax.random.key(seed))
    if jax.tree_util.tree_structure(params["encoder"]["bert"]) != \
            jax.tree_util.tree_structure(bert_params):
        raise ValueError("the BERT checkpoint's parameter tree does not match the model's BERT")
    params["encoder"]["bert"] = bert_params
    return params


def start_command(args, dataset: str, default_out: str):
    """The start every study command shares: the output directory (--out or `default_out`), its
    run.log logger, the persistent compilation cache, and the data (or the synthetic fallback):
    (out, log, data, is_synthetic)."""
    out = Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out / "run.log").info
    log(f"command: {' '.join(sys.argv)}")
    import jax

    _enable_compilation_cache(jax)
    data, is_synthetic = load_data(args, dataset, log)
    return out, log, data, is_synthetic


def prepare_run(args, dataset: str, data, is_synthetic: bool, model: str, log):
    """(RunConfig, pretrained BERT parameters or None) of `model` for these arguments: the
    model / loss / train configs of `build_run`, BERT loaded in BERT mode, no subset views when
    the MIPC terms are off."""
    from ease_jax.config import RunConfig, replace

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
    if not loss.use_mipc:
        mcfg = replace(mcfg, n_views=0)
    return RunConfig(dataset=dataset, model=mcfg, loss=loss, train=tcfg), bert_params


def train_runs(args, run, data, runs, out: Path, log, bert_params=None, burst_rates=()) -> dict:
    """`fit.fit_runs` with the command-line options: {run label: record}."""
    from ease_jax.fit import fit_runs

    size = population_size(args.population, run, data, len(runs), log)
    return fit_runs(run, data, runs, out, population=size, parallel=args.parallel,
                    resume=args.resume,
                    params=lambda r: initial_params(r.model or run.model, r.seed, bert_params),
                    burst_rates=burst_rates, log=log, progress=not args.no_progress,
                    checkpoint_seconds=args.checkpoint_seconds)


def run_model(args, dataset: str, data, is_synthetic: bool, model: str, out: Path, log) -> dict:
    """Train and evaluate one model on every seed; writes results.json / .md and curves.png under
    `out` and returns the results dict."""
    from ease_jax.evaluate import aggregate, protocol_table
    from ease_jax.metrics import regression_metrics
    from ease_jax.population import Run

    run, bert_params = prepare_run(args, dataset, data, is_synthetic, model, log)
    mcfg = run.model
    label = "synthetic" if is_synthetic else "real"

    seeds_out, seed_tables, t_start = {}, {"paper": [], "honest": []}, time.perf_counter()
    burst_rates = tuple(round(0.1 * i, 1) for i in range(10)) if args.burst else ()
    runs = [Run(seed) for seed in run.train.seeds]
    records = train_runs(args, run, data, runs, out, log, bert_params, burst_rates)
    for r in runs:
        rec = records[r.label]
        for protocol in seed_tables:
            seed_tables[protocol].append(protocol_table(dataset, rec["selected"], protocol))
        seeds_out[str(r.seed)] = {
            "selected_epochs": {c: res["epoch"] + 1 for c, res in rec["selected"].items()},
            "paper": seed_tables["paper"][-1], "honest": seed_tables["honest"][-1],
            "history": rec["history"], "seconds": rec["seconds"],
            "population": rec["population"],
        }

    median = float(np.median(data.train.labels))
    constant = regression_metrics(np.full(data.test.n, median), data.test.labels, dataset)
    results = {
        "dataset": dataset, "model": model,
        "data": {"source": data.source, "sha256": data.sha256, "synthetic": is_synthetic,
                 "sizes": [data.train.n, data.valid.n, data.test.n]},
        "config": run.to_dict() | {"model": jsonable(dataclasses.asdict(mcfg))},
        "protocols": {p: aggregate(t) for p, t in seed_tables.items()},
        "baselines": {"constant": constant | {"value": median}},
        "seeds": seeds_out,
        "timings": {"total_seconds": time.perf_counter() - t_start,
                    "train_seconds": sum(s["seconds"]["train"] for s in seeds_out.values()),
                    "eval_seconds": sum(s["seconds"]["eval"] for s in seeds_out.values()),
                    "host_seconds": sum(s["seconds"]["host"] for s in seeds_out.values()),
                    "protocol_seconds": sum(s["seconds"]["protocol"] for s in seeds_out.values())},
    }
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(results, model, label))
    plot_curves(results, out / "curves.png", label)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    print((out / "results.md").read_text())
    return results


def population_size(requested, run, data, n_runs: int, log) -> int:
    """How many runs share one program: all (default), N, or `auto`: as many as fit in the
    device memory (GPU `bytes_limit`, else 80% of the host RAM) by the compiled epoch program's
    footprint (`population.run_footprint_bytes`): state + temporaries per vmapped run, or one
    shared set of temporaries when the runs are mapped in turn (CPU)."""
    if requested is None:
        return n_runs
    if requested != "auto":
        return max(1, min(int(requested), n_runs))
    import jax

    from ease_jax.population import default_run_batch, run_footprint_bytes
    from ease_jax.train import model_arrays

    mem = run_footprint_bytes(run, model_arrays(data.train, run.model))
    vmapped = default_run_batch(jax.local_devices(), n_runs) > 1
    per_run = mem["state"] + (mem["temp"] if vmapped else 0)
    free = device_memory_bytes() - mem["data"] - (0 if vmapped else mem["temp"])
    size = max(1, min(n_runs, int(free // max(per_run, 1))))
    log(f"--population auto: {per_run / 2**30:.2f} GiB per run "
        f"({'vmapped' if vmapped else 'mapped in turn'}; data {mem['data'] / 2**30:.2f} GiB, "
        f"step temporaries {mem['temp'] / 2**30:.2f} GiB), {free / 2**30:.1f} GiB available -> "
        f"{size} run(s) per program")
    return size


def device_memory_bytes() -> float:
    """Memory one program may use: the accelerator's `bytes_limit`, else 80% of the host RAM."""
    import os

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.9 * float(stats["bytes_limit"])
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def compare_models(per_model: dict) -> dict:
    """Side-by-side view of several models' results on the same data: per protocol, each model's
    per-rate test metrics, 10-rate mean, inter-modal rows and mean, and the constant baseline."""
    first = next(iter(per_model.values()))
    out = {"dataset": first["dataset"], "data": first["data"],
           "baselines": first["baselines"], "protocols": {}}
    for proto in ("honest", "paper"):
        out["protocols"][proto] = {
            model: {key: res["protocols"][proto].get(key, {}) for key in
                    ("per_rate", "mean_over_rates", "inter_modal", "mean_over_subsets")}
            for model, res in per_model.items()}
    out["seeds"] = {model: list(res["seeds"]) for model, res in per_model.items()}
    return out


def _enable_compilation_cache(jax) -> None:
    """Persist compiled train / eval steps across runs (compiling the train step takes minutes on
    a CPU). Off with EASE_JAX_NO_COMPILATION_CACHE=1; location EASE_JAX_CACHE_DIR."""
    import os

    if os.environ.get("EASE_JAX_NO_COMPILATION_CACHE"):
        return
    cache = os.environ.get("EASE_JAX_CACHE_DIR", str(Path.home() / ".cache" / "ease_jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _logger(path: Path) -> logging.Logger:
    logger = logging.getLogger("ease_jax.sweep")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # libraries that configure the root logger would print twice
    logger.handlers.clear()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    logger.addHandler(sh)
    return logger
