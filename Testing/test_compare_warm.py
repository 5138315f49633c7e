"""benchmarks/compare_warm.py, the warm-start study's comparison, on copies of the committed scratch records: a copy
compared with itself differs by nothing, a copy with every Dice one point higher and warm records' iterations
differs by one point and the expected compute ratio (a method that needs no model waits for no scoring), and a run with a loop missing counts in no AUBC. No training."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from ActiveLearning3DLib.fileio import atomic_write_json, read_json

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks" / "results" / "hippocampus-low-cpu-small"


def _compare_warm():
    spec = importlib.util.spec_from_file_location("compare_warm", REPO / "benchmarks" / "compare_warm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def warm_copy(tmp_path):
    if not (STUDY / "simulation.json").is_file():
        pytest.skip("the committed scratch study is not in this checkout")
    target = tmp_path / "warm"
    shutil.copytree(STUDY / "results", target / "results")
    shutil.copy(STUDY / "simulation.json", target / "simulation.json")
    return target


def test_a_copy_of_the_scratch_runs_differs_by_nothing(warm_copy):
    result = _compare_warm().compare(STUDY, warm_copy)
    assert {r["method"] for r in result["runs"]} == {"clasp_pe", "random_fg66"}
    for run in result["runs"]:
        assert run["aubc_difference"] == 0 and run["final_difference"] == 0
        assert all(row["same_boxes_as_scratch"] for row in run["loops"])
    assert result["methods"]["random_fg66"]["final_difference"]["sd"] == 0


def test_warm_records_one_point_higher_at_a_third_of_the_iterations(warm_copy):
    module = _compare_warm()
    full = module.scratch_iterations(read_json(STUDY / "simulation.json"))
    for path in (warm_copy / "results" / "random_fg66" / "seed_0").glob("loop_*.json"):
        record = read_json(path)
        record["mean_dice"] += 0.01
        warm = record["loop"] > 0
        record["training"] = {"init": "warm" if warm else "scratch", "iterations": full // 3 if warm else full}
        record["seconds"]["train"] = 100.0 if warm else 300.0
        record["seconds"]["score"] = 50.0  # pool scored for the pre-fill alone: random_fg66 does not wait for it
        atomic_write_json(path, record)
    result = module.compare(STUDY, warm_copy)
    run = next(r for r in result["runs"] if (r["method"], r["seed"]) == ("random_fg66", 0))
    assert run["final_difference"] == pytest.approx(1.0, abs=0.011)
    assert run["aubc_difference"] == pytest.approx(1.0, abs=0.011)
    assert run["training_compute_ratio"] == 3.0 and run["train_seconds_ratio"] == 3.0
    assert [row["init"] for row in run["loops"]] == ["scratch", "warm", "warm", "warm", "warm"]
    record = read_json(warm_copy / "results" / "random_fg66" / "seed_0" / "loop_001.json")
    waited = sum(record["seconds"].get(k) or 0 for k in ("prepare", "train", "query"))
    assert run["loops"][1]["turnaround_seconds"] == pytest.approx(waited, abs=0.06)
    clasp = next(r for r in result["runs"] if (r["method"], r["seed"]) == ("clasp_pe", 0))["loops"][1]
    assert clasp["turnaround_seconds"] > clasp["train_seconds"] + 100  # clasp_pe waits for its scoring


def test_a_run_with_a_loop_missing_counts_in_no_aubc(warm_copy):
    (warm_copy / "results" / "clasp_pe" / "seed_1" / "loop_004.json").unlink()
    result = _compare_warm().compare(STUDY, warm_copy)
    run = next(r for r in result["runs"] if (r["method"], r["seed"]) == ("clasp_pe", 1))
    assert len(run["loops"]) == 4 and "aubc_difference" not in run
    assert result["methods"]["clasp_pe"]["complete_seeds"] == [0, 2]
