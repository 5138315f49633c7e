"""Bad input, as a new user or an adversary gives it: every option, API argument and hand-edited file.

Each case asserts the outcome the user sees: a one-line error that names the option, argument or file
(and nothing changed on disk), or, where the input is good, that it takes effect. Among them are the
cases that failed before (wrong argument order in ``al3d query``, ``--parallel -1`` hanging, truncated
images accepted, hand-edited loop files and ``project.json`` case ids, tracebacks instead of errors).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ActiveLearning3DLib import ActiveLearningLogic
from ActiveLearning3DLib.cli import main
from ActiveLearning3DLib.fileio import read_json
from ActiveLearning3DLib.pipeline import LoopSettings
from ActiveLearning3DLib.project import Project, ProjectError
from ActiveLearning3DLib.simulation import SimulationSettings
from conftest import checksums, make_dataset, write_image

PATCH = ["4", "4", "4"]


@pytest.fixture
def project(tmp_path):
    """A 4-case project (3 pool, 1 test) with loop 0 of 3 random boxes annotated by the oracle."""
    data = make_dataset(tmp_path / "source", n_cases=4)
    path = tmp_path / "project"
    assert (
        main(
            [
                "init",
                str(path),
                "--images",
                str(data.images),
                "--labels",
                str(data.labels),
                "--patch-size",
                *PATCH,
                "--query-size",
                "3",
            ]
        )
        == 0
    )
    assert main(["query", str(path), "--method", "random", "--count", "3"]) == 0
    assert main(["annotate", str(path), "--oracle"]) == 0
    return path


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


# ------------------------------------------------------------------ options, refused before any work
BAD_OPTIONS = [
    # (command after the project/folder arguments, the option the error must name)
    (["query", "{p}", "--count", "0"], "--count"),
    (["query", "{p}", "--count", "-3"], "--count"),
    (["query", "{p}", "--count", "two"], "--count"),
    (["query", "{p}", "--per-image", "0"], "--per-image"),
    (["query", "{p}", "--stride", "0", "1", "1"], "--stride"),
    (["query", "{p}", "--seed", "-1"], "--seed"),
    (["query", "{p}", "--min-distance", "-1"], "--min-distance"),
    (["query", "{p}", "--min-distance", "nan"], "--min-distance"),
    (["query", "{p}", "--show", "-1"], "--show"),
    (["query", "{p}", "--probabilities", "{tmp}/missing"], "--probabilities"),
    (["query", "{p}", "--ae-iterations", "0"], "--ae-iterations"),
    (["query", "{p}", "--method", "cluster", "--encoder", "{tmp}/missing.pt"], "--encoder"),
    (["loop", "{p}", "--parallel", "-1"], "--parallel"),
    (["loop", "{p}", "--parallel", "0"], "--parallel"),
    (["loop", "{p}", "--count", "-1"], "--count"),
    (["loop", "{p}", "--count", "0"], "--count"),
    (["loop", "{p}", "--folds", "0"], "--folds"),
    (["loop", "{p}", "--folds", "1"], "--folds"),  # one fold trains on nothing (it crashed in the worker)
    (
        ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o", "--folds", "1"],
        "--folds",
    ),
    (["train", "{p}", "--parallel", "0"], "--parallel"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--query-size", "0"], "--query-size"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--query-size", "-5"], "--query-size"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--loops", "0"], "--loops"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--loops", "x"], "--loops"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--patch-size", "0", "4", "4"], "--patch-size"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--test-fraction", "1"], "--test-fraction"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--max-cases", "0"], "--max-cases"),
    (["init", "{tmp}/new", "--images", "{tmp}/source/imagesTr", "--start-count", "0"], "--start-count"),
    (
        ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o", "--seeds", ""],
        "--seeds",
    ),
    (
        ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o", "--seeds", "0,0"],
        "--seeds",
    ),
    (
        ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o", "--loops", "0"],
        "--loops",
    ),
    (
        ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o", "--budget", "3"],
        "--budget",
    ),
    (
        ["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random", "--out", "{tmp}/o", "--parallel", "-1"],
        "--parallel",
    ),
    (["demo", "--max-cases", "0"], "--max-cases"),
    (["loop", "{p}", "--python", "{tmp}/no-such-python"], "--python"),
    (["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "", "--out", "{tmp}/o"], "--method"),
    (["simulate", "--images", "{tmp}/i", "--labels", "{tmp}/l", "--method", "random,nope", "--out", "{tmp}/o"], "--method"),
    (
        [
            "simulate",
            "--images",
            "{tmp}/i",
            "--labels",
            "{tmp}/l",
            "--method",
            "random",
            "--out",
            "{tmp}/o",
            "--restore-from",
            "{tmp}/missing",
        ],
        "--restore-from",
    ),
    (
        [
            "simulate",
            "--images",
            "{tmp}/i",
            "--labels",
            "{tmp}/l",
            "--method",
            "random",
            "--out",
            "{tmp}/o",
            "--python",
            "{tmp}/no-such-python",
        ],
        "--python",
    ),
]


@pytest.mark.parametrize(
    "argv,option", BAD_OPTIONS, ids=[f"{a[0]} {o} {a[a.index(o) + 1] if a.index(o) + 1 < len(a) else ''}" for a, o in BAD_OPTIONS]
)
def test_a_bad_option_is_refused_up_front_in_one_line_naming_it(project, tmp_path, capsys, argv, option):
    before = checksums(project)
    argv = [a.format(p=project, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    _one_line_error(capsys, option)
    assert checksums(project) == before  # nothing trained, queried or written
    assert not (tmp_path / "new").exists() and not (tmp_path / "o").exists()


def test_an_encoder_that_is_no_torchscript_is_refused_before_the_autoencoder_trains(project, tmp_path, capsys):
    not_script = tmp_path / "encoder.pt"
    not_script.write_bytes(b"this is not a TorchScript archive")
    with pytest.raises(SystemExit):
        main(["query", str(project), "--method", "cluster", "--encoder", str(not_script)])
    err = _one_line_error(capsys, "--encoder", "not a TorchScript module")
    assert "Traceback" not in err
    assert not (project / "jobs").exists() and not (project / "embeddings").exists()  # no autoencoder trained
    from ActiveLearning3DLib.embeddings import AutoencoderSettings

    with pytest.raises(ValueError, match="not a TorchScript module"):  # the API checks the same before any job
        ActiveLearningLogic.open(project).query("cluster", 2, autoencoder=AutoencoderSettings(encoder=str(not_script)))
    assert not (project / "jobs").exists()


# ------------------------------------------------------------------ al3d query: every option takes effect
def _probabilities(root: Path, project: Path, uncertain: str) -> Path:
    """Two members of (3, Z, Y, X) probabilities: ``uncertain`` is uniform (high entropy), the others confident."""
    p = Project.open(project)
    for m, member in enumerate(("fold_0", "fold_1")):
        (root / member).mkdir(parents=True)
        for case in p.pool_cases:
            shape = p.cases[case].shape
            if case == uncertain:
                probs = np.full((3, *shape), 1 / 3, np.float32)
            else:
                probs = np.zeros((3, *shape), np.float32)
                probs[0] = 0.98 - 0.01 * m
                probs[1] = 1 - probs[0]
            np.save(root / member / f"{case}.npy", probs)
    return root


def _last_loop(project: Path) -> dict:
    p = Project.open(project)
    return read_json(p.loop_path(p.loop_indices()[-1]))


def test_query_probabilities_option_is_used(project, tmp_path, capsys):
    p = Project.open(project)
    uncertain = p.pool_cases[1]
    probs = _probabilities(tmp_path / "probs", project, uncertain)
    assert main(["query", str(project), "--method", "pe", "--count", "2", "--probabilities", str(probs)]) == 0
    loop = _last_loop(project)
    assert loop["info"]["probabilities"] == str(probs) and loop["info"]["members"] == 2
    assert [b["file"] for b in loop["patches"]] == [f"{uncertain}.nii.gz"] * 2  # the uniform case has the top entropy


def test_query_per_image_option_limits_the_boxes_per_image(project, tmp_path):
    p = Project.open(project)
    probs = _probabilities(tmp_path / "probs", project, p.pool_cases[0])
    assert main(["query", str(project), "--method", "pe", "--count", "3", "--probabilities", str(probs), "--per-image", "1"]) == 0
    files = [b["file"] for b in _last_loop(project)["patches"]]
    assert len(files) == 3 and len(set(files)) == 3  # without --per-image all three come from the uncertain case


def test_query_stride_option_sets_the_corner_grid(project, tmp_path):
    p = Project.open(project)
    probs = _probabilities(tmp_path / "probs", project, p.pool_cases[0])
    assert (
        main(["query", str(project), "--method", "pe", "--count", "3", "--probabilities", str(probs), "--stride", "5", "5", "5"])
        == 0
    )
    allowed = []  # 0, 5, 10, ... and the last corner D - 4 along each axis
    for d in next(iter(p.cases.values())).shape:
        allowed.append(set(range(0, d - 4 + 1, 5)) | {d - 4})
    patches = _last_loop(project)["patches"]
    assert len(patches) == 3
    for b in patches:
        assert all(c in axis for c, axis in zip(b["coords"], allowed)), (b["coords"], allowed)


def test_query_count_seed_show_and_distance_options(project, capsys):
    assert main(["query", str(project), "--method", "random", "--count", "2", "--seed", "7", "--show", "1"]) == 0
    out = capsys.readouterr().out
    loop = _last_loop(project)
    assert len(loop["patches"]) == 2 and loop["seed"] == 7 and "1 more" in out


# ------------------------------------------------------------------ the Python API checks as strictly
@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"count": 0}, "count"),
        ({"count": -1}, "count"),
        ({"count": 2.5}, "count"),
        ({"count": True}, "count"),
        ({"seed": -1}, "seed"),
        ({"stride": (0, 1, 1)}, "stride"),
        ({"stride": (2, 2)}, "stride"),
        ({"n_per_image": 0}, "n_per_image"),
        ({"min_distance": -1.0}, "min_distance"),
        ({"min_distance": float("nan")}, "min_distance"),
        ({"distance_space": "pixels"}, "distance_space"),
        ({"method": "nope"}, "unknown query method"),
    ],
)
def test_api_query_checks_its_arguments(project, kwargs, name):
    logic = ActiveLearningLogic.open(project)
    before = checksums(project)
    with pytest.raises(ValueError, match=name):
        logic.query(**{"method": "random", **kwargs})
    assert checksums(project) == before


def test_api_query_count_zero_is_not_the_query_size(project):
    """``count=0`` was taken as 'the project's query size' (3 here) and queried 3 boxes."""
    with pytest.raises(ValueError, match="count"):
        ActiveLearningLogic.open(project).query("random", 0)
    assert Project.open(project).loop_indices() == [0]


