"""Background jobs: real worker processes started by the local runner, watched through their files."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from ActiveLearning3DLib.jobs import (
    InProcessRunner,
    InProcessRunnerSettings,
    Job,
    JobError,
    JobState,
    JobStatus,
    LocalRunner,
    LocalRunnerSettings,
    busy_seconds,
)
from ActiveLearning3DLib.jobs.local import worker_alive as process_alive
from ActiveLearning3DLib.worker import run_job

from conftest import wait_for


def _runner(**kw) -> LocalRunner:
    return LocalRunner(LocalRunnerSettings(poll_seconds=0.05, **kw))


def _threads() -> InProcessRunner:
    """For tests of the job folders alone (no process handling): the same protocol without a worker's start-up."""
    return InProcessRunner(InProcessRunnerSettings(poll_seconds=0.02))


def _running_job(tmp_path, name: str, seconds: float) -> tuple[Job, LocalRunner]:
    """A long selftest job started by its own runner, once its worker has marked it running with its pid."""
    job = Job.create(tmp_path, name, "selftest", {"steps": 1000, "seconds": seconds})
    runner = _runner()
    runner.submit(job)
    runner.poll()
    assert wait_for(lambda: job.status().state == "running" and job.status().pid)
    return job, runner


def test_job_runs_to_done_with_progress_log_and_result(tmp_path):
    job = Job.create(tmp_path, "one", "selftest", {"steps": 3, "seconds": 0.05})
    assert job.status().state == "queued"
    [status] = _runner().run([job], timeout=60)
    assert (status.state, status.progress, status.iteration, status.exit_code) == ("done", 1.0, 3, 0)
    assert status.started and status.ended and status.pid
    assert "step 3/3" in job.log_path.read_text()
    assert json.loads((job.path / "result.json").read_text())["steps"] == 3


def test_environment_is_set_for_the_child_only(tmp_path):
    job = Job.create(tmp_path, "env", "selftest", {"steps": 1, "seconds": 0, "print_env": "AL3D_TEST_VALUE"})
    _runner(env={"AL3D_TEST_VALUE": "child-only"}).run([job], timeout=60)
    assert "AL3D_TEST_VALUE=child-only" in job.log_path.read_text()
    assert "AL3D_TEST_VALUE" not in os.environ


def test_parallel_limit_is_respected(tmp_path):
    jobs = [Job.create(tmp_path, f"j{i}", "selftest", {"steps": 4, "seconds": 0.1}) for i in range(3)]
    runner = _runner(max_parallel=2)
    for job in jobs:
        runner.submit(job)
    most = 0
    while not all(j.status().final for j in jobs):
        runner.poll()
        most = max(most, len([j for j in jobs if j.status().state == "running"]))
        time.sleep(0.02)
    assert most == 2
    assert [j.status().state for j in jobs] == ["done"] * 3
    # the third started only after one of the first two ended
    ends = sorted(j.status().ended for j in jobs[:2])
    assert jobs[2].status().started >= ends[0]


def test_failing_task_ends_failed_with_the_error(tmp_path):
    job = Job.create(tmp_path, "bad", "selftest", {"steps": 3, "seconds": 0, "fail_at": 1})
    [status] = _runner().run([job], timeout=60)
    assert status.state == "failed" and status.exit_code == 1
    assert "selftest failed on purpose at step 1" in status.message
    assert "Traceback" in job.log_path.read_text()


def test_cancel_kills_the_whole_process_tree(tmp_path):
    job = Job.create(tmp_path, "long", "selftest", {"steps": 1000, "seconds": 0.1, "spawn_child": True})
    runner = _runner()
    runner.submit(job)
    runner.poll()
    assert wait_for(lambda: "child pid" in job.log_path.read_text() if job.log_path.exists() else False)
    child = int(re.search(r"child pid (\d+)", job.log_path.read_text()).group(1))
    worker = job.status().pid
    assert process_alive(child) and process_alive(worker)
    status = runner.cancel(job)
    assert status.state == "cancelled"
    assert wait_for(lambda: not process_alive(child) and not process_alive(worker), timeout=10)
    assert runner.active() == []


def test_killed_worker_is_detected_as_failed_with_log_tail(tmp_path):
    job, runner = _running_job(tmp_path, "killed", seconds=0.1)
    assert wait_for(lambda: job.status().iteration)
    os.kill(job.status().pid, signal.SIGKILL)  # as the out-of-memory killer would
    assert runner.wait([job], timeout=20)
    status = job.status()
    assert status.state == "failed" and status.exit_code == -signal.SIGKILL
    assert "step 1/1000" in status.message  # the log tail says how far it got


