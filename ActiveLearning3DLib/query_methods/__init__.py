"""The query methods of docs/METHODS.md sections 4 and 5, by name.

``get_method(name)`` returns a :class:`QueryMethod` that says what it needs
(a model, the ground truth) and refuses to run without it.
"""

from __future__ import annotations

from .base import QueryContext, QueryMethod
from .clasp import clasp_beta, select_clasp_pe
from .diversity import select_cluster, select_cscs, select_pe_spatial
from .options import PESpatialOptions
from .random_methods import select_nnactive_start, select_random, select_random_fg33, select_random_fg66
from .uncertainty_methods import (
    select_bald,
    select_pe,
    select_power_bald,
    select_power_pe,
    select_softrank_bald,
)

DEFAULT_METHOD = "clasp_pe"

_METHODS: tuple[QueryMethod, ...] = (
    QueryMethod(
        "clasp_pe",
        "ClaSP PE: class-stratified predictive entropy with decaying power noise (the default)",
        select_clasp_pe,
        needs_model=True,
        maps=("pe", "class_*"),
    ),
    QueryMethod("pe", "predictive entropy of the ensemble mean, greedy top boxes", select_pe, needs_model=True, maps=("pe",)),
    QueryMethod(
        "bald",
        "BALD (mutual information = PE - expected entropy), greedy top boxes",
        select_bald,
        needs_model=True,
        maps=("bald",),
    ),
    QueryMethod(
        "power_pe",
        "PowerPE: log PE + Gumbel noise (beta = 1), samples boxes in proportion to PE",
        select_power_pe,
        needs_model=True,
        maps=("pe",),
    ),
    QueryMethod(
        "power_bald", "PowerBALD: log BALD + Gumbel noise (beta = 1)", select_power_bald, needs_model=True, maps=("bald",)
    ),
    QueryMethod(
        "softrank_bald",
        "SoftrankBALD: global BALD rank r, -log r + Gumbel noise",
        select_softrank_bald,
        needs_model=True,
        maps=("bald",),
    ),
    QueryMethod(
        "pe_spatial",
        "predictive entropy with spatial diversity: best PE boxes, none closer than a minimum "
        "distance to another box of the same query",
        select_pe_spatial,
        needs_model=True,
        maps=("pe",),
        options=PESpatialOptions,
    ),
    QueryMethod("random", "uniform random boxes, images in shuffled round robin", select_random),
    QueryMethod(
        "random_fg33",
        "foreground-aware random, 33 % of boxes on foreground or its border (simulation only)",
        select_random_fg33,
        needs_ground_truth=True,
    ),
    QueryMethod(
        "random_fg66",
        "foreground-aware random, 66 % of boxes on foreground or its border (simulation only)",
        select_random_fg66,
        needs_ground_truth=True,
    ),
    QueryMethod(
        "cluster",
        "label-free cold start: k-means on autoencoder embeddings of the candidate boxes, budget "
        "in proportion to cluster size, nearest to the centre first",
        select_cluster,
        needs_embeddings=True,
    ),
    QueryMethod(
        "cscs",
        "label-free cold start (CSCS): typicality and autoencoder difficulty by a pacing rule, stratified over clusters",
        select_cscs,
        needs_embeddings=True,
    ),
    QueryMethod(
        "nnactive_start",
        "nnActive's simulated starting budget: 2 boxes per label, rest random_fg33 (simulation only)",
        select_nnactive_start,
        needs_ground_truth=True,
    ),
)
METHODS: dict[str, QueryMethod] = {m.name: m for m in _METHODS}


def get_method(name: str) -> QueryMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown query method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["DEFAULT_METHOD", "METHODS", "PESpatialOptions", "QueryContext", "QueryMethod", "clasp_beta", "get_method"]
