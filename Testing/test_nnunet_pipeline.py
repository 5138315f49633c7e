"""Planning in a worker environment, incremental preprocessing, the partial-label loss, and training one fold.

Uses 10 real Hippocampus cases when the shared data is present (else phantoms),
with oracle-annotated starting boxes, prepared once for the module by
``python -m ActiveLearning3DLib.nnunet prepare`` in a child process whose
environment is ``nnunet_environment(project)`` (this process's is never changed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import torch  # noqa: E402  (pinned dependency: a missing install must fail, not skip)

from ActiveLearning3DLib import ActiveLearningLogic  # noqa: E402
from ActiveLearning3DLib.boxes import Box  # noqa: E402
from ActiveLearning3DLib.fileio import read_json  # noqa: E402
from ActiveLearning3DLib.nnunet.paths import EnvironmentMismatch, NnunetPaths, nnunet_environment  # noqa: E402
from ActiveLearning3DLib.nnunet.planning import plan  # noqa: E402
from ActiveLearning3DLib.nnunet.preprocessing import preprocess, preprocessing_is_current, read_manifest  # noqa: E402
from ActiveLearning3DLib.nnunet.profiles import resolve_profile  # noqa: E402
from ActiveLearning3DLib.nnunet.splits import check_splits  # noqa: E402
from ActiveLearning3DLib.nnunet.trainer import RUN_KEY, TrainingError, nnUNetTrainerPartial, train_fold  # noqa: E402
from ActiveLearning3DLib.project import Project  # noqa: E402
from conftest import default_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _data_dir(tmp_path_factory) -> Path:
    return default_data_dir(tmp_path_factory, phantom_cases=10)


def _run_worker(args: list[str], project: Project | Path, job: Path) -> dict:
    """``python -m ActiveLearning3DLib.nnunet`` as a job in ``job``: its status.json says how it went, result.json
    holds its result (the protocol every runner's worker follows)."""
    env = {**os.environ, **nnunet_environment(project)}
    done = subprocess.run(
        [sys.executable, "-m", "ActiveLearning3DLib.nnunet", *args, "--job", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    status = read_json(job / "status.json")
    assert done.returncode == 0 and status["state"] == "done", done.stdout[-3000:] + done.stderr[-3000:]
    assert status["progress"] == 1.0 and status["exit_code"] == 0 and status["ended"] and status["stage"]
    assert read_json(job / "job.json")["kind"] == f"nnunet_{args[0]}"
    return read_json(job / "result.json")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data = _data_dir(tmp_path_factory)
    path = tmp_path_factory.mktemp("nnunet") / "project"
    logic = ActiveLearningLogic.create(path, data / "imagesTr", data / "labelsTr", max_cases=10, seed=1)
    logic.query("nnactive_start", 9)
    logic.annotate_with_oracle()
    environ_before = dict(os.environ)
    summary = _run_worker(["prepare", str(path)], path, path.parent / "prepare-job")
    assert dict(os.environ) == environ_before
    return logic.project, summary


def test_prepare_in_a_worker_plans_preprocesses_and_splits(prepared):
    project, summary = prepared
    paths = NnunetPaths.for_project(project)
    plans = read_json(paths.plans_file)
    assert "3d_fullres" in plans["configurations"] and summary["planned"]
    annotated = {c for c, s in read_manifest(paths)["labels"].items() if s["annotated_voxels"] > 0}
    assert 2 <= len(annotated) <= len(project.pool_cases) and summary["cases"] == len(annotated)
    data = paths.data_folder(plans["configurations"]["3d_fullres"]["data_identifier"])
    assert {p.name[:-5] for p in data.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")} == annotated
    splits = read_json(paths.splits_file)
    assert len(splits) == summary["folds"] == min(5, len(annotated))
    table = {c: {int(k) for k in read_manifest(paths)["labels"][c]["class_voxels"]} for c in annotated}
    assert check_splits(splits, table) == [] or all("validation set of 1" in p for p in check_splits(splits, table))
    fingerprint = read_json(paths.fingerprint_file)
    assert fingerprint["al3d_intensity_source"] == "annotated foreground"
    assert len(fingerprint["spacings"]) == len(project.pool_cases)  # image properties of the whole pool
    view = read_json(paths.raw_dataset / "dataset.json")  # nnU-Net's view of the project: no copies
    assert set(view["dataset"]) == set(project.pool_cases) and not list(paths.raw_dataset.glob("*.nii.gz"))
    assert preprocessing_is_current(project) == (True, "current")


def test_a_step_run_by_hand_reports_through_its_job_folder(tmp_path, prepared):
    """Failure and a second run of ``python -m ActiveLearning3DLib.nnunet``: status.json tells, as for any worker."""
    project, _ = prepared
    job = tmp_path / "train-job"
    args = [
        sys.executable,
        "-m",
        "ActiveLearning3DLib.nnunet",
        "train",
        str(project.path),
        "--fold",
        "7",
        "--profile",
        "test",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "model"),
        "--job",
        str(job),
    ]
    env = {**os.environ, **nnunet_environment(project)}
    failed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    status = read_json(job / "status.json")
    assert failed.returncode == 1 and status["state"] == "failed" and status["exit_code"] == 1, failed.stdout[-2000:]
    assert "fold 7" in status["message"] and not (job / "result.json").exists()
    assert f"{job}: failed" in failed.stdout and "AL3D-" not in failed.stdout  # no second protocol on stdout
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 1 and read_json(job / "status.json")["state"] == "failed"
    assert [p.name for p in (tmp_path / ".superseded").iterdir()] == ["train-job.1"]  # the first run's files kept


def test_planning_refuses_a_process_without_the_project_environment(tmp_path, prepared):
    project, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(project.path, copy, ignore=shutil.ignore_patterns("nnunet"))
    with pytest.raises(EnvironmentMismatch, match="nnunet_environment"):
        plan(Project.open(copy))
    assert not (copy / "nnunet" / "preprocessed").exists() or not NnunetPaths.for_project(copy).plans_file.exists()


def test_incremental_preprocessing_redoes_only_changed_cases(tmp_path, prepared):
    project, _ = prepared
    copy_path = tmp_path / "moved"
    shutil.copytree(project.path, copy_path)  # a moved project keeps its nnU-Net state (relative paths only)
    copy = Project.open(copy_path)
    assert preprocessing_is_current(copy) == (True, "current")
    paths = NnunetPaths.for_project(copy)
    data = paths.data_folder("nnUNetPlans_3d_fullres")
    manifest = read_manifest(paths)
    annotated = sorted(c for c, s in manifest["labels"].items() if s["annotated_voxels"] > 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    changed, emptied = annotated[0], annotated[1]
    # one case gets a new box of background, another loses all its annotations
    shape = copy.cases[changed].shape
    box = Box(changed, (0, 0, 0), tuple(min(6, s) for s in shape))
    copy.merge_annotation(box, np.zeros(box.size, dtype=np.uint8))
    label_file = copy.partial_label_path(emptied)
    image = sitk.ReadImage(str(label_file))
    empty = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(image).shape, copy.ignore_value, dtype=np.uint8))
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(label_file))

    current, why = preprocessing_is_current(copy)
    assert not current and "labels changed" in why
    with pytest.raises(TrainingError, match="not current"):
        train_fold(copy_path, 0, "test", tmp_path / "model", "cpu")

    events = []
    result = preprocess(copy, progress=events.append)
    assert result.processed == [changed] and result.removed == [emptied]
    assert sorted(result.unchanged) == sorted(set(annotated) - {changed, emptied})
    assert [e["case"] for e in events] == [changed]
    for name, stamp in stamps.items():
        case = name.split(".")[0].removesuffix("_seg")
        if case in result.unchanged:
            assert (data / name).stat().st_mtime_ns == stamp, f"{name} was rewritten"
    assert not list(data.glob(f"{emptied}*"))
    seg = np.asarray(__import__("blosc2").open(str(data / f"{changed}_seg.b2nd"))[:])
    assert (
        np.count_nonzero((seg >= 0) & (seg != copy.ignore_value))
        >= read_manifest(paths)["labels"][changed]["annotated_voxels"] * 0.9
    )  # the new box is in the data
    assert preprocessing_is_current(copy) == (True, "current")
    again = preprocess(copy)
    assert again.processed == [] and again.removed == []


def _trainer(project: Project, output: Path) -> nnUNetTrainerPartial:
    paths = NnunetPaths.for_project(project)
    plans = read_json(paths.plans_file)
    plans["continue_training"] = False
    plans[RUN_KEY] = {
        "profile": resolve_profile("test").to_json(),
        "preprocessed": str(paths.preprocessed_dataset),
        "output": str(output),
    }
    return nnUNetTrainerPartial(plans, "3d_fullres", 0, read_json(project.path / "dataset.json"), torch.device("cpu"))


def test_loss_ignores_ignore_voxels_and_uses_dice_without_background_and_smoothing(tmp_path, prepared):
    project, _ = prepared
    trainer = _trainer(project, tmp_path / "model")
    assert not list((project.path / "nnunet" / "results").glob("*"))  # the pinned folders, not nnUNet_results
    assert Path(trainer.output_folder) == tmp_path / "model" / "fold_0"
    trainer.initialize()
    inner = trainer.loss.loss  # deep supervision wraps nnU-Net's DC_and_CE_loss
    ignore = project.ignore_value
    assert inner.ignore_label == ignore and inner.ce.ignore_index == ignore
    assert inner.dc.smooth == 0 and inner.dc.do_bg is False
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=gen)
    target[:, :, :8] = ignore  # half the patch unannotated
    logits = torch.randn(2, 3, 16, 16, 16, generator=gen)

    def loss_of(x):
        return trainer.loss([x, x[:, :, ::2, ::2, ::2]], [target, target[:, :, ::2, ::2, ::2]])

    base = loss_of(logits)
    changed = logits.clone()
    changed[:, :, :8] = 50 * torch.randn(2, 3, 8, 16, 16, generator=gen)  # anything at ignore voxels
    assert torch.isfinite(base) and torch.allclose(loss_of(changed), base, atol=1e-6)
    annotated = logits.clone()
    annotated[:, 1, 12] += 5.0  # class 1 more likely at annotated voxels
    assert not torch.allclose(loss_of(annotated), base, atol=1e-4)
    # only ignore voxels of the target change (they hide different classes): same loss
    other = target.clone()
    other[:, :, :8] = ignore
    assert torch.allclose(trainer.loss([logits, logits[:, :, ::2, ::2, ::2]], [other, other[:, :, ::2, ::2, ::2]]), base)


