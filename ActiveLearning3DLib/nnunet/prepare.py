"""Everything before the folds: plans (once), incremental preprocessing, and the splits of this loop.

:func:`prepare` is one worker step run before the folds are trained (in
parallel, by :func:`~.trainer.train_fold`). Only making the plans needs the
project's nnU-Net environment (see :mod:`.planning`); a loop whose plans exist
prepares in any process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..fileio import read_json
from ..project import Project
from .paths import NnunetPaths
from .planning import plan
from .preprocessing import annotated_classes, preprocess, read_manifest
from .splits import check_splits, make_splits, stable_splits, write_splits

MODEL_SPLITS = "splits_final.json"  # the splits a model was trained with, copied into its folder (stable folds)

Progress = Callable[[dict], None]


def prepare(
    project: Project,
    configuration: str = "3d_fullres",
    folds: int = 5,
    seed: int | None = None,
    replan: bool = False,
    num_processes: int = 1,
    progress: Progress | None = None,
    previous_splits: Path | str | None = None,
    model_folder: Path | str | None = None,
) -> dict:
    """Plan (first time or ``replan``), preprocess changed cases, write ``splits_final.json``; returns a summary.

    The number of folds in the splits can be lower than ``folds`` when fewer
    images are annotated (see :mod:`.splits`); train ``summary["folds"]`` folds.
    ``previous_splits``: the previous loop's model's splits file; its images keep
    their folds (stable folds, for warm starts); a missing file gives fresh
    splits and the summary's ``split_rule`` says so. ``model_folder``: where a
    copy of the splits is kept with the model, for the next loop.
    """
    started = time.perf_counter()
    paths = NnunetPaths.for_project(project)
    had_plans = paths.plans_file.is_file()
    plan(project, replan=replan, num_processes=num_processes, progress=progress)
    planned = time.perf_counter()
    result = preprocess(project, configuration, num_processes=num_processes, progress=progress)
    table = annotated_classes(project, read_manifest(paths))
    seed = project.settings.seed if seed is None else seed
    if previous_splits is None:
        splits, rule = make_splits(table, folds, seed), "fresh splits"
    elif not Path(previous_splits).is_file():
        splits, rule = make_splits(table, folds, seed), f"fresh splits: the previous model has no {Path(previous_splits)}"
    else:
        splits, rule = stable_splits(table, folds, seed, read_json(previous_splits))
    problems = check_splits(splits, table)
    if not paths.splits_file.is_file() or read_json(paths.splits_file) != splits:
        write_splits(paths.splits_file, splits)
    if model_folder is not None:
        Path(model_folder).mkdir(parents=True, exist_ok=True)
        write_splits(Path(model_folder) / MODEL_SPLITS, splits)
    summary = {
        "configuration": configuration,
        "planned": not had_plans or replan,
        "plan_seconds": round(planned - started, 3),
        "preprocessing": result.to_json(),
        "cases": len(table),
        "folds": len(splits),
        "split_notes": problems,
        "split_rule": rule,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if progress:
        progress({"stage": "prepared", **{k: summary[k] for k in ("cases", "folds", "seconds")}})
    return summary
