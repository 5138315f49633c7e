"""Runners start jobs and watch them through their files; ``LocalRunner`` runs them as local processes.

Nothing outside a runner may assume local processes: callers submit jobs,
poll, cancel and read job status, which a cluster backend can do the same way.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from ..project import now_iso
from .store import Job, JobStatus, kill_process_group

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds ActiveLearning3DLib


# Which queued jobs start first. Short jobs that finish a stage (evaluation, scoring, predictions, the
# embeddings a query waits for) go before new training, so results come out as soon as their model exists
# instead of waiting behind every training queued after it (a simulation grid queues many).
START_RANK = {"nnunet_evaluate": 0, "nnunet_score": 0, "nnunet_predict": 0, "pool_embeddings": 0,
              "nnunet_prepare": 1, "nnunet_train": 2}
DEFAULT_START_RANK = 1
# A job whose inputs say ``"background": true`` waits behind every other queued job: a simulation's full-data
# reference (needed only at the end, for FG-Eff) fills the slots its runs leave idle instead of delaying them.
BACKGROUND_RANK = 10


def start_rank(job: Job) -> int:
    """Lower starts first: by kind, and after every other job when the job runs in the background."""
    spec = job.spec()
    return START_RANK.get(spec.kind, DEFAULT_START_RANK) + (BACKGROUND_RANK if spec.inputs.get("background") else 0)


class JobRunner(Protocol):
    """What the logic and the GUI need of a runner."""

    def submit(self, job: Job) -> None: ...

    def poll(self) -> list[Job]: ...

    def cancel(self, job: Job) -> JobStatus: ...

    def active(self) -> list[Job]: ...


def default_parallel() -> int:
    """One job per GPU where there are GPUs is the caller's choice; on CPUs, one job per two cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass
class LocalRunnerSettings:
    """How local workers start: the interpreter (``PythonSlicer`` in Slicer), parallelism and the child environment."""

    python: str = sys.executable
    max_parallel: int = field(default_factory=default_parallel)
    env: Mapping[str, str] = field(default_factory=dict)  # added to the child's environment only
    poll_seconds: float = 0.5
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    share_cores: bool = True  # running jobs that declare ``threads`` share the cores of idle slots (see _share_cores)


