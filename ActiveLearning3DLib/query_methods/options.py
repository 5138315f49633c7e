"""Option records of the query methods that have options: one validated dataclass per method.

A method's registry entry names its record (``QueryMethod.options``); the
caller puts one in ``QueryContext.options`` and the method reads it with
``QueryMethod.options_of(context)`` (its defaults when none is given). Adding a
method with options adds a record here, not fields to ``QueryContext``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DISTANCE_SPACES = ("voxels", "embedding")


@dataclass(frozen=True)
class PESpatialOptions:
    """``pe_spatial``: how far apart the boxes of one query must be, and in which space.

    ``min_distance`` None: the longest box edge in voxels, or the median
    nearest-neighbour distance of the pool embeddings in embedding space.
    ``distance_space``: ``"voxels"`` (box centres; boxes of different images are
    never close) or ``"embedding"`` (the pool autoencoder's embeddings, across images).
    """

    min_distance: float | None = None
    distance_space: str = "voxels"

    def __post_init__(self) -> None:
        d = self.min_distance
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0):
            raise ValueError(f"pe_spatial: min_distance: expected a non-negative number, got {d!r}")
        if self.distance_space not in DISTANCE_SPACES:
            raise ValueError(f"pe_spatial: distance_space: expected 'voxels' or 'embedding', got {self.distance_space!r}")

    @property
    def needs_embeddings(self) -> bool:
        """Distances in embedding space read the pool's box embeddings."""
        return self.distance_space == "embedding"


OPTION_RECORDS: tuple[type, ...] = (PESpatialOptions,)  # every record above: what QueryContext.options may hold
