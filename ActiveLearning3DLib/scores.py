"""Candidate box scores per case, stored so that scoring (slow, a model) and querying (fast) are separate stages.

A scoring job streams the ensemble through the uncertainty maps of one case,
aggregates the maps a query needs into box scores on the corner grid, and
saves them here; a query then reads them instead of the probabilities, which
for a CT-sized pool would be far too large to keep.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .aggregation import BoxScores, default_stride, score_boxes
from .fileio import replacing_file
from .uncertainty import EnsembleMaps, ProbabilitySource, ensemble_maps


def score_maps(
    case: str, maps: EnsembleMaps, names: Sequence[str], patch_size: Sequence[int], stride: Sequence[int]
) -> dict[str, BoxScores]:
    """Aggregate each named uncertainty map of one case into candidate box scores."""
    return {name: score_boxes(case, maps.map(name), patch_size, stride) for name in names}


class ScoreStore:
    """``ROOT/<case>.npz`` holding, per map, the score grid, plus the corner axes and the box size."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, case: str) -> Path:
        return self.root / f"{case}.npz"

    def write(self, case: str, scores: dict[str, BoxScores]) -> None:
        """Save one case's scores atomically (a scoring job that dies leaves the case unscored, never half-written)."""
        if not scores:
            raise ValueError(f"no scores to save for case {case!r}")
        first = next(iter(scores.values()))
        arrays = {f"map_{name}": s.scores for name, s in scores.items()}
        arrays.update({f"axis_{d}": a for d, a in enumerate(first.axes)}, size=np.asarray(first.size))
        self.root.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with replacing_file(self.path(case)) as tmp:
            tmp.write_bytes(buffer.getvalue())

    def _load(self, case: str) -> dict[str, np.ndarray]:
        path = self.path(case)
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: unreadable box scores ({e})") from e

    def has(self, case: str, names: Sequence[str]) -> bool:
        """True when the case's scores of every named map are stored and readable (else: score it again)."""
        if not self.path(case).is_file():
            return False
        try:
            data = self._load(case)
        except ValueError:
            return False
        return all(f"map_{n}" in data for n in names)

    def read(self, case: str, names: Sequence[str]) -> dict[str, BoxScores]:
        data = self._load(case)
        missing = [n for n in names if f"map_{n}" not in data]
        if missing:
            have = sorted(k[4:] for k in data if k.startswith("map_"))
            raise ValueError(f"{self.path(case)}: has no scores for {missing} (has {have}); score again for this query method")
        axes = [data[f"axis_{d}"] for d in range(3)]
        size = tuple(int(s) for s in data["size"])
        return {n: BoxScores(case, axes, size, data[f"map_{n}"]) for n in names}  # type: ignore[arg-type]


def score_pool(
    source: ProbabilitySource,
    cases: dict[str, tuple[int, int, int]],
    n_classes: int,
    names: Sequence[str],
    patch_size: Sequence[int],
    store: ScoreStore,
    stride: Sequence[int] | None = None,
    progress: Callable[[Iterable, str], Iterable] = lambda items, desc: items,
) -> list[str]:
    """Score every case that the store does not hold yet (so an interrupted run resumes); returns those scored."""
    done = []
    for case in progress(sorted(cases), "scoring pool"):
        if store.has(case, names):
            continue
        maps = ensemble_maps(source, case, cases[case], n_classes, names)
        store.write(case, score_maps(case, maps, names, patch_size, stride or default_stride(patch_size, cases[case])))
        done.append(case)
    return done
