"""The module file against Slicer's own Python (5.8.1 and 5.12.3): parameter binding, scene close, enter/exit.

Each ``check_*`` below runs in a subprocess (see ``slicer_desktop_standins.py``)
where ``slicer.util``, ``slicer.ScriptedLoadableModule`` and
``slicer.parameterNodeWrapper`` are Slicer's unmodified files of one release,
the nodes are slicer-core's real MRML nodes, and only the Qt/CTK widgets (built
from the module's ``.ui`` file) and the application object are stand-ins. The
checks open the panel as the application does (``setup``, ``enter``), drive
its widgets as a user does, and look at the scene. Slicer's files live in
``../shared/vendor/slicer`` (CI has them); without them these tests skip.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slicer_desktop_standins import MODULE_FILE, PYTHON_STACK, REPO, UI_FILE, VERSIONS, vendored_python

HARNESS = Path(__file__).with_name("slicer_desktop_standins.py")
VALUE_SIGNALS = ("currentPathChanged", "currentIndexChanged", "valueChanged", "textChanged", "stateChanged")


# ------------------------------------------------------------------------------------------------ helpers
def _signal(widget):
    """The signal through which Slicer's connector hears the widget change."""
    return next(getattr(widget, name) for name in VALUE_SIGNALS if hasattr(widget, name))


def _connections(widget) -> int:
    return len(_signal(widget).slots)


def _shown(widget) -> str:
    kind = type(widget).__name__
    return {
        "ctkPathLineEdit": lambda: widget.currentPath,
        "QComboBox": lambda: widget.currentText,
        "QSpinBox": lambda: str(widget.value),
        "QLineEdit": lambda: widget.text,
        "QCheckBox": lambda: str(widget.checked),
    }[kind]()


def _change(widget, work: Path) -> str:
    """Enter another valid value as a user would; returns what the widget now shows."""
    kind = type(widget).__name__
    if kind == "ctkPathLineEdit":
        widget.currentPath = str(work / f"chosen-{widget.objectName}")
    elif kind == "QComboBox":
        widget.currentIndex = (widget.currentIndex + 1) % widget.count()
    elif kind == "QSpinBox":
        widget.value = widget.value + 1 if widget.value < widget.maximum else widget.value - 1
    elif kind == "QCheckBox":
        widget.checked = not widget.checked
    else:
        widget.text = widget.text + "1"
    return _shown(widget)


def _ui_spin_box_ranges() -> dict[str, tuple[int, int]]:
    ranges = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        if widget.get("class") == "QSpinBox":
            ranges[props["SlicerParameterName"].findtext("string")] = (
                int(props["minimum"].findtext("number")),
                int(props["maximum"].findtext("number")),
            )
    return ranges


