"""Experiment planning with nnU-Net's own ``ExperimentPlanner`` on a project.

Plans are made once per project and kept for every later loop: the network,
patch size, target spacing and normalisation stay the same from loop to loop
(so loops are comparable, and preprocessing can be incremental: a case whose
labels did not change keeps its preprocessed files). ``replan=True`` makes them
again (and :mod:`.preprocessing` then redoes every case, because the plans
changed).

The fingerprint comes from :mod:`.fingerprint` (ignore voxels are not foreground;
shapes and spacings of every pool image; the planner's ``numTraining`` is the
number of pool images, the data the model will eventually be trained on).

Environment: nnU-Net's ``ExperimentPlanner`` reads ``nnUNet_raw`` and
``nnUNet_preprocessed`` in ``__init__``, ``plan_experiment`` and ``save_plans``.
So :func:`plan` must run in a worker process started with
``env={**os.environ, **nnunet_environment(project)}``; it checks and raises
:class:`~.paths.EnvironmentMismatch` otherwise. Nothing here changes ``os.environ``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..fileio import read_json
from ..project import Project
from .fingerprint import extract_fingerprint
from .paths import (  # noqa: F401 - nnunet_environment is part of this module's interface
    DATASET_NAME,
    PLANS_NAME,
    EnvironmentMismatch,
    NnunetPaths,
    check_environment,
    nnunet_environment,
    write_raw_view,
)

Progress = Callable[[dict], None]


def pool_case_files(project: Project) -> dict[str, tuple[list[Path], Path]]:
    """Every pool case: its image files (one per channel) and its partial label map."""
    return {c: (project.image_paths(c), project.partial_label_path(c)) for c in sorted(project.pool_cases)}


def project_dataset_json(project: Project) -> dict:
    return read_json(project.path / "dataset.json")


def plans_exist(project: Project | Path | str) -> bool:
    return NnunetPaths.for_project(project).plans_file.is_file()


def load_plans(project: Project | Path | str) -> dict:
    paths = NnunetPaths.for_project(project)
    if not paths.plans_file.is_file():
        raise FileNotFoundError(f"{paths.plans_file}: no nnU-Net plans yet; run planning first")
    return read_json(paths.plans_file)


def plan(
    project: Project,
    replan: bool = False,
    gpu_memory_target_gb: float = 8.0,
    num_processes: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Fingerprint and plan the project once (or again with ``replan``); returns the plans.

    Must run with the project's nnU-Net environment (see the module docstring).
    """
    paths = NnunetPaths.for_project(project)
    if paths.plans_file.is_file() and paths.fingerprint_file.is_file() and not replan:
        return read_json(paths.plans_file)
    check_environment(paths, ("nnUNet_raw", "nnUNet_preprocessed"), "nnU-Net's ExperimentPlanner")
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    started = time.perf_counter()
    cases = pool_case_files(project)
    dataset_json = project_dataset_json(project)
    write_raw_view(paths, dataset_json, cases)
    paths.preprocessed_dataset.mkdir(parents=True, exist_ok=True)
    extract_fingerprint(cases, dataset_json, project.ignore_value, paths.fingerprint_file, num_processes, progress)
    if progress:
        progress({"stage": "planning", "message": "nnU-Net experiment planning"})
    if replan and paths.plans_file.is_file():
        paths.plans_file.unlink()  # save_plans would otherwise keep configurations of the old plans
    planner = ExperimentPlanner(DATASET_NAME, gpu_memory_target_in_gb=gpu_memory_target_gb, plans_name=PLANS_NAME)
    plans = planner.plan_experiment()
    if progress:
        progress(
            {
                "stage": "planning",
                "message": f"planned in {time.perf_counter() - started:.1f} s",
                "configurations": sorted(plans["configurations"]),
            }
        )
    return read_json(paths.plans_file)
