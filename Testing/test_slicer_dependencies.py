"""First-use installation inside Slicer: the requirement tree from nnunetv2's real metadata, and what is done with it.

The planning runs over the real installed metadata of this environment
(nnunetv2 and its dependencies are installed here); an ``installed`` set hides
some of them, as a fresh Slicer would lack them. The installer steps use a
recording stand-in for the few ``slicer`` calls (Slicer itself is not here).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import types
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from ActiveLearning3DLib.gui.dependencies import (
    KEEP_SLICERS_OWN,
    MIN_PYTHON,
    NNUNET_REQUIREMENT,
    REQUIREMENTS,
    Environment,
    ensure_dependencies,
    installed_requires,
    installed_version,
    plan,
    resolve,
)

REPO = Path(__file__).resolve().parents[1]


def _nnunet_bound(name: str) -> SpecifierSet:
    """nnunetv2's own bound on ``name``, read independently of the code under test."""
    for text in importlib.metadata.requires("nnunetv2"):
        req = Requirement(text)
        if canonicalize_name(req.name) == canonicalize_name(name) and req.marker is None:
            return req.specifier
    raise AssertionError(f"nnunetv2 does not require {name}")


class Installed:
    """This environment's real metadata with some distributions hidden (or at another version)."""

    def __init__(self, hidden=(), versions=None):
        self.hidden = {canonicalize_name(n) for n in hidden}
        self.versions = {canonicalize_name(k): v for k, v in (versions or {}).items()}

    def version(self, name):
        key = canonicalize_name(name)
        if key in self.hidden:
            return None
        return self.versions.get(key) or installed_version(name)

    def env(self, python=(3, 12), torch_extension=True):
        return Environment(python=python, version=self.version, requires=installed_requires, torch_extension=torch_extension)


def test_this_environment_has_everything_and_keeps_slicers_own_packages():
    resolution = resolve(REQUIREMENTS, Environment())
    assert resolution.missing == [] and resolution.conflicts == []
    kept = {canonicalize_name(r.name) for r in resolution.kept}
    assert {"torch", "numpy", "simpleitk"} <= kept  # reached through nnunetv2's metadata, never installed
    assert not plan(Environment()).needed


def test_missing_packages_come_with_nnunets_own_bounds_from_its_metadata():
    installed = Installed(hidden=["acvl-utils", "dynamic-network-architectures", "timm"])
    missing = {canonicalize_name(r.name): r.specifier for r in resolve(REQUIREMENTS, installed.env()).missing}
    assert missing["acvl-utils"] == _nnunet_bound("acvl-utils") and "0.3" in str(missing["acvl-utils"])
    assert missing["dynamic-network-architectures"] == _nnunet_bound("dynamic-network-architectures")
    # timm is dynamic-network-architectures' requirement, not nnunetv2's: only read once that is installed
    assert "timm" not in missing
    deeper = {
        canonicalize_name(r.name): str(r.specifier) for r in resolve(REQUIREMENTS, Installed(hidden=["timm"]).env()).missing
    }
    timm_bound = [
        Requirement(t).specifier
        for t in importlib.metadata.requires("dynamic-network-architectures")
        if Requirement(t).name == "timm"
    ][0]
    assert deeper == {"timm": str(timm_bound)}


def test_an_installed_version_outside_the_bounds_is_missing_and_slicers_own_are_never_installed():
    too_new = Installed(versions={"acvl-utils": "0.3.1"}, hidden=["numpy", "SimpleITK"])
    resolution = resolve(REQUIREMENTS, too_new.env())
    assert [r.name for r in resolution.missing] == ["acvl-utils"]
    names = {canonicalize_name(r.name) for r in resolution.missing}
    assert not names & {canonicalize_name(k) for k in KEEP_SLICERS_OWN}
    old_numpy = plan(Installed(versions={"numpy": "1.20.0"}).env())
    assert old_numpy.needed and "numpy 1.20.0 (Slicer's) does not satisfy" in old_numpy.blocking_message()


def test_torch_comes_from_the_pytorch_extension_with_nnunets_bound():
    with_extension = plan(Installed(hidden=["torch"]).env(torch_extension=True))
    assert with_extension.torch.specifier == _nnunet_bound("torch") and not with_extension.torch_extension_missing
    assert with_extension.packages == [] and "PyTorch" in with_extension.describe()
    without = plan(Installed(hidden=["torch"]).env(torch_extension=False))
    assert without.torch_extension_missing and without.describe().startswith("the PyTorch extension")
    assert not plan(Installed().env(torch_extension=False)).needed  # torch present: the extension is not needed


