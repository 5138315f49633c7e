"""The panel's controller: everything the Slicer panel offers, with no Qt, driven by real MRML nodes.

The module widget only binds buttons to these methods and calls :meth:`poll`
from a timer; the Python console can drive the same object::

    from ActiveLearning3DLib.gui import AnnotationController, SlicerContext
    c = AnnotationController.open_project(SlicerContext.from_application(), "~/al/hippo")
    c.go_to_box(c.table()[0].id)      # volume, partial labels, boxes, views centred, segments ready
    ...paint with the Segment Editor...
    c.submit()                        # merged into the partial labels, saved, next box shown
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..fileio import atomic_write_json, read_json
from ..jobs import Job, JobRunner, JobStatus, RunnerSettings, make_runner
from ..logic import CLAIM_TTL, ActiveLearningLogic, describe_effort
from ..pipeline import LoopPipeline, LoopSettings, PipelineState
from ..prefill import effort_totals
from ..project import BoxRecord, BudgetSettings, ProjectError
from ..query_methods import DEFAULT_METHOD
from . import mrml
from .geometry import CaseGrid, box_frame, voxel_at

PANEL_SETTINGS = "panel.json"
USER_ONLY = ("python",)  # panel settings that come from the user, never from the (untrusted) project folder
SORT_KEYS = ("loop", "case", "score", "state", "stratum")


def parse_classes(text: str) -> tuple[dict[int, str] | None, dict[int, tuple[float, float, float]]]:
    """The panel's class field: ``"1=liver #c86464, 2=tumour"`` -> names (background added) and colours.

    Empty text: the names come from the data's dataset.json. Colours are
    optional hex RGB; a class without one gets a default colour.
    """
    if not text.strip():
        return None, {}
    names: dict[int, str] = {0: "background"}
    colors: dict[int, tuple[float, float, float]] = {}
    for part in text.split(","):
        value, sep, rest = part.partition("=")
        if not sep or not value.strip().isdigit() or not rest.strip():
            raise ValueError(f"classes: expected value=name (e.g. 1=liver), got {part.strip()!r}")
        words = rest.split()
        if words[-1].startswith("#"):
            code = words.pop()[1:]
            if len(code) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in code):
                raise ValueError(f"classes: colour {'#' + code!r} of class {value.strip()} is not #RRGGBB")
            colors[int(value)] = tuple(int(code[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[assignment]
        if not words:
            raise ValueError(f"classes: class {value.strip()} has a colour but no name")
        names[int(value)] = " ".join(words)
    return names, colors


def parse_patch_size(text: str) -> list[int] | None:
    """``"20 20 20"``, ``"20x20x20"`` or ``"20,20,20"`` (Z Y X) -> [20, 20, 20]; empty: automatic."""
    values = text.replace("x", " ").replace(",", " ").split()
    if not values:
        return None
    if len(values) != 3 or not all(v.isdigit() and int(v) > 0 for v in values):
        raise ValueError(f"patch size: expected three positive integers (Z Y X), got {text!r}")
    return [int(v) for v in values]


@dataclass
class PanelSettings:
    """What the panel remembers per project (saved in the project folder, so reopening continues as it was)."""

    method: str = DEFAULT_METHOD
    start_method: str = "random"
    query_size: int | None = None
    class_colors: dict[str, list[float]] = field(default_factory=dict)
    profile: str = "auto"
    device: str = "auto"
    parallel: int | None = None
    prefill: bool = True  # a box opens with the newest model's prediction painted inside it, when there is one
    init: str = "scratch"  # "warm": each loop's members start from the previous loop's (LoopSettings.init)
    # worker interpreter: the module sets PythonSlicer from the user's own settings. Never read from or written to
    # panel.json (USER_ONLY): a project folder is shared, and one that named an interpreter would run it.
    python: str | None = None

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(profile=self.profile, device=self.device, parallel=self.parallel, method=self.method,
                            count=self.query_size, python=self.python, init=self.init)


@dataclass
class QueryRow:
    """One row of the query table."""

    id: str
    case: str
    loop: int
    score: float | None
    stratum: str | None
    state: str
    source: str


@dataclass
class SubmitResult:
    box: BoxRecord
    voxels: int
    foreground_voxels: int
    dropped_outside: int
    next_box: BoxRecord | None
    seconds: float

    @property
    def warning(self) -> str | None:
        if not self.dropped_outside:
            return None
        return (f"{self.dropped_outside} painted voxels lay outside box {self.box.id} and were not merged "
                "(only the inside of a queried box is annotated)")


@dataclass
class LoopProgress:
    """What the progress bar and the log show while a loop runs."""

    stage: str
    state: str
    percent: float
    message: str
    jobs: list[dict]
    log_tail: str

    @property
    def running(self) -> bool:
        return self.state == "running"


def _project_side(settings: PanelSettings) -> dict:
    """What panel.json keeps: every panel setting but those that come from the user only (see USER_ONLY)."""
    return {k: v for k, v in asdict(settings).items() if k not in USER_ONLY}


def _job_entry(name: str, status: JobStatus) -> dict:
    """One job as the progress display lists it."""
    return {"name": name, "state": status.state, "progress": status.progress, "stage": status.stage,
            "epoch": status.epoch, "message": status.message}


def _node_name(node: Any) -> str:
    return f"volume {node.GetName()!r}" if hasattr(node, "GetName") else repr(node)


def _effort_line(totals: dict) -> str:
    """One loop's effort totals in a line ('' when no box of the loop recorded any)."""
    text = describe_effort(totals)
    return f"loop {totals['loop']}: {totals['boxes']} boxes annotated" + text if text else ""


