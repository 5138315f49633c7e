"""The project store: an nnU-Net raw dataset plus the active-learning state, on disk.

Layout of a project folder::

    project.json          patch size, classes, seed, split, budget, case geometry
    dataset.json          nnU-Net v2 dataset description (``ignore`` = highest label)
    imagesTr/<case>_0000.nii.gz   pool images (copies; sources are never touched)
    labelsTr/<case>.nii.gz        partial label maps of the pool cases
    imagesTs/<case>_0000.nii.gz   held-out test images (only with ground truth)
    groundtruth/<case>.nii.gz     dense ground truth, read-only, for simulation and evaluation
    loops/loop_XXX.json           boxes of each loop, nnActive format plus our fields
    project.lock                  present only while a process writes a change (see ``Project.writing``)
    claims.json                   boxes open in an annotator's view (see ``ActiveLearningLogic.claim``)

Every file is written atomically; a new project is built in a temporary folder
and renamed into place, so a crash never leaves a half-made project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .boxes import Box, Shape3
from .dataset import CaseInfo, GeometryTolerance, read_channel_names, validate_dataset
from .locking import FileLock
from .fileio import (
    atomic_copy,
    atomic_write_image,
    atomic_write_json,
    read_image,
    read_json,
    make_staging_dir,
    now_iso,
    remove_stale_temporaries,
    split_image_suffix,
)
from .partial_labels import MergeResult, empty_partial_map, label_dtype, merge_box_annotation

PROJECT_FORMAT = "ActiveLearning3D project"
PROJECT_VERSION = 1
FILE_ENDING = ".nii.gz"
LOOP_FILE = re.compile(r"^loop_(\d{3,})\.json$")
LOCK_FILE = "project.lock"


class BoxState(str, Enum):
    """Where a box is in the annotation workflow.

    A ``str`` enum: the loop files hold the plain strings, and ``record.state == "annotated"`` holds either way.
    """

    PENDING = "pending"  # queried, waiting for the annotator
    ANNOTATED = "annotated"  # its labels are in the partial label map
    SKIPPED = "skipped"  # the annotator passed it over; it still blocks new boxes from overlapping it

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


BOX_STATES = tuple(s.value for s in BoxState)


class ProjectError(RuntimeError):
    """A project that cannot be created or opened, or an action it does not allow."""


class LoopConflict(ProjectError):
    """Another process wrote a loop file (or changed the boxes) while a query ran; this query's result is not saved."""

    def __init__(self, message: str, loop: int):
        super().__init__(message)
        self.loop = loop


def default_patch_size(shapes: Sequence[Sequence[int]], spacings_zyx: Sequence[Sequence[float]]) -> Shape3:
    """Default query patch: 20 voxels along the finest axis, the same physical length along the others.

    Each axis gets at least 4 voxels and at most the median image size. This gives
    nnActive's 20 x 20 x 20 for Hippocampus (1 mm isotropic) and a thin box for
    strongly anisotropic data such as ACDC (4 x 20 x 20 at 10 x 1.56 x 1.56 mm).
    """
    median_shape = np.median(np.asarray(shapes, dtype=float), axis=0)
    median_spacing = np.median(np.asarray(spacings_zyx, dtype=float), axis=0)
    length_mm = 20 * median_spacing.min()
    size = np.maximum(4, np.round(length_mm / median_spacing))
    size = np.minimum(size, np.maximum(1, np.floor(median_shape)))
    return tuple(int(s) for s in size)  # type: ignore[return-value]


@dataclass
class BudgetSettings:
    """How many boxes each loop asks for and how many loops a run has (None = decided per query)."""

    query_size: int | None = None
    total: int | None = None
    loops: int = 5


@dataclass
class ProjectSettings:
    """The settings fixed when a project is created."""

    patch_size: Shape3
    seed: int = 0
    test_fraction: float = 0.25
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    patch_size_rule: str = "given"


