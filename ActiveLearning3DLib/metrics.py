"""Evaluation metrics for active-learning runs (docs/METHODS.md section 6).

Everything here is pure numpy/scipy and stateless so that the same code scores a
benchmark run on a cluster and a session inside 3D Slicer.

* :func:`dice_per_class` / :func:`mean_dice` -- segmentation quality of one model.
* :func:`aubc` / :func:`final_dice` -- summaries of one learning curve (Mean Dice per loop).
* :func:`fg_efficiency` -- FG-Eff, how fast Dice saturates as a function of the
  annotated foreground fraction.
* :func:`pairwise_penalty_matrix` / :func:`sum_penalty_matrices` -- paired,
  per-budget-step comparison of several query methods over seeds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

__all__ = [
    "FGEffFit",
    "PenaltyMatrix",
    "aubc",
    "dice_per_class",
    "fg_efficiency",
    "final_dice",
    "mean_dice",
    "pairwise_penalty_matrix",
    "sum_penalty_matrices",
]

# Two x values (foreground fractions) closer than this are treated as the same
# point when locating x0 / y0 and counting distinct x values.
_X_TOLERANCE = 1e-9
# Paired Dice differences whose spread is below this are treated as constant:
# a t-test on rounding noise would otherwise report "significant" wins.
_DIFF_TOLERANCE = 1e-12


# ----------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Dice = 2TP / (2TP + FP + FN) of each class in ``classes`` for one case.

    A class absent from both prediction and reference has no defined Dice and
    gets NaN, so that it is ignored (not counted as 1 or 0) when averaging.
    A class predicted but absent from the reference scores 0.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference must have the same shape, got "
            f"prediction {prediction.shape} and reference {reference.shape}"
        )
    for name, array in (("prediction", prediction), ("reference", reference)):
        _check_label_array(name, array)

    result = np.empty(len(classes), dtype=np.float64)
    for k, label in enumerate(classes):
        pred_mask = prediction == label
        ref_mask = reference == label
        tp = int(np.count_nonzero(pred_mask & ref_mask))
        fp = int(np.count_nonzero(pred_mask)) - tp
        fn = int(np.count_nonzero(ref_mask)) - tp
        denominator = 2 * tp + fp + fn
        result[k] = math.nan if denominator == 0 else 2.0 * tp / denominator
    return result


def _check_label_array(name: str, array: np.ndarray) -> None:
    """Label maps must hold integers; float maps are accepted only if integral."""
    if array.dtype.kind in "biu":
        return
    if array.dtype.kind == "f":
        if np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            return
        raise ValueError(f"{name} must be an integer label array, got non-integral floats")
    raise ValueError(f"{name} must be an integer label array, got dtype {array.dtype}")


def mean_dice(per_case: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean Dice of a (cases x classes) Dice table, ignoring NaN entries.

    Returns ``(mean_dice, per_class_means)``. Each per-class mean averages the
    cases where the class is defined; classes undefined in every case are NaN
    there and are left out of the overall mean (which is NaN if all are).
    """
    table = np.asarray(per_case, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"per_case must be a 2D (cases x classes) array, got shape {table.shape}")
    defined = ~np.isnan(table)
    counts = defined.sum(axis=0)
    sums = np.where(defined, table, 0.0).sum(axis=0)
    per_class = np.full(table.shape[1], np.nan, dtype=np.float64)
    np.divide(sums, counts, out=per_class, where=counts > 0)
    valid = ~np.isnan(per_class)
    overall = float(per_class[valid].mean()) if valid.any() else math.nan
    return overall, per_class


# ----------------------------------------------------------------------------
# Learning-curve summaries
# ----------------------------------------------------------------------------


def _curve(values: Sequence[float], name: str) -> np.ndarray:
    curve = np.asarray(values, dtype=np.float64)
    if curve.ndim != 1:
        raise ValueError(f"{name} expects a 1D sequence of Mean Dice values, got shape {curve.shape}")
    if curve.size == 0:
        raise ValueError(f"{name} needs at least one Mean Dice value, got none")
    return curve