def _tick_until(panel, done, seconds=30.0):
    """Let the panel's timer fire until ``done()`` (the timer is a stand-in: it fires when told)."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the panel did not finish in time"
        panel._timer.timeout.emit()
        time.sleep(0.02)


# ------------------------------------------------------------------- checks run with the Python stack there
def check_every_parameter_widget_binds_through_slicers_connectors(desk):
    panel = desk.open_panel()
    fields = desk.parameter_widgets(panel)
    in_ui = {p.findtext("string") for p in ET.parse(UI_FILE).getroot().iter("property") if p.get("name") == "SlicerParameterName"}
    assert set(fields) == in_ui and len(in_ui) == 15, sorted(fields)
    node = panel._parameterNode
    mrml = node.parameterNode
    assert mrml.GetScene() is desk.scene and mrml.GetAttribute("ModuleName") == "ActiveLearning3D"
    choices = desk.module.CHOICES
    lists = {
        "method": choices.methods,
        "startMethod": choices.start_methods,
        "device": choices.devices,
        "profile": choices.profiles,
        "init": choices.inits,
    }
    for name, items in lists.items():
        combo = fields[name]
        assert [combo.itemText(i) for i in range(combo.count())] == list(items), name
    assert (node.method, node.startMethod, node.device, node.profile, node.init) == (
        choices.method,
        choices.start_method,
        choices.device,
        choices.profile,
        "warm",  # warm-started loops are the default
    )
    assert list(choices.inits) == ["scratch", "warm"]
    for name, (low, high) in _ui_spin_box_ranges().items():  # Slicer widens an unbounded spin box
        assert (fields[name].minimum, fields[name].maximum) == (low, high), name
    assert node.prefill is True and fields["prefill"].checked  # on by default
    assert node.exportPartialLabels is False and not fields["exportPartialLabels"].checked
    for name, widget in fields.items():
        assert _connections(widget) == 1, f"{name}: {_connections(widget)} connections"
        old = getattr(node, name)
        assert _shown(widget) == str(old), f"{name}: the widget does not show the parameter"
        new = _change(widget, desk.work)
        assert str(getattr(node, name)) == new and mrml.GetParameter(name) != "", f"{name}: not stored in the node"
        setattr(node, name, old)
        assert _shown(widget) == str(old), f"{name}: the node's value did not come back to the widget"


def check_closing_the_scene_binds_the_fields_to_the_reset_parameter_node(desk):
    panel = desk.open_panel()
    fields = desk.parameter_widgets(panel)
    fields["classNames"].text = "1=liver"
    for entered in (True, False):
        if not entered:
            desk.exit(panel)
        desk.close_scene()
        singleton = desk.scene.GetSingletonNode("ActiveLearning3D", "vtkMRMLScriptedModuleNode")
        if not entered:
            desk.enter(panel)
        node = panel._parameterNode
        assert node is not None and singleton is not None and node.parameterNode is singleton
        assert singleton.GetAttribute("ModuleName") == "ActiveLearning3D"
        assert node.classNames == "" and fields["classNames"].text == ""  # a closed scene starts afresh
        assert all(_connections(w) == 1 for w in fields.values())
        fields["patchSize"].text = "3 4 5"
        assert singleton.GetParameter("patchSize") == "3 4 5"
        node.querySize = 7
        assert fields["querySize"].value == 7


def check_the_editor_keeps_a_live_singleton_node_across_a_scene_close(desk):
    panel = desk.open_panel()
    editor = panel.ui.segmentEditorWidget

    def singleton():
        return desk.scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")

    assert singleton() is not None and editor.mrmlSegmentEditorNode() is singleton()
    desk.create_project(panel)
    c = panel.controller
    assert c.current is not None and editor.segmentationNode() is c.annotation
    assert singleton().GetSegmentationNode() is c.annotation and c.editor_node is singleton()
    assert singleton().GetMaskSegmentID()  # the edits are masked to the box through this node
    desk.close_scene()
    assert editor.mrmlSegmentEditorNode() is singleton() and singleton().GetScene() is desk.scene
    panel.onBoxClicked(0, 0)  # the project stays open: a click shows a box again
    assert not editor.errors, editor.errors
    assert editor.segmentationNode() is c.annotation and singleton().GetSegmentationNode() is c.annotation
    assert c.editor_node is singleton() and singleton().GetMaskSegmentID()


def check_enter_and_exit_pair_up(desk):
    panel = desk.open_panel()
    editor = panel.ui.segmentEditorWidget
    fields = desk.parameter_widgets(panel)
    for _ in range(2):
        assert editor.shortcutsInstalled and editor.observingViews
        assert all(_connections(w) == 1 for w in fields.values())
        editor.setActiveEffect("Paint")  # the user paints, then opens another module
        desk.exit(panel)
        assert editor.activeEffect() is None, "the paint effect still captures slice-view clicks"
        assert not editor.shortcutsInstalled and not editor.observingViews
        # 5.12 unbinds the hidden fields; 5.8 cannot (its connectGui returns no tag), so they stay bound once
        assert all(_connections(w) <= 1 for w in fields.values())
        desk.enter(panel)


def check_the_editor_offers_no_other_segmentation_or_volume(desk):
    editor = desk.open_panel().ui.segmentEditorWidget
    assert not editor.segmentationNodeSelectorVisible() and not editor.sourceVolumeNodeSelectorVisible()


def check_bad_input_gives_one_line_and_leaves_the_disk_unchanged(desk):
    from conftest import checksums

    panel = desk.open_panel()
    fields = desk.parameter_widgets(panel)
    desk.create_project(panel, "first")
    assert panel.controller is not None
    before, shown = checksums(desk.work / "first"), len(desk.dialogs)
    desk.create_project(panel, "first")  # a project is there already
    fields["projectPath"].currentPath = str(desk.work / "second")
    fields["classNames"].text = "1="
    panel.ui.createProjectButton.click()
    fields["classNames"].text = ""
    fields["imagesPath"].currentPath = str(desk.work / "no-such-folder")
    panel.ui.createProjectButton.click()
    fields["projectPath"].currentPath = str(desk.work / "first-source")
    panel.ui.openProjectButton.click()  # a folder that is no project
    messages = [d["text"] for d in desk.dialogs[shown:]]
    assert len(messages) == 4, messages
    for text in messages:
        assert text and "\n" not in text and "Traceback" not in text, text
    assert "exists" in messages[0] and "classes" in messages[1] and "no-such-folder" in messages[2]
    assert panel.ui.stageLabel.text == messages[-1]
    assert checksums(desk.work / "first") == before and not (desk.work / "second").exists()
    assert desk.app.overrideCursors == 0


def check_add_box_puts_the_box_at_the_crosshair_not_the_mouse(desk):
    import numpy as np

    panel = desk.open_panel()
    desk.create_project(panel)
    c = panel.controller
    crosshair, mouse = (11, 3, 14), (2, 12, 2)  # (k, j, i)
    ras = {v: (c.grid.ijk_to_ras @ np.array([v[2], v[1], v[0], 1.0]))[:3] for v in (crosshair, mouse)}
    desk.crosshair.SetCrosshairRAS(*ras[crosshair])
    desk.crosshair.SetCursorPositionRAS(list(ras[mouse]))  # where the mouse last was: not where the box goes
    before = len(c.table())
    panel.ui.addBoxButton.click()
    assert len(c.table()) == before + 1
    box = c.current.box
    assert c.current.source == "annotator"
    assert all(lo <= v < lo + s for v, lo, s in zip(crosshair, box.coords, box.size)), (box, crosshair)


def check_a_failing_poll_stops_the_timer_and_is_reported_once(desk):
    panel = desk.open_panel()
    desk.create_project(panel)
    c = panel.controller

    def broken():
        raise RuntimeError("the job folder is gone")

    c.poll, c.pipeline = broken, "running"  # a loop runs and its poll fails
    shown = len(desk.dialogs)
    panel._timer.start()
    _tick_until(panel, lambda: not panel._timer.isActive())  # stopped: a stopped timer fires no more
    c.pipeline = None
    assert [d["text"] for d in desk.dialogs[shown:]] == ["Active Learning 3D failed: the job folder is gone"]
    assert "RuntimeError" in desk.dialogs[-1]["details"]  # the trace is in the details, for a bug report


def check_the_loop_is_polled_off_the_gui_thread_with_a_moving_bar(desk):
    import threading

    from ActiveLearning3DLib.gui.controller import LoopProgress

    panel = desk.open_panel()
    desk.create_project(panel)
    c = panel.controller
    release, threads = threading.Event(), []

    def slow_poll():  # the poll that ends with the query step, which takes a while
        threads.append(threading.current_thread())
        release.wait(30)
        c.pipeline = None
        return LoopProgress("query", "done", 100.0, "loop 1: 3 boxes", [], "")

    c.poll, c.pipeline = slow_poll, "running"
    panel._timer.start()
    started = time.monotonic()
    for _ in range(3):
        panel._timer.timeout.emit()
        time.sleep(0.05)
    assert time.monotonic() - started < 5 and not release.is_set()  # the ticks returned while the query ran
    assert threads and threads[0] is not threading.main_thread()
    assert panel.ui.progressBar.maximum == 0, "the bar does not move while the query runs"
    release.set()
    _tick_until(panel, lambda: not panel._timer.isActive())
    assert (panel.ui.progressBar.maximum, panel.ui.progressBar.value) == (100, 100)
    assert "loop 1: 3 boxes" in panel.ui.stageLabel.text


def check_cancel_waits_for_the_running_poll_then_runs_off_the_gui_thread(desk):
    import threading

    from ActiveLearning3DLib.gui.controller import LoopProgress

    panel = desk.open_panel()
    desk.create_project(panel)
    c = panel.controller
    threads, calls = [], []

    def poll():
        calls.append("poll")
        return LoopProgress("train", "running", 40.0, "fold 0", [], "")

    def cancel():  # kills the job trees, with a grace period for each: it takes a while
        calls.append("cancel")
        threads.append(threading.current_thread())
        time.sleep(0.3)
        c.pipeline = None
        return ["loop_000-fold_0"]

    c.poll, c.cancel, c.pipeline = poll, cancel, "running"
    panel.updateButtons()
    assert panel.ui.startButton.text == "Cancel" and panel.ui.startButton.enabled
    panel._timer.start()
    panel._timer.timeout.emit()  # a poll is on its way
    panel.ui.startButton.click()
    assert not panel.ui.startButton.enabled  # asked once
    _tick_until(panel, lambda: not panel._timer.isActive())
    assert calls.count("cancel") == 1 and calls.index("cancel") > 0 and threads[0] is not threading.main_thread()
    assert panel.ui.stageLabel.text == "Cancelled (1 jobs)." and panel.ui.startButton.text == "Start next loop"


def check_project_creation_runs_off_the_gui_thread(desk):
    import threading

    from ActiveLearning3DLib.gui import AnnotationController

    panel = desk.open_panel()
    release, threads = threading.Event(), []
    create = AnnotationController.create_project

    def slow_create(*args, **kwargs):
        threads.append(threading.current_thread())
        release.wait(30)
        return create(*args, **kwargs)

    AnnotationController.create_project = slow_create
    try:
        data = desk.dataset()
        fields = desk.parameter_widgets(panel)
        fields["projectPath"].currentPath, fields["imagesPath"].currentPath = str(desk.work / "p"), str(data.images)
        fields["querySize"].value = 3
        panel.logic.ensureDependencies = lambda: True
        panel.ui.createProjectButton.click()
        panel._timer.timeout.emit()
        assert panel.controller is None and panel.ui.progressBar.maximum == 0
        assert not panel.ui.createProjectButton.enabled  # one long action at a time
        release.set()
        panel.waitUntilIdle(60)
    finally:
        AnnotationController.create_project = create
    assert threads and threads[0] is not threading.main_thread()
    assert panel.controller is not None and panel.ui.boxTable.rowCount == 3


def check_a_second_project_replaces_the_first_and_a_running_loop_keeps_its_project(desk):
    panel = desk.open_panel()
    desk.create_project(panel, "first")
    first = panel.controller
    desk.create_project(panel, "second")
    second = panel.controller
    assert second is not first and first.volume is None
    scene = desk.scene
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is second.volume
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # the second's partial labels and annotation
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == len(second.box_nodes.nodes)
    second.pipeline = "running"
    shown = len(desk.dialogs)
    desk.parameter_widgets(panel)["projectPath"].currentPath = str(desk.work / "first")
    panel.ui.openProjectButton.click()
    second.pipeline = None
    assert panel.controller is second and len(desk.dialogs) == shown + 1 and "still runs" in desk.dialogs[-1]["text"]


def check_the_score_column_holds_numbers(desk):
    import qt

    from ActiveLearning3DLib.gui.controller import QueryRow

    panel = desk.open_panel()
    desk.create_project(panel)
    rows = [
        QueryRow("000-0000", "a", 0, 10.5, None, "pending", "query"),
        QueryRow("000-0001", "b", 0, 9.25, None, "pending", "query"),
        QueryRow("000-0002", "c", 0, None, None, "pending", "query"),
    ]
    panel.controller.table = lambda *args, **kwargs: rows
    panel.refreshTable()
    scores = [panel.ui.boxTable.item(r, 2).data(qt.Qt.DisplayRole) for r in range(3)]
    assert scores[:2] == [10.5, 9.25] and all(isinstance(s, float) for s in scores[:2])  # 10.5 sorts after 9.25
    assert panel.ui.boxTable.item(2, 2).text() == ""


def check_the_self_test_passes_with_the_python_stack(desk):
    import types

    desk.app.testing = True  # Slicer --testing
    module = desk.module.ActiveLearning3D(types.SimpleNamespace(path=str(MODULE_FILE)))
    module.runTest(msec=0)  # what Slicer's test harness calls: creates a project, paints, submits, skips
    panel = desk.slicer.modules.activelearning3d.widgetRepresentation().self()
    assert panel.controller is not None and panel.controller.counts()["annotated"] == 1


def check_unloading_the_module_disconnects_the_panel(desk):
    panel = desk.open_panel()
    fields = desk.parameter_widgets(panel)
    desk.unload()
    assert all(_connections(w) == 0 for w in fields.values())
    assert not panel._timer.isActive() and not panel.Observations


# ----------------------------------------------------- pre-fill, effort, other project sources, DICOM SEG
def _spy(owner, name, calls):
    """Let ``owner.name`` run as before, recording its thread and arguments; returns what undoes it."""
    import threading

    original = getattr(owner, name)
    saved = vars(owner).get(name) if isinstance(owner, type) else None

    def recorded(*args, **kwargs):
        calls.append((name, threading.current_thread(), args, kwargs))
        return original(*args, **kwargs)

    setattr(owner, name, recorded)
    return lambda: setattr(owner, name, saved) if saved is not None else delattr(owner, name)


def _paint_inside(c, voxels: int = 4):
    """Paint class 1 in the first ``voxels`` voxels of the shown box's first row (inside only: no warning)."""
    import numpy as np

    from ActiveLearning3DLib.gui import mrml

    mask = np.zeros(c.logic.project.cases[c.current.case].shape, bool)
    k, j, i = c.current.box.coords
    mask[k, j, i : i + voxels] = True
    mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, mask, c.grid)
    return int(mask.sum())


