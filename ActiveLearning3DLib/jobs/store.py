"""Jobs on disk: a folder per job with ``job.json`` (inputs), ``status.json`` (replaced atomically) and ``log.txt``.

Everything a caller knows about a job comes from these files, so the Slicer
panel, the command line and a cluster backend can all watch the same job, and
a job survives the process that started it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from ..fileio import atomic_write_json, file_problem, now_iso, read_json, read_json_object
from ..locking import FileLock


class JobState(str, Enum):
    """Where a job is. A ``str`` enum: status.json holds the plain strings, and ``status.state == "done"`` holds."""

    QUEUED = "queued"  # created (or reset to run again), no worker yet
    RUNNING = "running"  # a worker has it (whether it still lives is the runner's judgement)
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


JOB_STATES = tuple(s.value for s in JobState)
FINAL_STATES = tuple(s.value for s in JobState if s.final)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class JobError(RuntimeError):
    """A job that cannot be created, read or controlled."""


@dataclass
class JobStatus:
    """What a job is doing now; written by the worker (progress) and the runner (start, death, cancel)."""

    state: JobState = JobState.QUEUED
    progress: float = 0.0  # 0 .. 1
    stage: str = ""
    epoch: int | None = None
    iteration: int | None = None
    case: str | None = None
    message: str = ""
    pid: int | None = None
    started: str | None = None
    ended: str | None = None
    updated: str | None = None
    exit_code: int | None = None
    # who runs the worker, so each backend judges only its own jobs (all None in files written before they existed):
    host: str | None = None  # the host of ``pid``
    pid_started: float | None = None  # the process's create time (psutil): a reused pid is not the worker
    runner: str | None = None  # the runner kind that started it ("local", "inprocess", "slurm"); None: local
    runner_id: str | None = None  # the backend's own id of the job (a Slurm job id), where it has one
    # [started, last heard of] of earlier attempts that did not finish, so the time a job resumed in a later
    # session really ran is not lost when its new attempt overwrites ``started``
    earlier: list[list[str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = _job_state(self.state)

    @property
    def final(self) -> bool:
        return self.state.final

    @property
    def wall_seconds(self) -> float | None:
        """Seconds from start to end (None until it has ended)."""
        return seconds_between(self.started, self.ended)

    def attempts(self) -> list[tuple[str | None, str | None]]:
        """(start, end) of every attempt at the job: the unfinished earlier ones, then the latest."""
        return [(a, b) for a, b in self.earlier] + [(self.started, self.ended)]

    def attempts_before_restart(self) -> list[list[str | None]]:
        """``earlier`` for a new attempt: the latest attempt, if it ran, joins the earlier ones (ending when it was
        last heard of where no end was written)."""
        latest = [[self.started, self.ended or self.updated]] if self.started else []
        return [list(a) for a in self.earlier] + latest

    @classmethod
    def from_json(cls, d: dict) -> "JobStatus":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class JobSpec:
    """What to run: a task kind, its inputs (JSON), and variables the runner adds to the worker's environment."""

    kind: str
    inputs: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=now_iso)
    env: dict[str, str] = field(default_factory=dict)  # for the worker process only (e.g. nnU-Net's folders)


