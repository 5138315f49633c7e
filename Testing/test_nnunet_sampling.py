"""Region sampling (docs/METHODS.md section 2) in our subclass of nnU-Net's data loader.

The loader runs on in-memory cases whose sample locations come from nnU-Net's
own preprocessing function, exactly as they are stored for a dataset with an
ignore label.
"""

from __future__ import annotations

import numpy as np

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402

from ActiveLearning3DLib.nnunet.sampling import RegionSamplingDataLoader, region_sampling_window  # noqa: E402

IGNORE = 3
LABELS = {"background": 0, "anterior": 1, "posterior": 2, "ignore": IGNORE}


class MemoryDataset:
    """What nnU-Net's loader needs from a dataset: identifiers and load_case."""

    def __init__(self, cases: dict):
        self.cases = cases
        self.identifiers = sorted(cases)

    def load_case(self, key):
        data, seg, properties = self.cases[key]
        return data, seg, None, properties


def _case(shape, boxes, rng) -> tuple:
    """Ignore everywhere except the given boxes (slices -> label array filler), plus nnU-Net's class locations."""
    seg = np.full((1, *shape), IGNORE, dtype=np.int16)
    for slices, fill in boxes:
        seg[(0, *slices)] = fill(rng, seg[(0, *slices)].shape)
    label_manager = LabelManager(LABELS, None)
    keys = list(label_manager.foreground_labels) + [tuple([-1] + label_manager.all_labels)]
    locations = DefaultPreprocessor._sample_foreground_locations(seg, keys, seed=int(rng.integers(1000)))
    data = rng.normal(size=(1, *shape)).astype(np.float32)
    return data, seg, {"class_locations": locations}


def _loader(cases, batch_size, crop, final, oversample=0.0) -> RegionSamplingDataLoader:
    return RegionSamplingDataLoader(
        MemoryDataset(cases),
        batch_size,
        crop,
        final,
        LabelManager(LABELS, None),
        oversample_foreground_percent=oversample,
        transforms=None,
    )


