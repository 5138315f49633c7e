"""Model-free simulation: starting budget, foreground-aware random queries and the oracle, with a summary.

This is what ``make demo`` runs until nnU-Net training lands; it drives the same
:class:`ActiveLearningLogic` as the GUI, with the oracle standing in for the
annotator. It resumes: run again with the same output folder and finished loops
are kept, pending boxes are annotated, and the missing loops are queried.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from . import __version__
from .default_data import resolve_default_data
from .fileio import atomic_write_json, atomic_write_text
from .logic import ActiveLearningLogic
from .project import BudgetSettings
from .query_methods import get_method
from .query_methods.base import no_progress


@dataclass
class DemoSettings:
    """A small simulation: the starting budget (loop 0) and ``loops - 1`` model-free queries."""

    loops: int = 3
    query_size: int = 20
    seed: int = 0
    max_cases: int | None = None
    method: str = "random_fg66"
    start: str = "nnactive_start"


def run_demo(
    out: Path,
    settings: DemoSettings,
    env: Mapping[str, str],
    start_dir: Path,
    progress: Callable[[Iterable, str], Iterable] = no_progress,
    echo: Callable[[str], None] = lambda s: None,
) -> Path:
    """Run (or resume) the demo simulation into ``out`` and return the path of its Markdown summary."""
    if get_method(settings.method).needs_model:
        raise ValueError(f"the demo runs model-free methods only; {settings.method!r} needs a model")
    out = Path(out).absolute()
    project_dir = out / "project"
    data = resolve_default_data(env, start_dir, out / "phantoms", settings.seed)
    echo(f"data: {data.name} ({data.origin}) images {data.images}")
    if (project_dir / "project.json").is_file():
        logic = ActiveLearningLogic.open(project_dir)
        echo(f"resuming {project_dir}")
    else:
        started = time.perf_counter()
        logic = ActiveLearningLogic.create(
            project_dir, data.images, data.labels, seed=settings.seed, max_cases=settings.max_cases,
            budget=BudgetSettings(query_size=settings.query_size, loops=settings.loops), progress=progress,
        )
        echo(f"created {project_dir} in {time.perf_counter() - started:.1f} s")
    echo(str(logic.status()))
    for loop in range(settings.loops):
        if loop not in logic.project.loop_indices():
            method = settings.start if loop == 0 else settings.method
            loop_file = logic.query(method, settings.query_size, settings.seed, progress=progress)
            echo(f"loop {loop}: {len(loop_file.boxes)} boxes by {method} in {loop_file.info['seconds']:.2f} s")
        logic.annotate_with_oracle(progress=progress)
    rows = summarise(logic)
    summary = {"version": __version__, "data": {"name": data.name, "origin": data.origin, "images": str(data.images)},
               "settings": asdict(settings), "status": logic.status().to_json(), "loops": rows}
    atomic_write_json(out / "summary.json", summary)
    markdown = summary_markdown(summary)
    atomic_write_text(out / "summary.md", markdown)
    echo(markdown)
    return out / "summary.md"


def summarise(logic: ActiveLearningLogic) -> list[dict]:
    """Per loop: boxes, cumulative annotated voxels, and the share of pool foreground inside annotated boxes."""
    rows = []
    p = logic.project
    total_fg = p.pool_foreground_voxels
    fg_inside = 0
    voxels = 0
    gt_cache: dict[str, np.ndarray] = {}
    for loop in p.loops():
        boxes_with_fg = 0
        for b in loop.boxes:
            if b.state != "annotated":
                continue
            if b.case not in gt_cache:
                gt_cache[b.case] = p.read_ground_truth(b.case)
            fg = int(np.count_nonzero(gt_cache[b.case][b.box.slices]))
            fg_inside += fg
            boxes_with_fg += fg > 0
            voxels += b.box.voxels
        rows.append({
            "loop": loop.loop, "method": loop.method, "boxes": len(loop.boxes), "annotated_voxels": voxels,
            "foreground_fraction": fg_inside / total_fg if total_fg else None, "boxes_with_foreground": boxes_with_fg,
        })
    return rows


def summary_markdown(summary: dict) -> str:
    s = summary["status"]
    lines = [
        f"# ActiveLearning3D demo ({summary['version']})",
        "",
        f"Data: {summary['data']['name']} ({summary['data']['origin']}), {s['pool_cases']} pool / {s['test_cases']} test "
        f"cases, patch {' x '.join(map(str, s['patch_size']))}.",
        "Model-free simulation: the oracle copies the ground truth into each queried box. "
        "No model is trained yet, so there is no Dice here.",
        "",
        "| loop | method | boxes | boxes with foreground | annotated voxels (cumulative) | pool foreground annotated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["loops"]:
        frac = "n/a" if r["foreground_fraction"] is None else f"{100 * r['foreground_fraction']:.2f} %"
        lines.append(f"| {r['loop']} | {r['method']} | {r['boxes']} | {r['boxes_with_foreground']} | "
                     f"{r['annotated_voxels']} | {frac} |")
    return "\n".join(lines) + "\n"
