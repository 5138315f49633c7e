"""Known-answer tests for box aggregation, greedy selection (docs/METHODS.md section 3) and boxes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ActiveLearning3DLib.aggregation import (
    STRIDE_ONE_MAX_VOXELS,
    NotEnoughCandidates,
    Pick,
    blocker_for,
    box_means,
    corner_axes,
    default_stride,
    greedy_per_image,
    score_boxes,
    top_global,
)
from ActiveLearning3DLib.boxes import Box, CornerBlocker, centred_corner, effective_patch_size

# ---------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------


def test_box_overlap_known_answers():
    a = Box("c", (0, 0, 0), (4, 4, 4))
    assert a.overlaps(Box("c", (3, 3, 3), (2, 2, 2)))  # shares voxel (3, 3, 3)
    assert not a.overlaps(Box("c", (4, 0, 0), (4, 4, 4)))  # touching faces share no voxel
    assert not a.overlaps(Box("c", (0, 0, 4), (4, 4, 4)))
    assert not a.overlaps(Box("d", (0, 0, 0), (4, 4, 4)))  # another case
    assert a.overlaps(Box("c", (1, 1, 1), (1, 1, 1)))  # contained
    assert Box("c", (1, 2, 3), (2, 3, 4)).upper == (3, 5, 7)
    assert Box("c", (1, 2, 3), (2, 3, 4)).voxels == 24
    assert Box("c", (0, 0, 0), (4, 4, 4)).fits((4, 5, 6))
    assert not Box("c", (1, 0, 0), (4, 4, 4)).fits((4, 5, 6))
    assert Box("hippo_001", (1, 2, 3), (4, 5, 6)).to_patch() == {
        "file": "hippo_001.nii.gz",
        "coords": [1, 2, 3],
        "size": [4, 5, 6],
    }
    with pytest.raises(ValueError):
        Box("c", (-1, 0, 0), (2, 2, 2))
    with pytest.raises(ValueError):
        Box("c", (0, 0, 0), (2, 0, 2))
    with pytest.raises(ValueError):
        Box("c", (0, 0), (2, 2))


def test_centred_corner_and_effective_patch_size():
    assert centred_corner((8, 8, 8), (5, 5, 5), (20, 20, 20)) == (6, 6, 6)
    assert centred_corner((8, 8, 8), (4, 4, 4), (20, 20, 20)) == (6, 6, 6)  # voxel 8 = corner + size // 2
    assert centred_corner((1, 0, 19), (5, 5, 5), (20, 20, 20)) == (0, 0, 15)  # shifted inside
    assert centred_corner((2, 3, 4), (3, 7, 5), (3, 7, 5)) == (0, 0, 0)  # box = image
    assert effective_patch_size((64, 64, 64), (30, 100, 64)) == (30, 64, 64)
    # The centre voxel always lies inside the shifted box.
    for centre in itertools.product(range(7), repeat=3):
        corner = centred_corner(centre, (3, 4, 7), (7, 7, 7))
        box = Box("c", corner, (3, 4, 7))
        assert box.fits((7, 7, 7))
        assert box.overlaps(Box("c", centre, (1, 1, 1)))


def test_corner_blocker_matches_brute_force_overlap():
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = tuple(int(d) for d in rng.integers(3, 14, size=3))
        size = tuple(int(min(p, d)) for p, d in zip(rng.integers(1, 6, size=3), shape))
        stride = tuple(int(s) for s in rng.integers(1, 4, size=3))
        axes = corner_axes(shape, size, stride)
        blocker = CornerBlocker(axes, size)
        existing = []
        for _ in range(int(rng.integers(1, 4))):
            bsize = tuple(int(s) for s in rng.integers(1, 7, size=3))
            corner = tuple(int(rng.integers(0, d)) for d in shape)
            existing.append(Box("c", corner, bsize))
            blocker.block(existing[-1])
        for index in itertools.product(*[range(len(a)) for a in axes]):
            box = Box("c", tuple(int(a[i]) for a, i in zip(axes, index)), size)
            assert blocker.is_blocked(index) == any(box.overlaps(b) for b in existing), (shape, size, stride, index)


# ---------------------------------------------------------------------------
# strides and corners
# ---------------------------------------------------------------------------


def test_default_stride():
    assert default_stride((40, 56, 40), (36, 50, 35)) == (1, 1, 1)  # Hippocampus-sized
    assert default_stride((64, 64, 64), (512, 512, 100)) == (8, 8, 8)  # CT-sized
    assert default_stride((64, 128, 128), (600, 600, 30)) == (8, 16, 3)  # patch clipped to the axis first
    assert default_stride((4, 4, 4), (600, 600, 30)) == (1, 1, 1)  # never 0
    edge = (STRIDE_ONE_MAX_VOXELS, 1, 1)
    assert default_stride((64, 64, 64), edge) == (1, 1, 1)
    assert default_stride((64, 64, 64), (STRIDE_ONE_MAX_VOXELS + 1, 1, 1)) == (8, 1, 1)


def _expected_axis(d: int, p: int, s: int) -> list[int]:
    p = min(p, d)
    out = list(range(0, d - p + 1, s))
    if out[-1] != d - p:
        out.append(d - p)
    return out


def test_corner_axes_known_answers():
    axes = corner_axes((10, 10, 10), (4, 3, 10), (3, 2, 5))
    assert [a.tolist() for a in axes] == [[0, 3, 6], [0, 2, 4, 6, 7], [0]]
    axes = corner_axes((9, 5, 7), (2, 5, 1), (4, 1, 7))
    assert [a.tolist() for a in axes] == [[0, 4, 7], [0], [0, 6]]
    axes = corner_axes((6, 6, 6), (2, 2, 2), (0, 1, 1))  # stride 0 is treated as 1
    assert axes[0].tolist() == [0, 1, 2, 3, 4]


def test_corner_axes_box_larger_than_image_covers_the_axis():
    axes = corner_axes((3, 10, 4), (8, 4, 4), (2, 3, 1))
    assert [a.tolist() for a in axes] == [[0], [0, 3, 6], [0]]


# ---------------------------------------------------------------------------
# box means against brute force
# ---------------------------------------------------------------------------


CASES = [
    ((7, 5, 6), (3, 2, 4), (1, 1, 1)),
    ((7, 5, 6), (3, 2, 4), (2, 2, 2)),
    ((7, 5, 6), (3, 2, 4), (3, 1, 2)),
    ((10, 3, 8), (8, 2, 2), (2, 3, 5)),
    ((4, 9, 3), (6, 4, 5), (1, 2, 3)),  # box larger than the image along z and x
    ((5, 5, 5), (1, 1, 1), (2, 2, 2)),
    ((6, 7, 8), (6, 7, 8), (1, 1, 1)),  # one box = the whole image
    ((11, 6, 9), (4, 3, 2), (3, 4, 7)),
]


@pytest.mark.parametrize("shape,size,stride", CASES)
def test_box_means_brute_force(shape, size, stride):
    rng = np.random.default_rng(sum(shape) * 31 + sum(stride))
    volume = rng.normal(size=shape).astype(np.float32) + 2.0
    means, axes = box_means(volume, size, stride)
    expected_axes = [_expected_axis(d, p, s) for d, p, s in zip(shape, size, stride)]
    assert [a.tolist() for a in axes] == expected_axes
    for d, p, a in zip(shape, size, axes):
        assert a[-1] == d - min(p, d)  # the far edge is always reachable
    eff = [min(p, d) for p, d in zip(size, shape)]
    assert means.shape == tuple(len(a) for a in expected_axes)
    for i, z in enumerate(expected_axes[0]):
        for j, y in enumerate(expected_axes[1]):
            for k, x in enumerate(expected_axes[2]):
                block = volume[z : z + eff[0], y : y + eff[1], x : x + eff[2]].astype(np.float64)
                assert block.size == np.prod(eff)
                assert means[i, j, k] == pytest.approx(block.mean(), rel=1e-9, abs=1e-9)


def test_box_means_large_offset_stays_exact():
    # A large constant offset must not swamp small differences (float64 summed-area table).
    volume = np.full((12, 12, 12), 1000.0, dtype=np.float32)
    volume[5:8, 5:8, 5:8] += 0.001
    means, axes = box_means(volume, (3, 3, 3), (1, 1, 1))
    best = np.unravel_index(int(np.argmax(means)), means.shape)
    assert tuple(int(a[i]) for a, i in zip(axes, best)) == (5, 5, 5)


def test_box_means_needs_3d():
    with pytest.raises(ValueError, match="3D"):
        box_means(np.zeros((4, 4)), (2, 2, 2))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the table
def test_score_boxes_boxes_and_nan_error():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    scores = score_boxes("c1", volume, (8, 2, 3), (1, 2, 2))
    assert scores.size == (4, 2, 3)
    assert scores.scores.dtype == np.float32
    box = scores.box((0, 1, 1))
    assert box == Box("c1", (0, 2, 2), (4, 2, 3))
    assert scores.scores[0, 1, 1] == pytest.approx(volume[box.slices].mean())

    for bad in (np.nan, np.inf, -np.inf):
        v = np.ones((9, 9, 9), dtype=np.float32)
        v[8, 8, 8] = bad  # only the last corner's box covers it with stride 3
        with pytest.raises(ValueError, match="'c2'.*NaN"):
            score_boxes("c2", v, (3, 3, 3), (3, 3, 3))
        v = np.ones((9, 9, 9), dtype=np.float32)
        v[0, 4, 2] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            score_boxes("c2", v, (2, 2, 2), (1, 1, 1))


# ---------------------------------------------------------------------------
# greedy selection
# ---------------------------------------------------------------------------


def _brute_greedy(scores, n: int, blocked: list[Box], priority: np.ndarray) -> list[Box]:
    """Greedy by descending priority (ties by corner-grid order), skipping any overlap."""
    grid = list(itertools.product(*[range(len(a)) for a in scores.axes]))
    order = sorted(range(len(grid)), key=lambda f: (-float(priority[grid[f]]), f))
    taken: list[Box] = []
    for f in order:
        box = scores.box(grid[f])
        if any(box.overlaps(b) for b in blocked + taken):
            continue
        taken.append(box)
        if len(taken) == n:
            break
    return taken


def _random_blocked(rng: np.random.Generator, case: str, shape, k: int) -> list[Box]:
    out: list[Box] = []
    while len(out) < k:
        size = tuple(int(s) for s in rng.integers(1, 6, size=3))
        corner = tuple(int(rng.integers(0, d)) for d in shape)
        box = Box(case, corner, size)
        if not any(box.overlaps(b) for b in out):
            out.append(box)
    return out


def test_greedy_per_image_random_property():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        shape = tuple(int(d) for d in rng.integers(4, 13, size=3))
        patch = tuple(int(p) for p in rng.integers(2, 7, size=3))
        stride = tuple(int(s) for s in rng.integers(1, 4, size=3))
        volume = rng.random(shape).astype(np.float32)
        scores = score_boxes("c", volume, patch, stride)
        blocked = _random_blocked(rng, "c", shape, int(rng.integers(0, 4)))
        blocked += [Box("other", (0, 0, 0), tuple(int(d) for d in shape))]  # another case never blocks
        n = int(rng.integers(1, 8))
        use_priority = seed % 2 == 1
        priority = rng.gumbel(size=scores.scores.shape) if use_priority else scores.scores
        picks = greedy_per_image(scores, n, blocker_for(scores, blocked), priority if use_priority else None, "pe")

        boxes = [p.box for p in picks]
        assert boxes == _brute_greedy(scores, n, [b for b in blocked if b.case == "c"], priority), seed
        assert len(picks) <= n  # fewer only when every other candidate overlaps (checked by the brute force)
        for i, p in enumerate(picks):
            assert p.rank == i and p.stratum == "pe"
            assert p.box.fits(shape) and p.box.size == effective_patch_size(patch, shape)
            assert p.box.case == "c"
            assert p.score == pytest.approx(float(volume[p.box.slices].mean()), rel=1e-5)
            assert not any(p.box.overlaps(b) for b in blocked)
            assert not any(p.box.overlaps(q.box) for q in picks[:i])
        priorities = [p.priority for p in picks]
        assert priorities == sorted(priorities, reverse=True)


def test_greedy_per_image_known_answer():
    volume = np.zeros((10, 4, 4), dtype=np.float32)
    volume[2:6] = 1.0  # best box of height 4: z = 2
    volume[7:10] = 0.5
    scores = score_boxes("c", volume, (4, 4, 4), (1, 1, 1))
    picks = greedy_per_image(scores, 5, blocker_for(scores, []))
    # z = 2 first; then overlapping corners (z = -1 .. 5) are blocked: only z = 6 remains.
    assert [p.box.coords for p in picks] == [(2, 0, 0), (6, 0, 0)]
    assert picks[0].score == pytest.approx(1.0)
    assert picks[1].score == pytest.approx(0.375)  # voxels 6..9: 0, .5, .5, .5
    # an existing box at z = 1..2 blocks z = 2; the best free corner is then z = 3 (mean 0.75)
    picks = greedy_per_image(scores, 1, blocker_for(scores, [Box("c", (1, 0, 0), (2, 1, 1))]))
    assert picks[0].box.coords == (3, 0, 0)
    assert greedy_per_image(scores, 0, blocker_for(scores, [])) == []


def test_top_global_and_not_enough_candidates():
    priorities = [0.3, 2.0, -1.0, 2.0, 0.5]
    picks = [Pick(Box(f"c{i}", (0, 0, 0), (1, 1, 1)), float(i), prio) for i, prio in enumerate(priorities)]
    best = top_global(picks, 3)
    assert [p.box.case for p in best] == ["c1", "c3", "c4"]  # ties keep the pool order
    assert len(top_global(picks, 5)) == 5
    with pytest.raises(NotEnoughCandidates, match="only 5 .* 6 asked") as e:
        top_global(picks, 6, "bald")
    assert "bald" in str(e.value)
    assert isinstance(e.value, ValueError)
