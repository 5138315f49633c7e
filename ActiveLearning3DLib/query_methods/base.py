"""What every query method gets and returns, and the registry entry that describes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..aggregation import BoxScores, Pick, default_stride
from ..boxes import Box, Shape3, effective_patch_size
from ..scores import ScoreStore, score_maps
from ..uncertainty import ProbabilitySource, ensemble_maps
from .options import OPTION_RECORDS

if TYPE_CHECKING:  # pragma: no cover
    from ..embeddings import EmbeddingSet


def no_progress(items: Iterable, desc: str) -> Iterable:
    return items


@dataclass
class QueryContext:
    """Everything a query method may look at. Methods read it and never change it.

    ``blocked`` holds every box already in the project (any state): new boxes never
    overlap them. ``loop`` is the index of the loop the query creates and
    ``total_loops`` the planned number of loops (ClaSP PE's noise schedule).
    ``options`` is the option record of the method that runs (``QueryMethod.options``,
    e.g. :class:`~.options.PESpatialOptions`); a method reads only a record of its
    own type, so one made for another method is ignored, as is none (its defaults).
    """

    cases: Mapping[str, Shape3]  # pool case -> image shape (k, j, i)
    patch_size: Shape3
    foreground_classes: Sequence[int]
    seed: int
    loop: int = 0
    total_loops: int = 5
    blocked: Sequence[Box] = ()
    probabilities: ProbabilitySource | None = None
    scores: ScoreStore | None = None  # box scores saved by a scoring job; used instead of probabilities
    ground_truth: Callable[[str], np.ndarray] | None = None
    label_counts: Mapping[str, Mapping[int, int]] | None = None  # per case, voxels per class (ground truth)
    stride: Shape3 | None = None
    n_per_image: int | None = None
    embeddings: "EmbeddingSet | None" = None  # cluster, cscs: the pool's candidate boxes embedded (no labels)
    options: Any = None  # the running method's option record (QueryMethod.options); None: its defaults
    progress: Callable[[Iterable, str], Iterable] = no_progress

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator fixed by seed, loop and purpose: the same inputs always give the same query."""
        key = [self.seed, self.loop, *purpose.encode()]
        return np.random.default_rng(key)

    def box_size(self, case: str) -> Shape3:
        return effective_patch_size(self.patch_size, self.cases[case])

    def stride_for(self, case: str) -> Shape3:
        return self.stride or default_stride(self.patch_size, self.cases[case])

    def blocked_in(self, case: str) -> list[Box]:
        return [b for b in self.blocked if b.case == case]

    @property
    def n_classes(self) -> int:
        return len(self.foreground_classes) + 1

    def case_scores(self, map_names: Sequence[str]) -> Iterable[dict[str, BoxScores]]:
        """For each pool case in order, the candidate box scores of each named map.

        Read from the score store when it has them, else computed from the
        probabilities (ensemble members streamed one at a time).
        """
        if self.probabilities is None and self.scores is None:
            raise ValueError("this query method needs ensemble probabilities (--probabilities DIR, or a trained model)")
        for case in self.progress(sorted(self.cases), "scoring boxes"):
            if self.scores is not None and (self.probabilities is None or self.scores.has(case, map_names)):
                yield self.scores.read(case, map_names)
                continue
            maps = ensemble_maps(self.probabilities, case, self.cases[case], self.n_classes, map_names)  # type: ignore[arg-type]
            yield score_maps(case, maps, map_names, self.patch_size, self.stride_for(case))
            del maps


@dataclass(frozen=True)
class QueryMethod:
    """A registry entry: what a method is called, what it does and what it needs."""

    name: str
    description: str
    select: Callable[[QueryContext, int], list[Pick]] = field(repr=False)
    needs_model: bool = False
    needs_ground_truth: bool = False
    needs_embeddings: bool = False  # label-free cold start: reads the pool autoencoder's embeddings
    maps: tuple[str, ...] = ()  # uncertainty maps it reads; "class_*" stands for one per foreground class
    options: type | None = None  # its option record (a frozen dataclass of .options), where it has options

    def options_of(self, context: QueryContext) -> Any:
        """The method's options: the context's record where it is of this method's type, else the defaults."""
        if self.options is None:
            return None
        return context.options if isinstance(context.options, self.options) else self.options()

    def wants_embeddings(self, options: Any = None) -> bool:
        """Whether a query needs the pool's box embeddings: the method always, or as these options ask."""
        own = options if self.options is not None and isinstance(options, self.options) else None
        return self.needs_embeddings or bool(getattr(own, "needs_embeddings", False))

    def map_names(self, foreground_classes: Sequence[int]) -> list[str]:
        """The maps a scoring job must aggregate for this method."""
        names: list[str] = []
        for m in self.maps:
            names += [f"class_{c}" for c in foreground_classes] if m == "class_*" else [m]
        return names

    @property
    def simulation_only(self) -> bool:
        """Methods that read the ground truth exist to simulate an annotator who screens the images."""
        return self.needs_ground_truth

    def __call__(self, context: QueryContext, count: int) -> list[Pick]:
        if count < 1:
            raise ValueError(f"{self.name}: the number of boxes must be at least 1, got {count}")
        if self.needs_ground_truth and context.ground_truth is None:
            raise ValueError(
                f"query method {self.name!r} reads the ground truth (simulation only), and this project has none; "
                "use a method that does not, such as 'random' or a model-based method"
            )
        if self.needs_model and context.probabilities is None and context.scores is None:
            raise ValueError(
                f"query method {self.name!r} needs ensemble probabilities of the pool: give --probabilities DIR "
                "or train a model first"
            )
        if context.options is not None and not isinstance(context.options, OPTION_RECORDS):
            raise ValueError(
                f"query method {self.name!r}: options must be a query method's option record, "
                f"got {type(context.options).__name__}"
            )
        if self.needs_embeddings and context.embeddings is None:
            raise ValueError(f"query method {self.name!r} needs the pool's box embeddings (made by the pool autoencoder)")
        picks = self.select(context, count)
        _check_no_overlap(picks, context.blocked, self.name)
        return picks


def _check_no_overlap(picks: Sequence[Pick], blocked: Sequence[Box], method: str) -> None:
    """Guard the invariant every later stage relies on: no box overlaps another or an existing one."""
    by_case: dict[str, list[Box]] = {}
    for b in blocked:
        by_case.setdefault(b.case, []).append(b)
    for p in picks:
        others = by_case.setdefault(p.box.case, [])
        if any(p.box.overlaps(o) for o in others):
            raise AssertionError(f"{method}: selected box {p.box} overlaps another box; this is a bug")
        others.append(p.box)
