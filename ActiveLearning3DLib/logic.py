"""The headless logic: one class that the Slicer module, the Python console, the CLI and simulations share.

Example (Slicer's Python console or any script)::

    from ActiveLearning3DLib import ActiveLearningLogic
    logic = ActiveLearningLogic.create("~/al/hippo", images="imagesTr", labels="labelsTr")
    logic.query("nnactive_start", count=20)     # loop 0: the starting budget
    box = logic.pending_boxes()[0]
    logic.submit(box, labels_of_the_box)       # merged into the partial map and saved at once
    logic.status()
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from .aggregation import Pick
from .boxes import Box, Shape3, centred_corner, effective_patch_size
from .jobs import Job, make_runner

if TYPE_CHECKING:  # pragma: no cover
    from .embeddings import AutoencoderSettings, EmbeddingSet, EmbeddingStage
    from .jobs import JobRunner
    from .pipeline import LoopPipeline, LoopSettings
from .fileio import JsonFileError, atomic_write_json, read_json, read_json_object
from .locking import holder_gone, owner_info, pid_namespace, this_host
from .nnunet.paths import NnunetPaths
from .partial_labels import MergeResult
from .prefill import box_effort, effort_totals, prefill_model, read_prediction_box, uncertainty_map
from .project import BoxRecord, BoxState, LoopConflict, LoopFile, Project, ProjectError, now_iso
from .project import BudgetSettings  # noqa: F401  (front ends take the store's records from the logic)
from .query_methods import DEFAULT_METHOD, PESpatialOptions, QueryContext, get_method
from .query_methods.base import no_progress
from .query_methods.clasp import clasp_beta
from .scores import ScoreStore
from .uncertainty import FolderProbabilities, ProbabilitySource

ORACLE = "oracle"
CLAIMS_FILE = "claims.json"
CLAIM_TTL = 1800.0  # seconds a claim lasts unless refreshed; a holder on this host that ends releases it at once


class BoxClaimed(ProjectError):
    """A box that another annotator has open; choose another box or wait until they submit or close it."""


@dataclass(frozen=True)
class BoxClaim:
    """A box open in one annotator's view: who (name, host, process), since when, and until when unless refreshed.

    A claim belongs to a process, so the panel and the Python console of one
    Slicer are one annotator; it ends when the process submits, skips or
    releases the box, when the process ends (seen at once on its own host) or
    when it is not refreshed for its time to live (the only test across hosts).
    """

    box: str
    annotator: str
    host: str
    pid: int
    since: str
    expires: float
    pid_started: str | None = None
    pid_namespace: str | None = None

    @property
    def mine(self) -> bool:
        return self.host == this_host() and self.pid == os.getpid() and self.pid_namespace == pid_namespace()

    @property
    def live(self) -> bool:
        return time.time() < self.expires and not holder_gone(
            {"host": self.host, "pid": self.pid, "pid_started": self.pid_started, "pid_namespace": self.pid_namespace}
        )

    def describe(self) -> str:
        return f"{self.annotator!r} (pid {self.pid} on {self.host}) since {self.since}"

    @classmethod
    def from_json(cls, box: str, d: dict) -> "BoxClaim":
        return cls(
            box,
            str(d["annotator"]),
            str(d["host"]),
            int(d["pid"]),
            str(d.get("since", "")),
            float(d["expires"]),
            d.get("pid_started"),
            d.get("pid_namespace"),
        )


@dataclass
class ProjectStatus:
    """A snapshot of a project: data, loops and annotation progress."""

    name: str
    path: str
    pool_cases: int
    test_cases: int
    classes: dict[int, str]
    patch_size: Shape3
    has_ground_truth: bool
    loops: int
    boxes: int
    pending: int
    annotated: int
    skipped: int
    annotated_voxels: int
    next_step: str
    per_loop: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["classes"] = {str(k): v for k, v in self.classes.items()}
        d["patch_size"] = list(self.patch_size)
        return d

    def __str__(self) -> str:
        classes = ", ".join(f"{k}={v}" for k, v in self.classes.items())
        lines = [
            f"project {self.name} ({self.path})",
            f"  cases: {self.pool_cases} pool, {self.test_cases} test; classes: {classes}",
            f"  patch size: {' x '.join(map(str, self.patch_size))}; ground truth: {'yes' if self.has_ground_truth else 'no'}",
            f"  loops: {self.loops}; boxes: {self.boxes} ({self.annotated} annotated, {self.pending} pending, "
            f"{self.skipped} skipped); annotated voxels: {self.annotated_voxels}",
        ]
        for loop in self.per_loop:
            lines.append(
                f"    loop {loop['loop']}: {loop['method']}, {loop['boxes']} boxes, {loop['pending']} pending"
                + describe_effort(loop.get("effort"))
            )
        lines.append(f"  next: {self.next_step}")
        return "\n".join(lines)


class ActiveLearningLogic:
    """Create or open a project, query boxes, take annotations, and report status.

    Every change is saved at once and atomically: an annotation is in the partial
    label map on disk before :meth:`submit` returns, so nothing is lost on a crash.
    """

    def __init__(self, project: Project):
        self.project = project

    # ------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: Path | str, images: Path | str, labels: Path | str | None = None, **options) -> "ActiveLearningLogic":
        """Create a project (see :meth:`Project.create` for the options) and return its logic."""
        return cls(Project.create(path, images, labels, **options))

    @classmethod
    def open(cls, path: Path | str) -> "ActiveLearningLogic":
        return cls(Project.open(path))

    # ---------------------------------------------------------------- reading
    def loop_files(self) -> list[LoopFile]:
        return self.project.loops()

    def boxes(self, loop: int | None = None) -> list[BoxRecord]:
        """All boxes, or those of one loop, in query order."""
        if loop is None:
            return self.project.all_boxes()
        return list(self.project.read_loop(loop).boxes)

    def pending_boxes(self, loop: int | None = None) -> list[BoxRecord]:
        """The boxes still to annotate or skip (all loops', or ``loop``'s), in query order."""
        return [b for b in self.boxes(loop) if b.state == BoxState.PENDING]

    def pending_refusal(self) -> str | None:
        """Why no new loop may be queried or trained yet (boxes still pending), or None when nothing is pending.

        The one wording of this rule: the query refuses with it, and so do the
        command line and the panel before they start a loop.
        """
        pending = self.pending_boxes()
        if not pending:
            return None
        return f"{len(pending)} boxes of loop {pending[0].loop} are still pending; annotate or skip them first"

    def next_pending(
        self,
        case: str | None = None,
        after: str | None = None,
        loop: int | None = None,
        free: Callable[[BoxRecord], bool] | None = None,
    ) -> BoxRecord | None:
        """The next pending box (``loop``'s only when given), without claiming it (None when there is none).

        Prefers a box of ``case`` (fewer volume loads) and a box other than
        ``after``; ``free`` leaves out boxes another annotator has open.
        """
        candidates = [b for b in self.pending_boxes(loop) if free is None or free(b)]
        same_case = [b for b in candidates if b.case == case and b.id != after]
        return (same_case or [b for b in candidates if b.id != after] or candidates or [None])[0]

    def find_box(self, box: BoxRecord | str) -> BoxRecord:
        """The current record of a box, by record or by id ``"LLL-IIII"``."""
        box_id = _box_id(box)
        try:
            loop, index = (int(x) for x in box_id.split("-"))
            return self.project.read_loop(loop).boxes[index]
        except (ValueError, IndexError, FileNotFoundError):
            raise ProjectError(f"{self.project.path}: no box {box_id!r}") from None

    def status(self) -> ProjectStatus:
        p = self.project
        loops = p.loops()
        records = [b for loop in loops for b in loop.boxes]
        count = {s: sum(1 for b in records if b.state == s) for s in BoxState}
        if not loops:
            next_step = "query the starting budget (loop 0)"
        elif count[BoxState.PENDING]:
            next_step = f"annotate or skip {count[BoxState.PENDING]} pending boxes"
        else:
            next_step = f"query loop {loops[-1].loop + 1}"
        return ProjectStatus(
            name=p.name,
            path=str(p.path),
            pool_cases=len(p.pool_cases),
            test_cases=len(p.test_cases),
            classes=dict(p.classes),
            patch_size=p.patch_size,
            has_ground_truth=p.has_ground_truth,
            loops=len(loops),
            boxes=len(records),
            pending=count[BoxState.PENDING],
            annotated=count[BoxState.ANNOTATED],
            skipped=count[BoxState.SKIPPED],
            annotated_voxels=sum(b.box.voxels for b in records if b.state == BoxState.ANNOTATED),
            next_step=next_step,
            per_loop=[
                {
                    "loop": lp.loop,
                    "method": lp.method,
                    "boxes": len(lp.boxes),
                    "pending": lp.count(BoxState.PENDING),
                    "annotated": lp.count(BoxState.ANNOTATED),
                    "effort": effort_totals(lp.boxes),
                }
                for lp in loops
            ],
        )

    def annotated_foreground_fraction(self) -> float:
        """Fraction of all ground-truth foreground voxels of the pool that lie inside annotated boxes (FG-Eff's x)."""
        p = self.project
        total = p.pool_foreground_voxels
        if not p.has_ground_truth or total == 0:
            raise ProjectError(f"{p.path}: the foreground fraction needs ground truth with foreground")
        rows = p.annotated_foreground()
        return (rows[-1][2] if rows else 0) / total

    # ---------------------------------------------------------------- querying
    def query(
        self,
        method: str = DEFAULT_METHOD,
        count: int | None = None,
        seed: int | None = None,
        probabilities: ProbabilitySource | Path | str | None = None,
        scores: ScoreStore | Path | str | None = None,
        stride: Sequence[int] | None = None,
        n_per_image: int | None = None,
        progress: Callable[[Iterable, str], Iterable] = no_progress,
        info: dict | None = None,
        min_distance: float | None = None,
        autoencoder: "AutoencoderSettings | None" = None,
        distance_space: str = "voxels",
    ) -> LoopFile:
        """Choose the boxes of the next loop with ``method`` and save them as its loop file.

        Refuses while boxes of an earlier loop are pending, so that every query sees
        all annotations. ``seed`` defaults to the project seed; together with the
        loop index it fixes the query. ``info`` goes into the loop file (e.g. the model that scored the pool).
        """
        p = self.project
        query_method = get_method(method)
        _check_query_arguments(count, seed, stride, n_per_image)
        options = PESpatialOptions(min_distance, distance_space)  # pe_spatial's record; validates both; others ignore it
        wants_embeddings = query_method.wants_embeddings(options)
        refusal = self.pending_refusal()
        if refusal:
            raise ProjectError(f"{p.path}: {refusal}")
        count = p.settings.budget.query_size if count is None else count
        if not count:
            raise ProjectError(f"{p.path}: give the number of boxes (no query size in the project's budget)")
        if isinstance(probabilities, (str, Path)) and not Path(probabilities).is_dir():
            raise ProjectError(f"probabilities: {probabilities}: no such folder")
        if autoencoder is not None and autoencoder.encoder and wants_embeddings:
            from .embeddings.autoencoder import check_encoder

            check_encoder(autoencoder.encoder)  # before the pool autoencoder trains, not after
        if isinstance(probabilities, (str, Path)):
            probabilities = FolderProbabilities(probabilities)
        if isinstance(scores, (str, Path)):
            scores = ScoreStore(scores)
        loop = (p.loop_indices() or [-1])[-1] + 1
        seed = p.settings.seed if seed is None else int(seed)
        total_loops = max(p.settings.budget.loops, loop + 1)
        context = QueryContext(
            cases={c: p.cases[c].shape for c in p.pool_cases},
            patch_size=p.patch_size,
            foreground_classes=p.foreground_classes,
            seed=seed,
            loop=loop,
            total_loops=total_loops,
            blocked=[b.box for b in p.all_boxes()],
            probabilities=probabilities,
            scores=scores,
            ground_truth=p.read_ground_truth if p.has_ground_truth else None,
            label_counts={c: p.cases[c].label_counts for c in p.pool_cases} if p.has_ground_truth else None,
            stride=tuple(stride) if stride else None,  # type: ignore[arg-type]
            n_per_image=n_per_image,
            options=options,
            progress=progress,
        )
        if wants_embeddings:
            context.embeddings = self.pool_embeddings(autoencoder)  # cached per project; a background job the first time
        extra_info = dict(info or {})
        started = time.perf_counter()
        picks = query_method(context, count)
        info: dict = {"count": count, "seconds": round(time.perf_counter() - started, 3), "total_loops": total_loops}
        if query_method.needs_model and probabilities is not None:
            info["probabilities"] = str(getattr(probabilities, "root", "in memory"))
            info["members"] = len(probabilities.members())
        if query_method.needs_model and scores is not None:
            info["scores"] = str(scores.root)
        if method == "clasp_pe":
            info["beta"] = clasp_beta(loop - 1, total_loops)
        info.update(extra_info)
        loop_file = LoopFile(
            loop, method, seed, now_iso(), [_record(pick, loop, i, method) for i, pick in enumerate(picks)], info
        )
        with p.writing(f"query loop {loop}"):
            # The query ran without the lock (it may take minutes); what it saw must still hold. Another query
            # that finished first wins and this one fails, as it would have had it started a moment later
            # (its boxes would be pending): a second loop file beside it would hold boxes chosen without it.
            now = (p.loop_indices() or [-1])[-1] + 1
            if now != loop or p.loop_path(loop).exists():
                raise LoopConflict(
                    f"{p.path}: loop {now - 1} was written by another process while this query ran; "
                    f"this query of loop {loop} is not saved (annotate the new loop first)",
                    now - 1,
                )
            if [b.box for b in p.all_boxes()] != context.blocked:
                raise LoopConflict(
                    f"{p.path}: the boxes changed in another process while this query ran; "
                    f"this query of loop {loop} is not saved, run it again",
                    now - 1,
                )
            p.write_loop(loop_file)
        return loop_file

    # -------------------------------------------------------------------- jobs
    @property
    def jobs_dir(self) -> Path:
        return self.project.jobs_dir

    def jobs(self, runner: "JobRunner | None" = None) -> list[Job]:
        """The project's background jobs, oldest first, each checked by ``runner`` (default: a local one) for a
        worker that died silently."""
        if not self.jobs_dir.is_dir():
            return []
        runner = runner or _default_runner()
        jobs = [Job(p) for p in sorted(self.jobs_dir.iterdir()) if (p / "job.json").is_file()]
        for job in jobs:
            runner.refresh(job)
        return sorted(jobs, key=lambda j: j.spec().created)

    def loop_pipeline(self, settings: "LoopSettings | None" = None, runner: "JobRunner | None" = None) -> "LoopPipeline":
        """The background stages of the next loop (train, evaluate, score, query) for these annotations.

        Call ``.run()`` to block until done (scripts) or ``.advance()`` from a timer (the GUI).
        """
        from .pipeline import LoopPipeline

        return LoopPipeline(self.project, self.query, settings, runner)

    def cancel_jobs(self, runner: "JobRunner | None" = None) -> list[Job]:
        """Cancel every queued or running job of the project through ``runner`` (default: a local one, which
        kills whole process trees by the pids in the job folders); returns those cancelled."""
        runner = runner or _default_runner()
        cancelled = []
        for job in self.jobs(runner):
            if not job.status().final:
                runner.cancel(job)
                cancelled.append(job)
        return cancelled

    # -------------------------------------------------------------- annotating
    def submit(
        self,
        box: BoxRecord | str,
        labels: np.ndarray,
        annotator: str = "user",
        seconds: float | None = None,
        prefill_shown: bool | None = None,
    ) -> MergeResult:
        """Merge an annotation of a box into the partial map, save it, and mark the box annotated.

        ``labels`` is the box's label array (its size) or a label array of the whole
        image (only the box is taken; painted voxels outside are counted in
        ``dropped_outside``). Submitting an annotated box again replaces its labels.

        The box's record keeps what was changed against the start (``effort``,
        see :func:`~.prefill.box_effort`): the pre-fill when ``prefill_shown``
        (None: shown whenever a model predicted the box, as :meth:`prefill`
        gives it; the oracle's case), else an empty box.
        """
        if not isinstance(annotator, str) or not annotator.strip():
            raise ValueError(f"annotator: expected a non-empty name, got {annotator!r}")
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not np.isfinite(seconds) or seconds < 0
        ):
            raise ValueError(f"seconds: expected a non-negative number of seconds or None, got {seconds!r}")
        if prefill_shown is not None and not isinstance(prefill_shown, (bool, np.bool_)):
            raise ValueError(f"prefill_shown: expected True, False or None, got {prefill_shown!r}")
        labels = np.asarray(labels)
        if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
            raise ValueError(f"labels: expected an integer label array, got dtype {labels.dtype}")
        box_id = _box_id(box)
        with self.project.writing(f"submit box {box_id}"):  # labels and the box's state land together
            record = self.find_box(box)
            self._refuse_if_claimed(record, "submit")
            result = self.project.merge_annotation(record.box, labels)  # on disk before the record changes
            record.state, record.annotator, record.annotated_at = BoxState.ANNOTATED, annotator, now_iso()
            record.seconds = seconds
            record.effort = self._effort(record, labels, prefill_shown)
            self.project.update_box(record)
            self._drop_claim(record.id)
        return result

    # --------------------------------------------------------------- pre-fill
    def prefill_model(self, box: BoxRecord | str) -> Path | None:
        """The model folder whose stored pool prediction pre-fills ``box``: the newest trained before the box's loop
        that predicted its image (None for a loop-0 box, or before any model scored the pool)."""
        record = self.find_box(box)
        return prefill_model(NnunetPaths.for_project(self.project).results_root, record.case, record.loop)

    def prefill(self, box: BoxRecord | str) -> np.ndarray:
        """The labels ``box`` opens with (its size): the newest model's prediction inside it, zeros without a model.

        Paint your corrections into a copy and :meth:`submit` it; the box's record
        then counts the voxels you changed.
        """
        record = self.find_box(box)
        labels, _ = self._prefill(record)
        return np.zeros(record.box.size, dtype=np.uint8) if labels is None else labels

    def _prefill(self, record: BoxRecord) -> tuple[np.ndarray | None, str | None]:
        model = prefill_model(NnunetPaths.for_project(self.project).results_root, record.case, record.loop)
        if model is None:
            return None, None
        return read_prediction_box(model, record.box, self.project.cases[record.case].shape), model.name

    def _effort(self, record: BoxRecord, labels: np.ndarray, shown: bool | None) -> dict:
        """The effort record of a submitted box (its labels, whole image or box): changes against the start."""
        inside = labels[record.box.slices] if labels.shape != tuple(record.box.size) else labels
        prefill, model = self._prefill(record)
        shown = prefill is not None if shown is None else bool(shown) and prefill is not None
        start = prefill if shown else np.zeros(inside.shape, dtype=np.uint8)
        return box_effort(start, inside, prefill, self.project.foreground_classes, shown, model)

    def effort_per_loop(self) -> list[dict]:
        """Per loop, totals of the annotated boxes' effort records (:func:`~.prefill.effort_totals`)."""
        return [{"loop": loop.loop, **effort_totals(loop.boxes)} for loop in self.project.loops()]

    def effort_of_loop(self, loop: int | None) -> dict:
        """One loop's effort totals (zeros for a loop that has none, or before any loop)."""
        found = [t for t in self.effort_per_loop() if t["loop"] == loop]
        return found[0] if found else {"loop": loop, **effort_totals([])}

    # ------------------------------------------------------------ model output
    def uncertainty_map(self, case: str) -> Path | None:
        """The predictive-entropy map of ``case`` by the newest model that scored the pool (None before any did)."""
        return uncertainty_map(NnunetPaths.for_project(self.project).results_root, case)

    def export_model(self, model_folder: Path | str, destination: Path | str) -> Path:
        """Zip a trained model folder as stock nnU-Net v2 and SlicerNNUnet load it (see ``nnunet/export.py``)."""
        from .nnunet.export import ExportError, export_model

        try:
            return export_model(model_folder, destination).archive
        except ExportError as e:
            raise ProjectError(str(e)) from e

    def export_dicom_seg(self, predictions: Path | str | None = None, partial_labels: bool = False):
        """The predictions (default: the latest) and optionally the partial annotations of the DICOM cases as
        DICOM SEG objects beside their NIfTI files; returns what was written and what was skipped, with why."""
        from .dicom.seg import export_segs, latest_predictions_dir

        folder = Path(predictions) if predictions else latest_predictions_dir(self.project)
        if folder is None and not partial_labels:
            raise ProjectError("no predictions yet: predict all cases first")
        return export_segs(self.project, folder, partial_labels)

    def embedding_stage(self, autoencoder: "AutoencoderSettings | None" = None) -> "EmbeddingStage":
        """The pool embeddings' stage (default autoencoder settings: the project seed's): its cache and its job.

        The one way to them: the query waits on it (:meth:`pool_embeddings`), a
        loop pipeline and the panel's label-free start submit its job and poll.
        """
        from .embeddings import EmbeddingStage

        return EmbeddingStage(self.project, autoencoder)

    def pool_embeddings(
        self, autoencoder: "AutoencoderSettings | None" = None, runner: "JobRunner | None" = None
    ) -> "EmbeddingSet":
        """The pool embeddings, blocking: cached, else their stage's job run through ``runner`` (default: a local
        one, one job at a time) and waited for."""
        return self.embedding_stage(autoencoder).run(runner)

    def starting_embeddings(
        self, method: str, runner: "JobRunner | None" = None
    ) -> "tuple[AutoencoderSettings | None, Job | None]":
        """What a query by ``method`` needs first: the pool autoencoder's settings for :meth:`query` (None: the
        method reads no embeddings) and the stage's job that computes the embeddings (None: not needed, or
        cached), its threads ``runner``'s share of a slot."""
        if not get_method(method).needs_embeddings:
            return None, None
        stage = self.embedding_stage()
        return stage.settings, stage.job(runner)

    # ---------------------------------------------------------- front ends
    def read_front_end_settings(self, name: str, what: str = "settings") -> dict | None:
        """A front end's saved choices (e.g. the panel's ``panel.json``) in the project folder; None before any
        were saved. A damaged file is refused naming it (``what`` says whose settings they are)."""
        path = self.project.path / name
        if not path.is_file():
            return None
        try:
            return read_json_object(path)
        except JsonFileError as e:
            raise ProjectError(f"{path}: damaged {what} ({e.problem})") from e
        except OSError as e:
            raise ProjectError(f"{path}: unreadable {what} ({e.strerror or e})") from e

    def save_front_end_settings(self, name: str, data: dict) -> None:
        """Save a front end's choices in the project folder (atomically), so reopening continues as it was."""
        atomic_write_json(self.project.path / name, data)

    def add_box(self, case: str, center: Sequence[int]) -> BoxRecord:
        """Add a pending box of the patch size centred on voxel ``center`` (k, j, i) to the current loop.

        An annotator-chosen query (``source="annotator"``): the box is shifted to lie
        inside the image and is annotated like a queried one.
        """
        p = self.project
        if case not in p.pool_cases:
            raise ProjectError(f"{p.path}: {case!r} is not a pool case; boxes are only added to pool images")
        loops = p.loop_indices()
        if not loops:
            raise ProjectError(f"{p.path}: query the starting budget (loop 0) before adding boxes by hand")
        shape = p.cases[case].shape
        if (
            isinstance(center, (str, bytes))
            or len(center) != 3
            or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in center)
        ):
            raise ProjectError(f"center: expected three whole voxel indices (k, j, i), got {center!r}")
        if any(not 0 <= int(c) < n for c, n in zip(center, shape)):
            raise ProjectError(f"{p.path}: voxel {list(center)} lies outside {case!r} of shape {list(shape)}")
        size = effective_patch_size(p.patch_size, shape)
        corner = centred_corner([int(c) for c in center], size, shape)
        new_box = Box(case, corner, size)
        with p.writing(f"add a box to {case}"):  # the overlap check and the append see the same loop files
            clash = next((b for b in p.all_boxes() if b.case == case and b.box.overlaps(new_box)), None)
            if clash is not None:
                raise ProjectError(
                    f"{p.path}: a box at {list(corner)} size {list(size)} would overlap box {clash.id} "
                    f"({clash.state}) of {case!r}; no box may overlap another"
                )
            loop_file = p.read_loop(p.loop_indices()[-1])
            record = BoxRecord(Box(case, corner, size), loop_file.loop, len(loop_file.boxes), "annotator", source="annotator")
            loop_file.boxes.append(record)
            p.write_loop(loop_file)
        return record

    def skip(self, box: BoxRecord | str) -> BoxRecord:
        """Mark a pending box skipped (it stays out of the partial labels, and no later box overlaps it)."""
        box_id = _box_id(box)
        with self.project.writing(f"skip box {box_id}"):
            record = self.find_box(box)
            if record.state == BoxState.ANNOTATED:
                raise ProjectError(f"box {record.id} is already annotated; submit it again to change its labels")
            self._refuse_if_claimed(record, "skip")
            record.state = BoxState.SKIPPED
            self.project.update_box(record)
            self._drop_claim(record.id)
        return record

    def annotate_with_oracle(
        self, boxes: Sequence[BoxRecord] | None = None, progress: Callable[[Iterable, str], Iterable] = no_progress
    ) -> list[MergeResult]:
        """Simulation: copy the ground truth into every pending box (or the given ones), saving each at once.

        Resumable: after a crash the boxes already done are annotated and the rest are still pending.
        Without ``boxes``, a box that another process annotated, skipped or has open
        (claimed) meanwhile is left to it, so two oracles at once share the work.
        """
        if not self.project.has_ground_truth:
            raise ProjectError(f"{self.project.path}: the oracle needs ground truth; this project was created without labels")
        todo = list(boxes) if boxes is not None else self.pending_boxes()
        results = []
        cache: dict[str, np.ndarray] = {}
        for record in progress(todo, "oracle annotation"):
            if record.case not in cache:
                cache.clear()  # boxes come grouped by query order; keep one case in memory
                cache[record.case] = self.project.read_ground_truth(record.case)
            with self.project.writing(f"oracle annotation of box {record.id}"):
                if boxes is None:
                    current = self.find_box(record.id)
                    claim = self.claims().get(record.id)
                    if current.state != BoxState.PENDING or (claim is not None and not claim.mine):
                        continue
                results.append(self.submit(record, cache[record.case][record.box.slices], ORACLE))
        return results

    # ------------------------------------------------------------------ claims
    @property
    def claims_path(self) -> Path:
        return self.project.path / CLAIMS_FILE

    def claims(self) -> dict[str, BoxClaim]:
        """The live claims by box id (expired ones and those of ended processes are left out)."""
        if not self.claims_path.is_file():
            return {}
        try:
            data = read_json(self.claims_path)
            found = {str(k): BoxClaim.from_json(str(k), v) for k, v in dict(data).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # a damaged claims file holds no claim: claims are advisory and renewed while a box is open
        return {k: c for k, c in found.items() if c.live}

    def claim(self, box: BoxRecord | str, annotator: str = "user", ttl: float = CLAIM_TTL) -> BoxRecord:
        """Claim a box for this process while it is open in a view (again: refresh); release its other claims.

        Raises :class:`BoxClaimed` naming the holder when another live process has it open.
        """
        box_id = _box_id(box)
        with self.project.writing(f"claim box {box_id}"):
            record = self.find_box(box)
            claims = self.claims()
            other = claims.get(record.id)
            if other is not None and not other.mine:
                raise BoxClaimed(
                    f"{self.project.path}: box {record.id} is open by {other.describe()}; "
                    "choose another box or wait until it is submitted or closed"
                )
            claims = {k: c for k, c in claims.items() if not c.mine}
            info = owner_info(f"claim {record.id}")
            claims[record.id] = BoxClaim(
                record.id,
                annotator,
                info["host"],
                info["pid"],
                info["time"],
                time.time() + float(ttl),
                info["pid_started"],
                info["pid_namespace"],
            )
            self._write_claims(claims)
        return record

    def claim_next_pending(
        self,
        annotator: str = "user",
        case: str | None = None,
        after: str | None = None,
        loop: int | None = None,
        ttl: float = CLAIM_TTL,
    ) -> BoxRecord | None:
        """Claim and return the next pending box nobody else has open (None when there is none).

        Prefers ``case`` (fewer volume loads) and a box other than ``after``; only
        ``loop``'s boxes when given. Choosing and claiming are one step under the
        project lock, so two annotators asking at once get different boxes.
        """
        with self.project.writing("claim the next pending box"):
            claims = self.claims()
            record = self.next_pending(case, after, loop, free=lambda b: b.id not in claims or claims[b.id].mine)
            return None if record is None else self.claim(record, annotator, ttl)

    def release(self, box: BoxRecord | str | None = None) -> None:
        """Release this process's claim of a box (None: all of them), e.g. when its view closes."""
        box_id = None if box is None else (box if isinstance(box, str) else box.id)
        with self.project.writing("release claims"):
            claims = self.claims()
            kept = {k: c for k, c in claims.items() if not (c.mine and (box_id is None or k == box_id))}
            if kept != claims:
                self._write_claims(kept)

    def _refuse_if_claimed(self, record: BoxRecord, action: str) -> None:
        claim = self.claims().get(record.id)
        if claim is not None and not claim.mine:
            raise BoxClaimed(
                f"{self.project.path}: cannot {action} box {record.id}: it is open by {claim.describe()}; "
                "it is free once they submit or close it, or their claim expires"
            )

    def _drop_claim(self, box_id: str) -> None:
        claims = self.claims()
        if box_id in claims:
            del claims[box_id]
            self._write_claims(claims)

    def _write_claims(self, claims: dict[str, BoxClaim]) -> None:
        atomic_write_json(self.claims_path, {k: {f: v for f, v in asdict(c).items() if f != "box"} for k, c in claims.items()})

    def __repr__(self) -> str:
        s = self.status()
        return (
            f"<ActiveLearningLogic {s.name!r}: {s.pool_cases} pool cases, {s.loops} loops, "
            f"{s.annotated}/{s.boxes} boxes annotated, next: {s.next_step}>"
        )


def describe_effort(totals: dict | None) -> str:
    """A loop's effort totals for the status line ('' when no box recorded any)."""
    if not totals or not totals.get("boxes_with_effort"):
        return ""
    text = f"; corrected {totals['corrected_voxels']} of {totals['box_voxels']} voxels"
    if totals.get("foreground_voxels") and totals.get("prefill_shown"):
        text += f" ({totals['foreground_voxels']} painting from empty)"
    text += f", pre-filled {totals['prefill_shown']} of {totals['boxes_with_effort']}"
    if totals.get("mean_prefill_dice") is not None:
        text += f", pre-fill Dice {totals['mean_prefill_dice']:.3f}"
    if totals.get("seconds") is not None:
        text += f", {totals['seconds']:.0f} s recorded"
    return text


def _box_id(box) -> str:
    """The id of a box given as a record or an id; anything else is refused naming the argument."""
    if not isinstance(box, (str, BoxRecord)):
        raise ValueError(f"box: expected a box record or an id such as '000-0003', got {type(box).__name__}")
    return box if isinstance(box, str) else box.id


def _whole(value, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _check_query_arguments(count, seed, stride, n_per_image) -> None:
    """The query's arguments, as strictly as the command line checks its options (one error naming the argument)."""
    if count is not None and not _whole(count, 1):
        raise ValueError(f"count: expected a whole number of boxes of at least 1 (or None: the query size), got {count!r}")
    if seed is not None and not _whole(seed, 0):
        raise ValueError(f"seed: expected a non-negative whole number, got {seed!r}")
    if stride is not None and (isinstance(stride, (str, bytes)) or len(stride) != 3 or not all(_whole(s, 1) for s in stride)):
        raise ValueError(f"stride: expected three positive whole numbers (Z Y X), got {stride!r}")
    if n_per_image is not None and not _whole(n_per_image, 1):
        raise ValueError(f"n_per_image: expected a whole number of at least 1, got {n_per_image!r}")


def _record(pick: Pick, loop: int, index: int, method: str) -> BoxRecord:
    return BoxRecord(pick.box, loop, index, method, score=pick.score, priority=pick.priority, stratum=pick.stratum)


def _default_runner() -> "JobRunner":
    """The runner that judges and cancels jobs when the caller names none: a local one (it starts nothing here)."""
    return make_runner()
