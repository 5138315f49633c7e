"""Pre-filled boxes in the panel's controller against real MRML nodes (``slicer-core``), without the desktop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

from conftest import make_dataset  # noqa: E402

from ActiveLearning3DLib.gui import AnnotationController  # noqa: E402
from ActiveLearning3DLib.gui import mrml  # noqa: E402
from ActiveLearning3DLib.gui.headless import headless_slicer  # noqa: E402
from ActiveLearning3DLib.nnunet.paths import NnunetPaths  # noqa: E402
from ActiveLearning3DLib.prefill import write_pool_prediction  # noqa: E402

SHAPE = (20, 24, 22)
PATCH = (6, 8, 5)


def _controller(tmp_path: Path) -> AnnotationController:
    data = make_dataset(tmp_path / "source", n_cases=4, shape=SHAPE, spacing=(0.8, 1.25, 2.0), origin=(12.0, -30.0, 7.5))
    return AnnotationController.create_project(
        headless_slicer(), tmp_path / "project", data.images, data.labels, patch_size=PATCH, query_size=3, test_fraction=0.25
    )


def _with_model_and_loop1(c: AnnotationController) -> np.ndarray:
    """Loop 0 annotated, a loop-0 model's prediction stored for every pool image, loop 1 queried; the prediction."""
    c.logic.annotate_with_oracle()
    predicted = np.random.default_rng(5).integers(0, 3, size=SHAPE).astype(np.uint8)
    folder = NnunetPaths.for_project(c.logic.project).results_root / "loop_000_test_abcd" / "pool_prediction"
    for case in c.logic.project.pool_cases:
        write_pool_prediction(folder, case, predicted, c.logic.project.read_image(case))
    c.logic.query("random", 2, seed=4)
    return predicted


def test_a_box_opens_prefilled_inside_only_and_untouched_submits_record_no_corrections(tmp_path):
    c = _controller(tmp_path)
    predicted = _with_model_and_loop1(c)
    record = c.go_to_box(c.table()[0].id)
    assert record.loop == 1 and c.prefill_shown
    painted = c.painted_labels()
    inside = np.zeros(SHAPE, bool)
    inside[record.box.slices] = True
    np.testing.assert_array_equal(painted[inside], predicted[inside])
    assert not painted[~inside].any()  # the prediction outside the box is not shown
    c.submit(advance=False, seconds=30.0)
    effort = c.logic.find_box(record.id).effort
    assert effort["prefill_shown"] and effort["corrected"] == 0
    assert effort["prefill_dice"] == {"1": 1.0, "2": 1.0}
    assert c.effort()["corrected_voxels"] == 0 and c.effort()["seconds"] == 30.0
    assert "corrected 0 of" in c.effort_text() and "pre-fill Dice 1.000" in c.effort_text()


def test_corrections_painted_over_the_prefill_are_counted(tmp_path):
    c = _controller(tmp_path)
    predicted = _with_model_and_loop1(c)
    record = c.go_to_box(c.table()[0].id)
    box = predicted[record.box.slices]
    twos = np.zeros(SHAPE, bool)
    twos[record.box.slices] = box > 0  # every class-1 voxel of the pre-fill made class 2 (segment 1 emptied)
    mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, np.zeros(SHAPE, bool), c.grid)
    mrml.paint_segment(c.ctx, c.annotation, c.volume, 2, twos, c.grid)
    c.submit(advance=False)
    effort = c.logic.find_box(record.id).effort
    assert effort["relabelled"] == int((box == 1).sum()) == effort["corrected"]
    assert effort["added"] == effort["removed"] == 0
    assert effort["prefill_dice"]["1"] == 0.0
    assert effort["prefill_dice"]["2"] == pytest.approx(2 * (box == 2).sum() / ((box == 2).sum() + (box > 0).sum()), abs=1e-6)


def test_prefill_setting_off_opens_empty_and_loop0_boxes_open_empty(tmp_path):
    c = _controller(tmp_path)
    loop0 = c.go_to_box(c.table()[0].id)
    assert loop0.loop == 0 and not c.prefill_shown and not c.painted_labels().any()  # no model yet
    _with_model_and_loop1(c)
    c.save_settings(prefill=False)
    record = c.go_to_box(c.table()[0].id)
    assert record.loop == 1 and not c.prefill_shown and not c.painted_labels().any()
    paint = np.zeros(SHAPE, bool)
    paint[record.box.slices] = True
    mrml.paint_segment(c.ctx, c.annotation, c.volume, 1, paint, c.grid)
    c.submit(advance=False)
    effort = c.logic.find_box(record.id).effort
    assert not effort["prefill_shown"] and effort["added"] == effort["corrected"] == record.box.voxels
    assert effort["prefill_dice"] is not None  # the prediction existed: its Dice is still recorded
    assert AnnotationController.open_project(c.ctx, c.logic.project.path).settings.prefill is False
