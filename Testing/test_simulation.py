"""``al3d simulate`` and ``al3d report`` on 16 cases (real Hippocampus when shared, else phantoms), ``test`` profile.

Two methods, two seeds, two loops and the full-data reference. The simulation
is started as a command, killed with SIGKILL once the first loop record is
written, and run again: it must finish without redoing finished work. Then the
report must hold every table and plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.cli import main as al3d
from ActiveLearning3DLib.fileio import read_json
from ActiveLearning3DLib.jobs import Job, LocalRunner, LocalRunnerSettings
from ActiveLearning3DLib.nnunet.preprocessing import preprocess
from ActiveLearning3DLib.nnunet.profiles import resolve_profile
from ActiveLearning3DLib.pipeline import LoopSettings
from ActiveLearning3DLib.project import ProjectError
from ActiveLearning3DLib.query_methods import get_method
from ActiveLearning3DLib.scores import ScoreStore
from ActiveLearning3DLib.simulation import (
    NNACTIVE_BUDGETS,
    Simulation,
    SimulationSettings,
    _copy_project,
    _export_header,
    collect_results,
    export_records,
    resolve_budget,
    shared_scoring,
    stage_seconds,
)
from conftest import default_data_dir

REPO = Path(__file__).resolve().parents[1]
METHODS = ("random", "clasp_pe")
SEEDS = (0, 1)


def _settings(data: Path, out: Path) -> SimulationSettings:
    return SimulationSettings(
        images=data / "imagesTr",
        labels=data / "labelsTr",
        methods=METHODS,
        out=out,
        budget=20,
        loops=2,
        seeds=SEEDS,
        profile="test",
        device="cpu",
        max_cases=16,
        parallel=1,
    )


def _command(settings: SimulationSettings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ActiveLearning3DLib.cli",
        "simulate",
        "--images",
        str(settings.images),
        "--labels",
        str(settings.labels),
        "--method",
        ",".join(settings.methods),
        "--budget",
        str(settings.budget),
        "--loops",
        str(settings.loops),
        "--seeds",
        ",".join(map(str, settings.seeds)),
        "--profile",
        "test",
        "--device",
        "cpu",
        "--max-cases",
        "16",
        "--parallel",
        "1",
        "--out",
        str(settings.out),
    ]


def _job_endings(out: Path) -> dict[str, str]:
    return {
        str(p.parent.relative_to(out)): read_json(p)["ended"]
        for p in out.rglob("jobs/*/status.json")
        if read_json(p)["state"] == "done"
    }


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    data = default_data_dir(tmp_path_factory, phantom_cases=16)
    out = tmp_path_factory.mktemp("sim") / "run"
    settings = _settings(data, out)
    driver = subprocess.Popen(_command(settings), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not list(out.glob("results/*/seed_*/loop_000.json")):
        assert driver.poll() is None, "the simulation ended before writing a record"
        assert time.monotonic() < deadline, "no loop record after 10 minutes"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)  # the driver dies; its workers (own sessions) may still run
    driver.wait()
    records_before = {p: p.read_text() for p in out.glob("results/*/seed_*/loop_*.json")}
    done_before = _job_endings(out)
    results = Simulation(settings).run(poll_seconds=0.3)
    return settings, results, records_before, done_before


@pytest.mark.slow
def test_a_simulation_of_loop_0_alone_extends_to_more_loops_without_training_again(tmp_path_factory):
    """The cold-start benchmark can measure every start's loop 0 first (``--loops 1``) and add the loops after it."""
    data = default_data_dir(tmp_path_factory, phantom_cases=16)
    out = tmp_path_factory.mktemp("extend") / "run"
    first = SimulationSettings(
        images=data / "imagesTr",
        labels=data / "labelsTr",
        methods=("clasp_pe",),
        out=out,
        budget=20,
        loops=1,
        seeds=(0,),
        profile="test",
        device="cpu",
        max_cases=16,
        parallel=2,
        start="random",
        reference=False,
    )
    results = Simulation(first).run(poll_seconds=0.3)
    assert results["failed"] == {} and [r["loop"] for r in results["records"]] == [0]
    record = out / "results" / "clasp_pe" / "seed_0" / "loop_000.json"
    loop0, done = read_json(record), _job_endings(out)
    assert loop0.get("next_loop_file") is None

    results = Simulation(dataclasses.replace(first, loops=2)).run(poll_seconds=0.3)
    assert results["failed"] == {} and [r["loop"] for r in results["records"]] == [0, 1]
    after = _job_endings(out)
    assert {k: after.get(k) for k in done} == done  # loop 0 was not trained, evaluated or scored again
    assert len(after) > len(done)
    again = read_json(record)
    assert {k: v for k, v in again.items() if k not in ("seconds", "next_loop_file")} == {
        k: v for k, v in loop0.items() if k not in ("seconds", "next_loop_file")
    }
    assert again["next_loop_file"]["method"] == "clasp_pe" and len(again["next_loop_file"]["patches"]) == 4
    assert read_json(out / "simulation.json")["settings"]["loops"] == 2
    # every project now plans 2 loops: ClaSP PE's noise schedule of loop 1 spans the extended run
    for folder in (out / "base", out / "seed_0" / "clasp_pe"):
        assert read_json(folder / "project.json")["budget"]["loops"] == 2, folder


