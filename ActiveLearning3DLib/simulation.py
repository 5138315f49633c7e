"""Benchmark simulations with the nnActive protocol: the loop a radiologist runs, with an oracle as the annotator.

A simulation runs every query method with every seed for ``loops`` loops on one
dataset, through the same :class:`~.logic.ActiveLearningLogic` and
:class:`~.pipeline.LoopPipeline` the GUI uses; the oracle copies the ground
truth into each queried box. The protocol (docs/METHODS.md sections 5 to 7):

- one 75 / 25 pool / test split for every method and seed (split seed fixed);
- the starting budget (loop 0, ``nnactive_start`` by default) is made once per
  seed and shared by all methods of that seed, together with its trained
  model (so loop 0's Dice is the same for all methods of a seed) and its pool
  scores (one scoring pass, beside the evaluation, for every method that needs
  a model);
- query size = starting budget = 20 % of the budget; ``loops`` loops;
- each loop records boxes, annotated voxels, the fraction of all pool
  foreground inside annotated boxes, Mean Dice and per-class Dice on the test
  split, and the wall time of each stage;
- a full-data reference (the same profile trained on every pool label) is
  made once per dataset, split and profile and cached, for FG-Eff.

The grid runs through one job runner (``parallel`` jobs at a time, from any
runs), and everything is on disk: a killed simulation, run again with the same
output folder, resumes where it stopped. Layout of ``OUT``::

    simulation.json                    settings, budget, versions (written first)
    base/                              the project every run copies (split fixed)
    seed_<s>/start/                    loop 0 of seed s, annotated, and its model
    seed_<s>/<method>/                 the project of one run (a copy of start; images hard-linked)
    results/<method>/seed_<s>/loop_<t>.json   one record per finished loop
    reference/<key>/                   full-data project and model (or --reference-cache)

Each record also holds its loop's boxes (``loop_file``) and, once queried, the
next loop's (``next_loop_file``). So the records alone (``restore_from``, e.g.
the copies committed under ``benchmarks/``) let a fresh machine rebuild a run
up to its last queried loop without training the loops before it again: the
oracle annotates the recorded boxes and training starts at the first loop
without a record. Only a run's next model is needed to go on, never an old one.
The records are :class:`~.loop_records.LoopRecord` in a
:class:`~.loop_records.LoopRecordStore`; rebuilding and backfilling them lives
in :mod:`~.simulation_restore`. A :class:`Simulation` touches no file until
:meth:`Simulation.prepare` (which :meth:`Simulation.run` calls).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .boxes import Box
from .fileio import atomic_copy, atomic_write_json, read_json
from .jobs import Job, JobState, RunnerSettings, busy_seconds, make_runner
from .logic import ActiveLearningLogic
from .loop_records import EffortTotals, LoopRecord, LoopRecordStore
from .nnunet.determinism import model_determinism
from .pipeline import DEFAULT_INIT, LoopPipeline, LoopSettings, auto_profile, check_init, default_job_parallel, profile_tag
from .prefill import effort_totals
from .project import BoxRecord, BudgetSettings, LoopFile, Project, ProjectError, now_iso
from .query_methods import get_method
from .query_methods.base import no_progress
from .simulation_restore import backfill, check_restore_header, restore_reference, restore_run, training_differences

# nnActive's budgets (docs/METHODS.md section 7): query patch -> low / medium / high, in boxes
NNACTIVE_BUDGETS: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (20, 20, 20): (100, 200, 300),  # Hippocampus
    (4, 40, 40): (150, 300, 450),  # ACDC
    (64, 64, 64): (200, 1000, 2500),  # KiTS
    (32, 74, 74): (200, 1000, 2500),  # AMOS
}
# For other patch sizes: the low budget's boxes cover this share of all pool voxels; medium twice, high three
# times as much. 6.5 % is what nnActive's low Hippocampus budget covers (100 boxes of 20^3 in a 195-image pool
# of 12.3 million voxels), the one dataset of the table with small images; at least 5 boxes.
LOW_BUDGET_VOXEL_SHARE = 0.065
BUDGET_LEVELS = ("low", "medium", "high")
SPLIT_SEED = 0


def resolve_budget(budget: str | int, patch_size: tuple[int, int, int], pool_voxels: int) -> tuple[int, str]:
    """Boxes in the whole budget, and how the number was found."""
    if isinstance(budget, int) or str(budget).isdigit():
        n = int(budget)
        if n < 5:
            raise ValueError(f"a budget must be at least 5 boxes (20 % of it per loop), got {n}")
        return n, "given"
    if budget not in BUDGET_LEVELS:
        raise ValueError(f"budget must be low, medium, high or a number of boxes, got {budget!r}")
    level = BUDGET_LEVELS.index(budget)
    if tuple(patch_size) in NNACTIVE_BUDGETS:
        return NNACTIVE_BUDGETS[tuple(patch_size)][level], f"nnActive table for patch {list(patch_size)}"
    box = int(np.prod(patch_size))
    n = max(5, int(round((level + 1) * LOW_BUDGET_VOXEL_SHARE * pool_voxels / box / 5)) * 5)
    return n, (f"rule: {budget} = {level + 1} x {100 * LOW_BUDGET_VOXEL_SHARE:.1f} % of the pool's voxels in boxes, rounded to 5")


@dataclass
class SimulationSettings:
    """One simulation grid: methods x seeds on one dataset."""

    images: Path
    labels: Path
    methods: tuple[str, ...]
    out: Path
    budget: str | int = "low"
    loops: int = 5
    seeds: tuple[int, ...] = (0,)
    patch_size: tuple[int, int, int] | None = None
    profile: str = "auto"
    device: str = "auto"
    folds: int | None = None
    parallel: int | None = None
    start: str = "nnactive_start"
    test_fraction: float = 0.25
    max_cases: int | None = None
    reference: bool = True  # the full-data run for FG-Eff
    reference_cache: Path | None = None  # share reference runs between simulations (default OUT/reference)
    python: str | None = None
    reductions: tuple[str, ...] = ()  # what a reduced run (the demo) changed against the protocol, for the report
    restore_from: Path | None = None  # records of an earlier run of this simulation (with their boxes) to rebuild from
    prefill: bool = True  # every model predicts the pool, so each box records its corrections against the pre-fill
    training_seed: int | None = None  # base seed of every training; None: each run's seed (the reference: its project's, 0)
    runner: RunnerSettings | None = None  # which backend runs the jobs (default: local); not part of the records
    init: str = DEFAULT_INIT  # "warm": loops after 0 start from the previous loop's members (LoopSettings.init)
    warm_fraction: float | None = None  # the warm schedule (TrainingProfile.warm_fraction); None: the profile's
    warm_initial_lr: float | None = None  # its starting learning rate (TrainingProfile.warm_initial_lr)

    def __post_init__(self) -> None:
        self.images, self.labels, self.out = Path(self.images), Path(self.labels), Path(self.out).absolute()
        self.methods = tuple(self.methods)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.methods:
            raise ValueError("give at least one query method")
        for m in (*self.methods, self.start):
            get_method(m)  # unknown names fail here, with the list of known ones
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("methods and seeds must not repeat")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed (e.g. 0,1,2)")
        if min(self.seeds) < 0:
            raise ValueError(f"seeds: must be non-negative, got {list(self.seeds)}")
        if self.training_seed is not None and (
            isinstance(self.training_seed, bool) or not isinstance(self.training_seed, int) or self.training_seed < 0
        ):
            raise ValueError(f"training_seed: expected a non-negative whole number, got {self.training_seed!r}")
        for name in ("loops", "folds", "parallel", "max_cases"):
            value = getattr(self, name)
            if (value is not None or name == "loops") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a whole number of at least 1, got {value!r}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(int(v) for v in self.patch_size) < 1):
            raise ValueError(f"patch_size: expected three positive whole numbers (Z Y X), got {list(self.patch_size)}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction: must be in [0, 1), got {self.test_fraction}")
        resolve_budget(self.budget, (1, 1, 1), 1)  # low/medium/high or a number of boxes: refused now, not after the reference
        check_init(self.init)
        if self.init != "warm" and (self.warm_fraction, self.warm_initial_lr) != (None, None):
            raise ValueError("warm_fraction and warm_initial_lr change warm starts only: give them with init 'warm'")
        if self.warm_fraction is not None and not 0 < self.warm_fraction <= 1:
            raise ValueError(f"warm_fraction: expected a share of the epochs in (0, 1], got {self.warm_fraction!r}")
        if self.warm_initial_lr is not None and not self.warm_initial_lr > 0:
            raise ValueError(f"warm_initial_lr: expected a positive learning rate, got {self.warm_initial_lr!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("runner")  # how the jobs ran, not what they computed: a grid through Slurm records what a local one does
        for key in ("images", "labels", "out", "reference_cache", "restore_from"):
            d[key] = None if d[key] is None else str(d[key])
        return d


def versions() -> dict:
    found = {"activelearning3d": __version__}
    for package in ("nnunetv2", "torch", "numpy", "SimpleITK"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def stage_seconds(pipeline: LoopPipeline) -> dict[str, float | None]:
    """Wall time of each stage of a loop: the time during which any attempt at one of its jobs ran (parallel folds
    count once, a fold's attempt cut short by the end of a session does count, the pause before its resumption
    not at all)."""
    out: dict[str, float | None] = {}
    jobs = {j.name.rsplit("-", 1)[-1]: j.status() for j in pipeline.all_jobs()}
    groups = {
        "prepare": ["prepare"],
        "train": [n for n in jobs if n.startswith("fold_")],
        "evaluate": ["evaluate"],
        "score": ["score"],
    }
    for stage, names in groups.items():
        statuses = [jobs[n] for n in names if n in jobs and jobs[n].state == JobState.DONE]
        if statuses:
            out[stage] = busy_seconds(a for s in statuses for a in s.attempts())
    return out


# What a project only ever replaces whole (written beside, then ``os.replace``), never rewrites in place: its
# copies of the images and the ground truth, nnU-Net's preprocessed cases, a model's checkpoints
# (``nnUNetTrainerPartial.save_checkpoint``) and its pool scores and uncertainty images. Copies of a project share
# these files as hard links, so a grid of runs does not hold one copy of a large dataset (or of the loop-0 model
# and scores) per method and seed; a run that preprocesses, trains or scores again replaces its own link and
# leaves the other runs' file as it was.
_SHARED_FOLDERS = ("imagesTr", "imagesTs", "groundtruth")
_SHARED_PREPROCESSED = (".b2nd", ".pkl")
_SHARED_MODEL_OUTPUTS = ("scores", "uncertainty", "pool_prediction")


def _shares(relative: Path) -> bool:
    parts = relative.parts
    if parts[0] in _SHARED_FOLDERS:
        return True
    if parts[:2] == ("nnunet", "preprocessed"):
        return relative.name.endswith(_SHARED_PREPROCESSED)
    if parts[:2] == ("nnunet", "results") and len(parts) == 5:  # results / model / fold_<k>, scores, uncertainty / file
        return parts[3] in _SHARED_MODEL_OUTPUTS or (parts[3].startswith("fold_") and relative.suffix == ".pth")
    return False


def _copy_project(source: Path, target: Path) -> None:
    """Copy a project folder (with its nnU-Net state and jobs) atomically: a temporary folder renamed at the end.

    Files that are only ever replaced whole are hard-linked (copied where the file system cannot link).
    """
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.copying"
    shutil.rmtree(staging, ignore_errors=True)

    def link_or_copy(src: str, dst: str) -> str:
        if _shares(Path(src).relative_to(source)):
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass  # another file system, or one without hard links
        return shutil.copy2(src, dst)

    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("log.txt", ".al3d-tmp-*"), copy_function=link_or_copy)
    staging.rename(target)


def shared_scoring(methods: Iterable[str], foreground_classes: Iterable[int], predict_pool: bool = False) -> dict:
    """Loop settings that score the pool once with a seed's shared loop-0 model, beside its evaluation, with the
    maps of every method that needs a model: each run's copy then finds its loop-0 scores done.

    With ``predict_pool`` a grid of methods that need no model still scores
    it, for the predicted labels alone (the pre-fill of loop 1's boxes)."""
    methods = list(methods)
    needing = [m for m in methods if get_method(m).needs_model]
    if not needing:
        return {"score": True, "method": methods[0]} if predict_pool and methods else {"score": False}
    classes = list(foreground_classes)
    extra = tuple(n for m in needing[1:] for n in get_method(m).map_names(classes))
    return {"score": True, "method": needing[0], "extra_maps": extra}


def model_training(model_folder: Path | str) -> dict:
    """How a model's folds were trained, from their summaries: init (warm / scratch / mixed), per fold how and
    why, and the training iterations of all folds together (the compute a warm start saves)."""
    folds = {}
    iterations = 0
    for path in sorted(Path(model_folder).glob("fold_*/al3d_summary.json")):
        summary = read_json(path)
        start = summary.get("init") or {"init": "scratch", "reason": "not recorded"}
        folds[path.parent.name] = {"init": start.get("init"), "reason": start.get("reason"), "epochs": summary.get("epochs")}
        iterations += int(summary.get("epochs") or 0) * int(summary.get("iterations_per_epoch") or 0)
    kinds = sorted({f["init"] for f in folds.values()})
    return {"init": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else None), "folds": folds, "iterations": iterations}


