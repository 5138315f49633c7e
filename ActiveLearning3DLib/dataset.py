"""Finding and validating the images (and ground truth) a project is made from.

Everything is checked before anything is written, so a bad folder gives one
error listing every file and its problem, and no half-made project.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .fileio import file_problem, nifti_has_non_finite, nifti_truncation, read_image, read_json_object, split_image_suffix

# The ignore label (highest class + 1) must fit the uint16 partial label maps.
MAX_CLASS = 65534
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(ValueError):
    """Bad input data; ``problems`` holds one 'file: problem' line each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__("invalid input data:\n  " + "\n  ".join(shown) + more)


@dataclass(frozen=True)
class GeometryTolerance:
    """How far label and channel geometry may drift from the first channel (mm and direction cosines)."""

    spacing: float = 1e-4
    origin: float = 1e-3
    direction: float = 1e-4


@dataclass
class CaseInfo:
    """What a project needs to know of a case without opening its files again."""

    case: str
    channels: list[Path]
    label: Path | None
    shape: tuple[int, int, int]  # (k, j, i) array order
    spacing: tuple[float, float, float]  # (x, y, z) as SimpleITK reports it
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    label_counts: dict[int, int] = field(default_factory=dict)  # voxels per class value

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "label_counts": {str(k): int(v) for k, v in self.label_counts.items()},
        }


def parse_case_id(file_name: str) -> tuple[str, int, str] | None:
    """(case id, channel, suffix) of an image file name, or None when it is no image."""
    parsed = split_image_suffix(file_name)
    if parsed is None or file_name.startswith("."):
        return None
    stem, suffix = parsed
    m = CHANNEL_SUFFIX.match(stem)
    if m:
        return m.group("case"), int(m.group("channel")), suffix
    return stem, 0, suffix


def _image_files(folder: Path) -> list[Path]:
    # A MetaImage header (.mhd) names its .raw data file; the .raw has no image suffix and is skipped.
    return sorted(p for p in folder.iterdir() if p.is_file() and parse_case_id(p.name))


def discover_images(folder: Path | str) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """Map case id -> channel -> file, plus problems (duplicates, gaps in channel numbers)."""
    folder = Path(folder)
    problems: list[str] = []
    if not folder.is_dir():
        raise DatasetError([f"{folder}: image folder does not exist"])
    cases: dict[str, dict[int, Path]] = {}
    for path in _image_files(folder):
        case, channel, _ = parse_case_id(path.name)  # type: ignore[misc]
        channels = cases.setdefault(case, {})
        if channel in channels:
            problems.append(f"{path}: duplicate case id {case!r} channel {channel:04d} (also {channels[channel].name})")
            continue
        channels[channel] = path
    for case, channels in cases.items():
        if sorted(channels) != list(range(len(channels))):
            problems.append(f"{folder / case}: channels {sorted(channels)} are not numbered 0000, 0001, ... without gaps")
    return cases, problems


def discover_labels(folder: Path | str) -> tuple[dict[str, Path], list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError([f"{folder}: label folder does not exist"])
    labels: dict[str, Path] = {}
    problems: list[str] = []
    for path in _image_files(folder):
        case, channel, _ = parse_case_id(path.name)  # type: ignore[misc]
        if channel != 0 and CHANNEL_SUFFIX.match(split_image_suffix(path.name)[0]):  # type: ignore[index]
            problems.append(f"{path}: a label file must not carry a channel suffix")
            continue
        if case in labels:
            problems.append(f"{path}: duplicate label for case {case!r} (also {labels[case].name})")
            continue
        labels[case] = path
    return labels, problems


def _dataset_jsons(folders: Sequence[Path | str | None]) -> Iterator[dict]:
    """The ``dataset.json`` files in or beside the data folders, nearest first."""
    for folder in folders:
        if folder is None:
            continue
        for candidate in (Path(folder) / "dataset.json", Path(folder).parent / "dataset.json"):
            if candidate.is_file():
                try:
                    data = read_json_object(candidate)
                except (OSError, ValueError) as e:
                    problem = file_problem(e)
                    raise DatasetError([f"{candidate}: unreadable dataset.json ({problem})"]) from None
                yield candidate, data


def read_class_names(*folders: Path | str | None) -> dict[int, str] | None:
    """Class names from an nnU-Net or MSD ``dataset.json`` beside the data, if there is one."""
    return find_class_names(*folders)[0]


def find_class_names(*folders: Path | str | None) -> tuple[dict[int, str] | None, Path | None]:
    """Class names from the nearest ``dataset.json`` that declares labels, and that file (errors name it)."""
    for path, data in _dataset_jsons(folders):
        labels = data.get("labels")
        if not isinstance(labels, dict):
            continue
        if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background"}
            return {int(k): str(v) for k, v in labels.items()}, path
        # nnU-Net v2: {"background": 0}; region-based entries (lists) are not supported here
        names = {int(v): str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool) and k != "ignore"}
        if names:
            return names, path
        raise DatasetError([f"{path}: 'labels' declares no class as name -> value (nnU-Net) or \"value\": name (MSD)"])
    return None, None


