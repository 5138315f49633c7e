"""Incremental preprocessing with nnU-Net's ``DefaultPreprocessor``: only cases whose partial labels changed.

nnU-Net's ``DefaultPreprocessor.run`` deletes the output folder and redoes every
case (and reads the folders from the environment). We call its
``run_case_save`` (explicit files, no environment) for exactly the cases that
need it, and keep a manifest, ``al3d_manifest.json`` beside the plans::

    {"labels": {case: {"hash": sha256 of the label file, "annotated_voxels": n,
                       "class_voxels": {"0": n0, "1": n1, ...}}},          every pool case
     "preprocessed": {configuration: {"plans_key": ..., "data_identifier": ...,
                                      "cases": {case: label hash it was made from}}}}

A case is preprocessed again when its label file's hash differs from the one
its files were made from, when the plans it was made with changed
(``plans_key``: a hash of the configuration, transposition, intensity
properties and labels), or when one of its files is missing. Cases without any
annotated voxel are not training data and are not preprocessed (their files are
removed if they had some). Each case is written to a staging folder and moved
into place, then recorded in the manifest, so a crash leaves either the old
files or the new ones and at worst redoes a case.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..fileio import atomic_write_json, read_json
from ..project import Project
from .paths import NnunetPaths
from .planning import load_plans, project_dataset_json

Progress = Callable[[dict], None]
CASE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")
MANIFEST_VERSION = 1


@dataclass
class LabelState:
    """What a partial label file holds: its hash and how many voxels of each class are annotated."""

    hash: str
    annotated_voxels: int
    class_voxels: dict[int, int]

    def to_json(self) -> dict:
        return {
            "hash": self.hash,
            "annotated_voxels": self.annotated_voxels,
            "class_voxels": {str(k): v for k, v in self.class_voxels.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "LabelState":
        return cls(str(d["hash"]), int(d["annotated_voxels"]), {int(k): int(v) for k, v in d["class_voxels"].items()})

    @property
    def classes(self) -> set[int]:
        return {c for c, n in self.class_voxels.items() if n > 0}


@dataclass
class PreprocessResult:
    configuration: str
    data_folder: Path
    processed: list[str] = field(default_factory=list)  # preprocessed in this run
    unchanged: list[str] = field(default_factory=list)  # kept from an earlier run
    removed: list[str] = field(default_factory=list)  # no longer annotated, files deleted
    seconds: float = 0.0

    @property
    def cases(self) -> list[str]:
        return sorted(self.processed + self.unchanged)

    def to_json(self) -> dict:
        return {
            "configuration": self.configuration,
            "data_folder": str(self.data_folder),
            "processed": self.processed,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "seconds": round(self.seconds, 3),
        }


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(paths: NnunetPaths) -> dict:
    if paths.manifest_file.is_file():
        try:
            manifest = read_json(paths.manifest_file)
            if manifest.get("version") == MANIFEST_VERSION:
                return manifest
        except ValueError:
            pass  # damaged: start again, everything is redone
    return {"version": MANIFEST_VERSION, "labels": {}, "preprocessed": {}}


def label_states(project: Project, manifest: dict | None = None) -> dict[str, LabelState]:
    """The label state of every pool case; files whose hash is in the manifest are not read again."""
    known = (manifest or {}).get("labels", {})
    states: dict[str, LabelState] = {}
    ignore = project.ignore_value
    for case in sorted(project.pool_cases):
        path = project.partial_label_path(case)
        digest = file_hash(path)
        if case in known and known[case].get("hash") == digest:
            states[case] = LabelState.from_json(known[case])
            continue
        labels = project.read_partial_labels(case)
        values, counts = np.unique(labels, return_counts=True)
        class_voxels = {int(v): int(n) for v, n in zip(values, counts) if v != ignore}
        states[case] = LabelState(digest, int(sum(class_voxels.values())), class_voxels)
    return states


def plans_key(plans: Mapping, configuration: str, dataset_json: Mapping) -> str:
    """A hash of everything in the plans that preprocessing depends on (not the trainer's batch size etc.)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = dict(PlansManager(dict(plans)).get_configuration(configuration).configuration)  # inheritance resolved
    relevant = {
        "configuration": {k: v for k, v in config.items() if k not in ("batch_size",)},
        "transpose_forward": plans.get("transpose_forward"),
        "intensity": plans.get("foreground_intensity_properties_per_channel"),
        "reader": plans.get("image_reader_writer"),
        "labels": dataset_json.get("labels"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _preprocess_case(args) -> str:
    """Run nnU-Net's preprocessing of one case into ``staging`` (module level: the spawn pool pickles it)."""
    case, images, label, staging, plans, configuration, dataset_json = args
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = DefaultPreprocessor(verbose=False)
    preprocessor.run_case_save(
        os.path.join(staging, case), [str(p) for p in images], str(label), plans_manager, configuration_manager, dataset_json
    )
    return case


def _case_files(folder: Path, case: str) -> list[Path]:
    return [folder / f"{case}{suffix}" for suffix in CASE_SUFFIXES]


def preprocess(
    project: Project,
    configuration: str = "3d_fullres",
    num_processes: int = 1,
    progress: Progress | None = None,
) -> PreprocessResult:
    """Bring ``nnunet/preprocessed/.../<data_identifier>/`` up to date with the partial labels; see the module docstring."""
    started = time.perf_counter()
    paths = NnunetPaths.for_project(project)
    plans = load_plans(project)
    if configuration not in plans["configurations"]:
        raise ValueError(f"configuration {configuration!r} is not in the plans; planned: {', '.join(plans['configurations'])}")
    dataset_json = project_dataset_json(project)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    data_folder = paths.data_folder(data_identifier)
    data_folder.mkdir(parents=True, exist_ok=True)
    key = plans_key(plans, configuration, dataset_json)

    manifest = read_manifest(paths)
    states = label_states(project, manifest)
    manifest["labels"] = {c: s.to_json() for c, s in states.items()}
    record = manifest["preprocessed"].get(configuration, {})
    if record.get("plans_key") != key or record.get("data_identifier") != data_identifier:
        record = {"plans_key": key, "data_identifier": data_identifier, "cases": {}}
    done: dict[str, str] = dict(record["cases"])
    manifest["preprocessed"][configuration] = record

    annotated = {c for c, s in states.items() if s.annotated_voxels > 0}
    result = PreprocessResult(configuration, data_folder)
    # remove what is no longer training data, or whose files came from labels we no longer have
    on_disk = {p.name[: -len(".pkl")] for p in data_folder.glob("*.pkl")}
    for case in sorted((on_disk | set(done)) - annotated):
        for f in _case_files(data_folder, case):
            f.unlink(missing_ok=True)
        done.pop(case, None)
        result.removed.append(case)
    todo = []
    for case in sorted(annotated):
        if done.get(case) == states[case].hash and all(f.is_file() for f in _case_files(data_folder, case)):
            result.unchanged.append(case)
        else:
            todo.append(case)
            done.pop(case, None)
    record["cases"] = done
    atomic_write_json(paths.manifest_file, manifest)

    if todo:
        staging = paths.preprocessed_dataset / f".staging-{configuration}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        jobs = [
            (c, project.image_paths(c), project.partial_label_path(c), str(staging), plans, configuration, dataset_json)
            for c in todo
        ]

        def finish(case: str, index: int) -> None:
            for source, target in zip(_case_files(staging, case), _case_files(data_folder, case)):
                os.replace(source, target)
            done[case] = states[case].hash
            atomic_write_json(paths.manifest_file, manifest)
            result.processed.append(case)
            if progress:
                progress({"stage": "preprocessing", "done": index + 1, "total": len(todo), "case": case})

        try:
            if num_processes > 1 and len(todo) > 2:
                with multiprocessing.get_context("spawn").Pool(min(num_processes, len(todo))) as pool:
                    for i, case in enumerate(pool.imap_unordered(_preprocess_case, jobs)):
                        finish(case, i)
            else:
                for i, job in enumerate(jobs):
                    finish(_preprocess_case(job), i)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result.processed.sort()
    result.seconds = time.perf_counter() - started
    return result


def preprocessing_is_current(project: Project, configuration: str = "3d_fullres") -> tuple[bool, str]:
    """Whether the preprocessed data matches the current label files and plans; (False, why) if not."""
    paths = NnunetPaths.for_project(project)
    if not paths.plans_file.is_file():
        return False, "no plans"
    manifest = read_manifest(paths)
    record = manifest["preprocessed"].get(configuration)
    if not record:
        return False, f"configuration {configuration} was never preprocessed"
    plans = load_plans(project)
    if record.get("plans_key") != plans_key(plans, configuration, project_dataset_json(project)):
        return False, "the plans changed since preprocessing"
    states = label_states(project, manifest)
    annotated = {c: s.hash for c, s in states.items() if s.annotated_voxels > 0}
    if annotated != record["cases"]:
        changed = sorted(set(annotated.items()) ^ set(record["cases"].items()))
        return False, f"labels changed since preprocessing ({len({c for c, _ in changed})} cases)"
    return True, "current"


def training_data_key(project: Project, configuration: str = "3d_fullres") -> str:
    """A hash of what a model is trained on: the plans key, each case's label hash, and the splits."""
    paths = NnunetPaths.for_project(project)
    record = read_manifest(paths)["preprocessed"].get(configuration, {})
    splits = read_json(paths.splits_file) if paths.splits_file.is_file() else None
    blob = json.dumps({"plans_key": record.get("plans_key"), "cases": record.get("cases"), "splits": splits}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def annotated_classes(project: Project, manifest: dict | None = None) -> dict[str, set[int]]:
    """Annotated cases and the classes annotated in each (background included), for the splits."""
    states = label_states(project, manifest if manifest is not None else read_manifest(NnunetPaths.for_project(project)))
    return {c: s.classes for c, s in states.items() if s.annotated_voxels > 0}
