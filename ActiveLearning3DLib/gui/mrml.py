"""MRML building blocks of the panel: volumes, query boxes as ROI nodes, annotation segmentations.

Everything takes a :class:`SlicerContext` (the scene and the module logics)
instead of reaching for ``slicer.mrmlScene``: the desktop application builds
one from its globals (:meth:`SlicerContext.from_application`), tests and
headless runs from :func:`ActiveLearning3DLib.gui.headless.headless_slicer`.
``slicer`` is imported inside the functions, so this module imports without Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..project import BoxRecord, BoxState
from .geometry import CaseGrid, box_frame, lps_to_ras_matrix

# Box outline colours (RGB 0..1) by state; the selected box is drawn in SELECTED.
STATE_COLORS: dict[str, tuple[float, float, float]] = {
    BoxState.PENDING: (1.0, 0.85, 0.0),  # yellow: to do
    BoxState.ANNOTATED: (0.1, 0.8, 0.2),  # green: done
    BoxState.SKIPPED: (0.55, 0.55, 0.55),  # grey
}
SELECTED = (1.0, 0.2, 0.2)
# Class colours when the project gives none (Slicer's generic anatomy-like defaults).
DEFAULT_CLASS_COLORS = [
    (0.5, 0.68, 0.5),
    (0.95, 0.84, 0.57),
    (0.69, 0.48, 0.39),
    (0.44, 0.5, 0.9),
    (0.86, 0.96, 0.84),
    (0.78, 0.78, 0.92),
]
ATTRIBUTE_PREFIX = "ActiveLearning3D."


@dataclass
class SlicerContext:
    """The MRML scene and the module logics the panel needs (what the desktop application provides)."""

    scene: Any
    volumes_logic: Any
    segmentations_logic: Any
    app_logic: Any = None
    module_logics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_application(cls) -> "SlicerContext":
        """Inside the Slicer application: its scene and registered module logics."""
        import slicer

        return cls(
            slicer.mrmlScene,
            slicer.modules.volumes.logic(),
            slicer.modules.segmentations.logic(),
            slicer.app.applicationLogic() if hasattr(slicer, "app") else None,
        )


def ijk_to_ras(volume_node) -> np.ndarray:
    import slicer
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def case_grid(project, case: str, volume_node) -> CaseGrid:
    """How Slicer's loaded volume indexes the project's grid of ``case``."""
    record = project.cases[case]
    return CaseGrid(lps_to_ras_matrix(record.spacing, record.origin, record.direction), ijk_to_ras(volume_node), record.shape)


def load_volume(ctx: SlicerContext, path: Path | str, name: str, labelmap: bool = False):
    """Read an image file into a scalar (or label map) volume node through Slicer's storage nodes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    node = ctx.volumes_logic.AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
    if node is None:
        raise ValueError(f"{path}: Slicer could not read this image")
    return node


def scalar_volume_problem(node: Any) -> str | None:
    """Why a node cannot be a project image (None when it is a scalar volume with voxels)."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return f"not a scalar volume ({node.GetClassName() if node is not None else 'None'})"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return "a label map, not an image"
    image = node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1:
        return "holds no voxels"
    if image.GetNumberOfScalarComponents() != 1:
        return f"{image.GetNumberOfScalarComponents()} components per voxel, not a grey-scale volume"
    return None


def write_volume(ctx: SlicerContext, node: Any, path: Path | str) -> Path:
    """Write a volume node through Slicer's archetype storage node (as "Save" does), atomically."""
    import slicer

    from ..fileio import replacing_file

    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    ctx.scene.AddNode(storage)
    try:
        with replacing_file(path) as tmp:
            tmp.unlink()  # the storage node writes the file itself
            storage.SetFileName(str(tmp))
            storage.SetUseCompression(1)
            if not storage.WriteData(node):
                raise OSError(f"{path}: Slicer could not write volume {node.GetName()!r}")
    finally:
        ctx.scene.RemoveNode(storage)
    return path


def show_in_slice_views(ctx: SlicerContext, background=None, foreground=None, opacity: float = 0.4) -> None:
    """Put volumes in every slice view (background and foreground layers)."""
    for composite in nodes_of_class(ctx.scene, "vtkMRMLSliceCompositeNode"):
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity if foreground is not None else 0.0)


def centre_slice_views(ctx: SlicerContext, ras: Sequence[float]) -> None:
    for slice_node in nodes_of_class(ctx.scene, "vtkMRMLSliceNode"):
        slice_node.JumpSliceByCentering(*[float(v) for v in ras])


