"""Tests of `ease_jax.diagnostics` on its own: run directories read (sweep and ablation layouts)
with clear errors, the synthetic data rebuilt, and the host batcher `Forward` against one direct
`model.apply` over the whole split and against the fit loop's predict program (one forward
function: the selection, the protocol, analyze and predict see the same predictions)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from ease_jax import checkpoint
from ease_jax import diagnostics as D
from ease_jax.config import LossConfig, TrainConfig, model_config, replace
from ease_jax.data.missing import apply_keep_masks
from ease_jax.data.synthetic import SMALL
from ease_jax.evaluate import MaskBank
from ease_jax.models import build_model
from ease_jax.population import PopulationProgram

from helpers import random_model_params, tiny_data_and_model


@pytest.fixture(scope="module")
def tiny():
    data, mcfg = tiny_data_and_model("ease")
    return data, mcfg, random_model_params(mcfg, 5)


def test_forward_equals_one_direct_apply_with_padding(tiny):
    data, mcfg, params = tiny
    split = data.test
    keep = MaskBank(split).get("rate", 0.5)
    fwd = D.Forward(mcfg, split.n, batch_size=3, clean=True, full=True)  # 8 rows: 3 + 3 + 2
    out = fwd(params, split, keep, MaskBank(split).keep(None))
    arrays = split.model_arrays("features", labels=False)
    inputs = apply_keep_masks(arrays, keep, text_mode="features")
    direct = build_model(mcfg).apply({"params": params}, inputs, arrays, train=False)
    np.testing.assert_allclose(out["pred"], direct["pred"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["missing_rate"], inputs["missing_rate"], atol=1e-7)
    for k in ("gate", "uncertainty", "clean_tokens", "imp_mean", "imp_var", "imp_sample"):
        assert out[k].shape == np.shape(direct[k]), k
        np.testing.assert_allclose(out[k], direct[k], rtol=1e-5, atol=1e-6, err_msg=k)
    full_in = apply_keep_masks(arrays, MaskBank(split).keep(None), text_mode="features")
    full = build_model(mcfg).apply({"params": params}, full_in, train=False)["pred"]
    np.testing.assert_allclose(out["pred_full"], full, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["pred_full"], out["pred"])  # r = 0.5 changed the inputs


@pytest.mark.parametrize("sample", [False, True])
def test_forward_equals_the_fit_loops_predict_program(tiny, sample):
    """The same predictions from the host batcher and from `PopulationProgram.predict` (one
    batch of all rows each, so with sampling both draw batch 0's noise key)."""
    data, mcfg, params = tiny
    mcfg = replace(mcfg, sample_at_eval=sample)
    split = data.test
    keep = MaskBank(split).get("subset", "la")
    host = D.Forward(mcfg, split.n)(params, split, keep)["pred"]
    prog = PopulationProgram(mcfg, LossConfig(), TrainConfig(batch_size=8), data.train.n, 1,
                             devices=jax.devices()[:1], eval_rows=split.n)
    rows = prog.put_rows(split.model_arrays("features", labels=False), 1)
    dev = prog.predict(prog.put_params([params]), rows, prog.put_rows(keep, 1), split.n)
    np.testing.assert_allclose(np.asarray(dev)[0], host, rtol=1e-5, atol=1e-6)


def _sweep_dir(tmp_path, mcfg, seeds=(1111,)):
    run = tmp_path / "run"
    results = {"dataset": "mosi", "model": mcfg.model, "seeds": {str(s): {} for s in seeds},
               "config": {"model": dataclasses.asdict(mcfg), "loss": {"alpha": 2.0}},
               "data": {"source": "synthetic:mosi(seed=0)", "sha256": None}}
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_load_run_reads_a_sweep_directory_and_names_what_is_missing(tiny, tmp_path):
    _, mcfg, params = tiny
    run_dir = _sweep_dir(tmp_path, mcfg)
    with pytest.raises(D.RunError, match="seed_1111/best not found"):
        D.load_run(run_dir)
    checkpoint.save(run_dir / "seed_1111" / "best", 3, params, {"epoch": 3})
    run = D.load_run(run_dir)
    assert (run.model, run.seeds, run.alpha, run.model_cfg) == ("ease", [1111], 2.0, mcfg)
    restored, record = D.restore_params(run, 1111)
    assert record["epoch"] == 3
    chex_equal = jax.tree_util.tree_map(np.array_equal, restored, jax.device_get(params))
    assert all(jax.tree_util.tree_leaves(chex_equal))
    with pytest.raises(D.RunError, match="LNLN model"):
        D.load_run(run_dir, model="lnln", purpose="this test")
    with pytest.raises(D.RunError, match="does not exist"):
        D.load_run(tmp_path / "nowhere")
    with pytest.raises(D.RunError, match="results.json not found"):
        D.load_run(tmp_path)


def test_load_run_reads_an_ablation_variant_from_its_records(tiny, tmp_path):
    _, mcfg, params = tiny
    root = tmp_path / "ablation"
    root.mkdir()
    abl = {"dataset": "mosi", "seeds": [7], "data": {"source": "x"},
           "config": {"model": dataclasses.asdict(mcfg), "loss": {"cons": 2.0}},
           "variants": {"w/o UCMI": {"change": [{"use_ucmi": False}, {}], "runs": ["a_7"]},
                        "w/o MIPC": {"change": [{}, {"cons": 0.0, "asym": 0.0}],
                                     "runs": ["b_7"]}}}
    (root / "ablation.json").write_text(json.dumps(abl))
    for name in ("a_7", "b_7"):
        (root / name / "best").mkdir(parents=True)
    run = D.load_run(root, variant="w/o UCMI")
    assert run.model_cfg == replace(mcfg, use_ucmi=False) and not D.has_ucmi(run.model_cfg)
    assert run.checkpoints == {7: root / "a_7" / "best"}
    mipc = D.load_run(root, variant="w/o MIPC")
    assert mipc.loss == {"cons": 0.0, "asym": 0.0} and mipc.model_cfg == mcfg
    with pytest.raises(D.RunError, match="no variant 'EASE'"):
        D.load_run(root)


def test_model_config_from_dict_names_the_source():
    with pytest.raises(D.RunError, match="src.json: config.model has fields this version"):
        D.model_config_from_dict({"model": "ease", "widget": 1}, "src.json")
    with pytest.raises(D.RunError, match="not a valid ModelConfig"):
        D.model_config_from_dict({"model": "gpt"}, "src.json")
    cfg = D.model_config_from_dict({"model": "ease", "bert": {"hidden_size": 384,
                                                               "num_attention_heads": 12}}, "s")
    assert cfg.bert.hidden_size == 384


def test_synthetic_data_is_rebuilt(tmp_path):
    # A run trained on the sweep's synthetic fallback: its data is rebuilt, not read from a file.
    small = model_config("ease", "mosi", text_encoder="features", text_len=SMALL["text_len"],
                         audio_len=SMALL["audio_len"], vision_len=SMALL["vision_len"])
    run = D.RunInfo(path=tmp_path, layout="sweep", dataset="mosi", model="ease",
                    model_cfg=small, loss={}, seeds=[1111], checkpoints={},
                    data={"source": "synthetic:mosi(seed=0)", "sha256": None,
                          "sizes": [SMALL[k] for k in ("n_train", "n_valid", "n_test")]})
    data, info = D.load_run_data(run, log=print)
    assert data.source == "synthetic:mosi(seed=0)" and info["synthetic"]
    assert [data.train.n, data.valid.n, data.test.n] == run.data["sizes"]
    full = dataclasses.replace(run, data={"source": "synthetic:mosi(seed=0,full)"},
                               model_cfg=model_config("ease", "mosi", text_encoder="features"))
    data, _ = D.load_run_data(full, log=print)
    assert (data.train.n, data.source) == (1284, "synthetic:mosi(seed=0,full)")