def test_dead_worker_is_detected_by_a_new_runner_without_the_process_handle(tmp_path):
    """The GUI restarted while a job ran, and the worker died meanwhile: the job must not stay 'running'."""
    job, first = _running_job(tmp_path, "orphan", seconds=0.1)
    pid = job.status().pid
    os.kill(pid, signal.SIGKILL)
    first._running[job.path][1].wait()  # reap it, as the old process's exit would
    status = _runner().refresh(Job(job.path))
    assert status.state == "failed" and "died" in status.message


@pytest.mark.slow
def test_a_job_resumed_after_its_worker_died_keeps_the_time_its_first_attempt_ran(tmp_path):
    """A session ends while a fold trains and a later one resumes it: the fold's wall time must count both attempts,
    ending the first when it was last heard of, not when the next session noticed its death."""
    job = Job.create(tmp_path, "fold_4", "selftest", {"steps": 60, "seconds": 0.05})
    first = _runner()
    first.submit(job)
    first.poll()
    assert wait_for(lambda: (job.status().iteration or 0) >= 3)
    os.kill(job.status().pid, signal.SIGKILL)
    first._running[job.path][1].wait()
    last_heard = job.status().updated
    time.sleep(2.1)  # the pause between the sessions
    died = _runner().refresh(Job(job.path))
    assert died.state == "failed" and died.ended == last_heard
    first_attempt = [died.started, last_heard]

    job = Job.create(tmp_path, "fold_4", "selftest", {"steps": 60, "seconds": 0.05})  # the same job, resumed
    [done] = _runner().run([job], timeout=60)
    assert done.state == "done" and done.earlier == [first_attempt]
    assert done.attempts() == [tuple(first_attempt), (done.started, done.ended)]
    ran = busy_seconds(done.attempts())
    assert ran == pytest.approx(busy_seconds([first_attempt]) + done.wall_seconds)
    assert ran <= busy_seconds([(first_attempt[0], done.ended)]) - 2  # the pause is not counted

    # a worker started again by hand keeps the earlier attempts too
    job.update(state="failed")
    assert run_job(job.path) == 0
    assert job.status().earlier == [first_attempt, [done.started, done.ended]]


def test_finished_jobs_are_not_rerun(tmp_path):
    job = Job.create(tmp_path, "once", "selftest", {"steps": 1, "seconds": 0})
    _runner().run([job], timeout=60)
    started = job.status().started
    again = Job.create(tmp_path, "once", "selftest", {"steps": 1, "seconds": 0})  # same inputs: the same job
    runner = _runner()
    runner.submit(again)
    assert runner.active() == []
    assert again.status().started == started
    with pytest.raises(JobError, match="finished job with other inputs"):
        Job.create(tmp_path, "once", "selftest", {"steps": 2})


def test_a_finished_job_set_aside_keeps_its_files_and_frees_its_name(tmp_path):
    job = Job.create(tmp_path, "score", "selftest", {"steps": 1, "seconds": 0})
    _threads().run([job], timeout=60)
    log, status = job.log_path.read_text(), job.status()
    first = job.set_aside()
    assert first.path == tmp_path / ".superseded" / "score.1" and not job.path.exists()
    assert first.log_path.read_text() == log and first.status() == status and first.spec().inputs["steps"] == 1
    job = Job.create(tmp_path, "score", "selftest", {"steps": 2, "seconds": 0})  # the name is free for new inputs
    _threads().run([job], timeout=60)
    assert job.set_aside().path.name == "score.2" and first.log_path.read_text() == log
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "job.json").is_file()) == []
    queued = Job.create(tmp_path, "score", "selftest", {"steps": 3})
    with pytest.raises(JobError, match="only a finished job.*queued"):
        queued.set_aside()
    assert queued.spec_path.is_file()


def test_failed_job_is_rerun_on_submit(tmp_path):
    job = Job.create(tmp_path, "retry", "selftest", {"steps": 2, "seconds": 0, "fail_at": 0})
    _threads().run([job], timeout=60)
    assert job.status().state == "failed"
    # a new attempt with fixed inputs replaces the failed job
    job = Job.create(tmp_path, "retry", "selftest", {"steps": 2, "seconds": 0})
    [status] = _threads().run([job], timeout=60)
    assert status.state == "done"


def test_worker_in_process_marks_unknown_kind_failed(tmp_path):
    job = Job.create(tmp_path, "unknown", "no_such_kind", {})
    assert run_job(job.path) == 1
    status = job.status()
    assert status.state == "failed" and "unknown job kind 'no_such_kind'" in status.message


def test_bad_job_names_and_damaged_files_are_clear_errors(tmp_path):
    with pytest.raises(JobError, match="may hold only"):
        Job.create(tmp_path, "../escape", "selftest")
    job = Job.create(tmp_path, "ok", "selftest")
    job.status_path.write_text("{not json")  # damage from outside: reported as failed, so it can run again
    status = job.status()
    assert status.state == "failed" and "status.json: damaged status file" in status.message


