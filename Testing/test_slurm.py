"""The Slurm runner against a real single-node Slurm cluster (slurmctld + slurmd + munge on this machine).

The cluster comes from ``.ci/services/slurm.sh``: ``.ci/run`` starts it and
sets ``AL3D_TEST_SLURM`` to its env file (then it must work); otherwise the
session starts its own, and the cluster tests skip, saying why, only where it
cannot start (no Slurm packages, not root). The settings checks and the batch
script need no cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ActiveLearning3DLib.jobs import Job
from ActiveLearning3DLib.jobs.slurm import SlurmError, SlurmRunner, SlurmSettings, load_project_settings, save_project_settings
from conftest import annotated_project, wait_for

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "services" / "slurm.sh"


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """The scheduler variables (SLURM_CONF) of a running test cluster: CI's, or one started for this session."""
    given = os.environ.get("AL3D_TEST_SLURM")
    if given:
        path = Path(given)
        assert path.is_file(), f"AL3D_TEST_SLURM={given}: no such env file (did .ci/services/slurm.sh start?)"
        yield _read_env(path)
        return
    if shutil.which("bash") is None:
        pytest.skip("no bash to run .ci/services/slurm.sh")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=60, check=False)
        reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"the test Slurm cluster could not start here: {reason}")
    try:
        yield _read_env(Path(started.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=60, check=False)


def _settings(slurm_env, **kw) -> SlurmSettings:
    return SlurmSettings(scheduler_env=dict(slurm_env), poll_seconds=0.2, settle_seconds=2.0, **kw)


def _slurm(slurm_env, *args: str) -> str:
    env = {**os.environ, **slurm_env}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, check=True, timeout=60).stdout


def _batch_state(slurm_env, job_id: str) -> str:
    return _slurm(slurm_env, "squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T").strip()


def _running(runner: SlurmRunner, job: Job) -> str:
    """Poll until the job's worker runs on the node; its batch job id."""
    wait_for(
        lambda: runner.poll() is not None and job.status().state == "running" and job.status().iteration,
        timeout=60,
        what=f"{job.name} to run",
    )
    return runner.record(job)["job_id"]


# ---------------------------------------------------------------------- without a cluster
def test_settings_refuse_what_slurm_would_with_one_line_naming_the_option():
    for kw, words in [
        ({"time_limit": "an hour"}, "time_limit"),
        ({"mem": "lots"}, "mem"),
        ({"cpus_per_task": 0}, "cpus_per_task"),
        ({"partition": "a\nb"}, "partition"),
        ({"extra_args": ["constraint=a100"]}, "extra sbatch argument"),
        ({"env": {"1X": "y"}}, "env"),
        ({"max_submitted": 0}, "max_submitted"),
    ]:
        with pytest.raises(SlurmError) as e:
            SlurmSettings(**kw)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SlurmError, match=r"slurm.json: unknown Slurm setting\(s\) 'partitoin'"):
        SlurmSettings.from_json({"partitoin": "gpu"}, where="slurm.json")


def test_project_settings_are_saved_once_and_read_back(tmp_path):
    assert load_project_settings(tmp_path) is None
    settings = SlurmSettings(
        partition="gpu",
        account="lab",
        time_limit="2:00:00",
        gpus="1",
        mem="32G",
        setup=["module load cuda/12.1", "source /shared/venv/bin/activate"],
        python="python",
        scheduler_env={"SLURM_CONF": "/here/only"},
    )
    save_project_settings(tmp_path, settings)
    assert load_project_settings(tmp_path) == SlurmSettings(**{**settings.to_json(), "scheduler_env": {}})
    assert load_project_settings(tmp_path).merged(partition="debug", qos=None).partition == "debug"
    (tmp_path / "runner.json").write_text('{"kind": "slurm", "slurm": {"time_limit": "soon"}}')
    with pytest.raises(SlurmError, match="runner.json: slurm: time_limit 'soon'"):
        load_project_settings(tmp_path)
    (tmp_path / "runner.json").write_text('{"kind": "slurm", "slurm": {"partitoin": "gpu"}}')
    with pytest.raises(SlurmError, match=r"runner.json: slurm: unknown Slurm setting\(s\) 'partitoin'"):
        load_project_settings(tmp_path)


