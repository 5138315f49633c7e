"""Installing the Python stack inside Slicer on first use, after the user agrees (as SlicerNNUnet's InstallLogic).

- torch comes from Slicer's PyTorch extension (``PyTorchUtils``), so that it
  matches the user's GPU. Without the extension (a module added from a
  checkout has no ``EXTENSION_DEPENDS``), the user is offered to install it
  from the Extensions server, and Slicer must restart before torch can follow.
- nnunetv2's own requirements come from its package metadata (``Requires-Dist``),
  not from a hand-kept list, so its version bounds (``acvl-utils<0.3``,
  ``dynamic-network-architectures<0.5`` ...) are kept. Each package is
  installed with ``--no-deps`` and its metadata read again, until nothing is
  missing; Slicer's own torch, SimpleITK, numpy and requests are never
  installed or replaced (a bound they miss is reported, not fixed).
- Slicer 5.12+ installs through ``slicer.packaging.pip_ensure`` (first in
  5.12.0) with ``skip_packages``; older Slicer through ``slicer.util.pip_install``.
- nnunetv2 2.8 needs Python 3.10+: Slicer 5.8 (Python 3.9) is told so plainly.
- A failing pip, a declined dialog or a failed extension install end in a
  message, never a traceback. Nothing is installed under ``--testing``.

Planning (:func:`plan`) is plain Python over an :class:`Environment`, tested
with the real installed metadata; :func:`ensure_dependencies` carries a plan
out with the ``slicer`` module it is given.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

MIN_PYTHON = (3, 10)  # nnunetv2 2.8 (Requires-Python >=3.10) and this library (pyproject requires-python)
# The nnU-Net version tested (requirements.lock); older ones lack what the workers use (blosc2 data, lazy paths).
NNUNET_REQUIREMENT = "nnunetv2>=2.8.1"
# What the library imports at run time beyond nnunetv2's requirements (DICOM support is optional in Slicer:
# Slicer ships its own pydicom, which must not be replaced); psutil: the job runner's process handling.
REQUIREMENTS = (NNUNET_REQUIREMENT, "psutil>=5.9")
KEEP_SLICERS_OWN = ("torch", "torchvision", "SimpleITK", "numpy", "requests")
MAX_ROUNDS = 8  # install rounds: each installs what the metadata read so far names


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_requires(name: str) -> list[str]:
    try:
        return importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return []


@dataclass
class Environment:
    """What this Python has: its version, installed distributions, and Slicer's helpers."""

    python: tuple[int, int] = tuple(sys.version_info[:2])
    version: Callable[[str], str | None] = installed_version
    requires: Callable[[str], list[str]] = installed_requires
    torch_extension: bool = field(default_factory=lambda: importlib.util.find_spec("PyTorchUtils") is not None)


@dataclass
class Resolution:
    """Requirements of ``REQUIREMENTS``' tree that are missing, kept from Slicer, or unmet by Slicer's own."""

    missing: list[Requirement] = field(default_factory=list)
    kept: list[Requirement] = field(default_factory=list)  # Slicer's own packages, never installed by pip here
    conflicts: list[str] = field(default_factory=list)  # "numpy 1.23.0 (Slicer's) does not satisfy nnunetv2's numpy>=1.24"


def resolve(
    requirements: tuple[str, ...] | list[str], env: Environment, keep: tuple[str, ...] | list[str] = KEEP_SLICERS_OWN
) -> Resolution:
    """Walk the requirement tree through the installed metadata; a missing package's own requirements are
    read after it is installed (the next round). Extras-only and other-platform requirements are left out."""
    keep_names = {canonicalize_name(k) for k in keep}
    out = Resolution()
    seen: set[str] = set()

    def visit(text: str, parent: str | None) -> None:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            return
        if req.marker is not None and ("extra" in str(req.marker) or not req.marker.evaluate()):
            return
        name = canonicalize_name(req.name)
        have = env.version(req.name)
        if name in keep_names:
            if name not in {canonicalize_name(r.name) for r in out.kept}:
                out.kept.append(req)
            if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
                out.conflicts.append(f"{req.name} {have} (Slicer's) does not satisfy {parent or 'the'} requirement {req}")
            return
        key = f"{name}{req.specifier}"
        if key in seen:
            return
        seen.add(key)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            out.missing.append(req)
            return
        for sub in env.requires(req.name):
            visit(sub, req.name)

    for text in requirements:
        visit(text, None)
    return out


