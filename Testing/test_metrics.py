"""Known-answer tests for ActiveLearning3DLib.metrics (algorithms reference, section 6)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ActiveLearning3DLib.metrics import (
    FGEffFit,
    PenaltyMatrix,
    aubc,
    dice_per_class,
    fg_efficiency,
    final_dice,
    mean_dice,
    pairwise_penalty_matrix,
    sum_penalty_matrices,
)

# ---------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------


def test_dice_per_class_hand_computed_1d():
    prediction = np.array([1, 1, 1, 0, 2, 0])
    reference = np.array([1, 1, 0, 1, 0, 0])
    dice = dice_per_class(prediction, reference, [1, 2, 3])
    assert dice.dtype == np.float64
    # class 1: TP=2 (idx 0,1), FP=1 (idx 2), FN=1 (idx 3) -> 4 / (4 + 1 + 1)
    assert dice[0] == pytest.approx(4 / 6)
    # class 2: predicted once, absent from the reference -> 0, not NaN
    assert dice[1] == 0.0
    # class 3: absent from both -> undefined
    assert math.isnan(dice[2])


def test_dice_per_class_3d_volume():
    reference = np.zeros((2, 3, 4), dtype=np.uint8)
    prediction = np.zeros((2, 3, 4), dtype=np.uint8)
    reference[0, :, :2] = 1  # 6 voxels of class 1
    prediction[0, :2, :2] = 1  # 4 voxels, all inside the reference -> TP=4, FN=2
    prediction[1, 0, 0] = 1  # one false positive
    reference[1, 2, 3] = 2  # class 2 only in the reference -> Dice 0
    dice = dice_per_class(prediction, reference, [1, 2])
    assert dice[0] == pytest.approx(8 / (8 + 1 + 2))
    assert dice[1] == 0.0


def test_dice_perfect_and_disjoint():
    labels = np.array([[0, 1], [2, 2]])
    assert np.array_equal(dice_per_class(labels, labels, [1, 2]), [1.0, 1.0])
    assert np.array_equal(dice_per_class(np.array([1, 0]), np.array([0, 1]), [1]), [0.0])


def test_dice_accepts_integral_floats_and_rejects_bad_input():
    reference = np.array([1.0, 1.0, 0.0])
    prediction = np.array([1.0, 0.0, 0.0])
    assert dice_per_class(prediction, reference, [1])[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice_per_class(np.zeros((2, 3), int), np.zeros((3, 2), int), [1])
    with pytest.raises(ValueError, match="integer"):
        dice_per_class(np.array([0.5, 1.0]), np.array([0, 1]), [1])


def test_mean_dice_ignores_nan_by_hand():
    per_case = np.array(
        [
            [1.0, np.nan, 0.5],
            [0.5, np.nan, np.nan],
            [0.0, np.nan, 1.0],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" leaking
        overall, per_class = mean_dice(per_case)
    # class means: (1 + 0.5 + 0) / 3 = 0.5, undefined, (0.5 + 1) / 2 = 0.75
    assert per_class[0] == pytest.approx(0.5)
    assert math.isnan(per_class[1])
    assert per_class[2] == pytest.approx(0.75)
    assert overall == pytest.approx((0.5 + 0.75) / 2)
    assert isinstance(overall, float)


def test_mean_dice_all_nan_and_bad_shape():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overall, per_class = mean_dice(np.full((2, 3), np.nan))
    assert math.isnan(overall)
    assert per_class.shape == (3,) and np.all(np.isnan(per_class))
    with pytest.raises(ValueError, match="2D"):
        mean_dice(np.array([0.5, 0.7]))


def test_mean_dice_from_dice_per_class():
    cases = [
        (np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])),  # class 1: 2/3, class 2: NaN
        (np.array([2, 2, 1, 0]), np.array([2, 0, 1, 0])),  # class 1: 1, class 2: 2/3
    ]
    table = np.stack([dice_per_class(p, r, [1, 2]) for p, r in cases])
    overall, per_class = mean_dice(table)
    assert per_class == pytest.approx([(2 / 3 + 1) / 2, 2 / 3])
    assert overall == pytest.approx(((5 / 6) + (2 / 3)) / 2)


# ---------------------------------------------------------------------------
# AUBC / Final Dice
# ---------------------------------------------------------------------------


def test_aubc_constant_curve():
    assert aubc([0.8] * 7) == pytest.approx(0.8)


def test_aubc_linear_curve():
    assert aubc(np.linspace(0.5, 0.9, 5)) == pytest.approx(0.7)


def test_aubc_uneven_curve_hand_trapezoid():
    # dx = 1/3; trapezoids (0.2+0.6)/2 + (0.6+0.5)/2 + (0.5+0.9)/2 = 1.65 -> 1.65 / 3
    assert aubc([0.2, 0.6, 0.5, 0.9]) == pytest.approx(0.55)


def test_aubc_single_loop_and_errors():
    assert aubc([0.42]) == pytest.approx(0.42)
    with pytest.raises(ValueError, match="non-finite"):
        aubc([0.5, float("nan"), 0.7])
    with pytest.raises(ValueError, match="at least one"):
        aubc([])
    with pytest.raises(ValueError, match="1D"):
        aubc([[0.5, 0.6]])


def test_final_dice():
    assert final_dice([0.3, 0.5, 0.61]) == pytest.approx(0.61)
    assert isinstance(final_dice(np.array([0.3, 0.5])), float)
    with pytest.raises(ValueError):
        final_dice([])


# ---------------------------------------------------------------------------
# FG-Eff
# ---------------------------------------------------------------------------


def _fg_model(x, gamma, x0, y0, y_full):
    return -(y_full - y0) * np.exp(-gamma * (np.asarray(x) - x0)) + y_full


def test_fg_efficiency_exact_points_recovers_gamma():
    x = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.5])
    y = _fg_model(x, 7.5, 0.05, 0.3, 0.85)
    fit = fg_efficiency(x, y, 0.85)
    assert isinstance(fit, FGEffFit)
    assert fit.gamma == pytest.approx(7.5, rel=1e-6)
    assert fit.x0 == 0.05 and fit.y0 == pytest.approx(0.3) and fit.y_full == 0.85
    assert fit.predict(0.05) == pytest.approx(0.3)
    assert fit.predict(np.array([0.2, 10.0])) == pytest.approx([y[3], 0.85])


def test_fg_efficiency_noisy_seeds_pooled():
    rng = np.random.default_rng(1234)
    gamma, x0, y0_true, y_full = 7.5, 0.02, 0.3, 0.85
    xs, ys = [], []
    for _seed in range(3):
        x = np.concatenate([[x0], np.sort(rng.uniform(0.03, 0.6, size=7))])
        y = _fg_model(x, gamma, x0, y0_true, y_full) + rng.normal(0.0, 0.005, size=x.size)
        xs.append(x)
        ys.append(y)
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    fit = fg_efficiency(x_all, y_all, y_full)
    assert fit.x0 == pytest.approx(x0)
    # y0 is the mean of the three noisy first-loop points, not the true 0.3
    assert fit.y0 == pytest.approx(np.mean([y[0] for y in ys]))
    assert fit.gamma == pytest.approx(7.5, abs=0.5)


def test_fg_efficiency_x0_tolerance_and_faster_method_scores_higher():
    x = np.array([0.1, 0.1 + 1e-15, 0.2, 0.4])
    y_slow = np.array([0.4, 0.5, *_fg_model([0.2, 0.4], 2.0, 0.1, 0.45, 0.9)])
    y_fast = np.array([0.4, 0.5, *_fg_model([0.2, 0.4], 12.0, 0.1, 0.45, 0.9)])
    slow = fg_efficiency(x, y_slow, 0.9)
    fast = fg_efficiency(x, y_fast, 0.9)
    assert slow.y0 == pytest.approx(0.45)  # both points at x0 are averaged
    assert slow.gamma == pytest.approx(2.0, rel=1e-4)
    assert fast.gamma == pytest.approx(12.0, rel=1e-4)


def test_fg_efficiency_gamma_is_non_negative():
    # Dice that falls with more annotation would need gamma < 0; the bound keeps 0.
    x = np.array([0.1, 0.2, 0.3])
    y = np.array([0.5, 0.45, 0.4])
    assert fg_efficiency(x, y, 0.9).gamma == pytest.approx(0.0, abs=1e-8)


def test_fg_efficiency_errors():
    with pytest.raises(ValueError, match="2 distinct x"):
        fg_efficiency([0.1, 0.1, 0.1], [0.3, 0.4, 0.5], 0.9)
    with pytest.raises(ValueError, match="y_full"):
        fg_efficiency([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        fg_efficiency([0.1, 0.2], [0.5], 0.9)
    with pytest.raises(ValueError, match="finite"):
        fg_efficiency([0.1, 0.2], [0.5, float("nan")], 0.9)


# ---------------------------------------------------------------------------
# Pairwise penalty matrix
# ---------------------------------------------------------------------------


def test_ppm_dominated_method():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.4, 0.7, size=(4, 5))
    a = b + 0.05 + rng.normal(0.0, 0.002, size=(4, 5))
    result = pairwise_penalty_matrix({"A": a, "B": b})
    assert isinstance(result, PenaltyMatrix)
    assert result.methods == ["A", "B"]
    assert np.array_equal(result.matrix, [[0.0, 1.0], [0.0, 0.0]])


def test_ppm_tie_gives_zero_both_ways():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.4, 0.7, size=(4, 3))
    # identical results (all differences exactly 0) and a zero-mean wobble
    wobble = b + np.array([[0.01], [-0.01], [0.01], [-0.01]])
    result = pairwise_penalty_matrix({"A": b.copy(), "B": b, "C": wobble})
    assert result.methods == ["A", "B", "C"]
    assert np.array_equal(result.matrix, np.zeros((3, 3)))


def test_ppm_win_in_half_of_the_steps():
    rng = np.random.default_rng(2)
    b = rng.uniform(0.4, 0.7, size=(4, 4))
    a = b.copy()
    a[:, :2] += 0.05 + rng.normal(0.0, 0.002, size=(4, 2))  # clear wins at steps 0, 1
    a[:, 2:] += np.array([[0.01], [-0.01], [0.012], [-0.009]])  # noise at steps 2, 3
    result = pairwise_penalty_matrix({"B": b, "A": a})
    assert result.methods == ["B", "A"]
    assert result.matrix[1, 0] == pytest.approx(0.5)
    assert result.matrix[0, 1] == 0.0
    assert np.all(np.diag(result.matrix) == 0)


def test_ppm_mean_favours_but_not_significant():
    b = np.full((4, 1), 0.5)
    a = b + np.array([[0.1], [-0.05], [0.08], [-0.06]])  # mean +0.0175, p >> 0.05
    result = pairwise_penalty_matrix({"A": a, "B": b})
    assert np.array_equal(result.matrix, np.zeros((2, 2)))


def test_ppm_zero_variance_differences_do_not_crash():
    b = np.full((3, 2), 0.5)
    a = np.full((3, 2), 0.75)  # differences exactly 0.25 for every seed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pairwise_penalty_matrix({"A": a, "B": b})
    assert np.array_equal(result.matrix, [[0.0, 1.0], [0.0, 0.0]])


def test_ppm_alpha_controls_significance():
    b = np.full((5, 1), 0.5)
    a = b + np.array([[0.03], [0.01], [0.02], [0.005], [0.015]])  # t = 3.72, df 4, p = 0.0205
    strict = pairwise_penalty_matrix({"A": a, "B": b}, alpha=0.01)
    loose = pairwise_penalty_matrix({"A": a, "B": b}, alpha=0.05)
    assert strict.matrix[0, 1] == 0.0
    assert loose.matrix[0, 1] == 1.0


def test_ppm_bad_inputs():
    good = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="same"):
        pairwise_penalty_matrix({"A": good, "B": np.full((3, 3), 0.5)})
    with pytest.raises(ValueError, match="2D"):
        pairwise_penalty_matrix({"A": np.array([0.5, 0.6]), "B": np.array([0.5, 0.6])})
    with pytest.raises(ValueError, match="2 seeds"):
        pairwise_penalty_matrix({"A": np.full((1, 2), 0.5), "B": np.full((1, 2), 0.4)})
    with pytest.raises(ValueError, match="NaN"):
        pairwise_penalty_matrix({"A": good, "B": np.full((3, 2), np.nan)})
    with pytest.raises(ValueError, match="at least one method"):
        pairwise_penalty_matrix({})
    with pytest.raises(ValueError, match="alpha"):
        pairwise_penalty_matrix({"A": good, "B": good}, alpha=1.5)


def test_sum_penalty_matrices_adds_and_aligns():
    first = PenaltyMatrix(["A", "B", "C"], np.array([[0, 1.0, 0.5], [0, 0, 0.25], [0, 0, 0]]))
    second = PenaltyMatrix(["A", "B", "C"], np.array([[0, 0.5, 0], [0.25, 0, 1.0], [0, 0, 0]]))
    total = sum_penalty_matrices([first, second])
    assert total.methods == ["A", "B", "C"]
    assert np.array_equal(total.matrix, [[0, 1.5, 0.5], [0.25, 0, 1.25], [0, 0, 0]])
    # same methods in another order are aligned to the first result's order
    reordered = PenaltyMatrix(["B", "A", "C"], np.array([[0, 0.25, 1.0], [0.5, 0, 0], [0, 0, 0]]))
    assert np.array_equal(sum_penalty_matrices([first, reordered]).matrix, total.matrix)


def test_sum_penalty_matrices_from_computed_settings():
    rng = np.random.default_rng(3)
    b = rng.uniform(0.4, 0.7, size=(4, 5))
    a = b + 0.05 + rng.normal(0.0, 0.002, size=(4, 5))
    setting_1 = pairwise_penalty_matrix({"A": a, "B": b})
    setting_2 = pairwise_penalty_matrix({"A": b, "B": b})
    total = sum_penalty_matrices([setting_1, setting_2, setting_1])
    assert np.array_equal(total.matrix, [[0.0, 2.0], [0.0, 0.0]])


def test_sum_penalty_matrices_errors():
    ab = PenaltyMatrix(["A", "B"], np.zeros((2, 2)))
    ac = PenaltyMatrix(["A", "C"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same methods"):
        sum_penalty_matrices([ab, ac])
    with pytest.raises(ValueError, match="at least one"):
        sum_penalty_matrices([])
