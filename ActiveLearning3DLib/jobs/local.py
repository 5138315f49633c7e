"""``LocalRunner``: jobs as worker processes of this machine, and the process handling it needs on every platform.

psutil does what differs between Windows, macOS and Linux: a worker's
liveness (a zombie is dead, a pid reused by another process is not the
worker: the create time recorded at start must match), and killing a whole
process tree (the worker and its data loaders, children first). Workers start
in a new session on POSIX and in a new process group without a console window
on Windows.

psutil is imported on first use, so the Slicer panel loads before its
dependencies are installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..locking import this_host
from ..fileio import now_iso
from .runner import PACKAGE_ROOT, BaseRunner, default_parallel, start_rank
from .store import Job, JobError, JobState, JobStatus

# runner kinds whose workers are processes of the host that ran them (None: status files written before
# ``runner`` was recorded): their liveness is a pid and a create time, judged on that host
LOCAL_KINDS = (None, "local", "inprocess")
CREATE_TIME_TOLERANCE = 0.01  # seconds; the same process reports the same create time, a reused pid a later one


def _psutil() -> Any:
    import psutil

    return psutil


def process_create_time(pid: int) -> float | None:
    """The process's create time (seconds since the epoch), or None when it is gone or cannot be read."""
    psutil = _psutil()
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def worker_alive(pid: int | None, started: float | None = None, job_dir: Path | None = None) -> bool:
    """True when ``pid`` runs on this host (not a zombie) and is the worker: its create time is ``started``.

    Status files written before create times were recorded have none; then the
    command line must name ``job_dir`` (where it can be read), as before.
    """
    if not pid or pid <= 0:
        return False
    psutil = _psutil()
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None:
            return abs(process.create_time() - float(started)) <= CREATE_TIME_TOLERANCE
        if job_dir is None:
            return True
        return str(job_dir) in " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return False
    except psutil.AccessDenied:  # another user's process: it exists, and nothing more can be told
        return True
    except (ValueError, OverflowError):
        return False


def kill_tree(pid: int, grace_seconds: float = 5.0, started: float | None = None, handle: subprocess.Popen | None = None) -> None:
    """Terminate a process and every process below it, children first; kill what is left after ``grace_seconds``.

    The tree is listed before anything is signalled (a child whose parent
    died is re-parented and could no longer be found). ``started`` guards
    against a reused pid (nothing is killed then); ``handle``, the Popen of a
    worker this process started, is waited on through Popen so that its exit
    code is kept (and no zombie is left). On POSIX the worker leads its own
    session: what is left in its process group afterwards (a grandchild that
    escaped the listing) is killed too.
    """
    if pid == os.getpid():
        raise RuntimeError(
            "kill_tree: refusing to kill this process (a job of the in-process runner is cancelled through its status)"
        )
    psutil = _psutil()
    leads_group = False
    try:
        root = psutil.Process(pid)
        if started is not None and abs(root.create_time() - float(started)) > CREATE_TIME_TOLERANCE:
            return
        children = root.children(recursive=True)
        leads_group = sys.platform != "win32" and os.getpgid(pid) == pid
    except (psutil.NoSuchProcess, ProcessLookupError):
        children, root = [], None
    except (psutil.AccessDenied, PermissionError):
        return
    for child in reversed(children):  # the deepest last listed: children before their parents
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    if root is not None:
        try:
            root.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_seconds
    gone_root = root is None
    if handle is not None:
        try:
            handle.wait(timeout=grace_seconds)
            gone_root = True
        except subprocess.TimeoutExpired:
            pass
    _, alive = psutil.wait_procs(
        children + ([] if gone_root or root is None else [root]), timeout=max(0.0, deadline - time.monotonic())
    )
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    if handle is not None and handle.poll() is None:
        handle.wait()
    psutil.wait_procs(alive, timeout=grace_seconds)
    if leads_group:
        import signal

        try:  # the worker started its own session: what is left of its group escaped the listing
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def popen_options() -> dict:
    """Popen arguments that detach a worker from this process's console and signals, per platform."""
    if sys.platform == "win32":
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200) | getattr(subprocess, "CREATE_NO_WINDOW", 0x8000000)
        return {"creationflags": flags}
    return {"start_new_session": True}  # its own session and process group: Ctrl+C of a terminal does not reach it


def judged_here(status: JobStatus) -> bool:
    """Whether this host can judge the job's worker: a local kind (or none recorded) and this host (or none)."""
    return status.runner in LOCAL_KINDS and status.host in (None, this_host())


def runs_elsewhere(status: JobStatus) -> bool:
    """A job another backend or host has in hand (running there, or queued with a batch id): watched, never started
    or killed here, and holding no local slot."""
    if status.final or judged_here(status):
        return False
    return status.state == JobState.RUNNING or bool(status.runner_id)


