"""The panel's controller against real MRML nodes (``slicer-core``), without the desktop application."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

from conftest import make_dataset, read_array, rotation  # noqa: E402

from ActiveLearning3DLib.gui import AnnotationController  # noqa: E402
from ActiveLearning3DLib.gui import mrml  # noqa: E402
from ActiveLearning3DLib.gui.geometry import box_ras_bounds  # noqa: E402
from ActiveLearning3DLib.gui.headless import OffscreenSliceView, headless_slicer  # noqa: E402
from ActiveLearning3DLib.jobs import Job  # noqa: E402
from ActiveLearning3DLib.project import ProjectError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "ActiveLearning3D" / "ActiveLearning3D.py"
UI_FILE = REPO / "ActiveLearning3D" / "Resources" / "UI" / "ActiveLearning3D.ui"
SHAPE = (20, 24, 22)
PATCH = (6, 8, 5)


GEOMETRIES = {
    "scaled-shifted": dict(spacing=(0.8, 1.25, 2.0), origin=(12.0, -30.0, 7.5), direction=None),
    "flipped-axis": dict(spacing=(0.7, 0.9, 1.5), origin=(-5.0, 4.0, 20.0), direction=tuple(np.diag([1.0, -1.0, 1.0]).ravel())),
    "oblique": dict(
        spacing=(1.1, 0.6, 1.7), origin=(3.0, 2.0, -8.0), direction=tuple((rotation(2, 25) @ rotation(0, 15)).ravel())
    ),
}


def _controller(tmp_path: Path, geometry: str = "scaled-shifted", query_size: int = 4) -> AnnotationController:
    data = make_dataset(tmp_path / "source", n_cases=4, shape=SHAPE, **GEOMETRIES[geometry])
    ctx = headless_slicer()
    return AnnotationController.create_project(
        ctx,
        tmp_path / "project",
        data.images,
        data.labels,
        patch_size=PATCH,
        query_size=query_size,
        test_fraction=0.25,
        class_colors={1: (0.9, 0.1, 0.1), 2: (0.1, 0.1, 0.9)},
    )


def _sitk_corner_bounds_ras(image_path: Path, box) -> np.ndarray:
    """Independent of our matrices: SimpleITK's physical points (LPS) of the box's voxel corners, in RAS."""
    image = sitk.ReadImage(str(image_path))
    lo = np.array(box.coords[::-1], float) - 0.5
    hi = lo + np.array(box.size[::-1], float)
    points = []
    for x in (lo[0], hi[0]):
        for y in (lo[1], hi[1]):
            for z in (lo[2], hi[2]):
                p = image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
                points.append((-p[0], -p[1], p[2]))
    points = np.array(points)
    return np.stack([points.min(0), points.max(0)], axis=1).ravel()


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_roi_of_a_box_has_the_ras_bounds_of_its_voxel_corners(tmp_path, geometry):
    c = _controller(tmp_path, geometry)
    row = c.table()[0]
    c.go_to_box(row.id)
    boxes = [b for b in c.logic.boxes() if b.case == row.case]
    assert set(c.box_nodes.nodes) == {b.id for b in boxes}
    image_path = c.logic.project.image_paths(row.case)[0]
    for record in boxes:
        node = c.box_nodes.nodes[record.id]
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)
        np.testing.assert_allclose(bounds, _sitk_corner_bounds_ras(image_path, record.box), atol=1e-4)
        np.testing.assert_allclose(bounds, box_ras_bounds(record.box, c.grid.ijk_to_ras), atol=1e-4)
        assert node.GetLocked()
        assert node.GetAttribute("ActiveLearning3D.id") == record.id
    # the selected box is drawn in the selection colour, the others by state
    selected = c.box_nodes.nodes[row.id].GetDisplayNode().GetColor()
    np.testing.assert_allclose(selected, mrml.SELECTED)


@pytest.mark.parametrize("geometry", ["oblique", "flipped-axis"])
def test_submit_merges_exactly_the_voxels_inside_the_box_and_resubmitting_replaces(tmp_path, geometry):
    c = _controller(tmp_path, geometry)
    project = c.logic.project
    record = c.go_to_box(c.table()[0].id)
    before = project.read_partial_labels(record.case)
    rng = np.random.default_rng(0)
    paint = rng.integers(0, 3, size=SHAPE).astype(np.uint8)  # paint everywhere, also outside the box
    for value in (1, 2):
        mrml.paint_segment(c.ctx, c.annotation, c.volume, value, paint == value, c.grid)
    np.testing.assert_array_equal(c.painted_labels(), paint)

    result = c.submit(advance=False)
    after = project.read_partial_labels(record.case)
    inside = np.zeros(SHAPE, bool)
    inside[record.box.slices] = True
    np.testing.assert_array_equal(after[inside], paint[inside])
    np.testing.assert_array_equal(after[~inside], before[~inside])  # the ignore label outside stays
    assert result.dropped_outside == int((paint[~inside] > 0).sum()) > 0
    assert str(result.dropped_outside) in result.warning
    saved = c.logic.find_box(record.id)
    assert saved.state == "annotated" and saved.annotator == "user"
    assert saved.seconds is not None and 0 <= saved.seconds < 600  # time from showing the box to submitting it
    assert c.box_nodes.nodes[record.id].GetAttribute("ActiveLearning3D.state") == "annotated"

    # going back to an annotated box shows its labels; re-submitting other paint replaces them
    c.go_to_box(record.id)
    np.testing.assert_array_equal(c.painted_labels()[inside], paint[inside])
    second = np.zeros(SHAPE, np.uint8)
    second[record.box.slices] = 2
    for value in (1, 2):
        mrml.paint_segment(c.ctx, c.annotation, c.volume, value, second == value, c.grid)
    c.submit(advance=False)
    again = project.read_partial_labels(record.case)
    assert (again[inside] == 2).all()
    np.testing.assert_array_equal(again[~inside], before[~inside])


def test_submit_goes_to_the_next_pending_box_and_skip_marks_skipped(tmp_path):
    c = _controller(tmp_path)
    first = c.go_to_box(c.table()[0].id)
    result = c.submit()
    assert result.next_box is not None and result.next_box.state == "pending"
    assert c.current.id == result.next_box.id != first.id
    following = c.skip()
    assert c.logic.find_box(result.next_box.id).state == "skipped"
    counts = c.counts()
    assert counts == {"pending": 2, "annotated": 1, "skipped": 1, "total": 4}
    assert following is not None and following.state == "pending"


def test_reopening_a_project_restores_the_table_states_and_settings(tmp_path):
    c = _controller(tmp_path)
    c.go_to_box(c.table()[0].id)
    c.submit()
    c.skip()
    c.save_settings(method="pe", profile="cpu-small", parallel=2)
    table = c.table(sort_by="score", descending=True)
    assert [r.score for r in table if r.score is not None] == sorted(
        [r.score for r in table if r.score is not None], reverse=True
    )
    again = AnnotationController.open_project(headless_slicer(), c.logic.project.path)
    assert again.table(sort_by="score", descending=True) == table
    assert again.settings.method == "pe" and again.settings.parallel == 2
    assert again.settings.class_colors["1"] == [0.9, 0.1, 0.1]
    shown = again.go_to_box(again.next_pending().id)
    for record in [b for b in again.logic.boxes() if b.case == shown.case and b.id != shown.id]:
        colour = again.box_nodes.nodes[record.id].GetDisplayNode().GetColor()
        np.testing.assert_allclose(colour, mrml.STATE_COLORS[record.state])
    with pytest.raises(ValueError, match="cannot sort"):
        again.table(sort_by="nonsense")


def test_a_box_added_at_a_clicked_point_is_centred_there_and_recorded_as_the_annotators(tmp_path):
    c = _controller(tmp_path, "oblique")
    shown = c.go_to_box(c.table()[0].id)
    voxel = (10, 3, 20)  # near an edge: the box is shifted inside the image
    ras = c.grid.ijk_to_ras @ np.array([voxel[2], voxel[1], voxel[0], 1.0])
    record = c.add_box_at(ras[:3])
    assert record.source == "annotator" and record.state == "pending" and record.case == shown.case
    assert record.box.size == PATCH and record.box.fits(SHAPE)
    assert all(lo <= v < lo + s for v, lo, s in zip(voxel, record.box.coords, record.box.size))
    assert record.box.coords[0] == voxel[0] - PATCH[0] // 2
    assert c.current.id == record.id and record.id in c.box_nodes.nodes
    assert c.table()[-1].id == record.id
    with pytest.raises(ProjectError, match="outside"):
        c.add_box_at((1e4, 1e4, 1e4))


@pytest.fixture(scope="module")
def egl():
    """Probe EGL offscreen rendering in a child process first: a missing driver fails here, it does not crash pytest."""
    import subprocess
    import sys

    probe = (
        "from vtkmodules.vtkRenderingOpenGL2 import vtkEGLRenderWindow; import vtk; w = vtkEGLRenderWindow(); "
        "w.SetOffScreenRendering(1); w.AddRenderer(vtk.vtkRenderer()); w.SetSize(8, 8); w.Render()"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"EGL offscreen rendering does not work here (libEGL + Mesa needed): {done.stderr[-500:]}"


def test_offscreen_slice_view_shows_the_box_outline_at_the_box(tmp_path, egl):
    c = _controller(tmp_path, "scaled-shifted")
    record = c.go_to_box(c.table()[0].id)
    view = OffscreenSliceView(c.ctx, size=(300, 300))  # made after the boxes: it must still find them
    try:
        c.box_nodes.select(None)  # draw it in its state colour (pending: yellow)
        frame = mrml.box_frame(record.box, c.grid.ijk_to_ras)
        view.show(c.volume, ras_offset=frame.center[2])
        pixels = view.capture()
        view.save_png(tmp_path / "view.png")
        assert (tmp_path / "view.png").stat().st_size > 1000
        colour = np.array(mrml.STATE_COLORS["pending"]) * 255
        match = np.all(np.abs(pixels.astype(float) - colour) < 40, axis=-1)
        assert match.sum() > 20, "no box outline in the picture"
        # where the box should be: its RAS bounds through the view's XY-to-RAS matrix
        ras_to_xy = np.linalg.inv(view.xy_to_ras())
        b = box_ras_bounds(record.box, c.grid.ijk_to_ras)
        corners = np.array([[x, y, frame.center[2], 1.0] for x in b[:2] for y in b[2:4]]) @ ras_to_xy.T
        x0, x1 = corners[:, 0].min(), corners[:, 0].max()
        y0, y1 = corners[:, 1].min(), corners[:, 1].max()
        rows, cols = np.nonzero(match)
        ys = pixels.shape[0] - 1 - rows  # view y runs up, image rows run down
        margin = 6
        inside = (cols >= x0 - margin) & (cols <= x1 + margin) & (ys >= y0 - margin) & (ys <= y1 + margin)
        assert inside.mean() > 0.95, f"outline pixels away from the box: {inside.mean():.2f} near it"
        # on the outline, not filling the box: its centre has no outline colour
        cx, cy = int((x0 + x1) / 2), int(pixels.shape[0] - 1 - (y0 + y1) / 2)
        assert not match[cy - 1 : cy + 2, cx - 1 : cx + 2].any()
    finally:
        view.close()


def test_uncertainty_map_becomes_the_foreground_layer(tmp_path, egl):
    c = _controller(tmp_path)
    view = OffscreenSliceView(c.ctx)
    try:
        case = c.table()[0].case
        with pytest.raises(ProjectError, match="no uncertainty map"):
            c.show_uncertainty(case)
        image = sitk.ReadImage(str(c.logic.project.image_paths(case)[0]))
        heat = sitk.GetImageFromArray(np.random.default_rng(0).random(SHAPE).astype(np.float32))
        heat.CopyInformation(image)
        target = c.logic.project.path / "nnunet" / "results" / "loop_000_x" / "uncertainty" / f"{case}.nii.gz"
        target.parent.mkdir(parents=True)
        sitk.WriteImage(heat, str(target))
        node = c.show_uncertainty(case)
        composite = view.logic.GetSliceCompositeNode()
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == c.volume.GetID()
        assert 0 < composite.GetForegroundOpacity() < 1
    finally:
        view.close()


class _RecordingRunner:
    """Starts a sleeping stand-in worker per job: the controller's wiring, not nnU-Net, is under test here."""

    def __init__(self):
        from ActiveLearning3DLib.jobs import make_runner

        self.submitted, self.cancelled, self.processes = [], [], []
        self.local = make_runner()  # judges and kills the stand-in workers by their pids, as any local job's

    def submit(self, job):
        import subprocess
        import sys

        self.submitted.append(job.name)
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(job.path)], start_new_session=True)
        self.processes.append(process)
        job.update(state="running", pid=process.pid)

    def poll(self):
        return []

    def refresh(self, job):
        return self.local.refresh(job)

    def slot_threads(self):
        return self.local.slot_threads()

    def cancel(self, job):
        self.cancelled.append(job.name)
        return self.local.cancel(job)

    def active(self):
        return []