def test_api_submit_checks_its_arguments(project):
    logic = ActiveLearningLogic.open(project)
    logic.query("random", 2)
    box = logic.pending_boxes()[0]
    good = np.zeros(box.box.size, np.uint8)
    before = checksums(project)
    for kwargs, name in [
        ({"annotator": ""}, "annotator"),
        ({"annotator": None}, "annotator"),
        ({"seconds": -1}, "seconds"),
        ({"seconds": float("inf")}, "seconds"),
        ({"labels": np.zeros(box.box.size, object)}, "labels"),
        ({"labels": np.zeros((2, 2, 2), np.uint8)}, "shape"),
        ({"labels": np.full(box.box.size, 9, np.uint8)}, "classes are 0..2"),
        ({"box": 5}, "box"),
        ({"box": "999-0000"}, "no box"),
    ]:
        args = {"box": box, "labels": good, **kwargs}
        with pytest.raises((ValueError, ProjectError), match=name):
            logic.submit(**args)
        assert checksums(project) == before, kwargs
    for call in (logic.skip, logic.find_box, getattr(logic, "claim", logic.skip)):
        with pytest.raises(ValueError, match="box: expected a box record or an id"):
            call(5)
    assert checksums(project) == before
    logic.submit(box, good, annotator="me", seconds=3.5)
    assert logic.find_box(box.id).state == "annotated"


