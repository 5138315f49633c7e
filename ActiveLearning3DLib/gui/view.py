"""The Slicer view of the panel: a case's volume and partial labels, its boxes as ROI nodes, the annotation
segments, the heat map and loaded predictions, all as MRML nodes of one :class:`~.mrml.SlicerContext`.

It shows what the annotation core (:mod:`.annotation`) decides and reads the
annotator's paint back as a label array; it keeps no annotation state of its
own. :class:`~.controller.AnnotationController` joins the two for the panel.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..fileio import make_staging_dir
from ..logic import ActiveLearningLogic, BoxRecord, BoxState, ProjectError
from . import mrml
from .geometry import CaseGrid, box_frame, voxel_at


def _node_name(node: Any) -> str:
    return f"volume {node.GetName()!r}" if hasattr(node, "GetName") else repr(node)


def _unique_case_id(name: str, used: set[str]) -> str:
    """A case id from a node name: letters, digits, '.', '-' kept, never a channel suffix, unique among ``used``."""
    base = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.") or "volume"
    case, n = base, 2
    while case in used:
        case, n = f"{base}-{n}", n + 1
    used.add(case)
    return case


def stage_scene_volumes(ctx: mrml.SlicerContext, path: Path | str, volume_nodes: Sequence[Any]) -> Path:
    """Write scene volumes into a new staging folder beside ``path`` (one case each, named after the node),
    through Slicer's own storage nodes (so what Slicer shows is what the project holds, geometry included)."""
    path = Path(path).absolute()
    problems = [f"{_node_name(n)}: {p}" for n in volume_nodes if (p := mrml.scalar_volume_problem(n))]
    if not volume_nodes or problems:
        raise ProjectError("scene volumes: " + ("; ".join(problems) or "no grey-scale volume given (load one into the scene)"))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(path.parent, f".{path.name}.scene-")
    try:
        used: set[str] = set()
        for node in volume_nodes:
            case = _unique_case_id(node.GetName(), used)
            mrml.write_volume(ctx, node, staging / f"{case}_0000.nii.gz")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


