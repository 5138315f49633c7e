"""``al3d``: the command line of ActiveLearning3D (the same logic the Slicer module uses)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from . import __version__
from .aggregation import NotEnoughCandidates
from .dataset import DatasetError
from .fileio import read_json
from .jobs import JobError, JobState, RunnerSettings, make_runner
from .logic import ActiveLearningLogic
from .nnunet.profiles import ProfileError, profile_names
from .prefill import EffortModel
from .pipeline import DEFAULT_INIT, INITS, STAGES, LoopSettings, PipelineState
from .project import BudgetSettings, ProjectError
from .query_methods import DEFAULT_METHOD, METHODS
from .default_data import resolve_default_data
from .report import write_report
from .simulation import Simulation, SimulationSettings, demo_settings


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (naming the option), without the usage block."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(minimum: int | float, kind: type = int):
    """An argparse type: a number (``kind``) no smaller than ``minimum``; the error names the value and the bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not value >= minimum:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def fraction(text: str) -> float:
    """An argparse type: a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: comma separated non-negative integers, at least one, none twice."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"give at least one seed (e.g. 0,1,2), got {text!r}")
    try:
        seeds = tuple(int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be whole numbers separated by commas, got {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be non-negative and must not repeat, got {text!r}")
    return seeds


def budget_value(text: str) -> str:
    """``--budget``: low, medium, high or a number of boxes (at least 5)."""
    if text in ("low", "medium", "high") or (text.isdigit() and int(text) >= 5):
        return text
    raise argparse.ArgumentTypeError(f"expected low, medium, high or a number of boxes of at least 5, got {text!r}")


def encoder_file(text: str) -> Path:
    """``--encoder``: checked before anything trains (the pool autoencoder takes minutes)."""
    from .embeddings.autoencoder import check_encoder

    try:
        check_encoder(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def interpreter(text: str) -> str:
    """``--python``: an executable that exists (found on PATH or given as a path), checked before any job starts."""
    found = shutil.which(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text}: no such executable (give a Python interpreter's path)")
    return text


def method_list(text: str) -> tuple[str, ...]:
    """``--method`` of a simulation: known query methods, comma separated, at least one, none twice."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one query method, got {text!r}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown query method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is named twice in {text!r}")
    return names