@dataclass
class SimulationPlan:
    """What :meth:`Simulation.prepare` found on disk: the base project, the budget and the header it wrote."""

    base: Project
    budget: int  # boxes in a run's whole budget
    budget_rule: str  # how that number was found
    query_size: int  # boxes per loop
    header: dict  # simulation.json as written


class Simulation:
    """Runs (or resumes) a simulation grid; :meth:`run` blocks, :meth:`step` advances everything once."""

    def __init__(
        self,
        settings: SimulationSettings,
        echo: Callable[[str], None] = lambda s: None,
        progress: Callable[[Iterable, str], Iterable] = no_progress,
    ):
        """What the settings decide alone (profile, parallel jobs, loop settings, runner): no file is read or
        written here. :meth:`prepare` (which :meth:`run` and :meth:`step` call) makes the base project, the budget
        and the header."""
        self.settings = settings
        self.echo = echo
        self.progress = progress
        s = settings
        self.out = s.out
        self.records = LoopRecordStore(s.out)
        self.profile_name = auto_profile(s.device) if s.profile == "auto" else s.profile
        self.parallel = s.parallel or default_job_parallel(s.device)
        warm_schedule = (s.warm_fraction, s.warm_initial_lr) != (None, None)  # the profile with it, else its name
        self.loop_settings = LoopSettings(
            profile=self.loop_settings_profile() if warm_schedule else self.profile_name,
            folds=s.folds,
            device=s.device,
            parallel=self.parallel,
            python=s.python,
            predict_pool=s.prefill,
            training_seed=s.training_seed,
            fixed_threads=True,  # records reproducible
            init=s.init,
        )
        self.runner = make_runner((s.runner or RunnerSettings()).with_defaults(python=s.python, max_parallel=self.parallel))
        self.runs = [(m, seed) for seed in s.seeds for m in s.methods]
        self._plan: SimulationPlan | None = None
        self._pipelines: dict[object, LoopPipeline] = {}
        self.failed: dict[str, str] = {}
        self._checked: set[tuple[str, int]] = set()  # runs whose records were backfilled / restored this session
        self._adopted = False  # live jobs of an earlier driver handed to the runner (first step)

    def prepare(self) -> "Simulation":
        """Make (or open) the base project, resolve the budget, write the header, compute the pool embeddings the
        methods need and check the records to restore from; once per session (later calls return at once).

        Raises ProjectError where the data, the folder or the records do not fit these settings."""
        if self._plan is not None:
            return self
        s = self.settings
        base = self._base_project()
        if not base.test_cases or not base.has_ground_truth:
            raise ProjectError(f"{s.images}: a simulation needs ground truth and a test split (test fraction > 0)")
        pool_voxels = sum(int(np.prod(base.cases[c].shape)) for c in base.pool_cases)
        budget, budget_rule = resolve_budget(s.budget, base.patch_size, pool_voxels)
        plan = SimulationPlan(base, budget, budget_rule, max(1, int(round(0.2 * budget))), {})
        self._plan = plan
        try:
            plan.header.update(self._write_header())
            if get_method(s.start).needs_embeddings or any(get_method(m).needs_embeddings for m in s.methods):
                # once, in the base project: every seed's copy then finds them cached (they need no labels)
                self.echo("pool embeddings for the label-free methods (the autoencoder job, cached in the base project)")
                ActiveLearningLogic(base).pool_embeddings(runner=self.runner)
            if s.restore_from is not None:
                check_restore_header(Path(s.restore_from), plan.header, s)
                if s.reference:
                    restore_reference(Path(s.restore_from), self.reference_dir() / "reference.json")
        except BaseException:
            self._plan = None  # prepared only once every step has passed
            raise
        return self

    def _prepared(self) -> "SimulationPlan":
        if self._plan is None:
            raise RuntimeError("Simulation.prepare() has not run: the base project, budget and header are not known yet")
        return self._plan

    @property
    def base(self) -> Project:
        return self._prepared().base

    @property
    def budget(self) -> int:
        """Boxes in the whole budget of a run."""
        return self._prepared().budget

    @property
    def budget_rule(self) -> str:
        return self._prepared().budget_rule

    @property
    def query_size(self) -> int:
        """Boxes per loop (20 % of the budget; the starting budget too)."""
        return self._prepared().query_size

    @property
    def header(self) -> dict:
        """simulation.json as a reader of the file sees it (lists, string keys)."""
        return self._prepared().header

    # ----------------------------------------------------------------- set-up
    def _base_project(self) -> Project:
        s = self.settings
        path = self.out / "base"
        if (path / "project.json").is_file():
            project = Project.open(path)
            project.plan_loops(s.loops)  # its copies (starts, runs) plan as many loops as this simulation
            return project
        self.out.mkdir(parents=True, exist_ok=True)
        self.echo(f"creating the base project from {s.images}")
        return Project.create(
            path,
            s.images,
            s.labels,
            patch_size=s.patch_size,
            test_fraction=s.test_fraction,
            seed=SPLIT_SEED,
            max_cases=s.max_cases,
            budget=BudgetSettings(loops=s.loops),
            progress=self.progress,
        )

    def _write_header(self) -> dict:
        path = self.out / "simulation.json"
        profile = self.loop_settings_profile()
        header = {
            "settings": self.settings.to_json(),
            "profile": profile.to_json(),
            "profile_tag": profile_tag(profile),
            "budget": self.budget,
            "budget_rule": self.budget_rule,
            "query_size": self.query_size,
            "patch_size": list(self.base.patch_size),
            "pool_cases": len(self.base.pool_cases),
            "test_cases": len(self.base.test_cases),
            "classes": {str(k): v for k, v in self.base.classes.items()},
            "pool_foreground_voxels": self.base.pool_foreground_voxels,
            "split_seed": SPLIT_SEED,
            "reference_dir": str(self.reference_dir()) if self.settings.reference else None,
            "versions": versions(),
        }
        if path.is_file():
            old = read_json(path)
            if old.get("settings", {}).get("methods") is not None:
                header["created"] = old.get("created")
                for key in ("budget", "query_size", "patch_size", "pool_cases"):
                    if old.get(key) != json.loads(json.dumps(header[key])):
                        raise ProjectError(
                            f"{path}: this folder holds a simulation with {key} {old.get(key)}; "
                            f"the new settings give {header[key]}. Use another --out"
                        )
                for key, was, now in training_differences(old, self.settings)[:1]:  # records of both would mix
                    option = "--" + key.replace("_", "-")
                    raise ProjectError(
                        f"{path}: this folder holds a simulation with {option} {was}; use another --out for {option} {now}"
                    )
                _cover(header, old)
        header.setdefault("created", now_iso())
        header["updated"] = now_iso()
        atomic_write_json(path, header)
        return json.loads(json.dumps(header))  # as a reader of the file sees it (lists, string keys)

    def loop_settings_profile(self):
        from .nnunet.profiles import resolve_profile

        return resolve_profile(
            self.profile_name,
            folds=self.settings.folds,
            device=self.settings.device,
            warm_fraction=self.settings.warm_fraction,
            warm_initial_lr=self.settings.warm_initial_lr,
        )

    def reference_profile(self):
        """The full-data run's profile: the loops' without the warm schedule (one loop trains from scratch), so a
        warm grid shares its reference with the scratch grids of the same profile."""
        return dataclasses.replace(self.loop_settings_profile(), warm_fraction=None, warm_initial_lr=None)

    # ------------------------------------------------------------------ paths
    def start_dir(self, seed: int) -> Path:
        return self.out / f"seed_{seed}" / "start"

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / f"seed_{seed}" / method

    def record_path(self, method: str, seed: int, loop: int) -> Path:
        return self.records.path(method, seed, loop)

    def reference_dir(self) -> Path:
        base = self.base
        key_source = {
            "cases": sorted(base.cases),
            "split": {c: base.cases[c].split for c in sorted(base.cases)},
            "shapes": {c: list(base.cases[c].shape) for c in sorted(base.cases)},
            "profile": self.reference_profile().to_json(),
        }
        key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:10]
        root = self.settings.reference_cache or (self.out / "reference")
        return Path(root) / f"{profile_tag(self.reference_profile())}_{key}"

    # -------------------------------------------------------------- the steps
    def _pipeline(self, key, logic: ActiveLearningLogic, **changes) -> LoopPipeline:
        """One pipeline per (run, loop), made once and kept (it remembers which failed jobs it retried)."""
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            settings = dataclasses.replace(self.loop_settings, **changes)
            pipeline = logic.loop_pipeline(settings, self.runner)
            self._pipelines[key] = pipeline
        return pipeline

    def _open(self, path: Path) -> ActiveLearningLogic:
        """A run's project, planned for this simulation's loops (a folder of ``--loops 1`` may be extended)."""
        logic = ActiveLearningLogic.open(path)
        logic.project.plan_loops(self.settings.loops)
        return logic

    def _copy_base(self, path: Path) -> ActiveLearningLogic:
        """A new copy of the base project at ``path``, opened (a restore rebuilds a run into it)."""
        _copy_project(self.out / "base", path)
        return self._open(path)

    def _loop0_logic(self, path: Path, make_loop0: Callable[[ActiveLearningLogic], None]) -> ActiveLearningLogic:
        """A copy of the base project at ``path`` whose loop 0 (made by ``make_loop0``) the oracle has annotated."""
        if not (path / "project.json").is_file():
            _copy_project(self.out / "base", path)
        logic = self._open(path)
        if not logic.project.loop_indices():
            make_loop0(logic)
        if logic.pending_boxes():
            logic.annotate_with_oracle()
        return logic

    def _start_step(self, seed: int) -> bool:
        """Loop 0 of a seed: starting budget, oracle, loop-0 model, its evaluation and pool scores. True when done."""

        def starting_budget(logic: ActiveLearningLogic) -> None:
            loop = logic.query(self.settings.start, self.query_size, seed)
            self.echo(f"seed {seed}: starting budget of {len(loop.boxes)} boxes by {self.settings.start}")

        logic = self._loop0_logic(self.start_dir(seed), starting_budget)
        state = self._pipeline(
            ("start", seed),
            logic,
            stages=("prepare", "train", "predict"),
            seed=seed,
            **shared_scoring(self.settings.methods, logic.project.foreground_classes, self.settings.prefill),
        ).advance()
        return self._check(state, f"seed {seed} start")

    def _check(self, state, what: str) -> bool:
        if state.state == "failed":
            self.failed[what] = state.message
            return False
        return state.state == "done"

    def _run_step(self, method: str, seed: int) -> bool:
        """Advance one run by what can be done now; True when all its loops are recorded (or it failed).

        Per loop: train, evaluate and score (one pipeline), write the loop's
        record, then query the next loop (a second pipeline, stage ``query``) and
        let the oracle annotate it. The record is written before the query, so a
        run killed anywhere resumes without losing a loop's figures.
        """
        key = f"{method} seed {seed}"
        if key in self.failed:
            return True
        last = self.settings.loops - 1
        if (method, seed) not in self._checked:
            self._checked.add((method, seed))
            path = self.run_dir(method, seed)
            if self.settings.restore_from is not None and not (path / "project.json").is_file():
                restore_run(
                    Path(self.settings.restore_from),
                    self.records,
                    method,
                    seed,
                    self.settings.loops,
                    path,
                    self._copy_base,
                    self.progress,
                    self.echo,
                )
            if (path / "project.json").is_file():
                backfill(self.records, method, seed, self._open(path).project)
        if self.records.exists(method, seed, last):
            return True
        path = self.run_dir(method, seed)
        if not (path / "project.json").is_file():
            if not self._start_step(seed):
                return f"seed {seed} start" in self.failed
            _copy_project(self.start_dir(seed), path)
        logic = self._open(path)
        if logic.pending_boxes():
            t = time.perf_counter()
            logic.annotate_with_oracle()
            self.records.update(method, seed, logic.project.loop_indices()[-1] - 1, seconds={"oracle": time.perf_counter() - t})
        loop = logic.project.loop_indices()[-1]
        common = {"method": method, "seed": seed, "count": self.query_size}
        if not self.records.exists(method, seed, loop):
            pipeline = self._pipeline(
                (method, seed, loop), logic, stages=("prepare", "train", "predict"), score=loop < last, **common
            )  # the last loop's scores would not be used
            state = pipeline.advance()
            if state.state == "failed":
                return self._fail(key, loop, state.message)
            if state.state != "done":
                return False
            self._record(method, seed, loop, logic, pipeline)
        if loop >= last:
            return True
        state = self._pipeline((method, seed, loop, "query"), logic, stages=("query",), **common).advance()
        if state.state == "failed":
            return self._fail(key, loop, state.message)
        if state.loop_file is not None:
            self.records.update(
                method,
                seed,
                loop,
                seconds={"query": state.loop_file.info.get("seconds")},
                next_loop_file=state.loop_file.to_json(),
            )
        return False  # the oracle annotates the new loop at the next step

    def _fail(self, key: str, loop: int, message: str) -> bool:
        self.failed[key] = f"loop {loop}: {message}"
        self.echo(f"{key}: failed in loop {loop}: {message.splitlines()[0] if message else ''}")
        return True

    def _record(self, method: str, seed: int, loop: int, logic: ActiveLearningLogic, pipeline: LoopPipeline) -> None:
        if self.records.exists(method, seed, loop):
            return
        project = logic.project
        loop_file = project.read_loop(loop)
        boxes, voxels, inside = project.annotated_foreground()[loop]
        summary = read_json(pipeline.evaluation_summary)
        record = LoopRecord(
            method=method,
            seed=seed,
            loop=loop,
            boxes=boxes,
            annotated_voxels=voxels,
            foreground_voxels=inside,
            foreground_fraction=inside / project.pool_foreground_voxels,
            mean_dice=summary["mean_dice"],
            per_class=summary["per_class"],
            model=pipeline.model_name,
            seconds=stage_seconds(pipeline),
            loop_method=loop_file.method,
            written=now_iso(),
            loop_file=loop_file.to_json(),
            effort=EffortTotals(**effort_totals(loop_file.boxes)),  # the oracle's labels against the pre-fill, box by box
            determinism=model_determinism(pipeline.model_folder),  # reproducible bit for bit, and why (not)
            training=model_training(pipeline.model_folder),  # warm or scratch per fold, iterations
        )
        self.records.write(record)
        dice = "n/a" if record.mean_dice is None else f"{record.mean_dice:.4f}"
        self.echo(
            f"{method} seed {seed} loop {loop}: {boxes} boxes, {100 * record.foreground_fraction:.2f} % of "
            f"pool foreground, test Mean Dice {dice}"
        )

    def _reference_step(self) -> bool:
        """The full-data run: every pool image annotated whole, the same profile; its Mean Dice is y_full."""
        root = self.reference_dir()
        result = root / "reference.json"
        if result.is_file():
            return True

        def whole_images(logic: ActiveLearningLogic) -> None:
            project = logic.project
            boxes = [
                BoxRecord(Box(c, (0, 0, 0), tuple(project.cases[c].shape)), 0, i, "full_data")
                for i, c in enumerate(sorted(project.pool_cases))
            ]
            project.write_loop(LoopFile(0, "full_data", None, now_iso(), boxes, {"reference": True}))

        logic = self._loop0_logic(root / "project", whole_images)
        pipeline = self._pipeline(
            "reference",
            logic,
            stages=("prepare", "train", "predict"),
            score=False,
            background=True,  # it fills idle slots; the runs' loops go first
            init="scratch",
        )  # one loop: nothing to start from (shared with scratch simulations)
        state = pipeline.advance()
        if state.state == "failed":
            self.failed["reference"] = state.message
            return True
        if state.state != "done":
            return False
        summary = read_json(pipeline.evaluation_summary)
        atomic_write_json(
            result,
            {
                "mean_dice": summary["mean_dice"],
                "per_class": summary["per_class"],
                "model": pipeline.model_name,
                "profile": self.reference_profile().to_json(),
                "determinism": model_determinism(pipeline.model_folder),
                "seconds": stage_seconds(pipeline),
                "written": now_iso(),
            },
        )
        self.echo(f"full-data reference: test Mean Dice {summary['mean_dice']}")
        return True

    def adopt_live_jobs(self) -> list[Job]:
        """Hand the runner every job of this simulation whose worker is still alive; returns them.

        A driver restarted while folds train finds them through their files, and
        the runner counts an adopted job against its slots, but only once it has
        seen it. Without this pass, the first runs of the grid would start new
        jobs before a later run hands over its live ones, and the cores would be
        oversubscribed until those end.
        """
        folders = [
            *self.out.glob("seed_*/*/jobs/*"),
            *(self.out / "base" / "jobs").glob("*"),
            *(self.reference_dir() / "project" / "jobs").glob("*"),
        ]
        # a worker that died is marked failed on the way, not adopted
        return [job for job in (Job(f) for f in sorted(folders) if (f / "status.json").is_file()) if self.runner.adopt(job)]

    def step(self) -> bool:
        """Advance every run (and the reference) once; True when everything has finished or failed."""
        self.prepare()
        if not self._adopted:
            self.adopt_live_jobs()
            self._adopted = True
        finished = [self._run_step(m, seed) for m, seed in self.runs]
        if self.settings.reference:
            finished.append(self._reference_step())
        self.runner.poll()
        return all(finished)

    def run(self, poll_seconds: float = 1.0, on_step: Callable[["Simulation"], None] | None = None) -> dict:
        """Run until every run and the reference are done; returns the collected results."""
        self.prepare()
        started = time.perf_counter()
        while not self.step():
            if on_step is not None:
                on_step(self)
            time.sleep(poll_seconds)
        results = collect_results(self.out)
        results["seconds_this_session"] = round(time.perf_counter() - started, 1)
        results["failed"] = dict(self.failed)
        return results

    def cancel(self) -> None:
        self.runner.cancel_all()

    def describe(self) -> str:
        """One line per active job: what the grid is doing now."""
        lines = []
        for job in self.runner.active():
            s = job.status()
            lines.append(
                f"{job.path.parents[1].parent.name}/{job.path.parents[1].name} {job.name.rsplit('-', 1)[-1]}: "
                f"{s.state} {100 * s.progress:.0f}% {s.message.splitlines()[0] if s.message else ''}".rstrip()
            )
        return "\n".join(lines)


