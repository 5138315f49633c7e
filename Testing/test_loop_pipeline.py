"""One whole active-learning loop with nnU-Net as background jobs (``test`` profile), and its failure modes.

16 real Hippocampus cases when the shared data is present (else phantoms):
12 pool / 4 test cases, 8 oracle-annotated starting boxes. Every stage runs
in worker processes started by the local runner, as in real use.
"""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.cli import main as al3d
from ActiveLearning3DLib.fileio import read_json
from ActiveLearning3DLib.jobs import Job
from ActiveLearning3DLib.jobs.local import worker_alive as process_alive
from ActiveLearning3DLib.nnunet.profiles import resolve_profile
from ActiveLearning3DLib.pipeline import LoopSettings
from ActiveLearning3DLib.query_methods import get_method
from ActiveLearning3DLib.scores import ScoreStore
from conftest import annotated_project, default_data_dir, wait_for

CASES = 16


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """A project after ``al3d loop --profile test`` (train, evaluate, score, query) on its starting boxes."""
    logic = annotated_project(tmp_path_factory, "loop", CASES, 8)
    environ = dict(os.environ)
    code = al3d(["loop", str(logic.project.path), "--profile", "test", "--device", "cpu", "--count", "6", "--method", "clasp_pe"])
    assert code == 0
    assert dict(os.environ) == environ  # the nnU-Net variables went to the workers only
    return logic, logic.loop_pipeline(LoopSettings(profile="test", device="cpu"))


def test_loop_writes_a_next_loop_whose_boxes_do_not_overlap_annotated_ones(looped):
    logic, pipeline = looped
    loop = logic.project.read_loop(1)
    assert loop.method == "clasp_pe" and len(loop.boxes) == 6
    assert loop.info["model"] == str(pipeline.model_folder) and loop.info["trained_on_loop"] == 0
    annotated = [b.box for b in logic.boxes(0) if b.state == "annotated"]
    new = [b.box for b in loop.boxes]
    assert not any(a.overlaps(n) for a in annotated for n in new)
    assert not any(a.overlaps(b) for i, a in enumerate(new) for b in new[i + 1 :])
    assert all(b.state == "pending" and np.isfinite(b.score) for b in loop.boxes)


def test_scoring_stores_one_candidate_list_per_pool_image_and_uncertainty_images(looped):
    logic, pipeline = looped
    project = logic.project
    names = get_method("clasp_pe").map_names(project.foreground_classes)
    store = ScoreStore(pipeline.scores_dir)
    assert sorted(p.stem for p in pipeline.scores_dir.glob("*.npz")) == sorted(project.pool_cases)
    for case in project.pool_cases:
        scores = store.read(case, names)
        assert set(scores) == set(names)
        grid = scores["pe"].scores
        assert grid.size > 0 and np.isfinite(grid).all() and (grid >= 0).all()
        heat = sitk.ReadImage(str(pipeline.uncertainty_dir / f"{case}.nii.gz"))
        image = project.read_image(case)
        assert heat.GetSize() == image.GetSize() and np.allclose(heat.GetOrigin(), image.GetOrigin())
        values = sitk.GetArrayFromImage(heat)
        assert 0 <= values.min() and values.max() <= math.log(len(project.classes)) + 1e-5
        # the ensemble's predicted labels, kept for pre-filled boxes: the image's grid, classes only
        predicted = sitk.ReadImage(str(pipeline.pool_prediction_dir / f"{case}.nii.gz"))
        assert predicted.GetSize() == image.GetSize() and np.allclose(predicted.GetDirection(), image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= set(project.classes)
    # the next loop's boxes open pre-filled from this model
    box = logic.project.read_loop(1).boxes[0]
    assert logic.prefill_model(box) == pipeline.model_folder
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(pipeline.pool_prediction_dir / f"{box.case}.nii.gz")))
    np.testing.assert_array_equal(logic.prefill(box), stored[box.box.slices])
    result = read_json(Job(pipeline.jobs_dir / f"{pipeline.model_name}-score").path / "result.json")
    assert result["members"] == ["fold_0", "fold_1"] and result["scored"] == len(project.pool_cases)


