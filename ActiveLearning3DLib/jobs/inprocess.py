"""``InProcessRunner``: jobs run in threads of this process, through the same job folders, for fast tests.

It saves a worker interpreter's start (a second or more with torch) per job,
and keeps everything else of the protocol: the job is marked running with
this process's pid and create time, ends done, failed or cancelled in its
status.json, and another runner (a restarted CLI) judges it by the same
liveness rules. What it cannot do, it refuses plainly: a job that needs its
own environment variables (nnU-Net's folders; this process's environment
is never changed), and killing a task: cancel is a request the task sees at
its next progress report (``Reporter``), as does a job marked cancelled by
another runner. What a task prints goes to this process's stdout; the log
gets the worker's own lines and a failure's traceback.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

from .local import LocalRunner, process_create_time
from .store import Job, JobError, JobState
from .work import execute


@dataclass
class InProcessRunnerSettings:
    """Threads at a time and how often to poll; the cores are this process's (torch threads are process-wide)."""

    max_parallel: int = 1
    poll_seconds: float = 0.05
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    share_cores: bool = False  # torch's thread count is one per process: allotments would fight each other
    grace_seconds: float = 5.0  # cancel: how long to wait for the task's next report


class _ThreadHandle:
    """A job's thread with the few Popen methods the local runner uses (``pid``, ``poll``, ``wait``)."""

    def __init__(self, job: Job):
        self.job = job
        self.pid = os.getpid()
        self.returncode: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"al3d job {job.name}", daemon=True)

    def _stopped(self) -> bool:
        return self.stop.is_set() or self.job.status().state == JobState.CANCELLED  # cancelled here or by another runner

    def _run(self) -> None:
        code = 1
        try:
            with open(self.job.log_path, "a", encoding="utf-8") as log:
                code = execute(self.job, "inprocess", None, stop=self._stopped, out=log)
        finally:
            self.returncode = code

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired(f"job {self.job.name}", timeout or 0.0)
        return self.returncode


class InProcessRunner(LocalRunner):
    """Runs each job's task in a thread of this process, at most ``max_parallel`` at a time."""

    kind = "inprocess"

    def __init__(self, settings: InProcessRunnerSettings | None = None):
        super().__init__(None)
        self.settings = settings or InProcessRunnerSettings()  # type: ignore[assignment]

    def submit(self, job: Job) -> None:
        env = job.spec().env
        if env:
            raise JobError(
                f"{job.path}: the in-process runner cannot give a job its own environment "
                f"({', '.join(sorted(env))}); use the local runner"
            )
        super().submit(job)

    def _launch(self, job: Job) -> tuple[Any, int, float | None]:
        handle = _ThreadHandle(job)
        handle.thread.start()
        return handle, handle.pid, process_create_time(handle.pid)

    def _stop(self, job: Job, handle: Any) -> int | None:
        """Ask the task to stop and wait a grace period for it (a thread cannot be killed); its exit code."""
        handle.stop.set()
        handle.thread.join(self.settings.grace_seconds)
        return handle.returncode
