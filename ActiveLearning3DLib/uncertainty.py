"""Voxel uncertainty of an ensemble (docs/METHODS.md section 3), with members streamed one at a time.

Only the running mean of the probabilities and, when BALD is wanted, the running
mean of the member entropies are kept, so memory does not grow with the number
of members. Maps a query does not need are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

PROBABILITY_KEY = "probabilities"
_TINY = np.float32(np.finfo(np.float32).tiny)


def entropy(p: np.ndarray, axis: int = 0) -> np.ndarray:
    """Shannon entropy (natural log) over ``axis``, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float32)
    return -np.sum(p * np.log(np.maximum(p, _TINY)), axis=axis, dtype=np.float32)


def _channel_entropy_sum(p: np.ndarray) -> np.ndarray:
    """-sum_c p_c log p_c for a (C, ...) array, one channel at a time (no (C, ...) float32 temporary)."""
    out = np.zeros(p.shape[1:], dtype=np.float32)
    for c in range(p.shape[0]):
        pc = np.asarray(p[c], dtype=np.float32)
        out -= pc * np.log(np.maximum(pc, _TINY))
    return out


class EnsembleAccumulator:
    """Streams ensemble members (each a (C, Z, Y, X) probability array) into the maps of section 3."""

    def __init__(self, need_expected_entropy: bool = False):
        self.need_expected_entropy = need_expected_entropy
        self._sum: np.ndarray | None = None
        self._entropy_sum: np.ndarray | None = None
        self.members = 0

    def add(self, probabilities: np.ndarray, name: str = "member") -> None:
        p = probabilities
        if p.ndim != 4:
            raise ValueError(f"{name}: probabilities must be (classes, Z, Y, X), got shape {p.shape}")
        if self._sum is None:
            self._sum = np.zeros(p.shape, dtype=np.float32)
            if self.need_expected_entropy:
                self._entropy_sum = np.zeros(p.shape[1:], dtype=np.float32)
        elif p.shape != self._sum.shape:
            raise ValueError(f"{name}: shape {p.shape} differs from the other members' {self._sum.shape}")
        for c in range(p.shape[0]):  # channel by channel: a float16 member never becomes a full float32 copy
            self._sum[c] += p[c]
        if self._entropy_sum is not None:
            self._entropy_sum += _channel_entropy_sum(p)
        self.members += 1

    def result(self) -> "EnsembleMaps":
        if self._sum is None:
            raise ValueError("no ensemble member was given")
        self._sum /= self.members
        ee = None if self._entropy_sum is None else self._entropy_sum / self.members
        maps = EnsembleMaps(self._sum, ee, self.members)
        self._sum = self._entropy_sum = None
        return maps


@dataclass
class EnsembleMaps:
    """Mean probabilities p̄ and (optionally) expected entropy EE; derived maps are computed on request."""

    mean: np.ndarray  # (C, Z, Y, X) float32
    expected_entropy: np.ndarray | None
    members: int
    _pe: np.ndarray | None = None

    def predictive_entropy(self) -> np.ndarray:
        """PE = -sum_c p̄_c log p̄_c."""
        if self._pe is None:
            self._pe = _channel_entropy_sum(self.mean)
        return self._pe

    def bald(self) -> np.ndarray:
        """BALD = PE - EE (mutual information between prediction and model)."""
        if self.expected_entropy is None:
            raise ValueError("BALD needs the expected entropy; accumulate with need_expected_entropy=True")
        return np.maximum(self.predictive_entropy() - self.expected_entropy, 0.0)

    def class_weighted(self, c: int) -> np.ndarray:
        """U_c = PE * p̄_c, the ClaSP PE map of class c."""
        return self.predictive_entropy() * self.mean[c]

    def map(self, name: str) -> np.ndarray:
        """A map by name: ``pe``, ``bald``, ``ee`` or ``class_<c>``."""
        if name == "pe":
            return self.predictive_entropy()
        if name == "bald":
            return self.bald()
        if name == "ee":
            if self.expected_entropy is None:
                raise ValueError("expected entropy was not accumulated")
            return self.expected_entropy
        if name.startswith("class_"):
            return self.class_weighted(int(name[len("class_") :]))
        raise ValueError(f"unknown uncertainty map {name!r}")


def needs_expected_entropy(map_names: Iterable[str]) -> bool:
    return any(n in ("bald", "ee") for n in map_names)


class ProbabilitySource(Protocol):
    """Where ensemble probabilities of pool cases come from (a folder, memory, a scoring job)."""

    def members(self) -> list[str]: ...

    def load(self, member: str, case: str) -> np.ndarray: ...

    def describe(self, member: str, case: str) -> str: ...


class FolderProbabilities:
    """``ROOT/<member>/<case>.npz`` (key ``probabilities``, as nnU-Net saves them) or ``<case>.npy``.

    Arrays are (classes, Z, Y, X) in the case's original voxel grid; float16 is fine.
    A folder with the files directly inside is a one-member ensemble.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: probabilities folder does not exist")
        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._members = subdirs or ["."]

    def members(self) -> list[str]:
        return list(self._members)

    def path(self, member: str, case: str) -> Path:
        folder = self.root / member
        for suffix in (".npy", ".npz"):
            p = folder / f"{case}{suffix}"
            if p.is_file():
                return p
        raise ValueError(f"{folder}: no probabilities for case {case!r} ({case}.npz or {case}.npy)")

    def describe(self, member: str, case: str) -> str:
        return str(self.path(member, case))

    def load(self, member: str, case: str) -> np.ndarray:
        path = self.path(member, case)
        try:
            if path.suffix == ".npy":
                return np.load(path, mmap_mode="r")
            with np.load(path) as data:
                if PROBABILITY_KEY not in data:
                    raise ValueError(f"no array named {PROBABILITY_KEY!r} (has {sorted(data.files)})")
                return data[PROBABILITY_KEY]
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: unreadable probabilities ({e})") from e


class MemoryProbabilities:
    """Probabilities held in memory: ``{member: {case: array}}`` (tests, the console, scoring in-process)."""

    def __init__(self, arrays: Mapping[str, Mapping[str, np.ndarray]]):
        self.arrays = arrays

    def members(self) -> list[str]:
        return list(self.arrays)

    def describe(self, member: str, case: str) -> str:
        return f"member {member!r}, case {case!r}"

    def load(self, member: str, case: str) -> np.ndarray:
        try:
            return self.arrays[member][case]
        except KeyError:
            raise ValueError(f"no probabilities for {self.describe(member, case)}") from None


def ensemble_maps(
    source: ProbabilitySource, case: str, shape: Sequence[int], n_classes: int, map_names: Iterable[str]
) -> EnsembleMaps:
    """Stream every member's probabilities of one case into :class:`EnsembleMaps`, checking each array."""
    members = source.members()
    if not members:
        raise ValueError("the probability source has no ensemble members")
    acc = EnsembleAccumulator(needs_expected_entropy(map_names))
    expected = (n_classes, *[int(s) for s in shape])
    for member in members:
        p = source.load(member, case)
        where = source.describe(member, case)
        if tuple(p.shape) != expected:
            raise ValueError(f"{where}: probabilities have shape {tuple(p.shape)}, expected {expected} (classes, Z, Y, X)")
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"{where}: probabilities must be floating point, got {p.dtype}")
        acc.add(p, where)
        del p
    return acc.result()  # NaN or inf anywhere shows up in the box sums, which aggregation checks
