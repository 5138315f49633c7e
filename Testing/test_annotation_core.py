"""The panel's annotation core without MRML: what a console user (or another front end) drives alone.

The full cycle runs in a fresh interpreter, so that what it loaded can be
checked: no ``slicer``, no VTK, no MRML module of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_dataset, read_array

from ActiveLearning3DLib.gui.annotation import AnnotationSession
from ActiveLearning3DLib.logic import ActiveLearningLogic
from ActiveLearning3DLib.project import ProjectError

REPO = Path(__file__).resolve().parents[1]
PATCH = (5, 6, 4)

CYCLE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ActiveLearning3DLib.gui.annotation import AnnotationSession

    source, project = sys.argv[1], sys.argv[2]
    AnnotationSession.create(project, source + "/imagesTr", source + "/labelsTr", patch_size=[5, 6, 4], query_size=3,
                             test_fraction=0.25)
    session = AnnotationSession.open(project)          # as a console user continues a project
    before = session.counts()
    box = session.open_box(session.next_pending().id)
    start = session.starting_labels()
    labels = np.zeros(box.box.size, np.uint8)
    labels[1:3, 1:4, 1:3] = 1
    labels[0, 0, 0] = 2
    result = session.submit_labels(labels, annotator="console")
    print(json.dumps({
        "box": box.id, "case": box.case, "corner": list(box.box.coords), "start": start is None,
        "before": before, "after": session.counts(), "state": result.box.state, "annotator": result.box.annotator,
        "next": result.next_box.id if result.next_box else None, "current": session.current.id,
        "foreground": result.foreground_voxels,
        "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("slicer", "vtk", "vtkmodules", "qt", "ctk",
                                                                        "PythonQt", "mrml")
                          or "mrml" in m.lower() or m in ("ActiveLearning3DLib.gui.view",
                                                          "ActiveLearning3DLib.gui.controller",
                                                          "ActiveLearning3DLib.gui.headless")),
    }))
""")


def test_a_console_user_annotates_a_box_with_the_core_alone_and_no_mrml_is_loaded(tmp_path):
    data = make_dataset(tmp_path / "source", n_cases=4)
    project = tmp_path / "project"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", CYCLE, str(data.root), str(project)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["modules"] == [], f"the annotation core loaded {out['modules']}"
    assert out["before"] == {"pending": 3, "annotated": 0, "skipped": 0, "total": 3}
    assert out["after"] == {"pending": 2, "annotated": 1, "skipped": 0, "total": 3}
    assert out["state"] == "annotated" and out["annotator"] == "console" and out["start"]  # loop 0: no pre-fill
    assert out["foreground"] == 2 * 3 * 2 + 1
    assert out["next"] is not None and out["next"] != out["box"] and out["current"] == out["next"]  # advanced
    # saved on disk: the loop file and the partial labels, read back by a fresh logic
    logic = ActiveLearningLogic.open(project)
    record = logic.find_box(out["box"])
    assert record.state == "annotated" and record.annotator == "console" and record.seconds is not None
    partial = read_array(logic.project.partial_label_path(out["case"]))
    inside = partial[record.box.slices]
    expected = np.zeros(record.box.size, np.uint8)
    expected[1:3, 1:4, 1:3] = 1
    expected[0, 0, 0] = 2
    np.testing.assert_array_equal(inside, expected)
    assert list(record.box.coords) == out["corner"]
    assert logic.claims().keys() <= {out["next"]}  # the submitted box's claim went with it


def _session(tmp_path: Path, query_size: int = 3) -> AnnotationSession:
    data = make_dataset(tmp_path / "source", n_cases=4)
    return AnnotationSession.create(
        tmp_path / "project", data.images, data.labels, patch_size=PATCH, query_size=query_size, test_fraction=0.25
    )


def test_the_core_skips_and_refuses_the_next_loop_with_the_one_pending_rule(tmp_path):
    s = _session(tmp_path)
    assert not s.can_start_next_loop()
    with pytest.raises(ProjectError, match="3 boxes of loop 0 are still pending; annotate or skip them first"):
        s.start_next_loop()
    first = s.open_box(s.next_pending().id)
    s.submit_labels(np.ones(first.box.size, np.uint8))
    assert s.skip() is not None  # the next pending box is opened
    assert s.skip() is None  # the last one: the loop is done
    assert s.counts() == {"pending": 0, "annotated": 1, "skipped": 2, "total": 3}
    assert s.can_start_next_loop() and s.logic.pending_refusal() is None
    # an annotated box reopens with its saved labels
    s.open_box(first.id)
    np.testing.assert_array_equal(s.starting_labels(), np.ones(first.box.size, np.uint8))
    with pytest.raises(ProjectError, match="no box selected"):
        AnnotationSession.open(s.logic.project.path).submit_labels(np.ones(first.box.size, np.uint8))