def check_the_prefill_checkbox_sets_the_projects_setting_and_the_next_box_follows_it(desk):
    import numpy as np

    from ActiveLearning3DLib.gui import AnnotationController
    from ActiveLearning3DLib.nnunet.paths import NnunetPaths
    from ActiveLearning3DLib.prefill import write_pool_prediction

    panel = desk.open_panel()
    data = desk.dataset()
    fields = desk.parameter_widgets(panel)
    fields["labelsPath"].currentPath = str(data.labels)  # the oracle annotates loop 0 below
    box = panel.ui.prefillCheckBox
    assert box is fields["prefill"] and box.checked
    desk.create_project(panel, data=data)
    c = panel.controller
    assert c.settings.prefill is True
    # a model of loop 0 predicted the pool; loop 1 is queried
    c.logic.annotate_with_oracle()
    shape = c.logic.project.cases[c.logic.project.pool_cases[0]].shape
    predicted = np.random.default_rng(3).integers(0, 2, size=shape).astype(np.uint8)
    folder = NnunetPaths.for_project(c.logic.project).results_root / "loop_000_test_abcd" / "pool_prediction"
    for case in c.logic.project.pool_cases:
        write_pool_prediction(folder, case, predicted, c.logic.project.read_image(case))
    c.logic.query("random", 2, seed=4)
    panel.refreshTable()

    def opened():
        panel.onBoxClicked(0, 0)
        inside = np.zeros(shape, bool)
        inside[c.current.box.slices] = True
        return c.current.loop, c.prefill_shown, c.painted_labels(), inside

    loop, shown, painted, inside = opened()
    assert loop == 1 and shown and (painted[inside] == predicted[inside]).all() and not painted[~inside].any()
    box.click()  # off
    assert not box.checked and panel._parameterNode.prefill is False and c.settings.prefill is False
    assert AnnotationController.open_project(c.ctx, c.logic.project.path).settings.prefill is False  # saved
    loop, shown, painted, inside = opened()
    assert loop == 1 and not shown and not painted.any()
    # a closed scene resets the parameter node; the project stays open and the field shows its setting again
    desk.close_scene()
    assert not box.checked and panel._parameterNode.prefill is False and c.settings.prefill is False
    box.click()
    assert c.settings.prefill is True
    box.click()
    fields["projectPath"].currentPath = str(c.logic.project.path)
    panel.ui.openProjectButton.click()  # opened again: the field shows the project's setting
    assert panel.controller.settings.prefill is False and not box.checked
    box.click()
    assert panel.controller.settings.prefill is True
    assert AnnotationController.open_project(c.ctx, c.logic.project.path).settings.prefill is True
    assert not desk.dialogs, desk.dialogs


