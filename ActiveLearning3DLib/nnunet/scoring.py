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

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..aggregation import default_stride
from ..fileio import atomic_write_image
from ..prefill import PREDICTION_ENDING, prediction_labels, write_pool_prediction
from ..project import Project
from ..scores import ScoreStore, score_maps
from ..uncertainty import EnsembleAccumulator, needs_expected_entropy

if TYPE_CHECKING:  # pragma: no cover - torch is imported only where an ensemble is loaded (the worker)
    from .prediction import Ensemble

Progress = Callable[[dict], None]
UNCERTAINTY_MAP = "pe"  # the map written as an image for the GUI's heat map


_MAP_NAME = re.compile(r"^(pe|bald|ee|class_[0-9]+)$")  # the names EnsembleMaps.map knows


@dataclass
class ScoringSettings:
    """What a scoring run computes and where it writes; also the schema of a score job's inputs.

    The pipeline writes :meth:`to_json` into the job's ``job.json`` and the
    worker reads it back with :meth:`from_json`, so both sides agree on one
    record (importing this module does not import torch).
    """

    maps: tuple[str, ...]  # e.g. QueryMethod.map_names(...)
    scores_dir: Path
    uncertainty_dir: Path | None = None  # write <case>.nii.gz predictive entropy here, for the GUI
    stride: tuple[int, int, int] | None = None
    prediction_dir: Path | None = None  # write <case>.nii.gz predicted labels here (<model>/pool_prediction), for pre-fills

    def to_json(self) -> dict[str, Any]:
        """The job inputs (key order as the score jobs have always written them)."""
        return {
            "maps": list(self.maps),
            "scores_dir": str(self.scores_dir),
            "uncertainty_dir": None if self.uncertainty_dir is None else str(self.uncertainty_dir),
            "prediction_dir": None if self.prediction_dir is None else str(self.prediction_dir),
            "stride": None if self.stride is None else [int(s) for s in self.stride],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: Path | str = "scoring settings") -> "ScoringSettings":
        """The settings in ``data`` (a score job's inputs; other keys are the job's own); a ValueError names
        ``source`` (the job file), the key and what is wrong with it."""

        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{source}: {key!r}: expected {expected}, got {data.get(key)!r}")

        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object of scoring settings, got {type(data).__name__}")
        maps = data.get("maps")
        if not isinstance(maps, (list, tuple)) or not all(isinstance(m, str) and _MAP_NAME.match(m) for m in maps):
            raise bad("maps", "a list of uncertainty map names (pe, bald, ee, class_<c>)")

        def folder(key: str, required: bool = False) -> Path | None:
            value = data.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise bad(key, "a folder path" if required else "a folder path or null")
            return Path(value)

        stride = data.get("stride")
        if stride is not None and (
            not isinstance(stride, (list, tuple))
            or len(stride) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in stride)
        ):
            raise bad("stride", "null or three whole numbers of at least 1")
        return cls(
            tuple(maps),
            folder("scores_dir", required=True),
            folder("uncertainty_dir"),
            None if stride is None else tuple(stride),
            folder("prediction_dir"),
        )  # type: ignore[arg-type]


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
        if (
            (not names or store.has(case, names))
            and (image_out is None or image_out.is_file())
            and (labels_out is None or labels_out.is_file())
        ):
            skipped.append(case)
            continue
        shape = project.cases[case].shape
        accumulator = EnsembleAccumulator(need_ee)
        for member, probabilities in ensemble.member_probabilities(project.image_paths(case)):
            t = time.perf_counter()
            if tuple(probabilities.shape[1:]) != tuple(shape):
                raise ValueError(
                    f"{project.image_paths(case)[0]}: {member} predicted shape {probabilities.shape[1:]}, "
                    f"the image has {tuple(shape)}"
                )
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
            progress(
                {
                    "stage": "scoring",
                    "case": case,
                    "progress": (i + 1) / len(todo_all),
                    "message": f"scored {case} ({i + 1}/{len(todo_all)})",
                }
            )
    total = time.perf_counter() - started
    seconds.update({k: float(v) for k, v in ensemble.timing.items()})
    return {
        "cases": len(todo_all),
        "scored": len(scored),
        "already_scored": len(skipped),
        "members": ensemble.members,
        "maps": names,
        "scores_dir": str(settings.scores_dir),
        "uncertainty_dir": str(uncertainty) if uncertainty else None,
        "prediction_dir": str(settings.prediction_dir) if settings.prediction_dir else None,
        "seconds": round(total, 3),
        "seconds_per_case": round(total / max(1, len(scored)), 4),
        "seconds_by_step": {k: round(v, 3) for k, v in seconds.items()},
    }


def load_scoring_ensemble(model_folder: Path | str, device: str = "cpu", threads: int | None = None) -> Ensemble:
    """All finished members of a model folder, set up for pool scoring (tile step 0.75, no mirroring)."""
    from .prediction import Ensemble, PredictionSettings

    return Ensemble.load(
        model_folder, settings=PredictionSettings(tile_step=0.75, mirroring=False, device=device, threads=threads)
    )
