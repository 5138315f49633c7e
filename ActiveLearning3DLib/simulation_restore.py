"""Rebuilding a simulation's runs from recorded loops (``--restore-from``), and completing old records (backfill).

Records carry their loop's boxes (``loop_file``) and, once queried, the next
loop's (``next_loop_file``). A fresh machine given such records (the copies
committed under ``benchmarks/``) rebuilds a run up to its last queried loop:
the oracle annotates the recorded boxes, the records are copied, and training
starts at the first loop without a record. Records written before they kept
their boxes get them from the run's project (:func:`backfill`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .fileio import atomic_write_json, read_json
from .loop_records import LoopRecord, LoopRecordStore, read_record
from .project import BoxState, LoopFile, Project, ProjectError

if TYPE_CHECKING:
    from .logic import ActiveLearningLogic
    from .simulation import SimulationSettings

# the header keys two simulations must share for the records of one to stand in for the other's
PROTOCOL_KEYS = ("budget", "query_size", "patch_size", "pool_cases", "test_cases", "split_seed", "profile_tag")
# how a run trains, beyond the profile: (settings key, its value in a header written before it was recorded)
TRAINING_KEYS = (("init", "scratch"), ("training_seed", None), ("warm_fraction", None), ("warm_initial_lr", None))


def training_differences(header: dict, settings: "SimulationSettings") -> list[tuple[str, Any, Any]]:
    """How a recorded simulation header trains differently from these settings (warm or scratch, training seed)."""
    recorded = header.get("settings", {})
    return [
        (key, recorded.get(key, default), getattr(settings, key))
        for key, default in TRAINING_KEYS
        if recorded.get(key, default) != getattr(settings, key)
    ]


def check_restore_header(folder: Path, header: dict, settings: "SimulationSettings") -> None:
    """The records to restore from must come from the same protocol: budget, query size, patch, pool, profile."""
    path = folder / "simulation.json"
    if not path.is_file():
        raise ProjectError(f"{path}: not found; --restore-from needs a simulation's records and its simulation.json")
    old = read_json(path)
    for key in PROTOCOL_KEYS:
        if old.get(key) != header.get(key):
            raise ProjectError(
                f"{path}: recorded {key} {old.get(key)} differs from this simulation's "
                f"{header.get(key)}; these records cannot be restored here"
            )
    for key, was, now in training_differences(old, settings)[:1]:
        raise ProjectError(
            f"{path}: recorded {key} {was} differs from this simulation's {now}; these records cannot be restored here"
        )


def restore_reference(folder: Path, target: Path) -> None:
    """A recorded full-data result is as good as a new one: copy it to ``target`` (where the simulation looks)."""
    reference = folder / "reference.json"
    if reference.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, read_json(reference))


def restorable(
    folder: Path, method: str, seed: int, loops: int, echo: Callable[[str], None]
) -> tuple[list[LoopRecord], list[dict]]:
    """The recorded chain 0..L of a run that carries its boxes, and the loop files to rebuild (0..L+1)."""
    records: list[LoopRecord] = []
    for _, path in LoopRecordStore(folder).recorded_loops(method, seed, loops):
        record = read_record(path)
        if record.loop_file is None:
            echo(f"{path}: written before records kept their boxes; this loop is run again")
            break
        records.append(record)
    loop_files = [r.loop_file for r in records]
    if records and records[-1].next_loop_file is not None:
        loop_files.append(records[-1].next_loop_file)
    elif records and len(records) < loops:
        records.pop()  # its boxes are known, but not the model that would choose the next ones: train it again
    return records, loop_files


def restore_run(
    source: Path,
    store: LoopRecordStore,
    method: str,
    seed: int,
    loops: int,
    path: Path,
    copy_base: Callable[[Path], "ActiveLearningLogic"],
    progress: Callable[[Iterable, str], Iterable],
    echo: Callable[[str], None],
) -> None:
    """Rebuild the run at ``path`` (which has no project) from the records under ``source``: its boxes annotated by
    the oracle, no training. ``copy_base`` makes a copy of the base project at a folder and opens it."""
    records, loop_files = restorable(source, method, seed, loops, echo)
    if not records:
        return
    staging = path.parent / f".{path.name}.restoring"
    shutil.rmtree(staging, ignore_errors=True)
    logic = copy_base(staging)
    for t, data in enumerate(loop_files):
        loop_file = LoopFile.from_json(data, t)
        for box in loop_file.boxes:  # the oracle annotates them again; who and when are today's
            box.state, box.annotator, box.annotated_at, box.seconds = BoxState.PENDING, None, None, None
        logic.project.write_loop(loop_file)
    logic.annotate_with_oracle(progress=progress)
    for record in records:
        if not store.exists(method, seed, record.loop):
            record.restored_from = str(source)
            store.write(record)
    staging.rename(path)
    echo(
        f"{method} seed {seed}: restored loops 0-{len(records) - 1} from their records"
        + (f", loop {len(loop_files) - 1} queried" if len(loop_files) > len(records) else "")
    )


def backfill(store: LoopRecordStore, method: str, seed: int, project: Project) -> None:
    """Records written before they kept their boxes get them from the project (the loop and the next one)."""
    indices = project.loop_indices()
    for loop in indices:
        record = store.read(method, seed, loop)
        if record is None:
            continue
        changed = False
        if record.loop_file is None:
            record.loop_file, changed = project.read_loop(loop).to_json(), True
        if record.next_loop_file is None and loop + 1 in indices:
            record.next_loop_file, changed = project.read_loop(loop + 1).to_json(), True
        if changed:
            store.write(record)