def test_the_project_choice_builds_the_runner_of_the_panel_and_slurm_options_need_the_slurm_runner(tmp_path, capsys):
    from ActiveLearning3DLib.cli import main as al3d
    from ActiveLearning3DLib.jobs.slurm import project_runner, save_project_runner

    assert project_runner(tmp_path) is None
    save_project_runner(tmp_path, "local", SlurmSettings(partition="gpu"))
    assert project_runner(tmp_path) is None  # kept, but the project runs locally
    save_project_runner(tmp_path, "slurm", SlurmSettings(partition="gpu", time_limit="30"))
    runner = project_runner(tmp_path)
    assert isinstance(runner, SlurmRunner) and (runner.settings.partition, runner.settings.time_limit) == ("gpu", "30")
    assert al3d(["train", str(tmp_path / "nowhere"), "--runner", "local", "--slurm-time", "10", "--slurm-mem", "4G"]) == 1
    assert "al3d train: error: --slurm-time, --slurm-mem need --runner slurm" in capsys.readouterr().err
    assert al3d(["train", str(tmp_path / "nowhere"), "--runner", "slurm", "--slurm-time", "soon"]) == 1
    assert "time_limit 'soon' is not a Slurm time" in capsys.readouterr().err


def test_batch_script_holds_the_options_setup_and_environment_and_runs_the_worker(tmp_path):
    job = Job.create(tmp_path, "train", "selftest", {"threads": 3}, env={"nnUNet_results": "/shared/it's here"})
    runner = SlurmRunner(
        SlurmSettings(
            partition="gpu",
            account="lab",
            qos="normal",
            time_limit="1-00:00:00",
            gres="gpu:1",
            mem="16G",
            extra_args=["--constraint=a100"],
            setup=["module load cuda"],
            python="/opt/venv/bin/python",
            env={"OMP_PROC_BIND": "close"},
        )
    )
    script = runner.batch_script(job)
    lines = script.splitlines()
    for option in (
        "--partition=gpu",
        "--account=lab",
        "--qos=normal",
        "--time=1-00:00:00",
        "--gres=gpu:1",
        "--mem=16G",
        "--constraint=a100",
        "--cpus-per-task=3",
        "--export=NONE",
        f"--output={job.log_path}",
        f"--chdir={job.path}",
    ):
        assert f"#SBATCH {option}" in lines, option
    assert lines.index("module load cuda") < lines.index("export OMP_PROC_BIND=close")
    assert "export nnUNet_results='/shared/it'\"'\"'s here'" in lines  # quoted for the shell
    assert "export AL3D_RUNNER=slurm" in lines
    assert lines[-1] == f"exec /opt/venv/bin/python -m ActiveLearning3DLib.worker {job.path}"
    out = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_runner_settings_fill_what_the_slurm_settings_leave_open():
    from ActiveLearning3DLib.jobs import RunnerSettings, make_runner

    runner = make_runner(
        RunnerSettings(
            kind="slurm", python="/x/python", env={"A": "1"}, poll_seconds=0.3, slurm=SlurmSettings(partition="p", env={"B": "2"})
        )
    )
    assert isinstance(runner, SlurmRunner) and runner.kind == "slurm"
    assert (runner.settings.python, runner.settings.env, runner.settings.poll_seconds) == ("/x/python", {"A": "1", "B": "2"}, 0.3)
    assert runner.settings.partition == "p"


def test_the_python_api_runs_a_loop_or_a_simulation_through_slurm_from_runner_settings(tmp_path_factory, tmp_path):
    """The Python API's --runner slurm: LoopSettings.runner (logic.loop_pipeline) and SimulationSettings.runner
    build the Slurm runner with the given settings, the caller's worker interpreter filling what they leave open.
    (The cluster tests run such pipelines.)"""
    from ActiveLearning3DLib.jobs import RunnerSettings
    from ActiveLearning3DLib.pipeline import LoopSettings
    from ActiveLearning3DLib.simulation import Simulation, SimulationSettings

    runner = RunnerSettings(kind="slurm", slurm=SlurmSettings(partition="gpu", time_limit="2:00:00", max_submitted=4))
    logic = _project(tmp_path_factory, "api")
    pipeline = logic.loop_pipeline(LoopSettings(profile="test", device="cpu", python="/cluster/venv/bin/python", runner=runner))
    simulation = Simulation(
        SimulationSettings(
            images=tmp_path / "images",
            labels=tmp_path / "labels",
            methods=("random",),
            out=tmp_path / "out",
            profile="test",
            device="cpu",
            runner=runner,
        )
    )
    for built in (pipeline.runner, simulation.runner):
        assert isinstance(built, SlurmRunner) and built.capacity == 4
        assert (built.settings.partition, built.settings.time_limit) == ("gpu", "2:00:00")
    assert pipeline.runner.settings.python == "/cluster/venv/bin/python"
    assert not (tmp_path / "out").exists()  # nothing made or submitted until they run
    assert not logic.jobs_dir.is_dir() or not any(logic.jobs_dir.iterdir())


