"""Known-answer and property tests for the query methods (docs/METHODS.md sections 4 and 5)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import brentq

from ActiveLearning3DLib.aggregation import NotEnoughCandidates, Pick
from ActiveLearning3DLib.boxes import Box, effective_patch_size
from ActiveLearning3DLib.query_methods import METHODS, QueryContext, clasp_beta, get_method
from ActiveLearning3DLib.query_methods import clasp
from ActiveLearning3DLib.query_methods.clasp import fill_from_strata, global_quotas, per_image_quotas
from ActiveLearning3DLib.embeddings import EmbeddingSet
from ActiveLearning3DLib.embeddings.autoencoder import candidate_boxes
from ActiveLearning3DLib.uncertainty import MemoryProbabilities

MODEL_METHODS = ["clasp_pe", "pe", "bald", "power_pe", "power_bald", "softrank_bald", "pe_spatial"]
GT_METHODS = ["random_fg33", "random_fg66", "nnactive_start"]
EMBEDDING_METHODS = ["cluster", "cscs"]
SEEDED_METHODS = [
    "clasp_pe",
    "power_pe",
    "power_bald",
    "softrank_bald",
    "random",
    "random_fg33",
    "random_fg66",
    "nnactive_start",
    "cluster",
    "cscs",
]

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _random_probabilities(rng: np.random.Generator, members: int, n_classes: int, shape) -> list[np.ndarray]:
    out = []
    for _ in range(members):
        raw = rng.gamma(0.3, size=(n_classes, *shape)) + 1e-6
        out.append((raw / raw.sum(axis=0, keepdims=True)).astype(np.float32))
    return out


def _random_ground_truth(rng: np.random.Generator, shape, classes) -> np.ndarray:
    """Blobs of each class on a background, so that classes have a border and an interior."""
    gt = np.zeros(shape, dtype=np.uint8)
    for c in classes:
        for _ in range(int(rng.integers(0, 3))):
            lo = [int(rng.integers(0, d)) for d in shape]
            hi = [min(d, low + int(rng.integers(1, 5))) for low, d in zip(lo, shape)]
            gt[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = c
    return gt


def _label_counts(gts: dict[str, np.ndarray], labels) -> dict[str, dict[int, int]]:
    return {case: {int(c): int((gt == c).sum()) for c in labels} for case, gt in gts.items()}


def _random_blocked(rng: np.random.Generator, cases: dict, patch, per_case: int) -> list[Box]:
    out: list[Box] = []
    for case, shape in cases.items():
        size = effective_patch_size(patch, shape)
        for _ in range(per_case):
            corner = tuple(int(rng.integers(0, d - p + 1)) for d, p in zip(shape, size))
            box = Box(case, corner, size)
            if not any(box.overlaps(b) for b in out):
                out.append(box)
    return out


def _random_context(seed: int, blocked_per_case: int = 2, loop: int = 2) -> QueryContext:
    """A small random pool: probabilities, ground truth and existing boxes."""
    rng = np.random.default_rng(1000 + seed)
    classes = [1, 2] if seed % 3 else [1, 2, 3]
    patch = tuple(int(p) for p in rng.integers(3, 6, size=3))
    cases = {}
    for i in range(int(rng.integers(2, 5))):
        shape = tuple(int(d) for d in rng.integers(8, 15, size=3))
        if i == 0:
            shape = (2, *shape[1:])  # smaller than the patch along z: boxes cover the axis
        cases[f"case_{i:03d}"] = shape
    members = int(rng.integers(1, 4))
    arrays: dict[str, dict[str, np.ndarray]] = {f"m{m}": {} for m in range(members)}
    gts = {}
    for case, shape in cases.items():
        for m, p in enumerate(_random_probabilities(rng, members, len(classes) + 1, shape)):
            arrays[f"m{m}"][case] = p
        gts[case] = _random_ground_truth(rng, shape, classes)
    candidates = [b for case, shape in cases.items() for b in candidate_boxes(case, shape, patch, None)]
    embeddings = EmbeddingSet(candidates, rng.normal(size=(len(candidates), 6)), rng.random(len(candidates)))
    return QueryContext(
        cases=cases,
        patch_size=patch,
        foreground_classes=classes,
        seed=seed,
        loop=loop,
        total_loops=5,
        blocked=_random_blocked(rng, cases, patch, blocked_per_case),
        probabilities=MemoryProbabilities(arrays),
        ground_truth=gts.__getitem__,
        label_counts=_label_counts(gts, [0, *classes]),
        embeddings=embeddings,
    )


def _signature(picks: list[Pick]) -> list[tuple]:
    return [(p.box.case, p.box.coords, p.box.size, p.stratum) for p in picks]


def _assert_valid(picks: list[Pick], ctx: QueryContext, count: int, what: str) -> None:
    assert len(picks) == count, what
    for i, p in enumerate(picks):
        assert p.box.case in ctx.cases, what
        assert p.box.size == ctx.box_size(p.box.case), what
        assert p.box.fits(ctx.cases[p.box.case]), what
        for b in ctx.blocked:
            assert not p.box.overlaps(b), f"{what}: {p.box} overlaps existing {b}"
        for q in picks[:i]:
            assert not p.box.overlaps(q.box), f"{what}: {p.box} overlaps {q.box}"


# ---------------------------------------------------------------------------
# registry and refusals
# ---------------------------------------------------------------------------


def test_registry_and_unknown_method_lists_choices():
    assert set(METHODS) == set(MODEL_METHODS) | set(GT_METHODS) | set(EMBEDDING_METHODS) | {"random"}
    for name in EMBEDDING_METHODS:
        assert METHODS[name].needs_embeddings and not METHODS[name].needs_model and not METHODS[name].needs_ground_truth
    for name in MODEL_METHODS:
        assert METHODS[name].needs_model and not METHODS[name].needs_ground_truth
    for name in GT_METHODS:
        assert METHODS[name].needs_ground_truth and METHODS[name].simulation_only and not METHODS[name].needs_model
    assert not METHODS["random"].needs_model and not METHODS["random"].needs_ground_truth
    assert get_method("clasp_pe") is METHODS["clasp_pe"]
    with pytest.raises(ValueError, match="'nope'") as e:
        get_method("nope")
    for name in METHODS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "name, missing, needed",
    [(n, "ground_truth", "ground truth") for n in GT_METHODS]
    + [(n, "probabilities", "probabilities") for n in MODEL_METHODS]
    + [(n, "embeddings", "embeddings") for n in EMBEDDING_METHODS],
)
def test_methods_refuse_without_what_they_need(name, missing, needed):
    ctx = _random_context(1)
    setattr(ctx, missing, None)
    with pytest.raises(ValueError, match=name) as e:
        get_method(name)(ctx, 2)
    assert needed in str(e.value)
    if missing == "probabilities":
        with pytest.raises(ValueError, match="probabilities"):
            METHODS[name].select(ctx, 2)  # the method itself refuses too, not only the registry


@pytest.mark.parametrize("name", sorted(METHODS))
def test_count_must_be_positive(name):
    with pytest.raises(ValueError, match=name):
        get_method(name)(_random_context(1), 0)


def test_probability_shape_error_names_member_and_case():
    ctx = _random_context(2)
    case = sorted(ctx.cases)[-1]
    arrays = ctx.probabilities.arrays
    arrays["m0"][case] = arrays["m0"][case][:, :-1]
    with pytest.raises(ValueError, match=f"'m0'.*'{case}'"):
        get_method("pe")(ctx, 2)


# ---------------------------------------------------------------------------
# no overlap, ever (property test over many seeds)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_box_overlaps_another_or_an_existing_box(name):
    method = METHODS[name]
    for seed in range(12):
        ctx = _random_context(seed, blocked_per_case=1 + seed % 3)
        count = 1 + seed % 5
        picks = method.select(ctx, count)  # the selection itself, not only the registry's guard
        _assert_valid(picks, ctx, count, f"{name} seed {seed}")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_not_enough_candidates_is_a_clear_error(name):
    # Three images exactly one patch in size: three candidate boxes in the whole pool, one already taken.
    rng = np.random.default_rng(0)
    cases = {f"c{i}": (4, 4, 4) for i in range(3)}
    probs = {"m0": {c: _random_probabilities(rng, 1, 2, s)[0] for c, s in cases.items()}}
    ctx = QueryContext(
        cases=cases,
        patch_size=(4, 4, 4),
        foreground_classes=[1],
        seed=0,
        loop=1,
        blocked=[Box("c1", (1, 1, 1), (1, 1, 1))],
        probabilities=MemoryProbabilities(probs),
        ground_truth=lambda case: np.ones(cases[case], dtype=np.uint8),
        label_counts={c: {0: 0, 1: 64} for c in cases},
        embeddings=EmbeddingSet([Box(c, (0, 0, 0), (4, 4, 4)) for c in cases], rng.normal(size=(3, 2)), rng.random(3)),
    )
    picks = get_method(name)(ctx, 2)
    assert sorted(p.box.case for p in picks) == ["c0", "c2"]
    with pytest.raises(NotEnoughCandidates, match=f"{name}.*only 2"):
        get_method(name)(ctx, 3)


# ---------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_same_query(name):
    a = METHODS[name].select(_random_context(4), 4)
    b = METHODS[name].select(_random_context(4), 4)
    assert _signature(a) == _signature(b)
    assert [p.priority for p in a] == [p.priority for p in b]


@pytest.mark.parametrize("name", SEEDED_METHODS)
def test_different_seed_different_query(name):
    base = _random_context(4)
    other = _random_context(4)
    other.seed = 5  # same pool, another seed
    assert _signature(METHODS[name].select(base, 4)) != _signature(METHODS[name].select(other, 4))


@pytest.mark.parametrize("name", ["pe", "bald"])
def test_greedy_methods_ignore_the_seed(name):
    other = _random_context(4)
    other.seed = 5
    assert _signature(METHODS[name].select(_random_context(4), 4)) == _signature(METHODS[name].select(other, 4))


# ---------------------------------------------------------------------------
# greedy PE and BALD known answers
# ---------------------------------------------------------------------------


def _blob_member(shape, centre, peak: float, sigma: float) -> np.ndarray:
    """Two-class probabilities whose entropy peaks at ``centre`` and decays radially."""
    grid = np.indices(shape, dtype=np.float64)
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    p1 = peak * np.exp(-r2 / (2 * sigma**2))
    return np.stack([1 - p1, p1]).astype(np.float32)


def test_pe_picks_the_box_centred_on_a_planted_blob():
    shape = (20, 18, 16)
    strong = _blob_member(shape, (11, 6, 9), 0.5, 3.0)
    weak = _blob_member(shape, (5, 5, 5), 0.2, 3.0)
    probs = MemoryProbabilities({"m0": {"a": weak, "b": strong}, "m1": {"a": weak, "b": strong}})
    ctx = QueryContext(cases={"a": shape, "b": shape}, patch_size=(5, 5, 5), foreground_classes=[1], seed=0, probabilities=probs)
    picks = get_method("pe")(ctx, 1)
    assert picks[0].box == Box("b", (9, 4, 7), (5, 5, 5))  # centre voxel (11, 6, 9)
    # Two boxes, one per image allowed each: both blobs' centred boxes.
    ctx.n_per_image = 1
    picks = get_method("pe")(ctx, 2)
    assert [p.box for p in picks] == [Box("b", (9, 4, 7), (5, 5, 5)), Box("a", (3, 3, 3), (5, 5, 5))]
    assert picks[0].score > picks[1].score
    # An existing box on the strong blob's best box pushes the pick off it, never onto it.
    ctx.blocked = [Box("b", (11, 6, 9), (1, 1, 1))]
    ctx.n_per_image = None
    picks = get_method("pe")(ctx, 1)
    assert not picks[0].box.overlaps(ctx.blocked[0])


def test_bald_prefers_disagreement_over_uniform_uncertainty():
    shape = (12, 12, 12)
    a = np.zeros((2, *shape), dtype=np.float32)
    a[0] = 1.0
    b = a.copy()
    # region A (corner (1,1,1)): members disagree, PE slightly below log 2, BALD large
    a[:, 1:5, 1:5, 1:5] = np.array([0.95, 0.05]).reshape(2, 1, 1, 1)
    b[:, 1:5, 1:5, 1:5] = np.array([0.15, 0.85]).reshape(2, 1, 1, 1)
    # region B (corner (7,7,7)): every member is uniformly uncertain, PE = log 2, BALD = 0
    a[:, 7:11, 7:11, 7:11] = 0.5
    b[:, 7:11, 7:11, 7:11] = 0.5
    probs = MemoryProbabilities({"m0": {"c": a}, "m1": {"c": b}})
    ctx = QueryContext(cases={"c": shape}, patch_size=(4, 4, 4), foreground_classes=[1], seed=0, probabilities=probs)
    assert get_method("pe")(ctx, 1)[0].box.coords == (7, 7, 7)
    bald = get_method("bald")(ctx, 1)[0]
    assert bald.box.coords == (1, 1, 1)
    pe_a = -(0.55 * math.log(0.55) + 0.45 * math.log(0.45))
    ee_a = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05) + 0.15 * math.log(0.15) + 0.85 * math.log(0.85)) / 2
    assert bald.score == pytest.approx(pe_a - ee_a, rel=1e-5)


def _entropy2(q: float) -> float:
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def test_power_pe_samples_roughly_in_proportion_to_score():
    # Two one-box images with PE box scores in ratio 1 : 3; beta = 1 picks the better one ~75 % of the time.
    h = _entropy2(0.05)
    q = brentq(lambda x: _entropy2(x) - 3 * h, 0.05, 0.5)
    probs = MemoryProbabilities(
        {
            "m0": {
                "lo": np.array([0.95, 0.05], np.float32).reshape(2, 1, 1, 1) * np.ones((2, 3, 3, 3), np.float32),
                "hi": np.array([1 - q, q], np.float32).reshape(2, 1, 1, 1) * np.ones((2, 3, 3, 3), np.float32),
            }
        }
    )
    cases = {"lo": (3, 3, 3), "hi": (3, 3, 3)}
    greedy = get_method("pe")(
        QueryContext(cases=cases, patch_size=(3, 3, 3), foreground_classes=[1], seed=0, probabilities=probs), 1
    )[0]
    assert greedy.box.case == "hi" and greedy.score == pytest.approx(3 * h, rel=1e-3)
    trials = 400
    wins = sum(
        get_method("power_pe")(
            QueryContext(cases=cases, patch_size=(3, 3, 3), foreground_classes=[1], seed=seed, probabilities=probs), 1
        )[0].box.case
        == "hi"
        for seed in range(trials)
    )
    assert abs(wins / trials - 0.75) < 0.07  # softmax of log scores: 3 / (1 + 3)


# ---------------------------------------------------------------------------
# ClaSP PE
# ---------------------------------------------------------------------------


def test_clasp_beta_schedule():
    assert clasp_beta(0, 5) == pytest.approx(1.0)
    assert clasp_beta(1, 5) == pytest.approx(math.sqrt(10.0))  # 3.16
    assert clasp_beta(2, 5) == pytest.approx(10.0)
    assert clasp_beta(3, 5) == pytest.approx(10**1.5)  # 31.6
    assert clasp_beta(4, 5) == pytest.approx(100.0)
    assert clasp_beta(1, 2) == pytest.approx(100.0)
    assert clasp_beta(0, 1) == 1.0
    assert clasp_beta(-1, 5) == 1.0 and clasp_beta(9, 5) == pytest.approx(100.0)  # clamped


@pytest.mark.parametrize("loop,beta", [(1, 1.0), (2, math.sqrt(10)), (3, 10.0), (4, 10**1.5)])
def test_clasp_query_of_loop_l_uses_the_model_of_loop_l_minus_1(monkeypatch, loop, beta):
    scales = []
    real = clasp.gumbel

    def recording(rng, shape, scale):
        scales.append(scale)
        return real(rng, shape, scale)

    monkeypatch.setattr(clasp, "gumbel", recording)
    ctx = _random_context(3, loop=loop)
    picks = get_method("clasp_pe")(ctx, 3)
    assert len(picks) == 3
    assert scales and all(s == pytest.approx(1.0 / beta) for s in scales)
    assert len(scales) == len(ctx.cases) * (len(ctx.foreground_classes) + 1)  # per image and stratum


@pytest.mark.parametrize(
    "n,k,expected",
    [
        (20, 3, (6, 4)),  # int(6.8), int(13.2 / 3)
        (10, 2, (3, 3)),  # int(3.4), int(3.3)
        (50, 2, (17, 16)),  # int(17.0), int(16.5)
        (1, 3, (1, 1)),  # at least one each
        (3, 4, (1, 1)),  # int(1.02), int(0.495) -> 1
        (100, 5, (34, 13)),
    ],
)
def test_per_image_quotas(n, k, expected):
    assert per_image_quotas(n, k) == expected


@pytest.mark.parametrize(
    "count,classes,plain,class_total,base",
    [
        (20, [1, 2], 7, 13, 6),  # n_cls = int(13.2) = 13 -> 7 + 6 or 6 + 7
        (10, [1, 2, 3], 4, 6, 2),  # int(6.6) = 6 -> 2 each
        (20, [1, 2, 3], 7, 13, 4),  # 13 -> 4 each + one extra
        (7, [1, 2], 3, 4, 2),  # int(4.62) = 4
        (1, [1], 1, 0, 0),  # int(0.66) = 0
        (100, [1, 2, 3, 4], 34, 66, 16),
    ],
)
def test_global_quotas(count, classes, plain, class_total, base):
    extras = Counter()
    for seed in range(40):
        q = global_quotas(count, classes, np.random.default_rng(seed))
        assert set(q) == {"pe", *(f"class_{c}" for c in classes)}
        assert q["pe"] == plain
        per_class = [q[f"class_{c}"] for c in classes]
        assert sum(per_class) == class_total
        assert all(v in (base, base + 1) for v in per_class)
        extras.update(c for c, v in zip(classes, per_class) if v == base + 1)
    if class_total % len(classes):
        assert set(extras) == set(classes)  # the remainder goes to random classes, not always the same


def test_global_quotas_without_classes():
    assert global_quotas(9, [], np.random.default_rng(0)) == {"pe": 9}


def _p(name: str) -> Pick:
    return Pick(Box(name, (0, 0, 0), (1, 1, 1)), 1.0, 0.0, name[0])


def test_fill_from_strata_by_hand():
    ranked = {
        "pe": [_p("a1"), _p("a2"), _p("a3"), _p("a4"), _p("a5")],
        "class_1": [_p("b1")],
        "class_2": [_p("c1"), _p("c2"), _p("c3"), _p("c4")],
    }
    quotas = {"pe": 2, "class_1": 3, "class_2": 2}
    names = lambda picks: sorted(p.box.case for p in picks)  # noqa: E731
    # class_1 is two short: the fill takes the next best of the other strata, in turn
    assert names(fill_from_strata(ranked, quotas, 7, "q")) == ["a1", "a2", "a3", "b1", "c1", "c2", "c3"]
    six = names(fill_from_strata(ranked, quotas, 6, "q"))
    assert six[:2] == ["a1", "a2"] and "b1" in six and "c1" in six and "c2" in six
    assert ("a3" in six) != ("c3" in six)  # one more from the next rank, never a4 or c4
    assert names(fill_from_strata(ranked, quotas, 9, "q")) == ["a1", "a2", "a3", "a4", "b1", "c1", "c2", "c3", "c4"]
    # every stratum full: exactly the quotas
    assert names(fill_from_strata(ranked, {"pe": 3, "class_1": 1, "class_2": 1}, 5, "q")) == ["a1", "a2", "a3", "b1", "c1"]
    # a stratum with a quota but no entry at all
    assert names(fill_from_strata({"pe": ranked["pe"]}, {"pe": 1, "class_1": 2}, 3, "q")) == ["a1", "a2", "a3"]
    with pytest.raises(NotEnoughCandidates, match="clasp_pe: only 10"):
        fill_from_strata(ranked, quotas, 11, "clasp_pe")


def test_clasp_pe_fills_a_short_stratum_when_a_class_is_absent():
    # Ten images of one patch each: one candidate per image, taken by whichever stratum comes first.
    # Class 2 is absent (U_2 ~ 0), yet the query must still return 10 boxes, one per image.
    rng = np.random.default_rng(0)
    cases = {f"c{i}": (3, 4, 5) for i in range(10)}
    arrays = {}
    for m in range(2):
        arrays[f"m{m}"] = {}
        for case, shape in cases.items():
            p = _random_probabilities(rng, 1, 2, shape)[0]
            arrays[f"m{m}"][case] = np.concatenate([p, np.zeros((1, *shape), np.float32)])
    short_seen = False
    for seed in range(8):
        ctx = QueryContext(
            cases=cases,
            patch_size=(4, 4, 5),
            foreground_classes=[1, 2],
            seed=seed,
            loop=1,
            probabilities=MemoryProbabilities(arrays),
        )
        picks = get_method("clasp_pe")(ctx, 10)
        assert sorted(p.box.case for p in picks) == sorted(cases)
        assert all(p.box == Box(p.box.case, (0, 0, 0), (3, 4, 5)) for p in picks)
        strata = Counter(p.stratum for p in picks)
        # quotas are pe 4, class_1 3, class_2 3; any other split means a stratum ran short and was filled
        short_seen |= strata != Counter({"pe": 4, "class_1": 3, "class_2": 3})
    assert short_seen
    with pytest.raises(NotEnoughCandidates):
        get_method("clasp_pe")(ctx, 11)


@pytest.mark.parametrize("seed", range(6))
def test_clasp_pe_late_loop_is_nearly_greedy_per_stratum(seed):
    # beta = 31.6 at loop 4 of 5: each stratum takes its own best box, whatever order the strata come in.
    shape = (12, 12, 30)
    p = np.zeros((3, *shape), dtype=np.float32)
    p[0] = 1.0
    p[:, 1:5, 1:5, 1:5] = np.array([0.5, 0.25, 0.25]).reshape(3, 1, 1, 1)  # PE 1.04, U_1 = U_2 = 0.26
    p[:, 6:10, 6:10, 12:16] = np.array([0.2, 0.8, 0.0]).reshape(3, 1, 1, 1)  # PE 0.50, U_1 = 0.40
    p[:, 2:6, 6:10, 22:26] = np.array([0.2, 0.0, 0.8]).reshape(3, 1, 1, 1)  # PE 0.50, U_2 = 0.40
    probs = MemoryProbabilities({"m0": {"c": p}})
    ctx = QueryContext(
        cases={"c": shape}, patch_size=(4, 4, 4), foreground_classes=[1, 2], seed=seed, loop=4, probabilities=probs, n_per_image=3
    )
    picks = get_method("clasp_pe")(ctx, 3)
    assert {pk.stratum: pk.box.coords for pk in picks} == {"pe": (1, 1, 1), "class_1": (6, 6, 12), "class_2": (2, 6, 22)}
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert {pk.stratum: pk.score for pk in picks}["pe"] == pytest.approx(h, rel=1e-5)


# ---------------------------------------------------------------------------
# random, foreground-aware random, nnActive's starting budget
# ---------------------------------------------------------------------------


def test_random_boxes_visit_images_round_robin():
    cases = {f"c{i}": (10, 10, 10) for i in range(4)}
    ctx = QueryContext(cases=cases, patch_size=(3, 3, 3), foreground_classes=[1], seed=0)
    picks = get_method("random")(ctx, 8)
    per_case = Counter(p.box.case for p in picks)
    assert per_case == Counter({c: 2 for c in cases})
    assert len({p.box.case for p in picks[:4]}) == 4  # each image once before any twice
    assert all(p.stratum == "all" for p in picks)


@pytest.mark.parametrize("name", ["random_fg33", "random_fg66"])
def test_random_fg_without_foreground_falls_back_to_all(name):
    cases = {f"c{i}": (9, 9, 9) for i in range(3)}
    ctx = QueryContext(
        cases=cases,
        patch_size=(4, 4, 4),
        foreground_classes=[1, 2],
        seed=0,
        ground_truth=lambda case: np.zeros(cases[case], dtype=np.uint8),
    )
    picks = get_method(name)(ctx, 6)
    assert len(picks) == 6 and all(p.stratum == "all" for p in picks)


@pytest.mark.parametrize("name", ["random_fg33", "random_fg66"])
def test_random_fg_seg_and_border_boxes_are_centred_on_the_class(name):
    shape = (24, 24, 24)
    cases = {f"c{i}": shape for i in range(4)}
    gts = {}
    for i, case in enumerate(cases):
        gt = np.zeros(shape, dtype=np.uint8)
        gt[6:12, 6:12, 6:12] = 1
        if i % 2:
            gt[13:18, 8:16, 10:14] = 2  # class 2 only in some images
        gts[case] = gt
    ctx = QueryContext(cases=cases, patch_size=(5, 5, 5), foreground_classes=[1, 2], seed=3, ground_truth=gts.__getitem__)
    picks = get_method(name)(ctx, 12)
    areas = Counter(p.stratum.split(":")[0] for p in picks)
    assert areas["seg"] + areas["border"] > 0
    struct = ndimage.generate_binary_structure(3, 1)
    for p in picks:
        if p.stratum == "all":
            continue
        area, c = p.stratum.split(":")
        gt = gts[p.box.case]
        centre = tuple(k + s // 2 for k, s in zip(p.box.coords, p.box.size))  # no shift: blobs are interior
        assert gt[centre] == int(c), p
        if area == "border":
            mask = gt == int(c)
            assert not ndimage.binary_erosion(mask, struct)[centre], p


def test_random_fg66_puts_more_boxes_on_foreground_than_fg33():
    # Large foreground, few boxes per image: proposals rarely collide, so the areas follow the 1/3 and 2/3 shares.
    shape = (30, 30, 30)
    cases = {f"c{i}": shape for i in range(30)}
    gt = np.zeros(shape, dtype=np.uint8)
    gt[5:25, 5:25, 5:25] = 1
    ctx = QueryContext(cases=cases, patch_size=(3, 3, 3), foreground_classes=[1], seed=0, ground_truth=lambda case: gt)
    fg = {}
    for name in ("random_fg33", "random_fg66"):
        picks = get_method(name)(ctx, 90)
        fg[name] = sum(p.stratum != "all" for p in picks) / len(picks)
    assert abs(fg["random_fg33"] - 1 / 3) < 0.12
    assert abs(fg["random_fg66"] - 2 / 3) < 0.12


def _start_pool():
    """Ten images; label 3 only in images 0 and 1, label 2 only in images 0..3, label 1 everywhere."""
    shape = (16, 16, 16)
    gts = {}
    for i in range(10):
        gt = np.zeros(shape, dtype=np.uint8)
        gt[2:14, 2:14, 2:8] = 1
        if i < 4:
            gt[4:8, 4:8, 9:13] = 2
        if i < 2:
            gt[10:12, 10:12, 10:12] = 3
        gts[f"img{i}"] = gt
    return {c: shape for c in gts}, gts


@pytest.mark.parametrize("seed", range(5))
def test_nnactive_start_rarest_label_first_each_image_once(seed):
    cases, gts = _start_pool()
    labels = [0, 1, 2, 3]
    ctx = QueryContext(
        cases=cases,
        patch_size=(3, 3, 3),
        foreground_classes=[1, 2, 3],
        seed=seed,
        ground_truth=gts.__getitem__,
        label_counts=_label_counts(gts, labels),
    )
    picks = get_method("nnactive_start")(ctx, 12)
    assert len(picks) == 12
    head = picks[:8]
    # rarest first: 3 (2 x 8 voxels), 2 (4 x 64), 1 (10 x 864 minus overlaps), 0 (the rest)
    assert [p.stratum for p in head] == ["label:3"] * 2 + ["label:2"] * 2 + ["label:1"] * 2 + ["label:0"] * 2
    assert len({p.box.case for p in head}) == 8  # each image at most once
    assert {p.box.case for p in head[:2]} == {"img0", "img1"}  # the only images with label 3
    assert {p.box.case for p in head[2:4]} == {"img2", "img3"}  # label 2 elsewhere is used up
    for p in head:
        label = int(p.stratum.split(":")[1])
        assert (gts[p.box.case][p.box.slices] == label).any(), p
    assert not any(p.stratum.startswith("label:") for p in picks[8:])  # the rest is random_fg33
    _assert_valid(picks, ctx, 12, "nnactive_start")


def test_nnactive_start_label_in_fewer_images_than_boxes():
    cases, gts = _start_pool()
    gts["img1"][gts["img1"] == 3] = 1  # label 3 now only in img0
    ctx = QueryContext(
        cases=cases,
        patch_size=(3, 3, 3),
        foreground_classes=[1, 2, 3],
        seed=0,
        ground_truth=gts.__getitem__,
        label_counts=_label_counts(gts, [0, 1, 2, 3]),
    )
    picks = get_method("nnactive_start")(ctx, 10)
    strata = [p.stratum for p in picks]
    assert strata.count("label:3") == 1 and picks[0].box.case == "img0"
    assert strata[:7] == ["label:3", "label:2", "label:2", "label:1", "label:1", "label:0", "label:0"]


def test_nnactive_start_counts_labels_itself_without_label_counts():
    cases, gts = _start_pool()
    with_counts = QueryContext(
        cases=cases,
        patch_size=(3, 3, 3),
        foreground_classes=[1, 2, 3],
        seed=1,
        ground_truth=gts.__getitem__,
        label_counts=_label_counts(gts, [0, 1, 2, 3]),
    )
    without = QueryContext(cases=cases, patch_size=(3, 3, 3), foreground_classes=[1, 2, 3], seed=1, ground_truth=gts.__getitem__)
    a = get_method("nnactive_start")(with_counts, 10)
    b = get_method("nnactive_start")(without, 10)
    assert [p.stratum for p in b[:8]] == [p.stratum for p in a[:8]]
    assert _signature(a) == _signature(b)


@pytest.mark.parametrize("name", ["random", "random_fg33", "random_fg66", "nnactive_start"])
def test_random_methods_find_the_last_free_box_of_a_nearly_covered_image(name):
    # Existing boxes leave one free 4^3 corner out of 125; uniform proposals almost always miss it.
    cases = {"c": (8, 8, 8)}
    gt = np.zeros((8, 8, 8), dtype=np.uint8)
    gt[1:3, 1:3, 1:3] = 1  # foreground only under the existing boxes
    blocked = [Box("c", (0, 0, 0), (4, 8, 8)), Box("c", (4, 0, 0), (4, 4, 8)), Box("c", (4, 4, 0), (4, 4, 4))]
    for seed in range(5):
        ctx = QueryContext(
            cases=cases,
            patch_size=(4, 4, 4),
            foreground_classes=[1],
            seed=seed,
            blocked=blocked,
            ground_truth=lambda case: gt,
            label_counts={"c": {0: 504, 1: 8}},
        )
        picks = get_method(name)(ctx, 1)
        assert picks[0].box == Box("c", (4, 4, 4), (4, 4, 4))
        with pytest.raises(NotEnoughCandidates, match="only 1"):
            get_method(name)(ctx, 2)
