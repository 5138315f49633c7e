"""File I/O that never leaves a half-written file behind.

Every write goes to a temporary file in the target's folder and is moved into
place with ``os.replace``, which is atomic on POSIX and Windows: a crash leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import time
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .locking import pid_alive

TMP_PREFIX = ".al3d-tmp-"

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd")


def now_iso() -> str:
    """The time in UTC to the second, as every file of a project and job records it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def split_image_suffix(name: str) -> tuple[str, str] | None:
    """(stem, suffix) for a supported image file name, else None."""
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return None


def _temporary_path(path: Path) -> Path:
    """A fresh temporary file beside ``path`` that keeps its suffix (SimpleITK picks the writer by suffix).

    Created with mode 0o666 less the umask, as an ordinary file would be
    (``mkstemp`` makes it 0o600, and ``os.replace`` would carry that onto the result).
    """
    parsed = split_image_suffix(path.name)
    suffix = parsed[1] if parsed else path.suffix
    return _create_fresh(
        path.parent, TMP_PREFIX, suffix, lambda name: os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    )


def _create_fresh(parent: Path, prefix: str, suffix: str, create: Callable[[Path], object]) -> Path:
    """Create a new entry ``parent/<prefix><random><suffix>`` with ``create`` (which must fail if it exists)."""
    while True:
        name = parent / f"{prefix}{os.urandom(6).hex()}{suffix}"
        try:
            create(name)
            return name
        except FileExistsError:
            continue


def make_staging_dir(parent: Path, prefix: str, stale_after: float = 3600.0) -> Path:
    """A fresh folder in ``parent`` with the usual permissions (0o777 less the umask, unlike ``mkdtemp``).

    Its name carries this host and process (``<prefix><host>-<pid>-<random>``). Staging folders
    with the same prefix that an interrupted run left behind are removed first: those of a process
    of this host that is gone (an ``init`` killed a minute ago), and any untouched for
    ``stale_after`` seconds (another host's, or one without an owner in its name; a live run
    writes into its folder all the time).
    """
    now = time.time()
    host = _host_tag()
    owned = re.compile(re.escape(prefix) + r"([0-9a-f]{8})-(\d+)-[0-9a-f]{12}$")
    for old in parent.glob(glob.escape(prefix) + "*"):
        try:
            if not old.is_dir():
                continue
            m = owned.match(old.name)
            dead = m is not None and m.group(1) == host and not pid_alive(int(m.group(2)))
            if dead or now - max((p.stat().st_mtime for p in [old, *old.rglob("*")]), default=0) > stale_after:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return _create_fresh(parent, f"{prefix}{host}-{os.getpid()}-", "", lambda name: os.mkdir(name, 0o777))


def _host_tag() -> str:
    """8 hex digits naming this machine, so a folder on a network share is judged only by its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

    return True


@contextmanager
def replacing_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path | str, text: str) -> None:
    with replacing_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path | str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class JsonFileError(ValueError):
    """A JSON file that is not what it should be. ``problem`` is the message without the file name, for callers
    that word their own error around the file (``damaged status file (...)``)."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def file_problem(error: Exception) -> str:
    """What a failed read says without the file name in front, for a caller that words its own error around it."""
    return error.problem if isinstance(error, JsonFileError) else str(error)


def read_json(path: Path | str) -> Any:
    """The JSON in ``path``; a file that is not JSON, or not UTF-8 text, is a :class:`JsonFileError` naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise JsonFileError(path, f"not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise JsonFileError(path, f"not UTF-8 text (byte {e.start})") from e


def read_json_object(path: Path | str) -> dict:
    """The JSON object in ``path`` (settings, a record, a status): anything else is a :class:`JsonFileError`."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise JsonFileError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def atomic_write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write an image atomically, and only once the written file is known to be whole.

    SimpleITK's writer reports no error when the disk fills up: it leaves an empty
    or cut file, which the rename would put in place of a good one (a label map
    lost). The temporary file is synced and read back before it replaces ``path``.
    """
    with replacing_file(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # a write the filesystem only now finds no room for fails here
        problem = _written_image_problem(tmp, image)
        if problem:
            full = shutil.disk_usage(tmp.parent).free < (1 << 20)
            raise OSError(
                errno.ENOSPC if full else errno.EIO,
                f"{path}: the image was not written ({problem})"
                + ("; No space left on device" if full else "")
                + "; the previous file is kept",
            )


def _written_image_problem(path: Path, image: sitk.Image) -> str | None:
    """Why a file SimpleITK just wrote does not hold ``image`` whole (empty, cut, another size), or None."""
    if path.stat().st_size == 0:
        return "empty file"
    problem = nifti_truncation(path)
    if problem:
        return problem
    try:
        written = read_image_information(path)
    except ValueError as e:
        return str(e).replace(f"{path}: ", "")
    if tuple(written.GetSize()) != tuple(image.GetSize()):
        return f"size {written.GetSize()} instead of {image.GetSize()}"
    return None


def atomic_copy(source: Path | str, target: Path | str) -> None:
    """Copy bytes to ``target`` atomically; the source is only read."""
    with replacing_file(target) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())


def remove_stale_temporaries(folder: Path | str, subfolders: Sequence[str] = (), older_than: float = 600.0) -> int:
    """Delete temporary files a crashed write left behind in ``folder`` and the named subfolders; returns how many.

    Only files older than ``older_than`` seconds: another process (a worker, a
    second session) may be writing one right now, and its rename must not fail.
    """
    count = 0
    now = time.time()
    for where in [Path(folder), *(Path(folder) / s for s in subfolders)]:
        if not where.is_dir():
            continue
        for p in where.glob(TMP_PREFIX + "*"):
            try:
                if p.is_file() and now - p.stat().st_mtime > older_than:
                    p.unlink()
                    count += 1
            except FileNotFoundError:  # renamed into place meanwhile
                pass
    return count


def read_image(path: Path | str) -> sitk.Image:
    """Read an image, turning SimpleITK's exceptions into an error that names the file."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: unreadable image ({_first_line(e)})") from e


