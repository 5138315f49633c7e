"""Merge semantics of partial label maps (ActiveLearning3DLib.partial_labels) and Project.merge_annotation."""

from __future__ import annotations

import numpy as np
import pytest

from ActiveLearning3DLib.boxes import Box, effective_patch_size
from ActiveLearning3DLib.partial_labels import annotated_mask, empty_partial_map, label_dtype, merge_box_annotation
from ActiveLearning3DLib.project import Project, ProjectError
from conftest import SHAPE, checksums, read_array

IGNORE = 3
N_CLASSES = 3
BOX = Box("case", (2, 3, 4), (4, 5, 6))


def painted(size=BOX.size, seed=0) -> np.ndarray:
    """A box annotation: mostly background (unpainted), some voxels 1 and 2."""
    rng = np.random.default_rng(seed)
    return rng.choice([0, 0, 1, 2], size=size).astype(np.uint8)


def outside(mask_of: Box, shape=SHAPE) -> np.ndarray:
    mask = np.ones(shape, bool)
    mask[mask_of.slices] = False
    return mask


# ---------------------------------------------------------------------------
# merge_box_annotation
# ---------------------------------------------------------------------------


def test_empty_partial_map_is_all_ignore():
    partial = empty_partial_map(SHAPE, IGNORE)
    assert partial.shape == SHAPE and partial.dtype == np.uint8
    assert np.all(partial == IGNORE)
    assert not annotated_mask(partial, IGNORE).any()
    assert label_dtype(300) == np.uint16


def test_merge_sets_exactly_the_box():
    partial = empty_partial_map(SHAPE, IGNORE)
    annotation = painted()
    result = merge_box_annotation(partial, BOX, annotation, N_CLASSES)
    np.testing.assert_array_equal(partial[2:6, 3:8, 4:10], annotation)
    assert np.all(partial[outside(BOX)] == IGNORE)
    assert np.array_equal(annotated_mask(partial, IGNORE), ~outside(BOX))
    assert result.box == BOX
    assert result.voxels == 4 * 5 * 6
    assert result.foreground_voxels == np.count_nonzero(annotation)
    assert result.dropped_outside == 0


def test_unpainted_voxels_become_background():
    partial = empty_partial_map(SHAPE, IGNORE)
    annotation = np.zeros(BOX.size, np.uint8)
    annotation[0, 0, 0] = 2
    result = merge_box_annotation(partial, BOX, annotation, N_CLASSES)
    inside = partial[BOX.slices]
    assert inside[0, 0, 0] == 2
    assert np.count_nonzero(inside == 0) == BOX.voxels - 1  # not ignore: annotated as background
    assert result.foreground_voxels == 1


def test_reannotation_replaces_the_box():
    partial = empty_partial_map(SHAPE, IGNORE)
    merge_box_annotation(partial, BOX, np.full(BOX.size, 2, np.uint8), N_CLASSES)
    second = painted(seed=5)
    merge_box_annotation(partial, BOX, second, N_CLASSES)
    np.testing.assert_array_equal(partial[BOX.slices], second)
    assert np.all(partial[outside(BOX)] == IGNORE)


def test_merge_leaves_earlier_boxes_alone():
    partial = empty_partial_map(SHAPE, IGNORE)
    first = painted(seed=1)
    merge_box_annotation(partial, BOX, first, N_CLASSES)
    other = Box("case", (7, 9, 0), (4, 5, 4))
    before = partial.copy()
    merge_box_annotation(partial, other, np.ones(other.size, np.uint8), N_CLASSES)
    np.testing.assert_array_equal(partial[BOX.slices], first)
    changed = partial != before
    assert np.array_equal(changed, ~outside(other))  # only the new box changed


def test_full_image_annotation_takes_the_box_and_counts_dropped_voxels():
    partial = empty_partial_map(SHAPE, IGNORE)
    full = np.zeros(SHAPE, np.uint8)
    full[BOX.slices] = painted()
    full[0, 0, 0] = 1  # painted outside the box
    full[11, 15, 13] = 2
    full[6, 3, 4] = 1  # just past the box's upper corner along k
    result = merge_box_annotation(partial, BOX, full, N_CLASSES)
    np.testing.assert_array_equal(partial[BOX.slices], full[BOX.slices])
    assert np.all(partial[outside(BOX)] == IGNORE)
    assert result.dropped_outside == 3
    assert result.foreground_voxels == np.count_nonzero(full[BOX.slices])


def test_box_covering_the_whole_image():
    shape = (6, 5, 4)
    size = effective_patch_size((20, 20, 20), shape)
    assert size == shape
    box = Box("small", (0, 0, 0), size)
    partial = empty_partial_map(shape, IGNORE)
    annotation = painted(shape)
    result = merge_box_annotation(partial, box, annotation, N_CLASSES)
    np.testing.assert_array_equal(partial, annotation)
    assert result.dropped_outside == 0 and result.voxels == 120


def test_box_covering_one_axis():
    size = effective_patch_size((4, 50, 6), SHAPE)
    assert size == (4, 16, 6)
    box = Box("case", (1, 0, 2), size)
    partial = empty_partial_map(SHAPE, IGNORE)
    merge_box_annotation(partial, box, np.zeros(size, np.uint8), N_CLASSES)
    assert np.all(partial[1:5, :, 2:8] == 0)
    assert np.all(partial[outside(box)] == IGNORE)


