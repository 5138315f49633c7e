"""Class-aware k-fold splits: every class in two or more validation folds where the data allow, seeded."""

from __future__ import annotations

import json
import random

import pytest

from ActiveLearning3DLib.nnunet.splits import (
    SplitError,
    check_splits,
    classes_per_fold,
    fold_count,
    make_splits,
    read_splits,
    write_splits,
)


def _table(n: int, seed: int) -> dict[str, set[int]]:
    """n images; class 1 common, class 2 in a few, class 3 in exactly two images, class 4 in one image."""
    rng = random.Random(seed)
    table = {f"case_{i:03d}": {0} for i in range(n)}
    names = sorted(table)
    for c in names:
        if rng.random() < 0.7:
            table[c].add(1)
    for c in rng.sample(names, 4):
        table[c].add(2)
    for c in rng.sample(names, 2):
        table[c].add(3)
    table[rng.choice(names)].add(4)
    return table


@pytest.mark.parametrize("seed", range(10))
def test_every_class_in_two_or_more_validation_folds_and_every_training_split(seed):
    table = _table(23, seed)
    splits = make_splits(table, 5, seed=seed)
    assert len(splits) == 5 and check_splits(splits, table) == []
    per_fold = classes_per_fold(splits, table)
    for cls in (0, 1, 2, 3):  # in two or more images: in >= 2 validation sets, so in every training set
        assert sum(cls in f["val"] for f in per_fold) >= 2
        assert all(cls in f["train"] for f in per_fold)
    assert sum(4 in f["val"] for f in per_fold) == 1  # one image: the data do not allow more
    sizes = sorted(len(s["val"]) for s in splits)
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 23
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and sorted(s["train"] + s["val"]) == sorted(table)


def test_rare_classes_are_spread_even_when_a_naive_split_would_not():
    # class 2 only in the first two images by name: sorted / contiguous folds would put both in one fold
    table = {f"c{i}": {0, 1} for i in range(10)}
    table["c0"].add(2)
    table["c1"].add(2)
    for seed in range(20):
        assert check_splits(make_splits(table, 5, seed), table) == []


def test_seeded_and_reproducible():
    table = _table(17, 1)
    assert make_splits(table, 5, seed=4) == make_splits(dict(reversed(list(table.items()))), 5, seed=4)
    different = {json.dumps(make_splits(table, 5, seed=s)) for s in range(6)}
    assert len(different) > 1


def test_fewer_images_than_folds_gives_leave_one_out_and_one_image_is_an_error():
    table = {"a": {0, 1}, "b": {0, 1}, "c": {0, 2}}
    splits = make_splits(table, 5, seed=0)
    assert len(splits) == 3 and sorted(len(s["val"]) for s in splits) == [1, 1, 1]
    assert fold_count(4) == 4 and fold_count(12) == 5 and fold_count(12, 3) == 3
    with pytest.raises(SplitError, match="at least 2 images"):
        make_splits({"a": {0, 1}}, 5)
    with pytest.raises(SplitError):
        make_splits({}, 5)


def test_written_in_nnunet_format(tmp_path):
    table = _table(8, 0)
    splits = make_splits(table, 5, seed=0)
    path = tmp_path / "splits_final.json"
    write_splits(path, splits)
    data = json.loads(path.read_text())
    assert isinstance(data, list) and set(data[0]) == {"train", "val"} and read_splits(path) == splits
    assert all(isinstance(c, str) for s in data for part in s.values() for c in part)
