"""Pre-filled boxes and per-box effort: the stored pool prediction, what a submit records, totals, the effort model.

The prediction store is our own file (``<model>/pool_prediction/<case>.nii.gz``),
so these tests write it directly instead of training a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.nnunet.paths import NnunetPaths
from ActiveLearning3DLib.prefill import (
    EffortModel,
    box_effort,
    effort_totals,
    model_loop,
    prediction_labels,
    write_pool_prediction,
)
from ActiveLearning3DLib.project import ProjectError
from conftest import make_dataset

SHAPE = (20, 24, 22)


def store_prediction(logic: ActiveLearningLogic, model: str, case: str, labels: np.ndarray) -> Path:
    """Write a model's predicted labels of a pool image as a score job does."""
    folder = NnunetPaths.for_project(logic.project).results_root / model / "pool_prediction"
    return write_pool_prediction(folder, case, labels.astype(np.uint8), logic.project.read_image(case))


def random_labels(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.uint8)


@pytest.fixture
def project(tmp_path) -> ActiveLearningLogic:
    """Loop 0 annotated by the oracle (no model), loop 1 queried with random boxes."""
    data = make_dataset(tmp_path / "data", n_cases=6, shape=SHAPE)
    logic = ActiveLearningLogic.create(
        tmp_path / "project", data.images, data.labels, patch_size=(8, 8, 8), test_fraction=0.2, seed=1
    )
    logic.query("random", 2, seed=0)
    logic.annotate_with_oracle()
    logic.query("random", 3, seed=1)
    return logic


def loop_box(logic: ActiveLearningLogic, loop: int):
    return next(b for b in logic.boxes(loop) if b.state == "pending")


def test_prefill_is_the_stored_prediction_inside_the_box_only(project):
    logic = project
    box = loop_box(logic, 1)
    predicted = random_labels(7, logic.project.cases[box.case].shape)
    store_prediction(logic, "loop_000_test_aaaa", box.case, predicted)
    prefill = logic.prefill(box)
    assert prefill.shape == tuple(box.box.size)
    np.testing.assert_array_equal(prefill, predicted[box.box.slices])
    assert logic.prefill_model(box.id).name == "loop_000_test_aaaa"
    # a box whose image the model did not predict opens empty
    other = next((b for b in logic.boxes(1) if b.case != box.case), None)
    if other is not None:
        assert not logic.prefill(other).any() and logic.prefill_model(other) is None


def test_untouched_prefill_submitted_records_no_change_and_dice_one(project):
    logic = project
    box = loop_box(logic, 1)
    shape = logic.project.cases[box.case].shape
    predicted = np.zeros(shape, dtype=np.uint8)
    inside = np.zeros(box.box.size, dtype=np.uint8)
    inside[:4], inside[4:6] = 1, 2  # both foreground classes present in the box
    predicted[box.box.slices] = inside
    store_prediction(logic, "loop_000_test_aaaa", box.case, predicted)
    labels = logic.prefill(box)
    logic.submit(box, labels.copy(), seconds=12.5)
    effort = logic.find_box(box.id).effort
    assert effort["prefill_shown"] is True and effort["prefill_model"] == "loop_000_test_aaaa"
    assert (effort["added"], effort["removed"], effort["relabelled"], effort["corrected"]) == (0, 0, 0, 0)
    assert effort["prefill_dice"] == {"1": 1.0, "2": 1.0}
    assert effort["voxels"] == int(np.prod(box.box.size))
    # it is on disk with the box, and the loop's totals hold it and the seconds
    reopened = ActiveLearningLogic.open(logic.project.path)
    assert reopened.find_box(box.id).effort == effort
    totals = next(t for t in reopened.effort_per_loop() if t["loop"] == 1)
    assert totals["corrected_voxels"] == 0 and totals["prefill_shown"] == 1 and totals["mean_prefill_dice"] == 1.0
    assert totals["seconds"] == 12.5
    assert "corrected 0 of" in str(reopened.status())


