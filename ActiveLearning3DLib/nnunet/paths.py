"""Where nnU-Net's files of a project live, and the environment of the worker process that runs nnU-Net.

Layout inside a project folder (the project itself is the raw dataset)::

    nnunet/raw/Dataset001_AL3D/dataset.json     a view of the project for nnU-Net: the project's
                                                dataset.json plus a "dataset" entry that lists every
                                                pool case by relative path (no copies, no links)
    nnunet/preprocessed/Dataset001_AL3D/        fingerprint, plans, splits_final.json,
                                                al3d_manifest.json and nnUNetPlans_<config>/ data
    nnunet/results/                             default place for trained models

What nnU-Net 2.8.1 reads from the environment (found by reading its sources):
``nnunetv2.paths`` holds ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` as lazy objects that look ``os.environ`` up each time they are
used (not once at import, as older versions did). They are used by

- ``DatasetFingerprintExtractor.__init__`` / ``run`` (raw, preprocessed): we do not
  use them; :mod:`.fingerprint` takes explicit folders;
- ``ExperimentPlanner.__init__``, ``plan_experiment`` and ``save_plans`` (raw,
  preprocessed): no way around them short of re-implementing the planner, so
  :mod:`.planning` must run in a process whose environment is
  :func:`nnunet_environment` (it checks, and says so when it is not);
- ``DefaultPreprocessor.run`` (raw, preprocessed): we do not use it;
  ``run_case`` takes explicit files, and :mod:`.preprocessing` is built on it;
- ``nnUNetTrainer.__init__`` (preprocessed, results) derives its folders from them;
  our trainer pins explicit folders instead (see :mod:`.trainer`);
- ``nnUNetPredictor.initialize_from_trained_model_folder`` finds the trainer class
  by name in nnU-Net's package or in ``nnUNet_extTrainer`` folders.

Other variables read: ``nnUNet_n_proc_DA`` (augmentation processes),
``nnUNet_def_n_proc`` (pool sizes, read once at import), ``nnUNet_compile``.

Our rule: the running process's ``os.environ`` is never changed. A parent (the
job runner, Slicer) starts the worker with ``env={**os.environ,
**nnunet_environment(project)}``; everything that needs the variables runs in that
worker.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..fileio import atomic_write_json, read_json

if TYPE_CHECKING:  # pragma: no cover
    from ..project import Project
    from .profiles import TrainingProfile

DATASET_NAME = "Dataset001_AL3D"
PLANS_NAME = "nnUNetPlans"
WORK_DIR = "nnunet"
MANIFEST = "al3d_manifest.json"
SPLITS_FILE = "splits_final.json"
ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class EnvironmentMismatch(RuntimeError):
    """nnU-Net code that reads the environment was called in a process started without the project's environment."""


@dataclass(frozen=True)
class NnunetPaths:
    """The nnU-Net folders of one project."""

    project: Path
    root: Path  # <project>/nnunet

    @classmethod
    def for_project(cls, project: "Project | Path | str") -> "NnunetPaths":
        path = Path(getattr(project, "path", project)).absolute()
        return cls(path, path / WORK_DIR)

    @property
    def raw_root(self) -> Path:
        return self.root / "raw"

    @property
    def raw_dataset(self) -> Path:
        return self.raw_root / DATASET_NAME

    @property
    def preprocessed_root(self) -> Path:
        return self.root / "preprocessed"

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed_root / DATASET_NAME

    @property
    def results_root(self) -> Path:
        return self.root / "results"

    @property
    def fingerprint_file(self) -> Path:
        return self.preprocessed_dataset / "dataset_fingerprint.json"

    @property
    def plans_file(self) -> Path:
        return self.preprocessed_dataset / f"{PLANS_NAME}.json"

    @property
    def manifest_file(self) -> Path:
        return self.preprocessed_dataset / MANIFEST

    @property
    def splits_file(self) -> Path:
        return self.preprocessed_dataset / SPLITS_FILE

    def data_folder(self, data_identifier: str) -> Path:
        return self.preprocessed_dataset / data_identifier

    def environment(self) -> dict[str, str]:
        return {
            "nnUNet_raw": str(self.raw_root),
            "nnUNet_preprocessed": str(self.preprocessed_root),
            "nnUNet_results": str(self.results_root),
        }


def nnunet_environment(project: "Project | Path | str", profile: "TrainingProfile | None" = None) -> dict[str, str]:
    """The variables to add to a worker's environment (``env={**os.environ, **nnunet_environment(p)}``).

    With a profile it also fixes the number of augmentation processes
    (``nnUNet_n_proc_DA``) and torch.compile (``nnUNet_compile``) for nnU-Net
    code paths we do not override. ``nnUNet_n_proc_DA`` is at least 1: nnU-Net's
    planner passes it to ``torch.set_num_threads``, which refuses 0 (our trainer
    takes a profile's 0, augmentation in the training process, from the profile). ``nnUNet_def_n_proc`` bounds the process
    pools nnU-Net creates on its own (8 by default, too many for a laptop).
    ``nnUNet_extTrainer`` lets nnU-Net's own tools (``nnUNetv2_predict``) find
    our trainer class by name.
    """
    env = NnunetPaths.for_project(project).environment()
    env["nnUNet_def_n_proc"] = str(max(1, min(8, os.cpu_count() or 1)))
    env["nnUNet_extTrainer"] = str(Path(__file__).resolve().parent / "ext_trainer")
    if profile is not None:
        env["nnUNet_n_proc_DA"] = str(max(1, profile.data_loader_processes()))
        if profile.compile is not None:
            env["nnUNet_compile"] = "true" if profile.compile else "false"
    return env


def check_environment(paths: NnunetPaths, keys: tuple[str, ...] = ENV_KEYS, what: str = "this nnU-Net step") -> None:
    """Raise :class:`EnvironmentMismatch` unless ``os.environ`` points nnU-Net at this project's folders."""
    expected = paths.environment()
    wrong = [k for k in keys if os.path.abspath(os.environ.get(k, "")) != os.path.abspath(expected[k]) or not os.environ.get(k)]
    if wrong:
        found = ", ".join(f"{k}={os.environ.get(k)!r}" for k in wrong)
        raise EnvironmentMismatch(
            f"{what} reads nnU-Net's folders from the environment, and this process has {found}. Run it in a worker "
            f"started with env={{**os.environ, **nnunet_environment(project)}} (e.g. `python -m "
            f"ActiveLearning3DLib.nnunet prepare {paths.project}` with that environment); this process's own "
            f"environment is never changed."
        )


def write_raw_view(paths: NnunetPaths, dataset_json: Mapping, cases: Mapping[str, tuple[list[Path], Path]]) -> Path:
    """Write ``nnunet/raw/Dataset001_AL3D/dataset.json``: the project's dataset.json plus relative file lists.

    nnU-Net's ``get_filenames_of_train_images_and_targets`` honours a ``dataset``
    entry with paths relative to the raw dataset folder, so nnU-Net sees the
    project's own files, and the view survives moving the project folder.
    """
    paths.raw_dataset.mkdir(parents=True, exist_ok=True)
    view = {k: v for k, v in dataset_json.items() if k != "dataset"}
    view["numTraining"] = len(cases)
    view["dataset"] = {
        case: {
            "images": [os.path.relpath(p, paths.raw_dataset) for p in images],
            "label": os.path.relpath(label, paths.raw_dataset),
        }
        for case, (images, label) in sorted(cases.items())
    }
    target = paths.raw_dataset / "dataset.json"
    if not target.is_file() or read_json(target) != json.loads(json.dumps(view)):
        atomic_write_json(target, view)
    return target