def check_the_init_choice_is_saved_with_the_project_and_names_the_next_model(desk):
    from ActiveLearning3DLib.gui import AnnotationController

    panel = desk.open_panel()
    fields = desk.parameter_widgets(panel)
    combo = panel.ui.initComboBox
    assert combo is fields["init"] and combo.currentText == "warm"  # the default: warm-started loops
    desk.create_project(panel)
    c = panel.controller
    assert c.settings.init == "warm" and c.settings.loop_settings().init == "warm"
    combo.currentIndex = [combo.itemText(i) for i in range(combo.count())].index("scratch")
    assert panel._parameterNode.init == "scratch"
    panel._saveSettings()  # what Start next loop does first
    assert c.settings.init == "scratch" and c.settings.loop_settings().init == "scratch"
    assert AnnotationController.open_project(c.ctx, c.logic.project.path).settings.init == "scratch"  # saved
    desk.close_scene()  # the reset parameter node shows the open project's choice again
    assert panel._parameterNode.init == "scratch" and combo.currentText == "scratch"
    panel._parameterNode.init = "warm"
    fields["projectPath"].currentPath = str(c.logic.project.path)
    panel.ui.openProjectButton.click()  # opened again: the field shows the project's setting
    assert panel.controller.settings.init == "scratch" and combo.currentText == "scratch"
    assert not desk.dialogs, desk.dialogs