def test_next_pending_prefers_the_open_case_and_another_box(tmp_path):
    s = _session(tmp_path, query_size=6)
    logic = s.logic
    boxes = logic.pending_boxes()
    case = boxes[-1].case
    of_case = [b for b in boxes if b.case == case]
    assert logic.next_pending(case=case).id == of_case[0].id
    assert logic.next_pending().id == boxes[0].id
    assert logic.next_pending(after=boxes[0].id).id == boxes[1].id
    only = boxes[0].id
    assert logic.next_pending(free=lambda b: b.id == only, after=only).id == only  # the only free box, even "after" it
    assert logic.next_pending(free=lambda b: False) is None
    # the claiming variant chooses by the same rule, and the session asks with the open box's case
    claimed = logic.claim_next_pending("a", case=case)
    assert claimed.id == of_case[0].id
    s.open_box(claimed.id)
    assert s.case == case
    assert s.next_pending(after=claimed.id).id == logic.next_pending(case=case, after=claimed.id).id


def test_the_uncertainty_map_is_the_newest_models(tmp_path):
    s = _session(tmp_path)
    case = s.table()[0].case
    with pytest.raises(ProjectError, match="no uncertainty map"):
        s.uncertainty_map(case)
    with pytest.raises(ProjectError, match="name a case"):
        s.uncertainty_map()
    results = s.logic.project.path / "nnunet" / "results"
    image = sitk.ReadImage(str(s.logic.project.image_paths(case)[0]))
    written = {}
    for folder in ("loop_001_cpu-small_aaa", "loop_000_cpu-small_bbb", "not_a_model"):
        path = results / folder / "uncertainty" / f"{case}.nii.gz"
        path.parent.mkdir(parents=True)
        sitk.WriteImage(image, str(path))
        written[folder] = path
    assert s.uncertainty_map(case) == written["loop_001_cpu-small_aaa"]  # the highest loop, though not the latest file
    assert s.logic.uncertainty_map("no-such-case") is None


def test_the_panels_fields_round_trip_through_the_saved_settings_and_make_the_loop_settings(tmp_path):
    """The panel's fields -> panel.json -> the fields of a reopened panel, and the settings -> the loop's
    LoopSettings: one table (PANEL_FIELDS) and one method (loop_settings), so nothing is dropped on the way."""
    from dataclasses import fields
    from types import SimpleNamespace

    from ActiveLearning3DLib.gui.annotation import PANEL_FIELDS, PanelSettings, fields_from_settings, settings_from_fields
    from ActiveLearning3DLib.pipeline import LoopSettings

    shown = SimpleNamespace(
        method="random",
        device="cpu",
        profile="test",
        init="warm",
        querySize=7,
        parallel=2,
        prefill=False,
        python="/opt/PythonSlicer",
    )
    assert set(vars(shown)) == set(PANEL_FIELDS)
    session = _session(tmp_path)
    session.save_settings(**settings_from_fields(shown))
    reopened = AnnotationSession.open(session.logic.project.path).settings
    offered = {"method": ("random", "clasp_pe"), "device": ("cpu",), "profile": ("test",), "init": ("scratch", "warm")}
    back = fields_from_settings(reopened, offered)
    assert back == {k: v for k, v in vars(shown).items() if k != "python"}  # the interpreter is never read back
    assert reopened.python is None and session.settings.python == "/opt/PythonSlicer"
    # the defaults: no parallel limit is 0 in the field, an empty interpreter the default, a choice not offered
    # leaves the field as it is
    empty = settings_from_fields(SimpleNamespace(**{**vars(shown), "parallel": 0, "python": ""}))
    assert (empty["parallel"], empty["python"]) == (None, None)
    assert "method" not in fields_from_settings(PanelSettings(method="bald"), offered)
    assert fields_from_settings(PanelSettings(), offered)["parallel"] == 0
    assert "querySize" not in fields_from_settings(PanelSettings(), offered)

    loop = session.settings.loop_settings()
    assert (loop.method, loop.device, loop.profile, loop.init, loop.count, loop.parallel, loop.python) == (
        "random",
        "cpu",
        "test",
        "warm",
        7,
        2,
        "/opt/PythonSlicer",
    )
    # a panel that changed nothing starts the loop the command line starts without options
    shared = {f.name for f in fields(PanelSettings)} & {f.name for f in fields(LoopSettings)}
    assert shared == {"method", "profile", "device", "parallel", "init", "python"}
    assert all(getattr(PanelSettings().loop_settings(), n) == getattr(LoopSettings(), n) for n in shared)
