"""The project store (ActiveLearning3DLib.project): layout, split, patch size, crash safety, loop files."""

from __future__ import annotations

import json
import os
import time
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib import fileio
from ActiveLearning3DLib import project as project_module
from ActiveLearning3DLib.boxes import Box, effective_patch_size
from ActiveLearning3DLib.fileio import TMP_PREFIX, atomic_write_image, atomic_write_json, read_json
from ActiveLearning3DLib.project import (
    BoxRecord,
    BoxState,
    LoopFile,
    Project,
    ProjectError,
    _split_cases,
    default_patch_size,
)
from conftest import SHAPE, checksums, make_dataset, read_array, synthetic_label, write_image

SPACING = (0.8, 0.9, 1.5)  # x, y, z
ORIGIN = (-10.0, 5.0, 2.5)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z


def staging_folders(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".creating-" in p.name] if parent.is_dir() else []


@pytest.fixture
def geo_dataset(tmp_path):
    """Six cases with non-trivial spacing, origin and direction."""
    return make_dataset(tmp_path / "source", n_cases=6, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)


@pytest.fixture
def project(tmp_path, dataset) -> Project:
    """A project of the four-case dataset: 3 pool cases, 1 test case, patch 4 x 5 x 6."""
    return Project.create(tmp_path / "study", dataset.images, dataset.labels, patch_size=(4, 5, 6), seed=0)


# ---------------------------------------------------------------------------
# What Project.create writes
# ---------------------------------------------------------------------------


def test_create_layout(tmp_path, geo_dataset):
    before = checksums(geo_dataset.root)
    p = Project.create(tmp_path / "study", geo_dataset.images, geo_dataset.labels, patch_size=(4, 5, 6), seed=3)
    assert p.path == (tmp_path / "study").absolute()
    assert p.classes == {0: "background", 1: "anterior", 2: "posterior"}
    assert p.ignore_value == 3
    assert p.has_ground_truth
    assert p.patch_size == (4, 5, 6)
    assert sorted(p.pool_cases + p.test_cases) == geo_dataset.cases
    assert len(p.test_cases) == 2  # round(6 * 0.25)

    for case in geo_dataset.cases:
        pool = case in p.pool_cases
        image_path = p.path / ("imagesTr" if pool else "imagesTs") / f"{case}_0000.nii.gz"
        assert image_path.is_file()
        assert p.image_paths(case) == [image_path]
        # NIfTI sources are copied byte for byte
        assert image_path.read_bytes() == geo_dataset.image_file(case).read_bytes()
        image = sitk.ReadImage(str(image_path))
        partial_path = p.path / "labelsTr" / f"{case}.nii.gz"
        assert partial_path.is_file() == pool
        if pool:
            partial = sitk.ReadImage(str(partial_path))
            assert np.all(sitk.GetArrayViewFromImage(partial) == 3)
            assert sitk.GetArrayViewFromImage(partial).shape == SHAPE
            np.testing.assert_allclose(partial.GetSpacing(), image.GetSpacing())
            np.testing.assert_allclose(partial.GetOrigin(), image.GetOrigin())
            np.testing.assert_allclose(partial.GetDirection(), image.GetDirection(), atol=1e-6)
            np.testing.assert_allclose(partial.GetSpacing(), SPACING)
            np.testing.assert_allclose(partial.GetDirection(), DIRECTION, atol=1e-6)
        # ground truth for every case, equal to the source, read-only
        gt_path = p.path / "groundtruth" / f"{case}.nii.gz"
        np.testing.assert_array_equal(read_array(gt_path), read_array(geo_dataset.label_file(case)))
        np.testing.assert_array_equal(p.read_ground_truth(case), read_array(geo_dataset.label_file(case)))
        assert gt_path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) == 0

    assert not (p.path / "labelsTr" / f"{p.test_cases[0]}.nii.gz").exists()
    assert (p.path / "loops").is_dir() and p.loop_indices() == []
    assert checksums(geo_dataset.root) == before
    assert staging_folders(tmp_path) == []