def test_api_add_box_refuses_an_overlap_with_any_box_and_bad_centres(project):
    logic = ActiveLearningLogic.open(project)
    existing = logic.boxes()[0]  # annotated
    centre = [int(c + s // 2) for c, s in zip(existing.box.coords, existing.box.size)]
    before = checksums(project)
    with pytest.raises(ProjectError, match=f"would overlap box {existing.id}"):
        logic.add_box(existing.case, centre)
    for bad in ([1, 2], [1.5, 2, 2], "abc", [True, 1, 1]):
        with pytest.raises(ProjectError, match="center"):
            logic.add_box(existing.case, bad)
    assert checksums(project) == before
    # a pending box blocks too: add one where nothing is, then one overlapping it
    p = Project.open(project)
    shape = p.cases[existing.case].shape
    taken = [b.box for b in logic.boxes() if b.case == existing.case]
    free = next(
        c
        for c in np.ndindex(*shape)
        if not any(
            t.overlaps(type(t)(existing.case, tuple(max(0, min(v - 2, n - 4)) for v, n in zip(c, shape)), (4, 4, 4)))
            for t in taken
        )
    )
    added = logic.add_box(existing.case, list(free))
    assert added.state == "pending"
    with pytest.raises(ProjectError, match=f"would overlap box {added.id} \\(pending\\)"):
        logic.add_box(existing.case, list(free))


def test_loop_settings_and_simulation_settings_check_their_fields(tmp_path):
    for kwargs, name in [
        ({"parallel": -1}, "parallel"),
        ({"parallel": 0}, "parallel"),
        ({"count": -1}, "count"),
        ({"folds": 0}, "folds"),
        ({"threads": 0}, "threads"),
        ({"seed": -2}, "seed"),
        ({"method": "nope"}, "unknown query method"),
        ({"stride": (1, 0, 1)}, "stride"),
    ]:
        with pytest.raises(ValueError, match=name):
            LoopSettings(**kwargs)
    base = dict(images=tmp_path, labels=tmp_path, methods=("random",), out=tmp_path / "o")
    for kwargs, name in [
        ({"seeds": ()}, "seeds"),
        ({"seeds": (-1,)}, "seeds"),
        ({"loops": 0}, "loops"),
        ({"parallel": 0}, "parallel"),
        ({"folds": -1}, "folds"),
        ({"max_cases": 0}, "max_cases"),
        ({"budget": "huge"}, "budget"),
        ({"budget": 2}, "budget"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"patch_size": (0, 4, 4)}, "patch_size"),
    ]:
        with pytest.raises(ValueError, match=name):
            SimulationSettings(**{**base, **kwargs})
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ hand-edited project files
def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("bad_case", ["../../victim", "..", "a/b", "a\\b", ".hidden", "C:evil", "", " spaced"])
def test_a_case_id_that_leads_out_of_the_project_is_refused_on_open(project, tmp_path, bad_case, capsys):
    """A case ``../../victim`` made ``al3d annotate`` replace a file outside the project."""
    meta = project / "project.json"

    def rename(data):
        case, record = next((c, r) for c, r in data["cases"].items() if r["split"] == "pool")
        data["cases"][bad_case] = data["cases"].pop(case)

    _edit_json(meta, rename)
    victim = tmp_path / "victim.nii.gz"
    victim.write_bytes(b"outside the project")
    with pytest.raises(ProjectError, match=r"project\.json: case id .* not a (non-empty|plain)"):
        Project.open(project)
    assert main(["annotate", str(project), "--oracle"]) == 1
    _one_line_error(capsys, "project.json", "case id")
    assert victim.read_bytes() == b"outside the project"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["cases"][next(iter(d["cases"]))].update(split="train"), "split"),
        (lambda d: d["cases"][next(iter(d["cases"]))].update(shape=[12, -1, 14]), "shape"),
        (lambda d: d.update(patch_size=[4, 4]), "patch_size"),
        (lambda d: d.update(seed=-1), "seed"),
        (lambda d: d["budget"].update(query_size=0), "query_size"),
        (lambda d: d["budget"].update(loops="many"), "loops"),
        (lambda d: d.update(cases={}), "cases"),
    ],
)
def test_damaged_project_fields_are_refused_naming_project_json(project, change, message):
    _edit_json(project / "project.json", change)
    with pytest.raises(ProjectError, match=f"project\\.json: .*{message}"):
        Project.open(project)


