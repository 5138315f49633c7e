"""Test-split evaluation of a loop's ensemble: nnU-Net's ensemble prediction with mirroring, Dice per class.

The ensemble predicts each held-out case as nnU-Net does (members' logits
averaged, test-time mirroring, tile step 0.5), and the segmentation is
compared with the ground truth (:func:`~ActiveLearning3DLib.metrics.dice_per_class`:
a class absent from both is NaN and left out of the means). Per-case results
are saved as they come (``cases/<case>.json``), so an interrupted evaluation
resumes; the summary (Mean Dice and per-class Dice) is written last.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..fileio import atomic_write_json, read_json
from ..metrics import dice_per_class, mean_dice
from ..project import Project, ProjectError, now_iso
from .prediction import Ensemble, PredictionSettings

Progress = Callable[[dict], None]


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def evaluate_test_split(
    project: Project,
    ensemble: Ensemble,
    output_dir: Path | str,
    cases: Sequence[str] | None = None,
    progress: Progress | None = None,
    extra: dict | None = None,
) -> dict:
    """Dice of every test case (resuming from saved per-case results) and ``summary.json`` in ``output_dir``."""
    if not project.has_ground_truth:
        raise ProjectError(f"{project.path}: evaluation needs ground truth; this project was created without labels")
    cases = sorted(cases if cases is not None else project.test_cases)
    if not cases:
        raise ProjectError(f"{project.path}: the project has no test cases to evaluate on")
    output = Path(output_dir)
    (output / "cases").mkdir(parents=True, exist_ok=True)
    classes = list(project.foreground_classes)
    started = time.perf_counter()
    rows = []
    for i, case in enumerate(cases):
        path = output / "cases" / f"{case}.json"
        if path.is_file():
            saved = read_json(path)
            if saved.get("classes") == classes:
                rows.append([math.nan if d is None else d for d in saved["dice"]])
                continue
        t = time.perf_counter()
        segmentation = ensemble.segment(project.image_paths(case))
        reference = project.read_ground_truth(case)
        dice = dice_per_class(segmentation, reference, classes)
        # Full precision (JSON floats round-trip exactly), so a resumed summary equals an uninterrupted one.
        atomic_write_json(
            path,
            {
                "case": case,
                "classes": classes,
                "dice": [float(d) if math.isfinite(d) else None for d in dice],
                "seconds": round(time.perf_counter() - t, 3),
            },
        )
        rows.append(list(dice))
        if progress:
            progress(
                {
                    "stage": "evaluation",
                    "case": case,
                    "progress": (i + 1) / len(cases),
                    "message": f"evaluated {case} ({i + 1}/{len(cases)})",
                }
            )
    table = np.asarray(rows, dtype=np.float64)
    overall, per_class = mean_dice(table)
    summary = {
        "mean_dice": _finite_or_none(overall),
        "per_class": {project.classes[c]: _finite_or_none(d) for c, d in zip(classes, per_class)},
        "per_case": {case: [_finite_or_none(d) for d in row] for case, row in zip(cases, table)},
        "classes": {str(c): project.classes[c] for c in classes},
        "test_cases": len(cases),
        "members": ensemble.members,
        "model_folder": str(ensemble.model_folder),
        "mirroring": ensemble.settings.mirroring,
        "tile_step": ensemble.settings.tile_step,
        "seconds": round(time.perf_counter() - started, 3),
        "written": now_iso(),
        **(extra or {}),
    }
    atomic_write_json(output / "summary.json", summary)
    return summary


def load_evaluation_ensemble(
    model_folder: Path | str, device: str = "cpu", threads: int | None = None, mirroring: bool = True
) -> Ensemble:
    """All finished members of a model folder, set up as nnU-Net predicts (tile step 0.5, mirroring)."""
    return Ensemble.load(
        model_folder, settings=PredictionSettings(tile_step=0.5, mirroring=mirroring, device=device, threads=threads)
    )
