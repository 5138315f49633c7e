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
from pathlib import Path

from .jobs.store import Job, JobState
from .jobs.tasks import Cancelled
from .jobs.work import execute

__all__ = ["Cancelled", "execute", "main", "run_job"]


def _on_sigterm(signum, frame):  # noqa: ANN001
    raise Cancelled()


def run_job(job_dir: Path | str) -> int:
    """Run the job in this process (its main thread), as the worker of the runner named by ``AL3D_RUNNER``.

    A runner passes ``AL3D_RUNNER`` (and ``AL3D_RUNNER_ID``, e.g. the Slurm job
    id) to the worker's environment so the status says which backend judges
    it; a worker started by hand is a local process.
    """
    job = Job(job_dir)
    if job.status().state in (JobState.DONE, JobState.CANCELLED):
        print(f"{job.path}: already {job.status().state}; nothing to do", flush=True)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    return execute(job, os.environ.get("AL3D_RUNNER") or "local", os.environ.get("AL3D_RUNNER_ID") or None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ActiveLearning3DLib.worker JOB_DIR", file=sys.stderr)
        return 2
    return run_job(args[0])


if __name__ == "__main__":
    sys.exit(main())
