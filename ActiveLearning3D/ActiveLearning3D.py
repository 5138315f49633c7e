"""ActiveLearning3D: the 3D Slicer entry point of the ActiveLearning3D extension.

Thin on purpose: the widget binds the panel's Qt widgets to
``ActiveLearning3DLib.gui.AnnotationController`` (no Qt, tested with
``slicer-core``) and polls the background jobs with a timer. Everything the
panel does can also be done from the Python console with the controller.
"""

import os
import sys

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
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

METHODS = ["clasp_pe", "pe", "bald", "power_pe", "power_bald", "softrank_bald", "pe_spatial", "random"]
START_METHODS = ["cscs", "cluster", "random", "nnactive_start", "random_fg33", "random_fg66"]  # the last three need labels
DEVICES = ["auto", "cuda", "cpu", "mps"]
PROFILES = ["auto", "paper", "cpu-small", "demo"]
POLL_MILLISECONDS = 1000


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
<li>Create a project from an image folder (or open one): the starting boxes are chosen, without labels by
<i>cscs</i> or <i>cluster</i> (a small autoencoder learns the pool's patches first, a few minutes) or at random.</li>
<li>Click a box in the table: its volume is shown with the box; paint the classes inside the box with
the segment editor below, then <b>Submit box</b> (saved at once) or <b>Skip box</b>.</li>
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
    """The panel's inputs, kept in the scene so that saving and reloading a scene keeps them."""

    projectPath: str = ""
    imagesPath: str = ""
    labelsPath: str = ""
    classNames: str = ""
    patchSize: str = ""
    method: str = "clasp_pe"
    startMethod: str = "cscs"
    querySize: int = 20
    python: str = "PythonSlicer"
    device: str = "auto"
    profile: str = "auto"
    parallel: int = 0


class ActiveLearning3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds widgets to the controller; no active-learning logic here."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self.runner = None  # a test can inject a runner; None: local background processes
        self._parameterNode = None
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ActiveLearning3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ActiveLearning3DLogic()

        self.ui.methodComboBox.addItems(METHODS)
        self.ui.startMethodComboBox.addItems(START_METHODS)
        self.ui.deviceComboBox.addItems(DEVICES)
        self.ui.profileComboBox.addItems(PROFILES)
        self.ui.boxTable.setColumnCount(5)
        self.ui.boxTable.setHorizontalHeaderLabels(["Box", "Case", "Score", "Stratum", "State"])
        self.ui.boxTable.setSortingEnabled(True)
        self.ui.boxTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.boxTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())

        self.ui.createProjectButton.connect("clicked(bool)", self.onCreateProject)
        self.ui.openProjectButton.connect("clicked(bool)", self.onOpenProject)
        self.ui.boxTable.connect("cellClicked(int,int)", self.onBoxClicked)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.skipButton.connect("clicked(bool)", self.onSkip)
        self.ui.addBoxButton.connect("clicked(bool)", self.onAddBox)
        self.ui.uncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.ui.startButton.connect("clicked(bool)", self.onStartOrCancel)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.loadPredictionsButton.connect("clicked(bool)", self.onLoadPredictions)
        self.ui.exportModelButton.connect("clicked(bool)", self.onExportModel)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self):
        if self._timer:
            self._timer.stop()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self.controller:
            self.controller.close_case()

    # ------------------------------------------------------------- parameters
    def initializeParameterNode(self):
        self._parameterNode = ActiveLearning3DParameterNode(self.logic.getParameterNode())
        self._parameterNode.connectGui(self.ui)

    # --------------------------------------------------------------- projects
    def _guard(self, action, *args):
        """Run a controller action; show its error in a dialog instead of a traceback."""
        try:
            with slicer.util.tryWithErrorDisplay("Active Learning 3D failed.", waitCursor=True):
                return action(*args)
        finally:
            self.updateButtons()

    def onCreateProject(self):
        p = self._parameterNode
        if not self.logic.ensureDependencies():
            return
        from ActiveLearning3DLib.gui import AnnotationController
        from ActiveLearning3DLib.gui.controller import parse_classes, parse_patch_size

        def create():
            names, colors = parse_classes(p.classNames)
            return AnnotationController.create_project(
                self.logic.context(), p.projectPath, p.imagesPath, p.labelsPath or None, class_names=names,
                class_colors=colors, patch_size=parse_patch_size(p.patchSize), method=p.method,
                query_size=p.querySize, start_method=p.startMethod, runner=self.runner)

        self.controller = self._guard(create)
        self._afterProjectOpened()

    def onOpenProject(self):
        from ActiveLearning3DLib.gui import AnnotationController

        self.controller = self._guard(AnnotationController.open_project, self.logic.context(), self._parameterNode.projectPath)
        self._afterProjectOpened()

    def _afterProjectOpened(self):
        if not self.controller:
            return
        if self.runner is not None:
            self.controller.runner = self.runner
        self.controller.editor_node = self.logic.segmentEditorNode()
        self._saveSettings()
        if self.controller.busy:  # a label-free start: the pool autoencoder trains in the background first
            self._timer.start()
        self.refreshTable()
        nextBox = self.controller.next_pending()
        if nextBox:
            self.goToBox(nextBox.id)

    def _saveSettings(self):
        p = self._parameterNode
        self.controller.save_settings(method=p.method, query_size=p.querySize, python=p.python or None,
                                      device=p.device, profile=p.profile, parallel=p.parallel or None)

    # ------------------------------------------------------------------ boxes
    def refreshTable(self):
        table = self.ui.boxTable
        rows = self.controller.table() if self.controller else []
        table.setSortingEnabled(False)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            score = "" if row.score is None else f"{row.score:.4g}"
            for c, text in enumerate([row.id, row.case, score, row.stratum or "", row.state]):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.setSortingEnabled(True)
        if self.controller:
            counts = self.controller.counts()
            self.ui.countsLabel.text = (f"{counts['total']} boxes: {counts['pending']} pending, "
                                        f"{counts['annotated']} annotated, {counts['skipped']} skipped")
            self.ui.projectStatusLabel.text = str(self.controller.logic.status().next_step)

    def onBoxClicked(self, row, column):
        self.goToBox(self.ui.boxTable.item(row, 0).text())

    def goToBox(self, boxId):
        if self._guard(self.controller.go_to_box, boxId):
            self.bindSegmentEditor()

    def bindSegmentEditor(self):
        """Point the embedded Segment Editor at the shown box's segmentation and volume."""
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
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        ras = [0.0, 0.0, 0.0]
        crosshair.GetCursorPositionRAS(ras)
        if self._guard(self.controller.add_box_at, ras):
            self.bindSegmentEditor()
        self.refreshTable()

    def onShowUncertainty(self):
        self._guard(self.controller.show_uncertainty, None)

    # ------------------------------------------------------------------- loop
    def onStartOrCancel(self):
        if self.controller.busy:
            cancelled = self._guard(self.controller.cancel)
            self._timer.stop()
            self.ui.stageLabel.text = f"Cancelled ({len(cancelled or [])} jobs)."
            self.updateButtons()
            return
        self._saveSettings()
        if not self.logic.ensureDependencies():
            return
        progress = self._guard(self.controller.start_next_loop, None)
        if progress:
            self._timer.start()
            self.showProgress(progress)

    def onPoll(self):
        progress = self.controller.poll() if self.controller else None
        if progress is None or not progress.running:
            self._timer.stop()
            if progress is not None:
                self.showProgress(progress)
                if progress.state == "failed":
                    slicer.util.errorDisplay(f"The loop failed: {progress.message}", detailedText=progress.log_tail)
            self.refreshTable()
            nextBox = self.controller.next_pending() if self.controller else None
            if nextBox:
                self.goToBox(nextBox.id)
        else:
            self.showProgress(progress)
        self.updateButtons()

    def showProgress(self, progress):
        self.ui.progressBar.value = int(progress.percent)
        self.ui.stageLabel.text = f"{progress.stage}: {progress.message}"
        self.ui.logTextEdit.setPlainText(progress.log_tail)

    def updateButtons(self):
        has = self.controller is not None
        running = has and self.controller.busy
        self.ui.startButton.text = "Cancel" if running else "Start next loop"
        self.ui.startButton.enabled = running or (has and self.controller.can_start_next_loop())
        for button in (self.ui.submitButton, self.ui.skipButton, self.ui.addBoxButton):
            button.enabled = has and self.controller.current is not None and not running
        for button in (self.ui.uncertaintyButton, self.ui.predictButton, self.ui.loadPredictionsButton,
                       self.ui.exportModelButton):
            button.enabled = has and not running

    # ---------------------------------------------------------------- results
    def onPredict(self):
        progress = self._guard(self.controller.predict_all_cases, None)
        if progress:
            self.showProgress(progress)
            if progress.running:
                self._timer.start()

    def onLoadPredictions(self):
        nodes = self._guard(self.controller.load_predictions, None)
        self.ui.stageLabel.text = f"Loaded {len(nodes or {})} predicted segmentations."

    def onExportModel(self):
        path = qt.QFileDialog.getSaveFileName(None, "Export model", "model.zip", "Zip files (*.zip)")
        if path:
            target = self._guard(self.controller.export_model, path)
            self.ui.stageLabel.text = f"Model saved to {target}"


class ActiveLearning3DLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue only: the scene context, the segment editor node, dependencies."""

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
            label[4 + n:10 + n, 5:12, 6:14] = 1
            image = sitk.GetImageFromArray((label * 100 + np.random.default_rng(n).normal(0, 10, label.shape)).astype(np.float32))
            os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
            os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
            sitk.WriteImage(image, os.path.join(root, "imagesTr", f"case_{n:03d}_0000.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(root, "labelsTr", f"case_{n:03d}.nii.gz"))
        widget = slicer.modules.activelearning3d.widgetRepresentation().self()
        widget.runner = _NoRunner()
        p = widget._parameterNode
        p.projectPath, p.imagesPath, p.labelsPath = os.path.join(root, "project"), os.path.join(root, "imagesTr"), ""
        p.classNames, p.patchSize, p.querySize, p.startMethod = "1=structure", "4 5 6", 3, "random"
        widget.onCreateProject()
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

    def cancel(self, job):
        return job.cancel()

    def active(self):
        return []