def nodes_of_class(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


class BoxNodes:
    """The ROI nodes of one case's boxes: locked, coloured by state, the box record in node attributes."""

    def __init__(self, ctx: SlicerContext):
        self.ctx = ctx
        self.nodes: dict[str, Any] = {}
        self.selected: str | None = None

    def show(self, records: Sequence[BoxRecord], matrix: np.ndarray) -> None:
        """Replace the shown boxes with ``records``, placed by the IJK-to-RAS ``matrix`` of their indices."""
        self.clear()
        scene = self.ctx.scene
        scene.StartState(scene.BatchProcessState)  # one render for all boxes, not one per node (states nest)
        try:
            for record in records:
                self.nodes[record.id] = self._make_node(record, matrix)
        finally:
            scene.EndState(scene.BatchProcessState)

    def _make_node(self, record: BoxRecord, matrix: np.ndarray):
        import slicer

        frame = box_frame(record.box, matrix)
        node = self.ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"box {record.id}")
        node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(frame.object_to_world()))
        node.SetSize(*frame.size)
        node.SetLocked(True)
        for key, value in (
            ("id", record.id),
            ("case", record.case),
            ("loop", record.loop),
            ("score", "" if record.score is None else f"{record.score:.6g}"),
            ("state", record.state),
            ("stratum", record.stratum or ""),
            ("source", record.source),
        ):
            node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
        display = node.GetDisplayNode()
        if display is None:
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
        display.SetHandlesInteractive(False)
        display.SetFillOpacity(0.0)
        display.SetPropertiesLabelVisibility(False)
        display.SetPointLabelsVisibility(False)
        display.SetUseGlyphScale(True)
        display.SetGlyphScale(0.0)  # no centre point: the outline is the box
        self._colour(node, record.state)
        return node

    def _colour(self, node, state: str, selected: bool = False) -> None:
        colour = SELECTED if selected else STATE_COLORS.get(state, STATE_COLORS[BoxState.PENDING])
        display = node.GetDisplayNode()
        display.SetColor(*colour)
        display.SetSelectedColor(*colour)
        display.SetActiveColor(*colour)

    def set_state(self, box_id: str, state: str) -> None:
        node = self.nodes.get(box_id)
        if node is not None:
            node.SetAttribute(ATTRIBUTE_PREFIX + "state", state)
            self._colour(node, state, box_id == self.selected)

    def select(self, box_id: str | None) -> None:
        previous, self.selected = self.selected, box_id
        for key in (previous, box_id):
            if key in self.nodes:
                node = self.nodes[key]
                self._colour(node, node.GetAttribute(ATTRIBUTE_PREFIX + "state"), key == box_id)

    def clear(self) -> None:
        for node in self.nodes.values():
            self.ctx.scene.RemoveNode(node)
        self.nodes.clear()
        self.selected = None


def create_annotation_segmentation(
    ctx: SlicerContext,
    volume_node,
    classes: Mapping[int, str],
    colors: Mapping[int, Sequence[float]] | None = None,
    name: str = "annotation",
):
    """A segmentation in the volume's geometry with one empty segment per foreground class (id = class name)."""
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    reset_class_segments(node, classes, colors)
    return node


def reset_class_segments(
    segmentation_node, classes: Mapping[int, str], colors: Mapping[int, Sequence[float]] | None = None
) -> None:
    """One empty segment per class (replacing any painted one), in the class's colour or a default one."""
    segmentation = segmentation_node.GetSegmentation()
    for i, (value, class_name) in enumerate(sorted(classes.items())):
        if segmentation.GetSegment(segment_id(value)) is not None:
            segmentation.RemoveSegment(segment_id(value))
        colour = (colors or {}).get(value, DEFAULT_CLASS_COLORS[i % len(DEFAULT_CLASS_COLORS)])
        segmentation.AddEmptySegment(segment_id(value), class_name, list(colour))


def segment_id(class_value: int) -> str:
    return f"class_{class_value}"


BOX_SEGMENT = "al3d_box_region"


