"""Fault injection with real processes and a real small filesystem: nothing annotated is lost.

- ``kill -9`` of a real ``al3d annotate --oracle`` and of a real script that submits boxes through
  ``ActiveLearningLogic.submit``, at several points (before the first box, after a few, midway);
  afterwards the project opens, every box marked annotated has its labels on disk, and running the
  same command again finishes every box.
- ``kill -9`` of a real ``al3d init`` while it builds the project: the next ``init`` removes the
  half-made ``.NAME.creating-*`` folder and succeeds.
- A full disk (a 4 MiB tmpfs, where this process may mount one: root on Linux, as in CI): a submit
  and a query that cannot be written leave the project readable and byte for byte unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.project import Project
from conftest import checksums, make_dataset

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 24, 24)
BOXES = 150


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _annotated_count(project: Path) -> int:
    loops = sorted((project / "loops").glob("loop_*.json"))
    return sum(1 for p in loops for b in json.loads(p.read_text())["patches"] if b["state"] == "annotated")


def _make_project(root: Path, boxes: int = BOXES) -> Path:
    """8 cases of 24^3 with ``boxes`` pending random boxes of 4^3 (loop 0)."""
    data = make_dataset(root / "source", n_cases=8, shape=SHAPE)
    path = root / "project"
    logic = ActiveLearningLogic.create(path, data.images, data.labels, patch_size=(4, 4, 4), test_fraction=0.125)
    logic.query("random", boxes)
    return path


def _check_nothing_lost(path: Path) -> tuple[int, int]:
    """(annotated boxes, boxes lost): a box marked annotated whose labels are not the ground truth is lost.

    A pending box may already hold its labels (a kill between the label write and the record), never less.
    """
    project = Project.open(path)
    annotated = lost = 0
    partial = {c: project.read_partial_labels(c) for c in project.pool_cases}
    for record in project.all_boxes():
        inside = partial[record.case][record.box.slices]
        truth = project.read_ground_truth(record.case)[record.box.slices]
        if record.state == "annotated":
            annotated += 1
            lost += int(not np.array_equal(inside, truth))
        else:
            assert np.all(inside == project.ignore_value) or np.array_equal(inside, truth), record
    return annotated, lost


SUBMIT_SCRIPT = """
import sys
from ActiveLearning3DLib import ActiveLearningLogic
logic = ActiveLearningLogic.open(sys.argv[1])
for record in logic.pending_boxes():
    whole = logic.project.read_ground_truth(record.case)   # a whole-image label array: only the box is taken
    logic.submit(record, whole, annotator="script", seconds=1.0)
