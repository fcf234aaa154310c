"""Tests of `ease_jax.studies` (Table 4 variants, Fig. 7 grid, paired differences), the grouping of
runs into populations (`fit.group_runs`), and the ablation / sensitivity commands end to end on
tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ease_jax import fit as F
from ease_jax import studies as S
from ease_jax.config import LossConfig, RunConfig, TrainConfig, model_config, replace
from experiments import ablation, cli, sensitivity

from helpers import TINY_MODEL as TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore:Corr is NaN:RuntimeWarning")


def test_paired_difference_is_the_one_in_evaluate():
    from ease_jax import evaluate as E

    assert S.paired_difference is E.paired_difference  # tested in test_evaluate.py


def tiny_run_config():
    mcfg = model_config("ease", "mosi", text_encoder="features", text_len=3, text_dim=768,
                        audio_len=3, vision_len=3, **TINY)
    return RunConfig(dataset="mosi", model=mcfg, loss=LossConfig(), train=TrainConfig())


def test_ablation_runs_and_their_populations():
    run = tiny_run_config()
    runs = S.ablation_runs(run.model, run.loss, [1, 2])
    assert len(runs) == 2 * len(S.ABLATIONS) == 18
    by = {r.label: r for r in runs}
    assert by["wo_l_uada_seed_1"].loss.uada == 0.0 and by["wo_l_uada_seed_1"].model is None
    assert (by["wo_ucsa_seed_2"].loss.uada, by["wo_ucsa_seed_2"].loss.anchor) == (0.0, 0.0)
    assert (by["wo_mipc_seed_2"].loss.cons, by["wo_mipc_seed_2"].loss.asym) == (0.0, 0.0)
    assert by["wo_mipc_seed_2"].model is None  # the views stay: w/o MIPC is weights at 0
    assert by["wo_ucmi_seed_1"].model.use_ucmi is False
    wo_all = by["wo_all_seed_1"]
    assert wo_all.model.use_ucmi is False
    assert [getattr(wo_all.loss, k) for k in ("uada", "anchor", "cons", "asym")] == [0.0] * 4
    groups = list(F.group_runs(run, runs))
    # Weight-only variants share the full model's program; w/o UCMI and w/o ALL are another.
    assert [len(g) for _, g in groups] == [14, 4]
    assert {r.label.rsplit("_seed", 1)[0] for r in groups[1][1]} == {"wo_ucmi", "wo_all"}
    assert groups[1][0].model.use_ucmi is False and groups[0][0].model == run.model
    assert [len(g) for _, g in F.group_runs(run, runs, population=5)] == [5, 5, 4, 4]
    with pytest.raises(ValueError, match="unknown"):
        S.ablation_runs(run.model, run.loss, [1], ["w/o BERT"])
    # A program-shaping loss field splits a group too.
    odd = S.ablation_runs(run.model, replace(run.loss, tau=2.0), [3], ["EASE"])
    assert len(list(F.group_runs(run, runs[:2] + odd))) == 2


def test_state_dir_names_stay_short_and_distinct():
    run = tiny_run_config()
    runs = S.ablation_runs(run.model, run.loss, [1111, 1112])
    assert F.state_dir_name(runs[:1]) == "ease_seed_1111"
    assert F.state_dir_name(runs[:2]) == "population-ease_seed_1111+ease_seed_1112"
    long = F.state_dir_name(runs)
    assert len(long) < 80 and long.startswith("population-ease_seed_1111+17more-")
    assert long != F.state_dir_name(runs[:-1]) and long == F.state_dir_name(list(runs))


def test_sensitivity_grid_is_eq13_around_the_preset():
    base = LossConfig.preset("paper")
    runs = S.sensitivity_runs(base, [7])
    assert len(runs) == 3 * 6 - 2  # the preset lies on every weight's grid: counted once
    names = [r.label for r in runs]
    assert len(set(names)) == len(names)
    preset = next(r for r in runs if r.label == "l1_0p5_l2_0p2_l3_0p5_seed_7")
    for k in ("ucmi", "uada", "anchor", "cons", "asym", "sp"):  # the preset IS the paper's Eq. 13
        assert getattr(preset.loss, k) == pytest.approx(getattr(base, k))
    r = next(r for r in runs if r.label == "l1_0p5_l2_2_l3_0p5_seed_7")
    assert (r.loss.uada, r.loss.anchor, r.loss.cons, r.loss.asym) == pytest.approx((2, 0.04, 0.5, 0.5))
    assert all(F.program_key(r.loss) == F.program_key(base) for r in runs)  # one population


@pytest.fixture()
def tiny_model(monkeypatch):
    build_run = cli.build_run

    def tiny_build_run(*args, **kwargs):
        mcfg, loss, tcfg = build_run(*args, **kwargs)
        return replace(mcfg, **TINY), loss, tcfg

    monkeypatch.setattr(cli, "build_run", tiny_build_run)
    monkeypatch.setenv("EASE_JAX_NO_COMPILATION_CACHE", "1")


def common_argv(pickle_path, out, seeds="1111,1112"):
    return ["--data", str(pickle_path), "--epochs", "2", "--batch-size", "8", "--text-encoder",
            "features", "--seeds", seeds, "--out", str(out), "--no-progress"]


def test_ablation_end_to_end(tiny_pickle, tmp_path, tiny_model):
    out = tmp_path / "abl"
    res = ablation.main(common_argv(tiny_pickle, out) + [
        "--dataset", "mosi", "--variants", "w/o UCMI,w/o L_cons"])
    assert list(res["variants"]) == ["EASE", "w/o UCMI", "w/o L_cons"]  # EASE added
    saved = json.loads((out / "ablation.json").read_text())
    for v in ("EASE", "w/o UCMI", "w/o L_cons"):
        entry = saved["variants"][v]
        assert set(entry["protocols"]) == {"honest", "paper"}
        # The paired difference is the mean over seeds of (variant - EASE) 10-rate means.
        for proto in ("honest", "paper"):
            mine = [s["MAE"] for s in entry["per_seed"][proto]]
            ref = [s["MAE"] for s in saved["variants"]["EASE"]["per_seed"][proto]]
            assert entry["paired"][proto]["MAE"]["mean"] == pytest.approx(np.mean(
                np.subtract(mine, ref)))
            assert entry["paired"][proto]["MAE"]["n"] == 2
    assert saved["variants"]["EASE"]["paired"]["honest"]["MAE"]["mean"] == 0.0
    md = (out / "ablation.md").read_text()
    assert "| w/o UCMI |" in md and "72.15 / 72.98" in md  # the paper's MOSI row beside ours
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    for name in ("ease_seed_1111", "wo_ucmi_seed_1112", "wo_l_cons_seed_1111"):
        assert (out / name / "best").is_dir()
    # Two programs: the weight-only variants together, w/o UCMI alone.
    assert (out / "population-ease_seed_1111+ease_seed_1112+wo_l_cons_seed_1111+"
                  "wo_l_cons_seed_1112").is_dir()
    assert (out / "population-wo_ucmi_seed_1111+wo_ucmi_seed_1112").is_dir()


def test_sensitivity_end_to_end(tiny_pickle, tmp_path, tiny_model):
    out = tmp_path / "sens"
    res = sensitivity.main(common_argv(tiny_pickle, out, seeds="1111") + [
        "--dataset", "mosi", "--values", "0.1,1"])
    assert len(res["points"]) == 6 and len(res["settings"]) == 6
    saved = json.loads((out / "sensitivity.json").read_text())
    pt = next(p for p in saved["points"] if p["weight"] == "l2" and p["value"] == 1.0)
    assert pt["weights"] == {"l1": 0.5, "l2": 1.0, "l3": 0.5}
    assert set(pt["protocols"]["honest"]) == {"Mult_acc_5", "MAE"}
    md = (out / "sensitivity.md").read_text()
    assert "| 0.1 |" in md and "| 1 |" in md and "l3 MAE" in md
    assert (out / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    assert len(list(out.glob("population-*"))) == 1  # every setting in one program


def test_command_arguments():
    a = ablation.parse_args([])
    assert a.dataset == "mosi" and a.variant_list == list(S.ABLATIONS)
    assert a.data is None  # the data set's default path, resolved by cli.load_data
    assert ablation.parse_args(["--variants", "w/o MIPC"]).variant_list == ["EASE", "w/o MIPC"]
    with pytest.raises(SystemExit):
        ablation.parse_args(["--variants", "w/o nothing"])
    s = sensitivity.parse_args([])
    assert s.dataset == "mosei" and s.value_list == list(S.SENSITIVITY_VALUES)
    assert s.data is None
    for bad in ("a,b", "-1", ","):
        with pytest.raises(SystemExit):
            sensitivity.parse_args(["--values", bad])
