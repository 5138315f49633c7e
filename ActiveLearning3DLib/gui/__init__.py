"""What the Slicer panel runs, without Qt: the controller, MRML helpers and a headless Slicer for tests.

``controller`` (the panel's actions), ``mrml`` (volumes, query boxes as ROI
nodes, segmentations), ``geometry`` (boxes <-> RAS), ``headless`` (a scene
with module logics and offscreen slice views from ``slicer-core``).
"""
from .controller import AnnotationController, LoopProgress, PanelSettings, QueryRow, SubmitResult
from .mrml import SlicerContext

__all__ = ["AnnotationController", "LoopProgress", "PanelSettings", "QueryRow", "SlicerContext", "SubmitResult"]
