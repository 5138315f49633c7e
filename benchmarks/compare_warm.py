"""The warm-start study (issue 30): warm-started runs against the committed scratch runs of the same method and seed.

    .venv/bin/python benchmarks/compare_warm.py [--scratch benchmarks/results/hippocampus-low-cpu-small]
        [--warm benchmarks/results/hippocampus-low-cpu-small-warm]

Per run and loop: boxes (and whether they are the scratch run's), test Mean Dice of both, training iterations of
all folds (the compute a warm start saves; scratch: the profile's full schedule) and wall seconds of training and
of the loop turnaround (training, pool scoring where the method needs it, and the query: what the annotator waits for between submitting the
last box and the next boxes; the test evaluation is a simulation's own cost and is listed apart). Per run: AUBC and
Final Dice, the paired differences warm - scratch, and over seeds their mean and spread. Loops still running are
left out of AUBC / Final Dice (a run counts once all its loops are recorded). Writes ``warm_vs_scratch.json`` into
the warm folder.

Wall times of the committed scratch study were taken with six runs sharing two cores; compare the warm run's loops
with its own loop 0 (trained from scratch on the same machine) for time, and with the scratch records for Dice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ActiveLearning3DLib.fileio import atomic_write_json, read_json  # noqa: E402
from ActiveLearning3DLib.loop_records import LoopRecord, LoopRecordStore, read_record  # noqa: E402
from ActiveLearning3DLib.metrics import aubc, final_dice  # noqa: E402
from ActiveLearning3DLib.nnunet.profiles import TrainingProfile  # noqa: E402
from ActiveLearning3DLib.query_methods import get_method  # noqa: E402

TURNAROUND = ("prepare", "train", "score", "query")  # what the annotator waits for after the last submitted box


def turnaround_stages(method: str) -> tuple[str, ...]:
    """A method that needs no model waits for no pool scoring (a simulation may score anyway, for the pre-fill)."""
    return TURNAROUND if get_method(method).needs_model else tuple(k for k in TURNAROUND if k != "score")


def runs(folder: Path) -> dict[tuple[str, int], list[LoopRecord]]:
    """(method, seed) -> its records in loop order, up to the first missing loop."""
    store = LoopRecordStore(folder)
    out: dict[tuple[str, int], list[LoopRecord]] = {}
    for seed_dir in sorted(store.root.glob("*/seed_*")):
        method, seed = seed_dir.parent.name, int(seed_dir.name[5:])
        out[(method, seed)] = [read_record(p) for _, p in store.recorded_loops(method, seed)]
    return out


def scratch_iterations(header: dict) -> int:
    """Iterations of one scratch-trained ensemble under the header's profile (all folds)."""
    profile = TrainingProfile.from_json(header["profile"])
    return profile.folds * profile.total_iterations


def seconds(record: LoopRecord, keys: tuple[str, ...]) -> float:
    return round(sum(float(record.seconds.get(k) or 0.0) for k in keys), 1)


def same_boxes(a: LoopRecord, b: LoopRecord) -> bool:
    boxes_a, boxes_b = a.boxes_of(), b.boxes_of()
    if boxes_a is None or boxes_b is None:
        return False
    return [r.box for r in boxes_a.boxes] == [r.box for r in boxes_b.boxes]