def check_the_effort_label_shows_the_controllers_totals_after_a_submit_and_after_a_loop(desk):
    import numpy as np

    from ActiveLearning3DLib.gui.controller import LoopProgress

    panel = desk.open_panel()
    desk.create_project(panel)
    c = panel.controller
    label = panel.ui.effortLabel
    assert label.text == "" == c.effort_summary()  # nothing recorded yet
    painted = _paint_inside(c)
    record = c.current
    panel.ui.submitButton.click()
    assert c.logic.find_box(record.id).state == "annotated"
    assert label.text == c.effort_summary() == c.effort_text(0) != ""
    assert label.text.startswith("loop 0: 1 boxes annotated")
    assert f"corrected {painted} of {record.box.voxels} voxels" in label.text and "s recorded" in label.text, label.text
    before = label.text

    def loop_poll():  # the loop's last poll: the other boxes were annotated in another view, the query ran
        for other in [b for b in c.logic.boxes(0) if b.state == "pending"]:
            labels = np.zeros(other.box.size, np.uint8)
            labels[0, 0, :3] = 1
            c.logic.submit(other, labels, seconds=12.0)
        c.logic.query("random", 2, seed=5)
        c.pipeline = None
        return LoopProgress("query", "done", 100.0, "loop 1: 2 boxes", [], "")

    c.poll, c.pipeline = loop_poll, "running"
    panel._timer.start()
    _tick_until(panel, lambda: not panel._timer.isActive())
    assert c.current_loop() == 1 and label.text != before
    assert label.text == c.effort_summary() and label.text.startswith("loop 0: 3 boxes annotated")
    assert f"corrected {painted + 3 * 2} of" in label.text  # a loop's totals stay in view in the next loop
    assert not desk.dialogs, desk.dialogs


def _fill_creation_fields(desk, panel, name):
    fields = desk.parameter_widgets(panel)
    fields["projectPath"].currentPath = str(desk.work / name)
    fields["patchSize"].text = "4 5 6"
    fields["querySize"].value = 2
    fields["startMethod"].currentIndex = [fields["startMethod"].itemText(i) for i in range(fields["startMethod"].count())].index(
        "random"
    )
    panel.logic.ensureDependencies = lambda: True


