"""Jobs on disk: a folder per job with ``job.json`` (inputs), ``status.json`` (replaced atomically) and ``log.txt``.

Everything a caller knows about a job comes from these files, so the Slicer
panel, the command line and a cluster backend can all watch the same job, and
a job survives the process that started it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from ..fileio import atomic_write_json, read_json
from ..locking import FileLock, pid_alive
from ..project import now_iso

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class JobError(RuntimeError):
    """A job that cannot be created, read or controlled."""


@dataclass
class JobStatus:
    """What a job is doing now; written by the worker (progress) and the runner (start, death, cancel)."""

    state: str = "queued"
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
    # [started, last heard of] of earlier attempts that did not finish, so the time a job resumed in a later
    # session really ran is not lost when its new attempt overwrites ``started``
    earlier: list[list[str | None]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

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
    """One job folder."""

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
    def create(cls, root: Path | str, name: str, kind: str, inputs: dict[str, Any] | None = None,
               env: dict[str, str] | None = None) -> "Job":
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
                    if old.env != spec.env and job.status().state not in ("running", "done"):  # a rerun gets the new env
                        atomic_write_json(job.spec_path, {**asdict(spec), "created": old.created})
                    return job
                if job.status().state == "done":
                    raise JobError(f"{job.path}: a finished job with other inputs exists; remove it to run new ones")
                if job.status().state == "running":
                    raise JobError(f"{job.path}: a running job with other inputs exists; cancel it first")
            atomic_write_json(job.spec_path, asdict(spec))
            atomic_write_json(job.status_path, asdict(JobStatus(updated=now_iso())))
        return job

    def spec(self) -> JobSpec:
        try:
            d = read_json(self.spec_path)
            return JobSpec(str(d["kind"]), dict(d.get("inputs", {})), str(d.get("created", "")),
                           {str(k): str(v) for k, v in d.get("env", {}).items()})
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
            data = read_json(self.status_path)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, found {type(data).__name__}")
            status = JobStatus.from_json(data)
            problem = _status_problem(status)
            if problem:
                raise ValueError(problem)
            return status
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
            detail = str(e).replace(f"{self.status_path}: ", "")[:200]
            return JobStatus(state="failed", message=f"{self.status_path}: damaged status file ({detail}); "
                                                     "the job counts as failed and runs again when asked")

    def update(self, **changes: Any) -> JobStatus:
        """Change some status fields and replace status.json atomically."""
        status = self.status()
        for key, value in changes.items():
            if not hasattr(status, key):
                raise JobError(f"unknown status field {key!r}")
            setattr(status, key, value)
        if status.state not in JOB_STATES:
            raise JobError(f"unknown job state {status.state!r}")
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

    def refresh(self) -> JobStatus:
        """Detect a worker that died without saying so: a 'running' job whose process is gone becomes failed.

        It ended when it was last heard of, not when the death is noticed (perhaps in a session hours later)."""
        status = self.status()
        if status.state == "running" and (status.pid is None or not process_alive(status.pid, self.path)):
            with self.lock.hold("mark a dead worker failed"):
                status = self.status()  # again under the lock: another runner may have started it just now
                if status.state == "running" and (status.pid is None or not process_alive(status.pid, self.path)):
                    tail = self.log_summary()
                    status = self.update(state="failed", ended=status.updated or now_iso(),
                                         message="the worker process died (killed, or out of memory?)" + (f"; log:\n{tail}" if tail else ""))
        return status

    def cancel(self, grace_seconds: float = 5.0, reap: Callable[[], object] | None = None) -> JobStatus:
        """Kill the job's whole process tree (its process group) and mark it cancelled.

        ``reap`` is called while waiting, so a parent holding the worker's handle can
        collect it (a zombie leader keeps its process group alive).
        """
        status = self.status()
        if status.final:
            return status
        if status.state == "running" and status.pid and process_alive(status.pid, self.path):
            kill_process_group(status.pid, grace_seconds, reap)
        return self.update(state="cancelled", ended=now_iso(), message="cancelled")

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
        k = 1 + max((int(m.group(1)) for p in shelf.iterdir()
                     if (m := re.fullmatch(re.escape(self.name) + r"\.(\d+)", p.name))), default=0)
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


def _status_problem(status: JobStatus) -> str | None:
    if status.state not in JOB_STATES:
        return f"unknown state {status.state!r}"
    if isinstance(status.progress, bool) or not isinstance(status.progress, (int, float)):
        return f"progress {status.progress!r} is not a number"
    if not isinstance(status.message, str) or not isinstance(status.earlier, list):
        return "message or earlier attempts of the wrong type"
    if status.pid is not None and (isinstance(status.pid, bool) or not isinstance(status.pid, int)):
        return f"pid {status.pid!r} is not a process id"
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


def process_alive(pid: int, job_dir: Path | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, where /proc tells, is the worker of ``job_dir``.

    Checking the command line guards against a recycled pid after a reboot or a long pause.
    """
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if job_dir is None or not cmdline.parent.is_dir():
        return True
    try:
        return str(job_dir) in cmdline.read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return False


def kill_process_group(pid: int, grace_seconds: float = 5.0, reap: Callable[[], object] | None = None) -> None:
    """SIGTERM the process group led by ``pid`` (worker and its data loaders), SIGKILL what is left after a grace."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if reap is not None:
            reap()
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
