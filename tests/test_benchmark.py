"""Tests of the benchmark's arguments and tables (the measurements themselves are benchmarks, run
by hand: README "Speed")."""

from __future__ import annotations

import pytest

from experiments import benchmark as B

ENV = {"platform": "cpu", "cpu_model": "Test CPU", "host_cpus": 2, "device_kind": "cpu",
       "n_devices": 1}


def pop_row(model, n, step_s, peak):
    return {"model": model, "text_encoder": "features", "population": n, "step_s": step_s,
            "run_samples_per_s": n * 64 / step_s, "epoch_s": 21 * step_s, "host_s": 0.5,
            "host_fraction": 0.5 / (0.5 + 21 * step_s), "compile_s": 30.0, "peak_bytes": peak,
            "peak_kind": "process max RSS", "peak_bytes_per_run": peak / n, "n_params": 7e6,
            "error": None}


def test_population_arguments():
    a = B.parse_args(["--population", "1,3,9", "--epoch-steps", "3"])
    assert a.population_list == [1, 3, 9] and a.epoch_steps == 3 and a.run_batch is None
    assert B.parse_args([]).population_list == []
    for bad in (["--population", "0"], ["--population", "x"], ["--epoch-steps", "0"]):
        with pytest.raises(SystemExit):
            B.parse_args(bad)


def test_population_table_gain_and_memory_per_run():
    rows = [pop_row("ease", 1, 6.0, 6 * 2**30), pop_row("ease", 3, 12.0, 9 * 2**30),
            {"model": "lnln", "text_encoder": "features", "population": 9, "error": "killed"}]
    lines = B.population_table(rows, ENV).splitlines()
    assert lines[0].startswith("| device | model | text encoder | runs | step s | run-samples/s")
    one, three, failed = lines[2:]
    assert "| 1 | 6.000 | 10.7 | 1.00 |" in one
    assert "| 3 | 12.000 | 16.0 | 1.50 |" in three  # 3 x 64 / 12 over 64 / 6
    assert three.endswith("| 9.00 GiB (process max RSS) | 3.00 GiB |")
    assert "not measured: killed" in failed and "CPU Test CPU (2 cores)" in one


def test_efficiency_table_has_the_papers_rows_and_ours():
    rows = [pop_row("ease", 1, 6.0, 2**30), pop_row("ease", 3, 12.0, 2**30)]
    table = B.efficiency_table(rows, ENV)
    assert "| EASE (paper) | 116M | 7.9 | the paper's GPU |" in table
    assert "| LNLN (paper) | 116M | 24.0 |" in table
    ours = [l for l in table.splitlines() if "ours" in l]
    assert ours == ["| EASE (features, ours) | 7.0M | 126.0 | CPU Test CPU (2 cores) |"]
