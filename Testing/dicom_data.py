"""DICOM test data written with pydicom: CT series with realistic tags, localizers, secondary captures.

A volume (k, j, i) with an ITK geometry (spacing x y z, origin, row-major direction
whose columns are the axes) becomes one file per slice k: row cosine = axis x,
column cosine = axis y, ImagePositionPatient = origin + k * spacing z * axis z.
The direction must be a rotation (determinant +1), as a DICOM stack sorted along
its normal is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from conftest import rotation
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


OBLIQUE = tuple((rotation(2, 20) @ rotation(0, 10)).ravel())


@dataclass
class WrittenSeries:
    study_uid: str
    series_uid: str
    sop_uids: list[str]  # in slice order (k ascending)
    files: list[Path]


def hu_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A CT-like volume in Hounsfield units: air, a soft-tissue ball, a bone block, noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    vol = np.full(shape, -1000, np.int16)
    centre = np.array(shape) / 2
    ball = ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) <= (min(shape) / 3) ** 2
    vol[ball] = 40
    vol[tuple(slice(s // 4, s // 4 + max(2, s // 5)) for s in shape)] = 900
    return (vol + rng.integers(-20, 21, shape)).astype(np.int16)


def _base(
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    modality: str,
    sop_class: str,
    series_number: int,
    description: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.PatientName = f"Test^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC" + patient_id[-4:]
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.StudyDescription = "CT abdomen"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = "20240315"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "ActiveLearning3D tests"
    ds.ManufacturerModelName = "pydicom writer"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def write_ct_series(
    folder: Path,
    volume: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    patient_id: str = "AL3D-0001",
    description: str = "Abdomen 2.0 mm",
    series_number: int = 3,
    study_uid: str | None = None,
    drop_slices: Sequence[int] = (),
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    nested: bool = True,
    seed: int = 0,
    name_prefix: str = "IM",
) -> WrittenSeries:
    """One file per slice of a HU volume, stored as uint16 with RescaleIntercept -1024, files named in random order."""
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    d = np.asarray(direction, float).reshape(3, 3)
    assert np.linalg.det(d) > 0, "a DICOM stack needs a rotation"
    names = list(range(volume.shape[0]))
    random.Random(seed).shuffle(names)  # file names in an order unrelated to the position
    sop_uids, files = [], []
    for k in range(volume.shape[0]):
        sop_uid = generate_uid()
        if k in drop_slices:
            continue
        ds = _base(patient_id, study_uid, series_uid, frame_uid, "CT", CTImageStorage, series_number, description)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate, ds.ContentTime = "20240315", "101600"
        ds.KVP = "120"
        ds.SliceThickness = f"{spacing[2]:.6g}"
        position = np.asarray(origin, float) + k * spacing[2] * d[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # row spacing (y), column spacing (x)
        ds.SliceLocation = f"{float(np.dot(position, d[:, 2])):.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = (volume[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        sub = folder / (f"part{k % 2}" if nested else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{name_prefix}{names[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        files.append(path)
    return WrittenSeries(study_uid, series_uid, sop_uids, files)


def write_localizer(folder: Path, patient_id: str = "AL3D-0001", study_uid: str | None = None) -> WrittenSeries:
    """A scout series: three 2D images (coronal, sagittal, axial) with ImageType ...\\LOCALIZER."""
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    orientations = [(1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 1, 0)]
    sops, files = [], []
    for n, iop in enumerate(orientations):
        ds = _base(patient_id, study_uid, series_uid, frame_uid, "CT", CTImageStorage, 1, "Topogram 0.6 T20s")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = n + 1
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [-100, -100, 100]
        ds.PixelSpacing = [1, 1]
        ds.Rows = ds.Columns = 32
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = np.full((32, 32), 1000, "<u2").tobytes()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"scout{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sops.append(ds.SOPInstanceUID)
        files.append(path)
    return WrittenSeries(study_uid, series_uid, sops, files)


def write_secondary_capture(folder: Path, patient_id: str = "AL3D-0001", study_uid: str | None = None) -> WrittenSeries:
    """A 2D secondary capture (a screenshot-like picture) without patient geometry."""
    ds = _base(
        patient_id,
        study_uid or generate_uid(),
        generate_uid(),
        generate_uid(),
        "OT",
        SECONDARY_CAPTURE,
        99,
        "Dose report screenshot",
    )
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.Rows, ds.Columns = 24, 40
    ds.PixelData = np.arange(24 * 40, dtype=np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return WrittenSeries(ds.StudyInstanceUID, ds.SeriesInstanceUID, [ds.SOPInstanceUID], [path])
