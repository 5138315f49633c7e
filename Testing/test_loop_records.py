"""Typed loop records and their store: the committed records read and write back unchanged, new records write the
keys a reader of the old dicts expects, restore and backfill work on records, and a Simulation reads no file until it
is prepared. No training here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.fileio import atomic_write_json, read_json
from ActiveLearning3DLib.loop_records import EffortTotals, LoopRecord, LoopRecordStore, read_record
from ActiveLearning3DLib.project import ProjectError
from ActiveLearning3DLib.simulation import Simulation, SimulationSettings
from ActiveLearning3DLib.simulation_restore import backfill, restorable

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(REPO.glob("benchmarks/results/*/results/*/seed_*/loop_*.json"))
# the keys in the order the simulation wrote its record dict before records were typed
WRITTEN_ORDER = [
    "method",
    "seed",
    "loop",
    "boxes",
    "annotated_voxels",
    "foreground_voxels",
    "foreground_fraction",
    "mean_dice",
    "per_class",
    "model",
    "seconds",
    "loop_method",
    "written",
    "loop_file",
    "effort",
    "determinism",
    "training",
]


def _record(**changes) -> LoopRecord:
    fields = dict(
        method="random",
        seed=0,
        loop=0,
        boxes=4,
        annotated_voxels=32000,
        foreground_voxels=900,
        foreground_fraction=0.05,
        mean_dice=0.5,
        per_class={"Anterior": 0.4, "Posterior": 0.6},
        model="loop_000_test_1",
        seconds={"prepare": 2.0, "train": 11.0},
        loop_method="nnactive_start",
        written="2026-12-05T18:00:00+00:00",
        loop_file={"loop": 0, "method": "nnactive_start", "patches": []},
        effort=EffortTotals(boxes=4, boxes_with_effort=4, corrected_voxels=700, box_voxels=32000, foreground_voxels=900),
        determinism={"deterministic": True},
        training={"init": "scratch", "folds": {}, "iterations": 6},
    )
    return LoopRecord(**{**fields, **changes})


def test_every_committed_record_reads_typed_and_writes_back_byte_for_byte(tmp_path):
    assert COMMITTED, "no committed loop records under benchmarks/results"
    for path in COMMITTED:
        record = read_record(path)
        assert (record.method, f"seed_{record.seed}", f"loop_{record.loop:03d}.json") == (
            path.parents[1].name,
            path.parent.name,
            path.name,
        )
        assert record.boxes_of().loop == record.loop and len(record.boxes_of().boxes) > 0  # --restore-from reads them
        written = LoopRecordStore(tmp_path / path.parents[3].name).write(record)
        assert written.read_bytes() == path.read_bytes(), path


def test_a_new_record_writes_the_keys_of_the_old_dict_in_their_order(tmp_path):
    store = LoopRecordStore(tmp_path)
    path = store.write(_record(mean_dice=None))
    data = read_json(path)
    assert list(data) == WRITTEN_ORDER
    assert data["mean_dice"] is None and "next_loop_file" not in data and "restored_from" not in data
    assert list(data["effort"]) == [
        "boxes",
        "boxes_with_effort",
        "prefill_shown",
        "corrected_voxels",
        "box_voxels",
        "foreground_voxels",
        "mean_prefill_dice",
        "seconds",
        "boxes_with_seconds",
    ]
    assert store.read("random", 0, 0) == _record(mean_dice=None)


def test_update_adds_rounded_seconds_and_new_keys_after_those_there_and_keeps_unknown_keys(tmp_path):
    store = LoopRecordStore(tmp_path)
    path = store.path("pe", 1, 2)
    old = {
        "method": "pe",
        "seed": 1,
        "loop": 2,
        "boxes": 12,
        "note": "kept",
        "foreground_fraction": 0.1,
        "mean_dice": 0.7,
        "seconds": {"train": 5.0},
        "restored_from": "elsewhere",
    }
    path.parent.mkdir(parents=True)
    atomic_write_json(path, old)
    assert store.update("pe", 1, 2, seconds={"query": 0.12345, "oracle": None}, next_loop_file={"patches": []}) is not None
    data = read_json(path)
    assert list(data) == [*old, "next_loop_file"] and data["note"] == "kept"
    assert data["seconds"] == {"train": 5.0, "query": 0.123, "oracle": None}
    assert store.update("pe", 1, 3, seconds={"query": 1.0}) is None and not store.exists("pe", 1, 3)
    assert store.update("pe", 1, -1, seconds={"oracle": 1.0}) is None


@pytest.mark.parametrize(
    "change,message",
    [
        ({"seed": "1"}, "seed '1': expected a non-negative whole number"),
        ({"mean_dice": "high"}, "mean_dice 'high': expected a number or null"),
        ({"seconds": {"train": "long"}}, "'seconds' must map stages to numbers"),
        ({"loop_file": [1]}, "loop_file: expected a JSON object or null, found list"),
        ({"effort": {"corrected_voxels": "many"}}, "effort.corrected_voxels 'many': expected a number"),
    ],
)
def test_a_damaged_record_is_refused_naming_the_file_and_the_field(tmp_path, change, message):
    path = LoopRecordStore(tmp_path).write(_record())
    atomic_write_json(path, {**read_json(path), **change})
    with pytest.raises(ValueError) as refused:
        read_record(path)
    assert str(refused.value) == f"{path}: {message}"


def test_the_restorable_chain_stops_where_a_model_is_needed_again(tmp_path):
    """Loop 2 recorded without its next query: loops 0-1 come back with loop 2's boxes, and loop 2 trains again."""
    folder = tmp_path / "records"
    files = [{"loop": t, "patches": [{"file": f"case_{t}.nii.gz", "coords": [0, 0, 0], "size": [4, 4, 4]}]} for t in range(4)]
    store = LoopRecordStore(folder)
    for t in range(3):
        store.write(_record(loop=t, loop_file=files[t], next_loop_file=files[t + 1] if t < 2 else None))
    echoed = []
    restored, loop_files = restorable(folder, "random", 0, 5, echoed.append)
    assert [r.loop for r in restored] == [0, 1] and loop_files == files[:3] and not echoed
    restored, loop_files = restorable(folder, "random", 0, 3, echoed.append)  # loop 2 is the last: nothing to query
    assert [r.loop for r in restored] == [0, 1, 2] and loop_files == files[:3]
    store.write(_record(loop=1, loop_file=None))  # written before records kept their boxes
    restored, loop_files = restorable(folder, "random", 0, 5, echoed.append)
    assert [r.loop for r in restored] == [0] and loop_files == files[:2]
    assert echoed == [f"{store.path('random', 0, 1)}: written before records kept their boxes; this loop is run again"]


