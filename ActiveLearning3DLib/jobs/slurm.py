"""``SlurmRunner``: every job is one Slurm batch job running ``python -m ActiveLearning3DLib.worker JOB_DIR``.

The project folder must be on a filesystem the cluster's nodes share with the
machine that submits (the worker reports through the job folder, as it does
for the local runner). A job's state comes from its folder (``status.json``,
written by the worker) and, for jobs whose folder does not say they ended,
from one ``squeue`` call per poll for all of them. A batch job that ended
without its worker finishing (time limit, out of memory, node failure,
preemption, an administrator's ``scancel``) is marked failed with Slurm's
reason and the log's tail; running the job again submits a new batch job, and
an nnU-Net training resumes from its latest checkpoint (the worker does that).

The batch script and the Slurm job id are kept in the job folder
(``slurm.sh``, ``slurm.json``), so a runner started later (a restarted CLI or
Slicer) adopts a batch job that is still queued or running instead of
submitting it twice. The worker's environment is written into the script
(``sbatch --export=NONE`` by default: the node's login environment, then the
setup lines, then the variables); the environment of the process that submits
is never changed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..fileio import JsonFileError, atomic_write_json, atomic_write_text, read_json_object
from ..fileio import now_iso
from .store import Job, JobError, JobState, JobStatus

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds ActiveLearning3DLib

# Slurm job states in which the batch job may still run its worker (squeue's long names)
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
# where a batch job's worker may have written its last word just before the end: give the shared filesystem a
# moment to show it before calling the job failed
QUIET_ENDS = frozenset({"COMPLETED", "FAILED"})

_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SlurmError(JobError):
    """A Slurm command that failed or a setting Slurm would refuse."""


@dataclass
class SlurmSettings:
    """How batch jobs are asked for and how their worker starts; given once per project or per command.

    Options left ``None`` are not passed, so the cluster's defaults apply.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None  # sbatch --time: minutes, H:MM:SS, D-HH[:MM[:SS]]
    gpus: str | None = None  # sbatch --gpus, e.g. "1" or "a100:1"
    gres: str | None = None  # sbatch --gres, e.g. "gpu:1"
    cpus_per_task: int | None = None  # default: the job's own ``threads`` input, else Slurm's default
    mem: str | None = None  # sbatch --mem, e.g. "32G"
    extra_args: list[str] = field(default_factory=list)  # more sbatch options, one per item, e.g. "--constraint=a100"
    setup: list[str] = field(
        default_factory=list
    )  # shell lines before the worker: "module load cuda", "source venv/bin/activate"
    python: str | None = (
        None  # the worker's interpreter as the nodes see it (default: this one; "python" after a venv activation)
    )
    env: dict[str, str] = field(default_factory=dict)  # variables for the worker (written into the batch script)
    export: str = "NONE"  # sbatch --export: NONE starts the worker from the node's login environment, not ours
    scheduler_env: dict[str, str] = field(default_factory=dict)  # for sbatch/squeue/scancel only (e.g. SLURM_CONF)
    max_submitted: int | None = None  # batch jobs queued at a time (None: every job at once)
    poll_seconds: float = 5.0  # how often squeue is asked (one call for all unfinished jobs)
    folder_seconds: float = 0.2  # how often ``wait`` reads the job folders (status.json), which say done first
    settle_seconds: float = 5.0  # how long an ended batch job's folder may lag behind the scheduler (shared FS)
    command_timeout: float = 60.0  # seconds a Slurm command may take

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise SlurmError(f"Slurm settings: {problem}")

    def problem(self) -> str | None:
        """What Slurm would refuse or the batch script could not hold, as one line (None when all is well)."""
        for name in ("partition", "account", "qos", "gpus", "gres", "time_limit", "mem", "python", "export"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or any(c in value for c in "\r\n")):
                return f"{name} {value!r} must be a non-empty one-line string"
        if self.time_limit is not None and not _TIME.match(self.time_limit):
            return f"time_limit {self.time_limit!r} is not a Slurm time (minutes, H:MM:SS or D-HH:MM:SS)"
        if self.mem is not None and not _MEM.match(self.mem):
            return f"mem {self.mem!r} is not a Slurm memory size (e.g. 16G, 8000M)"
        if self.cpus_per_task is not None and (
            isinstance(self.cpus_per_task, bool) or not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1
        ):
            return f"cpus_per_task {self.cpus_per_task!r} must be a whole number of at least 1"
        for name in ("extra_args", "setup"):
            items = getattr(self, name)
            if not isinstance(items, list) or not all(isinstance(i, str) and "\n" not in i and "\r" not in i for i in items):
                return f"{name} must be a list of one-line strings"
        for arg in self.extra_args:
            if not arg.startswith("-"):
                return f"extra sbatch argument {arg!r} is not an option (give each as --name=value)"
        for name in ("env", "scheduler_env"):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict):
                return f"{name} must map variable names to values"
            for key, value in mapping.items():
                if not isinstance(key, str) or not _ENV_NAME.match(key) or not isinstance(value, str):
                    return f"{name}: {key!r} is not a variable name with a string value"
        if self.max_submitted is not None and (
            isinstance(self.max_submitted, bool) or not isinstance(self.max_submitted, int) or self.max_submitted < 1
        ):
            return f"max_submitted {self.max_submitted!r} must be a whole number of at least 1"
        for name in ("poll_seconds", "folder_seconds", "settle_seconds", "command_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                return f"{name} {value!r} must be a number of seconds"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "Slurm settings") -> "SlurmSettings":
        """Settings from a JSON object; an unknown key or a bad value is an error naming ``where``."""
        if not isinstance(data, Mapping):
            raise SlurmError(f"{where}: expected a JSON object of Slurm settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SlurmError(
                f"{where}: unknown Slurm setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**dict(data))
        except SlurmError as e:
            raise SlurmError(f"{where}: {str(e).removeprefix('Slurm settings: ')}") from None

    def merged(self, **changes: Any) -> "SlurmSettings":
        """A copy with the given settings replaced (``None`` leaves a setting as it is)."""
        values = self.to_json()
        values.update({k: v for k, v in changes.items() if v is not None})
        return SlurmSettings.from_json(values)


PROJECT_RUNNER = "runner.json"  # in a project folder: {"kind": "local" | "slurm", "slurm": {...SlurmSettings}}


def load_project_runner(project_path: Path | str) -> tuple[str | None, SlurmSettings | None]:
    """The runner kind and Slurm settings saved in a project folder ((None, None) where none were saved)."""
    path = Path(project_path) / PROJECT_RUNNER
    if not path.is_file():
        return None, None
    try:
        data = read_json_object(path)
    except JsonFileError as e:
        raise SlurmError(f"{path}: unreadable runner settings ({e.problem})") from None
    except OSError as e:
        raise SlurmError(f"{path}: unreadable runner settings ({e.strerror or e})") from None
    if data.get("kind") not in ("local", "slurm"):
        raise SlurmError(f'{path}: expected {{"kind": "local" or "slurm", "slurm": {{...}}}}')
    slurm = data.get("slurm")
    return data["kind"], None if slurm is None else SlurmSettings.from_json(slurm, where=f"{path}: slurm")


def load_project_settings(project_path: Path | str) -> SlurmSettings | None:
    """The Slurm settings saved in a project folder, or None where none were saved."""
    return load_project_runner(project_path)[1]


def save_project_runner(project_path: Path | str, kind: str, slurm: SlurmSettings | None) -> Path:
    """Save the runner kind and Slurm settings in the project, so later commands (and the panel) need not repeat
    them. The scheduler's environment and poll intervals are the caller's and are not saved."""
    if kind not in ("local", "slurm"):
        raise SlurmError(f"runner kind {kind!r}: a project saves local or slurm")
    path = Path(project_path) / PROJECT_RUNNER
    saved = None
    if slurm is not None:
        saved = slurm.to_json()
        for key in ("scheduler_env", "poll_seconds", "folder_seconds", "settle_seconds", "command_timeout"):
            saved.pop(key)
    atomic_write_json(path, {"kind": kind, "slurm": saved})
    return path


def project_runner(project_path: Path | str) -> "SlurmRunner | None":
    """A Slurm runner built from the project's saved settings when the project chose Slurm (``al3d ... --runner
    slurm``), else None (the caller's local default). The Slicer panel uses this to submit to the cluster."""
    kind, slurm = load_project_runner(project_path)
    return SlurmRunner(slurm or SlurmSettings()) if kind == "slurm" else None


def save_project_settings(project_path: Path | str, settings: SlurmSettings) -> Path:
    """Save Slurm settings in the project (the runner kind becomes slurm)."""
    return save_project_runner(project_path, "slurm", settings)


@dataclass(frozen=True)
class BatchState:
    """What the scheduler says of one batch job."""

    job_id: str
    state: str  # squeue's long state name, e.g. RUNNING, TIMEOUT
    reason: str = ""
    exit_code: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


class SlurmRunner:
    """Submits each job as one Slurm batch job and follows it through its folder and one ``squeue`` per poll.

    Built by ``jobs.make_runner`` from ``RunnerSettings(kind="slurm", slurm=SlurmSettings(...))``
    (the runner settings' ``python``, ``env`` and ``poll_seconds`` fill what the
    Slurm settings leave open), or directly from ``SlurmSettings``. Its
    ``max_parallel`` is not used: every job goes to the scheduler at once,
    unless ``SlurmSettings.max_submitted`` caps how many are queued there.
    """

    kind = "slurm"

    def __init__(self, settings: Any = None):
        self.settings = _slurm_settings(settings)
        self._tracked: dict[Path, Job] = {}  # batch jobs submitted or adopted here, not seen to end yet
        self._unsure: dict[Path, tuple[Job, bool]] = {}  # a batch job on record, checked at the next poll: adopted
        # when the scheduler still has it, else submitted again (True) or only marked failed (False: adopt's)
        self._waiting: list[Job] = []  # held back by max_submitted
        self._draining: dict[Path, str] = {}  # ended by their folder, batch job maybe still in the queue (max_submitted)
        self._foreign: dict[Path, Job] = {}  # running under another backend (a local worker): watched by its files
        self._ended_at: dict[Path, float] = {}  # when the scheduler was first seen to have ended the batch job
        self._user_states: tuple[float, dict[str, BatchState]] | None = None  # adopt's one squeue, kept a poll long
        self._last_query: float | None = None  # when poll last asked squeue
        self.scheduler_calls = 0  # Slurm commands run (the benchmark and the tests count them)

    @property
    def capacity(self) -> int:
        """Batch jobs kept submitted at a time: ``max_submitted``, else as many as there are jobs."""
        return self.settings.max_submitted or max(1, len(self.active()))

    @property
    def poll_seconds(self) -> float:
        return self.settings.poll_seconds

    def slot_threads(self) -> int | None:
        """Torch threads per job: the CPUs each batch job asks for (None: left to the job)."""
        return self.settings.cpus_per_task

    # ------------------------------------------------------------------ scheduler commands
    def _command(self, args: Sequence[str], what: str) -> str:
        """Run a Slurm command with the scheduler's environment; its stdout, or a SlurmError naming it."""
        env = self._scheduler_environment()
        program = args[0]
        if shutil.which(program, path=env.get("PATH")) is None:
            raise SlurmError(
                f"{program} not found: run on a machine with Slurm's commands (a login node) or use the local runner"
            )
        self.scheduler_calls += 1
        try:
            done = subprocess.run(
                list(args),
                capture_output=True,
                text=True,
                env=env,
                check=False,
                timeout=self.settings.command_timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{what}: {program} did not answer within {self.settings.command_timeout:g} s") from None
        if done.returncode != 0:
            raise SlurmError(f"{what}: {program} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[:500]}")
        return done.stdout

    def _scheduler_environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.scheduler_env)
        return env

    def batch_states(self, job_ids: Iterable[str] | None) -> dict[str, BatchState]:
        """The scheduler's word on these batch jobs (None: all of this user's) in one ``squeue`` call; jobs it no
        longer knows are left out."""
        ids = None if job_ids is None else sorted({str(i) for i in job_ids}, key=lambda i: (len(i), i))
        if ids is not None and not ids:
            return {}
        which = ["--me"] if ids is None else [f"--jobs={','.join(ids)}"]
        try:
            out = self._command(
                ["squeue", "--noheader", "--states=all", *which, "--Format=JobID:|,State:|,Reason:|,exit_code:|"],
                "read the batch jobs' states",
            )
        except SlurmError as e:
            if "Invalid job id" in str(e):  # every one of them has left the controller's memory
                return {}
            raise
        found: dict[str, BatchState] = {}
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) < 2 or not parts[0] or not parts[1]:
                continue
            found[parts[0]] = BatchState(
                parts[0], parts[1].split()[0], parts[2] if len(parts) > 2 else "", parts[3] if len(parts) > 3 else ""
            )
        return found if ids is None else {i: found[i] for i in ids if i in found}

    # ------------------------------------------------------------------ the job folder's Slurm record
    @staticmethod
    def record_path(job: Job) -> Path:
        return job.path / "slurm.json"

    @staticmethod
    def script_path(job: Job) -> Path:
        return job.path / "slurm.sh"

    def record(self, job: Job) -> dict[str, Any]:
        """The batch job on record for this job folder ({} when none was submitted)."""
        path = self.record_path(job)
        if not path.is_file():
            return {}
        try:
            data = read_json_object(path)
        except (OSError, ValueError):
            return {}  # a damaged record: the job is submitted again when asked
        return data if data.get("job_id") else {}

    def batch_script(self, job: Job) -> str:
        """The batch script: sbatch options, setup lines, the worker's environment, then the worker."""
        s = self.settings
        spec = job.spec()
        options = [
            f"--job-name=al3d-{job.name}"[:200],
            f"--output={job.log_path}",
            "--open-mode=append",
            f"--chdir={job.path}",
            f"--export={s.export}",
        ]
        for flag, value in (
            ("partition", s.partition),
            ("account", s.account),
            ("qos", s.qos),
            ("time", s.time_limit),
            ("gpus", s.gpus),
            ("gres", s.gres),
            ("mem", s.mem),
        ):
            if value is not None:
                options.append(f"--{flag}={value}")
        cpus = s.cpus_per_task or spec.inputs.get("threads")
        if cpus:
            options.append(f"--cpus-per-task={int(cpus)}")
        options += s.extra_args
        env = {"PYTHONUNBUFFERED": "1", **s.env, **spec.env, "AL3D_RUNNER": self.kind}
        python = s.python or sys.executable
        lines = ["#!/bin/bash", f"# Written by ActiveLearning3D for job {job.name}; submitted with sbatch by the Slurm runner."]
        lines += [f"#SBATCH {o}" for o in options]
        lines += ["set -e"] + list(s.setup)
        lines.append(f"export PYTHONPATH={shlex.quote(str(PACKAGE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines.append('export AL3D_RUNNER_ID="$SLURM_JOB_ID"')
        lines.append(f"exec {shlex.quote(python)} -m ActiveLearning3DLib.worker {shlex.quote(str(job.path))}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ the runner protocol
    def refresh(self, job: Job) -> JobStatus:
        """The job's status as this runner sees it, without asking the scheduler (``poll`` does, for all at once).

        A job whose batch job this runner follows and whose worker wrote
        'cancelled' on its own (SIGTERM at a time limit or a preemption) reads
        as running until ``poll`` has Slurm's reason; a local worker's job is
        judged by the local runner's rules.
        """
        status = job.status()
        followed = job.path in self._tracked or job.path in self._unsure
        if followed and status.final and not self._folder_says_ended(job):
            return replace(status, state=JobState.RUNNING, message="ending; waiting for Slurm to say why")
        if not followed and status.state == JobState.RUNNING and status.runner != self.kind:
            from .local import judged_here, mark_dead_worker_failed, worker_alive

            return mark_dead_worker_failed(job, lambda st: not judged_here(st) or worker_alive(st.pid, st.pid_started, job.path))
        return status

    def submit(self, job: Job) -> None:
        """Submit a batch job for the job, unless it is done or already submitted or adopted.

        A job with a batch job on record that its folder does not show ended
        waits for the next poll, which asks the scheduler about all such jobs
        at once and adopts the ones still queued or running. A job a local
        worker runs is watched until it ends, never run twice.
        """
        if job.path in self._tracked or job.path in self._unsure or job.path in self._foreign or job in self._waiting:
            return
        status = self.refresh(job)
        if status.state == JobState.DONE:
            return
        if status.state == JobState.RUNNING and status.runner != self.kind:
            self._foreign[job.path] = job
            return
        if status.state in (JobState.QUEUED, JobState.RUNNING) and self.record(job):
            self._unsure[job.path] = (job, True)
            return
        if self._full():
            self._waiting.append(job)
            return
        self._submit_new(job, self.record(job).get("job_id"))

    def _submit_new(self, job: Job, known_id: str | None) -> None:
        """sbatch the job under its lock; a batch job another runner submitted since we looked is adopted instead.

        ``known_id`` is the batch job on record when the caller decided to
        submit (None when there was none); a different one under the lock is
        another runner's, submitted just now.
        """
        with job.lock.hold("submit the job to Slurm"):
            current = job.status()
            record = self.record(job)
            if current.state == JobState.DONE:
                return
            if record and str(record["job_id"]) != str(known_id or "") and not current.final:
                self._tracked[job.path] = job
                return
            script = self.script_path(job)
            atomic_write_text(script, self.batch_script(job))
            job.threads_path.unlink(missing_ok=True)
            if self.settings.cpus_per_task:  # the worker follows it (Reporter.follow_threads) whatever threads it asked
                job.allot_threads(self.settings.cpus_per_task)
            job.update(
                state=JobState.QUEUED,
                progress=0.0,
                message="submitting to Slurm",
                pid=None,
                pid_started=None,
                host=None,
                runner=self.kind,
                runner_id=None,
                started=None,
                ended=None,
                exit_code=None,
                earlier=current.attempts_before_restart(),
            )
            try:
                out = self._command(["sbatch", "--parsable", str(script)], f"submit {job.name}")
            except SlurmError as e:
                job.update(state=JobState.FAILED, ended=now_iso(), message=str(e))
                raise
            job_id = out.strip().split(";")[0]
            if not re.match(r"^\d+(_\d+)?$", job_id):
                job.update(state=JobState.FAILED, ended=now_iso(), message=f"sbatch printed no job id: {out.strip()[:200]}")
                raise SlurmError(f"submit {job.name}: sbatch printed no job id ({out.strip()[:200]})")
            atomic_write_json(
                self.record_path(job),
                {"job_id": job_id, "submitted": now_iso(), "cancelled": False, "replaced": record.get("job_id")},
            )
            job.update(runner_id=job_id, message=f"Slurm batch job {job_id} queued")
        self._tracked[job.path] = job
        self._ended_at.pop(job.path, None)

    def adopt(self, job: Job) -> bool:
        """Follow the job's batch job on record if the scheduler still has it queued or running.

        All adoptions within one poll interval share one ``squeue`` of this
        user's jobs (a restarted simulation adopts hundreds). A batch job that
        ended without its worker finishing makes the job failed, with the reason.
        """
        if job.path in self._tracked or job.path in self._unsure:
            return True
        record = self.record(job)
        status = job.status()
        if not record or status.final:
            return False
        now = time.monotonic()
        if self._user_states is None or now - self._user_states[0] > max(self.settings.poll_seconds, 1.0):
            self._user_states = (now, self.batch_states(None))
        state = self._user_states[1].get(str(record["job_id"]))
        if state is not None and state.active:
            self._tracked[job.path] = job
            return True
        if state is None or state.state not in QUIET_ENDS:  # known to have ended, or forgotten: it does not run
            self._fail_if_unfinished(job, state, str(record["job_id"]))
            return False
        self._unsure[job.path] = (job, False)  # just ended: the folder may still show its last word; poll decides
        return True

    def active(self) -> list[Job]:
        return (
            list(self._tracked.values())
            + [j for j, _ in self._unsure.values()]
            + list(self._foreign.values())
            + list(self._waiting)
        )

    def poll(self) -> list[Job]:
        """Follow the batch jobs; returns the jobs that ended.

        Job folders are read at every call; the scheduler is asked (one squeue
        for every job whose folder has not ended) at most once per
        ``poll_seconds``, however often a caller polls.
        """
        ended: list[Job] = []
        for path, job in list(self._tracked.items()):
            if self._folder_says_ended(job):
                del self._tracked[path]
                self._ended_at.pop(path, None)
                ended.append(job)
                if self.settings.max_submitted and self.record(job).get("job_id"):
                    self._draining[path] = str(self.record(job)["job_id"])  # its slot frees once squeue says so
        due = self._last_query is None or time.monotonic() - self._last_query >= 0.9 * self.settings.poll_seconds
        if (self._tracked or self._draining) and not due and not self._unsure:  # squeue is asked once an interval
            return ended + self._poll_foreign_and_waiting()
        need: dict[Path, str] = {}
        for path, job in [*self._tracked.items(), *((p, j) for p, (j, _) in self._unsure.items())]:
            job_id = self.record(job).get("job_id")
            if job_id:
                need[path] = str(job_id)
        asked = [*need.values(), *self._draining.values()]
        states = self.batch_states(asked) if asked else {}
        if asked:
            self._last_query = time.monotonic()
        for path, job_id in list(self._draining.items()):
            if job_id not in states or not states[job_id].active:
                del self._draining[path]
        for path, (job, resubmit) in list(self._unsure.items()):
            del self._unsure[path]
            state = states.get(need.get(path, ""))
            if state is not None and state.active:
                self._tracked[path] = job  # adopted: still queued or running, submitted by a runner that went away
                continue
            if self._folder_says_ended(job) and not resubmit:
                ended.append(job)
                continue
            if job.status().state == JobState.DONE:
                continue
            self._fail_if_unfinished(job, state, need.get(path))
            if resubmit:
                self._submit_new(job, need.get(path))
            else:
                ended.append(job)
        for path, job in list(self._tracked.items()):
            if path not in need:
                continue
            state = states.get(need[path])
            if state is not None and state.active:
                self._ended_at.pop(path, None)
                continue
            if state is None or state.state in QUIET_ENDS:  # the folder may show the worker's last word a bit later
                first = self._ended_at.setdefault(path, time.monotonic())
                if time.monotonic() - first < self.settings.settle_seconds and not self._folder_says_ended(job):
                    continue
            self._fail_if_unfinished(job, state, need[path])
            del self._tracked[path]
            self._ended_at.pop(path, None)
            ended.append(job)
        return ended + self._poll_foreign_and_waiting()

    def _full(self) -> bool:
        """Whether ``max_submitted`` batch jobs are in the queue: those followed, and those whose worker said done
        but that squeue still listed (the batch job ends a moment after its worker's last word)."""
        limit = self.settings.max_submitted
        return bool(limit) and len(self._tracked) + len(self._unsure) + len(self._draining) >= limit

    def _poll_foreign_and_waiting(self) -> list[Job]:
        """Jobs of another backend that ended; held-back jobs submitted where ``max_submitted`` allows."""
        ended = []
        for path, job in list(self._foreign.items()):
            if self.refresh(job).state != JobState.RUNNING:
                del self._foreign[path]
                ended.append(job)
        while self._waiting and not self._full():
            job = self._waiting.pop(0)
            if job.status().state not in (JobState.DONE, JobState.CANCELLED):
                self._submit_new(job, self.record(job).get("job_id"))
        return ended

    def _folder_says_ended(self, job: Job) -> bool:
        """Ended by its folder alone: done, failed by the worker, or cancelled through a runner.

        A worker that writes 'cancelled' on its own (SIGTERM at a time limit or
        a preemption) has not ended until the scheduler says why.
        """
        state = job.status().state
        cancelled_here = state == JobState.CANCELLED and bool(self.record(job).get("cancelled"))
        return state in (JobState.DONE, JobState.FAILED) or cancelled_here

    def _fail_if_unfinished(self, job: Job, state: BatchState | None, job_id: str | None) -> None:
        """Mark a job failed whose batch job ended without its worker finishing, with Slurm's reason and the log."""
        with job.lock.hold("mark an ended batch job failed"):
            status = job.status()
            if self._folder_says_ended(job):
                return
            if state is None:
                why = "is no longer known to Slurm (ended long ago?)"
            else:
                reason = f", reason {state.reason}" if state.reason and state.reason != "None" else ""
                code = f", exit status {state.exit_code}" if state.exit_code not in ("", "0") else ""
                why = f"ended {state.state}{reason}{code}"
            tail = job.log_summary()
            job.update(
                state=JobState.FAILED,
                ended=status.updated or now_iso(),
                message=f"Slurm batch job {job_id} {why} without the worker finishing"
                + (" (the worker had been sent SIGTERM)" if status.state == JobState.CANCELLED else "")
                + (f"; log:\n{tail}" if tail else ""),
            )

    def cancel(self, job: Job) -> JobStatus:
        """scancel the job's batch job and mark it cancelled."""
        self._cancel([job])
        return job.status()

    def cancel_all(self) -> list[Job]:
        """Cancel every job this runner follows, with one scancel; returns them."""
        jobs = self.active()
        self._cancel(jobs)
        return jobs

    def _cancel(self, jobs: Sequence[Job]) -> None:
        ids = []
        for job in jobs:
            self._tracked.pop(job.path, None)
            self._unsure.pop(job.path, None)
            self._ended_at.pop(job.path, None)
            self._draining.pop(job.path, None)
            self._waiting = [w for w in self._waiting if w.path != job.path]
            if self._foreign.pop(job.path, None) is not None or (
                job.status().runner not in (None, self.kind) and job.status().state == JobState.RUNNING
            ):
                raise SlurmError(
                    f"{job.path}: its worker runs under the {job.status().runner} runner; cancel it with that runner"
                )
            record = self.record(job)
            if record and not job.status().final:
                atomic_write_json(self.record_path(job), {**record, "cancelled": True})
                ids.append(str(record["job_id"]))
        if ids:
            self._command(["scancel", *ids], "cancel the batch jobs")
        for job in jobs:
            if not job.status().final:
                job.update(state=JobState.CANCELLED, ended=now_iso(), message="cancelled")

    def wait(
        self, jobs: Sequence[Job] | None = None, timeout: float | None = None, on_poll: Callable[[list[Job]], None] | None = None
    ) -> bool:
        """Poll until the given jobs (default: all followed) have ended; False on timeout.

        The job folders are read every ``folder_seconds`` (a worker writes done
        there first), squeue is asked every ``poll_seconds``: a job is seen done
        within a fraction of a second without asking the scheduler more often.
        """
        watched = [j.path for j in (jobs if jobs is not None else self.active())]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if on_poll is not None:
                on_poll([Job(p) for p in watched])
            if all(self.refresh(Job(p)).final and not self._follows(p) for p in watched):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(min(self.settings.poll_seconds, self.settings.folder_seconds))

    def _follows(self, path: Path) -> bool:
        return (
            path in self._tracked or path in self._unsure or path in self._foreign or any(w.path == path for w in self._waiting)
        )

    def run(self, jobs: Iterable[Job], timeout: float | None = None) -> list[JobStatus]:
        """Submit jobs, wait for them, and return their final status (the simple blocking use)."""
        jobs = list(jobs)
        for job in jobs:
            self.submit(job)
        self.wait(jobs, timeout)
        return [job.status() for job in jobs]


def _slurm_settings(settings: Any) -> SlurmSettings:
    """SlurmSettings from themselves, from a ``RunnerSettings`` (its ``slurm``, filled with its python, env and
    poll interval) or None (the defaults)."""
    if settings is None:
        return SlurmSettings()
    if isinstance(settings, SlurmSettings):
        return settings
    slurm = getattr(settings, "slurm", None) or SlurmSettings()
    if not isinstance(slurm, SlurmSettings):
        raise SlurmError(f"runner settings: slurm must be SlurmSettings, got {type(slurm).__name__}")
    changes: dict[str, Any] = {}
    if slurm.python is None and getattr(settings, "python", None):
        changes["python"] = settings.python
    if getattr(settings, "env", None):
        changes["env"] = {**{str(k): str(v) for k, v in settings.env.items()}, **slurm.env}
    if getattr(settings, "poll_seconds", None) is not None:
        changes["poll_seconds"] = settings.poll_seconds
    return replace(slurm, **changes) if changes else slurm
