"""Tests for ease_jax.metrics: MMSA-exact regression metrics, checked by hand."""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax.metrics import LOWER_IS_BETTER, METRIC_KEYS, regression_metrics, weighted_f1


def independent_weighted_f1(y_true, y_pred):
    """Precision / recall form (sklearn's definition, zero_division=0), weighted by support."""
    y_true, y_pred = list(y_true), list(y_pred)
    classes = sorted(set(y_true) | set(y_pred))
    total, n = 0.0, len(y_true)
    for c in classes:
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p == c)
        pred_c = sum(1 for p in y_pred if p == c)
        true_c = sum(1 for t in y_true if t == c)
        precision = tp / pred_c if pred_c else 0.0
        recall = tp / true_c if true_c else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * true_c
    return total / n if n else 0.0


# --------------------------------------------------------------------------- keys and types


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
def test_keys_and_types(dataset):
    rng = np.random.default_rng(0)
    y = rng.uniform(-3, 3, 50)
    p = y + rng.normal(0, 0.5, 50)
    out = regression_metrics(p, y, dataset)
    assert tuple(out) == METRIC_KEYS[dataset]
    for k, v in out.items():
        assert type(v) is float, k
        if "acc" in k or "F1" in k:
            assert 0.0 <= v <= 1.0
    assert LOWER_IS_BETTER == {"MAE"}
    assert METRIC_KEYS["mosi"] == ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
                                   "Mult_acc_5", "Mult_acc_7", "MAE", "Corr")
    assert METRIC_KEYS["sims"] == ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE",
                                   "Corr")


# --------------------------------------------------------------------------- MOSI / MOSEI by hand


def test_mosi_hand_case():
    y = np.array([0.0, 1.0, -1.0, 2.5, -0.5])
    p = np.array([0.5, 1.5, -0.4, 3.6, 0.2])
    out = regression_metrics(p, y, "mosi")
    # has0: y >= 0 -> TTFTF, p >= 0 -> TTFTT
    assert out["Has0_acc_2"] == pytest.approx(4 / 5)
    # class T: support 3, TP 3, FP 1, FN 0 -> 6/7; class F: support 2, TP 1, FN 1 -> 2/3
    assert out["Has0_F1_score"] == pytest.approx((3 * 6 / 7 + 2 * 2 / 3) / 5)
    # non0 drops y == 0: y > 0 -> TFTF, p > 0 -> TFTT
    assert out["Non0_acc_2"] == pytest.approx(3 / 4)
    assert out["Non0_F1_score"] == pytest.approx((2 * 4 / 5 + 2 * 2 / 3) / 4)
    # acc7: p -> clip 3.6 to 3 -> round [0, 2, -0, 3, 0]; y -> [0, 1, -1, 2, -0]
    assert out["Mult_acc_7"] == pytest.approx(2 / 5)
    # acc5: p -> [0, 2, -0, 2, 0]; y -> [0, 1, -1, 2, -0]
    assert out["Mult_acc_5"] == pytest.approx(3 / 5)
    assert out["MAE"] == pytest.approx((0.5 + 0.5 + 0.6 + 1.1 + 0.7) / 5)  # unclipped
    assert out["Corr"] == pytest.approx(np.corrcoef(p, y)[0, 1])
    assert regression_metrics(p, y, "mosei") == out


@pytest.mark.filterwarnings("ignore:Corr is NaN")
def test_round_half_to_even():
    # np.round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0, -1.5 -> -2
    p = np.array([0.5, 1.5, 2.5, -0.5, -1.5])
    y = np.array([0.0, 2.0, 2.0, 0.0, -2.0])
    out = regression_metrics(p, y, "mosi")
    assert out["Mult_acc_7"] == 1.0 and out["Mult_acc_5"] == 1.0
    # rounding half away from zero would give 1, 2, 3, -1, -2: three mismatches
    y_away = np.array([1.0, 2.0, 3.0, -1.0, -2.0])
    assert regression_metrics(p, y_away, "mosi")["Mult_acc_7"] == pytest.approx(2 / 5)
    # ties in the labels too, and the clip to [-2, 2] for acc5: 2.5 -> 2 (clip) -> 2
    assert regression_metrics([2.0], [2.5], "mosi")["Mult_acc_5"] == 1.0
    assert regression_metrics([3.0], [2.5], "mosi")["Mult_acc_7"] == 0.0  # 3 vs round(2.5) = 2


