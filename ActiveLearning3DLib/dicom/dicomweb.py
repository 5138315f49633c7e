"""A DICOMweb store as a source of cases and a target of SEG objects: QIDO-RS, WADO-RS, STOW-RS over urllib.

Credentials come from the environment (``AL3D_DICOMWEB_TOKEN``, or
``AL3D_DICOMWEB_USER`` and ``AL3D_DICOMWEB_PASSWORD``) or from a JSON file
(``{"username": ..., "password": ...}`` or ``{"token": ...}``), never from the
command line: a URL with ``user:password@`` is refused.

Transfers resume: each instance is written atomically as
``<staging>/<series UID>/<SOP instance UID>.dcm``, a series is marked complete
(``complete.json``) once every instance is there, and a run after an
interruption fetches only what is missing. Pushes are recorded per store, so a
SEG already stored is not sent again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..fileio import JsonFileError, atomic_write_json, read_json_object, replacing_file
from .series import NON_VOLUME_MODALITIES

CREDENTIALS_SHAPE = 'expected {"username": ..., "password": ...} or {"token": ...}'
ENV_TOKEN = "AL3D_DICOMWEB_TOKEN"
ENV_USER = "AL3D_DICOMWEB_USER"
ENV_PASSWORD = "AL3D_DICOMWEB_PASSWORD"
COMPLETE = "complete.json"
DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
QIDO_PAGE = 500  # matches asked for per search request

# DICOM JSON tags used here
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"
SERIES_DESCRIPTION = "0008103E"
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE, REFERENCED_SOP_INSTANCE = "00081199", "00081198", "00081155"


class DicomWebError(ValueError):
    """A DICOMweb request that failed; the message names the store and what was asked."""


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (username, password) or bearer (token) authentication."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def header(self) -> str:
        if self.token:
            return f"Bearer {self.token}"
        return "Basic " + base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()

    @classmethod
    def load(cls, file: Path | str | None = None, environ: Mapping[str, str] | None = None) -> "Credentials | None":
        """From ``file`` if given, else from the environment; None when neither has any."""
        if file is not None:
            try:
                data = read_json_object(file)
            except JsonFileError as e:
                raise DicomWebError(f"{file}: not a credentials file ({e.problem}); {CREDENTIALS_SHAPE}") from e
            except OSError as e:
                raise DicomWebError(f"{file}: cannot read the credentials file ({e.strerror})") from e
            if not (data.get("token") or data.get("username")):
                raise DicomWebError(f"{file}: {CREDENTIALS_SHAPE}")
            return cls(data.get("username"), data.get("password"), data.get("token"))
        env = os.environ if environ is None else environ
        if env.get(ENV_TOKEN):
            return cls(token=env[ENV_TOKEN])
        if env.get(ENV_USER):
            return cls(env[ENV_USER], env.get(ENV_PASSWORD, ""))
        return None


def check_url(url: str) -> str:
    """The store's base URL without a trailing slash; refuses other schemes and credentials in the URL."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DicomWebError(f"{url}: not an http(s) URL of a DICOMweb service (e.g. http://host:8042/dicom-web)")
    if parsed.username is not None or parsed.password is not None:
        raise DicomWebError(
            f"{parsed.hostname}: put no credentials in the URL (they would stay in the shell history); "
            f"use {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --credentials FILE"
        )
    if parsed.query or parsed.fragment:
        raise DicomWebError(f"{url}: the DICOMweb base URL takes no query or fragment; use the filter options")
    return url.rstrip("/")