@dataclass
class InstallPlan:
    """What stands between this Slicer and a working Active Learning 3D, and in which order to fix it."""

    python_too_old: bool
    torch_extension_missing: bool
    torch: Requirement | None  # torch to install through the PyTorch extension (None: present)
    resolution: Resolution

    @property
    def packages(self) -> list[str]:
        return [str(r) for r in self.resolution.missing]

    @property
    def needed(self) -> bool:
        return (
            self.python_too_old
            or self.torch_extension_missing
            or self.torch is not None
            or bool(self.packages)
            or bool(self.resolution.conflicts)
        )

    def blocking_message(self) -> str | None:
        """A problem no install here can fix, said plainly; None when installing can proceed."""
        if self.python_too_old:
            return (
                "Active Learning 3D trains with nnU-Net 2.8, which needs Python "
                f"{'.'.join(map(str, MIN_PYTHON))} or later; this Slicer runs Python "
                f"{sys.version.split()[0]}. Please use a Slicer whose Python is 3.10 or later "
                "(Slicer 5.12 has Python 3.12)."
            )
        if self.resolution.conflicts:
            return (
                "Slicer's own packages do not satisfy nnU-Net's requirements, and Active Learning 3D does "
                "not replace them: "
                + "; ".join(self.resolution.conflicts[:3])
                + (f" (and {len(self.resolution.conflicts) - 3} more)" if len(self.resolution.conflicts) > 3 else "")
                + ". (PyTorch can be reinstalled "
                "in another version with the PyTorch Utils module.)"
            )
        return None

    def describe(self) -> str:
        parts = (
            (["the PyTorch extension"] if self.torch_extension_missing else [])
            + ([f"PyTorch ({self.torch}) through the PyTorch extension"] if self.torch is not None else [])
            + self.packages
        )
        return ", ".join(parts)


def plan(env: Environment | None = None, requirements: tuple[str, ...] = REQUIREMENTS) -> InstallPlan:
    """What is missing from this Python (nothing is changed)."""
    env = env or Environment()
    if env.python < MIN_PYTHON:
        return InstallPlan(True, False, None, Resolution())
    resolution = resolve(requirements, env)
    torch = None
    if env.version("torch") is None:
        wanted = [r for r in resolution.kept if canonicalize_name(r.name) == "torch"]
        torch = wanted[0] if wanted else Requirement("torch")
    return InstallPlan(False, not env.torch_extension and torch is not None, torch, resolution)


class InstallError(RuntimeError):
    """Installing failed or was declined; the message says what to do."""


def ensure_dependencies(
    slicer,
    testing: bool = False,
    env: Environment | None = None,
    confirm: Callable[[str], bool] | None = None,
    show_error: Callable[[str, str], Any] | None = None,
) -> bool:
    """Install what is missing after the user agrees; True when everything is there afterwards.

    Every failure is shown as a message (``show_error``, Slicer's error dialog by
    default) and answered with False. Under ``testing`` nothing is installed.
    """
    confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(text, "Active Learning 3D"))
    show_error = show_error or (lambda text, detail: slicer.util.errorDisplay(text, detailedText=detail))
    try:
        return _ensure(slicer, testing, env, confirm)
    except InstallError as e:
        show_error(str(e), "")
        return False
    except subprocess.CalledProcessError as e:
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        show_error(
            f"Installing Python packages failed (pip exited with {e.returncode}). Check the network "
            "connection and the log below; nothing of the project was changed.",
            output[-4000:],
        )
        return False
    except (OSError, RuntimeError, ImportError) as e:  # pip_ensure, the PyTorch extension, the file system
        show_error(f"Installing Python packages failed: {type(e).__name__}: {e}", "")
        return False


