"""What a worker does with one job, wherever it runs: a worker process (``ActiveLearning3DLib.worker``), a
thread of the in-process runner, or a batch job on a cluster node."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, TextIO

from ..fileio import atomic_write_json
from ..locking import this_host
from ..fileio import now_iso
from .local import process_create_time
from .store import Job, JobState, summarise
from .tasks import Cancelled, Reporter, resolve_task


def execute(
    job: Job,
    runner: str = "local",
    runner_id: str | None = None,
    stop: Callable[[], bool] | None = None,
    out: TextIO | None = None,
) -> int:
    """Mark the job running with this process, run its task, and end it done, failed or cancelled; the exit code.

    ``stop`` is asked at every progress report (the in-process runner's cancel);
    a worker process is cancelled by SIGTERM instead (see :func:`run_job`). ``out``
    gets this function's lines and a failure's traceback (default: stdout, the
    worker's log); what the task itself prints goes to stdout.
    """
    out = out or sys.stdout
    spec = job.spec()
    if job.status().state in (JobState.DONE, JobState.CANCELLED):
        print(f"{job.path}: already {job.status().state}; nothing to do", file=out, flush=True)
        return 0
    with job.lock.hold("worker start"):  # after the runner that started this worker has marked the job running
        status = job.status()
        launched = status.state == JobState.RUNNING and status.pid in (os.getpid(), os.getppid())  # by a runner, just now
        job.update(
            state=JobState.RUNNING,
            pid=os.getpid(),
            pid_started=process_create_time(os.getpid()),
            host=this_host(),
            runner=runner,
            runner_id=runner_id or (status.runner_id if status.runner == runner else None),
            started=status.started if launched else now_iso(),
            ended=None,
            message="",
            progress=0.0,
            exit_code=None,
            earlier=status.earlier if launched else status.attempts_before_restart(),
        )  # run by hand: it counts
    print(f"[{now_iso()}] {spec.kind} job {job.name} on {sys.executable} (pid {os.getpid()})", file=out, flush=True)
    report = Reporter(job, stop=stop)
    try:
        result = resolve_task(spec.kind)(spec.inputs, report)
        report.flush()
        if stop is not None and stop():
            raise Cancelled()
    except Cancelled:
        job.update(state=JobState.CANCELLED, ended=now_iso(), message="cancelled")
        return 143
    except BaseException as e:  # noqa: BLE001 - every failure must end the job as failed, never 'running'
        traceback.print_exc(file=out)
        out.flush()
        job.update(
            state=JobState.FAILED,
            ended=now_iso(),
            exit_code=1,
            message=f"{type(e).__name__}: {summarise(str(e), 300, 600)}\n{job.log_summary()}",
        )
        return 1
    atomic_write_json(job.path / "result.json", result)
    job.update(state=JobState.DONE, progress=1.0, ended=now_iso(), exit_code=0, message="done")
    print(f"[{now_iso()}] done", file=out, flush=True)
    return 0