def test_counts_of_known_changes(project):
    logic = project
    box = loop_box(logic, 1)
    predicted = np.zeros(logic.project.cases[box.case].shape, dtype=np.uint8)
    inside = np.zeros(box.box.size, dtype=np.uint8)
    inside[:3] = 1  # 3 slices of class 1 (3 * 64 voxels), one slice of class 2
    inside[3] = 2
    predicted[box.box.slices] = inside
    store_prediction(logic, "loop_000_test_aaaa", box.case, predicted)
    labels = logic.prefill(box)
    labels[0, 0, :5] = 0  # 5 removed (class 1 -> background)
    labels[7, 7, :3] = 2  # 3 added (background -> class 2)
    labels[1, 0, :4] = 2  # 4 relabelled (class 1 -> class 2)
    whole = np.zeros(predicted.shape, dtype=np.uint8)
    whole[box.box.slices] = labels  # a whole-image label array is compared inside the box
    logic.submit(box.id, whole)
    effort = logic.find_box(box.id).effort
    assert (effort["added"], effort["removed"], effort["relabelled"], effort["corrected"]) == (3, 5, 4, 12)
    assert effort["foreground"] == 4 * 64 - 5 + 3
    ones_before, ones_after = 3 * 64, 3 * 64 - 5 - 4
    twos_before, twos_after = 64, 64 + 3 + 4
    assert effort["prefill_dice"]["1"] == pytest.approx(2 * ones_after / (ones_before + ones_after), abs=1e-6)
    assert effort["prefill_dice"]["2"] == pytest.approx(2 * twos_before / (twos_before + twos_after), abs=1e-6)


def test_prefill_not_shown_counts_against_an_empty_box_and_still_scores_the_prediction(project):
    logic = project
    box = loop_box(logic, 1)
    predicted = np.zeros(logic.project.cases[box.case].shape, dtype=np.uint8)
    predicted[box.box.slices] = 1
    store_prediction(logic, "loop_000_test_aaaa", box.case, predicted)
    labels = np.zeros(box.box.size, dtype=np.uint8)
    labels[:2] = 1
    logic.submit(box, labels, prefill_shown=False)
    effort = logic.find_box(box.id).effort
    assert effort["prefill_shown"] is False and effort["corrected"] == effort["added"] == 128
    assert effort["prefill_dice"]["1"] == pytest.approx(2 * 128 / (512 + 128), abs=1e-6)
    assert effort["prefill_dice"]["2"] is None  # absent from both


def test_newer_model_replaces_the_older_and_only_models_before_the_box_count(project):
    logic = project
    box = loop_box(logic, 1)
    shape = logic.project.cases[box.case].shape
    store_prediction(logic, "loop_000_test_aaaa", box.case, np.full(shape, 1))
    assert (logic.prefill(box) == 1).all()
    logic.submit(box, logic.prefill(box))
    for other in logic.pending_boxes():
        logic.skip(other)
    # loop 1 trained: its model predicted the pool, the next loop's boxes come pre-filled from it
    for case in logic.project.pool_cases:
        store_prediction(logic, "loop_000_test_aaaa", case, np.full(shape, 1))
        store_prediction(logic, "loop_001_test_bbbb", case, np.full(shape, 2))
    new = logic.query("random", 1, seed=2).boxes[0]
    assert (logic.prefill(new) == 2).all()
    assert logic.prefill_model(new).name == "loop_001_test_bbbb"
    assert (logic.prefill(box) == 1).all()  # a loop-1 box keeps the model that chose it


def test_loop0_box_opens_empty_and_records_painting_from_nothing(project):
    logic = project
    loop0 = logic.boxes(0)[0]
    shape = logic.project.cases[loop0.case].shape
    store_prediction(logic, "loop_000_test_aaaa", loop0.case, np.full(shape, 1))  # a model exists, but after loop 0
    assert not logic.prefill(loop0).any() and logic.prefill(loop0).shape == tuple(loop0.box.size)
    assert logic.prefill_model(loop0) is None
    effort = logic.find_box(loop0.id).effort  # the oracle's submit, before any model
    ground_truth = logic.project.read_ground_truth(loop0.case)[loop0.box.slices]
    assert effort["prefill_shown"] is False and effort["prefill_model"] is None and effort["prefill_dice"] is None
    assert effort["corrected"] == effort["added"] == effort["foreground"] == int(np.count_nonzero(ground_truth))