def _ensure(slicer, testing: bool, env: Environment | None, confirm: Callable[[str], bool]) -> bool:
    todo = plan(env)
    if not todo.needed:
        return True
    blocking = todo.blocking_message()
    if blocking:
        raise InstallError(blocking)
    if testing:
        return False  # a test must not change the Python it runs in
    if todo.torch_extension_missing:
        if not confirm(
            "Active Learning 3D needs the PyTorch extension (it installs PyTorch to match your GPU). "
            "Install it from the Extensions server now? Slicer then needs a restart."
        ):
            raise InstallError(
                "Active Learning 3D needs the PyTorch extension: install it with the Extensions "
                "Manager, restart Slicer, and try again."
            )
        _install_torch_extension(slicer)
        _offer_restart(
            slicer,
            "The PyTorch extension is installed. Slicer needs a restart before installing PyTorch and nnU-Net. Restart now?",
        )
        return False
    if not confirm(
        f"Active Learning 3D needs {todo.describe()}. Install now? This downloads several hundred MB "
        "(PyTorch alone is about 1-3 GB) and may take several minutes."
    ):
        raise InstallError(f"Installation declined: Active Learning 3D cannot train or query without {todo.describe()}.")
    replaced = [r.name for r in todo.resolution.missing if (env or Environment()).version(r.name) is not None]
    _install_packages(slicer, env)
    torch = plan(env).torch  # after nnunetv2 is in, its metadata gives torch's bounds
    if torch is not None:
        _install_torch(torch)
    after = plan(env)
    if after.needed:
        raise InstallError(
            f"After installing, still missing: {after.describe() or after.blocking_message()}. "
            "Restart Slicer and try again; if it persists, install them from the Python console."
        )
    if replaced:
        _offer_restart(slicer, f"Updated {', '.join(replaced)}; the old versions may still be loaded. Restart Slicer now?")
    return True


def _offer_restart(slicer, text: str) -> None:
    """Ask, and restart on yes; in Slicer's testing mode (where dialogs answer yes by themselves) only say so."""
    testing = getattr(slicer.app, "testingEnabled", None)
    if testing is not None and testing():
        print(f"Active Learning 3D: {text.split('?')[0].rsplit('.', 1)[0]}. Restart Slicer before going on.")
        return
    if slicer.util.confirmYesNoDisplay(text):
        slicer.util.restart()


def _install_torch_extension(slicer) -> None:
    manager = slicer.app.extensionsManagerModel()
    if not manager.isExtensionInstalled("PyTorch") and not manager.installExtensionFromServer("PyTorch"):
        raise InstallError(
            "Installing the PyTorch extension from the Extensions server failed: install it with "
            "the Extensions Manager and restart Slicer."
        )


def _install_torch(requirement: Requirement) -> None:
    import PyTorchUtils  # the PyTorch extension, checked present by plan()

    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.installTorch(askConfirmation=False, torchVersionRequirement=str(requirement.specifier)) is None:
        raise InstallError(
            "The PyTorch extension could not install PyTorch: open the PyTorch Utils module to install it, then try again."
        )


def _install_packages(slicer, env: Environment | None) -> None:
    """Install the missing tree, round by round, never touching Slicer's own packages."""
    pip_ensure = getattr(_slicer_packaging(slicer), "pip_ensure", None)  # Slicer 5.12.0 and later
    before: list[str] = []
    for _ in range(MAX_ROUNDS):
        importlib.invalidate_caches()
        missing = plan(env).packages
        if not missing:
            return
        if missing == before:
            raise InstallError(
                f"pip finished but {', '.join(missing)} is still missing or at another version: restart Slicer and try again"
            )
        before = missing
        if pip_ensure is not None:
            # the user agreed already; skip_in_testing=False: whether to install under --testing is decided above
            pip_ensure(
                missing,
                skip_packages=list(KEEP_SLICERS_OWN),
                prompt_install=False,
                skip_in_testing=False,
                requester="Active Learning 3D",
            )
        else:
            for requirement in missing:
                slicer.util.pip_install(["--no-deps", requirement])
    raise InstallError(f"{', '.join(plan(env).packages)} would not install after {MAX_ROUNDS} rounds")


def _slicer_packaging(slicer):
    """``slicer.packaging`` (5.12.0+), which ``slicer/__init__.py`` does not import itself; None before 5.12."""
    helper = getattr(slicer, "packaging", None)
    if helper is None and getattr(slicer, "__name__", None):
        try:
            helper = importlib.import_module(f"{slicer.__name__}.packaging")
        except ImportError:
            return None
    return helper