def test_hand_edited_loop_files_are_refused_naming_the_file(project):
    """Duplicate indices left a box pending forever; duplicate and overlapping boxes were accepted."""
    loop0 = project / "loops" / "loop_000.json"
    original = loop0.read_text()
    cases = [
        (lambda d: d["patches"][1].update(index=0), "entry 1 says it is box 000-0000"),
        (lambda d: d["patches"].append(dict(d["patches"][0], index=3)), "overlaps box 000-0000"),
        (
            lambda d: d["patches"].append(dict(d["patches"][0], index=3, coords=[c + 1 for c in d["patches"][0]["coords"]])),
            "overlaps box 000-0000",
        ),
        (lambda d: d["patches"][0].update(loop=4), "says it is box 004-0000"),
    ]
    for change, message in cases:
        loop0.write_text(original)
        _edit_json(loop0, change)
        logic = ActiveLearningLogic.open(project)
        with pytest.raises(ProjectError, match=f"loop_000.json: .*{message}"):
            logic.status()
    loop0.write_text(original)
    # a later loop that repeats a box of an earlier one names both files
    logic = ActiveLearningLogic.open(project)
    logic.query("random", 2)
    _edit_json(
        project / "loops" / "loop_001.json",
        lambda d: d["patches"][0].update(
            file=json.loads(original)["patches"][0]["file"], coords=json.loads(original)["patches"][0]["coords"]
        ),
    )
    with pytest.raises(ProjectError, match=r"loop_001.json: box 001-0000 overlaps box 000-0000 .* in loop_000.json"):
        logic.pending_boxes()