@dataclass
class BoxRecord:
    """One box of a loop file with its bookkeeping (score, method, state, who annotated it, when)."""

    box: Box
    loop: int
    index: int
    method: str
    score: float | None = None
    priority: float | None = None
    stratum: str | None = None
    state: BoxState = BoxState.PENDING
    annotator: str | None = None
    annotated_at: str | None = None
    seconds: float | None = None
    source: str = "query"  # "query" or "annotator" (a box the annotator placed by hand)
    effort: dict | None = None  # at submit: voxels changed against the pre-fill, its Dice (prefill.box_effort)

    def __post_init__(self) -> None:
        # a state given as a string becomes the enum; an unknown one stays as read, for the loop file's error
        if not isinstance(self.state, BoxState) and self.state in BOX_STATES:
            self.state = BoxState(self.state)

    @property
    def id(self) -> str:
        return f"{self.loop:03d}-{self.index:04d}"

    @property
    def case(self) -> str:
        return self.box.case

    def to_json(self) -> dict:
        d = self.box.to_patch()
        d.update(
            loop=self.loop,
            index=self.index,
            method=self.method,
            score=self.score,
            priority=self.priority,
            stratum=self.stratum,
            state=self.state,
            annotator=self.annotator,
            annotated_at=self.annotated_at,
            seconds=self.seconds,
            source=self.source,
        )
        if self.effort is not None:
            d["effort"] = self.effort
        return d

    @classmethod
    def from_json(cls, d: Mapping, loop: int, index: int) -> "BoxRecord":
        case = str(d["file"])
        parsed = split_image_suffix(case)
        case = parsed[0] if parsed else case
        return cls(
            box=Box(case, tuple(d["coords"]), tuple(d["size"])),  # type: ignore[arg-type]
            loop=int(d.get("loop", loop)),
            index=int(d.get("index", index)),
            method=str(d.get("method", "unknown")),
            score=d.get("score"),
            priority=d.get("priority"),
            stratum=d.get("stratum"),
            state=str(d.get("state", "annotated")),
            annotator=d.get("annotator"),
            annotated_at=d.get("annotated_at"),
            seconds=d.get("seconds"),
            source=str(d.get("source", "query")),
            effort=dict(d["effort"]) if isinstance(d.get("effort"), Mapping) else None,
        )

    def __repr__(self) -> str:
        score = "" if self.score is None else f" score={self.score:.4g}"
        return f"<Box {self.id} {self.case} at {list(self.box.coords)} size {list(self.box.size)} {self.state}{score}>"


@dataclass
class LoopFile:
    """The boxes added in one loop (the nnActive ``patches`` list plus our fields)."""

    loop: int
    method: str
    seed: int | None
    created: str
    boxes: list[BoxRecord]
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "loop": self.loop,
            "method": self.method,
            "seed": self.seed,
            "created": self.created,
            "info": self.info,
            "patches": [b.to_json() for b in self.boxes],
        }

    @classmethod
    def from_json(cls, d: Mapping, loop: int) -> "LoopFile":
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a JSON object, found {type(d).__name__}")
        patches = d.get("patches")
        if not isinstance(patches, list):
            raise ValueError("no 'patches' list")
        boxes = [BoxRecord.from_json(p, loop, i) for i, p in enumerate(patches)]
        return cls(
            loop, str(d.get("method", "unknown")), d.get("seed"), str(d.get("created", "")), boxes, dict(d.get("info", {}))
        )

    def count(self, state: BoxState | str) -> int:
        return sum(1 for b in self.boxes if b.state == state)


@dataclass
class CaseRecord:
    case: str
    split: str  # "pool" or "test"
    shape: Shape3
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    label_counts: dict[int, int]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing))  # type: ignore[return-value]


