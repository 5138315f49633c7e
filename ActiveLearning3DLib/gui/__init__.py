"""What the Slicer panel runs, without Qt: the annotation core, the Slicer view, MRML helpers, a headless Slicer.

``annotation`` (the annotation core: settings, table, boxes, submit, the loop;
no MRML, for any front end or the console), ``view`` (the case, boxes,
segments and heat map as MRML nodes), ``controller`` (the panel's object: the
core joined to a view), ``mrml`` (volumes, query boxes as ROI nodes,
segmentations), ``geometry`` (boxes <-> RAS), ``headless`` (a scene with module
logics and offscreen slice views from ``slicer-core``).

The names below are loaded when first used, so that importing the annotation
core does not load the MRML side.
"""

from __future__ import annotations

from importlib import import_module

_NAMES = {
    "AnnotationController": "controller",
    "AnnotationSession": "annotation",
    "LoopProgress": "annotation",
    "PanelSettings": "annotation",
    "QueryRow": "annotation",
    "SubmitResult": "annotation",
    "SlicerContext": "mrml",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnnotationController",
    "AnnotationSession",
    "LoopProgress",
    "PanelSettings",
    "QueryRow",
    "SlicerContext",
    "SubmitResult",
]