def _cover(header: dict, old: dict) -> None:
    """Let ``header`` list the methods and seeds that ``old`` (the folder's earlier header) lists as well: a folder's
    header names every run whose records it holds."""
    settings, before = header["settings"], old.get("settings") or {}
    settings["methods"] = list(dict.fromkeys([*(before.get("methods") or []), *settings["methods"]]))
    settings["seeds"] = sorted(set(before.get("seeds") or []) | set(settings["seeds"]))


BOOKKEEPING = ("created", "updated")  # header keys (and settings.restore_from) that change with every session


def _export_header(header: dict, path: Path) -> dict | None:
    """The header to write to an export target ``path``: the run's, covering the methods and seeds the target lists
    already and keeping its creation date; None where that differs from the target's only in bookkeeping, so that a
    committed header is not rewritten by every session that restores from it."""
    if not path.is_file():
        return header
    old = read_json(path)
    merged = json.loads(json.dumps(header))
    _cover(merged, old)
    merged["created"] = old.get("created", merged.get("created"))

    def essence(h: dict) -> dict:
        return {
            **{k: v for k, v in h.items() if k not in BOOKKEEPING},
            "settings": {k: v for k, v in (h.get("settings") or {}).items() if k != "restore_from"},
        }

    return None if essence(merged) == essence(old) else merged