class Job:
    """One job folder: its spec, status and log, the same for every backend.

    Whether a "running" job's worker still lives, and how to stop it, is the
    business of the runner that started it (``JobRunner.refresh``/``cancel``):
    a local process, a thread of this process or a Slurm batch job.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path).absolute()
        self._lock: FileLock | None = None

    @property
    def lock(self) -> FileLock:
        """Held while the job is created, started or found dead, so two drivers (two `al3d loop`, the panel and a
        console) create and start it once: the second finds it running and watches it."""
        if self._lock is None:
            self._lock = FileLock(self.path / "job.lock", what=f"job {self.path}")
        return self._lock

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec_path(self) -> Path:
        return self.path / "job.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def threads_path(self) -> Path:
        return self.path / "threads.json"

    def allot_threads(self, threads: int) -> None:
        """Tell the worker how many threads it may use now (the runner's share of the cores; see ``Reporter``)."""
        atomic_write_json(self.threads_path, {"threads": int(threads), "updated": now_iso()})

    def allotted_threads(self) -> int | None:
        """The runner's latest allotment, or None where it made none (the worker keeps its own setting)."""
        if not self.threads_path.is_file():
            return None
        try:
            return int(read_json(self.threads_path)["threads"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"{self.threads_path}: unreadable thread allotment ({e})") from e

    @classmethod
    def create(
        cls, root: Path | str, name: str, kind: str, inputs: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> "Job":
        """Create a job, or return the existing one with the same inputs (so a re-run resumes).

        An existing job with other inputs that has not finished is replaced; a
        finished one with other inputs is an error, since its results describe
        something else.
        """
        if not _NAME.match(name):
            raise JobError(f"job name {name!r} may hold only letters, digits, '.', '_' and '-'")
        job = cls(Path(root) / name)
        spec = JobSpec(kind, dict(inputs or {}), env={str(k): str(v) for k, v in (env or {}).items()})
        job.path.mkdir(parents=True, exist_ok=True)
        with job.lock.hold(f"create job {name}"):  # a second creator finds the first one's job, never resets it
            if job.spec_path.is_file():
                old = job.spec()
                if (old.kind, old.inputs) == (spec.kind, json.loads(json.dumps(spec.inputs))):
                    if old.env != spec.env and job.status().state not in (
                        JobState.RUNNING,
                        JobState.DONE,
                    ):  # a rerun gets the new env
                        atomic_write_json(job.spec_path, {**asdict(spec), "created": old.created})
                    return job
                if job.status().state == JobState.DONE:
                    raise JobError(f"{job.path}: a finished job with other inputs exists; remove it to run new ones")
                if job.status().state == JobState.RUNNING:
                    raise JobError(f"{job.path}: a running job with other inputs exists; cancel it first")
            atomic_write_json(job.spec_path, asdict(spec))
            atomic_write_json(job.status_path, asdict(JobStatus(updated=now_iso())))
        return job

    def spec(self) -> JobSpec:
        try:
            d = read_json(self.spec_path)
            return JobSpec(
                str(d["kind"]),
                dict(d.get("inputs", {})),
                str(d.get("created", "")),
                {str(k): str(v) for k, v in d.get("env", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"{self.spec_path}: unreadable job file ({e})") from e

    def status(self) -> JobStatus:
        """The job's status; a damaged status.json reads as failed (so the job can run again), never as an error.

        status.json is replaced atomically, so only damage from outside gets here; raising would block
        every listing, scoring and loop of the project until someone edits the file by hand.
        """
        if not self.status_path.is_file():
            return JobStatus()
        try:
            status = JobStatus.from_json(read_json_object(self.status_path))
            problem = _status_problem(status)
            if problem:
                raise ValueError(problem)
            return status
        except (OSError, ValueError, TypeError) as e:
            detail = file_problem(e)[:200]
            return JobStatus(
                state=JobState.FAILED,
                message=f"{self.status_path}: damaged status file ({detail}); the job counts as failed and runs again when asked",
            )

    def update(self, **changes: Any) -> JobStatus:
        """Change some status fields and replace status.json atomically."""
        status = self.status()
        for key, value in changes.items():
            if not hasattr(status, key):
                raise JobError(f"unknown status field {key!r}")
            setattr(status, key, value)
        try:
            status.state = _job_state(status.state)
        except ValueError as e:
            raise JobError(str(e)) from None
        status.updated = now_iso()
        atomic_write_json(self.status_path, asdict(status))
        return status

    def log_summary(self, lines: int = 10, width: int = 200, total: int = 1200) -> str:
        """The log's last lines for a status message, each cut to ``width`` characters and all to ``total``.

        nnU-Net prints its plans as one line of kilobytes; a death message must stay readable.
        """
        return summarise(self.log_tail(lines), width, total)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def set_aside(self) -> "Job":
        """Move a finished job's folder under ``<root>/.superseded/`` so a job with new inputs can take its name.

        Its spec, status and log are kept (numbered ``<name>.1``, ``<name>.2``,
        ...); the hidden folder holds no ``job.json`` of its own, so listings of
        the project's jobs do not show it.
        """
        if not self.status().final:
            raise JobError(f"{self.path}: only a finished job can be set aside (this one is {self.status().state})")
        shelf = self.path.parent / ".superseded"
        shelf.mkdir(exist_ok=True)
        k = 1 + max(
            (int(m.group(1)) for p in shelf.iterdir() if (m := re.fullmatch(re.escape(self.name) + r"\.(\d+)", p.name))),
            default=0,
        )
        target = shelf / f"{self.name}.{k}"
        os.replace(self.path, target)
        return Job(target)

    def __repr__(self) -> str:
        s = self.status()
        return f"<Job {self.name} {s.state} {100 * s.progress:.0f}% {s.stage}>"


def summarise(text: str, width: int = 200, total: int = 1200) -> str:
    """``text`` with each line cut to ``width`` characters and only the last lines that fit in ``total``."""
    kept: list[str] = []
    size = 0
    for line in reversed(text.splitlines()):
        if len(line) > width:
            line = line[: width - 25] + f" ... ({len(line) - width + 25} more characters)"
        if size + len(line) + 1 > total:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(reversed(kept))


def _job_state(state: JobState | str) -> JobState:
    """``state`` as a :class:`JobState`; a ValueError names an unknown one."""
    if isinstance(state, JobState):
        return state
    if isinstance(state, str) and state in JOB_STATES:
        return JobState(state)
    raise ValueError(f"unknown job state {state!r}")


def _status_problem(status: JobStatus) -> str | None:
    if isinstance(status.progress, bool) or not isinstance(status.progress, (int, float)):
        return f"progress {status.progress!r} is not a number"
    if not isinstance(status.message, str) or not isinstance(status.earlier, list):
        return "message or earlier attempts of the wrong type"
    if status.pid is not None and (isinstance(status.pid, bool) or not isinstance(status.pid, int)):
        return f"pid {status.pid!r} is not a process id"
    if status.pid_started is not None and (
        isinstance(status.pid_started, bool) or not isinstance(status.pid_started, (int, float))
    ):
        return f"pid_started {status.pid_started!r} is not a time"
    return None


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds between two ISO times of job status files (None when either is missing)."""
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def busy_seconds(intervals: Iterable[tuple[str | None, str | None]]) -> float | None:
    """Seconds during which at least one of the (start, end) ISO intervals ran: parallel jobs count once, and the
    pause of a stage resumed in a later session does not count (None when no interval is complete)."""
    spans = sorted((datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in intervals if a and b)
    if not spans:
        return None
    total, (start, end) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > end:
            total += (end - start).total_seconds()
            start, end = a, b
        else:
            end = max(end, b)
    return total + (end - start).total_seconds()
