"""Region sampling for partial labels (nnActive), as a subclass of nnU-Net's 3D data loader.

The rule (docs/METHODS.md section 2): a training patch must contain at least one
annotated voxel, but not at its centre. Pick an annotated voxel v at random,
shift it along each axis d by an integer drawn uniformly from
[-min(v_d, P_d // 2), min(D_d - v_d, P_d // 2)), centre the training patch on the
shifted point and clip the patch to the valid bounds. A third of each batch
(nnU-Net's ``oversample_foreground_percent``) is still forced to contain a random
foreground class: those samples are centred on a voxel of a foreground class
annotated in the image (nnU-Net's own forced-foreground sampling; an image
without annotated foreground falls back to an annotated voxel).

How it maps onto nnU-Net's loader: nnU-Net crops a larger patch (``patch_size``,
enlarged so that rotations do not bring in padding) and its ``SpatialTransform``
takes the training patch (``final_patch_size``) from the centre of it. P above
is the *training* patch size, and the shift and the clipping are done on the
training patch; the crop around it is placed so that its centre is the
training patch's centre. So the training patch contains v before spatial
augmentation. (nnActive's variant shifted by half of the enlarged crop, which
can push v out of the training patch.) Rotation and scaling about the patch
centre can still move a voxel near the patch border outside it; the loss then
sees only the annotated voxels that remain, exactly as nnU-Net does for any
sample.

nnU-Net 2.8.1 itself already handles datasets with an ``ignore`` label: its
preprocessing stores, per case, sample locations of all annotated voxels under
the key ``(-1, 0, 1, .., C)`` (-1 is background outside the nonzero crop), and
its loader centres non-forced samples exactly on such a voxel. We reuse those
locations and change only where the patch goes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def region_sampling_window(
    voxel: Sequence[int], data_shape: Sequence[int], patch_size: Sequence[int], rng=np.random
) -> list[int]:
    """Lower corner of a training patch that contains ``voxel``, by the region-sampling rule.

    The shift along axis d is uniform in [-min(v_d, P_d // 2), min(D_d - v_d, P_d // 2)),
    so the shifted point stays in the image; the patch is centred on it and clipped
    into the image, or centred on the image where the image is smaller than the
    patch (the loader pads). The centre of a patch is its voxel (P_d - 1) // 2 (the
    lower of the two middle voxels of an even size): then every shift of the interval
    keeps v inside the patch, at any of the P_d positions. (Centring at P_d // 2, as
    nnActive's code does, puts v one voxel outside for the shift -P_d / 2.) Clipping
    moves the patch towards the image's inside and never past v.
    """
    corner = []
    for v, d, p in zip(voxel, data_shape, patch_size):
        v, d, p = int(v), int(d), int(p)
        low, high = -min(v, p // 2), min(d - v, p // 2)
        shift = int(rng.randint(low, high)) if high > low else 0
        lower = v + shift - (p - 1) // 2
        if d >= p:
            lower = min(max(lower, 0), d - p)
        else:
            lower = (d - p) // 2
        corner.append(lower)
    return corner


def centred_window(voxel: Sequence[int], data_shape: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    """Lower corner of a training patch centred on ``voxel`` (clipped like :func:`region_sampling_window`)."""
    corner = []
    for v, d, p in zip(voxel, data_shape, patch_size):
        lower = int(v) - (int(p) - 1) // 2
        corner.append(min(max(lower, 0), d - p) if d >= p else (d - p) // 2)
    return corner


class RegionSamplingDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader with the region-sampling rule for datasets with an ignore label.

    ``get_bbox`` returns the crop nnU-Net's loader cuts (of ``self.patch_size``),
    placed so that the training patch (``self.final_patch_size``, the centre of the
    crop) follows the rule. Datasets without an ignore label are sampled exactly
    as by nnU-Net.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_sample: dict | None = None  # what the last get_bbox did (for tests and debugging)

    def get_bbox(
        self,
        data_shape: np.ndarray,
        force_fg: bool,
        class_locations: dict | None,
        overwrite_class: int | tuple[int, ...] | None = None,
        verbose: bool = False,
    ):
        if not self.has_ignore:
            return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        final = [int(p) for p in self.final_patch_size]
        crop = [int(p) for p in self.patch_size]
        voxel, kind = self._pick_voxel(force_fg, class_locations, overwrite_class)
        if voxel is None:  # no annotated voxel in the image (should not be training data): nnU-Net's random crop
            self.last_sample = {"kind": "random", "voxel": None, "window": None}
            return self._random_bbox(data_shape)
        if kind == "annotated":
            window = region_sampling_window(voxel, data_shape, final)
        else:
            window = centred_window(voxel, data_shape, final)
        # the crop is centred where the training patch is: SpatialTransform takes the training patch starting
        # at crop // 2 - final // 2 inside the crop
        bbox_lbs = [w - (c // 2 - f // 2) for w, c, f in zip(window, crop, final)]
        bbox_ubs = [lb + c for lb, c in zip(bbox_lbs, crop)]
        self.last_sample = {"kind": kind, "voxel": [int(v) for v in voxel], "window": window}
        return bbox_lbs, bbox_ubs

    def _pick_voxel(self, force_fg: bool, class_locations: dict | None, overwrite_class=None):
        """(voxel, kind): a random annotated voxel, or for forced samples a voxel of a random annotated foreground class."""
        if class_locations is None:
            return None, "random"
        if force_fg:
            eligible = [k for k, locs in class_locations.items() if len(locs) > 0 and k != self.annotated_classes_key]
            if overwrite_class is not None and overwrite_class in eligible:
                eligible = [overwrite_class]
            if eligible:
                key = eligible[np.random.choice(len(eligible))]
                locs = class_locations[key]
                return locs[np.random.choice(len(locs))][1:], "foreground"
        locs = class_locations.get(self.annotated_classes_key, [])
        if len(locs) == 0:
            return None, "random"
        return locs[np.random.choice(len(locs))][1:], "annotated"

    def _random_bbox(self, data_shape) -> tuple[list[int], list[int]]:
        lbs, ubs = [], []
        for d, c, f in zip(data_shape, self.patch_size, self.final_patch_size):
            need = max(int(c) - int(f), int(c) - int(d))
            lo, hi = -(need // 2), int(d) + need // 2 + need % 2 - int(c)
            lb = np.random.randint(lo, hi + 1)
            lbs.append(lb)
            ubs.append(lb + int(c))
        return lbs, ubs
