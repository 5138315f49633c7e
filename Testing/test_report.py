"""The report's Dice-against-budget plot on a study that is still running (records written by hand, no training)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ActiveLearning3DLib.fileio import atomic_write_json  # noqa: E402
from ActiveLearning3DLib.report import (
    SettingResults,
    draw_dice_vs_boxes,
    start_comparisons,  # noqa: E402
    write_report,
)

LOOPS = 3


def _study(root: Path, dice: dict[tuple[str, int], list[float]], start: str = "nnactive_start", budget: int = 60) -> Path:
    """A simulation folder with the records of ``dice[(method, seed)]`` (one value per finished loop)."""
    methods = list(dict.fromkeys(m for m, _ in dice))
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        root / "simulation.json",
        {
            "settings": {
                "methods": methods,
                "seeds": sorted({s for _, s in dice}),
                "loops": LOOPS,
                "images": "data/imagesTr",
                "budget": budget,
                "start": start,
            },
            "budget": budget,
            "budget_rule": "given",
            "query_size": 20,
            "profile_tag": "test",
            "patch_size": [20, 20, 20],
            "pool_cases": 10,
            "test_cases": 4,
            "profile": {"name": "test"},
            "versions": {},
        },
    )
    for (method, seed), values in dice.items():
        (root / "results" / method / f"seed_{seed}").mkdir(parents=True)
        for loop, value in enumerate(values):
            atomic_write_json(
                root / "results" / method / f"seed_{seed}" / f"loop_{loop:03d}.json",
                {
                    "method": method,
                    "seed": seed,
                    "loop": loop,
                    "boxes": 20 * (loop + 1),
                    "annotated_voxels": 0,
                    "foreground_voxels": 0,
                    "foreground_fraction": 0.05 * (loop + 1),
                    "mean_dice": value,
                    "per_class": {},
                    "seconds": {},
                },
            )
    return root


def _lines(setting: SettingResults) -> dict[str, tuple[list, list, str]]:
    fig, ax = plt.subplots()
    draw_dice_vs_boxes(ax, setting)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()) for line in ax.get_lines()}
    plt.close(fig)
    return lines


def test_finished_seeds_are_averaged_and_running_ones_drawn_with_their_loops_so_far(tmp_path):
    setting = SettingResults(
        _study(
            tmp_path,
            {
                ("random", 0): [0.5, 0.6, 0.7],
                ("random", 1): [0.7, 0.8, 0.9],  # finished
                ("clasp_pe", 0): [0.5, 0.65],  # still going
            },
        )
    )
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
    assert set(_lines(SettingResults(run))) == {
        "random_fg66 seed 0, running (2 of 3 loops)",
        "clasp_pe seed 0, running (1 of 3 loops)",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend would warn
        page = write_report([run], tmp_path / "report")
    assert (tmp_path / "report" / "setting1_dice_vs_boxes.png").stat().st_size > 5000
    assert "dashed: a run still going" in page.read_text()


def test_each_per_loop_row_names_the_seeds_it_averages(tmp_path):
    setting = SettingResults(
        _study(tmp_path, {("clasp_pe", 0): [0.5, 0.6, 0.7], ("clasp_pe", 1): [0.7, 0.8], ("clasp_pe", 2): [0.6]})
    )
    table = setting.loop_table()
    rows = {row[1]: dict(zip(table.header, row)) for row in table.rows}
    assert [rows[t]["seeds"] for t in ("0", "1", "2")] == ["seeds 0, 1, 2", "seeds 0, 1", "seed 0"]
    assert rows["1"]["Mean Dice"] == "70.0 ± 14.1" and rows["2"]["Mean Dice"] == "70.0"


def _cold_start(root: Path, random_seeds: dict[int, list[float]]) -> list[Path]:
    """The cold-start benchmark's folders: one per start, each followed by ``clasp_pe``; one of another budget."""
    fg33 = {0: [0.80, 0.82, 0.84], 1: [0.78, 0.81, 0.83], 2: [0.79, 0.80, 0.86]}
    return [
        _study(root / "fg33", {("clasp_pe", k): v for k, v in fg33.items()}, start="random_fg33"),
        _study(root / "cscs", {("clasp_pe", k): [x - 0.05 + 0.001 * k for x in v] for k, v in fg33.items()}, start="cscs"),
        _study(root / "random", {("clasp_pe", k): v for k, v in random_seeds.items()}, start="random"),
        _study(root / "other", {("clasp_pe", 0): [0.5, 0.6, 0.7]}, start="cluster", budget=80),
    ]


