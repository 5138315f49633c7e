"""Partial label maps: annotated boxes hold their classes, everything else the ignore value.

nnU-Net v2 trains on such maps natively when dataset.json declares a label
named ``ignore`` with the highest value. Inside an annotated box every voxel is
labelled: what the annotator did not paint is background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .boxes import Box


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: voxels written inside the box, painted voxels outside it that were dropped."""

    box: Box
    voxels: int
    foreground_voxels: int
    dropped_outside: int


def empty_partial_map(shape: tuple[int, ...], ignore_value: int) -> np.ndarray:
    return np.full(shape, ignore_value, dtype=label_dtype(ignore_value))


def label_dtype(ignore_value: int) -> type:
    return np.uint8 if ignore_value <= np.iinfo(np.uint8).max else np.uint16


def merge_box_annotation(partial: np.ndarray, box: Box, annotation: np.ndarray, n_classes: int) -> MergeResult:
    """Write an annotation of ``box`` into ``partial`` in place.

    ``annotation`` is either the box's own array (shape = box size) or a label
    array of the whole image; in the second case only the box is taken and the
    painted (non-zero) voxels outside it are counted as dropped, so a GUI can warn.
    Values must be classes 0 .. n_classes - 1 (0 = background = unpainted).
    Re-annotating a box replaces it; nothing outside the box changes.
    """
    if not box.fits(partial.shape):
        raise ValueError(f"box {box.coords}+{box.size} of {box.case!r} lies outside the image of shape {partial.shape}")
    annotation = np.asarray(annotation)
    dropped = 0
    if annotation.shape == partial.shape and annotation.shape != box.size:
        outside = np.count_nonzero(annotation)
        inside = annotation[box.slices]
        dropped = int(outside - np.count_nonzero(inside))
        annotation = inside
    elif annotation.shape != box.size:
        raise ValueError(
            f"annotation of {box.case!r} has shape {annotation.shape}; expected the box size {box.size} "
            f"or the image shape {partial.shape}"
        )
    if not np.issubdtype(annotation.dtype, np.integer):
        if not np.array_equal(annotation, np.round(annotation)):
            raise ValueError(f"annotation of {box.case!r} holds non-integer values")
    if annotation.size and (annotation.min() < 0 or annotation.max() >= n_classes):
        raise ValueError(
            f"annotation of {box.case!r} holds values {int(annotation.min())}..{int(annotation.max())}; "
            f"classes are 0..{n_classes - 1}"
        )
    partial[box.slices] = annotation.astype(partial.dtype)
    return MergeResult(box, box.voxels, int(np.count_nonzero(annotation)), dropped)


def annotated_mask(partial: np.ndarray, ignore_value: int) -> np.ndarray:
    return partial != ignore_value