def test_job_states_are_an_enum_and_status_json_holds_the_plain_strings(tmp_path):
    job = Job.create(tmp_path, "enum", "selftest", {"steps": 1, "seconds": 0.01})
    assert job.status().state is JobState.QUEUED
    job.update(state="running", pid=12, started="2026-01-01T00:00:00+00:00")  # a string, as older code passes
    text = job.status_path.read_text()
    assert '"state": "running"' in text
    status = job.status()
    assert status.state is JobState.RUNNING and status.state == "running" and not status.final
    job.update(state=JobState.DONE)
    assert json.loads(job.status_path.read_text())["state"] == "done" and job.status().final
    # the file is the one plain strings give: the enum changes nothing on disk
    as_strings = {**json.loads(job.status_path.read_text()), "state": "done"}
    assert job.status_path.read_text() == json.dumps(as_strings, indent=1) + "\n"
    assert f"{JobState.FAILED}" == str(JobState.FAILED) == "failed"
    assert [s.final for s in JobState] == [False, False, True, True, True]
    with pytest.raises(JobError, match="unknown job state 'paused'"):
        job.update(state="paused")
    assert job.status().state is JobState.DONE  # refused before anything was written
    with pytest.raises(ValueError, match="unknown job state 'paused'"):
        JobStatus(state="paused")


def test_cli_lists_and_cancels_a_projects_jobs(tmp_path, capsys):
    from ActiveLearning3DLib.cli import main
    from ActiveLearning3DLib.default_data import PhantomSettings, make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "data", PhantomSettings(cases=4))
    project = tmp_path / "project"
    assert main(["init", str(project), "--images", str(data.images)]) == 0
    done = Job.create(project / "jobs", "a_done", "selftest", {"steps": 1, "seconds": 0})
    _runner().run([done], timeout=60)
    long = Job.create(project / "jobs", "b_long", "selftest", {"steps": 1000, "seconds": 0.1})
    runner = _runner()
    runner.submit(long)
    runner.poll()
    assert wait_for(lambda: long.status().state == "running")
    capsys.readouterr()
    assert main(["jobs", str(project), "--json"]) == 0
    listed = {j["name"]: j for j in json.loads(capsys.readouterr().out)}
    assert (listed["a_done"]["state"], listed["b_long"]["state"]) == ("done", "running")
    pid = long.status().pid
    assert main(["cancel", str(project)]) == 0  # another process than the runner: it works from status.json
    assert "cancelled 1 jobs: b_long" in capsys.readouterr().out
    runner.poll()
    assert wait_for(lambda: not process_alive(pid), timeout=10)
    assert long.status().state == "cancelled" and done.status().state == "done"


def test_jobs_that_finish_a_stage_start_before_queued_training(tmp_path):
    """A simulation queues many folds; an evaluation queued after them must not wait for all of them."""
    runner = _runner(max_parallel=1)
    kinds = [
        ("fold_a", "nnunet_train"),
        ("fold_b", "nnunet_train"),
        ("prep", "nnunet_prepare"),
        ("evaluate", "nnunet_evaluate"),
        ("other", "selftest"),
        ("score", "nnunet_score"),
    ]
    for name, kind in kinds:
        runner.submit(Job.create(tmp_path, name, kind, {}))
    started = []
    runner._start = lambda job: started.append(job.name)  # record the decisions, start nothing
    runner.poll()
    assert started == ["evaluate", "score", "prep", "other", "fold_a", "fold_b"]


def test_background_jobs_start_only_when_nothing_else_waits(tmp_path):
    """A simulation's full-data reference is queued first but must not delay the runs' loops."""
    runner = _runner(max_parallel=1)
    kinds = [
        ("ref_prep", "nnunet_prepare", True),
        ("ref_fold", "nnunet_train", True),
        ("fold", "nnunet_train", False),
        ("ref_eval", "nnunet_evaluate", True),
        ("evaluate", "nnunet_evaluate", False),
    ]
    for name, kind, background in kinds:
        runner.submit(Job.create(tmp_path, name, kind, {"background": True} if background else {}))
    started = []
    runner._start = lambda job: started.append(job.name)
    runner.poll()
    assert started == ["evaluate", "fold", "ref_eval", "ref_prep", "ref_fold"]


def test_a_live_job_of_another_runner_holds_a_slot_until_it_ends(tmp_path):
    """A restarted simulation driver finds its old fold still training: it must not start a second one beside it."""
    old, first = _running_job(tmp_path, "old", seconds=0.05)
    waiting = Job.create(tmp_path, "next", "selftest", {"steps": 1, "seconds": 0})
    second = _runner(max_parallel=1)
    second.submit(old)  # the same job, alive: adopted, not restarted
    second.submit(waiting)
    for _ in range(60):  # 3 s: long enough for a started worker to mark itself running
        second.poll()
        time.sleep(0.05)
    assert waiting.status().state == "queued" and not waiting.log_path.exists()
    assert {j.name for j in second.active()} == {"old", "next"}  # listed, so a cancel-all stops it too
    first.cancel(old)
    assert second.wait([waiting], timeout=60) and waiting.status().state == "done"


