"""ActiveLearning3D: the 3D Slicer entry point of the ActiveLearning3D extension.

This file stays thin on purpose: all active-learning logic lives in the Qt-free
``ActiveLearning3DLib`` package (usable from the Slicer Python console and from
the ``al3d`` command line). The full panel comes in a later release.
"""

import os
import sys

import slicer
from slicer.ScriptedLoadableModule import *


def _ensureLibraryOnPath():
    """Make ``ActiveLearning3DLib`` importable when running from a source checkout.

    In a built or installed extension the library is copied next to this file,
    which Slicer already puts on ``sys.path``. In a source checkout (module path
    pointing at the ``ActiveLearning3D`` folder) it sits one level up.
    """
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(moduleDir, "ActiveLearning3DLib")):
        return
    repoDir = os.path.dirname(moduleDir)
    if os.path.isdir(os.path.join(repoDir, "ActiveLearning3DLib")) and repoDir not in sys.path:
        sys.path.append(repoDir)


_ensureLibraryOnPath()


#
# ActiveLearning3D
#


class ActiveLearning3D(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Active Learning 3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ActiveLearning3D developers"]
        self.parent.helpText = """
Active learning for 3D biomedical segmentation with nnU-Net.
Instead of annotating whole volumes, the annotator paints small 3D boxes that the
software selects (box queries); nnU-Net is trained on these partial annotations and
the next boxes are chosen from its predictions.
<br><br>
The interactive panel arrives in a later release. Meanwhile, use the <code>al3d</code>
command line (for example <code>al3d demo</code>) or, from the Slicer Python console,
<code>from ActiveLearning3DLib import ActiveLearningLogic</code>.
<br><br>
Project page: <a href="https://github.com/ActiveLearning3D/ActiveLearning3D">github.com/ActiveLearning3D/ActiveLearning3D</a>.
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


#
# ActiveLearning3DWidget
#


class ActiveLearning3DWidget(ScriptedLoadableModuleWidget):
    """Placeholder panel; the full user interface comes in a later release."""

    PLACEHOLDER_TEXT = (
        "The Active Learning 3D panel arrives in a later release.\n\n"
        "For now, use the al3d command line, or the Slicer Python console:\n"
        "    from ActiveLearning3DLib import ActiveLearningLogic"
    )

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.ui = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        # Load the widget from the .ui file (created with Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ActiveLearning3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.ui.placeholderLabel.setText(self.PLACEHOLDER_TEXT)
        self.ui.placeholderLabel.setWordWrap(True)

        self.logic = ActiveLearning3DLogic()


#
# ActiveLearning3DLogic
#


class ActiveLearning3DLogic(ScriptedLoadableModuleLogic):
    """Kept empty: the logic lives in ActiveLearning3DLib.ActiveLearningLogic."""

    pass


#
# ActiveLearning3DTest
#


class ActiveLearning3DTest(ScriptedLoadableModuleTest):
    """Smoke test: the library can be imported from inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LibraryImport()

    def test_LibraryImport(self):
        self.delayDisplay("Importing ActiveLearning3DLib")
        import ActiveLearning3DLib

        self.assertTrue(hasattr(ActiveLearning3DLib, "ActiveLearningLogic"))
        self.delayDisplay("Test passed")
