"""The nnU-Net stages as job tasks: what a worker process runs for ``prepare``, ``train``, ``score``, ``evaluate`` and ``predict``.

Each task takes the job's JSON inputs and a reporter, runs one stage in the
worker process (torch and nnU-Net are imported here, never in the process
that starts the job), reports progress through the job's ``status.json`` and
returns a JSON summary (the job's ``result.json``). The environment nnU-Net's
planner reads is set by the runner for the worker only (``JobSpec.env``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..jobs.tasks import Reporter, torch_threads
from ..project import Project
from .profiles import TrainingProfile, resolve_device


def _relay(report: Reporter, stage: str) -> Callable[[dict], None]:
    """Turn a stage's progress dicts into job status fields."""

    def relay(event: dict) -> None:
        fields: dict[str, Any] = {"stage": event.get("stage", stage)}
        if "progress" in event:
            fields["progress"] = float(event["progress"])
        for key in ("epoch", "iteration", "case"):
            if key in event:
                fields[key] = event[key]
        if "message" in event:
            fields["message"] = str(event["message"])
        elif "epoch" in event and "epochs" in event:
            loss = f", loss {event['loss']:.3f}" if isinstance(event.get("loss"), float) else ""
            fields["message"] = (
                f"fold {event.get('fold')}: epoch {int(event['epoch']) + 1}/{event['epochs']}, "
                f"iteration {event.get('iteration')}/{event.get('iterations')}{loss}"
            )
        report(**fields)

    return relay


def _threads(inputs: dict, report: Reporter) -> None:
    """The job's torch threads: fixed where the job asks for it (``fixed_threads``), else shared as the runner allots.

    Results of torch on the CPU depend on the number of threads (the sums are split differently), and the runner's
    allotment changes with the jobs that run beside: a run that must give the same numbers every time (a
    simulation) keeps the count it was started with.
    """
    if inputs.get("fixed_threads") and inputs.get("threads"):
        import torch

        torch.set_num_threads(int(inputs["threads"]))
    else:
        torch_threads(inputs, report)


def prepare_task(inputs: dict, report: Reporter) -> dict:
    """Plan (once), preprocess the cases whose labels changed, write the splits."""
    from .prepare import prepare

    torch_threads(inputs, report)
    report(stage="prepare", message="planning and preprocessing", force=True)
    return prepare(
        Project.open(inputs["project"]),
        inputs.get("configuration", "3d_fullres"),
        int(inputs.get("folds", 5)),
        seed=inputs.get("seed"),
        replan=bool(inputs.get("replan", False)),
        num_processes=int(inputs.get("processes", 1)),
        progress=_relay(report, "prepare"),
        previous_splits=inputs.get("previous_splits"),
        model_folder=inputs.get("model_folder"),
    )


def train_task(inputs: dict, report: Reporter) -> dict:
    """Train one fold with ``nnUNetTrainerPartial`` (resumes from its latest checkpoint)."""
    from .trainer import train_fold

    _threads(inputs, report)
    fold = int(inputs["fold"])
    report(stage=f"train fold {fold}", message="starting", force=True)
    relay = _relay(report, f"train fold {fold}")

    def progress(event: dict) -> None:
        if event.get("event") == "init":  # warm or scratch, and why: into the job's log as well
            print(event["message"], flush=True)
        relay(event)

    return train_fold(
        inputs["project"],
        fold,
        TrainingProfile.from_json(inputs["profile"]),
        inputs["output"],
        inputs.get("device"),
        progress,
        seed=inputs.get("seed"),
        loop=inputs.get("loop"),
        init=inputs.get("init", "scratch"),
        warm_from=inputs.get("warm_from"),
        warm_note=inputs.get("warm_note"),
    )


def score_task(inputs: dict, report: Reporter) -> dict:
    """Score the pool with every member of the model (resumes: scored cases are skipped)."""
    from .scoring import ScoringSettings, load_scoring_ensemble, score_pool_with_ensemble

    settings = ScoringSettings.from_json(inputs, report.job.spec_path)  # a bad job file fails before the model loads
    _threads(inputs, report)
    report(stage="scoring", message="loading the ensemble", force=True)
    ensemble = load_scoring_ensemble(inputs["model"], resolve_device(inputs.get("device")))
    return score_pool_with_ensemble(Project.open(inputs["project"]), ensemble, settings, progress=_relay(report, "scoring"))


def evaluate_task(inputs: dict, report: Reporter) -> dict:
    """Mean Dice and per-class Dice of the ensemble on the test split (resumes per case)."""
    from ..fileio import atomic_copy
    from .evaluation import evaluate_test_split, load_evaluation_ensemble

    _threads(inputs, report)
    report(stage="evaluation", message="loading the ensemble", force=True)
    ensemble = load_evaluation_ensemble(
        inputs["model"], resolve_device(inputs.get("device")), mirroring=bool(inputs.get("mirroring", True))
    )
    summary = evaluate_test_split(
        Project.open(inputs["project"]),
        ensemble,
        inputs["output"],
        progress=_relay(report, "evaluation"),
        extra=inputs.get("extra"),
    )
    if inputs.get("summary_copy"):
        Path(inputs["summary_copy"]).parent.mkdir(parents=True, exist_ok=True)
        atomic_copy(Path(inputs["output"]) / "summary.json", inputs["summary_copy"])
    return summary


def predict_task(inputs: dict, report: Reporter) -> dict:
    """Segment cases with the final ensemble (as the test evaluation does), one label image per case; resumes."""
    import SimpleITK as sitk

    from ..fileio import atomic_write_image, read_image
    from .evaluation import load_evaluation_ensemble

    _threads(inputs, report)
    project = Project.open(inputs["project"])
    cases = list(inputs.get("cases") or project.cases)
    output = Path(inputs["output"])
    output.mkdir(parents=True, exist_ok=True)
    report(stage="prediction", message="loading the ensemble", force=True)
    ensemble = load_evaluation_ensemble(
        inputs["model"], resolve_device(inputs.get("device")), mirroring=bool(inputs.get("mirroring", True))
    )
    written = []
    for i, case in enumerate(cases):
        path = output / f"{case}.nii.gz"
        if not path.is_file():
            files = project.image_paths(case)
            segmentation = sitk.GetImageFromArray(ensemble.segment(files).astype("uint8"))
            segmentation.CopyInformation(read_image(files[0]))
            atomic_write_image(segmentation, path)
        written.append(str(path))
        report(stage="prediction", case=case, progress=(i + 1) / len(cases), message=f"predicted {case} ({i + 1}/{len(cases)})")
    return {"model": str(inputs["model"]), "predictions": written}
