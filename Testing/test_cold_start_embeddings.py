"""The pool autoencoder as a background job: difficulty finds an unusual box, the cache, and cold-start queries."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import make_dataset, read_array, write_image

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.embeddings import AutoencoderSettings, pool_embeddings
from ActiveLearning3DLib.embeddings.store import embeddings_dir

SHAPE = (24, 28, 26)
SETTINGS = AutoencoderSettings(iterations=400, batch_size=16, threads=1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Six smooth cases; one has a high-contrast checkerboard planted in a corner the others never show."""
    root = tmp_path_factory.mktemp("cold")
    data = make_dataset(root / "source", n_cases=6, shape=SHAPE)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    for n, case in enumerate(data.cases):
        smooth = (np.sin(x / 5.0 + n) + np.cos(y / 6.0) + z / 12.0).astype(np.float32)
        if n == 2:
            block = ((z // 2 + y // 2 + x // 2) % 2 * 8.0 - 4.0).astype(np.float32)
            smooth[2:12, 2:12, 2:12] = block[2:12, 2:12, 2:12]
        write_image(data.images / f"{case}_0000.nii.gz", smooth)
    logic = ActiveLearningLogic.create(
        root / "project", data.images, data.labels, patch_size=(8, 8, 8), test_fraction=0.0, seed=0
    )
    return logic, data.cases[2]


def test_reconstruction_error_is_higher_on_the_planted_structure(planted):
    logic, odd_case = planted
    embeddings = pool_embeddings(logic.project, SETTINGS)
    assert embeddings.embeddings.shape[0] == len(embeddings) == len(embeddings.errors) > 50
    planted_box = [
        i
        for i, b in enumerate(embeddings.boxes)  # boxes mostly inside the planted block [2, 12)^3
        if b.case == odd_case and all(0 <= c <= 6 for c in b.coords)
    ]
    ordinary = [i for i, b in enumerate(embeddings.boxes) if b.case != odd_case]
    assert planted_box and ordinary
    assert embeddings.errors[planted_box].min() > np.percentile(embeddings.errors[ordinary], 95)


def test_a_second_cold_start_reuses_the_cache(planted):
    logic, _ = planted
    pool_embeddings(logic.project, SETTINGS)
    path = embeddings_dir(logic.project, SETTINGS) / "embeddings.npz"
    stamp = path.stat().st_mtime_ns
    again = pool_embeddings(logic.project, SETTINGS)
    assert path.stat().st_mtime_ns == stamp and len(again) > 0
    other = AutoencoderSettings(iterations=5, batch_size=4, threads=1, seed=1)
    assert embeddings_dir(logic.project, other) != embeddings_dir(logic.project, SETTINGS)


def test_label_free_starting_budget_from_the_command_line(planted, tmp_path):
    logic, _ = planted
    images = logic.project.path.parent / "source" / "imagesTr"
    out = tmp_path / "cscs"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ActiveLearning3DLib.cli",
            "init",
            str(out),
            "--images",
            str(images),
            "--patch-size",
            "8",
            "8",
            "8",
            "--start",
            "cscs",
            "--start-count",
            "6",
            "--query-size",
            "6",
            "--ae-iterations",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    opened = ActiveLearningLogic.open(out)
    boxes = opened.boxes(0)
    assert len(boxes) == 6 and {b.method for b in boxes} == {"cscs"}
    assert len({b.stratum for b in boxes}) >= 2  # spread over clusters
    for i, a in enumerate(boxes):
        assert all(not a.box.overlaps(b.box) for b in boxes[i + 1 :])
    assert not opened.project.has_ground_truth
    # the partial labels were not touched by a label-free query
    assert set(np.unique(read_array(opened.project.partial_label_path(boxes[0].case)))) == {opened.project.ignore_value}


def test_cluster_query_uses_the_cached_embeddings_and_spreads_over_clusters(planted):
    logic, _ = planted
    pool_embeddings(logic.project, SETTINGS)
    jobs_before = sorted(p.name for p in (logic.project.path / "jobs").iterdir())
    loop = logic.query("cluster", 8, autoencoder=SETTINGS)
    assert sorted(p.name for p in (logic.project.path / "jobs").iterdir()) == jobs_before  # no new job: cached
    strata = [b.stratum for b in loop.boxes]
    assert len(loop.boxes) == 8 and len(set(strata)) >= 2
    # the boxes nearest each cluster centre come first within a cluster (score = distance to the centre)
    for stratum in set(strata):
        scores = [b.score for b in loop.boxes if b.stratum == stratum]
        assert scores == sorted(scores)


def test_the_embedding_job_declares_its_threads_and_follows_the_runners_allotment(planted):
    import torch

    from ActiveLearning3DLib.embeddings.store import embed_task, embedding_job
    from ActiveLearning3DLib.jobs import LocalRunner, LocalRunnerSettings, Reporter

    logic, _ = planted
    quick = AutoencoderSettings(iterations=3, batch_size=2, seed=5)
    runner = LocalRunner(LocalRunnerSettings(max_parallel=2, cores=4))
    job = embedding_job(logic.project, quick, runner.slot_threads())
    assert job.spec().inputs["threads"] == 2  # one slot's share, so the runner can give it more when it runs alone
    assert embedding_job(logic.project, replace(quick, threads=1), 2).spec().inputs["threads"] == 1  # the settings win
    before = torch.get_num_threads()
    job.allot_threads(3)  # what the runner writes while the job runs alone
    try:
        result = embed_task(job.spec().inputs, Reporter(job, min_interval=0))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert result["candidates"] > 0


def test_a_loop_pipeline_runs_the_embeddings_stage_as_a_job_before_a_label_free_query(tmp_path):
    """The pipeline is handed the project and a query function (no logic). A query method that reads the pool
    embeddings has their stage's job run through the pipeline's runner first, polled without blocking; the query
    function is called once they are cached, and finds them there (the stage the logic's query waits on)."""
    from conftest import wait_for

    from ActiveLearning3DLib.jobs import RunnerSettings, make_runner
    from ActiveLearning3DLib.pipeline import LoopPipeline, LoopSettings

    data = make_dataset(tmp_path / "source", n_cases=3, shape=SHAPE)
    logic = ActiveLearningLogic.create(
        tmp_path / "project", data.images, data.labels, patch_size=(8, 8, 8), test_fraction=0.0, seed=0
    )
    logic.query("random", 2)
    logic.annotate_with_oracle()
    calls = []

    def query(method, count=None, seed=None, *, scores=None, info=None):
        calls.append((method, count, seed, scores))
        return logic.query(method, count, seed, scores=scores, info=info)

    runner = make_runner(RunnerSettings(max_parallel=1))
    pipeline = LoopPipeline(
        logic.project, query, LoopSettings(profile="test", device="cpu", method="cluster", count=3, stages=("query",)), runner
    )
    stage = logic.embedding_stage()
    assert not stage.done
    # an earlier run's saved autoencoder (untrained here): the job resumes from it and only embeds. Training the
    # default 600 iterations takes minutes on a loaded CPU; the tests above train with SETTINGS.
    import torch

    from ActiveLearning3DLib.embeddings.autoencoder import build_autoencoder

    stage.path.parent.mkdir(parents=True)
    torch.save(build_autoencoder(stage.settings.width).state_dict(), stage.path.parent / "autoencoder.pt")
    (stage.path.parent / "training.json").write_text('{"losses": [1.0]}')
    first = pipeline._query()  # the query stage alone: prepare and train are what `al3d train` did
    assert (first.stage, first.state) == ("query", "running") and calls == []
    job_name = f"embeddings-{stage.path.parent.name}"
    assert [name for name, _ in first.jobs] == [job_name]
    done = wait_for(
        lambda: (lambda s: s if s.finished else None)(pipeline._query()), timeout=600, what="the embeddings job and the query"
    )
    assert done.state == "done", done.message
    assert calls == [("cluster", 3, None, None)] and stage.done
    assert [b.loop for b in done.loop_file.boxes] == [1, 1, 1] and logic.project.loop_indices() == [0, 1]
    assert logic.embedding_stage().job(runner) is None  # cached: nothing more to run
    assert len(logic.pool_embeddings()) == len(stage.load()) > 0


def _encoder_module(features: int):
    """A user's encoder: the cube's mean times 1..features, so its embeddings can be told from the autoencoder's."""
    import torch
    from torch import nn

    class MeanEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.arange(1, features + 1, dtype=torch.float32))

        def forward(self, x):
            return x.mean(dim=(1, 2, 3, 4)).unsqueeze(1) * self.scale

    return MeanEncoder().eval()


def test_a_users_encoder_replaces_the_embeddings_saved_with_torch_export_or_torchscript(planted, tmp_path):
    """torch 2.14 deprecates TorchScript: a torch.export archive (.pt2) is taken as well, and older .pt files still."""
    import torch

    from ActiveLearning3DLib.embeddings.autoencoder import check_encoder

    logic, _ = planted
    exported = tmp_path / "encoder.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(_encoder_module(3), (torch.zeros(2, 1, 16, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(exported))
    scripted = tmp_path / "encoder.pt"
    torch.jit.script(_encoder_module(5)).save(str(scripted))
    for path, features in ((exported, 3), (scripted, 5)):
        check_encoder(path)
        made = pool_embeddings(logic.project, AutoencoderSettings(iterations=3, batch_size=2, seed=5, encoder=str(path)))
        assert made.embeddings.shape == (len(made), features)
        np.testing.assert_allclose(made.embeddings[:, -1], features * made.embeddings[:, 0], rtol=1e-5, atol=1e-6)
        assert np.ptp(made.embeddings[:, 0]) > 0  # the cubes' means, not a constant

    fixed = tmp_path / "fixed.pt2"  # exported without a dynamic batch: passes a batch of 2, fails the pool's batches
    torch.export.save(torch.export.export(_encoder_module(3), (torch.zeros(2, 1, 16, 16, 16),)), str(fixed))
    with pytest.raises(ValueError, match=r"fixed\.pt2: the encoder fails on a \(3, 1, 16, 16, 16\) batch \(export it"):
        check_encoder(fixed)
    not_archive = tmp_path / "broken.pt2"
    not_archive.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"broken\.pt2: not a torch\.export archive"):
        check_encoder(not_archive)