def test_a_restarted_driver_adopts_every_live_job_before_it_starts_new_ones(tmp_path_factory):
    """Two folds of a later run still train when the driver restarts: they hold both slots from the first step on,
    so the earlier runs' new jobs wait instead of training beside them."""
    data = default_data_dir(tmp_path_factory, phantom_cases=16)
    out = tmp_path_factory.mktemp("adopt") / "run"
    settings = SimulationSettings(
        images=data / "imagesTr",
        labels=data / "labelsTr",
        methods=("random",),
        out=out,
        budget=20,
        loops=1,
        seeds=(0, 1),
        profile="test",
        device="cpu",
        max_cases=16,
        parallel=2,
        reference=False,
    )
    Simulation(settings).prepare()  # the folder as the earlier driver left it
    earlier = LocalRunner(LocalRunnerSettings(poll_seconds=0.05, max_parallel=2))
    live = [
        Job.create(out / "seed_1" / "random" / "jobs", f"fold_{k}", "selftest", {"steps": 10000, "seconds": 0.05})
        for k in range(2)
    ]
    for job in live:
        earlier.submit(job)
    earlier.poll()
    deadline = time.monotonic() + 60
    while not all(j.status().state == "running" and j.status().pid for j in live):
        assert time.monotonic() < deadline, "the live jobs did not start"
        time.sleep(0.05)
    restarted = Simulation(settings)
    try:
        assert not restarted.step()
        started = [p.parent for p in out.glob("seed_*/start/jobs/*/job.json")]
        assert started and all(Job(p).status().state == "queued" and not Job(p).log_path.exists() for p in started)
        assert {j.path for j in restarted.runner.active()} >= {j.path for j in live}
    finally:
        restarted.cancel()
        earlier.cancel_all()
    assert all(j.status().state == "cancelled" for j in live)


def test_budget_from_the_nnactive_table_or_the_documented_rule():
    assert resolve_budget("low", (20, 20, 20), 10**7) == (100, "nnActive table for patch [20, 20, 20]")
    assert resolve_budget("high", (32, 74, 74), 1)[0] == NNACTIVE_BUDGETS[(32, 74, 74)][2]
    low, rule = resolve_budget("low", (10, 10, 10), 2_000_000)
    assert "rule" in rule and low == 130  # 6.5 % of 2e6 voxels in boxes of 1000 voxels, rounded to 5
    assert resolve_budget("medium", (10, 10, 10), 2_000_000)[0] == 260
    assert resolve_budget(40, (10, 10, 10), 1) == (40, "given")
    with pytest.raises(ValueError, match="low, medium, high"):
        resolve_budget("huge", (20, 20, 20), 1)
    with pytest.raises(ValueError, match="unknown query method"):
        SimulationSettings(images=Path("i"), labels=Path("l"), methods=("nope",), out=Path("o"))