def test_next_loop_starts_as_jobs_reports_progress_and_cancels(tmp_path):
    c = _controller(tmp_path)
    runner = _RecordingRunner()
    c.runner = runner
    with pytest.raises(ProjectError, match="pending"):
        c.start_next_loop()
    assert not c.can_start_next_loop()
    for row in c.table():
        c.go_to_box(row.id)
        mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, np.ones(SHAPE, bool), c.grid)
        c.submit(advance=False)
    assert c.can_start_next_loop()
    progress = c.start_next_loop()
    assert progress.running and progress.stage == "prepare"
    assert runner.submitted and runner.submitted[0].endswith("-prepare")
    assert progress.jobs[0]["state"] == "running"
    Job(c.logic.jobs_dir / runner.submitted[0]).update(progress=0.5, message="planning")
    (c.logic.jobs_dir / runner.submitted[0] / "log.txt").write_text("line one\nplanning the experiment\n")
    progress = c.poll()
    assert progress.jobs[0]["state"] == "running" and 0 < progress.percent < 100
    assert progress.jobs[0]["message"] == "planning"
    assert "planning the experiment" in progress.log_tail
    assert c.cancel() == runner.submitted[:1]
    assert runner.processes[0].wait(timeout=10) is not None  # the worker's process is gone
    assert Job(c.logic.jobs_dir / runner.submitted[0]).status().state == "cancelled"
    assert c.poll() is None


