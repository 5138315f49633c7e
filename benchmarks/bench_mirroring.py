"""Can a simulation drop test-time mirroring? Each recorded loop's ensemble evaluated again without mirroring.

    .venv/bin/python benchmarks/bench_mirroring.py /work/al3d-runs/hippocampus-low-cpu-small-warm [--threads 2]

For every loop record of the run folder whose model is still on disk, the test split is predicted again with
mirroring off (into ``<model>/evaluation_no_mirroring``, resumable per case) and set against the recorded
evaluation (mirroring on, nnU-Net's default): Mean Dice both ways, the per-case differences, the seconds both ways,
and per run the loop-to-loop changes and AUBC / Final Dice both ways. A comparison survives dropping mirroring
where the shift is nearly the same for every model (its spread small against the differences being compared).
Prints the figures and, run over all loops, writes ``mirroring.json`` into the run folder (``--loops`` splits the
work between instances side by side; a last run over all loops then reads their finished evaluations).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ActiveLearning3DLib.fileio import atomic_write_json, read_json  # noqa: E402
from ActiveLearning3DLib.loop_records import LoopRecordStore  # noqa: E402
from ActiveLearning3DLib.metrics import aubc, final_dice  # noqa: E402
from ActiveLearning3DLib.nnunet.evaluation import evaluate_test_split, load_evaluation_ensemble  # noqa: E402
from ActiveLearning3DLib.project import Project  # noqa: E402


def model_folders(run_dir: Path) -> dict[str, Path]:
    """Model name -> folder, for every model of the run folder that holds a finished evaluation (one walk)."""
    found: dict[str, Path] = {}
    for summary in sorted(run_dir.glob("**/evaluation/summary.json")):
        found.setdefault(summary.parent.parent.name, summary.parent.parent)
    return found


def project_of(model_folder: Path) -> Project:
    for parent in model_folder.parents:
        if (parent / "project.json").is_file():
            return Project.open(parent)
    raise SystemExit(f"{model_folder}: no project above this model folder")


def evaluate_without_mirroring(model_folder: Path, threads: int | None) -> dict:
    """The evaluation without mirroring; one finished before (by another instance) is read, keeping its seconds."""
    output = model_folder / "evaluation_no_mirroring"
    if (output / "summary.json").is_file():
        return read_json(output / "summary.json")
    ensemble = load_evaluation_ensemble(model_folder, device="cpu", threads=threads, mirroring=False)
    return evaluate_test_split(project_of(model_folder), ensemble, output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--loops", help="only these loops, e.g. 0,2,4 (instances side by side, as a simulation's jobs)")
    args = parser.parse_args()
    only = None if args.loops is None else {int(n) for n in args.loops.split(",")}
    rows = []
    models = model_folders(args.run_dir)
    for record in LoopRecordStore(args.run_dir).read_all():
        if only is not None and record.loop not in only:
            continue
        model = models.get(record.model) if record.model else None
        if model is None:
            print(f"{record.method} seed {record.seed} loop {record.loop}: model {record.model} not on disk, left out")
            continue
        mirrored = read_json(model / "evaluation" / "summary.json")
        plain = evaluate_without_mirroring(model, args.threads)
        # a case's Mean Dice over its scored classes (None: a class absent from both, left out)
        per_case = [
            np.nanmean(np.asarray(plain["per_case"][c], dtype=float))
            - np.nanmean(np.asarray(mirrored["per_case"][c], dtype=float))
            for c in mirrored["per_case"]
        ]
        row = {
            "method": record.method,
            "seed": record.seed,
            "loop": record.loop,
            "model": record.model,
            "dice_mirroring": round(100 * mirrored["mean_dice"], 2),
            "dice_no_mirroring": round(100 * plain["mean_dice"], 2),
            "per_case_difference": {
                "mean": round(100 * float(np.nanmean(per_case)), 2),
                "sd": round(100 * float(np.nanstd(per_case, ddof=1)), 2),
                "min": round(100 * float(np.nanmin(per_case)), 2),
                "max": round(100 * float(np.nanmax(per_case)), 2),
            },
            "seconds_mirroring": mirrored.get("seconds"),
            "seconds_no_mirroring": plain.get("seconds"),
        }
        row["difference"] = round(row["dice_no_mirroring"] - row["dice_mirroring"], 2)
        rows.append(row)
        print(
            f"{record.method} seed {record.seed} loop {record.loop}: Mean Dice {row['dice_mirroring']} with mirroring, "
            f"{row['dice_no_mirroring']} without ({row['difference']:+.2f}; per case {row['per_case_difference']}); "
            f"{row['seconds_mirroring']} s against {row['seconds_no_mirroring']} s",
            flush=True,
        )
    runs = {}
    for method, seed in sorted({(r["method"], r["seed"]) for r in rows}):
        loops = sorted((r for r in rows if (r["method"], r["seed"]) == (method, seed)), key=lambda r: r["loop"])
        on, off = [r["dice_mirroring"] for r in loops], [r["dice_no_mirroring"] for r in loops]
        runs[f"{method}/seed_{seed}"] = {
            "loops": [r["loop"] for r in loops],
            "changes_mirroring": [round(b - a, 2) for a, b in zip(on, on[1:])],
            "changes_no_mirroring": [round(b - a, 2) for a, b in zip(off, off[1:])],
            "aubc": [round(aubc(on), 2), round(aubc(off), 2)],
            "final_dice": [round(final_dice(on), 2), round(final_dice(off), 2)],
        }
        print(f"{method} seed {seed}: {runs[f'{method}/seed_{seed}']}")
    differences = [r["difference"] for r in rows]
    result = {"rows": rows, "runs": runs}
    if differences:
        result["shift"] = {
            "mean": round(float(np.mean(differences)), 2),
            "sd": round(float(np.std(differences, ddof=1)), 2) if len(differences) > 1 else None,
            "min": min(differences),
            "max": max(differences),
        }
        on = [r["seconds_mirroring"] for r in rows if r["seconds_mirroring"]]
        off = [r["seconds_no_mirroring"] for r in rows if r["seconds_no_mirroring"]]
        if on and off:
            result["seconds"] = {"mirroring": round(float(np.mean(on)), 1), "no_mirroring": round(float(np.mean(off)), 1)}
        print(f"shift of Mean Dice without mirroring over {len(rows)} models: {result['shift']}; {result.get('seconds')}")
    if only is None:
        atomic_write_json(args.run_dir / "mirroring.json", result)
        print(f"written: {args.run_dir / 'mirroring.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
