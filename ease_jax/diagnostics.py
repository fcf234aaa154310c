"""Trained runs applied to data: load a sweep's run directory, run its honest checkpoints over a
split under a missingness condition, and compute the papers' analyses of the outputs
(docs/protocol.md section 11; the `analyze` and `predict` commands are thin layers over this module).

A run directory is what a sweep writes for one model (`runs/mosi_ease`, or `runs/mosi/ease` for
the two-model default): `results.json` (data source and sha256, the configs, the seeds) and per
seed `seed_<s>/best` (the honest protocol's parameters). An ablation's output directory
(`ablation.json`, per run `<variant>_seed_<s>/best`) is read too, one variant at a time.

* `load_run` / `load_run_data` / `restore_params`: the run, its data (the training pickle, a
  rebuilt synthetic set or another pickle; the sha256 is checked) and one seed's parameters.
  Every problem is a `RunError` whose message names the path.
* Conditions are `evaluate`'s (`parse_condition`, `MaskBank.keep`).
* `Forward`: a host batcher over `train.forward` (fixed-size batches, the last one padded) that
  keeps the model's diagnostic outputs (gate, uncertainty, completeness, UCMI Gaussian, clean
  tokens, the full-input prediction), compiled once per run.
* `prediction_table`: one row per sample (prediction, observed missing fractions, diagnostics).
* `analyze_run`: calibration (Fig. 4), elastic alignment (Fig. 5 / 8) and cross-view consistency
  (Fig. 6 / 9) per seed and pooled over seeds, from the pure functions of `ease_jax.analysis`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ease_jax.analysis import (
    elastic_penalty,
    elastic_ratio,
    ks_normal,
    pearson,
    prediction_consistency,
    standardized_residuals,
)
from ease_jax.config import BertConfig, ModelConfig
from ease_jax.data.missing import MODALITIES
from ease_jax.evaluate import MaskBank, condition_json

__all__ = [
    "MODALITIES",
    "Forward",
    "RunError",
    "RunInfo",
    "analyze_run",
    "has_ucmi",
    "load_run",
    "load_run_data",
    "prediction_table",
    "restore_params",
]

# Outputs with a leading modality axis [3, B, ...]; every other output is [B, ...].
_MODALITY_AXIS = ("gate", "uncertainty", "clean_tokens", "imp_mean", "imp_var", "imp_sample")
ELASTIC_BINS = 10  # percentile-rank bins of the binned elastic / rigid curves in the JSON


class RunError(ValueError):
    """A run directory, checkpoint, data file or condition that cannot be used; the message
    names the path (the commands turn it into a SystemExit)."""


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """A loaded run directory: where it is, what was trained, and each seed's checkpoint."""

    path: Path
    layout: str  # "sweep" (results.json) or "ablation" (ablation.json, one variant)
    dataset: str
    model: str  # "ease" | "lnln"
    model_cfg: ModelConfig
    loss: dict
    data: dict  # results.json "data": source, sha256, synthetic, sizes
    seeds: list[int]
    checkpoints: dict[int, Path]  # seed -> <run>/seed_<s>/best
    variant: str | None = None
    results: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        base = f"{self.model.upper()} {self.path}"
        return base if self.variant is None else f"{base} [{self.variant}]"

    @property
    def alpha(self) -> float:
        """The elasticity alpha of Eq. 6 the run was trained with (default 1)."""
        return float(self.loss.get("alpha", 1.0))


def has_ucmi(cfg: ModelConfig) -> bool:
    """Whether the model has EASE's UCMI imputer (gate, uncertainty, imputed Gaussian)."""
    return cfg.model == "ease" and cfg.use_ucmi


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise RunError(f"{path}: expected a JSON object")
    return obj


def model_config_from_dict(d: Any, source: str) -> ModelConfig:
    """`ModelConfig` from its results.json dict (the "bert" entry a dict of BertConfig fields or
    None); RunError naming `source` on unknown fields or invalid values."""
    if not isinstance(d, dict):
        raise RunError(f"{source}: config.model is not a dict of ModelConfig fields")
    d = dict(d)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RunError(f"{source}: config.model has fields this version does not know: {unknown}")
    try:
        if isinstance(d.get("bert"), dict):
            d["bert"] = BertConfig(**d["bert"])
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise RunError(f"{source}: config.model is not a valid ModelConfig ({e})") from e


