"""Label maps of DICOM cases as DICOM SEG objects (highdicom) that reference the source series.

A SEG is written beside its NIfTI file (``<case>.nii.gz`` -> ``<case>.seg.dcm``),
one segment per foreground class named after it. The source slices' headers
come from the project's ``dicom/<case>.json`` (kept when the project was
made), so the source folder or server is not needed at export time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..fileio import read_image, read_json, replacing_file
from ..project import Project, ProjectError

SEG_SUFFIX = ".seg.dcm"
PRIVATE_SCHEME = "99AL3D"  # private coding scheme of the class names (no standard code is known for them)


@dataclass
class SegExport:
    """What an export wrote and what it left out, with the reason."""

    written: list[Path] = field(default_factory=list)
    up_to_date: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return self.written + self.up_to_date


def source_datasets(project: Project, case: str) -> list:
    """The source slices' headers (pydicom Datasets, no pixel data) in slice order."""
    from pydicom.dataset import Dataset

    path = project.dicom_headers_path(case)
    if project.dicom_source(case) is None or not path.is_file():
        raise ProjectError(f"case {case!r} was not made from a DICOM series; a DICOM SEG needs one")
    return [Dataset.from_json(d) for d in read_json(path)["instances"]]


def seg_path(label_file: Path) -> Path:
    name = label_file.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else label_file.stem
    return label_file.with_name(stem + SEG_SUFFIX)


def write_seg(
    project: Project,
    case: str,
    label_file: Path,
    target: Path | None = None,
    manual: bool = False,
    ignore_value: int | None = None,
) -> Path:
    """Write the label map ``label_file`` of ``case`` as a DICOM SEG (atomically); returns its path.

    ``manual``: the labels are an annotator's (partial annotations), else an
    algorithm's prediction. Voxels of ``ignore_value`` (not annotated) are in no segment.
    """
    try:
        import highdicom as hd
    except ImportError:  # optional inside Slicer, whose own pydicom is kept
        raise ProjectError("DICOM SEG export needs the highdicom package (pip install highdicom)") from None
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = source_datasets(project, case)
    image = read_image(label_file)
    first = sources[0]
    expected = (int(first.Columns), int(first.Rows), len(sources))
    if image.GetSize() != expected:
        raise ValueError(f"{label_file}: size {image.GetSize()} differs from the source series' {expected} of case {case!r}")
    labels = sitk.GetArrayFromImage(image).astype(np.int64)
    if ignore_value is not None:
        labels[labels == ignore_value] = 0
    foreground = {v: n for v, n in project.classes.items() if v != 0}
    unknown = sorted(set(np.unique(labels).tolist()) - set(foreground) - {0})
    if unknown:
        raise ValueError(f"{label_file}: label values {unknown} are not classes of the project {sorted(project.classes)}")
    if manual:
        algorithm_type, algorithm = hd.seg.SegmentAlgorithmTypeValues.MANUAL, None
    else:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = hd.AlgorithmIdentificationSequence(
            name="ActiveLearning3D nnU-Net ensemble", family=codes.cid7162.ArtificialIntelligence, version=__version__
        )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=hd.sr.CodedConcept(
                value=f"class-{value}", scheme_designator=PRIVATE_SCHEME, meaning=name[:64]
            ),
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
        )
        for value, name in sorted(foreground.items())
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels.astype(np.uint16 if max(foreground) > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=901 if manual else 900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ActiveLearning3D",
        manufacturer_model_name="ActiveLearning3D",
        software_versions=__version__,
        device_serial_number="none",
        series_description="AL3D partial annotations" if manual else "AL3D prediction",
        content_label="ANNOTATION" if manual else "PREDICTION",
        content_description=f"{project.name}: {'annotated boxes' if manual else 'nnU-Net prediction'} of case {case}"[:64],
        omit_empty_frames=bool(np.any(labels)),  # a SEG needs at least one frame
    )
    target = target or seg_path(label_file)
    with replacing_file(target) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return target


def latest_predictions_dir(project: Project) -> Path | None:
    """The most recently written ``predictions`` folder of the project's models, if any."""
    found = [p for p in project.path.glob("nnunet/**/predictions") if p.is_dir() and any(p.glob("*.nii.gz"))]
    return max(found, key=lambda p: max(f.stat().st_mtime for f in p.glob("*.nii.gz"))) if found else None


def export_segs(
    project: Project,
    predictions: Path | None = None,
    partial_labels: bool = False,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> SegExport:
    """SEG objects of the predictions (and of the partial annotations) of every DICOM case, beside the NIfTI files.

    A SEG newer than its NIfTI file is kept (an interrupted export goes on
    where it stopped); cases not made from DICOM are listed in ``skipped``.
    """
    result = SegExport()
    jobs: list[tuple[str, Path, bool]] = []
    if predictions is not None:
        if not predictions.is_dir():
            raise ProjectError(f"{predictions}: predictions folder does not exist")
        for path in sorted(predictions.glob("*.nii.gz")):
            jobs.append((path.name[: -len(".nii.gz")], path, False))
    if partial_labels:
        jobs += [(case, project.partial_label_path(case), True) for case in project.pool_cases]
    if not jobs:
        raise ProjectError(f"{project.path}: nothing to export (no predictions found; run the final prediction first)")
    for case, path, manual in progress(jobs):
        if case not in project.cases:
            result.skipped.append(f"{path}: no case {case!r} in the project")
            continue
        if project.dicom_source(case) is None:
            result.skipped.append(f"{path}: case {case!r} was made from an image file, not a DICOM series")
            continue
        target = seg_path(path)
        if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
            result.up_to_date.append(target)
            continue
        write_seg(project, case, path, target, manual=manual, ignore_value=project.ignore_value if manual else None)
        result.written.append(target)
    return result