def test_label_geometry_within_tolerance_takes_the_image_geometry(tmp_path, dataset):
    label = read_array(dataset.label_file("case_000"))
    write_image(dataset.label_file("case_000"), label, origin=(2e-4, 0.0, 0.0))
    p = Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4), test_fraction=0.0)
    gt = sitk.ReadImage(str(p.ground_truth_path("case_000")))
    assert gt.GetOrigin() == p.read_image("case_000").GetOrigin() == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(gt), label)


def test_dataset_json(project, dataset):
    ds = read_json(project.path / "dataset.json")
    assert ds["channel_names"] == {"0": "MOD0"}
    assert ds["labels"] == {"background": 0, "anterior": 1, "posterior": 2, "ignore": 3}
    assert ds["labels"]["ignore"] == max(ds["labels"].values())
    assert ds["file_ending"] == ".nii.gz"
    assert ds["numTraining"] == len(project.pool_cases) == 3
    meta = read_json(project.path / "project.json")
    assert meta["patch_size"] == [4, 5, 6]
    assert meta["ignore_value"] == 3
    assert sorted(meta["cases"]) == dataset.cases


def test_label_names_made_unique_for_nnunet(tmp_path, dataset):
    p = Project.create(
        tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4), classes={0: "background", 1: "ignore", 2: "ignore"}
    )
    labels = read_json(p.path / "dataset.json")["labels"]
    assert labels == {"background": 0, "ignore_1": 1, "ignore_2": 2, "ignore": 3}


def test_open_gives_the_same_project(project):
    again = Project.open(project.path)
    assert again.cases == project.cases
    assert again.settings == project.settings
    assert again.classes == project.classes
    assert repr(again).startswith("<Project 'study'")