def test_killed_simulation_resumes_without_redoing_finished_work(simulated):
    settings, results, records_before, done_before = simulated
    assert results["failed"] == {}
    for path, text in records_before.items():
        before, after = json.loads(text), read_json(path)
        # the figures of a finished loop never change; the next step's query and oracle times and its boxes are
        # added later
        later = ("seconds", "next_loop_file")
        assert {k: v for k, v in after.items() if k not in later} == {k: v for k, v in before.items() if k not in later}
        assert {k: after["seconds"][k] for k in before["seconds"]} == before["seconds"]
    after = _job_endings(settings.out)
    assert {k: after.get(k) for k in done_before} == done_before  # no finished job ran again


def test_every_run_records_every_loop_with_the_shared_protocol(simulated):
    settings, results, _, _ = simulated
    header = read_json(settings.out / "simulation.json")
    assert header["budget"] == 20 and header["query_size"] == 4 and header["versions"]["nnunetv2"]
    assert header["profile"]["name"] == "test" and header["versions"]["torch"]
    records = {(r["method"], r["seed"], r["loop"]): r for r in results["records"]}
    assert set(records) == {(m, s, t) for m in METHODS for s in SEEDS for t in range(2)}
    for (m, s, t), r in records.items():
        assert r["boxes"] == 4 * (t + 1) and r["annotated_voxels"] == r["boxes"] * 8000
        assert 0 < r["foreground_fraction"] < 1 and 0 <= r["mean_dice"] <= 1
        assert r["seconds"]["train"] > 0 and r["seconds"]["evaluate"] > 0
    for s in SEEDS:  # loop 0 (starting budget and its model) is shared by the methods of a seed
        assert records[("random", s, 0)]["mean_dice"] == records[("clasp_pe", s, 0)]["mean_dice"]
        assert records[("random", s, 0)]["model"] == records[("clasp_pe", s, 0)]["model"]
    tests = {
        tuple(sorted(ActiveLearningLogic.open(settings.out / f"seed_{s}" / m).project.test_cases)) for m in METHODS for s in SEEDS
    }
    assert len(tests) == 1  # the same test split everywhere
    assert 0 <= results["reference"]["mean_dice"] <= 1
    # the full-data run waits behind the runs' jobs (it fills idle slots); no run's job does
    reference_jobs = list(settings.out.glob("reference/*/project/jobs/*/job.json"))
    assert reference_jobs and all(read_json(p)["inputs"].get("background") is True for p in reference_jobs)
    assert not any(read_json(p)["inputs"].get("background") for p in settings.out.glob("seed_*/*/jobs/*/job.json"))
    annotated_later = [
        records[("clasp_pe", s, 1)]["foreground_fraction"] > records[("clasp_pe", s, 0)]["foreground_fraction"] for s in SEEDS
    ]
    assert all(annotated_later)


def test_model_free_queries_depend_on_the_seed_only(simulated, tmp_path):
    settings, _, _, _ = simulated
    for seed in SEEDS:
        copy = tmp_path / f"start_{seed}"
        shutil.copytree(settings.out / f"seed_{seed}" / "start", copy)
        again = ActiveLearningLogic.open(copy).query("random", 4, seed)
        ran = ActiveLearningLogic.open(settings.out / f"seed_{seed}" / "random").project.read_loop(1)
        assert [b.box for b in again.boxes] == [b.box for b in ran.boxes]
    first = ActiveLearningLogic.open(settings.out / "seed_0" / "random").project.read_loop(1).boxes
    second = ActiveLearningLogic.open(settings.out / "seed_1" / "random").project.read_loop(1).boxes
    assert [b.box for b in first] != [b.box for b in second]


