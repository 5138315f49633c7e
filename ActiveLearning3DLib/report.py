"""Simulation reports: one self-contained HTML page and the same tables as Markdown, with matplotlib plots.

For each simulation folder (a setting: dataset, budget, profile):

- per method, mean and standard deviation over seeds of AUBC, Final Dice and
  FG-Eff (the FG-Eff curve is fitted per method over all seeds and loops; it
  needs the full-data reference Dice);
- the pairwise penalty matrix (needs two or more seeds), as a table and a heat
  map, summed over all given settings when there are several;
- Dice against the number of annotated boxes (mean over seeds with a band of
  one standard deviation), Dice against the annotated foreground fraction
  with the fitted FG-Eff curves;
- for a few cases, the boxes each method queried drawn over one slice of the
  image (like nnActive's figures 10 and 12);
- where the records hold each box's corrections against the model's pre-fill
  (:mod:`~ActiveLearning3DLib.prefill`): Dice against the corrected voxels
  beside Dice against boxes, per loop the corrected voxels per box, the
  pre-fill's Dice inside the queried boxes (are the boxes a method picks the
  ones where the model is wrong?) and the annotator minutes that an
  :class:`~ActiveLearning3DLib.prefill.EffortModel` estimates from them.

Folders that differ only in their starting budget (the cold-start benchmark,
one folder per start) are also compared with each other: Dice after loop 0,
AUBC and Final Dice per start, a Dice-against-boxes plot with one line per
start and the penalty matrix between starts.

The PNGs are written beside ``report.md`` and embedded in ``report.html``.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .fileio import atomic_write_text, file_problem, read_json, replacing_file
from .loop_records import LoopRecord, LoopRecordStore
from .metrics import aubc, fg_efficiency, final_dice, pairwise_penalty_matrix, sum_penalty_matrices
from .prefill import EffortModel
from .project import Project
from .simulation import read_reference

METHOD_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("| " + " | ".join("---" for _ in self.header) + " |")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Figure:
    title: str
    path: Path
    caption: str


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd`` (sd over seeds; a single value has none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = scale * float(np.mean(finite))
    if len(finite) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * float(np.std(finite, ddof=1)):.{digits}f}"


def _seed_ids(seeds: Sequence[int]) -> str:
    """Which seeds a row covers, worded so a lone id does not read as a count."""
    seeds = list(seeds)
    if not seeds:
        return "none"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _short(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"


class ReportError(ValueError):
    """A simulation folder a report cannot be made of; the message names the file."""


def _whole(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _header_problem(h) -> str | None:
    """What a report needs of simulation.json that is missing or of the wrong kind, or None."""
    if not isinstance(h, dict):
        return f"expected a JSON object, found {type(h).__name__}"
    s = h.get("settings")
    if not isinstance(s, dict):
        return "no 'settings' object"
    if not isinstance(s.get("methods"), list) or not s["methods"] or not all(isinstance(m, str) for m in s["methods"]):
        return f"settings.methods {s.get('methods')!r}: expected a list of method names"
    if not _whole(s.get("loops"), 1):
        return f"settings.loops {s.get('loops')!r}: expected a whole number of at least 1"
    if not isinstance(s.get("images"), str):
        return f"settings.images {s.get('images')!r}: expected a path"
    for key in ("budget", "budget_rule", "query_size", "profile_tag", "pool_cases", "test_cases"):
        if key not in h:
            return f"no {key!r}"
    if not isinstance(h.get("patch_size"), list) or len(h["patch_size"]) != 3:
        return f"patch_size {h.get('patch_size')!r}: expected three numbers"
    if not isinstance(h.get("profile"), dict) or not isinstance(h.get("versions"), dict):
        return "'profile' and 'versions' must be objects"
    return None


def check_run_dir(run_dir: Path | str) -> None:
    """Raise ReportError naming the file when a simulation folder cannot be reported (before anything is drawn)."""
    run_dir = Path(run_dir)
    header_path = run_dir / "simulation.json"
    if not header_path.is_file():
        raise ReportError(f"{run_dir}: not a simulation folder (no simulation.json)")
    try:
        problem = _header_problem(read_json(header_path))
    except (OSError, ValueError) as e:
        problem = file_problem(e)
    if problem:
        raise ReportError(f"{header_path}: damaged simulation file ({problem})")
    records = LoopRecordStore(run_dir).paths()
    if not records:
        raise ReportError(f"{run_dir}: no loop records in results/ yet (no seed has finished a loop); nothing to report")
    for path in records:
        try:
            LoopRecord.from_json(read_json(path))
            problem = None
        except (OSError, ValueError) as e:
            problem = file_problem(e)
        if problem:
            raise ReportError(f"{path}: damaged loop record ({problem})")


class SettingResults:
    """The records of one simulation folder, arranged per method and seed."""

    def __init__(self, run_dir: Path | str):
        check_run_dir(run_dir)
        self.run_dir = Path(run_dir)
        self.header = read_json(self.run_dir / "simulation.json")
        self.reference = read_reference(self.run_dir, self.header)
        self.records: list[LoopRecord] = LoopRecordStore(self.run_dir).read_all()
        self.methods = [m for m in self.header["settings"]["methods"] if any(r.method == m for r in self.records)]
        self.seeds = sorted({r.seed for r in self.records})
        self.loops = int(self.header["settings"]["loops"])

    @property
    def start(self) -> str:
        return str(self.header["settings"].get("start", "nnactive_start"))

    @property
    def name(self) -> str:
        return self.title(with_start=True)

    def title(self, with_start: bool) -> str:
        """Data, budget, loops and profile; the start too, except where folders are compared by their start."""
        h = self.header
        start = f", start {self.start}" if with_start else ""
        return (
            f"{Path(h['settings']['images']).parent.name or h['settings']['images']}, budget {h['budget']} boxes "
            f"({h['settings']['budget']}), {h['settings']['loops']} loops{start}, profile {h['profile_tag']}"
        )

    @property
    def comparable(self) -> tuple:
        """What two folders share when they differ in their starting budget alone (the cold-start benchmark)."""
        h = self.header
        return self.title(with_start=False), h["test_cases"], h["pool_cases"], tuple(h["patch_size"])

    def loop_records(self, method: str, loop: int, scored: bool = False) -> list[LoopRecord]:
        """The records of one loop of a method, one per seed that finished it, in seed order (``scored``: only
        those with a test Dice)."""
        rows = [r for r in self.records if r.method == method and r.loop == loop and not (scored and r.mean_dice is None)]
        return sorted(rows, key=lambda r: r.seed)

    def outcome(self, method: str) -> tuple[list[int], str, str]:
        """The seeds that finished every loop, and their AUBC and Final Dice as ``mean ± sd``."""
        seeds = self.complete_seeds(method)
        curves = [self.curve(method, s) for s in seeds]
        return seeds, _pm([aubc(c) for c in curves if np.isfinite(c).all()]), _pm([final_dice(c) for c in curves])

    def run_records(self, method: str, seed: int) -> list[LoopRecord]:
        """A run's records so far, in loop order."""
        return sorted((r for r in self.records if r.method == method and r.seed == seed), key=lambda r: r.loop)

    def curve(self, method: str, seed: int, field: str = "mean_dice") -> list[float] | None:
        """A run's values of a record field (mean_dice, foreground_fraction, boxes) per loop, or None while it has
        not finished every loop."""
        rows = self.run_records(method, seed)
        if len(rows) < self.loops:
            return None
        values = [getattr(r, field) for r in rows[: self.loops]]
        return [math.nan if v is None else float(v) for v in values]

    def complete_seeds(self, method: str) -> list[int]:
        return [s for s in self.seeds if self.curve(method, s) is not None]

    def y_full(self) -> float | None:
        value = (self.reference or {}).get("mean_dice")
        return None if value is None else float(value)

    def fg_fit(self, method: str):
        y_full = self.y_full()
        rows = [r for r in self.records if r.method == method and r.mean_dice is not None]
        if y_full is None or len(rows) < 2:
            return None
        try:
            return fg_efficiency([r.foreground_fraction for r in rows], [r.mean_dice for r in rows], y_full)
        except (ValueError, RuntimeError):
            return None

    def penalty_matrix(self):
        """The PPM over the seeds every method finished (None with fewer than two)."""
        seeds = [s for s in self.seeds if all(self.curve(m, s) is not None for m in self.methods)]
        if len(seeds) < 2 or len(self.methods) < 2:
            return None
        dice = {m: np.asarray([self.curve(m, s) for s in seeds]) for m in self.methods}
        if not all(np.isfinite(a).all() for a in dice.values()):
            return None
        return pairwise_penalty_matrix(dice)

    def summary_table(self) -> Table:
        rows = []
        for m in self.methods:
            seeds, aubc_text, final_text = self.outcome(m)
            fit = self.fg_fit(m)
            rows.append(
                [
                    m,
                    str(len(seeds)),
                    aubc_text,
                    final_text,
                    "n/a" if fit is None else f"{fit.gamma:.2f}",
                    _pm([self.curve(m, s, "foreground_fraction")[-1] for s in seeds]),
                ]
            )
        y_full = self.y_full()
        note = (
            f"Mean Dice x 100 on {self.header['test_cases']} test cases, mean ± sd over seeds. Full-data reference "
            f"(same profile, every pool label): {'not available' if y_full is None else f'{100 * y_full:.1f}'}. "
            "FG-Eff = gamma of the saturation fit over all seeds and loops (higher is better)."
        )
        best = max((r.mean_dice for r in self.records if r.mean_dice is not None), default=None)
        if y_full is not None and best is not None and best > y_full:
            note += (
                f" Caution: the full-data reference is below the best active-learning Dice ({100 * best:.1f}), so "
                "the profile's training budget is too short for the full data and FG-Eff is not meaningful here."
            )
        return Table(
            f"Summary: {self.name}",
            ["method", "seeds", "AUBC", "Final Dice", "FG-Eff", "pool foreground annotated (%)"],
            rows,
            note,
        )

    def loop_table(self) -> Table:
        rows = []
        for m in self.methods:
            for t in range(self.loops):
                rs = self.loop_records(m, t)
                if not rs:
                    continue
                seconds = {}
                for r in rs:
                    for k, v in r.seconds.items():
                        if v is not None:
                            seconds.setdefault(k, []).append(v)
                rows.append(
                    [
                        m,
                        str(t),
                        str(rs[0].boxes),
                        _seed_ids(r.seed for r in rs),
                        _pm([r.mean_dice for r in rs]),
                        _pm([r.foreground_fraction for r in rs], digits=2),
                        ", ".join(f"{k} {_short(float(np.mean(v)))}" for k, v in seconds.items()),
                    ]
                )
        return Table(
            "Per loop",
            [
                "method",
                "loop",
                "boxes",
                "seeds",
                "Mean Dice",
                "pool foreground annotated (%)",
                "stage wall time (s, mean over seeds)",
            ],
            rows,
            "Each row averages the seeds that finished that loop (mean ± sd), so while a study runs the "
            "rows of one method can average different seeds.",
        )

    # ------------------------------------------------------------------ effort
    @property
    def has_effort(self) -> bool:
        """Whether the records hold the boxes' corrections (simulations run since pre-filled boxes exist)."""
        return any(r.has_effort for r in self.records)

    def effort_curve(self, method: str, seed: int, field: str = "corrected_voxels") -> list[float] | None:
        """A run's effort total per loop, cumulative (the loop-t model learnt from loops 0..t), or None while it
        has not finished every loop or a loop lacks effort records."""
        rows = self.run_records(method, seed)
        if len(rows) < self.loops or not all(r.has_effort for r in rows):
            return None
        return list(np.cumsum([float(getattr(r.effort, field)) for r in rows[: self.loops]]))

    def effort_table(self, model: EffortModel) -> Table:
        rows = []
        for m in self.methods:
            for t in range(self.loops):
                rs = [r for r in self.loop_records(m, t) if r.has_effort]
                if not rs:
                    continue
                e = [r.effort for r in rs]
                per_box = [x.corrected_voxels / x.boxes_with_effort for x in e]
                painted = [x.foreground_voxels / x.boxes_with_effort for x in e]
                unpainted = [1 - x.corrected_voxels / x.box_voxels for x in e if x.box_voxels]
                saved = [1 - x.corrected_voxels / x.foreground_voxels for x in e if x.foreground_voxels]
                dice = [x.mean_prefill_dice for x in e if x.mean_prefill_dice is not None]
                minutes = [model.seconds(x.corrected_voxels, x.boxes_with_effort) / 60 for x in e]
                empty = [model.seconds(x.foreground_voxels, x.boxes_with_effort) / 60 for x in e]
                shown = sum(x.prefill_shown for x in e)
                rows.append(
                    [
                        m,
                        str(t),
                        _seed_ids(r.seed for r in rs),
                        f"{shown}/{sum(x.boxes_with_effort for x in e)}",
                        _pm(per_box, 1, 0),
                        _pm(painted, 1, 0),
                        _pm(saved, digits=1) if saved else "n/a",
                        _pm(unpainted, digits=1),
                        _pm(dice, digits=1) if dice else "n/a",
                        _pm(minutes, 1, 1),
                        _pm(empty, 1, 1),
                    ]
                )
        note = (
            "Corrected voxels: added, removed and relabelled against the model's pre-fill (loop 0: no model, so "
            "every painted voxel). Painted without pre-fill: the foreground voxels of the same boxes. Saved: the "
            "share of that painting the pre-fill spared; box voxels not painted: 1 - corrected / box voxels. "
            "Pre-fill Dice: mean over the queried boxes and the classes present, x 100. Minutes are ESTIMATES "
            f"from the effort model ({model.describe()}), not measured annotator time; mean ± sd over seeds."
        )
        return Table(
            "Annotation effort per loop",
            [
                "method",
                "loop",
                "seeds",
                "pre-filled boxes",
                "corrected voxels per box",
                "painted per box without pre-fill",
                "painting saved (%)",
                "box voxels not painted (%)",
                "pre-fill Dice in queried boxes",
                "est. minutes",
                "est. minutes without pre-fill",
            ],
            rows,
            note,
        )