def test_multichannel_project(tmp_path):
    ds = make_dataset(tmp_path / "source", n_cases=3, channels=2)
    p = Project.create(tmp_path / "p", ds.images, ds.labels, patch_size=(4, 4, 4), test_fraction=0.0)
    assert p.channels == {0: "MOD0", 1: "MOD1"}
    assert read_json(p.path / "dataset.json")["channel_names"] == {"0": "MOD0", "1": "MOD1"}
    for case in ds.cases:
        assert [x.name for x in p.image_paths(case)] == [f"{case}_0000.nii.gz", f"{case}_0001.nii.gz"]
        for c in (0, 1):
            assert p.image_paths(case)[c].read_bytes() == ds.image_file(case, c).read_bytes()


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_other_formats_are_converted_to_nifti(tmp_path, suffix):
    ds = make_dataset(tmp_path / "source", n_cases=2, suffix=suffix, spacing=SPACING, origin=ORIGIN)
    before = checksums(ds.root)
    p = Project.create(tmp_path / "p", ds.images, ds.labels, patch_size=(4, 4, 4), test_fraction=0.0)
    for case in ds.cases:
        source = sitk.ReadImage(str(ds.image_file(case, suffix=suffix)))
        copy = p.read_image(case)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(copy), sitk.GetArrayViewFromImage(source))
        np.testing.assert_allclose(copy.GetSpacing(), source.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(copy.GetOrigin(), source.GetOrigin(), rtol=1e-6)
        np.testing.assert_array_equal(p.read_ground_truth(case), read_array(ds.label_file(case, suffix)))
    assert checksums(ds.root) == before


def test_without_labels_every_case_is_pool(tmp_path, unlabelled_dataset):
    p = Project.create(tmp_path / "p", unlabelled_dataset.images, patch_size=(4, 4, 4), test_fraction=0.5)
    assert p.pool_cases == unlabelled_dataset.cases
    assert p.test_cases == []
    assert not p.has_ground_truth
    assert p.settings.test_fraction == 0.0
    assert not (p.path / "groundtruth").exists()
    assert not (p.path / "imagesTs").exists()
    with pytest.raises(ProjectError, match="no ground truth"):
        p.read_ground_truth(unlabelled_dataset.cases[0])
    for case in p.pool_cases:
        assert np.all(p.read_partial_labels(case) == p.ignore_value)


# ---------------------------------------------------------------------------
# Test split
# ---------------------------------------------------------------------------


def test_split_is_seeded_and_reproducible():
    cases = [f"c{n:02d}" for n in range(12)]
    split = _split_cases(cases, 0.25, seed=0)
    test = sorted(c for c, s in split.items() if s == "test")
    assert len(test) == 3
    assert set(split.values()) == {"pool", "test"}
    assert _split_cases(cases, 0.25, seed=0) == split
    assert _split_cases(list(reversed(cases)), 0.25, seed=0) == split  # order of discovery does not matter
    other_seeds = [sorted(c for c, s in _split_cases(cases, 0.25, seed=s).items() if s == "test") for s in (1, 2, 3)]
    assert all(len(t) == 3 for t in other_seeds)
    assert any(t != test for t in other_seeds)
    assert len({tuple(t) for t in [test, *other_seeds]}) >= 3


@pytest.mark.parametrize(
    "n, fraction, expected", [(12, 0.25, 3), (4, 0.25, 1), (2, 0.1, 1), (1, 0.25, 0), (12, 0.0, 0), (10, 0.5, 5)]
)
def test_split_sizes(n, fraction, expected):
    split = _split_cases([f"c{i}" for i in range(n)], fraction, seed=0)
    assert sum(s == "test" for s in split.values()) == expected


def test_project_split_same_seed_same_split(tmp_path):
    ds = make_dataset(tmp_path / "source", n_cases=12, shape=(6, 8, 7))
    a = Project.create(tmp_path / "a", ds.images, ds.labels, patch_size=(4, 4, 4), seed=11)
    b = Project.create(tmp_path / "b", ds.images, ds.labels, patch_size=(4, 4, 4), seed=11)
    c = Project.create(tmp_path / "c", ds.images, ds.labels, patch_size=(4, 4, 4), seed=12)
    assert len(a.test_cases) == 3 and len(a.pool_cases) == 9
    assert a.test_cases == b.test_cases
    assert sorted(a.test_cases) != sorted(c.test_cases)
    assert sorted(a.test_cases) == sorted(c for c, s in _split_cases(ds.cases, 0.25, 11).items() if s == "test")
    for case in a.test_cases:
        assert (a.path / "imagesTs" / f"{case}_0000.nii.gz").is_file()
        assert not (a.path / "imagesTr" / f"{case}_0000.nii.gz").exists()
        with pytest.raises(ProjectError, match="test case"):
            a.read_partial_labels(case)


def test_empty_pool_after_holding_out(tmp_path):
    ds = make_dataset(tmp_path / "source", n_cases=2)
    with pytest.raises(ProjectError, match="pool is empty"):
        Project.create(tmp_path / "p", ds.images, ds.labels, patch_size=(4, 4, 4), test_fraction=0.9)
    assert not (tmp_path / "p").exists()
    assert staging_folders(tmp_path) == []


# ---------------------------------------------------------------------------
# Patch size
# ---------------------------------------------------------------------------


def test_default_patch_size_isotropic_hippocampus_like():
    shapes = [(36, 50, 35), (34, 52, 36), (35, 49, 37)]
    assert default_patch_size(shapes, [(1.0, 1.0, 1.0)] * 3) == (20, 20, 20)


def test_default_patch_size_anisotropic_gives_thin_box():
    # ACDC-like: 10 mm slices, 1.56 mm in plane
    shapes = [(10, 200, 220), (9, 210, 200), (11, 190, 210)]
    assert default_patch_size(shapes, [(10.0, 1.56, 1.56)] * 3) == (4, 20, 20)
    # 5 mm slices: 20 * 1 mm / 5 mm = 4 voxels; 2.5 mm: 8 voxels
    assert default_patch_size([(40, 100, 100)], [(5.0, 1.0, 1.0)]) == (4, 20, 20)
    assert default_patch_size([(40, 100, 100)], [(2.5, 1.0, 1.0)]) == (8, 20, 20)


def test_default_patch_size_finest_axis_is_20_voxels():
    # the finest axis need not be the last; the others get the same physical length
    assert default_patch_size([(100, 100, 100)], [(0.5, 1.0, 2.0)]) == (20, 10, 5)


def test_default_patch_size_is_at_least_4():
    assert default_patch_size([(100, 100, 100)], [(0.2, 4.0, 8.0)]) == (20, 4, 4)


def test_default_patch_size_is_clipped_to_median_size():
    shapes = [(12, 16, 14), (12, 18, 10), (30, 30, 30)]
    assert default_patch_size(shapes, [(1.0, 1.0, 1.0)] * 3) == (12, 18, 14)


def test_create_uses_default_patch_size(tmp_path):
    ds = make_dataset(tmp_path / "source", n_cases=3, shape=(6, 40, 40), spacing=(1.56, 1.56, 10.0))
    p = Project.create(tmp_path / "p", ds.images, ds.labels, test_fraction=0.0)
    assert p.patch_size == (4, 20, 20)
    assert p.settings.patch_size_rule.startswith("default")
    small_ds = make_dataset(tmp_path / "small", n_cases=2)
    small = Project.create(tmp_path / "q", small_ds.images, small_ds.labels, test_fraction=0.0)
    assert small.patch_size == SHAPE  # 20 voxels clipped to the 12 x 16 x 14 images
    assert read_json(p.path / "project.json")["patch_size"] == [4, 20, 20]


def test_patch_size_larger_than_image_is_accepted(tmp_path, dataset):
    p = Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(50, 5, 60), test_fraction=0.0)
    assert p.patch_size == (50, 5, 60)
    case = p.pool_cases[0]
    size = effective_patch_size(p.patch_size, p.cases[case].shape)
    assert size == (12, 5, 14)  # the box covers the short axes completely
    box = Box(case, (0, 3, 0), size)
    assert box.fits(p.cases[case].shape)
    assert not Box(case, (0, 3, 0), p.patch_size).fits(p.cases[case].shape)
    gt = p.read_ground_truth(case)
    result = p.merge_annotation(box, gt[box.slices])
    partial = Project.open(p.path).read_partial_labels(case)
    np.testing.assert_array_equal(partial[:, 3:8, :], gt[:, 3:8, :])
    assert np.all(partial[:, :3, :] == p.ignore_value) and np.all(partial[:, 8:, :] == p.ignore_value)
    assert result.voxels == 12 * 5 * 14


