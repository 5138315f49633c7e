"""Loading nnU-Net checkpoints without running code from them.

A project folder is shared between people, so its checkpoints are untrusted
input: ``torch.load(weights_only=False)`` (what nnU-Net 2.8.1 itself uses in
``nnUNetTrainer.load_checkpoint`` and ``nnUNetPredictor.initialize_from_trained_model_folder``)
unpickles anything, and a crafted ``checkpoint_final.pth`` runs a shell command.

``load_checkpoint`` uses torch's weights-only unpickler and allows, besides
tensors and plain containers, exactly the non-tensor types an nnU-Net
checkpoint holds: NumPy scalars (the logged pseudo Dice and ``_best_ema``)
with their dtypes, and ``torch.device`` (``init_args``). Anything else is
refused with :class:`UnsafeCheckpoint`. Our code never calls nnU-Net's own
loading paths: prediction builds the network itself (``prediction.Ensemble.load``)
and training resumes through ``nnUNetTrainerPartial.load_checkpoint``, which
passes the already loaded dictionary on.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint that holds more than weights and plain data, or cannot be read at all."""


def _numpy_globals() -> list:
    """NumPy's scalar constructor and dtype classes, under the names both NumPy 1 and 2 pickle them with."""
    try:
        scalar = np._core.multiarray.scalar  # NumPy 2
    except AttributeError:  # pragma: no cover - NumPy 1
        scalar = np.core.multiarray.scalar
    allowed: list = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, name)
            for name in dir(dtypes)
            if name.endswith("DType") and name not in ("ObjectDType", "VoidDType") and isinstance(getattr(dtypes, name), type)
        ]
    return allowed


def load_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict:
    """An nnU-Net checkpoint as a dict, read with torch's weights-only unpickler (see the module docstring)."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = f"it names {found.group(1)}" if found else (str(e).splitlines() or [""])[0][:200]
        raise UnsafeCheckpoint(
            f"{path}: refused to load: the checkpoint holds objects other than weights and plain "
            f"data, which could run code ({detail})"
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated file raises anything from zip to EOF errors
        raise UnsafeCheckpoint(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
    if not isinstance(data, dict) or "network_weights" not in data:
        raise UnsafeCheckpoint(f"{path}: not an nnU-Net checkpoint (no network_weights)")
    return data


def weights_digest(weights: Any) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and bytes of every tensor): equal digests, equal weights.

    A warm-started fold records the digest of its network just before its first step, so anyone can check it
    against the previous member's ``checkpoint_final.pth`` without keeping a copy of the weights.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# What nnU-Net's preprocessed case properties (``<case>.pkl``) hold: dicts and lists of NumPy arrays and scalars.
_PROPERTY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only NumPy arrays, scalars and dtypes besides plain Python data; any other global is refused."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in _PROPERTY_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def check_plain_pickles(folder: Path | str, pattern: str = "*.pkl") -> int:
    """Refuse (UnsafeCheckpoint naming the file) any pickle below ``folder`` that holds more than plain data.

    nnU-Net's data loaders read the preprocessed case properties with ``pickle.load``, which runs whatever a
    crafted file in a shared project names; each file is read here first with an unpickler that can only build
    plain data and NumPy arrays. Returns how many files were checked.
    """
    count = 0
    for path in sorted(Path(folder).rglob(pattern)):
        try:
            with open(path, "rb") as f:
                _PlainDataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(
                f"{path}: refused to load: the file holds objects other than plain data, which could run code ({e})"
            ) from None
        except Exception as e:  # noqa: BLE001 - a truncated pickle raises EOFError, ValueError, ...
            raise UnsafeCheckpoint(f"{path}: unreadable preprocessed case properties ({type(e).__name__}: {e})") from e
        count += 1
    return count
