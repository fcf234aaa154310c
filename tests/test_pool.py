"""`experiments.pool`: the seeds of several finished runs as one run (the end-to-end check that a
pooled run equals the run of all its seeds is in tests/test_sweep.py)."""

import json

import numpy as np
import pytest
from scipy import stats

from experiments import pool

from helpers import fake_sweep_results

CONFIG = {"dataset": "mosi", "model": {"model": "ease", "dim": 128},
          "train": {"epochs": 50, "batch_size": 64, "seeds": []}}


def fake_run(tmp_path, name, model, seeds, seed, **changes):
    """A one-model run directory holding a fake results.json of `seeds`."""
    res = fake_sweep_results("mosi", model, seeds, seed=seed)
    res["data"]["sha256"] = "abc"
    res["config"] = json.loads(json.dumps(CONFIG))
    res["config"]["model"]["model"] = model
    res["config"]["train"]["seeds"] = list(seeds)
    res["behaviour"] = {"train_masks": "redrawn", "rate_input": "observed", "eval_z": "mean",
                        "name": "default"}
    res["timings"] = {"total_seconds": 10.0 * len(seeds)}
    for key, value in changes.items():
        res[key] = value
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))
    return d, res


def t_interval(x):
    x = np.asarray(x, float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean(), x.mean() - half, x.mean() + half


def test_pooled_summary_equals_a_recomputation_from_the_per_seed_numbers(tmp_path):
    a, ra = fake_run(tmp_path, "a", "ease", (1111, 1112, 1113), seed=1)
    b, rb = fake_run(tmp_path, "b", "ease", (1115, 1114), seed=2)
    res = pool.main([str(a), str(b), "--out", str(tmp_path / "p")])["ease"]
    seeds = ["1111", "1112", "1113", "1114", "1115"]
    assert list(res["seeds"]) == seeds and res["config"]["train"]["seeds"] == list(map(int, seeds))
    per_seed = ra["seeds"] | rb["seeds"]
    for proto in ("honest", "paper"):
        for r in ("0.0", "0.7"):
            values = [per_seed[s][proto]["per_rate"][r]["MAE"] for s in seeds]
            got = res["protocols"][proto]["per_rate"][r]["MAE"]
            assert got["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert got["std"] == pytest.approx(np.std(values), abs=1e-12)
        means = [np.mean([per_seed[s][proto]["per_rate"][r]["Corr"] for r in per_seed[s][proto]
                          ["per_rate"]]) for s in seeds]
        assert res["protocols"][proto]["mean_over_rates"]["Corr"]["mean"] == pytest.approx(
            np.mean(means), abs=1e-12)
    # Selection inflation: paper minus honest 10-rate mean, paired by seed, t-interval over 5.
    diffs = [np.mean([per_seed[s]["paper"]["per_rate"][r]["MAE"]
                      - per_seed[s]["honest"]["per_rate"][r]["MAE"]
                      for r in per_seed[s]["honest"]["per_rate"]]) for s in seeds]
    d = res["selection_inflation"]["per_rate_mean"]["MAE"]
    assert (d["mean"], d["lo"], d["hi"]) == pytest.approx(t_interval(diffs), abs=1e-9)
    assert res["timings"]["total_seconds"] == 50.0
    assert res["pooled_from"] == [{"path": str(a / "results.json"), "seeds": [1111, 1112, 1113]},
                                  {"path": str(b / "results.json"), "seeds": [1115, 1114]}]
    saved = json.loads((tmp_path / "p" / "results.json").read_text())
    assert saved["selection_inflation"]["per_rate_mean"]["MAE"]["n"] == 5
    md = (tmp_path / "p" / "results.md").read_text()
    assert "Seeds pooled from 2 runs" in md and "(seeds 1115, 1114)" in md


def test_pooling_multi_model_sweeps_writes_each_model_and_the_paired_comparison(tmp_path):
    for run, seeds in (("s1", (1111, 1112, 1113)), ("s2", (1114, 1115))):
        for i, model in enumerate(("ease", "lnln")):
            fake_run(tmp_path / run, model, model, seeds, seed=10 * i + len(seeds))
    res = pool.main([str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "p")])
    seeds = ["1111", "1112", "1113", "1114", "1115"]
    paired = res["comparison"]["paired"]["models"]["lnln"]
    assert paired["seeds"] == seeds
    diffs = [res["lnln"]["seeds"][s]["honest"]["per_rate"]["0.5"]["MAE"]
             - res["ease"]["seeds"][s]["honest"]["per_rate"]["0.5"]["MAE"] for s in seeds]
    d = paired["protocols"]["honest"]["per_rate"]["0.5"]["MAE"]
    assert (d["mean"], d["lo"], d["hi"]) == pytest.approx(t_interval(diffs), abs=1e-9)
    for model in ("ease", "lnln"):
        assert json.loads((tmp_path / "p" / model / "results.json").read_text())["model"] == model
    for f in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "p" / f).stat().st_size > 0


def test_clear_errors(tmp_path):
    a, ra = fake_run(tmp_path, "a", "ease", (1111, 1112), seed=1)
    out = ["--out", str(tmp_path / "p")]

    def fails(match, *runs):
        with pytest.raises(SystemExit, match=match):
            pool.main([str(r) for r in runs] + out)

    fails("at least two", a)
    fails("seed 1112 is in", a, fake_run(tmp_path, "b", "ease", (1112, 1113), seed=2)[0])
    other = dict(ra["config"], train=dict(ra["config"]["train"], epochs=200))
    fails(r"config differs .* train\.epochs \(200 vs 50\)", a,
          fake_run(tmp_path, "c", "ease", (1113,), seed=3, config=other)[0])
    fails("other data", a, fake_run(tmp_path, "d", "ease", (1113,), seed=3,
                                    data={"source": "x.pkl", "sha256": "def"})[0])
    fails("behaviour", a, fake_run(tmp_path, "e", "ease", (1113,), seed=3,
                                   behaviour={"name": "released"})[0])
    fails(r"holds the models \['lnln'\]", a, fake_run(tmp_path, "f", "lnln", (1113,), seed=3)[0])
    fails("no such file or directory", a, tmp_path / "typo")
    (tmp_path / "empty").mkdir()
    fails("holds no results.json", a, tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{")
    fails("not JSON", a, tmp_path / "bad.json")
    (tmp_path / "foreign.json").write_text("{}")
    fails("not a sweep", a, tmp_path / "foreign.json")
    fake_run(tmp_path / "two", "ease", "ease", (1114,), seed=4)
    fake_run(tmp_path / "two", "lnln", "lnln", (1114,), seed=5)
    fails("holds the models", a, tmp_path / "two")
