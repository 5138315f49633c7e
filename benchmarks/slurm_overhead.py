"""Benchmark: what Slurm adds per job against the local runner, and 100 jobs submitted at once.

On one machine, the same ``selftest`` jobs (one step, no sleep: the worker's
own time is Python's start and our imports) run
1. one after another through the local runner and through the Slurm runner,
   both polling every ``--poll`` seconds: the time from submit until the
   runner reports the job done, median over ``--jobs`` jobs. The difference is
   what Slurm adds beyond the worker's own time (sbatch, scheduling, slurmd
   starting the batch step, squeue);
2. ``--burst`` jobs (0.2 s each) submitted at once through Slurm, and the same
   through the local runner at ``--parallel`` at a time: wall time, jobs per
   minute, and a count of lost or doubled jobs (each must end done, with one
   worker start in its log, one batch job id of its own, and Slurm reporting
   that batch job COMPLETED);
3. with ``--grid``: a small ``test``-profile simulation grid (``al3d simulate``,
   ``random`` x ``--grid-seeds`` x 2 loops on 16 cases of the default data, no
   full-data reference) through the local runner and through Slurm: wall
   times, their ratio, and whether both grids chose the same boxes.

The cluster is the one ``AL3D_TEST_SLURM`` names (an env file of
``.ci/services/slurm.sh``), else one started here with that script (root and
Debian's slurm-wlm and munge needed); ``--extra-conf LINE`` starts one here
with that line added to its slurm.conf (e.g.
``SchedulerParameters=batch_sched_delay=0``: Slurm's default schedules batch
jobs in batches up to 3 s apart, which is most of its per-job latency here).

    .venv/bin/python benchmarks/slurm_overhead.py [--jobs 10] [--burst 100] [--poll 0.5] [--parallel 2] [--extra-conf LINE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ActiveLearning3DLib.jobs import Job, RunnerSettings, make_runner  # noqa: E402
from ActiveLearning3DLib.jobs.slurm import SlurmRunner, SlurmSettings  # noqa: E402

SCRIPT = REPO / ".ci" / "services" / "slurm.sh"


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


PHASES = ("submit", "start", "worker", "notice")


def latency(runner, root: Path, name: str) -> dict[str, float]:
    """Seconds from submitting one quick selftest job until the runner reports it done, and its phases.

    A watcher thread reads the job's status.json every 5 ms, apart from the
    runner, so the total splits into: ``submit`` (the runner's submit call:
    sbatch, or starting the local process), ``start`` (until the worker says
    running: the scheduler's wait and slurmd's launch of the batch step, then
    Python's start and our imports, which the local runner has too),
    ``worker`` (until the worker says done) and ``notice`` (until the runner's
    ``wait`` returns: the runner's own polling).
    """
    job = Job.create(root, name, "selftest", {"steps": 1, "seconds": 0})
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and "done" not in seen:
            try:
                state = json.loads((job.path / "status.json").read_text()).get("state")
            except (OSError, ValueError):
                state = None
            if state in ("running", "done"):
                seen.setdefault(state, time.perf_counter())
                if state == "done":
                    seen.setdefault("running", seen["done"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.perf_counter()
    watcher.start()
    runner.submit(job)
    submitted = time.perf_counter()
    runner.wait([job], timeout=300)
    ended = time.perf_counter()
    stop.set()
    watcher.join()
    assert job.status().state == "done", f"{job.name}: {job.status().state}: {job.status().message}"
    running, done = seen.get("running", ended), seen.get("done", ended)
    return {
        "total": ended - started,
        "submit": submitted - started,
        "start": running - submitted,
        "worker": done - running,
        "notice": ended - done,
    }


def phases(runs: list[dict[str, float]]) -> str:
    """Median of each phase, as printed."""
    return ", ".join(f"{p} {statistics.median(r[p] for r in runs):.2f}" for p in PHASES)


def burst(runner, root: Path, count: int) -> tuple[float, float, list[Job]]:
    """Submit ``count`` selftest jobs at once and wait: (seconds to submit them all, wall seconds, the jobs)."""
    jobs = [Job.create(root, f"b{i:03d}", "selftest", {"steps": 1, "seconds": 0.2}) for i in range(count)]
    started = time.perf_counter()
    for job in jobs:
        runner.submit(job)
    submitted = time.perf_counter() - started
    assert runner.wait(jobs, timeout=3600), "the burst did not finish within an hour"
    return submitted, time.perf_counter() - started, jobs


def lost_or_doubled(jobs: list[Job], slurm: SlurmRunner | None) -> list[str]:
    """What is wrong with the burst's jobs: not done, started more or less than once, a shared or unfinished batch job."""
    problems = []
    for job in jobs:
        status = job.status()
        starts = job.log_path.read_text().count(f"selftest job {job.name} ")
        if status.state != "done" or starts != 1:
            problems.append(f"{job.name}: {status.state}, {starts} worker starts")
    if slurm is not None:
        ids = [slurm.record(job).get("job_id") for job in jobs]
        if len(set(ids)) != len(jobs) or any(slurm.record(job).get("replaced") for job in jobs):
            problems.append(f"{len(set(ids))} batch job ids for {len(jobs)} jobs (or a job submitted twice)")
        deadline = time.monotonic() + 30  # the runner sees done in the folder; the batch job ends a moment later
        states = slurm.batch_states(ids)
        while any(s.active for s in states.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            states = slurm.batch_states(ids)
        bad = {i: s.state for i, s in states.items() if s.state != "COMPLETED"}
        if bad or len(states) != len(ids):
            problems.append(f"batch jobs not COMPLETED: {bad or 'some unknown to squeue'}")
    return problems


def grid(work: Path, scheduler_env: dict[str, str], seeds: str) -> None:
    """Time the same small simulation grid through the local runner and through Slurm."""
    from ActiveLearning3DLib.default_data import resolve_default_data

    data = resolve_default_data(os.environ, REPO, work / "phantoms", 0)
    walls, boxes = {}, {}
    for kind in ("local", "slurm"):
        out = work / f"grid-{kind}"
        command = [
            sys.executable,
            "-m",
            "ActiveLearning3DLib.cli",
            "simulate",
            "--images",
            str(data.images),
            "--labels",
            str(data.labels),
            "--method",
            "random",
            "--seeds",
            seeds,
            "--loops",
            "2",
            "--profile",
            "test",
            "--device",
            "cpu",
            "--max-cases",
            "16",
            "--no-reference",
            "--init",
            "scratch",  # as the figures in RESULTS.md were measured
            "--out",
            str(out),
            "--runner",
            kind,
        ]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env={**os.environ, **scheduler_env}, capture_output=True, text=True, check=False)
        walls[kind] = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the {kind} grid failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        boxes[kind] = sorted(
            json.dumps(
                [
                    {k: b.get(k) for k in ("file", "coords", "size", "loop", "index", "method")}
                    for b in json.loads(p.read_text())["patches"]
                ]
            )
            for p in out.rglob("loops/loop_*.json")
            if "base" not in p.parts
        )  # not annotation times
    same = boxes["local"] == boxes["slurm"] and bool(boxes["local"])
    print(
        f"test-profile grid (random x seeds {seeds} x 2 loops, {data.name} 16 cases, no reference): local "
        f"{walls['local']:.0f} s, Slurm {walls['slurm']:.0f} s, ratio {walls['slurm'] / walls['local']:.2f}; "
        f"{len(boxes['local'])} loop files, same boxes both ways: {same}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="jobs one after another per runner (latency)")
    parser.add_argument("--burst", type=int, default=100, help="jobs submitted at once")
    parser.add_argument("--poll", type=float, default=0.5, help="poll interval of both runners, seconds")
    parser.add_argument(
        "--slurm-poll",
        type=float,
        default=None,
        help="the Slurm runner's poll_seconds (its squeue interval) when it differs from --poll; "
        "the Slurm runner's own default is 5",
    )
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="local runner's jobs at a time")
    parser.add_argument("--grid", action="store_true", help="also time a test-profile simulation grid both ways")
    parser.add_argument("--grid-seeds", default="0,1", help="the grid's seeds, comma separated")
    parser.add_argument("--skip-jobs", action="store_true", help="only the grid (with --grid)")
    parser.add_argument(
        "--extra-conf",
        action="append",
        default=[],
        metavar="LINE",
        help="start a cluster here with this slurm.conf line added (repeatable)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="al3d-slurm-bench-"))
    cluster = None
    try:
        if os.environ.get("AL3D_TEST_SLURM") and not args.extra_conf:
            scheduler_env = read_env(Path(os.environ["AL3D_TEST_SLURM"]))
        else:
            cluster = work / "cluster"
            out = subprocess.run(
                ["bash", str(SCRIPT), "start", str(cluster)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "SLURM_EXTRA_CONF": "\n".join(args.extra_conf)},
            )
            if out.returncode != 0:
                print(f"the Slurm cluster did not start: {out.stderr.strip()}", file=sys.stderr)
                return 1
            scheduler_env = read_env(Path(out.stdout.strip().splitlines()[-1]))
        conf = scheduler_env.get("SLURM_CONF", "")
        conf_text = Path(conf).read_text() if conf else ""
        cpus = next((w.split("=")[1] for w in conf_text.split() if w.startswith("CPUs=")), "?")
        scheduler = [line for line in conf_text.splitlines() if line.startswith("SchedulerParameters=")]
        slurm_poll = args.poll if args.slurm_poll is None else args.slurm_poll
        slurm_settings = SlurmSettings(scheduler_env=scheduler_env, poll_seconds=slurm_poll)
        version = subprocess.run(
            ["sinfo", "--version"], capture_output=True, text=True, check=False, env={**os.environ, **scheduler_env}
        ).stdout.strip()
        print(
            f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}; {version}, "
            f"one node ({cpus} CPUs), one CPU per job; {'; '.join(scheduler) or 'SchedulerParameters: Slurm defaults'}; "
            f"the local runner polls every {args.poll:g} s, the Slurm runner's poll_seconds is {slurm_poll:g} s"
        )

        if args.grid:
            grid(work, scheduler_env, args.grid_seeds)
        if args.skip_jobs:
            return 0
        local = make_runner(RunnerSettings(kind="local", max_parallel=1, poll_seconds=args.poll))
        slurm = SlurmRunner(slurm_settings)
        for runner, tag in ((local, "local"), (slurm, "slurm")):  # warm up: file caches, the first batch step
            latency(runner, work / "warm", f"warm-{tag}")
        local_runs = [latency(local, work / "latency", f"local{i}") for i in range(args.jobs)]
        slurm_runs = [latency(slurm, work / "latency", f"slurm{i}") for i in range(args.jobs)]
        local_s, slurm_s = [r["total"] for r in local_runs], [r["total"] for r in slurm_runs]
        lm, sm = statistics.median(local_s), statistics.median(slurm_s)
        print(
            f"one job at a time ({args.jobs} jobs each), submit until reported done: local median {lm:.2f} s "
            f"(min {min(local_s):.2f}, max {max(local_s):.2f}), Slurm median {sm:.2f} s "
            f"(min {min(slurm_s):.2f}, max {max(slurm_s):.2f}); Slurm adds {sm - lm:.2f} s per job"
        )
        print(
            f"  phases, median s: local {phases(local_runs)}; Slurm {phases(slurm_runs)} (Slurm {slurm.scheduler_calls} "
            f"commands for {args.jobs + 1} jobs)"
        )
        said = {
            tag: statistics.median(r["submit"] + r["start"] + r["worker"] for r in runs)
            for tag, runs in (("local", local_runs), ("slurm", slurm_runs))
        }
        ours = statistics.median(r["submit"] + r["notice"] for r in slurm_runs)
        print(
            f"  submit until the worker wrote done, median: local {said['local']:.2f} s, Slurm {said['slurm']:.2f} s: "
            f"Slurm's scheduling and launch add {said['slurm'] - said['local']:.2f} s; the Slurm runner's own share "
            f"(sbatch + seeing done) {ours:.2f} s"
        )

        if args.burst < 1:
            return 0
        burst_runner = SlurmRunner(slurm_settings)
        submitted, wall, jobs = burst(burst_runner, work / "burst-slurm", args.burst)
        problems = lost_or_doubled(jobs, slurm)
        print(
            f"{args.burst} jobs at once through Slurm: submitted in {submitted:.1f} s "
            f"({1000 * submitted / args.burst:.0f} ms per sbatch), all ended after {wall:.1f} s "
            f"({60 * args.burst / wall:.0f} jobs/min), {burst_runner.scheduler_calls - args.burst} squeue calls "
            f"in all; lost or doubled: {len(problems)}" + "".join(f"\n  {p}" for p in problems)
        )
        local_burst = make_runner(RunnerSettings(kind="local", max_parallel=args.parallel, poll_seconds=args.poll))
        _, local_wall, local_jobs = burst(local_burst, work / "burst-local", args.burst)
        local_problems = lost_or_doubled(local_jobs, None)
        print(
            f"{args.burst} jobs at once through the local runner ({args.parallel} at a time): all ended after "
            f"{local_wall:.1f} s ({60 * args.burst / local_wall:.0f} jobs/min); lost or doubled: {len(local_problems)}"
        )
        return 1 if problems or local_problems else 0
    finally:
        if cluster is not None:
            subprocess.run(["bash", str(SCRIPT), "stop", str(cluster)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