def check_create_from_scene_volumes_writes_them_on_the_gui_thread_and_creates_on_the_worker(desk):
    import threading

    import numpy as np
    import SimpleITK as sitk

    from conftest import write_image

    from ActiveLearning3DLib.gui import AnnotationController, mrml

    panel = desk.open_panel()
    _fill_creation_fields(desk, panel, "from-scene")
    panel.ui.createFromSceneButton.click()  # nothing loaded yet
    assert [d["text"] for d in desk.dialogs] == ["scene volumes: no grey-scale volume given (load one into the scene)"]
    assert sorted(p.name for p in desk.work.iterdir()) == []  # no project, no staging folder
    del desk.dialogs[:]
    arrays, nodes = {}, []
    for n, name in enumerate(["CT chest", "MR T1"]):
        arrays[name] = np.random.default_rng(n).normal(0, 50, (10, 12, 14)).astype(np.int16)
        path = write_image(desk.work / "files" / f"v{n}.nii.gz", arrays[name], spacing=(0.8, 1.1, 2.0 + n))
        nodes.append(mrml.load_volume(desk.ctx, path, name))
    labels = write_image(desk.work / "files" / "labels.nii.gz", np.zeros((10, 12, 14), np.uint8))
    mrml.load_volume(desk.ctx, labels, "my labels", labelmap=True)  # not an image: left out
    assert panel.sceneVolumes() == nodes
    calls = []
    undo = [_spy(AnnotationController, name, calls) for name in ("stage_scene_volumes", "create_project_from_staged")]
    try:
        panel.ui.createFromSceneButton.click()
        panel.waitUntilIdle(120)
    finally:
        for u in undo:
            u()
    assert not desk.dialogs, desk.dialogs
    (stage, stage_thread, stage_args, _), (create, create_thread, create_args, options) = calls
    assert stage == "stage_scene_volumes" and stage_thread is threading.main_thread()  # storage nodes: scene work
    assert stage_args[1:] == (str(desk.work / "from-scene"), nodes)
    assert create == "create_project_from_staged" and create_thread is not threading.main_thread()
    assert create_args[1] == str(desk.work / "from-scene") and not Path(create_args[2]).exists()  # staging removed
    assert (options["query_size"], options["start_method"], options["patch_size"]) == (2, "random", [4, 5, 6])
    c = panel.controller
    assert sorted(c.logic.project.cases) == ["CT-chest", "MR-T1"] and panel.ui.boxTable.rowCount == 2
    for case, name in (("CT-chest", "CT chest"), ("MR-T1", "MR T1")):
        assert (sitk.GetArrayFromImage(c.logic.project.read_image(case)) == arrays[name]).all()
    assert c.volume is not None and c.volume not in panel.sceneVolumes()  # the project's own case is left out
    assert panel.sceneVolumes() == nodes


class _DicomDatabase:
    """Stands in for ``slicer.dicomDatabase`` (a CTK database, desktop only): the series' real files, by UID; records
    the threads that read it (its SQL connection belongs to the GUI thread)."""

    def __init__(self, series):
        import threading

        self.series, self.threads, self._current = series, [], threading.current_thread

    def filesForSeries(self, uid):
        self.threads.append(self._current())
        return [str(f) for f in self.series[uid].files]


def _dicom_browser(selection):
    """``slicer.modules.DICOMWidget`` as far as the panel reads it: the series selected in the DICOM browser."""
    import types

    manager = types.SimpleNamespace(currentSeriesSelection=lambda: list(selection))
    browser = types.SimpleNamespace(dicomTableManager=lambda: manager)
    return types.SimpleNamespace(browserWidget=types.SimpleNamespace(dicomBrowser=browser))


def _dicom_project(desk, panel):
    """A project of a CT series and a secondary capture selected in the (stand-in) DICOM browser."""
    from dicom_data import OBLIQUE, hu_volume, write_ct_series, write_secondary_capture

    volume = hu_volume((10, 12, 14))
    ct = write_ct_series(desk.work / "database", volume, (0.7, 0.8, 2.0), (1.0, 2.0, 3.0), OBLIQUE, nested=False)
    sc = write_secondary_capture(desk.work / "database" / "sc")
    database = _DicomDatabase({ct.series_uid: ct, sc.series_uid: sc})
    desk.slicer.dicomDatabase = database
    desk.slicer.modules.DICOMWidget = _dicom_browser([ct.series_uid, sc.series_uid])
    _fill_creation_fields(desk, panel, "from-dicom")
    panel.ui.createFromDicomButton.click()
    panel.waitUntilIdle(120)
    return ct, sc, volume, database


def check_create_from_the_dicom_selection_reads_the_database_on_the_gui_thread(desk):
    import threading

    import SimpleITK as sitk

    from ActiveLearning3DLib.gui import AnnotationController

    panel = desk.open_panel()
    _fill_creation_fields(desk, panel, "from-dicom")
    panel.ui.createFromDicomButton.click()  # no DICOM module opened
    desk.slicer.dicomDatabase = _DicomDatabase({})
    desk.slicer.modules.DICOMWidget = _dicom_browser([])
    panel.ui.createFromDicomButton.click()  # nothing selected
    messages = [d["text"] for d in desk.dialogs]
    assert len(messages) == 2 and "open the DICOM module" in messages[0] and "no series selected" in messages[1]
    assert all("\n" not in m for m in messages) and not (desk.work / "from-dicom").exists()
    del desk.dialogs[:]
    calls = []
    undo = _spy(AnnotationController, "create_project_from_dicom_files", calls)
    try:
        ct, sc, volume, database = _dicom_project(desk, panel)
    finally:
        undo()
    assert not desk.dialogs, desk.dialogs
    assert database.threads and all(t is threading.main_thread() for t in database.threads)
    [(_, thread, args, options)] = calls
    assert thread is not threading.main_thread() and args[1] == str(desk.work / "from-dicom")
    assert args[2] == {ct.series_uid: [str(f) for f in ct.files], sc.series_uid: [str(f) for f in sc.files]}
    assert (options["query_size"], options["start_method"]) == (2, "random")
    project = panel.controller.logic.project
    [case] = project.cases
    assert (sitk.GetArrayFromImage(project.read_image(case)) == volume).all()
    assert len(project.dicom_skipped) == 1 and "secondary capture" in project.dicom_skipped[0]


