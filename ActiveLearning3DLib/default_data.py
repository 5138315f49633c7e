"""The default data of the demo and the tests: shared Hippocampus MRI, a folder named by AL3D_DATA, or phantoms.

Nothing is downloaded and the shared data is never copied: a project copies only
the cases it is made of, into its own folder outside the repository's sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .fileio import atomic_write_image, atomic_write_json

ENV_VAR = "AL3D_DATA"
SHARED_NAME = Path("shared") / "datasets" / "Task04_Hippocampus"
PHANTOM_CLASSES = {0: "background", 1: "core", 2: "shell"}


@dataclass(frozen=True)
class DataSource:
    """A folder pair to build a project from, and where it came from (for reports)."""

    name: str
    images: Path
    labels: Path | None
    origin: str  # "environment", "shared" or "phantom"


def _as_source(folder: Path, origin: str) -> DataSource:
    """A dataset folder in nnU-Net/MSD layout (imagesTr, labelsTr) or a plain folder of images."""
    images = folder / "imagesTr"
    if images.is_dir():
        labels = folder / "labelsTr"
        return DataSource(folder.name, images, labels if labels.is_dir() else None, origin)
    return DataSource(folder.name, folder, None, origin)


def find_shared_dataset(start: Path) -> Path | None:
    """``../shared/datasets/Task04_Hippocampus`` seen from ``start`` or any of its parents."""
    for parent in [start, *start.parents]:
        candidate = parent / SHARED_NAME
        if (candidate / "imagesTr").is_dir():
            return candidate
    return None


def resolve_default_data(env: Mapping[str, str], start: Path, phantom_dir: Path, seed: int = 0) -> DataSource:
    """AL3D_DATA when set, else the shared Hippocampus folder, else phantoms generated into ``phantom_dir``."""
    if env.get(ENV_VAR):
        folder = Path(env[ENV_VAR]).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{ENV_VAR}={folder}: not a folder")
        return _as_source(folder, "environment")
    for base in (start, Path(__file__).resolve().parent):
        shared = find_shared_dataset(base.resolve())
        if shared is not None:
            return _as_source(shared, "shared")
    return make_phantom_dataset(phantom_dir, seed=seed)


@dataclass(frozen=True)
class PhantomSettings:
    """Size of the phantom dataset: small enough for CI, large enough for a few loops of boxes."""

    cases: int = 16
    shape: tuple[int, int, int] = (48, 64, 56)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise: float = 0.08


def make_phantom_dataset(folder: Path, settings: PhantomSettings = PhantomSettings(), seed: int = 0) -> DataSource:
    """Write (once) MRI-like phantoms: an ellipsoid core (1) inside a shell (2), bias field and Rician noise.

    The structures vary in size, position and orientation per case, so queries
    have something to find; intensities are not piecewise constant (tissue
    texture, bias field, noise), so uncertainty is not trivial either.
    """
    folder = Path(folder)
    images, labels = folder / "imagesTr", folder / "labelsTr"
    done = folder / "dataset.json"
    if done.is_file():
        return _as_source(folder, "phantom")
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(settings.cases):
        image, label = phantom_case(settings, rng)
        for array, path in ((image, images / f"phantom_{i:03d}.nii.gz"), (label, labels / f"phantom_{i:03d}.nii.gz")):
            out = sitk.GetImageFromArray(array)
            out.SetSpacing(tuple(reversed(settings.spacing)))
            atomic_write_image(out, path)
    atomic_write_json(
        done,
        {  # written last: its presence marks a complete phantom set
            "name": "ActiveLearning3D phantoms",
            "labels": {str(k): v for k, v in PHANTOM_CLASSES.items()},
            "modality": {"0": "MRI-like phantom"},
            "numTraining": settings.cases,
            "seed": seed,
        },
    )
    return _as_source(folder, "phantom")


def phantom_case(settings: PhantomSettings, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume (float32) and its labels (uint8)."""
    shape = settings.shape
    grid = np.stack(np.meshgrid(*[np.arange(d, dtype=np.float32) for d in shape], indexing="ij"))
    label = np.zeros(shape, dtype=np.uint8)
    centre = np.array([rng.uniform(0.35, 0.65) * d for d in shape], dtype=np.float32)
    radii = np.array([rng.uniform(0.12, 0.22) * d for d in shape], dtype=np.float32)
    rotation = _random_rotation(rng)
    local = np.tensordot(rotation, grid - centre[:, None, None, None], axes=1)
    r = np.sqrt(np.sum((local / radii[:, None, None, None]) ** 2, axis=0))
    label[r <= 1.0] = 2
    label[r <= rng.uniform(0.45, 0.65)] = 1
    tissue = ndimage.gaussian_filter(rng.normal(0, 1, shape), 2.0).astype(np.float32)
    image = 0.35 + 0.1 * tissue
    image[label == 2] = 0.75
    image[label == 1] = 0.55
    image = ndimage.gaussian_filter(image, 0.7)
    bias = 1 + 0.15 * np.sin(grid[0] / shape[0] * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))
    image = image * bias
    real = image + rng.normal(0, settings.noise, shape)
    imag = rng.normal(0, settings.noise, shape)
    magnitude = np.sqrt(real**2 + imag**2)  # Rician, as in magnitude MRI
    return (magnitude * 1000).astype(np.float32), label


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)