def read_image_information(path: Path | str) -> sitk.ImageFileReader:
    """Read only the header (size, spacing, origin, direction) of an image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(f"{path}: unreadable image ({_first_line(e)})") from e
    return reader


# NIfTI datatype codes of real floating-point voxels (float32, float64) and their NumPy codes.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def nifti_has_non_finite(path: Path | str, chunk_voxels: int = 1 << 20) -> bool:
    """True when a float NIfTI file (.nii/.nii.gz, NIfTI-1 or -2) stores NaN or infinite voxels.

    ITK's NIfTI reader silently replaces NaN and infinity with 0, so a check on
    the array SimpleITK returns never sees them; this one reads the raw voxels.
    Files that are no NIfTI or hold no floats give False (the reader reports those).
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            if len(head) < 348:
                return False
            for endian in "<>":
                header_size = struct.unpack(endian + "i", head[:4])[0]
                if header_size in (348, 540):
                    break
            else:
                return False
            if header_size == 348:
                datatype = struct.unpack(endian + "h", head[70:72])[0]
                dims = struct.unpack(endian + "8h", head[40:56])
                offset = int(struct.unpack(endian + "f", head[108:112])[0])
            else:
                if len(head) < 540:
                    return False
                datatype = struct.unpack(endian + "h", head[12:14])[0]
                dims = struct.unpack(endian + "8q", head[16:80])
                offset = struct.unpack(endian + "q", head[168:176])[0]
            if datatype not in _NIFTI_FLOATS or not 1 <= dims[0] <= 7:
                return False
            dtype = np.dtype(endian + _NIFTI_FLOATS[datatype])
            remaining = int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]]))
            f.seek(max(offset, header_size))
            while remaining > 0:
                data = f.read(min(remaining, chunk_voxels) * dtype.itemsize)
                if not data:
                    break
                values = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype)
                if not np.all(np.isfinite(values)):
                    return True
                remaining -= values.size
    except (OSError, EOFError, struct.error, zlib.error):
        return False
    return False


def nifti_truncation(path: Path | str, chunk_bytes: int = 1 << 22) -> str | None:
    """Why a .nii or .nii.gz file holds less than its header announces, or None (also for other formats).

    SimpleITK reads a truncated NIfTI without complaint and fills the missing voxels with zeros,
    so this reads the whole (decompressed) stream and compares its length with the header's
    ``vox_offset + voxels x bitpix / 8``; a cut gzip stream is reported as such.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            total = len(head)
            while chunk := f.read(chunk_bytes):
                total += len(chunk)
    except EOFError:
        return "truncated file: the compressed data ends before its end marker"
    except gzip.BadGzipFile:
        return None  # no gzip at all: the image reader reports it as unreadable
    except (OSError, zlib.error) as e:
        return f"unreadable image: damaged compressed data ({e})"
    if len(head) < 348:
        return f"truncated file: {len(head)} bytes, shorter than a NIfTI header"
    header = None
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            header = (size, dims, bitpix, int(struct.unpack(endian + "f", head[108:112])[0]))
        elif size == 540 and len(head) >= 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            header = (size, dims, bitpix, struct.unpack(endian + "q", head[168:176])[0])
        if header:
            break
    if header is None:
        return None  # not NIfTI after all: the image reader reports it
    size, dims, bitpix, offset = header
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    needed = max(int(offset), size) + voxels * bitpix // 8
    if total < needed:
        return (
            f"truncated file: {total} bytes of image data where the header announces {needed} "
            f"({'decompressed, ' if opener is gzip.open else ''}the missing voxels would read as zeros)"
        )
    return None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK's messages start with a location line; the description is more useful.
    for line in lines:
        if line.lower().startswith("description:"):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__