# ------------------------------------------------------------------ input data
def _truncate_payload(path: Path) -> None:
    """A valid gzip stream of half the NIfTI: what a copy cut short and compressed again looks like."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))


def _cut_stream(path: Path) -> None:
    """The .nii.gz file itself cut short (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(
    "what,cut",
    [
        ("image", _truncate_payload),
        ("image", _cut_stream),
        ("label", _truncate_payload),
        ("label", _cut_stream),
        ("plain .nii image", None),
    ],
)
def test_a_truncated_nifti_is_refused_at_init_naming_the_file(tmp_path, capsys, what, cut):
    """SimpleITK reads a truncated NIfTI and fills the missing half with zeros; init accepted it."""
    suffix = ".nii" if what.startswith("plain") else ".nii.gz"
    data = make_dataset(tmp_path / "source", n_cases=3, suffix=suffix)
    victim = data.label_file("case_001", suffix) if what == "label" else data.image_file("case_001", suffix=suffix)
    if cut is None:
        victim.write_bytes(victim.read_bytes()[:-500])
    else:
        cut(victim)
    sitk.ReadImage(str(victim))  # the reader itself does not notice
    before = checksums(data.root)
    assert main(["init", str(tmp_path / "p"), "--images", str(data.images), "--labels", str(data.labels)]) == 1
    err = capsys.readouterr().err
    assert f"{victim}: truncated file" in err and err.count(": truncated file") == 1
    assert not (tmp_path / "p").exists() and checksums(data.root) == before


def test_a_label_value_above_the_supported_range_is_an_error_not_a_traceback(tmp_path, capsys):
    """70000 without dataset.json raised OverflowError while writing the uint16 partial maps."""
    data = make_dataset(tmp_path / "source", n_cases=3, class_names=None)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(data.label_file("case_000")))).astype(np.int32)
    label[0, 0, 0] = 70000
    write_image(data.label_file("case_000"), label)
    assert main(["init", str(tmp_path / "p"), "--images", str(data.images), "--labels", str(data.labels)]) == 1
    err = capsys.readouterr().err
    assert f"{data.label_file('case_000')}: label value 70000 is above the largest supported" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "unreadable dataset.json"),
        (json.dumps({"labels": {"0": "background", "2": "liver"}}), "class values [0, 2] must be 0"),
        (json.dumps({"labels": {"background": "zero"}}), "'labels' declares no class"),
        (json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}, "channel_names": {"T1": "x"}}), "channel numbers"),
    ],
)
def test_dataset_json_errors_name_the_file(tmp_path, capsys, content, message):
    data = make_dataset(tmp_path / "source", n_cases=3)
    (data.root / "dataset.json").write_text(content)
    assert main(["init", str(tmp_path / "p"), "--images", str(data.images), "--labels", str(data.labels)]) == 1
    err = capsys.readouterr().err
    assert f"{data.root / 'dataset.json'}: " in err and message in err, err
    assert "Traceback" not in err