# ---------------------------------------------------------------------- against the cluster
def test_selftest_job_runs_as_one_batch_job(slurm_env, tmp_path):
    job = Job.create(tmp_path, "one", "selftest", {"steps": 3, "seconds": 0.05, "print_env": "AL3D_TEST_VALUE"})
    runner = SlurmRunner(_settings(slurm_env, env={"AL3D_TEST_VALUE": "worker-only"}, time_limit="5"))
    environ = dict(os.environ)
    [status] = runner.run([job], timeout=120)
    assert (status.state, status.progress, status.iteration, status.exit_code) == ("done", 1.0, 3, 0), status.message
    record = runner.record(job)
    assert (status.runner, status.runner_id) == ("slurm", record["job_id"])
    # the runner reports it done from the folder; the batch job ends a moment later as the worker exits
    wait_for(lambda: _batch_state(slurm_env, record["job_id"]) == "COMPLETED", timeout=30, what="COMPLETED", interval=0.1)
    log = job.log_path.read_text()
    assert "step 3/3" in log and "AL3D_TEST_VALUE=worker-only" in log
    assert json.loads((job.path / "result.json").read_text())["steps"] == 3
    assert dict(os.environ) == environ and "AL3D_TEST_VALUE" not in os.environ
    assert "#SBATCH --time=5" in (job.path / "slurm.sh").read_text()
    # submitting a done job again submits nothing
    again = SlurmRunner(_settings(slurm_env))
    again.submit(job)
    assert again.active() == [] and again.scheduler_calls == 0 and runner.record(job)["job_id"] == record["job_id"]


def test_cancel_scancels_the_batch_job(slurm_env, tmp_path):
    job = Job.create(tmp_path, "long", "selftest", {"steps": 600, "seconds": 0.1, "spawn_child": True})
    runner = SlurmRunner(_settings(slurm_env))
    runner.submit(job)
    job_id = _running(runner, job)
    pid = job.status().pid
    status = runner.cancel(job)
    assert status.state == "cancelled"
    wait_for(
        lambda: _batch_state(slurm_env, job_id) == "CANCELLED", timeout=60, what="Slurm to cancel the batch job", interval=0.1
    )
    psutil = pytest.importorskip("psutil")
    wait_for(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
        timeout=30,
        what="the worker process to end",
    )
    assert runner.active() == [] and runner.poll() == []
    assert job.status().state == "cancelled"  # not turned into a failure afterwards


def test_batch_job_killed_by_the_scheduler_is_failed_with_its_reason_and_runs_again(slurm_env, tmp_path):
    job = Job.create(tmp_path, "killed", "selftest", {"steps": 30, "seconds": 0.1})
    runner = SlurmRunner(_settings(slurm_env))
    runner.submit(job)
    first = _running(runner, job)
    _slurm(slurm_env, "scancel", "--signal=KILL", first)  # as an administrator would; the worker cannot say a word
    ended = wait_for(lambda: runner.poll(), timeout=60, what="the runner to notice the killed batch job")
    assert [j.path for j in ended] == [job.path]
    status = job.status()
    assert status.state == "failed"
    assert f"Slurm batch job {first} ended CANCELLED" in status.message and "without the worker finishing" in status.message
    assert "log:" in status.message and "step" in status.message  # the log's tail
    # running it again submits a new batch job, which finishes; the killed attempt is kept in the status
    [status] = runner.run([job], timeout=120)
    assert status.state == "done", status.message
    second = runner.record(job)
    assert second["job_id"] != first and second["replaced"] == first
    assert len(status.earlier) == 1 and status.earlier[0][0]


def test_job_over_its_time_limit_is_failed_as_timeout(slurm_env, tmp_path):
    job = Job.create(tmp_path, "slow", "selftest", {"steps": 300, "seconds": 1})
    runner = SlurmRunner(_settings(slurm_env, time_limit="1"))
    runner.submit(job)
    job_id = _running(runner, job)
    assert runner.wait([job], timeout=240)
    status = job.status()
    assert status.state == "failed"
    assert f"Slurm batch job {job_id} ended TIMEOUT" in status.message
    assert "SIGTERM" in status.message  # the worker had written 'cancelled' on Slurm's SIGTERM: not taken for a cancel
    assert 30 <= status.iteration < 300