def test_bool_and_integral_float_annotations_are_accepted():
    partial = empty_partial_map(SHAPE, IGNORE)
    mask = painted() > 0
    merge_box_annotation(partial, BOX, mask, N_CLASSES)
    np.testing.assert_array_equal(partial[BOX.slices], mask.astype(np.uint8))
    merge_box_annotation(partial, BOX, painted(seed=2).astype(np.float32), N_CLASSES)
    np.testing.assert_array_equal(partial[BOX.slices], painted(seed=2))


@pytest.mark.parametrize(
    "annotation, words",
    [
        (np.zeros((4, 5, 5), np.uint8), ["shape (4, 5, 5)", "(4, 5, 6)"]),
        (np.zeros((12, 16, 13), np.uint8), ["shape"]),
        (np.full((4, 5, 6), 3, np.uint8), ["values", "0..2"]),
        (np.full((4, 5, 6), -1, np.int16), ["values", "0..2"]),
        (np.full((4, 5, 6), 0.5, np.float32), ["non-integer"]),
        (np.full((4, 5, 6), np.nan, np.float32), ["non-integer"]),
        (np.full(SHAPE, 7, np.uint8), ["values"]),  # a full-image annotation with a bad value inside the box
    ],
    ids=["box shape", "image shape", "value = ignore", "negative", "half", "nan", "full image bad value"],
)
def test_bad_annotation_raises_and_changes_nothing(annotation, words):
    partial = empty_partial_map(SHAPE, IGNORE)
    merge_box_annotation(partial, BOX, painted(), N_CLASSES)
    before = partial.copy()
    with pytest.raises(ValueError) as info:
        merge_box_annotation(partial, BOX, annotation, N_CLASSES)
    message = str(info.value)
    assert "'case'" in message
    for w in words:
        assert w in message
    np.testing.assert_array_equal(partial, before)


def test_box_outside_the_image_raises():
    partial = empty_partial_map(SHAPE, IGNORE)
    box = Box("case", (10, 0, 0), (4, 4, 4))
    with pytest.raises(ValueError, match="'case'.*outside"):
        merge_box_annotation(partial, box, np.zeros(box.size, np.uint8), N_CLASSES)
    assert np.all(partial == IGNORE)


# ---------------------------------------------------------------------------
# Project.merge_annotation: saved at once, sources and ground truth untouched
# ---------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, dataset) -> Project:
    return Project.create(tmp_path / "study", dataset.images, dataset.labels, patch_size=(4, 5, 6), seed=0)


def test_project_merge_is_saved_at_once(project, dataset):
    case = project.pool_cases[0]
    protected = checksums(dataset.root, project.path / "groundtruth", project.path / "imagesTr", project.path / "imagesTs")
    other_partials = {c: project.partial_label_path(c).read_bytes() for c in project.pool_cases[1:]}
    box = Box(case, (2, 3, 4), (4, 5, 6))
    annotation = painted()
    result = project.merge_annotation(box, annotation)
    assert result.foreground_voxels == np.count_nonzero(annotation)

    on_disk = read_array(project.partial_label_path(case))  # no save step, no re-open needed
    np.testing.assert_array_equal(on_disk[box.slices], annotation)
    assert np.all(on_disk[outside(box)] == project.ignore_value)

    reopened = Project.open(project.path)
    np.testing.assert_array_equal(reopened.read_partial_labels(case), on_disk)
    assert (
        checksums(dataset.root, project.path / "groundtruth", project.path / "imagesTr", project.path / "imagesTs") == protected
    )
    assert {c: project.partial_label_path(c).read_bytes() for c in project.pool_cases[1:]} == other_partials
    assert [p.name for p in project.path.rglob(".al3d-tmp-*")] == []


def test_project_merge_keeps_geometry(project):
    import SimpleITK as sitk

    case = project.pool_cases[1]
    project.merge_annotation(Box(case, (0, 0, 0), (4, 5, 6)), painted())
    partial = sitk.ReadImage(str(project.partial_label_path(case)))
    image = project.read_image(case)
    assert partial.GetSize() == image.GetSize()
    np.testing.assert_allclose(partial.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(partial.GetOrigin(), image.GetOrigin())
    assert partial.GetPixelID() == sitk.sitkUInt8


def test_project_oracle_merge_matches_ground_truth(project):
    case = project.pool_cases[0]
    gt = project.read_ground_truth(case)
    boxes = [Box(case, (0, 0, 0), (4, 5, 6)), Box(case, (8, 11, 8), (4, 5, 6))]
    for box in boxes:
        project.merge_annotation(box, gt)  # the full ground truth with the box: only the box is taken
    partial = Project.open(project.path).read_partial_labels(case)
    inside = np.zeros(SHAPE, bool)
    for box in boxes:
        inside[box.slices] = True
    np.testing.assert_array_equal(partial[inside], gt[inside])
    assert np.all(partial[~inside] == project.ignore_value)


def test_project_merge_bad_annotation_keeps_the_file(project):
    case = project.pool_cases[0]
    before = project.partial_label_path(case).read_bytes()
    with pytest.raises(ValueError, match=case):
        project.merge_annotation(Box(case, (0, 0, 0), (4, 5, 6)), np.full((4, 5, 6), 9, np.uint8))
    assert project.partial_label_path(case).read_bytes() == before


def test_project_merge_refuses_test_and_unknown_cases(project):
    with pytest.raises(ProjectError, match="test case"):
        project.merge_annotation(Box(project.test_cases[0], (0, 0, 0), (4, 5, 6)), painted())
    with pytest.raises(ProjectError, match="ghost"):
        project.merge_annotation(Box("ghost", (0, 0, 0), (4, 5, 6)), painted())