def test_prefill_of_an_unknown_box_names_it(project):
    with pytest.raises(ProjectError, match="no box '009-0000'"):
        project.prefill("009-0000")


def test_box_effort_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        box_effort(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), None, [1], False, None)


def test_prediction_labels_is_the_argmax_of_the_mean():
    mean = np.zeros((3, 2, 2, 2), dtype=np.float32)
    mean[0] = 0.5
    mean[2, 0] = 0.6
    mean[1, 1, 0] = 0.7
    labels = prediction_labels(mean)
    assert labels.dtype == np.uint8
    assert (labels[0] == 2).all() and (labels[1, 0] == 1).all() and (labels[1, 1] == 0).all()
    assert model_loop("loop_012_demo_abcd") == 12 and model_loop("reference") is None


def test_effort_model_estimates_fits_and_refuses_bad_parameters():
    model = EffortModel(box_seconds=10, seconds_per_voxel=0.5)
    assert model.seconds(100, boxes=2) == 70
    fitted = EffortModel.fit([0, 100, 200, 400], [10, 60, 110, 210])
    assert fitted.box_seconds == pytest.approx(10) and fitted.seconds_per_voxel == pytest.approx(0.5)
    with pytest.raises(ValueError, match="box_seconds"):
        EffortModel(box_seconds=-1)
    with pytest.raises(ValueError, match="at least two boxes"):
        EffortModel.fit([5, 5], [1, 2])


def test_effort_totals_skip_pending_boxes_and_undefined_dice():
    records = [
        {
            "state": "annotated",
            "seconds": 4.0,
            "effort": {"prefill_shown": True, "corrected": 10, "voxels": 100, "prefill_dice": {"1": 0.5, "2": None}},
        },
        {
            "state": "annotated",
            "seconds": None,
            "effort": {"prefill_shown": False, "corrected": 30, "voxels": 100, "prefill_dice": None},
        },
        {"state": "pending", "effort": None},
    ]
    totals = effort_totals(records)
    assert totals["boxes"] == 2 and totals["corrected_voxels"] == 40 and totals["box_voxels"] == 200
    assert totals["prefill_shown"] == 1 and totals["mean_prefill_dice"] == 0.5 and totals["seconds"] == 4.0


def test_submit_refuses_a_prefill_flag_that_is_not_a_bool(project):
    box = loop_box(project, 1)
    with pytest.raises(ValueError, match="prefill_shown"):
        project.submit(box, np.zeros(box.box.size, np.uint8), prefill_shown="yes")
    assert project.find_box(box.id).state == "pending"


def _effort_study(root: Path, with_effort: bool = True) -> Path:
    """A simulation folder written by hand: two seeds of one method, 2 loops, 10 boxes of 1000 voxels per loop."""
    from ActiveLearning3DLib.fileio import atomic_write_json

    root.mkdir(parents=True)
    atomic_write_json(
        root / "simulation.json",
        {
            "settings": {
                "methods": ["random"],
                "seeds": [0, 1],
                "loops": 2,
                "images": "data/imagesTr",
                "budget": 20,
                "start": "random",
            },
            "budget": 20,
            "budget_rule": "given",
            "query_size": 10,
            "profile_tag": "test",
            "patch_size": [10, 10, 10],
            "pool_cases": 10,
            "test_cases": 4,
            "profile": {"name": "test"},
            "versions": {},
        },
    )
    for seed in (0, 1):
        for loop in (0, 1):
            corrected = 4000 if loop == 0 else 1000 * (seed + 1)  # seed 0: 1000, seed 1: 2000 in loop 1
            effort = {
                "boxes": 10,
                "boxes_with_effort": 10,
                "prefill_shown": 10 * loop,
                "corrected_voxels": corrected,
                "box_voxels": 10000,
                "foreground_voxels": 4000,
                "seconds": None,
                "boxes_with_seconds": 0,
                "mean_prefill_dice": None if loop == 0 else 0.5 + 0.1 * seed,
            }
            record = {
                "method": "random",
                "seed": seed,
                "loop": loop,
                "boxes": 10 * (loop + 1),
                "annotated_voxels": 0,
                "foreground_voxels": 0,
                "foreground_fraction": 0.1 * (loop + 1),
                "mean_dice": 0.3 + 0.1 * loop,
                "per_class": {},
                "seconds": {},
            }
            if with_effort:
                record["effort"] = effort
            path = root / "results" / "random" / f"seed_{seed}" / f"loop_{loop:03d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, record)
    return root


