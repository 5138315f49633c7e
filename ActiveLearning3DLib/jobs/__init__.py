"""Background jobs: folders that report through files, workers that run them, runners that start them."""

from .inprocess import InProcessRunner, InProcessRunnerSettings
from .local import LocalRunner, LocalRunnerSettings
from .factory import make_runner
from .runner import RUNNER_KINDS, BaseRunner, JobRunner, RunnerSettings
from .store import FINAL_STATES, JOB_STATES, Job, JobError, JobSpec, JobState, JobStatus, busy_seconds, seconds_between
from .tasks import TASKS, Cancelled, Reporter

__all__ = [
    "FINAL_STATES",
    "JOB_STATES",
    "RUNNER_KINDS",
    "TASKS",
    "BaseRunner",
    "Cancelled",
    "InProcessRunner",
    "InProcessRunnerSettings",
    "Job",
    "JobError",
    "JobRunner",
    "JobSpec",
    "JobState",
    "JobStatus",
    "LocalRunner",
    "LocalRunnerSettings",
    "Reporter",
    "RunnerSettings",
    "busy_seconds",
    "make_runner",
    "seconds_between",
]
