"""The headless logic, the command line and the demo, on real Hippocampus cases (or phantoms without them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.cli import main
from ActiveLearning3DLib.default_data import PhantomSettings, make_phantom_dataset
from ActiveLearning3DLib.project import ProjectError
from ActiveLearning3DLib.uncertainty import MemoryProbabilities
from conftest import default_data_dir


def _data_dir(tmp_path_factory) -> Path:
    return default_data_dir(tmp_path_factory, phantom_cases=20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, data_dir):
    """20 cases: init, starting budget, oracle annotation (shared by the read-only tests below)."""
    path = tmp_path_factory.mktemp("hippo") / "project"
    logic = ActiveLearningLogic.create(path, data_dir / "imagesTr", data_dir / "labelsTr", max_cases=20, seed=3)
    loop = logic.query("nnactive_start", 12)
    results = logic.annotate_with_oracle()
    return logic, loop, results


def test_integration_partial_maps_equal_ground_truth_inside_boxes_and_ignore_outside(annotated):
    logic, loop, results = annotated
    project = logic.project
    assert len(project.pool_cases) == 15 and len(project.test_cases) == 5
    assert len(loop.boxes) == 12 and len(results) == 12
    assert all(b.state == "annotated" and b.annotator == "oracle" for b in logic.boxes())
    boxes_by_case: dict[str, list] = {}
    for b in logic.boxes():
        boxes_by_case.setdefault(b.case, []).append(b.box)
    for case in project.pool_cases:
        partial = project.read_partial_labels(case)
        gt = project.read_ground_truth(case)
        inside = np.zeros(partial.shape, dtype=bool)
        for box in boxes_by_case.get(case, []):
            assert box.fits(partial.shape)
            np.testing.assert_array_equal(partial[box.slices], gt[box.slices])
            inside[box.slices] = True
        assert (partial[~inside] == project.ignore_value).all()
        # the partial map keeps the image's geometry, so nnU-Net and Slicer overlay it correctly
        image = project.read_image(case)
        labels = sitk.ReadImage(str(project.partial_label_path(case)))
        assert labels.GetSize() == image.GetSize()
        assert np.allclose(labels.GetOrigin(), image.GetOrigin()) and np.allclose(labels.GetSpacing(), image.GetSpacing())


def test_starting_budget_covers_every_label_first_and_uses_each_image_once(annotated):
    logic, loop, _ = annotated
    project = logic.project
    labelled = [b for b in loop.boxes if b.stratum.startswith("label:")]
    order = list(dict.fromkeys(int(b.stratum.split(":")[1]) for b in labelled))
    assert set(order) == set(project.classes)  # background included
    totals = {c: sum(project.cases[case].label_counts.get(c, 0) for case in project.pool_cases) for c in order}
    assert order == sorted(order, key=lambda c: totals[c])  # rarest label first
    assert len({b.case for b in labelled}) == len(labelled)
    for b in labelled:  # the box is centred on a voxel of its label, so it holds that label
        label = int(b.stratum.split(":")[1])
        assert (project.read_ground_truth(b.case)[b.box.slices] == label).any()


def test_status_and_repr_report_progress(annotated):
    logic, _, _ = annotated
    s = logic.status()
    assert (s.boxes, s.annotated, s.pending, s.loops) == (12, 12, 0, 1)
    assert s.annotated_voxels == sum(b.box.voxels for b in logic.boxes())
    assert s.next_step == "query loop 1"
    assert "12/12 boxes annotated" in repr(logic)
    assert json.loads(json.dumps(s.to_json()))["patch_size"] == list(logic.project.patch_size)
    assert 0 < logic.annotated_foreground_fraction() <= 1


@pytest.fixture()
def phantom_project(tmp_path):
    data = make_phantom_dataset(tmp_path / "data", PhantomSettings(cases=8))
    return ActiveLearningLogic.create(tmp_path / "project", data.images, data.labels, seed=1)


def test_query_refuses_while_boxes_are_pending_and_submit_saves_at_once(phantom_project):
    logic = phantom_project
    loop = logic.query("random", 4)
    with pytest.raises(ProjectError, match="4 boxes of loop 0 are still pending"):
        logic.query("random", 4)
    first = loop.boxes[0]
    painted = np.zeros(first.box.size, dtype=np.uint8)
    painted[0, 0, 0] = 2
    result = logic.submit(first, painted, annotator="dr. a", seconds=12.5)
    assert result.foreground_voxels == 1
    reopened = ActiveLearningLogic.open(logic.project.path)  # a fresh process would see the same
    record = reopened.find_box(first.id)
    assert (record.state, record.annotator, record.seconds) == ("annotated", "dr. a", 12.5)
    partial = reopened.project.read_partial_labels(first.case)
    np.testing.assert_array_equal(partial[first.box.slices], painted)
    skipped = reopened.skip(loop.boxes[1].id)
    assert reopened.find_box(skipped.id).state == "skipped"
    with pytest.raises(ProjectError, match="already annotated"):
        reopened.skip(first.id)
    reopened.annotate_with_oracle()
    assert reopened.status().pending == 0
    # the skipped box still blocks: no later box overlaps it
    later = reopened.query("random", 6)
    assert not any(b.box.overlaps(loop.boxes[1].box) for b in later.boxes)
    assert reopened.find_box(skipped.id).state == "skipped"


def test_same_seed_same_query_across_projects(tmp_path):
    data = make_phantom_dataset(tmp_path / "data", PhantomSettings(cases=8))
    queries = []
    for name in ("a", "b"):
        logic = ActiveLearningLogic.create(tmp_path / name, data.images, data.labels, seed=5)
        queries.append([(b.case, b.box.coords) for b in logic.query("random_fg66", 8).boxes])
    assert queries[0] == queries[1]


def _random_probabilities(logic: ActiveLearningLogic, members: int = 3) -> MemoryProbabilities:
    """Softmax-like maps of an ensemble for every pool case (3 classes)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for m in range(members):
        arrays[f"fold_{m}"] = {}
        for case in logic.project.pool_cases:
            x = rng.random((3, *logic.project.cases[case].shape)).astype(np.float32)
            arrays[f"fold_{m}"][case] = x / x.sum(0)
    return MemoryProbabilities(arrays)


