"""The annotation core of the panel: no Qt, no MRML, only the logic.

Settings, the query table, counts, the next pending box, submit and skip, the
loop and its background jobs: what any front end offers around the labels an
annotator paints. The Slicer panel adds a view on top
(:class:`~.controller.AnnotationController`: volume, ROI nodes, segments, heat
map); a console user (or another front end) drives this core alone, with label
arrays instead of segments::

    from ActiveLearning3DLib.gui.annotation import AnnotationSession
    s = AnnotationSession.open("~/al/hippo")
    box = s.open_box(s.next_pending().id)     # claimed for this annotator
    labels = s.starting_labels()              # the box's labels to start from (its size)
    ...paint into labels...
    s.submit_labels(labels)                   # merged into the partial labels, saved, next box opened
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..jobs import Job, JobRunner, JobState, JobStatus, RunnerSettings, make_runner
from ..logic import (
    CLAIM_TTL,
    DEFAULT_METHOD,
    ActiveLearningLogic,
    BoxRecord,
    BoxState,
    BudgetSettings,
    ProjectError,
    describe_effort,
)
from ..pipeline import DEFAULT_INIT, LoopPipeline, LoopSettings, PipelineState

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
            colors[int(value)] = tuple(int(code[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[assignment]
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
    init: str = DEFAULT_INIT  # "warm": each loop's members start from the previous loop's (LoopSettings.init)
    # worker interpreter: the module sets PythonSlicer from the user's own settings. Never read from or written to
    # panel.json (USER_ONLY): a project folder is shared, and one that named an interpreter would run it.
    python: str | None = None

    def loop_settings(self) -> LoopSettings:
        """The loop these settings start: the one place a front end's settings become the pipeline's."""
        return LoopSettings(
            profile=self.profile,
            device=self.device,
            parallel=self.parallel,
            method=self.method,
            count=self.query_size,
            python=self.python,
            init=self.init,
        )


# The Slicer panel's fields (its parameter node in ActiveLearning3D.py) that hold a panel setting: field -> setting.
# They are saved before a loop starts and come back when a project opens (settings_from_fields, fields_from_settings).
# A test checks the parameter node's fields against these two tables and PanelSettings, so that a field added to
# one and not the others fails.
PANEL_FIELDS = {
    "method": "method",
    "device": "device",
    "profile": "profile",
    "init": "init",
    "querySize": "query_size",
    "parallel": "parallel",
    "prefill": "prefill",
    "python": "python",
}
# The panel's other fields: what a new project is made from (startMethod and classNames are saved with it as
# start_method and class_colors, by new_project) and what one action takes; None: not a panel setting.
CREATION_FIELDS = {
    "projectPath": None,
    "imagesPath": None,
    "labelsPath": None,
    "classNames": "class_colors",
    "patchSize": None,
    "startMethod": "start_method",
    "exportPartialLabels": None,
}


def settings_from_fields(fields: Any) -> dict[str, Any]:
    """The panel settings that the panel's fields hold (``fields``: its parameter node, or any object with those
    names), for :meth:`AnnotationSession.save_settings`: an empty interpreter and 0 parallel jobs mean the default."""
    values = {setting: getattr(fields, name) for name, setting in PANEL_FIELDS.items()}
    values["python"] = values["python"] or None
    values["parallel"] = values["parallel"] or None
    values["prefill"] = bool(values["prefill"])
    return values


def fields_from_settings(settings: PanelSettings, offered: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """What an opened project's settings put into the panel's fields: a choice only when its list offers it
    (``offered``: field -> the combo box's items), the query size when the project has one, no parallel limit as
    0; never the interpreter (the user's own, see USER_ONLY)."""
    values: dict[str, Any] = {}
    for name, setting in PANEL_FIELDS.items():
        value = getattr(settings, setting)
        if setting in USER_ONLY or (name in offered and value not in offered[name]):
            continue
        if setting == "query_size":
            if value:
                values[name] = int(value)
        elif setting == "parallel":
            values[name] = int(value or 0)
        elif setting == "prefill":
            values[name] = bool(value)
        else:
            values[name] = value
    return values


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
        return (
            f"{self.dropped_outside} painted voxels lay outside box {self.box.id} and were not merged "
            "(only the inside of a queried box is annotated)"
        )


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
    return {
        "name": name,
        "state": status.state,
        "progress": status.progress,
        "stage": status.stage,
        "epoch": status.epoch,
        "message": status.message,
    }


def _effort_line(totals: dict) -> str:
    """One loop's effort totals in a line ('' when no box of the loop recorded any)."""
    text = describe_effort(totals)
    return f"loop {totals['loop']}: {totals['boxes']} boxes annotated" + text if text else ""


def new_project(
    path: Path | str,
    images: Path | str,
    labels: Path | str | None = None,
    class_names: Mapping[int, str] | None = None,
    class_colors: Mapping[int, Sequence[float]] | None = None,
    patch_size: Sequence[int] | None = None,
    method: str = DEFAULT_METHOD,
    query_size: int = 20,
    start_method: str | None = None,
    **project_options: Any,
) -> ActiveLearningLogic:
    """Create a project from the panel's inputs and save its panel settings (the starting budget is not queried)."""
    budget = BudgetSettings(query_size=int(query_size))
    logic = ActiveLearningLogic.create(
        path, images, labels, patch_size=patch_size, classes=class_names, budget=budget, **project_options
    )
    settings = PanelSettings(
        method=method,
        start_method=start_method or PanelSettings.start_method,
        query_size=int(query_size),
        class_colors={str(k): list(map(float, v)) for k, v in (class_colors or {}).items()},
    )
    logic.save_front_end_settings(PANEL_SETTINGS, _project_side(settings))
    return logic


class AnnotationSession:
    """One annotator's work on a project through the logic: table, boxes, submit, the loop and its jobs."""

    def __init__(self, logic: ActiveLearningLogic, runner=None):
        self.logic = logic
        if runner is None:  # a project set to run its jobs on Slurm (al3d ... --runner slurm) submits from here too
            from ..jobs.slurm import project_runner

            runner = project_runner(logic.project.path)
        self.runner = runner
        self.settings = self._read_settings()
        self.case: str | None = None  # the case of the open box (the next box prefers it: fewer volume loads)
        self.current: BoxRecord | None = None
        self.pipeline: LoopPipeline | None = None
        self._watched: tuple[Job, str, Callable[[], str]] | None = None  # one job outside a loop (embeddings, predictions)
        self._shown_at: float | None = None
        self.prefill_shown = False  # whether the open box started from the model's prediction (recorded at submit)
        self.annotator = "user"  # the name other annotators of a shared project see on the box this one has open
        self._claimed_at: float | None = None

    # ---------------------------------------------------------------- projects
    @classmethod
    def create(
        cls,
        path: Path | str,
        images: Path | str,
        labels: Path | str | None = None,
        start_count: int | None = None,
        runner=None,
        **options: Any,
    ) -> "AnnotationSession":
        """Create a project (``options``: those of :func:`new_project`) and query its starting budget (loop 0)."""
        session = cls(new_project(path, images, labels, **options), runner)
        session.begin_starting_budget(session.settings.start_method, start_count or session.settings.query_size)
        return session

    @classmethod
    def open(cls, path: Path | str, runner=None) -> "AnnotationSession":
        """Open a project and continue where it stopped (table, states, settings come from its files)."""
        return cls(ActiveLearningLogic.open(path), runner)

    def _read_settings(self) -> PanelSettings:
        data = self.logic.read_front_end_settings(PANEL_SETTINGS, "panel settings")
        if data is None:
            return PanelSettings(query_size=self.logic.project.settings.budget.query_size)
        known = set(PanelSettings.__dataclass_fields__) - set(USER_ONLY)  # "python" from a project folder runs nothing
        return PanelSettings(**{k: v for k, v in data.items() if k in known})

    def save_settings(self, **changes: Any) -> PanelSettings:
        """Change and save panel settings (method, profile, device, parallel, python, ...)."""
        for key, value in changes.items():
            if key not in PanelSettings.__dataclass_fields__:
                raise ValueError(f"unknown panel setting {key!r}")
            setattr(self.settings, key, value)
        self.logic.save_front_end_settings(PANEL_SETTINGS, _project_side(self.settings))
        return self.settings

    def close(self) -> None:
        """Release the boxes this session has open, so that other annotators can take them."""
        try:
            self.logic.release()
        except OSError:  # a read-only project holds no claim of ours
            pass
        self.case = self.current = None

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
        counts = {state: sum(1 for r in rows if r.state == state) for state in BoxState}
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
            return self.logic.next_pending(case=self.case, after=after, loop=loop)

    # ---------------------------------------------------------------- the box
    def open_box(self, box_id: str) -> BoxRecord:
        """Make a box the current one; its annotation time runs from here to its submission.

        The box is claimed first (BoxClaimed names the annotator who has it open),
        and this session's earlier box released.
        """
        try:
            record = self.logic.claim(box_id, self.annotator)
            self._claimed_at = time.monotonic()
        except OSError:  # a read-only project (someone else's, on a share) can still be looked at
            record, self._claimed_at = self.logic.find_box(box_id), None
        self.current, self.case = record, record.case
        self.prefill_shown = False
        self._shown_at = time.monotonic()
        return record

    def starting_labels(self, record: BoxRecord | None = None) -> np.ndarray | None:
        """What the box (default: the current one) opens with, its size: its saved labels when annotated, else the
        newest model's prediction inside it when there is one and the ``prefill`` setting is on (None: empty).

        Asked for the current box, it records whether the pre-fill was shown (kept with the box at submit).
        """
        record = record or self._need_box()
        shown = self.current is not None and record.id == self.current.id
        if shown:
            self.prefill_shown = False
        if record.state == BoxState.ANNOTATED:
            return self.logic.project.read_partial_labels(record.case)[record.box.slices]
        if self.settings.prefill and self.logic.prefill_model(record) is not None:
            if shown:
                self.prefill_shown = True
            return self.logic.prefill(record)
        return None

    def submit_labels(
        self, labels: np.ndarray, annotator: str = "user", seconds: float | None = None, advance: bool = True
    ) -> SubmitResult:
        """Merge labels of the current box (its size, or the whole image: only the box is taken) into the partial
        labels, save at once, and open the next pending box (``next_box``; None when the loop is done).

        ``seconds`` (the annotation time recorded with the box) defaults to the time since the box was opened.
        """
        record = self._need_box()
        if seconds is None and self._shown_at is not None:
            seconds = round(time.monotonic() - self._shown_at, 1)
        started = time.perf_counter()
        result = self.logic.submit(record, labels, annotator=annotator, seconds=seconds, prefill_shown=self.prefill_shown)
        self.current = self.logic.find_box(record.id)
        self._box_changed(self.current)
        elapsed = time.perf_counter() - started
        following = self.next_pending(after=record.id) if advance else None
        if following is not None:
            self._advance_to(following)
        return SubmitResult(
            self.logic.find_box(record.id), result.voxels, result.foreground_voxels, result.dropped_outside, following, elapsed
        )

    def skip(self, advance: bool = True) -> BoxRecord | None:
        """Skip the current box and open the next pending one (returned; None when the loop is done)."""
        record = self._need_box()
        self._box_changed(self.logic.skip(record))
        following = self.next_pending(after=record.id) if advance else None
        if following is not None:
            self._advance_to(following)
        return following

    def _box_changed(self, record: BoxRecord) -> None:
        """After a submit or skip, before the next box opens: a front end with a view redraws the box."""

    def _advance_to(self, record: BoxRecord) -> None:
        """After a submit or skip: open the next box (a front end with a view shows it too)."""
        self.open_box(record.id)

    def add_box(self, case: str, voxel: Sequence[int]) -> BoxRecord:
        """Add a box of the patch size centred at a voxel (k, j, i) of a pool case (an annotator-chosen query)."""
        return self.logic.add_box(case, voxel)

    def _need_box(self) -> BoxRecord:
        if self.current is None:
            raise ProjectError("no box selected: go to a box first")
        return self.current

    # ------------------------------------------------------------------ effort
    def effort(self, loop: int | None = None) -> dict:
        """A loop's effort totals (default: the current loop): corrected voxels, pre-fills shown, their Dice, seconds."""
        return self.logic.effort_of_loop(self.current_loop() if loop is None else loop)

    def effort_text(self, loop: int | None = None) -> str:
        """The effort line of a loop (default: the current one; '' before a box of the loop recorded any)."""
        return _effort_line(self.effort(loop))

    def effort_summary(self) -> str:
        """The effort line of every loop that recorded any, oldest first (the panel's effort label; '' before any):
        a loop's totals stay in view after the next loop is queried."""
        return "\n".join(line for line in map(_effort_line, self.logic.effort_per_loop()) if line)

    # ---------------------------------------------------------- starting budget
    def begin_starting_budget(self, method: str, count: int) -> LoopProgress | None:
        """Query loop 0; a label-free method first has the pool autoencoder trained as a job (poll() finishes it):
        the embeddings stage's job, through this session's runner (the query then finds them cached)."""
        autoencoder, job = self.logic.starting_embeddings(method, self._job_runner())
        if job is None:
            self.logic.query(method, count, autoencoder=autoencoder)
            return None

        def query() -> str:
            loop = self.logic.query(method, count, autoencoder=autoencoder)
            return f"loop 0: {len(loop.boxes)} boxes by {method}"

        return self._watch(job, "embeddings", query)

    def _job_runner(self) -> JobRunner:
        if self.runner is None:
            self.runner = make_runner(RunnerSettings(python=self.settings.python, max_parallel=1))
        return self.runner

    def _watch(self, job: Job, stage: str, when_done: Callable[[], str]) -> LoopProgress:
        """Run one background job through the session's runner; poll() reports it and calls ``when_done`` after."""
        self._watched = (job, stage, when_done)
        self._job_runner().submit(job)
        return self.poll()

    def _poll_watched(self) -> LoopProgress:
        job, stage, when_done = self._watched
        self._job_runner().poll()
        status = self._job_runner().refresh(job)
        entry = [_job_entry(job.name, status)]
        if status.state == JobState.DONE:
            self._watched = None
            return LoopProgress(stage, "done", 100.0, when_done(), entry, "")
        if status.final:
            self._watched = None
            return LoopProgress(
                stage,
                "failed",
                round(100 * status.progress, 1),
                f"{job.name} {status.state}: {status.message}",
                entry,
                job.log_tail(12),
            )
        return LoopProgress(
            stage, "running", round(100 * status.progress, 1), status.message or f"{stage} running", entry, job.log_tail(12)
        )

    @property
    def busy(self) -> bool:
        """A loop, a label-free start or the final predictions run in the background."""
        return self.pipeline is not None or self._watched is not None

    # -------------------------------------------------------------------- loop
    def can_start_next_loop(self) -> bool:
        return not self.logic.pending_boxes() and any(b.state == BoxState.ANNOTATED for b in self.logic.boxes())

    def start_next_loop(self, settings: LoopSettings | None = None) -> LoopProgress:
        """Start training, evaluation, scoring and the next query as background jobs; poll() reports."""
        refusal = self.logic.pending_refusal()
        if refusal:
            raise ProjectError(refusal)
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
            if status.state in (JobState.RUNNING, JobState.FAILED):
                tail = Job(self.logic.jobs_dir / name).log_tail(12)
        return LoopProgress(
            state.stage, state.state, round(100 * state.progress, 1), state.message or state.describe(), jobs, tail
        )

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

    def uncertainty_map(self, case: str | None = None) -> Path:
        """The newest model's predictive-entropy map of a case (default: the open box's); refuses before any."""
        case = case or self.case
        if case is None:
            raise ProjectError("name a case or show one first")
        path = self.logic.uncertainty_map(case)
        if path is None:
            raise ProjectError(f"no uncertainty map of {case} yet: it is written when a loop scores the pool")
        return path

    def predict_all_cases(self, cases: Sequence[str] | None = None) -> LoopProgress:
        """Segment every case (or ``cases``) with the final ensemble as a background job that poll() follows.

        When it is done, the predictions lie in ``latest_model().predictions_dir``.
        """
        pipeline = self.latest_model()
        return self._watch(
            pipeline.prediction_job(cases), "prediction", lambda: f"predictions written to {pipeline.predictions_dir}"
        )

    def export_dicom_seg(self, predictions: Path | str | None = None, partial_labels: bool = False):
        """The predictions (default: the latest) and optionally the partial annotations of the DICOM cases as
        DICOM SEG objects beside their NIfTI files; returns what was written and what was skipped, with why."""
        return self.logic.export_dicom_seg(predictions, partial_labels)

    def export_model(self, destination: Path | str) -> Path:
        """Zip the latest model as stock nnU-Net v2 and SlicerNNUnet load it (see ``nnunet/export.py``).

        Only dataset.json, plans.json and the final checkpoints go in (renamed to nnU-Net's own
        trainer), never maps, scores, logs or anything reached through a symbolic link.
        """
        return self.logic.export_model(self.latest_model().model_folder, destination)