def check_export_dicom_seg_writes_off_the_gui_thread_and_says_what_it_wrote(desk):
    import threading

    import highdicom as hd
    import numpy as np
    import SimpleITK as sitk

    panel = desk.open_panel()
    ct, _, _, _ = _dicom_project(desk, panel)
    c = panel.controller
    project = c.logic.project
    [case] = project.cases
    panel.ui.exportDicomSegButton.click()  # no predictions yet, annotations not asked for
    panel.waitUntilIdle(60)
    assert [d["text"] for d in desk.dialogs] == ["no predictions yet: predict all cases first"]
    del desk.dialogs[:]
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[2:5, 4:9, 3:7] = 1
    prediction = sitk.GetImageFromArray(labels)
    prediction.CopyInformation(project.read_image(case))
    folder = project.path / "nnunet" / "results" / "loop_000" / "predictions"
    folder.mkdir(parents=True)
    sitk.WriteImage(prediction, str(folder / f"{case}.nii.gz"))
    panel.ui.exportPartialLabelsCheckBox.click()
    assert panel._parameterNode.exportPartialLabels is True
    calls = []
    undo = _spy(c, "export_dicom_seg", calls)
    try:
        panel.ui.exportDicomSegButton.click()
        panel.waitUntilIdle(120)
    finally:
        undo()
    assert not desk.dialogs, desk.dialogs
    [(_, thread, args, options)] = calls
    assert thread is not threading.main_thread() and args == (None,) and options == {"partial_labels": True}
    assert panel.ui.stageLabel.text == "DICOM SEG: 2 written, 0 up to date"
    seg_file = folder / f"{case}.seg.dcm"
    assert str(seg_file) in panel.ui.logTextEdit.toPlainText()
    seg = hd.seg.segread(seg_file)
    assert (seg.get_pixels_by_source_instance(ct.sop_uids, combine_segments=True, skip_overlap_checks=True) == labels).all()


# --------------------------------------------------------- checks run without torch, nnunetv2, scipy, matplotlib
def check_the_panel_opens_without_the_python_stack(desk):
    import importlib.util

    assert all(importlib.util.find_spec(name) is None for name in PYTHON_STACK)
    panel = desk.open_panel()  # what Slicer's generic test_widgetRepresentation does: the panel is built
    desk.exit(panel)
    desk.enter(panel)
    desk.exit(panel)
    desk.unload()


def check_the_self_test_skips_with_a_message_without_the_python_stack(desk):
    import logging
    import types

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        module = desk.module.ActiveLearning3D(types.SimpleNamespace(path=str(MODULE_FILE)))
        module.runTest(msec=0)  # what Slicer's test harness calls
    finally:
        logging.getLogger().removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("self-test skipped" in w and "torch" in w for w in warnings), warnings


CHECKS = [name for name, value in dict(globals()).items() if name.startswith("check_") and callable(value)]
WITHOUT_STACK = [
    "check_the_panel_opens_without_the_python_stack",
    "check_the_self_test_skips_with_a_message_without_the_python_stack",
]
WITH_STACK = [name for name in CHECKS if name not in WITHOUT_STACK]


