"""The layout rules the design card fixes: a Qt-free library and a Slicer module whose files exist and parse.

The Slicer desktop cannot run here; these checks catch what would break its
loading (a Qt import in the library, a file the CMake build names but that is
missing, a malformed .ui file) without it.
"""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "ActiveLearning3DLib"
MODULE = REPO / "ActiveLearning3D"
GUI_MODULES = {"qt", "ctk", "PythonQt", "PySide2", "PySide6", "PyQt5", "PyQt6", "__main__"}


def _imported_top_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_library_imports_no_gui_toolkit(path):
    assert not (_imported_top_modules(path) & GUI_MODULES), f"{path} imports a GUI module"


def test_slicer_is_imported_only_by_the_gui_adapter_and_only_inside_functions():
    """MRML (slicer-core) is the gui package's business; the rest of the library runs in plain Python."""
    for path in sorted(LIB.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top_level |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top_level.add(node.module.split(".")[0])
        assert "slicer" not in top_level, f"{path} imports slicer at module level"
        if "slicer" in _imported_top_modules(path):
            assert path.parent.name == "gui", f"{path} uses slicer outside ActiveLearning3DLib/gui"


def test_module_file_defines_the_classes_slicer_looks_for():
    tree = ast.parse((MODULE / "ActiveLearning3D.py").read_text())
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["ActiveLearning3D"] == ["ScriptedLoadableModule"]
    assert classes["ActiveLearning3DWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["ActiveLearning3DLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["ActiveLearning3DTest"] == ["ScriptedLoadableModuleTest"]


def test_ui_file_is_valid_and_has_the_widgets_the_module_uses():
    root = ET.parse(MODULE / "Resources" / "UI" / "ActiveLearning3D.ui").getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "ActiveLearning3D.py").read_text()))
    assert used and used <= names


def test_cmake_resources_exist_and_icons_are_128_square():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for resource in re.findall(r"Resources/\S+", cmake):
        assert (MODULE / resource.replace("${MODULE_NAME}", "ActiveLearning3D")).is_file(), resource
    assert "EXTENSION_DEPENDS" in (REPO / "CMakeLists.txt").read_text()
    for icon in (REPO / "ActiveLearning3D.png", MODULE / "Resources" / "Icons" / "ActiveLearning3D.png"):
        assert sitk.ReadImage(str(icon)).GetSize()[:2] == (128, 128)
