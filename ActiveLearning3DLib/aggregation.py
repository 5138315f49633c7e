"""Box scores from voxel maps and greedy non-overlapping selection (docs/METHODS.md section 3).

The score of a box is the mean of a voxel map over it, computed exactly for
every corner of a strided grid with a summed-area table (O(voxels)). The last
corner along each axis is always included, so the far edge of an image is
never out of reach whatever the stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .boxes import Box, CornerBlocker, Shape3, effective_patch_size

# Images up to this many voxels are scored at every corner (stride 1).
STRIDE_ONE_MAX_VOXELS = 1 << 22


def default_stride(patch_size: Sequence[int], shape: Sequence[int]) -> Shape3:
    """Stride 1 for small images (Hippocampus-sized); patch // 8 per axis for large ones (CT-sized).

    An eighth of the box keeps neighbouring candidates overlapping by 7/8, so the best
    box is missed by at most 1/16 of its size along an axis.
    """
    if int(np.prod(shape)) <= STRIDE_ONE_MAX_VOXELS:
        return (1, 1, 1)
    return tuple(max(1, int(min(p, d)) // 8) for p, d in zip(patch_size, shape))  # type: ignore[return-value]


def corner_axes(shape: Sequence[int], size: Sequence[int], stride: Sequence[int]) -> list[np.ndarray]:
    """Corner positions along each axis: 0, s, 2s, ... and always the last valid corner D - p.

    A box larger than the image along an axis covers that axis (its only corner is 0).
    """
    axes = []
    for d, p, s in zip(shape, size, stride):
        last = int(d) - min(int(p), int(d))
        a = np.arange(0, last + 1, max(1, int(s)), dtype=np.int64)
        if a[-1] != last:
            a = np.append(a, last)
        axes.append(a)
    return axes


@dataclass
class BoxScores:
    """Scores of all candidate boxes of one image and one map, on the corner grid ``axes``."""

    case: str
    axes: list[np.ndarray]
    size: Shape3
    scores: np.ndarray  # grid shape (len(axes[0]), len(axes[1]), len(axes[2]))

    def box(self, index: Sequence[int]) -> Box:
        return Box(self.case, tuple(int(a[i]) for a, i in zip(self.axes, index)), self.size)  # type: ignore[arg-type]

    def blocker(self) -> CornerBlocker:
        return CornerBlocker(self.axes, self.size)


def box_means(volume: np.ndarray, size: Sequence[int], stride: Sequence[int] = (1, 1, 1)) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean of ``volume`` over every box of ``size`` whose corner lies on the strided grid.

    ``size`` is clipped to the volume (a box covers an axis the image is smaller
    than). Returns the (grid) means and the corner positions per axis.
    """
    if volume.ndim != 3:
        raise ValueError(f"box means need a 3D map, got shape {volume.shape}")
    size = effective_patch_size(size, volume.shape)
    axes = corner_axes(volume.shape, size, stride)
    sat = np.zeros(tuple(d + 1 for d in volume.shape), dtype=np.float64)
    inner = sat[1:, 1:, 1:]
    np.cumsum(volume, axis=0, dtype=np.float64, out=inner)
    np.cumsum(inner, axis=1, out=inner)
    np.cumsum(inner, axis=2, out=inner)
    total = np.zeros([len(a) for a in axes], dtype=np.float64)
    for ez in (0, 1):
        for ey in (0, 1):
            for ex in (0, 1):
                sign = -1.0 if (3 - ez - ey - ex) % 2 else 1.0
                idx = np.ix_(axes[0] + ez * size[0], axes[1] + ey * size[1], axes[2] + ex * size[2])
                total += sign * sat[idx]
    return total / float(np.prod(size)), axes


def score_boxes(case: str, volume: np.ndarray, patch_size: Sequence[int], stride: Sequence[int]) -> BoxScores:
    """Aggregate one voxel map of one case into candidate box scores; NaN or inf in the map is an error."""
    means, axes = box_means(volume, patch_size, stride)
    if not np.isfinite(means).all():
        raise ValueError(f"case {case!r}: the uncertainty map holds NaN or infinite values (check the probabilities)")
    return BoxScores(case, axes, effective_patch_size(patch_size, volume.shape), means.astype(np.float32))


@dataclass
class Pick:
    """A chosen box with the raw box score, the priority it was ranked by, and its stratum."""

    box: Box
    score: float | None
    priority: float
    stratum: str | None = None
    rank: int = 0  # position within its image and stratum (0 = best)


def blocker_for(scores: BoxScores, blocked: Sequence[Box]) -> CornerBlocker:
    """A corner blocker of one image, with every existing box of that case already blocked."""
    blocker = scores.blocker()
    for b in blocked:
        if b.case == scores.case:
            blocker.block(b)
    return blocker


def iter_greedy(scores: BoxScores, priority: np.ndarray, blocker: CornerBlocker) -> Iterator[tuple[int, ...]]:
    """Yield corner-grid indices in descending priority, skipping (and then blocking) overlapping ones.

    Each yielded box is blocked before the next is looked at, so the caller gets
    a non-overlapping sequence and may stop whenever it has enough.
    """
    flat_order = np.argsort(-priority.ravel(), kind="stable")
    blocked = blocker.blocked.reshape(-1)  # a view: blocking a box shows up here at once
    pos, chunk = 0, 1024
    while pos < len(flat_order):
        # Skip blocked candidates a chunk at a time; in small images most are blocked after a few picks.
        free = np.flatnonzero(~blocked[flat_order[pos : pos + chunk]])
        if not len(free):
            pos += chunk
            continue
        pos += int(free[0])
        index = tuple(int(i) for i in np.unravel_index(int(flat_order[pos]), priority.shape))
        blocker.block(scores.box(index))
        pos += 1
        yield index


def greedy_per_image(
    scores: BoxScores,
    n: int,
    blocker: CornerBlocker,
    priority: np.ndarray | None = None,
    stratum: str | None = None,
) -> list[Pick]:
    """Up to ``n`` non-overlapping boxes of one image, best priority first (priority defaults to the score)."""
    priority = scores.scores if priority is None else priority
    picks: list[Pick] = []
    if n <= 0:
        return picks
    for rank, index in enumerate(iter_greedy(scores, priority, blocker)):
        picks.append(Pick(scores.box(index), float(scores.scores[index]), float(priority[index]), stratum, rank))
        if len(picks) >= n:
            break
    return picks


def top_global(picks: Sequence[Pick], count: int, what: str = "query") -> list[Pick]:
    """The best ``count`` picks over all images (per-image picks never overlap, different images never do)."""
    if len(picks) < count:
        raise NotEnoughCandidates(
            f"{what}: only {len(picks)} non-overlapping candidate boxes in the whole pool, {count} asked for; "
            "ask for fewer boxes, use a smaller patch size, or add images"
        )
    order = sorted(range(len(picks)), key=lambda i: (-picks[i].priority, i))
    return [picks[i] for i in order[:count]]


class NotEnoughCandidates(ValueError):
    """Fewer non-overlapping candidate boxes than asked for."""


def log_score(scores: np.ndarray) -> np.ndarray:
    """log of box scores, with a floor so that a zero-uncertainty box is least likely but still finite."""
    return np.log(np.maximum(scores.astype(np.float64), 1e-30))


def gumbel(rng: np.random.Generator, shape: Sequence[int] | int, scale: float) -> np.ndarray:
    """Gumbel(0, scale) noise."""
    return rng.gumbel(0.0, scale, size=shape)
