"""Run the module file with Slicer's own Python (``../shared/vendor/slicer/<version>``) and slicer-core's MRML.

The desktop application gives a scripted module three things the pip package
``slicer-core`` lacks: Qt/CTK widgets, Slicer's Python package
(``slicer.util``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``) and the application object. This helper

- loads Slicer's real Python files of one release, unmodified, as the
  submodules of slicer-core's ``slicer`` package (so the parameter node
  wrapper, its GUI connectors and ``tryWithErrorDisplay`` are Slicer's own,
  and every node is a real MRML node);
- provides widget stand-ins named by the classes a ``.ui`` file uses
  (``QComboBox``, ``QSpinBox``, ``QLineEdit``, ``ctkPathLineEdit``, ...), with
  only the properties and signals that Slicer's connectors and the module
  touch, and a ``.ui`` loader that builds them from the file;
- a ``qMRMLSegmentEditorWidget`` stand-in that accepts only the methods the
  release's ``qMRMLSegmentEditorWidget.h`` declares, and logs
  "need to set segment editor node first" as the real one does;
- a stand-in ``slicer.app`` whose message boxes are recorded.

It changes ``sys.modules`` (``qt``, ``ctk``, ``slicer.util``), so it runs in a
subprocess of the tests: ``python slicer_desktop_standins.py VERSION CHECKS_FILE
OUT_JSON [--without-dependencies] NAME...`` runs the named ``check_*`` functions
of ``CHECKS_FILE``, each with a fresh :class:`Desktop`, and writes what failed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import traceback
import types
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO.parent / "shared" / "vendor" / "slicer"
VERSIONS = ("v5.8.1", "v5.12.3")
# Another copy of the module folder can be checked (e.g. with a fix taken out, to see that a check catches it).
MODULE_FILE = Path(os.environ.get("AL3D_SLICER_MODULE_FILE") or REPO / "ActiveLearning3D" / "ActiveLearning3D.py")
UI_FILE = MODULE_FILE.parent / "Resources" / "UI" / "ActiveLearning3D.ui"
PYTHON_STACK = ("torch", "nnunetv2", "scipy", "matplotlib")  # what the first use installs inside Slicer


def vendored_python(version: str) -> Path:
    return VENDOR / version / "Base" / "Python" / "slicer"


def segment_editor_header(version: str) -> Path:
    found = sorted((VENDOR / version).rglob("qMRMLSegmentEditorWidget.h"))
    if not found:
        raise FileNotFoundError(f"{VENDOR / version}: no qMRMLSegmentEditorWidget.h")
    return found[0]


def public_methods(header: Path, class_name: str) -> set[str]:
    """Names of the methods and slots a Qt header declares public for ``class_name`` (what Python can call)."""
    text = header.read_text()
    body = text[text.index(f"class Q_SLICER_MODULE_SEGMENTATIONS_WIDGETS_EXPORT {class_name}") :]
    names, public = set(), False
    for line in body.splitlines():
        stripped = line.strip()
        access = re.match(r"(public|protected|private|signals|Q_SIGNALS)\b[^:]*:(?!:)", stripped)
        if access:
            public = access.group(1) == "public"
            continue
        if not public or stripped.startswith("//") or "Q_PROPERTY" in stripped or stripped.startswith("~"):
            continue
        if line.startswith("};"):  # the end of the class (inline bodies end indented)
            break
        match = re.match(r"(?:Q_INVOKABLE\s+)?(?:virtual\s+)?(?:static\s+)?[\w:<>*&]+[\s*&]+(\w+)\s*\(", stripped)
        if match and match.group(1) != class_name:
            names.add(match.group(1))
    return names


# --------------------------------------------------------------------------------------------- Qt stand-ins
def _invoke(slot, args):
    """Call a slot with as many of the signal's arguments as it takes (as PythonQt does)."""
    try:
        parameters = list(inspect.signature(slot).parameters.values())
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return slot(*args)
    return slot(*args[: sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)])


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            _invoke(slot, args)