@pytest.mark.parametrize("patch", [(4, 4), (4, 0, 4), (4, -1, 4), (1, 2, 3, 4)])
def test_bad_patch_size_is_refused(tmp_path, dataset, patch):
    with pytest.raises(ProjectError, match="patch size"):
        Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=patch)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_test_fraction_is_refused(tmp_path, dataset, fraction):
    with pytest.raises(ProjectError, match="test fraction"):
        Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4), test_fraction=fraction)
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------
# Refusals and crash safety
# ---------------------------------------------------------------------------


def test_create_refuses_a_non_empty_folder(tmp_path, dataset):
    target = tmp_path / "p"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ProjectError, match="not an empty folder"):
        Project.create(target, dataset.images, dataset.labels, patch_size=(4, 4, 4))
    assert [x.name for x in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "mine"


def test_create_refuses_an_existing_project(project, dataset):
    before = checksums(project.path)
    with pytest.raises(ProjectError):
        Project.create(project.path, dataset.images, dataset.labels, patch_size=(4, 4, 4))
    assert checksums(project.path) == before


def test_create_into_an_empty_folder(tmp_path, dataset):
    (tmp_path / "p").mkdir()
    p = Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4))
    assert (p.path / "project.json").is_file()


def test_open_folder_without_project_json(tmp_path):
    folder = tmp_path / "not_a_project"
    folder.mkdir()
    with pytest.raises(ProjectError) as info:
        Project.open(folder)
    assert "not_a_project" in str(info.value) and "project.json" in str(info.value)
    with pytest.raises(ProjectError, match="missing"):
        Project.open(tmp_path / "missing")


