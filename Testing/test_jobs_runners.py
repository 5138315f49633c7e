"""The runner seam: one factory, the local runner's process handling (trees, reused pids, adoption), the in-process
runner, and jobs another backend or host has in hand. Real worker processes throughout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict

import psutil
import pytest

from ActiveLearning3DLib.jobs import (
    InProcessRunner,
    Job,
    JobError,
    JobRunner,
    JobStatus,
    LocalRunner,
    LocalRunnerSettings,
    RunnerSettings,
    make_runner,
)
from ActiveLearning3DLib.jobs.local import process_create_time, worker_alive
from ActiveLearning3DLib.locking import pid_alive, this_host

from conftest import wait_for


def _local(**kw) -> LocalRunner:
    return LocalRunner(LocalRunnerSettings(poll_seconds=0.05, grace_seconds=3.0, **kw))


def _log_has(job: Job, text: str) -> bool:
    return job.log_path.is_file() and text in job.log_path.read_text()


@pytest.fixture
def sleeper():
    """A live process of this host that is no job's worker (what a reused pid points to)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ factory
def test_the_factory_builds_each_kind_and_every_one_speaks_the_protocol():
    local = make_runner(RunnerSettings(kind="local", max_parallel=3, cores=6, env={"A": "1"}))
    assert isinstance(local, LocalRunner) and local.kind == "local"
    assert (local.capacity, local.slot_threads(), local.settings.env) == (3, 2, {"A": "1"})
    assert local.settings.python == sys.executable
    inprocess = make_runner(RunnerSettings(kind="inprocess", max_parallel=2))
    assert isinstance(inprocess, InProcessRunner) and (inprocess.kind, inprocess.capacity) == ("inprocess", 2)
    slurm = make_runner(RunnerSettings(kind="slurm"))  # built without asking the scheduler anything
    assert slurm.kind == "slurm" and type(slurm).__module__ == "ActiveLearning3DLib.jobs.slurm"
    for runner in (local, inprocess, slurm):
        assert isinstance(runner, JobRunner), runner
    assert isinstance(make_runner(), LocalRunner)  # no settings: local, this machine's defaults


def test_the_factory_rejects_an_unknown_kind_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"runner kind: unknown 'pbs'; known: local, inprocess, slurm"):
        RunnerSettings(kind="pbs")
    settings = RunnerSettings()
    settings.kind = "Local"  # changed after it was checked
    with pytest.raises(ValueError, match=r"unknown 'Local'"):
        make_runner(settings)
    with pytest.raises(ValueError, match=r"max_parallel.*at least 1.*0"):
        RunnerSettings(max_parallel=0)


def test_runner_settings_fill_only_what_is_left_open():
    mine = RunnerSettings(python="/opt/PythonSlicer", max_parallel=None)
    filled = mine.with_defaults(python=sys.executable, max_parallel=4)
    assert (filled.python, filled.max_parallel) == ("/opt/PythonSlicer", 4)


# ------------------------------------------------------- local: process trees
def test_a_second_runner_cancels_the_whole_tree_by_the_pids_in_the_job_folder(tmp_path):
    """`al3d cancel` from another terminal: no Popen handle, yet the worker and its child are both gone."""
    job = Job.create(tmp_path, "tree", "selftest", {"steps": 1000, "seconds": 0.1, "spawn_child": True})
    first = _local()
    first.submit(job)
    first.poll()
    assert wait_for(lambda: _log_has(job, "child pid"))
    child = int(re.search(r"child pid (\d+)", job.log_path.read_text()).group(1))
    worker = job.status().pid
    assert psutil.Process(worker).children() and pid_alive(child)
    status = _local().cancel(Job(job.path))  # a fresh runner, as `al3d cancel` makes
    assert status.state == "cancelled"
    first._running[job.path][1].wait(timeout=10)  # the first process reaps its worker, as its exit would
    assert wait_for(lambda: not pid_alive(child) and not pid_alive(worker), timeout=10)


def test_cancel_kills_a_worker_that_ignores_terminate_after_the_grace(tmp_path):
    """A worker stuck in C code does not end on terminate: it is killed after the grace period, with its child."""
    if sys.platform == "win32":
        pytest.skip("terminate is already a hard kill on Windows")
    job = Job.create(tmp_path, "stubborn", "selftest", {"steps": 1000, "seconds": 0.1})
    runner = _local()
    runner.settings.grace_seconds = 0.5
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); "
        "print('child pid', c.pid, flush=True); time.sleep(120)"
    )
    runner._launch = lambda j: _launch_code(runner, j, stubborn)
    runner.submit(job)
    runner.poll()
    assert wait_for(lambda: _log_has(job, "child pid"))
    child = int(re.search(r"child pid (\d+)", job.log_path.read_text()).group(1))
    worker = job.status().pid
    started = time.monotonic()
    status = runner.cancel(job)
    assert status.state == "cancelled" and status.exit_code == -9  # killed, not terminated
    assert time.monotonic() - started < 10
    assert wait_for(lambda: not pid_alive(child) and not pid_alive(worker), timeout=10)


