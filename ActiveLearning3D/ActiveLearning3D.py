"""ActiveLearning3D: the 3D Slicer entry point of the ActiveLearning3D extension.

Thin on purpose: the widget binds the panel's Qt widgets to
``ActiveLearning3DLib.gui.AnnotationController`` (no Qt, tested with
``slicer-core``) and polls the background jobs with a timer. Everything the
panel does can also be done from the Python console with the controller.
Long actions (creating a project, each poll of a running loop, which ends with
the query, cancelling) run on one background thread, one at a time, so the GUI
never freezes; the timer reports them.
"""

import concurrent.futures
import importlib.util
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _ensureLibraryOnPath():
    """Make ``ActiveLearning3DLib`` importable from a source checkout (the built extension has it next to this file)."""
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(moduleDir, "ActiveLearning3DLib")):
        return
    repoDir = os.path.dirname(moduleDir)
    if os.path.isdir(os.path.join(repoDir, "ActiveLearning3DLib")) and repoDir not in sys.path:
        sys.path.append(repoDir)


_ensureLibraryOnPath()

# Needs neither torch nor scipy: the panel opens before the first use installs them.
from ActiveLearning3DLib.gui.choices import panel_choices  # noqa: E402
from ActiveLearning3DLib.project import ProjectError  # noqa: E402

CHOICES = panel_choices()  # the combo boxes list what the method registry and the profiles accept
POLL_MILLISECONDS = 1000
# While the worker thread runs an action the timer ticks faster and each tick waits a little for it: the worker
# then gets time to run even where the GUI thread holds Python's lock between ticks, and the GUI stays responsive.
BACKGROUND_TICK_MILLISECONDS = 100
BACKGROUND_SLICE_SECONDS = 0.04
SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"  # the Segment Editor module's own node, shared as MONAILabel does
POLLING = "polling"  # what the background thread does while a loop runs
BAD_INPUT = (ProjectError, ValueError, OSError, LookupError)  # a one-line message says it all


def _chosenPath(path):
    """A path field's value, or None when empty (Slicer's path fields read an empty field as ``Path('.')``)."""
    text = str(path) if path is not None else ""
    return None if text in ("", ".") else text


