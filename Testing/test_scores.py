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


# ------------------------------------------------------------- the score job's inputs: ScoringSettings
def test_scoring_settings_are_the_score_jobs_schema(tmp_path):
    import json
    from pathlib import Path

    from ActiveLearning3DLib.nnunet.scoring import ScoringSettings

    full = ScoringSettings(("pe", "class_1"), tmp_path / "scores", tmp_path / "unc", (2, 3, 4), tmp_path / "pred")
    text = json.dumps(full.to_json())
    # the keys and order the score jobs have always had in job.json
    assert text == json.dumps(
        {
            "maps": ["pe", "class_1"],
            "scores_dir": str(tmp_path / "scores"),
            "uncertainty_dir": str(tmp_path / "unc"),
            "prediction_dir": str(tmp_path / "pred"),
            "stride": [2, 3, 4],
        }
    )
    assert ScoringSettings.from_json(json.loads(text)) == full
    bare = ScoringSettings((), Path("s"))
    assert bare.to_json() == {"maps": [], "scores_dir": "s", "uncertainty_dir": None, "prediction_dir": None, "stride": None}
    assert ScoringSettings.from_json({**bare.to_json(), "model": "m", "threads": 2}) == bare  # the job's own keys
    source = tmp_path / "job.json"
    for change, key in [
        ({"maps": "pe"}, "maps"),
        ({"maps": ["pe", "entropy"]}, "maps"),
        ({"scores_dir": None}, "scores_dir"),
        ({"uncertainty_dir": 3}, "uncertainty_dir"),
        ({"stride": [2, 2]}, "stride"),
        ({"stride": [2, 0, 2]}, "stride"),
        ({"prediction_dir": ""}, "prediction_dir"),
    ]:
        with pytest.raises(ValueError, match=rf"job\.json: '{key}': expected"):
            ScoringSettings.from_json({**full.to_json(), **change}, source)


def test_a_score_job_with_bad_inputs_fails_naming_its_job_file_before_loading_a_model(tmp_path):
    from ActiveLearning3DLib.jobs import Job
    from ActiveLearning3DLib.worker import run_job

    job = Job.create(
        tmp_path,
        "bad-score",
        "nnunet_score",
        {"project": str(tmp_path / "none"), "model": "none", "maps": ["pe"], "scores_dir": str(tmp_path), "stride": [1, 2]},
    )
    assert run_job(job.path) == 1
    status = job.status()
    assert status.state == "failed" and f"{job.spec_path}: 'stride': expected null or three whole numbers" in status.message


def test_the_pipelines_score_job_writes_the_settings_record(tmp_path, dataset):
    from ActiveLearning3DLib import ActiveLearningLogic
    from ActiveLearning3DLib.nnunet.scoring import ScoringSettings
    from ActiveLearning3DLib.pipeline import LoopSettings

    logic = ActiveLearningLogic.create(tmp_path / "project", dataset.images, dataset.labels, seed=1)
    logic.query("random", 3)
    logic.annotate_with_oracle()
    for extra in ({}, {"uncertainty_maps": False, "pool_prediction": False, "stride": (2, 2, 2)}):
        pipeline = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", method="clasp_pe", **extra))
        [score] = [j for j in pipeline.jobs("predict") if j.name.endswith("-score")]
        inputs = score.spec().inputs
        settings = ScoringSettings.from_json(inputs, score.spec_path)
        assert settings == ScoringSettings(
            tuple(pipeline.score_job_maps()),
            pipeline.scores_dir,
            None if extra else pipeline.uncertainty_dir,
            (2, 2, 2) if extra else None,
            None if extra else pipeline.pool_prediction_dir,
        )
        assert list(inputs)[:7] == ["project", "model", "maps", "scores_dir", "uncertainty_dir", "prediction_dir", "stride"]
        score.path.rename(tmp_path / f"done-{len(extra)}")  # the next settings make their own job