def test_train_one_fold_with_the_test_profile(tmp_path, prepared):
    project, summary = prepared
    events = []
    model = tmp_path / "model"
    result = train_fold(project.path, 0, "test", model, "cpu", progress=events.append)
    final = model / "fold_0" / "checkpoint_final.pth"
    assert Path(result["checkpoint"]) == final and final.is_file()
    assert np.isfinite(result["final_train_loss"]) and np.isfinite(result["final_val_loss"])
    assert result["seconds_per_iteration"] > 0 and result["patch_size"] == [16, 16, 16]
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerPartial" and RUN_KEY not in checkpoint["init_args"]["plans"]
    saved_plans = read_json(model / "plans.json")  # nnU-Net's model folder: the plans describe the small network
    assert saved_plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32]
    assert (model / "dataset.json").is_file()
    steps = [e for e in events if e.get("event") != "epoch_end"]
    assert [(e["epoch"], e["iteration"]) for e in steps] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(np.isfinite(e["loss"]) for e in steps)
    assert [e["epoch"] for e in events if e.get("event") == "epoch_end"] == [0, 1]
    assert events[-1]["progress"] == 1.0 and all(e["fold"] == 0 for e in events)
    assert not list(Path(project.path, "nnunet", "results").glob("**/*.pth"))
    # resumable: a finished fold is not trained again
    again = train_fold(project.path, 0, "test", model, "cpu", progress=events.append)
    assert again["resumed"] == "already done" and again["final_train_loss"] == result["final_train_loss"]