def test_test_split_summary_has_finite_dice(looped):
    logic, pipeline = looped
    summary = read_json(logic.project.path / "evaluation" / "loop_000.json")
    assert summary == read_json(pipeline.evaluation_dir / "summary.json")
    assert summary["test_cases"] == len(logic.project.test_cases) == 4
    assert 0 <= summary["mean_dice"] <= 1
    assert set(summary["per_class"]) == {logic.project.classes[c] for c in logic.project.foreground_classes}
    assert all(v is None or 0 <= v <= 1 for v in summary["per_class"].values())
    assert summary["mirroring"] == pipeline.profile.evaluation_mirroring and summary["members"] == ["fold_0", "fold_1"]
    assert summary["loop"] == 0 and summary["profile"] == "test"


def test_jobs_report_their_stages_and_rerunning_a_finished_loop_redoes_nothing(looped, capsys):
    logic, pipeline = looped
    jobs = {j.name: j for j in logic.jobs()}
    names = [f"{pipeline.model_name}-{s}" for s in ("prepare", "fold_0", "fold_1", "evaluate", "score")]
    assert set(names) <= set(jobs) and all(jobs[n].status().state == "done" for n in names)
    ended = {n: jobs[n].status().ended for n in names}
    state = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", stages=("prepare", "train", "predict"))).run()
    assert state.state == "done" and {n: Job(jobs[n].path).status().ended for n in names} == ended
    assert al3d(["jobs", str(logic.project.path), "--json"]) == 0
    listed = {j["name"]: j for j in json.loads(capsys.readouterr().out)}
    assert listed[names[1]]["kind"] == "nnunet_train" and listed[names[1]]["progress"] == 1.0
    # `pe` needs a map of the done `clasp_pe` score job: that job serves it, and the command names the job's maps
    assert al3d(["score", str(logic.project.path), "--method", "pe", "--profile", "test", "--device", "cpu"]) == 0
    maps = get_method("clasp_pe").map_names(logic.project.foreground_classes)
    assert f"pool scores ({', '.join(maps)}) -> {pipeline.scores_dir}" in capsys.readouterr().out
    assert {n: Job(jobs[n].path).status().ended for n in names} == ended


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_cancel_kill_and_resume(tmp_path_factory):
    """Cancel ends a job as cancelled with its processes gone; SIGKILL ends one as failed; a rerun resumes."""
    logic = annotated_project(tmp_path_factory, "crash", CASES, 8)
    settings = LoopSettings(
        profile=resolve_profile("test", epochs=16, save_every=4),
        device="cpu",
        parallel=1,
        stages=("prepare", "train", "predict"),
        evaluate=False,
        method="pe",
        uncertainty_maps=False,
    )
    pipeline = logic.loop_pipeline(settings)

    fold0 = Job(pipeline.jobs_dir / f"{pipeline.model_name}-fold_0")

    def fold0_training(after=lambda: True):
        """Advance the pipeline; fold 0's status once its worker trains (and ``after()`` holds)."""
        state = pipeline.advance()
        status = dict(state.jobs).get(fold0.name)
        training = status is not None and status.state == "running" and status.epoch is not None
        return status if training and after() else None

    # 1. cancel while fold 0 trains
    status = wait_for(fold0_training, timeout=120, what="fold 0 training")
    cancelled = pipeline.cancel()
    assert fold0.path in [j.path for j in cancelled]
    assert fold0.status().state == "cancelled" and _group_gone(status.pid) and not process_alive(status.pid)
    prepare = Job(pipeline.jobs_dir / f"{pipeline.model_name}-prepare")
    prepared_at = prepare.status().ended
    assert prepare.status().state == "done"

    # 2. a new run resumes (prepare is not redone); SIGKILL the worker of fold 0 once it has a checkpoint
    pipeline = logic.loop_pipeline(settings)
    latest = pipeline.model_folder / "fold_0" / "checkpoint_latest.pth"
    status = wait_for(lambda: fold0_training(latest.is_file), timeout=120, what="a checkpoint")
    os.kill(status.pid, signal.SIGKILL)
    wait_for(lambda: pipeline.runner.refresh(fold0).state == "failed", timeout=120, what="the killed job to be failed")
    message = fold0.status().message
    assert "exited" in message or "died" in message
    assert "log:" in message and len(message.splitlines()) > 1  # the last lines of its log
    assert prepare.status().ended == prepared_at

    # 3. running again resumes from the checkpoint and finishes everything
    state = logic.loop_pipeline(settings).run(timeout=600)
    assert state.state == "done", state.message
    assert prepare.status().ended == prepared_at
    result = read_json(fold0.path / "result.json")
    assert result["resumed_from_epoch"] > 0
    assert sorted(p.stem for p in pipeline.scores_dir.glob("*.npz")) == sorted(logic.project.pool_cases)


