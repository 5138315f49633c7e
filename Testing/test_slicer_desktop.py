"""The module's own test class, inside the Slicer desktop application (skipped where Slicer is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _slicer_executable() -> str | None:
    return os.environ.get("SLICER_EXECUTABLE") or shutil.which("Slicer")


@pytest.mark.skipif(
    _slicer_executable() is None, reason="needs the 3D Slicer desktop application (set SLICER_EXECUTABLE); not installable here"
)
def test_module_test_class_passes_inside_slicer():
    code = "import sys, ActiveLearning3D; ActiveLearning3D.ActiveLearning3DTest().runTest(); sys.exit(0)"
    done = subprocess.run(
        [
            _slicer_executable(),
            "--no-main-window",
            "--testing",
            "--disable-cli-modules",
            "--additional-module-paths",
            str(REPO / "ActiveLearning3D"),
            "--python-code",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


# ------------------------------------------------------------------ Testing/SlicerDesktop/panel_check.py
PANEL_CHECK = REPO / "Testing" / "SlicerDesktop" / "panel_check.py"


def _panel_check():
    """The script as a module: its argument parsing and summary need no Slicer (the steps import it when run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("panel_check", PANEL_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["panel_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_panel_check_arguments_are_checked_and_name_the_option(tmp_path, capsys):
    check = _panel_check()
    options = check.parse_args(["--", "--out", str(tmp_path / "new"), "--install"])
    assert options.out == tmp_path / "new" and options.install and options.cases == 8 and options.query_size == 3
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    for argv, option in (
        (["--out", str(tmp_path / "a"), "--cases", "3"], "--cases"),
        (["--out", str(tmp_path / "a"), "--query-size", "0"], "--query-size"),
        (["--out", str(tmp_path / "a"), "--loop-timeout", "-5"], "--loop-timeout"),
        (["--out", str(tmp_path / "used")], "--out"),
        ([], "--out"),
    ):
        with pytest.raises(SystemExit) as exit_:
            check.parse_args(argv)
        assert exit_.value.code == 2
        assert option in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "a").exists()


def test_panel_check_summary_fails_a_step_skips_what_needs_it_and_exits_1(tmp_path):
    check = _panel_check()
    summary = check.Summary()
    summary.run("dependencies", lambda: "nothing to install")
    summary.run(
        "panel", lambda: (_ for _ in ()).throw(RuntimeError("the module is not loaded\nsecond line")), needs=("dependencies",)
    )
    summary.run("project", lambda: 1 / 0, needs=("panel",))  # never called: skipped
    assert [s.state for s in summary.steps] == ["pass", "fail", "skip"]
    assert summary.steps[1].detail == "RuntimeError: the module is not loaded"
    assert summary.steps[2].detail == "needs panel" and summary.exit_code == 1
    text = summary.format()
    assert text.splitlines()[-1] == "FAILED: 1 passed, 1 failed, 1 skipped"
    assert "FAIL  panel" in text and "SKIP  project" in text
    summary.write(tmp_path / "summary.json", {"slicer": "none"})
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["passed"] is False and [s["state"] for s in written["steps"]] == ["pass", "fail", "skip"]
    every = check.Summary()
    for name in check.STEPS:
        every.run(name, lambda: "ok", check.NEEDS.get(name, ()))
    assert every.passed and every.exit_code == 0 and every.format().endswith("PASSED: 7 passed, 0 failed, 0 skipped")


@pytest.mark.skipif(
    _slicer_executable() is None, reason="needs the 3D Slicer desktop application (set SLICER_EXECUTABLE); not installable here"
)
def test_panel_check_passes_in_the_slicer_desktop(tmp_path):
    """The whole check: it installs what is missing into that Slicer (--install), then trains one test-profile loop."""
    out = tmp_path / "check"
    done = subprocess.run(
        [
            _slicer_executable(),
            "--no-main-window",
            "--testing",
            "--disable-cli-modules",
            "--additional-module-paths",
            str(REPO / "ActiveLearning3D"),
            "--python-script",
            str(PANEL_CHECK),
            "--out",
            str(out),
            "--install",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert json.loads((out / "summary.json").read_text())["passed"]


def check_panel_check_runs_every_step_with_slicers_own_python(desk):
    """Run by the stand-in harness (slicer_desktop_standins.py): the script's steps on Slicer's real Python files,
    real MRML and real worker processes; only the Qt widgets and the application object are stand-ins."""
    check = _panel_check()
    desk.app.topLevelWidgets = lambda: []  # --no-main-window: no module selector; the script enters the module
    desk.app.applicationVersion = f"{desk.version} (Slicer's Python files, stand-in application)"
    desk.open_panel(enter=False)  # what widgetRepresentation() builds; the script calls enter()
    options = check.Options(desk.work / "check", cases=6, query_size=3)
    steps, summary = check.PanelCheck(options), check.Summary()
    for name in check.STEPS:
        summary.run(name, getattr(steps, name), check.NEEDS.get(name, ()))
        if name == "panel" and steps.widget is not None:
            steps.widget._parameterNode.python = sys.executable  # the workers' Python (PythonSlicer in Slicer)
    assert summary.passed, summary.format()
    assert not desk.dialogs, desk.dialogs  # no error or warning box on the way


@pytest.mark.slow
def test_panel_check_steps_pass_with_slicers_own_python(tmp_path):
    """The desktop script's steps, run where Slicer's desktop is not: see the check above (2 to 3 minutes)."""
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    version = "v5.12.3"
    if not (REPO.parent / "shared" / "vendor" / "slicer" / version / "Base" / "Python" / "slicer").is_dir():
        pytest.skip(f"needs Slicer's Python sources in ../shared/vendor/slicer/{version} (CI has them)")
    out = tmp_path / "results.json"
    name = "check_panel_check_runs_every_step_with_slicers_own_python"
    done = subprocess.run(
        [sys.executable, str(REPO / "Testing" / "slicer_desktop_standins.py"), version, __file__, str(out), name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr[-3000:]
    result = json.loads(out.read_text())[name]
    assert result["ok"], result["error"][-3000:]
