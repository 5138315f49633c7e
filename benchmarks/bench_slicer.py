"""Benchmark: the panel's MRML work with slicer-core (targets from the Slicer module issue).

- showing 200 boxes of one case (ROI node creation and colouring by state): target under 1 s;
- submitting one box (segments exported on the volume's grid, merged into the
  partial label map, saved atomically, box marked annotated) on a
  256 x 256 x 128 volume: target under 0.2 s.

A synthetic project (3 cases of 128 x 256 x 256 voxels, spacing 0.8 x 0.8 x 1.5 mm,
oblique direction) is written to a temporary folder; every figure is the
median of several repeats, and the offscreen render of the case with its
boxes is written to ``--png`` when given.

    .venv/bin/python benchmarks/bench_slicer.py [--boxes 200] [--repeats 5] [--png boxes.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib.gui import AnnotationController, mrml  # noqa: E402
from ActiveLearning3DLib.gui.headless import OffscreenSliceView, headless_slicer  # noqa: E402
from ActiveLearning3DLib.project import BoxRecord  # noqa: E402
from ActiveLearning3DLib.boxes import Box  # noqa: E402

SHAPE = (128, 256, 256)  # (k, j, i)


def write_case(folder: Path, case: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[40:90, 80:170, 60:200] = 1
    label[60:80, 110:140, 100:150] = 2
    image = (label * 80 + rng.normal(100, 20, SHAPE)).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    for array, path in ((image, folder / "imagesTr" / f"{case}_0000.nii.gz"), (label, folder / "labelsTr" / f"{case}.nii.gz")):
        item = sitk.GetImageFromArray(array)
        item.SetSpacing((0.8, 0.8, 1.5))
        item.SetDirection(direction)
        item.SetOrigin((10.0, -40.0, 5.0))
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(item, str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="al3d-bench-slicer-") as tmp:
        root = Path(tmp)
        for n in range(3):
            write_case(root / "data", f"case_{n:03d}", n)
        c = AnnotationController.create_project(
            headless_slicer(),
            root / "project",
            root / "data" / "imagesTr",
            root / "data" / "labelsTr",
            patch_size=(20, 20, 20),
            query_size=4,
            test_fraction=0.0,
        )
        record = c.go_to_box(c.table()[0].id)
        rng = np.random.default_rng(0)
        corners = rng.integers(0, np.array(SHAPE) - 20, size=(args.boxes, 3))
        states = ["pending", "annotated", "skipped"]
        many = [
            BoxRecord(Box(record.case, tuple(k), (20, 20, 20)), 0, i, "random", score=float(rng.random()), state=states[i % 3])
            for i, k in enumerate(corners)
        ]
        show = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            c.box_nodes.show(many, c.grid.ijk_to_ras)
            show.append(time.perf_counter() - started)
        recolour = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for i, r in enumerate(many):
                c.box_nodes.set_state(r.id, states[(i + 1) % 3])
            recolour.append(time.perf_counter() - started)
        print(
            f"show {args.boxes} boxes (ROI nodes, locked, coloured by state): median {statistics.median(show):.3f} s "
            f"(min {min(show):.3f}, max {max(show):.3f}); target < 1 s"
        )
        print(f"recolour {args.boxes} boxes: median {statistics.median(recolour):.3f} s")
        c.box_nodes.show([b for b in c.logic.boxes() if b.case == record.case], c.grid.ijk_to_ras)

        submit, export = [], []
        for _ in range(args.repeats):
            c.go_to_box(record.id)
            paint = np.zeros(SHAPE, np.uint8)
            paint[record.box.slices] = rng.integers(0, 3, size=record.box.size)
            for value in (1, 2):
                mrml.paint_segment(c.ctx, c.annotation, c.volume, value, paint == value, c.grid)
            started = time.perf_counter()
            c.painted_labels()
            export.append(time.perf_counter() - started)
            result = c.submit(advance=False)
            submit.append(result.seconds)
            saved = c.logic.project.read_partial_labels(record.case)
            assert np.array_equal(saved[record.box.slices], paint[record.box.slices]), "submitted labels differ"
        print(
            f"submit one 20^3 box on a {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} volume (export + merge + atomic save + "
            f"state): median {statistics.median(submit):.3f} s (min {min(submit):.3f}, max {max(submit):.3f}); "
            f"target < 0.2 s; of which segment export {statistics.median(export):.3f} s"
        )
        if args.png:
            view = OffscreenSliceView(c.ctx, size=(400, 400))
            c.box_nodes.select(None)
            frame = mrml.box_frame(record.box, c.grid.ijk_to_ras)
            view.show(c.volume, ras_offset=frame.center[2])
            print(f"offscreen render written to {view.save_png(args.png.absolute())}")
            view.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
