"""Reading and writing medical images with SimpleITK: supported formats, atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pancreas_cli.exceptions import DataError

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Image formats pancseg reads. The first is what it writes for nnU-Net.
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_extension(path: Path | str) -> str | None:
    """The supported extension of ``path`` (``.nii.gz`` counts as one), or None."""
    name = Path(path).name.lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def image_stem(path: Path | str) -> str:
    """File name without its image extension: ``quiz_0_041.nii.gz`` -> ``quiz_0_041``."""
    name = Path(path).name
    ext = image_extension(name)
    return name[: -len(ext)] if ext else Path(name).stem


def read_image(path: Path) -> sitk.Image:
    """Read an image, turning SimpleITK's errors into a :class:`DataError` naming the file."""
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise DataError(
            f"{path}: cannot read image ({first}); the file may be truncated or not an image"
        ) from exc


def atomic_target(path: Path) -> Path:
    """A temporary path in the same folder as ``path`` that keeps its extension."""
    ext = image_extension(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{ext}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_image(image: sitk.Image, path: Path) -> None:
    """Write ``image`` to ``path`` atomically (temporary file, then rename), compressed."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_target(path)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` by hard link when possible, else by copy; never moves ``src``.

    Later stages replace files by rename, never write into them, so a hard link cannot
    change the user's source.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