def test_one_pass_scoring_equals_scoring_from_each_members_saved_probabilities(looped, tmp_path):
    """The streamed one-pass scores are those of the nnActive way (every member's probabilities, then aggregation)."""
    from ActiveLearning3DLib.nnunet.scoring import ScoringSettings, load_scoring_ensemble, score_pool_with_ensemble
    from ActiveLearning3DLib.scores import score_pool
    from ActiveLearning3DLib.uncertainty import MemoryProbabilities

    logic, pipeline = looped
    project = logic.project
    cases = sorted(project.pool_cases)[:2]
    names = ["pe", "bald", *[f"class_{c}" for c in project.foreground_classes]]
    ensemble = load_scoring_ensemble(pipeline.model_folder, "cpu")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for case in cases:
        for member, probabilities in ensemble.member_probabilities(project.image_paths(case)):
            assert probabilities.shape == (len(project.classes), *project.cases[case].shape)
            assert np.allclose(probabilities.sum(axis=0), 1, atol=1e-4)
            arrays.setdefault(member, {})[case] = probabilities
    assert len(arrays) == 2 and not np.allclose(arrays["fold_0"][cases[0]], arrays["fold_1"][cases[0]])
    reference = ScoreStore(tmp_path / "reference")
    score_pool(
        MemoryProbabilities(arrays),
        {c: project.cases[c].shape for c in cases},
        len(project.classes),
        names,
        project.patch_size,
        reference,
    )
    summary = score_pool_with_ensemble(
        project, ensemble, ScoringSettings(tuple(names), tmp_path / "one-pass", prediction_dir=tmp_path / "labels"), cases
    )
    assert summary["scored"] == 2 and summary["members"] == ["fold_0", "fold_1"]
    for case in cases:  # the kept prediction is the class of the highest mean probability
        mean = (arrays["fold_0"][case].astype(np.float32) + arrays["fold_1"][case]) / 2
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels" / f"{case}.nii.gz")))
        ties = np.sort(mean, axis=0)[-1] - np.sort(mean, axis=0)[-2] < 1e-5  # float order may differ at a tie
        np.testing.assert_array_equal(stored[~ties], np.argmax(mean, axis=0)[~ties])
    one_pass = ScoreStore(tmp_path / "one-pass")
    for case in cases:
        for name in names:
            np.testing.assert_allclose(
                one_pass.read(case, [name])[name].scores, reference.read(case, [name])[name].scores, rtol=1e-5, atol=1e-6
            )
    again = score_pool_with_ensemble(project, ensemble, ScoringSettings(tuple(names), tmp_path / "one-pass"), cases)
    assert again["scored"] == 0 and again["already_scored"] == 2  # resumable


def test_evaluation_dice_matches_the_ensemble_segmentation_and_resumes(looped, tmp_path, capsys):
    from ActiveLearning3DLib.metrics import dice_per_class
    from ActiveLearning3DLib.nnunet.evaluation import evaluate_test_split, load_evaluation_ensemble

    logic, pipeline = looped
    project = logic.project
    case = sorted(project.test_cases)[0]
    capsys.readouterr()
    ensemble = load_evaluation_ensemble(pipeline.model_folder, "cpu")
    assert "perform_everything_on_device" not in capsys.readouterr().out  # nnU-Net's CUDA-only note, printed on CPU
    segmentation = ensemble.segment(project.image_paths(case))
    gt = project.read_ground_truth(case)
    assert segmentation.shape == gt.shape and set(np.unique(segmentation)) <= set(project.classes)
    expected = dice_per_class(segmentation, gt, project.foreground_classes)
    summary = evaluate_test_split(project, ensemble, tmp_path / "eval", [case])
    got = [math.nan if d is None else d for d in summary["per_case"][case]]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    saved = tmp_path / "eval" / "cases" / f"{case}.json"
    stamp = saved.stat().st_mtime_ns
    assert evaluate_test_split(project, ensemble, tmp_path / "eval", [case])["mean_dice"] == summary["mean_dice"]
    assert saved.stat().st_mtime_ns == stamp  # not predicted again