def read_channel_names(*folders: Path | str | None) -> dict[int, str] | None:
    for path, data in _dataset_jsons(folders):
        names = data.get("channel_names") or data.get("modality")
        if isinstance(names, dict):
            if not all(str(k).isdigit() for k in names):
                raise DatasetError([f"{path}: channel numbers {sorted(map(str, names))} must be 0, 1, ..."])
            return {int(k): str(v) for k, v in names.items()}
    return None


def _read_whole(path: Path) -> sitk.Image:
    """Read a source image, refusing a truncated NIfTI (SimpleITK would fill the missing voxels with zeros)."""
    problem = nifti_truncation(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return read_image(path)


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _geometry_problem(ref: sitk.Image, other: sitk.Image, tol: GeometryTolerance) -> str | None:
    if ref.GetSize() != other.GetSize():
        return f"size {other.GetSize()} differs from the image's {ref.GetSize()}"
    if not np.allclose(ref.GetSpacing(), other.GetSpacing(), rtol=0, atol=tol.spacing):
        return f"spacing {other.GetSpacing()} differs from the image's {ref.GetSpacing()}"
    if not np.allclose(ref.GetOrigin(), other.GetOrigin(), rtol=0, atol=tol.origin):
        return f"origin {other.GetOrigin()} differs from the image's {ref.GetOrigin()}"
    if not np.allclose(ref.GetDirection(), other.GetDirection(), rtol=0, atol=tol.direction):
        return f"direction {other.GetDirection()} differs from the image's {ref.GetDirection()}"
    return None


def _dimension_problem(image: sitk.Image) -> str | None:
    if image.GetDimension() != 3:
        return f"{image.GetDimension()}D image; ActiveLearning3D needs 3D volumes (one file per channel)"
    if image.GetNumberOfComponentsPerPixel() != 1:
        return f"{image.GetNumberOfComponentsPerPixel()} components per voxel; store each channel as its own file (_0000, _0001, ...)"
    return None


def label_array(image: sitk.Image, path: Path, classes: Iterable[int] | None) -> tuple[np.ndarray | None, str | None]:
    """The label map as an integer array, or a problem: non-integer values, undeclared classes."""
    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or nifti_has_non_finite(path):
            return None, "label map holds NaN or infinite values"
        if not np.array_equal(arr, np.round(arr)):
            bad = arr[arr != np.round(arr)]
            return None, f"label values must be integers, found {float(bad.flat[0])!r}"
    values = np.unique(arr)
    if values.size and values.min() < 0:
        return None, f"negative label value {int(values.min())}"
    if values.size and values.max() > MAX_CLASS:
        return None, (
            f"label value {int(values.max())} is above the largest supported class value {MAX_CLASS} "
            "(label maps hold class numbers 0, 1, 2, ...)"
        )
    if classes is not None:
        undeclared = sorted(set(int(v) for v in values) - set(classes))
        if undeclared:
            return None, f"label values {undeclared} are not declared classes {sorted(classes)}"
    return np.asarray(arr).astype(np.int64 if values.size and values.max() > 65535 else np.uint16), None


def validate_dataset(
    images: Path | str,
    labels: Path | str | None = None,
    classes: Mapping[int, str] | None = None,
    tolerance: GeometryTolerance = GeometryTolerance(),
    max_cases: int | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    extra_images: Mapping[str, Path] | None = None,
) -> tuple[list[CaseInfo], dict[int, str]]:
    """Read every file once and check it; returns the cases and the class names.

    Raises DatasetError listing every problem found. Classes come from ``classes``,
    else from a dataset.json beside the data, else from the label values found.
    ``extra_images`` are single-channel cases from elsewhere (DICOM series converted to NIfTI).
    """
    images = Path(images)
    cases, problems = discover_images(images)
    for case, path in (extra_images or {}).items():
        if case in cases:
            problems.append(f"{path}: case id {case!r} is also an image file in {images}")
        else:
            cases[case] = {0: Path(path)}
    label_files: dict[str, Path] = {}
    if labels is not None:
        label_files, label_problems = discover_labels(labels)
        problems += label_problems
    if not cases:
        raise DatasetError(
            problems + [f"{images}: no images found (.nii.gz, .nii, .nrrd, .mha, .mhd, DICOM series); the pool would be empty"]
        )
    case_ids = sorted(cases)
    if max_cases is not None:
        case_ids = case_ids[:max_cases]
    if labels is not None:
        for case in case_ids:
            if case not in label_files:
                problems.append(f"{cases[case][0]}: no label file for case {case!r} in {labels}")
    n_channels = {len(cases[c]) for c in case_ids}
    if len(n_channels) > 1:
        problems.append(f"{images}: cases have different numbers of channels {sorted(n_channels)}")
    declared, declared_in = (dict(classes), None) if classes is not None else find_class_names(images, labels)
    if declared is not None and sorted(declared) != list(range(len(declared))):
        problems.append(
            f"{declared_in or 'classes'}: class values {sorted(declared)} must be 0 (background), 1, 2, ... without gaps"
        )
    if declared is not None and max(declared, default=0) > MAX_CLASS:
        problems.append(f"{declared_in or 'classes'}: class value {max(declared)} is above the largest supported, {MAX_CLASS}")

    infos: list[CaseInfo] = []
    found_values: set[int] = set()
    for case in progress(case_ids):
        channel_paths = [cases[case][c] for c in sorted(cases[case])]
        try:
            ref = _read_whole(channel_paths[0])
        except ValueError as e:
            problems.append(str(e))
            continue
        problem = _dimension_problem(ref)
        if problem:
            problems.append(f"{channel_paths[0]}: {problem}")
            continue
        ok = True
        for path in channel_paths:
            img = ref if path == channel_paths[0] else None
            if img is None:
                try:
                    img = _read_whole(path)
                except ValueError as e:
                    problems.append(str(e))
                    ok = False
                    continue
                problem = _dimension_problem(img) or _geometry_problem(ref, img, tolerance)
                if problem:
                    problems.append(f"{path}: {problem} (channel 0: {channel_paths[0].name})")
                    ok = False
                    continue
            arr = sitk.GetArrayViewFromImage(img)
            # ITK reads NaN and infinity in NIfTI files as 0; nifti_has_non_finite looks at the raw voxels.
            if np.issubdtype(arr.dtype, np.floating) and (not np.all(np.isfinite(arr)) or nifti_has_non_finite(path)):
                problems.append(f"{path}: image holds NaN or infinite intensities")
                ok = False
        counts: dict[int, int] = {}
        label_path = label_files.get(case)
        if label_path is not None:
            try:
                lab = _read_whole(label_path)
            except ValueError as e:
                problems.append(str(e))
                continue
            problem = _dimension_problem(lab) or _geometry_problem(ref, lab, tolerance)
            if problem:
                problems.append(f"{label_path}: {problem} (image: {channel_paths[0].name})")
                continue
            arr, problem = label_array(lab, label_path, declared.keys() if declared else None)
            if problem:
                problems.append(
                    f"{label_path}: {problem}"
                    + (f" (classes from {declared_in})" if declared_in and "declared" in problem else "")
                )
                continue
            values, n = np.unique(arr, return_counts=True)
            counts = {int(v): int(c) for v, c in zip(values, n)}
            found_values |= set(counts)
        if not ok:
            continue
        size, spacing, origin, direction = _geometry(ref)
        infos.append(CaseInfo(case, channel_paths, label_path, tuple(reversed(size)), spacing, origin, direction, counts))  # type: ignore[arg-type]
    if problems:
        raise DatasetError(problems)
    if declared is None:
        top = max(found_values) if found_values else 1
        declared = {0: "background", **{v: f"label_{v}" for v in range(1, max(top, 1) + 1)}}
    return infos, dict(sorted(declared.items()))