class ActiveLearning3D(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Active Learning 3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["ActiveLearning3D developers"]
        self.parent.helpText = """
Active learning for 3D segmentation with nnU-Net. Instead of painting whole volumes, paint the small
3D boxes the software chooses; nnU-Net trains on these partial labels and picks the next boxes.
<ol>
<li>Create a project from an image folder, the volumes loaded in the scene or the series selected in the DICOM
module (or open one): the starting boxes are chosen, without labels by
<i>cscs</i> or <i>cluster</i> (a small autoencoder learns the pool's patches first, a few minutes) or at random.</li>
<li>Click a box in the table: its volume is shown with the box; paint the classes inside the box with
the segment editor below, then <b>Submit box</b> (saved at once) or <b>Skip box</b>. Once a model exists a box
opens pre-filled with its prediction (a checkbox turns this off); the voxels you correct are counted per loop.</li>
<li>When every box is done, <b>Start next loop</b>: training, evaluation, scoring and the next query run in
background processes; the button turns into Cancel.</li>
</ol>
Paint outside the box is not merged (the panel says how many voxels were dropped).
The same controller works from the Python console: <code>ActiveLearning3DLib.gui.AnnotationController</code>.
<br>Project page: <a href="https://github.com/ActiveLearning3D/ActiveLearning3D">github.com/ActiveLearning3D/ActiveLearning3D</a>.
"""
        self.parent.acknowledgementText = """
This extension builds on:
<ul>
<li>nnActive: Lüth, Traub et al., Transactions on Machine Learning Research (TMLR), 2025.</li>
<li>ClaSP PE: Lüth, Traub et al., Transactions on Machine Learning Research (TMLR), 2026.</li>
<li>nnU-Net: Isensee et al., "nnU-Net: a self-configuring method for deep learning-based
biomedical image segmentation", Nature Methods, 2021.</li>
</ul>
"""


@parameterNodeWrapper
class ActiveLearning3DParameterNode:
    """The panel's inputs, kept in the scene so that saving and reloading a scene keeps them.

    The types are the ones Slicer's GUI connectors bind: ``Path`` to a path
    field, ``Choice`` strings to a combo box, bounded ints to a spin box (the
    bounds are the .ui file's; without them Slicer widens the spin box).
    """

    projectPath: Path
    imagesPath: Path
    labelsPath: Path
    classNames: str = ""
    patchSize: str = ""
    method: Annotated[str, Choice(list(CHOICES.methods))] = CHOICES.method
    startMethod: Annotated[str, Choice(list(CHOICES.start_methods))] = CHOICES.start_method
    querySize: Annotated[int, WithinRange(1, 10000)] = 20
    python: str = "PythonSlicer"
    device: Annotated[str, Choice(list(CHOICES.devices))] = CHOICES.device
    profile: Annotated[str, Choice(list(CHOICES.profiles))] = CHOICES.profile
    init: Annotated[str, Choice(list(CHOICES.inits))] = CHOICES.init  # scratch or warm-started members
    parallel: Annotated[int, WithinRange(0, 5)] = 0
    prefill: bool = True  # a box opens with the model's prediction inside it (the project's PanelSettings.prefill)
    exportPartialLabels: bool = False  # Export DICOM SEG also writes the annotations


class ActiveLearning3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds widgets to the controller; no active-learning logic here."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self.runner = None  # a test can inject a runner; None: local background processes
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._guiBound = False
        self._timer = None
        self._worker = None  # one thread: long actions run there, one at a time, in order
        self._pending = None  # (future, what, onDone) of the action on the worker
        self._cancelRequested = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ActiveLearning3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ActiveLearning3DLogic()

        self.ui.boxTable.setColumnCount(5)
        self.ui.boxTable.setHorizontalHeaderLabels(["Box", "Case", "Score", "Stratum", "State"])
        self.ui.boxTable.setSortingEnabled(True)
        self.ui.boxTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.boxTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        editor = self.ui.segmentEditorWidget
        # Submit reads the shown box's segmentation and volume: the editor must not offer to switch them.
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        self.selectSegmentEditorNode()  # first, so that selections made when the scene is set are kept in it
        editor.setMRMLScene(slicer.mrmlScene)

        self.ui.createProjectButton.connect("clicked(bool)", self.onCreateProject)
        self.ui.createFromSceneButton.connect("clicked(bool)", self.onCreateFromScene)
        self.ui.createFromDicomButton.connect("clicked(bool)", self.onCreateFromDicom)
        self.ui.openProjectButton.connect("clicked(bool)", self.onOpenProject)
        self.ui.boxTable.connect("cellClicked(int,int)", self.onBoxClicked)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.skipButton.connect("clicked(bool)", self.onSkip)
        self.ui.addBoxButton.connect("clicked(bool)", self.onAddBox)
        # clicked, not toggled: only the user's click changes the project's setting, never the parameter node
        # being bound again (a scene close resets it to the default while the project stays open)
        self.ui.prefillCheckBox.connect("clicked(bool)", self.onPrefillClicked)
        self.ui.uncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.ui.startButton.connect("clicked(bool)", self.onStartOrCancel)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.loadPredictionsButton.connect("clicked(bool)", self.onLoadPredictions)
        self.ui.exportModelButton.connect("clicked(bool)", self.onExportModel)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPoll)
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ActiveLearning3D")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        if self._timer:
            self._timer.stop()
        self.removeObservers()
        self._unbindGui()
        if self._worker:
            self._worker.shutdown(wait=False)

    def enter(self):
        """Each time the module is shown: parameters bound again, the editor's shortcuts and view observations back."""
        self.initializeParameterNode()
        self.selectSegmentEditorNode()
        editor = self.ui.segmentEditorWidget
        editor.installKeyboardShortcuts()
        editor.setupViewObservations()
        editor.updateWidgetFromMRML()

    def exit(self):
        """Leaving the module: the paint effect must stop capturing slice-view clicks and key presses."""
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        if self._parameterNodeGuiTag is not None:  # hidden: the fields need not follow the node (Slicer 5.10+)
            self._unbindGui()

    def onSceneStartClose(self, caller, event):
        """File > Close Scene: the parameter node is reset and the project's nodes go; the project stays open."""
        self.setParameterNode(None)
        if self.controller:
            self.controller.close()
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(None)
        editor.removeViewObservations()

    def onSceneEndClose(self, caller, event):
        if self.controller:  # the project stays open: the reset fields show its settings again, not the defaults
            self._loadSettings(self.logic.getParameterNode())
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.selectSegmentEditorNode()
            self.ui.segmentEditorWidget.updateWidgetFromMRML()

    # ------------------------------------------------------------- parameters
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        """Bind the panel's fields to ``parameterNode`` (None: unbind), as Slicer's module template does.

        The fields stay bound when the node is the one they are bound to already:
        connecting again would add a second set of connectors.
        """
        if parameterNode is not None and self._guiBound and parameterNode.parameterNode is self._parameterNode.parameterNode:
            return
        self._unbindGui()
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._guiBound = True

    def _unbindGui(self):
        if not self._guiBound:
            return
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        else:
            # Slicer 5.8's connectGui returns no tag, so disconnectGui(None) would do nothing and the old
            # connectors would stay on the fields; disconnect each binding of this wrapper as disconnectGui does.
            for tag in list(getattr(self._parameterNode, "_parameterGUIs", {})):
                self._parameterNode.disconnectGui(tag)
        self._parameterNodeGuiTag = None
        self._guiBound = False

    def selectSegmentEditorNode(self):
        """The editor uses the scene's singleton Segment Editor node (made again after a scene close)."""
        node = self.logic.segmentEditorNode()
        editor = self.ui.segmentEditorWidget
        if editor.mrmlSegmentEditorNode() is not node:
            editor.setMRMLSegmentEditorNode(node)
        if self.controller:
            self.controller.editor_node = node

    # ----------------------------------------------------------------- errors
    def _guard(self, action, *args):
        """Run a panel action; a failure becomes a message (dialog and status line), never a traceback.

        ``slicer.util.tryWithErrorDisplay`` shows its dialog and then raises again, so it is not used here.
        """
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            return action(*args)
        except Exception as error:
            self._showError(error)
            return None
        finally:
            slicer.app.restoreOverrideCursor()
            self.updateButtons()

    def _showError(self, error):
        """One line in the status line and a dialog; the traceback only for an unexpected error, in the details."""
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.ui.stageLabel.text = message
        if isinstance(error, BAD_INPUT):
            slicer.util.errorDisplay(message, windowTitle="Active Learning 3D")
        else:
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            logging.error(details)
            slicer.util.errorDisplay(
                f"Active Learning 3D failed: {message}", windowTitle="Active Learning 3D", detailedText=details
            )

    # ------------------------------------------------------------- background
    def _runInBackground(self, what, call, onDone):
        """Run a long action on the worker thread; the timer shows a moving bar and calls ``onDone(result)`` here."""
        self._pending = (self._worker.submit(call), what, onDone)
        if what != POLLING:
            self.ui.stageLabel.text = f"{what}..."
            self._showBusy(True)
        self._timer.setInterval(BACKGROUND_TICK_MILLISECONDS)
        self._timer.start()
        self.updateButtons()

    def _working(self):
        """A long action (not a poll) runs in the background."""
        return self._pending is not None and self._pending[1] != POLLING

    def _showBusy(self, busy):
        bar = self.ui.progressBar
        if busy:
            bar.setRange(0, 0)  # an empty range: Qt draws a moving bar
        elif bar.maximum == 0:
            bar.setRange(0, 100)

    def onPoll(self):
        """Timer tick. It never waits; an error stops the timer and is reported once."""
        try:
            self._tick()
        except Exception as error:
            self._timer.stop()
            self._timer.setInterval(POLL_MILLISECONDS)
            self._pending = None
            self._cancelRequested = False
            self._showBusy(False)
            self._showError(error)
            self.updateButtons()

    def _tick(self):
        if self._pending is not None:
            future, what, onDone = self._pending
            concurrent.futures.wait([future], timeout=BACKGROUND_SLICE_SECONDS)
            if not future.done():
                self._showBusy(True)  # still working (a query takes a while): the bar keeps moving
                return
            self._pending = None
            self._timer.setInterval(POLL_MILLISECONDS)
            self._showBusy(False)
            try:
                onDone(future.result())  # the action's own error is raised here, on the GUI thread
            finally:
                self.updateButtons()
            return
        controller = self.controller
        if controller is not None and controller.busy:
            if self._cancelRequested:
                self._cancelRequested = False
                self._runInBackground("Cancelling", controller.cancel, self._cancelled)
            else:
                self._runInBackground(POLLING, controller.poll, self._polled)  # the query step runs there too
            return
        self._timer.stop()
        self._cancelRequested = False  # nothing runs any more: a cancel asked for during the last poll is moot
        self.updateButtons()

    def waitUntilIdle(self, timeoutSeconds=600.0):
        """Drive the timer's work until no long action runs (scripts and self-tests; the panel never waits)."""
        deadline = time.monotonic() + timeoutSeconds
        while self._working():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Active Learning 3D: {self._pending[1]} still runs after {timeoutSeconds} s")
            concurrent.futures.wait([self._pending[0]], timeout=0.1)
            self.onPoll()
            slicer.app.processEvents()

    # --------------------------------------------------------------- projects
    def _mayReplaceProject(self):
        """Refuse to switch projects while this one works in the background (its loop would lose its poller)."""
        if self._working():
            self._showError(ProjectError(f"{self._pending[1]} still runs; wait until it ends"))
            return False
        if self.controller is not None and self.controller.busy:
            self._showError(
                ProjectError(
                    f"a loop of project {self.controller.logic.project.path.name} still runs in the background: "
                    "cancel it or wait until it ends before opening another project"
                )
            )
            return False
        return True

    def _creationRequest(self, fromFolders=True):
        """The fields of a new project, checked here so that a bad one is reported before anything is written.

        ``fromFolders``: the images (and labels) come from the folder fields; else from the scene or the DICOM
        database, and the request holds no ``images`` or ``labels``.
        """
        from ActiveLearning3DLib.gui.controller import parse_classes, parse_patch_size
        from ActiveLearning3DLib.query_methods import get_method

        p = self._parameterNode
        path, images, labels = _chosenPath(p.projectPath), _chosenPath(p.imagesPath), _chosenPath(p.labelsPath)
        if path is None:
            raise ValueError("Project folder: choose a folder for the new project")
        if fromFolders and images is None:
            raise ValueError("Images: choose the folder with the images")
        if fromFolders and not os.path.isdir(images):
            raise ValueError(f"Images: {images} is not a folder")
        if (labels is None or not fromFolders) and get_method(p.startMethod).needs_ground_truth:
            raise ValueError(
                f"Starting boxes: {p.startMethod} reads the ground truth (simulation only); "
                + ("choose a labels folder or another method" if fromFolders else "choose another method")
            )
        names, colors = parse_classes(p.classNames)
        request = dict(
            path=path,
            class_names=names,
            class_colors=colors,
            patch_size=parse_patch_size(p.patchSize),
            method=p.method,
            query_size=p.querySize,
            start_method=p.startMethod,
        )
        if fromFolders:
            request.update(images=images, labels=labels)
        return request

    def onCreateProject(self):
        if not self._mayReplaceProject():
            return
        request = self._guard(self._creationRequest)
        if request is None or not self.logic.ensureDependencies():
            return
        from ActiveLearning3DLib.gui import AnnotationController

        ctx, runner = self.logic.context(), self.runner
        self._runInBackground(
            "Creating the project",
            lambda: AnnotationController.create_project(ctx, runner=runner, **request),
            lambda controller: self._projectOpened(controller, created=True),
        )

    def onCreateFromScene(self):
        """A project of the scene's grey-scale volumes: written on this thread (storage nodes are scene work), the
        project then made on the worker."""
        if not self._mayReplaceProject():
            return
        request = self._guard(self._creationRequest, False)
        if request is None or not self.logic.ensureDependencies():
            return
        from ActiveLearning3DLib.gui import AnnotationController

        ctx, runner, path = self.logic.context(), self.runner, request.pop("path")
        staged = self._guard(AnnotationController.stage_scene_volumes, ctx, path, self.sceneVolumes())
        if staged is None:
            return
        self._runInBackground(
            "Creating the project from the scene volumes",
            lambda: AnnotationController.create_project_from_staged(ctx, path, staged, runner=runner, **request),
            lambda controller: self._projectOpened(controller, created=True),
        )

    def sceneVolumes(self):
        """The scene's grey-scale volumes but this project's own (its case on screen, its uncertainty map)."""
        from ActiveLearning3DLib.gui import mrml

        c = self.controller
        own = {n.GetID() for n in ((c.volume, c.heat_map) if c else ()) if n is not None}
        return [
            n
            for n in mrml.nodes_of_class(slicer.mrmlScene, "vtkMRMLScalarVolumeNode")
            if not n.IsA("vtkMRMLLabelMapVolumeNode") and n.GetID() not in own
        ]

    def onCreateFromDicom(self):
        """A project of the series selected in the DICOM module's browser: their file lists are read from the
        database on this thread (its SQL connection belongs to it), the project made on the worker."""
        if not self._mayReplaceProject():
            return
        request = self._guard(self._creationRequest, False)
        if request is None or not self.logic.ensureDependencies():
            return
        files = self._guard(self.dicomSelection)
        if files is None:
            return
        from ActiveLearning3DLib.gui import AnnotationController

        ctx, runner, path = self.logic.context(), self.runner, request.pop("path")
        self._runInBackground(
            "Creating the project from the DICOM series",
            lambda: AnnotationController.create_project_from_dicom_files(ctx, path, files, runner=runner, **request),
            lambda controller: self._projectOpened(controller, created=True),
        )

    def dicomSelection(self):
        """Series UID -> files of the series selected in the DICOM module's browser (Slicer's DICOM database)."""
        database = getattr(slicer, "dicomDatabase", None)
        browser = getattr(getattr(slicer.modules, "DICOMWidget", None), "browserWidget", None)
        if database is None or browser is None:
            raise ProjectError("DICOM: open the DICOM module, import the series and select them in its browser first")
        uids = [str(uid) for uid in browser.dicomBrowser.dicomTableManager().currentSeriesSelection()]
        if not uids:
            raise ProjectError("DICOM: no series selected; select the series in the DICOM module's browser first")
        return {uid: [str(f) for f in database.filesForSeries(uid)] for uid in uids}

    def onOpenProject(self):
        if not self._mayReplaceProject():
            return
        from ActiveLearning3DLib.gui import AnnotationController

        def open_():
            path = _chosenPath(self._parameterNode.projectPath)
            if path is None:
                raise ValueError("Project folder: choose the folder of the project to open")
            return AnnotationController.open_project(self.logic.context(), path)

        controller = self._guard(open_)
        if controller is not None:
            self._guard(self._projectOpened, controller)

    def _projectOpened(self, controller, created=False):
        """Show a new or opened project; the previous one's nodes leave the scene first."""
        if self.controller is not None and self.controller is not controller:
            self.controller.close()
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(None)
        self.controller = controller
        if self.runner is not None:
            controller.runner = self.runner
        controller.editor_node = self.logic.segmentEditorNode()
        if created:
            self._saveSettings()
        else:
            self._loadSettings()
        self.ui.stageLabel.text = f"Project {controller.logic.project.path}"
        self.refreshTable()
        if controller.busy:  # a label-free start: the pool autoencoder trains in the background first
            self._timer.start()
            return
        nextBox = controller.next_pending()
        if nextBox:
            self.goToBox(nextBox.id)

    def _saveSettings(self):
        """The fields that are panel settings go to the project (annotation.PANEL_FIELDS says which)."""
        from ActiveLearning3DLib.gui.annotation import settings_from_fields

        return self.controller.save_settings(**settings_from_fields(self._parameterNode))

    def _loadSettings(self, parameterNode=None):
        """An opened project's own settings come into the fields (those the lists offer)."""
        from ActiveLearning3DLib.gui.annotation import fields_from_settings

        p = parameterNode if parameterNode is not None else self._parameterNode
        offered = {"method": CHOICES.methods, "device": CHOICES.devices, "profile": CHOICES.profiles, "init": CHOICES.inits}
        for name, value in fields_from_settings(self.controller.settings, offered).items():
            setattr(p, name, value)

    # ------------------------------------------------------------------ boxes
    def refreshTable(self):
        table = self.ui.boxTable
        rows = self.controller.table() if self.controller else []
        table.setSortingEnabled(False)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate([row.id, row.case, "", row.stratum or "", row.state]):
                table.setItem(r, c, qt.QTableWidgetItem(text))
            if row.score is not None:
                score = qt.QTableWidgetItem()
                score.setData(qt.Qt.DisplayRole, float(f"{row.score:.4g}"))  # a number sorts as a number
                table.setItem(r, 2, score)
        table.setSortingEnabled(True)
        if self.controller:
            counts = self.controller.counts()
            self.ui.countsLabel.text = (
                f"{counts['total']} boxes: {counts['pending']} pending, "
                f"{counts['annotated']} annotated, {counts['skipped']} skipped"
            )
            self.ui.projectStatusLabel.text = str(self.controller.logic.status().next_step)
        self.ui.effortLabel.text = self.controller.effort_summary() if self.controller else ""

    def onBoxClicked(self, row, column):
        self.goToBox(self.ui.boxTable.item(row, 0).text())

    def goToBox(self, boxId):
        if self._guard(self.controller.go_to_box, boxId):
            self.bindSegmentEditor()

    def bindSegmentEditor(self):
        """Point the embedded Segment Editor at the shown box's segmentation and volume."""
        self.selectSegmentEditorNode()
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(self.controller.annotation)
        editor.setSourceVolumeNode(self.controller.volume)

    def onSubmit(self):
        result = self._guard(self.controller.submit)  # the controller already shows the next pending box
        if result:
            if result.warning:
                slicer.util.warningDisplay(result.warning)
            self.refreshTable()
            self.bindSegmentEditor()

    def onSkip(self):
        self._guard(self.controller.skip)
        self.refreshTable()
        self.bindSegmentEditor()

    def onAddBox(self):
        def add():
            crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
            if crosshair is None:
                raise ProjectError("the scene has no crosshair: Shift+move the mouse in a slice view first")
            return self.controller.add_box_at(crosshair.GetCrosshairRAS())  # the Shift+move point, not the mouse

        if self._guard(add):
            self.bindSegmentEditor()
        self.refreshTable()

    def onPrefillClicked(self, checked):
        """Pre-filling ticked or cleared: saved with the project at once; the next box opened follows it."""
        if self.controller is not None:
            self._guard(lambda: self.controller.save_settings(prefill=bool(checked)))

    def onShowUncertainty(self):
        self._guard(self.controller.show_uncertainty, None)

    # ------------------------------------------------------------------- loop
    def onStartOrCancel(self):
        if self.controller.busy:
            self._cancelRequested = True  # the worker cancels after the poll it may be running (one thing at a time)
            self.ui.stageLabel.text = "Cancelling..."
            self._showBusy(True)
            self._timer.start()
            self.updateButtons()
            return
        if self._guard(self._saveSettings) is None:
            return
        if not self.logic.ensureDependencies():
            return
        self._runInBackground("Starting the next loop", self.controller.start_next_loop, self._polled)

    def _cancelled(self, names):
        self.ui.stageLabel.text = f"Cancelled ({len(names or [])} jobs)."
        self.ui.progressBar.value = 0

    def _polled(self, progress):
        if progress is None:
            return
        self.showProgress(progress)
        if progress.running:
            return
        if progress.state == "failed":
            slicer.util.errorDisplay(
                f"The loop failed: {progress.message}", windowTitle="Active Learning 3D", detailedText=progress.log_tail
            )
        self.refreshTable()
        nextBox = self.controller.next_pending() if self.controller else None
        if nextBox:
            self.goToBox(nextBox.id)

    def showProgress(self, progress):
        self._showBusy(False)
        self.ui.progressBar.value = int(progress.percent)
        self.ui.stageLabel.text = f"{progress.stage}: {progress.message}"
        self.ui.logTextEdit.setPlainText(progress.log_tail)

    def updateButtons(self):
        has = self.controller is not None
        working = self._working()
        running = has and self.controller.busy
        for button in (
            self.ui.createProjectButton,
            self.ui.createFromSceneButton,
            self.ui.createFromDicomButton,
            self.ui.openProjectButton,
        ):
            button.enabled = not working
        self.ui.startButton.text = "Cancel" if running else "Start next loop"
        self.ui.startButton.enabled = (running and not self._cancelRequested and not working) or (
            has and not running and not working and self.controller.can_start_next_loop()
        )
        for button in (self.ui.submitButton, self.ui.skipButton, self.ui.addBoxButton):
            button.enabled = has and self.controller.current is not None and not running and not working
        for button in (
            self.ui.uncertaintyButton,
            self.ui.predictButton,
            self.ui.loadPredictionsButton,
            self.ui.exportModelButton,
            self.ui.exportDicomSegButton,
        ):
            button.enabled = has and not running and not working

    # ---------------------------------------------------------------- results
    def onPredict(self):
        self._runInBackground("Starting the predictions", self.controller.predict_all_cases, self._polled)

    def onLoadPredictions(self):
        nodes = self._guard(self.controller.load_predictions, None)
        if nodes is not None:
            self.ui.stageLabel.text = f"Loaded {len(nodes)} predicted segmentations."

    def onExportModel(self):
        path = qt.QFileDialog.getSaveFileName(None, "Export model", "model.zip", "Zip files (*.zip)")
        if path:
            target = self._guard(self.controller.export_model, path)
            if target is not None:
                self.ui.stageLabel.text = f"Model saved to {target}"

    def onExportDicomSeg(self):
        partial = bool(self._parameterNode.exportPartialLabels)
        self._runInBackground(
            "Writing DICOM SEG objects", lambda: self.controller.export_dicom_seg(None, partial_labels=partial), self._segsWritten
        )

    def _segsWritten(self, result):
        """Say what the export wrote; the reasons of the cases left out go to the log field."""
        text = f"DICOM SEG: {len(result.written)} written, {len(result.up_to_date)} up to date"
        if result.skipped:
            text += f", {len(result.skipped)} left out: {result.skipped[0]}"
        self.ui.stageLabel.text = text
        self.ui.logTextEdit.setPlainText("\n".join([*map(str, result.files), *result.skipped]))


