"""The fit loop: a population of runs trained epoch by epoch with checkpoint selection, resume and
the full robustness protocol at the end (PROTOCOL.md sections 4 and 9).

Per epoch the host makes two device calls (`PopulationProgram.train_epoch` for every run, then
`predict` of every run on valid + test at r = `eval_rate`), fetches their results, and does the
bookkeeping: the non-finite guard, both selection protocols per run, a log line per run, and, at
most every `checkpoint_seconds` and after the last epoch, the population's Orbax checkpoint
(`<state_dir>/latest`) and the parameters of newly selected epochs (`<run dir>/selected`). At the
end every run's selected epochs run the full protocol on test, batched over (run, epoch), and each
run's honest choice is saved to `<run dir>/best`.

An interrupted population resumes from its last checkpoint and ends in the identical state: the
data order, masks and noise of every step come from the runs' keys and the step count.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ease_jax import checkpoint
from ease_jax.config import RunConfig
from ease_jax.data.missing import INTER_MODAL_SUBSETS
from ease_jax.evaluate import RATES, MaskBank, Selector, condition_name
from ease_jax.metrics import regression_metrics
from ease_jax.population import (
    PopulationProgram,
    Run,
    get_program,
    init_population,
    program_key,
    unstack,
)
from ease_jax.train import eval_arrays, model_arrays


class NonFiniteLossError(FloatingPointError):
    """Raised when a training step produced a non-finite objective."""


def _check_finite(metrics: dict, runs: Sequence[Run], first_step: int) -> None:
    """`metrics`: host arrays [P, steps]; raise naming the first run and step that went bad."""
    bad_runs, bad_steps = np.nonzero(metrics["nonfinite"] > 0)
    if bad_runs.size:
        i, j = int(bad_runs[0]), int(bad_steps[0])
        terms = {k: float(v[i, j]) for k, v in metrics.items()
                 if k != "lr" and not np.isfinite(v[i, j])}
        raise NonFiniteLossError(
            f"run {runs[i].label}: non-finite loss at step {first_step + j}: terms {terms} "
            "(lower the learning rate or check the data for extreme values)")


def _concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def protocol_results(prog: PopulationProgram, split, dataset: str, params_list: list,
                     masks: MaskBank, *, rates=RATES, subsets=INTER_MODAL_SUBSETS,
                     burst_rates=()) -> list[dict]:
    """The full robustness protocol (`Evaluator.protocol`'s layout) of each parameter set in
    `params_list` on `split`: every condition is one `predict` call over a group of up to
    `prog.n_runs` parameter sets (the last group padded, so every group shares one program)."""
    conditions = ([("per_rate", "rate", r) for r in rates]
                  + [("inter_modal", "subset", s) for s in subsets]
                  + [("burst", "burst", r) for r in burst_rates])
    group = max(prog.n_runs, 1)
    rows = prog.put_rows(eval_arrays(split, prog.model_cfg), group)
    out = [{"per_rate": {}, "inter_modal": {}, "burst": {}} for _ in params_list]
    for start in range(0, len(params_list), group):
        members = params_list[start : start + group]
        dev_params = prog.put_params(members + [members[-1]] * (group - len(members)))
        for section, kind, value in conditions:
            keep = prog.put_rows(masks.get(kind, value), group)
            preds = np.asarray(jax.device_get(prog.predict(dev_params, rows, keep, split.n)))
            name = value if kind == "subset" else condition_name("rate", value)
            for j in range(len(members)):
                out[start + j][section][name] = regression_metrics(preds[j], split.labels, dataset)
    return out


def fit_population(run_cfg: RunConfig, data, runs: Sequence[Run], run_dirs: Sequence,
                   state_dir, *, parallel: str = "pmap", devices=None,
                   run_devices: int | None = None, resume: bool = False,
                   params: Sequence[Any] | None = None, burst_rates=(), log=print,
                   progress: bool = True, checkpoint_seconds: float = 30.0,
                   protocol: bool = True, run_batch: int | None = None) -> list[dict]:
    """Train `runs` (one population: one program) of `run_cfg.model` on `data.train` for
    `run_cfg.train.epochs` epochs. Run i writes its selected epochs and honest choice under
    `run_dirs[i]`; the population's checkpoint is `state_dir/latest`. `params[i]` (optional) is run
    i's initial parameters (e.g. with pretrained BERT inserted). With `resume`, continues from
    `state_dir/latest` when it exists. `protocol=False` skips the full protocol at the end (the
    benchmark's timing runs): `selected` then holds only each criterion's epoch. `run_batch`: runs
    vmapped together per device (default: all on an accelerator, one at a time on a CPU;
    `population.default_run_batch`).

    Returns one record per run: {"epoch", "selected": {criterion: protocol results + epoch},
    "selection", "history": [one summary per epoch], "seconds": {"train", "eval", "host",
    "protocol"} (the run's share: the population's seconds / P), "population": the labels of the
    runs trained together, "final_state"}.
    """
    from tqdm.auto import tqdm

    mcfg, tcfg = run_cfg.model, run_cfg.train
    runs, run_dirs = list(runs), [Path(d) for d in run_dirs]
    if len(run_dirs) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(run_dirs)} run directories")
    labels = [r.label for r in runs]
    n_runs = len(runs)
    prog = get_program(mcfg, run_cfg.loss, tcfg, data.train.n, n_runs, parallel=parallel,
                       devices=devices, run_devices=run_devices, run_batch=run_batch)
    host_state = init_population(mcfg, tcfg, run_cfg.loss, runs, prog.steps, params)
    selectors = [Selector(run_cfg.dataset) for _ in runs]
    records = [{"epoch": -1, "history": [],
                "seconds": {"train": 0.0, "eval": 0.0, "host": 0.0}} for _ in runs]
    latest = Path(state_dir) / "latest"
    if resume and checkpoint.latest_step(latest) is not None:
        host_state, saved = checkpoint.restore(latest, host_state)
        if saved.get("runs") != labels:
            raise ValueError(f"{latest} holds the runs {saved.get('runs')}, not {labels}: resume "
                             "with the same runs (and --population) as the interrupted job")
        records = saved["records"]
        for sel, rec, d in zip(selectors, records, run_dirs):
            sel.load_state_dict(rec["selection"])
            _prune_selected(d / "selected", _kept(sel))  # epochs past the checkpoint go
        log(f"{', '.join(labels)}: resumed after epoch {records[0]['epoch'] + 1} from {latest}")
    else:
        stale = [p for d in run_dirs for p in (d / "selected", d / "best") if p.exists()]
        stale += [latest] if latest.exists() else []
        if stale:  # a fresh run must not pick up an older run's epochs
            log(f"{', '.join(labels)}: starting afresh; removing {', '.join(map(str, stale))}")
            for p in stale:
                shutil.rmtree(p, ignore_errors=True)

    first = records[0]["epoch"] + 1
    dev_state = prog.put_state(host_state)
    dev_train = prog.put_train(model_arrays(data.train, mcfg))
    masks = {s: MaskBank(getattr(data, s)) for s in ("valid", "test")}
    n_valid, n_sel = data.valid.n, data.valid.n + data.test.n
    sel_rows = prog.put_rows(_concat(eval_arrays(data.valid, mcfg),
                                     eval_arrays(data.test, mcfg)), n_runs)
    sel_keep = prog.put_rows(_concat(masks["valid"].get("rate", tcfg.eval_rate),
                                     masks["test"].get("rate", tcfg.eval_rate)), n_runs)
    pending: list[dict] = [{} for _ in runs]  # selected parameters not yet on disk
    last_save = time.perf_counter()
    desc = f"{mcfg.model} {labels[0]}" + (f" +{n_runs - 1} runs" if n_runs > 1 else "")
    bar = tqdm(range(first, tcfg.epochs), desc=desc, unit="epoch", disable=not progress,
               initial=first, total=tcfg.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        dev_state, metrics = prog.train_epoch(dev_state, dev_train)
        preds = prog.predict(dev_state.params, sel_rows, sel_keep, n_sel)
        metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}  # [P, steps]
        t1 = time.perf_counter()
        preds = np.asarray(jax.device_get(preds))
        t2 = time.perf_counter()
        _check_finite(metrics, runs, epoch * prog.steps)
        improved_any = []
        for i, (run, sel, rec) in enumerate(zip(runs, selectors, records)):
            valid = regression_metrics(preds[i, :n_valid], data.valid.labels, run_cfg.dataset)
            test = regression_metrics(preds[i, n_valid:], data.test.labels, run_cfg.dataset)
            improved = sel.update(epoch, valid, test)
            if improved:
                improved_any.append(i)
            train_loss = {k: float(v[i].mean()) for k, v in metrics.items()}
            rec["history"].append({"epoch": epoch + 1, "train": train_loss, "valid": valid,
                                   "test": test, "improved": improved,
                                   "seconds_train": (t1 - t0) / n_runs,
                                   "seconds_eval": (t2 - t1) / n_runs})
            rec["epoch"], rec["selection"] = epoch, sel.state_dict()
            log(f"{run.label} epoch {epoch + 1}/{tcfg.epochs} loss {train_loss['total']:.4f} "
                f"lr {train_loss['lr']:.2e} valid MAE {valid['MAE']:.4f} "
                f"test@{tcfg.eval_rate} MAE {test['MAE']:.4f} improved "
                f"{','.join(improved) or '-'} ({t1 - t0:.1f}s train, {t2 - t1:.1f}s eval for "
                f"{n_runs} run{'s' * (n_runs > 1)})")
        if improved_any:  # keep these epochs' parameters until no criterion selects them
            all_params = prog.get_state(dev_state.params)
            for i in improved_any:
                pending[i][epoch] = jax.tree_util.tree_map(np.array, unstack(all_params, i))
                pending[i] = {e: p for e, p in pending[i].items() if e in _kept(selectors[i])}
        if epoch == tcfg.epochs - 1 or time.perf_counter() - last_save >= checkpoint_seconds:
            _save(prog, dev_state, latest, epoch, labels, records, selectors, run_dirs, pending)
            last_save = time.perf_counter()
        t3 = time.perf_counter()
        for rec in records:
            rec["seconds"]["train"] += (t1 - t0) / n_runs
            rec["seconds"]["eval"] += (t2 - t1) / n_runs
            rec["seconds"]["host"] += (t3 - t2) / n_runs
            rec["history"][-1]["seconds_host"] = (t3 - t2) / n_runs
        bar.set_postfix(loss=f"{np.mean(metrics['total']):.3f}",
                        val_mae=f"{records[0]['history'][-1]['valid']['MAE']:.3f}")

    # Full robustness protocol, once per distinct (run, selected epoch) (section 4). A criterion
    # whose metric was never finite selected no epoch; it reads NaN in the paper table.
    t0 = time.perf_counter()
    final = prog.get_state(dev_state)
    pairs = sorted({(i, e) for i, sel in enumerate(selectors) for e in _kept(sel)})
    pairs = pairs if protocol else []
    params_list = [checkpoint.restore(run_dirs[i] / "selected" / f"epoch_{e}",
                                      unstack(final.params, i))[0] for i, e in pairs]
    results = protocol_results(prog, data.test, run_cfg.dataset, params_list, masks["test"],
                               burst_rates=burst_rates) if pairs else []
    for rec, sel in zip(records, selectors):
        rec["selected"] = {} if protocol else {c: {"epoch": e} for c, e in sel.epoch.items()
                                               if e is not None}
    for (i, e), full, p in zip(pairs, results, params_list):
        for c, ce in selectors[i].epoch.items():
            if ce == e:
                records[i]["selected"][c] = dict(full, epoch=e)
        if selectors[i].epoch["honest"] == e:
            checkpoint.save(run_dirs[i] / "best", e, p, {"epoch": e, "seed": runs[i].seed,
                                                          "run": runs[i].label})
    seconds = (time.perf_counter() - t0) / n_runs
    for i, rec in enumerate(records):
        rec["seconds"]["protocol"] = seconds
        rec["population"] = labels
        rec["final_state"] = unstack(final, i)
    return records


def state_dir_name(runs: Sequence[Run]) -> str:
    """The directory of a population's resumable state under the output directory: the run's own
    directory for one run, else `population-<run>+<run>...`, or, when that is long,
    `population-<first run>+<n>more-<hash of all labels>` (a resume must group the runs the same
    way; the checkpoint records its runs and a resume checks them)."""
    import hashlib

    if len(runs) == 1:
        return runs[0].label
    joined = "+".join(r.label for r in runs)
    if len(joined) <= 100:
        return "population-" + joined
    digest = hashlib.sha1(joined.encode()).hexdigest()[:10]
    return f"population-{runs[0].label}+{len(runs) - 1}more-{digest}"


def group_runs(run_cfg: RunConfig, runs: Sequence[Run], population: int | None = None):
    """The runs split into populations: runs of the same model and program-shaping loss fields
    (`population.program_key`) train together, in order of first appearance, at most
    `population` per program (None = no cap). Yields (RunConfig of the group, [Run])."""
    groups: dict = {}
    for r in runs:
        model = r.model or run_cfg.model
        key = (model, program_key(r.loss or run_cfg.loss))
        groups.setdefault(key, []).append(r)
    for (model, _), members in groups.items():
        base = dataclasses.replace(run_cfg, model=model, loss=members[0].loss or run_cfg.loss)
        cap = population or len(members)
        for start in range(0, len(members), cap):
            yield base, members[start : start + cap]


def fit_runs(run_cfg: RunConfig, data, runs: Sequence[Run], out_dir, *,
             population: int | None = None, params=None, log=print, **kwargs) -> dict:
    """Train and evaluate any set of runs: grouped into as few programs as possible
    (`group_runs`), each group one `fit_population` call writing run `r` under `out_dir/r.label`
    and the group's resumable state under `out_dir/state_dir_name(group)`. `params` (optional):
    a function `Run -> initial parameters or None`. Returns {run label: record}."""
    out_dir = Path(out_dir)
    records = {}
    for base, group in group_runs(run_cfg, runs, population):
        if len(group) > 1:
            log(f"{base.model.model}: {', '.join(r.label for r in group)} train as one "
                "population")
        recs = fit_population(base, data, group, [out_dir / r.label for r in group],
                              out_dir / state_dir_name(group), log=log,
                              params=None if params is None else [params(r) for r in group],
                              **kwargs)
        records.update({r.label: rec for r, rec in zip(group, recs)})
    return records


def fit_seed(run_cfg: RunConfig, data, seed: int, out_dir, *, params=None, **kwargs) -> dict:
    """One run alone (a population of one): `fit_population` with its checkpoint, selected epochs
    and honest choice all under `out_dir`. Returns its record."""
    return fit_population(run_cfg, data, [Run(seed)], [out_dir], out_dir,
                          params=None if params is None else [params], **kwargs)[0]


def _kept(selector: Selector) -> set:
    return {e for e in selector.epoch.values() if e is not None}


def _save(prog, dev_state, latest: Path, epoch: int, labels, records, selectors, run_dirs,
          pending) -> None:
    """Newly selected parameters first, then the population state, then drop what no criterion
    selects any more: a crash in between leaves extra epochs, which a resume prunes."""
    for i, d in enumerate(run_dirs):
        for e, p in sorted(pending[i].items()):
            checkpoint.save(d / "selected" / f"epoch_{e}", e, p, {"epoch": e})
        pending[i].clear()
    checkpoint.save(latest, epoch, prog.get_state(dev_state),
                    {"epoch": epoch, "runs": labels, "records": records})
    for sel, d in zip(selectors, run_dirs):
        _prune_selected(d / "selected", _kept(sel))


def _prune_selected(selected_dir: Path, keep_epochs: set) -> None:
    """Delete saved parameters of epochs that no selection criterion points at any more."""
    for d in selected_dir.glob("epoch_*"):
        if int(d.name.split("_")[1]) not in keep_epochs:
            shutil.rmtree(d, ignore_errors=True)
