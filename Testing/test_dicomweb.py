"""Pull from and push to a real DICOMweb server: Orthanc with its DICOMweb plugin on loopback.

CI (.ci/run) starts it with .ci/services/orthanc.sh and passes AL3D_TEST_DICOMWEB_URL and
AL3D_TEST_DICOMWEB_CREDENTIALS; without them the fixture starts one itself with the same
script, and the tests skip (saying why) only where Orthanc cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from dicom_data import OBLIQUE, hu_volume, write_ct_series

from ActiveLearning3DLib.cli import main
from ActiveLearning3DLib.dicom.dicomweb import (
    Credentials,
    DicomWebClient,
    DicomWebError,
    StudyFilters,
    check_url,
    staging_folder,
)
from ActiveLearning3DLib.project import Project

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "services" / "orthanc.sh"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """(URL, credentials file) of a running Orthanc DICOMweb server on 127.0.0.1."""
    url, credentials = os.environ.get("AL3D_TEST_DICOMWEB_URL"), os.environ.get("AL3D_TEST_DICOMWEB_CREDENTIALS")
    if url and credentials:
        yield url, Path(credentials)
        return
    if shutil.which("bash") is None:
        pytest.skip("needs Orthanc: no bash to run .ci/services/orthanc.sh on this system")
    folder = tmp_path_factory.mktemp("orthanc")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=60)
    if started.returncode != 0:
        pytest.skip(
            f"needs Orthanc with its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb): "
            f"{started.stderr.strip().splitlines()[-1] if started.stderr.strip() else 'it did not start'}"
        )
    try:
        yield started.stdout.strip(), folder / "credentials.json"
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], timeout=60)


def _client(orthanc) -> DicomWebClient:
    url, credentials = orthanc
    return DicomWebClient(url, Credentials.load(credentials))


def _upload(orthanc, files) -> None:
    client = _client(orthanc)
    import pydicom

    client.store([Path(f).read_bytes() for f in files], [str(pydicom.dcmread(f).SOPInstanceUID) for f in files])


def _study(tmp_path: Path, orthanc, patient: str, n_series: int = 2, slices: int = 6):
    """A study of ``n_series`` CT series stored in Orthanc; returns (study uid, {series uid: volume})."""
    volumes = {}
    study = None
    for n in range(n_series):
        volume = hu_volume((slices, 16, 12), n)
        written = write_ct_series(
            tmp_path / "upload" / f"s{n}",
            volume,
            (0.6, 0.75, 2.0 + n),
            (n, -3.0, 7.0),
            OBLIQUE,
            patient_id=patient,
            study_uid=study,
            description=f"Series {n}",
            series_number=n + 2,
        )
        study = written.study_uid
        _upload(orthanc, written.files)
        volumes[written.series_uid] = volume
    return study, volumes


def _env(orthanc) -> dict:
    """The child's environment: credentials from variables (never the command line)."""
    creds = json.loads(Path(orthanc[1]).read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AL3D_DICOMWEB_")}
    return {
        **env,
        "AL3D_DICOMWEB_USER": creds["username"],
        "AL3D_DICOMWEB_PASSWORD": creds["password"],
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    }


def _assert_cases(project: Project, volumes: dict) -> None:
    by_series = {project.dicom_source(c)["SeriesInstanceUID"]: c for c in project.cases}
    assert sorted(by_series) == sorted(volumes)
    for series, volume in volumes.items():
        np.testing.assert_array_equal(sitk.GetArrayFromImage(project.read_image(by_series[series])), volume)


def test_pull_from_orthanc_makes_the_cases_and_push_stores_the_seg(tmp_path, orthanc, capsys):
    patient = f"PULL-{uuid.uuid4().hex[:8]}"  # unique: the server may hold earlier runs' studies
    study, volumes = _study(tmp_path, orthanc, patient)
    _study(tmp_path / "other", orthanc, patient + "-B", n_series=1)  # not matched by the filter
    url, credentials = orthanc
    assert (
        main(
            [
                "init",
                str(tmp_path / "project"),
                "--dicomweb",
                url,
                "--credentials",
                str(credentials),
                "--patient-id",
                patient,
                "--patch-size",
                "2",
                "4",
                "4",
            ]
        )
        == 0
    )
    project = Project.open(tmp_path / "project")
    _assert_cases(project, volumes)
    assert all(project.dicom_source(c)["StudyInstanceUID"] == study for c in project.cases)
    meta = json.loads((project.path / "project.json").read_text())
    assert meta["source"]["dicomweb"] == url and meta["source"]["dicomweb_filters"]["patient_id"] == patient
    assert not staging_folder(project.path).exists()  # the download folder goes once the project exists

    # a prediction of one case as SEG, stored with STOW-RS, found again with QIDO-RS and read back with WADO-RS
    case = sorted(project.cases)[0]
    labels = np.zeros(project.cases[case].shape, np.uint8)
    labels[1:4, 3:9, 2:8] = 1
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(project.read_image(case))
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    sitk.WriteImage(image, str(predictions / f"{case}.nii.gz"))
    capsys.readouterr()
    assert (
        main(
            ["export", str(project.path), "--predictions", str(predictions), "--dicomweb", url, "--credentials", str(credentials)]
        )
        == 0
    )
    assert "1 SEG objects stored" in capsys.readouterr().out
    client = _client(orthanc)
    segs = client.search_series(study, {"Modality": "SEG"})
    assert len(segs) == 1
    seg_series = segs[0]["0020000E"]["Value"][0]
    [instance] = client.search_instances(study, seg_series)
    data = client.retrieve_instance(study, seg_series, instance["00080018"]["Value"][0])
    (tmp_path / "back.dcm").write_bytes(data)
    seg = hd.seg.segread(tmp_path / "back.dcm")
    source = project.dicom_source(case)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source["SeriesInstanceUID"]
    back = seg.get_pixels_by_source_instance(source["SOPInstanceUIDs"], combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, labels)

    # pushing again sends nothing (recorded), and the store still holds one SEG
    assert (
        main(
            ["export", str(project.path), "--predictions", str(predictions), "--dicomweb", url, "--credentials", str(credentials)]
        )
        == 0
    )
    assert "0 SEG objects stored" in capsys.readouterr().out
    assert len(client.search_series(study, {"Modality": "SEG"})) == 1


class _Gate(ThreadingHTTPServer):
    """A loopback proxy to Orthanc that counts instance retrievals and holds every one after the first ``allow``."""

    daemon_threads = True

    def __init__(self, target: str, allow: int | None):
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.target, self.allow, self.instances, self.release = target, allow, 0, threading.Event()
        self.lock = threading.Lock()


class _GateHandler(BaseHTTPRequestHandler):
    server: _Gate

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "/instances/" in self.path:
            with self.server.lock:
                self.server.instances += 1
                held = self.server.allow is not None and self.server.instances > self.server.allow
            if held:
                self.server.release.wait(60)
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
        request = urllib.request.Request(self.server.target + self.path.split("/dicom-web", 1)[1], headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body, status, content_type = response.read(), response.status, response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            body, status, content_type = e.read(), e.code, e.headers.get("Content-Type", "")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _gate(orthanc, allow: int | None) -> _Gate:
    gate = _Gate(orthanc[0], allow)
    threading.Thread(target=gate.serve_forever, daemon=True).start()
    return gate


def test_a_pull_killed_midway_leaves_no_case_and_resumes(tmp_path, orthanc):
    study, volumes = _study(tmp_path, orthanc, "KILL-0001", n_series=2, slices=6)
    project = tmp_path / "project"
    gate = _gate(orthanc, allow=8)  # the first series (6 instances) and 2 of the second, then the pull hangs
    command = [
        sys.executable,
        "-m",
        "ActiveLearning3DLib.cli",
        "init",
        str(project),
        "--dicomweb",
        f"http://127.0.0.1:{gate.server_port}/dicom-web",
        "--study",
        study,
        "--patch-size",
        "2",
        "4",
        "4",
    ]
    process = subprocess.Popen(command, env=_env(orthanc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while gate.instances <= 8 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, process.stdout.read().decode()  # still running, held at instance 9
        assert gate.instances == 9
    finally:
        process.kill()  # as a power cut would: no clean-up runs
        process.wait(30)
        gate.release.set()
        gate.shutdown()

    assert not project.exists()  # no partial case, no half project
    staging = staging_folder(project)
    complete = sorted(staging.glob("*/complete.json"))
    assert len(complete) == 1 and len(list(complete[0].parent.glob("*.dcm"))) == 6
    partial = [d for d in staging.iterdir() if d.is_dir() and not (d / "complete.json").exists()]
    assert len(partial) == 1 and len(list(partial[0].glob("*.dcm"))) == 2  # whole instances only
    assert not list(staging.rglob("*.dcm.part")) and all(p.stat().st_size > 1000 for p in staging.rglob("*.dcm"))

    gate = _gate(orthanc, allow=None)
    try:
        command[6] = f"http://127.0.0.1:{gate.server_port}/dicom-web"
        done = subprocess.run(command, env=_env(orthanc), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        gate.shutdown()
    assert gate.instances == 4  # only what was missing
    _assert_cases(Project.open(project), volumes)
    assert not staging.exists()


def test_bad_dicomweb_input_is_one_clear_line_and_nothing_is_written(tmp_path, orthanc, capsys):
    url, credentials = orthanc
    project = tmp_path / "project"
    assert main(["init", str(project), "--dicomweb", url.replace("http://", "http://al3d:secret@")]) == 1
    assert "put no credentials in the URL" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"username": "al3d", "password": "not-the-password"}))
    assert main(["init", str(project), "--dicomweb", url, "--credentials", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 401" in err and url in err
    assert main(["init", str(project), "--dicomweb", url, "--credentials", str(credentials), "--study", "1.2.3.4.5.6.7.8.9"]) == 1
    assert "no study matches" in capsys.readouterr().err
    assert main(["init", str(project), "--dicomweb", "http://127.0.0.1:9/dicom-web"]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.json"]


def test_searches_page_through_a_capped_server(tmp_path, orthanc):
    study, volumes = _study(tmp_path, orthanc, f"PAGE-{uuid.uuid4().hex[:8]}", n_series=1, slices=11)
    url, credentials = orthanc
    client = DicomWebClient(url, Credentials.load(credentials), page_size=4)  # 11 instances: pages of 4, 4, 3
    [series] = client.search_series(study)
    instances = client.search_instances(study, series["0020000E"]["Value"][0])
    assert len({i["00080018"]["Value"][0] for i in instances}) == 11


def test_credentials_come_from_a_file_or_the_environment_and_urls_are_checked(tmp_path):
    file = tmp_path / "token.json"
    file.write_text(json.dumps({"token": "abc"}))
    assert Credentials.load(file).header() == "Bearer abc"
    assert Credentials.load(None, {"AL3D_DICOMWEB_USER": "u", "AL3D_DICOMWEB_PASSWORD": "p"}).header() == "Basic dTpw"
    assert Credentials.load(None, {}) is None
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(
        DicomWebError, match=r"bad.json: not a credentials file \(expected a JSON object, found list\); expected \{\"username\""
    ):
        Credentials.load(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(DicomWebError, match=r"empty.json: expected \{\"username\""):
        Credentials.load(tmp_path / "empty.json")
    assert check_url("http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(DicomWebError, match="not an http"):
        check_url("ftp://host/dicom-web")
    with pytest.raises(DicomWebError, match="study date '2024'"):
        StudyFilters(study_date="2024").study_queries()
