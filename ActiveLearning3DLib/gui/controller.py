"""The panel's controller: the annotation core (:mod:`.annotation`) joined to a Slicer view (:mod:`.view`).

The module widget only binds buttons to these methods and calls :meth:`poll`
from a timer; the Python console can drive the same object::

    from ActiveLearning3DLib.gui import AnnotationController, SlicerContext
    c = AnnotationController.open_project(SlicerContext.from_application(), "~/al/hippo")
    c.go_to_box(c.table()[0].id)      # volume, partial labels, boxes, views centred, segments ready
    ...paint with the Segment Editor...
    c.submit()                        # merged into the partial labels, saved, next box shown

Without a scene, :class:`~.annotation.AnnotationSession` does the same with label arrays.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..logic import DEFAULT_METHOD, ActiveLearningLogic, BoxRecord, ProjectError
from . import mrml
from .annotation import (
    PANEL_SETTINGS,
    SORT_KEYS,
    USER_ONLY,
    AnnotationSession,
    LoopProgress,
    PanelSettings,
    QueryRow,
    SubmitResult,
    new_project,
    parse_classes,
    parse_patch_size,
)
from .view import SlicerView, stage_scene_volumes

# the panel and scripts import the annotation core's names from here too
__all__ = [
    "AnnotationController",
    "AnnotationSession",
    "LoopProgress",
    "PANEL_SETTINGS",
    "PanelSettings",
    "QueryRow",
    "SORT_KEYS",
    "SubmitResult",
    "USER_ONLY",
    "new_project",
    "parse_classes",
    "parse_patch_size",
    "stage_scene_volumes",
]


def _view_attribute(name: str, doc: str) -> property:
    """An attribute of the view, read and set through the controller (the panel and scripts use these names)."""
    return property(lambda self: getattr(self.view, name), lambda self, value: setattr(self.view, name, value), doc=doc)


class AnnotationController(AnnotationSession):
    """Binds a project (the annotation core over the headless logic) to a scene: boxes, segments, the heat map."""

    def __init__(self, ctx: mrml.SlicerContext, logic: ActiveLearningLogic, runner=None):
        super().__init__(logic, runner)
        self.view = SlicerView(ctx, logic)

    ctx = property(lambda self: self.view.ctx, doc="the scene and module logics")
    box_nodes = property(lambda self: self.view.box_nodes, doc="the ROI nodes of the shown case's boxes")
    volume = _view_attribute("volume", "the shown case's volume node")
    grid = _view_attribute("grid", "how the shown volume indexes the project's grid")
    partial_segmentation = _view_attribute("partial_segmentation", "the shown case's partial labels (read only)")
    annotation = _view_attribute("annotation", "the segmentation the annotator paints")
    heat_map = _view_attribute("heat_map", "the uncertainty map on screen")
    prediction_nodes = _view_attribute("prediction_nodes", "case -> segmentation loaded by load_predictions()")
    editor_node = _view_attribute("editor_node", "the Segment Editor's parameter node: edits are masked to the box")

    # ---------------------------------------------------------------- projects
    @classmethod
    def create_project(
        cls,
        ctx: mrml.SlicerContext,
        path: Path | str,
        images: Path | str,
        labels: Path | str | None = None,
        class_names: Mapping[int, str] | None = None,
        class_colors: Mapping[int, Sequence[float]] | None = None,
        patch_size: Sequence[int] | None = None,
        method: str = DEFAULT_METHOD,
        query_size: int = 20,
        start_method: str | None = None,
        start_count: int | None = None,
        runner=None,
        **project_options,
    ) -> "AnnotationController":
        """Create a project from the panel's inputs and query its starting budget (loop 0)."""
        logic = new_project(
            path, images, labels, class_names, class_colors, patch_size, method, query_size, start_method, **project_options
        )
        controller = cls(ctx, logic, runner)
        controller.begin_starting_budget(controller.settings.start_method, start_count or query_size)
        return controller

    @classmethod
    def create_project_from_scene(
        cls, ctx: mrml.SlicerContext, path: Path | str, volume_nodes: Sequence[Any], **options: Any
    ) -> "AnnotationController":
        """Create a project of volumes loaded in the scene (one case each, named after the node).

        Each volume is written through Slicer's own storage node into a staging
        folder beside the project (so what Slicer shows is what the project
        holds, geometry included); the staging folder goes once the project
        exists or fails. ``options`` are those of :meth:`create_project`.
        """
        return cls.create_project_from_staged(ctx, path, cls.stage_scene_volumes(ctx, path, volume_nodes), **options)

    @classmethod
    def stage_scene_volumes(cls, ctx: mrml.SlicerContext, path: Path | str, volume_nodes: Sequence[Any]) -> Path:
        """Write scene volumes into a new staging folder beside ``path`` (one case each, named after the node).

        This half of :meth:`create_project_from_scene` adds storage nodes to the
        scene, so in Slicer it runs on the GUI thread; the other half,
        :meth:`create_project_from_staged`, may run on a background thread.
        """
        return stage_scene_volumes(ctx, path, volume_nodes)

    @classmethod
    def create_project_from_staged(
        cls, ctx: mrml.SlicerContext, path: Path | str, staging: Path | str, **options: Any
    ) -> "AnnotationController":
        """:meth:`create_project` of a staging folder, which goes afterwards whether the project was made or not."""
        import shutil

        try:
            return cls.create_project(ctx, Path(path).absolute(), staging, **options)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def create_project_from_dicom_files(
        cls, ctx: mrml.SlicerContext, path: Path | str, files_by_series: Mapping[str, Sequence[Path | str]], **options: Any
    ) -> "AnnotationController":
        """Create a project of DICOM series given as file lists (what Slicer's DICOM database holds for them).

        The files are linked (or copied) into a staging folder, one subfolder per
        series, and read by the same series reader as ``al3d init --images``:
        non-volume series are skipped with their reason (``logic.project.dicom_skipped``).
        """
        import os
        import shutil

        from ..fileio import make_staging_dir

        path = Path(path).absolute()
        missing = [f"{uid}: no files" for uid, files in files_by_series.items() if not files]
        missing += [f"{f}: file not found" for files in files_by_series.values() for f in files if not Path(f).is_file()]
        if not files_by_series or missing:
            raise ProjectError("DICOM series: " + ("; ".join(missing[:5]) or "select at least one series"))
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging_dir(path.parent, f".{path.name}.dicom-files-")
        try:
            for n, files in enumerate(files_by_series.values()):
                folder = staging / f"series{n:04d}"
                folder.mkdir()
                for k, source in enumerate(files):
                    target = folder / f"{k:05d}.dcm"
                    try:
                        os.link(source, target)  # same disk: no copy of the pixels
                    except OSError:
                        shutil.copyfile(source, target)
            return cls.create_project(ctx, path, staging, **options)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def create_project_from_dicom_database(
        cls, ctx: mrml.SlicerContext, path: Path | str, series_uids: Sequence[str], database: Any = None, **options: Any
    ) -> "AnnotationController":
        """Create a project of series selected in Slicer's DICOM database (desktop only: ``slicer.dicomDatabase``)."""
        if database is None:
            import slicer

            database = getattr(slicer, "dicomDatabase", None)
            if database is None:
                raise ProjectError("Slicer's DICOM database is not open (it exists in the Slicer desktop application)")
        return cls.create_project_from_dicom_files(
            ctx, path, {uid: list(database.filesForSeries(uid)) for uid in series_uids}, **options
        )

    @classmethod
    def open_project(cls, ctx: mrml.SlicerContext, path: Path | str, runner=None) -> "AnnotationController":
        """Open a project and continue where it stopped (table, states, settings come from its files)."""
        return cls(ctx, ActiveLearningLogic.open(path), runner)

    # -------------------------------------------------------------- navigation
    def go_to_box(self, box_id: str) -> BoxRecord:
        """Show a box: its case's volume and partial labels, all its boxes, the views centred, empty segments.

        The box is claimed first (BoxClaimed names the annotator who has it open), and this view's earlier box released.
        An annotated box starts from its saved labels, another from the newest model's prediction inside it when
        there is one and the ``prefill`` setting is on.
        """
        record = self.open_box(box_id)
        self.view.show_box(record, self.starting_labels(record), self._colors())
        self._shown_at = time.monotonic()  # the annotation time of a box runs from here (shown) to its submission
        return record

    def _advance_to(self, record: BoxRecord) -> None:
        self.go_to_box(record.id)

    def _box_changed(self, record: BoxRecord) -> None:
        self.view.mark(record)

    def close_case(self) -> None:
        """Remove the nodes of the shown case from the scene."""
        self.view.close_case()
        self.case = self.current = None

    def close(self) -> None:
        """Remove every node this project put in the scene (shown case, boxes, loaded predictions).

        What runs in the background is not touched: the panel refuses to switch
        projects while this one is :attr:`busy`.
        """
        self.view.close_case()
        super().close()  # the boxes this view had open are free for other annotators
        self.view.close()

    def _foreground_classes(self) -> dict[int, str]:
        return self.view.foreground_classes()

    def _colors(self) -> dict[int, Sequence[float]]:
        return {int(k): v for k, v in self.settings.class_colors.items()}

    # -------------------------------------------------------------- annotating
    def painted_labels(self) -> np.ndarray:
        """The annotation segments as one label array of the whole volume (k, j, i)."""
        self._need_box()
        return self.view.painted_labels()

    def submit(self, annotator: str = "user", seconds: float | None = None, advance: bool = True) -> SubmitResult:
        """Merge the segments inside the current box into the partial labels, save at once, go to the next box.

        Paint outside the box is not merged; the result says how many voxels were dropped.
        ``seconds`` (the annotation time recorded with the box) defaults to the time since the box was shown.
        """
        return self.submit_labels(self.painted_labels(), annotator, seconds, advance)

    def add_box_at(self, ras: Sequence[float]) -> BoxRecord:
        """Add a box of the patch size centred at a clicked point of the shown case (an annotator-chosen query)."""
        record = self.add_box(self.view.case, self.view.voxel_at(ras))
        self.view.show_boxes()
        self.go_to_box(record.id)
        return record

    def _need_box(self) -> BoxRecord:
        if self.current is None or self.view.annotation is None:
            raise ProjectError("no box selected: go to a box first")
        return self.current

    # ----------------------------------------------------------------- results
    def show_uncertainty(self, case: str | None = None) -> Any:
        """The newest model's predictive-entropy map of a case as a heat-map foreground layer."""
        case = case or self.view.case
        path = self.uncertainty_map(case)
        if case != self.view.case:
            self.close_case()
            self.view.load_case(case, self._colors())
            self.case = case
        return self.view.show_heat_map(path, case)

    def load_predictions(self, cases: Sequence[str] | None = None) -> dict[str, Any]:
        """Load the final ensemble's segmentations as segmentation nodes (those written so far)."""
        return self.view.load_predictions(self.latest_model().predictions_dir, cases)
