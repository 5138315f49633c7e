"""Finding and validating input data (ActiveLearning3DLib.dataset).

Every bad input must give a DatasetError that names the file and the problem,
and Project.create must then leave nothing behind: no project folder (or the
empty folder it was given), no staging folder, and untouched source files.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib.dataset import (
    DatasetError,
    GeometryTolerance,
    discover_images,
    discover_labels,
    parse_case_id,
    read_class_names,
    validate_dataset,
)
from ActiveLearning3DLib.fileio import nifti_has_non_finite
from ActiveLearning3DLib.project import Project
from conftest import SHAPE, SyntheticDataset, checksums, make_dataset, read_array, synthetic_image, synthetic_label, write_image


def rotation_z(angle: float) -> tuple[float, ...]:
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Case ids and discovery
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("case_0000.nii.gz", ("case", 0, ".nii.gz")),
        ("case_0001.nii.gz", ("case", 1, ".nii.gz")),
        ("brain.nii", ("brain", 0, ".nii")),
        ("ct_12_0002.nrrd", ("ct_12", 2, ".nrrd")),
        ("case.mha", ("case", 0, ".mha")),
        ("case.MHD", ("case", 0, ".MHD")),
        ("hippocampus_001.nii.gz", ("hippocampus_001", 0, ".nii.gz")),  # 3 digits: part of the id
        ("notes.txt", None),
        ("case.raw", None),  # MetaImage data file, read through its .mhd
        (".al3d-tmp-abc.nii.gz", None),  # hidden / temporary files are no images
    ],
)
def test_parse_case_id(name, expected):
    assert parse_case_id(name) == expected


def test_discover_images_groups_channels_and_skips_other_files(tmp_path):
    ds = make_dataset(tmp_path, n_cases=2, channels=2, labels=False, class_names=None)
    (ds.images / "README.txt").write_text("not an image")
    cases, problems = discover_images(ds.images)
    assert problems == []
    assert sorted(cases) == ["case_000", "case_001"]
    assert cases["case_000"] == {0: ds.images / "case_000_0000.nii.gz", 1: ds.images / "case_000_0001.nii.gz"}


def test_discover_images_reports_channel_gaps(tmp_path):
    label = synthetic_label()
    write_image(tmp_path / "a_0000.nii.gz", synthetic_image(label))
    write_image(tmp_path / "a_0002.nii.gz", synthetic_image(label))
    _, problems = discover_images(tmp_path)
    assert len(problems) == 1
    assert "a" in problems[0] and "[0, 2]" in problems[0]


def test_discover_images_missing_folder(tmp_path):
    with pytest.raises(DatasetError) as info:
        discover_images(tmp_path / "nope")
    assert "nope" in str(info.value) and "does not exist" in str(info.value)


def test_discover_labels_rejects_channel_suffix(tmp_path):
    write_image(tmp_path / "a_0001.nii.gz", synthetic_label())
    write_image(tmp_path / "b.nii.gz", synthetic_label())
    labels, problems = discover_labels(tmp_path)
    assert list(labels) == ["b"]
    assert len(problems) == 1 and "a_0001.nii.gz" in problems[0] and "channel suffix" in problems[0]


# ---------------------------------------------------------------------------
# Valid data
# ---------------------------------------------------------------------------


def test_validate_good_dataset(dataset):
    infos, classes = validate_dataset(dataset.images, dataset.labels)
    assert [i.case for i in infos] == dataset.cases
    assert classes == {0: "background", 1: "anterior", 2: "posterior"}
    for n, info in enumerate(infos):
        assert info.shape == SHAPE
        assert info.spacing == (1.0, 1.0, 1.0)
        assert info.label == dataset.label_file(info.case)
        assert info.channels == [dataset.image_file(info.case)]
        values, counts = np.unique(synthetic_label(seed=n), return_counts=True)
        assert info.label_counts == dict(zip(values.tolist(), counts.tolist()))


def test_class_names_from_label_values_without_dataset_json(tmp_path):
    ds = make_dataset(tmp_path, n_cases=2, class_names=None)
    _, classes = validate_dataset(ds.images, ds.labels)
    assert classes == {0: "background", 1: "label_1", 2: "label_2"}


def test_class_names_nnunet_v2_format(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}}))
    assert read_class_names(tmp_path) == {0: "background", 1: "liver", 2: "tumour"}


def test_explicit_classes_override_dataset_json(dataset):
    _, classes = validate_dataset(dataset.images, dataset.labels, classes={0: "bg", 1: "a", 2: "b", 3: "c"})
    assert classes == {0: "bg", 1: "a", 2: "b", 3: "c"}


def test_class_values_must_have_no_gaps(dataset):
    with pytest.raises(DatasetError) as info:
        validate_dataset(dataset.images, dataset.labels, classes={0: "bg", 2: "b"})
    assert "without gaps" in str(info.value)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nii"])
def test_other_formats_are_read(tmp_path, suffix):
    ds = make_dataset(tmp_path, n_cases=2, suffix=suffix)
    infos, _ = validate_dataset(ds.images, ds.labels)
    assert [i.case for i in infos] == ds.cases
    assert all(i.shape == SHAPE for i in infos)
    assert infos[0].channels[0].name == f"case_000_0000{suffix}"


def test_mixed_formats_in_one_folder(tmp_path):
    ds = make_dataset(tmp_path, n_cases=3)
    # re-save one case as NRRD and one as MetaImage, images and labels alike
    for case, suffix in (("case_001", ".nrrd"), ("case_002", ".mha")):
        for old, new in (
            (ds.image_file(case), ds.image_file(case, suffix=suffix)),
            (ds.label_file(case), ds.label_file(case, suffix)),
        ):
            sitk.WriteImage(sitk.ReadImage(str(old)), str(new))
            old.unlink()
    infos, _ = validate_dataset(ds.images, ds.labels)
    assert [i.channels[0].suffix for i in infos] == [".gz", ".nrrd", ".mha"]
    assert [i.label.suffix for i in infos] == [".gz", ".nrrd", ".mha"]


def test_multichannel_dataset(tmp_path):
    ds = make_dataset(tmp_path, n_cases=2, channels=2)
    infos, _ = validate_dataset(ds.images, ds.labels)
    assert [len(i.channels) for i in infos] == [2, 2]


def test_geometry_within_tolerance_is_accepted(dataset):
    # direction off by 1e-6 rad and origin by 1e-4 mm: well inside the default tolerance
    label = read_array(dataset.label_file("case_001"))
    write_image(dataset.label_file("case_001"), label, origin=(1e-4, 0.0, 0.0), direction=rotation_z(1e-6))
    infos, _ = validate_dataset(dataset.images, dataset.labels)
    assert len(infos) == len(dataset.cases)


def test_tolerance_is_configurable(dataset):
    label = read_array(dataset.label_file("case_001"))
    write_image(dataset.label_file("case_001"), label, origin=(0.01, 0.0, 0.0))
    with pytest.raises(DatasetError):
        validate_dataset(dataset.images, dataset.labels)
    infos, _ = validate_dataset(dataset.images, dataset.labels, tolerance=GeometryTolerance(origin=0.1))
    assert len(infos) == len(dataset.cases)


def test_every_problem_is_listed(dataset):
    write_image(dataset.label_file("case_000"), np.zeros((12, 16, 13), np.uint8))
    dataset.label_file("case_003").unlink()
    with pytest.raises(DatasetError) as info:
        validate_dataset(dataset.images, dataset.labels)
    problems = info.value.problems
    assert len(problems) == 2
    assert any("case_000.nii.gz" in p and "size" in p for p in problems)
    assert any("case_003_0000.nii.gz" in p and "no label file" in p for p in problems)


# ---------------------------------------------------------------------------
# Bad inputs: each gives its error and leaves nothing behind
# ---------------------------------------------------------------------------
# A breaker damages the dataset and returns (file that must be named, words of the problem).


def _label_size(ds: SyntheticDataset):
    write_image(ds.label_file("case_001"), np.zeros((12, 16, 13), np.uint8))
    return "case_001.nii.gz", ["size", "(13, 16, 12)"]


def _label_spacing(ds: SyntheticDataset):
    write_image(ds.label_file("case_001"), synthetic_label(seed=1), spacing=(1.0, 1.0, 1.5))
    return "case_001.nii.gz", ["spacing"]


def _label_origin(ds: SyntheticDataset):
    write_image(ds.label_file("case_001"), synthetic_label(seed=1), origin=(0.0, 0.5, 0.0))
    return "case_001.nii.gz", ["origin"]


def _label_direction(ds: SyntheticDataset):
    write_image(ds.label_file("case_001"), synthetic_label(seed=1), direction=rotation_z(0.01))
    return "case_001.nii.gz", ["direction"]


def _channel_geometry(ds: SyntheticDataset):
    # a second channel whose spacing differs from channel 0
    write_image(ds.image_file("case_002", 1), synthetic_image(synthetic_label(seed=2)), spacing=(2.0, 1.0, 1.0))
    for case in ("case_000", "case_001", "case_003"):
        write_image(ds.image_file(case, 1), synthetic_image(synthetic_label()))
    return "case_002_0001.nii.gz", ["spacing"]


def _label_half(ds: SyntheticDataset):
    label = synthetic_label(seed=2).astype(np.float32)
    label[0, 0, 0] = 0.5
    write_image(ds.label_file("case_002"), label)
    return "case_002.nii.gz", ["integers", "0.5"]


def _label_undeclared(ds: SyntheticDataset):
    label = synthetic_label(seed=2)
    label[0, 0, 0] = 5
    write_image(ds.label_file("case_002"), label)
    return "case_002.nii.gz", ["[5]", "not declared"]


def _label_negative(ds: SyntheticDataset):
    label = synthetic_label(seed=2).astype(np.int16)
    label[0, 0, 0] = -1
    write_image(ds.label_file("case_002"), label)
    return "case_002.nii.gz", ["negative"]


def _image_nan(ds: SyntheticDataset):
    image = synthetic_image(synthetic_label(seed=3))
    image[5, 5, 5] = np.nan
    write_image(ds.image_file("case_003"), image)
    return "case_003_0000.nii.gz", ["NaN"]


def _image_inf(ds: SyntheticDataset):
    image = synthetic_image(synthetic_label(seed=3))
    image[1, 2, 3] = -np.inf
    write_image(ds.image_file("case_003"), image)
    return "case_003_0000.nii.gz", ["infinite"]


def _image_nan_nrrd(ds: SyntheticDataset):
    image = synthetic_image(synthetic_label(seed=3))
    image[5, 5, 5] = np.nan
    ds.image_file("case_003").unlink()
    write_image(ds.image_file("case_003", suffix=".nrrd"), image)
    return "case_003_0000.nrrd", ["NaN"]


def _label_nan(ds: SyntheticDataset):
    label = synthetic_label(seed=2).astype(np.float32)
    label[3, 3, 3] = np.nan
    write_image(ds.label_file("case_002"), label)
    return "case_002.nii.gz", ["NaN"]


def _image_2d(ds: SyntheticDataset):
    write_image(ds.image_file("case_000"), np.zeros((16, 14), np.float32), spacing=(1.0, 1.0), origin=(0.0, 0.0))
    return "case_000_0000.nii.gz", ["2D"]


def _image_4d(ds: SyntheticDataset):
    write_image(ds.image_file("case_000"), np.zeros((2,) + SHAPE, np.float32), spacing=(1.0,) * 4, origin=(0.0,) * 4)
    return "case_000_0000.nii.gz", ["4D"]


def _image_vector(ds: SyntheticDataset):
    write_image(ds.image_file("case_000"), np.zeros(SHAPE + (3,), np.float32), is_vector=True)
    return "case_000_0000.nii.gz", ["3 components"]


def _duplicate_case(ds: SyntheticDataset):
    label = synthetic_label(seed=7)
    write_image(ds.images / "twin.nii.gz", synthetic_image(label))
    write_image(ds.images / "twin.nrrd", synthetic_image(label))
    write_image(ds.labels / "twin.nii.gz", label)
    return "twin.nrrd", ["duplicate case id", "'twin'", "twin.nii.gz"]


def _missing_label(ds: SyntheticDataset):
    ds.label_file("case_003").unlink()
    return "case_003_0000.nii.gz", ["no label file", "'case_003'"]


def _unreadable_image(ds: SyntheticDataset):
    ds.image_file("case_001").write_bytes(b"this is not a NIfTI file at all" * 10)
    return "case_001_0000.nii.gz", ["unreadable"]


def _unreadable_label(ds: SyntheticDataset):
    ds.label_file("case_001").write_bytes(bytes(range(256)) * 4)
    return "case_001.nii.gz", ["unreadable"]


def _empty_image_folder(ds: SyntheticDataset):
    for p in ds.images.iterdir():
        p.unlink()
    return "imagesTr", ["no images found", "pool would be empty"]


BREAKERS: dict[str, Callable[[SyntheticDataset], tuple[str, list[str]]]] = {
    "label size": _label_size,
    "label spacing": _label_spacing,
    "label origin": _label_origin,
    "label direction": _label_direction,
    "channel geometry": _channel_geometry,
    "label value 0.5": _label_half,
    "undeclared class": _label_undeclared,
    "negative label": _label_negative,
    "NaN intensity": _image_nan,
    "inf intensity": _image_inf,
    "NaN intensity (NRRD)": _image_nan_nrrd,
    "NaN label": _label_nan,
    "2D image": _image_2d,
    "4D image": _image_4d,
    "vector image": _image_vector,
    "duplicate case id": _duplicate_case,
    "missing label": _missing_label,
    "unreadable image": _unreadable_image,
    "unreadable label": _unreadable_label,
    "empty image folder": _empty_image_folder,
}


def _assert_problem_named(error: DatasetError, file_name: str, words: list[str]) -> None:
    matching = [p for p in error.problems if file_name in p]
    assert matching, f"no problem names {file_name}: {error.problems}"
    assert any(all(w in p for w in words) for p in matching), f"{words} not in {matching}"
    assert file_name in str(error)


@pytest.mark.parametrize("breaker", BREAKERS.values(), ids=BREAKERS.keys())
def test_bad_input_is_rejected_by_validation(dataset, breaker):
    file_name, words = breaker(dataset)
    with pytest.raises(DatasetError) as info:
        validate_dataset(dataset.images, dataset.labels)
    _assert_problem_named(info.value, file_name, words)


@pytest.mark.parametrize("existing_empty_target", [False, True], ids=["no target", "empty target"])
@pytest.mark.parametrize("breaker", BREAKERS.values(), ids=BREAKERS.keys())
def test_bad_input_leaves_nothing_behind(tmp_path, dataset, breaker, existing_empty_target):
    file_name, words = breaker(dataset)
    before = checksums(dataset.root)
    target = tmp_path / "projects" / "study"
    if existing_empty_target:
        target.mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        Project.create(target, dataset.images, dataset.labels, patch_size=(4, 4, 4))
    _assert_problem_named(info.value, file_name, words)
    if existing_empty_target:
        assert target.is_dir() and list(target.iterdir()) == []
    else:
        assert not target.exists()
    if target.parent.exists():
        assert [p.name for p in target.parent.iterdir() if ".creating-" in p.name] == []
    assert checksums(dataset.root) == before


def test_images_without_labels_folder_need_no_labels(unlabelled_dataset):
    infos, classes = validate_dataset(unlabelled_dataset.images)
    assert all(i.label is None and i.label_counts == {} for i in infos)
    assert classes == {0: "background", 1: "label_1"}


def test_missing_label_folder(dataset, tmp_path):
    with pytest.raises(DatasetError) as info:
        validate_dataset(dataset.images, tmp_path / "no_labels_here")
    assert "no_labels_here" in str(info.value)


# ---------------------------------------------------------------------------
# NaN in NIfTI files: ITK reads them as 0, so the raw voxels are checked
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_non_finite_is_found_in_raw_voxels(tmp_path, suffix):
    image = np.zeros(SHAPE, np.float64)
    path = write_image(tmp_path / f"clean{suffix}", image)
    assert not nifti_has_non_finite(path)
    image[-1, -1, -1] = np.inf  # the very last voxel, in a later chunk
    path = write_image(tmp_path / f"inf{suffix}", image)
    assert np.isfinite(read_array(path)).all()  # what SimpleITK shows: the reason for the raw check
    assert nifti_has_non_finite(path, chunk_voxels=100)


def test_nifti_non_finite_ignores_integer_and_other_files(tmp_path):
    assert not nifti_has_non_finite(write_image(tmp_path / "int.nii.gz", synthetic_label()))
    image = np.full(SHAPE, np.nan, np.float32)
    assert not nifti_has_non_finite(write_image(tmp_path / "nan.nrrd", image))  # not NIfTI: SimpleITK keeps NaN there
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    assert not nifti_has_non_finite(tmp_path / "garbage.nii.gz")
    (tmp_path / "short.nii").write_bytes(b"\x5c\x01\x00\x00")
    assert not nifti_has_non_finite(tmp_path / "short.nii")
