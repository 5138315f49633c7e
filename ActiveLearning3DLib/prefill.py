"""Pre-filled boxes: the ensemble's prediction of each pool image, and what an annotator changed in a box.

When a loop's ensemble scores the pool it already holds the mean probability
of every class in every voxel; the class of the highest mean is kept as the
model's prediction of that image (``<model>/pool_prediction/<case>.nii.gz``,
one compressed label image in the image's own grid, written by
:func:`write_pool_prediction`). A box queried in loop ``t`` is pre-filled from
the newest model trained before loop ``t`` (the one whose scores chose it; a
loop-0 box has none and opens empty).

At submit, the labels are compared with what the annotator started from (the
pre-fill when shown, else an empty box): voxels added (background made a
class), removed (a class made background) and relabelled (one class made
another). Their sum is the box's corrected voxels. Independently of whether it
was shown, the pre-fill's Dice per class against the submitted labels says how
right the model was inside the box. :class:`EffortModel` turns corrections into
estimated annotator seconds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .boxes import Box
from .fileio import atomic_write_image, read_image
from .project import BoxState

PREDICTION_FOLDER = "pool_prediction"  # inside a model folder: <model>/pool_prediction/<case>.nii.gz
UNCERTAINTY_FOLDER = "uncertainty"  # inside a model folder: <model>/uncertainty/<case>.nii.gz, the heat map
PREDICTION_ENDING = ".nii.gz"
_MODEL_LOOP = re.compile(r"^loop_(\d+)_")


def prediction_labels(mean_probabilities: np.ndarray) -> np.ndarray:
    """The class of the highest mean probability per voxel, from a (classes, Z, Y, X) array (uint8 or uint16)."""
    classes = mean_probabilities.shape[0]
    return np.argmax(mean_probabilities, axis=0).astype(np.uint8 if classes <= 256 else np.uint16)


def prediction_path(model_folder: Path | str, case: str) -> Path:
    return Path(model_folder) / PREDICTION_FOLDER / f"{case}{PREDICTION_ENDING}"


def write_pool_prediction(folder: Path | str, case: str, labels: np.ndarray, reference: sitk.Image) -> Path:
    """Save a pool image's predicted labels as ``folder/<case>.nii.gz`` (atomically, compressed) with the geometry
    of ``reference``; ``folder`` is a model's ``pool_prediction`` folder."""
    path = Path(folder) / f"{case}{PREDICTION_ENDING}"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    image.CopyInformation(reference)
    atomic_write_image(image, path)
    return path


def model_loop(model_folder: Path | str) -> int | None:
    """The loop a model folder (``loop_<t>_<profile>_<key>``) learnt from, or None for another folder."""
    match = _MODEL_LOOP.match(Path(model_folder).name)
    return int(match.group(1)) if match else None


def prefill_model(results_root: Path | str, case: str, before_loop: int) -> Path | None:
    """The newest model folder trained before ``before_loop`` that predicted ``case`` (None when there is none).

    Newest: the highest loop, then (several models of one loop: annotations
    changed and it was trained again) the most recently written prediction.
    """
    if before_loop <= 0:
        return None
    path = newest_model_file(results_root, Path(PREDICTION_FOLDER, f"{case}{PREDICTION_ENDING}"), before_loop)
    return None if path is None else path.parent.parent  # <model>/pool_prediction/<case>.nii.gz -> <model>


def uncertainty_map(results_root: Path | str, case: str) -> Path | None:
    """The predictive-entropy map of ``case`` by the newest model that scored the pool (None before any did)."""
    return newest_model_file(results_root, Path(UNCERTAINTY_FOLDER, f"{case}{PREDICTION_ENDING}"))


def newest_model_file(results_root: Path | str, relative: Path | str, before_loop: int | None = None) -> Path | None:
    """``relative`` inside the newest model folder that wrote it (trained before ``before_loop`` when given).

    Newest: the highest loop, then (several models of one loop: annotations
    changed and it was trained again) the most recently written file.
    """
    root = Path(results_root)
    if not root.is_dir():
        return None
    found = []
    for folder in root.iterdir():
        loop = model_loop(folder)
        path = folder / relative
        if loop is not None and (before_loop is None or loop < before_loop) and path.is_file():
            found.append((loop, path.stat().st_mtime_ns, folder.name, path))
    return max(found)[3] if found else None


def read_prediction_box(model_folder: Path | str, box: Box, shape: Sequence[int]) -> np.ndarray:
    """The predicted labels inside ``box`` (its size); the stored image must have the case's ``shape``."""
    path = prediction_path(model_folder, box.case)
    labels = sitk.GetArrayFromImage(read_image(path))
    if tuple(labels.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"{path}: predicted labels have shape {list(labels.shape)}, the image has {list(shape)}")
    return np.ascontiguousarray(labels[box.slices])