class StartComparison:
    """Run folders that differ only in their starting budget, each start then queried by the same method(s).

    The cold-start benchmark (label-free ``cluster``, ``cscs`` and ``random``
    against ``random_fg33``, which peeks at the ground truth) is one folder per
    start; its question is answered across folders: Dice after loop 0 (the
    starting budget alone), then AUBC and Final Dice of the loops after it.
    """

    def __init__(self, settings: Sequence[SettingResults]):
        self.settings = list(settings)
        single = all(len(s.methods) == 1 for s in self.settings)
        self.runs = [(s, m, s.start if single else f"{s.start}, then {m}") for s in self.settings for m in s.methods]

    @property
    def name(self) -> str:
        return self.settings[0].title(with_start=False)

    def table(self) -> Table:
        rows = []
        for s, m, _ in self.runs:
            loop0 = s.loop_records(m, 0, scored=True)
            seeds, aubc_text, final_text = s.outcome(m)
            rows.append(
                [
                    s.start,
                    m,
                    _seed_ids(r.seed for r in loop0),
                    _pm([r.mean_dice for r in loop0]),
                    _pm([r.foreground_fraction for r in loop0], digits=2),
                    _seed_ids(seeds),
                    aubc_text,
                    final_text,
                ]
            )
        return Table(
            "Per starting budget",
            [
                "starting budget",
                "then",
                "seeds after loop 0",
                "Mean Dice after loop 0",
                "pool foreground after loop 0 (%)",
                "seeds with every loop",
                "AUBC",
                "Final Dice",
            ],
            rows,
            "Mean Dice x 100 on the test split, mean ± sd over seeds. Loop 0 is the model trained on the "
            "starting budget alone; AUBC and Final Dice count only the seeds that finished every loop.",
        )

    def penalty_matrix(self):
        """The PPM between starts over the seeds every start finished (None with fewer than two)."""
        seeds = [
            k
            for k in sorted(set.intersection(*(set(s.seeds) for s in self.settings)))
            if all(s.curve(m, k) is not None for s, m, _ in self.runs)
        ]
        if len(seeds) < 2:
            return None
        dice = {label: np.asarray([s.curve(m, k) for k in seeds]) for s, m, label in self.runs}
        if not all(np.isfinite(a).all() for a in dice.values()):
            return None
        return pairwise_penalty_matrix(dice)


