"""File I/O that never leaves a half-written file behind.

Every write goes to a temporary file in the target's folder and is moved into
place with ``os.replace``, which is atomic on POSIX and Windows: a crash leaves
either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

TMP_PREFIX = ".al3d-tmp-"

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd")


def split_image_suffix(name: str) -> tuple[str, str] | None:
    """(stem, suffix) for a supported image file name, else None."""
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return None


def _temporary_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` that keeps its suffix (SimpleITK picks the writer by suffix)."""
    parsed = split_image_suffix(path.name)
    suffix = parsed[1] if parsed else path.suffix
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def atomic_write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_copy(source: Path | str, target: Path | str) -> None:
    """Copy bytes to ``target`` atomically; the source is only read."""
    target = Path(target)
    tmp = _temporary_path(target)
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete temporary files a crashed write left behind; returns how many."""
    count = 0
    for p in Path(folder).rglob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink()
            count += 1
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


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK's messages start with a location line; the description is more useful.
    for line in lines:
        if line.lower().startswith("description:"):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__