def test_busy_seconds_count_parallel_jobs_once_and_not_the_pause_between_sessions():
    def at(minute: int, second: int = 0) -> str:
        return f"2026-12-01T10:{minute:02d}:{second:02d}+00:00"

    # two folds side by side (0-10 and 5-12 min), one nested in them, then a fold resumed after a pause (30-40)
    folds = [(at(0), at(10)), (at(30), at(40)), (at(5), at(12)), (at(6), at(7))]
    assert busy_seconds(folds) == (12 + 10) * 60
    assert busy_seconds([(at(0), at(0, 30))]) == 30
    assert busy_seconds([(at(0), None), (None, at(1))]) is None  # no job both started and ended


def _threads_lines(job: Job) -> list[int]:
    """The allotments a ``follow_threads`` selftest worker applied, in order."""
    return [int(n) for n in re.findall(r"^threads (\d+)$", job.log_path.read_text(), re.M)] if job.log_path.exists() else []


def _polled(runner: LocalRunner) -> bool:
    runner.poll()
    return True


def test_a_job_running_alone_gets_the_cores_of_idle_slots_and_gives_them_back(tmp_path):
    """The last fold of a loop, or an evaluation with no score job beside it, must not leave cores idle."""
    runner = _runner(max_parallel=2, cores=4)
    long = Job.create(tmp_path, "long", "selftest", {"steps": 2000, "seconds": 0.05, "threads": 1, "follow_threads": True})
    short = Job.create(tmp_path, "short", "selftest", {"steps": 10, "seconds": 0.05, "threads": 3})
    runner.submit(long)
    runner.submit(short)
    runner.poll()
    try:
        # two running on 4 cores: an equal share of 2, never fewer than a job asked for
        assert (long.allotted_threads(), short.allotted_threads()) == (2, 3)
        assert wait_for(lambda: _threads_lines(long) == [2])
        assert runner.wait([short], timeout=60) and short.status().state == "done"
        assert wait_for(lambda: _polled(runner) and long.allotted_threads() == 4)  # alone once short's worker exits
        assert wait_for(lambda: _threads_lines(long) == [2, 4])  # the worker applied it while running
        plain = Job.create(tmp_path, "plain", "selftest", {"steps": 2000, "seconds": 0.05})
        plain.allot_threads(8)  # left from an earlier run of the job: dropped when it starts again
        runner.submit(plain)
        runner.poll()
        assert long.allotted_threads() == 2  # a job started beside it takes the cores back
        assert plain.allotted_threads() is None  # it declares no threads: torch's default is left alone
        assert wait_for(lambda: _threads_lines(long) == [2, 4, 2])
    finally:
        runner.cancel_all()
    assert long.status().state == "cancelled"


def test_cores_are_not_shared_when_the_runner_is_told_not_to(tmp_path):
    runner = _runner(max_parallel=2, cores=4, share_cores=False)
    job = Job.create(tmp_path, "alone", "selftest", {"steps": 2000, "seconds": 0.05, "threads": 1})
    runner.submit(job)
    runner.poll()
    try:
        assert job.allotted_threads() is None
    finally:
        runner.cancel_all()


def test_the_reporter_applies_each_new_allotment_once_and_names_a_damaged_file(tmp_path):
    from ActiveLearning3DLib.jobs.tasks import Reporter

    job = Job.create(tmp_path, "r", "selftest", {})
    report = Reporter(job, min_interval=0)
    applied: list[int] = []
    report.follow_threads(applied.append)
    assert applied == []  # no allotment yet: the job keeps what it set itself
    job.allot_threads(3)
    report(progress=0.1)
    report(progress=0.2)
    job.allot_threads(3)
    report(progress=0.3)
    job.allot_threads(1)
    report(progress=0.4)
    assert applied == [3, 1]
    job.threads_path.write_text("{not json")
    with pytest.raises(JobError, match="threads.json"):
        report(progress=0.5)


def test_a_task_sets_torch_threads_as_asked_then_as_allotted(tmp_path):
    import torch

    from ActiveLearning3DLib.jobs.tasks import Reporter, torch_threads

    before = torch.get_num_threads()
    job = Job.create(tmp_path, "t", "nnunet_evaluate", {"threads": 1})
    report = Reporter(job, min_interval=0)
    try:
        torch_threads({"threads": 1}, report)
        assert torch.get_num_threads() == 1
        job.allot_threads(2)
        report(progress=0.5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