def load_run(path: str | Path, *, model: str | None = None,
             variant: str | None = None, purpose: str = "this command") -> RunInfo:
    """Read a run directory (see the module docstring) and check it is complete.

    Args:
      path: the sweep's --out for one model (results.json + seed_<s>/best), or an ablation's
        --out (ablation.json + <variant>_seed_<s>/best) with `variant`.
      model: "ease" / "lnln" when `purpose` needs that model (RunError otherwise).
      variant: the ablation variant (e.g. "w/o MIPC"; default "EASE"); sweep directories have
        none.

    Raises:
      RunError: the directory is missing, has no results.json (or ablation.json), is another
        model than `model`, or lacks a seed's `best` checkpoint; the message names the path.
    """
    p = Path(path)
    if not p.exists():
        raise RunError(f"run directory {p} does not exist (expected the --out directory of a "
                       "sweep: results.json and seed_<s>/best per seed)")
    if not p.is_dir():
        raise RunError(f"run directory {p} is not a directory")
    results_path, ablation_path = p / "results.json", p / "ablation.json"
    if results_path.is_file():
        if variant is not None:
            raise RunError(f"{p} is a sweep run ({results_path}); a variant applies to an "
                           "ablation directory (ablation.json) only")
        info = _sweep_run(p, results_path)
    elif ablation_path.is_file():
        info = _ablation_run(p, ablation_path, variant or "EASE")
    else:
        subs = sorted(d.name for d in p.iterdir() if (d / "results.json").is_file())
        hint = (f"; it holds several models' runs: pass one of "
                f"{', '.join(str(p / s) for s in subs)}") if subs else (
            "; is this the --out directory of a finished sweep?")
        raise RunError(f"{results_path} not found{hint}")
    if model is not None and info.model != model:
        raise RunError(f"{p} is a {info.model.upper()} run (model {info.model!r} in "
                       f"{results_path if info.layout == 'sweep' else ablation_path}), but "
                       f"{purpose} needs the {model.upper()} model")
    for seed, ckpt in info.checkpoints.items():
        if not ckpt.is_dir():
            raise RunError(f"{ckpt} not found: seed {seed} of {p} has no honest checkpoint "
                           "(did its training finish?)")
    return info


def _sweep_run(p: Path, results_path: Path) -> RunInfo:
    res = _read_json(results_path)
    missing = [k for k in ("dataset", "model", "config", "seeds") if k not in res]
    if missing:
        raise RunError(f"{results_path}: not a sweep's results.json (missing {missing})")
    cfg = res["config"]
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise RunError(f"{results_path}: config.model is missing")
    mcfg = model_config_from_dict(cfg["model"], str(results_path))
    if res["model"] != mcfg.model:
        raise RunError(f"{results_path}: model {res['model']!r} but config.model.model "
                       f"{mcfg.model!r}")
    seeds = [int(s) for s in res["seeds"]]
    if not seeds:
        raise RunError(f"{results_path}: no seeds")
    return RunInfo(path=p, layout="sweep", dataset=res["dataset"], model=res["model"],
                   model_cfg=mcfg, loss=dict(cfg.get("loss") or {}),
                   data=dict(res.get("data") or {}), seeds=seeds,
                   checkpoints={s: p / f"seed_{s}" / "best" for s in seeds}, results=res)