def test_a_crashed_fold_resumes_from_its_last_checkpoint(tmp_path, prepared):
    project, _ = prepared
    model = tmp_path / "model"

    def crash(status):
        if status["epoch"] == 1 and status["iteration"] == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_fold(project.path, 1, "test", model, "cpu", progress=crash)
    assert (model / "fold_1" / "checkpoint_latest.pth").is_file()  # written after epoch 0 (save_every=1)
    assert not (model / "fold_1" / "checkpoint_final.pth").exists()
    events = []
    result = train_fold(project.path, 1, "test", model, "cpu", progress=events.append)
    assert result["resumed_from_epoch"] == 1 and (model / "fold_1" / "checkpoint_final.pth").is_file()
    assert {e["epoch"] for e in events} == {1} and np.isfinite(result["final_train_loss"])
    assert not (model / "fold_1" / "checkpoint_latest.pth").exists()


def test_a_checkpoint_is_replaced_whole_never_written_over(tmp_path, prepared, monkeypatch):
    """A process killed while nnU-Net writes a checkpoint leaves the previous one to resume from, and a copy that
    hard-links the checkpoint (a simulation run's project) keeps its file when this fold writes it again."""
    project, _ = prepared
    trainer = _trainer(project, tmp_path / "model")
    trainer.initialize()
    fold_dir = Path(trainer.output_folder)
    fold_dir.mkdir(parents=True, exist_ok=True)
    latest = fold_dir / "checkpoint_latest.pth"
    trainer.current_epoch = 3
    trainer.save_checkpoint(str(latest))
    linked = tmp_path / "run_copy.pth"
    os.link(latest, linked)
    kept = linked.read_bytes()
    real_save = torch.save

    def killed_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as torn:
            torn.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt("killed while writing")

    trainer.current_epoch = 4
    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(latest))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] == 4  # epoch 3 finished
    assert [p.name for p in fold_dir.iterdir() if p.suffix == ".pth"] == ["checkpoint_latest.pth"]  # none torn left
    trainer.save_checkpoint(str(latest))
    assert torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] == 5
    assert not os.path.samefile(latest, linked) and linked.read_bytes() == kept