def box_effort(
    start: np.ndarray, submitted: np.ndarray, prefill: np.ndarray | None, classes: Iterable[int], shown: bool, model: str | None
) -> dict:
    """What an annotator changed in a box, and how right the pre-fill was; stored in the box's record.

    ``start`` is what the box showed when it opened (the pre-fill, or zeros),
    ``submitted`` the labels submitted, ``prefill`` the model's prediction of
    the box (None without a model). Dice of a class absent from both is None.
    """
    start = np.asarray(start)
    submitted = np.asarray(submitted)
    if start.shape != submitted.shape:
        raise ValueError(f"pre-fill of shape {start.shape} and submitted labels of shape {submitted.shape} differ")
    was, now = start != 0, submitted != 0
    added = int(np.count_nonzero(~was & now))
    removed = int(np.count_nonzero(was & ~now))
    relabelled = int(np.count_nonzero(was & now & (start != submitted)))
    dice: dict[str, float | None] | None = None
    if prefill is not None:
        dice = {}
        for c in classes:
            p, s = prefill == c, submitted == c
            total = int(np.count_nonzero(p)) + int(np.count_nonzero(s))
            dice[str(int(c))] = None if total == 0 else round(2.0 * np.count_nonzero(p & s) / total, 6)
    return {
        "prefill_shown": bool(shown),
        "prefill_model": model,
        "voxels": int(submitted.size),
        "foreground": int(np.count_nonzero(now)),  # what painting the box from nothing would have corrected
        "added": added,
        "removed": removed,
        "relabelled": relabelled,
        "corrected": added + removed + relabelled,
        "prefill_dice": dice,
    }


def mean_dice(dice: Mapping[str, float | None] | None) -> float | None:
    """The mean of a box's per-class pre-fill Dice over the classes where it is defined (None: none is)."""
    values = [v for v in (dice or {}).values() if v is not None]
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class EffortModel:
    """Estimated annotator seconds for a box: ``seconds = box_seconds + seconds_per_voxel * corrected voxels``.

    ``box_seconds`` is what every box costs whatever its content: navigating to
    it and scrolling through its slices to check it (about one second per slice
    of a 20-slice box). ``seconds_per_voxel`` is painting: a brush stroke over
    a few voxels of a slice, about 50 voxels a second once the boundary is
    followed. Neither is measured; both are assumptions to compare methods and
    pre-filling on one scale. The panel records each box's real seconds from
    shown to submitted: :meth:`fit` estimates both parameters from such records
    (least squares), so a team can replace the defaults by its own.
    """

    box_seconds: float = 20.0
    seconds_per_voxel: float = 0.02

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"EffortModel.{name}: expected a non-negative number, got {value!r}")

    def seconds(self, corrected_voxels: float, boxes: float = 1) -> float:
        """Estimated seconds for ``boxes`` boxes with ``corrected_voxels`` corrected voxels in all."""
        return self.box_seconds * boxes + self.seconds_per_voxel * corrected_voxels

    def describe(self) -> str:
        return (
            f"seconds = {self.box_seconds:g} per box + {self.seconds_per_voxel:g} per corrected voxel "
            "(assumed parameters, not measured)"
        )

    @classmethod
    def fit(cls, corrected_voxels: Sequence[float], seconds: Sequence[float]) -> "EffortModel":
        """Least-squares parameters from recorded boxes (corrected voxels, seconds from shown to submitted)."""
        x = np.asarray(corrected_voxels, dtype=float)
        y = np.asarray(seconds, dtype=float)
        if x.shape != y.shape or x.size < 2 or np.ptp(x) == 0:
            raise ValueError("EffortModel.fit: needs at least two boxes with different corrected-voxel counts")
        slope, intercept = np.polyfit(x, y, 1)
        return cls(max(0.0, float(intercept)), max(0.0, float(slope)))


def effort_totals(records: Iterable) -> dict:
    """Totals of annotated boxes' effort records (BoxRecords or their JSON): boxes, corrected voxels, their foreground
    voxels (the corrections without a pre-fill), pre-fills shown, mean pre-fill Dice (over boxes where it is
    defined), recorded seconds."""
    boxes = with_effort = shown = corrected = voxels = foreground = 0
    seconds, dice = [], []
    for r in records:
        state = r.get("state") if isinstance(r, Mapping) else r.state
        if state != BoxState.ANNOTATED:
            continue
        boxes += 1
        effort = r.get("effort") if isinstance(r, Mapping) else r.effort
        recorded = r.get("seconds") if isinstance(r, Mapping) else r.seconds
        if recorded is not None:
            seconds.append(float(recorded))
        if not effort:
            continue
        with_effort += 1
        shown += bool(effort.get("prefill_shown"))
        corrected += int(effort.get("corrected", 0))
        voxels += int(effort.get("voxels", 0))
        foreground += int(effort.get("foreground", 0))
        d = mean_dice(effort.get("prefill_dice"))
        if d is not None:
            dice.append(d)
    return {
        "boxes": boxes,
        "boxes_with_effort": with_effort,
        "prefill_shown": shown,
        "corrected_voxels": corrected,
        "box_voxels": voxels,
        "foreground_voxels": foreground,
        "mean_prefill_dice": float(np.mean(dice)) if dice else None,
        "seconds": round(sum(seconds), 3) if seconds else None,
        "boxes_with_seconds": len(seconds),
    }