def test_the_shared_loop_0_is_scored_once_in_the_start(simulated):
    """The start scores the pool with the loop-0 model; the model-based run's copy finds that job done (it does
    not score again) and shares the score files."""
    settings, _, _, _ = simulated
    for s in SEEDS:
        start, run = settings.out / f"seed_{s}" / "start", settings.out / f"seed_{s}" / "clasp_pe"
        [job] = (start / "jobs").glob("*-score")
        status = read_json(job / "status.json")
        assert status["state"] == "done"
        classes = ActiveLearningLogic.open(start).project.foreground_classes
        assert read_json(job / "job.json")["inputs"]["maps"] == get_method("clasp_pe").map_names(classes)
        assert read_json(run / "jobs" / job.name / "status.json") == status  # copied as done, never run again
        model = job.name[: -len("-score")]
        files = sorted((start / "nnunet" / "results" / model / "scores").iterdir())
        assert files and all(os.path.samefile(f, run / "nnunet" / "results" / model / "scores" / f.name) for f in files)


def test_one_scoring_pass_serves_every_model_based_method_of_a_grid(simulated):
    settings, _, _, _ = simulated
    logic = ActiveLearningLogic.open(settings.out / "seed_0" / "start")
    classes = logic.project.foreground_classes
    assert shared_scoring(("random", "random_fg66"), classes) == {"score": False}
    changes = shared_scoring(("random", "pe", "clasp_pe", "bald"), classes)
    pipeline = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", **changes))
    assert pipeline.scores and pipeline.method.name == "pe"
    assert pipeline.score_maps == ["pe", *[f"class_{c}" for c in classes], "bald"]


def test_a_method_needing_another_map_scores_again_and_keeps_the_maps_others_query(simulated, tmp_path):
    """A folder first run with ``clasp_pe`` and later given ``bald``: the done score job serves ``clasp_pe`` as it
    is, and is made again for ``bald`` with the old maps and the new one; the start's score files stay as they were."""
    settings, _, _, _ = simulated
    start = settings.out / "seed_0" / "start"
    _copy_project(start, tmp_path / "run")
    logic = ActiveLearningLogic.open(tmp_path / "run")
    classes = logic.project.foreground_classes
    same = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", parallel=1, method="clasp_pe", stages=("predict",)))
    [score] = [j for j in same.jobs("predict") if j.name.endswith("-score")]
    before = read_json(score.spec_path)
    assert score.status().state == "done"
    evaluation = read_json(same.jobs_dir / f"{same.model_name}-evaluate" / "status.json")
    start_dir = start / "nnunet" / "results" / same.model_name / "scores"
    start_scores = {f.name: f.read_bytes() for f in start_dir.iterdir()}

    pipeline = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", parallel=1, method="bald", stages=("predict",)))
    assert pipeline.run(timeout=600).state == "done"
    spec = read_json(score.spec_path)
    assert spec["created"] != before["created"]
    assert spec["inputs"]["maps"] == get_method("clasp_pe").map_names(classes) + ["bald"]
    assert pipeline.score_job_maps() == spec["inputs"]["maps"]
    old = pipeline.jobs_dir / ".superseded" / f"{score.name}.1"  # the replaced job is kept, not deleted
    assert read_json(old / "job.json") == before and read_json(old / "status.json")["state"] == "done"
    assert [j.name for j in logic.jobs()].count(score.name) == 1
    assert read_json(pipeline.jobs_dir / f"{pipeline.model_name}-evaluate" / "status.json") == evaluation
    store = ScoreStore(pipeline.scores_dir)
    assert all(store.has(c, spec["inputs"]["maps"]) for c in logic.project.pool_cases)
    for name, data in start_scores.items():
        assert (start_dir / name).read_bytes() == data
        assert not ScoreStore(start_dir).has(Path(name).stem, ["bald"])
    again = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", parallel=1, method="clasp_pe", stages=("predict",)))
    assert [j.spec().created for j in again.jobs("predict") if j.name == score.name] == [spec["created"]]


