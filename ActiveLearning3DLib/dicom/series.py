"""DICOM series as project cases: find every image series in a folder tree, check it is a 3D volume, convert it.

Discovery uses GDCM's series grouping (``sitk.ImageSeriesReader.GetGDCMSeriesIDs`` and
``GetGDCMSeriesFileNames``, one folder at a time, so any nesting works; in a folder of
many series pydicom groups them by SeriesInstanceUID instead, as GDCM rescans the folder
for each); pydicom reads the headers (no pixel data) to decide whether a series is a 3D
volume and to sort its slices by position along the slice normal. A series that is no 3D image (localizer,
secondary capture, structured report, segmentation, a single slice, missing or
unevenly spaced slices) is skipped with a one-line reason; a series that should be an
image but cannot be read is an error naming the series.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import SimpleITK as sitk

from ..dataset import DatasetError
from ..fileio import atomic_write_image, atomic_write_json, make_staging_dir, split_image_suffix

HEADER_FOLDER = "dicom"

# SOP classes that hold no volume slices (by UID prefix), with the reason a series of them is skipped.
NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture (a 2D picture), not a 3D image",
    "1.2.840.10008.5.1.4.1.1.88.": "structured report, not an image",
    "1.2.840.10008.5.1.4.1.1.66": "segmentation or registration object, not an image",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object, not an image",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state, not an image",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document, not an image",
    "1.2.840.10008.5.1.4.1.1.1": "projection radiograph (2D), not a 3D image",  # CR, DX, MG, IO
}
NON_VOLUME_MODALITIES = {
    "SR": "structured report, not an image",
    "SEG": "segmentation object, not an image",
    "RTSTRUCT": "radiotherapy structure set, not an image",
    "PR": "presentation state, not an image",
    "KO": "key object selection, not an image",
    "REG": "registration object, not an image",
    "DOC": "encapsulated document, not an image",
}
# Image SOP classes whose UIDs start like a non-volume prefix above (CT 1.2.840.10008.5.1.4.1.1.2 etc. do not).
VOLUME_SOP_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130")
# Folders with more series than this are grouped by pydicom alone (GDCM rescans the folder for each series).
GDCM_LISTING_LIMIT = 4
# Relative tolerance on the distance between neighbouring slices.
SPACING_TOLERANCE = 0.01


class DicomSeriesError(ValueError):
    """A series that should be a volume but cannot be read; the message names the series."""


@dataclass
class DicomSeries:
    """One image series: its files in slice order, their headers (without pixel data), its geometry once checked."""

    uid: str
    files: list[Path]
    headers: list[Any] = field(default_factory=list)  # pydicom Datasets, same order as files
    spacing: tuple[float, float, float] | None = None  # (x, y, z) as SimpleITK takes them
    origin: tuple[float, float, float] | None = None
    direction: tuple[float, ...] | None = None

    @property
    def first(self) -> Any:
        return self.headers[0]

    @property
    def description(self) -> str:
        """How messages name the series: its description or number, its UID, where its files are."""
        h = self.first
        what = str(h.get("SeriesDescription", "") or "").strip() or f"number {h.get('SeriesNumber', '?')}"
        folders = sorted({str(p.parent) for p in self.files})
        where = folders[0] if len(folders) == 1 else f"{os.path.commonpath(folders)} ({len(folders)} folders)"
        files = f"{len(self.files)} file{'' if len(self.files) == 1 else 's'}"
        return f"DICOM series {what!r} ({self.uid}, {files} in {where})"

    def case_id(self) -> str:
        """A readable, unique case id: patient, study date, series description or modality + number, UID hash.

        The parts are cleaned to letters, digits, '.' and '-' and joined by '_'; the
        8-character hash of the series UID keeps ids of look-alike series unique
        (and never looks like a channel suffix ``_0000``).
        """
        h = self.first
        patient = str(h.get("PatientID", "") or "").strip() or str(h.get("PatientName", "") or "").strip() or "anonymous"
        series = str(h.get("SeriesDescription", "") or "").strip() or str(h.get("Modality", "") or "series")
        number = h.get("SeriesNumber", None)
        parts = [patient, str(h.get("StudyDate", "") or ""), series + (f"-{number}" if number not in (None, "") else "")]
        clean = [re.sub(r"[^A-Za-z0-9.-]+", "-", p).strip("-.")[:32] for p in parts]
        return "_".join([p for p in clean if p] + [hashlib.sha1(self.uid.encode()).hexdigest()[:8]])

    def record(self) -> dict:
        """What project.json keeps of the source: the UIDs (study, series, frame of reference, instances in slice order)."""
        h = self.first
        return {
            "StudyInstanceUID": str(h.get("StudyInstanceUID", "")),
            "SeriesInstanceUID": self.uid,
            "FrameOfReferenceUID": str(h.get("FrameOfReferenceUID", "")),
            "SOPClassUID": str(h.get("SOPClassUID", "")),
            "Modality": str(h.get("Modality", "")),
            "SeriesDescription": str(h.get("SeriesDescription", "") or ""),
            "PatientID": str(h.get("PatientID", "") or ""),
            "SOPInstanceUIDs": [str(x.SOPInstanceUID) for x in self.headers],
        }


def _is_candidate(path: Path) -> bool:
    """Files GDCM is asked about: not hidden, not an image file of another format, not a DICOMDIR."""
    name = path.name
    return not name.startswith(".") and split_image_suffix(name) is None and name.upper() != "DICOMDIR"


def _has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_series(root: Path | str, unreadable: list[str] | None = None) -> list[DicomSeries]:
    """Every DICOM series under ``root`` (any nesting; a series may span folders), files unsorted, headers read.

    A file GDCM leaves out whose header pydicom still reads (a damaged slice)
    stays in its series, so that reading the series fails and names it rather
    than the slice silently missing. Damaged files with no readable header are
    added to ``unreadable``.
    """
    import pydicom

    root = Path(root)
    listed: list[Path] = []
    gdcm_files: set[Path] = set()
    for folder, _dirs, names in os.walk(root):
        _dirs[:] = sorted(d for d in _dirs if not d.startswith("."))
        candidates = [Path(folder) / n for n in sorted(names) if _is_candidate(Path(folder) / n)]
        if not candidates:
            continue
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        in_series: set[Path] = set()
        if len(uids) <= GDCM_LISTING_LIMIT:  # each listing scans the folder again: with many series, pydicom groups
            in_series = {Path(name) for uid in uids for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)}
        gdcm_files.update(in_series)
        listed += sorted(in_series)
        listed += [p for p in candidates if p not in in_series and (_has_dicom_marker(p) or p.suffix.lower() == ".dcm")]
    found: dict[str, DicomSeries] = {}
    for path in dict.fromkeys(listed):
        try:  # force: GDCM also reads files without the Part 10 preamble
            header = pydicom.dcmread(path, stop_before_pixels=True, force=path in gdcm_files)
        except Exception as e:  # noqa: BLE001 - whatever pydicom raises, the file is no readable DICOM
            if unreadable is not None:
                unreadable.append(f"{path}: not a readable DICOM file ({type(e).__name__}), ignored")
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if not uid:
            continue
        series = found.setdefault(uid, DicomSeries(uid, []))
        series.files.append(path)
        series.headers.append(header)
    return sorted(found.values(), key=lambda s: s.uid)


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _is_localizer(header: Any) -> bool:
    image_type = header.get("ImageType", []) or []
    return "LOCALIZER" in [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]


def volume_problem(series: DicomSeries) -> str | None:
    """Why the series is no 3D volume (the skip reason), else None; sorts the slices and sets the geometry."""
    h = series.first
    sop = str(h.get("SOPClassUID", ""))
    modality = str(h.get("Modality", "")).upper()
    if modality in NON_VOLUME_MODALITIES:
        return NON_VOLUME_MODALITIES[modality]
    if not sop.startswith(VOLUME_SOP_CLASS_PREFIXES):
        for prefix, reason in NON_VOLUME_SOP_CLASSES.items():
            if sop.startswith(prefix) and (prefix.endswith(".") or sop == prefix or sop[len(prefix)] == "."):
                return reason
    scout = [_is_localizer(x) for x in series.headers]
    if all(scout):
        return "localizer (scout) images, not a 3D volume"
    if any(scout):  # a scout stored in the image series: the volume is the rest
        series.files = [f for f, s in zip(series.files, scout) if not s]
        series.headers = [h for h, s in zip(series.headers, scout) if not s]
    if any("Rows" not in x or "Columns" not in x for x in series.headers):
        return "no pixel data"
    frames = {int(x.get("NumberOfFrames", 1) or 1) for x in series.headers}
    if frames != {1}:
        return "multi-frame (enhanced) objects are not supported yet; export the series as single-frame slices"
    if {int(x.get("SamplesPerPixel", 1) or 1) for x in series.headers} != {1}:
        return "colour images (SamplesPerPixel > 1), not a grey-scale volume"
    if len(series.headers) < 2:
        return "a single 2D image, not a 3D volume"
    if len({(int(x.Rows), int(x.Columns)) for x in series.headers}) > 1:
        return "slices of different sizes (rows x columns)"
    orientations = [_floats(x.get("ImageOrientationPatient"), 6) for x in series.headers]
    positions = [_floats(x.get("ImagePositionPatient"), 3) for x in series.headers]
    pixel = [_floats(x.get("PixelSpacing"), 2) for x in series.headers]
    if any(o is None for o in orientations) or any(p is None for p in positions) or any(s is None for s in pixel):
        return "slices lack ImageOrientationPatient, ImagePositionPatient or PixelSpacing"
    if any(np.abs(o - orientations[0]).max() > 1e-4 for o in orientations):  # type: ignore[operator]
        return "slices have different orientations"
    if any(np.abs(s - pixel[0]).max() > 1e-4 for s in pixel):  # type: ignore[operator]
        return "slices have different pixel spacings"
    row, col = orientations[0][:3], orientations[0][3:]  # type: ignore[index]
    normal = np.cross(row, col)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(np.dot(row, col)) < 1e-3):
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    along = np.array([float(np.dot(p, normal)) for p in positions])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        return (
            f"{int(np.sum(gaps < 1e-3)) + 1} slices share a position (several acquisitions, echoes or time points in one series)"
        )
    in_plane = [np.asarray(positions[i]) - along[n] * normal for n, i in enumerate(order)]
    if max(np.abs(p - in_plane[0]).max() for p in in_plane) > 1e-2 * max(float(gaps.min()), 1.0):
        return "slice positions do not lie on one line along the slice normal (tilted or sheared stack)"
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() > SPACING_TOLERANCE * step:
        worst = int(np.argmax(np.abs(gaps - step)))
        ratio = gaps[worst] / step
        if abs(ratio - round(ratio)) < SPACING_TOLERANCE * 2 and round(ratio) >= 2:
            return (
                f"missing slice(s): gap of {gaps[worst]:.4g} mm between slices {worst + 1} and {worst + 2} "
                f"where the others are {step:.4g} mm apart"
            )
        return f"inconsistent slice spacing: {gaps.min():.4g} to {gaps.max():.4g} mm between neighbouring slices"
    series.files = [series.files[i] for i in order]
    series.headers = [series.headers[i] for i in order]
    dy, dx = (float(v) for v in pixel[0])  # type: ignore[union-attr]  # PixelSpacing is (row, column) spacing
    series.spacing = (dx, dy, float((along[-1] - along[0]) / (len(along) - 1)))
    series.origin = tuple(float(v) for v in positions[order[0]])  # type: ignore[union-attr,assignment]
    series.direction = tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())
    return None


def read_series(series: DicomSeries) -> sitk.Image:
    """The volume of a checked series (rescale slope and intercept applied), in the geometry of its headers."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as e:
        from ..fileio import _first_line

        raise DicomSeriesError(f"{series.description}: unreadable pixel data ({_first_line(e)})") from e
    h = series.first
    expected = (int(h.Columns), int(h.Rows), len(series.files))
    if image.GetSize() != expected:
        raise DicomSeriesError(f"{series.description}: read {image.GetSize()} voxels, the headers say {expected}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DicomSeriesError(f"{series.description}: {image.GetNumberOfComponentsPerPixel()} components per voxel")
    if image.GetPixelID() in (sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64):
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        if -32768 <= stats.GetMinimum() and stats.GetMaximum() <= 32767:  # rescaled CT: half the file size
            image = sitk.Cast(image, sitk.sitkInt16)
    image.SetSpacing(series.spacing)  # type: ignore[arg-type]
    image.SetOrigin(series.origin)  # type: ignore[arg-type]
    image.SetDirection(series.direction)  # type: ignore[arg-type]
    return image


@dataclass
class DicomInput:
    """The DICOM part of an image folder, converted: NIfTI files by case, source records, skipped series."""

    images: dict[str, Path]  # case -> converted channel-0 file
    records: dict[str, dict]  # case -> source UIDs for project.json
    headers: dict[str, list[dict]]  # case -> DICOM JSON of each slice's header (no pixel data), slice order
    skipped: list[str]  # "series: reason" lines


BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def header_json(header: Any) -> dict:
    """A slice header as DICOM JSON without pixel data or other binary elements (a SEG needs none of them)."""
    ds = header.copy()
    for element in list(ds):
        if element.VR in BINARY_VRS:
            del ds[element.tag]
    return ds.to_json_dict(suppress_invalid_tags=True)


def prepare_dicom_input(
    root: Path | str,
    work_dir: Path,
    taken: Iterable[str] = (),
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> DicomInput:
    """Convert every 3D image series under ``root`` to ``work_dir/<case>_0000.nii.gz`` (atomically).

    ``taken`` are case ids of other images in the folder: a series whose id is
    among them is an error (the two would be one case). Raises DatasetError
    listing every unreadable series.
    """
    result = DicomInput({}, {}, {}, [])
    all_series = find_series(root, result.skipped)
    usable: list[DicomSeries] = []
    for series in all_series:
        reason = volume_problem(series)
        if reason:
            result.skipped.append(f"{series.description}: skipped, {reason}")
        else:
            usable.append(series)
    taken = set(taken)
    problems = []
    by_case: dict[str, DicomSeries] = {}
    for series in usable:
        case = series.case_id()
        if case in taken or case in by_case:
            problems.append(f"{series.description}: case id {case!r} is already used by another image")
            continue
        by_case[case] = series
    if problems:
        raise DatasetError(problems)
    for case in progress(list(by_case)):
        series = by_case[case]
        try:
            image = read_series(series)
        except DicomSeriesError as e:
            problems.append(str(e))
            continue
        result.images[case] = work_dir / f"{case}_0000.nii.gz"
        atomic_write_image(image, result.images[case])
        result.records[case] = series.record()
        result.headers[case] = [header_json(h) for h in series.headers]
    if problems:
        raise DatasetError(problems)
    return result


@contextmanager
def converted_dicom_input(
    images: Path | str,
    project: Path,
    progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
) -> Iterator[DicomInput | None]:
    """The DICOM series under ``images`` converted in a staging folder beside ``project`` (None without DICOM).

    The staging folder is removed when the project is made (or fails); the
    sources are only read. Every series that is skipped has its reason in
    ``skipped``; if nothing usable remains, the error lists those reasons.
    """
    images = Path(images)
    if not images.is_dir() or not has_dicom_files(images):
        yield None
        return
    from ..dataset import discover_images

    others, _ = discover_images(images)
    project.parent.mkdir(parents=True, exist_ok=True)
    work = make_staging_dir(project.parent, f".{project.name}.dicom-")
    try:
        result = prepare_dicom_input(images, work, taken=others, progress=lambda it: progress(it, "reading DICOM series"))
        if not result.images and not others:
            raise DatasetError(result.skipped + [f"{images}: no 3D image series and no image files; the pool would be empty"])
        yield result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_header_files(project_root: Path, dicom: DicomInput, cases: Iterable[str]) -> None:
    """``dicom/<case>.json``: the slice headers a DICOM SEG of the case must reference, kept with the project."""
    folder = project_root / HEADER_FOLDER
    folder.mkdir(exist_ok=True)
    for case in cases:
        if case in dicom.headers:
            atomic_write_json(folder / f"{case}.json", {"record": dicom.records[case], "instances": dicom.headers[case]})


def has_dicom_files(root: Path | str) -> bool:
    """Whether any file under ``root`` is a DICOM Part 10 file (the 'DICM' marker at byte 128) or ends in .dcm."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not _is_candidate(path):
                continue
            if name.lower().endswith(".dcm"):
                return True
            try:
                with open(path, "rb") as f:
                    f.seek(128)
                    if f.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False
