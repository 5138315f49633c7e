"""DICOM series in (cases with the source geometry, skipped non-volumes with reasons), DICOM SEG out (highdicom)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import write_image
from dicom_data import OBLIQUE, hu_volume, write_ct_series, write_localizer, write_secondary_capture

from ActiveLearning3DLib.boxes import Box
from ActiveLearning3DLib.cli import main
from ActiveLearning3DLib.dataset import DatasetError
from ActiveLearning3DLib.dicom.seg import export_segs, write_seg
from ActiveLearning3DLib.project import Project

SPACING = (0.7, 0.8, 2.5)  # x, y, z
ORIGIN = (12.5, -40.0, 33.0)
SHAPE = (10, 24, 20)
CLASSES = {0: "background", 1: "liver", 2: "tumour"}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _assert_geometry(image: sitk.Image, spacing, origin, direction) -> None:
    # NIfTI keeps the geometry in float32: compare to that precision
    np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-6)


def test_series_becomes_a_case_with_the_voxels_and_geometry_of_the_source(tmp_path):
    volume = hu_volume(SHAPE)
    written = write_ct_series(tmp_path / "in" / "patient" / "study", volume, SPACING, ORIGIN, OBLIQUE)
    before = _digest(tmp_path / "in")
    project = Project.create(tmp_path / "project", tmp_path / "in", patch_size=(4, 8, 8))

    assert len(project.cases) == 1
    case = next(iter(project.cases))
    assert case.startswith("AL3D-0001_20240315_Abdomen-2.0-mm-3_")  # patient, study date, description-number, hash
    image = project.read_image(case)
    assert image.GetSize() == SHAPE[::-1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)  # HU after RescaleIntercept, slices in order
    _assert_geometry(image, SPACING, ORIGIN, OBLIQUE)
    record = project.cases[case]  # what project.json keeps of the geometry
    np.testing.assert_allclose(record.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(record.origin, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(record.direction, OBLIQUE, atol=1e-6)
    source = project.dicom_source(case)
    assert source["SeriesInstanceUID"] == written.series_uid
    assert source["StudyInstanceUID"] == written.study_uid
    assert source["SOPInstanceUIDs"] == written.sop_uids  # in slice order, whatever the file names
    meta = json.loads((project.path / "project.json").read_text())
    assert meta["cases"][case]["dicom"]["SeriesInstanceUID"] == written.series_uid
    headers = json.loads(project.dicom_headers_path(case).read_text())
    assert [h["00080018"]["Value"][0] for h in headers["instances"]] == written.sop_uids
    assert "7FE00010" not in headers["instances"][0]  # no pixel data kept
    assert _digest(tmp_path / "in") == before  # the sources are only read
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".project")]  # no staging folder left


def test_non_volume_series_are_skipped_with_their_reason_and_the_others_become_cases(tmp_path):
    source = tmp_path / "in"
    good = write_ct_series(source / "p1" / "ct", hu_volume(SHAPE, 1), SPACING, ORIGIN, OBLIQUE)
    write_localizer(source / "p1" / "scout", study_uid=good.study_uid)
    write_secondary_capture(source / "p1" / "screens", study_uid=good.study_uid)
    gap = write_ct_series(
        source / "p2" / "ct",
        hu_volume((8, 16, 16), 2),
        (1.0, 1.0, 2.0),
        (0, 0, 0),
        OBLIQUE,
        patient_id="AL3D-0002",
        description="Thorax",
        drop_slices=[4],
    )
    other = write_ct_series(
        source / "p3",
        hu_volume((6, 16, 16), 3),
        (0.9, 0.9, 3.0),
        (5, 5, 5),
        tuple(np.eye(3).ravel()),
        patient_id="AL3D-0003",
        description="Thorax",
        nested=False,
    )
    write_image(source / "plain_0000.nii.gz", hu_volume((6, 16, 16), 4).astype(np.float32))  # a NIfTI case beside them

    project = Project.create(tmp_path / "project", source, patch_size=(4, 8, 8))
    sources = {c: (project.dicom_source(c) or {}).get("SeriesInstanceUID") for c in project.cases}
    assert sorted(v for v in sources.values() if v) == sorted([good.series_uid, other.series_uid])
    assert sources["plain"] is None
    reasons = "\n".join(project.dicom_skipped)
    assert len(project.dicom_skipped) == 3
    assert "'Topogram 0.6 T20s'" in reasons and "localizer (scout)" in reasons
    assert "'Dose report screenshot'" in reasons and "secondary capture" in reasons
    assert f"'Thorax' ({gap.series_uid}, 7 files" in reasons
    assert "missing slice(s): gap of 4 mm between slices 4 and 5 where the others are 2 mm apart" in reasons


@pytest.mark.parametrize("n_series", [2, 6])  # 6 in one folder: more than GDCM is asked to list, pydicom groups
def test_series_with_the_same_description_in_one_folder_get_distinct_readable_ids(tmp_path, n_series):
    volumes = {}
    for n in range(n_series):
        volumes[n] = hu_volume((4, 8, 8), n)
        written = write_ct_series(
            tmp_path / "in", volumes[n], (1, 1, 1), (0, 0, n), OBLIQUE, seed=n, nested=False, name_prefix=f"S{n}-"
        )
        volumes[written.series_uid] = volumes.pop(n)
    project = Project.create(tmp_path / "project", tmp_path / "in", patch_size=(2, 4, 4))
    ids = sorted(project.cases)
    assert len(set(ids)) == n_series
    assert all(i.startswith("AL3D-0001_20240315_Abdomen-2.0-mm-3_") for i in ids)
    for case in ids:
        volume = volumes[project.dicom_source(case)["SeriesInstanceUID"]]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(project.read_image(case)), volume)


def test_a_scout_image_inside_an_image_series_is_left_out(tmp_path):
    volume = hu_volume(SHAPE)
    ct = write_ct_series(tmp_path / "in", volume, SPACING, ORIGIN, OBLIQUE)
    scout_file = write_localizer(tmp_path / "scout").files[0]
    scout = pydicom.dcmread(scout_file)
    scout.SeriesInstanceUID, scout.StudyInstanceUID = ct.series_uid, ct.study_uid  # as some scanners store it
    scout.save_as(tmp_path / "in" / "part0" / "scout.dcm")
    project = Project.create(tmp_path / "project", tmp_path / "in", patch_size=(4, 8, 8))
    [case] = project.cases
    np.testing.assert_array_equal(sitk.GetArrayFromImage(project.read_image(case)), volume)
    assert project.dicom_source(case)["SOPInstanceUIDs"] == ct.sop_uids


def test_unreadable_series_is_an_error_naming_it_and_nothing_is_made(tmp_path, capsys):
    written = write_ct_series(tmp_path / "in", hu_volume(SHAPE), SPACING, ORIGIN, OBLIQUE, description="Truncated")
    data = written.files[3].read_bytes()
    written.files[3].write_bytes(data[: len(data) - 200])  # pixel data cut short
    with pytest.raises(DatasetError) as error:
        Project.create(tmp_path / "project", tmp_path / "in")
    message = str(error.value)
    assert f"DICOM series 'Truncated' ({written.series_uid}" in message and "unreadable pixel data" in message
    assert not (tmp_path / "project").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no staging folder left behind
    # the command line says it in one line after its name
    assert main(["init", str(tmp_path / "project"), "--images", str(tmp_path / "in")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("al3d init: error: invalid input data:") and "'Truncated'" in err
    assert not (tmp_path / "project").exists()


def test_folder_with_only_non_volume_series_lists_why(tmp_path):
    write_localizer(tmp_path / "in")
    with pytest.raises(DatasetError, match=r"localizer \(scout\) images.*\n.*no 3D image series and no image files"):
        Project.create(tmp_path / "project", tmp_path / "in")
    assert not (tmp_path / "project").exists()


def _dicom_project(tmp_path: Path):
    volume = hu_volume(SHAPE)
    written = write_ct_series(tmp_path / "in", volume, SPACING, ORIGIN, OBLIQUE)
    project = Project.create(tmp_path / "project", tmp_path / "in", patch_size=(4, 8, 8), classes=CLASSES)
    return project, next(iter(project.cases)), written


def _prediction(project: Project, case: str, folder: Path) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 4:14, 3:11] = 1
    labels[7:9, 15:20, 12:18] = 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(project.read_image(case))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{case}.nii.gz"))
    return labels


def test_seg_of_a_prediction_reads_back_with_the_same_voxels_and_references_the_source(tmp_path):
    project, case, written = _dicom_project(tmp_path)
    predictions = project.path / "nnunet" / "results" / "model" / "predictions"
    labels = _prediction(project, case, predictions)

    result = export_segs(project, predictions)
    assert result.written == [predictions / f"{case}.seg.dcm"]
    seg = hd.seg.segread(result.written[0])
    assert seg.StudyInstanceUID == written.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == written.series_uid
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(written.sop_uids)
    assert seg.FrameOfReferenceUID == project.dicom_source(case)["FrameOfReferenceUID"]
    assert [(d.SegmentNumber, d.SegmentLabel) for d in seg.SegmentSequence] == [(1, "liver"), (2, "tumour")]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    back = seg.get_pixels_by_source_instance(written.sop_uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, labels)

    again = export_segs(project, predictions)  # up to date: not written again
    assert again.written == [] and again.up_to_date == result.written


def test_seg_of_partial_annotations_holds_only_the_annotated_voxels(tmp_path):
    project, case, written = _dicom_project(tmp_path)
    annotation = np.zeros((4, 8, 8), np.uint8)
    annotation[1:3, 2:6, 2:6] = 2
    project.merge_annotation(Box(case, (3, 8, 6), (4, 8, 8)), annotation)
    seg_file = write_seg(project, case, project.partial_label_path(case), manual=True, ignore_value=project.ignore_value)
    assert seg_file == project.path / "labelsTr" / f"{case}.seg.dcm"
    seg = hd.seg.segread(seg_file)
    assert seg.SegmentSequence[1].SegmentAlgorithmType == "MANUAL"
    back = seg.get_pixels_by_source_instance(written.sop_uids, combine_segments=True, skip_overlap_checks=True)
    expected = np.zeros(SHAPE, np.uint8)
    expected[3:7, 8:16, 6:14] = annotation  # background and never-annotated voxels are in no segment
    np.testing.assert_array_equal(back, expected)


def test_seg_of_a_label_map_of_another_size_is_refused(tmp_path):
    project, case, _ = _dicom_project(tmp_path)
    write_image(tmp_path / "wrong" / f"{case}.nii.gz", np.zeros((SHAPE[0] - 1, *SHAPE[1:]), np.uint8))
    with pytest.raises(ValueError, match=r"wrong/.*\.nii\.gz: size \(20, 24, 9\) differs from the source series' \(20, 24, 10\)"):
        export_segs(project, tmp_path / "wrong")
    assert not list((tmp_path / "wrong").glob("*.seg.dcm"))


def test_cli_init_prints_skipped_series_and_export_writes_seg(tmp_path, capsys):
    write_ct_series(tmp_path / "in" / "ct", hu_volume(SHAPE), SPACING, ORIGIN, OBLIQUE)
    write_secondary_capture(tmp_path / "in" / "sc")
    (tmp_path / "in" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    assert main(["init", str(tmp_path / "project"), "--images", str(tmp_path / "in"), "--patch-size", "4", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "'Dose report screenshot'" in out and "skipped, secondary capture" in out
    project = Project.open(tmp_path / "project")
    case = next(iter(project.cases))
    predictions = tmp_path / "predictions"
    labels = _prediction(project, case, predictions)
    write_image(predictions / "unknown.nii.gz", np.zeros(SHAPE, np.uint8))
    assert main(["export", str(project.path), "--predictions", str(predictions)]) == 0
    out = capsys.readouterr().out
    assert "no case 'unknown'" in out and "1 DICOM SEG objects written" in out
    seg = pydicom.dcmread(predictions / f"{case}.seg.dcm")
    assert seg.Modality == "SEG" and seg.SeriesDescription == "AL3D prediction"
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "tumour"]
    assert (
        hd.seg.Segmentation.from_dataset(seg)
        .get_pixels_by_source_instance(
            project.dicom_source(case)["SOPInstanceUIDs"], combine_segments=True, skip_overlap_checks=True
        )
        .max()
        == labels.max()
    )


def test_cli_init_needs_exactly_one_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "project")])
    assert "one of the arguments --images --dicomweb is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "project"), "--images", str(tmp_path), "--dicomweb", "http://127.0.0.1:1/dicom-web"])
    assert "argument --dicomweb: not allowed with argument --images" in capsys.readouterr().err
    assert not (tmp_path / "project").exists()
