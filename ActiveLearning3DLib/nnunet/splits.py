"""Class-aware, seeded k-fold splits over the images that have annotated boxes (docs/METHODS.md section 2).

Rule: every class annotated in at least two images appears in the validation
set of at least two folds. Each image is in exactly one validation set, so a
class whose images lie in two or more validation sets is in the training set of
every fold: every training split sees every class. A class annotated in only
one image cannot be in two validation sets; it is in the validation set of one
fold (whose training split then lacks it) - the data does not allow more.

Fold count: ``n_folds`` (5) when there are at least that many images; with
fewer images, one fold per image (leave-one-out, so 2 to 4 folds), because an
ensemble of fewer members is still useful and the first loops of a small
project would otherwise be impossible. One annotated image is an error: there
is nothing to validate on. The number of folds used is what
:func:`make_splits` returns (``len(splits)``); the caller trains that many.

Algorithm: images are visited from the rarest class to the most common
(seeded shuffle within ties); each goes to the fold, among those not yet full
(sizes differ by at most one), that holds the fewest of its classes, then the
fewest images, ties broken by the seeded order. The greedy result is checked;
if a class still sits in one fold only, a seeded repair swaps images between
folds. The same table, fold count and seed always give the same splits.

Stable folds (``previous``: the splits of the loop before; warm-started loops
use them): an image keeps the validation fold it had, so member k never trains
on an image it validated on before, and only the newly annotated images are
placed, by the same rule (rarest class first, the fold with the fewest of its
classes among those below their size, sizes differing by at most one where the
kept images allow). The repair swaps new images only. Growing from
leave-one-out (fewer than ``n_folds`` images) to more folds: the old folds keep
their images, the new folds (k >= the old count) start with new images only, so
their members have no predecessor and train from scratch. A class whose images
all sit in one kept fold stays there (moving one would break the rule above)
until new images of that class join other folds; :func:`check_splits` reports it.
When the fold count would shrink (annotations removed), the previous splits
cannot be kept and fresh ones are made (:func:`stable_splits` says so).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Mapping

from ..fileio import atomic_write_json, read_json


class SplitError(ValueError):
    """Too few annotated images for cross-validation."""


def fold_count(n_images: int, n_folds: int = 5) -> int:
    if n_folds < 2:
        raise SplitError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if n_images < 2:
        raise SplitError(
            f"cross-validation needs at least 2 images with annotated boxes, found {n_images}; annotate boxes in "
            f"more images first"
        )
    return min(n_folds, n_images)


def make_splits(
    case_classes: Mapping[str, Iterable[int]], n_folds: int = 5, seed: int = 0, previous: list[dict[str, list[str]]] | None = None
) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content: ``[{"train": [...], "val": [...]}, ...]`` (sorted case names).

    ``case_classes`` maps each annotated image to the classes annotated in it
    (background may be included; it is treated like any class). ``previous``:
    keep each listed image in its validation fold (see the module docstring);
    it must not have more folds than these splits get.
    """
    table = {str(c): frozenset(int(k) for k in v) for c, v in case_classes.items()}
    k = fold_count(len(table), n_folds)
    kept = {c: i for i, split in enumerate(previous or []) for c in split["val"] if c in table}
    if previous is not None and len(previous) > k:
        raise SplitError(f"the previous splits have {len(previous)} folds, these get {k}: they cannot be kept")
    rng = random.Random(seed)
    cases = sorted(c for c in table if c not in kept)
    rng.shuffle(cases)
    frequency: dict[int, int] = {}
    for c in table:  # kept images count too
        for cls in table[c]:
            frequency[cls] = frequency.get(cls, 0) + 1
    order = {c: i for i, c in enumerate(cases)}
    # rarest class first; images without classes last
    cases.sort(key=lambda c: (min((frequency[x] for x in table[c]), default=len(table) + 1), order[c]))
    folds: list[list[str]] = [[] for _ in range(k)]
    for c in sorted(kept):
        folds[kept[c]].append(c)
    fold_order = list(range(k))
    rng.shuffle(fold_order)
    if kept:  # the larger kept folds take the sizes rounded up, so that no kept image has to move
        larger = sorted(range(k), key=lambda f: (-len(folds[f]), fold_order.index(f)))[: len(table) % k]
        capacity = [len(table) // k + (1 if i in larger else 0) for i in range(k)]
    else:
        capacity = [len(cases) // k + (1 if i < len(cases) % k else 0) for i in range(k)]
    for c in cases:
        open_folds = [f for f in fold_order if len(folds[f]) < capacity[f]]
        if not open_folds:  # kept folds above their size (images left the table): the smallest folds
            smallest = min(len(f) for f in folds)
            open_folds = [f for f in fold_order if len(folds[f]) == smallest]
        # fewest images sharing this image's classes (rare classes weigh more), then the emptiest fold
        best = min(
            open_folds,
            key=lambda f: (
                sum(1.0 / frequency[x] for other in folds[f] for x in table[other] & table[c]),
                len(folds[f]) - capacity[f],
                fold_order.index(f),
            ),
        )
        folds[best].append(c)
    _repair(folds, table, rng, fixed=set(kept))
    return [{"train": sorted(x for j, f in enumerate(folds) if j != i for x in f), "val": sorted(folds[i])} for i in range(k)]


def _swap(folds: list[list[str]], a: int, b: int, from_a: str, from_b: str) -> None:
    """Move ``from_a`` from fold ``a`` to fold ``b`` and ``from_b`` the other way."""
    folds[a].remove(from_a)
    folds[b].remove(from_b)
    folds[a].append(from_b)
    folds[b].append(from_a)


def _classes_in_one_fold(folds: list[list[str]], table: Mapping[str, frozenset[int]]) -> list[int]:
    """Classes in two or more images whose images all lie in one fold."""
    where: dict[int, set[int]] = {}
    count: dict[int, int] = {}
    for i, fold in enumerate(folds):
        for c in fold:
            for cls in table[c]:
                where.setdefault(cls, set()).add(i)
                count[cls] = count.get(cls, 0) + 1
    return sorted(cls for cls, fs in where.items() if len(fs) < 2 and count[cls] >= 2)


def _repair(
    folds: list[list[str]],
    table: Mapping[str, frozenset[int]],
    rng: random.Random,
    rounds: int = 200,
    fixed: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Swap images between folds until every class in 2+ images is in 2+ folds (sizes stay the same); images in
    ``fixed`` (kept from the previous splits) never move."""
    if len(folds) < 2:
        return
    for _ in range(rounds):
        bad = _classes_in_one_fold(folds, table)
        if not bad:
            return
        before = len(bad)
        cls = bad[0]
        source = next(i for i, f in enumerate(folds) if any(cls in table[c] for c in f))
        movers = [c for c in folds[source] if cls in table[c] and c not in fixed]
        if not movers:
            return  # the class's images were kept in this fold; only new images of it can spread it
        candidates = [(j, other) for j, f in enumerate(folds) if j != source for other in f if other not in fixed]
        rng.shuffle(candidates)
        swapped = False
        for j, other in candidates:
            mover = rng.choice(movers)
            _swap(folds, source, j, mover, other)
            if len(_classes_in_one_fold(folds, table)) < before:
                swapped = True
                break
            _swap(folds, source, j, other, mover)  # undo
        if not swapped:
            return  # no single swap helps; the data do not allow it


def classes_per_fold(splits: list[dict[str, list[str]]], case_classes: Mapping[str, Iterable[int]]) -> list[dict[str, set[int]]]:
    """For each fold, the classes in its training and validation sets."""
    table = {c: set(v) for c, v in case_classes.items()}
    return [
        {part: set().union(*(table[c] for c in split[part])) if split[part] else set() for part in ("train", "val")}
        for split in splits
    ]


def check_splits(splits: list[dict[str, list[str]]], case_classes: Mapping[str, Iterable[int]]) -> list[str]:
    """Problems with ``splits`` (empty when it follows the rule as far as the data allow)."""
    problems = []
    table = {c: set(v) for c, v in case_classes.items()}
    val = [c for s in splits for c in s["val"]]
    if sorted(val) != sorted(table):
        problems.append("validation sets do not partition the images")
    for i, s in enumerate(splits):
        if set(s["train"]) & set(s["val"]):
            problems.append(f"fold {i}: training and validation overlap")
        if set(s["train"]) | set(s["val"]) != set(table):
            problems.append(f"fold {i}: does not cover every image")
    images_with = {cls: sum(1 for v in table.values() if cls in v) for cls in set().union(*table.values())} if table else {}
    per_fold = classes_per_fold(splits, table)
    for cls, n in sorted(images_with.items()):
        in_val = sum(1 for f in per_fold if cls in f["val"])
        if n >= 2 and in_val < 2:
            problems.append(f"class {cls}: in {n} images but in the validation set of {in_val} fold(s)")
    return problems


def stable_splits(
    case_classes: Mapping[str, Iterable[int]], n_folds: int = 5, seed: int = 0, previous: list[dict[str, list[str]]] | None = None
) -> tuple[list[dict[str, list[str]]], str]:
    """:func:`make_splits` keeping ``previous`` where it can, and a note saying what was done."""
    if previous is None:
        return make_splits(case_classes, n_folds, seed), "fresh splits (no previous splits)"
    k = fold_count(len(case_classes), n_folds)
    if len(previous) > k:
        return (
            make_splits(case_classes, n_folds, seed),
            f"fresh splits: the previous splits have {len(previous)} folds, {k} now (annotated images removed)",
        )
    splits = make_splits(case_classes, n_folds, seed, previous)
    kept = sum(1 for s in previous for c in s["val"] if c in case_classes)
    return splits, (
        f"stable folds: {kept} images kept their fold, {len(case_classes) - kept} new placed"
        + (f", folds {len(previous)}..{k - 1} new" if k > len(previous) else "")
    )


def write_splits(path: Path | str, splits: list[dict[str, list[str]]]) -> None:
    atomic_write_json(path, splits)


def read_splits(path: Path | str) -> list[dict[str, list[str]]]:
    return read_json(path)
