"""Installing the Python stack inside Slicer on first use, after the user agrees.

torch comes from Slicer's PyTorch extension (``PyTorchUtils``), so that it
matches the user's GPU; nnunetv2 and the rest through Slicer's pip helpers
without replacing the SimpleITK and torch that Slicer already has. Nothing
here runs at import time, and nothing is installed under ``--testing``.
The ``slicer`` module is passed in, so the decisions are tested without Slicer.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

# import name -> requirement (what the library needs beyond Slicer's own Python)
REQUIREMENTS = {
    "nnunetv2": "nnunetv2>=2.5",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
}
KEEP_SLICERS_OWN = ["SimpleITK", "torch", "torchvision", "requests"]


@dataclass
class InstallPlan:
    torch_missing: bool
    packages: list[str]

    @property
    def needed(self) -> bool:
        return self.torch_missing or bool(self.packages)

    def describe(self) -> str:
        parts = (["PyTorch (through the PyTorch extension)"] if self.torch_missing else []) + self.packages
        return ", ".join(parts)


def plan(find_spec: Callable[[str], Any] = importlib.util.find_spec) -> InstallPlan:
    """What is missing from this Python."""
    return InstallPlan(find_spec("torch") is None, [req for name, req in REQUIREMENTS.items() if find_spec(name) is None])


def ensure_dependencies(slicer, confirm: Callable[[str], bool], testing: bool = False,
                        find_spec: Callable[[str], Any] = importlib.util.find_spec) -> bool:
    """Install what is missing after ``confirm`` agrees; True when everything is there afterwards.

    Under ``testing`` nothing is installed (a test must not change the Python it runs in).
    """
    todo = plan(find_spec)
    if not todo.needed:
        return True
    if testing or not confirm(f"Active Learning 3D needs {todo.describe()}. Install now? This may take several minutes."):
        return False
    if todo.torch_missing:
        import PyTorchUtils  # the PyTorch extension, a dependency of this extension

        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if torch_logic.installTorch(askConfirmation=False) is None:
            return False
    if todo.packages:
        _pip(slicer, todo.packages)
    return not plan(find_spec).needed


def _pip(slicer, requirements: list[str]) -> None:
    """``pip_ensure`` (Slicer 5.11+: ``slicer.packaging`` or ``slicer.pydeps``) keeping Slicer's own packages, else pip_install."""
    for name in ("packaging", "pydeps"):
        helper = getattr(slicer, name, None)
        if helper is not None and hasattr(helper, "pip_ensure"):
            from packaging.requirements import Requirement

            helper.pip_ensure([Requirement(r) for r in requirements], skip_packages=KEEP_SLICERS_OWN,
                              requester="ActiveLearning3D")
            return
    # Older Slicer: install nnunetv2's dependencies, then nnunetv2 itself without them, so that
    # pip never replaces Slicer's SimpleITK or the PyTorch extension's torch.
    others = [r for r in requirements if not r.startswith("nnunetv2")]
    if len(others) != len(requirements):
        others += ["dynamic-network-architectures", "batchgenerators>=0.25", "batchgeneratorsv2", "acvl-utils",
                   "nibabel", "scikit-image", "pandas", "graphviz", "tifffile", "tqdm", "seaborn", "imagecodecs",
                   "yacs", "blosc2", "einops"]
    if others:
        slicer.util.pip_install(" ".join(others))
    nnunet = [r for r in requirements if r.startswith("nnunetv2")]
    if nnunet:
        slicer.util.pip_install(f"--no-deps {nnunet[0]}")