def mark_dead_worker_failed(job: Job, alive: Callable[[JobStatus], bool]) -> JobStatus:
    """The job's status; a "running" job whose worker ``alive`` says is gone becomes failed (checked again under
    the job's lock). It ended when it was last heard of, not when the death is noticed (perhaps hours later)."""
    status = job.status()
    if status.state != JobState.RUNNING or alive(status):
        return status
    with job.lock.hold("mark a dead worker failed"):
        status = job.status()  # again under the lock: another runner may have started it just now
        if status.state == JobState.RUNNING and not alive(status):
            tail = job.log_summary()
            status = job.update(
                state=JobState.FAILED,
                ended=status.updated or now_iso(),
                message="the worker process died (killed, or out of memory?)" + (f"; log:\n{tail}" if tail else ""),
            )
    return status


@dataclass
class LocalRunnerSettings:
    """How local workers start: the interpreter (``PythonSlicer`` in Slicer), parallelism and the child environment."""

    python: str = sys.executable
    max_parallel: int = field(default_factory=default_parallel)
    env: Mapping[str, str] = field(default_factory=dict)  # added to the child's environment only
    poll_seconds: float = 0.5
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    share_cores: bool = True  # running jobs that declare ``threads`` share the cores of idle slots (see _share_cores)
    grace_seconds: float = 5.0  # cancel: how long a terminated worker may take to end before it is killed