print("submitted all", flush=True)
"""

COMMANDS = {
    "al3d annotate --oracle": lambda project: [
        sys.executable,
        "-m",
        "ActiveLearning3DLib.cli",
        "annotate",
        str(project),
        "--oracle",
    ],
    "submit script": lambda project: [sys.executable, "-c", SUBMIT_SCRIPT, str(project)],
}


def _run_and_kill(argv: list[str], project: Path, after_boxes: int) -> int:
    """Start ``argv``, SIGKILL it once ``after_boxes`` boxes are annotated on disk; the count when it died."""
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _annotated_count(project) >= after_boxes:
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"finished before the kill point: {proc.stdout.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    return _annotated_count(project)


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX; Windows has no kill -9 of this kind")
@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_9_while_annotating_loses_no_box_and_no_label(tmp_path, command):
    project = _make_project(tmp_path)
    points = [0, 1, 37, 100]  # before the first box, right after it, then in the middle of the work
    for after in points:
        died_at = _run_and_kill(COMMANDS[command](project), project, after)
        assert died_at >= after
        annotated, lost = _check_nothing_lost(project)
        assert lost == 0 and annotated == died_at
    done = subprocess.run(COMMANDS[command](project), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    annotated, lost = _check_nothing_lost(project)
    assert (annotated, lost) == (BOXES, 0)
    assert not ActiveLearningLogic.open(project).pending_boxes()


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX; Windows has no kill -9 of this kind")
def test_kill_9_during_init_leaves_a_folder_the_next_init_removes(tmp_path):
    data = make_dataset(tmp_path / "source", n_cases=40, shape=(40, 40, 40))
    before = checksums(data.root)
    project = tmp_path / "project"
    argv = [
        sys.executable,
        "-m",
        "ActiveLearning3DLib.cli",
        "init",
        str(project),
        "--images",
        str(data.images),
        "--labels",
        str(data.labels),
    ]
    for attempt in range(2):  # killed while creating, twice: each leftover is removed by the next init
        proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            staging = list(tmp_path.glob(".project.creating-*"))
            if staging and any((staging[0] / "imagesTr").glob("*.nii.gz")):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "init finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        leftovers = list(tmp_path.glob(".project.creating-*"))
        assert len(leftovers) == 1 and not project.exists()  # the kill left one half-made folder, no project
    done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob(".project.creating-*")), "an interrupted init's folder was left behind"
    assert len(Project.open(project).cases) == 40 and checksums(data.root) == before


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 4 MiB tmpfs, where mounting is allowed (root on Linux); skipped elsewhere with the reason."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root on Linux")
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _content(project: Path) -> dict[str, str]:
    """Checksums of the project's files, less the lock files a writer may create (they hold no data)."""
    return {k: v for k, v in checksums(project).items() if ".lock" not in Path(k).name}


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte (unbuffered writes until ENOSPC); returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_a_full_disk_leaves_the_project_readable_and_unchanged(tmp_path, tiny_filesystem, capsys):
    from ActiveLearning3DLib.cli import main

    data = make_dataset(tmp_path / "source", n_cases=4, shape=(20, 20, 20))
    project = tiny_filesystem / "project"
    assert (
        main(["init", str(project), "--images", str(data.images), "--labels", str(data.labels), "--patch-size", "4", "4", "4"])
        == 0
    )
    assert main(["query", str(project), "--method", "random", "--count", "5"]) == 0
    assert main(["annotate", str(project), "--oracle"]) == 0
    logic = ActiveLearningLogic.open(project)
    logic.query("random", 3)
    filler = _fill(tiny_filesystem)
    capsys.readouterr()
    before = _content(project)
    status_before = logic.status().to_json()

    # a submit that cannot be written: an error, nothing changed, the box still pending
    assert main(["annotate", str(project), "--oracle"]) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _content(project) == before
    # a query that cannot be written
    (project / "loops" / "loop_001.json").rename(project / "loops" / "held.json")  # let a query run at all
    before = _content(project)
    assert main(["query", str(project), "--method", "random", "--count", "3"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert _content(project) == before
    (project / "loops" / "held.json").rename(project / "loops" / "loop_001.json")
    reopened = ActiveLearningLogic.open(project)
    assert reopened.status().to_json() == status_before
    assert not list(project.rglob(".al3d-tmp-*"))  # no temporary file left by the failed writes

    filler.unlink()
    assert main(["annotate", str(project), "--oracle"]) == 0
    annotated, lost = _check_nothing_lost(project)
    assert (annotated, lost) == (8, 0)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(project / "labelsTr" / f"{reopened.project.pool_cases[0]}.nii.gz")))
    assert labels.shape == (20, 20, 20)


def test_an_image_write_on_a_full_disk_keeps_the_previous_file(tiny_filesystem):
    """SimpleITK's writer says nothing when the disk is full and leaves an empty file: the rename put it in place
    of the label map (found by the full-disk test at 82390f7, where `al3d annotate` then reported success)."""
    import errno

    from ActiveLearning3DLib.fileio import atomic_write_image

    target = tiny_filesystem / "labels.nii.gz"
    first = np.arange(20 * 20 * 20, dtype=np.uint16).reshape(20, 20, 20) % 3
    atomic_write_image(sitk.GetImageFromArray(first), target)
    kept = target.read_bytes()
    filler = _fill(tiny_filesystem)
    with pytest.raises(OSError, match="No space left on device") as error:
        atomic_write_image(sitk.GetImageFromArray(np.ones((20, 20, 20), np.uint16)), target)
    assert error.value.errno == errno.ENOSPC and str(target) in str(error.value)
    assert target.read_bytes() == kept and sorted(p.name for p in tiny_filesystem.iterdir()) == ["filler", "labels.nii.gz"]
    filler.unlink()
    atomic_write_image(sitk.GetImageFromArray(np.ones((20, 20, 20), np.uint16)), target)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(target))).sum() == 8000
