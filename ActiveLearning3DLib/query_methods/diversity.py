"""Label-free selection on box embeddings (``cluster``, ``cscs``) and PE with spatial diversity (docs/METHODS.md 5).

The selection math works on plain arrays: one embedding row and one
difficulty per candidate box. Where embeddings come from (the pool
autoencoder) is another module's business.

CSCS (Hattat et al.), as this project defines its free parts:

- typicality ``T = 1 / mean distance to the k nearest neighbours``;
  difficulty ``D`` = reconstruction error; both rank-normalised to (0, 1];
- **Difficulty-Coverage Ratio (DCR)**: the share of the harder half of the
  pool (by ``D``) that lies in the more typical half (by ``T``). 0.5 when the
  two are unrelated, 1 when every hard box is also typical (difficulty then
  covers the dense regions by itself), 0 when hard boxes are all outliers;
- **pacing rule**: ``a = b ** (2 * (1 - DCR))`` with the effective budget
  ``b = budget / candidates`` in (0, 1]. No fitted parameters; ``a`` grows
  with the budget (a tiny budget goes to typical boxes first, a large one can
  afford the hard ones) and with the DCR (when hard boxes are typical,
  difficulty is safe to follow); with unrelated ``T`` and ``D`` it is ``b``.
  It is computed once, before any selection;
- score ``S = T ** (1 - a) * D ** a``; selection stratified over k-means
  clusters with the quotas of ``cluster``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..aggregation import NotEnoughCandidates, Pick, blocker_for, greedy_per_image, iter_greedy
from ..boxes import Box, any_overlap
from .base import QueryContext
from .options import PESpatialOptions

SILHOUETTE_SAMPLE = 2000


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); points alone in their cluster count 0, as in scikit-learn."""
    from scipy.spatial.distance import cdist

    ids, labels = np.unique(labels, return_inverse=True)
    if len(ids) < 2:
        return -1.0
    d = cdist(x, x)
    onehot = np.eye(len(ids))[labels]
    counts = onehot.sum(0)
    sums = d @ onehot  # distance of each point to all points of each cluster
    own = counts[labels]
    a = sums[np.arange(len(x)), labels] / np.maximum(own - 1, 1)
    others = sums / counts
    others[np.arange(len(x)), labels] = np.inf
    b = others.min(1)
    values = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(values.mean())


def kmeans_auto(x: np.ndarray, seed: int, k_range: Sequence[int] = range(2, 11)) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k chosen by the best silhouette (on a sample of at most 2000 points); (labels, centres)."""
    from scipy.cluster.vq import kmeans2  # here, not at import: the panel lists the methods before scipy is installed

    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(x), min(len(x), SILHOUETTE_SAMPLE), replace=False)
    best = None
    for k in k_range:
        if k >= len(x):
            break
        centres, labels = kmeans2(x, k, minit="++", seed=np.random.default_rng([seed, k]))
        if len(np.unique(labels)) < k:
            continue
        score = silhouette(x[sample], labels[sample])
        if best is None or score > best[0]:
            best = (score, labels, centres)
    if best is None:  # too few points to split: one cluster
        return np.zeros(len(x), int), x.mean(0, keepdims=True)
    return best[1], best[2]


def proportional_quotas(sizes: Sequence[int], budget: int) -> list[int]:
    """Budget shared in proportion to cluster sizes, at least one per cluster.

    Rounded down, raised to one, then corrected to the budget: missing boxes go
    to the largest remainders, surplus ones come from the most over-served
    clusters that have more than one. With fewer boxes than clusters, the
    largest clusters get one each.
    """
    sizes = np.asarray(sizes, np.float64)
    if budget < len(sizes):
        quotas = np.zeros(len(sizes), int)
        quotas[np.argsort(-sizes, kind="stable")[:budget]] = 1
        return quotas.tolist()
    share = budget * sizes / sizes.sum()
    quotas = np.maximum(np.floor(share).astype(int), 1)
    while quotas.sum() < budget:
        quotas[int(np.argmax(share - quotas))] += 1
    while quotas.sum() > budget:
        excess = np.where(quotas > 1, quotas - share, -np.inf)
        quotas[int(np.argmax(excess))] -= 1
    return quotas.tolist()


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1]: the largest value gets 1, ties share their mean rank."""
    from scipy.stats import rankdata

    return rankdata(values) / len(values)


def typicality(x: np.ndarray, k: int = 10) -> np.ndarray:
    """1 / mean distance to the k nearest neighbours (dense regions are typical)."""
    from scipy.spatial import cKDTree

    x = np.asarray(x, np.float64)
    k = min(k, len(x) - 1)
    distances, _ = cKDTree(x).query(x, k=k + 1)
    return 1.0 / np.maximum(distances[:, 1:].mean(1), 1e-12)


