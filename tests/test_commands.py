"""End-to-end tests of `experiments.analyze` and `experiments.predict` (and `ease_jax.diagnostics`)
on tiny runs: a 2-seed EASE run (one seed trained by the sweep on a tiny pickle) and an LNLN run; the
commands' numbers are checked against an independent recomputation from one `model.apply` call
per seed, and the clear errors (missing run, results.json or checkpoint, wrong model, missing
pickle, bad condition) are checked by message."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import pickle
import re
import shutil

import jax
import numpy as np
import pytest

from ease_jax import checkpoint
from ease_jax import diagnostics as D
from ease_jax.analysis import (
    elastic_penalty,
    elastic_ratio,
    ks_normal,
    prediction_consistency,
    standardized_residuals,
)
from ease_jax.config import ModelConfig, replace
from ease_jax.data.missing import apply_keep_masks, inter_modal_keep_masks
from ease_jax.data.mmsa import load_mmsa
from ease_jax.evaluate import MaskBank
from ease_jax.models import build_model, init_params
from experiments import analyze, cli, predict, sweep

from helpers import TINY_MODEL as TINY
from helpers import random_model_params, tiny_raw

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore:Corr is NaN:RuntimeWarning")
EASE_SEEDS = (1111, 1112)


@pytest.fixture(scope="module", autouse=True)
def _no_compilation_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EASE_JAX_NO_COMPILATION_CACHE", "1")
        yield


@pytest.fixture(scope="module")
def runs(tiny_pickle, tmp_path_factory):
    """{"ease": EASE run dir, "lnln": LNLN run dir} on the tiny pickle with the tiny model.

    EASE is trained by the sweep (seed 1111, 2 epochs); to keep the file fast (a sweep compiles
    for ~40 s here) a second EASE seed (1112) and the LNLN run are written in the sweep's layout
    by hand: random parameters saved with `checkpoint.save`, results.json derived from the real
    one (same keys; model and seeds changed)."""
    root = tmp_path_factory.mktemp("runs")
    build_run = cli.build_run

    def tiny_build_run(*args, **kwargs):
        mcfg, loss, tcfg = build_run(*args, **kwargs)
        return replace(mcfg, **TINY), loss, tcfg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "build_run", tiny_build_run)
        sweep.main("mosi", argv=[
            "--data", str(tiny_pickle), "--epochs", "2", "--batch-size", "8",
            "--text-encoder", "features", "--seeds", "1111", "--out", str(root / "ease"),
            "--no-progress", "--model", "ease"])
    results = json.loads((root / "ease" / "results.json").read_text())
    cfg = ModelConfig(**results["config"]["model"])
    checkpoint.save(root / "ease" / "seed_1112" / "best", 0, random_model_params(cfg, 7),
                    {"epoch": 0, "seed": 1112, "run": "seed_1112"})
    results["seeds"]["1112"] = results["seeds"]["1111"]
    (root / "ease" / "results.json").write_text(json.dumps(results))

    lnln_cfg = replace(cfg, model="lnln")
    lnln = dict(results, model="lnln", seeds={"1111": results["seeds"]["1111"]})
    lnln["config"] = dict(results["config"], model=dataclasses.asdict(lnln_cfg))
    (root / "lnln").mkdir()
    (root / "lnln" / "results.json").write_text(json.dumps(lnln))
    checkpoint.save(root / "lnln" / "seed_1111" / "best", 0, random_model_params(lnln_cfg, 3),
                    {"epoch": 0, "seed": 1111, "run": "seed_1111"})
    return {"ease": root / "ease", "lnln": root / "lnln"}


def _reference(run_dir, seed):
    """(ModelConfig, params) read without ease_jax.diagnostics."""
    cfg = ModelConfig(**json.loads((run_dir / "results.json").read_text())["config"]["model"])
    params, _ = checkpoint.restore(run_dir / f"seed_{seed}" / "best",
                                   init_params(cfg, jax.random.key(0)))
    return cfg, params


@functools.cache
def _apply(cfg):
    """One jitted `model.apply` over a whole split (no batching): the reference forward pass."""
    model = build_model(cfg)
    return jax.jit(lambda params, inputs, clean: model.apply({"params": params}, inputs, clean,
                                                             train=False))


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, list(rows[0])


def test_predict_ease_matches_a_direct_apply(runs, tiny_pickle, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    res = predict.main(["--run", str(runs["ease"]), "--out", str(out), "--condition", "0.5",
                        "--seed", "1112", "--no-progress"])
    assert res["data"]["sha256_matches"] is True and res["seed"] == 1112
    rows, header = _read_csv(out)
    assert header == ["id", "label", "prediction", "missing_text", "missing_audio",
                      "missing_vision", "gate_text", "gate_audio", "gate_vision",
                      "uncertainty_text", "uncertainty_audio", "uncertainty_vision"]
    test = load_mmsa(tiny_pickle).test
    assert len(rows) == test.n
    assert [r["id"] for r in rows] == list(test.ids)
    col = {k: np.array([float(r[k]) for r in rows]) for k in header[1:]}
    np.testing.assert_allclose(col["label"], test.labels, rtol=1e-6)

    cfg, params = _reference(runs["ease"], 1112)
    keep = MaskBank(test).get("rate", 0.5)
    inputs = apply_keep_masks(test.model_arrays(cfg.text_encoder, labels=False), keep,
                              text_mode=cfg.text_encoder)
    direct = _apply(cfg)(params, inputs, None)
    np.testing.assert_allclose(col["prediction"], np.asarray(direct["pred"]), rtol=1e-5,
                               atol=1e-5)
    for i, m in enumerate(D.MODALITIES):
        np.testing.assert_allclose(col[f"missing_{m}"], np.asarray(inputs["missing_rate"])[:, i],
                                   atol=1e-6)
        np.testing.assert_allclose(col[f"gate_{m}"], np.asarray(direct["gate"][i]), atol=1e-5)
        np.testing.assert_allclose(col[f"uncertainty_{m}"], np.asarray(direct["uncertainty"][i]),
                                   rtol=1e-5)
    assert 0.2 < col["missing_audio"].mean() < 0.8  # r = 0.5 really dropped frames
    assert "seed 1112" in capsys.readouterr().err


def test_predict_lnln_columns_and_default_condition(runs, tmp_path):
    out = tmp_path / "sub" / "lnln.csv"
    predict.main(["--run", str(runs["lnln"]), "--out", str(out), "--split", "valid",
                  "--no-progress"])
    rows, header = _read_csv(out)
    assert header == ["id", "label", "prediction", "missing_text", "missing_audio",
                      "missing_vision", "completeness"]
    assert len(rows) == 8
    for m in D.MODALITIES:  # condition none: nothing dropped
        assert all(float(r[f"missing_{m}"]) == 0.0 for r in rows)
    assert all(0.0 < float(r["completeness"]) < 1.0 for r in rows)
    # A kept-modality subset: audio and vision entirely missing.
    predict.main(["--run", str(runs["lnln"]), "--out", str(out), "--condition", "l",
                  "--no-progress"])
    rows, _ = _read_csv(out)
    assert all(float(r["missing_audio"]) == 1.0 and float(r["missing_vision"]) == 1.0
               for r in rows)


def test_analyze_ease_matches_direct_recomputation(runs, tiny_pickle, tmp_path):
    out = tmp_path / "analysis"
    summary = analyze.main(["--run", str(runs["ease"]), "--baseline", str(runs["lnln"]),
                            "--out", str(out), "--no-progress"])
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["condition"] == {"kind": "rate", "value": 0.5, "label": "r = 0.5"}
    assert saved["seeds"] == list(EASE_SEEDS) and set(saved["calibration"]["per_seed"]) == {
        "1111", "1112"}
    for name in ("calibration.png", "elastic.png", "consistency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "analysis.md").read_text()
    assert "Calibration" in md and "Elastic" in md and "baseline: LNLN" in md
    assert summary["baseline"]["analyses"] == ["consistency"]

    # Independent recomputation: one model.apply per seed on the whole test split.
    test = load_mmsa(tiny_pickle).test
    keep = MaskBank(test).get("rate", 0.5)
    residuals = {m: [] for m in D.MODALITIES}
    pooled = {m: ([], [], []) for m in D.MODALITIES}
    fulls, completed = [], []
    for seed in EASE_SEEDS:
        cfg, params = _reference(runs["ease"], seed)
        arrays = test.model_arrays(cfg.text_encoder, labels=False)
        inputs = apply_keep_masks(arrays, keep, text_mode=cfg.text_encoder)
        out_ = _apply(cfg)(params, inputs, arrays)
        full_in = apply_keep_masks(arrays, inter_modal_keep_masks(test, "lav"),
                                   text_mode=cfg.text_encoder)
        full = np.asarray(_apply(cfg)(params, full_in, None)["pred"])
        cons = prediction_consistency(full, np.asarray(out_["pred"]))
        for k in ("wasserstein", "pearson", "mae"):
            assert saved["consistency"]["per_seed"][str(seed)][k] == pytest.approx(cons[k],
                                                                                abs=1e-5)
        fulls.append(full)
        completed.append(np.asarray(out_["pred"]))
        for i, m in enumerate(D.MODALITIES):
            r = standardized_residuals(out_["clean_tokens"][i], out_["imp_mean"][i],
                                       out_["imp_var"][i])
            assert saved["calibration"]["per_seed"][str(seed)][m]["ks"] == pytest.approx(
                ks_normal(r), abs=1e-5)
            residuals[m].append(r.ravel())
            pooled[m][0].append(np.asarray(out_["clean_tokens"][i]).mean(1))
            pooled[m][1].append(np.asarray(out_["imp_sample"][i]).mean(1))
            pooled[m][2].append(np.asarray(out_["uncertainty"][i]))
    for m in D.MODALITIES:
        ks = ks_normal(np.concatenate(residuals[m]))
        assert saved["calibration"]["pooled"][m]["ks"] == pytest.approx(ks, abs=1e-5)
        assert saved["calibration"]["pooled"][m]["n"] == 2 * test.n * TINY["tokens"] * TINY["dim"]
        z, z_hat, u = (np.concatenate(x) for x in pooled[m])
        ratio = elastic_ratio(elastic_penalty(z, z_hat, u, alpha=1.0))
        assert saved["elastic"]["pooled"][m]["ratio"] == pytest.approx(ratio, rel=1e-4)
        assert 0.0 < ratio <= 1.0  # psi >= 1
    cons = prediction_consistency(np.concatenate(fulls), np.concatenate(completed))
    assert saved["consistency"]["pooled"]["mae"] == pytest.approx(cons["mae"], abs=1e-5)
    assert saved["consistency"]["pooled"]["n"] == 2 * test.n


def test_analyze_lnln_reports_consistency_only(runs, tmp_path):
    summary = analyze.main(["--run", str(runs["lnln"]), "--condition", "la", "--no-progress"])
    out = runs["lnln"] / "analysis"  # the default --out
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["analyses"] == ["consistency"] and "calibration" not in saved
    assert saved["condition"]["label"] == "kept {l,a}"
    assert set(saved["consistency"]["pooled"]) == {"wasserstein", "pearson", "mae", "n"}
    assert (out / "consistency.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "calibration.png").exists()
    assert "Consistency only" in (out / "analysis.md").read_text()
    assert summary["files"] == ["analysis.json", "analysis.md", "consistency.png"]


def test_clear_errors(runs, tiny_pickle, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit, match=re.escape(str(missing)) + ".*does not exist"):
        analyze.main(["--run", str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"results\.json not found"):
        predict.main(["--run", str(empty), "--out", str(tmp_path / "x.csv")])
    (empty / "ease").mkdir()
    shutil.copy(runs["ease"] / "results.json", empty / "ease" / "results.json")
    with pytest.raises(SystemExit, match="several models"):  # a two-model sweep's --out
        analyze.main(["--run", str(empty)])
    with pytest.raises(SystemExit, match=r"seed_1111.best not found"):  # no checkpoints
        analyze.main(["--run", str(empty / "ease")])
    with pytest.raises(SystemExit, match="EASE run.*needs the LNLN model"):
        predict.main(["--run", str(runs["ease"]), "--out", str(tmp_path / "x.csv"),
                      "--model", "lnln"])
    with pytest.raises(SystemExit, match=re.escape(f"data file {tmp_path / 'gone.pkl'} not found")):
        predict.main(["--run", str(runs["lnln"]), "--out", str(tmp_path / "x.csv"),
                      "--data", str(tmp_path / "gone.pkl")])
    with pytest.raises(SystemExit, match="condition"):
        analyze.main(["--run", str(runs["lnln"]), "--condition", "lax"])
    with pytest.raises(SystemExit, match="seeds"):
        predict.main(["--run", str(runs["lnln"]), "--out", str(tmp_path / "x.csv"),
                      "--seed", "7"])
    # The training pickle moved: the message names it and says what to do.
    moved = tmp_path / "moved_run"
    shutil.copytree(runs["lnln"], moved)
    res = json.loads((moved / "results.json").read_text())
    res["data"]["source"] = str(tmp_path / "old_place.pkl")
    (moved / "results.json").write_text(json.dumps(res))
    gone = re.escape(f"{tmp_path / 'old_place.pkl'} not found")
    with pytest.raises(SystemExit, match=gone + ".*--data"):
        predict.main(["--run", str(moved), "--out", str(tmp_path / "x.csv")])
    # Other data than the run was trained on: loud warning, not an error.
    other = tmp_path / "other.pkl"
    with open(other, "wb") as f:
        pickle.dump(tiny_raw(seed=1), f)
    capsys.readouterr()
    res = predict.main(["--run", str(moved), "--out", str(tmp_path / "x.csv"), "--data",
                        str(other), "--no-progress"])
    assert res["data"]["sha256_matches"] is False
    assert "WARNING" in capsys.readouterr().err
