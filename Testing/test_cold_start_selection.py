"""Known answers for the label-free selection math and PE with spatial diversity (docs/METHODS.md section 5)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ActiveLearning3DLib.aggregation import NotEnoughCandidates, Pick
from ActiveLearning3DLib.boxes import Box
from ActiveLearning3DLib.query_methods import PESpatialOptions, QueryContext, get_method
from ActiveLearning3DLib.query_methods.diversity import (
    cluster_priority,
    cscs_scores,
    difficulty_coverage_ratio,
    kmeans_auto,
    pacing_weight,
    proportional_quotas,
    rank_normalise,
    spatially_diverse,
    stratified_select,
    typicality,
)
from ActiveLearning3DLib.uncertainty import MemoryProbabilities


def _planted(sizes=(60, 30, 10), spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 8]], float)
    x = np.concatenate([c + spread * rng.normal(size=(n, 4)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def test_kmeans_recovers_planted_clusters_and_their_number():
    x, truth = _planted()
    labels, centres = kmeans_auto(x, seed=0)
    assert len(centres) == 3
    # the same partition up to renaming
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3 and len({b for _, b in pairs}) == 3


@pytest.mark.parametrize(
    "sizes, budget, expected",
    [
        ((60, 30, 10), 10, [6, 3, 1]),
        ((60, 30, 10), 20, [12, 6, 2]),
        ((97, 2, 1), 10, [8, 1, 1]),  # at least one per cluster
        ((5, 50, 20), 2, [0, 1, 1]),  # fewer boxes than clusters: the largest get one
    ],
)
def test_quotas_are_proportional_with_at_least_one(sizes, budget, expected):
    quotas = proportional_quotas(sizes, budget)
    assert quotas == expected and sum(quotas) == budget


def test_cluster_selection_takes_the_quota_nearest_each_centre():
    x, truth = _planted()
    labels, centres = kmeans_auto(x, seed=0)
    priority = cluster_priority(x, labels, centres)
    chosen = stratified_select(labels, priority, 10)
    counts = sorted(np.bincount(labels[chosen], minlength=3).tolist())
    assert counts == [1, 3, 6]
    for c in range(3):
        members = np.flatnonzero(labels == c)
        picked = [i for i in chosen if labels[i] == c]
        nearest = members[np.argsort(-priority[members])][: len(picked)]
        assert sorted(picked) == sorted(nearest.tolist())


def test_stratified_selection_passes_a_rejected_quota_on():
    labels = np.array([0, 0, 0, 1, 1, 1])
    priority = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    chosen = stratified_select(labels, priority, 4, accept=lambda i: i not in (3, 4, 5))
    assert sorted(chosen) == [0, 1, 2]  # cluster 1 is all rejected: only 3 acceptable, the budget cannot be met
    chosen = stratified_select(labels, priority, 3, accept=lambda i: i != 0)
    assert sorted(chosen) == [1, 2, 3]


def test_typicality_ranks_a_dense_point_above_an_outlier():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, size=(50, 3)), [[0.0, 0.0, 0.0]], [[5.0, 5.0, 5.0]]])
    t = typicality(x, k=5)
    assert t[50] > t[51] and t[51] == t.min()


def test_rank_normalise_is_in_zero_one_with_the_largest_at_one():
    r = rank_normalise(np.array([3.0, 1.0, 2.0, 10.0]))
    assert r.tolist() == [0.75, 0.25, 0.5, 1.0]


def test_dcr_is_one_when_hard_boxes_are_typical_and_zero_when_they_are_outliers():
    t = rank_normalise(np.arange(100.0))
    assert difficulty_coverage_ratio(t, t) == 1.0
    assert difficulty_coverage_ratio(t, t[::-1].copy()) == 0.0
    rng = np.random.default_rng(0)
    assert abs(difficulty_coverage_ratio(t, rank_normalise(rng.random(100))) - 0.5) < 0.2


def test_pacing_weight_grows_with_budget_and_with_dcr():
    budgets = [0.001, 0.01, 0.1, 0.5, 1.0]
    for dcr in (0.0, 0.3, 0.5, 0.8):
        weights = [pacing_weight(b, dcr) for b in budgets]
        assert all(a < b for a, b in itertools.pairwise(weights)), dcr
        assert all(0 < w <= 1 for w in weights)
    for b in (0.01, 0.2):
        weights = [pacing_weight(b, d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
        assert all(a < c for a, c in itertools.pairwise(weights)), b
    assert pacing_weight(0.2, 0.5) == pytest.approx(0.2)  # unrelated T and D: the effective budget itself


def test_cscs_prefers_typical_boxes_on_a_small_budget_and_hard_ones_on_a_large_one():
    rng = np.random.default_rng(1)
    dense = rng.normal(0, 0.1, size=(200, 3))
    outliers = rng.normal(0, 3, size=(20, 3)) + 6
    x = np.concatenate([dense, outliers])
    difficulty = np.concatenate([rng.random(200), 2 + rng.random(20)])  # outliers are hard: DCR low
    small, info_small = cscs_scores(x, difficulty, budget=2)
    large, info_large = cscs_scores(x, difficulty, budget=200)
    assert info_small["dcr"] < 0.5 and info_small["difficulty_weight"] < info_large["difficulty_weight"]
    assert np.argsort(-small)[:2].max() < 200  # small budget: typical (dense) boxes first

    def outlier_positions(score):
        position = np.empty(len(score), int)
        position[np.argsort(-score)] = np.arange(len(score))
        return position[200:].mean()

    assert outlier_positions(large) < outlier_positions(small) - 20  # large budget: the hard outliers rise


def _pick(case, corner, priority, size=(4, 4, 4)):
    return Pick(Box(case, corner, size), priority, priority)


def test_spatial_diversity_never_returns_two_boxes_closer_than_the_minimum():
    rng = np.random.default_rng(0)
    picks = [_pick("a", tuple(int(v) for v in rng.integers(0, 40, 3)), float(rng.random())) for _ in range(300)]
    picks += [_pick("b", (0, 0, 0), 0.99)]
    chosen = spatially_diverse(picks, 12, min_distance=10.0)
    assert len(chosen) == 12
    centres = [(p.box.case, np.array(p.box.coords) + 1.5) for p in chosen]
    for (ca, a), (cb, b) in itertools.combinations(centres, 2):
        assert ca != cb or np.linalg.norm(a - b) >= 10.0
    # best first: the top-priority box is always in
    assert max(picks, key=lambda p: p.priority) in chosen
    with pytest.raises(NotEnoughCandidates, match="apart"):
        spatially_diverse(picks[:5] + [_pick("a", (1, 1, 1), 0.5)] * 50, 40, min_distance=10.0)


def test_spatial_diversity_in_embedding_space():
    picks = [_pick("a", (0, 0, 0), 0.9), _pick("b", (0, 0, 0), 0.8), _pick("c", (0, 0, 0), 0.7)]
    emb = {("a", (0, 0, 0)): np.array([0.0]), ("b", (0, 0, 0)): np.array([0.1]), ("c", (0, 0, 0)): np.array([5.0])}
    chosen = spatially_diverse(picks, 2, 1.0, emb)
    assert [p.box.case for p in chosen] == ["a", "c"]


def test_pe_spatial_query_respects_the_minimum_distance_and_prefers_uncertainty():
    shape = (24, 24, 24)
    probs = np.full((2, *shape), 0.5, np.float32)
    probs[0] = 0.99
    probs[1] = 0.01
    probs[:, 2:10, 2:10, 2:10] = 0.5  # one uncertain corner region: plain PE would crowd boxes there
    ctx = QueryContext(
        cases={"x": shape},
        patch_size=(4, 4, 4),
        foreground_classes=[1],
        seed=0,
        probabilities=MemoryProbabilities({"m0": {"x": probs}}),
        options=PESpatialOptions(12.0),
    )
    picks = get_method("pe_spatial")(ctx, 3)
    plain = get_method("pe")(ctx, 3)
    centre = lambda p: np.array(p.box.coords) + 1.5  # noqa: E731
    assert all(np.linalg.norm(centre(a) - centre(b)) >= 12.0 for a, b in itertools.combinations(picks, 2))
    assert any(np.linalg.norm(centre(a) - centre(b)) < 12.0 for a, b in itertools.combinations(plain, 2))
    assert all(2 <= c <= 9 for c in centre(picks[0]))  # the most uncertain box first


def test_silhouette_matches_the_definition_on_a_small_example():
    from ActiveLearning3DLib.query_methods.diversity import silhouette

    x = np.array([[0.0], [1.0], [10.0], [12.0], [30.0]])
    labels = np.array([0, 0, 1, 1, 2])
    # point 0: a = 1, b = mean(10, 12) = 11 -> 10/11; point 1: a = 1, b = 10 -> 0.9;
    # point 2: a = 2, b = min(mean(10, 9), 20) = 9.5 -> 7.5/9.5; point 3: a = 2, b = min(11.5, 18) -> 9.5/11.5;
    # point 4 is alone: 0
    expected = (10 / 11 + 0.9 + 7.5 / 9.5 + 9.5 / 11.5 + 0) / 5
    assert silhouette(x, labels) == pytest.approx(expected)


def test_pe_spatial_in_embedding_space_rejects_a_far_box_that_looks_the_same():
    from ActiveLearning3DLib.embeddings import EmbeddingSet
    from ActiveLearning3DLib.embeddings.autoencoder import candidate_boxes

    shape = (24, 24, 24)
    probs = np.empty((2, *shape), np.float32)
    probs[0], probs[1] = 0.9, 0.1
    probs[:, 0:4, 0:4, 0:4] = 0.5  # two equally uncertain corners, far apart in voxels
    probs[:, 20:24, 20:24, 20:24] = 0.5
    probs[0, 0:4, 20:24, 0:4], probs[1, 0:4, 20:24, 0:4] = 0.45, 0.55  # a third, a little less uncertain
    boxes = candidate_boxes("x", shape, (4, 4, 4), None)
    vectors = np.zeros((len(boxes), 2))
    for i, b in enumerate(boxes):
        vectors[i] = [(b.coords[1] - b.coords[0]) / 4.0, 0.0]  # (0,0,0) and (20,20,20) look alike, (0,20,0) does not
    ctx = QueryContext(
        cases={"x": shape},
        patch_size=(4, 4, 4),
        foreground_classes=[1],
        seed=0,
        probabilities=MemoryProbabilities({"m0": {"x": probs}}),
        embeddings=EmbeddingSet(boxes, vectors, np.zeros(len(boxes))),
        options=PESpatialOptions(2.0, "embedding"),
    )
    picks = get_method("pe_spatial")(ctx, 2)
    corners = sorted(p.box.coords for p in picks)
    assert (0, 0, 0) in corners or (20, 20, 20) in corners
    assert not ((0, 0, 0) in corners and (20, 20, 20) in corners)  # different places, same embedding: one of them
    assert (0, 20, 0) in corners  # the less uncertain box that looks different takes the second place
    voxel = get_method("pe_spatial")(
        QueryContext(
            cases={"x": shape},
            patch_size=(4, 4, 4),
            foreground_classes=[1],
            seed=0,
            probabilities=MemoryProbabilities({"m0": {"x": probs}}),
        ),
        2,
    )
    assert sorted(p.box.coords for p in voxel) == [(0, 0, 0), (20, 20, 20)]


def test_pe_spatial_options_are_a_validated_record():
    shape = (24, 24, 24)
    probs = np.full((2, *shape), 0.5, np.float32)
    probs[0], probs[1] = 0.99, 0.01
    probs[:, 2:10, 2:10, 2:10] = 0.5
    common = dict(
        cases={"x": shape},
        patch_size=(4, 4, 4),
        foreground_classes=[1],
        seed=0,
        probabilities=MemoryProbabilities({"m0": {"x": probs}}),
    )
    method = get_method("pe_spatial")
    assert method.options is PESpatialOptions and get_method("pe").options is None
    by_record = method(QueryContext(**common, options=PESpatialOptions(min_distance=12.0)), 3)
    default = QueryContext(**common)
    assert default.options is None and method.options_of(default) == PESpatialOptions()
    far = method(QueryContext(**common, options=PESpatialOptions(min_distance=20.0)), 2)
    assert [p.box for p in far] != [p.box for p in by_record[:2]]  # the record's value is the one used
    # a record of another method is none of this one's business; pe ignores pe_spatial's, as it ignored the keywords
    assert get_method("pe")(QueryContext(**common, options=PESpatialOptions(20.0)), 3) == get_method("pe")(default, 3)
    assert method.wants_embeddings(PESpatialOptions(distance_space="embedding"))
    assert (
        not method.wants_embeddings(PESpatialOptions())
        and not get_method("pe").wants_embeddings(PESpatialOptions(distance_space="embedding"))
        and get_method("cluster").wants_embeddings()
    )
    for bad, match in [
        (dict(min_distance=-1.0), "min_distance: expected a non-negative number"),
        (dict(min_distance=float("nan")), "min_distance"),
        (dict(min_distance=True), "min_distance"),
        (dict(distance_space="pixels"), "distance_space: expected 'voxels' or 'embedding'"),
    ]:
        with pytest.raises(ValueError, match=f"pe_spatial: {match}"):
            PESpatialOptions(**bad)
    with pytest.raises(TypeError, match="min_distance"):  # the record holds pe_spatial's options, not the context
        QueryContext(**common, min_distance=12.0)
    with pytest.raises(ValueError, match="options must be a query method's option record, got dict"):
        method(QueryContext(**common, options={"min_distance": 12.0}), 3)