def test_export_model_refuses_an_unfinished_or_damaged_model_with_a_project_error(tmp_path):
    """The panel shows these as messages; the real export is tested on a trained model in test_loop_pipeline.py."""
    c = _controller(tmp_path)
    for row in c.table():
        c.go_to_box(row.id)
        c.submit(advance=False)
    with pytest.raises(ProjectError, match="no finished fold"):
        c.export_model(tmp_path / "model.zip")
    model = c.latest_model().model_folder
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    (model / "plans.json").write_text('{"plans_name": "nnUNetPlans", "configurations": {}}')
    (model / "dataset.json").write_text('{"labels": {"background": 0}}')
    with pytest.raises(ProjectError, match=r"checkpoint_final.pth: (unreadable|refused)"):
        c.export_model(tmp_path / "model.zip")
    assert not (tmp_path / "model.zip").exists() and not list(tmp_path.glob("*.zip"))


def test_headless_bootstrap_provides_the_handles_slicer_util_needs(tmp_path):
    c = _controller(tmp_path)
    ctx = headless_slicer(install_handles=True)
    assert slicer.mrmlScene is ctx.scene
    assert slicer.modules.segmentations.logic() is ctx.segmentations_logic
    volume = mrml.load_volume(ctx, c.logic.project.image_paths(c.table()[0].case)[0], "v")
    segmentation = mrml.create_annotation_segmentation(ctx, volume, {1: "a"})
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 3:9, 4:7] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, mrml.segment_id(1), volume)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, mrml.segment_id(1), volume), mask)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        mrml.load_volume(ctx, tmp_path / "missing.nii.gz", "x")