def test_python_3_9_is_told_plainly_and_nothing_is_tried():
    shown, calls = [], []
    env = Installed(hidden=["nnunetv2"]).env(python=(3, 9))
    assert plan(env).python_too_old
    assert not ensure_dependencies(
        _Slicer(calls),
        env=env,
        confirm=lambda text: calls.append(text) or True,
        show_error=lambda text, detail: shown.append(text),
    )
    assert calls == [] and "Python 3.10 or later" in shown[0]


def test_the_constants_agree_with_the_lock_pyproject_and_nnunets_metadata():
    lock = (REPO / "requirements.lock").read_text()
    locked = re.search(r"^nnunetv2==(\S+)", lock, re.M).group(1)
    assert Requirement(NNUNET_REQUIREMENT).specifier.contains(locked)
    pyproject = (REPO / "pyproject.toml").read_text()  # read by hand: tomllib is Python 3.11+
    project = {
        "requires-python": re.search(r'^requires-python = "([^"]+)"', pyproject, re.M).group(1),
        "dependencies": re.findall(
            r'^    "([^"]+)",$', re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S).group(1), re.M
        ),
    }
    assert len(project["dependencies"]) >= 5
    assert SpecifierSet(project["requires-python"]) == SpecifierSet(f">={MIN_PYTHON[0]}.{MIN_PYTHON[1]}")
    nnunet_python = SpecifierSet(importlib.metadata.metadata("nnunetv2")["Requires-Python"])
    assert not nnunet_python.contains("3.9") and nnunet_python.contains(".".join(map(str, MIN_PYTHON)))
    # every dependency of the library is installed here, kept from Slicer, or optional in Slicer (DICOM)
    covered = {canonicalize_name(Requirement(r).name) for r in REQUIREMENTS}
    covered |= {canonicalize_name(k) for k in KEEP_SLICERS_OWN}
    covered |= {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("nnunetv2")}
    dicom = {"pydicom", "highdicom"}
    assert {canonicalize_name(Requirement(r).name) for r in project["dependencies"]} - covered <= dicom


class _Slicer:
    """The few calls of the ``slicer`` module that installing makes, recorded; installs change ``Installed``."""

    def __init__(self, calls, installed=None, pip_ensure=False, pip_fails=None, confirm_restart=False):
        self.calls = calls
        self.installed = installed

        def install(texts):
            if pip_fails:
                raise subprocess.CalledProcessError(1, ["pip"], output=pip_fails)
            for text in texts:
                self.installed.hidden.discard(canonicalize_name(Requirement(text).name))

        def pip_install(args):
            calls.append(("pip_install", list(args)))
            install([a for a in args if not a.startswith("-")])

        def pip_ensure_(requirements, skip_packages, prompt_install, skip_in_testing, requester):
            calls.append(("pip_ensure", list(requirements), list(skip_packages), prompt_install or skip_in_testing))
            install(requirements)

        def restart():
            calls.append(("restart",))

        self.util = types.SimpleNamespace(
            pip_install=pip_install,
            restart=restart,
            confirmYesNoDisplay=lambda text: calls.append(("ask", text)) or confirm_restart,
        )
        if pip_ensure:
            self.packaging = types.SimpleNamespace(pip_ensure=pip_ensure_)

        class Manager:
            def isExtensionInstalled(self, name):
                return False

            def installExtensionFromServer(self, name):
                calls.append(("extension", name))
                return True

        self.app = types.SimpleNamespace(extensionsManagerModel=lambda: Manager())


def test_older_slicer_installs_each_package_without_dependencies_round_by_round():
    fresh = Installed(hidden=["nnunetv2", "acvl-utils", "dynamic-network-architectures", "timm"])
    calls = []
    assert ensure_dependencies(
        _Slicer(calls, fresh), env=fresh.env(), confirm=lambda text: True, show_error=lambda *a: calls.append(("error", a))
    )
    pips = [c[1] for c in calls if c[0] == "pip_install"]
    assert pips[0] == ["--no-deps", NNUNET_REQUIREMENT]  # its dependencies are read from its metadata afterwards
    second = {canonicalize_name(Requirement(a[1]).name): Requirement(a[1]).specifier for a in pips[1:3]}
    assert second == {
        "acvl-utils": _nnunet_bound("acvl-utils"),
        "dynamic-network-architectures": _nnunet_bound("dynamic-network-architectures"),
    }
    assert [canonicalize_name(Requirement(a[1]).name) for a in pips[3:]] == ["timm"]
    assert all(a[0] == "--no-deps" for a in pips) and not any(c[0] in ("error", "restart") for c in calls)