class Project:
    """An active-learning project folder. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self._meta = meta
        self.classes: dict[int, str] = {int(k): v for k, v in meta["classes"].items()}
        self.ignore_value: int = int(meta["ignore_value"])
        self.channels: dict[int, str] = {int(k): v for k, v in meta["channels"].items()}
        budget = BudgetSettings(**meta.get("budget", {}))
        self.settings = ProjectSettings(
            tuple(meta["patch_size"]),
            int(meta["seed"]),
            float(meta["test_fraction"]),
            budget,
            meta.get("patch_size_rule", "given"),
        )
        self.cases: dict[str, CaseRecord] = {
            c: CaseRecord(
                c,
                v["split"],
                tuple(v["shape"]),
                tuple(v["spacing"]),
                tuple(v["origin"]),
                tuple(v["direction"]),
                {int(k): int(n) for k, n in v.get("label_counts", {}).items()},
            )
            for c, v in meta["cases"].items()
        }
        self.has_ground_truth: bool = bool(meta["has_ground_truth"])
        self.lock = FileLock(path / LOCK_FILE, what=f"project {path}")

    def writing(self, purpose: str):
        """Hold the project lock while a change is written: ``with project.writing("submit box 000-0001"): ...``.

        Every read-modify-write of the project's state (loop files, label maps,
        claims, project.json) runs inside it, so two processes never interleave
        one; it is reentrant, so a change made of smaller changes takes it once.
        Hold it only while writing, never while waiting for a user.
        """
        return self.lock.hold(purpose)

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: Path | str,
        images: Path | str,
        labels: Path | str | None = None,
        patch_size: Sequence[int] | None = None,
        test_fraction: float = 0.25,
        seed: int = 0,
        classes: Mapping[int, str] | None = None,
        budget: BudgetSettings | None = None,
        max_cases: int | None = None,
        tolerance: GeometryTolerance = GeometryTolerance(),
        progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
        source: Mapping[str, object] | None = None,
    ) -> "Project":
        """Validate the data, then build the project in a temporary folder and move it into place.

        DICOM series anywhere under ``images`` become cases too (converted to
        NIfTI first, their UIDs kept in project.json, series that are no 3D
        image skipped with their reason in ``source.dicom_skipped``).
        ``source`` adds to what project.json records of the input (e.g. a DICOMweb URL).
        """
        from .dicom.series import converted_dicom_input

        _check_create_arguments(patch_size, test_fraction, seed, classes, budget, max_cases)  # before any work
        path = Path(path).absolute()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ProjectError(f"{path}: exists and is not an empty folder; open it instead or choose another path")
        with converted_dicom_input(images, path, progress) as dicom:
            return cls._create(
                path,
                images,
                labels,
                patch_size,
                test_fraction,
                seed,
                classes,
                budget,
                max_cases,
                tolerance,
                progress,
                dicom,
                source,
            )

    @classmethod
    def _create(
        cls,
        path: Path,
        images: Path | str,
        labels: Path | str | None,
        patch_size: Sequence[int] | None,
        test_fraction: float,
        seed: int,
        classes: Mapping[int, str] | None,
        budget: BudgetSettings | None,
        max_cases: int | None,
        tolerance: GeometryTolerance,
        progress: Callable[[Iterable, str], Iterable],
        dicom,
        source: Mapping[str, object] | None,
    ) -> "Project":
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ProjectError(f"{path}: exists and is not an empty folder; open it instead or choose another path")
        if not 0 <= test_fraction < 1:
            raise ProjectError(f"test fraction must be in [0, 1), got {test_fraction}")
        if patch_size is not None and (len(patch_size) != 3 or min(patch_size) < 1):
            raise ProjectError(f"patch size must be three positive integers (Z Y X), got {list(patch_size)}")
        infos, class_names = validate_dataset(
            images,
            labels,
            classes,
            tolerance,
            max_cases,
            progress=lambda it: progress(it, "checking data"),
            extra_images=dicom.images if dicom else None,
        )
        split = _split_cases([i.case for i in infos], test_fraction if labels is not None else 0.0, seed)
        if not any(s == "pool" for s in split.values()):
            raise ProjectError(f"{images}: the pool is empty after holding out {test_fraction:.0%} for testing")
        pool_infos = [i for i in infos if split[i.case] == "pool"]
        rule = "given"
        if patch_size is None:
            patch_size = default_patch_size([i.shape for i in pool_infos], [tuple(reversed(i.spacing)) for i in pool_infos])
            rule = "default: 20 voxels along the finest axis, same physical length along the others, 4 .. median size"
        n_channels = len(infos[0].channels)
        channel_names = read_channel_names(images, labels) or {}
        channels = {c: channel_names.get(c, f"channel_{c}") for c in range(n_channels)}
        ignore_value = max(class_names) + 1
        meta = {
            "format": PROJECT_FORMAT,
            "version": PROJECT_VERSION,
            "name": path.name,
            "created": now_iso(),
            "patch_size": [int(p) for p in patch_size],
            "patch_size_rule": rule,
            "seed": int(seed),
            "test_fraction": float(test_fraction) if labels is not None else 0.0,
            "classes": {str(k): v for k, v in class_names.items()},
            "ignore_value": ignore_value,
            "channels": {str(k): v for k, v in channels.items()},
            "file_ending": FILE_ENDING,
            "has_ground_truth": labels is not None,
            "budget": asdict(budget or BudgetSettings()),
            "source": {
                "images": str(Path(images).absolute()),
                "labels": str(Path(labels).absolute()) if labels else None,
                **({"dicom_skipped": dicom.skipped} if dicom else {}),
                **dict(source or {}),
            },
            "cases": {
                i.case: {
                    "split": split[i.case],
                    **i.to_json(),
                    **({"dicom": dicom.records[i.case]} if dicom and i.case in dicom.records else {}),
                }
                for i in infos
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(path.parent, f".{path.name}.creating-")
        try:
            _write_project_files(staging, meta, infos, split, class_names, ignore_value, progress)
            if dicom:
                from .dicom.series import write_header_files

                write_header_files(staging, dicom, [i.case for i in infos])
            if path.exists():
                path.rmdir()
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: Path | str) -> "Project":
        """Open a project; temporary files of an interrupted write are removed first."""
        path = Path(path).absolute()
        meta_path = path / "project.json"
        if not meta_path.is_file():
            raise ProjectError(f"{path}: not an ActiveLearning3D project (no project.json)")
        try:
            meta = read_json(meta_path)
        except ValueError as e:  # written atomically, so only damage from outside gets here
            raise ProjectError(f"{meta_path}: damaged project file ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != PROJECT_FORMAT:
            raise ProjectError(f"{meta_path}: not an ActiveLearning3D project file")
        if int(meta.get("version", 0)) > PROJECT_VERSION:
            raise ProjectError(f"{meta_path}: written by a newer ActiveLearning3D (format {meta['version']})")
        problem = _meta_problem(meta)  # a shared folder is untrusted: no case id may lead out of it
        if problem:
            raise ProjectError(f"{meta_path}: {problem}")
        remove_stale_temporaries(path, ("loops", "labelsTr", "evaluation"))  # never jobs/ or nnunet/: live writers
        try:
            return cls(path, meta)
        except (KeyError, ValueError, TypeError) as e:
            raise ProjectError(f"{meta_path}: damaged project file ({type(e).__name__}: {e})") from e

    # ------------------------------------------------------------------ layout
    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def patch_size(self) -> Shape3:
        return self.settings.patch_size

    @property
    def foreground_classes(self) -> list[int]:
        return [c for c in self.classes if c != 0]

    @property
    def pool_foreground_voxels(self) -> int:
        """Ground-truth foreground voxels of the whole pool (FG-Eff's denominator); 0 without ground truth."""
        return sum(n for c in self.pool_cases for k, n in self.cases[c].label_counts.items() if k != 0)

    def annotated_foreground(self) -> list[tuple[int, int, int]]:
        """Per loop, cumulative: (annotated boxes, annotated voxels, ground-truth foreground voxels inside them).

        The last row's third value over :attr:`pool_foreground_voxels` is FG-Eff's x.
        Each case's ground truth is read once per loop.
        """
        rows, boxes, voxels, inside = [], 0, 0, 0
        for loop in self.loops():
            by_case: dict[str, list[Box]] = {}
            for b in loop.boxes:
                if b.state == BoxState.ANNOTATED:
                    by_case.setdefault(b.case, []).append(b.box)
            for case, case_boxes in by_case.items():
                gt = self.read_ground_truth(case)
                inside += sum(int(np.count_nonzero(gt[b.slices])) for b in case_boxes)
                voxels += sum(b.voxels for b in case_boxes)
                boxes += len(case_boxes)
            rows.append((boxes, voxels, inside))
        return rows

    @property
    def pool_cases(self) -> list[str]:
        return [c for c, r in self.cases.items() if r.split == "pool"]

    @property
    def test_cases(self) -> list[str]:
        return [c for c, r in self.cases.items() if r.split == "test"]

    def image_paths(self, case: str) -> list[Path]:
        folder = "imagesTr" if self._case(case).split == "pool" else "imagesTs"
        return [self.path / folder / f"{case}_{c:04d}{FILE_ENDING}" for c in self.channels]

    def partial_label_path(self, case: str) -> Path:
        return self.path / "labelsTr" / f"{case}{FILE_ENDING}"

    def ground_truth_path(self, case: str) -> Path:
        return self.path / "groundtruth" / f"{case}{FILE_ENDING}"

    def dicom_source(self, case: str) -> dict | None:
        """The source series' UIDs of a case made from DICOM (study, series, frame of reference, instances), else None."""
        record = self._meta["cases"].get(case, {}).get("dicom")
        return dict(record) if record else None

    @property
    def dicom_skipped(self) -> list[str]:
        """The DICOM series the project was not made of, each with its reason."""
        source = self._meta.get("source", {})
        return list(source.get("dicomweb_skipped", [])) + list(source.get("dicom_skipped", []))

    def dicom_headers_path(self, case: str) -> Path:
        return self.path / "dicom" / f"{case}.json"

    @property
    def loops_dir(self) -> Path:
        return self.path / "loops"

    @property
    def jobs_dir(self) -> Path:
        """Where the project's background jobs keep their folders (every runner, the pipeline and the embeddings)."""
        return self.path / "jobs"

    def _case(self, case: str) -> CaseRecord:
        try:
            return self.cases[case]
        except KeyError:
            raise ProjectError(f"{self.path}: no case {case!r} in this project") from None

    # ------------------------------------------------------------------ arrays
    def read_image(self, case: str, channel: int = 0) -> sitk.Image:
        return read_image(self.image_paths(case)[channel])

    def read_ground_truth(self, case: str) -> np.ndarray:
        if not self.has_ground_truth:
            raise ProjectError(f"{self.path}: this project has no ground truth (created without --labels)")
        return sitk.GetArrayFromImage(read_image(self.ground_truth_path(case)))

    def read_partial_labels(self, case: str) -> np.ndarray:
        if self._case(case).split != "pool":
            raise ProjectError(f"case {case!r} is a test case; only pool cases are annotated")
        return sitk.GetArrayFromImage(read_image(self.partial_label_path(case)))

    def merge_annotation(self, box: Box, annotation: np.ndarray) -> MergeResult:
        """Merge an annotation of a box into the case's partial map and save it at once (atomically)."""
        if self._case(box.case).split != "pool":
            raise ProjectError(f"case {box.case!r} is a test case; only pool cases are annotated")
        path = self.partial_label_path(box.case)
        with self.writing(f"merge labels of {box.case}"):
            image = read_image(path)
            partial = sitk.GetArrayFromImage(image)
            result = merge_box_annotation(partial, box, annotation, len(self.classes))
            out = sitk.GetImageFromArray(partial)
            out.CopyInformation(image)
            atomic_write_image(out, path)
        return result

    # ------------------------------------------------------------------- loops
    def loop_indices(self) -> list[int]:
        if not self.loops_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.loops_dir.iterdir() if (m := LOOP_FILE.match(p.name)))

    def loop_path(self, loop: int) -> Path:
        return self.loops_dir / f"loop_{loop:03d}.json"

    def read_loop(self, loop: int) -> LoopFile:
        path = self.loop_path(loop)
        try:
            loop_file = LoopFile.from_json(read_json(path), loop)
        except (ValueError, KeyError, TypeError) as e:
            raise ProjectError(f"{path}: damaged loop file ({e})") from e
        for record in loop_file.boxes:
            if record.case not in self.cases or self.cases[record.case].split != "pool":
                raise ProjectError(f"{path}: box {record.id} names {record.case!r}, which is not a pool case")
            if not record.box.fits(self.cases[record.case].shape):
                raise ProjectError(
                    f"{path}: box {record.id} at {list(record.box.coords)} size {list(record.box.size)} lies outside "
                    f"{record.case!r} of shape {list(self.cases[record.case].shape)}"
                )
            if record.state not in BOX_STATES:
                raise ProjectError(f"{path}: box {record.id} has unknown state {record.state!r}")
        for position, record in enumerate(loop_file.boxes):
            if (record.loop, record.index) != (loop, position):
                raise ProjectError(
                    f"{path}: entry {position} says it is box {record.id}, expected "
                    f"{loop:03d}-{position:04d} (duplicate or reordered indices; each box's 'loop' "
                    f"and 'index' must match the file and its place in 'patches')"
                )
        clash = _first_overlap(loop_file.boxes)
        if clash:
            raise ProjectError(
                f"{path}: box {clash[1].id} overlaps box {clash[0].id} of {clash[0].case!r} (no box may overlap another)"
            )
        return loop_file

    def write_loop(self, loop_file: LoopFile) -> None:
        self.loops_dir.mkdir(exist_ok=True)
        atomic_write_json(self.loop_path(loop_file.loop), loop_file.to_json())

    def loops(self) -> list[LoopFile]:
        loops = [self.read_loop(t) for t in self.loop_indices()]
        clash = _first_overlap([b for loop in loops for b in loop.boxes])  # within a file: read_loop said it
        if clash:
            a, b = clash
            raise ProjectError(
                f"{self.loop_path(b.loop)}: box {b.id} overlaps box {a.id} of {a.case!r} in "
                f"{self.loop_path(a.loop).name} (no box may overlap another)"
            )
        return loops

    def all_boxes(self) -> list[BoxRecord]:
        return [b for loop in self.loops() for b in loop.boxes]

    def annotation_key(self) -> str:
        """A short fingerprint of what is annotated (box, state, time): a model belongs to one key.

        Submitting a box again changes its time and so the key: a model trained
        before is not mistaken for one of the new labels.
        """
        rows = [(b.id, b.state, b.annotated_at) for b in self.all_boxes() if b.state == BoxState.ANNOTATED]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:8]

    def update_box(self, record: BoxRecord) -> None:
        """Replace one box's record in its loop file (atomically, under the project lock)."""
        with self.writing(f"update box {record.id}"):
            loop_file = self.read_loop(record.loop)
            loop_file.boxes[record.index] = record
            self.write_loop(loop_file)

    def plan_loops(self, loops: int) -> None:
        """Change the planned number of loops, e.g. when a run is extended.

        ClaSP PE's noise schedule spans the planned loops, so a run extended
        from 1 to 5 loops must query as a 5-loop run, not as if each loop were the last.
        """
        if int(loops) < 1:
            raise ProjectError(f"{self.path}: a project needs at least 1 loop, got {loops}")
        if int(loops) == self.settings.budget.loops:
            return
        with self.writing("plan loops"):
            meta = {**read_json(self.path / "project.json")}  # as on disk now, not as opened
            meta["budget"] = {**meta.get("budget", {}), "loops": int(loops)}
            atomic_write_json(self.path / "project.json", meta)
        self._meta, self.settings.budget.loops = meta, int(loops)

    def __repr__(self) -> str:
        return (
            f"<Project {self.name!r} at {self.path}: {len(self.pool_cases)} pool / {len(self.test_cases)} test cases, "
            f"patch {list(self.patch_size)}, {len(self.loop_indices())} loops>"
        )