def test_open_damaged_project_json(project):
    (project.path / "project.json").write_text("{ not json")
    with pytest.raises(ProjectError, match="project.json"):
        Project.open(project.path)
    (project.path / "project.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ProjectError, match="not an ActiveLearning3D project"):
        Project.open(project.path)
    (project.path / "project.json").write_text(json.dumps({"format": project_module.PROJECT_FORMAT, "version": 1}))
    with pytest.raises(ProjectError, match="project.json: damaged"):
        Project.open(project.path)


def test_stale_temporaries_are_removed_on_open(project):
    stale = [
        project.path / f"{TMP_PREFIX}abc.json",
        project.path / "labelsTr" / f"{TMP_PREFIX}x1y2.nii.gz",
        project.path / "loops" / f"{TMP_PREFIX}q.json",
    ]
    hour_ago = time.time() - 3600
    for p in stale:
        p.write_bytes(b"half written")
        os.utime(p, (hour_ago, hour_ago))
    # being written right now, by a worker or another session: left alone
    fresh = [project.path / "labelsTr" / f"{TMP_PREFIX}now.nii.gz", project.path / "jobs" / "j" / f"{TMP_PREFIX}s.json"]
    for p in fresh:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"being written")
    old_in_jobs = project.path / "jobs" / "j" / f"{TMP_PREFIX}old.json"
    old_in_jobs.write_bytes(b"a worker's")
    os.utime(old_in_jobs, (hour_ago, hour_ago))
    keep = checksums(project.path / "labelsTr", project.path / "imagesTr")
    keep = {k: v for k, v in keep.items() if TMP_PREFIX not in k}
    Project.open(project.path)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in fresh) and old_in_jobs.exists()  # jobs/ belongs to the workers
    after = checksums(project.path / "labelsTr", project.path / "imagesTr")
    assert {k: v for k, v in after.items() if TMP_PREFIX not in k} == keep


class Interrupted(Exception):
    """Stands in for a crash in the middle of a write."""


def _fail_after(n: int, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise Interrupted("power failure")
        return real(*args, **kwargs)

    return wrapper


def test_interrupted_create_leaves_nothing(tmp_path, dataset, monkeypatch):
    before = checksums(dataset.root)
    monkeypatch.setattr(project_module, "atomic_write_image", _fail_after(3, atomic_write_image))
    with pytest.raises(Interrupted):
        Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4))
    assert not (tmp_path / "p").exists()
    assert staging_folders(tmp_path) == []
    assert checksums(dataset.root) == before


def test_staging_folder_of_a_killed_create_is_no_project(tmp_path, dataset, monkeypatch):
    # A kill leaves the staging folder behind (no cleanup runs); simulate it by disabling the cleanup.
    monkeypatch.setattr(project_module, "atomic_write_image", _fail_after(5, atomic_write_image))
    monkeypatch.setattr(project_module.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(Interrupted):
        Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4))
    monkeypatch.undo()
    leftovers = staging_folders(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".p.creating-")
    assert any((tmp_path / leftovers[0]).rglob("*.nii.gz"))  # it did hold files
    for folder in (tmp_path / "p", tmp_path / leftovers[0]):
        with pytest.raises(ProjectError, match="project.json"):
            Project.open(folder)
    # the target is still free: a new create succeeds
    p = Project.create(tmp_path / "p", dataset.images, dataset.labels, patch_size=(4, 4, 4))
    assert sorted(p.cases) == dataset.cases


def test_interrupted_json_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"version": 1})

    def crash(*args):
        raise Interrupted("crash before the rename")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(Interrupted):
        atomic_write_json(path, {"version": 2})
    monkeypatch.undo()
    assert read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_interrupted_image_write_keeps_old_file(project, monkeypatch):
    case = project.pool_cases[0]
    path = project.partial_label_path(case)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise Interrupted("disk full")

    monkeypatch.setattr(fileio.sitk, "WriteImage", crash)
    with pytest.raises(Interrupted):
        project.merge_annotation(Box(case, (0, 0, 0), (4, 5, 6)), np.ones((4, 5, 6), np.uint8))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(TMP_PREFIX)] == []