class _RunsCode:
    """Unpickling this creates ``marker`` (``builtins.open``): what a crafted checkpoint in a shared project can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_runs_code_is_refused_and_a_real_one_loads(tmp_path, prepared):
    """Checkpoints are read weights-only: a real nnU-Net checkpoint (NumPy scalars, torch.device) loads, for
    prediction and for resuming training; one whose pickle runs code is refused and the code never runs."""
    from ActiveLearning3DLib.nnunet.checkpoints import UnsafeCheckpoint, load_checkpoint
    from ActiveLearning3DLib.nnunet.prediction import Ensemble, ModelError

    project, _ = prepared
    model = tmp_path / "model"
    train_fold(project.path, 0, "test", model, "cpu")
    real = model / "fold_0" / "checkpoint_final.pth"
    loaded = load_checkpoint(real)
    assert loaded["trainer_name"] == "nnUNetTrainerPartial" and loaded["network_weights"]
    assert Ensemble.load(model, [0]).members == ["fold_0"]

    marker = tmp_path / "code-ran"
    crafted = torch.load(real, map_location="cpu", weights_only=False)
    crafted["logging"]["extra"] = _RunsCode(marker)
    evil = tmp_path / "evil"
    (evil / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model / name, evil / name)
    torch.save(crafted, evil / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError, match=r"checkpoint_final.pth: refused to load: .*could run code \(it names .*open"):
        Ensemble.load(evil, [0])
    with pytest.raises(UnsafeCheckpoint, match="refused"):
        load_checkpoint(evil / "fold_0" / "checkpoint_final.pth")
    # resuming a fold reads checkpoint_latest.pth through the same reader, never nnU-Net's weights_only=False
    resume = tmp_path / "resume"
    (resume / "fold_1").mkdir(parents=True)
    torch.save(crafted, resume / "fold_1" / "checkpoint_latest.pth")
    with pytest.raises(TrainingError, match="refused to load"):
        train_fold(project.path, 1, "test", resume, "cpu")
    assert not marker.exists()


def test_a_crafted_preprocessed_pickle_is_refused_before_nnunet_unpickles_it(tmp_path, prepared):
    """nnU-Net's data loaders ``pickle.load`` each case's properties; a shared project's must be plain data."""
    import pickle

    from ActiveLearning3DLib.nnunet.checkpoints import UnsafeCheckpoint, check_plain_pickles

    project, _ = prepared
    real = NnunetPaths.for_project(project).preprocessed_dataset
    assert check_plain_pickles(real) == len(list(real.rglob("*.pkl"))) > 0  # what nnU-Net wrote passes
    copy = tmp_path / "project"
    shutil.copytree(project.path, copy, symlinks=True)
    marker = tmp_path / "code-ran"
    victim = sorted(NnunetPaths.for_project(Project.open(copy)).preprocessed_dataset.rglob("*.pkl"))[0]
    with open(victim, "rb") as f:
        properties = pickle.load(f)
    properties["extra"] = _RunsCode(marker)
    with open(victim, "wb") as f:
        pickle.dump(properties, f)
    with pytest.raises(UnsafeCheckpoint, match=f"{victim.name}: refused to load: .*open"):
        check_plain_pickles(victim.parent)
    with pytest.raises(TrainingError, match="refused to load"):
        train_fold(copy, 0, "test", tmp_path / "model", "cpu")
    assert not marker.exists() and not (tmp_path / "model" / "fold_0" / "checkpoint_final.pth").exists()