def _preprocessed_cases(project: Path) -> tuple[dict[str, str], Path]:
    """The label hash of each preprocessed case (nnU-Net's manifest) and the folder of its files."""
    manifest = read_json(next((project / "nnunet" / "preprocessed").glob("*/al3d_manifest.json")))
    record = manifest["preprocessed"]["3d_fullres"]
    return record["cases"], next((project / "nnunet" / "preprocessed").glob(f"*/{record['data_identifier']}"))


def test_runs_share_the_images_and_keep_what_they_rewrite_their_own(simulated):
    """A run's project links the start's images, ground truth, preprocessed cases and loop-0 checkpoints instead of
    copying them, and a case that a run preprocesses again (new boxes in it) gets its own file: the start's stays
    as it was."""
    settings, _, _, _ = simulated
    shared = 0
    for s in SEEDS:
        start = settings.out / f"seed_{s}" / "start"
        start_cases, start_data = _preprocessed_cases(start)
        checkpoints = sorted((start / "nnunet" / "results").glob("*/fold_*/checkpoint_final.pth"))
        assert len(checkpoints) == resolve_profile(settings.profile).folds  # the loop-0 ensemble the runs start from
        logs = list((start / "nnunet" / "results").glob("*/fold_*/*.json"))
        for m in METHODS:
            run = settings.out / f"seed_{s}" / m
            for folder in ("imagesTr", "imagesTs", "groundtruth"):
                files = sorted((start / folder).iterdir())
                assert files and all(os.path.samefile(f, run / folder / f.name) for f in files), (m, s, folder)
            assert not any(os.path.samefile(f, run / "labelsTr" / f.name) for f in (start / "labelsTr").iterdir())
            assert all(os.path.samefile(f, run / f.relative_to(start)) for f in checkpoints), (m, s)
            assert logs and not any(os.path.samefile(f, run / f.relative_to(start)) for f in logs), (m, s)
            run_cases, run_data = _preprocessed_cases(run)
            for case, label_hash in start_cases.items():
                same = os.path.samefile(start_data / f"{case}_seg.b2nd", run_data / f"{case}_seg.b2nd")
                assert same == (run_cases[case] == label_hash), (m, s, case)
                shared += same
    assert shared > 0


def test_preprocessing_a_copy_again_leaves_the_project_it_was_copied_from_as_it_was(simulated, tmp_path):
    settings, _, _, _ = simulated
    start = settings.out / "seed_0" / "start"
    cases, start_data = _preprocessed_cases(start)
    before = {f.name: f.read_bytes() for f in start_data.iterdir()}
    _copy_project(start, tmp_path / "run")
    logic = ActiveLearningLogic.open(tmp_path / "run")
    record = next(b for b in logic.boxes(0) if b.case in cases)
    truth = logic.project.read_ground_truth(record.case)[record.box.slices]
    logic.submit(record, np.where(truth == 0, 1, 0).astype(truth.dtype))  # every voxel of the box changes
    result = preprocess(logic.project)
    assert result.processed == [record.case]
    _, run_data = _preprocessed_cases(tmp_path / "run")
    assert {f.name: f.read_bytes() for f in start_data.iterdir()} == before
    changed = run_data / f"{record.case}_seg.b2nd"
    assert not os.path.samefile(changed, start_data / changed.name) and changed.read_bytes() != before[changed.name]
    others = [c for c in cases if c != record.case]
    assert others and all(os.path.samefile(run_data / f"{c}_seg.b2nd", start_data / f"{c}_seg.b2nd") for c in others)


def _boxes(loop_file: dict) -> list[tuple]:
    return [(p["file"], tuple(p["coords"]), tuple(p["size"])) for p in loop_file["patches"]]