def difficulty_coverage_ratio(t_rank: np.ndarray, d_rank: np.ndarray) -> float:
    """Share of the harder half of the pool that lies in the more typical half (see the module docstring)."""
    hard = d_rank > 0.5
    if not hard.any():
        return 0.5
    return float((t_rank[hard] > 0.5).mean())


def pacing_weight(effective_budget: float, dcr: float) -> float:
    """The weight of difficulty, ``a = b ** (2 * (1 - DCR))`` (module docstring)."""
    b = float(np.clip(effective_budget, 1e-12, 1.0))
    return float(b ** (2.0 * (1.0 - float(np.clip(dcr, 0.0, 1.0)))))


def cscs_scores(embeddings: np.ndarray, difficulty: np.ndarray, budget: int, k: int = 10) -> tuple[np.ndarray, dict]:
    """CSCS scores of every candidate and what went into them (a, DCR, effective budget)."""
    t = rank_normalise(typicality(embeddings, k))
    d = rank_normalise(np.asarray(difficulty, np.float64))
    dcr = difficulty_coverage_ratio(t, d)
    b = budget / len(t)
    a = pacing_weight(b, dcr)
    return t ** (1 - a) * d**a, {"dcr": dcr, "effective_budget": b, "difficulty_weight": a}


def stratified_select(
    labels: np.ndarray, priority: np.ndarray, budget: int, accept: Callable[[int], bool] = lambda i: True
) -> list[int]:
    """Per cluster, its quota of candidates in descending priority; ``accept`` may reject (e.g. an overlap).

    A cluster that runs out passes its unused quota to the others (largest
    priority first), so the budget is met whenever enough candidates are acceptable.
    """
    ids = np.unique(labels)
    quotas = dict(zip(ids.tolist(), proportional_quotas([(labels == c).sum() for c in ids], budget)))
    chosen: list[int] = []
    leftovers: list[int] = []
    for c in ids.tolist():
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-priority[members], kind="stable")]
        taken = 0
        for pos, i in enumerate(order):
            if taken == quotas[c]:
                leftovers += order[pos:].tolist()
                break
            if accept(int(i)):
                chosen.append(int(i))
                taken += 1
    for i in sorted(leftovers, key=lambda j: -priority[j]):
        if len(chosen) == budget:
            break
        if accept(int(i)):
            chosen.append(int(i))
    return chosen


