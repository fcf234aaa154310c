"""Tests of `ease_jax.report`: the Markdown tables given plain data, checked against values
written by hand; the paired comparison, the selection inflation and the one-seed wording on
hand-made sweep results (`helpers.fake_sweep_results`), and the plots written as PNGs."""

from __future__ import annotations

import json
import math

import numpy as np

from ease_jax import evaluate as E
from ease_jax import report as R
from ease_jax.report import benchmark as RB

from helpers import fake_sweep_results

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
    assert "70.00 ± 1.00" in md
    results["seeds"] = [1]  # one seed: no "± 0.00" spread
    assert "70.00 ± " not in R.ablation_markdown(results, "synthetic")


# ----------------------------------------------------------------------------------------------
# Paired comparison, selection inflation, one seed, training curves (hand-made results)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BEHAVIOUR = {"train_masks": "redrawn", "rate_input": "observed", "eval_z": "mean",
             "name": "default"}


def two_models(n_seeds):
    seeds = list(range(1, n_seeds + 1))
    per_model = {"ease": fake_sweep_results("mosi", "ease", seeds, seed=1),
                 "lnln": fake_sweep_results("mosi", "lnln", seeds, seed=2)}
    for res in per_model.values():
        res["behaviour"] = BEHAVIOUR
    return per_model, E.compare_models(per_model)


def test_comparison_markdown_prints_the_paired_differences():
    per_model, comp = two_models(3)
    md = R.comparison_markdown(comp, "synthetic")
    assert ("Behaviour (default): training masks redrawn, missing-rate input observed, "
            "EASE evaluation z = mean") in md.splitlines()
    for proto, desc in (("honest", "honest protocol (valid-selected)"),
                        ("paper", "paper protocol (test-selected)")):
        section = md.split(f"## Paired difference from EASE, {desc}")[1].split("\n## ")[0]
        d = comp["paired"]["models"]["lnln"]["protocols"][proto]
        mae = d["mean_over_rates"]["MAE"]
        acc = d["per_rate"]["0.5"]["Non0_acc_2"]
        lines = section.splitlines()
        row = next(line for line in lines if line.startswith("| LNLN - EASE | mean over r |"))
        assert f"| {mae['mean']:+.3f} [{mae['lo']:+.3f}, {mae['hi']:+.3f}] |" in row
        row = next(line for line in lines if line.startswith("| LNLN - EASE | r = 0.5 |"))
        lo, hi = 100 * acc["lo"], 100 * acc["hi"]
        assert f"/ {100 * acc['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] |" in row
        assert sum(line.startswith("| LNLN - EASE |") for line in lines) == 2 + 10 + 6
    assert " ± " in md and R.ONE_SEED not in md


def test_one_seed_prints_no_spread_and_no_interval():
    per_model, comp = two_models(1)
    md = R.comparison_markdown(comp, "synthetic")
    assert R.ONE_SEED in md and "±" not in md and "Paired difference" not in md
    res = per_model["ease"]
    md = R.results_markdown(res, "ease", "synthetic")
    assert R.ONE_SEED in md and "±" not in md
    section = md.split("## Selection inflation")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| mean over r |"))
    assert "[" not in row  # the single seed's difference, no interval
    assert f"{res['selection_inflation']['per_rate_mean']['MAE']['mean']:+.3f}" in row


def test_results_markdown_prints_the_selection_inflation():
    res = fake_sweep_results("sims", "ease", [1, 2], seed=5)
    md = R.results_markdown(res, "ease", "synthetic")
    assert R.ONE_SEED not in md and "Behaviour" not in md  # no "behaviour" key: no line
    section = md.split("## Selection inflation: how much selecting on the test split flatters "
                       "each number")[1].split("\n## ")[0]
    for key, cond in (("per_rate_mean", "mean over r"), ("subset_mean", "mean over kept subsets")):
        row = next(line for line in section.splitlines() if line.startswith(f"| {cond} |"))
        f1 = res["selection_inflation"][key]["F1_score"]
        assert f"| {100 * f1['mean']:+.2f} [{100 * f1['lo']:+.2f}, {100 * f1['hi']:+.2f}] |" in row


def test_plot_training_and_the_paired_panel_write_pngs(tmp_path):
    per_model, comp = two_models(2)
    R.plot_training(per_model["ease"], tmp_path / "training.png", "synthetic")
    data = (tmp_path / "training.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    R.plot_comparison(per_model, tmp_path / "comparison.png", "synthetic", paired=comp["paired"])
    R.plot_comparison(per_model, tmp_path / "plain.png", "synthetic")
    data, plain = ((tmp_path / name).read_bytes() for name in ("comparison.png", "plain.png"))
    width, plain_width = (int.from_bytes(png[16:20], "big") for png in (data, plain))  # IHDR
    # One more panel: 7 instead of 6 panels of 3.2 inches each.
    assert data[:8] == PNG_MAGIC and 6 * width == 7 * plain_width
