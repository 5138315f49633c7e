"""``python -m ActiveLearning3DLib.worker JOB_DIR``: run one job and report through its files.

The runner starts this with stdout and stderr going to the job's log.txt. The
worker marks the job running, runs its task, and ends it done (with the
task's result in result.json) or failed (with the error and the log tail).
SIGTERM (cancel) ends it as cancelled.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from .fileio import atomic_write_json
from .jobs.store import Job, summarise
from .jobs.tasks import Reporter, resolve_task
from .project import now_iso


class Cancelled(BaseException):
    """Raised in the worker by SIGTERM, so that the task unwinds and the job ends as cancelled."""


def _on_sigterm(signum, frame):  # noqa: ANN001
    raise Cancelled()


def run_job(job_dir: Path | str) -> int:
    job = Job(job_dir)
    spec = job.spec()
    if job.status().state in ("done", "cancelled"):
        print(f"{job.path}: already {job.status().state}; nothing to do", flush=True)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    with job.lock.hold("worker start"):  # after the runner that started this worker has marked the job running
        status = job.status()
        launched = status.state == "running" and status.pid in (os.getpid(), os.getppid())  # by a runner, just now
        job.update(state="running", pid=os.getpid(), started=status.started if launched else now_iso(), ended=None,
                   message="", progress=0.0, exit_code=None,
                   earlier=status.earlier if launched else status.attempts_before_restart())  # run by hand: it counts
    print(f"[{now_iso()}] {spec.kind} job {job.name} on {sys.executable} (pid {os.getpid()})", flush=True)
    report = Reporter(job)
    try:
        result = resolve_task(spec.kind)(spec.inputs, report)
        report.flush()
    except Cancelled:
        job.update(state="cancelled", ended=now_iso(), message="cancelled")
        return 143
    except BaseException as e:  # noqa: BLE001 - every failure must end the job as failed, never 'running'
        traceback.print_exc()
        sys.stdout.flush()
        job.update(state="failed", ended=now_iso(), exit_code=1,
                   message=f"{type(e).__name__}: {summarise(str(e), 300, 600)}\n{job.log_summary()}")
        return 1
    atomic_write_json(job.path / "result.json", result)
    job.update(state="done", progress=1.0, ended=now_iso(), exit_code=0, message="done")
    print(f"[{now_iso()}] done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ActiveLearning3DLib.worker JOB_DIR", file=sys.stderr)
        return 2
    return run_job(args[0])


if __name__ == "__main__":
    sys.exit(main())