def test_slicer_5_12_uses_pip_ensure_skipping_its_own_packages_and_asks_to_restart_after_an_update():
    stale = Installed(versions={"acvl-utils": "0.3.1"}, hidden=[])
    calls = []

    def pip_ensure_updates(*args, **kwargs):
        stale.versions.pop("acvl-utils")  # now at the metadata's (compatible) version

    slicer = _Slicer(calls, stale, pip_ensure=True, confirm_restart=True)
    recorded = slicer.packaging.pip_ensure
    slicer.packaging.pip_ensure = lambda *a, **k: (recorded(*a, **k), pip_ensure_updates())
    assert ensure_dependencies(slicer, env=stale.env(), confirm=lambda text: True, show_error=lambda *a: 1 / 0)
    [(kind, requirements, skipped, prompt)] = [c for c in calls if c[0] == "pip_ensure"]
    assert [Requirement(r).name for r in requirements] == ["acvl-utils"] and not prompt
    assert set(skipped) == set(KEEP_SLICERS_OWN) and {"torch", "SimpleITK", "numpy"} <= set(skipped)
    assert ("restart",) in calls and "acvl-utils" in [c for c in calls if c[0] == "ask"][0][1]
    assert not any(c[0] == "pip_install" for c in calls)


def test_a_failing_pip_is_a_message_with_its_log_not_a_traceback():
    fresh = Installed(hidden=["acvl-utils"])
    shown, calls = [], []
    slicer = _Slicer(calls, fresh, pip_fails=b"ERROR: No matching distribution found for acvl-utils")
    assert not ensure_dependencies(
        slicer, env=fresh.env(), confirm=lambda text: True, show_error=lambda text, detail: shown.append((text, detail))
    )
    [(text, detail)] = shown
    assert "pip exited with 1" in text and "No matching distribution" in detail


def test_a_pip_that_succeeds_without_effect_stops_after_one_round_with_a_message():
    stuck = Installed(hidden=["acvl-utils"])
    shown, calls = [], []
    slicer = _Slicer(calls, stuck)
    slicer.util.pip_install = lambda args: calls.append(("pip_install", list(args)))  # exits 0, installs nothing
    assert not ensure_dependencies(
        slicer, env=stuck.env(), confirm=lambda text: True, show_error=lambda text, detail: shown.append(text)
    )
    assert len(calls) == 1 and "still missing" in shown[0] and "restart Slicer" in shown[0]


def test_without_the_pytorch_extension_the_user_is_offered_it_and_asked_to_restart():
    no_torch = Installed(hidden=["torch"])
    shown, calls = [], []
    declined = ensure_dependencies(
        _Slicer(calls, no_torch),
        env=no_torch.env(torch_extension=False),
        confirm=lambda text: calls.append(("confirm", text)) and False,
        show_error=lambda text, detail: shown.append(text),
    )
    assert not declined and "Extensions Manager" in shown[0] and "PyTorch extension" in calls[0][1]
    assert not any(c[0] in ("extension", "pip_install") for c in calls)
    calls.clear()
    agreed = ensure_dependencies(
        _Slicer(calls, no_torch, confirm_restart=True),
        env=no_torch.env(torch_extension=False),
        confirm=lambda text: True,
        show_error=lambda *a: 1 / 0,
    )
    assert not agreed  # torch itself comes after the restart
    assert ("extension", "PyTorch") in calls and calls[-1] == ("restart",)
    assert not any(c[0] == "pip_install" for c in calls)


def test_declined_or_testing_installs_nothing():
    fresh = Installed(hidden=["acvl-utils"])
    shown, calls = [], []
    assert not ensure_dependencies(
        _Slicer(calls, fresh), env=fresh.env(), confirm=lambda text: False, show_error=lambda text, detail: shown.append(text)
    )
    assert "declined" in shown[0] and "acvl-utils" in shown[0]
    assert not ensure_dependencies(_Slicer(calls, fresh), testing=True, env=fresh.env(), confirm=lambda text: 1 / 0)
    assert calls == [] and sys.modules.get("PyTorchUtils") is None


