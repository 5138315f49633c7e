"""``make_runner``: the one place where job runners are built, from :class:`~.runner.RunnerSettings`.

The Slurm backend (``jobs/slurm.py``) is imported only when asked for, so
nothing else needs its commands or settings.
"""

from __future__ import annotations

from .inprocess import InProcessRunner, InProcessRunnerSettings
from .local import LocalRunner, LocalRunnerSettings
from .runner import RUNNER_KINDS, JobRunner, RunnerSettings


def make_runner(settings: RunnerSettings | None = None) -> JobRunner:
    """The runner ``settings.kind`` names: the one place where runners are built.

    ``slurm`` is imported only here and only when asked for; it is built as
    ``SlurmRunner(settings)`` and reads ``settings.slurm``.
    """
    settings = settings or RunnerSettings()
    if settings.kind not in RUNNER_KINDS:  # a settings object changed after it was made
        raise ValueError(f"runner kind: unknown {settings.kind!r}; known: {', '.join(RUNNER_KINDS)}")
    common = {
        k: v
        for k, v in (
            ("python", settings.python),
            ("max_parallel", settings.max_parallel),
            ("poll_seconds", settings.poll_seconds),
            ("cores", settings.cores),
        )
        if v is not None
    }
    if settings.kind == "local":
        return LocalRunner(LocalRunnerSettings(env=dict(settings.env), share_cores=settings.share_cores, **common))
    if settings.kind == "inprocess":
        common.pop("python", None)  # it runs in this interpreter
        return InProcessRunner(InProcessRunnerSettings(**common))
    from .slurm import SlurmRunner

    return SlurmRunner(settings)