class QObject:
    def __init__(self, parent=None):
        self.objectName = ""
        self._properties = {}
        self._children = []
        self._parent = None
        if parent is not None:
            parent._adopt(self)

    def _adopt(self, child):
        child._parent = self
        self._children.append(child)

    @property
    def name(self):  # PythonQt's alias of objectName
        return self.objectName

    def parent(self):
        return self._parent

    def children(self):
        return list(self._children)

    def findChildren(self, cls):
        found = []
        for child in self._children:
            if isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def property(self, key):
        return self._properties.get(key)

    def setProperty(self, key, value):
        self._properties[key] = value

    def connect(self, signature, slot):  # PythonQt's old-style connection, "clicked(bool)"
        getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature, slot):
        getattr(self, signature.split("(")[0]).disconnect(slot)

    def deleteLater(self):
        pass


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None

    def isWidgetType(self):
        return True

    def layout(self):
        return self._layout

    def setLayout(self, layout):
        self._layout = layout
        layout._owner = self

    def setEnabled(self, enabled):
        self.enabled = bool(enabled)

    def show(self):
        self.visible = True


class _Layout:
    def __init__(self, owner=None):
        self._owner = None
        if owner is not None:
            owner.setLayout(self)

    def addWidget(self, widget, *args):
        if self._owner is not None:
            self._owner._adopt(widget)

    def addRow(self, *items):
        for item in items:
            if isinstance(item, QWidget):
                self.addWidget(item)

    def setContentsMargins(self, *margins):
        pass


class QVBoxLayout(_Layout):
    pass


class QHBoxLayout(_Layout):
    pass


class QFormLayout(_Layout):
    pass


class QLabel(QWidget):
    def __init__(self, *args):
        parent = next((a for a in args if isinstance(a, QObject)), None)
        super().__init__(parent)
        self.text = next((a for a in args if isinstance(a, str)), "")


class QPushButton(QWidget):
    def __init__(self, *args):
        parent = next((a for a in args if isinstance(a, QObject)), None)
        super().__init__(parent)
        self.text = next((a for a in args if isinstance(a, str)), "")
        self.checked = False
        self.clicked = Signal()

    def click(self):
        if self.enabled:
            self.clicked.emit(False)


class QCheckBox(QWidget):
    """``checked`` set in code emits ``toggled`` and ``stateChanged`` (what Slicer's connector hears); ``click()``, the
    user's click, also emits ``clicked``."""

    def __init__(self, *args):
        parent = next((a for a in args if isinstance(a, QObject)), None)
        super().__init__(parent)
        self.text = next((a for a in args if isinstance(a, str)), "")
        self._checked = False
        self.toggled, self.stateChanged, self.clicked = Signal(), Signal(), Signal()

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.toggled.emit(value)
            self.stateChanged.emit(2 if value else 0)  # Qt::Checked, Qt::Unchecked

    def isChecked(self):
        return self._checked

    def setChecked(self, value):
        self.checked = value

    def click(self):
        if self.enabled:
            self.checked = not self._checked
            self.clicked.emit(self._checked)


class QLineEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self.placeholderText = ""
        self.textChanged = Signal()

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, value):
        if value != self._text:
            self._text = value
            self.textChanged.emit(value)


class QComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._items = []
        self._index = -1
        self.currentIndexChanged = Signal()

    def _setIndex(self, index):
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)

    def addItem(self, text):
        self._items.append(str(text))
        if self._index < 0:
            self._setIndex(0)

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def clear(self):
        self._items = []
        self._setIndex(-1)

    def count(self):
        return len(self._items)

    def itemText(self, index):
        return self._items[index]

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        if not -1 <= index < len(self._items):
            raise IndexError(index)
        self._setIndex(index)

    @property
    def currentText(self):
        return self._items[self._index] if self._index >= 0 else ""


class QSpinBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._minimum, self._maximum, self._value = 0, 99, 0
        self.specialValueText = ""
        self.valueChanged = Signal()

    def _clamp(self, value):
        return min(max(int(value), self._minimum), self._maximum)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = self._clamp(value)
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)

    @property
    def minimum(self):
        return self._minimum

    @minimum.setter
    def minimum(self, value):
        self.setMinimum(value)

    @property
    def maximum(self):
        return self._maximum

    @maximum.setter
    def maximum(self, value):
        self.setMaximum(value)

    def setMinimum(self, value):
        self._minimum = int(value)
        self._maximum = max(self._maximum, self._minimum)
        self.value = self._value

    def setMaximum(self, value):
        self._maximum = int(value)
        self._minimum = min(self._minimum, self._maximum)
        self.value = self._value

    def setRange(self, minimum, maximum):
        self.setMinimum(minimum)
        self.setMaximum(maximum)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.value = 0, 100, 0

    def setRange(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def setValue(self, value):
        self.value = value


class QPlainTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.plainText = ""
        self.readOnly = False

    def setPlainText(self, text):
        self.plainText = text

    def toPlainText(self):
        return self.plainText


class QTableWidgetItem:
    def __init__(self, text=""):
        self._data = {Qt.DisplayRole: text} if text != "" else {}

    def setData(self, role, value):
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)

    def text(self):
        value = self._data.get(Qt.DisplayRole)
        return "" if value is None else str(value)


class QAbstractItemView:
    SelectRows = 1
    NoEditTriggers = 0


class QTableWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.rowCount = 0
        self.columnCount = 0
        self.sortingEnabled = False
        self.headerLabels = []
        self._items = {}
        self.cellClicked = Signal()

    def setColumnCount(self, count):
        self.columnCount = count

    def setHorizontalHeaderLabels(self, labels):
        self.headerLabels = list(labels)

    def setSortingEnabled(self, enabled):
        self.sortingEnabled = enabled

    def setSelectionBehavior(self, behavior):
        pass

    def setEditTriggers(self, triggers):
        pass

    def setRowCount(self, count):
        self.rowCount = count
        self._items = {k: v for k, v in self._items.items() if k[0] < count}

    def setItem(self, row, column, item):
        self._items[(row, column)] = item

    def item(self, row, column):
        return self._items.get((row, column))


class QTimer(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0
        self.active = False
        self.timeout = Signal()

    def setInterval(self, msec):
        self.interval = msec

    def start(self, msec=None):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active

    @staticmethod
    def singleShot(msec, callback):
        pass


class Qt:
    DisplayRole = 0
    EditRole = 2
    WaitCursor = 3


class QMessageBox:
    Ok, Cancel, Yes, No, Retry, Close = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000
    Information, Warning, Critical, Question = 1, 2, 3, 4


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self):
        return Path(self.path).is_file()

    def open(self, mode):
        return True


class QIcon:
    def __init__(self, path=""):
        self.path = path


class QColor:
    def __init__(self, *args):
        self.args = args


class QSettings:
    """In-memory settings shared by every instance (Slicer's settings file, empty)."""

    values: dict = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def contains(self, key):
        return key in self.values

    def setValue(self, key, value):
        self.values[key] = value


class QFileDialog:
    answer = ""

    @staticmethod
    def getSaveFileName(*args):
        return QFileDialog.answer


# ------------------------------------------------------------------------------------------- CTK stand-ins
class ctkPathLineEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self.filters = None
        self.currentPathChanged = Signal()

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, value):
        if value != self._path:
            self._path = value
            self.currentPathChanged.emit(value)