def seconds_value(text: str) -> float:
    """``--box-seconds``, ``--seconds-per-voxel``: a finite non-negative number of seconds (the effort model's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds of at least 0, got {text}")
    return value


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)


def progress(items: Iterable, desc: str) -> Iterable:
    """A progress bar on a terminal, nothing in logs."""
    return tqdm(items, desc=desc, disable=None, leave=False, dynamic_ncols=True)


def _cmd_init(args: argparse.Namespace) -> int:
    options = dict(
        patch_size=args.patch_size,
        test_fraction=args.test_fraction,
        seed=args.seed,
        max_cases=args.max_cases,
        budget=BudgetSettings(query_size=args.query_size, loops=args.loops),
    )
    if args.dicomweb:
        from .dicom.commands import create_from_dicomweb

        logic = ActiveLearningLogic(create_from_dicomweb(args, options, progress))
    else:
        logic = ActiveLearningLogic.create(args.project, args.images, args.labels, progress=progress, **options)
    for line in logic.project.dicom_skipped:
        print(line)
    if args.start:
        count = args.start_count or args.query_size
        if not count:
            raise SystemExit("al3d init: --start needs --start-count or --query-size (how many boxes)")
        loop = logic.query(args.start, count, progress=progress, autoencoder=_autoencoder(args, logic))
        print(f"starting budget: {len(loop.boxes)} boxes by {args.start} -> {logic.project.loop_path(loop.loop)}")
    print(logic.status())
    return 0


def _autoencoder(args: argparse.Namespace, logic: ActiveLearningLogic):
    """Pool autoencoder settings of the label-free methods (cscs, cluster) from the options."""
    from .embeddings import AutoencoderSettings

    options = {"seed": logic.project.settings.seed}
    if getattr(args, "ae_iterations", None):
        options["iterations"] = args.ae_iterations
    if getattr(args, "encoder", None):
        options["encoder"] = str(Path(args.encoder).absolute())
    return AutoencoderSettings(**options)


def _add_autoencoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ae-iterations",
        type=POSITIVE,
        help="cscs/cluster: training iterations of the pool autoencoder (default 600; fewer is faster)",
    )
    p.add_argument(
        "--encoder",
        type=encoder_file,
        help="cscs/cluster: an encoder (N,1,16,16,16) -> (N,E), a torch.export archive (.pt2) or TorchScript, to use for "
        "the embeddings instead of the autoencoder's",
    )


def _cmd_status(args: argparse.Namespace) -> int:
    status = ActiveLearningLogic.open(args.project).status()
    print(json.dumps(status.to_json(), indent=2) if args.json else status)
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    logic = ActiveLearningLogic.open(args.project)
    loop = logic.query(
        args.method,
        args.count,
        seed=args.seed,
        probabilities=args.probabilities,
        stride=args.stride,
        n_per_image=args.per_image,
        progress=progress,
        min_distance=args.min_distance,
        autoencoder=_autoencoder(args, logic),
        distance_space=args.distance,
    )
    print(f"loop {loop.loop}: {len(loop.boxes)} boxes by {loop.method} -> {logic.project.loop_path(loop.loop)}")
    for record in loop.boxes[: args.show]:
        print(f"  {record!r}")
    if len(loop.boxes) > args.show:
        print(f"  ... {len(loop.boxes) - args.show} more")
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    if not args.oracle:
        print("al3d annotate: only --oracle is available on the command line; annotate by hand in Slicer", file=sys.stderr)
        return 2
    logic = ActiveLearningLogic.open(args.project)
    results = logic.annotate_with_oracle(progress=progress)
    voxels = sum(r.voxels for r in results)
    fg = sum(r.foreground_voxels for r in results)
    print(f"oracle annotated {len(results)} boxes ({voxels} voxels, {fg} foreground)")
    open_elsewhere = sorted(logic.claims())  # boxes an annotator has open in a view: the oracle leaves them
    if open_elsewhere:
        print(f"left {len(open_elsewhere)} boxes open by other annotators: {', '.join(open_elsewhere[:10])}")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    jobs = ActiveLearningLogic.open(args.project).jobs(_project_runner(args))
    if args.json:
        print(json.dumps([{"name": j.name, "kind": j.spec().kind, **asdict(j.status())} for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs")
    for job in jobs:
        s = job.status()
        where = " ".join(
            f"{k} {v}" for k, v in (("epoch", s.epoch), ("iteration", s.iteration), ("case", s.case)) if v is not None
        )
        message = s.message.splitlines()[0] if s.message else ""
        print(
            f"{job.name:28s} {job.spec().kind:15s} {s.state:9s} {100 * s.progress:5.1f}%  {s.stage} {where}  {message}".rstrip()
        )
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    cancelled = ActiveLearningLogic.open(args.project).cancel_jobs(_project_runner(args))
    print(f"cancelled {len(cancelled)} jobs" + (": " + ", ".join(j.name for j in cancelled) if cancelled else ""))
    return 0


def _project_runner(args: argparse.Namespace):
    """The runner that judges and cancels the project's jobs: the one --runner names, else the project's saved one."""
    settings = _runner_settings(args, args.project, save=False)
    return make_runner(settings) if settings is not None else None


class LiveProgress:
    """Prints a loop's progress: one line rewritten in place on a terminal, a line per change in a log."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._last = ""
        self._stage = ""
        self._progress = 0.0

    def __call__(self, state: PipelineState) -> None:
        if state.stage != self._stage:
            if self.tty and self._last:
                self.stream.write("\n")
            self._stage = state.stage
        line = state.describe()
        if self.tty:
            self.stream.write("\r" + line[: shutil.get_terminal_size().columns - 1].ljust(len(self._last)))
        elif line.split(" | ")[1:] != self._last.split(" | ")[1:] or int(state.progress * 20) != int(self._progress * 20):
            self.stream.write(line + "\n")
        self._last, self._progress = line, state.progress
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()


