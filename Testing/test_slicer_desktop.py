"""The module's own test class, inside the Slicer desktop application (skipped where Slicer is not installed)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _slicer_executable() -> str | None:
    return os.environ.get("SLICER_EXECUTABLE") or shutil.which("Slicer")


@pytest.mark.skipif(_slicer_executable() is None,
                    reason="needs the 3D Slicer desktop application (set SLICER_EXECUTABLE); not installable here")
def test_module_test_class_passes_inside_slicer():
    code = "import sys, ActiveLearning3D; ActiveLearning3D.ActiveLearning3DTest().runTest(); sys.exit(0)"
    done = subprocess.run([_slicer_executable(), "--no-main-window", "--testing", "--disable-cli-modules",
                           "--additional-module-paths", str(REPO / "ActiveLearning3D"), "--python-code", code],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
