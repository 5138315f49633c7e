"""One active-learning loop as background jobs: prepare, train the folds, evaluate and score, then query.

:class:`LoopPipeline` is a small state machine over job folders. Each call of
:meth:`LoopPipeline.advance` looks at the jobs of the current stage, submits
what has not run, and moves on when every job of the stage is done; it never
blocks, so the Slicer panel calls it from a timer and the command line from
:meth:`LoopPipeline.run`. Because everything it knows comes from the job files,
a pipeline made again after a crash (or in another process) resumes: done jobs
are not rerun (except a score job lacking a map the query method needs), a job
whose worker still runs is watched, failed and cancelled ones are started again
once.

Stages and their jobs (``<model>`` = ``loop_<t>_<profile>_<annotation key>``,
``t`` the last loop whose annotations the model learns from; ``loop_<t>_<profile>-warm_<key>``
for warm-started models, ``LoopSettings.init``)::

    prepare    <model>-prepare           plan once, preprocess changed cases, splits
    train      <model>-fold_<k>          one job per fold, up to ``parallel`` at a time
    predict    <model>-evaluate          test split Dice (when there is ground truth)
               <model>-score             pool box scores for the query method
    query      embeddings-<key>          the pool embeddings, first, when the query method reads them
               (in this process)         the next loop file from the stored scores

The pipeline knows the project and a query function (the logic's
:meth:`~ActiveLearning3DLib.logic.ActiveLearningLogic.query`, handed in by
``logic.loop_pipeline()``), never the logic itself: it sits below it.

Everything a model produces lives in its folder ``<project>/nnunet/results/<model>/``
(``fold_<k>/``, ``scores/``, ``uncertainty/``, ``pool_prediction/``,
``evaluation/``); the test summary
is also copied to ``<project>/evaluation/loop_<t>.json``.

Warm start (``init="warm"``): member k starts from member k of the previous
loop's model (:meth:`LoopPipeline.previous_model`: the model that queried this
loop's boxes, else the newest finished one of loop ``t - 1`` with this profile,
warm first) and keeps its folds (stable splits from that model's
``splits_final.json``). Loop 0, or no previous model, trains from scratch; the
fold jobs say so (trainer.py). Scratch models keep their names and fresh splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Callable, Protocol, Sequence

from .embeddings import EmbeddingStage
from .fileio import read_json
from .jobs import Job, JobRunner, JobState, JobStatus, RunnerSettings, make_runner
from .jobs.runner import default_parallel
from .nnunet.paths import NnunetPaths, nnunet_environment
from .nnunet.profiles import PROFILES, TrainingProfile, resolve_device, resolve_profile
from .nnunet.scoring import ScoringSettings
from .prefill import PREDICTION_FOLDER, UNCERTAINTY_FOLDER
from .project import BoxState, LoopConflict, LoopFile, Project, ProjectError
from .query_methods import DEFAULT_METHOD, get_method

STAGES = ("prepare", "train", "predict", "query")
INITS = ("scratch", "warm")  # how a loop's members start (trainer.INITS; not imported: that module needs torch)
# warm: a third of the training compute per loop, within 0.3 points of scratch in AUBC on the warm-start study
# (benchmarks/RESULTS.md); "scratch" is nnActive's protocol (every loop from random weights)
DEFAULT_INIT = "warm"


def check_init(init: str) -> None:
    """Refuse an unknown ``init`` (loops and simulations alike) before any job starts."""
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")


_WEIGHTS = {"prepare": 0.05, "train": 0.75, "predict": 0.2, "query": 0.0}


def profile_tag(profile: TrainingProfile, init: str = "scratch") -> str:
    """The profile's name, plus a short hash when settings that change the model differ from the named profile's.

    Device, data-loader processes and the description do not change the model,
    so they are left out; a ``test`` profile with more epochs is ``test-1a2b3c``.
    ``init="warm"`` adds ``-warm`` (and the warm schedule counts); a scratch
    model's tag is what it was before warm starts existed.
    """

    def model_settings(p: TrainingProfile) -> dict:
        d = p.to_json()
        for key in (
            "device",
            "num_workers",
            "description",
            "compile",
            *(("warm_fraction", "warm_initial_lr") if init != "warm" else ()),
        ):
            d.pop(key, None)
        return d

    mine = model_settings(profile)
    suffix = "-warm" if init == "warm" else ""
    if profile.name in PROFILES and model_settings(PROFILES[profile.name]) == mine:
        return profile.name + suffix
    return f"{profile.name}-{hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:6]}{suffix}"


def default_job_parallel(device: str | None = "auto") -> int:
    """Jobs at a time: one on a GPU, else one per two CPU cores."""
    return 1 if resolve_device(device) == "cuda" else default_parallel()


def auto_profile(device: str | None = "auto") -> str:
    """``paper`` where a CUDA GPU is there, else ``cpu-small`` (``paper`` takes about a day per fold on a CPU)."""
    return "paper" if resolve_device(device) == "cuda" else "cpu-small"


@dataclass
class LoopSettings:
    """How a loop trains, predicts and queries; every field can be set per run (CLI options, panel settings)."""

    profile: str | TrainingProfile = "auto"  # "auto": paper with a GPU, cpu-small without
    folds: int | None = None  # default: the profile's
    device: str = "auto"
    parallel: int | None = None  # folds at a time; default: 1 on a GPU, else one per two CPU cores
    threads: int | None = None  # torch threads per job; default: CPU cores / parallel
    method: str = DEFAULT_METHOD  # query method: decides which maps scoring computes
    count: int | None = None  # boxes to query; default: the project's query size
    seed: int | None = None
    training_seed: int | None = None  # base seed of training (per loop and fold); default: seed, else the project's
    stages: tuple[str, ...] = STAGES
    evaluate: bool = True  # the test split, when the project has ground truth and test cases
    score: bool = True  # pool scores, when the query method needs a model
    extra_maps: tuple[str, ...] = ()  # maps to score besides the method's: one pass serves the methods of a shared loop
    uncertainty_maps: bool = True  # write the predictive entropy of each pool image for the heat map
    pool_prediction: bool = True  # keep the ensemble's predicted labels of each pool image: boxes open pre-filled
    predict_pool: bool = False  # score even for a method that needs no model, for the predicted labels (simulation)
    stride: tuple[int, int, int] | None = None
    python: str | None = None  # worker interpreter (PythonSlicer in Slicer); default: this one
    background: bool = False  # its jobs start only when no other queued job waits (a simulation's full-data run)
    fixed_threads: bool = False  # jobs keep their torch threads (no idle-core sharing): same numbers every run
    runner: RunnerSettings | None = None  # which backend runs the jobs; default: local, with python and parallel
    init: str = DEFAULT_INIT  # "warm": members start from the previous loop's (shorter schedule, stable folds)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown pipeline stages {unknown}; known: {', '.join(STAGES)}")
        # checked here, before any job starts: parallel -1 waited forever, count -1 failed after the training
        for name in ("folds", "parallel", "threads", "count"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
                raise ValueError(f"{name}: expected a whole number of at least 1 (or None for the default), got {value!r}")
        for name in ("seed", "training_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 0):
                raise ValueError(f"{name}: expected a non-negative whole number, got {value!r}")
        get_method(self.method)  # an unknown method fails here, with the known ones
        check_init(self.init)
        if self.stride is not None and (
            len(self.stride) != 3 or not all(isinstance(v, Integral) and v >= 1 for v in self.stride)
        ):
            raise ValueError(f"stride: expected three positive whole numbers (Z Y X), got {self.stride!r}")


@dataclass
class PipelineState:
    """Where a loop stands: the stage, its jobs, and the overall fraction done."""

    stage: str
    state: str  # running, done, failed
    progress: float
    message: str = ""
    jobs: list[tuple[str, JobStatus]] = field(default_factory=list)
    loop_file: LoopFile | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def describe(self) -> str:
        parts = [f"{self.stage}: {100 * self.progress:5.1f}%"]
        for name, status in self.jobs:
            if status.state == JobState.RUNNING:
                parts.append(
                    f"{name.rsplit('-', 1)[-1]} {100 * status.progress:.0f}% {status.message.splitlines()[0] if status.message else ''}".rstrip()
                )
            elif status.state != JobState.DONE:
                parts.append(f"{name.rsplit('-', 1)[-1]} {status.state}")
        return " | ".join(parts)


class QueryFunction(Protocol):
    """What the query stage calls to write the next loop file: ``ActiveLearningLogic.query`` (the pending-box rule,
    the claims on the loop file and the query context are the logic's)."""

    def __call__(
        self,
        method: str,
        count: int | None = None,
        seed: int | None = None,
        *,
        scores: Path | None = None,
        info: dict | None = None,
    ) -> LoopFile: ...


class LoopPipeline:
    """Runs one loop's stages as jobs through a runner; see the module docstring.

    ``query`` writes the next loop file from the scores (``logic.loop_pipeline()``
    hands in the logic's query); the pipeline reads the project, never the logic.
    """

    def __init__(
        self, project: Project, query: QueryFunction, settings: LoopSettings | None = None, runner: JobRunner | None = None
    ):
        self.project = project
        self.query = query
        self.settings = settings or LoopSettings()
        s = self.settings
        device = s.device or "auto"
        name = (
            s.profile if isinstance(s.profile, TrainingProfile) else (auto_profile(device) if s.profile == "auto" else s.profile)
        )
        self.profile = resolve_profile(name, folds=s.folds, device=device)
        self.parallel = s.parallel or default_job_parallel(self.profile.device)
        self.threads = s.threads or max(1, (os.cpu_count() or 1) // self.parallel)
        self.runner = runner or make_runner(
            (s.runner or RunnerSettings()).with_defaults(python=s.python, max_parallel=self.parallel)
        )
        annotated = [b for b in self.project.all_boxes() if b.state == BoxState.ANNOTATED]
        if not annotated:
            raise ProjectError(
                f"{self.project.path}: no annotated boxes yet; query the starting budget (loop 0) and annotate it before training"
            )
        self.loop = max(b.loop for b in annotated)
        self.annotation_key = self.project.annotation_key()  # read once: advance() runs every poll
        self.model_name = f"loop_{self.loop:03d}_{profile_tag(self.profile, s.init)}_{self.annotation_key}"
        self._previous: tuple[Path | None, str] | None = None
        self.paths = NnunetPaths.for_project(self.project)
        self.env = nnunet_environment(self.project, self.profile)
        self._submitted: set[str] = set()
        self._loop_file: LoopFile | None = None
        self._score_job_maps: list[str] | None = None
        self._embedding_job: Job | None = None

    # ------------------------------------------------------------------ folders
    @property
    def model_folder(self) -> Path:
        return self.paths.results_root / self.model_name

    @property
    def scores_dir(self) -> Path:
        return self.model_folder / "scores"

    @property
    def uncertainty_dir(self) -> Path:
        return self.model_folder / UNCERTAINTY_FOLDER

    @property
    def pool_prediction_dir(self) -> Path:
        return self.model_folder / PREDICTION_FOLDER

    @property
    def evaluation_dir(self) -> Path:
        return self.model_folder / "evaluation"

    @property
    def evaluation_summary(self) -> Path:
        return self.project.path / "evaluation" / f"loop_{self.loop:03d}.json"

    @property
    def jobs_dir(self) -> Path:
        return self.project.jobs_dir

    @property
    def evaluates(self) -> bool:
        return self.settings.evaluate and self.project.has_ground_truth and bool(self.project.test_cases)

    @property
    def scores(self) -> bool:
        return self.settings.score and (self.method.needs_model or (self.settings.predict_pool and self.settings.pool_prediction))

    @property
    def method(self):
        return get_method(self.settings.method)

    @property
    def score_maps(self) -> list[str]:
        """The maps the score job aggregates: the query method's, then ``extra_maps`` (each once)."""
        names = self.method.map_names(self.project.foreground_classes) + list(self.settings.extra_maps)
        return list(dict.fromkeys(names))

    @property
    def training_seed(self) -> int:
        """Base seed of the folds' training (each fold derives its own from it, the loop and the fold)."""
        s = self.settings
        return int(next(v for v in (s.training_seed, s.seed, self.project.settings.seed) if v is not None))

    def previous_model(self) -> tuple[Path | None, str]:
        """The model a warm start starts from, and how it was found (or why there is none). Decided once.

        Loop ``t`` starts from a finished model of loop ``t - 1`` with the same
        profile: the one whose scores queried loop ``t`` (its loop file says
        which), else the newest warm one, else the newest scratch one (a project
        switched to warm starts). None for loop 0 and for scratch models.
        """
        if self._previous is not None:
            return self._previous
        if self.settings.init != "warm":
            self._previous = (None, "scratch requested")
            return self._previous
        if self.loop == 0:
            self._previous = (None, "loop 0 has no previous loop")
            return self._previous
        root = self.paths.results_root
        prefixes = [f"loop_{self.loop - 1:03d}_{profile_tag(self.profile, init)}_" for init in ("warm", "scratch")]

        def finished(folder: Path) -> bool:
            return folder.is_dir() and any(folder.glob("fold_*/checkpoint_final.pth"))

        queried_by = self.project.read_loop(self.loop).info.get("model")
        if queried_by and any(Path(queried_by).name.startswith(p) for p in prefixes) and finished(root / Path(queried_by).name):
            self._previous = (root / Path(queried_by).name, "the model that queried this loop's boxes")
            return self._previous
        for prefix in prefixes:
            found = [f for f in root.glob(prefix + "*") if finished(f)] if root.is_dir() else []
            if found:
                newest = max(found, key=lambda f: max(p.stat().st_mtime_ns for p in f.glob("fold_*/checkpoint_final.pth")))
                self._previous = (newest, f"the newest finished {prefix}* model")
                return self._previous
        self._previous = (None, f"no finished model of loop {self.loop - 1} with profile {profile_tag(self.profile)} in {root}")
        return self._previous

    # --------------------------------------------------------------------- jobs
    def _job(self, suffix: str, kind: str, inputs: dict) -> Job:
        """The stage's job; one that is done or running is taken as it is.

        Its name already says what it computes (loop, profile, annotated boxes,
        fold); inputs that only say how to run (threads, device) may differ
        between runs (``al3d train --parallel 2``, then ``al3d score``).
        """
        name = f"{self.model_name}-{suffix}"
        existing = Job(self.jobs_dir / name)
        if existing.spec_path.is_file() and self.runner.refresh(existing).state in (JobState.DONE, JobState.RUNNING):
            return existing
        background = {"background": True} if self.settings.background else {}
        return Job.create(self.jobs_dir, name, kind, {"project": str(self.project.path), **inputs, **background}, env=self.env)

    def score_job_maps(self) -> list[str]:
        """The maps of the score job: those its existing job has, then ``score_maps`` (each once).

        A done score job serves any run whose maps it scored (a simulation's
        start scores for every method of its grid). A run that needs a map it
        did not score (``bald`` added to a folder first run with ``clasp_pe``)
        gets the job made again for the old maps and the new ones, so the
        score files it rewrites (atomically, each a file of its own) keep the
        maps other runs query. The old job's folder, log included, is set
        aside under ``jobs/.superseded/``.

        Decided once per pipeline: every later call (each poll) asks for the
        same job without reading its files again.
        """
        if self._score_job_maps is not None:
            return self._score_job_maps
        maps = self.score_maps
        job = Job(self.jobs_dir / f"{self.model_name}-score")
        if job.spec_path.is_file():
            had = [str(m) for m in job.spec().inputs.get("maps", [])]
            if self.runner.refresh(job).state == JobState.DONE and not set(maps) <= set(had):
                job.set_aside()  # bookkeeping only: the score files stay and are rescored in place
                self._submitted.discard(job.name)
            maps = list(dict.fromkeys(had + maps))
        self._score_job_maps = maps
        return maps

    def jobs(self, stage: str) -> list[Job]:
        """The jobs of a stage (created on first use; the folds once ``prepare`` is done)."""
        common = {
            "device": self.profile.device,
            "threads": self.threads,
            **({"fixed_threads": True} if self.settings.fixed_threads else {}),
        }
        if stage == "prepare":
            previous, _ = self.previous_model()
            stable = {"previous_splits": str(previous / "splits_final.json")} if previous is not None else {}
            return [
                self._job(
                    "prepare",
                    "nnunet_prepare",
                    {
                        "configuration": self.profile.configuration,
                        "folds": self.profile.folds,
                        "seed": self.project.settings.seed,
                        "threads": self.threads,
                        "model_folder": str(self.model_folder),
                        **stable,
                    },
                )
            ]
        if stage == "train":
            folds = self._prepared_folds()
            if folds is None:
                raise FileNotFoundError(f"{self.model_name}: prepare has not finished")
            warm = {}
            if self.settings.init == "warm":
                previous, how = self.previous_model()
                warm = {"init": "warm", "warm_from": None if previous is None else str(previous), "warm_note": how}
            return [
                self._job(
                    f"fold_{k}",
                    "nnunet_train",
                    {
                        "fold": k,
                        "profile": self.profile.to_json(),
                        "output": str(self.model_folder),
                        "seed": self.training_seed,
                        "loop": self.loop,
                        **warm,
                        **common,
                    },
                )
                for k in range(folds)
            ]
        if stage == "predict":
            jobs = []
            if self.evaluates:
                jobs.append(
                    self._job(
                        "evaluate",
                        "nnunet_evaluate",
                        {
                            "model": str(self.model_folder),
                            "output": str(self.evaluation_dir),
                            "mirroring": self.profile.evaluation_mirroring,
                            "summary_copy": str(self.evaluation_summary),
                            "extra": {"loop": self.loop, "profile": self.profile.name, "annotation_key": self.annotation_key},
                            **common,
                        },
                    )
                )
            if self.scores:
                scoring = ScoringSettings(
                    tuple(self.score_job_maps()),
                    self.scores_dir,
                    self.uncertainty_dir if self.settings.uncertainty_maps else None,
                    tuple(self.settings.stride) if self.settings.stride else None,  # type: ignore[arg-type]
                    self.pool_prediction_dir if self.settings.pool_prediction else None,
                )
                jobs.append(self._job("score", "nnunet_score", {"model": str(self.model_folder), **scoring.to_json(), **common}))
            return jobs
        raise ValueError(f"stage {stage!r} has no jobs")

    @property
    def predictions_dir(self) -> Path:
        return self.model_folder / "predictions"

    def prediction_job(self, cases: Sequence[str] | None = None) -> Job:
        """A job that segments ``cases`` (default: every case) with this loop's ensemble, for the final results."""
        return self._job(
            "predict_cases",
            "nnunet_predict",
            {
                "model": str(self.model_folder),
                "output": str(self.predictions_dir),
                "cases": list(cases) if cases else None,
                "mirroring": self.profile.evaluation_mirroring,
                "device": self.profile.device,
                "threads": self.threads,
            },
        )

    def all_jobs(self) -> list[Job]:
        """The jobs of this run's stages that exist so far (listing never creates a job of a stage not run)."""
        found = []
        for stage in ("prepare", "train", "predict"):
            if stage not in self.settings.stages:
                continue
            try:
                found += self.jobs(stage)
            except (FileNotFoundError, KeyError):
                break
        return found

    # ------------------------------------------------------------------ driving
    def advance(self) -> PipelineState:
        """Submit what the current stage still needs and report; never blocks."""
        self.runner.poll()
        done_weight = 0.0
        for stage in STAGES:
            if stage not in self.settings.stages:
                if stage in ("prepare", "train") and not self._stage_done(stage):
                    return self._state(
                        stage,
                        "failed",
                        done_weight,
                        f"{stage} has not been done for the current annotations ({self.model_name}); run `al3d train` first",
                    )
                done_weight += _WEIGHTS[stage]
                continue
            if stage == "query":
                return self._query()
            jobs = self.jobs(stage)
            statuses = [self.runner.refresh(job) for job in jobs]
            if all(s.state == JobState.DONE for s in statuses):
                done_weight += _WEIGHTS[stage]
                continue
            for job, status in zip(jobs, statuses):
                # queued ones start; failed and cancelled ones start again, once per pipeline run; running ones
                # (another driver's) are handed over too, so the runner counts them against its parallel limit
                if status.state != JobState.DONE and job.name not in self._submitted:
                    self._submitted.add(job.name)
                    self.runner.submit(job)
            self.runner.poll()
            statuses = [self.runner.refresh(job) for job in jobs]
            listed = [(job.name, s) for job, s in zip(jobs, statuses)]
            done = sum(1.0 if s.state == JobState.DONE else s.progress for s in statuses)
            fraction = done_weight + _WEIGHTS[stage] * done / len(jobs)
            bad = [(job, s) for job, s in zip(jobs, statuses) if s.state in (JobState.FAILED, JobState.CANCELLED)]
            if bad and all(s.final for s in statuses):
                job, status = bad[0]
                return PipelineState(stage, "failed", fraction, f"{job.name} {status.state}: {status.message}", listed)
            return PipelineState(stage, "running", fraction, "", listed)
        return self._state("done", "done", 1.0, f"model {self.model_folder}")

    def _prepared_folds(self) -> int | None:
        """The number of folds the prepare job made splits for (None until it has finished)."""
        result = self.jobs_dir / f"{self.model_name}-prepare" / "result.json"
        return int(read_json(result)["folds"]) if result.is_file() else None

    def _stage_done(self, stage: str) -> bool:
        """Whether the jobs of a stage this run does not do are done (looked up, never created)."""
        names = ["prepare"]
        if stage == "train":
            folds = self._prepared_folds()
            if folds is None:
                return False
            names = [f"fold_{k}" for k in range(folds)]
        jobs = [Job(self.jobs_dir / f"{self.model_name}-{n}") for n in names]
        return all(j.spec_path.is_file() and self.runner.refresh(j).state == JobState.DONE for j in jobs)

    def _state(self, stage: str, state: str, progress: float, message: str) -> PipelineState:
        return PipelineState(stage, state, progress, message, [(j.name, j.status()) for j in self.all_jobs()], self._loop_file)

    def _embeddings(self) -> PipelineState | None:
        """A query method that reads the pool embeddings: their stage's job first, through this runner, never
        blocking (None: ready, or not needed). The query then finds them cached."""
        if not self.method.needs_embeddings:
            return None
        if self._embedding_job is None:
            self._embedding_job = EmbeddingStage(self.project).job(self.runner)
            if self._embedding_job is None:
                return None
        job = self._embedding_job
        if job.name not in self._submitted:
            self._submitted.add(job.name)
            self.runner.submit(job)
        self.runner.poll()
        status = self.runner.refresh(job)
        if status.state == JobState.DONE:
            return None
        listed = [*self._state("query", "running", 1.0, "").jobs, (job.name, status)]
        if status.final:
            return PipelineState("query", "failed", 1.0, f"{job.name} {status.state}: {status.message}", listed)
        return PipelineState("query", "running", 1.0, "the pool embeddings for the query", listed)

    def _query(self) -> PipelineState:
        if self._loop_file is None:
            waiting = self._embeddings()
            if waiting is not None:
                return waiting
            info = {"model": str(self.model_folder), "profile": self.profile.name, "trained_on_loop": self.loop}
            if self.evaluates and self.evaluation_summary.is_file():
                info["test_mean_dice"] = read_json(self.evaluation_summary).get("mean_dice")
            s = self.settings
            self._loop_file = self._queried_by_another_driver()
            try:
                if self._loop_file is None:
                    self._loop_file = self.query(
                        s.method, s.count, s.seed, info=info, scores=self.scores_dir if self.method.needs_model else None
                    )
            except LoopConflict:
                self._loop_file = self._queried_by_another_driver()
                if self._loop_file is None:
                    raise
        return self._state(
            "done",
            "done",
            1.0,
            f"loop {self._loop_file.loop}: {len(self._loop_file.boxes)} boxes by "
            f"{self._loop_file.method} -> {self.project.loop_path(self._loop_file.loop)}",
        )

    def _queried_by_another_driver(self) -> LoopFile | None:
        """The next loop's file when another driver of this loop (a second `al3d loop`, the panel) wrote it first.

        Made from this model by this method, it is this run's result too; a loop
        file from anything else is not adopted (the query then fails plainly).
        """
        later = [t for t in self.project.loop_indices() if t > self.loop]
        if len(later) != 1:
            return None
        theirs = self.project.read_loop(later[0])
        mine = (self.settings.method, str(self.model_folder))
        return theirs if (theirs.method, theirs.info.get("model")) == mine else None

    def run(
        self, on_update: Callable[[PipelineState], None] | None = None, poll_seconds: float = 0.5, timeout: float | None = None
    ) -> PipelineState:
        """Advance until done or failed (the blocking use: command line, scripts, simulations)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.advance()
            if on_update is not None:
                on_update(state)
            if state.finished:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.model_name}: not finished after {timeout} s ({state.describe()})")
            time.sleep(poll_seconds)

    def cancel(self) -> list[Job]:
        """Cancel every job of this loop that has not ended (whole process trees)."""
        cancelled = []
        for job in self.all_jobs():
            if not self.runner.refresh(job).final:
                self.runner.cancel(job)
                cancelled.append(job)
        return cancelled
