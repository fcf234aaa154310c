"""Tests of `ease_jax.fit`: the population fit loop's records, resume equality (bit for bit),
the non-finite guard, re-runs, a metric that is never finite, and the batched protocol against
the host batcher (`helpers.HostEvaluator`). Tiny EASE; the compiled programs are shared through `population.get_program`."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from ease_jax import checkpoint
from ease_jax import evaluate as E
from ease_jax import fit as F
from ease_jax import train as T
from ease_jax.config import LossConfig, RunConfig, TrainConfig
from ease_jax.evaluate import PAPER_SELECTION, RATES
from ease_jax.metrics import METRIC_KEYS
from ease_jax.objectives import EASE_TERMS
from ease_jax.population import Run

from helpers import HostEvaluator, tiny_data_and_model

RUNS = [Run(1111), Run(1112, loss=LossConfig(cons=0.5), lr=2e-3, name="variant")]


@pytest.fixture(scope="module")
def tiny():
    data, mcfg = tiny_data_and_model("ease")
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=0, seeds=(1111,))
    return SimpleNamespace(data=data, mcfg=mcfg, tcfg=tcfg,
                           run=RunConfig(dataset="mosi", model=mcfg, loss=LossConfig(), train=tcfg))


def fit(tiny, root, data=None, resume=False, runs=RUNS):
    lines = []
    recs = F.fit_population(tiny.run, data or tiny.data, runs, [root / r.label for r in runs],
                            root / "pop", resume=resume, log=lines.append, progress=False,
                            checkpoint_seconds=0.0)
    return recs, lines


def nan_equal(a, b):
    """Structural equality of JSON-like trees, NaN == NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(nan_equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def strip_seconds(history):
    return [{k: v for k, v in h.items() if not k.startswith("seconds")} for h in history]


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def resume_runs(tiny, tmp_path_factory):
    """Uninterrupted 3 epochs vs. interrupted right after the epoch-2 checkpoint + resume."""
    root = tmp_path_factory.mktemp("fit")
    full, full_log = fit(tiny, root / "full")
    save, saved = checkpoint.save, []

    def save_then_interrupt(directory, step, state, record=None):
        save(directory, step, state, record)
        if directory.name == "latest":
            saved.append(step)
            if len(saved) == 2:
                raise Interrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", save_then_interrupt)
        with pytest.raises(Interrupt):
            fit(tiny, root / "resumed")
    resumed, resumed_log = fit(tiny, root / "resumed", resume=True)
    return SimpleNamespace(root=root, full=full, full_log=full_log, resumed=resumed,
                           resumed_log=resumed_log, saved=saved)


def test_fit_population_records(tiny, resume_runs):
    criteria = {"honest"} | {f"paper:{c}" for c in PAPER_SELECTION["mosi"]}
    out = resume_runs.root / "full"
    for run, rec in zip(RUNS, resume_runs.full):
        assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
        assert rec["epoch"] == 2 and set(rec["selected"]) == criteria
        for res in rec["selected"].values():
            assert res["epoch"] in (0, 1, 2)
            assert list(res["per_rate"]) == [f"{r:.1f}" for r in RATES]
            assert set(res["inter_modal"]) == {"l", "a", "v", "la", "lv", "av"}
            for metrics in res["per_rate"].values():
                assert set(metrics) == set(METRIC_KEYS["mosi"])
        for h in rec["history"]:
            assert set(h["train"]) == set(EASE_TERMS) | {"total", "lr", "nonfinite"}
            assert set(h["valid"]) == set(METRIC_KEYS["mosi"]) == set(h["test"])
            assert h["train"]["nonfinite"] == 0.0
        first = rec["history"][0]  # epoch 0 improves every criterion with a finite value
        assert set(first["improved"]) == {
            c for c in criteria
            if np.isfinite((first["valid"] if c == "honest" else first["test"])[
                "MAE" if c == "honest" else c[6:]])}
        # One line per run and epoch; the honest choice under best/; selected/ pruned.
        lines = [l for l in resume_runs.full_log if l.startswith(f"{run.label} epoch ")]
        assert [l.split()[2] for l in lines] == ["1/3", "2/3", "3/3"]
        assert checkpoint.latest_step(out / run.label / "best") == rec["selected"]["honest"]["epoch"]
        kept = sorted(int(p.name.split("_")[1]) for p in (out / run.label / "selected").glob("epoch_*"))
        assert kept == sorted({r["epoch"] for r in rec["selected"].values()})
        # Every epoch's lr as scheduled for the run's own base lr (cosine over 3 epochs).
        base = run.lr or 1e-3
        np.testing.assert_allclose([h["train"]["lr"] for h in rec["history"]],
                                   [float(T.epoch_lr(e, base, 0, 3)) for e in range(3)], rtol=1e-6)
        assert set(rec["seconds"]) == {"train", "eval", "host", "protocol"}
    assert checkpoint.latest_step(out / "pop" / "latest") == 2
    # The two runs differ (seed, weights and lr), so their histories do.
    a, b = (rec["history"][-1]["train"]["total"] for rec in resume_runs.full)
    assert a != b


def test_fit_population_resume_equals_uninterrupted(tiny, resume_runs):
    assert resume_runs.saved == [0, 1]
    assert any("resumed after epoch 2" in l for l in resume_runs.resumed_log)
    retrained = [l.split()[2] for l in resume_runs.resumed_log if " epoch " in l
                 and "resumed" not in l]
    assert retrained == ["3/3", "3/3"]  # only epoch 3 was trained again, for both runs
    for full, resumed in zip(resume_runs.full, resume_runs.resumed):
        assert_trees_equal(resumed["final_state"], full["final_state"])  # bit for bit
        assert int(full["final_state"].step) == 3 * 3
        assert nan_equal(strip_seconds(resumed["history"]), strip_seconds(full["history"]))
        assert nan_equal(resumed["selection"], full["selection"])
        assert nan_equal(resumed["selected"], full["selected"])


def test_resume_with_other_runs_is_refused(tiny, resume_runs, tmp_path):
    import shutil

    shutil.copytree(resume_runs.root / "full", tmp_path / "run")
    with pytest.raises(ValueError, match="same runs"):
        fit(tiny, tmp_path / "run", resume=True, runs=RUNS[:1])


def test_protocol_results_match_the_evaluator(tiny, resume_runs):
    """The batched protocol (every (run, epoch) in one call per condition) against the host batcher,
    one checkpoint at a time, batch 256."""
    out = resume_runs.root / "full"
    for run, rec in zip(RUNS, resume_runs.full):
        epoch = rec["selected"]["honest"]["epoch"]
        params, _ = checkpoint.restore(out / run.label / "best", rec["final_state"].params)
        ref = HostEvaluator(tiny.mcfg, tiny.data.test, "mosi").protocol(params)
        mine = rec["selected"]["honest"]
        assert mine["epoch"] == epoch
        for section in ("per_rate", "inter_modal"):
            assert mine[section].keys() == ref[section].keys()
            for cond in ref[section]:
                for m, v in ref[section][cond].items():
                    assert mine[section][cond][m] == pytest.approx(v, abs=1e-4), (section, cond, m)


def test_fit_raises_on_nonfinite_loss_naming_the_run_and_step(tiny, tmp_path):
    nan_row = 13
    labels = tiny.data.train.labels.copy()
    labels[nan_row] = np.nan
    data = dataclasses.replace(tiny.data, train=dataclasses.replace(tiny.data.train, labels=labels))
    state = T.create_state(tiny.mcfg, tiny.tcfg, 1111, 3)
    rows = np.asarray(T.epoch_rows(state.order_rng, 0, tiny.data.train.n, 8))
    first_bad = next(i for i, r in enumerate(rows) if nan_row in r)
    with pytest.raises(F.NonFiniteLossError,
                       match=rf"run seed_1111: non-finite loss at step {first_bad}\b"):
        F.fit_seed(tiny.run, data, 1111, tmp_path / "nan", log=lambda _: None, progress=False)


def test_fit_seed_resume_after_interrupt_before_latest_save(tiny, tmp_path, monkeypatch):
    """Interrupted after epoch 0's selected parameters were written but before latest/: the
    resume starts afresh from epoch 0 and ends as an uninterrupted run."""
    save = checkpoint.save

    def interrupt_before_latest(directory, step, state, record=None):
        if directory.name == "latest":
            raise Interrupt
        save(directory, step, state, record)

    kw = dict(log=lambda _: None, progress=False, checkpoint_seconds=0.0)
    full = F.fit_seed(tiny.run, tiny.data, 1111, tmp_path / "full", **kw)
    monkeypatch.setattr(checkpoint, "save", interrupt_before_latest)
    with pytest.raises(Interrupt):
        F.fit_seed(tiny.run, tiny.data, 1111, tmp_path / "run", **kw)
    assert (tmp_path / "run" / "selected" / "epoch_0").is_dir()
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = F.fit_seed(tiny.run, tiny.data, 1111, tmp_path / "run", resume=True, **kw)
    assert_trees_equal(resumed["final_state"].params, full["final_state"].params)
    assert nan_equal(resumed["selected"], full["selected"])
    # A re-run into the same directory (no --resume) starts afresh and ends the same.
    again = F.fit_seed(tiny.run, tiny.data, 1111, tmp_path / "run", **kw)
    assert nan_equal(again["selected"], full["selected"])


def test_fit_survives_a_metric_that_is_always_nan(tiny, tmp_path, monkeypatch):
    metrics = F.regression_metrics

    def corr_nan(preds, labels, dataset):
        return dict(metrics(preds, labels, dataset), Corr=float("nan"))

    monkeypatch.setattr(F, "regression_metrics", corr_nan)
    rec = F.fit_seed(tiny.run, tiny.data, 1111, tmp_path / "run", log=lambda _: None,
                     progress=False)
    assert "paper:MAE" in rec["selected"] and "paper:Corr" not in rec["selected"]
    # The paper table still has every metric; the one never selected on is NaN.
    table = E.protocol_table("mosi", rec["selected"], "paper")
    assert all(math.isnan(row["Corr"]) for row in table["per_rate"].values())
    assert all(np.isfinite(row["MAE"]) for row in table["per_rate"].values())