def case_id_problem(case: object) -> str | None:
    """Why ``case`` cannot be a case id, or None: ids name files inside the project and must not lead out of it."""
    if not isinstance(case, str) or not case:
        return f"case id {case!r} is not a non-empty string"
    if case in (".", "..") or case.startswith(".") or any(ch in case for ch in "/\\:\0") or case != case.strip():
        return (
            f"case id {case!r} is not a plain file name (no '/', '\\', ':', leading '.' or surrounding spaces); "
            "it would name a file outside the project"
        )
    return None


def _whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _meta_problem(meta: dict) -> str | None:
    """The first thing wrong with a project file's fields, or None (checked on open, as loop files are)."""
    cases = meta.get("cases")
    if not isinstance(cases, dict) or not cases:
        return "damaged project file (no 'cases' object)"
    for case, record in cases.items():
        problem = case_id_problem(case)
        if problem:
            return problem
        if not isinstance(record, dict) or record.get("split") not in ("pool", "test"):
            return f"case {case!r} has no split 'pool' or 'test'"
        shape = record.get("shape")
        if not isinstance(shape, list) or len(shape) != 3 or not all(_whole(n, 1) for n in shape):
            return f"case {case!r} has shape {shape!r}; expected three positive whole numbers"
    patch = meta.get("patch_size")
    if not isinstance(patch, list) or len(patch) != 3 or not all(_whole(n, 1) for n in patch):
        return f"patch_size {patch!r}: expected three positive whole numbers"
    if not _whole(meta.get("seed"), 0):
        return f"seed {meta.get('seed')!r}: expected a non-negative whole number"
    budget = meta.get("budget", {})
    if not isinstance(budget, dict):
        return f"budget {budget!r}: expected an object"
    if budget.get("query_size") is not None and not _whole(budget["query_size"], 1):
        return f"budget.query_size {budget['query_size']!r}: expected a whole number of at least 1"
    if "loops" in budget and not _whole(budget["loops"], 1):
        return f"budget.loops {budget['loops']!r}: expected a whole number of at least 1"
    return None


