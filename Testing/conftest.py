"""Shared helpers for the tests: small synthetic datasets written with SimpleITK.

The helpers are plain functions (import them with ``from conftest import ...``)
plus a few fixtures built on them. Images are tiny (about 12 x 16 x 14 voxels)
so that a whole project is created in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import SimpleITK as sitk

SHAPE = (12, 16, 14)  # (k, j, i) array order, i.e. z, y, x
SPACING = (1.0, 1.0, 1.0)  # (x, y, z) as SimpleITK takes it
ORIGIN = (0.0, 0.0, 0.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
CLASS_NAMES = {0: "background", 1: "anterior", 2: "posterior"}

# The fast tier (`make test-fast`: pytest -m "not slow") leaves out the tests that train nnU-Net or the pool
# autoencoder, run a simulation, a Slurm cluster or a race of processes. Every test that uses one of these fixtures
# is marked slow here, so a new test on them needs no mark of its own; a test that trains or races in its own body
# carries @pytest.mark.slow. `make test` runs every test, slow or not.
SLOW_FIXTURES = frozenset(
    {
        "looped",  # test_loop_pipeline: `al3d loop --profile test` (train, evaluate, score, query)
        "prepared",  # test_nnunet_pipeline, test_determinism: nnU-Net planning and preprocessing, for tests that train
        "simulated",  # test_simulation: an `al3d simulate` killed and resumed
        "two_simulations",  # test_determinism: `al3d simulate` twice
        "two_loops",  # test_warm_start: two loops of training
        "planted",  # test_cold_start_embeddings: a pool whose autoencoder the tests train (400 iterations)
        "slurm_env",  # test_slurm: a Slurm cluster started for the session, and its batch jobs
    }
)
FAST_TIER_HINT_SECONDS = 5.0


def pytest_collection_modifyitems(config, items):
    """Mark slow every test that uses a fixture of SLOW_FIXTURES (see there)."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After a run without the slow tests, name the tests that still took long: they may belong to the slow tier."""
    if "not slow" not in (config.option.markexpr or ""):
        return
    seconds: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
    long = sorted(((s, nodeid) for nodeid, s in seconds.items() if s > FAST_TIER_HINT_SECONDS), reverse=True)
    if long:
        terminalreporter.write_sep("=", f"fast tier: tests over {FAST_TIER_HINT_SECONDS:g} s (slow if they train or race)")
        for s, nodeid in long:
            terminalreporter.write_line(f"{s:6.1f} s  {nodeid}")


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A rotation matrix about one array axis, for test images with an oblique direction."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def wait_for(predicate, timeout: float = 20.0, what: str = "the condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns something true, and return that; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def write_image(
    path: Path | str,
    array: np.ndarray,
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    direction: Sequence[float] | None = None,
    is_vector: bool = False,
) -> Path:
    """Write ``array`` (numpy order) with the given geometry; the suffix picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array), isVector=is_vector)
    dim = image.GetDimension()
    if dim == len(spacing):
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in origin])
        if direction is not None:
            image.SetDirection([float(d) for d in direction])
    sitk.WriteImage(image, str(path))
    return path


def synthetic_label(shape: Sequence[int] = SHAPE, seed: int = 0) -> np.ndarray:
    """A label map with two blobs: class 1 (a ball) and class 2 (a box), placed by ``seed``."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    k, j, i = np.indices(shape)
    centre = [rng.integers(s // 3, s - s // 3) for s in shape]
    radius = max(2, min(shape) // 4)
    label[(k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2] = 1
    corner = [rng.integers(0, max(1, s - 3)) for s in shape]
    label[tuple(slice(c, c + 3) for c in corner)] = 2
    return label


def synthetic_image(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """Intensities that follow the label, with noise, as float32."""
    rng = np.random.default_rng(1000 + seed)
    return (100.0 * label + rng.normal(0.0, 10.0, label.shape)).astype(np.float32)


@dataclass
class SyntheticDataset:
    """Where a synthetic dataset lies and what it holds."""

    root: Path
    images: Path
    labels: Path | None
    cases: list[str]
    shape: tuple[int, int, int]
    channels: int

    def image_file(self, case: str, channel: int = 0, suffix: str = ".nii.gz") -> Path:
        return self.images / f"{case}_{channel:04d}{suffix}"

    def label_file(self, case: str, suffix: str = ".nii.gz") -> Path:
        assert self.labels is not None
        return self.labels / f"{case}{suffix}"


def make_dataset(
    root: Path | str,
    n_cases: int = 4,
    shape: Sequence[int] = SHAPE,
    channels: int = 1,
    labels: bool = True,
    suffix: str = ".nii.gz",
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
    direction: Sequence[float] | None = None,
    class_names: dict[int, str] | None = CLASS_NAMES,
    prefix: str = "case",
) -> SyntheticDataset:
    """Write ``root/imagesTr/<case>_000C<suffix>`` and ``root/labelsTr/<case><suffix>`` (+ an MSD dataset.json).

    Every case has the same shape and geometry, labels hold 0, 1 and 2.
    """
    root = Path(root)
    images = root / "imagesTr"
    label_dir = root / "labelsTr" if labels else None
    images.mkdir(parents=True, exist_ok=True)
    cases = [f"{prefix}_{n:03d}" for n in range(n_cases)]
    for n, case in enumerate(cases):
        label = synthetic_label(shape, seed=n)
        for c in range(channels):
            image = synthetic_image(label, seed=10 * n + c)
            write_image(images / f"{case}_{c:04d}{suffix}", image, spacing, origin, direction)
        if label_dir is not None:
            write_image(label_dir / f"{case}{suffix}", label, spacing, origin, direction)
    if class_names is not None:
        dataset = {
            "name": "synthetic",
            "modality": {str(c): f"MOD{c}" for c in range(channels)},
            "labels": {str(k): v for k, v in class_names.items()},
        }
        (root / "dataset.json").write_text(json.dumps(dataset))
    return SyntheticDataset(root, images, label_dir, cases, tuple(int(s) for s in shape), channels)  # type: ignore[arg-type]


def checksums(*folders: Path | str | None) -> dict[str, str]:
    """SHA-256 of every file below the folders, by path, to show that sources were not touched."""
    result: dict[str, str] = {}
    for folder in folders:
        if folder is None:
            continue
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                result[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return result


def read_array(path: Path | str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def dataset(tmp_path: Path) -> SyntheticDataset:
    """Four single-channel NIfTI cases with dense labels 0/1/2 and a dataset.json declaring them."""
    return make_dataset(tmp_path / "source", n_cases=4)


@pytest.fixture
def unlabelled_dataset(tmp_path: Path) -> SyntheticDataset:
    """Three single-channel NIfTI cases without labels."""
    return make_dataset(tmp_path / "source", n_cases=3, labels=False, class_names=None)


def default_data_dir(tmp_path_factory, phantom_cases: int) -> Path:
    """The real Hippocampus data when present (AL3D_DATA or ../shared), else phantoms made for the test session."""
    import os

    from ActiveLearning3DLib.default_data import PhantomSettings, find_shared_dataset, make_phantom_dataset

    if os.environ.get("AL3D_DATA"):
        return Path(os.environ["AL3D_DATA"])
    shared = find_shared_dataset(Path(__file__).resolve().parents[1])
    if shared is not None:
        return shared
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), PhantomSettings(cases=phantom_cases)).images.parent


def annotated_project(tmp_path_factory, name: str, cases: int, start_boxes: int):
    """A simulation project of the first ``cases`` default-data cases whose nnActive starting boxes the oracle has
    annotated: the starting point of every test that trains nnU-Net."""
    from ActiveLearning3DLib import ActiveLearningLogic

    data = default_data_dir(tmp_path_factory, phantom_cases=cases)
    path = tmp_path_factory.mktemp(name) / "project"
    logic = ActiveLearningLogic.create(path, data / "imagesTr", data / "labelsTr", max_cases=cases, seed=1)
    logic.query("nnactive_start", start_boxes)
    logic.annotate_with_oracle()
    return logic