def cluster_priority(embeddings: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``cluster``: nearest to its own centre first (priority = minus the distance)."""
    return -np.linalg.norm(np.asarray(embeddings, np.float64) - centres[labels], axis=1)


def _embedding_query(ctx: QueryContext, count: int, method: str, priority_of) -> list[Pick]:
    """Cluster the free candidates, then per cluster its quota by ``priority_of``; no two picks overlap."""
    free = ctx.embeddings.free(ctx.blocked)
    if len(free) < count:
        raise NotEnoughCandidates(f"{method}: only {len(free)} free candidate boxes in the pool, {count} asked for")
    seed = int(ctx.rng(method).integers(2**31))
    labels, centres = kmeans_auto(free.embeddings, seed)
    priority, scores = priority_of(free, labels, centres)
    chosen: list[Box] = []

    def accept(i: int) -> bool:
        box = free.boxes[i]
        if any_overlap(box, chosen):
            return False
        chosen.append(box)
        return True

    picked = stratified_select(labels, priority, count, accept)
    if len(picked) < count:
        raise NotEnoughCandidates(f"{method}: only {len(picked)} non-overlapping candidate boxes, {count} asked for")
    return [
        Pick(free.boxes[i], float(scores[i]), float(priority[i]), f"cluster_{int(labels[i])}", rank)
        for rank, i in enumerate(picked)
    ]


def select_cluster(ctx: QueryContext, count: int) -> list[Pick]:
    """``cluster``: k-means on the embeddings, proportional quotas, nearest to the centre first."""

    def priority(free, labels, centres):
        p = cluster_priority(free.embeddings, labels, centres)
        return p, -p  # score: the distance to the centre

    return _embedding_query(ctx, count, "cluster", priority)


def select_cscs(ctx: QueryContext, count: int) -> list[Pick]:
    """``cscs``: typicality and difficulty combined by the pacing rule, stratified over clusters."""

    def priority(free, labels, centres):
        s, _ = cscs_scores(free.embeddings, free.errors, count)
        return s, s

    return _embedding_query(ctx, count, "cscs", priority)


# ------------------------------------------------------------------------------ PE with spatial diversity
DEFAULT_MIN_DISTANCE_FACTOR = 1.0  # default minimum centre distance: this times the longest box edge (voxels)


def spatially_diverse(
    picks: Sequence[Pick],
    count: int,
    min_distance: float,
    embeddings: dict[tuple[str, tuple[int, ...]], np.ndarray] | None = None,
) -> list[Pick]:
    """Best-first, rejecting a pick closer than ``min_distance`` to one already chosen in this query.

    Distance: between box centres in voxels (boxes of different images are
    never close), or, with ``embeddings`` (keyed by case and corner), in embedding space.
    """
    order = sorted(range(len(picks)), key=lambda i: (-picks[i].priority, i))
    chosen: list[Pick] = []
    for i in order:
        p = picks[i]
        if all(_distance(p, q, embeddings) >= min_distance for q in chosen):
            chosen.append(p)
            if len(chosen) == count:
                return chosen
    raise NotEnoughCandidates(
        f"pe_spatial: only {len(chosen)} candidate boxes at least {min_distance:g} apart, {count} asked for; "
        "lower the minimum distance or ask for fewer boxes"
    )


def _distance(p: Pick, q: Pick, embeddings) -> float:
    if embeddings is not None:
        return float(np.linalg.norm(embeddings[(p.box.case, p.box.coords)] - embeddings[(q.box.case, q.box.coords)]))
    if p.box.case != q.box.case:
        return float("inf")
    return float(np.linalg.norm(p.box.centre - q.box.centre))


def select_pe_spatial(ctx: QueryContext, count: int) -> list[Pick]:
    """PE boxes best-first, each at least the minimum distance from those already taken in this query.

    In voxels (default: the longest box edge) boxes of different images are never
    close, so the rule applies per image while walking each image's greedy PE
    boxes. In embedding space (``PESpatialOptions.distance_space="embedding"``) every pick takes the
    embedding of the nearest candidate of the pool embeddings' grid, and the rule
    applies across images (default distance: the median nearest-neighbour
    distance of the pool's embeddings).
    """
    options = ctx.options if isinstance(ctx.options, PESpatialOptions) else PESpatialOptions()  # validated when made
    if options.distance_space == "embedding":
        return _pe_spatial_embedding(ctx, count, options)
    min_distance = options.min_distance if options.min_distance is not None else DEFAULT_MIN_DISTANCE_FACTOR * max(ctx.patch_size)
    per_image = ctx.n_per_image or count
    picks: list[Pick] = []
    for scores in ctx.case_scores(["pe"]):
        s = scores["pe"]
        taken: list[Pick] = []
        for index in iter_greedy(s, s.scores, blocker_for(s, ctx.blocked)):
            pick = Pick(s.box(index), float(s.scores[index]), float(s.scores[index]), "pe", len(taken))
            if all(_distance(pick, q, None) >= min_distance for q in taken):
                taken.append(pick)
                if len(taken) == per_image:
                    break
        picks += taken
    return spatially_diverse(picks, count, min_distance)


def _pe_spatial_embedding(ctx: QueryContext, count: int, options: PESpatialOptions) -> list[Pick]:
    from scipy.spatial import cKDTree

    if ctx.embeddings is None or not len(ctx.embeddings):
        raise ValueError("pe_spatial with distance in embedding space needs the pool's box embeddings")
    emb = ctx.embeddings
    min_distance = options.min_distance
    if min_distance is None:
        distances, _ = cKDTree(emb.embeddings).query(emb.embeddings, k=2)
        min_distance = float(np.median(distances[:, 1]))
    by_case: dict[str, list[int]] = {}
    for i, b in enumerate(emb.boxes):
        by_case.setdefault(b.case, []).append(i)
    per_image = ctx.n_per_image or 4 * count
    picks: list[Pick] = []
    vectors: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
    for scores in ctx.case_scores(["pe"]):
        s = scores["pe"]
        rows = by_case.get(s.case)
        if not rows:
            raise ValueError(f"pe_spatial: the pool embeddings have no boxes of {s.case!r}")
        corners = np.array([emb.boxes[i].coords for i in rows], float)
        for pick in greedy_per_image(s, per_image, blocker_for(s, ctx.blocked), None, "pe"):
            nearest = rows[int(np.argmin(np.linalg.norm(corners - np.array(pick.box.coords, float), axis=1)))]
            vectors[(pick.box.case, pick.box.coords)] = emb.embeddings[nearest]
            picks.append(pick)
    return spatially_diverse(picks, count, min_distance, vectors)