def test_report_shows_corrections_prefill_dice_and_estimated_minutes(tmp_path):
    from ActiveLearning3DLib.report import SettingResults, write_report

    study = _effort_study(tmp_path / "study")
    setting = SettingResults(study)
    assert setting.effort_curve("random", 1) == [4000.0, 6000.0]  # cumulative: the loop-1 model learnt both loops
    rows = {r[1]: r for r in setting.effort_table(EffortModel(box_seconds=6, seconds_per_voxel=0.06)).rows}
    # loop 1: 150 ± 71 corrected voxels per box, 400 painted without; saved 62.5 ± 17.7 %; Dice 55.0 ± 7.1
    assert rows["1"][4] == "150 ± 71" and rows["1"][5] == "400 ± 0" and rows["1"][6] == "62.5 ± 17.7"
    assert rows["1"][8] == "55.0 ± 7.1" and rows["0"][8] == "n/a" and rows["0"][3] == "0/20"
    # minutes = (10 boxes x 6 s + 0.06 s x corrected) / 60: seeds 2.0 and 3.0
    assert rows["1"][9] == "2.5 ± 0.7" and rows["1"][10] == "5.0 ± 0.0"
    page = write_report([study], tmp_path / "report", EffortModel(box_seconds=6, seconds_per_voxel=0.06))
    md = (page.parent / "report.md").read_text()
    assert "Annotation effort per loop" in md and "ESTIMATES" in md and "6 per box + 0.06 per corrected voxel" in md
    assert (page.parent / "setting1_dice_vs_corrections.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="effort_model"):
        write_report([study], tmp_path / "bad", effort_model={"box_seconds": 1})


def test_report_of_records_without_corrections_says_so(tmp_path):
    from ActiveLearning3DLib.report import write_report

    page = write_report([_effort_study(tmp_path / "old", with_effort=False)], tmp_path / "report")
    md = (page.parent / "report.md").read_text()
    assert "hold no per-box corrections" in md and "Annotation effort per loop" not in md
    assert not (page.parent / "setting1_dice_vs_corrections.png").exists()


def test_a_simulation_scores_for_the_prediction_also_where_the_method_needs_no_model(project):
    from ActiveLearning3DLib.pipeline import LoopSettings
    from ActiveLearning3DLib.simulation import shared_scoring

    logic = project
    plain = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", method="random"))
    assert not plain.scores  # the panel's random loop: no model pass over the pool
    simulated = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", method="random", predict_pool=True))
    assert simulated.scores and simulated.score_maps == []
    job = next(j for j in simulated.jobs("predict") if j.name.endswith("-score"))
    assert job.spec().inputs["prediction_dir"] == str(simulated.model_folder / "pool_prediction")
    assert job.spec().inputs["maps"] == []
    off = logic.loop_pipeline(
        LoopSettings(profile="test", device="cpu", method="random", predict_pool=True, pool_prediction=False)
    )
    assert not off.scores
    classes = logic.project.foreground_classes
    assert shared_scoring(("random", "random_fg66"), classes, predict_pool=True) == {"score": True, "method": "random"}
    assert shared_scoring(("random",), classes) == {"score": False}


# ------------------------------------------------------------------ command line: effort model options, status
def _effort_row(report_md: str, loop: int) -> list[str]:
    """The cells of the report's effort table row of method random, loop ``loop``."""
    table = report_md[report_md.index("Annotation effort per loop") :]
    row = next(line for line in table.splitlines() if line.startswith(f"| random | {loop} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_report_command_effort_options_change_the_estimated_minutes(tmp_path, capsys):
    from ActiveLearning3DLib.cli import main

    study = _effort_study(tmp_path / "study")
    assert main(["report", str(study), "--out", str(tmp_path / "default")]) == 0
    assert (
        main(["report", str(study), "--out", str(tmp_path / "custom"), "--box-seconds", "6", "--seconds-per-voxel", "0.06"]) == 0
    )
    assert main(["report", str(study), "--out", str(tmp_path / "boxes-only"), "--box-seconds", "0"]) == 0
    default, custom, boxes_only = ((tmp_path / name / "report.md").read_text() for name in ("default", "custom", "boxes-only"))
    # loop 1, 10 boxes, 1000 / 2000 corrected voxels (seeds 0, 1), 4000 painted without pre-fill:
    # default 20 s per box + 0.02 s per voxel: (200 + 20) / 60 and (200 + 40) / 60 minutes; (200 + 80) / 60 without
    assert _effort_row(default, 1)[9:11] == ["3.8 ± 0.2", "4.7 ± 0.0"]
    assert "20 per box + 0.02 per corrected voxel" in default
    assert _effort_row(custom, 1)[9:11] == ["2.5 ± 0.7", "5.0 ± 0.0"]  # (60 + 60) / 60, (60 + 120) / 60; (60 + 240) / 60
    assert "6 per box + 0.06 per corrected voxel" in custom
    # only the per-box term given: the voxel term keeps its default (0 + 0.02 x 1000) / 60 = 0.33, 0.67
    assert _effort_row(boxes_only, 1)[9] == "0.5 ± 0.2" and "0 per box + 0.02 per corrected voxel" in boxes_only
    assert _effort_row(default, 1)[:9] == _effort_row(custom, 1)[:9]  # the measured columns do not change


SIMULATE = ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o"]


@pytest.mark.parametrize("command", ["report", "simulate"])
@pytest.mark.parametrize(
    "option,value",
    [
        ("--box-seconds", "-1"),
        ("--box-seconds", "nan"),
        ("--box-seconds", "x"),
        ("--seconds-per-voxel", "inf"),
        ("--seconds-per-voxel", "-0.5"),
    ],
)
def test_effort_options_refuse_bad_values_in_one_line_naming_the_option(tmp_path, capsys, command, option, value):
    from ActiveLearning3DLib.cli import main

    study = _effort_study(tmp_path / "study")
    head = (
        ["report", str(study), "--out", str(tmp_path / "o")]
        if command == "report"
        else [a.format(tmp=tmp_path) for a in SIMULATE] + ["--report"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(head + [option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and option in err and value in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_simulate_refuses_effort_options_without_a_report_before_anything_runs(tmp_path, capsys):
    from ActiveLearning3DLib.cli import main

    data = make_dataset(tmp_path / "data", n_cases=4, shape=(8, 8, 8))
    argv = [
        "simulate",
        "--images",
        str(data.images),
        "--labels",
        str(data.labels),
        "--method",
        "random",
        "--out",
        str(tmp_path / "o"),
        "--box-seconds",
        "5",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--report" in err and "--box-seconds" in err, err
    assert not (tmp_path / "o").exists()


def test_status_command_shows_each_loops_effort_totals(project, capsys):
    from ActiveLearning3DLib.cli import main

    logic = project
    box = loop_box(logic, 1)
    predicted = np.zeros(logic.project.cases[box.case].shape, dtype=np.uint8)
    predicted[box.box.slices] = 1
    store_prediction(logic, "loop_000_test_aaaa", box.case, predicted)
    labels = logic.prefill(box)
    labels[0] = 0  # one slice of the box (64 voxels) removed from the pre-fill
    logic.submit(box, labels, seconds=40.0)
    assert main(["status", str(logic.project.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    loop0 = [line for line in lines if line.strip().startswith("loop 0:")]
    loop1 = [line for line in lines if line.strip().startswith("loop 1:")]
    totals0 = next(t for t in logic.effort_per_loop() if t["loop"] == 0)
    assert loop0 and f"corrected {totals0['corrected_voxels']} of {totals0['box_voxels']} voxels" in loop0[0]
    assert loop1 and "corrected 64 of 512 voxels" in loop1[0] and "pre-filled 1 of 1" in loop1[0]
    assert "pre-fill Dice 0.933" in loop1[0] and "40 s recorded" in loop1[0]  # 2 x 448 / (512 + 448)
    assert main(["status", str(logic.project.path), "--json"]) == 0
    per_loop = json.loads(capsys.readouterr().out)["per_loop"]
    assert [p["effort"] for p in per_loop] == [{k: v for k, v in t.items() if k != "loop"} for t in logic.effort_per_loop()]