def _split_cases(cases: Sequence[str], test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded fixed split; the same cases, fraction and seed always give the same test set."""
    n_test = int(round(len(cases) * test_fraction))
    if test_fraction > 0 and len(cases) >= 2:
        n_test = max(n_test, 1)
    rng = np.random.default_rng(seed)
    test = set(rng.choice(sorted(cases), size=n_test, replace=False).tolist()) if n_test else set()
    return {c: ("test" if c in test else "pool") for c in cases}


def _check_create_arguments(patch_size, test_fraction, seed, classes, budget, max_cases) -> None:
    """Project.create's arguments, as strictly as ``al3d init`` checks its options (one error naming the argument)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise ProjectError(f"test fraction (test_fraction) must be a number in [0, 1), got {test_fraction!r}")
    if patch_size is not None and (
        isinstance(patch_size, (str, bytes))
        or len(patch_size) != 3
        or not all(_whole(int(p) if isinstance(p, np.integer) else p, 1) for p in patch_size)
    ):
        raise ProjectError(f"patch size (patch_size) must be three positive whole numbers (Z Y X), got {patch_size!r}")
    if not _whole(int(seed) if isinstance(seed, np.integer) else seed, 0):
        raise ProjectError(f"seed: must be a non-negative whole number, got {seed!r}")
    if max_cases is not None and not _whole(max_cases, 1):
        raise ProjectError(f"max_cases: must be a whole number of at least 1 (or None: all cases), got {max_cases!r}")
    if classes is not None and (
        not isinstance(classes, Mapping) or not all(_whole(k, 0) and isinstance(v, str) and v.strip() for k, v in classes.items())
    ):
        raise ProjectError(f"classes: must map class values 0, 1, ... to names, got {classes!r}")
    if budget is not None:
        if not isinstance(budget, BudgetSettings):
            raise ProjectError(f"budget: expected BudgetSettings, got {type(budget).__name__}")
        for name in ("query_size", "total"):
            value = getattr(budget, name)
            if value is not None and not _whole(value, 1):
                raise ProjectError(f"budget.{name}: must be a whole number of at least 1 (or None), got {value!r}")
        if not _whole(budget.loops, 1):
            raise ProjectError(f"budget.loops: must be a whole number of at least 1, got {budget.loops!r}")


def _first_overlap(records: Sequence[BoxRecord]) -> tuple[BoxRecord, BoxRecord] | None:
    """The first pair of boxes (earlier, later) of one case that overlap, or None."""
    by_case: dict[str, list[BoxRecord]] = {}
    for record in records:
        seen = by_case.setdefault(record.case, [])
        for other in seen:
            if other.box.overlaps(record.box):
                return other, record
        seen.append(record)
    return None


def _make_read_only(path: Path) -> None:
    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _write_project_files(
    root: Path,
    meta: dict,
    infos: Sequence[CaseInfo],
    split: Mapping[str, str],
    class_names: Mapping[int, str],
    ignore_value: int,
    progress: Callable[[Iterable, str], Iterable],
) -> None:
    for sub in ("imagesTr", "labelsTr", "loops"):
        (root / sub).mkdir()
    has_test = any(s == "test" for s in split.values())
    if has_test:
        (root / "imagesTs").mkdir()
    if meta["has_ground_truth"]:
        (root / "groundtruth").mkdir()
    dtype = label_dtype(ignore_value)
    for info in progress(infos, "creating project"):
        folder = root / ("imagesTr" if split[info.case] == "pool" else "imagesTs")
        ref = None
        for channel, source in enumerate(info.channels):
            target = folder / f"{info.case}_{channel:04d}{FILE_ENDING}"
            if source.name.lower().endswith(FILE_ENDING):
                atomic_copy(source, target)
            else:
                atomic_write_image(read_image(source), target)
        ref = read_image(info.channels[0]) if info.label is not None or split[info.case] == "pool" else None
        if split[info.case] == "pool":
            partial = sitk.GetImageFromArray(empty_partial_map(info.shape, ignore_value))
            partial.CopyInformation(ref)
            atomic_write_image(partial, root / "labelsTr" / f"{info.case}{FILE_ENDING}")
        if info.label is not None:
            gt = read_image(info.label)
            arr = np.round(sitk.GetArrayViewFromImage(gt)).astype(dtype)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(ref)  # the label's geometry equals the image's within tolerance
            gt_path = root / "groundtruth" / f"{info.case}{FILE_ENDING}"
            atomic_write_image(out, gt_path)
            _make_read_only(gt_path)
    labels = {_unique_name(name, class_names, value): value for value, name in class_names.items()}
    labels["ignore"] = ignore_value
    dataset = {
        "name": meta["name"],
        "channel_names": meta["channels"],
        "labels": labels,
        "numTraining": sum(1 for s in split.values() if s == "pool"),
        "file_ending": FILE_ENDING,
        "description": "ActiveLearning3D project: partial label maps, 'ignore' outside annotated boxes",
    }
    atomic_write_json(root / "dataset.json", dataset)
    atomic_write_json(root / "project.json", meta)  # last: its presence marks a complete project


def _unique_name(name: str, names: Mapping[int, str], value: int) -> str:
    """nnU-Net needs unique label names; make duplicates (and the reserved 'ignore') unique."""
    if name == "ignore" or list(names.values()).count(name) > 1:
        return f"{name}_{value}"
    return name