def test_a_model_folder_of_other_data_is_not_reused(tmp_path, prepared):
    project, _ = prepared
    fold_dir = tmp_path / "model" / "fold_0"
    fold_dir.mkdir(parents=True)
    (fold_dir / "al3d_data_key.txt").write_text("0123456789abcdef\n")  # trained before the labels changed
    with pytest.raises(TrainingError, match="other data"):
        train_fold(project.path, 0, "test", tmp_path / "model", "cpu")


def test_worker_environment_points_into_the_project(prepared):
    project, _ = prepared
    env = nnunet_environment(project, resolve_profile("cpu-small"))
    root = project.path / "nnunet"
    assert env["nnUNet_raw"] == str(root / "raw") and env["nnUNet_preprocessed"] == str(root / "preprocessed")
    assert (
        env["nnUNet_results"] == str(root / "results") and env["nnUNet_n_proc_DA"] == "1"
    )  # 0 breaks the planner; our trainer reads 0 from the profile
    assert Path(env["nnUNet_extTrainer"], "al3d_partial_trainer.py").is_file()
    assert all(isinstance(v, str) for v in env.values())


def test_a_fold_the_splits_do_not_have_is_an_error(tmp_path, prepared):
    project, summary = prepared
    with pytest.raises(TrainingError, match=f"fold 7 does not exist: the splits have {summary['folds']} folds"):
        train_fold(project.path, 7, "test", tmp_path / "model", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)")
def test_train_one_fold_on_cuda(tmp_path, prepared):
    project, _ = prepared
    result = train_fold(project.path, 1, "test", tmp_path / "model", "cuda")
    assert result["device"].startswith("cuda") and np.isfinite(result["final_train_loss"])
