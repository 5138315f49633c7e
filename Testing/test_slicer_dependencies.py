"""First-use installation inside Slicer: what is installed, how, and when nothing is."""
from __future__ import annotations

import types

from ActiveLearning3DLib.gui.dependencies import KEEP_SLICERS_OWN, ensure_dependencies, plan


def _find_spec(present):
    state = set(present)
    return (lambda name: object() if name in state else None), state


def _slicer(with_pip_ensure: bool, state: set):
    calls = []

    def pip_ensure(requirements, skip_packages, requester):
        calls.append(("pip_ensure", [str(r) for r in requirements], list(skip_packages)))
        state.update({"nnunetv2", "scipy", "matplotlib"})

    def pip_install(text):
        calls.append(("pip_install", text))
        state.update({"nnunetv2", "scipy", "matplotlib"})

    module = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=pip_install))
    if with_pip_ensure:
        module.packaging = types.SimpleNamespace(pip_ensure=pip_ensure)
    return module, calls


def test_nothing_missing_asks_nothing():
    find, _ = _find_spec({"torch", "nnunetv2", "scipy", "matplotlib"})
    assert not plan(find).needed
    assert ensure_dependencies(None, confirm=lambda text: 1 / 0, find_spec=find)


def test_pip_ensure_keeps_slicers_simpleitk_and_torch():
    find, state = _find_spec({"torch", "scipy"})
    slicer, calls = _slicer(True, state)
    asked = []
    assert ensure_dependencies(slicer, confirm=lambda text: asked.append(text) or True, find_spec=find)
    assert "nnunetv2" in asked[0] and "matplotlib" in asked[0]
    [(kind, requirements, skipped)] = calls
    assert kind == "pip_ensure" and any(r.startswith("nnunetv2") for r in requirements)
    assert {"SimpleITK", "torch"} <= set(skipped) == set(KEEP_SLICERS_OWN)


def test_older_slicer_installs_nnunet_without_its_dependencies():
    find, state = _find_spec({"torch", "scipy", "matplotlib"})
    slicer, calls = _slicer(False, state)
    assert ensure_dependencies(slicer, confirm=lambda text: True, find_spec=find)
    assert [c[0] for c in calls] == ["pip_install", "pip_install"]
    assert "torch" not in calls[0][1].split() and "SimpleITK" not in calls[0][1]
    assert calls[1][1].startswith("--no-deps nnunetv2")


def test_declined_or_testing_installs_nothing():
    find, state = _find_spec({"torch"})
    slicer, calls = _slicer(True, state)
    assert not ensure_dependencies(slicer, confirm=lambda text: False, find_spec=find)
    assert not ensure_dependencies(slicer, confirm=lambda text: True, testing=True, find_spec=find)
    assert calls == []
