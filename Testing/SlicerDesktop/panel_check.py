"""Check the Active Learning 3D panel inside the 3D Slicer desktop application, end to end, with a summary.

For people who have Slicer (5.8 or later). From the repository root::

    Slicer --no-main-window --testing --additional-module-paths ActiveLearning3D \\
        --python-script Testing/SlicerDesktop/panel_check.py --out /tmp/al3d-panel-check --install

(``--testing``: Slicer's message boxes close by themselves instead of waiting
for a click, and nothing asks to restart). Steps, each
reported PASS, FAIL (with a one-line reason) or SKIP (with what it needed):

1. dependencies: what the first use installs (PyTorch extension, torch,
   nnunetv2 and its requirements); with ``--install`` they are installed
   without asking (you asked on the command line), else only reported;
2. panel: the module's panel opens and its parameter node is bound;
3. project: a project on generated phantoms (``default_data.py``) is created
   through the panel's own button handler;
4. boxes: the starting boxes are in the table and in the scene as ROIs;
5. submit: one box is painted (the phantom's class 1 inside it) and submitted;
   its label file on disk changes; the other boxes are painted and submitted too;
   the effort label shows the loop's totals (boxes, corrected voxels, seconds);
6. loop: one loop with the ``test`` profile on the CPU (train, score, query)
   through the panel's Start button, until the next boxes are in the table;
   the next box opens pre-filled with the new model's prediction (the
   pre-fill checkbox is on);
7. export: the model is exported as a zip that stock nnU-Net loads.

The summary is printed and written to ``OUT/summary.json``; Slicer exits with
0 when every step passed, else 1. Only the argument parsing and the summary
work without Slicer (``Testing/test_slicer_desktop.py`` tests them and runs
this script when ``SLICER_EXECUTABLE`` is set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

STEPS = ("dependencies", "panel", "project", "boxes", "submit", "loop", "export")
NEEDS = {
    "panel": ("dependencies",),
    "project": ("panel",),
    "boxes": ("project",),
    "submit": ("boxes",),
    "loop": ("submit",),
    "export": ("loop",),
}


@dataclass
class Options:
    out: Path
    cases: int = 8
    query_size: int = 3
    install: bool = False
    loop_timeout: float = 1800.0


def parse_args(argv: Sequence[str]) -> Options:
    """The script's options (Slicer passes what follows the script's path; a leading ``--`` is ignored)."""
    parser = argparse.ArgumentParser(prog="panel_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for the phantoms and project")
    parser.add_argument("--cases", type=int, default=Options.cases, help="phantom cases (4 to 64)")
    parser.add_argument("--query-size", type=int, default=Options.query_size, help="starting boxes (1 to 20)")
    parser.add_argument("--install", action="store_true", help="install what is missing without asking")
    parser.add_argument("--loop-timeout", type=float, default=Options.loop_timeout, help="seconds the loop may take")
    args = parser.parse_args(list(argv[1:] if argv[:1] == ["--"] else argv))
    if not 4 <= args.cases <= 64:
        parser.error(f"--cases: {args.cases} is not between 4 and 64")
    if not 1 <= args.query_size <= 20:
        parser.error(f"--query-size: {args.query_size} is not between 1 and 20")
    if args.loop_timeout <= 0:
        parser.error(f"--loop-timeout: {args.loop_timeout} must be positive")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out: {args.out} exists and is not an empty folder")
    return Options(args.out, args.cases, args.query_size, args.install, args.loop_timeout)


@dataclass
class Step:
    name: str
    state: str  # pass, fail, skip
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Summary:
    """What each step did; a step whose prerequisites did not pass is skipped, not attempted."""

    steps: list[Step] = field(default_factory=list)

    def state(self, name: str) -> str | None:
        return next((s.state for s in self.steps if s.name == name), None)

    def run(self, name: str, action: Callable[[], str], needs: Sequence[str] = ()) -> Step:
        """Run ``action`` (it returns a one-line detail); an exception fails the step with its first line."""
        missing = [n for n in needs if self.state(n) != "pass"]
        if missing:
            step = Step(name, "skip", f"needs {', '.join(missing)}")
        else:
            started = time.perf_counter()
            try:
                step = Step(name, "pass", str(action() or ""))
            except Exception as e:  # noqa: BLE001 - every failure is reported, the next steps are skipped
                first = (str(e).strip().splitlines() or [""])[0]
                step = Step(name, "fail", f"{type(e).__name__}: {first}"[:300])
                traceback.print_exc()
            step.seconds = round(time.perf_counter() - started, 1)
        self.steps.append(step)
        print(f"[panel check] {self.line(step)}", flush=True)
        return step

    @staticmethod
    def line(step: Step) -> str:
        timing = f" ({step.seconds:.1f} s)" if step.state != "skip" else ""
        return f"{step.state.upper():4}  {step.name:12}{timing}  {step.detail}".rstrip()

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.state == "pass" for s in self.steps)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def format(self) -> str:
        counts = {state: sum(s.state == state for s in self.steps) for state in ("pass", "fail", "skip")}
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join(
            [
                "Active Learning 3D panel check",
                *[self.line(s) for s in self.steps],
                f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped",
            ]
        )

    def write(self, path: Path, environment: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps({"passed": self.passed, "environment": environment, "steps": [asdict(s) for s in self.steps]}, indent=1)
            + "\n"
        )
        tmp.replace(path)


# ----------------------------------------------------------------- inside Slicer only
class PanelCheck:
    """The steps, run against the real panel in the running Slicer."""

    def __init__(self, options: Options):
        self.options = options
        self.widget = None
        self.label_file: Path | None = None
        self.label_before = b""

    def dependencies(self) -> str:
        import slicer

        from ActiveLearning3DLib.gui.dependencies import ensure_dependencies, plan

        todo = plan()
        if not todo.needed:
            return "nothing to install"
        if not self.options.install:
            raise RuntimeError(todo.blocking_message() or f"missing {todo.describe()}; rerun with --install")
        errors = []
        started = time.perf_counter()
        ok = ensure_dependencies(slicer, confirm=lambda text: True, show_error=lambda text, detail: errors.append(text))
        if not ok:
            raise RuntimeError(errors[0] if errors else "installed; restart Slicer and run this check again")
        return f"installed {todo.describe()} in {time.perf_counter() - started:.0f} s"

    def panel(self) -> str:
        import slicer

        if not hasattr(slicer.modules, "activelearning3d"):
            raise RuntimeError(
                "the module is not loaded: start Slicer with --additional-module-paths <checkout>/ActiveLearning3D"
            )
        self.widget = slicer.modules.activelearning3d.widgetRepresentation().self()
        if slicer.util.mainWindow() is not None:
            slicer.util.selectModule("ActiveLearning3D")  # enters the module, as a click would
        else:  # --no-main-window: no module selector; enter as Slicer does when the module is shown
            self.widget.enter()
        if self.widget._parameterNode is None or not self.widget._guiBound:
            raise RuntimeError("the panel opened but its parameter node is not bound to the widgets")
        return f"Slicer {slicer.app.applicationVersion}, Python {sys.version.split()[0]}"

    def project(self) -> str:
        from ActiveLearning3DLib.default_data import PhantomSettings, make_phantom_dataset

        out = self.options.out
        data = make_phantom_dataset(out / "phantoms", PhantomSettings(cases=self.options.cases))
        p = self.widget._parameterNode
        p.projectPath, p.imagesPath, p.labelsPath = out / "project", data.images, data.labels
        p.classNames, p.patchSize, p.querySize, p.startMethod = "1=core, 2=shell", "16 16 16", self.options.query_size, "random"
        self.widget.onCreateProject()
        self.widget.waitUntilIdle(600)
        if self.widget.controller is None:
            raise RuntimeError(f"no project: {self.widget.ui.stageLabel.text}")
        return f"{len(self.widget.controller.logic.project.cases)} cases in {out / 'project'}"

    def boxes(self) -> str:
        import slicer

        rows = self.widget.ui.boxTable.rowCount
        rois = slicer.mrmlScene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems()
        if rows != self.options.query_size or rois < 1:
            raise RuntimeError(f"{rows} rows in the box table (expected {self.options.query_size}), {rois} ROIs")
        return f"{rows} boxes in the table, {rois} ROIs in the scene"

    def submit(self) -> str:
        from ActiveLearning3DLib.gui import mrml

        c = self.widget.controller
        box = c.current or c.go_to_box(c.next_pending().id)
        project = c.logic.project
        truth = self._truth(box.case)
        self.label_file = next(project.path.glob(f"labels*/{box.case}.nii.gz"), None)
        self.label_before = self.label_file.read_bytes() if self.label_file else b""
        mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, self._inside(box, truth == 1), c.grid)
        self.widget.onSubmit()
        if c.counts()["annotated"] != 1:
            raise RuntimeError(f"after Submit: {c.counts()}")
        after = next(project.path.glob(f"labels*/{box.case}.nii.gz"), None)
        if after is None or after.read_bytes() == self.label_before:
            raise RuntimeError(f"the partial labels of {box.case} on disk did not change")
        for row in [r for r in c.table() if r.state == "pending"]:  # the others too: training needs a few
            c.go_to_box(row.id)
            mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, self._inside(c.current, self._truth(row.case) == 1), c.grid)
            self.widget.onSubmit()
        if c.counts()["pending"]:
            raise RuntimeError(f"boxes left pending after Submit: {c.counts()}")
        effort = self.widget.ui.effortLabel.text
        if not effort or effort != c.effort_summary():
            raise RuntimeError(f"the effort label shows {effort!r}, the project {c.effort_summary()!r}")
        return f"box {box.id} of {box.case} painted, submitted and saved; then the rest: {c.counts()}; {effort}"

    @staticmethod
    def _inside(box, mask):
        """``mask`` inside the box only, as an annotator paints (a stroke outside it makes the panel warn)."""
        import numpy as np

        box = getattr(box, "box", box)  # a BoxRecord holds its Box
        region = tuple(slice(c, c + n) for c, n in zip(box.coords, box.size))
        inside = np.zeros(mask.shape, np.uint8)
        inside[region] = mask[region]
        return inside

    def _truth(self, case: str):
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(self.options.out / "phantoms" / "labelsTr" / f"{case}.nii.gz")))

    def loop(self) -> str:
        p = self.widget._parameterNode
        p.profile, p.device = "test", "cpu"
        c = self.widget.controller
        loops_before = len(c.logic.project.loop_indices())
        self.widget.onStartOrCancel()
        self._drive(lambda: not (c.busy or self.widget._pending is not None), self.options.loop_timeout, "the loop")
        loops = len(c.logic.project.loop_indices())
        if loops != loops_before + 1:
            raise RuntimeError(f"no new loop ({self.widget.ui.stageLabel.text})")
        if not (self.widget.ui.prefillCheckBox.checked and c.current is not None and c.prefill_shown):
            raise RuntimeError(
                f"the next box {getattr(c.current, 'id', None)} did not open pre-filled with the new model's prediction"
            )
        return (
            f"loop {loops - 1} queried; {self.widget.ui.boxTable.rowCount} rows; box {c.current.id} opened "
            f"pre-filled; {self.widget.ui.stageLabel.text}"
        )

    def _drive(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Tick the panel's timer work (as its ``waitUntilIdle`` does) and Slicer's events until ``done``."""
        import concurrent.futures

        import slicer

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not done after {timeout:.0f} s ({self.widget.ui.stageLabel.text})")
            pending = self.widget._pending
            if pending is not None:
                concurrent.futures.wait([pending[0]], timeout=0.2)
            else:
                time.sleep(0.2)
            self.widget.onPoll()
            slicer.app.processEvents()

    def export(self) -> str:
        target = self.widget.controller.export_model(self.options.out / "model.zip")
        return f"{target} ({target.stat().st_size // 1024} KiB)"


def main(argv: Sequence[str]) -> int:
    import slicer

    options = parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    summary, check = Summary(), PanelCheck(options)
    for name in STEPS:
        summary.run(name, getattr(check, name), NEEDS.get(name, ()))
    print(summary.format(), flush=True)
    summary.write(
        options.out / "summary.json",
        {"slicer": slicer.app.applicationVersion, "python": sys.version.split()[0], "platform": sys.platform},
    )
    return summary.exit_code


if __name__ == "__main__":
    import slicer

    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 2
    slicer.util.exit(code)
