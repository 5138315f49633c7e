"""The kinds of work a job can do, by name, and the reporter a task uses to tell how far it is.

Tasks are named as ``module:function`` and imported only in the worker that
runs them, so starting a job never imports torch in the parent (Slicer's GUI).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from typing import Any, Callable

from .store import Job, JobError

# kind -> "module:function"; the function takes (inputs: dict, report: Reporter) and returns a JSON-able result.
TASKS: dict[str, str] = {
    "selftest": "ActiveLearning3DLib.jobs.tasks:selftest",
    "nnunet_prepare": "ActiveLearning3DLib.nnunet.tasks:prepare_task",
    "nnunet_train": "ActiveLearning3DLib.nnunet.tasks:train_task",
    "nnunet_score": "ActiveLearning3DLib.nnunet.tasks:score_task",
    "nnunet_evaluate": "ActiveLearning3DLib.nnunet.tasks:evaluate_task",
    "nnunet_predict": "ActiveLearning3DLib.nnunet.tasks:predict_task",
    "pool_embeddings": "ActiveLearning3DLib.embeddings.store:embed_task",
}


class Cancelled(BaseException):
    """Raised in a task when its job is cancelled (SIGTERM in a worker process, the in-process runner's request),
    so that the task unwinds and the job ends as cancelled."""


class Reporter:
    """Writes progress into the job's status.json, at most every ``min_interval`` seconds unless forced.

    Changes held back by the interval are kept and written by the next call or
    by :meth:`flush`, so the last word of a task is never lost.

    It also carries the runner's word back: a task that calls
    :meth:`follow_threads` has the runner's thread allotment (``threads.json``,
    more threads while the job runs alone) applied whenever it writes progress.
    """

    def __init__(self, job: Job, min_interval: float = 0.5, stop: Callable[[], bool] | None = None):
        self.job = job
        self.min_interval = min_interval
        self.stop = stop  # asked at every report: True raises Cancelled (a task in a thread cannot be killed)
        self._last = 0.0
        self._pending: dict[str, Any] = {}
        self._apply_threads: Callable[[int], Any] | None = None
        self._threads: int | None = None

    def follow_threads(self, apply: Callable[[int], Any]) -> None:
        """Call ``apply(n)`` with the allotment now and each time it changes (checked at every progress write)."""
        self._apply_threads = apply
        self._threads = None
        self._follow()

    def _follow(self) -> None:
        if self._apply_threads is None:
            return
        threads = self.job.allotted_threads()
        if threads and threads != self._threads:
            self._threads = threads
            self._apply_threads(threads)

    def __call__(self, force: bool = False, **status: Any) -> None:
        if self.stop is not None and self.stop():
            raise Cancelled()
        self._pending.update(status)
        if force or time.monotonic() - self._last >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.job.update(**self._pending)
            self._pending = {}
        self._follow()
        self._last = time.monotonic()


def torch_threads(inputs: dict, report: Reporter) -> None:
    """Torch threads as the job asks (``inputs["threads"]``), then as the runner allots while it runs (more when alone).

    Set once for the whole worker process: code below must not set a thread
    count of its own (an ensemble load, a training loop), or it would undo the
    allotment until the next change.
    """
    threads = inputs.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
        report.follow_threads(torch.set_num_threads)


def resolve_task(kind: str) -> Callable[[dict, Reporter], Any]:
    try:
        target = TASKS[kind]
    except KeyError:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(TASKS)}") from None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def selftest(inputs: dict, report: Reporter) -> dict:
    """Checks that a worker interpreter runs our code (``al3d jobs --selftest``) and exercises the runner.

    Counts ``steps`` steps of ``seconds`` each with progress; optionally starts a
    child process (to test that cancel kills the whole tree), prints an
    environment variable (to check the child environment) or each thread
    allotment it follows (to check the runner's core sharing), or fails on purpose.
    """
    steps = int(inputs.get("steps", 3))
    if inputs.get("print_env"):
        print(f"{inputs['print_env']}={os.environ.get(inputs['print_env'], '')}", flush=True)
    if inputs.get("follow_threads"):
        report.follow_threads(lambda n: print(f"threads {n}", flush=True))
    if inputs.get("spawn_child"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"child pid {child.pid}", flush=True)
    for step in range(steps):
        if inputs.get("fail_at") == step:
            raise RuntimeError(f"selftest failed on purpose at step {step}")
        print(f"step {step + 1}/{steps}", flush=True)
        time.sleep(float(inputs.get("seconds", 0.1)))
        report(progress=(step + 1) / steps, stage="selftest", iteration=step + 1)
    return {"steps": steps, "python": sys.executable, "version": sys.version.split()[0]}
