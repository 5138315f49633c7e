"""Known-answer tests for ActiveLearning3DLib.uncertainty (docs/METHODS.md section 3: PE, EE, BALD, U_c)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ActiveLearning3DLib.uncertainty import (
    EnsembleAccumulator,
    FolderProbabilities,
    MemoryProbabilities,
    ensemble_maps,
    entropy,
    needs_expected_entropy,
)

LOG2 = math.log(2.0)


def _voxel(*probs: float) -> np.ndarray:
    """One voxel's class probabilities as a (C, 1, 1, 1) member array."""
    return np.array(probs, dtype=np.float32).reshape(-1, 1, 1, 1)


def _maps(members: list[np.ndarray], need_ee: bool = True):
    acc = EnsembleAccumulator(need_expected_entropy=need_ee)
    for i, p in enumerate(members):
        acc.add(p, f"member{i}")
    return acc.result()


def _reference(stack: np.ndarray) -> dict[str, np.ndarray]:
    """PE, EE, BALD and p̄ straight from the definitions, on a stacked (M, C, Z, Y, X) float64 array."""
    stack = stack.astype(np.float64)

    def h(p: np.ndarray, axis: int) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p), 0.0)
        return -terms.sum(axis=axis)

    mean = stack.mean(axis=0)
    pe = h(mean, 0)
    ee = h(stack, 1).mean(axis=0)
    return {"mean": mean, "pe": pe, "ee": ee, "bald": pe - ee}


