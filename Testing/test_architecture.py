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


# ------------------------------------------------------------------ layers
# What the jobs layer may not know of: it runs any task by name, so it never imports the code its tasks run.
ABOVE_JOBS = (
    "pipeline",
    "logic",
    "gui",
    "simulation",
    "query_methods",
    "embeddings",
    "cli",
    "nnunet",
    "report",
    "project",
)  # the project store is what jobs work for; jobs keep their own folders


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_imports(path: Path) -> set[str]:
    """Every ActiveLearning3DLib module ``path`` imports, at module level or inside functions (a lazy import
    still closes a cycle), resolving relative imports; ``if TYPE_CHECKING:`` blocks do not count (never run)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                named.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                named.add(module)
                named.update(f"{module}.{a.name}" for a in child.names)  # `from . import x`: x may be a module
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return named


def _import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports; importing ``a.b.c`` runs ``a.b`` (its __init__) too, except the
    module's own enclosing packages, which are being imported already."""
    modules = {_module_name(p): p for p in LIB.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _library_imports(path):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != name and not name.startswith(target + "."):
                    deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_import_graph_is_read_from_the_sources():
    """The checks below are only as good as the graph: it must see known edges, lazy and relative ones too."""
    graph = _import_graph()
    assert "ActiveLearning3DLib.jobs" in graph["ActiveLearning3DLib.pipeline"]
    assert "ActiveLearning3DLib.pipeline" in graph["ActiveLearning3DLib.logic"]  # imported inside loop_pipeline()
    assert "ActiveLearning3DLib.jobs.store" in graph["ActiveLearning3DLib.jobs.local"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_jobs_layer_imports_nothing_that_runs_on_top_of_it():
    graph = _import_graph()
    for module, deps in graph.items():
        if module == "ActiveLearning3DLib.jobs" or module.startswith("ActiveLearning3DLib.jobs."):
            above = sorted(d for d in deps if d.split(".")[1] in ABOVE_JOBS)
            assert not above, f"{module} imports {above}: the jobs layer must stay below them"


def test_embeddings_do_not_import_the_pipeline():
    """embeddings -> pipeline -> query_methods -> embeddings was a cycle; runners come from jobs.make_runner."""
    graph = _import_graph()
    for module, deps in graph.items():
        if module.startswith("ActiveLearning3DLib.embeddings"):
            assert "ActiveLearning3DLib.pipeline" not in deps, f"{module} imports the pipeline"


def test_no_import_cycle_among_the_library_modules():
    assert _cycles(_import_graph()) == []


# The panel's annotation core: what any front end (the panel, a console user, a web front end) drives. It reaches
# the store, the query methods and the embeddings only through the logic, and loads no MRML.
ANNOTATION_CORE = "ActiveLearning3DLib.gui.annotation"
CORE_MAY_IMPORT = ("logic", "pipeline", "jobs")  # the logic; the loop's settings and state; the job runners
# (and gui helpers without MRML: the test below keeps MRML out)
BEHIND_THE_LOGIC = ("project", "fileio", "query_methods", "embeddings")
MRML_SIDE = (
    "ActiveLearning3DLib.gui.mrml",
    "ActiveLearning3DLib.gui.view",
    "ActiveLearning3DLib.gui.controller",
    "ActiveLearning3DLib.gui.headless",
)
MRML_TOP_MODULES = {"slicer", "vtk", "vtkmodules", "mrml", "MRMLCorePython"} | GUI_MODULES - {"__main__"}


def _loaded_with(module: str, graph: dict[str, set[str]]) -> set[str]:
    """The library modules importing ``module`` may load: its imports, theirs, and every enclosing package."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(graph.get(name, ()))
    return {m for m in seen if m in graph}


def test_the_annotation_core_works_through_the_logic_alone():
    deps = _import_graph()[ANNOTATION_CORE]
    behind = sorted(d for d in deps if d.split(".")[1] in BEHIND_THE_LOGIC)
    assert not behind, f"{ANNOTATION_CORE} imports {behind}: ask the logic instead"
    others = sorted(d for d in deps if d.split(".")[1] not in CORE_MAY_IMPORT + ("gui",))
    assert not others, f"{ANNOTATION_CORE} imports {others}: only the logic, the pipeline's and the jobs' records"


def test_the_annotation_core_loads_no_mrml():
    graph = _import_graph()
    loaded = _loaded_with(ANNOTATION_CORE, graph)
    assert "ActiveLearning3DLib.logic" in loaded and "ActiveLearning3DLib.jobs" in loaded  # the walk sees real edges
    assert not loaded & set(MRML_SIDE), f"importing the annotation core loads {sorted(loaded & set(MRML_SIDE))}"
    modules = {_module_name(p): p for p in LIB.rglob("*.py")}
    for name in sorted(loaded):
        found = _imported_top_modules(modules[name]) & MRML_TOP_MODULES
        assert not found, f"{name} (loaded with the annotation core) imports {sorted(found)}"
    # and the controller, which joins it to the view, is on the MRML side: the walk would see it
    assert "ActiveLearning3DLib.gui.mrml" in _loaded_with("ActiveLearning3DLib.gui.controller", graph)


# The loop pipeline runs below the logic: it is handed the project and a query function (logic.loop_pipeline()
# hands in the logic's query), so neither it nor anything it imports may reach the logic or what sits on top of it.
ABOVE_PIPELINE = ("logic", "gui", "cli", "simulation", "simulation_restore", "report")


def _reached_from(module: str, graph: dict[str, set[str]]) -> set[str]:
    """The library modules ``module`` imports, directly or through others; the root package's lazy
    ``__getattr__`` (which names the logic for ``from ActiveLearning3DLib import ActiveLearningLogic``) is not
    followed: importing a submodule never calls it."""
    seen, todo = set(), sorted(graph[module])
    while todo:
        name = todo.pop()
        if name in seen or name == "ActiveLearning3DLib":
            continue
        seen.add(name)
        todo += sorted(graph.get(name, ()))
    return seen


def test_the_pipeline_does_not_import_the_logic():
    graph = _import_graph()
    reached = _reached_from("ActiveLearning3DLib.pipeline", graph)
    assert {"ActiveLearning3DLib.jobs", "ActiveLearning3DLib.embeddings"} <= reached  # the walk sees real edges
    above = sorted(m for m in reached if m.split(".")[1] in ABOVE_PIPELINE)
    assert not above, f"the pipeline reaches {above}: hand it what it needs (the project, a query function)"
    # and the walk would see the logic where it is imported: the annotation core reaches it
    assert "ActiveLearning3DLib.logic" in _reached_from(ANNOTATION_CORE, graph)


def test_the_pool_embeddings_job_is_made_by_the_embeddings_stage_alone():
    """One stage computes the pool embeddings (embeddings.store.EmbeddingStage, which the logic, the pipeline and
    the annotation core go through): nothing else makes their job by hand."""
    makers = []
    for path in sorted(LIB.rglob("*.py")):
        if path == LIB / "embeddings" / "store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func).split(".")[-1]
            kinds = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if called == "embedding_job" or (called == "create" and "pool_embeddings" in kinds):
                makers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not makers, f"embedding jobs made outside EmbeddingStage: {makers}"


def _fixture_names(path: Path) -> set[str]:
    """The fixtures a test module defines (functions decorated with ``pytest.fixture``, by name or ``name=``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            call = decorator if isinstance(decorator, ast.Call) else None
            if ast.unparse(call.func if call else decorator).split(".")[-1] != "fixture":
                continue
            given = [
                k.value.value for k in (call.keywords if call else []) if k.arg == "name" and isinstance(k.value, ast.Constant)
            ]
            names.update(given or [node.name])
    return names


def test_the_slow_tier_names_fixtures_that_exist():
    """`make test-fast` leaves out the tests on the fixtures of SLOW_FIXTURES: a fixture renamed without updating
    that list would put its training tests back into the fast tier, seen only as a long test in its summary."""
    from conftest import SLOW_FIXTURES

    defined = set().union(*(_fixture_names(p) for p in (REPO / "Testing").glob("*.py")))
    assert {"project", "looped"} <= defined  # the walk finds fixtures of conftest and of the test modules
    assert not SLOW_FIXTURES - defined, f"SLOW_FIXTURES names fixtures no test module defines: {sorted(SLOW_FIXTURES - defined)}"