def test_atomic_image_write_keeps_the_format_suffix(tmp_path):
    # SimpleITK picks the writer by suffix; the temporary file must keep it
    image = sitk.GetImageFromArray(synthetic_label())
    for name in ("a.nii.gz", "b.nrrd", "c.mha"):
        atomic_write_image(image, tmp_path / name)
        np.testing.assert_array_equal(read_array(tmp_path / name), synthetic_label())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nrrd", "c.mha"]


# ---------------------------------------------------------------------------
# Loop files
# ---------------------------------------------------------------------------


def _loop(project: Project, loop: int = 0) -> LoopFile:
    a, b = project.pool_cases[:2]
    boxes = [  # each loop elsewhere: no box may overlap another
        BoxRecord(Box(a, (4 * loop, 1, 2), (4, 5, 6)), loop, 0, "pe", score=0.75, priority=1.0, stratum="tumour"),
        BoxRecord(Box(b, (8 - 4 * loop, 11, 8), (4, 5, 6)), loop, 1, "pe", score=0.5),
    ]
    return LoopFile(loop, "pe", 7, "2024-01-01T00:00:00+00:00", boxes, {"note": "test"})


def test_loop_round_trip(project):
    loop = _loop(project, 0)
    project.write_loop(loop)
    project.write_loop(_loop(project, 1))
    assert project.loop_indices() == [0, 1]
    assert project.loop_path(0).name == "loop_000.json"
    back = project.read_loop(0)
    assert back.to_json() == loop.to_json()
    assert back.boxes[0].box == loop.boxes[0].box
    assert back.boxes[0].state == "pending"
    assert back.count("pending") == 2
    assert len(project.all_boxes()) == 4
    assert [lp.loop for lp in project.loops()] == [0, 1]
    assert sorted(p.name for p in project.loops_dir.iterdir()) == ["loop_000.json", "loop_001.json"]


def test_loop_file_has_nnactive_keys(project):
    project.write_loop(_loop(project))
    raw = json.loads(project.loop_path(0).read_text())
    patch = raw["patches"][0]
    assert patch["file"] == f"{project.pool_cases[0]}.nii.gz"
    assert patch["coords"] == [0, 1, 2]
    assert patch["size"] == [4, 5, 6]
    for key in ("score", "method", "stratum", "state", "annotator", "annotated_at", "seconds"):
        assert key in patch


def test_update_box(project):
    project.write_loop(_loop(project))
    record = project.read_loop(0).boxes[1]
    record.state = "annotated"
    record.annotator = "oracle"
    record.seconds = 1.5
    project.update_box(record)
    again = Project.open(project.path).read_loop(0)
    assert again.boxes[1].state == "annotated" and again.boxes[1].annotator == "oracle" and again.boxes[1].seconds == 1.5
    assert again.boxes[0].state == "pending"
    assert again.count("annotated") == 1


def test_box_states_are_an_enum_that_writes_the_same_loop_file_as_plain_strings(project):
    loop = _loop(project)
    loop.boxes[1].state = BoxState.ANNOTATED
    project.write_loop(loop)
    text = project.loop_path(0).read_text()
    by_strings = LoopFile.from_json(json.loads(text), 0)
    by_strings.boxes[1].state = "annotated"  # as code that still assigns the string does
    assert json.dumps(by_strings.to_json(), indent=1) + "\n" == text
    patches = json.loads(text)["patches"]
    assert [p["state"] for p in patches] == ["pending", "annotated"] and '"state": "annotated"' in text
    back = project.read_loop(0)
    assert [type(b.state) for b in back.boxes] == [BoxState, BoxState]  # read back as the enum
    assert back.boxes[1].state == "annotated" and back.boxes[1].state is BoxState.ANNOTATED
    assert f"{back.boxes[0].state}" == str(back.boxes[0].state) == "pending"
    assert back.count(BoxState.ANNOTATED) == back.count("annotated") == 1
    assert project.annotation_key() == Project.open(project.path).annotation_key()
    patches[0]["state"] = "lost"
    project.loop_path(0).write_text(json.dumps({"patches": patches}))
    with pytest.raises(ProjectError, match="loop_000.json: box 000-0000 has unknown state 'lost'"):
        project.read_loop(0)