# --slurm-* option -> SlurmSettings field
SLURM_OPTIONS = {
    "slurm_partition": "partition",
    "slurm_account": "account",
    "slurm_qos": "qos",
    "slurm_time": "time_limit",
    "slurm_gpus": "gpus",
    "slurm_gres": "gres",
    "slurm_cpus": "cpus_per_task",
    "slurm_mem": "mem",
    "slurm_arg": "extra_args",
    "slurm_setup": "setup",
    "slurm_python": "python",
}


def _add_runner_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where jobs run (a project saves the runner and its Slurm settings: give them once)")
    g.add_argument(
        "--runner",
        choices=["local", "slurm"],
        help="local worker processes, or one Slurm batch job per job (the project folder must be on the "
        "cluster's shared filesystem); default: the project's saved choice, else local",
    )
    g.add_argument("--slurm-partition", metavar="NAME")
    g.add_argument("--slurm-account", metavar="NAME")
    g.add_argument("--slurm-qos", metavar="NAME")
    g.add_argument("--slurm-time", metavar="TIME", help="time limit per batch job (minutes, H:MM:SS, D-HH:MM:SS)")
    g.add_argument("--slurm-gpus", metavar="N", help="sbatch --gpus, e.g. 1 or a100:1")
    g.add_argument("--slurm-gres", metavar="SPEC", help="sbatch --gres, e.g. gpu:1")
    g.add_argument("--slurm-cpus", type=POSITIVE, metavar="N", help="CPUs per batch job (default: the job's threads)")
    g.add_argument("--slurm-mem", metavar="SIZE", help="memory per batch job, e.g. 32G")
    g.add_argument(
        "--slurm-arg",
        action="append",
        metavar="OPTION",
        help="another sbatch option, e.g. --slurm-arg=--constraint=a100 (repeatable)",
    )
    g.add_argument(
        "--slurm-setup",
        action="append",
        metavar="LINE",
        help="shell line run before the worker, e.g. 'module load cuda' or 'source /shared/venv/bin/activate' "
        "(repeatable; replaces the saved lines)",
    )
    g.add_argument("--slurm-python", metavar="PATH", help="the worker's interpreter as the nodes see it (default: this one)")


def _runner_settings(args: argparse.Namespace, project: Path | None = None, save: bool = True) -> RunnerSettings | None:
    """The runner the options name, filled from (and saved into) the project's runner.json; None: local.

    The kind defaults to the project's saved one; --slurm-* options change the
    saved Slurm settings, so later commands and the Slicer panel use them too.
    """
    from .jobs.slurm import SlurmError, SlurmSettings, load_project_runner, save_project_runner

    given = {field: getattr(args, option) for option, field in SLURM_OPTIONS.items() if getattr(args, option, None)}
    saved_kind, saved = load_project_runner(project) if project is not None else (None, None)
    kind = getattr(args, "runner", None) or saved_kind or "local"
    if given and kind != "slurm":
        names = ", ".join("--" + o.replace("_", "-") for o in SLURM_OPTIONS if getattr(args, o, None))
        raise SlurmError(f"{names} need --runner slurm")
    slurm = (saved or SlurmSettings()).merged(**given) if kind == "slurm" else saved
    if (
        save
        and project is not None
        and (project / "project.json").is_file()
        and (getattr(args, "runner", None) or given)
        and (kind, slurm) != (saved_kind, saved)
    ):
        path = save_project_runner(project, kind, slurm)
        print(f"runner: {kind}, saved in {path}")
    return RunnerSettings(kind="slurm", slurm=slurm) if kind == "slurm" else None


