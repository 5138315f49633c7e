"""A pre-filled box beside its corrected labels, rendered offscreen with slicer-core's slice view (no desktop).

Opens an annotated project (e.g. one run of a simulation), takes a box of loop 1
or later that recorded its corrections (by default the one whose corrected
voxel count is nearest the median of the boxes with some foreground), and
renders the axial slice through its centre twice through the panel's own
controller: with the model's pre-fill painted in the class segments (what the
annotator saw when the box opened) and with the labels submitted (here the
oracle's, i.e. the ground truth). Both pictures go side by side into one PNG.

    python benchmarks/prefill_picture.py RUN/seed_0/clasp_pe --png prefill.png [--box 001-0007]

Needs slicer-core and EGL offscreen rendering (libEGL + Mesa).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ActiveLearning3DLib.fileio import replacing_file
from ActiveLearning3DLib.gui import AnnotationController, mrml
from ActiveLearning3DLib.gui.headless import OffscreenSliceView, headless_slicer


def choose_box(controller: AnnotationController, min_foreground: int = 500):
    """The corrected box nearest the median corrected-voxel count among pre-filled boxes with some foreground."""
    project = controller.logic.project
    boxes = []
    for b in controller.logic.boxes():
        if b.state == "annotated" and b.effort and b.effort.get("prefill_shown"):
            if "foreground" not in b.effort:  # recorded before the field: the submitted labels hold it
                b.effort["foreground"] = int(np.count_nonzero(project.read_partial_labels(b.case)[b.box.slices]))
            if b.effort["foreground"] >= min_foreground:
                boxes.append(b)
    if not boxes:
        raise SystemExit(f"{controller.logic.project.path}: no pre-filled box with {min_foreground}+ foreground voxels")
    median = float(np.median([b.effort["corrected"] for b in boxes]))
    return min(boxes, key=lambda b: (abs(b.effort["corrected"] - median), b.id))


def render(project: Path, png: Path, box_id: str | None, size: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = AnnotationController.open_project(headless_slicer(), project)
    record = choose_box(c) if box_id is None else c.logic.find_box(box_id)
    if not record.effort or not c.logic.prefill_model(record):
        raise SystemExit(f"box {record.id}: no pre-fill to show (a loop-0 box, or annotated before any model)")
    c.go_to_box(record.id)  # an annotated box opens with its submitted labels
    view = OffscreenSliceView(c.ctx, size=(size, size))
    try:
        c.box_nodes.select(None)
        if c.partial_segmentation is not None and c.partial_segmentation.GetDisplayNode() is not None:
            c.partial_segmentation.GetDisplayNode().SetVisibility(False)  # only the class segments, in both pictures
        frame = mrml.box_frame(record.box, c.grid.ijk_to_ras)
        view.show(c.volume, ras_offset=frame.center[2])
        corrected = view.capture()
        shape = c.logic.project.cases[record.case].shape
        prefill = np.zeros(shape, np.uint8)
        prefill[record.box.slices] = c.logic.prefill(record)
        classes = c._foreground_classes()
        mrml.reset_class_segments(c.annotation, classes, c._colors())
        for value in classes:
            mrml.paint_segment(c.ctx, c.annotation, c.volume, value, prefill == value, c.grid)
        view.show(c.volume, ras_offset=frame.center[2])
        prefilled = view.capture()
    finally:
        view.close()
        c.close()
    e = record.effort
    dice = ", ".join(f"{classes.get(int(k), k)} {v:.2f}" for k, v in (e["prefill_dice"] or {}).items() if v is not None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, picture, title in (
        (axes[0], prefilled, f"opened: pre-fill of {e['prefill_model']}"),
        (axes[1], corrected, "submitted: corrected labels"),
    ):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(
        f"{record.case}, box {record.id} (loop {record.loop}, {record.method}), axial slice through its centre\n"
        f"corrected {e['corrected']} of {e['voxels']} voxels (added {e['added']}, removed {e['removed']}, "
        f"relabelled {e['relabelled']}); painting from empty: {e.get('foreground', '?')}; "
        f"pre-fill Dice {dice}",
        fontsize=9,
    )
    with replacing_file(png) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path, help="an annotated project folder (e.g. RUN/seed_0/clasp_pe)")
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--box", help="box id such as 001-0007 (default: a typical pre-filled box)")
    parser.add_argument("--size", type=int, default=400, help="pixels of each view")
    args = parser.parse_args(argv)
    print(f"written: {render(args.project, args.png.absolute(), args.box, args.size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