def _ablation_run(p: Path, ablation_path: Path, variant: str) -> RunInfo:
    """One variant of an ablation directory: ablation.json records each variant's changes to the
    model and loss configs ("change") and its run directories ("runs", one per seed)."""
    res = _read_json(ablation_path)
    variants = res.get("variants") or {}
    if variant not in variants:
        raise RunError(f"{ablation_path}: no variant {variant!r}; it holds {list(variants)}")
    entry = variants[variant]
    try:
        model_changes, loss_changes = entry["change"]
        run_names = list(entry["runs"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{ablation_path}: variant {variant!r} lacks its change / runs "
                       f"records ({e})") from e
    cfg = res.get("config") or {}
    mcfg = model_config_from_dict(dict(cfg.get("model") or {}, **model_changes),
                                  str(ablation_path))
    seeds = [int(s) for s in res.get("seeds", [])]
    if not seeds or len(seeds) != len(run_names):
        raise RunError(f"{ablation_path}: expected one run per seed, got seeds {seeds} and "
                       f"runs {run_names}")
    loss = dict(cfg.get("loss") or {}, **loss_changes)
    return RunInfo(path=p, layout="ablation", dataset=res.get("dataset", "mosi"),
                   model=mcfg.model, model_cfg=mcfg, loss=loss, data=dict(res.get("data") or {}),
                   seeds=seeds,
                   checkpoints={s: p / name / "best" for s, name in zip(seeds, run_names)},
                   variant=variant, results=res)


def load_run_data(run: RunInfo, data_path: str | Path | None = None, *, log: Callable = print):
    """The data to apply `run` to: `data_path` (an MMSA pickle) when given, else the data the run
    was trained on (results.json `data.source`: a pickle path, or "synthetic:<dataset>(seed=0)" /
    "...(seed=0,full)", rebuilt with `data.synthetic.synthetic_data`).

    The sha256 is compared with the run's (results.json `data.sha256`, when not None) and a
    difference is logged loudly; the data's shapes must fit the model (RunError otherwise).

    Returns:
      (MMSAData, info) with info = {"source", "sha256", "trained_on": {"source", "sha256"},
      "sha256_matches": True / False / None (unknown), "synthetic": bool}.
    """
    from ease_jax.data.mmsa import MMSAFormatError, load_mmsa

    trained_src = run.data.get("source")
    trained_sha = run.data.get("sha256")
    is_synthetic = False
    if data_path is not None:
        pkl = Path(data_path)
        if not pkl.is_file():
            raise RunError(f"data file {pkl} not found (--data: an MMSA pickle)")
    elif trained_src is None:
        raise RunError(f"{run.path}: results.json has no data.source; pass --data PKL")
    elif str(trained_src).startswith("synthetic:"):
        from ease_jax.data.synthetic import synthetic_data

        size = "full" if str(trained_src).endswith(",full)") else "small"
        data = synthetic_data(run.dataset, size)
        is_synthetic = True
    else:
        pkl = Path(trained_src)
        if not pkl.is_file():
            raise RunError(f"{pkl} not found: {run.path} was trained on it (results.json "
                           f"data.source, relative to the directory the sweep ran in); run "
                           f"from there or pass --data PKL")
    if not is_synthetic:
        try:
            data = load_mmsa(pkl)
        except FileNotFoundError as e:
            raise RunError(f"data file {pkl} not found ({e})") from e
        except MMSAFormatError as e:
            raise RunError(str(e)) from e
    matches = None
    if trained_sha is not None and data.sha256 is not None:
        matches = data.sha256 == trained_sha
        if not matches:
            what = ("the file changed since the run was trained on it" if data_path is None
                    else "not the data the run was trained on")
            log(f"WARNING: {data.source} has sha256 {data.sha256}, but {run.path} was trained on "
                f"{trained_src} with sha256 {trained_sha}: {what}")
    if is_synthetic:
        sizes = [data.train.n, data.valid.n, data.test.n]
        if run.data.get("sizes") not in (None, sizes):
            log(f"WARNING: the rebuilt synthetic data has split sizes {sizes}, but {run.path} was "
                f"trained on {run.data['sizes']}: the sweep's synthetic recipe changed")
    check_data_fits(run, data)
    info = {"source": data.source, "sha256": data.sha256,
            "trained_on": {"source": trained_src, "sha256": trained_sha},
            "sha256_matches": matches, "synthetic": is_synthetic,
            "sizes": [data.train.n, data.valid.n, data.test.n]}
    return data, info


def check_data_fits(run: RunInfo, data) -> None:
    """RunError when the data's shapes are not the model's (sequence lengths and widths)."""
    cfg, dims = run.model_cfg, data.dims
    want = {"audio_len": dims["T_a"], "audio_dim": dims["D_a"], "vision_len": dims["T_v"],
            "vision_dim": dims["D_v"]}
    if cfg.text_encoder == "features":
        if dims["L_f"] is None:
            raise RunError(f"{data.source}: no text features (`text` key), but {run.path} uses "
                           "text_encoder='features'")
        want.update(text_len=dims["L_f"], text_dim=dims["D_t"])
    else:
        want.update(text_len=dims["L"])
    bad = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        detail = ", ".join(f"{k} {m} (model) vs {d} (data)" for k, (m, d) in bad.items())
        raise RunError(f"{data.source} does not fit the model of {run.path}: {detail}")


@functools.lru_cache(maxsize=2)
def _param_target(cfg: ModelConfig):
    """Zeros with the parameter tree of `cfg` (restore's target; shapes from `jax.eval_shape`,
    so nothing is initialised or compiled)."""
    import jax

    from ease_jax.models import init_params

    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def restore_params(run: RunInfo, seed: int) -> tuple[Any, dict]:
    """(parameters, record) of `seed`'s honest checkpoint (`<run>/seed_<s>/best`)."""
    from ease_jax import checkpoint

    if seed not in run.checkpoints:
        raise RunError(f"{run.path}: no seed {seed}; the run has seeds {run.seeds}")
    path = run.checkpoints[seed]
    if not path.is_dir():
        raise RunError(f"{path} not found: seed {seed} of {run.path} has no honest checkpoint")
    try:
        return checkpoint.restore(path, _param_target(run.model_cfg))
    except FileNotFoundError as e:
        raise RunError(f"{path}: no checkpoint in it ({e})") from e
    except Exception as e:  # Orbax: structure / shape mismatch with the recorded config
        raise RunError(f"{path}: cannot restore it as the model recorded in "
                       f"{run.path} ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# Forward pass with diagnostics
# ---------------------------------------------------------------------------------------------


class Forward:
    """A host batcher over `train.forward`, the one evaluation forward pass, for one model config.

    `Forward(cfg, n, clean=..., full=...)(params, split, keep, keep_full)` -> dict of host arrays
    over the split's N samples: "pred" [N] and "missing_rate" [N, 3] always; EASE with UCMI:
    "gate", "uncertainty" [3, N]; with `clean` also "clean_tokens", "imp_mean", "imp_var",
    "imp_sample" [3, N, K, d]; LNLN: "completeness" [N]; with `full` also "pred_full" [N], the
    prediction under `keep_full`. Batches of min(batch_size, N) rows, the last one padded (padding
    dropped), so the program compiles once; batch i draws imputation noise (only with
    `sample_at_eval`) from `train.eval_noise_key(i)`.
    """

    def __init__(self, cfg: ModelConfig, n: int, *, batch_size: int = 256, clean: bool = False,
                 full: bool = False):
        import jax

        from ease_jax.train import forward

        self.cfg = cfg
        self.batch_size = max(1, min(int(batch_size), int(n)))
        self.clean = bool(clean) and has_ucmi(cfg)
        self.full = bool(full)
        self._forward = jax.jit(functools.partial(forward, cfg, clean=self.clean))

    def __call__(self, params, split, keep: dict, keep_full: dict | None = None, *,
                 progress: bool = False, desc: str = "forward") -> dict[str, np.ndarray]:
        import jax
        from tqdm.auto import tqdm

        from ease_jax.train import eval_noise_key

        if self.full and keep_full is None:
            raise ValueError("keep_full: this Forward computes the full-input prediction too")
        arrays = split.model_arrays(self.cfg.text_encoder, labels=False)
        params = jax.device_put(params)  # once, not with every batch
        n, bs = split.n, self.batch_size
        chunks: list[dict] = []
        for i in tqdm(range(math.ceil(n / bs)), desc=desc, unit="batch", disable=not progress,
                      leave=False):
            sl = slice(i * bs, min((i + 1) * bs, n))
            batch = {k: _pad(v[sl], bs) for k, v in arrays.items()}
            kb = {k: _pad(v[sl], bs) for k, v in keep.items()}
            kf = {k: _pad(v[sl], bs) for k, v in keep_full.items()} if self.full else None
            out = self._forward(params, batch, kb, eval_noise_key(i), full_keep=kf)
            chunks.append({k: np.asarray(v) for k, v in jax.device_get(out).items()})
        res = {}
        for k in chunks[0]:
            axis = 1 if k in _MODALITY_AXIS else 0
            res[k] = np.concatenate([c[k] for c in chunks], axis=axis)
            res[k] = res[k][:, :n] if axis == 1 else res[k][:n]
        return res


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(x)
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def prediction_table(run: RunInfo, params, split, condition, *, batch_size: int = 256,
                     progress: bool = False, masks=None) -> dict[str, np.ndarray]:
    """One row per sample of `split` under `condition` (None = inputs as given), as columns:
    "id" (the split's sample ids), "label", "prediction", "missing_text/audio/vision" (the
    fraction of valid positions dropped, the model's r_m), and the model's diagnostics: EASE with
    UCMI "gate_<m>" (w * (1 - r_m)) and "uncertainty_<m>" (mean imputation variance); LNLN
    "completeness" (w). EASE without UCMI has no diagnostics."""
    masks = masks or MaskBank(split)
    fwd = Forward(run.model_cfg, split.n, batch_size=batch_size)
    out = fwd(params, split, masks.keep(condition), progress=progress,
              desc=f"predict {split.name}")
    cols: dict[str, np.ndarray] = {"id": np.asarray(split.ids), "label": split.labels,
                                   "prediction": out["pred"]}
    for i, m in enumerate(MODALITIES):
        cols[f"missing_{m}"] = out["missing_rate"][:, i]
    if has_ucmi(run.model_cfg):
        for i, m in enumerate(MODALITIES):
            cols[f"gate_{m}"] = out["gate"][i]
        for i, m in enumerate(MODALITIES):
            cols[f"uncertainty_{m}"] = out["uncertainty"][i]
    if run.model_cfg.model == "lnln":
        cols["completeness"] = out["completeness"]
    return cols


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------


def calibration_residuals(outputs: dict) -> dict[str, np.ndarray]:
    """Per modality the flattened standardized residuals (c - mu) / sqrt(var) of the UCMI
    Gaussian against the clean tokens (Fig. 4): {"text": [N K d], "audio": ..., "vision": ...}."""
    return {m: standardized_residuals(outputs["clean_tokens"][i], outputs["imp_mean"][i],
                                      outputs["imp_var"][i]).ravel()
            for i, m in enumerate(MODALITIES)}


def calibration_summary(residuals: np.ndarray) -> dict:
    r = np.asarray(residuals)
    return {"ks": ks_normal(r), "mean": float(r.mean()), "std": float(r.std()),
            "frac_abs_gt_3": float(np.mean(np.abs(r) > 3.0)), "n": int(r.size)}


def elastic_inputs(outputs: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per modality (pooled clean tokens z [N, d], pooled imputation z_hat [N, d], sample
    uncertainty u [N]); pooled = mean over the K tokens, the imputation the one the fusion used
    (the mean at deterministic evaluation)."""
    return {m: (outputs["clean_tokens"][i].mean(axis=1), outputs["imp_sample"][i].mean(axis=1),
                outputs["uncertainty"][i]) for i, m in enumerate(MODALITIES)}


def elastic_summary(pen: dict, uncertainty: np.ndarray, bins: int = ELASTIC_BINS) -> dict:
    """Ratio and means of an `elastic_penalty` result (of the sample uncertainties
    `uncertainty` [N]), plus the curves binned by percentile rank (mean rigid / elastic penalty
    per bin of `bins` equal rank intervals)."""
    rank = pen["rank"]
    edges = np.linspace(0.0, 100.0, bins + 1)
    which = np.clip(np.searchsorted(edges, rank, side="right") - 1, 0, bins - 1)
    rigid_b = [float(pen["rigid"][which == b].mean()) if np.any(which == b) else float("nan")
               for b in range(bins)]
    elastic_b = [float(pen["elastic"][which == b].mean()) if np.any(which == b)
                 else float("nan") for b in range(bins)]
    return {"ratio": elastic_ratio(pen), "mean_rigid": float(np.mean(pen["rigid"])),
            "mean_elastic": float(np.mean(pen["elastic"])), "mean_psi": float(np.mean(pen["psi"])),
            "mean_uncertainty": float(np.mean(uncertainty)),
            # Does the imputer know where it fails? (uncertainty vs difficulty, instance level)
            "pearson_difficulty_uncertainty": pearson(pen["difficulty"], uncertainty),
            "n": int(rank.size),
            "binned": {"rank_centre": list((edges[:-1] + edges[1:]) / 2.0), "rigid": rigid_b,
                       "elastic": elastic_b}}


def analyze_run(run: RunInfo, data, *, split: str = "test", condition=("rate", 0.5),
                alpha: float | None = None, batch_size: int = 256, progress: bool = False,
                log: Callable = print, seeds: Sequence[int] | None = None) -> dict:
    """The papers' analyses of `run` (every seed's honest checkpoint) on `data.<split>` under
    `condition` (docs/protocol.md section 11).

    * consistency (every model): predictions from the observed full input (every valid position
      kept) vs from the completed input under `condition`: `prediction_consistency`.
    * calibration (EASE with UCMI): standardized residuals of the UCMI Gaussian against the clean
      tokens per modality, KS statistic against N(0, 1) (`ks_normal`).
    * elastic (EASE with UCMI): `elastic_penalty` of the pooled clean tokens vs the pooled
      imputation with the imputation's uncertainty, alpha = the run's (Eq. 6), `elastic_ratio`.

    Each per seed and pooled over seeds (samples of all seeds together).

    Returns:
      {"summary": JSON-able numbers (per seed and pooled), "arrays": the pooled arrays for plots
      ({"residuals": {m: [n]}, "elastic": {m: penalty dict}, "full", "completed": [S N]})}.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    sp = data.split(split)
    alpha = run.alpha if alpha is None else float(alpha)
    ucmi = has_ucmi(run.model_cfg)
    masks = MaskBank(sp)
    keep, keep_full = masks.keep(condition), masks.keep(None)
    fwd = Forward(run.model_cfg, sp.n, batch_size=batch_size, clean=ucmi, full=True)
    seeds = list(run.seeds if seeds is None else seeds)
    per_seed: dict[str, dict] = {}
    pooled_res: dict[str, list] = {m: [] for m in MODALITIES}
    pooled_el: dict[str, list] = {m: [] for m in MODALITIES}
    fulls, completed = [], []
    for seed in tqdm(seeds, desc=f"analyze {run.model}", unit="seed", disable=not progress):
        params, record = restore_params(run, seed)
        out = fwd(params, sp, keep, keep_full, progress=progress, desc=f"seed {seed}")
        entry: dict = {"epoch": None if record.get("epoch") is None else int(record["epoch"]) + 1,
                       "consistency": prediction_consistency(out["pred_full"], out["pred"])}
        fulls.append(out["pred_full"])
        completed.append(out["pred"])
        if ucmi:
            res = calibration_residuals(out)
            entry["calibration"] = {m: calibration_summary(r) for m, r in res.items()}
            entry["elastic"] = {}
            for m, (z, z_hat, u) in elastic_inputs(out).items():
                entry["elastic"][m] = elastic_summary(elastic_penalty(z, z_hat, u, alpha=alpha), u)
                pooled_el[m].append((z, z_hat, u))
                pooled_res[m].append(res[m])
        per_seed[str(seed)] = entry
        log(f"{run.name} seed {seed}: consistency " + _fmt_cons(entry["consistency"])
            + ("; KS " + ", ".join(f"{m} {v['ks']:.4f}" for m, v in entry["calibration"].items())
               + "; elastic/rigid " + ", ".join(f"{m} {v['ratio']:.3f}"
                                                 for m, v in entry["elastic"].items())
               if ucmi else ""))
    full_all, comp_all = np.concatenate(fulls), np.concatenate(completed)
    summary: dict = {
        "run": str(run.path), "model": run.model, "variant": run.variant,
        "dataset": run.dataset, "split": split, "n_samples": sp.n,
        "condition": condition_json(condition), "seeds": seeds, "alpha": alpha,
        "use_ucmi": ucmi,
        "use_mipc": (run.model == "ease" and run.model_cfg.n_views > 0
                     and (run.loss.get("cons", 1.0), run.loss.get("asym", 1.0)) != (0.0, 0.0)),
        "analyses": ["calibration", "elastic", "consistency"] if ucmi else ["consistency"],
        "consistency": {"pooled": prediction_consistency(full_all, comp_all),
                        "per_seed": {s: e["consistency"] for s, e in per_seed.items()}},
        "epochs": {s: e["epoch"] for s, e in per_seed.items()},
    }
    arrays: dict = {"full": full_all, "completed": comp_all}
    if ucmi:
        arrays["residuals"] = {m: np.concatenate(pooled_res[m]) for m in MODALITIES}
        arrays["elastic"] = {}
        summary["calibration"] = {"pooled": {}, "per_seed": {}}
        summary["elastic"] = {"pooled": {}, "per_seed": {}}
        for m in MODALITIES:
            summary["calibration"]["pooled"][m] = calibration_summary(arrays["residuals"][m])
            z, z_hat, u = (np.concatenate([t[j] for t in pooled_el[m]]) for j in range(3))
            pen = elastic_penalty(z, z_hat, u, alpha=alpha)
            arrays["elastic"][m] = pen
            summary["elastic"]["pooled"][m] = elastic_summary(pen, u)
        for s, e in per_seed.items():
            summary["calibration"]["per_seed"][s] = e["calibration"]
            summary["elastic"]["per_seed"][s] = e["elastic"]
    else:
        what = "LNLN" if run.model == "lnln" else "EASE without UCMI"
        summary["note"] = (f"{what} has no UCMI imputer (no imputed Gaussian, no uncertainty): "
                           "calibration and elastic alignment do not apply; consistency only.")
    summary["seconds"] = time.perf_counter() - t0
    return {"summary": summary, "arrays": arrays}


def _fmt_cons(c: dict) -> str:
    return f"W {c['wasserstein']:.4f}, Pearson {c['pearson']:.4f}, MAE {c['mae']:.4f}"
