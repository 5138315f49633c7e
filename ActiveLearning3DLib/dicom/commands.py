"""The DICOM options of ``al3d init`` and the ``al3d export`` command (kept here so cli.py only wires them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .dicomweb import Credentials, DicomWebClient, StudyFilters, create_project_from_dicomweb, push
from .seg import export_segs, latest_predictions_dir

PUSH_RECORD = ".dicomweb-pushed.json"


def add_init_options(p: argparse.ArgumentParser, source: Any) -> None:
    """``al3d init --dicomweb URL`` (in the ``source`` group, exclusive with --images), its filters and credentials."""
    source.add_argument(
        "--dicomweb",
        metavar="URL",
        help="pull the series from this DICOMweb store (QIDO-RS, WADO-RS) "
        "instead, e.g. http://localhost:8042/dicom-web; an interrupted pull resumes when run again",
    )
    g = p.add_argument_group("DICOMweb filters and credentials (with --dicomweb)")
    g.add_argument("--study", action="append", default=[], metavar="UID", help="only this StudyInstanceUID (repeatable)")
    g.add_argument("--patient-id", help="only studies of this PatientID")
    g.add_argument("--study-date", metavar="DATE", help="only studies of this date, YYYYMMDD or YYYYMMDD-YYYYMMDD")
    g.add_argument("--accession-number", help="only studies with this AccessionNumber")
    g.add_argument("--modality", help="only series of this modality (e.g. CT, MR)")
    add_credentials_option(g)


def add_credentials_option(p: Any) -> None:
    p.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help='DICOMweb credentials, a JSON file {"username": ..., "password": ...} or {"token": ...} '
        "(default: AL3D_DICOMWEB_TOKEN or AL3D_DICOMWEB_USER and AL3D_DICOMWEB_PASSWORD from the environment)",
    )


def client(args: argparse.Namespace) -> DicomWebClient:
    return DicomWebClient(args.dicomweb, Credentials.load(args.credentials))


def create_from_dicomweb(args: argparse.Namespace, options: dict, progress: Callable) -> Any:
    """The project of the series a DICOMweb store holds for the filters."""
    filters = StudyFilters(list(args.study), args.patient_id, args.study_date, args.accession_number, args.modality)
    return create_project_from_dicomweb(
        args.project, client(args), filters, progress=progress, log=print, labels=args.labels, **options
    )


def add_export_parser(sub: Any, project_command: Callable) -> None:
    p = project_command(
        sub,
        "export",
        "write predictions (and partial annotations) of DICOM cases as DICOM SEG "
        "objects beside the NIfTI files; --dicomweb also stores them (STOW-RS)",
        cmd_export,
    )
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="DIR",
        help="folder of <case>.nii.gz label maps (default: the latest final predictions of the project)",
    )
    p.add_argument("--partial-labels", action="store_true", help="also the partial annotations (labelsTr/<case>.seg.dcm)")
    p.add_argument("--dicomweb", metavar="URL", help="store the SEG objects in this DICOMweb store (STOW-RS)")
    add_credentials_option(p)


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # as the CLI's progress bars (cli.progress; importing cli here would close a cycle)

    from ..project import Project, ProjectError

    def progress(items, desc: str):
        return tqdm(items, desc=desc, disable=None, leave=False, dynamic_ncols=True)

    project = Project.open(args.project)
    predictions = args.predictions
    if predictions is None:
        predictions = latest_predictions_dir(project)
        if predictions is None and not args.partial_labels:
            raise ProjectError(f"{project.path}: no predictions yet; predict the cases first or give --predictions DIR")
    store = client(args) if args.dicomweb else None  # a bad URL or credentials file fails before anything is written
    result = export_segs(project, predictions, args.partial_labels, progress=lambda it: progress(it, "writing SEG"))
    for line in result.skipped:
        print(f"skipped {line}")
    print(
        f"{len(result.written)} DICOM SEG objects written, {len(result.up_to_date)} up to date"
        + (f" (in {predictions})" if predictions else "")
    )
    if store is not None:
        by_folder: dict[Path, list[Path]] = {}
        for path in result.files:
            by_folder.setdefault(path.parent, []).append(path)
        sent = kept = 0
        for folder, files in by_folder.items():
            s, k = push(store, files, folder / PUSH_RECORD, progress)
            sent, kept = sent + len(s), kept + len(k)
        print(f"{sent} SEG objects stored in {store.url}, {kept} were stored before")
    return 0
