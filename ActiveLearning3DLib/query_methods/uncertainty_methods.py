"""Model-based queries on one uncertainty map: greedy PE and BALD, their power variants, SoftrankBALD."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..aggregation import Pick, blocker_for, greedy_per_image, gumbel, log_score, top_global
from .base import QueryContext

POWER_BETA = 1.0


def _per_image_then_global(
    ctx: QueryContext,
    count: int,
    map_name: str,
    method: str,
    priority: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> list[Pick]:
    """Per image: the best non-overlapping boxes by priority; across images: the best ``count``."""
    rng = ctx.rng(method)
    n = ctx.n_per_image or count
    picks: list[Pick] = []
    for scores in ctx.case_scores([map_name]):
        s = scores[map_name]
        prio = None if priority is None else priority(s.scores, rng)
        picks += greedy_per_image(s, n, blocker_for(s, ctx.blocked), prio, map_name)
    return top_global(picks, count, method)


def _power(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return log_score(scores) + gumbel(rng, scores.shape, 1.0 / POWER_BETA)


def select_pe(ctx: QueryContext, count: int) -> list[Pick]:
    return _per_image_then_global(ctx, count, "pe", "pe")


def select_bald(ctx: QueryContext, count: int) -> list[Pick]:
    return _per_image_then_global(ctx, count, "bald", "bald")


def select_power_pe(ctx: QueryContext, count: int) -> list[Pick]:
    return _per_image_then_global(ctx, count, "pe", "power_pe", _power)


def select_power_bald(ctx: QueryContext, count: int) -> list[Pick]:
    return _per_image_then_global(ctx, count, "bald", "power_bald", _power)


def select_softrank_bald(ctx: QueryContext, count: int) -> list[Pick]:
    """2n greedy BALD boxes per image, ranked globally (r = 1 best), priority -log r + Gumbel(0, 1)."""
    rng = ctx.rng("softrank_bald")
    n = ctx.n_per_image or count
    picks: list[Pick] = []
    for scores in ctx.case_scores(["bald"]):
        s = scores["bald"]
        picks += greedy_per_image(s, 2 * n, blocker_for(s, ctx.blocked), None, "bald")
    order = sorted(range(len(picks)), key=lambda i: (-picks[i].priority, i))
    noise = gumbel(rng, len(order), 1.0)
    for r, i in enumerate(order, start=1):
        picks[i].priority = float(-np.log(r) + noise[r - 1])
    return top_global(picks, count, "softrank_bald")