class SlicerView:
    """The scene side of one open project: what is shown of it, and the segments the annotator paints."""

    def __init__(self, ctx: mrml.SlicerContext, logic: ActiveLearningLogic):
        self.ctx = ctx
        self.logic = logic  # read only: the project's images, partial labels, classes and boxes
        self.box_nodes = mrml.BoxNodes(ctx)
        self.case: str | None = None
        self.volume = None
        self.grid: CaseGrid | None = None
        self.partial_segmentation = None
        self.annotation = None
        self.heat_map = None
        self.prediction_nodes: dict[str, Any] = {}  # case -> segmentation loaded by load_predictions()
        self.editor_node = None  # the Segment Editor's parameter node: edits are then masked to the box
        self._labels_changed = False

    def foreground_classes(self) -> dict[int, str]:
        p = self.logic.project
        return {c: p.classes[c] for c in p.foreground_classes}

    # ------------------------------------------------------------------- case
    def show_box(self, record: BoxRecord, start: np.ndarray | None, colors: Mapping[int, Sequence[float]]) -> None:
        """Show a box: its case's volume and partial labels, all its boxes, the views centred, segments ready
        (empty, or ``start``: labels of the box's size to paint first)."""
        if record.case != self.case or self.volume is None:
            self.load_case(record.case, colors)
        elif self._labels_changed:
            self._reload_partial_labels()
        self.box_nodes.select(record.id)
        frame = box_frame(record.box, self.grid.ijk_to_ras)
        mrml.centre_slice_views(self.ctx, frame.center)
        self._reset_annotation(record, start, colors)

    def load_case(self, case: str, colors: Mapping[int, Sequence[float]]) -> None:
        self.close_case()
        project = self.logic.project
        self.case = case
        self.volume = mrml.load_volume(self.ctx, project.image_paths(case)[0], case)
        self.grid = mrml.case_grid(project, case, self.volume)
        self._reload_partial_labels()
        self.show_boxes()
        self.annotation = mrml.create_annotation_segmentation(
            self.ctx, self.volume, self.foreground_classes(), colors, name=f"{case} annotation"
        )
        mrml.show_in_slice_views(self.ctx, background=self.volume)

    def show_boxes(self) -> None:
        """(Re)draw the boxes of the shown case, e.g. after one was added."""
        self.box_nodes.show([b for b in self.logic.boxes() if b.case == self.case], self.grid.ijk_to_ras)

    def mark(self, record: BoxRecord) -> None:
        """A box changed state (submitted, skipped): its colour, and the partial labels to reload when annotated."""
        if record.state == BoxState.ANNOTATED:
            self._labels_changed = True
        self.box_nodes.set_state(record.id, record.state)

    def _reload_partial_labels(self) -> None:
        if self.partial_segmentation is not None:
            self.ctx.scene.RemoveNode(self.partial_segmentation)
        self.partial_segmentation = mrml.load_labels_as_segmentation(
            self.ctx,
            self.logic.project.partial_label_path(self.case),
            f"{self.case} partial labels (read-only)",
            self.foreground_classes(),
            self.volume,
        )
        self.partial_segmentation.SetAttribute(mrml.ATTRIBUTE_PREFIX + "readOnly", "1")
        display = self.partial_segmentation.GetDisplayNode()
        if display is not None:
            display.SetAllSegmentsOpacity2DFill(0.0)  # outlines only: the annotation segments are painted on top
        self._labels_changed = False

    def _reset_annotation(self, record: BoxRecord, start: np.ndarray | None, colors: Mapping[int, Sequence[float]]) -> None:
        """Empty segments for a new box, edits masked to it; ``start`` (the box's size) painted in first."""
        mrml.reset_class_segments(self.annotation, self.foreground_classes(), colors)
        mrml.restrict_editing_to_box(self.ctx, self.annotation, self.volume, self.grid, record.box, self.editor_node)
        if start is None:
            return
        inside = np.zeros(self.logic.project.cases[record.case].shape, np.uint8)
        inside[record.box.slices] = start
        for value in self.foreground_classes():
            if (inside == value).any():
                mrml.paint_segment(self.ctx, self.annotation, self.volume, value, inside == value, self.grid)

    def painted_labels(self) -> np.ndarray:
        """The annotation segments as one label array of the whole volume (k, j, i)."""
        return mrml.segmentation_labels(self.ctx, self.annotation, self.volume, list(self.foreground_classes()), self.grid)

    def voxel_at(self, ras: Sequence[float]) -> tuple[int, int, int]:
        """The voxel (k, j, i) of the shown case at a RAS point; refuses outside it or before a case is shown."""
        if self.volume is None or self.case is None:
            raise ProjectError("show a case first: a box is added to the volume on screen")
        voxel = voxel_at(self.grid.ijk_to_ras, ras, self.logic.project.cases[self.case].shape)
        if voxel is None:
            raise ProjectError(f"the point {list(ras)} lies outside {self.case}")
        return voxel

    def close_case(self) -> None:
        """Remove the nodes of the shown case from the scene."""
        self.box_nodes.clear()
        for node in (self.volume, self.partial_segmentation, self.annotation, self.heat_map):
            if node is not None and node.GetScene() is not None:
                self.ctx.scene.RemoveNode(node)
        self.volume = self.partial_segmentation = self.annotation = self.heat_map = None
        self.case = None

    def close(self) -> None:
        """Remove every node this view put in the scene (shown case, boxes, loaded predictions)."""
        self.close_case()
        for node in self.prediction_nodes.values():
            if node is not None and node.GetScene() is not None:
                self.ctx.scene.RemoveNode(node)
        self.prediction_nodes = {}

    # ---------------------------------------------------------- model output
    def show_heat_map(self, path: Path, case: str) -> Any:
        """A case's uncertainty map as the foreground layer over its volume (the case is shown first)."""
        if self.heat_map is not None:
            self.ctx.scene.RemoveNode(self.heat_map)
        self.heat_map = mrml.show_heat_map(self.ctx, path, f"{case} uncertainty", self.volume)
        return self.heat_map

    def load_predictions(self, folder: Path, cases: Sequence[str] | None = None) -> dict[str, Any]:
        """Load the segmentations of a predictions folder (those written so far) as segmentation nodes."""
        nodes = {}
        for path in sorted(folder.glob("*.nii.gz")):
            case = path.name[: -len(".nii.gz")]
            if cases is None or case in cases:
                earlier = self.prediction_nodes.pop(case, None)
                if earlier is not None and earlier.GetScene() is not None:
                    self.ctx.scene.RemoveNode(earlier)  # loaded again: replace, do not pile up copies
                nodes[case] = mrml.load_labels_as_segmentation(self.ctx, path, f"{case} prediction", self.foreground_classes())
                self.prediction_nodes[case] = nodes[case]
        return nodes
