"""``python -m ActiveLearning3DLib.nnunet`` - run one nnU-Net step in this process, by hand or from a script.

    python -m ActiveLearning3DLib.nnunet env PROJECT [--profile NAME]      print nnunet_environment() as JSON
    python -m ActiveLearning3DLib.nnunet prepare PROJECT [--folds N] [--replan] [--processes N] [--job DIR]
    python -m ActiveLearning3DLib.nnunet train PROJECT --fold K [--profile NAME] [--output DIR] [--device D]
        [--epochs N] [--iterations N] [--seed S [--loop T]] [--job DIR]

The parent starts it with ``env={**os.environ, **nnunet_environment(project)}``
(needed by ``prepare`` when it has to plan). ``prepare`` and ``train`` run as a
job in this process: the same task (``nnunet_prepare``, ``nnunet_train``) and the
same protocol as a runner's worker, so progress is in the job folder's
``status.json`` and the result in its ``result.json`` (``--job DIR``, default
``<project>/jobs/nnunet-prepare`` or ``nnunet-train-fold_<K>``). A finished job
of that folder is set aside first (``jobs/.superseded/``): running the command
again runs the step again. The exit code is the worker's (0 done, 1 failed,
143 cancelled by SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _run_as_job(job_dir: Path, kind: str, inputs: dict[str, Any]) -> int:
    """Run one task as the job in ``job_dir`` in this process (see :func:`ActiveLearning3DLib.worker.run_job`)."""
    from ..jobs import Job, JobError, JobState, LocalRunner
    from ..worker import run_job

    job = Job(job_dir)
    if job.spec_path.is_file():
        status = LocalRunner().refresh(job)  # a "running" job whose worker died is failed now
        if status.state == JobState.RUNNING:
            raise JobError(
                f"{job.path}: the job is running (pid {status.pid} on {status.host}); "
                "wait for it, or cancel it with al3d jobs --cancel"
            )
        if status.final:
            job.set_aside()
    job = Job.create(job_dir.parent, job_dir.name, kind, inputs)
    code = run_job(job.path)
    status = job.status()
    print(
        f"{job.path}: {status.state}"
        + (f"; result in {job.path / 'result.json'}" if status.state == JobState.DONE else f": {status.message}"),
        flush=True,
    )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ActiveLearning3DLib.nnunet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print the worker environment for a project")
    env.add_argument("project")
    env.add_argument("--profile")
    prep = sub.add_parser("prepare", help="plan (once), preprocess changed cases, write the splits")
    prep.add_argument("project")
    prep.add_argument("--folds", type=int, default=5)
    prep.add_argument("--configuration", default="3d_fullres")
    prep.add_argument("--replan", action="store_true")
    prep.add_argument("--processes", type=int, default=1)
    prep.add_argument("--job", help="the job folder (default: <project>/jobs/nnunet-prepare)")
    train = sub.add_parser("train", help="train one fold")
    train.add_argument("project")
    train.add_argument("--fold", type=int, required=True)
    train.add_argument("--profile", default="paper")
    train.add_argument("--output")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    train.add_argument("--epochs", type=int)
    train.add_argument("--iterations", type=int, help="iterations per epoch")
    train.add_argument("--seed", type=int, help="base seed: a reproducible training (on the CPU bit for bit)")
    train.add_argument("--loop", type=int, help="loop the fold's seed is derived for (default: the project's last)")
    train.add_argument("--job", help="the job folder (default: <project>/jobs/nnunet-train-fold_<K>)")
    args = parser.parse_args(argv)

    if args.command == "env":
        from .paths import nnunet_environment
        from .profiles import resolve_profile

        print(json.dumps(nnunet_environment(args.project, resolve_profile(args.profile) if args.profile else None), indent=1))
        return 0
    from ..jobs import JobError

    try:
        return _run_step(args)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run_step(args: argparse.Namespace) -> int:
    """``prepare`` or ``train`` as a job in this process; the worker's exit code."""
    project = Path(args.project).absolute()
    if args.command == "prepare":
        job = Path(args.job) if args.job else project / "jobs" / "nnunet-prepare"
        return _run_as_job(
            job.absolute(),
            "nnunet_prepare",
            {
                "project": str(project),
                "configuration": args.configuration,
                "folds": args.folds,
                "processes": args.processes,
                "replan": args.replan,
            },
        )
    from .profiles import resolve_profile

    profile = resolve_profile(args.profile, epochs=args.epochs, iterations_per_epoch=args.iterations)
    job = Path(args.job) if args.job else project / "jobs" / f"nnunet-train-fold_{args.fold}"
    return _run_as_job(
        job.absolute(),
        "nnunet_train",
        {
            "project": str(project),
            "fold": args.fold,
            "profile": profile.to_json(),
            "output": None if args.output is None else str(Path(args.output).absolute()),
            "device": args.device,
            "seed": args.seed,
            "loop": args.loop,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