def test_folders_differing_only_in_their_start_are_compared_by_start(tmp_path):
    folders = _cold_start(tmp_path, {0: [0.60], 1: [0.62, 0.70]})  # random: still going
    [comparison] = start_comparisons([SettingResults(f) for f in folders])  # the other budget stays out
    assert [label for _, _, label in comparison.runs] == ["random_fg33", "cscs", "random"]
    table = comparison.table()
    rows = {row[0]: dict(zip(table.header, row)) for row in table.rows}
    assert set(rows) == {"random_fg33", "cscs", "random"} and all(r["then"] == "clasp_pe" for r in rows.values())
    assert rows["random_fg33"]["Mean Dice after loop 0"] == "79.0 ± 1.0"
    assert rows["random_fg33"]["seeds after loop 0"] == "seeds 0, 1, 2" and rows["random_fg33"]["Final Dice"] == "84.3 ± 1.5"
    assert rows["random_fg33"]["AUBC"] == "81.3 ± 0.6"  # 82.0, 80.75, 81.25
    assert rows["random"]["seeds after loop 0"] == "seeds 0, 1" and rows["random"]["seeds with every loop"] == "none"
    assert rows["random"]["Mean Dice after loop 0"] == "61.0 ± 1.4"
    assert rows["random"]["AUBC"] == rows["random"]["Final Dice"] == "n/a"
    assert comparison.penalty_matrix() is None  # `random` has finished no seed


def test_the_report_compares_the_starts_with_a_plot_and_their_penalty_matrix(tmp_path):
    folders = _cold_start(tmp_path / "runs", {k: [0.70, 0.72, 0.74 + 0.001 * k] for k in range(3)})
    [comparison] = start_comparisons([SettingResults(f) for f in folders])
    ppm = comparison.penalty_matrix()
    fg33, cscs, rand = (ppm.methods.index(m) for m in ("random_fg33", "cscs", "random"))
    assert ppm.matrix[fg33, cscs] == 1.0 and ppm.matrix[cscs, fg33] == 0.0  # 5 points ahead at every loop, every seed
    assert ppm.matrix[cscs, rand] == 1.0 and ppm.matrix[rand, fg33] == 0.0
    page = write_report(folders, tmp_path / "report").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert re.findall(r"^## Starting budgets compared: (.*)$", md, re.M) == ["data, budget 60 boxes (60), 3 loops, profile test"]
    assert "### Per starting budget" in md and "| cscs | clasp_pe | seeds 0, 1, 2 | 74.1 ± 1.0 |" in md
    assert "start cscs" in md and "start cluster" in md
    assert "Pairwise penalty matrix between starting budgets" in page
    assert (tmp_path / "report" / "starts1_dice_vs_boxes.png").stat().st_size > 5000
    assert (tmp_path / "report" / "starts1_penalty_matrix.png").is_file()


def test_a_single_start_gives_no_comparison(tmp_path):
    run = _study(tmp_path / "run", {("random", 0): [0.5, 0.6, 0.7]})
    assert start_comparisons([SettingResults(run), SettingResults(run)]) == []
    write_report([run], tmp_path / "report")
    assert "Starting budgets compared" not in (tmp_path / "report" / "report.md").read_text()
    assert not list((tmp_path / "report").glob("starts*"))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
