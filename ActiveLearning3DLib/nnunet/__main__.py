"""``python -m ActiveLearning3DLib.nnunet`` - run one nnU-Net step in this process (a worker's child).

    python -m ActiveLearning3DLib.nnunet env PROJECT [--profile NAME]      print nnunet_environment() as JSON
    python -m ActiveLearning3DLib.nnunet prepare PROJECT [--folds N] [--replan] [--processes N]
    python -m ActiveLearning3DLib.nnunet train PROJECT --fold K [--profile NAME] [--output DIR] [--device D]
        [--epochs N] [--iterations N] [--seed S [--loop T]]

The parent starts it with ``env={**os.environ, **nnunet_environment(project)}``
(needed by ``prepare`` when it has to plan). Progress goes to stdout as lines
``AL3D-PROGRESS {json}``, the result as one line ``AL3D-RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import sys

PROGRESS_PREFIX = "AL3D-PROGRESS "
RESULT_PREFIX = "AL3D-RESULT "


def _print_progress(status: dict) -> None:
    print(PROGRESS_PREFIX + json.dumps(status, default=str), flush=True)


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
    args = parser.parse_args(argv)

    if args.command == "env":
        from .paths import nnunet_environment
        from .profiles import resolve_profile

        print(json.dumps(nnunet_environment(args.project, resolve_profile(args.profile) if args.profile else None), indent=1))
        return 0
    if args.command == "prepare":
        from ..project import Project
        from .prepare import prepare

        result = prepare(Project.open(args.project), args.configuration, args.folds, replan=args.replan,
                         num_processes=args.processes, progress=_print_progress)
    else:
        from .profiles import resolve_profile
        from .trainer import train_fold

        profile = resolve_profile(args.profile, epochs=args.epochs, iterations_per_epoch=args.iterations)
        result = train_fold(args.project, args.fold, profile, args.output, args.device, _print_progress,
                            seed=args.seed, loop=args.loop)
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