def _loop_settings(args: argparse.Namespace, stages: tuple[str, ...], **extra) -> LoopSettings:
    return LoopSettings(
        profile=args.profile,
        folds=getattr(args, "folds", None),
        device=args.device,
        parallel=getattr(args, "parallel", None),
        python=getattr(args, "python", None),
        stages=stages,
        runner=_runner_settings(args, args.project),
        init=getattr(args, "init", DEFAULT_INIT),
        **extra,
    )


def _run_pipeline(args: argparse.Namespace, settings: LoopSettings) -> int:
    logic = ActiveLearningLogic.open(args.project)
    pipeline = logic.loop_pipeline(settings)
    print(
        f"{logic.project.name}: model {pipeline.model_name} ({pipeline.profile.name} profile, "
        f"{pipeline.profile.folds} folds, device {pipeline.profile.device}, {pipeline.parallel} at a time)"
    )
    live = LiveProgress()
    try:
        state = pipeline.run(live)
    except KeyboardInterrupt:
        live.close()
        running = [j.name for j in pipeline.all_jobs() if pipeline.runner.refresh(j).state == JobState.RUNNING]
        print(
            f"interrupted: {len(running)} job(s) go on in the background ({', '.join(running)}); "
            f"`al3d cancel {args.project}` stops them, running this command again resumes",
            file=sys.stderr,
        )
        return 130
    live.close()
    if state.state == "failed":
        print(f"al3d {args.command}: failed: {state.message}", file=sys.stderr)
        return 1
    if settings.evaluate and pipeline.evaluates and pipeline.evaluation_summary.is_file() and "predict" in settings.stages:
        summary = read_json(pipeline.evaluation_summary)
        per_class = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in summary["per_class"].items())
        mean = summary["mean_dice"]
        print(
            f"test split ({summary['test_cases']} cases): Mean Dice {mean if mean is None else round(mean, 4)} ({per_class}) "
            f"-> {pipeline.evaluation_summary}"
        )
    if settings.score and pipeline.scores and "predict" in settings.stages:
        print(f"pool scores ({', '.join(pipeline.score_job_maps())}) -> {pipeline.scores_dir}")
    print(state.message)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return _run_pipeline(args, _loop_settings(args, ("prepare", "train")))


def _cmd_score(args: argparse.Namespace) -> int:
    return _run_pipeline(
        args,
        _loop_settings(args, ("predict",), method=args.method, evaluate=False, uncertainty_maps=not args.no_uncertainty_maps),
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    return _run_pipeline(args, _loop_settings(args, ("predict",), score=False))


def _cmd_loop(args: argparse.Namespace) -> int:
    refusal = ActiveLearningLogic.open(args.project).pending_refusal()
    if refusal:
        print(f"al3d loop: {refusal}", file=sys.stderr)
        return 1
    return _run_pipeline(
        args, _loop_settings(args, STAGES, method=args.method, count=args.count, seed=args.seed, evaluate=not args.no_evaluate)
    )


def _cmd_methods(args: argparse.Namespace) -> int:
    for m in METHODS.values():
        needs = [n for n, flag in (("model", m.needs_model), ("ground truth", m.needs_ground_truth)) if flag]
        print(f"{m.name:15s} {m.description}" + (f" [needs {', '.join(needs)}]" if needs else ""))
    return 0


def _run_simulation(settings: SimulationSettings, report_dir: Path | None, effort_model: EffortModel | None = None) -> int:
    simulation = Simulation(settings, echo=print, progress=progress).prepare()  # base project, budget, header
    print(
        f"simulation in {settings.out}: {len(simulation.runs)} runs ({', '.join(settings.methods)} x seeds "
        f"{', '.join(map(str, settings.seeds))}), budget {simulation.budget} boxes ({simulation.budget_rule}), "
        f"query size {simulation.query_size}, {settings.loops} loops, profile {simulation.profile_name}, "
        f"{simulation.parallel} job(s) at a time"
    )
    last = [""]

    def show(sim: Simulation) -> None:
        text = sim.describe()
        if text and text != last[0]:
            print(text, flush=True)
            last[0] = text

    try:
        results = simulation.run(on_step=show)
    except KeyboardInterrupt:
        simulation.cancel()
        print("interrupted: running jobs cancelled; run the same command again to resume", file=sys.stderr)
        return 130
    for what, message in results["failed"].items():
        print(f"failed: {what}: {message}", file=sys.stderr)
    print(f"{len(results['records'])} loop records in {settings.out / 'results'}")
    if report_dir is not None:
        print(f"report: {write_report([settings.out], report_dir, effort_model)}")
    return 1 if results["failed"] else 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _effort_model(args: argparse.Namespace) -> EffortModel | None:
    """The effort model of the options (None: EffortModel's own defaults); only the report's estimates use it."""
    given = {k: v for k, v in (("box_seconds", args.box_seconds), ("seconds_per_voxel", args.seconds_per_voxel)) if v is not None}
    return EffortModel(**given) if given else None


def _add_init_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init",
        default=DEFAULT_INIT,
        choices=list(INITS),
        help=f"how each loop's members start (default {DEFAULT_INIT}): warm (member k of the previous loop, the "
        "profile's shorter warm schedule, folds kept; loop 0 from scratch) or scratch (random weights and the full "
        "schedule every loop, nnActive's protocol); each gets its own model name",
    )


