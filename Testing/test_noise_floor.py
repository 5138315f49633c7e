"""benchmarks/bench_noise_floor.py's analysis on copies of the committed study records: the seeds a paired t-test
needs, the spread over training seeds (the study's own run counting as a repeat only where it annotated the same
boxes), and a repeat on other boxes flagged. No training."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from ActiveLearning3DLib.fileio import atomic_write_json, read_json
from ActiveLearning3DLib.metrics import final_dice

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks" / "results" / "hippocampus-low-cpu-small"
RUN = Path("results") / "random_fg66" / "seed_0"


def _noise_floor():
    spec = importlib.util.spec_from_file_location("bench_noise_floor", REPO / "benchmarks" / "bench_noise_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy(target: Path, shift: float) -> Path:
    """The study's random_fg66 seed 0 records, every Mean Dice moved by ``shift`` (a fraction)."""
    (target / RUN).parent.mkdir(parents=True)
    shutil.copytree(STUDY / RUN, target / RUN)
    shutil.copy(STUDY / "simulation.json", target / "simulation.json")
    for path in (target / RUN).glob("loop_*.json"):
        record = read_json(path)
        record["mean_dice"] += shift
        atomic_write_json(path, record)
    return target


def _move_first_box(folder: Path) -> None:
    path = folder / RUN / "loop_001.json"
    record = read_json(path)
    record["loop_file"]["patches"][0]["coords"][0] += 1
    atomic_write_json(path, record)


@pytest.fixture
def repeats(tmp_path):
    if not (STUDY / "simulation.json").is_file():
        pytest.skip("the committed scratch study is not in this checkout")
    return {1: _copy(tmp_path / "train_1", 0.01), 2: _copy(tmp_path / "train_2", -0.01)}


def test_seeds_needed_by_a_paired_t_test():
    seeds_needed = _noise_floor().seeds_needed
    # effect size 1 (difference = sd of the differences): 10 pairs give a power of 0.80, 9 do not (G*Power's table)
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(-2.0, 2.0) == 10  # the sign of the difference does not matter
    assert seeds_needed(0.5, 1.0) == 34
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1.0, 0.0) is None
    assert seeds_needed(0.01, 1.0, most=50) is None


def test_the_study_run_counts_as_a_repeat_of_the_same_boxes(repeats, tmp_path):
    summary = _noise_floor().analyse(repeats, "random_fg66", 0, study=STUDY)
    assert summary["training_seeds"] == ["1", "2", "study"] and summary["same_boxes"]
    study_final = final_dice([100 * read_json(p)["mean_dice"] for p in sorted((STUDY / RUN).glob("loop_*.json"))])
    assert summary["training"]["final_dice"] == pytest.approx([study_final + 1, study_final - 1, study_final])
    assert summary["training"]["sd_final_dice"] == pytest.approx(1.0)
    assert summary["training"]["sd_aubc"] == pytest.approx(1.0)
    # the study's three query seeds and clasp_pe's paired difference are read from the study itself
    assert summary["query_seeds"]["seeds"] == [0, 1, 2] and summary["methods"]["seeds"] == [0, 1, 2]
    need = summary["seeds_needed"]["final_dice"]
    d = summary["methods"]["mean_final_dice_difference"]
    assert need["training_noise_only"] == _noise_floor().seeds_needed(d, 2**0.5 * 1.0)


def test_a_study_run_on_other_boxes_is_left_out_and_a_repeat_on_other_boxes_flagged(repeats, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(STUDY / "results", study / "results")
    shutil.copy(STUDY / "simulation.json", study / "simulation.json")
    _move_first_box(study)
    module = _noise_floor()
    summary = module.analyse(repeats, "random_fg66", 0, study=study)
    assert summary["training_seeds"] == ["1", "2"] and summary["same_boxes"]
    assert summary["training"]["sd_final_dice"] == pytest.approx(2**0.5)
    _move_first_box(repeats[2])
    assert module.analyse(repeats, "random_fg66", 0, study=None)["same_boxes"] is False
