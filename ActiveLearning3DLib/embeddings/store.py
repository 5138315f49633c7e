"""Pool embeddings on disk, the background job that makes them, and what the query methods read.

``PROJECT/embeddings/<key>/embeddings.npz`` holds one row per candidate box
(case, corner, size, embedding, reconstruction error); the key covers the pool,
the patch size and the autoencoder settings, so a second cold start with the
same settings costs nothing and other settings never reuse a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..boxes import Box, any_overlap
from ..fileio import atomic_write_json, read_json, replacing_file
from ..jobs import Job, JobRunner, JobState, RunnerSettings, make_runner
from .autoencoder import AutoencoderSettings


class EmbeddingSet:
    """Candidate boxes with their embedding and difficulty (reconstruction error)."""

    def __init__(self, boxes: list[Box], embeddings: np.ndarray, errors: np.ndarray):
        self.boxes, self.embeddings, self.errors = boxes, np.asarray(embeddings, np.float64), np.asarray(errors, np.float64)

    @classmethod
    def load(cls, path: Path | str) -> "EmbeddingSet":
        with np.load(path) as data:
            cases = [str(c) for c in data["cases"]]
            boxes = [Box(cases[i], tuple(c), tuple(s)) for i, c, s in zip(data["case_index"], data["corners"], data["sizes"])]
            return cls(boxes, data["embeddings"], data["errors"])

    def __len__(self) -> int:
        return len(self.boxes)

    def free(self, blocked: Sequence[Box]) -> "EmbeddingSet":
        """Only the candidates that overlap no existing box."""
        by_case: dict[str, list[Box]] = {}
        for b in blocked:
            by_case.setdefault(b.case, []).append(b)
        keep = [i for i, b in enumerate(self.boxes) if not any_overlap(b, by_case.get(b.case, ()))]
        return EmbeddingSet([self.boxes[i] for i in keep], self.embeddings[keep], self.errors[keep])

    def by_box(self) -> dict[tuple[str, tuple[int, ...]], np.ndarray]:
        return {(b.case, b.coords): e for b, e in zip(self.boxes, self.embeddings)}


def project_key(project) -> str:
    """The pool as the autoencoder sees it: cases, shapes and the patch size (no labels)."""
    pool = [(c, list(project.cases[c].shape)) for c in project.pool_cases]
    raw = json.dumps({"pool": pool, "patch": list(project.patch_size)})
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def embeddings_dir(project, settings: AutoencoderSettings) -> Path:
    return project.path / "embeddings" / settings.key(project_key(project))


def embedding_job(project, settings: AutoencoderSettings, threads: int | None = None) -> Job:
    """The job that makes the embeddings; ``threads`` (torch threads) when ``settings`` gives none."""
    folder = embeddings_dir(project, settings)
    inputs = {"project": str(project.path), "settings": asdict(settings), "output": str(folder)}
    threads = settings.threads or threads
    if threads:  # declared, so the runner can give it the cores of idle slots
        inputs["threads"] = int(threads)
    return Job.create(project.jobs_dir, f"embeddings-{folder.name}", "pool_embeddings", inputs)


class EmbeddingStage:
    """The pool embeddings as one stage: cached on disk, else made by one job that any driver runs.

    Every caller goes through here: the panel's label-free start and a loop
    pipeline submit :meth:`job` to their runner and poll it; the query, scripts
    and simulations call :meth:`run`, which submits the same job and waits for
    it. The job's name comes from the cache key, so two drivers share one job.
    """

    def __init__(self, project, settings: AutoencoderSettings | None = None):
        self.project = project
        self.settings = settings or AutoencoderSettings(seed=project.settings.seed)

    @property
    def path(self) -> Path:
        return embeddings_dir(self.project, self.settings) / "embeddings.npz"

    @property
    def done(self) -> bool:
        return self.path.is_file()

    def job(self, runner: JobRunner | None = None) -> Job | None:
        """The job that makes the embeddings (None: cached); its torch threads are ``runner``'s share of a slot.

        One that runs already (another driver's) is taken as it is: it makes the same file.
        """
        if self.done:
            return None
        running = Job(self.project.jobs_dir / f"embeddings-{self.path.parent.name}")
        if running.spec_path.is_file() and running.status().state == JobState.RUNNING:
            return running
        return embedding_job(self.project, self.settings, runner.slot_threads() if runner is not None else None)

    def run(self, runner: JobRunner | None = None, python: str | None = None) -> EmbeddingSet:
        """The embeddings, blocking: from the cache, else :meth:`job` through ``runner`` (waited for).

        Without a ``runner``, a local one with one job at a time (``python``: the worker interpreter)."""
        if not self.done:
            runner = runner or make_runner(RunnerSettings(python=python, max_parallel=1))
            job = self.job(runner)
            if job is not None:
                runner.submit(job)
                runner.wait([job])
                status = runner.refresh(job)
                if status.state != JobState.DONE:
                    raise RuntimeError(f"{job.path}: making the pool embeddings {status.state}: {status.message}")
        return self.load()

    def load(self) -> EmbeddingSet:
        return EmbeddingSet.load(self.path)


def pool_embeddings(
    project, settings: AutoencoderSettings | None = None, runner: JobRunner | None = None, python: str | None = None
) -> EmbeddingSet:
    """The pool's embeddings, blocking (:meth:`EmbeddingStage.run`): from the cache, else made by their job."""
    return EmbeddingStage(project, settings).run(runner, python)


def embed_task(inputs: dict, report) -> dict:
    """The job: train the pool autoencoder, embed every candidate box, save both (resumes from a saved model)."""
    import torch

    from ..jobs.tasks import torch_threads
    from ..project import Project
    from .autoencoder import embed_pool, load_encoder, timed, train_autoencoder, zscore

    import SimpleITK as sitk

    project = Project.open(inputs["project"])
    settings = AutoencoderSettings(**{k: tuple(v) if k == "stride" and v else v for k, v in inputs["settings"].items()})
    output = Path(inputs["output"])
    output.mkdir(parents=True, exist_ok=True)
    torch_threads(inputs, report)
    report(stage="autoencoder", message="reading the pool images", force=True)
    # read once, z-scored, for training and for embedding
    data, read_seconds = timed(lambda: {c: zscore(sitk.GetArrayFromImage(project.read_image(c))) for c in project.pool_cases})

    def relay(event: dict) -> None:
        report(**{k: v for k, v in event.items() if k in ("stage", "progress", "iteration", "case", "message")})

    weights = output / "autoencoder.pt"
    train_seconds = 0.0
    if weights.is_file():
        from .autoencoder import build_autoencoder

        model = build_autoencoder(settings.width)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))  # untrusted folder: no pickles
        model.eval()
        losses = read_json(output / "training.json")["losses"]
    else:
        (model, losses), train_seconds = timed(train_autoencoder, data, project.patch_size, settings, relay)
        with replacing_file(weights) as tmp:
            torch.save(model.state_dict(), tmp)
        atomic_write_json(output / "training.json", {"losses": losses, "seconds": round(train_seconds, 1)})
    encoder = load_encoder(settings.encoder) if settings.encoder else None
    arrays, embed_seconds = timed(embed_pool, model, data, project.patch_size, settings.stride, encoder, relay)
    with replacing_file(output / "embeddings.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return {
        "candidates": int(len(arrays["errors"])),
        "embedding_size": int(arrays["embeddings"].shape[1]),
        "final_loss": float(np.mean(losses[-20:])),
        "read_seconds": round(read_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "embed_seconds": round(embed_seconds, 1),
        "output": str(output),
    }