def test_records_carry_their_boxes_and_a_fresh_folder_is_rebuilt_from_them(simulated, tmp_path):
    """A fresh machine has only the committed records: the run is rebuilt from them and trains no earlier loop."""
    settings, _, _, _ = simulated
    ran = ActiveLearningLogic.open(settings.out / "seed_0" / "clasp_pe").project
    first = read_json(settings.out / "results" / "clasp_pe" / "seed_0" / "loop_000.json")
    assert _boxes(first["loop_file"]) == _boxes(ran.read_loop(0).to_json())
    assert _boxes(first["next_loop_file"]) == _boxes(ran.read_loop(1).to_json())
    # what was committed: the header and loop 0's record only (loop 1 is still to train)
    records = tmp_path / "committed"
    (records / "results" / "clasp_pe" / "seed_0").mkdir(parents=True)
    shutil.copy2(settings.out / "simulation.json", records / "simulation.json")
    shutil.copy2(
        settings.out / "results" / "clasp_pe" / "seed_0" / "loop_000.json",
        records / "results" / "clasp_pe" / "seed_0" / "loop_000.json",
    )
    fresh = dataclasses.replace(
        settings, methods=("clasp_pe",), seeds=(0,), out=tmp_path / "fresh", reference=False, restore_from=records
    )
    results = Simulation(fresh).run(poll_seconds=0.3)
    assert results["failed"] == {}
    rebuilt = ActiveLearningLogic.open(fresh.out / "seed_0" / "clasp_pe").project
    assert [_boxes(rebuilt.read_loop(t).to_json()) for t in (0, 1)] == [
        _boxes(first["loop_file"]),
        _boxes(first["next_loop_file"]),
    ]
    assert all(b.state == "annotated" for b in rebuilt.all_boxes())
    assert not (fresh.out / "seed_0" / "start").exists()  # loop 0 was not trained again
    trained = {p.parent.name for p in (fresh.out / "seed_0" / "clasp_pe").rglob("jobs/*/status.json") if "fold_" in p.parent.name}
    assert trained and all("loop_001" in name for name in trained), trained
    again = {r["loop"]: r for r in results["records"]}
    assert again[0]["mean_dice"] == first["mean_dice"] and again[0]["restored_from"] == str(records)
    assert again[1]["boxes"] == 2 * first["boxes"] and _boxes(again[1]["loop_file"]) == _boxes(first["next_loop_file"])
    for b in rebuilt.read_loop(1).boxes:  # the oracle copied the ground truth into the rebuilt boxes
        assert (rebuilt.read_partial_labels(b.case)[b.box.slices] == rebuilt.read_ground_truth(b.case)[b.box.slices]).all()
    # exported back to the committed folder: loop 0's original stays byte for byte, the new loop 1 is added
    original = (records / "results" / "clasp_pe" / "seed_0" / "loop_000.json").read_bytes()
    committed = read_json(records / "simulation.json")
    assert export_records(fresh.out, records) == 2
    assert (records / "results" / "clasp_pe" / "seed_0" / "loop_000.json").read_bytes() == original
    assert read_json(records / "results" / "clasp_pe" / "seed_0" / "loop_001.json")["mean_dice"] == again[1]["mean_dice"]
    # the header still names every run of the folder (the fresh run asked for clasp_pe seed 0 only)
    exported = read_json(records / "simulation.json")
    assert exported["settings"]["methods"] == committed["settings"]["methods"] != ["clasp_pe"]
    assert exported["settings"]["seeds"] == committed["settings"]["seeds"] and exported["created"] == committed["created"]
    header = (records / "simulation.json").read_bytes()
    export_records(fresh.out, records)  # nothing new: the header is not rewritten
    assert (records / "simulation.json").read_bytes() == header


