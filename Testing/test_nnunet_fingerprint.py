"""The dataset fingerprint of partial labels: ignore voxels are not foreground (nnActive's fingerprint counts them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor  # noqa: E402
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: E402

from ActiveLearning3DLib.fileio import read_json  # noqa: E402
from ActiveLearning3DLib.nnunet.fingerprint import extract_fingerprint  # noqa: E402

IGNORE = 2
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "ignore": IGNORE}, "file_ending": ".nii.gz"}
SHAPE = (24, 28, 20)


def _write(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _dataset(root: Path, n: int = 3, annotate_foreground: bool = True, annotate: bool = True) -> dict:
    """Organ (1) ~ 1000, annotated background ~ 100, and an unannotated rest ~ 5000 that fills 97 % of the image."""
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(n):
        image = (5000 + 50 * rng.normal(size=SHAPE)).astype(np.float32)
        labels = np.full(SHAPE, IGNORE, dtype=np.uint8)
        box = (slice(4, 10), slice(6, 12), slice(5, 11))
        if annotate:
            labels[box] = 0
            image[box] = 100 + 5 * rng.normal(size=image[box].shape)
        if annotate and annotate_foreground:
            organ = (slice(5, 8), slice(7, 10), slice(6, 9))
            labels[organ] = 1
            image[organ] = 1000 + 20 * rng.normal(size=image[organ].shape)
        case = f"case_{i}"
        cases[case] = (
            [_write(root / "imagesTr" / f"{case}_0000.nii.gz", image)],
            _write(root / "labelsTr" / f"{case}.nii.gz", labels),
        )
    return cases


def test_ignore_voxels_are_not_foreground(tmp_path):
    cases = _dataset(tmp_path)
    out = tmp_path / "fingerprint.json"
    fingerprint = extract_fingerprint(cases, DATASET, IGNORE, out)
    stats = fingerprint["foreground_intensity_properties_per_channel"][0]
    assert fingerprint["al3d_intensity_source"] == "annotated foreground"
    assert 900 < stats["percentile_00_5"] and stats["percentile_99_5"] < 1100 and abs(stats["mean"] - 1000) < 20
    assert fingerprint["al3d_annotated_foreground_voxels"] == 3 * 27
    # nnU-Net's own per-case analysis on the same files takes ignore (label 2 > 0) as foreground: the unannotated
    # rest dominates its statistics, which is what nnActive's fingerprint does
    images, labels = cases["case_0"]
    _, _, nnunet_fg, nnunet_stats, _ = DatasetFingerprintExtractor.analyze_case([str(images[0])], str(labels), SimpleITKIO, 5000)
    assert nnunet_stats[0]["median"] > 4500 and np.mean(nnunet_fg[0]) > 4000
    # image-only parts are nnU-Net's: shapes after crop and spacings (x, y, z reversed to z, y, x)
    assert fingerprint["shapes_after_crop"] == [list(SHAPE)] * 3
    assert np.allclose(fingerprint["spacings"][0], [2.5, 0.8, 0.8])
    written = read_json(out)
    assert written["foreground_intensity_properties_per_channel"]["0"]["mean"] == pytest.approx(stats["mean"])
    assert set(written) >= {
        "spacings",
        "shapes_after_crop",
        "foreground_intensity_properties_per_channel",
        "median_relative_size_after_cropping",
    }


def test_fallbacks_when_no_foreground_is_annotated(tmp_path):
    background_only = extract_fingerprint(_dataset(tmp_path / "a", annotate_foreground=False), DATASET, IGNORE)
    assert background_only["al3d_intensity_source"] == "annotated voxels"
    assert abs(background_only["foreground_intensity_properties_per_channel"][0]["median"] - 100) < 10
    nothing = extract_fingerprint(_dataset(tmp_path / "b", annotate=False), DATASET, IGNORE)
    assert nothing["al3d_intensity_source"] == "all voxels"
    assert abs(nothing["foreground_intensity_properties_per_channel"][0]["median"] - 5000) < 50