def _read_panel(folder: Path, name: str):
    return ActiveLearningLogic.open(folder).read_front_end_settings(name, "panel settings")


def _read_runner(folder: Path, name: str):
    from ActiveLearning3DLib.jobs.slurm import load_project_runner

    return load_project_runner(folder)


def _read_credentials(folder: Path, name: str):
    from ActiveLearning3DLib.dicom.dicomweb import Credentials

    return Credentials.load(folder / name)


def _read_dataset_json(folder: Path, name: str):
    from ActiveLearning3DLib.dataset import read_class_names

    return read_class_names(folder)


def _read_export_plans(folder: Path, name: str):
    from ActiveLearning3DLib.nnunet.export import _read_json_file  # export_model reads it only after a trained fold

    return _read_json_file(folder, name)


@pytest.mark.parametrize(
    "reader,name,error",
    [
        (_read_panel, "panel.json", "ProjectError"),
        (_read_runner, "runner.json", "SlurmError"),
        (_read_credentials, "credentials.json", "DicomWebError"),
        (_read_dataset_json, "dataset.json", "DatasetError"),
        (_read_export_plans, "plans.json", "ExportError"),
    ],
)
@pytest.mark.parametrize(
    "content,problem",
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "expected a JSON object, found list"), (b'{"a": "\xff"}', "not UTF-8 text")],
)
def test_a_settings_file_that_is_no_json_object_is_refused_naming_it(project, reader, name, error, content, problem):
    """Every reader of a JSON settings file says which file and what is wrong, in its own error type: a list, or
    text that is not UTF-8, was a bare ValueError or AttributeError from some of them (a credentials file that
    was not JSON, a dataset.json that was a list went unnoticed)."""
    folder = project if name == "panel.json" else project.parent / "settings"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(content)
    with pytest.raises(Exception) as raised:
        reader(folder, name)
    message = str(raised.value)
    assert type(raised.value).__name__ == error, repr(raised.value)
    assert f"{folder / name}: " in message and problem in message, message
    assert message.count(str(folder / name)) == 1, message