def test_an_export_rewrites_a_header_only_for_what_is_new(tmp_path):
    target = tmp_path / "simulation.json"
    committed = {
        "budget": 100,
        "created": "2026-12-01T00:00:00+00:00",
        "updated": "2026-12-01T00:00:00+00:00",
        "settings": {"methods": ["random_fg66"], "seeds": [0, 1], "restore_from": None, "loops": 5},
    }
    target.write_text(json.dumps(committed))
    restored = {
        **committed,
        "created": "2026-12-06T00:00:00+00:00",
        "updated": "2026-12-06T00:00:00+00:00",
        "settings": {**committed["settings"], "seeds": [1], "restore_from": str(tmp_path)},
    }
    assert _export_header(restored, target) is None  # a session that rebuilt seed 1 from these records
    grown = {**restored, "settings": {**restored["settings"], "methods": ["clasp_pe"], "seeds": [2]}}
    merged = _export_header(grown, target)
    assert merged["settings"]["methods"] == ["random_fg66", "clasp_pe"] and merged["settings"]["seeds"] == [0, 1, 2]
    assert merged["created"] == committed["created"] and merged["updated"] == restored["updated"]
    other = {**restored, "versions": {"torch": "9"}}
    assert _export_header(other, target)["versions"] == {"torch": "9"}
    assert _export_header(grown, tmp_path / "absent.json") is grown


def test_restoring_refuses_records_of_another_protocol(simulated, tmp_path):
    settings, _, _, _ = simulated
    records = tmp_path / "other"
    records.mkdir()
    header = read_json(settings.out / "simulation.json")
    (records / "simulation.json").write_text(json.dumps({**header, "budget": 40}))
    other = dataclasses.replace(
        settings, methods=("random",), seeds=(0,), out=tmp_path / "fresh", reference=False, restore_from=records
    )
    with pytest.raises(ProjectError, match=r"simulation.json: recorded budget 40 differs"):
        Simulation(other).prepare()