class LocalRunner(BaseRunner):
    """Runs jobs as local worker processes, at most ``max_parallel`` at a time, each in its own process group."""

    kind = "local"

    def __init__(self, settings: LocalRunnerSettings | None = None):
        self.settings = settings or LocalRunnerSettings()
        self._queue: list[Job] = []
        self._running: dict[Path, tuple[Job, Any]] = {}  # started here: the job and its handle (a Popen)
        self._adopted: dict[Path, Job] = {}  # alive, started by another runner: they hold a slot until they end
        self._foreign: dict[Path, Job] = {}  # in another backend's or host's hands: watched through their files only
        self._reaped: list[Job] = []  # ended workers refresh() reaped since the last poll (poll returns them)
        self._asked: dict[Path, int | None] = {}  # threads each live job asked for (its inputs, read once)
        self._allotted: dict[Path, int] = {}  # threads last allotted to each live job

    @property
    def capacity(self) -> int:
        return self.settings.max_parallel

    @property
    def poll_seconds(self) -> float:
        return self.settings.poll_seconds

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
        env["AL3D_RUNNER"] = self.kind
        env.pop("AL3D_RUNNER_ID", None)
        return env

    def _settled(self, path: Path) -> bool:
        return path not in self._running  # poll() reaps it (its exit code, a death without a word)

    # --------------------------------------------------------------- liveness
    def _alive(self, status: JobStatus, job: Job) -> bool:
        """Whether a "running" job's worker lives, as far as this host can tell (others' jobs count as alive)."""
        if not judged_here(status):
            return True
        return worker_alive(status.pid, status.pid_started, job.path)

    def refresh(self, job: Job) -> JobStatus:
        """The job's status; a "running" job whose worker died without a word becomes failed.

        A job this runner started is judged by its handle in :meth:`poll` (it
        has the exit code); a job of another backend or host is left to it.
        """
        if job.path in self._running:
            self._reap(job.path)
            return job.status()
        return mark_dead_worker_failed(job, lambda status: self._alive(status, job))

    def _reap(self, path: Path) -> bool:
        """If the worker this runner started for ``path`` has ended, forget it; one that ended without a word (SIGKILL,
        out of memory) is marked failed with its exit code and log tail. True when it ended."""
        job, handle = self._running[path]
        code = handle.poll()
        if code is None:
            return False
        del self._running[path]
        status = job.status()
        if not status.final:  # killed before it could say so
            tail = job.log_summary()
            job.update(
                state=JobState.FAILED,
                ended=now_iso(),
                exit_code=code,
                message=f"the worker exited with code {code} without finishing" + (f"; log:\n{tail}" if tail else ""),
            )
        elif status.state == JobState.FAILED and status.exit_code is None:  # another runner saw it die first (refresh)
            job.update(exit_code=code)
        self._reaped.append(job)
        return True

    # ------------------------------------------------------------- submitting
    def submit(self, job: Job) -> None:
        """Queue a job; a job already done is not run again (so a re-run after a crash resumes).

        A job whose worker is alive (started by another runner, e.g. an earlier
        Slicer session or another terminal) is adopted: left to it and watched
        through its files; it counts against ``max_parallel`` until it ends, so a
        restarted driver does not start a second training beside it.
        """
        if (
            job.path in self._running
            or job.path in self._adopted
            or job.path in self._foreign
            or any(q.path == job.path for q in self._queue)
        ):
            return
        with job.lock.hold("queue the job"):  # never re-queue a job another runner is starting right now
            status = self.refresh(job)
            if status.state == JobState.DONE:
                return
            if runs_elsewhere(status):  # a Slurm batch job, a worker on another host: not started twice
                self._foreign[job.path] = job
                return
            if status.state == JobState.RUNNING:
                self._adopted[job.path] = job
                return
            if status.state != JobState.QUEUED:
                job.update(
                    state=JobState.QUEUED,
                    progress=0.0,
                    message="",
                    pid=None,
                    pid_started=None,
                    host=None,
                    runner=None,
                    runner_id=None,
                    started=None,
                    ended=None,
                    exit_code=None,
                    earlier=status.attempts_before_restart(),
                )
        self._queue.append(job)

    def adopt(self, job: Job) -> bool:
        """Watch a job whose worker still runs (started by an earlier session) instead of starting it twice.

        True when adopted (it holds a slot until it ends); a job not running,
        or whose worker died (then marked failed), is not.
        """
        if job.path in self._running or job.path in self._adopted or job.path in self._foreign:
            return True
        status = self.refresh(job)
        if runs_elsewhere(status):
            self._foreign[job.path] = job
            return True
        if status.state != JobState.RUNNING:
            return False
        self._adopted[job.path] = job
        return True

    def active(self) -> list[Job]:
        return (
            [j for j, _ in self._running.values()]
            + list(self._adopted.values())
            + list(self._queue)
            + list(self._foreign.values())
        )

    def poll(self) -> list[Job]:
        """Reap finished workers, fail the ones that died silently, start queued jobs; returns jobs that ended."""
        for path in list(self._running):
            self._reap(path)
        ended, self._reaped = self._reaped, []
        for path, job in list(self._adopted.items()):
            if self.refresh(job).state != JobState.RUNNING:  # refresh marks a worker that died without a word as failed
                del self._adopted[path]
                ended.append(job)
        for path, job in list(self._foreign.items()):
            if not runs_elsewhere(job.status()):  # ended there (or handed back): no longer watched
                del self._foreign[path]
                ended.append(job)
        while self._queue and len(self._running) + len(self._adopted) < self.settings.max_parallel:
            job = self._queue.pop(self._next_index())
            if job.status().state == JobState.CANCELLED:
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
            status = self.refresh(job)
            if runs_elsewhere(status):
                self._foreign[job.path] = job
                return
            if status.state == JobState.RUNNING:
                self._adopted[job.path] = job
                return
            if status.final:
                return
            job.threads_path.unlink(missing_ok=True)  # an earlier run's allotment; _share_cores writes this run's
            handle, pid, started = self._launch(job)
            self._running[job.path] = (job, handle)
            job.update(
                state=JobState.RUNNING,
                pid=pid,
                pid_started=started,
                host=this_host(),
                runner=self.kind,
                runner_id=None,
                started=now_iso(),
                ended=None,
                message="starting",
                progress=0.0,
                exit_code=None,
            )  # the worker takes it over with its own pid

    def _launch(self, job: Job) -> tuple[Any, int, float | None]:
        """Start the worker process; its handle, pid and create time."""
        with open(job.log_path, "ab") as log:
            proc = subprocess.Popen(
                [self.settings.python, "-m", "ActiveLearning3DLib.worker", str(job.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_environment(job),
                cwd=str(job.path),
                **popen_options(),
            )
        return proc, proc.pid, process_create_time(proc.pid)

    # ------------------------------------------------------------- cancelling
    def cancel(self, job: Job) -> JobStatus:
        """Cancel a queued or running job (and every process it started)."""
        self._queue = [q for q in self._queue if q.path != job.path]
        self._adopted.pop(job.path, None)
        self._foreign.pop(job.path, None)
        entry = self._running.pop(job.path, None)
        if entry is not None:
            code = self._stop(entry[0], entry[1])
            return job.update(state=JobState.CANCELLED, ended=now_iso(), message="cancelled", exit_code=code)
        status = job.status()
        if status.final:
            return status
        if runs_elsewhere(status):
            raise JobError(
                f"{job.path}: it runs under the {status.runner or 'local'} runner"
                + (f" on {status.host}" if status.host else "")
                + "; cancel it with that runner"
            )
        if (
            status.state == JobState.RUNNING
            and judged_here(status)
            and status.pid != os.getpid()
            and worker_alive(status.pid, status.pid_started, job.path)
        ):
            kill_tree(status.pid, self.settings.grace_seconds, status.pid_started)
        # a job of the in-process runner in this process reads "cancelled" at its next report and stops
        return job.update(state=JobState.CANCELLED, ended=now_iso(), message="cancelled")

    def _stop(self, job: Job, handle: Any) -> int | None:
        """Kill a worker this runner started, by its handle (it may not have written its pid yet); its exit code."""
        kill_tree(handle.pid, self.settings.grace_seconds, handle=handle)  # the Popen is ours: no pid-reuse risk
        return handle.wait()
