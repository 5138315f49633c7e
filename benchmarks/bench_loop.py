"""Benchmark: one active-learning loop with nnU-Net on the Hippocampus pool, stage by stage.

1. A project on the Hippocampus data (shared folder or AL3D_DATA; 195 pool / 65
   test cases) with nnActive's 20 starting boxes (20 x 20 x 20,
   ``nnactive_start``) annotated by the oracle.
2. The loop as the product runs it (``LoopPipeline``: worker processes through
   the local runner): prepare (plans, preprocessing, splits), each fold's
   training, pool scoring (one pass per image, uncertainty images written), then
   the selection of the next 20 boxes with ``clasp_pe``. Printed: the wall time of
   each stage and job, scoring time per image, and where the time went (nnU-Net's
   network compute against everything around it).
3. Scoring compared on the same trained models and the same pool images:
   one pass per image with every member streamed (ours) against one full pass
   over the images per member with nnU-Net's own ``predict_from_files``
   (``save_probabilities=True``, as nnActive runs ``nnUNetv2_predict`` per fold),
   followed by aggregation from the saved probabilities.

Resumable: run it again with the same ``--out`` and finished jobs are kept.

    .venv/bin/python benchmarks/bench_loop.py --out /tmp/al3d-bench-loop [--profile cpu-small] [--compare-cases 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib import ActiveLearningLogic  # noqa: E402
from ActiveLearning3DLib.default_data import find_shared_dataset  # noqa: E402
from ActiveLearning3DLib.fileio import atomic_write_json, read_json  # noqa: E402
from ActiveLearning3DLib.pipeline import LoopSettings  # noqa: E402
from ActiveLearning3DLib.query_methods import get_method  # noqa: E402


def dataset() -> Path:
    if os.environ.get("AL3D_DATA"):
        return Path(os.environ["AL3D_DATA"])
    shared = find_shared_dataset(REPO)
    if shared is None:
        sys.exit("bench_loop: needs the Hippocampus data (../shared/datasets/Task04_Hippocampus or AL3D_DATA)")
    return shared


def project(out: Path, boxes: int) -> ActiveLearningLogic:
    path = out / "project"
    if (path / "project.json").is_file():
        logic = ActiveLearningLogic.open(path)
    else:
        data = dataset()
        logic = ActiveLearningLogic.create(path, data / "imagesTr", data / "labelsTr", seed=0)
    if not logic.project.loop_indices():
        logic.query("nnactive_start", boxes)
    if logic.project.loop_indices() == [0] and logic.pending_boxes():
        logic.annotate_with_oracle()  # only the starting budget: the loop's own query (loop 1) stays pending
    return logic


def run_loop(logic: ActiveLearningLogic, args) -> dict:
    settings = LoopSettings(
        profile=args.profile,
        device="cpu",
        parallel=args.parallel,
        method="clasp_pe",
        stages=("prepare", "train", "predict"),
        evaluate=args.evaluate,
        init="scratch",  # the full schedule, as the figures in RESULTS.md were measured
    )
    pipeline = logic.loop_pipeline(settings)
    started = time.perf_counter()
    last = [""]

    def show(state):
        line = state.describe()
        if line != last[0]:
            print(f"  [{time.perf_counter() - started:7.1f} s] {line}", flush=True)
            last[0] = line

    state = pipeline.run(show, poll_seconds=1.0)
    if state.state != "done":
        sys.exit(f"bench_loop: the loop failed: {state.message}")
    pipeline_seconds = time.perf_counter() - started
    t = time.perf_counter()
    loop_file = (
        logic.query("clasp_pe", args.count, scores=pipeline.scores_dir)
        if len(logic.project.loop_indices()) == 1
        else logic.project.read_loop(1)
    )
    selection = time.perf_counter() - t
    jobs = {}
    for job in pipeline.all_jobs():
        status = job.status()
        result = read_json(job.path / "result.json") if (job.path / "result.json").is_file() else {}
        jobs[job.name.rsplit("-", 1)[-1]] = {"wall_seconds": status.wall_seconds, "result": result}
    return {
        "model": pipeline.model_name,
        "profile": pipeline.profile.to_json(),
        "pipeline_seconds": pipeline_seconds,
        "selection_seconds": selection,
        "selection_info": loop_file.info,
        "jobs": jobs,
        "pool_cases": len(logic.project.pool_cases),
        "model_folder": str(pipeline.model_folder),
        "scores_dir": str(pipeline.scores_dir),
    }


def compare_scoring(logic: ActiveLearningLogic, model_folder: Path, cases: list[str], work: Path, threads: int) -> dict:
    """One pass per image (ours) against one nnU-Net pass per member with saved probabilities (nnActive's way)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from ActiveLearning3DLib.nnunet.scoring import ScoringSettings, load_scoring_ensemble, score_pool_with_ensemble
    from ActiveLearning3DLib.scores import ScoreStore, score_pool
    from ActiveLearning3DLib.uncertainty import FolderProbabilities

    torch.set_num_threads(threads)
    project = logic.project
    names = get_method("clasp_pe").map_names(project.foreground_classes)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    ensemble = load_scoring_ensemble(model_folder, "cpu", threads)
    t = time.perf_counter()
    one_pass = score_pool_with_ensemble(project, ensemble, ScoringSettings(tuple(names), work / "one-pass"), cases)
    one_pass_seconds = time.perf_counter() - t

    t = time.perf_counter()
    predict_seconds = 0.0
    for index, member in enumerate(ensemble.members):
        predictor = nnUNetPredictor(
            tile_step_size=0.75,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
        p = ensemble.predictor
        predictor.manual_initialization(
            p.network,
            p.plans_manager,
            p.configuration_manager,
            [ensemble.parameters[index]],
            p.dataset_json,
            p.trainer_name,
            p.allowed_mirroring_axes,
        )
        out = work / "per-member" / member
        out.mkdir(parents=True)
        m = time.perf_counter()
        predictor.predict_from_files(
            [[str(f) for f in project.image_paths(c)] for c in cases],
            [str(out / c) for c in cases],
            save_probabilities=True,
            overwrite=True,
            num_processes_preprocessing=1,
            num_processes_segmentation_export=1,
        )
        predict_seconds += time.perf_counter() - m
    a = time.perf_counter()
    score_pool(
        FolderProbabilities(work / "per-member"),
        {c: project.cases[c].shape for c in cases},
        len(project.classes),
        names,
        project.patch_size,
        ScoreStore(work / "per-member-scores"),
    )
    aggregate_seconds = time.perf_counter() - a
    per_member_seconds = time.perf_counter() - t
    import numpy as np

    agree = all(
        np.allclose(
            ScoreStore(work / "one-pass").read(c, names)[n].scores,
            ScoreStore(work / "per-member-scores").read(c, names)[n].scores,
            rtol=1e-2,
            atol=1e-3,
        )
        for c in cases
        for n in names
    )
    disk = sum(f.stat().st_size for f in (work / "per-member").rglob("*") if f.is_file())
    return {
        "cases": len(cases),
        "members": len(ensemble.members),
        "threads": threads,
        "one_pass_seconds": one_pass_seconds,
        "one_pass_by_step": one_pass["seconds_by_step"],
        "per_member_seconds": per_member_seconds,
        "per_member_predict_seconds": predict_seconds,
        "per_member_aggregate_seconds": aggregate_seconds,
        "speedup": per_member_seconds / one_pass_seconds,
        "scores_agree": agree,
        "per_member_disk_bytes": disk,
    }


def report(results: dict) -> None:
    loop = results["loop"]
    jobs = loop["jobs"]
    print("\n== one loop on the Hippocampus pool ==")
    print(f"pool {loop['pool_cases']} cases, profile {loop['profile']['name']}, model {loop['model']}")
    prep = jobs["prepare"]
    print(
        f"prepare (plans + preprocessing + splits): {prep['wall_seconds']:.0f} s wall "
        f"(inside the task {prep['result'].get('seconds', float('nan')):.1f} s; planning "
        f"{prep['result'].get('plan_seconds', float('nan')):.1f} s; {prep['result'].get('cases')} annotated images)"
    )
    train_total, train_network = 0.0, 0.0
    for name in sorted(k for k in jobs if k.startswith("fold_")):
        r = jobs[name]["result"]
        network = r["seconds_per_iteration"] * r["epochs"] * r["iterations_per_epoch"]
        train_total += jobs[name]["wall_seconds"]
        train_network += network
        print(
            f"training {name}: {jobs[name]['wall_seconds']:.0f} s wall, run_training {r['seconds']:.0f} s, "
            f"{r['seconds_per_iteration']:.3f} s/iteration, final pseudo Dice {r.get('final_pseudo_dice')}"
        )
    score = jobs.get("score")
    if score:
        r = score["result"]
        steps = r["seconds_by_step"]
        print(
            f"scoring: {score['wall_seconds']:.0f} s wall for {r['cases']} images x {len(r['members'])} members "
            f"= {r['seconds_per_case']:.3f} s per image; steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
        )
    if "evaluate" in jobs:
        r = jobs["evaluate"]["result"]
        print(
            f"evaluation: {jobs['evaluate']['wall_seconds']:.0f} s wall, test Mean Dice {r.get('mean_dice')} {r.get('per_class')}"
        )
    print(
        f"selection (clasp_pe, {loop['selection_info'].get('count')} boxes from stored scores): {loop['selection_seconds']:.2f} s"
    )
    job_walls = sum(j["wall_seconds"] or 0.0 for j in jobs.values())
    total = job_walls + loop["selection_seconds"]
    print(
        f"loop total: {total:.0f} s = sum of the job wall times (run one at a time) + selection; this call's own "
        f"wall time {loop['pipeline_seconds']:.0f} s (less when it resumed finished jobs)"
    )
    if score:
        steps = score["result"]["seconds_by_step"]
        nnunet_network = train_network + steps.get("network", 0.0)
        nnunet_other = (
            sum(jobs[k]["result"]["seconds"] for k in jobs if k.startswith("fold_"))
            - train_network
            + steps.get("preprocess", 0.0)
            + steps.get("export", 0.0)
            + prep["result"].get("seconds", 0.0)
        )
        ours = total - nnunet_network - nnunet_other
        print(
            f"where the time went: nnU-Net network compute (training iterations incl. augmentation, sliding window) "
            f"{nnunet_network:.0f} s = {100 * nnunet_network / total:.1f} %; other nnU-Net work (validation, checkpoints, "
            f"planning/preprocessing, export) {nnunet_other:.0f} s = {100 * nnunet_other / total:.1f} %; "
            f"everything else (worker start-up and imports, model loading, polling, aggregation, selection) "
            f"{ours:.0f} s = {100 * ours / total:.1f} %"
        )
    c = results.get("comparison")
    if c:
        print(
            f"\n== scoring: one pass per image vs one pass per member ({c['cases']} images, {c['members']} members, "
            f"{c['threads']} threads) =="
        )
        print(f"one pass per image: {c['one_pass_seconds']:.1f} s ({c['one_pass_seconds'] / c['cases']:.3f} s/image)")
        print(
            f"per member (nnU-Net predict_from_files, probabilities saved, then aggregated): {c['per_member_seconds']:.1f} s "
            f"(prediction {c['per_member_predict_seconds']:.1f} s, aggregation {c['per_member_aggregate_seconds']:.1f} s; "
            f"{c['per_member_disk_bytes'] / 2**20:.0f} MiB written)"
        )
        print(f"speedup: {c['speedup']:.2f} x (target >= 1.5 x); same scores: {c['scores_agree']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/al3d-bench-loop"))
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--evaluate", action="store_true", help="also evaluate on the 65 test cases")
    parser.add_argument("--compare-cases", type=int, default=60, help="pool images in the scoring comparison (0: skip)")
    parser.add_argument("--compare-only", action="store_true", help="keep the loop figures, redo the comparison")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logic = project(args.out, args.count)
    results_file = args.out / "results.json"
    results = read_json(results_file) if results_file.is_file() else {}
    if not (args.compare_only and "loop" in results):
        results["loop"] = run_loop(logic, args)
    atomic_write_json(results_file, results)
    if args.compare_cases:
        cases = sorted(logic.project.pool_cases)[: args.compare_cases]
        results["comparison"] = compare_scoring(
            logic, Path(results["loop"]["model_folder"]), cases, args.out / "compare", threads=os.cpu_count() or 1
        )
        atomic_write_json(results_file, results)
    report(results)
    print(f"\nresults: {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