def _launch_code(runner: LocalRunner, job: Job, code: str):
    """Start ``code`` as the job's 'worker', the way the local runner starts one (its options, its log)."""
    from ActiveLearning3DLib.jobs.local import popen_options

    with open(job.log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(job.path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **popen_options(),
        )
    return proc, proc.pid, process_create_time(proc.pid)


# ------------------------------------------------------- local: reused pids
def test_a_reused_pid_is_not_the_worker_and_is_never_killed(tmp_path, sleeper):
    """After a reboot or a long pause the recorded pid may belong to another process: the job died, and cancel
    must not kill that stranger."""
    job = Job.create(tmp_path, "reused", "selftest", {})
    real_start = process_create_time(sleeper.pid)
    job.update(state="running", pid=sleeper.pid, pid_started=real_start - 50.0, host=this_host(), runner="local")
    assert pid_alive(sleeper.pid) and not worker_alive(sleeper.pid, real_start - 50.0, job.path)
    status = _local().refresh(job)
    assert status.state == "failed" and "died" in status.message

    job.update(state="running")
    assert _local().cancel(job).state == "cancelled"
    time.sleep(0.3)
    assert sleeper.poll() is None  # the stranger still runs


def test_an_old_status_file_without_a_create_time_is_judged_by_the_command_line(tmp_path, sleeper):
    """Projects written before create times were recorded still load; a live pid that is not this job's worker
    (its command line does not name the job folder) is not alive for the job."""
    job = Job.create(tmp_path, "old", "selftest", {})
    old = {
        k: v
        for k, v in asdict(JobStatus(state="running", pid=sleeper.pid, started="2026-01-01T00:00:00+00:00")).items()
        if k not in ("host", "pid_started", "runner", "runner_id")
    }
    job.status_path.write_text(json.dumps(old))
    assert job.status().state == "running" and job.status().pid_started is None
    assert _local().refresh(job).state == "failed"
    assert worker_alive(os.getpid(), None, None)  # no folder to compare: a live pid is alive
    assert not worker_alive(sleeper.pid, None, job.path)


def test_a_zombie_is_dead_and_so_is_a_pid_that_never_was():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, timeout=20)
    assert not pid_alive(proc.pid) and not worker_alive(proc.pid)
    proc.wait()
    assert not pid_alive(proc.pid) and not worker_alive(None) and not pid_alive(0)


# ------------------------------------------------------------- adoption
def test_a_second_runner_adopts_a_running_job_without_starting_it_twice(tmp_path):
    """The CLI or Slicer restarted while a job runs: the new runner watches the same worker to its end."""
    job = Job.create(tmp_path, "adopted", "selftest", {"steps": 30, "seconds": 0.05})
    first = _local()
    first.submit(job)
    first.poll()
    assert wait_for(lambda: job.status().state == "running" and (job.status().iteration or 0) >= 1)
    worker = job.status().pid
    running = job.status()  # the worker says who runs it, so a later runner can judge it
    assert (running.runner, running.host, running.runner_id) == ("local", this_host(), None)
    assert running.pid_started == process_create_time(worker)

    second = _local(max_parallel=1)
    assert second.adopt(Job(job.path)) and [j.path for j in second.active()] == [job.path]
    second.submit(Job(job.path))  # submitting it too changes nothing
    assert second._running == {} and len(second.active()) == 1
    assert second.wait([job], timeout=60)
    status = job.status()
    assert status.state == "done" and status.pid == worker
    assert job.log_path.read_text().count("selftest job adopted on") == 1  # one worker ever started
    assert second.active() == [] and not second.adopt(job)  # a finished job is not adopted
    first.poll()


def test_adopting_a_job_whose_worker_died_marks_it_failed_instead(tmp_path):
    job = Job.create(tmp_path, "dead", "selftest", {"steps": 1000, "seconds": 0.05})
    first = _local()
    first.submit(job)
    first.poll()
    assert wait_for(lambda: job.status().state == "running" and job.status().iteration)
    psutil.Process(job.status().pid).kill()
    first._running[job.path][1].wait()
    second = _local()
    assert not second.adopt(Job(job.path))
    assert job.status().state == "failed" and second.active() == []


