"""The panel's other project sources: volumes loaded in the scene (real MRML storage nodes) and DICOM file lists."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

from conftest import write_image  # noqa: E402
from dicom_data import OBLIQUE, hu_volume, write_ct_series, write_secondary_capture  # noqa: E402

from ActiveLearning3DLib.gui import AnnotationController, mrml  # noqa: E402
from ActiveLearning3DLib.gui.headless import headless_slicer  # noqa: E402
from ActiveLearning3DLib.project import ProjectError  # noqa: E402

SHAPE = (10, 18, 14)


def test_project_from_scene_volumes_holds_their_voxels_and_geometry(tmp_path):
    ctx = headless_slicer()
    sources = {}
    for n, name in enumerate(["CT chest", "CT chest", "MR T1/post"]):  # two nodes with one name: ids stay unique
        array = (np.random.default_rng(n).normal(0, 50, SHAPE)).astype(np.int16)
        path = write_image(
            tmp_path / "files" / f"v{n}.nii.gz",
            array,
            spacing=(0.8, 1.1, 2.5 + n),
            origin=(10.0 * n, -4.0, 7.5),
            direction=OBLIQUE,
        )
        node = mrml.load_volume(ctx, path, name)
        sources[node.GetID()] = (path, array)
    nodes = [ctx.scene.GetNodeByID(i) for i in sources]
    nodes[1].SetName("CT chest")  # the scene made it "CT chest_1"; a user may rename it back
    c = AnnotationController.create_project_from_scene(ctx, tmp_path / "project", nodes, patch_size=(4, 6, 6), query_size=2)
    project = c.logic.project
    assert sorted(project.cases) == ["CT-chest", "CT-chest-2", "MR-T1-post"]
    for case, (path, array) in zip(["CT-chest", "CT-chest-2", "MR-T1-post"], sources.values()):
        image, source = project.read_image(case), sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
        np.testing.assert_allclose(image.GetSpacing(), source.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), source.GetDirection(), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".project")]  # staging removed


def test_a_label_map_node_is_refused_by_name_and_nothing_is_made(tmp_path):
    ctx = headless_slicer()
    path = write_image(tmp_path / "seg.nii.gz", np.zeros(SHAPE, np.uint8))
    labels = mrml.load_volume(ctx, path, "my labels", labelmap=True)
    with pytest.raises(ProjectError, match="volume 'my labels': a label map, not an image"):
        AnnotationController.create_project_from_scene(ctx, tmp_path / "project", [labels], query_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_project_from_dicom_file_lists_reads_series_as_the_cli_does(tmp_path):
    # Slicer's DICOM database keeps every file of every series in one tree; it hands out file lists per series
    store = tmp_path / "database"
    volume = hu_volume(SHAPE)
    ct = write_ct_series(store, volume, (0.7, 0.8, 2.0), (1.0, 2.0, 3.0), OBLIQUE, nested=False)
    sc = write_secondary_capture(store / "sc")
    c = AnnotationController.create_project_from_dicom_files(
        headless_slicer(),
        tmp_path / "project",
        {ct.series_uid: ct.files, sc.series_uid: sc.files},
        patch_size=(4, 6, 6),
        query_size=2,
    )
    project = c.logic.project
    [case] = project.cases
    np.testing.assert_array_equal(sitk.GetArrayFromImage(project.read_image(case)), volume)
    assert project.dicom_source(case)["SOPInstanceUIDs"] == ct.sop_uids
    assert len(project.dicom_skipped) == 1 and "secondary capture" in project.dicom_skipped[0]
    assert all(f.is_file() for f in ct.files)  # the database's files are only read

    # the panel's export: the latest predictions as DICOM SEG beside them
    with pytest.raises(ProjectError, match="no predictions yet"):
        c.export_dicom_seg()
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 4:9, 3:7] = 1
    prediction = sitk.GetImageFromArray(labels)
    prediction.CopyInformation(project.read_image(case))
    folder = project.path / "nnunet" / "results" / "loop_000" / "predictions"
    folder.mkdir(parents=True)
    sitk.WriteImage(prediction, str(folder / f"{case}.nii.gz"))
    result = c.export_dicom_seg()
    assert result.written == [folder / f"{case}.seg.dcm"]
    seg = hd.seg.segread(result.written[0])
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance(ct.sop_uids, combine_segments=True, skip_overlap_checks=True), labels
    )
    with pytest.raises(ProjectError, match="file not found"):
        AnnotationController.create_project_from_dicom_files(
            headless_slicer(), tmp_path / "p2", {"1.2.3": [tmp_path / "gone.dcm"]}, query_size=2
        )


def test_project_from_the_dicom_database_selection(tmp_path):
    if not hasattr(slicer, "dicomDatabase"):
        pytest.skip("needs the Slicer desktop: slicer.dicomDatabase (a CTK DICOM database) exists only there")
    from DICOMLib import DICOMUtils

    volume = hu_volume(SHAPE)
    ct = write_ct_series(tmp_path / "incoming", volume, (0.7, 0.8, 2.0), (1.0, 2.0, 3.0), OBLIQUE)
    with DICOMUtils.TemporaryDICOMDatabase() as database:
        DICOMUtils.importDicom(str(tmp_path / "incoming"), database)
        c = AnnotationController.create_project_from_dicom_database(
            mrml.SlicerContext.from_application(),
            tmp_path / "project",
            [ct.series_uid],
            database=database,
            patch_size=(4, 6, 6),
            query_size=2,
        )
    [case] = c.logic.project.cases
    np.testing.assert_array_equal(sitk.GetArrayFromImage(c.logic.project.read_image(case)), volume)
