"""`experiments.compare`: finished runs side by side, each against the first paired by seed."""

import json

import numpy as np
import pytest
from scipy import stats

from experiments import compare

from helpers import fake_sweep_results


def write(tmp_path, name, results):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_compare_pairs_two_runs_by_seed(tmp_path):
    a = fake_sweep_results("mosi", "ease", (1111, 1112, 1113), seed=1)
    b = fake_sweep_results("mosi", "ease", (1113, 1111, 1112), seed=2)  # another seed order
    for r, name in ((a, "default"), (b, "released")):
        r["data"]["sha256"] = "abc"
        r["behaviour"] = {"train_masks": "redrawn" if name == "default" else "released",
                          "rate_input": "observed", "eval_z": "mean", "name": name}
    out = tmp_path / "cmp"
    res = compare.main([f"default={write(tmp_path, 'a', a)}",
                        f"released={write(tmp_path, 'b', b) / 'results.json'}", "--out", str(out)])
    d = res["paired"]["models"]["released"]["protocols"]["honest"]["per_rate"]["0.5"]["MAE"]
    diffs = [b["seeds"][s]["honest"]["per_rate"]["0.5"]["MAE"]
             - a["seeds"][s]["honest"]["per_rate"]["0.5"]["MAE"] for s in ("1111", "1112", "1113")]
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert d["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert (d["lo"], d["hi"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half),
                                               abs=1e-9)
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["behaviour"]["released"]["train_masks"] == "released"
    md = (out / "comparison.md").read_text()
    assert "Paired difference from DEFAULT" in md and "training masks released" in md
    assert (out / "comparison.png").stat().st_size > 0


def test_compare_clear_errors(tmp_path):
    a = fake_sweep_results("mosi", "ease", (1111,), seed=1)
    a["data"]["sha256"] = "abc"
    b = dict(a, data={"source": "other.pkl", "sha256": "def"})
    pa, pb = write(tmp_path, "a", a), write(tmp_path, "b", b)
    with pytest.raises(SystemExit, match="other data"):
        compare.main([f"x={pa}", f"y={pb}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no such file"):
        compare.main([f"x={pa}", f"y={tmp_path / 'typo'}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="twice"):
        compare.main([f"x={pa}", f"x={pa}", "--out", str(tmp_path / "o")])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a sweep"):
        compare.main([f"x={pa}", f"y={tmp_path / 'bad.json'}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        compare.main(["no-equals-sign"])