def test_a_second_runner_adopts_a_running_batch_job_instead_of_submitting_it_again(slurm_env, tmp_path):
    jobs = [Job.create(tmp_path, f"j{i}", "selftest", {"steps": 100, "seconds": 0.1}) for i in range(2)]
    first = SlurmRunner(_settings(slurm_env))
    for job in jobs:
        first.submit(job)
    ids = [_running(first, jobs[0]), first.record(jobs[1])["job_id"]]
    del first  # the CLI or Slicer went away; its batch jobs go on

    restarted = SlurmRunner(_settings(slurm_env))
    for job in jobs:
        restarted.submit(job)
    assert restarted.scheduler_calls == 0  # nothing submitted; the next poll asks about both at once
    restarted.poll()
    assert restarted.scheduler_calls == 1
    assert sorted(j.path for j in restarted.active()) == sorted(j.path for j in jobs)
    third = SlurmRunner(_settings(slurm_env))
    assert all(third.adopt(job) for job in jobs) and third.scheduler_calls == 1  # one squeue for all adoptions
    assert restarted.wait(jobs, timeout=120)
    assert [j.status().state for j in jobs] == ["done", "done"]
    assert [restarted.record(j)["job_id"] for j in jobs] == ids
    assert [j.status().runner_id for j in jobs] == ids  # each ran once, as the batch job first submitted
    assert all(j.log_path.read_text().count("selftest job") == 1 for j in jobs)


def test_max_submitted_keeps_at_most_that_many_batch_jobs_in_the_queue_and_runs_them_all(slurm_env, tmp_path):
    """7 jobs with max_submitted=2: squeue, read every 50 ms while they run, never holds more than 2 of them
    (pending, running or completing), holds 2 while jobs wait, and each job runs once, in a batch job of its own."""
    import threading

    tag = tmp_path.name[-12:].replace("_", "")
    jobs = [Job.create(tmp_path, f"cap{tag}-{i}", "selftest", {"steps": 2, "seconds": 0.2}) for i in range(7)]
    runner = SlurmRunner(_settings(slurm_env, max_submitted=2))
    assert runner.capacity == 2
    counts: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            names = _slurm(slurm_env, "squeue", "--noheader", "--me", "--format=%j|%T").split()
            counts.append(
                sum(
                    1
                    for line in names
                    if line.startswith(f"al3d-cap{tag}-")
                    and line.split("|")[1] in {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}
                )
            )
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for job in jobs:
            runner.submit(job)
        assert len(runner.active()) == 7 and runner.scheduler_calls == 2  # 2 sbatch, 5 held back
        assert runner.wait(jobs, timeout=240)
    finally:
        stop.set()
        watcher.join()
    assert [j.status().state for j in jobs] == ["done"] * 7, [j.status().message for j in jobs]
    assert max(counts) == 2 and len(counts) > 20, counts
    ids = [runner.record(j)["job_id"] for j in jobs]
    assert len(set(ids)) == 7 and all(j.log_path.read_text().count("selftest job") == 1 for j in jobs)


# ---------------------------------------------------------------------- nnU-Net loops through Slurm
def _project(tmp_path_factory, name: str):
    return annotated_project(tmp_path_factory, name, LOOP_CASES, 8)


LOOP_CASES = 16