def test_model_folder_problems_are_clear_errors(looped, tmp_path):
    from ActiveLearning3DLib.nnunet.prediction import Ensemble, ModelError

    _, pipeline = looped
    with pytest.raises(ModelError, match="not an nnU-Net model folder"):
        Ensemble.load(tmp_path)
    with pytest.raises(ModelError, match=r"fold\(s\) \[7\]"):
        Ensemble.load(pipeline.model_folder, folds=[7])
    broken = tmp_path / "broken"
    (broken / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (broken / name).write_bytes((pipeline.model_folder / name).read_bytes())
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes(b"truncated")
    with pytest.raises(ModelError, match="unreadable checkpoint"):
        Ensemble.load(broken)


def test_training_without_annotations_or_with_an_unknown_stage_is_refused(tmp_path_factory):
    from ActiveLearning3DLib.project import ProjectError

    data = default_data_dir(tmp_path_factory, phantom_cases=CASES)
    logic = ActiveLearningLogic.create(
        tmp_path_factory.mktemp("empty") / "p", data / "imagesTr", data / "labelsTr", max_cases=8, seed=1
    )
    with pytest.raises(ProjectError, match="no annotated boxes"):
        logic.loop_pipeline(LoopSettings(profile="test"))
    with pytest.raises(ValueError, match="unknown pipeline stages"):
        LoopSettings(stages=("train", "fly"))


def test_tile_batches_give_nnunets_own_sliding_window_result(looped):
    """Batched tiles are an optimisation only: the logits equal nnU-Net's one-tile-at-a-time sliding window."""
    from ActiveLearning3DLib.nnunet.prediction import Ensemble, PredictionSettings

    logic, pipeline = looped
    case = sorted(logic.project.pool_cases)[0]
    results = {}
    for batch in (1, 8):
        for mirroring in (False, True):
            ensemble = Ensemble.load(
                pipeline.model_folder,
                folds=[0],
                settings=PredictionSettings(tile_step=0.5, mirroring=mirroring, tile_batch=batch),
            )
            assert (type(ensemble.predictor).__name__ == "TileBatchPredictor") == (batch > 1)
            data, _ = ensemble.preprocess(logic.project.image_paths(case))
            results[batch, mirroring] = ensemble.logits(data, 0).float()
    for mirroring in (False, True):
        np.testing.assert_allclose(results[8, mirroring].numpy(), results[1, mirroring].numpy(), atol=2e-2, rtol=1e-2)
    assert not np.allclose(results[8, True].numpy(), results[8, False].numpy(), atol=1e-3)  # mirroring was applied


def test_final_predictions_job_segments_cases_on_their_grid_as_the_ensemble_does(looped):
    import SimpleITK as sitk

    from ActiveLearning3DLib.nnunet.evaluation import load_evaluation_ensemble

    logic, pipeline = looped
    project = logic.project
    cases = [sorted(project.pool_cases)[0], sorted(project.test_cases)[0]]
    job = pipeline.prediction_job(cases)
    pipeline.runner.submit(job)
    assert pipeline.runner.wait([job], timeout=600)
    assert pipeline.runner.refresh(job).state == "done", job.log_tail(20)
    ensemble = load_evaluation_ensemble(pipeline.model_folder, "cpu", mirroring=pipeline.profile.evaluation_mirroring)
    for case in cases:
        written = sitk.ReadImage(str(pipeline.predictions_dir / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(project.image_paths(case)[0]))
        assert written.GetSize() == image.GetSize()
        np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), ensemble.segment(project.image_paths(case)))
    # a second run finds every case written and redoes nothing
    stamp = (pipeline.predictions_dir / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    assert pipeline.runner.refresh(pipeline.prediction_job(cases)).state == "done"
    assert (pipeline.predictions_dir / f"{cases[0]}.nii.gz").stat().st_mtime_ns == stamp


def _copy_with_links(model, tmp_path):
    """A copy of the trained model folder plus what export must leave behind: links to files outside it."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy, symlinks=True)
    outside = tmp_path / "outside"
    shutil.copytree(copy / "fold_0", outside / "fold_7")  # a whole fold reached through a linked folder
    (outside / "secret.pth").write_bytes((copy / "fold_0" / "checkpoint_final.pth").read_bytes())
    try:
        (copy / "fold_7").symlink_to(outside / "fold_7", target_is_directory=True)
        (copy / "fold_2").mkdir()
        (copy / "fold_2" / "checkpoint_final.pth").symlink_to(outside / "secret.pth")
    except OSError as e:  # Windows without the symlink privilege
        pytest.skip(f"symbolic links cannot be created here ({e})")
    return copy


def test_exported_model_predicts_in_stock_nnunet_without_this_package(looped, tmp_path):
    """The zip holds only what inference reads, names nnU-Net's own trainer, and stock nnU-Net predicts with it
    in a Python that cannot import ActiveLearning3DLib (as on a machine with only nnunetv2, or in SlicerNNUnet)."""
    import subprocess
    import sys
    import sysconfig
    import zipfile

    import torch

    from ActiveLearning3DLib.fileio import TMP_PREFIX
    from ActiveLearning3DLib.nnunet.export import ExportError, export_model

    logic, pipeline = looped
    source = pipeline.model_folder
    # what the project's model folder holds besides the model, and what must not leave it
    assert list(source.glob("fold_*/debug.json")) and list(source.glob("uncertainty/*.nii.gz"))
    assert list(source.glob("scores/*")) and list(source.glob("fold_*/training_log_*.txt"))
    model = _copy_with_links(source, tmp_path)
    exported = export_model(model, tmp_path / "export")
    assert exported.archive == tmp_path / "export.zip" and exported.folds == ("0", "1")
    prefix = f"Dataset001_AL3D/nnUNetTrainer__nnUNetPlans__{exported.configuration}"
    names = set(zipfile.ZipFile(exported.archive).namelist())
    assert names == {
        f"{prefix}/dataset.json",
        f"{prefix}/plans.json",
        f"{prefix}/fold_0/checkpoint_final.pth",
        f"{prefix}/fold_1/checkpoint_final.pth",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]  # the zip was moved into place

    results = tmp_path / "results"
    zipfile.ZipFile(exported.archive).extractall(results)
    folder = results / prefix
    checkpoint = torch.load(folder / "fold_1" / "checkpoint_final.pth", weights_only=True)  # no pickled objects
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["init_args"]["configuration"] == exported.configuration
    assert set(checkpoint) == {
        "network_weights",
        "init_args",
        "trainer_name",
        "inference_allowed_mirroring_axes",
        "current_epoch",
    }
    original = torch.load(source / "fold_1" / "checkpoint_final.pth", weights_only=False)
    assert all(torch.equal(checkpoint["network_weights"][k], v) for k, v in original["network_weights"].items())
    assert "dataset" not in read_json(folder / "dataset.json")
    assert read_json(folder / "plans.json")["configurations"] == read_json(source / "plans.json")["configurations"]

    case = logic.project.test_cases[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = logic.project.path / "imagesTs" / f"{case}_0000.nii.gz"
    (inputs / "case_0000.nii.gz").write_bytes(image.read_bytes())
    # python -I -S: no PYTHONPATH, no user site, no .pth files (our editable install is one); only site-packages
    script = (
        "import importlib.util, sys\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "assert importlib.util.find_spec('ActiveLearning3DLib') is None, 'ActiveLearning3DLib is importable'\n"
        "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor, predict_entry_point\n"
        "try:\n"
        f"    nnUNetPredictor(device=__import__('torch').device('cpu')).initialize_from_trained_model_folder({str(source)!r}, (0,))\n"
        "    print('CONTROL: the project folder loaded')\n"
        "except Exception as e:\n"
        "    print('CONTROL: the project folder did not load:', type(e).__name__)\n"
        "sys.argv = ['nnUNetv2_predict', *sys.argv[1:]]\n"
        "predict_entry_point()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "nnUNet_extTrainer")}
    env.update(nnUNet_results=str(results), nnUNet_raw=str(results), nnUNet_preprocessed=str(results))
    outputs = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            script,
            "-d",
            exported.dataset,
            "-c",
            exported.configuration,
            "-f",
            *exported.folds,
            "-i",
            str(inputs),
            "-o",
            str(outputs),
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the control: our own folder names nnUNetTrainerPartial, which stock nnU-Net cannot find there
    assert "CONTROL: the project folder did not load" in done.stdout
    segmentation = sitk.ReadImage(str(outputs / "case.nii.gz"))
    assert segmentation.GetSize() == sitk.ReadImage(str(image)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(segmentation))) <= {0, 1, 2}

    # a linked plans.json is refused and the earlier zip stays as it was
    before = exported.archive.read_bytes()
    (model / "plans.json").unlink()
    (model / "plans.json").symlink_to(source / "plans.json")
    with pytest.raises(ExportError, match="plans.json: missing .or a symbolic link"):
        export_model(model, exported.archive)
    assert exported.archive.read_bytes() == before