class ctkCollapsibleButton(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.collapsed = False


class ctkMessageBox(QWidget):
    """A message box; ``exec_`` records it in :attr:`shown` (what the user would see) and answers Ok."""

    shown: list = []

    def __init__(self, parent=None):
        super().__init__(None)
        self.text = self.windowTitle = self.detailedText = ""
        self.icon = self.standardButtons = None

    def exec_(self):
        self.shown.append({"text": self.text, "title": self.windowTitle, "details": self.detailedText})
        return QMessageBox.Ok


# Classes that Slicer's connectors name (``type(widget) in (...)``) and that the panel does not use.
QT_UNUSED = ("QSlider", "QDoubleSpinBox", "QTextEdit", "QToolButton", "QMenu", "QAction", "QDialog")
CTK_UNUSED = (
    "ctkCheckBox",
    "ctkCheckablePushButton",
    "ctkSliderWidget",
    "ctkDoubleSlider",
    "ctkDoubleSpinBox",
    "ctkComboBox",
    "ctkRangeWidget",
    "ctkDoubleRangeSlider",
    "ctkDirectoryButton",
    "ctkColorPickerButton",
)
SLICER_UNUSED = ("qMRMLNodeComboBox", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qSlicerWidget")


# ----------------------------------------------------------------------------------------- Slicer widgets
class qMRMLWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.scene = None
        self.isEntered = False  # qSlicerAbstractModuleWidget's flag (set around enter/exit by the application)
        self.mrmlSceneChanged = Signal()

    def setMRMLScene(self, scene):
        self.scene = scene
        self.mrmlSceneChanged.emit(scene)


class qMRMLSegmentEditorWidget(qMRMLWidget):
    """The embedded editor: only what the release's header declares public, with the behaviour the panel relies on."""

    declared: set = set()  # filled from the vendored header
    EMULATED = {
        "setMRMLScene",
        "setMRMLSegmentEditorNode",
        "mrmlSegmentEditorNode",
        "setSegmentationNode",
        "segmentationNode",
        "setSourceVolumeNode",
        "sourceVolumeNode",
        "setActiveEffect",
        "activeEffect",
        "installKeyboardShortcuts",
        "uninstallKeyboardShortcuts",
        "setupViewObservations",
        "removeViewObservations",
        "updateWidgetFromMRML",
        "setSegmentationNodeSelectorVisible",
        "setSourceVolumeNodeSelectorVisible",
        "segmentationNodeSelectorVisible",
        "sourceVolumeNodeSelectorVisible",
    }

    def __init__(self, parent=None):
        super().__init__(parent)
        self._editorNode = self._segmentation = self._volume = self._effect = None
        self.shortcutsInstalled = False
        self.observingViews = False
        self._segmentationSelectorVisible = self._volumeSelectorVisible = True
        self.errors = []  # what the real widget logs with qCritical

    def __getattribute__(self, name):
        if name in type(self).EMULATED and name not in type(self).declared:
            raise AttributeError(f"qMRMLSegmentEditorWidget has no public {name}() in this Slicer release")
        return super().__getattribute__(name)

    def _editorNodeUsable(self):
        return self._editorNode is not None and self._editorNode.GetScene() is not None

    def setMRMLSegmentEditorNode(self, node):
        self._editorNode = node

    def mrmlSegmentEditorNode(self):
        return self._editorNode

    def setSegmentationNode(self, node):
        if not self._editorNodeUsable():
            self.errors.append("qMRMLSegmentEditorWidget::setSegmentationNode: need to set segment editor node first")
            return
        self._segmentation = node
        self._editorNode.SetAndObserveSegmentationNode(node)

    def segmentationNode(self):
        return self._segmentation

    def setSourceVolumeNode(self, node):
        if not self._editorNodeUsable():
            self.errors.append("qMRMLSegmentEditorWidget::setSourceVolumeNode: need to set segment editor node first")
            return
        self._volume = node
        self._editorNode.SetAndObserveSourceVolumeNode(node)

    def sourceVolumeNode(self):
        return self._volume

    def setActiveEffect(self, effect):
        self._effect = effect

    def activeEffect(self):
        return self._effect

    def installKeyboardShortcuts(self, parent=None):
        self.shortcutsInstalled = True

    def uninstallKeyboardShortcuts(self):
        self.shortcutsInstalled = False

    def setupViewObservations(self):
        self.observingViews = True

    def removeViewObservations(self):
        self.observingViews = False

    def updateWidgetFromMRML(self):
        pass

    def setSegmentationNodeSelectorVisible(self, visible):
        self._segmentationSelectorVisible = bool(visible)

    def segmentationNodeSelectorVisible(self):
        return self._segmentationSelectorVisible

    def setSourceVolumeNodeSelectorVisible(self, visible):
        self._volumeSelectorVisible = bool(visible)

    def sourceVolumeNodeSelectorVisible(self):
        return self._volumeSelectorVisible


# ---------------------------------------------------------------------------------------------- .ui loader
def _value(element):
    child = element[0]
    if child.tag == "bool":
        return child.text == "true"
    if child.tag == "number":
        return int(child.text)
    return child.text or ""


def _build_widget(element, parent, classes):
    class_name = element.get("class")
    if class_name not in classes:
        raise RuntimeError(f".ui widget class {class_name} has no stand-in")
    widget = classes[class_name](parent)
    widget.objectName = element.get("name")
    for prop in element.findall("property"):
        value = _value(prop)
        if prop.get("stdset") == "0":
            widget.setProperty(prop.get("name"), value)  # a dynamic property such as SlicerParameterName
        elif hasattr(widget, prop.get("name")):
            setattr(widget, prop.get("name"), value)
    for child in element:
        if child.tag == "widget":
            _build_widget(child, widget, classes)
        elif child.tag == "layout":
            _build_layout(child, widget, classes)
    return widget


def _build_layout(element, owner, classes):
    for item in element.findall("item"):
        for child in item:
            if child.tag == "widget":
                _build_widget(child, owner, classes)
            elif child.tag == "layout":
                _build_layout(child, owner, classes)


class QUiLoader:
    classes: dict = {}

    def load(self, qfile):
        root = ET.parse(qfile.path).getroot()
        widget = _build_widget(root.find("widget"), None, self.classes)
        named = {w.objectName: w for w in [widget, *widget.findChildren(QObject)]}
        connections = root.find("connections")
        for connection in connections if connections is not None else []:
            sender, receiver = named[connection.findtext("sender")], named[connection.findtext("receiver")]
            getattr(sender, connection.findtext("signal").split("(")[0]).connect(
                getattr(receiver, connection.findtext("slot").split("(")[0])
            )
        return widget


# ------------------------------------------------------------------------------------------- application
class ModuleManager(QObject):
    def __init__(self):
        super().__init__()
        self.moduleAboutToBeUnloaded = Signal()


class Application:
    """``slicer.app``: what the module and Slicer's Python call on it."""

    applicationName = "3D Slicer"

    def __init__(self, app_logic):
        self._app_logic = app_logic
        self._modules = ModuleManager()
        self.mainWindow = QWidget()
        self.mainWindow.objectName = "qSlicerMainWindow"
        self.overrideCursors = 0
        self.testing = False

    def moduleManager(self):
        return self._modules

    def applicationLogic(self):
        return self._app_logic

    def testingEnabled(self):
        return self.testing

    def commandOptions(self):
        return types.SimpleNamespace(testingEnabled=self.testing)

    def topLevelWidgets(self):
        return [self.mainWindow]

    def setOverrideCursor(self, cursor):
        self.overrideCursors += 1

    def restoreOverrideCursor(self):
        self.overrideCursors -= 1

    def processEvents(self):
        pass

    def translate(self, context, text):
        return text

    def userSettings(self):
        return QSettings()


class _Hiding(importlib.abc.MetaPathFinder):
    """Wraps an import finder so that some packages look not installed (a Slicer before its first use)."""

    def __init__(self, inner, names):
        self.inner, self.names = inner, set(names)

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


def install(version: str) -> types.ModuleType:
    """Put the stand-ins and the release's Slicer Python in place; returns the ``slicer`` package."""
    source = vendored_python(version)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: Slicer's Python sources are needed")
    qt = types.ModuleType("qt")
    for cls in (
        QObject,
        QWidget,
        QVBoxLayout,
        QHBoxLayout,
        QFormLayout,
        QLabel,
        QPushButton,
        QCheckBox,
        QLineEdit,
        QComboBox,
        QSpinBox,
        QProgressBar,
        QPlainTextEdit,
        QTableWidget,
        QTableWidgetItem,
        QAbstractItemView,
        QTimer,
        Qt,
        QMessageBox,
        QFile,
        QIcon,
        QColor,
        QSettings,
        QFileDialog,
        QUiLoader,
    ):
        setattr(qt, cls.__name__, cls)
    ctk = types.ModuleType("ctk")
    for cls in (ctkPathLineEdit, ctkCollapsibleButton, ctkMessageBox):
        setattr(ctk, cls.__name__, cls)
    for module, names in ((qt, QT_UNUSED), (ctk, CTK_UNUSED)):
        for name in names:
            setattr(module, name, type(name, (QWidget,), {}))
    sys.modules["qt"], sys.modules["ctk"] = qt, ctk

    import slicer  # slicer-core: the MRML classes

    for name in SLICER_UNUSED:
        setattr(slicer, name, type(name, (QWidget,), {}))
    slicer.qMRMLWidget = qMRMLWidget
    qMRMLSegmentEditorWidget.declared = public_methods(segment_editor_header(version), "qMRMLSegmentEditorWidget")
    slicer.qMRMLSegmentEditorWidget = qMRMLSegmentEditorWidget
    classes = {name: getattr(module, name) for module in (qt, ctk) for name in dir(module) if name[:1] in "Qc"}
    classes.update(qMRMLWidget=qMRMLWidget, qMRMLSegmentEditorWidget=qMRMLSegmentEditorWidget)
    QUiLoader.classes = classes

    # Slicer's own files take the place of slicer-core's slicer.util; the rest of the package is Slicer's.
    slicer.__path__.insert(0, str(source))
    for name in [n for n in sys.modules if n == "slicer.util"]:
        del sys.modules[name]
    slicer.util = importlib.import_module("slicer.util")
    assert Path(slicer.util.__file__).parent == source, slicer.util.__file__
    importlib.import_module("slicer.parameterNodeWrapper")
    importlib.import_module("slicer.ScriptedLoadableModule")
    return slicer


class Desktop:
    """One fresh "application": a scene with module logics, the module file loaded, and helpers to drive it."""

    def __init__(self, version: str, work: Path):
        import slicer

        from ActiveLearning3DLib.gui.headless import headless_slicer

        self.version, self.work, self.slicer = version, work, slicer
        self.ctx = headless_slicer()
        self.scene = self.ctx.scene
        crosshair = self.scene.CreateNodeByClass("vtkMRMLCrosshairNode")  # the desktop's "Crosshair" singleton
        crosshair.UnRegister(None)
        crosshair.SetSingletonTag("default")
        crosshair.SetName("Crosshair")
        self.crosshair = self.scene.AddNode(crosshair)
        self.app = Application(self.ctx.app_logic)
        ctkMessageBox.shown = []
        QSettings.values = {}
        QFileDialog.answer = ""
        self.dialogs = ctkMessageBox.shown
        slicer.app, slicer.mrmlScene = self.app, self.scene
        vars(slicer).pop("dicomDatabase", None)  # the desktop's DICOM database: a check that needs one sets it
        logics = {
            name.lower(): types.SimpleNamespace(logic=(lambda logic=logic: logic))
            for name, logic in self.ctx.module_logics.items()
        }
        slicer.modules = types.SimpleNamespace(**logics)
        self.module = self._load_module()
        slicer.modules.activelearning3d = types.SimpleNamespace(path=str(MODULE_FILE), widgetRepresentation=self._representation)
        self._panel = None
        self._unloaded = False

    def _load_module(self):
        sys.modules.pop("ActiveLearning3D", None)
        spec = importlib.util.spec_from_file_location("ActiveLearning3D", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ActiveLearning3D"] = module
        spec.loader.exec_module(module)
        return module

    def _representation(self):
        class Representation:
            def __init__(self, panel):
                self._panel = panel

            def self(self):
                return self._panel

        return Representation(self._panel or self.open_panel())

    def open_panel(self, enter: bool = True):
        """What the application does when the user first selects the module: module, widget, setup, enter."""
        module_parent = types.SimpleNamespace(path=str(MODULE_FILE))
        self.module_object = self.module.ActiveLearning3D(module_parent)
        parent = qMRMLWidget()
        parent.setLayout(QVBoxLayout())
        panel = self.module.ActiveLearning3DWidget(parent)
        panel.setup()
        self._panel = panel
        if enter:
            self.enter(panel)
        return panel

    def enter(self, panel):
        """The module is shown; the application calls ``enter()`` where the widget defines it."""
        panel.parent.isEntered = True
        if hasattr(panel, "enter"):
            panel.enter()

    def exit(self, panel):
        if hasattr(panel, "exit"):
            panel.exit()
        panel.parent.isEntered = False

    def close_scene(self):
        """File > Close Scene: the desktop calls ``Clear(0)`` (singletons are reset and kept, the rest removed)."""
        self.scene.Clear(0)

    def unload(self):
        """What the application does when it quits: the module's widget cleans up."""
        self.app.moduleManager().moduleAboutToBeUnloaded.emit("ActiveLearning3D")
        self._unloaded = True

    def finish(self):
        """After a check: unload the panel (observers removed, worker stopped) unless the check did."""
        if self._panel is not None and not self._unloaded:
            self.unload()

    def parameter_widgets(self, panel) -> dict:
        """The panel's widgets that name a parameter (SlicerParameterName), by parameter."""
        widgets = [w for w in vars(panel.ui).values() if isinstance(w, QObject)]
        return {w.property("SlicerParameterName"): w for w in widgets if w.property("SlicerParameterName")}

    def dataset(self, name: str = "source", n_cases: int = 4):
        from conftest import make_dataset

        return make_dataset(
            self.work / name, n_cases=n_cases, shape=(14, 16, 18), spacing=(0.9, 1.1, 1.3), origin=(5.0, -3.0, 2.0)
        )

    def create_project(self, panel, name: str = "project", data=None, start: str = "random", query_size: int = 3):
        """Fill the fields as a user does, click Create, and let the timer finish the work."""
        data = data or self.dataset(f"{name}-source")
        fields = self.parameter_widgets(panel)
        fields["projectPath"].currentPath = str(self.work / name)
        fields["imagesPath"].currentPath = str(data.images)
        fields["patchSize"].text = "4 5 6"
        fields["querySize"].value = query_size
        fields["startMethod"].currentIndex = [
            fields["startMethod"].itemText(i) for i in range(fields["startMethod"].count())
        ].index(start)
        panel.logic.ensureDependencies = lambda: True  # the Python stack is there (installing it is not tested here)
        panel.ui.createProjectButton.click()
        panel.waitUntilIdle(timeoutSeconds=120)
        return data


@contextlib.contextmanager
def _without(names):
    names = set(names)
    saved_modules = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in names}
    saved_finders = list(sys.meta_path)
    sys.meta_path[:] = [_Hiding(finder, names) for finder in saved_finders]
    try:
        yield
    finally:
        sys.meta_path[:] = saved_finders
        sys.modules.update(saved_modules)


def main(argv: list[str]) -> int:
    version, checks_file, out = argv[0], Path(argv[1]), Path(argv[2])
    rest = argv[3:]
    without = "--without-dependencies" in rest
    names = [n for n in rest if not n.startswith("--")]
    sys.path.insert(0, str(REPO))
    logging.basicConfig(level=logging.WARNING)
    results = {}
    with _without(PYTHON_STACK) if without else contextlib.nullcontext():
        install(version)
        spec = importlib.util.spec_from_file_location("slicer_module_checks", checks_file)
        checks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(checks)
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=out.parent) as work:
                desk = None
                try:
                    desk = Desktop(version, Path(work))
                    getattr(checks, name)(desk)
                    results[name] = {"ok": True}
                except BaseException:  # noqa: BLE001 - every failure is reported to the test
                    results[name] = {"ok": False, "error": traceback.format_exc()}
                finally:
                    if desk is not None:
                        with contextlib.suppress(Exception):
                            desk.finish()
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