@pytest.mark.slow
def test_al3d_loop_through_slurm_survives_a_restart_and_queries_what_the_local_runner_queries(slurm_env, tmp_path_factory):
    """`al3d loop --runner slurm` (a `test`-profile loop: prepare, 2 folds side by side, evaluation, query) killed
    while its batch jobs run, then run again without the options (the project saved them): the second adopts the
    batch jobs instead of submitting them twice, and the next boxes of the model-free method are those of the same
    loop through the local runner."""
    import signal

    from ActiveLearning3DLib.cli import main as al3d
    from ActiveLearning3DLib.fileio import read_json

    here, there = _project(tmp_path_factory, "local"), _project(tmp_path_factory, "slurm")
    loop = ["--profile", "test", "--device", "cpu", "--method", "random", "--count", "5"]
    assert al3d(["loop", str(here.project.path), *loop]) == 0

    command = [sys.executable, "-m", "ActiveLearning3DLib.cli", "loop", str(there.project.path), *loop]
    env = {**os.environ, **slurm_env}  # the cluster's SLURM_CONF, for the command only
    first = subprocess.Popen(
        [*command, "--runner", "slurm", "--slurm-time", "20"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    jobs_dir = there.jobs_dir

    def fold_jobs():
        found = sorted(jobs_dir.glob("*-fold_*/slurm.json")) if jobs_dir.is_dir() else []
        return [Job(p.parent) for p in found] if len(found) == 2 else None

    try:
        folds = wait_for(fold_jobs, timeout=300, what="the folds' batch jobs")
    finally:
        first.send_signal(signal.SIGKILL)  # the terminal closed; the batch jobs go on
        output = first.communicate()[0]
    assert "runner: slurm, saved in" in output
    saved = json.loads((there.project.path / "runner.json").read_text())
    assert saved["kind"] == "slurm" and saved["slurm"]["time_limit"] == "20"
    probe = SlurmRunner(_settings(slurm_env))
    submitted = [probe.record(f)["job_id"] for f in folds]
    assert all("--time=20" in (f.path / "slurm.sh").read_text() for f in folds)
    unfinished = [f.name for f in folds if not f.status().final]
    assert unfinished, "both folds ended before the restart; nothing was left to adopt"

    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [probe.record(f)["job_id"] for f in folds] == submitted  # adopted, not submitted again
    for fold in folds:
        assert fold.status().state == "done" and fold.status().runner == "slurm"
        assert fold.log_path.read_text().count(f"nnunet_train job {fold.name} ") == 1
    jobs = [Job(p.parent) for p in jobs_dir.glob("*/job.json")]
    assert {j.name.rsplit("-", 1)[-1] for j in jobs} >= {"prepare", "fold_0", "fold_1", "evaluate"}
    ids = {probe.record(j)["job_id"] for j in jobs}
    assert len(ids) == len(jobs)  # one batch job each, none submitted twice
    wait_for(
        lambda: {s.state for s in probe.batch_states(ids).values()} == {"COMPLETED"},
        timeout=60,
        what="every batch job COMPLETED",
        interval=0.1,
    )  # the last ones end a moment after their folder says done

    def loop_one(logic):
        d = read_json(logic.project.loop_path(1))
        return d["method"], d["seed"], d["patches"]

    assert loop_one(there) == loop_one(here)
    assert len(loop_one(there)[2]) == 5


@pytest.mark.slow
def test_al3d_simulate_through_slurm_records_the_boxes_of_the_local_runner(slurm_env, tmp_path_factory):
    """`al3d simulate --runner slurm` (random, one seed, one loop, `test` profile, 2 folds, no full-data reference)
    and the same simulation through the local runner, side by side: the same records (boxes: case, corner, size per
    loop), and every job of the Slurm grid ran as a batch job of its own (sbatch, COMPLETED), none of the local one."""
    from conftest import default_data_dir

    from ActiveLearning3DLib.fileio import read_json

    data = default_data_dir(tmp_path_factory, phantom_cases=LOOP_CASES)
    root = tmp_path_factory.mktemp("simulate")
    env = {**os.environ, **slurm_env}
    runs = {}
    for kind in ("local", "slurm"):
        command = [
            sys.executable,
            "-m",
            "ActiveLearning3DLib.cli",
            "simulate",
            "--images",
            str(data / "imagesTr"),
            "--labels",
            str(data / "labelsTr"),
            "--method",
            "random",
            "--seeds",
            "0",
            "--loops",
            "1",
            "--budget",
            "20",
            "--profile",
            "test",
            "--device",
            "cpu",
            "--folds",
            "2",
            "--max-cases",
            str(LOOP_CASES),
            "--no-reference",
            "--out",
            str(root / kind),
            "--runner",
            kind,
        ]
        runs[kind] = subprocess.Popen(
            command + (["--slurm-time", "20"] if kind == "slurm" else []),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outputs = {kind: p.communicate(timeout=900)[0] for kind, p in runs.items()}
    assert all(p.returncode == 0 for p in runs.values()), outputs

    def records(kind):
        found = sorted((root / kind / "results").glob("*/seed_*/loop_*.json"))
        return {str(p.relative_to(root / kind)): read_json(p) for p in found}

    def boxes(record):
        return [
            [(p["file"], tuple(p["coords"]), tuple(p["size"])) for p in record[key]["patches"]]
            for key in ("loop_file", "next_loop_file")
            if record.get(key)
        ]

    local, slurm = records("local"), records("slurm")
    assert list(local) == list(slurm) == ["results/random/seed_0/loop_000.json"]
    assert {k: boxes(r) for k, r in slurm.items()} == {k: boxes(r) for k, r in local.items()}
    assert all(r["boxes"] > 0 and r["mean_dice"] is not None for r in [*local.values(), *slurm.values()])

    probe = SlurmRunner(_settings(slurm_env))
    jobs = {kind: [Job(p.parent) for p in (root / kind).rglob("jobs/*/job.json")] for kind in runs}
    kinds = {j.spec().kind for j in jobs["slurm"]}
    assert {"nnunet_prepare", "nnunet_train"} <= kinds and kinds == {j.spec().kind for j in jobs["local"]}
    assert len(jobs["slurm"]) == len(jobs["local"])
    ids = [probe.record(j).get("job_id") for j in jobs["slurm"]]
    names = {}  # a run's project starts as a copy of its seed's start project, jobs folders included
    for job, job_id in zip(jobs["slurm"], ids):
        names.setdefault(job_id, set()).add(job.name)
    assert all(ids) and all(len(n) == 1 for n in names.values()), names  # a batch job per job, none submitted twice
    assert len(names) == len({j.name for j in jobs["slurm"]})
    for job, job_id in zip(jobs["slurm"], ids):
        status = job.status()
        assert (status.state, status.runner, status.runner_id) == ("done", "slurm", job_id), (job.name, status)
        assert "#SBATCH --time=20" in probe.script_path(job).read_text()
    wait_for(
        lambda: [s.state for s in probe.batch_states(ids).values()] == ["COMPLETED"] * len(names),
        timeout=60,
        what="every batch job COMPLETED",
        interval=0.2,
    )
    assert all(j.status().runner == "local" and not probe.record_path(j).exists() for j in jobs["local"])


@pytest.mark.slow
def test_training_over_its_time_limit_is_timeout_and_resumes_from_its_checkpoint(slurm_env, tmp_path_factory):
    """Folds whose batch jobs hit the time limit are failed as TIMEOUT; run again, fold 0 goes on from its last
    checkpoint instead of starting over (nnU-Net's log says which epoch the new attempt starts at)."""
    import re

    from ActiveLearning3DLib.nnunet.profiles import resolve_profile
    from ActiveLearning3DLib.pipeline import LoopSettings

    logic = _project(tmp_path_factory, "timeout")
    settings = LoopSettings(
        profile=resolve_profile("test", epochs=1000, save_every=1),
        device="cpu",
        stages=("prepare", "train"),
        evaluate=False,
        method="random",
    )
    short = SlurmRunner(_settings(slurm_env, time_limit="1", cpus_per_task=1))  # 1000 epochs never fit in a minute
    pipeline = logic.loop_pipeline(settings, short)
    state = pipeline.run(timeout=400)
    fold = Job(pipeline.jobs_dir / f"{pipeline.model_name}-fold_0")
    assert state.state == "failed" and "TIMEOUT" in state.message, state.message
    status = fold.status()
    assert status.state == "failed" and "ended TIMEOUT" in status.message, status.message
    assert (pipeline.model_folder / "fold_0" / "checkpoint_latest.pth").is_file()
    epochs = [int(e) for e in re.findall(r"Epoch (\d+)$", fold.log_path.read_text(), re.M)]
    assert epochs and epochs[-1] >= 2, "fewer than 2 epochs in a minute"

    def second_attempt_epoch():
        pipeline.advance()
        _, sep, after = fold.log_path.read_text().partition(f"nnunet_train job {fold.name} ")
        attempts = after.split(f"nnunet_train job {fold.name} ")
        found = re.findall(r"Epoch (\d+)$", attempts[1], re.M) if len(attempts) > 1 else []
        return int(found[0]) if found else None

    pipeline = logic.loop_pipeline(settings, SlurmRunner(_settings(slurm_env, cpus_per_task=1)))
    try:
        resumed_at = wait_for(second_attempt_epoch, timeout=300, what="fold 0 to train again", interval=0.1)
    finally:
        pipeline.cancel()
    assert epochs[-1] - 1 <= resumed_at <= epochs[-1] + 1  # from the checkpoint of its last epoch, not epoch 0
    assert len(fold.status().earlier) == 1 and fold.status().state == "cancelled"