# ------------------------------------------------- jobs in other hands
def test_a_job_another_host_or_backend_has_in_hand_is_watched_never_started_or_killed(tmp_path):
    """A worker on another host (its pid means nothing here) or a batch job queued in Slurm: the local runner
    must neither call it dead, start it a second time, nor hold a local slot for it."""
    elsewhere = Job.create(tmp_path, "elsewhere", "selftest", {"steps": 1, "seconds": 0})
    elsewhere.update(state="running", pid=2_000_000, host="node-17", runner="local")
    batch = Job.create(tmp_path, "batch", "selftest", {"steps": 1, "seconds": 0})
    batch.update(state="queued", runner="slurm", runner_id="4242")
    mine = Job.create(tmp_path, "mine", "selftest", {"steps": 1, "seconds": 0})
    runner = _local(max_parallel=1)
    assert runner.refresh(elsewhere).state == "running"  # not judged dead from here
    for job in (elsewhere, batch, mine):
        runner.submit(job)
    assert runner.wait([mine], timeout=60) and mine.status().state == "done"  # no slot held by the other two
    assert not elsewhere.log_path.exists() and not batch.log_path.exists()
    assert {j.name for j in runner.active()} == {"elsewhere", "batch"}
    with pytest.raises(JobError, match=r"batch: it runs under the slurm runner; cancel it with that runner"):
        runner.cancel(batch)
    assert batch.status().state == "queued"
    runner.submit(batch)
    with pytest.raises(JobError, match=r"cancelled 0 jobs; not 2: .*elsewhere: it runs under the local runner on node-17"):
        runner.cancel_all()
    assert runner.active() == [] and elsewhere.status().state == "running"
    runner.adopt(elsewhere)
    elsewhere.update(state="done")  # it ended there
    runner.poll()
    assert runner.active() == []


# ---------------------------------------------------------- in-process
def test_the_in_process_runner_runs_a_selftest_job_through_its_folder(tmp_path):
    job = Job.create(tmp_path, "inproc", "selftest", {"steps": 3, "seconds": 0.01})
    [status] = make_runner(RunnerSettings(kind="inprocess")).run([job], timeout=30)
    assert (status.state, status.progress, status.iteration, status.exit_code) == ("done", 1.0, 3, 0)
    assert (status.pid, status.runner, status.host) == (os.getpid(), "inprocess", this_host())
    assert status.pid_started == process_create_time(os.getpid())
    assert json.loads((job.path / "result.json").read_text())["steps"] == 3
    assert "selftest job inproc" in job.log_path.read_text()
    again = make_runner(RunnerSettings(kind="inprocess"))
    again.submit(Job(job.path))
    assert again.active() == []  # done: not run again


def test_the_in_process_runner_fails_cancels_and_refuses_what_it_cannot_do(tmp_path):
    runner = make_runner(RunnerSettings(kind="inprocess", max_parallel=2))
    bad = Job.create(tmp_path, "bad", "selftest", {"steps": 3, "seconds": 0, "fail_at": 1})
    long = Job.create(tmp_path, "long", "selftest", {"steps": 10_000, "seconds": 0.01})
    runner.submit(bad)
    runner.submit(long)
    assert runner.wait([bad], timeout=30)
    status = bad.status()
    assert status.state == "failed" and status.exit_code == 1 and "failed on purpose at step 1" in status.message
    assert "Traceback" in bad.log_path.read_text()
    assert wait_for(lambda: (long.status().iteration or 0) >= 2)
    assert runner.cancel(long).state == "cancelled"
    handle_threads = [t for t in __import__("threading").enumerate() if t.name == "al3d job long"]
    assert not handle_threads and runner.active() == []
    iteration = long.status().iteration
    time.sleep(0.2)
    assert long.status().iteration == iteration and long.status().state == "cancelled"
    with_env = Job.create(tmp_path, "nnunet_like", "selftest", {}, env={"nnUNet_raw": "/x"})
    with pytest.raises(
        JobError,
        match=r"nnunet_like: the in-process runner cannot give a job its own environment "
        r"\(nnUNet_raw\); use the local runner",
    ):
        runner.submit(with_env)


def test_an_in_process_job_cancelled_by_another_runner_stops_at_its_next_report(tmp_path):
    """`al3d cancel` (a local runner) on a job a thread of this process runs: no kill of this process, the task
    reads "cancelled" and stops."""
    runner = make_runner(RunnerSettings(kind="inprocess"))
    job = Job.create(tmp_path, "thread", "selftest", {"steps": 10_000, "seconds": 0.01})
    runner.submit(job)
    runner.poll()
    assert wait_for(lambda: (job.status().iteration or 0) >= 2)
    assert _local().cancel(Job(job.path)).state == "cancelled"
    assert runner.wait([job], timeout=10) and runner.active() == []
    assert job.status().state == "cancelled"


def test_refresh_by_the_runner_that_started_a_worker_sees_its_death_without_a_poll(tmp_path):
    """A pipeline asks its runner about a job between polls: a killed worker must read as failed, with its exit code."""
    job = Job.create(tmp_path, "oom", "selftest", {"steps": 1000, "seconds": 0.05})
    runner = _local()
    runner.submit(job)
    runner.poll()
    assert wait_for(lambda: job.status().state == "running" and job.status().iteration)
    psutil.Process(job.status().pid).kill()  # as the out-of-memory killer would
    assert wait_for(lambda: runner.refresh(job).state == "failed", timeout=10)
    status = job.status()
    assert status.exit_code not in (None, 0) and "without finishing" in status.message and runner.active() == []
    assert runner.poll() == [job] and runner.poll() == []  # reported as ended once