def start_comparisons(settings: Sequence[SettingResults]) -> list[StartComparison]:
    """The groups of given folders that share data, split, patch, budget, loops and profile but not their start."""
    groups: dict[tuple, list[SettingResults]] = {}
    for s in settings:
        groups.setdefault(s.comparable, []).append(s)
    return [StartComparison(g) for g in groups.values() if len({s.start for s in g}) > 1]


def penalty_table(ppm, title: str) -> Table:
    rows = [
        [m] + [f"{ppm.matrix[i, j]:.2f}" for j in range(len(ppm.methods))] + [f"{ppm.matrix[:, i].sum():.2f}"]
        for i, m in enumerate(ppm.methods)
    ]
    return Table(
        title,
        ["i beats j"] + ppm.methods + ["beaten (column sum)"],
        rows,
        "Entry (i, j): fraction of budget steps where i beats j (paired t-test over seeds, p < 0.05).",
    )


# ------------------------------------------------------------------------ plots
def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with replacing_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _colours(methods: Sequence[str]) -> dict[str, str]:
    return {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(methods)}


def _finish_dice_plot(fig, ax, setting: SettingResults, path: Path, xlabel: str, title: str) -> None:
    """The full-data line, labels, grid and legend of a Dice plot, then save it."""
    if setting.y_full() is not None:
        ax.axhline(100 * setting.y_full(), color="k", linestyle="--", linewidth=1, label="full data")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test Mean Dice (x 100)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_dice_vs_boxes(setting: SettingResults, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw_dice_vs_boxes(ax, setting)
    _finish_dice_plot(fig, ax, setting, path, "annotated boxes", "Dice against budget (band: ± 1 sd over seeds)")


def draw_dice_vs_boxes(ax, setting: SettingResults) -> None:
    """Per method the mean over the seeds that finished every loop, with a band; a run still going is drawn dashed
    with its loops so far, so the report of a long study shows what has finished."""
    colours = _colours(setting.methods)
    for m in setting.methods:
        complete = setting.complete_seeds(m)
        if complete:
            y = 100 * np.asarray([setting.curve(m, s) for s in complete])
            x = np.asarray(setting.curve(m, complete[0], "boxes"))
            mean = np.nanmean(y, axis=0)
            seeds = f"{len(complete)} seed{'' if len(complete) == 1 else 's'}"
            ax.plot(x, mean, marker="o", color=colours[m], label=f"{m} ({seeds})")
            if len(complete) > 1:
                sd = np.nanstd(y, axis=0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color=colours[m], alpha=0.2)
        for i, s in enumerate(setting.seeds):
            if s in complete:
                continue
            rows = [r for r in setting.run_records(m, s) if r.mean_dice is not None]
            if rows:
                ax.plot(
                    [r.boxes for r in rows],
                    [100 * r.mean_dice for r in rows],
                    linestyle="--",
                    marker="s^vD<>"[i % 6],
                    markersize=4,
                    color=colours[m],
                    label=f"{m} seed {s}, running ({len(rows)} of {setting.loops} loops)",
                )


def plot_dice_vs_corrections(setting: SettingResults, path: Path) -> None:
    """Two panels: Dice against boxes, and Dice against the corrected voxels so far (mean over seeds, band ± 1 sd
    of the Dice; x: the seeds' mean cumulative corrected voxels)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    draw_dice_vs_boxes(left, setting)
    left.set_xlabel("annotated boxes")
    left.set_ylabel("test Mean Dice (x 100)")
    left.set_title("against boxes")
    colours = _colours(setting.methods)
    for m in setting.methods:
        seeds = [s for s in setting.complete_seeds(m) if setting.effort_curve(m, s) is not None]
        if not seeds:
            continue
        y = 100 * np.asarray([setting.curve(m, s) for s in seeds])
        x = np.mean([setting.effort_curve(m, s) for s in seeds], axis=0) / 1000
        mean = np.nanmean(y, axis=0)
        right.plot(x, mean, marker="o", color=colours[m], label=f"{m} ({len(seeds)} seed{'' if len(seeds) == 1 else 's'})")
        if len(seeds) > 1:
            sd = np.nanstd(y, axis=0, ddof=1)
            right.fill_between(x, mean - sd, mean + sd, color=colours[m], alpha=0.2)
    right.set_title("against corrected voxels (pre-filled boxes)")
    for ax in (left, right):
        if setting.y_full() is not None:
            ax.axhline(100 * setting.y_full(), color="k", linestyle="--", linewidth=1, label="full data")
        ax.grid(alpha=0.3)
    right.set_xlabel("corrected voxels so far, thousands (added + removed + relabelled)")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    _save(fig, path)


def plot_dice_vs_foreground(setting: SettingResults, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = _colours(setting.methods)
    for m in setting.methods:
        rows = [r for r in setting.records if r.method == m and r.mean_dice is not None]
        if not rows:
            continue
        x = 100 * np.asarray([r.foreground_fraction for r in rows])
        ax.scatter(x, 100 * np.asarray([r.mean_dice for r in rows]), color=colours[m], s=18, label=m)
        fit = setting.fg_fit(m)
        if fit is not None:
            xs = np.linspace(fit.x0, max(r.foreground_fraction for r in rows) * 1.05, 100)
            ax.plot(100 * xs, 100 * fit.predict(xs), color=colours[m], label=f"{m} fit, FG-Eff {fit.gamma:.2f}")
    _finish_dice_plot(
        fig,
        ax,
        setting,
        path,
        "pool foreground inside annotated boxes (%)",
        "Dice against annotated foreground, with FG-Eff fits",
    )


def plot_starts_vs_boxes(comparison: StartComparison, path: Path) -> None:
    """One line per starting budget: at each loop the mean over the seeds that finished it, band ± 1 sd."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = _colours([label for _, _, label in comparison.runs])
    for s, m, label in comparison.runs:
        loops = [rs for rs in (s.loop_records(m, t, scored=True) for t in range(s.loops)) if rs]
        if not loops:
            continue
        boxes = [rs[0].boxes for rs in loops]
        values = [[r.mean_dice for r in rs] for rs in loops]
        mean = np.asarray([100 * np.mean(v) for v in values])
        sd = np.asarray([100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
        seeds = ", ".join(str(len(v)) for v in values)
        ax.plot(boxes, mean, marker="o", color=colours[label], label=f"{label} (seeds per loop: {seeds})")
        ax.fill_between(boxes, mean - sd, mean + sd, color=colours[label], alpha=0.15)
    ax.set_xlabel("annotated boxes")
    ax.set_ylabel("test Mean Dice (x 100)")
    ax.set_title("Dice against budget per starting budget (band: ± 1 sd over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_penalty_matrix(ppm, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    n = len(ppm.methods)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    image = ax.imshow(ppm.matrix, cmap="Reds", vmin=0, vmax=max(1.0, float(ppm.matrix.max())))
    ax.set_xticks(range(n), ppm.methods, rotation=40, ha="right")
    ax.set_yticks(range(n), ppm.methods)
    ax.set_xlabel("j (beaten)")
    ax.set_ylabel("i (wins)")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{ppm.matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    _save(fig, path)


def plot_queried_boxes(setting: SettingResults, path: Path, seed: int | None = None, cases: int = 3) -> bool:
    """Boxes of each method drawn over one slice of a few cases (the slice that most boxes cross)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    seed = setting.seeds[0] if seed is None else seed
    projects = {}
    for m in setting.methods:
        folder = setting.run_dir / f"seed_{seed}" / m
        if (folder / "project.json").is_file():
            projects[m] = Project.open(folder)
    if not projects:
        return False
    boxes = {m: [b for b in p.all_boxes() if b.loop > 0 or len(projects) == 1] for m, p in projects.items()}
    counts: dict[str, int] = {}
    for bs in boxes.values():
        for b in bs:
            counts[b.case] = counts.get(b.case, 0) + 1
    chosen = sorted(counts, key=lambda c: (-counts[c], c))[:cases]
    if not chosen:
        return False
    colours = _colours(setting.methods)
    any_project = next(iter(projects.values()))
    fig, axes = plt.subplots(len(chosen), len(projects), figsize=(3.0 * len(projects), 3.0 * len(chosen)), squeeze=False)
    for row, case in enumerate(chosen):
        image = sitk.GetArrayFromImage(any_project.read_image(case))
        crossing = np.zeros(image.shape[0])
        for bs in boxes.values():
            for b in bs:
                if b.case == case:
                    crossing[b.box.coords[0] : b.box.coords[0] + b.box.size[0]] += 1
        k = int(np.argmax(crossing))
        gt = any_project.read_ground_truth(case)[k]
        for col, (m, bs) in enumerate(boxes.items()):
            ax = axes[row][col]
            ax.imshow(image[k], cmap="gray")
            if gt.any():
                ax.contour(gt > 0, levels=[0.5], colors="yellow", linewidths=0.6)
            for b in bs:
                z, y, x = b.box.coords
                dz, dy, dx = b.box.size
                if b.case == case and z <= k < z + dz:
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), dx, dy, fill=False, edgecolor=colours[m], linewidth=1.5))
                    ax.text(x, y - 1, str(b.loop), color=colours[m], fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(m, color=colours[m], fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{case}\nslice {k}", fontsize=8)
    fig.suptitle(f"queried boxes after the starting budget (seed {seed}; number = loop; yellow = ground truth)", fontsize=9)
    _save(fig, path)
    return True


# ------------------------------------------------------------------------ pages
def write_report(run_dirs: Sequence[Path | str], out: Path | str, effort_model: EffortModel | None = None) -> Path:
    """Write ``report.html`` and ``report.md`` (and the PNGs) into ``out``; returns the HTML path.

    ``effort_model`` turns corrected voxels into estimated minutes (default: :class:`EffortModel`'s parameters).
    """
    out = Path(out)
    if effort_model is not None and not isinstance(effort_model, EffortModel):
        raise ValueError(f"effort_model: expected an EffortModel, got {type(effort_model).__name__}")
    settings = [SettingResults(d) for d in run_dirs]  # every folder checked before anything is written
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    try:
        return _write_report(settings, out, effort_model or EffortModel())
    except BaseException:  # no half report: the plots this call drew go again
        for p in set(out.iterdir()) - before:
            if p.is_file():
                p.unlink()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _write_report(settings: Sequence[SettingResults], out: Path, effort_model: EffortModel) -> Path:
    sections: list[tuple[str, list[Table], list[Figure], list[str]]] = []
    ppms = []
    for index, setting in enumerate(settings):
        tables = [setting.summary_table(), setting.loop_table()]
        figures = []
        prefix = f"setting{index + 1}"
        p = out / f"{prefix}_dice_vs_boxes.png"
        plot_dice_vs_boxes(setting, p)
        figures.append(
            Figure(
                "Dice against the number of boxes",
                p,
                "Mean over the seeds that finished every loop, band ± 1 sd; dashed: a run still going, its loops so far.",
            )
        )
        p = out / f"{prefix}_dice_vs_foreground.png"
        plot_dice_vs_foreground(setting, p)
        figures.append(
            Figure(
                "Dice against annotated foreground", p, "Every seed and loop; lines: FG-Eff fits (need the full-data reference)."
            )
        )
        notes = []
        if setting.has_effort:
            tables.append(setting.effort_table(effort_model))
            p = out / f"{prefix}_dice_vs_corrections.png"
            plot_dice_vs_corrections(setting, p)
            figures.append(
                Figure(
                    "Dice against corrected voxels, beside Dice against boxes",
                    p,
                    "Right: x is the mean over seeds of the voxels corrected against the model's "
                    "pre-fill so far; band ± 1 sd of the Dice over seeds.",
                )
            )
        else:
            notes.append("Annotation effort: these records hold no per-box corrections (run before pre-filled boxes).")
        ppm = setting.penalty_matrix()
        if ppm is not None:
            ppms.append(ppm)
            tables.append(penalty_table(ppm, "Pairwise penalty matrix"))
            p = out / f"{prefix}_penalty_matrix.png"
            plot_penalty_matrix(ppm, p, "pairwise penalty matrix")
            figures.append(Figure("Pairwise penalty matrix", p, "Row i, column j: share of budget steps where i beats j."))
        else:
            notes.append("Pairwise penalty matrix: needs at least two methods with two or more finished seeds each.")
        p = out / f"{prefix}_queried_boxes.png"
        if plot_queried_boxes(setting, p):
            figures.append(Figure("Queried boxes", p, "One slice per case; each column a method."))
        h = setting.header
        notes.append(
            f"Data: {h['settings']['images']} ({h['pool_cases']} pool / {h['test_cases']} test cases), "
            f"patch {' x '.join(map(str, h['patch_size']))}, budget {h['budget']} boxes ({h['budget_rule']}), "
            f"query size {h['query_size']}, starting budget {h['settings']['start']}, seeds "
            f"{', '.join(map(str, setting.seeds))}."
        )
        notes.append(
            "Versions: "
            + ", ".join(f"{k} {v}" for k, v in h["versions"].items())
            + "; profile: "
            + ", ".join(f"{k}={v}" for k, v in h["profile"].items() if k != "description" and v is not None)
        )
        if h["settings"].get("reductions"):
            notes.append("Reduced against the nnActive protocol: " + "; ".join(h["settings"]["reductions"]) + ".")
        sections.append((setting.name, tables, figures, notes))
    for index, comparison in enumerate(start_comparisons(settings)):
        p = out / f"starts{index + 1}_dice_vs_boxes.png"
        plot_starts_vs_boxes(comparison, p)
        tables = [comparison.table()]
        figures = [
            Figure(
                "Dice against the number of boxes, per starting budget",
                p,
                "Each point averages the seeds that finished that loop; the first point is the starting budget alone.",
            )
        ]
        ppm = comparison.penalty_matrix()
        notes = []
        if ppm is not None:
            tables.append(penalty_table(ppm, "Pairwise penalty matrix between starting budgets"))
            p = out / f"starts{index + 1}_penalty_matrix.png"
            plot_penalty_matrix(ppm, p, "starting budgets")
            figures.append(
                Figure(
                    "Pairwise penalty matrix between starting budgets",
                    p,
                    "Row i, column j: share of budget steps where i beats j.",
                )
            )
        else:
            notes.append("Pairwise penalty matrix between starting budgets: needs two or more seeds that every start finished.")
        sections.append((f"Starting budgets compared: {comparison.name}", tables, figures, notes))
    if len(ppms) > 1:
        total = sum_penalty_matrices(ppms)
        table = penalty_table(total, "Pairwise penalty matrix summed over settings")
        p = out / "penalty_matrix_summed.png"
        plot_penalty_matrix(total, p, "summed over settings")
        sections.append(("All settings", [table], [Figure("Summed penalty matrix", p, "")], []))
    md = ["# ActiveLearning3D simulation report", ""]
    body = []
    for title, tables, figures, notes in sections:
        md += [f"## {title}", ""] + [f"- {n}" for n in notes] + [""]
        md += [t.markdown() for t in tables]
        md += [f"![{f.title}]({f.path.name})\n\n{f.caption}\n" for f in figures]
        body.append(
            f"<h2>{html.escape(title)}</h2>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
            + "".join(t.html() for t in tables)
            + "".join(
                f"<figure><img alt='{html.escape(f.title)}' src='data:image/png;base64,"
                f"{base64.b64encode(f.path.read_bytes()).decode()}'><figcaption>{html.escape(f.caption)}"
                f"</figcaption></figure>"
                for f in figures
            )
        )
    atomic_write_text(out / "report.md", "\n".join(md))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}"
        "th{background:#eee}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ActiveLearning3D simulation report</title>"
        f"<style>{style}</style></head><body><h1>ActiveLearning3D simulation report</h1>{''.join(body)}</body></html>"
    )
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
