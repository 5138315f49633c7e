"""Benchmark: does the simulation reproduce nnActive's Hippocampus study? (a long, resumable run)

Runs ``al3d simulate`` on the full Hippocampus data (195 pool / 65 test cases),
low budget (100 boxes of 20 x 20 x 20, 5 loops, 20 boxes per loop), with a
training profile (``cpu-small`` by default), first ``random_fg66`` and
``clasp_pe`` with 3 seeds. The run folder lives outside the repository; run
this again (any session) and it resumes; on a fresh machine, where the run
folder is gone, it rebuilds each run from the committed records (they carry
their boxes) and trains from the first loop without one. After every call,
the small per-loop records, the simulation header and the full-data result
(also from a ``--reference-cache``) are copied into ``benchmarks/results/<name>/``
so that finished figures can be committed, and the report is written there.

    .venv/bin/python benchmarks/bench_simulation.py [--run-dir /work/al3d-runs/hippocampus-low-cpu-small]
        [--methods random_fg66,clasp_pe] [--seeds 0,1,2] [--profile cpu-small] [--sync-only]
        [--start nnactive_start] [--reference-cache DIR] [--no-reference] [--loops 5] [--parallel 2]
        [--init scratch|warm] [--warm-fraction F] [--warm-initial-lr LR]

The cold-start benchmark is one run folder per starting budget, e.g.
``--run-dir /work/al3d-runs/hippocampus-low-start-cscs --start cscs --methods clasp_pe``;
``al3d report`` given the four folders compares the starts with each other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib.default_data import find_shared_dataset  # noqa: E402
from ActiveLearning3DLib.simulation import export_records  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO.parent / "al3d-runs" / "hippocampus-low-cpu-small")
    parser.add_argument("--methods", default="random_fg66,clasp_pe")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument(
        "--loops",
        type=int,
        default=5,
        help="loops to run now (the protocol's 5 by default); a folder run with --loops 1 (loop 0 "
        "of every seed: what a starting budget alone gives) extends to 5 later without training again",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="jobs at a time, torch threads = cores / parallel (on 2 cores, two cpu-small folds of "
        "one thread each train 1.45 x faster than one fold of two threads: RESULTS.md)",
    )
    parser.add_argument(
        "--start",
        default="nnactive_start",
        help="starting budget method (the cold-start benchmark: random, cluster, cscs, random_fg33)",
    )
    parser.add_argument(
        "--reference-cache",
        type=Path,
        help="full-data reference runs shared between run folders (the cold-start runs; the first "
        "study run keeps its reference in its own folder)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="leave the full-data run (FG-Eff) out; with it, its jobs wait behind the runs' jobs and "
        "fill the slots they leave idle",
    )
    parser.add_argument(
        "--init",
        default="scratch",
        choices=["scratch", "warm"],
        help="warm: each loop after 0 starts from the previous loop's members (the warm-start study; give it "
        "its own --run-dir, e.g. .../hippocampus-low-cpu-small-warm)",
    )
    parser.add_argument("--warm-fraction", help="with --init warm: share of the epochs (default: the profile's, a third)")
    parser.add_argument("--warm-initial-lr", help="with --init warm: starting learning rate (default: the profile's, a tenth)")
    parser.add_argument("--sync-only", action="store_true", help="only copy finished records and write the report")
    args = parser.parse_args()
    name = args.run_dir.name
    target = REPO / "benchmarks" / "results" / name
    if not args.sync_only:
        data = find_shared_dataset(REPO)
        if data is None:
            sys.exit("bench_simulation: needs ../shared/datasets/Task04_Hippocampus")
        command = [
            sys.executable,
            "-m",
            "ActiveLearning3DLib.cli",
            "simulate",
            "--images",
            str(data / "imagesTr"),
            "--labels",
            str(data / "labelsTr"),
            "--method",
            args.methods,
            "--budget",
            "low",
            "--loops",
            str(args.loops),
            "--seeds",
            args.seeds,
            "--profile",
            args.profile,
            "--device",
            "cpu",
            "--parallel",
            str(args.parallel),
            "--start",
            args.start,
            "--init",
            args.init,
            "--out",
            str(args.run_dir),
        ]
        if (target / "simulation.json").is_file():
            # the committed records carry their boxes: a fresh machine rebuilds the runs instead of training again
            command += ["--restore-from", str(target)]
        for option, value in (("--warm-fraction", args.warm_fraction), ("--warm-initial-lr", args.warm_initial_lr)):
            if value is not None:
                command += [option, value]
        if args.no_reference:
            command.append("--no-reference")
        if args.reference_cache:
            command += ["--reference-cache", str(args.reference_cache)]
        print(" ".join(command), flush=True)
        code = subprocess.call(command, cwd=REPO)
        print(f"simulate exited with {code}")
    n = export_records(args.run_dir, target) if (args.run_dir / "simulation.json").is_file() else 0
    print(f"{n} loop records copied to {target}")
    if n:
        from ActiveLearning3DLib.report import write_report

        print(f"report: {write_report([target], target / 'report')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