class LocalRunner:
    """Runs jobs as local worker processes, at most ``max_parallel`` at a time, each in its own process group."""

    def __init__(self, settings: LocalRunnerSettings | None = None):
        self.settings = settings or LocalRunnerSettings()
        self._queue: list[Job] = []
        self._running: dict[Path, tuple[Job, subprocess.Popen]] = {}
        self._adopted: dict[Path, Job] = {}  # alive, started by another runner: they hold a slot until they end
        self._asked: dict[Path, int | None] = {}  # threads each live job asked for (its inputs, read once)
        self._allotted: dict[Path, int] = {}  # threads last allotted to each live job

    def slot_threads(self) -> int:
        """Torch threads for a job that fills one slot: the cores over the jobs at a time."""
        return max(1, self.settings.cores // self.settings.max_parallel)

    def child_environment(self, job: Job | None = None) -> dict[str, str]:
        """This process's environment plus the runner's and the job's variables (the parent's stays unchanged)."""
        env = dict(os.environ)
        env.update(self.settings.env)
        if job is not None:
            env.update(job.spec().env)
        paths = [str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def submit(self, job: Job) -> None:
        """Queue a job; a job already done is not run again (so a re-run after a crash resumes).

        A job whose worker is alive (started by another runner, e.g. an earlier
        Slicer session or another terminal) is left to it and watched through its
        files; it counts against ``max_parallel`` until it ends, so a restarted
        driver does not start a second training beside it.
        """
        if job.path in self._running or any(q.path == job.path for q in self._queue):
            return
        with job.lock.hold("queue the job"):  # never re-queue a job another runner is starting right now
            status = job.refresh()
            if status.state == "done":
                return
            if status.state == "running":
                self._adopted[job.path] = job
                return
            if status.state != "queued":
                job.update(state="queued", progress=0.0, message="", pid=None, started=None, ended=None, exit_code=None,
                           earlier=status.attempts_before_restart())
        self._queue.append(job)

    def active(self) -> list[Job]:
        return [j for j, _ in self._running.values()] + list(self._adopted.values()) + list(self._queue)

    def poll(self) -> list[Job]:
        """Reap finished workers, fail the ones that died silently, start queued jobs; returns jobs that ended."""
        ended = []
        for path, (job, proc) in list(self._running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._running[path]
            status = job.status()
            if not status.final:  # killed before it could say so (SIGKILL, out of memory)
                tail = job.log_summary()
                job.update(state="failed", ended=now_iso(), exit_code=code,
                           message=f"the worker exited with code {code} without finishing" + (f"; log:\n{tail}" if tail else ""))
            elif status.state == "failed" and status.exit_code is None:  # a watcher saw it die first (Job.refresh)
                job.update(exit_code=code)
            ended.append(job)
        for path, job in list(self._adopted.items()):
            if job.refresh().state != "running":  # refresh marks a worker that died without a word as failed
                del self._adopted[path]
        while self._queue and len(self._running) + len(self._adopted) < self.settings.max_parallel:
            job = self._queue.pop(self._next_index())
            if job.status().state == "cancelled":
                continue
            self._start(job)
        self._share_cores()
        return ended

    def _share_cores(self) -> None:
        """Allot each live job that declares ``threads`` an equal share of the cores, never fewer than it asked for.

        Jobs are sized for ``max_parallel`` at a time (threads = cores / parallel).
        When fewer run (the last fold, an evaluation without a score job beside
        it), the idle slots' cores would go unused; the worker applies the
        allotment at its next progress report (``Reporter.follow_threads``), and
        a job that starts beside it takes them back the same way.
        """
        live = {path: job for path, (job, _) in self._running.items()}
        live.update(self._adopted)
        self._asked = {path: n for path, n in self._asked.items() if path in live}
        self._allotted = {path: n for path, n in self._allotted.items() if path in live}
        if not live or not self.settings.share_cores:
            return
        share = max(1, self.settings.cores // len(live))
        for path, job in live.items():
            if path not in self._asked:
                self._asked[path] = job.spec().inputs.get("threads")
            asked = self._asked[path]
            if not asked:  # the job leaves its threads to torch's default
                continue
            threads = max(int(asked), share)
            if self._allotted.get(path) != threads:
                job.allot_threads(threads)
                self._allotted[path] = threads

    def _next_index(self) -> int:
        """The queued job to start next: the lowest start rank (see START_RANK, BACKGROUND_RANK), then the oldest."""
        ranks = [start_rank(job) for job in self._queue]
        return ranks.index(min(ranks))

    def _start(self, job: Job) -> None:
        """Start the job's worker, unless another runner started it since it was queued (then watch that one).

        Looking and starting are one step under the job's lock, and the job is
        marked running with the worker's pid before the lock is let go, so a
        second runner (another `al3d loop`, the panel) never starts it twice.
        """
        with job.lock.hold("start the job"):
            status = job.refresh()
            if status.state == "running":
                self._adopted[job.path] = job
                return
            if status.final:
                return
            job.threads_path.unlink(missing_ok=True)  # an earlier run's allotment; _share_cores writes this run's
            with open(job.log_path, "ab") as log:
                proc = subprocess.Popen(
                    [self.settings.python, "-m", "ActiveLearning3DLib.worker", str(job.path)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.child_environment(job),
                    cwd=str(job.path), start_new_session=True,  # its own process group: cancel kills the whole tree
                )
            self._running[job.path] = (job, proc)
            job.update(state="running", pid=proc.pid, started=now_iso(), ended=None, message="starting",
                       progress=0.0, exit_code=None)  # the worker takes it over with its own pid

    def cancel(self, job: Job) -> JobStatus:
        """Cancel a queued or running job (and every process it started)."""
        self._queue = [q for q in self._queue if q.path != job.path]
        self._adopted.pop(job.path, None)
        entry = self._running.pop(job.path, None)
        if entry is None:
            return job.cancel()
        proc = entry[1]
        kill_process_group(proc.pid, reap=proc.poll)  # by our handle: the worker may not have written its pid yet
        proc.wait()
        return job.update(state="cancelled", ended=now_iso(), message="cancelled", exit_code=proc.returncode)

    def cancel_all(self) -> None:
        for job in self.active():
            self.cancel(job)

    def wait(self, jobs: Sequence[Job] | None = None, timeout: float | None = None,
             on_poll: Callable[[list[Job]], None] | None = None) -> bool:
        """Poll until the given jobs (default: all submitted) end; False on timeout."""
        watched = {j.path for j in (jobs if jobs is not None else self.active())}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if on_poll is not None:
                on_poll([Job(p) for p in watched])
            # jobs this runner started are judged by poll() (it has their exit code); others by their files
            if all((Job(p).status() if p in self._running else Job(p).refresh()).final for p in watched):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(self.settings.poll_seconds)

    def run(self, jobs: Iterable[Job], timeout: float | None = None) -> list[JobStatus]:
        """Submit jobs, wait for them, and return their final status (the simple blocking use)."""
        jobs = list(jobs)
        for job in jobs:
            self.submit(job)
        self.wait(jobs, timeout)
        return [job.status() for job in jobs]