def _unique_case_id(name: str, used: set[str]) -> str:
    """A case id from a node name: letters, digits, '.', '-' kept, never a channel suffix, unique among ``used``."""
    import re

    base = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.") or "volume"
    case, n = base, 2
    while case in used:
        case, n = f"{base}-{n}", n + 1
    used.add(case)
    return case


class AnnotationController:
    """Binds a project (the headless logic) to a scene: the query table, boxes, annotation and the loop."""

    def __init__(self, ctx: mrml.SlicerContext, logic: ActiveLearningLogic, runner=None):
        self.ctx = ctx
        self.logic = logic
        if runner is None:  # a project set to run its jobs on Slurm (al3d ... --runner slurm) submits from here too
            from ..jobs.slurm import project_runner

            runner = project_runner(logic.project.path)
        self.runner = runner
        self.settings = self._read_settings()
        self.box_nodes = mrml.BoxNodes(ctx)
        self.case: str | None = None
        self.current: BoxRecord | None = None
        self.volume = None
        self.grid: CaseGrid | None = None
        self.partial_segmentation = None
        self.annotation = None
        self.heat_map = None
        self.prediction_nodes: dict[str, Any] = {}  # case -> segmentation loaded by load_predictions()
        self.editor_node = None  # the Segment Editor's parameter node: edits are then masked to the box
        self.pipeline: LoopPipeline | None = None
        self._watched: tuple[Job, str, Callable[[], str]] | None = None  # one job outside a loop (embeddings, predictions)
        self._shown_at: float | None = None
        self._labels_changed = False
        self.prefill_shown = False  # whether the box on screen opened with the model's prediction (recorded at submit)
        self.annotator = "user"  # the name other annotators of a shared project see on the box this one has open
        self._claimed_at: float | None = None

    # ---------------------------------------------------------------- projects
    @classmethod
    def create_project(cls, ctx: mrml.SlicerContext, path: Path | str, images: Path | str, labels: Path | str | None = None,
                       class_names: Mapping[int, str] | None = None, class_colors: Mapping[int, Sequence[float]] | None = None,
                       patch_size: Sequence[int] | None = None, method: str = DEFAULT_METHOD, query_size: int = 20,
                       start_method: str | None = None, start_count: int | None = None, runner=None,
                       **project_options) -> "AnnotationController":
        """Create a project from the panel's inputs and query its starting budget (loop 0)."""
        budget = BudgetSettings(query_size=int(query_size))
        logic = ActiveLearningLogic.create(path, images, labels, patch_size=patch_size, classes=class_names, budget=budget,
                                           **project_options)
        settings = PanelSettings(method=method, start_method=start_method or PanelSettings.start_method, query_size=int(query_size),
                                 class_colors={str(k): list(map(float, v)) for k, v in (class_colors or {}).items()})
        atomic_write_json(logic.project.path / PANEL_SETTINGS, _project_side(settings))
        controller = cls(ctx, logic, runner)
        controller.begin_starting_budget(settings.start_method, start_count or query_size)
        return controller

    @classmethod
    def create_project_from_scene(cls, ctx: mrml.SlicerContext, path: Path | str, volume_nodes: Sequence[Any],
                                  **options: Any) -> "AnnotationController":
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
        import shutil

        from ..fileio import make_staging_dir

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

    @classmethod
    def create_project_from_staged(cls, ctx: mrml.SlicerContext, path: Path | str, staging: Path | str,
                                   **options: Any) -> "AnnotationController":
        """:meth:`create_project` of a staging folder, which goes afterwards whether the project was made or not."""
        import shutil

        try:
            return cls.create_project(ctx, Path(path).absolute(), staging, **options)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def create_project_from_dicom_files(cls, ctx: mrml.SlicerContext, path: Path | str,
                                        files_by_series: Mapping[str, Sequence[Path | str]],
                                        **options: Any) -> "AnnotationController":
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
    def create_project_from_dicom_database(cls, ctx: mrml.SlicerContext, path: Path | str, series_uids: Sequence[str],
                                           database: Any = None, **options: Any) -> "AnnotationController":
        """Create a project of series selected in Slicer's DICOM database (desktop only: ``slicer.dicomDatabase``)."""
        if database is None:
            import slicer

            database = getattr(slicer, "dicomDatabase", None)
            if database is None:
                raise ProjectError("Slicer's DICOM database is not open (it exists in the Slicer desktop application)")
        return cls.create_project_from_dicom_files(
            ctx, path, {uid: list(database.filesForSeries(uid)) for uid in series_uids}, **options)

    @classmethod
    def open_project(cls, ctx: mrml.SlicerContext, path: Path | str, runner=None) -> "AnnotationController":
        """Open a project and continue where it stopped (table, states, settings come from its files)."""
        return cls(ctx, ActiveLearningLogic.open(path), runner)

    def _read_settings(self) -> PanelSettings:
        path = self.logic.project.path / PANEL_SETTINGS
        if not path.is_file():
            return PanelSettings(query_size=self.logic.project.settings.budget.query_size)
        known = set(PanelSettings.__dataclass_fields__) - set(USER_ONLY)  # "python" from a project folder runs nothing
        try:
            data = read_json(path)
        except (OSError, ValueError) as e:
            raise ProjectError(f"{path}: damaged panel settings ({e})") from e
        if not isinstance(data, dict):
            raise ProjectError(f"{path}: damaged panel settings (expected a JSON object)")
        return PanelSettings(**{k: v for k, v in data.items() if k in known})

    def save_settings(self, **changes: Any) -> PanelSettings:
        """Change and save panel settings (method, profile, device, parallel, python, ...)."""
        for key, value in changes.items():
            if key not in PanelSettings.__dataclass_fields__:
                raise ValueError(f"unknown panel setting {key!r}")
            setattr(self.settings, key, value)
        atomic_write_json(self.logic.project.path / PANEL_SETTINGS, _project_side(self.settings))
        return self.settings

    # ------------------------------------------------------------------- table
    def current_loop(self) -> int | None:
        loops = self.logic.project.loop_indices()
        return loops[-1] if loops else None

    def table(self, sort_by: str = "loop", descending: bool = False, loop: int | None = None) -> list[QueryRow]:
        """The boxes of a loop (default: the current one) as table rows, sorted by a column."""
        if sort_by not in SORT_KEYS:
            raise ValueError(f"cannot sort by {sort_by!r}; columns: {', '.join(SORT_KEYS)}")
        loop = self.current_loop() if loop is None else loop
        if loop is None:
            return []
        rows = [QueryRow(b.id, b.case, b.loop, b.score, b.stratum, b.state, b.source) for b in self.logic.boxes(loop)]

        def key(row: QueryRow):
            value = getattr(row, sort_by)
            return (value is None, value if value is not None else 0, row.id)

        rows.sort(key=key, reverse=descending)
        if descending:  # keep rows without a value last either way
            rows.sort(key=lambda r: getattr(r, sort_by) is None)
        return rows

    def counts(self, loop: int | None = None) -> dict[str, int]:
        rows = self.table(loop=loop)
        counts = {state: sum(1 for r in rows if r.state == state) for state in ("pending", "annotated", "skipped")}
        counts["total"] = len(rows)
        return counts

    def next_pending(self, after: str | None = None) -> BoxRecord | None:
        """The next pending box of the current loop, preferring the current case (fewer volume loads).

        It is claimed for this annotator at once (and shown next by the caller): an
        annotator beside this one on a shared project gets another box.
        """
        loop = self.current_loop()
        if loop is None:
            return None
        try:
            return self.logic.claim_next_pending(self.annotator, case=self.case, after=after, loop=loop)
        except OSError:  # a read-only project: nothing can be claimed (or submitted), the boxes can still be looked at
            pending = [b for b in self.logic.boxes(loop) if b.state == "pending"]
            same_case = [b for b in pending if b.case == self.case and b.id != after]
            return (same_case or [b for b in pending if b.id != after] or pending or [None])[0]

    # -------------------------------------------------------------- navigation
    def go_to_box(self, box_id: str) -> BoxRecord:
        """Show a box: its case's volume and partial labels, all its boxes, the views centred, empty segments.

        The box is claimed first (BoxClaimed names the annotator who has it open), and this view's earlier box released.
        """
        try:
            record = self.logic.claim(box_id, self.annotator)
            self._claimed_at = time.monotonic()
        except OSError:  # a read-only project (someone else's, on a share) can still be looked at
            record, self._claimed_at = self.logic.find_box(box_id), None
        if record.case != self.case or self.volume is None:
            self._load_case(record.case)
        elif self._labels_changed:
            self._reload_partial_labels()
        self.current = record
        self.box_nodes.select(record.id)
        frame = box_frame(record.box, self.grid.ijk_to_ras)
        mrml.centre_slice_views(self.ctx, frame.center)
        self._reset_annotation(record)
        self._shown_at = time.monotonic()  # the annotation time of a box runs from here to its submission
        return record

    def _load_case(self, case: str) -> None:
        self.close_case()
        project = self.logic.project
        self.case = case
        self.volume = mrml.load_volume(self.ctx, project.image_paths(case)[0], case)
        self.grid = mrml.case_grid(project, case, self.volume)
        self._reload_partial_labels()
        self.box_nodes.show([b for b in self.logic.boxes() if b.case == case], self.grid.ijk_to_ras)
        self.annotation = mrml.create_annotation_segmentation(self.ctx, self.volume, self._foreground_classes(),
                                                              self._colors(), name=f"{case} annotation")
        mrml.show_in_slice_views(self.ctx, background=self.volume)

    def _reload_partial_labels(self) -> None:
        if self.partial_segmentation is not None:
            self.ctx.scene.RemoveNode(self.partial_segmentation)
        self.partial_segmentation = mrml.load_labels_as_segmentation(
            self.ctx, self.logic.project.partial_label_path(self.case), f"{self.case} partial labels (read-only)",
            self._foreground_classes(), self.volume)
        self.partial_segmentation.SetAttribute(mrml.ATTRIBUTE_PREFIX + "readOnly", "1")
        display = self.partial_segmentation.GetDisplayNode()
        if display is not None:
            display.SetAllSegmentsOpacity2DFill(0.0)  # outlines only: the annotation segments are painted on top
        self._labels_changed = False

    def _reset_annotation(self, record: BoxRecord) -> None:
        """Empty segments for a new box, edits masked to it; an annotated box starts from its saved labels, another
        from the newest model's prediction inside it when there is one and the ``prefill`` setting is on."""
        mrml.reset_class_segments(self.annotation, self._foreground_classes(), self._colors())
        mrml.restrict_editing_to_box(self.ctx, self.annotation, self.volume, self.grid, record.box, self.editor_node)
        self.prefill_shown = False
        inside = None
        if record.state == "annotated":
            partial = self.logic.project.read_partial_labels(record.case)
            inside = np.zeros(partial.shape, np.uint8)
            inside[record.box.slices] = partial[record.box.slices]
        elif self.settings.prefill and self.logic.prefill_model(record) is not None:
            inside = np.zeros(self.logic.project.cases[record.case].shape, np.uint8)
            inside[record.box.slices] = self.logic.prefill(record)
            self.prefill_shown = True
        if inside is not None:
            for value in self._foreground_classes():
                if (inside == value).any():
                    mrml.paint_segment(self.ctx, self.annotation, self.volume, value, inside == value, self.grid)

    def close_case(self) -> None:
        """Remove the nodes of the shown case from the scene."""
        self.box_nodes.clear()
        for node in (self.volume, self.partial_segmentation, self.annotation, self.heat_map):
            if node is not None and node.GetScene() is not None:
                self.ctx.scene.RemoveNode(node)
        self.volume = self.partial_segmentation = self.annotation = self.heat_map = None
        self.case = self.current = None

    def close(self) -> None:
        """Remove every node this project put in the scene (shown case, boxes, loaded predictions).

        What runs in the background is not touched: the panel refuses to switch
        projects while this one is :attr:`busy`.
        """
        self.close_case()
        try:
            self.logic.release()  # the boxes this view had open are free for other annotators
        except OSError:  # a read-only project holds no claim of ours
            pass
        for node in self.prediction_nodes.values():
            if node is not None and node.GetScene() is not None:
                self.ctx.scene.RemoveNode(node)
        self.prediction_nodes = {}

    def _foreground_classes(self) -> dict[int, str]:
        p = self.logic.project
        return {c: p.classes[c] for c in p.foreground_classes}

    def _colors(self) -> dict[int, Sequence[float]]:
        return {int(k): v for k, v in self.settings.class_colors.items()}

    # -------------------------------------------------------------- annotating
    def painted_labels(self) -> np.ndarray:
        """The annotation segments as one label array of the whole volume (k, j, i)."""
        self._need_box()
        return mrml.segmentation_labels(self.ctx, self.annotation, self.volume, list(self._foreground_classes()), self.grid)

    def submit(self, annotator: str = "user", seconds: float | None = None, advance: bool = True) -> SubmitResult:
        """Merge the segments inside the current box into the partial labels, save at once, go to the next box.

        Paint outside the box is not merged; the result says how many voxels were dropped.
        ``seconds`` (the annotation time recorded with the box) defaults to the time since the box was shown.
        """
        record = self._need_box()
        if seconds is None and self._shown_at is not None:
            seconds = round(time.monotonic() - self._shown_at, 1)
        started = time.perf_counter()
        result = self.logic.submit(record, self.painted_labels(), annotator=annotator, seconds=seconds,
                                   prefill_shown=self.prefill_shown)
        self._labels_changed = True
        self.box_nodes.set_state(record.id, "annotated")
        self.current = self.logic.find_box(record.id)
        elapsed = time.perf_counter() - started
        following = self.next_pending(after=record.id) if advance else None
        if following is not None:
            self.go_to_box(following.id)
        return SubmitResult(self.logic.find_box(record.id), result.voxels, result.foreground_voxels,
                            result.dropped_outside, following, elapsed)

    def effort(self, loop: int | None = None) -> dict:
        """A loop's effort totals (default: the current loop): corrected voxels, pre-fills shown, their Dice, seconds."""
        loop = self.current_loop() if loop is None else loop
        found = [t for t in self.logic.effort_per_loop() if t["loop"] == loop]
        return found[0] if found else {"loop": loop, **effort_totals([])}

    def effort_text(self, loop: int | None = None) -> str:
        """The effort line of a loop (default: the current one; '' before a box of the loop recorded any)."""
        return _effort_line(self.effort(loop))

    def effort_summary(self) -> str:
        """The effort line of every loop that recorded any, oldest first (the panel's effort label; '' before any):
        a loop's totals stay in view after the next loop is queried."""
        return "\n".join(line for line in map(_effort_line, self.logic.effort_per_loop()) if line)

    def skip(self, advance: bool = True) -> BoxRecord | None:
        """Skip the current box and show the next pending one (returned; None when the loop is done)."""
        record = self._need_box()
        self.logic.skip(record)
        self.box_nodes.set_state(record.id, "skipped")
        following = self.next_pending(after=record.id) if advance else None
        if following is not None:
            self.go_to_box(following.id)
        return following

    def add_box_at(self, ras: Sequence[float]) -> BoxRecord:
        """Add a box of the patch size centred at a clicked point of the shown case (an annotator-chosen query)."""
        if self.volume is None or self.case is None:
            raise ProjectError("show a case first: a box is added to the volume on screen")
        shape = self.logic.project.cases[self.case].shape
        voxel = voxel_at(self.grid.ijk_to_ras, ras, shape)
        if voxel is None:
            raise ProjectError(f"the point {list(ras)} lies outside {self.case}")
        record = self.logic.add_box(self.case, voxel)
        self.box_nodes.show([b for b in self.logic.boxes() if b.case == self.case], self.grid.ijk_to_ras)
        self.go_to_box(record.id)
        return record

    def _need_box(self) -> BoxRecord:
        if self.current is None or self.annotation is None:
            raise ProjectError("no box selected: go to a box first")
        return self.current

    # ---------------------------------------------------------- starting budget
    def begin_starting_budget(self, method: str, count: int) -> LoopProgress | None:
        """Query loop 0; a label-free method first has the pool autoencoder trained as a job (poll() finishes it)."""
        from ..embeddings import AutoencoderSettings, embedding_job
        from ..embeddings.store import embeddings_dir
        from ..query_methods import get_method

        if not get_method(method).needs_embeddings:
            self.logic.query(method, count)
            return None
        settings = AutoencoderSettings(seed=self.logic.project.settings.seed)
        if (embeddings_dir(self.logic.project, settings) / "embeddings.npz").is_file():
            self.logic.query(method, count, autoencoder=settings)
            return None

        def query() -> str:
            loop = self.logic.query(method, count, autoencoder=settings)
            return f"loop 0: {len(loop.boxes)} boxes by {method}"

        return self._watch(embedding_job(self.logic.project, settings), "embeddings", query)

    def _job_runner(self) -> JobRunner:
        if self.runner is None:
            self.runner = make_runner(RunnerSettings(python=self.settings.python, max_parallel=1))
        return self.runner

    def _watch(self, job: Job, stage: str, when_done: Callable[[], str]) -> LoopProgress:
        """Run one background job through the controller's runner; poll() reports it and calls ``when_done`` after."""
        self._watched = (job, stage, when_done)
        self._job_runner().submit(job)
        return self.poll()

    def _poll_watched(self) -> LoopProgress:
        job, stage, when_done = self._watched
        self._job_runner().poll()
        status = self._job_runner().refresh(job)
        entry = [_job_entry(job.name, status)]
        if status.state == "done":
            self._watched = None
            return LoopProgress(stage, "done", 100.0, when_done(), entry, "")
        if status.final:
            self._watched = None
            return LoopProgress(stage, "failed", round(100 * status.progress, 1),
                                f"{job.name} {status.state}: {status.message}", entry, job.log_tail(12))
        return LoopProgress(stage, "running", round(100 * status.progress, 1), status.message or f"{stage} running",
                            entry, job.log_tail(12))

    @property
    def busy(self) -> bool:
        """A loop, a label-free start or the final predictions run in the background."""
        return self.pipeline is not None or self._watched is not None

    # -------------------------------------------------------------------- loop
    def can_start_next_loop(self) -> bool:
        boxes = self.logic.boxes()
        return not any(b.state == "pending" for b in boxes) and any(b.state == "annotated" for b in boxes)

    def start_next_loop(self, settings: LoopSettings | None = None) -> LoopProgress:
        """Start training, evaluation, scoring and the next query as background jobs; poll() reports."""
        pending = self.logic.pending_boxes()
        if pending:
            raise ProjectError(f"{len(pending)} boxes are still pending; annotate or skip them first")
        self.pipeline = self.logic.loop_pipeline(settings or self.settings.loop_settings(), self.runner)
        return self.poll()

    def poll(self) -> LoopProgress | None:
        """Advance what runs in the background (never blocks); None when nothing runs."""
        if self.current is not None and self._claimed_at is not None and time.monotonic() - self._claimed_at > CLAIM_TTL / 3:
            self._claimed_at = time.monotonic()
            try:
                self.logic.claim(self.current.id, self.annotator)  # the open box stays claimed while it is open
            except (ProjectError, OSError):  # taken over after expiring, or unwritable: submit says so plainly
                pass
        if self._watched is not None:
            return self._poll_watched()
        if self.pipeline is None:
            return None
        state = self.pipeline.advance()
        progress = self._progress(state)
        if state.finished:
            self.pipeline = None
        return progress

    def _progress(self, state: PipelineState) -> LoopProgress:
        jobs, tail = [], ""
        for name, status in state.jobs:
            jobs.append(_job_entry(name, status))
            if status.state in ("running", "failed"):
                tail = Job(self.logic.jobs_dir / name).log_tail(12)
        return LoopProgress(state.stage, state.state, round(100 * state.progress, 1), state.message or state.describe(),
                            jobs, tail)

    def cancel(self) -> list[str]:
        """Cancel what runs in the background (whole process trees); returns the names of the jobs cancelled."""
        if self.pipeline is not None:
            cancelled = self.pipeline.cancel()
        elif self._watched is not None:
            self._job_runner().cancel(self._watched[0])
            cancelled = [self._watched[0]]
        else:
            cancelled = self.logic.cancel_jobs(self.runner)
        self.pipeline = self._watched = None
        return [job.name for job in cancelled]

    # ----------------------------------------------------------------- results
    def latest_model(self) -> LoopPipeline:
        """The pipeline of the current annotations (its model folder, predictions); refuses before any training."""
        return self.logic.loop_pipeline(self.settings.loop_settings(), self.runner)

    def show_uncertainty(self, case: str | None = None) -> Any:
        """The latest predictive-entropy map of a case as a heat-map foreground layer."""
        case = case or self.case
        if case is None:
            raise ProjectError("name a case or show one first")
        maps = sorted(self.logic.project.path.glob(f"nnunet/**/uncertainty/{case}.nii.gz"), key=lambda p: p.stat().st_mtime)
        if not maps:
            raise ProjectError(f"no uncertainty map of {case} yet: it is written when a loop scores the pool")
        if case != self.case:
            self._load_case(case)
        if self.heat_map is not None:
            self.ctx.scene.RemoveNode(self.heat_map)
        self.heat_map = mrml.show_heat_map(self.ctx, maps[-1], f"{case} uncertainty", self.volume)
        return self.heat_map

    def predict_all_cases(self, cases: Sequence[str] | None = None) -> LoopProgress:
        """Segment every case (or ``cases``) with the final ensemble as a background job that poll() follows.

        When it is done, load_predictions() loads the results.
        """
        pipeline = self.latest_model()
        return self._watch(pipeline.prediction_job(cases), "prediction",
                           lambda: f"predictions written to {pipeline.predictions_dir}")

    def load_predictions(self, cases: Sequence[str] | None = None) -> dict[str, Any]:
        """Load the final ensemble's segmentations as segmentation nodes (those written so far)."""
        folder = self.latest_model().predictions_dir
        nodes = {}
        for path in sorted(folder.glob("*.nii.gz")):
            case = path.name[: -len(".nii.gz")]
            if cases is None or case in cases:
                earlier = self.prediction_nodes.pop(case, None)
                if earlier is not None and earlier.GetScene() is not None:
                    self.ctx.scene.RemoveNode(earlier)  # loaded again: replace, do not pile up copies
                nodes[case] = mrml.load_labels_as_segmentation(self.ctx, path, f"{case} prediction", self._foreground_classes())
                self.prediction_nodes[case] = nodes[case]
        return nodes

    def export_dicom_seg(self, predictions: Path | str | None = None, partial_labels: bool = False):
        """The predictions (default: the latest) and optionally the partial annotations of the DICOM cases as
        DICOM SEG objects beside their NIfTI files; returns what was written and what was skipped, with why."""
        from ..dicom.seg import export_segs, latest_predictions_dir

        folder = Path(predictions) if predictions else latest_predictions_dir(self.logic.project)
        if folder is None and not partial_labels:
            raise ProjectError("no predictions yet: predict all cases first")
        return export_segs(self.logic.project, folder, partial_labels)

    def export_model(self, destination: Path | str) -> Path:
        """Zip the latest model as stock nnU-Net v2 and SlicerNNUnet load it (see ``nnunet/export.py``).

        Only dataset.json, plans.json and the final checkpoints go in (renamed to nnU-Net's own
        trainer), never maps, scores, logs or anything reached through a symbolic link.
        """
        from ..nnunet.export import ExportError, export_model

        try:
            return export_model(self.latest_model().model_folder, destination).archive
        except ExportError as e:
            raise ProjectError(str(e)) from e