@pytest.mark.filterwarnings("ignore:Corr is NaN")
def test_zero_labels_has0_vs_non0():
    y = np.array([0.0, 0.0, 1.0, -1.0])
    p = np.array([-0.1, 0.1, 1.0, -1.0])
    out = regression_metrics(p, y, "mosi")
    assert out["Has0_acc_2"] == pytest.approx(3 / 4)  # label 0 is non-negative, -0.1 is not
    assert out["Non0_acc_2"] == 1.0  # the zeros are dropped
    assert out["Non0_F1_score"] == 1.0
    # a prediction of exactly 0 counts as non-negative (has0) and as not positive (non0)
    out = regression_metrics([0.0, 0.0], [1.0, 0.0], "mosi")
    assert out["Has0_acc_2"] == 1.0 and out["Non0_acc_2"] == 0.0


def test_all_zero_labels_gives_nan_non0():
    with pytest.warns(RuntimeWarning, match="every label is 0"), pytest.warns(
            RuntimeWarning, match="labels are constant"):
        out = regression_metrics([0.3, -0.2, 0.1], [0.0, 0.0, 0.0], "mosi")
    assert math.isnan(out["Non0_acc_2"]) and math.isnan(out["Non0_F1_score"])
    assert out["Has0_acc_2"] == pytest.approx(2 / 3)


