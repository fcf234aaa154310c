"""Tests of `ease_jax.report`: the Markdown tables given plain data, checked against values
written by hand."""

from __future__ import annotations

import json
import math

import numpy as np

from ease_jax import report as R
from ease_jax.report import benchmark as RB

ENV = {"platform": "cpu", "cpu_model": "Test CPU", "host_cpus": 2, "device_kind": "cpu",
       "n_devices": 1}


def pop_row(model, n, step_s, peak):
    return {"model": model, "text_encoder": "features", "population": n, "step_s": step_s,
            "run_samples_per_s": n * 64 / step_s, "epoch_s": 21 * step_s, "host_s": 0.5,
            "host_fraction": 0.5 / (0.5 + 21 * step_s), "compile_s": 30.0, "peak_bytes": peak,
            "peak_kind": "process max RSS", "peak_bytes_per_run": peak / n, "n_params": 7e6,
            "error": None}


def test_population_table_gain_and_memory_per_run():
    rows = [pop_row("ease", 1, 6.0, 6 * 2**30), pop_row("ease", 3, 12.0, 9 * 2**30),
            {"model": "lnln", "text_encoder": "features", "population": 9, "error": "killed"}]
    lines = RB.population_table(rows, ENV).splitlines()
    assert lines[0].startswith("| device | model | text encoder | runs | step s | run-samples/s")
    one, three, failed = lines[2:]
    assert "| 1 | 6.000 | 10.7 | 1.00 |" in one
    assert "| 3 | 12.000 | 16.0 | 1.50 |" in three  # 3 x 64 / 12 over 64 / 6
    assert three.endswith("| 9.00 GiB (process max RSS) | 3.00 GiB |")
    assert "not measured: killed" in failed and "CPU Test CPU (2 cores)" in one


def test_efficiency_table_has_the_papers_rows_and_ours():
    rows = [pop_row("ease", 1, 6.0, 2**30), pop_row("ease", 3, 12.0, 2**30)]
    table = RB.efficiency_table(rows, ENV)
    assert "| EASE (paper) | 116M | 7.9 | the paper's GPU |" in table
    assert "| LNLN (paper) | 116M | 24.0 |" in table
    ours = [l for l in table.splitlines() if "ours" in l]
    assert ours == ["| EASE (features, ours) | 7.0M | 126.0 | CPU Test CPU (2 cores) |"]


def test_fmt_and_row_cells_by_hand():
    assert R.fmt("MAE", 0.98765) == "0.988" and R.fmt("Corr", -0.5) == "-0.500"
    assert R.fmt("Mult_acc_7", 0.35749) == "35.75" and R.fmt("MAE", math.nan) == "nan"
    values = {m: 0.5 for m in ("Has0_acc_2", "Non0_acc_2", "Has0_F1_score", "Non0_F1_score",
                               "Mult_acc_5", "Mult_acc_7", "MAE", "Corr")}
    values["MAE"] = {"mean": 1.2345, "std": 0.01}
    cells = R.row_cells("mosi", values, std=True)
    assert cells[0] == "50.00 / 50.00" and "1.234 ± 0.010" in cells


def test_single_modality_table_is_a_view_of_the_inter_modal_rows():
    row = {m: {"mean": 0.25, "std": 0.0} for _, ms in R.TABLE_COLUMNS["mosi"] for m in ms}
    agg = {"per_rate": {"0.0": row}, "inter_modal": {"la": row, "av": row}}
    lines = R.single_modality_table("mosi", agg, "honest")
    assert lines[1].endswith("honest protocol")
    names = [line.split(" | ")[0] for line in lines[5:]]
    assert names == ["| all (r = 0)", "| w/o {v}", "| w/o {l}"]  # "lv" absent: no w/o {a} row


def test_write_json_turns_numpy_and_nan_into_json(tmp_path):
    path = tmp_path / "x.json"
    R.write_json(path, {"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan")})
    text = path.read_text()
    assert json.loads(text.replace("NaN", "null")) == {"a": 0.5, "b": [1, 2], "c": None}


def test_ablation_markdown_has_the_papers_row_and_paired_intervals():
    agg = {m: {"mean": 0.7, "std": 0.01} for m in ("Has0_F1_score", "Non0_F1_score",
                                                   "Mult_acc_5", "MAE")}
    paired = {p: {m: {"mean": -0.02, "lo": -0.05, "hi": 0.01, "n": 3} for m in agg}
              for p in ("honest", "paper")}
    results = {"dataset": "mosi", "seeds": [1, 2, 3], "data": {"source": "test"}, "variants": {
        "EASE": {"protocols": {p: {"mean_over_rates": agg} for p in ("honest", "paper")}},
        "w/o MIPC": {"protocols": {p: {"mean_over_rates": agg} for p in ("honest", "paper")},
                     "paired": paired}}}
    md = R.ablation_markdown(results, "synthetic")
    assert "72.67" in md and "73.41" in md  # the paper's w/o MIPC row (F1 has0 / non0)
    assert "-0.020 [-0.050, +0.010]" in md and "-2.00 [-5.00, +1.00]" in md
