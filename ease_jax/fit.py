"""The fit loop: a population of runs trained epoch by epoch with checkpoint selection, resume and
the full robustness protocol at the end (docs/protocol.md sections 4 and 9).

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

from ease_jax import checkpoint, distributed
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
    """The full robustness protocol ({"per_rate": {"0.0": metrics, ...}, "inter_modal": {"l":
    metrics, ...}, "burst": {...}}) of each parameter set in
    `params_list` on `split`: every condition is one `predict` call over a group of up to
    `prog.n_runs` parameter sets (the last group padded, so every group shares one program)."""
    conditions = ([("per_rate", "rate", r) for r in rates]
                  + [("inter_modal", "subset", s) for s in subsets]
                  + [("burst", "burst", r) for r in burst_rates])
    group = max(prog.n_runs, 1)
    rows = prog.put_rows(split.model_arrays(prog.model_cfg.text_encoder, labels=False), group)
    out = [{"per_rate": {}, "inter_modal": {}, "burst": {}} for _ in params_list]
    for start in range(0, len(params_list), group):
        members = params_list[start : start + group]
        dev_params = prog.put_params(members + [members[-1]] * (group - len(members)))
        for section, kind, value in conditions:
            keep = prog.put_rows(masks.get(kind, value), group)
            preds = distributed.fetch(prog.predict(dev_params, rows, keep, split.n))
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

    The loop's steps (`_PopulationFit`): `start` (program, state, or the resumed checkpoint), per
    epoch `train` (one device call for every run), `select` (valid + test at r = eval_rate, both
    protocols, the log line), `keep_selected` (newly selected parameters to host memory) and
    `save` (at most every `checkpoint_seconds` and after the last epoch), then `final_protocol`.

    Returns one record per run: {"epoch", "selected": {criterion: protocol results + epoch},
    "selection", "history": [one summary per epoch], "seconds": {"train", "eval", "host",
    "protocol"} (the run's share: the population's seconds / P), "population": the labels of the
    runs trained together, "final_state"}.
    """
    from tqdm.auto import tqdm

    fit = _PopulationFit(run_cfg, data, runs, run_dirs, state_dir, log=log,
                         checkpoint_seconds=checkpoint_seconds)
    first = fit.start(params, resume, parallel=parallel, devices=devices,
                      run_devices=run_devices, run_batch=run_batch)
    epochs = run_cfg.train.epochs
    desc = f"{run_cfg.model.model} {fit.labels[0]}" + (
        f" +{len(fit.runs) - 1} runs" if len(fit.runs) > 1 else "")
    bar = tqdm(range(first, epochs), desc=desc, unit="epoch",
               disable=not (progress and distributed.is_primary()), initial=first, total=epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        metrics, preds, t1 = fit.train(epoch)
        t2 = time.perf_counter()
        improved = fit.select(epoch, metrics, preds, train_s=t1 - t0, eval_s=t2 - t1)
        fit.keep_selected(epoch, improved)
        due = epoch == epochs - 1 or time.perf_counter() - fit.last_save >= checkpoint_seconds
        if distributed.agree(due):  # process 0's clock decides for every process
            fit.save(epoch)
        fit.add_seconds(train_s=t1 - t0, eval_s=t2 - t1, host_s=time.perf_counter() - t2)
        bar.set_postfix(loss=f"{np.mean(metrics['total']):.3f}",
                        val_mae=f"{fit.records[0]['history'][-1]['valid']['MAE']:.3f}")
    return fit.final_protocol(protocol, burst_rates)


class _PopulationFit:
    """The state of one `fit_population` call and its named steps (see there)."""

    def __init__(self, run_cfg: RunConfig, data, runs: Sequence[Run], run_dirs: Sequence,
                 state_dir, *, log, checkpoint_seconds: float):
        self.run_cfg, self.data, self.log = run_cfg, data, log
        self.runs, self.run_dirs = list(runs), [Path(d) for d in run_dirs]
        if len(self.run_dirs) != len(self.runs):
            raise ValueError(f"{len(self.runs)} runs but {len(self.run_dirs)} run directories")
        self.labels = [r.label for r in self.runs]
        self.latest = Path(state_dir) / "latest"
        self.selectors = [Selector(run_cfg.dataset) for _ in self.runs]
        self.records = [{"epoch": -1, "history": [],
                         "seconds": {"train": 0.0, "eval": 0.0, "host": 0.0}} for _ in self.runs]
        self.pending: list[dict] = [{} for _ in self.runs]  # selected parameters not yet on disk
        self.last_save = time.perf_counter()

    def start(self, params, resume: bool, **program) -> int:
        """Compile (or reuse) the program, build or restore the state, place everything on the
        devices; returns the first epoch to train."""
        mcfg, tcfg, data = self.run_cfg.model, self.run_cfg.train, self.data
        n_runs = len(self.runs)
        self.prog = get_program(mcfg, self.run_cfg.loss, tcfg, data.train.n, n_runs, **program)
        host_state = init_population(mcfg, tcfg, self.run_cfg.loss, self.runs, self.prog.steps,
                                     params, train_split=data.train)
        if resume and checkpoint.latest_step(self.latest) is not None:
            host_state = self._restore(host_state)
        else:
            self._clear_stale()
        self.dev_state = self.prog.put_state(host_state)
        self.dev_train = self.prog.put_train(data.train.model_arrays(mcfg.text_encoder))
        self.masks = {s: MaskBank(getattr(data, s)) for s in ("valid", "test")}
        mode = mcfg.text_encoder
        self.sel_rows = self.prog.put_rows(_concat(
            data.valid.model_arrays(mode, labels=False),
            data.test.model_arrays(mode, labels=False)), n_runs)
        self.sel_keep = self.prog.put_rows(_concat(
            self.masks["valid"].get("rate", tcfg.eval_rate),
            self.masks["test"].get("rate", tcfg.eval_rate)), n_runs)
        self.last_save = time.perf_counter()
        return self.records[0]["epoch"] + 1

    def _restore(self, host_state):
        host_state, saved = checkpoint.restore(self.latest, host_state)
        if saved.get("runs") != self.labels:
            raise ValueError(f"{self.latest} holds the runs {saved.get('runs')}, not "
                             f"{self.labels}: resume with the same runs (and --population) as "
                             "the interrupted job")
        self.records = saved["records"]
        for sel, rec in zip(self.selectors, self.records):
            sel.load_state_dict(rec["selection"])
        self._prune()  # epochs past the checkpoint go
        self.log(f"{', '.join(self.labels)}: resumed after epoch {self.records[0]['epoch'] + 1} "
                 f"from {self.latest}")
        return host_state

    def _clear_stale(self) -> None:
        """A fresh run must not pick up an older run's epochs."""
        stale = [p for d in self.run_dirs for p in (d / "selected", d / "best") if p.exists()]
        stale += [self.latest] if self.latest.exists() else []
        if stale:
            self.log(f"{', '.join(self.labels)}: starting afresh; removing "
                     f"{', '.join(map(str, stale))}")
            if distributed.is_primary():  # one shared directory: one process deletes
                for p in stale:
                    shutil.rmtree(p, ignore_errors=True)
        distributed.barrier("fit: stale files removed")

    def train(self, epoch: int):
        """One epoch of every run and the selection predictions: (metrics {name: [P, steps]},
        predictions [P, n_valid + n_test], the time the metrics arrived)."""
        n_sel = self.data.valid.n + self.data.test.n
        self.dev_state, metrics = self.prog.train_epoch(self.dev_state, self.dev_train)
        preds = self.prog.predict(self.dev_state.params, self.sel_rows, self.sel_keep, n_sel)
        metrics = distributed.fetch(metrics)  # {name: [P, steps]}, on every process
        t_metrics = time.perf_counter()
        preds = distributed.fetch(preds)
        _check_finite(metrics, self.runs, epoch * self.prog.steps)
        return metrics, preds, t_metrics

    def select(self, epoch: int, metrics: dict, preds: np.ndarray, *, train_s: float,
               eval_s: float) -> list[int]:
        """Both selection protocols of every run on this epoch's predictions, its history entry
        and log line; returns the runs some criterion newly selected this epoch."""
        tcfg, dataset, data = self.run_cfg.train, self.run_cfg.dataset, self.data
        n_runs, n_valid = len(self.runs), data.valid.n
        improved_any = []
        for i, (run, sel, rec) in enumerate(zip(self.runs, self.selectors, self.records)):
            valid = regression_metrics(preds[i, :n_valid], data.valid.labels, dataset)
            test = regression_metrics(preds[i, n_valid:], data.test.labels, dataset)
            improved = sel.update(epoch, valid, test)
            if improved:
                improved_any.append(i)
            train_loss = {k: float(v[i].mean()) for k, v in metrics.items()}
            rec["history"].append({"epoch": epoch + 1, "train": train_loss, "valid": valid,
                                   "test": test, "improved": improved,
                                   "seconds_train": train_s / n_runs,
                                   "seconds_eval": eval_s / n_runs})
            rec["epoch"], rec["selection"] = epoch, sel.state_dict()
            self.log(f"{run.label} epoch {epoch + 1}/{tcfg.epochs} loss "
                     f"{train_loss['total']:.4f} lr {train_loss['lr']:.2e} valid MAE "
                     f"{valid['MAE']:.4f} test@{tcfg.eval_rate} MAE {test['MAE']:.4f} improved "
                     f"{','.join(improved) or '-'} ({train_s:.1f}s train, {eval_s:.1f}s eval "
                     f"for {n_runs} run{'s' * (n_runs > 1)})")
        return improved_any

    def keep_selected(self, epoch: int, improved: list[int]) -> None:
        """Keep the newly selected epochs' parameters in host memory until they are saved (and
        drop those no criterion selects any more)."""
        if not improved:
            return
        all_params = self.prog.get_state(self.dev_state.params)
        for i in improved:
            self.pending[i][epoch] = jax.tree_util.tree_map(np.array, unstack(all_params, i))
            self.pending[i] = {e: p for e, p in self.pending[i].items()
                               if e in _kept(self.selectors[i])}

    def save(self, epoch: int) -> None:
        """Newly selected parameters first, then the population state, then drop what no
        criterion selects any more: a crash in between leaves extra epochs, which a resume
        prunes."""
        for i, d in enumerate(self.run_dirs):
            for e, p in sorted(self.pending[i].items()):
                checkpoint.save(d / "selected" / f"epoch_{e}", e, p, {"epoch": e})
            self.pending[i].clear()
        checkpoint.save(self.latest, epoch, self.prog.get_state(self.dev_state),
                        {"epoch": epoch, "runs": self.labels, "records": self.records})
        self._prune()
        self.last_save = time.perf_counter()

    def _prune(self) -> None:
        """Drop the saved epochs no criterion selects any more (one process deletes)."""
        if distributed.is_primary():
            for sel, d in zip(self.selectors, self.run_dirs):
                _prune_selected(d / "selected", _kept(sel))
        distributed.barrier("fit: selected epochs pruned")

    def add_seconds(self, *, train_s: float, eval_s: float, host_s: float) -> None:
        n_runs = len(self.runs)
        for rec in self.records:
            rec["seconds"]["train"] += train_s / n_runs
            rec["seconds"]["eval"] += eval_s / n_runs
            rec["seconds"]["host"] += host_s / n_runs
            rec["history"][-1]["seconds_host"] = host_s / n_runs

    def final_protocol(self, protocol: bool, burst_rates) -> list[dict]:
        """The full robustness protocol, once per distinct (run, selected epoch) (section 4); each
        run's honest choice saved to `<run dir>/best`. A criterion whose metric was never finite
        selected no epoch; it reads NaN in the paper table."""
        t0 = time.perf_counter()
        runs, records, selectors = self.runs, self.records, self.selectors
        final = self.prog.get_state(self.dev_state)
        pairs = sorted({(i, e) for i, sel in enumerate(selectors) for e in _kept(sel)})
        pairs = pairs if protocol else []
        params_list = [checkpoint.restore(self.run_dirs[i] / "selected" / f"epoch_{e}",
                                          unstack(final.params, i))[0] for i, e in pairs]
        results = protocol_results(self.prog, self.data.test, self.run_cfg.dataset, params_list,
                                   self.masks["test"], burst_rates=burst_rates) if pairs else []
        for rec, sel in zip(records, selectors):
            rec["selected"] = {} if protocol else {c: {"epoch": e} for c, e in sel.epoch.items()
                                                   if e is not None}
        for (i, e), full, p in zip(pairs, results, params_list):
            for c, ce in selectors[i].epoch.items():
                if ce == e:
                    records[i]["selected"][c] = dict(full, epoch=e)
            if selectors[i].epoch["honest"] == e:
                checkpoint.save(self.run_dirs[i] / "best", e, p,
                                {"epoch": e, "seed": runs[i].seed, "run": runs[i].label})
        seconds = (time.perf_counter() - t0) / len(runs)
        for i, rec in enumerate(records):
            rec["seconds"]["protocol"] = seconds
            rec["population"] = self.labels
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


def _prune_selected(selected_dir: Path, keep_epochs: set) -> None:
    """Delete saved parameters of epochs that no selection criterion points at any more."""
    for d in selected_dir.glob("epoch_*"):
        if int(d.name.split("_")[1]) not in keep_epochs:
            shutil.rmtree(d, ignore_errors=True)
