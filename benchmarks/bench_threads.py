"""Benchmark: what a job running alone gains from the cores of idle slots (the runner's core sharing).

Jobs are sized for ``--parallel`` at a time (torch threads = cores / parallel);
when one runs alone, ``LocalRunner`` allots it every core (docs/USAGE.md, "Training,
scoring and evaluation with nnU-Net"). This measures the gain on a trained model folder, with 1 thread and
with every core in turn:
- the test evaluation path (``Ensemble.segment``: every member, mirroring, tile
  step 0.5) on a few test images, seconds per image;
- a training step (forward, loss, backward, SGD step) of the same network at
  the configuration's batch and patch size, milliseconds per step.
Run it with the machine otherwise idle: the figures are wall times.

    .venv/bin/python benchmarks/bench_threads.py --model PROJECT/nnunet/results/<model> [--cases 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib.nnunet.evaluation import load_evaluation_ensemble  # noqa: E402
from ActiveLearning3DLib.project import Project  # noqa: E402


def evaluation_seconds(ensemble, images: list[list[Path]]) -> float:
    """Seconds per image of the ensemble's segmentation, after one image of warm-up."""
    ensemble.segment(images[0])
    started = time.perf_counter()
    for files in images:
        ensemble.segment(files)
    return (time.perf_counter() - started) / len(images)


def training_step_ms(ensemble, steps: int) -> float:
    """Milliseconds per SGD step of the ensemble's network on random batches of the configuration's shape."""
    import torch

    config = ensemble.predictor.configuration_manager
    network = ensemble.predictor.network
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    batch = torch.randn(int(config.batch_size), 1, *config.patch_size)

    def step() -> None:
        optimizer.zero_grad()
        network(batch).float().mean().backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    network.eval()
    return 1000 * (time.perf_counter() - started) / steps


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained model folder (PROJECT/nnunet/results/<model>)")
    parser.add_argument("--cases", type=int, default=3, help="test images timed (after one of warm-up)")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    args = parser.parse_args()
    project = Project.open(args.model.resolve().parents[2])
    cases = (project.test_cases or project.pool_cases)[: max(1, args.cases)]
    images = [project.image_paths(c) for c in cases]
    ensemble = load_evaluation_ensemble(args.model, "cpu", mirroring=True)
    cores = os.cpu_count() or 1
    print(f"model {args.model.name}: {len(ensemble.members)} members, {len(cases)} test images, {cores} cores")
    rows = []
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        rows.append((threads, evaluation_seconds(ensemble, images), training_step_ms(ensemble, args.steps)))
    print("| torch threads | evaluation s / image | training step ms |")
    print("| --- | --- | --- |")
    for threads, seconds, ms in rows:
        print(f"| {threads} | {seconds:.2f} | {ms:.0f} |")
    if len(rows) > 1:
        print(
            f"{cores} threads against 1: evaluation {rows[0][1] / rows[1][1]:.2f} x, training {rows[0][2] / rows[1][2]:.2f} x faster"
        )


if __name__ == "__main__":
    main()
