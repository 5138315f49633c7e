"""Benchmark: the noise floor of a method comparison. How much do Final Dice and AUBC move from training alone?

One method and one query seed (``random_fg66`` seed 0 by default) on the study's setting (full Hippocampus,
195 pool / 65 test, low budget, 5 loops, ``cpu-small``) is simulated again for each of several *training* seeds
(``SimulationSettings.training_seed``). ``random_fg66`` and its ``nnactive_start`` starting budget do not look at a
model, so every repeat annotates the same boxes (checked) and only the training differs. The study's own run of that
method and seed (trained unseeded, so with a training seed of its own) counts as one more repeat when its boxes are
the same. The spread of Final Dice and AUBC over these repeats is then set against

- the spread over query seeds of the study run (``benchmarks/results/hippocampus-low-cpu-small``, seeds 0-2,
  trained unseeded, so that spread holds both kinds of noise), and
- the difference between the methods there (``clasp_pe`` against ``random_fg66``, paired by seed),

and turned into the number of seeds a paired t-test (two-sided, alpha 0.05, power 0.8) needs to find a difference
of that size. One run folder per training seed lives outside the repository (``--run-root``); running the script
again resumes them (hours of training on 2 cores: about as long as one seed of the study run per repeat). Records
are copied to ``benchmarks/results/<name>/train_<t>/`` as each loop finishes; on a fresh machine the finished loops
are rebuilt from those copies (their boxes) and training goes on with the next loop. The summary is written to
``benchmarks/results/<name>/noise_floor.json`` and printed as Markdown for RESULTS.md.

    .venv/bin/python benchmarks/bench_noise_floor.py [--run-root /work/al3d-runs/noise-floor-random_fg66-seed0]
        [--method random_fg66] [--seed 0] [--training-seeds 100,101,102] [--profile cpu-small] [--parallel 2]
        [--analyse-only]

A small check of the script itself (minutes; the figures mean nothing):
``--run-root /tmp/nf --results /tmp/nf-results --profile test --budget 10 --loops 2 --max-cases 12
--training-seeds 100,101``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ActiveLearning3DLib.default_data import find_shared_dataset  # noqa: E402
from ActiveLearning3DLib.fileio import atomic_write_json, read_json  # noqa: E402
from ActiveLearning3DLib.loop_records import LoopRecordStore, read_record  # noqa: E402
from ActiveLearning3DLib.metrics import aubc, final_dice  # noqa: E402
from ActiveLearning3DLib.simulation import Simulation, SimulationSettings, export_records  # noqa: E402

STUDY = REPO / "benchmarks" / "results" / "hippocampus-low-cpu-small"


def seeds_needed(difference: float, sd_paired: float, alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
    """Seeds a two-sided paired t-test needs to detect ``difference`` with this power, given the sd of the paired
    differences (noncentral t); None when even ``most`` seeds do not suffice or nothing differs."""
    from scipy import stats

    if sd_paired <= 0 or difference == 0 or not math.isfinite(sd_paired):
        return None
    for n in range(2, most + 1):
        df = n - 1
        critical = stats.t.ppf(1 - alpha / 2, df)
        ncp = abs(difference) / sd_paired * math.sqrt(n)
        if stats.nct.sf(critical, df, ncp) + stats.nct.cdf(-critical, df, ncp) >= power:
            return n
    return None


def curves(folder: Path, method: str) -> dict[int, list[float]]:
    """Mean Dice x 100 by loop for each seed of ``method`` in a simulation's records (complete runs only)."""
    out: dict[int, list[float]] = {}
    loops = read_json(folder / "simulation.json")["settings"]["loops"]
    store = LoopRecordStore(folder)
    for seed_dir in sorted((store.root / method).glob("seed_*")):
        seed = int(seed_dir.name[5:])
        records = [read_record(p) for _, p in store.recorded_loops(method, seed, loops)]
        if len(records) == loops and all(r.mean_dice is not None for r in records):
            out[seed] = [100 * float(r.mean_dice) for r in records]
    return out


def boxes(folder: Path, method: str, seed: int) -> list:
    """The boxes of every loop of one run, as recorded (to check that repeats annotate the same boxes)."""
    store = LoopRecordStore(folder)
    return [[b.box for b in read_record(p).boxes_of().boxes] for _, p in store.recorded_loops(method, seed)]


def sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def analyse(targets: dict[int, Path], method: str, seed: int, other: str = "clasp_pe", study: Path | None = STUDY) -> dict:
    """Spread over training seeds, over the study's query seeds, the methods' paired difference, and seeds needed.

    With ``study`` the study's own run of (method, seed) counts as one more repeat when it annotated the same boxes:
    it was trained unseeded, i.e. with a training seed of its own (listed as "study")."""
    found = {t: curves(folder, method).get(seed) for t, folder in targets.items()}
    repeats: dict[int | str, list[float]] = {t: c for t, c in found.items() if c is not None}
    runs: dict[int | str, Path] = {t: targets[t] for t in repeats}
    reference_boxes = boxes(next(iter(runs.values())), method, seed) if runs else None
    has_study = study is not None and (study / "simulation.json").is_file()
    mine = curves(study, method) if has_study else {}
    if seed in mine:
        study_boxes = boxes(study, method, seed)
        if reference_boxes is None or study_boxes == reference_boxes:  # on other boxes it is no repeat: left out
            runs["study"], repeats["study"], reference_boxes = study, mine[seed], study_boxes
    summary: dict = {"method": method, "query_seed": seed, "training_seeds": [str(t) for t in repeats]}
    if repeats:
        summary["same_boxes"] = all(boxes(folder, method, seed) == reference_boxes for folder in runs.values())
        summary["training"] = {
            "final_dice": [final_dice(c) for c in repeats.values()],
            "aubc": [aubc(c) for c in repeats.values()],
        }
        summary["training"]["sd_final_dice"] = sd(summary["training"]["final_dice"])
        summary["training"]["sd_aubc"] = sd(summary["training"]["aubc"])
    if has_study:
        theirs = curves(study, other)
        summary["query_seeds"] = {
            "seeds": sorted(mine),
            "final_dice": [final_dice(mine[s]) for s in sorted(mine)],
            "aubc": [aubc(mine[s]) for s in sorted(mine)],
        }
        summary["query_seeds"]["sd_final_dice"] = sd(summary["query_seeds"]["final_dice"])
        summary["query_seeds"]["sd_aubc"] = sd(summary["query_seeds"]["aubc"])
        paired = sorted(set(mine) & set(theirs))
        if paired:
            diff_final = [final_dice(theirs[s]) - final_dice(mine[s]) for s in paired]
            diff_aubc = [aubc(theirs[s]) - aubc(mine[s]) for s in paired]
            summary["methods"] = {
                "other": other,
                "seeds": paired,
                "final_dice_difference": diff_final,
                "aubc_difference": diff_aubc,
                "mean_final_dice_difference": float(np.mean(diff_final)),
                "mean_aubc_difference": float(np.mean(diff_aubc)),
                "sd_final_dice_difference": sd(diff_final),
                "sd_aubc_difference": sd(diff_aubc),
            }
    methods, training = summary.get("methods"), summary.get("training")
    if methods:
        need = {}
        for metric in ("final_dice", "aubc"):
            d = methods[f"mean_{metric}_difference"]
            need[metric] = {
                # the paired differences as observed across query seeds (both kinds of noise)
                "observed_sd": seeds_needed(d, methods[f"sd_{metric}_difference"]),
                # training noise alone: each run of a pair independently, so the difference has sqrt(2) x its sd
                "training_noise_only": seeds_needed(d, math.sqrt(2) * training[f"sd_{metric}"]) if training else None,
            }
        summary["seeds_needed"] = need
    return summary


