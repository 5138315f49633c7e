"""Boxes in voxel indices (k, j, i) <-> Slicer's RAS world, through a volume's IJK-to-RAS matrix.

A box covers whole voxels, so its outline runs along the voxel *corners*
(index - 0.5 .. index + size - 0.5), not through the voxel centres. Spacing,
origin and direction all enter through the 4 x 4 IJK-to-RAS matrix, so an
oblique volume gets an oblique box. No Slicer import: plain NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..boxes import Box


@dataclass(frozen=True)
class BoxFrame:
    """A box as an oriented ROI: centre (RAS), edge lengths (mm) along its axes, and those axes (columns)."""

    center: np.ndarray
    size: np.ndarray
    axes: np.ndarray  # 3 x 3, a proper rotation (det +1)

    def object_to_world(self) -> np.ndarray:
        """4 x 4 matrix from the box's own frame (origin at the centre) to RAS."""
        m = np.eye(4)
        m[:3, :3] = self.axes
        m[:3, 3] = self.center
        return m


def box_corners_ijk(box: Box) -> np.ndarray:
    """The 8 outer voxel corners of a box as IJK points (8 x 3)."""
    lo = np.asarray(box.coords[::-1], float) - 0.5  # (k, j, i) -> (i, j, k)
    hi = lo + np.asarray(box.size[::-1], float)
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def ijk_to_ras_points(ijk_to_ras: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.atleast_2d(np.asarray(points, float))
    return points @ np.asarray(ijk_to_ras)[:3, :3].T + np.asarray(ijk_to_ras)[:3, 3]


def ras_to_ijk_points(ijk_to_ras: np.ndarray, points: np.ndarray) -> np.ndarray:
    return ijk_to_ras_points(np.linalg.inv(np.asarray(ijk_to_ras, float)), points)


def box_ras_bounds(box: Box, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Axis-aligned RAS bounds (xmin, xmax, ymin, ymax, zmin, zmax) of the box's corners."""
    ras = ijk_to_ras_points(ijk_to_ras, box_corners_ijk(box))
    return np.stack([ras.min(0), ras.max(0)], axis=1).ravel()


def box_frame(box: Box, ijk_to_ras: np.ndarray) -> BoxFrame:
    """Centre, size and axes of the box in RAS; a mirrored volume axis is flipped (the box is symmetric)."""
    m = np.asarray(ijk_to_ras, float)
    centre_ijk = box.centre[::-1]
    columns = m[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0):
        raise ValueError("the IJK-to-RAS matrix has a zero-length axis")
    axes = columns / spacing
    if np.linalg.det(axes) < 0:
        axes = axes.copy()
        axes[:, 2] = -axes[:, 2]
    return BoxFrame(ijk_to_ras_points(m, centre_ijk)[0], np.asarray(box.size[::-1], float) * spacing, axes)


def voxel_at(ijk_to_ras: np.ndarray, ras: Sequence[float], shape_kji: Sequence[int]) -> tuple[int, int, int] | None:
    """The (k, j, i) voxel containing a RAS point, or None outside the image."""
    ijk = np.rint(ras_to_ijk_points(ijk_to_ras, ras)[0]).astype(int)
    kji = tuple(int(v) for v in ijk[::-1])
    if any(not 0 <= v < n for v, n in zip(kji, shape_kji)):
        return None
    return kji  # type: ignore[return-value]


def lps_to_ras_matrix(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """IJK-to-RAS of an image as SimpleITK (and the project, and nnU-Net) index it: LPS geometry, flipped to RAS."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    m[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


class CaseGrid:
    """The project's voxel grid of a case next to the grid Slicer loaded it on.

    Slicer's reader gives every volume a right-handed IJK-to-RAS: an image whose
    direction is mirrored comes in with its k axis reversed, so Slicer's
    ``arrayFromVolume`` and SimpleITK's array differ by a flip (in general a
    signed axis permutation). Boxes and label arrays are kept in the project's
    (SimpleITK) indexing; arrays crossing to Slicer go through this mapping.
    """

    def __init__(self, project_ijk_to_ras: np.ndarray, slicer_ijk_to_ras: np.ndarray, shape_kji: Sequence[int]):
        self.ijk_to_ras = np.asarray(project_ijk_to_ras, float)
        transform = np.linalg.inv(np.asarray(slicer_ijk_to_ras, float)) @ self.ijk_to_ras  # project ijk -> Slicer ijk
        rotation = np.rint(transform[:3, :3])
        if (
            not np.allclose(transform[:3, :3], rotation, atol=1e-3)
            or sorted(np.abs(rotation).sum(0)) != [1, 1, 1]
            or sorted(np.abs(rotation).sum(1)) != [1, 1, 1]
        ):
            raise ValueError("Slicer loaded the image on a grid that is not a flip or permutation of its own grid")
        # Slicer axis a takes project axis perm[a], with sign signs[a]
        self.perm = [int(np.nonzero(rotation[a])[0][0]) for a in range(3)]
        self.signs = [int(rotation[a, self.perm[a]]) for a in range(3)]
        self.shape = tuple(int(s) for s in shape_kji)

    @property
    def identical(self) -> bool:
        return self.perm == [0, 1, 2] and self.signs == [1, 1, 1]

    def to_slicer(self, array: np.ndarray) -> np.ndarray:
        """A (k, j, i) array on the project's grid, re-indexed as Slicer's ``arrayFromVolume`` has it."""
        if self.identical:
            return array
        ijk = np.transpose(array, (2, 1, 0))
        out = np.transpose(ijk, self.perm)
        flips = tuple(a for a in range(3) if self.signs[a] < 0)
        if flips:
            out = np.flip(out, axis=flips)
        return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))

    def from_slicer(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_slicer`."""
        if self.identical:
            return array
        out = np.transpose(array, (2, 1, 0))
        flips = tuple(a for a in range(3) if self.signs[a] < 0)
        if flips:
            out = np.flip(out, axis=flips)
        out = np.transpose(out, np.argsort(self.perm))
        return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))
