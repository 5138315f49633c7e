"""The per-loop records of a simulation, typed, and the store that reads and writes them.

A simulation writes one record per finished loop of a run,
``OUT/results/<method>/seed_<s>/loop_<t>.json``; the report reads them, and
``--restore-from`` rebuilds runs from copies committed under ``benchmarks/``.
Those committed files are the reason a record keeps the order of the keys it
was read with and any key it does not know: read and written back, a record
is the same file byte for byte, so a rebuild or a backfill never rewrites an
old record into another shape. A record made in this session writes its keys
in :data:`RECORD_ORDER`; a key added later (the next loop's boxes, where it
was restored from) goes after the keys already there, as the old dict merge
did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

from .fileio import atomic_write_json, read_json
from .project import LoopFile


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class _OrderedJson:
    """JSON of a dataclass that keeps the key order and unknown keys of what it was read from.

    Subclasses are dataclasses with ``extra`` (unknown keys) and ``key_order`` (the keys as read; None for a
    record made here) as their last fields, and name in ``ORDER`` their keys as a new record writes them and in
    ``ALWAYS`` those a new record writes even when null. Values are kept as read (no int-to-float conversion), so
    a number writes back as it was.
    """

    ORDER: ClassVar[tuple[str, ...]] = ()
    ALWAYS: ClassVar[frozenset[str]] = frozenset()
    extra: dict[str, Any]
    key_order: tuple[str, ...] | None

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def _value_json(self, key: str) -> Any:
        value = getattr(self, key)
        return value.to_json() if isinstance(value, _OrderedJson) else value

    def to_json(self) -> dict[str, Any]:
        defaults = self._defaults()
        if self.key_order is None:
            keys = [k for k in self.ORDER if k in self.ALWAYS or getattr(self, k) != defaults.get(k)]
        else:
            keys = list(self.key_order)
        # set since it was read (or left at its default in a new record): after the keys already there
        keys += [k for k in self.ORDER if k not in keys and getattr(self, k) != defaults.get(k)]
        keys += [k for k in self.extra if k not in keys]
        return {k: self._value_json(k) if k in self.ORDER else self.extra[k] for k in keys}

    @classmethod
    def _split(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(known fields, unknown keys) of a JSON object."""
        known = {k: v for k, v in data.items() if k in cls.ORDER}
        return known, {k: v for k, v in data.items() if k not in cls.ORDER}


@dataclass
class EffortTotals(_OrderedJson):
    """The oracle's labels against the model's pre-fill over one loop's boxes (:func:`~.prefill.effort_totals`)."""

    boxes: int = 0
    boxes_with_effort: int = 0
    prefill_shown: int = 0
    corrected_voxels: int = 0
    box_voxels: int = 0
    foreground_voxels: int = 0  # what painting them without a pre-fill would take
    mean_prefill_dice: float | None = None
    seconds: float | None = None
    boxes_with_seconds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    ORDER: ClassVar[tuple[str, ...]] = (
        "boxes",
        "boxes_with_effort",
        "prefill_shown",
        "corrected_voxels",
        "box_voxels",
        "foreground_voxels",
        "mean_prefill_dice",
        "seconds",
        "boxes_with_seconds",
    )
    ALWAYS: ClassVar[frozenset[str]] = frozenset(ORDER)

    @classmethod
    def from_json(cls, data: Any) -> "EffortTotals":
        if not isinstance(data, Mapping):
            raise ValueError(f"effort: expected a JSON object, found {type(data).__name__}")
        known, extra = cls._split(data)
        for key, value in known.items():
            if value is not None and not _number(value):
                raise ValueError(f"effort.{key} {value!r}: expected a number")
        return cls(**known, extra=extra, key_order=tuple(data))