def aubc(values: Sequence[float]) -> float:
    """Area under the budget curve: trapezoid area with loops spread over x in [0, 1].

    Normalising x makes curves with different loop counts comparable and keeps
    the score on the Dice scale (a constant curve c has AUBC c).
    """
    curve = _curve(values, "aubc")
    if not np.all(np.isfinite(curve)):
        bad = np.flatnonzero(~np.isfinite(curve)).tolist()
        raise ValueError(f"aubc got non-finite Mean Dice values at loop indices {bad}")
    if curve.size == 1:
        return float(curve[0])
    return float(np.sum(curve[1:] + curve[:-1]) / (2.0 * (curve.size - 1)))


def final_dice(values: Sequence[float]) -> float:
    """Mean Dice after the last loop (what a user ends up with)."""
    return float(_curve(values, "final_dice")[-1])


# ----------------------------------------------------------------------------
# FG-Eff
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FGEffFit:
    """Fitted saturation curve y(x) = -(y_full - y0) exp(-gamma (x - x0)) + y_full.

    ``gamma`` is FG-Eff: higher means Dice approaches the fully-labelled Dice
    with less annotated foreground.
    """

    gamma: float
    x0: float
    y0: float
    y_full: float

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        """Model Mean Dice at foreground fraction(s) ``x``."""
        values = _saturation(np.asarray(x, dtype=np.float64), self.gamma, self.x0, self.y0, self.y_full)
        return float(values) if np.ndim(values) == 0 else values


def _saturation(x: np.ndarray, gamma: float, x0: float, y0: float, y_full: float) -> np.ndarray:
    return -(y_full - y0) * np.exp(-gamma * (x - x0)) + y_full


def _initial_gamma(x: np.ndarray, y: np.ndarray, x0: float, y0: float, y_full: float) -> float:
    """Median of per-point gamma solved from the model: a start near the optimum
    whatever the scale of x (fractions of a percent or tens of percent)."""
    ratio = (y_full - y) / (y_full - y0)
    dx = x - x0
    usable = (dx > _X_TOLERANCE) & (ratio > 0) & (ratio < 1)
    if usable.any():
        guess = float(np.median(-np.log(ratio[usable]) / dx[usable]))
        if np.isfinite(guess) and guess > 0:
            return guess
    span = float(np.max(dx))
    return 1.0 / span if span > 0 else 1.0


