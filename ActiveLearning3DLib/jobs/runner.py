"""The runner protocol every backend implements, what backends share, and the one factory that builds them.

Nothing outside a runner may assume local processes: callers submit jobs,
poll, refresh, cancel, wait and adopt through :class:`JobRunner`, and read
job folders (:class:`~.store.Job`), which a cluster backend can do the same way.
Backends: ``local`` (worker processes, :mod:`.local`), ``inprocess`` (threads
of this process, for fast tests, :mod:`.inprocess`) and ``slurm`` (batch
jobs, :mod:`.slurm`, imported only when asked for). Build them with
:func:`.factory.make_runner` (``jobs.make_runner``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from .store import Job, JobError, JobStatus

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds ActiveLearning3DLib


# Which queued jobs start first. Short jobs that finish a stage (evaluation, scoring, predictions, the
# embeddings a query waits for) go before new training, so results come out as soon as their model exists
# instead of waiting behind every training queued after it (a simulation grid queues many).
START_RANK = {
    "nnunet_evaluate": 0,
    "nnunet_score": 0,
    "nnunet_predict": 0,
    "pool_embeddings": 0,
    "nnunet_prepare": 1,
    "nnunet_train": 2,
}
DEFAULT_START_RANK = 1
# A job whose inputs say ``"background": true`` waits behind every other queued job: a simulation's full-data
# reference (needed only at the end, for FG-Eff) fills the slots its runs leave idle instead of delaying them.
BACKGROUND_RANK = 10


def start_rank(job: Job) -> int:
    """Lower starts first: by kind, and after every other job when the job runs in the background."""
    spec = job.spec()
    return START_RANK.get(spec.kind, DEFAULT_START_RANK) + (BACKGROUND_RANK if spec.inputs.get("background") else 0)


@runtime_checkable
class JobRunner(Protocol):
    """What the logic, the pipelines, the simulation and the GUI may ask of a runner (and nothing else).

    A job's folder is the record every backend shares; whether its worker
    lives and how to stop it is the runner's: :meth:`refresh` and
    :meth:`cancel`, never ``Job`` itself.
    """

    kind: str  # "local", "inprocess", "slurm"

    @property
    def capacity(self) -> int:
        """Jobs this runner runs at a time (a cluster: how many it keeps submitted)."""
        ...

    def slot_threads(self) -> int | None:
        """Torch threads for a job that fills one slot, or None where the backend leaves them to the job."""
        ...

    def submit(self, job: Job) -> None:
        """Queue a job to run; a done job is not rerun, a job whose worker still runs is adopted, not restarted."""
        ...

    def adopt(self, job: Job) -> bool:
        """Watch a job whose worker still runs (an earlier session started it) instead of submitting it twice;
        True when adopted, False when it does not run (a dead worker is marked failed on the way)."""
        ...

    def poll(self) -> list[Job]:
        """Advance the backend once without blocking (start queued jobs, notice ended ones); the jobs that ended."""
        ...

    def refresh(self, job: Job) -> JobStatus:
        """The job's status as this backend sees it: a "running" job whose worker is gone becomes failed."""
        ...

    def cancel(self, job: Job) -> JobStatus:
        """Stop a queued or running job (a worker's whole process tree) and mark it cancelled."""
        ...

    def cancel_all(self) -> list[Job]:
        """Cancel every job this runner has queued, started or adopted; returns them."""
        ...

    def active(self) -> list[Job]:
        """Jobs queued, started or adopted by this runner that have not ended (as of the last poll)."""
        ...

    def wait(
        self, jobs: Sequence[Job] | None = None, timeout: float | None = None, on_poll: Callable[[list[Job]], None] | None = None
    ) -> bool:
        """Poll until the given jobs (default: all active) end; False on timeout."""
        ...

    def run(self, jobs: Iterable[Job], timeout: float | None = None) -> list[JobStatus]:
        """Submit jobs, wait for them, and return their final status (the simple blocking use)."""
        ...


class BaseRunner:
    """What every backend shares, written against the protocol's own methods: waiting, running, cancelling all.

    A backend sets ``kind`` and implements ``capacity``, ``slot_threads``,
    ``submit``, ``adopt``, ``poll``, ``refresh``, ``cancel`` and ``active``.
    """

    kind = "base"
    poll_seconds = 0.5

    def slot_threads(self) -> int | None:
        return None

    def _settled(self, path: Path) -> bool:
        """Whether this runner is done with the job at ``path`` (a worker it started has been reaped)."""
        return True

    def cancel_all(self) -> list[Job]:
        """Cancel every active job; one this backend may not stop (another's) is named in one error at the end."""
        cancelled, refused = [], []
        for job in self.active():  # type: ignore[attr-defined]
            try:
                self.cancel(job)  # type: ignore[attr-defined]
                cancelled.append(job)
            except JobError as e:
                refused.append(str(e))
        if refused:
            raise JobError(f"cancelled {len(cancelled)} jobs; not {len(refused)}: " + "; ".join(refused))
        return cancelled

    def wait(
        self, jobs: Sequence[Job] | None = None, timeout: float | None = None, on_poll: Callable[[list[Job]], None] | None = None
    ) -> bool:
        """Poll until the given jobs (default: all active) end; False on timeout."""
        watched = [j.path for j in (jobs if jobs is not None else self.active())]  # type: ignore[attr-defined]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()  # type: ignore[attr-defined]
            if on_poll is not None:
                on_poll([Job(p) for p in watched])
            if all(self._settled(p) and self.refresh(Job(p)).final for p in watched):  # type: ignore[attr-defined]
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(self.poll_seconds)

    def run(self, jobs: Iterable[Job], timeout: float | None = None) -> list[JobStatus]:
        jobs = list(jobs)
        for job in jobs:
            self.submit(job)  # type: ignore[attr-defined]
        self.wait(jobs, timeout)
        return [job.status() for job in jobs]


def default_parallel() -> int:
    """One job per GPU where there are GPUs is the caller's choice; on CPUs, one job per two cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // 2)


RUNNER_KINDS = ("local", "inprocess", "slurm")


@dataclass
class RunnerSettings:
    """Which backend runs the jobs and how; ``None`` fields take the backend's defaults.

    ``python`` and ``max_parallel`` default to this interpreter and
    :func:`default_parallel`; ``cores`` to this machine's. ``slurm`` holds a
    ``jobs.slurm.SlurmSettings`` (partition, account, time limit, ...) for
    ``kind="slurm"``; None: its defaults.
    """

    kind: str = "local"
    python: str | None = None  # worker interpreter (PythonSlicer in Slicer)
    max_parallel: int | None = None  # jobs at a time
    env: Mapping[str, str] = field(default_factory=dict)  # added to the workers' environment only
    poll_seconds: float | None = None
    cores: int | None = None  # cores shared among the jobs (local runner)
    share_cores: bool = True  # local: jobs that declare threads get the cores of idle slots
    slurm: Any = None  # jobs.slurm.SlurmSettings

    def __post_init__(self) -> None:
        if self.kind not in RUNNER_KINDS:
            raise ValueError(f"runner kind: unknown {self.kind!r}; known: {', '.join(RUNNER_KINDS)}")
        if self.max_parallel is not None and (
            isinstance(self.max_parallel, bool) or not isinstance(self.max_parallel, int) or self.max_parallel < 1
        ):
            raise ValueError(f"runner max_parallel: expected a whole number of at least 1, got {self.max_parallel!r}")

    def with_defaults(self, **defaults: Any) -> "RunnerSettings":
        """These settings with each given field filled where it is None (a caller's python, parallel)."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None and v is not None})