def markdown(summary: dict) -> str:
    def fmt(values) -> str:
        return " / ".join(f"{v:.1f}" for v in values)

    lines = [
        f"Training seeds only ({summary['method']}, query seed {summary['query_seed']}, training seeds "
        f"{', '.join(summary['training_seeds'])}; same boxes in every repeat: "
        f"{summary.get('same_boxes')}):",
        "",
        "| spread | runs | Final Dice | sd | AUBC | sd |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if summary.get("training"):
        t = summary["training"]
        lines.append(
            f"| training seeds | {len(t['aubc'])} | {fmt(t['final_dice'])} | {t['sd_final_dice']:.2f} | "
            f"{fmt(t['aubc'])} | {t['sd_aubc']:.2f} |"
        )
    if summary.get("query_seeds"):
        q = summary["query_seeds"]
        lines.append(
            f"| query seeds (study run) | {len(q['aubc'])} | {fmt(q['final_dice'])} | {q['sd_final_dice']:.2f} | "
            f"{fmt(q['aubc'])} | {q['sd_aubc']:.2f} |"
        )
    if summary.get("methods"):
        m = summary["methods"]
        lines.append(
            f"| {m['other']} - {summary['method']} (paired) | {len(m['seeds'])} | "
            f"{fmt(m['final_dice_difference'])} | {m['sd_final_dice_difference']:.2f} | "
            f"{fmt(m['aubc_difference'])} | {m['sd_aubc_difference']:.2f} |"
        )
    if summary.get("seeds_needed"):
        lines += [
            "",
            "Seeds a paired t-test (alpha 0.05, power 0.8) needs for the observed difference: "
            + "; ".join(
                f"{metric} {need['observed_sd']} (observed sd of differences), {need['training_noise_only']} "
                f"(training noise alone)"
                for metric, need in summary["seeds_needed"].items()
            ),
        ]
    return "\n".join(lines)


class RecordExport:
    """Copies a run's records to the results folder each time a loop finishes, so a session that ends mid-run leaves
    every finished loop where a later session restores it from."""

    def __init__(self, run_dir: Path, target: Path):
        self.run_dir, self.target, self.count = run_dir, target, 0

    def __call__(self, _simulation: Simulation) -> None:
        count = len(LoopRecordStore(self.run_dir).paths())
        if count != self.count:
            self.count = export_records(self.run_dir, self.target)
            print(f"{self.count} loop records copied to {self.target}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", type=Path, default=REPO.parent / "al3d-runs" / "noise-floor-random_fg66-seed0")
    parser.add_argument("--method", default="random_fg66")
    parser.add_argument("--seed", type=int, default=0, help="query seed (the same boxes in every repeat)")
    parser.add_argument("--training-seeds", default="100,101,102")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--budget", default="low")
    parser.add_argument("--loops", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--max-cases", type=int, help="only for a quick check of the script")
    parser.add_argument(
        "--results", type=Path, help="where the records and the summary go (default: benchmarks/results/<run-root's name>)"
    )
    parser.add_argument("--analyse-only", action="store_true", help="only copy the records and print the summary")
    args = parser.parse_args()
    data = find_shared_dataset(REPO)
    if data is None and not args.analyse_only:
        sys.exit("bench_noise_floor: needs ../shared/datasets/Task04_Hippocampus")
    training_seeds = [int(t) for t in args.training_seeds.split(",")]
    results = args.results or REPO / "benchmarks" / "results" / args.run_root.name
    targets = {}
    for t in training_seeds:
        run_dir, target = args.run_root / f"train_{t}", results / f"train_{t}"
        if not args.analyse_only:
            # committed records carry their boxes: a fresh machine rebuilds the finished loops instead of training again
            restore = target if (target / "simulation.json").is_file() else None
            settings = SimulationSettings(
                images=data / "imagesTr",
                labels=data / "labelsTr",
                methods=(args.method,),
                out=run_dir,
                budget=int(args.budget) if args.budget.isdigit() else args.budget,
                loops=args.loops,
                seeds=(args.seed,),
                profile=args.profile,
                device="cpu",
                parallel=args.parallel,
                max_cases=args.max_cases,
                reference=False,
                prefill=False,
                training_seed=t,
                restore_from=restore,
                init="scratch",  # the study's training, whose noise this measures
            )
            print(f"training seed {t}: {run_dir}" + (f" (finished loops from {restore})" if restore else ""), flush=True)
            exported = RecordExport(run_dir, target)
            outcome = Simulation(settings, echo=lambda s: print(s, flush=True)).run(poll_seconds=2.0, on_step=exported)
            if outcome["failed"]:
                print(f"training seed {t}: failed: {outcome['failed']}", flush=True)
        if (run_dir / "simulation.json").is_file():
            export_records(run_dir, target)
            targets[t] = target
    if not targets:
        print("no records yet")
        return 1
    summary = analyse(targets, args.method, args.seed)
    atomic_write_json(results / "noise_floor.json", summary)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
