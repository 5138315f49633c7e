"""Background jobs: folders that report through files, workers that run them, runners that start them."""
from .runner import JobRunner, LocalRunner, LocalRunnerSettings
from .store import FINAL_STATES, JOB_STATES, Job, JobError, JobSpec, JobStatus, busy_seconds, seconds_between
from .tasks import TASKS, Reporter

__all__ = ["FINAL_STATES", "JOB_STATES", "TASKS", "Job", "JobError", "JobRunner", "JobSpec", "JobStatus",
           "LocalRunner", "LocalRunnerSettings", "Reporter", "busy_seconds", "seconds_between"]