def compare(scratch_dir: Path, warm_dir: Path) -> dict:
    scratch_header, warm_header = read_json(scratch_dir / "simulation.json"), read_json(warm_dir / "simulation.json")
    loops = int(warm_header["settings"]["loops"])
    full = scratch_iterations(scratch_header)
    scratch, warm = runs(scratch_dir), runs(warm_dir)
    out: dict = {"scratch": str(scratch_dir), "warm": str(warm_dir), "loops": loops, "runs": [], "methods": {}}
    profile = TrainingProfile.from_json(warm_header["profile"])
    out["warm_schedule"] = {"epochs": profile.epochs, "warm_epochs": profile.warm_epochs, "initial_lr": profile.initial_lr}
    out["warm_schedule"]["warm_lr"] = profile.warm_lr
    for (method, seed), records in sorted(warm.items()):
        reference = scratch.get((method, seed), [])
        rows = []
        for w in records:
            s = reference[w.loop] if w.loop < len(reference) else None
            training = w.training or {}
            rows.append(
                {
                    "loop": w.loop,
                    "boxes": w.boxes,
                    "same_boxes_as_scratch": s is not None and same_boxes(w, s),
                    "init": training.get("init"),
                    "iterations": training.get("iterations"),
                    "scratch_iterations": full,
                    "dice_warm": None if w.mean_dice is None else round(100 * w.mean_dice, 2),
                    "dice_scratch": None if s is None or s.mean_dice is None else round(100 * s.mean_dice, 2),
                    "train_seconds": seconds(w, ("train",)),
                    "turnaround_seconds": seconds(w, turnaround_stages(method)),
                    "evaluate_seconds": seconds(w, ("evaluate",)),
                }
            )
        run: dict = {"method": method, "seed": seed, "loops": rows}
        complete = len(records) == loops and len(reference) >= loops
        if complete and all(r.mean_dice is not None for r in records + reference[:loops]):
            cw = [100 * r.mean_dice for r in records]
            cs = [100 * r.mean_dice for r in reference[:loops]]
            run.update(
                aubc_warm=round(aubc(cw), 2),
                aubc_scratch=round(aubc(cs), 2),
                final_warm=round(final_dice(cw), 2),
                final_scratch=round(final_dice(cs), 2),
            )
            run["aubc_difference"] = round(run["aubc_warm"] - run["aubc_scratch"], 2)
            run["final_difference"] = round(run["final_warm"] - run["final_scratch"], 2)
        warm_loops = [r for r in rows if r["init"] == "warm" and r["iterations"]]
        if warm_loops:
            run["training_compute_ratio"] = round(full / float(np.mean([r["iterations"] for r in warm_loops])), 2)
            first = rows[0] if rows and rows[0]["init"] == "scratch" else None
            if first is not None:
                run["train_seconds_ratio"] = round(
                    first["train_seconds"] / float(np.mean([r["train_seconds"] for r in warm_loops])), 2
                )
        out["runs"].append(run)
    for method in sorted({r["method"] for r in out["runs"]}):
        done = [r for r in out["runs"] if r["method"] == method and "aubc_difference" in r]
        summary: dict = {"complete_seeds": [r["seed"] for r in done]}
        for key in ("aubc_difference", "final_difference"):
            values = [r[key] for r in done]
            if values:
                summary[key] = {
                    "mean": round(float(np.mean(values)), 2),
                    "sd": round(float(np.std(values, ddof=1)), 2) if len(values) > 1 else None,
                    "values": values,
                }
        out["methods"][method] = summary
    return out


def print_comparison(result: dict) -> None:
    print(f"warm schedule: {result['warm_schedule']}")
    for run in result["runs"]:
        print(f"\n{run['method']} seed {run['seed']}")
        print("loop boxes same init   iterations  Dice warm  Dice scratch  train s  turnaround s  evaluate s")
        for r in run["loops"]:
            print(
                f"{r['loop']:>4} {r['boxes']:>5} {str(r['same_boxes_as_scratch'])[0]:>4} {str(r['init']):<7}"
                f"{str(r['iterations']):>10}  {str(r['dice_warm']):>9}  {str(r['dice_scratch']):>12}"
                f"  {r['train_seconds']:>7}  {r['turnaround_seconds']:>12}  {r['evaluate_seconds']:>10}"
            )
        for key in ("aubc_warm", "aubc_scratch", "aubc_difference", "final_warm", "final_scratch", "final_difference"):
            if key in run:
                print(f"  {key}: {run[key]}")
        for key in ("training_compute_ratio", "train_seconds_ratio"):
            if key in run:
                print(f"  {key} (scratch / warm): {run[key]}")
    for method, summary in result["methods"].items():
        print(f"\n{method}: {summary}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / "results" / "hippocampus-low-cpu-small")
    parser.add_argument("--warm", type=Path, default=REPO / "benchmarks" / "results" / "hippocampus-low-cpu-small-warm")
    args = parser.parse_args()
    result = compare(args.scratch, args.warm)
    print_comparison(result)
    atomic_write_json(args.warm / "warm_vs_scratch.json", result)
    print(f"\nwritten: {args.warm / 'warm_vs_scratch.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