def test_model_method_with_probabilities_through_the_logic(phantom_project):
    logic = phantom_project
    logic.query("random", 3)
    logic.annotate_with_oracle()
    loop = logic.query("clasp_pe", 9, probabilities=_random_probabilities(logic))
    assert loop.loop == 1 and len(loop.boxes) == 9
    assert loop.info["beta"] == pytest.approx(1.0)  # the model of loop 0 of 5
    assert {b.stratum for b in loop.boxes} <= {"pe", "class_1", "class_2"}
    assert all(b.score is not None for b in loop.boxes)


def test_the_query_keywords_min_distance_and_distance_space_reach_pe_spatial(tmp_path):
    """logic.query makes pe_spatial's option record from its keywords (the CLI and the panel pass them)."""
    data = make_phantom_dataset(tmp_path / "data", PhantomSettings(cases=8))
    picks = {}
    for distance in (None, 40.0):
        logic = ActiveLearningLogic.create(tmp_path / f"p{distance}", data.images, data.labels, seed=1)
        boxes = logic.query("pe_spatial", 6, probabilities=_random_probabilities(logic), min_distance=distance).boxes
        picks[distance] = [(b.case, b.box.coords) for b in boxes]
        same_image = [
            np.linalg.norm(a.box.centre - b.box.centre) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.case == b.case
        ]
        assert all(d >= (distance or 20) for d in same_image)  # default: the longest box edge (20 voxels)
    assert picks[None] != picks[40.0]  # the two boxes of one image 34.5 voxels apart by default are too close at 40
    with pytest.raises(ValueError, match="pe_spatial: distance_space: expected 'voxels' or 'embedding'"):
        logic.query("pe_spatial", 6, probabilities=_random_probabilities(logic), distance_space="pixels")


def test_a_project_planned_for_more_loops_queries_on_their_noise_schedule(phantom_project):
    """A run of 1 planned loop extended to 5: ClaSP PE's beta follows the 5-loop schedule, and the plan is saved."""
    logic = phantom_project
    logic.project.plan_loops(1)
    for _ in range(2):
        logic.query("random", 3)
        logic.annotate_with_oracle()
    assert ActiveLearningLogic.open(logic.project.path).project.settings.budget.loops == 1
    logic.project.plan_loops(5)
    reopened = ActiveLearningLogic.open(logic.project.path)
    assert reopened.project.settings.budget.loops == 5
    loop = reopened.query("clasp_pe", 4, probabilities=_random_probabilities(reopened))
    # the model of loop 1 of 5 (10 ** 0.5); planned for 1 loop it would have been treated as the last but one of 3 (10)
    assert loop.loop == 2 and loop.info["total_loops"] == 5
    assert loop.info["beta"] == pytest.approx(10**0.5)
    with pytest.raises(ProjectError, match="at least 1 loop"):
        reopened.project.plan_loops(0)


def test_cli_init_query_annotate_status(tmp_path, capsys):
    data = make_phantom_dataset(tmp_path / "data", PhantomSettings(cases=8))
    project = tmp_path / "cli-project"
    assert (
        main(
            [
                "init",
                str(project),
                "--images",
                str(data.images),
                "--labels",
                str(data.labels),
                "--patch-size",
                "16",
                "16",
                "16",
                "--query-size",
                "5",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    assert main(["query", str(project), "--method", "random_fg33"]) == 0
    assert "5 boxes by random_fg33" in capsys.readouterr().out
    assert main(["annotate", str(project), "--oracle"]) == 0
    assert "oracle annotated 5 boxes" in capsys.readouterr().out
    assert main(["status", str(project), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["annotated"], status["patch_size"], status["pool_cases"]) == (5, [16, 16, 16], 6)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    data = make_phantom_dataset(tmp_path / "data", PhantomSettings(cases=4))
    project = tmp_path / "unlabelled"
    assert main(["init", str(project), "--images", str(data.images)]) == 0
    capsys.readouterr()
    assert main(["query", str(project), "--method", "random_fg66", "--count", "2"]) == 1
    err = capsys.readouterr().err
    assert "random_fg66" in err and "ground truth" in err and "Traceback" not in err
    assert main(["query", str(project), "--method", "pe", "--count", "2"]) == 1
    assert "probabilities" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nowhere")]) == 1
    assert "not an ActiveLearning3D project" in capsys.readouterr().err