def fg_efficiency(x: Sequence[float], y: Sequence[float], y_full: float) -> FGEffFit:
    """Fit FG-Eff (gamma) to pooled (foreground fraction, Mean Dice) points of one method.

    ``x0`` is the smallest x, ``y0`` the mean y over points at x0, ``y_full`` the
    Dice of the same trainer on the fully labelled pool; only gamma (>= 0) is
    fitted so that methods differ in speed only, not in their end points.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or ys.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"x and y must be 1D sequences of equal length, got shapes {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and math.isfinite(y_full)):
        raise ValueError("fg_efficiency needs finite x, y and y_full (no NaN/inf)")
    if xs.size == 0:
        raise ValueError("fg_efficiency needs at least 2 distinct x values, got no points")

    x0 = float(xs.min())
    at_x0 = np.abs(xs - x0) <= _X_TOLERANCE
    if at_x0.all():
        raise ValueError(f"fg_efficiency needs at least 2 distinct x values, all {xs.size} points are at x = {x0}")
    y0 = float(ys[at_x0].mean())
    y_full = float(y_full)
    if abs(y_full - y0) <= _DIFF_TOLERANCE:
        raise ValueError(f"fg_efficiency cannot fit gamma: y_full ({y_full}) equals y0 ({y0}), the curve is flat")

    def model(xv: np.ndarray, gamma: float) -> np.ndarray:
        return _saturation(xv, gamma, x0, y0, y_full)

    p0 = _initial_gamma(xs, ys, x0, y0, y_full)
    with warnings.catch_warnings():
        # The covariance is unused; a perfect fit makes it inf and warns.
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        try:
            popt, _ = optimize.curve_fit(model, xs, ys, p0=[p0], bounds=([0.0], [np.inf]))
        except RuntimeError as error:
            raise RuntimeError(f"fg_efficiency: gamma fit did not converge ({error})") from error
    return FGEffFit(gamma=float(popt[0]), x0=x0, y0=y0, y_full=y_full)


# ----------------------------------------------------------------------------
# Pairwise penalty matrix
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PenaltyMatrix:
    """Entry (i, j): fraction of budget steps where method i significantly beats j.

    Column sums therefore say how often a method is beaten (lower is better),
    row sums how often it wins.
    """

    methods: list[str]
    matrix: np.ndarray


def _beats(differences: np.ndarray, alpha: float) -> bool:
    """Whether paired differences (i - j over seeds) favour i significantly."""
    spread = float(differences.max() - differences.min())
    mean = float(differences.mean())
    if spread <= _DIFF_TOLERANCE:
        # Zero variance: the t statistic is +-inf (p = 0) unless all are zero.
        return mean > _DIFF_TOLERANCE
    if mean <= 0:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(stats.ttest_rel(differences, np.zeros_like(differences)).pvalue)
    return p_value < alpha


def pairwise_penalty_matrix(dice: Mapping[str, np.ndarray], alpha: float = 0.05) -> PenaltyMatrix:
    """Paired two-sided t-tests over seeds at every budget step for every method pair.

    ``dice`` maps method name -> (seeds x steps) Dice array; row r of every array
    must come from the same seed so that differences are paired.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if len(dice) == 0:
        raise ValueError("pairwise_penalty_matrix needs at least one method, got none")
    methods = list(dice)
    arrays = [np.asarray(dice[name], dtype=np.float64) for name in methods]
    shape = arrays[0].shape
    for name, array in zip(methods, arrays):
        if array.ndim != 2:
            raise ValueError(f"Dice of method {name!r} must be 2D (seeds x steps), got shape {array.shape}")
        if array.shape != shape:
            raise ValueError(
                f"all methods need the same (seeds x steps) shape: {methods[0]!r} has {shape}, {name!r} has {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"Dice of method {name!r} contains NaN or inf")
    n_seeds, n_steps = shape
    if n_seeds < 2:
        raise ValueError(f"a paired t-test needs at least 2 seeds, got {n_seeds}")
    if n_steps < 1:
        raise ValueError("pairwise_penalty_matrix needs at least one budget step, got 0")

    n = len(methods)
    wins = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            differences = arrays[i] - arrays[j]
            wins[i, j] = sum(_beats(differences[:, s], alpha) for s in range(n_steps))
    return PenaltyMatrix(methods=methods, matrix=wins / n_steps)


def sum_penalty_matrices(results: Sequence[PenaltyMatrix]) -> PenaltyMatrix:
    """Sum penalty matrices of several settings (datasets, budgets) into one.

    All settings must compare the same methods; differing orders are aligned to
    the first result's order.
    """
    if len(results) == 0:
        raise ValueError("sum_penalty_matrices needs at least one penalty matrix, got none")
    methods = list(results[0].methods)
    total = np.zeros((len(methods), len(methods)), dtype=np.float64)
    for k, result in enumerate(results):
        if sorted(result.methods) != sorted(methods):
            raise ValueError(
                f"penalty matrix {k} compares methods {list(result.methods)}, expected the same methods as the first: {methods}"
            )
        order = [list(result.methods).index(name) for name in methods]
        total += np.asarray(result.matrix, dtype=np.float64)[np.ix_(order, order)]
    return PenaltyMatrix(methods=methods, matrix=total)
