"""Model-free queries: uniform random boxes, nnActive's foreground-aware random baselines and starting budget."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..aggregation import NotEnoughCandidates, Pick, corner_axes
from ..boxes import Box, CornerBlocker, any_overlap, centred_corner
from .base import QueryContext

# Tries per image visit before moving on to the next image of the round robin.
TRIES_PER_VISIT = 20
AREAS_FG33 = ("all", "all", "all", "all", "seg", "border")
AREAS_FG66 = ("all", "seg", "border")


class _Taken:
    """Boxes per case (existing ones and those picked so far), for overlap checks."""

    def __init__(self, blocked: Sequence[Box]):
        self.by_case: dict[str, list[Box]] = {}
        for b in blocked:
            self.add(b)

    def add(self, box: Box) -> None:
        self.by_case.setdefault(box.case, []).append(box)

    def free(self, box: Box) -> bool:
        return not any_overlap(box, self.by_case.get(box.case, ()))


def _uniform_box(ctx: QueryContext, case: str, rng: np.random.Generator) -> Box:
    size = ctx.box_size(case)
    corner = tuple(int(rng.integers(0, d - p + 1)) for d, p in zip(ctx.cases[case], size))
    return Box(case, corner, size)  # type: ignore[arg-type]


def _free_uniform_box(ctx: QueryContext, case: str, rng: np.random.Generator, taken: _Taken) -> Box | None:
    """A uniform box among the candidates of ``case`` (corner grid of its stride) that overlap no taken box."""
    size = ctx.box_size(case)
    axes = corner_axes(ctx.cases[case], size, ctx.stride_for(case))
    blocker = CornerBlocker(axes, size)
    for b in taken.by_case.get(case, ()):
        blocker.block(b)
    free = np.flatnonzero(~blocker.blocked)
    if not free.size:
        return None
    index = np.unravel_index(int(free[int(rng.integers(free.size))]), blocker.blocked.shape)
    return Box(case, tuple(int(a[i]) for a, i in zip(axes, index)), size)  # type: ignore[arg-type]


def _round_robin(
    ctx: QueryContext,
    count: int,
    rng: np.random.Generator,
    propose: Callable[[str], tuple[Box, str]],
    taken: _Taken,
    method: str,
    picks: list[Pick] | None = None,
) -> list[Pick]:
    """Visit images in shuffled round robin; each visit tries a few proposals and keeps the first free one.

    When every proposal of a visit overlaps, the visit takes a uniform box among the
    image's free candidates instead (a nearly covered image is not given up early);
    an image without any free candidate is dropped from the rotation. When no image
    is left before ``count`` boxes are found, the query fails clearly.
    """
    picks = [] if picks is None else picks
    active = [str(c) for c in rng.permutation(sorted(ctx.cases))]
    while len(picks) < count:
        if not active:
            raise NotEnoughCandidates(
                f"{method}: found only {len(picks)} free boxes in the pool ({count} asked for); "
                "the images are nearly covered by boxes"
            )
        still = []
        for case in active:
            if len(picks) >= count:
                still.append(case)
                continue
            found: tuple[Box, str] | None = None
            for _ in range(TRIES_PER_VISIT):
                box, area = propose(case)
                if taken.free(box):
                    found = box, area
                    break
            else:
                box = _free_uniform_box(ctx, case, rng, taken)
                found = None if box is None else (box, "all")
            if found is not None:
                taken.add(found[0])
                picks.append(Pick(found[0], None, float(-len(picks)), found[1]))
                still.append(case)
        active = still
    return picks


def select_random(ctx: QueryContext, count: int) -> list[Pick]:
    rng = ctx.rng("random")
    return _round_robin(ctx, count, rng, lambda case: (_uniform_box(ctx, case, rng), "all"), _Taken(ctx.blocked), "random")


class _ForegroundSampler:
    """Draws box centres on foreground voxels or on their inner border shell, per case, from the ground truth."""

    def __init__(self, ctx: QueryContext, rng: np.random.Generator):
        self.ctx = ctx
        self.rng = rng
        self._voxels: dict[tuple[str, int, str], np.ndarray] = {}
        self._present: dict[str, list[int]] = {}

    def present(self, case: str) -> list[int]:
        from scipy import ndimage  # here, not at import: the panel lists the methods before scipy is installed

        if case not in self._present:
            gt = self.ctx.ground_truth(case)  # type: ignore[misc]
            if tuple(gt.shape) != tuple(self.ctx.cases[case]):
                raise ValueError(f"ground truth of {case!r} has shape {gt.shape}, image has {self.ctx.cases[case]}")
            values = set(np.unique(gt).tolist())
            self._present[case] = [c for c in self.ctx.foreground_classes if c in values]
            for c in self._present[case]:
                mask = gt == c
                self._voxels[(case, c, "seg")] = np.argwhere(mask)
                border = mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1))  # radius-1 ball
                self._voxels[(case, c, "border")] = np.argwhere(border)
        return self._present[case]

    def voxels_of_label(self, case: str, label: int) -> np.ndarray:
        return np.argwhere(self.ctx.ground_truth(case) == label)  # type: ignore[misc]

    def centred(self, case: str, centre: Sequence[int]) -> Box:
        size = self.ctx.box_size(case)
        return Box(case, centred_corner(centre, size, self.ctx.cases[case]), size)

    def propose(self, case: str, areas: Sequence[str]) -> tuple[Box, str]:
        area = str(areas[int(self.rng.integers(len(areas)))])
        classes = self.present(case) if area != "all" else []
        if not classes:  # no foreground in this image: fall back to a uniform box (nnActive crashes here)
            return _uniform_box(self.ctx, case, self.rng), "all"
        c = classes[int(self.rng.integers(len(classes)))]
        voxels = self._voxels[(case, c, area)]
        centre = voxels[int(self.rng.integers(len(voxels)))]
        return self.centred(case, centre), f"{area}:{c}"


def _select_fg(areas: Sequence[str], name: str) -> Callable[[QueryContext, int], list[Pick]]:
    def select(ctx: QueryContext, count: int) -> list[Pick]:
        rng = ctx.rng(name)
        sampler = _ForegroundSampler(ctx, rng)
        return _round_robin(ctx, count, rng, lambda case: sampler.propose(case, areas), _Taken(ctx.blocked), name)

    select.__doc__ = f"Foreground-aware random boxes, sampling areas drawn from {list(areas)}."
    return select


select_random_fg33 = _select_fg(AREAS_FG33, "random_fg33")
select_random_fg66 = _select_fg(AREAS_FG66, "random_fg66")


def select_nnactive_start(ctx: QueryContext, count: int) -> list[Pick]:
    """nnActive's simulated starting budget (docs/METHODS.md section 5).

    For every label including background, rarest first (by voxels in the pool:
    ``label_counts``, or counted in the ground truth when not given), two boxes
    centred on random voxels of that label, each in an image not used before;
    the rest of the budget is filled with ``random_fg33``.
    """
    rng = ctx.rng("nnactive_start")
    sampler = _ForegroundSampler(ctx, rng)
    taken = _Taken(ctx.blocked)
    labels = [0, *ctx.foreground_classes]
    counts = ctx.label_counts
    if counts is None:
        counts = {}
        for case in sorted(ctx.cases):
            values, sizes = np.unique(np.asarray(ctx.ground_truth(case)), return_counts=True)  # type: ignore[misc]
            counts[case] = {int(v): int(n) for v, n in zip(values, sizes)}
    totals = {c: sum(int(counts.get(case, {}).get(c, 0)) for case in ctx.cases) for c in labels}
    used: set[str] = set()
    picks: list[Pick] = []
    for label in sorted(labels, key=lambda c: (totals[c], c)):
        for _ in range(2):
            if len(picks) >= count:
                break
            candidates = [c for c in sorted(ctx.cases) if c not in used and counts.get(c, {}).get(label, 0) > 0]
            if not candidates:
                break
            case = candidates[int(rng.integers(len(candidates)))]
            used.add(case)
            voxels = sampler.voxels_of_label(case, label)
            for _try in range(TRIES_PER_VISIT):
                box = sampler.centred(case, voxels[int(rng.integers(len(voxels)))])
                if taken.free(box):
                    taken.add(box)
                    picks.append(Pick(box, None, float(-len(picks)), f"label:{label}"))
                    break
    return _round_robin(ctx, count, rng, lambda case: sampler.propose(case, AREAS_FG33), taken, "nnactive_start", picks)