def _training_patches(batch, crop, final):
    """The training patch inside each crop, where nnU-Net's SpatialTransform takes it (crop // 2 - final // 2)."""
    start = [c // 2 - f // 2 for c, f in zip(crop, final)]
    region = tuple(slice(s, s + f) for s, f in zip(start, final))
    return [np.asarray(seg[(0, *region)]) for seg in batch["target"]]


def _annotated(patch) -> np.ndarray:
    return (patch >= 0) & (patch != IGNORE)  # -1 = padding outside the image


def test_every_training_patch_contains_an_annotated_voxel():
    rng = np.random.default_rng(0)
    np.random.seed(0)
    small_box = lambda r, s: np.where(r.random(s) < 0.3, 1, 0)  # noqa: E731
    cases = {
        "corner": _case((40, 48, 36), [((slice(0, 3), slice(0, 3), slice(0, 3)), small_box)], rng),
        "far_corner": _case((40, 48, 36), [((slice(37, 40), slice(45, 48), slice(33, 36)), small_box)], rng),
        "two_boxes": _case(
            (30, 50, 40),
            [
                ((slice(5, 9), slice(10, 14), slice(20, 24)), small_box),
                ((slice(20, 24), slice(40, 44), slice(2, 6)), lambda r, s: np.full(s, 2)),
            ],
            rng,
        ),
        "smaller_than_patch": _case((12, 14, 10), [((slice(4, 6), slice(4, 6), slice(4, 6)), small_box)], rng),
        "background_only": _case((40, 40, 40), [((slice(10, 14), slice(10, 14), slice(10, 14)), lambda r, s: np.zeros(s))], rng),
    }
    crop, final = (28, 30, 26), (16, 20, 16)  # crop enlarged for rotation, as nnU-Net does
    loader = _loader(cases, 3, crop, final, oversample=0.33)
    for _ in range(150):
        batch = loader.generate_train_batch()
        for key, patch in zip(batch["keys"], _training_patches(batch, crop, final)):
            assert _annotated(patch).any(), f"training patch of {key} has no annotated voxel"
        # the last sample of a batch of 3 is forced onto foreground (nnU-Net's 33 %) where the image has some;
        # an image with annotated background only falls back to an annotated voxel
        forced_key = batch["keys"][-1]
        assert loader.last_sample["kind"] == ("annotated" if forced_key == "background_only" else "foreground")


def test_forced_third_of_the_batch_contains_foreground():
    rng = np.random.default_rng(1)
    np.random.seed(1)
    fg = lambda r, s: np.where(r.random(s) < 0.02, 2, 0)  # noqa: E731 - sparse foreground in a background box
    cases = {f"c{i}": _case((40, 40, 40), [((slice(5, 30), slice(5, 30), slice(5, 30)), fg)], rng) for i in range(3)}
    crop = final = (12, 12, 12)
    loader = _loader(cases, 3, crop, final, oversample=0.33)
    for _ in range(60):
        patches = _training_patches(loader.generate_train_batch(), crop, final)
        assert (patches[2] == 2).any()  # forced sample: a voxel of a foreground class inside


def test_annotated_voxel_is_not_always_at_the_centre():
    """One annotated voxel: its position in the training patch is uniform over the patch, not the centre."""
    rng = np.random.default_rng(2)
    np.random.seed(2)
    v = (20, 25, 22)
    cases = {
        "one": _case(
            (40, 50, 44), [((slice(v[0], v[0] + 1), slice(v[1], v[1] + 1), slice(v[2], v[2] + 1)), lambda r, s: np.ones(s))], rng
        )
    }
    crop, final = (24, 24, 24), (16, 16, 16)
    loader = _loader(cases, 2, crop, final)
    offsets = []
    for _ in range(200):
        batch = loader.generate_train_batch()
        for patch in _training_patches(batch, crop, final):
            where = np.argwhere(patch == 1)
            assert len(where) == 1  # always inside
            offsets.append(where[0])
    offsets = np.array(offsets)
    centre = np.array([(f - 1) // 2 for f in final])
    at_centre = np.mean(np.all(offsets == centre, axis=1))
    assert at_centre < 0.05  # nnU-Net's own ignore-label sampling puts it at the centre every time
    for axis in range(3):
        values = offsets[:, axis]
        assert values.min() <= 2 and values.max() >= final[axis] - 3  # reaches both ends of the patch
        assert len(np.unique(values)) >= 12
        assert abs(values.mean() - (final[axis] - 1) / 2) < 1.5  # uniform: mean in the middle
        # chi-square-like check against the uniform distribution over the 16 positions
        counts = np.bincount(values, minlength=final[axis])
        expected = len(values) / final[axis]
        assert np.sum((counts - expected) ** 2 / expected) < 45  # df 15; p ~ 1e-4


def test_window_rule_at_image_borders():
    rs = np.random.RandomState(0)
    for _ in range(2000):
        d = int(rs.randint(1, 40))
        p = int(rs.randint(1, 24))
        v = int(rs.randint(0, d))
        (lower,) = region_sampling_window([v], [d], [p], rs)
        assert lower <= v < lower + p
        if d >= p:
            assert 0 <= lower <= d - p  # inside the image
        else:
            assert lower <= 0 and lower + p >= d  # the image fits in the patch (padding)


def test_without_ignore_label_nnunet_sampling_is_kept():
    rng = np.random.default_rng(3)
    np.random.seed(3)
    labels = {"background": 0, "a": 1}
    seg = np.zeros((1, 20, 20, 20), dtype=np.int16)
    seg[0, 5:8, 5:8, 5:8] = 1
    locs = DefaultPreprocessor._sample_foreground_locations(seg, [1], seed=0)
    cases = {"x": (rng.normal(size=(1, 20, 20, 20)).astype(np.float32), seg, {"class_locations": locs})}
    loader = RegionSamplingDataLoader(
        MemoryDataset(cases),
        2,
        (12, 12, 12),
        (12, 12, 12),
        LabelManager(labels, None),
        oversample_foreground_percent=0.5,
        transforms=None,
    )
    batch = loader.generate_train_batch()
    assert loader.last_sample is None and tuple(batch["target"].shape) == (2, 1, 12, 12, 12)