def _read_header(out: Path) -> dict:
    path = out / "simulation.json"
    if not path.is_file():
        raise ProjectError(f"{out}: not a simulation folder (no simulation.json)")
    return read_json(path)


def _reference_summaries(out: Path, header: dict) -> list[Path]:
    """Where the full-data result may be: the header's reference folder (its own or a shared cache), then a copy
    beside the records (benchmarks/results/...)."""
    candidates = [Path(header["reference_dir"]) / "reference.json"] if header.get("reference_dir") else []
    candidates.append(out / "reference.json")
    return [p for p in candidates if p.is_file()]


def read_reference(out: Path | str, header: dict) -> dict | None:
    """The full-data result of a simulation folder (its reference folder's, else a copy beside the records), or None."""
    found = _reference_summaries(Path(out), header)
    return read_json(found[0]) if found else None


def collect_results(out: Path | str) -> dict:
    """Header, per-loop records (as JSON: a run's results are printed and compared) and reference of one simulation
    folder; typed records come from :class:`~.loop_records.LoopRecordStore`."""
    out = Path(out)
    header = _read_header(out)
    records = [read_json(p) for p in LoopRecordStore(out).paths()]
    return {"run_dir": str(out), "header": header, "records": records, "reference": read_reference(out, header)}


def _restored_from(record: Path) -> Path | None:
    """The folder a loop record was restored from (None: it was run here)."""
    source = read_json(record).get("restored_from")
    return Path(source).resolve() if source else None