# ------------------------------------------------------------------ jobs
@pytest.mark.parametrize(
    "damage", ["{not json", "[1, 2]", json.dumps({"state": "exploded"}), json.dumps({"state": "running", "progress": "half"}), ""]
)
def test_a_damaged_status_json_is_reported_and_the_job_runs_again(project, capsys, damage):
    """It blocked ``al3d jobs``, ``score`` and ``loop`` until someone edited it by hand."""
    from ActiveLearning3DLib.jobs import Job, LocalRunner, LocalRunnerSettings

    job = Job.create(project / "jobs", "selftest-1", "selftest", {"steps": 1, "seconds": 0})
    job.status_path.write_text(damage)
    assert main(["jobs", str(project)]) == 0
    out = capsys.readouterr().out
    assert "selftest-1" in out and "failed" in out and "damaged status file" in out
    assert main(["jobs", str(project), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["state"] == "failed"
    runner = LocalRunner(LocalRunnerSettings(max_parallel=1, poll_seconds=0.05))
    assert [s.state for s in runner.run([job], timeout=60)] == ["done"]
    assert read_json(job.status_path)["state"] == "done"


def test_a_workers_death_message_is_short_even_when_its_log_holds_kilobyte_lines(project):
    from ActiveLearning3DLib.jobs import Job, LocalRunner, LocalRunnerSettings

    job = Job.create(project / "jobs", "dies", "selftest", {"steps": 1000, "seconds": 0.05})
    runner = LocalRunner(LocalRunnerSettings(max_parallel=1, poll_seconds=0.05))
    runner.submit(job)
    runner.poll()
    import time

    deadline = time.monotonic() + 60
    while job.status().state != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(job.log_path, "a") as log:  # what nnU-Net prints: its plans as one line of kilobytes
        log.write("plans: " + json.dumps({"configurations": {"3d_fullres": {"x" * 40: list(range(600))}}}) + "\n")
    import os
    import signal

    os.kill(job.status().pid, signal.SIGKILL)
    runner.wait([job], timeout=60)
    status = job.status()
    assert status.state == "failed" and "without finishing" in status.message
    assert len(status.message) < 1500 and "more characters" in status.message


# ------------------------------------------------------------------ al3d report
def _study(root: Path, seeds=(0, 1), loops: int = 2) -> Path:
    """A simulation folder with hand-written records (no training)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "simulation.json").write_text(
        json.dumps(
            {
                "settings": {
                    "methods": ["random", "pe"],
                    "seeds": list(seeds),
                    "loops": loops,
                    "images": "data/imagesTr",
                    "budget": 60,
                    "start": "random",
                },
                "budget": 60,
                "budget_rule": "given",
                "query_size": 20,
                "profile_tag": "test",
                "patch_size": [20, 20, 20],
                "pool_cases": 10,
                "test_cases": 4,
                "profile": {"name": "test"},
                "versions": {},
            }
        )
    )
    for method in ("random", "pe"):
        for seed in seeds:
            folder = root / "results" / method / f"seed_{seed}"
            folder.mkdir(parents=True)
            for loop in range(loops):
                (folder / f"loop_{loop:03d}.json").write_text(
                    json.dumps(
                        {
                            "method": method,
                            "seed": seed,
                            "loop": loop,
                            "boxes": 20 * (loop + 1),
                            "foreground_fraction": 0.1,
                            "mean_dice": 0.5 + 0.1 * loop,
                            "per_class": {},
                            "seconds": {"train": 3.0},
                        }
                    )
                )
    return root


def _no_report_left(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: shutil.rmtree(r / "results"), "no loop records"),
        (lambda r: (r / "simulation.json").write_text("{oops"), "simulation.json: damaged simulation file"),
        (lambda r: (r / "simulation.json").write_text("[]"), "simulation.json: damaged simulation file"),
        (lambda r: _edit_json(r / "simulation.json", lambda d: d.pop("settings")), "no 'settings'"),
        (lambda r: _edit_json(r / "simulation.json", lambda d: d["settings"].update(methods="random")), "settings.methods"),
        (lambda r: _edit_json(r / "simulation.json", lambda d: d["settings"].update(loops="2")), "settings.loops"),
        (lambda r: _edit_json(r / "simulation.json", lambda d: d.pop("budget")), "no 'budget'"),
        (
            lambda r: _edit_json(r / "results/pe/seed_1/loop_001.json", lambda d: d.update(mean_dice="high")),
            "loop_001.json: damaged loop record (mean_dice",
        ),
        (lambda r: _edit_json(r / "results/pe/seed_1/loop_001.json", lambda d: d.update(seed="1")), "damaged loop record (seed"),
        (lambda r: (r / "results/pe/seed_0/loop_000.json").write_text("[1]"), "damaged loop record (expected a JSON object"),
        (lambda r: (r / "results/pe/seed_0/loop_000.json").write_text(""), "damaged loop record"),
        (lambda r: _edit_json(r / "results/pe/seed_1/loop_001.json", lambda d: d.update(seconds=[1])), "'seconds'"),
    ],
)
def test_report_on_a_bad_simulation_folder_is_one_error_and_leaves_no_plots(tmp_path, capsys, damage, message):
    run = _study(tmp_path / "sim")
    damage(run)
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _no_report_left(out)


def test_report_failing_midway_removes_the_plots_it_drew(tmp_path, capsys):
    """A damaged run project is found only while drawing the queried boxes, after the Dice plots."""
    run = _study(tmp_path / "sim")
    (run / "seed_0" / "pe").mkdir(parents=True)
    (run / "seed_0" / "pe" / "project.json").write_text("{damaged")
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("the user's own file")
    assert main(["report", str(run), "--out", str(out)]) == 1
    assert "project.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    shutil.rmtree(run / "seed_0")
    assert main(["report", str(run), "--out", str(out)]) == 0  # the good folder reports
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


# ------------------------------------------------------------------ panel.json of a shared project
def test_panel_json_python_of_a_project_folder_is_never_run(project, tmp_path):
    """A crafted panel.json named a script as the worker interpreter and the panel's next job ran it."""
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    import os
    import sys

    from ActiveLearning3DLib.gui import AnnotationController
    from ActiveLearning3DLib.gui.headless import headless_slicer
    from ActiveLearning3DLib.jobs import Job

    marker = tmp_path / "script-ran"
    script = tmp_path / "evil-python"
    script.write_text(f'#!/bin/sh\ntouch {marker}\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    (project / "panel.json").write_text(json.dumps({"method": "random", "python": str(script), "parallel": 1}))
    controller = AnnotationController.open_project(headless_slicer(), project)
    assert controller.settings.method == "random" and controller.settings.parallel == 1  # the rest is kept
    assert controller.settings.python is None and controller.settings.loop_settings().python is None
    runner = controller._job_runner()
    assert runner.settings.python == sys.executable
    job = Job.create(project / "jobs", "selftest-panel", "selftest", {"steps": 1, "seconds": 0})
    assert [s.state for s in runner.run([job], timeout=60)] == ["done"]
    assert not marker.exists()
    # the user's own choice is used, and never written into the shared folder
    controller.save_settings(python=sys.executable, method="pe")
    assert controller.settings.loop_settings().python == sys.executable
    saved = json.loads((project / "panel.json").read_text())
    assert saved["method"] == "pe" and "python" not in saved
    assert os.access(script, os.X_OK)  # the script was there to run all along


def test_api_project_create_checks_its_arguments_before_any_work(tmp_path):
    from ActiveLearning3DLib.project import BudgetSettings

    data = make_dataset(tmp_path / "source", n_cases=3)
    for kwargs, name in [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_cases": 0}, "max_cases"),
        ({"patch_size": (4, 4)}, "patch_size"),
        ({"patch_size": "444"}, "patch_size"),
        ({"test_fraction": True}, "test_fraction"),
        ({"classes": {0: "bg", 1: ""}}, "classes"),
        ({"budget": BudgetSettings(query_size=0)}, "budget.query_size"),
        ({"budget": BudgetSettings(loops=0)}, "budget.loops"),
        ({"budget": {"loops": 3}}, "budget"),
    ]:
        with pytest.raises(ProjectError, match=name):
            Project.create(tmp_path / "p", data.images, data.labels, **kwargs)
        assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))
