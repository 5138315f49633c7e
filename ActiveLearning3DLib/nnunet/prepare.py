"""Everything before the folds: plans (once), incremental preprocessing, and the splits of this loop.

:func:`prepare` is one worker step run before the folds are trained (in
parallel, by :func:`~.trainer.train_fold`). Only making the plans needs the
project's nnU-Net environment (see :mod:`.planning`); a loop whose plans exist
prepares in any process.
"""
from __future__ import annotations

import time
from typing import Callable

from ..fileio import read_json
from ..project import Project
from .paths import NnunetPaths
from .planning import plan
from .preprocessing import annotated_classes, preprocess, read_manifest
from .splits import check_splits, make_splits, write_splits

Progress = Callable[[dict], None]


def prepare(
    project: Project,
    configuration: str = "3d_fullres",
    folds: int = 5,
    seed: int | None = None,
    replan: bool = False,
    num_processes: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Plan (first time or ``replan``), preprocess changed cases, write ``splits_final.json``; returns a summary.

    The number of folds in the splits can be lower than ``folds`` when fewer
    images are annotated (see :mod:`.splits`); train ``summary["folds"]`` folds.
    """
    started = time.perf_counter()
    paths = NnunetPaths.for_project(project)
    had_plans = paths.plans_file.is_file()
    plan(project, replan=replan, num_processes=num_processes, progress=progress)
    planned = time.perf_counter()
    result = preprocess(project, configuration, num_processes=num_processes, progress=progress)
    table = annotated_classes(project, read_manifest(paths))
    splits = make_splits(table, folds, project.settings.seed if seed is None else seed)
    problems = check_splits(splits, table)
    if not paths.splits_file.is_file() or read_json(paths.splits_file) != splits:
        write_splits(paths.splits_file, splits)
    summary = {
        "configuration": configuration,
        "planned": not had_plans or replan,
        "plan_seconds": round(planned - started, 3),
        "preprocessing": result.to_json(),
        "cases": len(table),
        "folds": len(splits),
        "split_notes": problems,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if progress:
        progress({"stage": "prepared", **{k: summary[k] for k in ("cases", "folds", "seconds")}})
    return summary