def test_backfill_gives_old_records_their_boxes_from_the_project_and_changes_nothing_else(tmp_path, dataset):
    logic = ActiveLearningLogic.create(
        tmp_path / "project", dataset.images, dataset.labels, patch_size=(4, 4, 4), test_fraction=0.25
    )
    for t in range(2):
        logic.query("random", 2, seed=t)
        logic.annotate_with_oracle()
    store = LoopRecordStore(tmp_path / "sim")
    old = {k: v for k, v in _record().to_json().items() if k not in ("loop_file", "effort", "determinism", "training")}
    for t in range(2):
        store.path("random", 0, t).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store.path("random", 0, t), {**old, "loop": t})
    untouched = store.path("random", 0, 1).read_text()
    backfill(store, "random", 0, logic.project)
    first = read_json(store.path("random", 0, 0))
    assert list(first) == [*old, "loop_file", "next_loop_file"]
    assert first["loop_file"] == logic.project.read_loop(0).to_json()
    assert first["next_loop_file"] == logic.project.read_loop(1).to_json()
    second = read_json(store.path("random", 0, 1))
    assert second["loop_file"] == logic.project.read_loop(1).to_json() and "next_loop_file" not in second
    assert {k: v for k, v in second.items() if k != "loop_file"} == json.loads(untouched)
    before = {p: p.read_bytes() for p in store.paths()}
    backfill(store, "random", 0, logic.project)  # complete records are left as they are
    assert {p: p.read_bytes() for p in store.paths()} == before


def test_a_simulation_reads_and_writes_nothing_until_it_is_prepared(tmp_path, dataset):
    settings = SimulationSettings(
        images=dataset.images,
        labels=dataset.labels,
        methods=("random",),
        out=tmp_path / "sim",
        budget=5,
        loops=2,
        profile="test",
        device="cpu",
        reference=False,
    )
    simulation = Simulation(settings)
    assert not settings.out.exists() and simulation.runs == [("random", 0)]
    with pytest.raises(RuntimeError, match=r"prepare\(\) has not run"):
        simulation.budget
    assert simulation.prepare() is simulation and simulation.prepare() is simulation  # once; the second is a no-op
    assert (simulation.budget, simulation.query_size) == (5, 1)
    assert read_json(settings.out / "simulation.json")["budget"] == 5 and (settings.out / "base" / "project.json").is_file()
    missing = SimulationSettings(
        images=tmp_path / "nowhere",
        labels=tmp_path / "nowhere",
        methods=("random",),
        out=tmp_path / "other",
        budget=5,
        profile="test",
        device="cpu",
        reference=False,
    )
    unprepared = Simulation(missing)  # bad data is found by prepare, not by the constructor
    with pytest.raises((ProjectError, ValueError), match="nowhere"):
        unprepared.prepare()
    with pytest.raises(RuntimeError):
        unprepared.header  # a failed prepare leaves nothing half known
