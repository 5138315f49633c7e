"""Warm-started ensembles (``--init warm``) and stable folds, with the ``test`` profile on real worker processes.

10 real Hippocampus cases when the shared data is present (else phantoms). The module's project runs
``al3d loop --init warm`` on 3 starting boxes (fewer than 5 images: leave-one-out folds), the oracle annotates the
6 random boxes it queries, and ``al3d train --init warm`` trains loop 1 with 5 folds: members 0..2 start from
loop 0's, the two new members from scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.cli import main as al3d
from ActiveLearning3DLib.fileio import atomic_write_json, read_json
from ActiveLearning3DLib.nnunet.checkpoints import load_checkpoint, weights_digest
from ActiveLearning3DLib.nnunet.paths import NnunetPaths, nnunet_environment
from ActiveLearning3DLib.nnunet.profiles import PROFILES, ProfileError, resolve_profile
from ActiveLearning3DLib.nnunet.splits import check_splits, make_splits, stable_splits
from ActiveLearning3DLib.nnunet.trainer import INIT_FILE, TrainingError, train_fold
from ActiveLearning3DLib.pipeline import LoopSettings, profile_tag
from ActiveLearning3DLib.simulation import SimulationSettings
from conftest import annotated_project, default_data_dir

REPO = Path(__file__).resolve().parents[1]
CASES = 10
TRAINING = ["--profile", "test", "--device", "cpu", "--folds", "5", "--parallel", "2", "--init", "warm"]


def _models(project: Path, loop: int) -> list[Path]:
    return sorted(
        (project / "nnunet" / "results").glob(f"loop_{loop:03d}_{profile_tag(resolve_profile('test', folds=5), 'warm')}_*")
    )


@pytest.fixture(scope="module")
def two_loops(tmp_path_factory):
    """Loop 0 (3 images, leave-one-out) and loop 1 (5 folds) of a warm-started project."""
    path = annotated_project(tmp_path_factory, "warm", CASES, 3).project.path
    assert al3d(["loop", str(path), *TRAINING, "--method", "random", "--count", "6", "--no-evaluate"]) == 0
    assert al3d(["annotate", str(path), "--oracle"]) == 0
    assert al3d(["train", str(path), *TRAINING]) == 0
    (first,), (second,) = _models(path, 0), _models(path, 1)
    return ActiveLearningLogic.open(path), first, second


def _summary(model: Path, fold: int) -> dict:
    return read_json(model / f"fold_{fold}" / "al3d_summary.json")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["network_weights"]


def test_loop_0_trains_from_scratch_and_says_so(two_loops):
    logic, first, _ = two_loops
    folds = sorted(first.glob("fold_*"))
    assert len(folds) == len(read_json(first / "splits_final.json")) == 3  # 3 annotated images: leave-one-out
    for fold in folds:
        start = read_json(fold / "al3d_summary.json")["init"]
        assert (start["requested"], start["init"], start["from"]) == ("warm", "scratch", None)
        assert "loop 0 has no previous loop" in start["reason"]
        assert read_json(fold / "al3d_summary.json")["epochs"] == PROFILES["test"].epochs  # the full schedule
        log = (logic.jobs_dir / f"{first.name}-{fold.name}" / "log.txt").read_text()
        assert f"{fold.name.replace('_', ' ')}: warm start without a previous model, trained from scratch" in log


def test_a_warm_member_starts_from_the_previous_members_final_weights(two_loops):
    logic, first, second = two_loops
    profile = PROFILES["test"]
    for k in range(3):
        summary = _summary(second, k)
        start = summary["init"]
        previous = first / f"fold_{k}" / "checkpoint_final.pth"
        assert (start["init"], start["from"]) == ("warm", str(previous))
        # the network at the first step held exactly the previous member's weights ...
        assert start["initial_weights_sha256"] == weights_digest(_weights(previous))
        # ... and training changed them (the digest tells weights apart)
        assert weights_digest(_weights(second / f"fold_{k}" / "checkpoint_final.pth")) != start["initial_weights_sha256"]
        assert (summary["epochs"], start["initial_lr"]) == (profile.warm_epochs, pytest.approx(profile.warm_lr))
        assert summary["epochs"] < profile.epochs
        log = (logic.jobs_dir / f"{second.name}-fold_{k}" / "log.txt").read_text()
        assert f"fold {k}: warm start from {previous}" in log
    for k in (3, 4):  # folds the previous loop did not have: no predecessor, trained from scratch, and said
        start = _summary(second, k)["init"]
        assert start["init"] == "scratch" and f"no finished fold {k}" in start["reason"]
        assert "initial_weights_sha256" not in start and _summary(second, k)["epochs"] == profile.epochs


def test_folds_are_stable_across_loops_where_new_images_were_annotated(two_loops):
    logic, first, second = two_loops
    before, after = read_json(first / "splits_final.json"), read_json(second / "splits_final.json")
    old = {c for s in before for c in s["val"]}
    new = {c for s in after for c in s["val"]} - old
    assert new, "loop 1 annotated no new image: the test shows nothing"
    assert len(after) == 5
    for k, split in enumerate(before):
        assert set(split["val"]) <= set(after[k]["val"])  # every image kept its fold
        assert not set(split["val"]) & set(after[k]["train"])  # member k never trains on what it validated on
    assert {c for s in after[3:] for c in s["val"]} <= new  # the new folds hold new images only
    assert read_json(NnunetPaths.for_project(logic.project).splits_file) == after  # what the folds trained on
    prepared = read_json(logic.jobs_dir / f"{second.name}-prepare" / "result.json")
    assert prepared["split_rule"].startswith("stable folds: 3 images kept their fold")


def test_stable_splits_keep_folds_balance_new_images_and_start_fresh_when_folds_shrink():
    classes = {f"c{i}": ({0, 1} if i % 2 else {0, 2}) for i in range(12)}
    first = make_splits({c: classes[c] for c in ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]}, 5, seed=3)
    grown = make_splits(classes, 5, seed=3, previous=first)
    for k, split in enumerate(first):
        assert set(split["val"]) <= set(grown[k]["val"])
    assert sorted(len(s["val"]) for s in grown) == [2, 2, 2, 3, 3]  # sizes still differ by at most one
    assert check_splits(grown, classes) == []
    assert grown != make_splits(classes, 5, seed=3)  # not what fresh splits would have been: the folds were kept
    # fewer folds than before (annotations removed): the old folds cannot be kept, fresh splits say so
    shrunk = {c: classes[c] for c in ["c0", "c1", "c2"]}
    splits, note = stable_splits(shrunk, 5, 3, grown)
    assert splits == make_splits(shrunk, 5, 3) and note.startswith("fresh splits: the previous splits have 5 folds")


def test_warm_start_without_a_previous_model_or_with_other_plans_trains_from_scratch(two_loops, tmp_path):
    logic, first, _ = two_loops
    none = train_fold(logic.project.path, 0, "test", tmp_path / "none", "cpu", seed=1, init="warm", warm_note="nothing found")
    assert none["init"]["init"] == "scratch" and "without a previous model" in none["init"]["reason"]
    assert none["epochs"] == PROFILES["test"].epochs
    assert read_json(tmp_path / "none" / "fold_0" / INIT_FILE)["init"] == "scratch"
    # a previous model with another network (wider first stage): refused before anything is loaded
    other = tmp_path / "other"
    (other / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (other / name).write_bytes((first / name).read_bytes())
    (other / "fold_0" / "checkpoint_final.pth").write_bytes((first / "fold_0" / "checkpoint_final.pth").read_bytes())
    plans = read_json(other / "plans.json")
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [2 * f for f in arch["features_per_stage"]]
    atomic_write_json(other / "plans.json", plans)
    refused = train_fold(logic.project.path, 0, "test", tmp_path / "refused", "cpu", seed=1, init="warm", warm_from=other)
    assert refused["init"]["init"] == "scratch" and "another architecture" in refused["init"]["reason"]
    # and one whose plans say the same but whose weights have other shapes: refused by the network check
    atomic_write_json(other / "plans.json", read_json(first / "plans.json"))
    weights = load_checkpoint(first / "fold_0" / "checkpoint_final.pth")
    weights["network_weights"] = {
        k: torch.zeros(3) if i == 0 else v for i, (k, v) in enumerate(weights["network_weights"].items())
    }
    torch.save(weights, other / "fold_0" / "checkpoint_final.pth")
    shapes = train_fold(logic.project.path, 0, "test", tmp_path / "shapes", "cpu", seed=1, init="warm", warm_from=other)
    assert shapes["init"]["init"] == "scratch" and "another network" in shapes["init"]["reason"]
    assert shapes["epochs"] == PROFILES["test"].epochs


# A warm training ended in its second epoch (after the checkpoint of epoch 0) by os._exit, as a kill would.
KILLED_IN_EPOCH_1 = """
import os, sys
from ActiveLearning3DLib.nnunet.profiles import resolve_profile
from ActiveLearning3DLib.nnunet.trainer import train_fold

