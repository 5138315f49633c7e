"""Pool scoring with a trained ensemble: one pass per image, every member streamed into the uncertainty maps.

For each pool image: nnU-Net's preprocessing once, then each member's sliding
window (Gaussian weighting, tile step 0.75, no mirroring) and export to the
original grid, added at once to the running mean (and the running expected
entropy when the query method needs BALD); only the maps the method needs are
computed, aggregated into candidate box scores and saved in a
:class:`~ActiveLearning3DLib.scores.ScoreStore`. nnActive instead runs
``nnUNetv2_predict`` once per member over the whole pool, writes every
member's probabilities to disk and reads them back; ``benchmarks/bench_loop.py``
compares the two on the same models.

Resumable: a case whose scores are stored (and whose uncertainty image and
predicted labels exist, when asked for) is not scored again.

With ``prediction_dir`` (the pipeline gives ``<model>/pool_prediction``) the
class of the highest mean probability is saved per image, in the image's grid
(:mod:`~ActiveLearning3DLib.prefill`): the annotator's boxes open pre-filled
with it. It costs an argmax and a compressed write per image; the mean is
computed anyway.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..aggregation import default_stride
from ..fileio import atomic_write_image
from ..prefill import PREDICTION_ENDING, prediction_labels, write_pool_prediction
from ..project import Project
from ..scores import ScoreStore, score_maps
from ..uncertainty import EnsembleAccumulator, needs_expected_entropy
from .prediction import Ensemble, PredictionSettings

Progress = Callable[[dict], None]
UNCERTAINTY_MAP = "pe"  # the map written as an image for the GUI's heat map


@dataclass
class ScoringSettings:
    """What a scoring run computes and where it writes."""

    maps: tuple[str, ...]  # e.g. QueryMethod.map_names(...)
    scores_dir: Path
    uncertainty_dir: Path | None = None  # write <case>.nii.gz predictive entropy here, for the GUI
    stride: tuple[int, int, int] | None = None
    prediction_dir: Path | None = None  # write <case>.nii.gz predicted labels here (<model>/pool_prediction), for pre-fills


def uncertainty_image(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32, copy=False))
    image.CopyInformation(reference)
    return image


def score_pool_with_ensemble(
    project: Project,
    ensemble: Ensemble,
    settings: ScoringSettings,
    cases: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Score every pool case not scored yet; returns counts and where the time went (seconds)."""
    store = ScoreStore(settings.scores_dir)
    names = list(settings.maps)
    todo_all = sorted(cases if cases is not None else project.pool_cases)
    need_ee = needs_expected_entropy(names)
    uncertainty = Path(settings.uncertainty_dir) if settings.uncertainty_dir else None
    seconds = {"aggregate": 0.0, "save": 0.0}
    scored, skipped = [], []
    started = time.perf_counter()
    for i, case in enumerate(todo_all):
        image_out = uncertainty / f"{case}.nii.gz" if uncertainty else None
        labels_out = Path(settings.prediction_dir) / f"{case}{PREDICTION_ENDING}" if settings.prediction_dir else None
        if ((not names or store.has(case, names)) and (image_out is None or image_out.is_file())
                and (labels_out is None or labels_out.is_file())):
            skipped.append(case)
            continue
        shape = project.cases[case].shape
        accumulator = EnsembleAccumulator(need_ee)
        for member, probabilities in ensemble.member_probabilities(project.image_paths(case)):
            t = time.perf_counter()
            if tuple(probabilities.shape[1:]) != tuple(shape):
                raise ValueError(f"{project.image_paths(case)[0]}: {member} predicted shape {probabilities.shape[1:]}, "
                                 f"the image has {tuple(shape)}")
            accumulator.add(probabilities, f"{case} {member}")
            seconds["aggregate"] += time.perf_counter() - t
        t = time.perf_counter()
        maps = accumulator.result()
        scores = score_maps(case, maps, names, project.patch_size, settings.stride or default_stride(project.patch_size, shape))
        seconds["aggregate"] += time.perf_counter() - t
        t = time.perf_counter()
        if names:  # none: a run that scores only for the predicted labels (a simulation's random runs)
            store.write(case, scores)
        if image_out is not None:
            image_out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_image(uncertainty_image(maps.map(UNCERTAINTY_MAP), project.read_image(case)), image_out)
        if labels_out is not None:
            write_pool_prediction(settings.prediction_dir, case, prediction_labels(maps.mean), project.read_image(case))
        seconds["save"] += time.perf_counter() - t
        scored.append(case)
        if progress:
            progress({"stage": "scoring", "case": case, "progress": (i + 1) / len(todo_all),
                      "message": f"scored {case} ({i + 1}/{len(todo_all)})"})
    total = time.perf_counter() - started
    seconds.update({k: float(v) for k, v in ensemble.timing.items()})
    return {
        "cases": len(todo_all), "scored": len(scored), "already_scored": len(skipped), "members": ensemble.members,
        "maps": names, "scores_dir": str(settings.scores_dir), "uncertainty_dir": str(uncertainty) if uncertainty else None,
        "prediction_dir": str(settings.prediction_dir) if settings.prediction_dir else None,
        "seconds": round(total, 3), "seconds_per_case": round(total / max(1, len(scored)), 4),
        "seconds_by_step": {k: round(v, 3) for k, v in seconds.items()},
    }


def load_scoring_ensemble(model_folder: Path | str, device: str = "cpu", threads: int | None = None) -> Ensemble:
    """All finished members of a model folder, set up for pool scoring (tile step 0.75, no mirroring)."""
    return Ensemble.load(model_folder, settings=PredictionSettings(tile_step=0.75, mirroring=False, device=device,
                                                                   threads=threads))