def test_reads_a_plain_nnactive_loop_file(project):
    case = project.pool_cases[0]
    project.loops_dir.mkdir(exist_ok=True)
    project.loop_path(0).write_text(json.dumps({"patches": [{"file": f"{case}.nii.gz", "coords": [1, 2, 3], "size": [4, 4, 4]}]}))
    loop = project.read_loop(0)
    assert loop.boxes[0].box == Box(case, (1, 2, 3), (4, 4, 4))
    assert loop.boxes[0].state == "annotated"  # nnActive only lists boxes that were annotated


@pytest.mark.parametrize(
    "content, words",
    [
        ("{ this is not json", ["not valid JSON"]),
        ("[]", ["damaged loop file"]),
        ('{"loop": 2}', ["patches"]),
        ('{"patches": [{"file": "ghost.nii.gz", "coords": [0, 0, 0], "size": [4, 4, 4]}]}', ["'ghost'", "not a pool case"]),
        ('{"patches": [{"file": "POOL.nii.gz", "coords": [0, 0], "size": [4, 4, 4]}]}', ["3 coordinates"]),
        ('{"patches": [{"file": "POOL.nii.gz", "coords": [0, 0, 0], "size": [4, 4, 4], "state": "lost"}]}', ["state"]),
        ('{"patches": [{"file": "POOL.nii.gz", "coords": [10, 0, 0], "size": [4, 4, 4]}]}', ["outside"]),
        ('{"patches": [{"coords": [0, 0, 0], "size": [4, 4, 4]}]}', ["file"]),
    ],
    ids=["invalid json", "not an object", "no patches", "unknown case", "short coords", "bad state", "outside image", "no file"],
)
def test_damaged_loop_file(project, content, words):
    project.loops_dir.mkdir(exist_ok=True)
    project.loop_path(2).write_text(content.replace("POOL", project.pool_cases[0]))
    with pytest.raises(ProjectError) as info:
        project.read_loop(2)
    message = str(info.value)
    assert "loop_002.json" in message
    for w in words:
        assert w in message
    with pytest.raises(ProjectError, match="loop_002.json"):
        project.all_boxes()


def test_loop_box_naming_a_test_case_is_refused(project):
    project.loops_dir.mkdir(exist_ok=True)
    test_case = project.test_cases[0]
    project.loop_path(0).write_text(
        json.dumps({"patches": [{"file": f"{test_case}.nii.gz", "coords": [0, 0, 0], "size": [4, 4, 4]}]})
    )
    with pytest.raises(ProjectError, match=f"loop_000.json.*{test_case}"):
        project.read_loop(0)


def test_written_files_and_the_project_folder_get_ordinary_permissions(tmp_path, dataset):
    """Atomic writes go through temporary files; the result must not inherit mkstemp's private 0o600."""
    previous = os.umask(0o022)
    try:
        logic_path = tmp_path / "perm"
        project = Project.create(logic_path, dataset.images, dataset.labels)
        fileio.atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(project.path.stat().st_mode) == 0o755
    assert stat.S_IMODE((project.path / "project.json").stat().st_mode) == 0o644
    label = next((project.path / "labelsTr").iterdir())
    assert stat.S_IMODE(label.stat().st_mode) == 0o644


def test_a_staging_folder_left_by_an_interrupted_create_is_removed_by_the_next_one(tmp_path, dataset):
    stale = tmp_path / ".study.creating-deadbeef"
    (stale / "labelsTr").mkdir(parents=True)
    (stale / "labelsTr" / "x.nii.gz").write_bytes(b"half")
    old = time.time() - 2 * 3600
    for p in (stale / "labelsTr" / "x.nii.gz", stale / "labelsTr", stale):
        os.utime(p, (old, old))
    fresh = tmp_path / ".study.creating-cafef00d"  # another create may be writing this one right now
    fresh.mkdir()
    Project.create(tmp_path / "study", dataset.images, dataset.labels)
    assert not stale.exists() and fresh.exists()