class ActiveLearning3DLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue only: the scene context, the parameter and segment editor nodes, dependencies."""

    def getParameterNode(self):
        return ActiveLearning3DParameterNode(super().getParameterNode())

    def context(self):
        from ActiveLearning3DLib.gui import SlicerContext

        return SlicerContext.from_application()

    def segmentEditorNode(self):
        """The scene's singleton Segment Editor node, made as SegmentEditor.py makes it.

        A singleton survives File > Close Scene (reset, not removed), so the
        embedded editor never points at a removed node; sharing the Segment
        Editor module's node keeps both editors' selections the same.
        """
        node = slicer.mrmlScene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SEGMENT_EDITOR_SINGLETON_TAG)
            node = slicer.mrmlScene.AddNode(node)
        return node

    def ensureDependencies(self):
        """Offer to install what is missing (PyTorch extension, torch, nnunetv2); failures end in a dialog."""
        from ActiveLearning3DLib.gui.dependencies import ensure_dependencies

        testing = slicer.app.commandOptions().testingEnabled
        return ensure_dependencies(slicer, testing=testing)


class ActiveLearning3DTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Slicer --testing): the panel on a generated dataset with a runner that starts nothing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = [name for name in ("torch", "nnunetv2") if importlib.util.find_spec(name) is None]
        if missing:
            # As SlicerNNUnet's self-test does: without the Python stack the panel cannot create a project.
            message = (
                f"Active Learning 3D self-test skipped: {', '.join(missing)} not installed "
                "(creating a project in the panel offers to install them)"
            )
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_PanelAnnotatesABox()

    def test_PanelAnnotatesABox(self):
        import tempfile

        import numpy as np
        import SimpleITK as sitk

        from ActiveLearning3DLib.gui import mrml

        root = tempfile.mkdtemp()
        for n in range(4):
            label = np.zeros((16, 18, 20), np.uint8)
            label[4 + n : 10 + n, 5:12, 6:14] = 1
            image = sitk.GetImageFromArray((label * 100 + np.random.default_rng(n).normal(0, 10, label.shape)).astype(np.float32))
            os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
            os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
            sitk.WriteImage(image, os.path.join(root, "imagesTr", f"case_{n:03d}_0000.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(root, "labelsTr", f"case_{n:03d}.nii.gz"))
        widget = slicer.modules.activelearning3d.widgetRepresentation().self()
        widget.runner = _NoRunner()
        p = widget._parameterNode
        p.projectPath, p.imagesPath, p.labelsPath = Path(root, "project"), Path(root, "imagesTr"), Path()
        p.classNames, p.patchSize, p.querySize, p.startMethod = "1=structure", "4 5 6", 3, "random"
        widget.onCreateProject()
        widget.waitUntilIdle(timeoutSeconds=120)
        self.assertEqual(widget.ui.boxTable.rowCount, 3)
        c = widget.controller
        mask = np.ones(c.logic.project.cases[c.current.case].shape, np.uint8)
        mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, mask, c.grid)
        widget.onSubmit()
        self.assertEqual(c.counts()["annotated"], 1)
        widget.onSkip()
        widget.onSkip()
        self.assertTrue(widget.ui.startButton.enabled)
        self.delayDisplay("Test passed")


class _NoRunner:
    """Accepts jobs and starts nothing (the test checks the panel, not training)."""

    def submit(self, job):
        pass

    def poll(self):
        return []

    def refresh(self, job):
        return job.status()

    def cancel(self, job):
        from ActiveLearning3DLib.project import now_iso

        return job.status() if job.status().final else job.update(state="cancelled", ended=now_iso(), message="cancelled")

    def active(self):
        return []
