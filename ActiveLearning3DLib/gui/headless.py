"""Slicer without the desktop application (``slicer-core``): a scene with module logics, and offscreen slice views.

The desktop application creates the scene, the application logic and the
module logics at start-up and exposes them as ``slicer.mrmlScene`` and
``slicer.modules.<name>.logic()``. :func:`headless_slicer` builds the same set
for tests, benchmarks and headless scripts; with ``install_handles=True`` it
also sets those two handles so that ``slicer.util`` functions which rely on
them work as in the application.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np

from .mrml import SlicerContext

# Module logics registered with the application logic, as the desktop application names them.
MODULE_LOGICS = {
    "Colors": "vtkSlicerColorLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "Markups": "vtkSlicerMarkupsLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
}


def headless_slicer(install_handles: bool = False) -> SlicerContext:
    """A new scene with an application logic and the module logics the panel uses."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.SetSliceLogics(vtk.vtkCollection())
    logics: dict[str, Any] = {}
    for name, class_name in MODULE_LOGICS.items():
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(app_logic)  # before the scene: the colour logic needs it to add its tables
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    ctx = SlicerContext(scene, logics["Volumes"], logics["Segmentations"], app_logic, logics)
    if install_handles:
        slicer.mrmlScene = scene
        slicer.modules = types.SimpleNamespace(
            **{name.lower(): types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()}
        )
    return ctx


class OffscreenSliceView:
    """One slice view rendered offscreen (EGL): the slice logic's image plus the markups displayable manager.

    What ``qMRMLSliceWidget`` does on screen, reduced to what a test or a report
    needs: a picture of a volume with its query boxes.
    """

    def __init__(self, ctx: SlicerContext, name: str = "Red", size: tuple[int, int] = (256, 256)):
        import slicer
        import vtk
        from vtkmodules.vtkRenderingOpenGL2 import vtkEGLRenderWindow

        self.ctx, self.size = ctx, size
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window = vtkEGLRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*size)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()  # displayable managers need one
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(ctx.app_logic)
        for manager in ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager"):
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(ctx.app_logic)
        self.logic.SetMRMLScene(ctx.scene)
        ctx.app_logic.GetSliceLogics().AddItem(self.logic)
        self.slice_node = self.logic.AddSliceNode(name)
        self.managers.SetMRMLDisplayableNode(self.slice_node)
        mapper = vtk.vtkImageMapper()
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(mapper)
        self.renderer.AddViewProp(self.image_actor)
        self.logic.ResizeSliceNode(*size)

    def show(self, volume_node, ras_offset: float | None = None) -> None:
        """Volume as background, fitted to the view; ``ras_offset`` picks the slice."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.FitSliceToBackground()
        if ras_offset is not None:
            self.logic.SetSliceOffset(float(ras_offset))
        self.image_actor.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())
        # displayable managers only see nodes added after they observed the scene: re-attach to pick up the rest
        self.managers.SetMRMLDisplayableNode(None)
        self.managers.SetMRMLDisplayableNode(self.slice_node)

    def xy_to_ras(self) -> np.ndarray:
        """4 x 4 matrix from view pixels (x right, y up, slice) to RAS."""
        import slicer

        return slicer.util.arrayFromVTKMatrix(self.slice_node.GetXYToRAS())

    def capture(self) -> np.ndarray:
        """Render and return the picture as an (rows, columns, 3) uint8 array, row 0 at the top."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
        return np.ascontiguousarray(pixels[::-1])

    def save_png(self, path: Path | str) -> Path:
        """Write the current picture as a PNG (atomically)."""
        import vtk
        from vtk.util.numpy_support import numpy_to_vtk

        from ..fileio import replacing_file

        path = Path(path)
        pixels = self.capture()[::-1]
        image = vtk.vtkImageData()
        image.SetDimensions(pixels.shape[1], pixels.shape[0], 1)
        image.GetPointData().SetScalars(numpy_to_vtk(pixels.reshape(-1, 3).copy(), deep=True))
        with replacing_file(path) as tmp:
            writer = vtk.vtkPNGWriter()
            writer.SetFileName(str(tmp))
            writer.SetInputData(image)
            writer.Write()
        return path

    def close(self) -> None:
        self.ctx.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.managers.SetMRMLDisplayableNode(None)
        self.window.Finalize()
