"""Query boxes: axis-aligned boxes in an image's own voxel grid, in (k, j, i) order.

A box is stored as its lower corner and its size, exactly as nnActive's loop
files store a patch, so loop files stay readable by nnActive tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of a case: lower corner ``coords`` and ``size`` (k, j, i)."""

    case: str
    coords: Shape3
    size: Shape3

    def __post_init__(self) -> None:
        object.__setattr__(self, "coords", tuple(int(c) for c in self.coords))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if len(self.coords) != 3 or len(self.size) != 3:
            raise ValueError(f"box of {self.case!r} needs 3 coordinates and 3 sizes, got {self.coords} {self.size}")
        if min(self.size) < 1 or min(self.coords) < 0:
            raise ValueError(f"box of {self.case!r} has a negative corner or an empty size: {self.coords} {self.size}")

    @property
    def upper(self) -> Shape3:
        """Exclusive upper corner."""
        return tuple(c + s for c, s in zip(self.coords, self.size))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(c, c + s) for c, s in zip(self.coords, self.size))  # type: ignore[return-value]

    @property
    def centre(self) -> np.ndarray:
        """Centre (k, j, i) in voxel coordinates: the middle voxel, or between two for an even size."""
        return np.asarray(self.coords, float) + (np.asarray(self.size, float) - 1) / 2

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))

    def overlaps(self, other: "Box") -> bool:
        """True when both boxes belong to the same case and share at least one voxel."""
        if other.case != self.case:
            return False
        return all(a0 < b1 and b0 < a1 for a0, a1, b0, b1 in zip(self.coords, self.upper, other.coords, other.upper))

    def fits(self, shape: Sequence[int]) -> bool:
        return all(u <= d for u, d in zip(self.upper, shape))

    def to_patch(self) -> dict:
        """The nnActive loop-file entry (file name, corner, size)."""
        return {"file": f"{self.case}.nii.gz", "coords": list(self.coords), "size": list(self.size)}


def effective_patch_size(patch_size: Sequence[int], shape: Sequence[int]) -> Shape3:
    """The box size used in an image: where the image is smaller than the patch, the box covers that axis."""
    return tuple(int(min(p, d)) for p, d in zip(patch_size, shape))  # type: ignore[return-value]


def centred_corner(centre: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> Shape3:
    """Lower corner of a box of ``size`` centred on voxel ``centre``, shifted to lie inside ``shape``."""
    return tuple(int(min(max(c - s // 2, 0), d - s)) for c, s, d in zip(centre, size, shape))  # type: ignore[return-value]


def any_overlap(box: Box, others: Iterable[Box]) -> bool:
    return any(box.overlaps(o) for o in others)


class CornerBlocker:
    """Marks which candidate corners of one image are blocked by boxes already taken.

    Candidates are boxes of one size whose corners lie on a strided grid
    (``axes[d]`` holds the corner positions along axis d). A candidate with corner
    c overlaps a box [b0, b0 + q) along an axis iff b0 - p < c < b0 + q, so each
    taken box blocks one rectangular block of the corner grid; checking a candidate
    is then a single lookup, and greedy selection stays linear in the candidates.
    """

    def __init__(self, axes: Sequence[np.ndarray], size: Sequence[int]):
        self.axes = [np.asarray(a) for a in axes]
        self.size = tuple(int(s) for s in size)
        self.blocked = np.zeros([len(a) for a in self.axes], dtype=bool)

    def block(self, box: Box) -> None:
        region = []
        for axis, p, b0, q in zip(self.axes, self.size, box.coords, box.size):
            lo = int(np.searchsorted(axis, b0 - p, side="right"))
            hi = int(np.searchsorted(axis, b0 + q, side="left"))
            if hi <= lo:
                return
            region.append(slice(lo, hi))
        self.blocked[tuple(region)] = True

    def is_blocked(self, index: Sequence[int]) -> bool:
        return bool(self.blocked[tuple(index)])