def test_the_calls_match_slicers_own_functions_in_5_8_and_5_12():
    """pip_ensure (5.12) takes the keywords passed; 5.8 has no slicer.packaging and its pip_install takes a list."""
    import ast

    import pytest

    vendor = REPO.parent / "shared" / "vendor" / "slicer"
    if not vendor.is_dir():
        pytest.skip(f"needs Slicer's sources in {vendor} (CI has them)")

    def signature(path, name):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        [fn] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
        return [a.arg for a in fn.args.args + fn.args.kwonlyargs], ast.get_source_segment(path.read_text(encoding="utf-8"), fn)

    params, _ = signature(vendor / "v5.12.3" / "Base" / "Python" / "slicer" / "packaging.py", "pip_ensure")
    assert {"requirements", "skip_packages", "prompt_install", "skip_in_testing", "requester"} <= set(params)
    assert not (vendor / "v5.8.1" / "Base" / "Python" / "slicer" / "packaging.py").exists()
    _, source = signature(vendor / "v5.8.1" / "Base" / "Python" / "slicer" / "util.py", "pip_install")
    assert "type(requirements) == list" in source and '"install", *requirements' in source
    for version in ("v5.8.1", "v5.12.3"):
        util = (vendor / version / "Base" / "Python" / "slicer" / "util.py").read_text(encoding="utf-8")
        for name in ("confirmOkCancelDisplay", "confirmYesNoDisplay", "errorDisplay", "restart"):
            assert f"\ndef {name}(" in util, (version, name)


# ------------------------------------------- through Slicer's own Python (5.8.1, 5.12.3), see slicer_desktop_standins
def check_dependency_dialogs_and_pip_ensure_through_slicers_own_python(desk):
    """Run by the stand-in harness: Slicer's real slicer.util shows the messages; 5.12's slicer.packaging is found."""
    import slicer

    from ActiveLearning3DLib.gui.dependencies import _slicer_packaging

    helper = _slicer_packaging(slicer)
    if desk.version == "v5.8.1":
        assert helper is None, helper
    else:
        assert helper.__file__.endswith("packaging.py") and callable(helper.pip_ensure)
    env = Installed(hidden=["acvl-utils"]).env(python=(3, 9))
    assert ensure_dependencies(slicer, env=env) is False  # Slicer's errorDisplay, not a traceback
    [dialog] = desk.dialogs
    assert "Python 3.10 or later" in dialog["text"], dialog
    desk.dialogs.clear()
    failing = Installed(hidden=["acvl-utils"])
    pip = _Slicer([], failing, pip_fails=b"ERROR: No matching distribution found for acvl-utils").util.pip_install
    # the stand-ins: pip itself, and (5.12) pip_check, which reads the real metadata that ``failing`` hides
    owner = helper if helper is not None else slicer.util
    saved = owner.pip_install, getattr(owner, "pip_check", None)
    owner.pip_install = lambda requirements, **options: pip(requirements)
    if helper is not None:
        helper.pip_check = lambda requirement: False
    try:
        answers = iter([True])
        slicer.util.confirmOkCancelDisplay = lambda text, *a, **k: next(answers)  # the user agrees
        assert ensure_dependencies(slicer, env=failing.env()) is False
    finally:
        owner.pip_install = saved[0]
        if helper is not None:
            helper.pip_check = saved[1]
    [dialog] = desk.dialogs
    assert "pip exited with 1" in dialog["text"] and "No matching distribution" in dialog["details"], dialog


def test_dependency_messages_through_slicers_own_python():
    import json

    import pytest

    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    harness = REPO / "Testing" / "slicer_desktop_standins.py"
    results = {}
    for version in ("v5.8.1", "v5.12.3"):
        if not (REPO.parent / "shared" / "vendor" / "slicer" / version / "Base" / "Python" / "slicer").is_dir():
            pytest.skip(f"needs Slicer's Python sources in ../shared/vendor/slicer/{version} (CI has them)")
        out = Path(__import__("tempfile").mkdtemp()) / "results.json"
        name = "check_dependency_dialogs_and_pip_ensure_through_slicers_own_python"
        done = subprocess.run(
            [sys.executable, str(harness), version, __file__, str(out), name],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and out.is_file(), done.stderr[-3000:]
        results[version] = json.loads(out.read_text())[name]
    assert all(r["ok"] for r in results.values()), {v: r.get("error") for v, r in results.items()}