# -------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def desktop(tmp_path_factory):
    """Runs the checks of one release in a subprocess (once per release and setting); results by check."""
    results = {}

    def run(version: str, without_stack: bool) -> dict:
        if not vendored_python(version).is_dir():
            pytest.skip(f"needs Slicer's Python sources in {vendored_python(version)} (../shared/vendor; CI has them)")
        key = (version, without_stack)
        if key not in results:
            out = tmp_path_factory.mktemp(f"slicer-{version}") / "results.json"
            names = WITHOUT_STACK if without_stack else WITH_STACK
            flags = ["--without-dependencies"] if without_stack else []
            done = subprocess.run(
                [sys.executable, str(HARNESS), version, __file__, str(out), *flags, *names],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0 and out.is_file(), f"the harness failed:\n{done.stderr[-4000:]}"
            results[key] = json.loads(out.read_text())
        return results[key]

    return run


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("check", WITH_STACK)
def test_panel_in_slicer(desktop, version, check):
    result = desktop(version, False)[check]
    assert result["ok"], result["error"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("check", WITHOUT_STACK)
def test_panel_in_slicer_before_the_first_use_installs_the_python_stack(desktop, version, check):
    result = desktop(version, True)[check]
    assert result["ok"], result["error"]


# -------------------------------------------------------------------------- without Slicer's files
def test_the_stand_in_editor_knows_only_what_slicers_header_declares():
    from slicer_desktop_standins import public_methods, segment_editor_header

    for version in VERSIONS:
        if not vendored_python(version).is_dir():
            pytest.skip(f"needs Slicer's sources in {vendored_python(version)} (../shared/vendor; CI has them)")
        declared = public_methods(segment_editor_header(version), "qMRMLSegmentEditorWidget")
        used = set(re.findall(r"editor\.(\w+)\(", MODULE_FILE.read_text()))
        assert used and used <= declared, sorted(used - declared)
        assert {"setupViewObservations", "removeViewObservations", "installKeyboardShortcuts"} <= declared
        assert "SetCrosshairRAS" not in declared and "selectParameterNode" not in declared


def test_panel_choices_come_from_the_registry_and_the_profiles():
    from ActiveLearning3DLib.gui.choices import panel_choices
    from ActiveLearning3DLib.gui.controller import PanelSettings
    from ActiveLearning3DLib.nnunet.profiles import DEVICES, resolve_profile
    from ActiveLearning3DLib.query_methods import METHODS

    ch = panel_choices()
    assert set(ch.methods) == {n for n, m in METHODS.items() if not m.needs_embeddings and not m.needs_ground_truth}
    assert set(ch.start_methods) == {n for n, m in METHODS.items() if not m.needs_model}
    assert ch.start_methods[:2] == ("cluster", "cscs")  # label-free first
    assert set(ch.devices) == set(DEVICES) and "mps" not in ch.devices
    assert ch.profiles[0] == "auto" and all(resolve_profile(p, device="cpu").name == p for p in ch.profiles[1:])
    defaults = PanelSettings()
    assert (ch.method, ch.start_method, ch.device, ch.profile, ch.init) == (
        defaults.method,
        defaults.start_method,
        defaults.device,
        defaults.profile,
        defaults.init,
    )
    from ActiveLearning3DLib.pipeline import INITS, LoopSettings

    assert ch.inits == INITS and all(LoopSettings(init=i).init == i for i in ch.inits)
    assert ch.method in ch.methods and ch.start_method in ch.start_methods
    module = ast.parse(MODULE_FILE.read_text())
    assigned = {t.id for node in module.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert not assigned & {"METHODS", "START_METHODS", "DEVICES", "PROFILES"}, "hard-coded lists in the module"


def test_the_parameter_nodes_fields_are_the_panel_settings_or_creation_inputs():
    """The parameter node, PanelSettings and the field table of the annotation core describe one set of inputs:
    every field of the node is a panel setting (PANEL_FIELDS) or an input of project creation (CREATION_FIELDS),
    every panel setting has its field, the module saves and loads them through that table, and the node's
    defaults are PanelSettings' (choices through panel_choices, the rest checked here)."""
    from dataclasses import fields

    from ActiveLearning3DLib.gui.annotation import CREATION_FIELDS, PANEL_FIELDS, PanelSettings

    module = ast.parse(MODULE_FILE.read_text())
    node_class = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "ActiveLearning3DParameterNode")
    declared = {a.target.id: a for a in node_class.body if isinstance(a, ast.AnnAssign)}
    assert set(declared) == set(PANEL_FIELDS) | set(CREATION_FIELDS), "a parameter node field missing from a table"
    assert not set(PANEL_FIELDS) & set(CREATION_FIELDS)
    settings = {f.name: f for f in fields(PanelSettings)}
    named = list(PANEL_FIELDS.values()) + [v for v in CREATION_FIELDS.values() if v]
    assert sorted(named) == sorted(settings), "a panel setting without its field, or one field for two settings"
    defaults = {name: ast.unparse(a.value) for name, a in declared.items() if a.value is not None}
    for name in ("method", "startMethod", "device", "profile", "init"):  # panel_choices: PanelSettings' defaults
        assert defaults[name] == f"CHOICES.{PANEL_FIELDS.get(name) or CREATION_FIELDS[name]}"
    assert defaults["prefill"] == repr(settings["prefill"].default)
    assert defaults["parallel"] == "0" and settings["parallel"].default is None  # 0 in the spin box: no limit
    widget = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "ActiveLearning3DWidget")
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "settings_from_fields(" in methods["_saveSettings"] and "fields_from_settings(" in methods["_loadSettings"]


def test_extension_urls_name_files_in_the_repository_and_the_license_is_there():
    cmake = (REPO / "CMakeLists.txt").read_text()
    paths = re.findall(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/main/([^\s\";]+)", cmake)
    assert paths and all((REPO / p).is_file() for p in paths), paths
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


def test_every_interactive_widget_of_the_ui_file_is_bound():
    """A button, checkbox or field in the .ui file that the module neither connects nor binds does nothing."""
    source = MODULE_FILE.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    interactive = ("QPushButton", "QCheckBox", "QComboBox", "QSpinBox", "QLineEdit", "ctkPathLineEdit", "QTableWidget")
    unbound = []
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        named = any(p.get("name") == "SlicerParameterName" for p in widget.findall("property"))
        if widget.get("class") in interactive and not named and widget.get("name") not in used:
            unbound.append(widget.get("name"))
    assert not unbound, f"widgets in the .ui file that nothing binds: {unbound}"
    for button in ("createFromSceneButton", "createFromDicomButton", "exportDicomSegButton", "prefillCheckBox"):
        assert re.search(rf'self\.ui\.{button}\.connect\("clicked\(bool\)"', source), button
    assert "self.ui.effortLabel.text" in source
