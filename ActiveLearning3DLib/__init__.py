"""ActiveLearning3D's engine: project store, partial labels, query methods, metrics and the headless logic.

Nothing here imports Qt, so the Slicer module, the Python console, the command
line and CI all run the same code.
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import ActiveLearning3DLib` stays cheap inside Slicer (no SciPy until it is used).
    if name == "ActiveLearningLogic":
        from .logic import ActiveLearningLogic

        return ActiveLearningLogic
    raise AttributeError(name)


__all__ = ["ActiveLearningLogic", "__version__"]
