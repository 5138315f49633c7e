"""The report's Dice-against-budget plot on a study that is still running (records written by hand, no training)."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ActiveLearning3DLib.fileio import atomic_write_json  # noqa: E402
from ActiveLearning3DLib.report import SettingResults, draw_dice_vs_boxes, write_report  # noqa: E402

LOOPS = 3


def _study(root: Path, dice: dict[tuple[str, int], list[float]]) -> Path:
    """A simulation folder with the records of ``dice[(method, seed)]`` (one value per finished loop)."""
    methods = list(dict.fromkeys(m for m, _ in dice))
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "simulation.json", {
        "settings": {"methods": methods, "seeds": sorted({s for _, s in dice}), "loops": LOOPS, "images": "data/imagesTr",
                     "budget": 60, "start": "nnactive_start"},
        "budget": 60, "budget_rule": "given", "query_size": 20, "profile_tag": "test", "patch_size": [20, 20, 20], "pool_cases": 10,
        "test_cases": 4, "profile": {"name": "test"}, "versions": {}})
    for (method, seed), values in dice.items():
        (root / "results" / method / f"seed_{seed}").mkdir(parents=True)
        for loop, value in enumerate(values):
            atomic_write_json(root / "results" / method / f"seed_{seed}" / f"loop_{loop:03d}.json", {
                "method": method, "seed": seed, "loop": loop, "boxes": 20 * (loop + 1), "annotated_voxels": 0,
                "foreground_voxels": 0, "foreground_fraction": 0.05 * (loop + 1), "mean_dice": value,
                "per_class": {}, "seconds": {}})
    return root


def _lines(setting: SettingResults) -> dict[str, tuple[list, list, str]]:
    fig, ax = plt.subplots()
    draw_dice_vs_boxes(ax, setting)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
             for line in ax.get_lines()}
    plt.close(fig)
    return lines


def test_finished_seeds_are_averaged_and_running_ones_drawn_with_their_loops_so_far(tmp_path):
    setting = SettingResults(_study(tmp_path, {
        ("random", 0): [0.5, 0.6, 0.7], ("random", 1): [0.7, 0.8, 0.9],  # finished
        ("clasp_pe", 0): [0.5, 0.65],  # still going
    }))
    lines = _lines(setting)
    assert set(lines) == {"random (2 seeds)", "clasp_pe seed 0, running (2 of 3 loops)"}
    x, y, style = lines["random (2 seeds)"]
    assert x == [20, 40, 60] and np.allclose(y, [60, 70, 80]) and style == "-"
    x, y, style = lines["clasp_pe seed 0, running (2 of 3 loops)"]
    assert x == [20, 40] and np.allclose(y, [50, 65]) and style == "--"


def test_one_finished_seed_is_labelled_in_the_singular(tmp_path):
    setting = SettingResults(_study(tmp_path, {("random_fg66", 0): [0.80, 0.81, 0.82], ("clasp_pe", 0): [0.80]}))
    assert "random_fg66 (1 seed)" in _lines(setting)


def test_a_report_of_a_study_with_no_finished_seed_still_plots_its_loops(tmp_path):
    run = _study(tmp_path / "run", {("random_fg66", 0): [0.80, 0.81], ("clasp_pe", 0): [0.80]})
    assert set(_lines(SettingResults(run))) == {"random_fg66 seed 0, running (2 of 3 loops)",
                                                "clasp_pe seed 0, running (1 of 3 loops)"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend would warn
        page = write_report([run], tmp_path / "report")
    assert (tmp_path / "report" / "setting1_dice_vs_boxes.png").stat().st_size > 5000
    assert "dashed: a run still going" in page.read_text()


def test_each_per_loop_row_names_the_seeds_it_averages(tmp_path):
    setting = SettingResults(_study(tmp_path, {
        ("clasp_pe", 0): [0.5, 0.6, 0.7], ("clasp_pe", 1): [0.7, 0.8], ("clasp_pe", 2): [0.6]}))
    table = setting.loop_table()
    rows = {row[1]: dict(zip(table.header, row)) for row in table.rows}
    assert [rows[t]["seeds"] for t in ("0", "1", "2")] == ["0, 1, 2", "0, 1", "0"]
    assert rows["1"]["Mean Dice"] == "70.0 ± 14.1" and rows["2"]["Mean Dice"] == "70.0"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
