"""ClaSP PE: class-stratified predictive entropy with a decaying power-noise schedule (docs/METHODS.md section 4)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from ..aggregation import NotEnoughCandidates, Pick, blocker_for, greedy_per_image, gumbel, log_score
from .base import QueryContext

PLAIN = "pe"
PLAIN_SHARE = 0.34
CLASS_SHARE = 0.66
BETA_MAX = 100.0


def clasp_beta(model_loop: int, total_loops: int) -> float:
    """beta_t = 100^(t / (T - 1)) for the model of loop t (0-based) of T loops; 1 when T < 2."""
    if total_loops < 2:
        return 1.0
    t = min(max(model_loop, 0), total_loops - 1)
    return float(BETA_MAX ** (t / (total_loops - 1)))


def per_image_quotas(n: int, n_strata: int) -> tuple[int, int]:
    """(plain, per class) boxes per image: max(int(0.34 n), 1) and max(int(0.66 n / K), 1)."""
    return max(int(PLAIN_SHARE * n), 1), max(int(CLASS_SHARE * n / n_strata), 1)


def global_quotas(count: int, classes: Sequence[int], rng: np.random.Generator) -> dict[str, int]:
    """n_cls = int(0.66 Q) split evenly over the classes, remainder one each to random classes; plain gets the rest."""
    n_cls = int(CLASS_SHARE * count)
    k = len(classes)
    quotas = {PLAIN: count - n_cls if k else count}
    if not k:
        return quotas
    base, rest = divmod(n_cls, k)
    lucky = set(rng.choice(len(classes), size=rest, replace=False).tolist()) if rest else set()
    for i, c in enumerate(classes):
        quotas[f"class_{c}"] = base + (1 if i in lucky else 0)
    return quotas


def fill_from_strata(ranked: dict[str, list[Pick]], quotas: dict[str, int], count: int, what: str) -> list[Pick]:
    """Each stratum takes its best ``quota`` picks; a short stratum's share is filled from the others.

    The fill takes the next-best picks of the other strata in turn, by their rank
    within their stratum (nnActive fails an assertion instead).
    """
    chosen: list[Pick] = []
    leftovers: list[list[Pick]] = []
    for name in sorted(ranked):
        take = quotas.get(name, 0)
        chosen += ranked[name][:take]
        leftovers.append(ranked[name][take:])
    depth = 0
    while len(chosen) < count and any(depth < len(rest) for rest in leftovers):
        for rest in leftovers:
            if depth < len(rest) and len(chosen) < count:
                chosen.append(rest[depth])
        depth += 1
    if len(chosen) < count:
        raise NotEnoughCandidates(
            f"{what}: only {len(chosen)} non-overlapping candidate boxes in the whole pool, {count} asked for; "
            "ask for fewer boxes, use a smaller patch size, or add images"
        )
    return chosen


def select_clasp_pe(ctx: QueryContext, count: int) -> list[Pick]:
    rng = ctx.rng("clasp_pe")
    classes = list(ctx.foreground_classes)
    strata = [PLAIN] + [f"class_{c}" for c in classes]
    beta = clasp_beta(ctx.loop - 1, ctx.total_loops)  # the query of loop L uses the model trained in loop L - 1
    n = ctx.n_per_image or count
    plain_n, class_n = per_image_quotas(n, len(strata))
    per_stratum: dict[str, list[Pick]] = defaultdict(list)
    for scores in ctx.case_scores(strata):
        blocker = blocker_for(scores[PLAIN], ctx.blocked)  # one blocker: boxes of any stratum block the others
        for name in rng.permutation(strata):
            s = scores[str(name)]
            priority = log_score(s.scores) + gumbel(rng, s.scores.shape, 1.0 / beta)
            quota = plain_n if name == PLAIN else class_n
            per_stratum[str(name)] += greedy_per_image(s, quota, blocker, priority, str(name))
    ranked = {name: sorted(picks, key=lambda p: -p.priority) for name, picks in per_stratum.items()}
    for name in strata:
        ranked.setdefault(name, [])
    for picks in ranked.values():
        for r, p in enumerate(picks):
            p.rank = r
    return fill_from_strata(ranked, global_quotas(count, classes, rng), count, "clasp_pe")