def _slicer_references(source: str) -> set[tuple[str, ...]]:
    """Attribute chains the module file uses under ``slicer.util`` and ``slicer.vtk*``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
            found.update(("util", alias.name) for alias in node.names)
        if isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "slicer":
                chain = chain[::-1]
                if chain[0] == "util" and len(chain) >= 2:
                    found.add(("util", chain[1]))
                elif chain[0].startswith("vtk"):
                    found.add((chain[0],))
    return found


def test_module_and_ui_files_parse_and_use_only_existing_slicer_api():
    source = MODULE_FILE.read_text()
    ast.parse(source)
    references = _slicer_references(source)
    assert ("util", "loadUI") in references  # the check sees the module's calls
    missing = [".".join(r) for r in references if not (hasattr(slicer.util, r[1]) if r[0] == "util" else hasattr(slicer, r[0]))]
    assert not missing, f"{MODULE_FILE.name} uses Slicer API that does not exist: {missing}"
    tree = ET.parse(UI_FILE)
    names = {w.get("name") for w in tree.iter("widget")}
    bound = set(__import__("re").findall(r"self\.ui\.(\w+)", source))
    assert bound and not bound - names, f"widgets used but not in the .ui file: {sorted(bound - names)}"


def test_the_static_check_catches_a_typo():
    assert _slicer_references(
        "from slicer.util import Mixinn\nslicer.util.arrayFromVolumee(x)\nslicer.vtkMRMLScalarVolumeNodee()"
    ) == {("util", "Mixinn"), ("util", "arrayFromVolumee"), ("vtkMRMLScalarVolumeNodee",)}
    assert not hasattr(slicer.util, "arrayFromVolumee")


def test_partial_labels_load_without_the_ignore_label(tmp_path):
    c = _controller(tmp_path)
    record = c.go_to_box(c.table()[0].id)
    paint = np.zeros(SHAPE, np.uint8)
    paint[record.box.slices] = 1
    mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, paint == 1, c.grid)
    c.submit(advance=False)
    c.go_to_box(record.id)  # labels changed: reloaded
    segmentation = c.partial_segmentation.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    assert names == {c.logic.project.classes[1]}
    on_disk = read_array(c.logic.project.partial_label_path(record.case))
    assert set(np.unique(on_disk)) == {1, c.logic.project.ignore_value}


def test_a_label_free_start_trains_the_autoencoder_as_a_job_and_queries_when_it_is_done(tmp_path):
    from ActiveLearning3DLib.embeddings import AutoencoderSettings
    from ActiveLearning3DLib.embeddings.store import embeddings_dir

    data = make_dataset(tmp_path / "source", n_cases=4, shape=SHAPE)
    c = AnnotationController.create_project(
        headless_slicer(),
        tmp_path / "project",
        data.images,
        None,
        patch_size=PATCH,
        query_size=3,
        start_method="cluster",
        runner=_RecordingRunner(),
    )
    assert c.busy and c.table() == []  # nothing queried yet: the embedding job runs
    progress = c.poll()
    assert progress.stage == "embeddings" and progress.running
    assert c.cancel() and not c.busy
    # once the embeddings exist (made here in-process), the start completes without a job
    from ActiveLearning3DLib.embeddings.autoencoder import build_autoencoder, embed_pool, zscore
    import SimpleITK as sitk

    settings = AutoencoderSettings(seed=c.logic.project.settings.seed)
    project = c.logic.project
    data = {k: zscore(sitk.GetArrayFromImage(project.read_image(k))) for k in project.pool_cases}
    arrays = embed_pool(build_autoencoder(settings.width).eval(), data, project.patch_size, None)
    folder = embeddings_dir(project, settings)
    folder.mkdir(parents=True)
    np.savez(folder / "embeddings.npz", **arrays)
    assert c.begin_starting_budget("cluster", 3) is None
    assert len(c.table()) == 3 and not c.busy


def test_panel_text_fields_parse_into_classes_colours_and_patch_size():
    from ActiveLearning3DLib.gui.controller import parse_classes, parse_patch_size

    names, colors = parse_classes("1=left hippocampus #ff8000, 2 = posterior")
    assert names == {0: "background", 1: "left hippocampus", 2: "posterior"}
    assert colors == {1: (1.0, 128 / 255, 0.0)}
    assert parse_classes("  ") == (None, {})
    for bad in ("liver", "1=", "x=liver", "1=liver #12345", "1=#ff0000"):
        with pytest.raises(ValueError, match="classes"):
            parse_classes(bad)
    assert parse_patch_size("20x24x20") == [20, 24, 20] == parse_patch_size("20, 24, 20")
    assert parse_patch_size("") is None
    for bad in ("20 20", "0 20 20", "a b c"):
        with pytest.raises(ValueError, match="patch size"):
            parse_patch_size(bad)


@pytest.mark.parametrize("geometry", ["oblique", "flipped-axis"])
def test_segment_editor_edits_are_masked_to_the_box(tmp_path, geometry):
    c = _controller(tmp_path, geometry)
    c.editor_node = c.ctx.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    record = c.go_to_box(c.table()[1].id)
    assert c.editor_node.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
    assert c.editor_node.GetMaskSegmentID() == mrml.BOX_SEGMENT
    assert c.editor_node.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue(mrml.BOX_SEGMENT)
    labelmap = c.ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    c.ctx.segmentations_logic.ExportSegmentsToLabelmapNode(c.annotation, ids, labelmap, c.volume)
    mask = c.grid.from_slicer(slicer.util.arrayFromVolume(labelmap)) > 0
    expected = np.zeros(SHAPE, bool)
    expected[record.box.slices] = True
    np.testing.assert_array_equal(mask, expected)
    assert not c.annotation.GetDisplayNode().GetSegmentVisibility(mrml.BOX_SEGMENT)
    assert not c.painted_labels().any()  # the box region is not a class


def test_final_predictions_run_as_a_job_that_poll_follows(tmp_path):
    c = _controller(tmp_path)
    runner = _RecordingRunner()
    c.runner = runner
    for row in c.table():
        c.go_to_box(row.id)
        c.submit(advance=False)
    progress = c.predict_all_cases()
    assert progress.stage == "prediction" and progress.running and c.busy
    assert runner.submitted[-1].endswith("-predict_cases")  # started through the runner the controller polls
    job = Job(c.logic.jobs_dir / runner.submitted[-1])
    assert job.spec().kind == "nnunet_predict"
    job.update(progress=0.5, message="predicted 2 of 4")
    assert c.poll().jobs[0]["message"] == "predicted 2 of 4"
    job.update(state="done", progress=1.0)
    done = c.poll()
    assert done.state == "done" and str(c.latest_model().predictions_dir) in done.message
    assert not c.busy and c.poll() is None
    runner.processes[-1].kill()


def test_closing_a_project_removes_its_volume_boxes_and_segmentations_from_the_scene(tmp_path):
    c = _controller(tmp_path)
    for row in c.table():
        c.go_to_box(row.id)
        c.submit(advance=False)
    folder = c.latest_model().predictions_dir
    folder.mkdir(parents=True)
    case = c.table()[0].case
    sitk.WriteImage(sitk.ReadImage(str(c.logic.project.image_paths(case)[0])) > 50, str(folder / f"{case}.nii.gz"))
    c.load_predictions()
    c.load_predictions()  # loading again replaces the earlier node
    scene = c.ctx.scene
    counts = {
        cls: scene.GetNumberOfNodesByClass(cls)
        for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode")
    }
    assert counts["vtkMRMLScalarVolumeNode"] == 1 and counts["vtkMRMLMarkupsROINode"] >= 1
    assert counts["vtkMRMLSegmentationNode"] == 3  # partial labels, annotation, one prediction
    c.close()
    assert all(scene.GetNumberOfNodesByClass(cls) == 0 for cls in counts), {
        cls: scene.GetNumberOfNodesByClass(cls) for cls in counts
    }
    assert c.volume is None and c.current is None and not c.prediction_nodes