def export_records(out: Path | str, target: Path | str) -> int:
    """Copy what rebuilds and reports a simulation elsewhere: header, per-loop records (with their boxes) and the
    full-data result, wherever it ran (a shared ``--reference-cache`` too). Returns the number of records.

    Atomic copies: the targets are often committed files, and an export killed midway must not truncate one.
    """
    out, target = Path(out), Path(target)
    header = _read_header(out)
    target.mkdir(parents=True, exist_ok=True)
    exported = _export_header(header, target / "simulation.json")
    if exported is not None:
        atomic_write_json(target / "simulation.json", exported)
    records = LoopRecordStore(out).paths()
    for path in records:
        dest = target / "results" / path.relative_to(out / "results")
        if dest.is_file() and _restored_from(path) == target.resolve():
            continue  # the original this loop was rebuilt from: it stays as it was recorded
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_copy(path, dest)
    found = [p for p in _reference_summaries(out, header) if p != target / "reference.json"]
    if found:
        atomic_copy(found[0], target / "reference.json")
    return len(records)


DEMO_METHODS = ("random", "random_fg66", "clasp_pe")
DEMO_MAX_CASES = 64
DEMO_PROFILE = "quick"


def demo_settings(data, out: Path | str, max_cases: int | None = None) -> SimulationSettings:
    """The main job: ``random``, ``random_fg66`` and ``clasp_pe``, one seed, 3 loops, reduced to fit 20 minutes."""
    from .nnunet.profiles import PROFILES

    cases = max_cases or DEMO_MAX_CASES
    return SimulationSettings(
        images=data.images,
        labels=data.labels,
        methods=DEMO_METHODS,
        out=Path(out),
        budget="low",
        loops=3,
        seeds=(0,),
        profile=DEMO_PROFILE,
        device="cpu",
        init="warm",
        max_cases=cases,
        parallel=max(2, default_job_parallel("cpu")),
        reductions=(
            f"the first {cases} cases of {data.name} instead of all (75 / 25 split of those)",
            "3 loops instead of 5 (query size stays 20 % of the low budget)",
            "one seed instead of 4",
            "two jobs at a time with one torch thread each",
            f"training profile '{DEMO_PROFILE}': {PROFILES[DEMO_PROFILE].description} (the study: 3d_fullres, "
            "5 folds x 200 epochs x 250 iterations)",
            "loops after the first warm-started from the previous loop's members (--init warm; the study "
            "trains every loop from scratch; the full-data reference trains from scratch)",
        ),
    )