def _random_members(rng: np.random.Generator, m: int, c: int, shape: tuple[int, int, int]) -> np.ndarray:
    raw = rng.gamma(0.5, size=(m, c, *shape))  # Dirichlet(0.5): many near-certain voxels, some uncertain
    raw[:, :, 0, 0, 0] = 0.0
    raw[:, 0, 0, 0, 0] = 1.0  # one voxel where every member is certain of class 0 (exact zeros elsewhere)
    return (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------
# entropy and the hand-computed maps
# ---------------------------------------------------------------------------


def test_entropy_hand_values_and_zero_log_zero():
    assert entropy(np.array([0.25, 0.25, 0.25, 0.25])) == pytest.approx(math.log(4.0), rel=1e-6)
    assert entropy(np.array([1.0, 0.0, 0.0])) == 0.0  # 0 log 0 = 0, no NaN
    assert entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(LOG2, rel=1e-6)
    p = np.array([[0.1, 1.0], [0.9, 0.0]])  # channels on axis 0, two voxels
    expected = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    np.testing.assert_allclose(entropy(p, axis=0), [expected, 0.0], rtol=1e-6)
    assert np.isfinite(entropy(np.zeros((3, 4)))).all()


def test_disagreeing_certain_members_pe_log2_ee_zero_bald_log2():
    maps = _maps([_voxel(1.0, 0.0), _voxel(0.0, 1.0)])
    assert maps.members == 2
    np.testing.assert_allclose(maps.mean[:, 0, 0, 0], [0.5, 0.5])
    assert maps.predictive_entropy()[0, 0, 0] == pytest.approx(LOG2, rel=1e-6)
    assert maps.map("ee")[0, 0, 0] == 0.0
    assert maps.bald()[0, 0, 0] == pytest.approx(LOG2, rel=1e-6)
    # U_c = PE * p̄_c
    assert maps.class_weighted(1)[0, 0, 0] == pytest.approx(LOG2 / 2, rel=1e-6)
    assert maps.map("class_0")[0, 0, 0] == pytest.approx(LOG2 / 2, rel=1e-6)


def test_identical_members_have_zero_bald():
    p = _voxel(0.2, 0.3, 0.5)
    h = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    maps = _maps([p, p.copy(), p.copy()])
    assert maps.predictive_entropy()[0, 0, 0] == pytest.approx(h, rel=1e-6)
    assert maps.expected_entropy[0, 0, 0] == pytest.approx(h, rel=1e-6)
    assert maps.map("bald")[0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    assert maps.bald()[0, 0, 0] >= 0.0  # never negative through rounding


def test_uniformly_uncertain_members_vs_disagreeing_members():
    # Both voxels have PE = log 2; only the disagreeing one has BALD > 0.
    a = np.concatenate([_voxel(0.5, 0.5), _voxel(1.0, 0.0)], axis=1)
    b = np.concatenate([_voxel(0.5, 0.5), _voxel(0.0, 1.0)], axis=1)
    maps = _maps([a, b])
    np.testing.assert_allclose(maps.predictive_entropy()[:, 0, 0], [LOG2, LOG2], rtol=1e-6)
    np.testing.assert_allclose(maps.expected_entropy[:, 0, 0], [LOG2, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(maps.bald()[:, 0, 0], [0.0, LOG2], rtol=1e-6, atol=1e-6)


def test_zero_probabilities_give_finite_maps():
    maps = _maps([_voxel(1.0, 0.0, 0.0), _voxel(1.0, 0.0, 0.0)])
    for name in ("pe", "ee", "bald", "class_1", "class_2"):
        value = maps.map(name)[0, 0, 0]
        assert np.isfinite(value) and value == 0.0, name


# ---------------------------------------------------------------------------
# streaming against a direct computation
# ---------------------------------------------------------------------------


def test_streaming_equals_direct_numpy_and_is_order_independent():
    rng = np.random.default_rng(7)
    stack = _random_members(rng, 5, 3, (4, 5, 6))
    ref = _reference(stack)
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        maps = _maps([stack[i] for i in order])
        assert maps.mean.dtype == np.float32 and maps.mean.shape == (3, 4, 5, 6)
        np.testing.assert_allclose(maps.mean, ref["mean"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(maps.map("pe"), ref["pe"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(maps.map("ee"), ref["ee"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(maps.map("bald"), np.maximum(ref["bald"], 0), rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(maps.map("class_2"), ref["pe"] * ref["mean"][2], rtol=1e-5, atol=1e-6)
        results.append(maps.map("pe"))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0], results[2], rtol=1e-6, atol=1e-7)
    assert results[0][0, 0, 0] == 0.0  # the certain voxel


def test_float16_members():
    rng = np.random.default_rng(3)
    stack16 = _random_members(rng, 4, 2, (3, 4, 5)).astype(np.float16)
    ref = _reference(stack16.astype(np.float64))  # what the float16 values mean exactly
    maps = _maps(list(stack16))
    assert maps.mean.dtype == np.float32
    assert maps.predictive_entropy().dtype == np.float32
    np.testing.assert_allclose(maps.mean, ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.map("pe"), ref["pe"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.map("ee"), ref["ee"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.map("bald"), np.maximum(ref["bald"], 0), atol=2e-5)


def test_pe_only_accumulation_skips_expected_entropy():
    maps = _maps([_voxel(1.0, 0.0), _voxel(0.0, 1.0)], need_ee=False)
    assert maps.expected_entropy is None
    with pytest.raises(ValueError, match="expected entropy"):
        maps.bald()
    with pytest.raises(ValueError, match="expected entropy"):
        maps.map("ee")
    assert needs_expected_entropy(["pe", "class_1"]) is False
    assert needs_expected_entropy(["pe", "bald"]) is True
    assert needs_expected_entropy(["ee"]) is True


def test_accumulator_errors_name_the_member():
    acc = EnsembleAccumulator()
    acc.add(np.full((2, 3, 3, 3), 0.5, dtype=np.float32), "fold_0")
    with pytest.raises(ValueError, match="fold_1") as e:
        acc.add(np.full((2, 3, 3, 4), 0.5, dtype=np.float32), "fold_1")
    assert "(2, 3, 3, 4)" in str(e.value) and "(2, 3, 3, 3)" in str(e.value)
    with pytest.raises(ValueError, match="fold_2"):
        acc.add(np.full((3, 3, 3), 0.5, dtype=np.float32), "fold_2")  # not (classes, Z, Y, X)
    with pytest.raises(ValueError, match="no ensemble member"):
        EnsembleAccumulator().result()
    maps = acc.result()
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        maps.map("variance")


# ---------------------------------------------------------------------------
# probability sources
# ---------------------------------------------------------------------------


def test_memory_probabilities_ensemble_maps_and_errors():
    rng = np.random.default_rng(11)
    stack = _random_members(rng, 3, 3, (2, 3, 4))
    source = MemoryProbabilities({f"m{i}": {"case": stack[i]} for i in range(3)})
    maps = ensemble_maps(source, "case", (2, 3, 4), 3, ["pe", "bald"])
    ref = _reference(stack)
    np.testing.assert_allclose(maps.map("bald"), np.maximum(ref["bald"], 0), rtol=1e-4, atol=2e-6)
    assert maps.members == 3

    with pytest.raises(ValueError, match="'other'"):
        ensemble_maps(source, "other", (2, 3, 4), 3, ["pe"])
    bad = MemoryProbabilities({"m0": {"case": stack[0]}, "m1": {"case": stack[1][:, :, :, :3]}})
    with pytest.raises(ValueError, match="'m1'") as e:
        ensemble_maps(bad, "case", (2, 3, 4), 3, ["pe"])
    assert "(3, 2, 3, 4)" in str(e.value)  # the expected shape is named
    with pytest.raises(ValueError, match="classes"):
        ensemble_maps(source, "case", (2, 3, 4), 2, ["pe"])  # wrong number of classes
    ints = MemoryProbabilities({"m0": {"case": np.zeros((3, 2, 3, 4), dtype=np.int64)}})
    with pytest.raises(ValueError, match="floating point"):
        ensemble_maps(ints, "case", (2, 3, 4), 3, ["pe"])
    with pytest.raises(ValueError, match="no ensemble members"):
        ensemble_maps(MemoryProbabilities({}), "case", (2, 3, 4), 3, ["pe"])


def test_folder_probabilities_npy_and_npz(tmp_path):
    rng = np.random.default_rng(5)
    stack = _random_members(rng, 2, 2, (3, 4, 5))
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_1").mkdir()
    (tmp_path / ".hidden").mkdir()
    np.save(tmp_path / "fold_0" / "hippo_001.npy", stack[0].astype(np.float16))
    np.savez_compressed(tmp_path / "fold_1" / "hippo_001.npz", probabilities=stack[1])

    source = FolderProbabilities(tmp_path)
    assert source.members() == ["fold_0", "fold_1"]
    assert source.describe("fold_1", "hippo_001").endswith("hippo_001.npz")
    maps = ensemble_maps(source, "hippo_001", (3, 4, 5), 2, ["pe", "bald"])
    ref = _reference(np.stack([stack[0].astype(np.float16).astype(np.float64), stack[1]]))
    np.testing.assert_allclose(maps.map("pe"), ref["pe"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.map("bald"), np.maximum(ref["bald"], 0), atol=2e-5)


def test_folder_probabilities_flat_folder_is_one_member(tmp_path):
    p = np.full((2, 2, 2, 2), 0.5, dtype=np.float32)
    np.save(tmp_path / "c.npy", p)
    source = FolderProbabilities(tmp_path)
    assert source.members() == ["."]
    maps = ensemble_maps(source, "c", (2, 2, 2), 2, ["pe"])
    np.testing.assert_allclose(maps.map("pe"), LOG2, rtol=1e-6)


def test_folder_probabilities_errors_name_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    np.save(tmp_path / "m" / "wrong.npy", np.zeros((2, 3, 3, 2), dtype=np.float32))
    np.savez(tmp_path / "m" / "nokey.npz", softmax=np.zeros((2, 3, 3, 3), dtype=np.float32))
    (tmp_path / "m" / "broken.npy").write_bytes(b"not an array")
    source = FolderProbabilities(tmp_path)

    with pytest.raises(ValueError) as e:
        ensemble_maps(source, "wrong", (3, 3, 3), 2, ["pe"])
    assert "wrong.npy" in str(e.value) and "(2, 3, 3, 2)" in str(e.value)
    with pytest.raises(ValueError) as e:
        ensemble_maps(source, "missing", (3, 3, 3), 2, ["pe"])
    assert "missing" in str(e.value) and str(tmp_path / "m") in str(e.value)
    with pytest.raises(ValueError) as e:
        source.load("m", "nokey")
    assert "nokey.npz" in str(e.value) and "probabilities" in str(e.value)
    with pytest.raises(ValueError, match="broken.npy"):
        source.load("m", "broken")
    with pytest.raises(ValueError, match="does not exist"):
        FolderProbabilities(tmp_path / "nowhere")
