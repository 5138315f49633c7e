"""One whole active-learning loop with nnU-Net as background jobs (``test`` profile), and its failure modes.

16 real Hippocampus cases when the shared data is present (else phantoms):
12 pool / 4 test cases, 8 oracle-annotated starting boxes. Every stage runs
in worker processes started by the local runner, as in real use.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.cli import main as al3d
from ActiveLearning3DLib.fileio import read_json
from ActiveLearning3DLib.jobs import Job
from ActiveLearning3DLib.jobs.store import process_alive
from ActiveLearning3DLib.nnunet.profiles import resolve_profile
from ActiveLearning3DLib.pipeline import LoopSettings
from ActiveLearning3DLib.query_methods import get_method
from ActiveLearning3DLib.scores import ScoreStore
from conftest import default_data_dir

CASES = 16


def _project(tmp_path_factory, name: str) -> ActiveLearningLogic:
    data = default_data_dir(tmp_path_factory, phantom_cases=CASES)
    path = tmp_path_factory.mktemp(name) / "project"
    logic = ActiveLearningLogic.create(path, data / "imagesTr", data / "labelsTr", max_cases=CASES, seed=1)
    logic.query("nnactive_start", 8)
    logic.annotate_with_oracle()
    return logic


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """A project after ``al3d loop --profile test`` (train, evaluate, score, query) on its starting boxes."""
    logic = _project(tmp_path_factory, "loop")
    environ = dict(os.environ)
    code = al3d(["loop", str(logic.project.path), "--profile", "test", "--device", "cpu", "--count", "6",
                 "--method", "clasp_pe"])
    assert code == 0
    assert dict(os.environ) == environ  # the nnU-Net variables went to the workers only
    return logic, logic.loop_pipeline(LoopSettings(profile="test", device="cpu"))


def test_loop_writes_a_next_loop_whose_boxes_do_not_overlap_annotated_ones(looped):
    logic, pipeline = looped
    loop = logic.project.read_loop(1)
    assert loop.method == "clasp_pe" and len(loop.boxes) == 6
    assert loop.info["model"] == str(pipeline.model_folder) and loop.info["trained_on_loop"] == 0
    annotated = [b.box for b in logic.boxes(0) if b.state == "annotated"]
    new = [b.box for b in loop.boxes]
    assert not any(a.overlaps(n) for a in annotated for n in new)
    assert not any(a.overlaps(b) for i, a in enumerate(new) for b in new[i + 1:])
    assert all(b.state == "pending" and np.isfinite(b.score) for b in loop.boxes)


def test_scoring_stores_one_candidate_list_per_pool_image_and_uncertainty_images(looped):
    logic, pipeline = looped
    project = logic.project
    names = get_method("clasp_pe").map_names(project.foreground_classes)
    store = ScoreStore(pipeline.scores_dir)
    assert sorted(p.stem for p in pipeline.scores_dir.glob("*.npz")) == sorted(project.pool_cases)
    for case in project.pool_cases:
        scores = store.read(case, names)
        assert set(scores) == set(names)
        grid = scores["pe"].scores
        assert grid.size > 0 and np.isfinite(grid).all() and (grid >= 0).all()
        heat = sitk.ReadImage(str(pipeline.uncertainty_dir / f"{case}.nii.gz"))
        image = project.read_image(case)
        assert heat.GetSize() == image.GetSize() and np.allclose(heat.GetOrigin(), image.GetOrigin())
        values = sitk.GetArrayFromImage(heat)
        assert 0 <= values.min() and values.max() <= math.log(len(project.classes)) + 1e-5
    result = read_json(Job(pipeline.jobs_dir / f"{pipeline.model_name}-score").path / "result.json")
    assert result["members"] == ["fold_0", "fold_1"] and result["scored"] == len(project.pool_cases)


def test_test_split_summary_has_finite_dice(looped):
    logic, pipeline = looped
    summary = read_json(logic.project.path / "evaluation" / "loop_000.json")
    assert summary == read_json(pipeline.evaluation_dir / "summary.json")
    assert summary["test_cases"] == len(logic.project.test_cases) == 4
    assert 0 <= summary["mean_dice"] <= 1
    assert set(summary["per_class"]) == {logic.project.classes[c] for c in logic.project.foreground_classes}
    assert all(v is None or 0 <= v <= 1 for v in summary["per_class"].values())
    assert summary["mirroring"] is True and summary["members"] == ["fold_0", "fold_1"]
    assert summary["loop"] == 0 and summary["profile"] == "test"


def test_jobs_report_their_stages_and_rerunning_a_finished_loop_redoes_nothing(looped, capsys):
    logic, pipeline = looped
    jobs = {j.name: j for j in logic.jobs()}
    names = [f"{pipeline.model_name}-{s}" for s in ("prepare", "fold_0", "fold_1", "evaluate", "score")]
    assert set(names) <= set(jobs) and all(jobs[n].status().state == "done" for n in names)
    ended = {n: jobs[n].status().ended for n in names}
    state = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", stages=("prepare", "train", "predict"))).run()
    assert state.state == "done" and {n: Job(jobs[n].path).status().ended for n in names} == ended
    assert al3d(["jobs", str(logic.project.path), "--json"]) == 0
    listed = {j["name"]: j for j in json.loads(capsys.readouterr().out)}
    assert listed[names[1]]["kind"] == "nnunet_train" and listed[names[1]]["progress"] == 1.0


def _wait(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cancel_kill_and_resume(tmp_path_factory):
    """Cancel ends a job as cancelled with its processes gone; SIGKILL ends one as failed; a rerun resumes."""
    logic = _project(tmp_path_factory, "crash")
    settings = LoopSettings(profile=resolve_profile("test", epochs=40), device="cpu", parallel=1,
                            stages=("prepare", "train", "predict"), evaluate=False, method="pe", uncertainty_maps=False)
    pipeline = logic.loop_pipeline(settings)

    fold0 = Job(pipeline.jobs_dir / f"{pipeline.model_name}-fold_0")

    def fold0_training(after=lambda: True):
        """Advance the pipeline; fold 0's status once its worker trains (and ``after()`` holds)."""
        state = pipeline.advance()
        status = dict(state.jobs).get(fold0.name)
        training = status is not None and status.state == "running" and status.epoch is not None
        return status if training and after() else None

    # 1. cancel while fold 0 trains
    status = _wait(fold0_training, what="fold 0 training")
    cancelled = pipeline.cancel()
    assert fold0.path in [j.path for j in cancelled]
    assert fold0.status().state == "cancelled" and _group_gone(status.pid) and not process_alive(status.pid)
    prepare = Job(pipeline.jobs_dir / f"{pipeline.model_name}-prepare")
    prepared_at = prepare.status().ended
    assert prepare.status().state == "done"

    # 2. a new run resumes (prepare is not redone); SIGKILL the worker of fold 0 once it has a checkpoint
    pipeline = logic.loop_pipeline(settings)
    latest = pipeline.model_folder / "fold_0" / "checkpoint_latest.pth"
    status = _wait(lambda: fold0_training(latest.is_file), what="a checkpoint")
    os.kill(status.pid, signal.SIGKILL)
    _wait(lambda: fold0.refresh().state == "failed", what="the killed job to be failed")
    message = fold0.status().message
    assert "exited" in message or "died" in message
    assert "log:" in message and len(message.splitlines()) > 1  # the last lines of its log
    assert prepare.status().ended == prepared_at

    # 3. running again resumes from the checkpoint and finishes everything
    state = logic.loop_pipeline(settings).run(timeout=600)
    assert state.state == "done", state.message
    assert prepare.status().ended == prepared_at
    result = read_json(fold0.path / "result.json")
    assert result["resumed_from_epoch"] > 0
    assert sorted(p.stem for p in pipeline.scores_dir.glob("*.npz")) == sorted(logic.project.pool_cases)
