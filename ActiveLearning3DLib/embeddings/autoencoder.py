"""A small 3D convolutional autoencoder trained on the pool's own patches: embeddings and difficulty without labels.

Every candidate box is cut from its z-scored image, resampled to a fixed
16 x 16 x 16 cube and encoded; its embedding is the bottleneck averaged over
space, its difficulty the mean squared reconstruction error (docs/METHODS.md
section 5, project choice). Training samples random boxes of the patch size
from the pool, seeded, for a few minutes of CPU at most. A user may give an
encoder of their own instead (``(N, 1, 16, 16, 16) -> (N, E)``, torch.export
archive or TorchScript); the
difficulty then still comes from this autoencoder.

torch is imported inside the functions: this module runs in the worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..aggregation import corner_axes
from ..boxes import Box, effective_patch_size

CUBE = 16


@dataclass(frozen=True)
class AutoencoderSettings:
    """How the pool autoencoder is trained; part of the cache key."""

    iterations: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    width: int = 8  # channels of the first layer (x2 per level, 3 levels)
    seed: int = 0
    stride: tuple[int, int, int] | None = None  # candidate corner stride; default: half the box (a coarse grid)
    threads: int | None = None  # torch threads of the job; default: the runner's per-job share (not part of the key)
    encoder: str | None = None  # an encoder file (.pt2 torch.export, or TorchScript) to use for the embeddings

    def key(self, project_key: str) -> str:
        settings = asdict(self)
        settings.pop("threads")
        if self.encoder:
            settings["encoder"] = hashlib.sha256(Path(self.encoder).read_bytes()).hexdigest()[:16]
        raw = json.dumps({"project": project_key, **settings}, sort_keys=True, default=list)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


def build_autoencoder(width: int = 8):
    import torch.nn as nn

    def down(i, o):
        return nn.Sequential(nn.Conv3d(i, o, 3, stride=2, padding=1), nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.01))

    def up(i, o):
        return nn.Sequential(nn.ConvTranspose3d(i, o, 2, stride=2), nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.01))

    class BoxAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(down(1, width), down(width, 2 * width), down(2 * width, 4 * width))
            self.decoder = nn.Sequential(
                up(4 * width, 2 * width), up(2 * width, width), nn.ConvTranspose3d(width, 1, 2, stride=2)
            )

        def forward(self, x):
            code = self.encoder(x)
            return self.decoder(code), code.mean(dim=(2, 3, 4))

    return BoxAutoencoder()


def zscore(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return (image - image.mean()) / max(float(image.std()), 1e-6)


def cubes(image: np.ndarray, boxes: Sequence[Box]):
    """The boxes of one (z-scored) image as an (N, 1, 16, 16, 16) tensor."""
    import torch
    import torch.nn.functional as F

    crops = [torch.from_numpy(np.ascontiguousarray(image[b.slices]))[None, None] for b in boxes]
    return torch.cat([F.interpolate(c, size=(CUBE,) * 3, mode="trilinear", align_corners=False) for c in crops])


def candidate_boxes(case: str, shape: Sequence[int], patch_size: Sequence[int], stride: Sequence[int] | None) -> list[Box]:
    """Every candidate box of an image on the query methods' corner grid."""
    size = effective_patch_size(patch_size, shape)
    axes = corner_axes(shape, size, stride or tuple(max(1, s // 2) for s in size))
    return [Box(case, (int(z), int(y), int(x)), size) for z in axes[0] for y in axes[1] for x in axes[2]]


def train_autoencoder(
    data: Mapping[str, np.ndarray],
    patch_size: Sequence[int],
    settings: AutoencoderSettings,
    progress: Callable[[dict], None] | None = None,
):
    """Train on random boxes of the pool's images (``data``: case -> z-scored array, see :func:`zscore`).

    Torch threads are the caller's (the job sets them and follows the runner's allotment).
    """
    import torch

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 7])
    cases = list(data)
    model = build_autoencoder(settings.width)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    losses = []
    for it in range(settings.iterations):
        batch = []
        for _ in range(settings.batch_size):
            case = cases[int(rng.integers(len(cases)))]
            shape = data[case].shape
            size = effective_patch_size(patch_size, shape)
            corner = tuple(int(rng.integers(0, d - s + 1)) for d, s in zip(shape, size))
            batch.append(Box(case, corner, size))
        x = torch.cat([cubes(data[b.case], [b]) for b in batch])
        reconstruction, _ = model(x)
        loss = torch.mean((reconstruction - x) ** 2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress and (it % 20 == 0 or it == settings.iterations - 1):
            progress(
                {
                    "stage": "autoencoder",
                    "iteration": it + 1,
                    "progress": 0.8 * (it + 1) / settings.iterations,
                    "message": f"autoencoder iteration {it + 1}/{settings.iterations}, loss {np.mean(losses[-20:]):.4f}",
                }
            )
    model.eval()
    return model, losses


def embed_pool(
    model,
    data: Mapping[str, np.ndarray],
    patch_size: Sequence[int],
    stride: Sequence[int] | None,
    encoder=None,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, np.ndarray]:
    """Embedding and reconstruction error of every candidate box of the pool (``data`` as for training), for an ``.npz``."""
    import torch

    cases = list(data)
    rows_case, rows_corner, rows_size, embeddings, errors = [], [], [], [], []
    with torch.no_grad():
        for n, (case, image) in enumerate(data.items()):
            boxes = candidate_boxes(case, image.shape, patch_size, stride)
            for start in range(0, len(boxes), 256):
                chunk = boxes[start : start + 256]
                x = cubes(image, chunk)
                reconstruction, code = model(x)
                if encoder is not None:
                    code = encoder(x)
                embeddings.append(code.reshape(len(chunk), -1).numpy().astype(np.float32))
                errors.append(((reconstruction - x) ** 2).mean(dim=(1, 2, 3, 4)).numpy().astype(np.float32))
                rows_case += [n] * len(chunk)
                rows_corner += [b.coords for b in chunk]
                rows_size += [b.size for b in chunk]
            if progress:
                progress(
                    {
                        "stage": "embedding",
                        "case": case,
                        "progress": 0.8 + 0.2 * (n + 1) / len(cases),
                        "message": f"embedded {case} ({n + 1}/{len(cases)})",
                    }
                )
    return {
        "cases": np.array(list(cases)),
        "case_index": np.array(rows_case, np.int32),
        "corners": np.array(rows_corner, np.int32).reshape(-1, 3),
        "sizes": np.array(rows_size, np.int32).reshape(-1, 3),
        "embeddings": np.concatenate(embeddings),
        "errors": np.concatenate(errors),
    }


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def load_encoder(path: Path | str):
    """The user's encoder, from a torch.export archive (``.pt2``, ``torch.export.save``) or a TorchScript file.

    torch deprecates TorchScript (2.14 warns on ``torch.jit.load``) in favour of torch.export; both load, so files
    saved for earlier versions keep working. Raises ValueError naming the file when it is neither."""
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such encoder file")
    if path.suffix == ".pt2":
        # checked first: torch.export.load logs a whole traceback before it raises on a file that is no archive
        try:
            if not zipfile.is_zipfile(path):
                raise zipfile.BadZipFile("not a zip archive")
            return torch.export.load(str(path)).module()  # an exported module refuses .eval(); it has no dropout
        except Exception as e:  # noqa: BLE001 - zip, pickle and export errors for other files
            raise ValueError(
                f"{path}: not a torch.export archive (save one with torch.export.save); {type(e).__name__}"
            ) from None
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, zip and pickle errors for other files
        raise ValueError(
            f"{path}: not a TorchScript module (save one with torch.jit.script(...).save, or give a torch.export "
            f"archive named .pt2); {type(e).__name__}"
        ) from None


def check_encoder(path: Path | str) -> None:
    """Raise ValueError unless ``path`` is an encoder mapping (N, 1, 16, 16, 16) to (N, E) for batches of 2 and 3.

    Checked before the pool autoencoder trains, so a wrong file fails at once, not after minutes of training. Two
    batch sizes: an exported program with a fixed batch passes one and would fail on the pool's batches."""
    import torch

    encoder = load_encoder(path)
    for n in (2, 3):
        try:
            with torch.no_grad():
                code = encoder(torch.zeros(n, 1, CUBE, CUBE, CUBE))
        except Exception as e:  # noqa: BLE001 - whatever the user's module raises
            hint = " (export it with a dynamic batch dimension, torch.export.Dim)" if Path(path).suffix == ".pt2" else ""
            raise ValueError(
                f"{path}: the encoder fails on a ({n}, 1, {CUBE}, {CUBE}, {CUBE}) batch{hint} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            ) from None
        if not isinstance(code, torch.Tensor) or code.shape[0] != n or code.reshape(n, -1).shape[1] < 1:
            raise ValueError(
                f"{path}: the encoder must map (N, 1, {CUBE}, {CUBE}, {CUBE}) to (N, E), got "
                f"{tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__}"
            )
