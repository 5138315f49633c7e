"""Stored box scores: a query from a scoring job's output equals the query from the probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from ActiveLearning3DLib.aggregation import score_boxes
from ActiveLearning3DLib.query_methods import METHODS, QueryContext, get_method
from ActiveLearning3DLib.scores import ScoreStore, score_pool
from ActiveLearning3DLib.uncertainty import MemoryProbabilities

MODEL_METHODS = [name for name, m in METHODS.items() if m.needs_model]


def _pool(seed: int = 0):
    rng = np.random.default_rng(seed)
    cases = {f"c{i}": (18 + i, 22, 20) for i in range(4)}
    arrays = {}
    for m in range(3):
        arrays[f"fold_{m}"] = {}
        for case, shape in cases.items():
            x = rng.random((3, *shape)).astype(np.float32) ** 3
            arrays[f"fold_{m}"][case] = x / x.sum(0)
    return cases, MemoryProbabilities(arrays)


def test_store_round_trip_keeps_grid_axes_and_size(tmp_path):
    rng = np.random.default_rng(1)
    s = score_boxes("c", rng.random((9, 12, 10)).astype(np.float32), (4, 5, 20), (2, 3, 1))
    store = ScoreStore(tmp_path)
    store.write("c", {"pe": s})
    back = store.read("c", ["pe"])["pe"]
    np.testing.assert_array_equal(back.scores, s.scores)
    assert back.size == s.size == (4, 5, 10)
    assert all(np.array_equal(a, b) for a, b in zip(back.axes, s.axes))
    assert store.has("c", ["pe"]) and not store.has("c", ["bald"]) and not store.has("d", ["pe"])
    with pytest.raises(ValueError, match=r"c\.npz.*no scores for \['bald'\]"):
        store.read("c", ["bald"])
    store.path("d").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"d\.npz: unreadable"):
        store.read("d", ["pe"])


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_query_from_stored_scores_equals_query_from_probabilities(tmp_path, name):
    cases, source = _pool()
    method = get_method(name)
    names = method.map_names([1, 2])
    store = ScoreStore(tmp_path / "scores")
    assert score_pool(source, cases, 3, names, (8, 8, 8), store) == sorted(cases)
    assert score_pool(source, cases, 3, names, (8, 8, 8), store) == []  # resumes: nothing left to do

    def query(**kw):
        ctx = QueryContext(cases=cases, patch_size=(8, 8, 8), foreground_classes=[1, 2], seed=4, loop=2, **kw)
        return [(p.box, p.stratum) for p in method(ctx, 7)]

    assert query(probabilities=source) == query(scores=store)


def test_map_names_expand_classes():
    assert get_method("clasp_pe").map_names([1, 2, 5]) == ["pe", "class_1", "class_2", "class_5"]
    assert get_method("softrank_bald").map_names([1]) == ["bald"]
    assert get_method("random").map_names([1]) == []