def progress(status):
    if status.get("epoch") == 1 and status.get("iteration") == 1:
        os._exit(137)

train_fold(sys.argv[1], 1, resolve_profile("test", epochs=6), sys.argv[2], "cpu", progress, seed=5, init="warm",
           warm_from=sys.argv[3])
"""


def test_a_killed_warm_training_resumes_from_its_own_checkpoint(two_loops, tmp_path):
    logic, first, _ = two_loops
    project = logic.project.path
    profile = resolve_profile("test", epochs=6)  # a warm schedule of 2 epochs: a checkpoint before the last
    through = train_fold(project, 1, profile, tmp_path / "through", "cpu", seed=5, init="warm", warm_from=first)
    assert through["init"]["init"] == "warm" and through["epochs"] == profile.warm_epochs == 2

    model = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_EPOCH_1, str(project), str(model), str(first)],
        cwd=REPO,
        env={**os.environ, **nnunet_environment(project)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert load_checkpoint(model / "fold_1" / "checkpoint_latest.pth")["current_epoch"] == 1
    assert not (model / "fold_1" / "checkpoint_final.pth").exists()
    # resumed without naming the previous model: the fold's own checkpoint and recorded schedule are all it needs
    resumed = train_fold(project, 1, profile, model, "cpu", seed=5, init="warm")
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == 2
    assert resumed["init"]["init"] == "warm" and "initial_weights_sha256" not in resumed["init"]  # nothing reloaded
    final, reference = (
        _weights(model / "fold_1" / "checkpoint_final.pth"),
        _weights(tmp_path / "through" / "fold_1" / "checkpoint_final.pth"),
    )
    assert all(torch.equal(final[k], reference[k]) for k in reference)  # as if never killed
    # had it started again from the previous loop's member, epoch 0's training would be lost: other weights
    assert not all(torch.equal(final[k], v) for k, v in _weights(first / "fold_1" / "checkpoint_final.pth").items())


def test_init_is_validated_everywhere_with_one_line_errors(two_loops, tmp_path, capsys):
    logic, _, _ = two_loops
    for command in (
        ["loop", str(logic.project.path)],
        ["train", str(logic.project.path)],
        ["simulate", "--images", "x", "--labels", "y", "--method", "random", "--out", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as raised:
            al3d([*command, "--init", "bogus"])
        assert raised.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--init" in error and "'bogus'" in error and "scratch" in error and "warm" in error
    with pytest.raises(ValueError, match=r"^init: expected one of scratch, warm, got 'bogus'$"):
        LoopSettings(init="bogus")
    with pytest.raises(ValueError, match=r"^init: expected one of scratch, warm, got 'Warm'$"):
        SimulationSettings(images=tmp_path, labels=tmp_path, methods=("random",), out=tmp_path, init="Warm")
    with pytest.raises(TrainingError, match="init must be one of scratch, warm"):
        train_fold(logic.project.path, 0, "test", tmp_path / "m", "cpu", init="hot")
    with pytest.raises(ProfileError, match="warm_fraction must be in"):
        resolve_profile("test", warm_fraction=1.5)


def test_warm_and_scratch_models_have_different_names_and_scratch_names_are_unchanged(two_loops):
    logic, _, second = two_loops
    key = logic.project.annotation_key()
    warm = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", folds=5, init="warm"))
    scratch = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", folds=5, init="scratch"))
    assert warm.model_name == second.name and warm.model_name.endswith(f"-warm_{key}")
    assert scratch.model_name == warm.model_name.replace("-warm_", "_") and scratch.model_folder != warm.model_folder
    plain = (LoopSettings(profile="test", device="cpu"), LoopSettings(profile="test", device="cpu", init="scratch"))
    assert [logic.loop_pipeline(s).model_name for s in plain] == [
        f"loop_001_test-warm_{key}",  # warm is the default
        f"loop_001_test_{key}",
    ]  # scratch: as before
    # the warm schedule names warm models only: a scratch model's tag ignores it, a warm one's changes with it
    tuned = resolve_profile("test", warm_fraction=0.5)
    assert profile_tag(tuned) == "test" and profile_tag(tuned, "warm").startswith("test-")
    assert profile_tag(tuned, "warm") not in ("test-warm", profile_tag(resolve_profile("test", warm_initial_lr=0.003), "warm"))
    assert "warm_fraction" not in PROFILES["cpu-small"].to_json()  # profiles (and keys made from them) read as before


def test_a_simulation_folder_holds_one_init_and_training_seed(tmp_path_factory, tmp_path):
    from ActiveLearning3DLib.project import ProjectError
    from ActiveLearning3DLib.simulation import Simulation

    data = default_data_dir(tmp_path_factory, phantom_cases=CASES)
    settings = SimulationSettings(
        images=data / "imagesTr",
        labels=data / "labelsTr",
        methods=("random",),
        out=tmp_path / "sim",
        budget=20,
        loops=2,
        profile="test",
        device="cpu",
        max_cases=CASES,
        reference=False,
        init="scratch",
    )
    scratch = Simulation(settings).prepare()
    assert scratch.header["settings"]["init"] == "scratch" and scratch.loop_settings.init == "scratch"
    warm = SimulationSettings(**{**settings.__dict__, "init": "warm"})
    with pytest.raises(ProjectError, match=r"simulation with --init scratch; use another --out for --init warm"):
        Simulation(warm).prepare()  # its records would mix with the scratch ones
    other = Simulation(SimulationSettings(**{**warm.__dict__, "out": tmp_path / "warm"})).prepare()
    assert other.loop_settings.init == "warm" and other.header["settings"]["init"] == "warm"
    with pytest.raises(ProjectError, match=r"recorded init scratch differs from this simulation's warm"):
        Simulation(SimulationSettings(**{**warm.__dict__, "out": tmp_path / "restored", "restore_from": settings.out})).prepare()
    reseeded = SimulationSettings(**{**settings.__dict__, "training_seed": 7})  # training noise, not the same records
    with pytest.raises(ProjectError, match=r"simulation with --training-seed None; use another --out for --training-seed 7"):
        Simulation(reseeded).prepare()
    with pytest.raises(ProjectError, match=r"recorded training_seed None differs from this simulation's 7"):
        Simulation(
            SimulationSettings(**{**reseeded.__dict__, "out": tmp_path / "reseeded", "restore_from": settings.out})
        ).prepare()


def test_simulate_passes_init_and_training_seed_to_the_simulation(tmp_path, monkeypatch):
    """``al3d simulate --init warm --training-seed 7`` reaches SimulationSettings; a negative seed is refused."""
    from ActiveLearning3DLib import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_simulation", lambda settings, report, effort=None: seen.setdefault("s", settings) and 0)
    args = [
        "simulate",
        "--images",
        str(tmp_path),
        "--labels",
        str(tmp_path),
        "--method",
        "random",
        "--out",
        str(tmp_path / "sim"),
        "--init",
        "warm",
        "--training-seed",
        "7",
    ]
    assert cli.main(args) == 0
    assert (seen["s"].init, seen["s"].training_seed) == ("warm", 7)
    seen.clear()
    assert cli.main([*args[:-4], "--init", "scratch"]) == 0 and (seen["s"].init, seen["s"].training_seed) == ("scratch", None)
    seen.clear()
    assert cli.main(args[:-4]) == 0 and seen["s"].init == "warm"  # the default: warm-started loops
    seen.clear()
    with pytest.raises(SystemExit) as refused:
        cli.main([*args[:-1], "-1"])
    assert refused.value.code == 2 and not seen


def test_a_warm_schedule_for_the_study_names_its_models_and_shares_the_scratch_reference(tmp_path_factory, tmp_path, capsys):
    from ActiveLearning3DLib.project import ProjectError
    from ActiveLearning3DLib.simulation import Simulation

    data = default_data_dir(tmp_path_factory, phantom_cases=CASES)
    common = dict(
        images=data / "imagesTr",
        labels=data / "labelsTr",
        methods=("random",),
        budget=20,
        loops=2,
        profile="test",
        device="cpu",
        max_cases=CASES,
        reference_cache=tmp_path / "references",
    )
    scratch = Simulation(SimulationSettings(out=tmp_path / "scratch", init="scratch", **common)).prepare()
    tuned = Simulation(
        SimulationSettings(out=tmp_path / "warm", init="warm", warm_fraction=0.5, warm_initial_lr=0.003, **common)
    ).prepare()
    profile = tuned.loop_settings.profile
    assert (profile.warm_fraction, profile.warm_initial_lr, profile.warm_epochs) == (0.5, 0.003, 1)
    assert tuned.reference_dir() == scratch.reference_dir()  # one full-data run serves both grids
    assert tuned.header["settings"]["warm_fraction"] == 0.5
    with pytest.raises(ProjectError, match=r"simulation with --warm-fraction 0.5; use another --out"):
        Simulation(SimulationSettings(out=tmp_path / "warm", init="warm", warm_fraction=0.25, **common)).prepare()
    with pytest.raises(ValueError, match="give them with init 'warm'"):
        SimulationSettings(out=tmp_path / "x", init="scratch", warm_fraction=0.5, **common)
    assert SimulationSettings(out=tmp_path / "x", warm_fraction=0.5, **common).init == "warm"  # the default takes them
    assert (
        al3d(
            [
                "simulate",
                "--images",
                "x",
                "--labels",
                "y",
                "--method",
                "random",
                "--out",
                str(tmp_path / "y"),
                "--init",
                "warm",
                "--warm-fraction",
                "2",
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        "al3d simulate: error: warm_fraction: expected a share of the epochs in (0, 1], got 2.0"
    ]
