"""Same seed, same numbers on the CPU: training, a killed and resumed training, the next query, a simulation.

10 real Hippocampus cases when the shared data is present (else phantoms), ``test`` profile. Weights are compared
bit for bit (``torch.equal`` on every tensor of the state dict); records as JSON, without wall times and dates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from ActiveLearning3DLib.cli import main as al3d
from ActiveLearning3DLib.fileio import read_json
from ActiveLearning3DLib.nnunet.checkpoints import load_checkpoint
from ActiveLearning3DLib.nnunet.determinism import RNG_KEY, cpu_description, fold_seed
from ActiveLearning3DLib.nnunet.paths import nnunet_environment
from ActiveLearning3DLib.nnunet.profiles import resolve_profile
from ActiveLearning3DLib.nnunet.trainer import train_fold
from ActiveLearning3DLib.scores import ScoreStore
from conftest import annotated_project, default_data_dir

REPO = Path(__file__).resolve().parents[1]
CASES = 10
# what differs between two runs of the same settings: wall times and dates
TIMING_KEYS = {"seconds", "written", "created", "updated", "started", "ended", "submitted_at", "annotated_at"}


def _worker(args: list[str], project: Path) -> list[str]:
    return [sys.executable, "-m", "ActiveLearning3DLib.nnunet", args[0], str(project), *args[1:]]


def _run_worker(args: list[str], project: Path) -> dict:
    """The step as a job in a new folder beside the project; its result from the job's result.json."""
    job = Path(tempfile.mkdtemp(prefix="job_", dir=project.parent))
    done = subprocess.run(
        _worker([*args, "--job", str(job)], project),
        env={**os.environ, **nnunet_environment(project)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0 and read_json(job / "status.json")["state"] == "done", done.stdout[-3000:] + done.stderr[-3000:]
    return read_json(job / "result.json")


# The worker's training, ended in epoch 1 (after the checkpoint of epoch 0, save_every 1) by os._exit: like a kill,
# nothing is cleaned up or written, and the point is the same in every run.
KILLED_IN_EPOCH_1 = """
import os, sys
from ActiveLearning3DLib.nnunet.profiles import resolve_profile
from ActiveLearning3DLib.nnunet.trainer import train_fold

def progress(status):
    if status["epoch"] == 1 and status["iteration"] == 1:
        os._exit(137)

train_fold(sys.argv[1], 1, resolve_profile("test", epochs=3), sys.argv[2], "cpu", progress, seed=5)
"""


def _weights(model: Path, fold: int = 0) -> dict[str, torch.Tensor]:
    return load_checkpoint(model / f"fold_{fold}" / "checkpoint_final.pth")["network_weights"]


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _comparable(value, out: Path):
    """``value`` without wall times and dates, with the run's folder and the models' annotation keys (a fingerprint
    of the boxes' annotation times, project.annotation_key) as placeholders."""
    text = json.dumps(_without_timings(value), sort_keys=True).replace(str(out), "<out>")
    return json.loads(re.sub(r"(loop_\d{3}_[\w-]+?)_[0-9a-f]{8}\b", r"\1_<key>", text))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    path = annotated_project(tmp_path_factory, "determinism", CASES, 9).project.path
    _run_worker(["prepare"], path)
    return path


def test_the_same_seeded_training_twice_gives_identical_weights(tmp_path, prepared):
    first = train_fold(prepared, 0, "test", tmp_path / "a", "cpu", seed=3)
    second = train_fold(prepared, 0, "test", tmp_path / "b", "cpu", seed=3)
    assert _identical(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert first["final_train_loss"] == second["final_train_loss"]
    info = first["determinism"]
    assert info["deterministic"] is True and info["reason"].startswith("cpu, seeded")
    assert (info["base_seed"], info["loop"], info["seed"]) == (3, 0, fold_seed(3, 0, 0))
    assert info["cpu"] == cpu_description() and "torch kernels" in info["cpu"]  # the same bits need the same CPU type
    # the seed is what fixes the run: another base seed, or another fold of the same seed, draws other numbers
    train_fold(prepared, 0, "test", tmp_path / "c", "cpu", seed=4)
    assert not _identical(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    assert len({fold_seed(3, 0, 0), fold_seed(3, 0, 1), fold_seed(3, 1, 0), fold_seed(4, 0, 0)}) == 4
    unseeded = train_fold(prepared, 0, "test", tmp_path / "d", "cpu")
    assert unseeded["determinism"]["deterministic"] is False and unseeded["determinism"]["reason"] == "no seed given"


def test_a_killed_training_resumed_ends_with_the_weights_of_one_that_ran_through(tmp_path, prepared):
    args = ["train", "--fold", "1", "--profile", "test", "--device", "cpu", "--epochs", "3", "--seed", "5"]
    through = _run_worker([*args, "--output", str(tmp_path / "through")], prepared)
    assert through["determinism"]["deterministic"] is True

    model = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_EPOCH_1, str(prepared), str(model)],
        cwd=REPO,
        timeout=300,
        env={**os.environ, **nnunet_environment(prepared)},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    latest = model / "fold_1" / "checkpoint_latest.pth"
    assert latest.is_file() and not (model / "fold_1" / "checkpoint_final.pth").exists()
    saved = load_checkpoint(latest)  # the random states load weights-only, like the rest of the checkpoint
    assert saved["current_epoch"] == 1 and set(saved[RNG_KEY]) >= {"python", "numpy", "torch", "loaders"}

    resumed = _run_worker([*args, "--output", str(model)], prepared)  # a fresh process, as a restarted job
    assert resumed["resumed_from_epoch"] == 1 and resumed["determinism"]["deterministic"] is True
    assert _identical(_weights(model, 1), _weights(tmp_path / "through", 1))
    assert resumed["final_train_loss"] == through["final_train_loss"]

    # a checkpoint without random states (written before they were kept) still resumes, and the record says so
    older = tmp_path / "older"
    (older / "fold_1").mkdir(parents=True)
    (older / "fold_1" / "al3d_data_key.txt").write_text((model / "fold_1" / "al3d_data_key.txt").read_text())
    torch.save({k: v for k, v in saved.items() if k != RNG_KEY}, older / "fold_1" / "checkpoint_latest.pth")
    again = train_fold(prepared, 1, resolve_profile("test", epochs=3), older, "cpu", seed=5)
    assert again["resumed_from_epoch"] == 1 and again["determinism"] == {
        **again["determinism"],
        "deterministic": False,
        "reason": "resumed from a checkpoint without random states",
    }
    assert not _identical(_weights(older, 1), _weights(tmp_path / "through", 1))  # the random states are what matters


@pytest.fixture(scope="module")
def two_simulations(tmp_path_factory):
    """``al3d simulate`` twice with the same settings: ``clasp_pe`` (model-based queries), one seed, two loops."""
    data = default_data_dir(tmp_path_factory, phantom_cases=CASES)
    outs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(f"sim_{name}") / "run"
        started = time.perf_counter()
        assert (
            al3d(
                [
                    "simulate",
                    "--images",
                    str(data / "imagesTr"),
                    "--labels",
                    str(data / "labelsTr"),
                    "--method",
                    "clasp_pe",
                    "--budget",
                    "10",
                    "--loops",
                    "2",
                    "--seeds",
                    "7",
                    "--profile",
                    "test",
                    "--device",
                    "cpu",
                    "--max-cases",
                    str(CASES),
                    "--parallel",
                    "2",
                    "--no-reference",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        print(f"simulation {name}: {time.perf_counter() - started:.1f} s")
        outs.append(out)
    return outs


def _records(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): read_json(p) for p in sorted((out / "results").rglob("loop_*.json"))}


def test_the_next_query_after_a_loop_is_the_same_in_two_runs(two_simulations):
    first, second = two_simulations
    queried = [
        _comparable(read_json(out / "results" / "clasp_pe" / "seed_7" / "loop_000.json")["next_loop_file"], out)
        for out in (first, second)
    ]
    assert queried[0]["method"] == "clasp_pe" and queried[0]["info"]["trained_on_loop"] == 0
    assert len(queried[0]["patches"]) == 2 and all(b["score"] is not None for b in queried[0]["patches"])
    assert queried[0] == queried[1]
    # it is the same because the scores it ranked are: the loop-0 models' scores of the pool, bit for bit
    stores = [
        ScoreStore(next((out / "seed_7" / "start" / "nnunet" / "results").glob("loop_000_*/scores"))) for out in (first, second)
    ]
    cases = sorted(p.stem for p in stores[0].root.glob("*.npz"))
    assert cases and cases == sorted(p.stem for p in stores[1].root.glob("*.npz"))
    for case in cases:
        a, b = (s.read(case, ["pe"])["pe"].scores for s in stores)
        assert a.tobytes() == b.tobytes(), case


def test_two_simulations_with_the_same_settings_give_identical_records(two_simulations):
    first, second = (_comparable(_records(out), out) for out in two_simulations)
    assert sorted(first) == ["results/clasp_pe/seed_7/loop_000.json", "results/clasp_pe/seed_7/loop_001.json"]
    assert first == second
    for record in first.values():
        assert record["determinism"]["deterministic"] is True, record["determinism"]
        assert record["determinism"]["cpu"] == cpu_description()  # every fold on this machine: named once
        assert record["mean_dice"] is not None