def _value(item: Mapping, tag: str, default: Any = None) -> Any:
    values = item.get(tag, {}).get("Value") or []
    return values[0] if values else default


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (RFC 2046), headers stripped."""
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    if not m:
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


def _multipart(parts: Sequence[bytes]) -> tuple[str, bytes]:
    boundary = "al3d-" + os.urandom(12).hex()
    body = io.BytesIO()
    for part in parts:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(part)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return f'{MULTIPART_DICOM}; boundary="{boundary}"', body.getvalue()


class DicomWebClient:
    """The three DICOMweb services of one store."""

    def __init__(self, url: str, credentials: Credentials | None = None, timeout: float = 120.0, page_size: int = QIDO_PAGE):
        self.url = check_url(url)
        self.credentials = credentials
        self.timeout = timeout
        self.page_size = page_size

    def _request(
        self,
        method: str,
        path: str,
        what: str,
        query: Mapping[str, str] | None = None,
        accept: str = DICOM_JSON,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> tuple[str, bytes]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": accept}
        if self.credentials:
            headers["Authorization"] = self.credentials.header()
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as e:
            hint = ""
            if e.code in (401, 403):
                hint = f" (check the credentials: {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --credentials FILE)"
            raise DicomWebError(f"{self.url}: {what} failed: HTTP {e.code} {e.reason}{hint}") from None
        except urllib.error.URLError as e:
            raise DicomWebError(f"{self.url}: {what} failed: cannot connect ({e.reason})") from None
        except (TimeoutError, ConnectionError) as e:
            raise DicomWebError(f"{self.url}: {what} failed: {type(e).__name__} {e}") from None

    def _search(self, path: str, what: str, query: Mapping[str, str] | None = None, key: str = SOP_UID) -> list[dict]:
        """All matches of a QIDO-RS search, page by page (servers may cap a page); ``key`` tells matches apart."""
        found: dict[str, dict] = {}
        while True:
            page = self._json(path, what, {**(query or {}), "limit": str(self.page_size), "offset": str(len(found))})
            new = {str(_value(item, key)): item for item in page if str(_value(item, key)) not in found}
            found.update(new)
            if not new or len(page) < self.page_size:  # the last page, or a server that ignores offset
                return list(found.values())

    def _json(self, path: str, what: str, query: Mapping[str, str] | None = None) -> list[dict]:
        _, data = self._request("GET", path, what, query)
        if not data.strip():
            return []  # 204 No Content: nothing matched
        try:
            result = json.loads(data)
        except json.JSONDecodeError as e:
            raise DicomWebError(f"{self.url}: {what} answered no DICOM JSON ({e})") from None
        if not isinstance(result, list):
            raise DicomWebError(f"{self.url}: {what} answered {type(result).__name__}, expected a list")
        return result

    # QIDO-RS
    def search_studies(self, query: Mapping[str, str]) -> list[dict]:
        return self._search("/studies", "study search (QIDO-RS)", query, STUDY_UID)

    def search_series(self, study: str, query: Mapping[str, str] | None = None) -> list[dict]:
        return self._search(f"/studies/{study}/series", f"series search of study {study} (QIDO-RS)", query, SERIES_UID)

    def search_instances(self, study: str, series: str) -> list[dict]:
        return self._search(f"/studies/{study}/series/{series}/instances", f"instance search of series {series} (QIDO-RS)")

    # WADO-RS
    def retrieve_instance(self, study: str, series: str, sop: str) -> bytes:
        what = f"retrieving instance {sop} of series {series} (WADO-RS)"
        content_type, data = self._request(
            "GET", f"/studies/{study}/series/{series}/instances/{sop}", what, accept=f"{MULTIPART_DICOM}; transfer-syntax=*"
        )
        try:
            parts = parse_multipart(content_type, data) if content_type.lower().startswith("multipart/") else [data]
        except ValueError as e:
            raise DicomWebError(f"{self.url}: {what}: {e}") from None
        if len(parts) != 1:
            raise DicomWebError(f"{self.url}: {what}: expected one instance, got {len(parts)}")
        return parts[0]

    # STOW-RS
    def store(self, instances: Sequence[bytes], uids: Sequence[str]) -> None:
        """Store instances; raises unless the store reports every one of ``uids`` stored."""
        content_type, body = _multipart(instances)
        what = f"storing {len(instances)} instance(s) (STOW-RS)"
        _, data = self._request("POST", "/studies", what, accept=DICOM_JSON, body=body, content_type=content_type)
        try:
            answer = json.loads(data) if data.strip() else {}
        except json.JSONDecodeError:
            answer = {}
        if isinstance(answer, list):
            answer = answer[0] if answer else {}
        failed = [_value(item, REFERENCED_SOP_INSTANCE) for item in answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])]
        stored = {_value(item, REFERENCED_SOP_INSTANCE) for item in answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])}
        missing = [u for u in uids if u not in stored]
        if failed or missing:
            raise DicomWebError(f"{self.url}: {what}: not stored: {', '.join(failed or missing)}")


@dataclass
class StudyFilters:
    """Which studies and series to pull (all given ones must match)."""

    studies: list[str] = field(default_factory=list)  # StudyInstanceUIDs
    patient_id: str | None = None
    study_date: str | None = None  # YYYYMMDD or a range YYYYMMDD-YYYYMMDD
    accession_number: str | None = None
    modality: str | None = None  # series level, e.g. CT

    def study_queries(self) -> list[dict[str, str]]:
        base = {
            k: v
            for k, v in (
                ("PatientID", self.patient_id),
                ("StudyDate", self.study_date),
                ("AccessionNumber", self.accession_number),
            )
            if v
        }
        if self.study_date and not re.fullmatch(r"\d{8}(-\d{8})?|\d{8}-|-\d{8}", self.study_date):
            raise DicomWebError(f"study date {self.study_date!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        return [{**base, "StudyInstanceUID": uid} for uid in self.studies] if self.studies else [base]


@dataclass
class PullResult:
    series_dirs: list[Path]
    skipped: list[str]
    fetched: int  # instances downloaded by this run (the others were there from an interrupted one)


def _write_bytes(path: Path, data: bytes) -> None:
    with replacing_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _safe(uid: str) -> str:
    if not re.fullmatch(r"[0-9.]{1,64}", uid):
        raise DicomWebError(f"{uid!r}: not a DICOM UID")
    return uid


def pull(
    client: DicomWebClient,
    filters: StudyFilters,
    staging: Path,
    progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
    log: Callable[[str], None] = lambda line: None,
) -> PullResult:
    """Download the matching series into ``staging``, one folder per series; resumes an interrupted pull.

    Nothing is written before the searches have succeeded.
    """
    studies: dict[str, dict] = {}
    for query in filters.study_queries():
        for study in client.search_studies(query):
            uid = _value(study, STUDY_UID)
            if uid:
                studies[uid] = study
    if not studies:
        raise DicomWebError(f"{client.url}: no study matches {json.dumps(asdict(filters))}")
    series_query = {"Modality": filters.modality} if filters.modality else None
    wanted: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for study in sorted(studies):
        for series in client.search_series(study, series_query):
            uid = _value(series, SERIES_UID)
            modality = str(_value(series, MODALITY, "")).upper()
            name = f"DICOM series {_value(series, SERIES_DESCRIPTION, '') or modality!r} ({uid}) at {client.url}"
            if not uid:
                continue
            if modality in NON_VOLUME_MODALITIES:
                skipped.append(f"{name}: skipped, {NON_VOLUME_MODALITIES[modality]}")
                continue
            wanted.append((study, _safe(uid), name))
    fetched = 0
    done_dirs = []
    if wanted:
        staging.mkdir(parents=True, exist_ok=True)
    for study, series, name in progress(wanted, "downloading series"):
        folder = staging / series
        marker = folder / COMPLETE
        if marker.is_file():
            done_dirs.append(folder)
            continue
        folder.mkdir(exist_ok=True)
        instances = [_safe(str(_value(i, SOP_UID))) for i in client.search_instances(study, series)]
        for sop in instances:
            target = folder / f"{sop}.dcm"
            if target.is_file():
                continue
            data = client.retrieve_instance(study, series, sop)
            _check_instance(data, sop, client.url)
            _write_bytes(target, data)
            fetched += 1
        atomic_write_json(marker, {"url": client.url, "study": study, "series": series, "instances": len(instances)})
        log(f"{name}: {len(instances)} instances")
        done_dirs.append(folder)
    for old in (
        staging.iterdir() if staging.is_dir() else []
    ):  # series of an earlier pull with other filters are not part of this project
        if old.is_dir() and old not in done_dirs:
            shutil.rmtree(old, ignore_errors=True)
    return PullResult(done_dirs, skipped, fetched)


def _check_instance(data: bytes, sop: str, url: str) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means the store sent no DICOM instance
        raise DicomWebError(f"{url}: instance {sop} is no readable DICOM ({type(e).__name__}: {e})") from None
    if str(ds.get("SOPInstanceUID", "")) != sop:
        raise DicomWebError(f"{url}: asked for instance {sop}, got {ds.get('SOPInstanceUID', 'none')}")


def staging_folder(project: Path) -> Path:
    """Where a pull for ``project`` downloads to (beside it, so an interrupted pull is found again)."""
    project = Path(project).absolute()
    return project.parent / f".{project.name}.dicomweb-download"


def push(
    client: DicomWebClient,
    files: Sequence[Path],
    record: Path,
    progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
) -> tuple[list[Path], list[Path]]:
    """Store SEG files (one STOW-RS request each); returns (sent, already stored). ``record`` remembers what was sent."""
    import pydicom

    sent_before = read_json_object(record) if record.is_file() else {}
    done: dict[str, str] = dict(sent_before.get(client.url, {}))
    sent, kept = [], []
    for path in progress(list(files), "storing SEG objects"):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if done.get(str(path.name)) == digest:
            kept.append(path)
            continue
        uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        client.store([data], [uid])
        done[str(path.name)] = digest
        atomic_write_json(record, {**sent_before, client.url: done})
        sent_before = {**sent_before, client.url: done}
        sent.append(path)
    return sent, kept


def create_project_from_dicomweb(
    path: Path | str,
    client: DicomWebClient,
    filters: StudyFilters,
    progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
    log: Callable[[str], None] = lambda line: None,
    **options: Any,
):
    """Pull the matching series (resuming an interrupted pull), then make the project of them.

    The download folder beside the project is removed once the project
    exists; until then it keeps what was fetched, so running again goes on.
    """
    from ..project import Project, ProjectError

    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ProjectError(f"{path}: exists and is not an empty folder; open it instead or choose another path")
    staging = staging_folder(path)
    result = pull(client, filters, staging, progress, log)
    if not result.series_dirs:
        raise DicomWebError("; ".join(result.skipped + [f"{client.url}: no image series matches the filters"]))
    source = {
        "images": client.url,
        "dicomweb": client.url,
        "dicomweb_filters": asdict(filters),
        "dicomweb_skipped": result.skipped,
    }
    project = Project.create(path, staging, progress=progress, source=source, **options)
    shutil.rmtree(staging, ignore_errors=True)
    return project
