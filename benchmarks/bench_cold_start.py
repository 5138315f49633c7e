"""Benchmark: the label-free cold start on the Hippocampus pool (no model, no labels used to choose).

Creates a project on the shared Hippocampus data (195 pool / 65 test) in a
temporary folder, trains the pool autoencoder with the default settings as
the background job a user would run, and times it; then queries a starting
budget of 20 boxes of 20^3 with ``cscs``, ``cluster``, ``random`` and the
simulated ``random_fg33`` (which peeks at the ground truth), for several
seeds, and reports how much hippocampus each starting budget contains (the
share of boxes that hold foreground and the foreground voxels covered): the
ground truth is read only to score the choice, never to make it. It also
reports where the boxes sit: how many of a box's six faces lie on the image
border, and how far the box centres spread (sd of the centre as a fraction of
the image size, mean over the axes), since a start that piles its boxes into
one corner of every image teaches the model little of the rest.

    .venv/bin/python benchmarks/bench_cold_start.py [--seeds 0,1,2] [--count 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib import ActiveLearningLogic  # noqa: E402
from ActiveLearning3DLib.default_data import find_shared_dataset  # noqa: E402
from ActiveLearning3DLib.embeddings import AutoencoderSettings, pool_embeddings  # noqa: E402
from ActiveLearning3DLib.embeddings.store import embeddings_dir  # noqa: E402
from ActiveLearning3DLib.fileio import read_json  # noqa: E402

METHODS = ("cscs", "cluster", "random", "random_fg33")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--work", type=Path, help="keep the project here (default: a temporary folder)")
    args = parser.parse_args()
    data = find_shared_dataset(REPO)
    if data is None:
        sys.exit("bench_cold_start: needs ../shared/datasets/Task04_Hippocampus")
    with tempfile.TemporaryDirectory(prefix="al3d-bench-cold-") as tmp:
        root = args.work or Path(tmp)
        base = root / "project"
        logic = (
            ActiveLearningLogic.open(base)
            if (base / "project.json").is_file()
            else ActiveLearningLogic.create(base, data / "imagesTr", data / "labelsTr", patch_size=(20, 20, 20), seed=0)
        )
        project = logic.project
        settings = AutoencoderSettings(seed=0)
        started = time.perf_counter()
        embeddings = pool_embeddings(project, settings)
        wall = time.perf_counter() - started
        result = read_json(next((project.path / "jobs").glob("embeddings-*/result.json")))
        print(
            f"pool autoencoder ({len(project.pool_cases)} pool images, {settings.iterations} iterations of "
            f"{settings.batch_size} boxes): reading the pool {result.get('read_seconds', 'n/a')} s, "
            f"training {result['train_seconds']} s, embedding {len(embeddings)} "
            f"candidate boxes {result['embed_seconds']} s, job wall time {wall:.1f} s (0 when cached); "
            f"final loss {result['final_loss']:.4f}; cache {embeddings_dir(project, settings)}"
        )
        gts = {c: project.read_ground_truth(c) for c in project.pool_cases}
        total_fg = sum(int((g > 0).sum()) for g in gts.values())
        rows = {m: [] for m in METHODS}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in METHODS:
                t = time.perf_counter()
                loop = logic.query(method, args.count, seed, autoencoder=settings)
                seconds = time.perf_counter() - t
                fg = [int((gts[b.case][b.box.slices] > 0).sum()) for b in loop.boxes]
                shapes = [gts[b.case].shape for b in loop.boxes]
                border = [
                    sum(c == 0 or c + s == n for c, s, n in zip(b.box.coords, b.box.size, shape))
                    for b, shape in zip(loop.boxes, shapes)
                ]
                centres = [
                    (np.asarray(b.box.coords) + np.asarray(b.box.size) / 2) / np.asarray(shape)
                    for b, shape in zip(loop.boxes, shapes)
                ]
                rows[method].append(
                    {
                        "seed": seed,
                        "seconds": round(seconds, 2),
                        "boxes_with_fg": sum(f > 0 for f in fg),
                        "fg_fraction": sum(fg) / total_fg,
                        "images": len({b.case for b in loop.boxes}),
                        "border_faces": float(np.mean(border)),
                        "centre_spread": float(np.std(centres, axis=0).mean()),
                    }
                )
                loop_path = project.loop_path(loop.loop)
                loop_path.unlink()  # every method starts from the same empty project
        print(f"\nstarting budget of {args.count} boxes of 20^3, seeds {args.seeds} (mean over seeds):")
        print(
            "| method | boxes with hippocampus | pool foreground inside the boxes | images | "
            "box faces on the image border | spread of box centres | query seconds |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for method, r in rows.items():
            print(
                f"| {method} | {np.mean([x['boxes_with_fg'] for x in r]):.1f} / {args.count} | "
                f"{100 * np.mean([x['fg_fraction'] for x in r]):.2f} % | {np.mean([x['images'] for x in r]):.1f} | "
                f"{np.mean([x['border_faces'] for x in r]):.2f} | {np.mean([x['centre_spread'] for x in r]):.3f} | "
                f"{np.mean([x['seconds'] for x in r]):.2f} |"
            )
        print("\n" + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