def _add_effort_options(p: argparse.ArgumentParser) -> None:
    defaults = EffortModel()
    p.add_argument(
        "--box-seconds",
        type=seconds_value,
        metavar="S",
        help="effort model: estimated annotator seconds per box whatever its content (navigating to it, "
        f"checking its slices; default {defaults.box_seconds:g})",
    )
    p.add_argument(
        "--seconds-per-voxel",
        type=seconds_value,
        metavar="S",
        help="effort model: estimated seconds per corrected voxel (painting; default "
        f"{defaults.seconds_per_voxel:g}); the report's minutes are box seconds x boxes + this x corrected voxels",
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    effort_model = _effort_model(args)
    if effort_model is not None and not args.report:
        print(
            "al3d simulate: error: --box-seconds and --seconds-per-voxel change only the report's estimated minutes; "
            "add --report (or give them to al3d report)",
            file=sys.stderr,
        )
        return 2
    settings = SimulationSettings(
        images=args.images,
        labels=args.labels,
        methods=args.method,
        out=args.out,
        budget=args.budget,
        loops=args.loops,
        seeds=args.seeds,
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        profile=args.profile,
        device=args.device,
        folds=args.folds,
        parallel=args.parallel,
        start=args.start,
        max_cases=args.max_cases,
        reference=not args.no_reference,
        reference_cache=args.reference_cache,
        python=args.python,
        restore_from=args.restore_from,
        runner=_runner_settings(args),
        init=args.init,
        training_seed=args.training_seed,
        warm_fraction=args.warm_fraction,
        warm_initial_lr=args.warm_initial_lr,
    )
    return _run_simulation(settings, args.out / "report" if args.report else None, effort_model)


def _cmd_report(args: argparse.Namespace) -> int:
    print(f"report: {write_report(args.run_dirs, args.out, _effort_model(args))}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    data = resolve_default_data(os.environ, Path.cwd(), args.out.absolute() / "phantoms", 0)
    settings = demo_settings(data, args.out, args.max_cases)
    print(f"data: {data.name} ({data.origin}) {data.images}")
    return _run_simulation(settings, args.out / "report")


def _project_command(sub, name: str, help: str, func, json: bool = False) -> argparse.ArgumentParser:
    """A subcommand that works on one project folder."""
    p = sub.add_parser(name, help=help)
    p.add_argument("project", type=Path)
    if json:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="al3d", description="Active learning for 3D segmentation with partial labels.")
    parser.add_argument("--version", action="version", version=f"ActiveLearning3D {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a project from a folder of images (and ground truth for simulation)")
    p.add_argument("project", type=Path)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images",
        type=Path,
        help="folder of images (.nii.gz, .nii, .nrrd, .mha, .mhd) and/or DICOM "
        "series (any nesting; each 3D image series becomes a case)",
    )
    p.add_argument("--labels", type=Path, help="folder of dense ground truth with the same case ids (simulation)")
    p.add_argument("--patch-size", type=POSITIVE, nargs=3, metavar=("Z", "Y", "X"), help="query box size in voxels")
    p.add_argument("--test-fraction", type=fraction, default=0.25, help="held-out test share when labels are given")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--query-size", type=POSITIVE, help="boxes per loop (default: ask per query)")
    p.add_argument("--loops", type=POSITIVE, default=5, help="planned loops (ClaSP PE's noise schedule)")
    p.add_argument("--max-cases", type=POSITIVE, help="use only the first N cases (sorted by id)")
    p.add_argument(
        "--start",
        choices=list(METHODS),
        help="query the starting budget (loop 0) at once: e.g. cscs or cluster (label-free), random",
    )
    p.add_argument("--start-count", type=POSITIVE, help="boxes in the starting budget (default: --query-size)")
    _add_autoencoder_options(p)
    from .dicom.commands import add_export_parser, add_init_options

    add_init_options(p, source)
    p.set_defaults(func=_cmd_init)

    _project_command(sub, "status", "show a project's cases, loops and annotation progress", _cmd_status, json=True)

    p = _project_command(sub, "query", "choose the boxes of the next loop", _cmd_query)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS))
    p.add_argument("--count", type=POSITIVE, help="number of boxes (default: the project's query size)")
    p.add_argument("--seed", type=NON_NEGATIVE, help="default: the project seed")
    p.add_argument(
        "--probabilities", type=existing_folder, help="DIR/<member>/<case>.npz|.npy ensemble probabilities (C, Z, Y, X)"
    )
    p.add_argument("--stride", type=POSITIVE, nargs=3, metavar=("Z", "Y", "X"), help="candidate corner stride")
    p.add_argument("--per-image", type=POSITIVE, help="boxes considered per image (default: the count)")
    p.add_argument(
        "--min-distance",
        type=at_least(0.0, float),
        help="pe_spatial: minimum distance between boxes (voxels: default the longest box edge; "
        "embedding: default the median nearest-neighbour distance of the pool embeddings)",
    )
    p.add_argument(
        "--distance",
        choices=["voxels", "embedding"],
        default="voxels",
        help="pe_spatial: distance between box centres in voxels, or between autoencoder embeddings",
    )
    _add_autoencoder_options(p)
    p.add_argument("--show", type=NON_NEGATIVE, default=10, help="boxes to list")

    p = _project_command(sub, "annotate", "annotate pending boxes (--oracle copies the ground truth)", _cmd_annotate)
    p.add_argument("--oracle", action="store_true")
    p = _project_command(sub, "jobs", "list a project's background jobs with their progress", _cmd_jobs, json=True)
    p.add_argument("--runner", choices=["local", "slurm"], help="the runner that judges the jobs (default: the project's)")
    p = _project_command(
        sub, "cancel", "cancel a project's queued and running jobs (and every process they started)", _cmd_cancel
    )
    p.add_argument(
        "--runner", choices=["local", "slurm"], help="the runner that cancels the jobs (slurm: scancel; default: the project's)"
    )

    def training_options(p: argparse.ArgumentParser, train: bool = True) -> None:
        p.add_argument(
            "--profile",
            default="auto",
            choices=["auto", *profile_names()],
            help="training profile (auto: paper with a CUDA GPU, else cpu-small)",
        )
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        _add_init_option(p)
        p.add_argument(
            "--python", type=interpreter, help="interpreter of the worker processes (default: this one; PythonSlicer in Slicer)"
        )
        if train:
            p.add_argument("--folds", type=at_least(2), help="ensemble size, at least 2 (default: the profile's)")
            p.add_argument("--parallel", type=POSITIVE, help="folds trained at a time (default: 1 on a GPU, CPU cores / 2)")
        _add_runner_options(p)

    p = _project_command(sub, "train", "train the nnU-Net ensemble on the annotated boxes (background jobs)", _cmd_train)
    training_options(p)
    p = _project_command(sub, "score", "score the pool's candidate boxes with the trained ensemble", _cmd_score)
    training_options(p, train=False)
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=[m for m, q in METHODS.items() if q.needs_model],
        help="the query method the scores are for (decides which uncertainty maps are computed)",
    )
    p.add_argument("--no-uncertainty-maps", action="store_true", help="do not write uncertainty images for the viewer")
    p = _project_command(sub, "evaluate", "Dice of the trained ensemble on the test split", _cmd_evaluate)
    training_options(p, train=False)
    p = _project_command(sub, "loop", "one loop: train, evaluate, score, query the next boxes", _cmd_loop)
    training_options(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS))
    p.add_argument("--count", type=POSITIVE, help="number of boxes (default: the project's query size)")
    p.add_argument("--seed", type=NON_NEGATIVE, help="default: the project seed")
    p.add_argument("--no-evaluate", action="store_true", help="skip the test-split evaluation")

    add_export_parser(sub, _project_command)

    p = sub.add_parser("methods", help="list the query methods")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("simulate", help="benchmark query methods with an oracle (nnActive protocol)")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--method", required=True, type=method_list, help="query method(s), comma separated: " + ",".join(METHODS))
    p.add_argument(
        "--budget", default="low", type=budget_value, help="low, medium, high (nnActive table, else a rule) or a number of boxes"
    )
    p.add_argument(
        "--loops", type=POSITIVE, default=5, help="loops per run; again with a larger number, a finished folder adds the loops"
    )
    p.add_argument("--seeds", default=(0,), type=seed_list, help="comma separated, e.g. 0,1,2")
    p.add_argument(
        "--training-seed",
        type=NON_NEGATIVE,
        help="base seed of every training (per loop and fold), apart from the query seeds; "
        "default: each run's seed. Repeats with other training seeds measure training noise",
    )
    p.add_argument("--patch-size", type=POSITIVE, nargs=3, metavar=("Z", "Y", "X"))
    p.add_argument("--profile", default="auto", choices=["auto", *profile_names()])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--folds", type=at_least(2), help="ensemble size, at least 2 (default: the profile's)")
    _add_init_option(p)
    p.add_argument(
        "--warm-fraction",
        type=float,
        metavar="F",
        help="with --init warm: share of the profile's epochs a warm-started member trains (0 < F <= 1; "
        "default: the profile's, a third)",
    )
    p.add_argument(
        "--warm-initial-lr",
        type=float,
        metavar="LR",
        help="with --init warm: starting learning rate of a warm-started member (default: the profile's, "
        "a tenth of its initial learning rate)",
    )
    p.add_argument("--parallel", type=POSITIVE, help="jobs at a time over the whole grid")
    p.add_argument("--start", default="nnactive_start", choices=list(METHODS), help="starting budget method (loop 0)")
    p.add_argument("--max-cases", type=POSITIVE, help="use only the first N cases")
    p.add_argument("--no-reference", action="store_true", help="skip the full-data run (no FG-Eff)")
    p.add_argument("--reference-cache", type=Path, help="folder to share full-data runs between simulations")
    p.add_argument(
        "--restore-from",
        type=existing_folder,
        metavar="DIR",
        help="records of an earlier run of this simulation (a results copy with its simulation.json): "
        "runs missing here are rebuilt from their recorded boxes and go on from their first unrecorded loop",
    )
    p.add_argument("--python", type=interpreter, help="interpreter of the worker processes")
    _add_runner_options(p)
    p.add_argument("--report", action="store_true", help="write OUT/report when done")
    _add_effort_options(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("report", help="HTML and Markdown report of one or more simulation folders")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    _add_effort_options(p)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="the main job: a small simulation on the default data, then its report")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--max-cases", type=POSITIVE, help="default: the demo's own reduction")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ProjectError, DatasetError, NotEnoughCandidates, ProfileError, JobError, ValueError, OSError) as e:
        print(f"al3d {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"al3d {args.command}: interrupted; everything saved so far is kept, run it again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