def test_report_has_every_table_and_plot(simulated, tmp_path, capsys):
    settings, _, _, _ = simulated
    assert al3d(["report", str(settings.out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    for title in ("### Summary", "### Per loop", "### Pairwise penalty matrix"):
        assert title in md
    for method in METHODS:
        row = re.search(rf"^\| {method} \| 2 \| ([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \| ([\d.]+|n/a) \|", md, re.M)
        assert row, f"no summary row for {method}"
        assert 0 <= float(row.group(1)) <= 100 and 0 <= float(row.group(2)) <= 100
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == [
        "setting1_dice_vs_boxes.png",
        "setting1_dice_vs_corrections.png",
        "setting1_dice_vs_foreground.png",
        "setting1_penalty_matrix.png",
        "setting1_queried_boxes.png",
    ]
    for png in pngs:
        assert f"({png})" in md and (tmp_path / "report" / png).stat().st_size > 5000
    assert page.count("data:image/png;base64,") == len(pngs) and "src='http" not in page  # self-contained
    assert "<table>" in page and "Versions:" in page and "nnunetv2 2.8.1" in page


def test_simulate_report_estimates_minutes_with_the_effort_options(simulated, tmp_path):
    """The finished simulation run again with --report and an effort model: nothing trains again, and the report's
    estimated minutes are the corrected voxels / 60 (0 s per box, 1 s per corrected voxel)."""
    settings, _, _, _ = simulated
    done = _job_endings(settings.out)
    argv = _command(settings)[3:] + ["--report", "--box-seconds", "0", "--seconds-per-voxel", "1"]
    assert al3d(argv) == 0
    assert _job_endings(settings.out) == done
    custom = (settings.out / "report" / "report.md").read_text()
    assert "0 per box + 1 per corrected voxel" in custom
    assert al3d(["report", str(settings.out), "--out", str(tmp_path / "default")]) == 0
    default = (tmp_path / "default" / "report.md").read_text()
    assert "20 per box + 0.02 per corrected voxel" in default
    for loop in range(settings.loops):
        [row] = [
            line
            for line in custom.splitlines()
            if line.startswith(f"| random | {loop} |") and line in custom[custom.index("Annotation effort per loop") :]
        ]
        cells = [c.strip() for c in row.strip("|").split("|")]
        corrected = [
            read_json(p)["effort"]["corrected_voxels"] / 60
            for p in sorted(settings.out.glob(f"results/random/seed_*/loop_{loop:03d}.json"))
        ]
        assert cells[9].startswith(f"{np.mean(corrected):.1f} ± "), (cells, corrected)
        [before] = [
            line
            for line in default.splitlines()
            if line.startswith(f"| random | {loop} |") and line in default[default.index("Annotation effort per loop") :]
        ]
        assert before.split("|")[:10] == row.split("|")[:10] and before != row  # only the estimates differ


def test_a_stage_counts_the_attempt_of_a_fold_cut_short_by_the_end_of_a_session(tmp_path):
    """Folds 0-3 trained 02:33-02:42, fold 4 from 02:42 until the session ended at 02:46, and again after the
    pause from 05:24 to 05:26: training took 9 + 4 + 2 minutes, not 9 + 2 or 9 + 2 h 53 min."""

    def at(hour: int, minute: int) -> str:
        return f"2026-12-03T{hour:02d}:{minute:02d}:00+00:00"

    folds = {
        "fold_0": (at(2, 33), at(2, 37)),
        "fold_1": (at(2, 33), at(2, 37)),
        "fold_2": (at(2, 37), at(2, 42)),
        "fold_3": (at(2, 37), at(2, 42)),
        "fold_4": (at(5, 24), at(5, 26)),
    }
    jobs = []
    for name, (start, end) in folds.items():
        job = Job.create(tmp_path, f"loop_004-{name}", "selftest", {})
        earlier = [[at(2, 42), at(2, 46)]] if name == "fold_4" else []
        job.update(state="done", started=start, ended=end, earlier=earlier)
        jobs.append(job)

    class Pipeline:  # what stage_seconds reads of a LoopPipeline
        def all_jobs(self) -> list[Job]:
            return jobs

    assert stage_seconds(Pipeline()) == {"train": (9 + 4 + 2) * 60}


def test_collect_results_refuses_a_folder_that_is_not_a_simulation(tmp_path):
    with pytest.raises(ProjectError, match="not a simulation folder"):
        collect_results(tmp_path)


def test_exported_records_carry_the_reference_of_a_shared_cache(tmp_path):
    """The cold-start folders share one full-data run (``--reference-cache``): an export of their records (what
    ``bench_simulation.py`` commits) must still hold its result, so a fresh clone reports FG-Eff and trains no
    reference again."""
    cache = tmp_path / "cache" / "cpu-small_abc"
    cache.mkdir(parents=True)
    (cache / "reference.json").write_text(json.dumps({"mean_dice": 0.837}))
    run = tmp_path / "run"
    (run / "results" / "clasp_pe" / "seed_1").mkdir(parents=True)
    (run / "simulation.json").write_text(json.dumps({"budget": 100, "reference_dir": str(cache)}))
    for t in range(2):
        (run / "results" / "clasp_pe" / "seed_1" / f"loop_{t:03d}.json").write_text(json.dumps({"loop": t}))
    (run / "seed_1").mkdir()  # the run's projects are not part of the export
    committed = tmp_path / "committed"
    assert export_records(run, committed) == 2
    shutil.rmtree(tmp_path / "cache")  # a fresh clone has no cache
    assert collect_results(committed)["reference"] == {"mean_dice": 0.837}
    assert sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*") if p.is_file()) == [
        "reference.json",
        "results/clasp_pe/seed_1/loop_000.json",
        "results/clasp_pe/seed_1/loop_001.json",
        "simulation.json",
    ]
    with pytest.raises(ProjectError, match="not a simulation folder"):
        export_records(tmp_path / "cache", committed)