@dataclass
class LoopRecord(_OrderedJson):
    """What one finished loop of a run measured: boxes, annotated foreground, test Dice, stage times, its boxes."""

    method: str
    seed: int
    loop: int
    boxes: int  # all annotated boxes of the run so far
    foreground_fraction: float | None  # share of all pool foreground inside annotated boxes
    mean_dice: float | None  # on the test split; None where no class could be scored
    annotated_voxels: int | None = None
    foreground_voxels: int | None = None
    per_class: dict[str, float | None] | None = None
    model: str | None = None
    seconds: dict[str, float | None] = field(default_factory=dict)  # wall time per stage (prepare, train, ..., oracle)
    loop_method: str | None = None  # the method that chose this loop's boxes (the start's for loop 0)
    written: str | None = None
    loop_file: dict[str, Any] | None = None  # this loop's boxes (LoopFile JSON): what a restore rebuilds
    effort: EffortTotals | None = None
    determinism: dict[str, Any] | None = None  # reproducible bit for bit, and why (not)
    training: dict[str, Any] | None = None  # warm or scratch per fold, iterations
    next_loop_file: dict[str, Any] | None = None  # the next loop's boxes, once queried
    restored_from: str | None = None  # the records this one was copied from by a restore
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    ORDER: ClassVar[tuple[str, ...]] = (
        "method",
        "seed",
        "loop",
        "boxes",
        "annotated_voxels",
        "foreground_voxels",
        "foreground_fraction",
        "mean_dice",
        "per_class",
        "model",
        "seconds",
        "loop_method",
        "written",
        "loop_file",
        "effort",
        "determinism",
        "training",
        "next_loop_file",
        "restored_from",
    )
    ALWAYS: ClassVar[frozenset[str]] = frozenset(ORDER[:13])

    @classmethod
    def from_json(cls, data: Any) -> "LoopRecord":
        """A record from its JSON; ValueError saying what is missing or of the wrong kind."""
        problem = record_problem(data)
        if problem:
            raise ValueError(problem)
        known, extra = cls._split(data)
        if known.get("effort") is not None:
            known["effort"] = EffortTotals.from_json(known["effort"])
        return cls(**known, extra=extra, key_order=tuple(data))

    @property
    def key(self) -> tuple[str, int, int]:
        return self.method, self.seed, self.loop

    @property
    def has_effort(self) -> bool:
        """Whether the record holds its boxes' corrections against a pre-fill (simulations since pre-filled boxes)."""
        return self.effort is not None and bool(self.effort.boxes_with_effort)

    def loop_files(self) -> list[dict[str, Any]]:
        """The loop files this record carries: its loop's, then the next loop's where it was queried."""
        return [f for f in (self.loop_file, self.next_loop_file) if f is not None]

    def boxes_of(self, which: str = "loop_file") -> LoopFile | None:
        """This loop's (or with ``next_loop_file`` the next loop's) boxes as a LoopFile."""
        data = getattr(self, which)
        return None if data is None else LoopFile.from_json(data, self.loop + (which == "next_loop_file"))


def record_problem(r: Any) -> str | None:
    """What a loop record lacks or holds of the wrong kind (what the report and a restore rely on), or None."""
    if not isinstance(r, Mapping):
        return f"expected a JSON object, found {type(r).__name__}"
    if not isinstance(r.get("method"), str):
        return f"method {r.get('method')!r}: expected a method name"
    for key in ("seed", "loop", "boxes"):
        if not _whole(r.get(key)):
            return f"{key} {r.get(key)!r}: expected a non-negative whole number"
    for key in ("mean_dice", "foreground_fraction"):
        if r.get(key) is not None and not _number(r[key]):
            return f"{key} {r.get(key)!r}: expected a number or null"
    if "foreground_fraction" not in r or "mean_dice" not in r:
        return "no 'mean_dice' or 'foreground_fraction'"
    if not isinstance(r.get("seconds", {}), dict) or not all(v is None or _number(v) for v in r.get("seconds", {}).values()):
        return "'seconds' must map stages to numbers"
    for key in ("loop_file", "next_loop_file", "effort", "per_class", "determinism", "training"):
        if r.get(key) is not None and not isinstance(r[key], Mapping):
            return f"{key}: expected a JSON object or null, found {type(r[key]).__name__}"
    return None


def read_record(path: Path | str) -> LoopRecord:
    """One record file; ValueError (or OSError) naming the file."""
    try:
        return LoopRecord.from_json(read_json(path))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None


class LoopRecordStore:
    """The loop records of one simulation folder (``OUT/results``), read and written whole and atomically."""

    def __init__(self, out: Path | str):
        self.out = Path(out)
        self.root = self.out / "results"

    def path(self, method: str, seed: int, loop: int) -> Path:
        return self.root / method / f"seed_{seed}" / f"loop_{loop:03d}.json"

    def exists(self, method: str, seed: int, loop: int) -> bool:
        return self.path(method, seed, loop).is_file()

    def read(self, method: str, seed: int, loop: int) -> LoopRecord | None:
        """The record of a loop, or None where it has none yet."""
        path = self.path(method, seed, loop)
        return read_record(path) if path.is_file() else None

    def write(self, record: LoopRecord) -> Path:
        path = self.path(record.method, record.seed, record.loop)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record.to_json())
        return path

    def paths(self) -> list[Path]:
        """Every record file, sorted by method, seed and loop (by path)."""
        return sorted(self.root.glob("*/seed_*/loop_*.json"))

    def read_all(self) -> list[LoopRecord]:
        return [read_record(p) for p in self.paths()]

    def recorded_loops(self, method: str, seed: int, loops: int | None = None) -> Iterable[tuple[int, Path]]:
        """(loop, path) of a run's record files in loop order, up to ``loops`` when given, stopping at a gap."""
        loop = 0
        while loops is None or loop < loops:
            path = self.path(method, seed, loop)
            if not path.is_file():
                return
            yield loop, path
            loop += 1

    def update(
        self, method: str, seed: int, loop: int, seconds: Mapping[str, float | None] | None = None, **fields: Any
    ) -> LoopRecord | None:
        """Add what a step after a loop learnt to its record (stage seconds, rounded to ms; other fields replaced).

        Nothing where the loop has no record (loop -1 of a fresh run, a record not written yet)."""
        if loop < 0:
            return None
        record = self.read(method, seed, loop)
        if record is None:
            return None
        record = dataclasses.replace(record, **fields)
        record.seconds = {**record.seconds, **{k: None if v is None else round(float(v), 3) for k, v in (seconds or {}).items()}}
        self.write(record)
        return record