def restrict_editing_to_box(ctx: SlicerContext, segmentation_node, volume_node, grid: CaseGrid, box, editor_node=None) -> None:
    """A hidden segment covering exactly the box, and (given the Segment Editor's node) edits allowed only inside it.

    The overwrite mode becomes "visible segments", so painting a class never
    erases the hidden box region. Export reads class segments only.
    """
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(BOX_SEGMENT) is not None:
        segmentation.RemoveSegment(BOX_SEGMENT)
    segmentation.AddEmptySegment(BOX_SEGMENT, "box region (edits allowed inside)", [1.0, 1.0, 1.0])
    mask = np.zeros(grid.shape, np.uint8)
    mask[box.slices] = 1
    import_mask(ctx, segmentation_node, volume_node, BOX_SEGMENT, mask, grid)
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetSegmentVisibility(BOX_SEGMENT, False)
    if editor_node is not None:
        editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editor_node.SetMaskSegmentID(BOX_SEGMENT)
        editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)


def segmentation_labels(
    ctx: SlicerContext, segmentation_node, volume_node, classes: Sequence[int], grid: CaseGrid | None = None
) -> np.ndarray:
    """The segments as one label array (k, j, i) on the volume's grid: class value where painted, else 0.

    With ``grid`` the array is returned in the project's indexing.
    """
    import slicer
    import vtk

    ids = vtk.vtkStringArray()
    present = [c for c in classes if segmentation_node.GetSegmentation().GetSegment(segment_id(c)) is not None]
    for c in present:
        ids.InsertNextValue(segment_id(c))
    labelmap = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "annotation export")
    try:
        if present and not ctx.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node):
            raise RuntimeError(f"could not export {segmentation_node.GetName()} on {volume_node.GetName()}'s grid")
        if not present:
            labels = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, np.uint8)
        else:
            exported = slicer.util.arrayFromVolume(labelmap)  # 1..n in the order of ``ids``
            lookup = np.zeros(len(present) + 1, np.uint8)
            lookup[1:] = present
            labels = lookup[exported]
        return grid.from_slicer(labels) if grid is not None else labels
    finally:
        ctx.scene.RemoveNode(labelmap)


def load_labels_as_segmentation(
    ctx: SlicerContext, path: Path | str, name: str, classes: Mapping[int, str], reference_volume=None
):
    """A label image (partial labels, a prediction) as a segmentation; values outside ``classes`` are dropped."""
    import slicer

    labelmap = load_volume(ctx, path, f"{name} labels", labelmap=True)
    try:
        array = slicer.util.arrayFromVolume(labelmap)
        keep = np.isin(array, list(classes))
        if not keep.all():  # the ignore label of a partial map is not a segment
            array[~keep] = 0
            slicer.util.arrayFromVolumeModified(labelmap)
        node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        if reference_volume is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        if not ctx.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise RuntimeError(f"{path}: could not import as a segmentation")
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            value = segment.GetLabelValue()
            if value in classes:
                segment.SetName(classes[value])
        return node
    finally:
        ctx.scene.RemoveNode(labelmap)


def show_heat_map(ctx: SlicerContext, path: Path | str, name: str, background, opacity: float = 0.5):
    """A scalar map (e.g. predictive entropy) as the foreground layer with a hot colour table."""
    node = load_volume(ctx, path, name)
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    for colour in (
        "vtkMRMLColorTableNodeFileInferno.txt",
        "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
        "vtkMRMLColorTableNodeRainbow",
    ):
        if ctx.scene.GetNodeByID(colour) is not None:
            display.SetAndObserveColorNodeID(colour)
            break
    display.AutoWindowLevelOn()
    show_in_slice_views(ctx, background=background, foreground=node, opacity=opacity)
    return node


def paint_segment(
    ctx: SlicerContext, segmentation_node, volume_node, class_value: int, mask: np.ndarray, grid: CaseGrid | None = None
) -> None:
    """Set one class's segment from a mask (what a Segment Editor stroke leaves behind).

    The mask is in Slicer's indexing of the volume, or in the project's with ``grid``.
    """
    import_mask(ctx, segmentation_node, volume_node, segment_id(class_value), mask, grid)


def import_mask(
    ctx: SlicerContext, segmentation_node, volume_node, segment: str, mask: np.ndarray, grid: CaseGrid | None = None
) -> None:
    """Replace a segment's voxels with a mask on the volume's grid (through a temporary label map node)."""
    import slicer
    import vtk

    labelmap = ctx.volumes_logic.CreateAndAddLabelVolume(ctx.scene, volume_node, "mask")
    try:
        mask = np.asarray(mask, dtype=np.uint8)
        slicer.util.updateVolumeFromArray(labelmap, grid.to_slicer(mask) if grid is not None else mask)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment)
        if not ctx.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids):
            raise RuntimeError(f"could not set segment {segment} of {segmentation_node.GetName()}")
    finally:
        ctx.scene.RemoveNode(labelmap)
