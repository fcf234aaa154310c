"""Tests of the benchmark command's arguments (its tables: tests/test_report.py; the measurements
themselves are benchmarks, run by hand: README "Speed")."""

from __future__ import annotations

import pytest

from experiments import benchmark as B


def test_population_arguments():
    a = B.parse_args(["--population", "1,3,9", "--epoch-steps", "3"])
    assert a.population_list == [1, 3, 9] and a.epoch_steps == 3 and a.run_batch is None
    assert B.parse_args([]).population_list == [] and B.parse_args([]).epoch_steps == 1
    for bad in (["--population", "0"], ["--population", "x"], ["--epoch-steps", "0"]):
        with pytest.raises(SystemExit):
            B.parse_args(bad)


def test_extrapolate_by_hand():
    from experiments.gpu_check import extrapolate

    history = [{"seconds_train": t, "seconds_eval": 1.0, "seconds_host": 0.5}
               for t in (30.0, 4.0, 5.0, 4.5)]
    results = {"seeds": {"1111": {"history": history, "seconds": {"protocol": 20.0}}}}
    x = extrapolate(results, seeds=3, epochs=200)
    # steady epoch = median of 5.5, 6.5, 6.0 = 6.0; compile = 31.5 - 6.0
    assert x["epoch_s"] == 6.0 and x["compile_s"] == 25.5
    assert x["total_s"] == 25.5 + 3 * (200 * 6.0 + 20.0)
    with pytest.raises(ValueError, match="2 epochs"):
        extrapolate({"seeds": {"1": {"history": history[:1], "seconds": {}}}})


@pytest.mark.slow
def test_gpu_check_quick_on_the_cpu(tmp_path):
    """The accelerator check's CPU smoke test (about 2-4 minutes here; `.ci/run` runs it)."""
    import json

    from experiments import gpu_check

    check = gpu_check.main(["--quick", "--out", str(tmp_path)])
    rows = check["speed"]["results"]
    assert [(r["model"], r["text_encoder"]) for r in rows] == [("ease", "features"),
                                                               ("lnln", "features")]
    assert all(r["error"] is None and r["step_s_median"] > 0 and r["eval_samples_per_s"] > 0
               for r in rows)
    assert [r["population"] for r in check["population"]["results"]] == [1, 3]
    run = check["run"]
    assert run["error"] is None, run["error"]
    results = json.loads((tmp_path / "short_run" / "results.json").read_text())
    assert results["data"]["synthetic"] and len(results["seeds"]["1111"]["history"]) == 2
    assert run["extrapolated"] == gpu_check.extrapolate(results)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Populations" in md and "Extrapolated to 3 seeds x 200 epochs" in md
    assert json.loads((tmp_path / "gpu_check.json").read_text())["quick"] is True