def test_constant_predictions_corr_nan():
    y = np.array([1.0, -1.0, 2.0, 0.0])
    with pytest.warns(RuntimeWarning, match="predictions are constant"):
        out = regression_metrics(np.full(4, 0.7), y, "mosi")
    assert math.isnan(out["Corr"])
    assert out["MAE"] == pytest.approx(np.mean(np.abs(0.7 - y)))
    # SIMS: predictions that become constant after clipping
    with pytest.warns(RuntimeWarning, match="constant"):
        out = regression_metrics([1.5, 2.0, 3.0], [0.2, -0.4, 1.0], "sims")
    assert math.isnan(out["Corr"])
    with pytest.warns(RuntimeWarning, match="labels are constant"):
        regression_metrics([0.1, 0.2], [1.0, 1.0], "mosi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regression_metrics([0.1, 0.2, 0.4], [1.0, 0.0, 2.0], "mosi")  # no spurious warning


# --------------------------------------------------------------------------- SIMS


def test_sims_bin_edges():
    y = np.array([0.0, 0.1, -0.1, 0.7, -0.7])
    out = regression_metrics(y.copy(), y, "sims")
    assert out["Mult_acc_2"] == out["Mult_acc_3"] == out["Mult_acc_5"] == 1.0
    p = np.array([1e-3, 0.1001, -0.0999, 0.7001, -0.6999])
    out = regression_metrics(p, y, "sims")
    # 2 classes (edge 0, right-closed): y -> 0 1 0 1 0; p -> 1 1 0 1 0
    assert out["Mult_acc_2"] == pytest.approx(4 / 5)
    # 3 classes (edges -0.1, 0.1): y -> 1 1 0 2 0; p -> 1 2 1 2 0
    assert out["Mult_acc_3"] == pytest.approx(3 / 5)
    # 5 classes (edges -0.7, -0.1, 0.1, 0.7): y -> 2 2 1 3 0; p -> 2 3 2 4 1
    assert out["Mult_acc_5"] == pytest.approx(1 / 5)
    # F1 on 2 classes: class 0 support 3, TP 2, FN 1 -> 4/5; class 1 support 2, TP 2, FP 1 -> 4/5
    assert out["F1_score"] == pytest.approx(0.8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sims_edges_in_input_precision(dtype):
    # a value exactly on an edge (in the input's precision) is in the lower class
    edges = np.array([-0.7, -0.1, 0.0, 0.1, 0.7], dtype)
    lower = np.array([-0.8, -0.5, -0.05, 0.05, 0.5], dtype)
    out = regression_metrics(edges, lower, "sims")
    assert out["Mult_acc_5"] == 1.0 and out["Mult_acc_3"] == 1.0 and out["Mult_acc_2"] == 1.0


def test_sims_clipping():
    p = np.array([1.5, -2.0, 0.3])
    y = np.array([1.0, -1.0, 0.1])
    out = regression_metrics(p, y, "sims")
    assert out["MAE"] == pytest.approx(0.2 / 3)  # on clipped values
    assert out["Corr"] == pytest.approx(np.corrcoef([1.0, -1.0, 0.3], y)[0, 1])


def test_sims_f1_uses_true_labels():
    # asymmetric case: swapping y_true / y_pred changes weighted F1
    y = np.array([-0.5, -0.5, -0.5, 0.5])
    p = np.array([-0.5, -0.5, 0.5, 0.5])
    t2, p2 = [0, 0, 0, 1], [0, 0, 1, 1]
    out = regression_metrics(p, y, "sims")
    assert out["F1_score"] == pytest.approx(independent_weighted_f1(t2, p2))
    assert independent_weighted_f1(t2, p2) != pytest.approx(independent_weighted_f1(p2, t2))
    # by hand: class 0 support 3, TP 2, FN 1 -> 4/5; class 1 support 1, TP 1, FP 1 -> 2/3
    assert out["F1_score"] == pytest.approx((3 * 4 / 5 + 2 / 3) / 4)
    # (with the historic argument order it would be (2 * 4/5 + 2 * 2/3) / 4)
    assert out["F1_score"] != pytest.approx((2 * 4 / 5 + 2 * 2 / 3) / 4)


# --------------------------------------------------------------------------- weighted F1


def test_weighted_f1_by_hand():
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 1, 0, 1, 2, 2]
    # class 0: P 1, R 2/3 -> 0.8; class 1: P 1/2, R 1/2 -> 0.5; class 2: P 1/2, R 1 -> 2/3
    assert weighted_f1(t, p) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    # zero-division cases: no crash, 0
    assert weighted_f1([0, 0, 0], [1, 1, 1]) == 0.0  # class 1 only predicted: weight 0
    assert weighted_f1([1, 1], [1, 1]) == 1.0
    assert weighted_f1([], []) == 0.0
    # a class never predicted gets F1 0 (sklearn's zero_division=0 on its precision)
    assert weighted_f1([True, True, False], [True, True, True]) == pytest.approx(
        (2 * 0.8 + 1 * 0.0) / 3)


def test_weighted_f1_matches_independent_formula():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        k = int(rng.integers(2, 5))
        t = rng.integers(0, k, n)
        p = np.where(rng.random(n) < 0.6, t, rng.integers(0, k, n))
        assert weighted_f1(t, p) == pytest.approx(independent_weighted_f1(t, p), abs=1e-12)
    y = rng.uniform(-3, 3, 200)
    y[::7] = 0.0
    pr = y + rng.normal(0, 1.0, 200)
    out = regression_metrics(pr, y, "mosi")
    assert out["Has0_F1_score"] == pytest.approx(independent_weighted_f1(y >= 0, pr >= 0))
    nz = y != 0
    assert out["Non0_F1_score"] == pytest.approx(independent_weighted_f1(y[nz] > 0, pr[nz] > 0))


# --------------------------------------------------------------------------- validation


def test_input_validation():
    with pytest.raises(ValueError, match="dataset"):
        regression_metrics([0.0], [0.0], "iemocap")
    with pytest.raises(ValueError, match="preds"):
        regression_metrics([0.0, 1.0], [0.0], "mosi")
    with pytest.raises(ValueError, match="labels"):
        regression_metrics([0.0, 1.0], [0.0, np.nan], "mosi")
    with pytest.raises(ValueError, match="preds"):
        regression_metrics([np.inf, 1.0], [0.0, 1.0], "mosi")
    with pytest.raises(ValueError, match="preds"):
        regression_metrics(np.zeros((3, 2)), np.zeros(6), "mosi")
    with pytest.raises(ValueError, match="preds"):
        regression_metrics([], [], "mosi")
    with pytest.raises(ValueError, match="labels"):
        regression_metrics([0.1], ["a"], "mosi")
    # device arrays (also bfloat16) are accepted
    out = regression_metrics(jnp.array([0.5, -1.0, 2.0], jnp.bfloat16), jnp.array([0.4, -1.2, 1.5]),
                             "mosi")
    assert out["Has0_acc_2"] == 1.0 and out["MAE"] == pytest.approx(0.8 / 3)
    # (N, 1) predictions are flattened like MMSA's view(-1)
    out = regression_metrics(np.array([[0.5], [-1.0], [2.0]]), [0.4, -1.2, 1.5], "mosi")
    assert out["Has0_acc_2"] == 1.0
