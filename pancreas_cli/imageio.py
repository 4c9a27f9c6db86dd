"""Reading and writing medical images with SimpleITK: supported formats, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pancreas_cli import writers
from pancreas_cli.exceptions import DataError, DiskFullError

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


def read_image(path: Path, *, verify: bool = False) -> sitk.Image:
    """Read an image, turning SimpleITK's errors into a :class:`DataError` naming the file.

    ``verify`` first runs :func:`scan_nifti` (NIfTI only), which SimpleITK's reader needs for
    truncated files and NaN/Inf voxels; any non-finite voxel is then an error.
    """
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if verify and (bad := scan_nifti(path)):
        raise DataError(f"{path}: {bad} NaN/Inf voxels; replace them in the source (e.g. with -1024 for CT)")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise DataError(
            f"{path}: cannot read image ({first}); the file may be truncated or not an image"
        ) from exc



def verify_image(path: Path) -> None:
    """:class:`DataError` unless ``path`` is a complete image: all of its compressed stream and voxel
    data (:func:`scan_nifti`) and a header SimpleITK reads. Cheaper than reading it: no voxel array."""
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    scan_nifti(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise DataError(f"{path}: cannot read image ({first}); the file may be truncated or not an image") from exc


def ct_value_problem(lo: float, hi: float, hu_range: tuple[float, float]) -> str | None:
    """Why voxel values from ``lo`` to ``hi`` do not look like CT in Hounsfield units (None if they do):
    CT has air (about -1000, so some value below -500) and tissue or bone (above 100), within ``hu_range``
    (``clean.hu_range``). Shared by clean (training data) and predict (new scans)."""
    if lo < hu_range[0] or hi > hu_range[1] or lo > -500 or hi < 100:
        return (f"range [{lo:g}, {hi:g}] (expected Hounsfield units, air about -1000, within "
                f"[{hu_range[0]:g}, {hu_range[1]:g}])")
    return None

_NIFTI_FLOATS = {16: np.dtype("float32"), 64: np.dtype("float64")}


def scan_nifti(path: Path) -> int:
    """Read a NIfTI-1 file to its end and return its number of NaN/Inf voxels.

    SimpleITK cannot be trusted with either: its NIfTI reader (nifti1_io) reads a truncated
    ``.nii.gz`` without complaint, with garbage in place of the missing voxels, and silently turns
    NaN/Inf voxels into 0. Raises :class:`DataError` for a damaged or truncated file.
    """
    import gzip
    import struct
    import zlib

    if image_extension(path) not in (".nii.gz", ".nii"):
        return 0
    opener = gzip.open if image_extension(path) == ".nii.gz" else open
    expected = got = bad = 0
    try:
        with opener(path, "rb") as fh:
            header = fh.read(348)
            endians = [e for e in "<>" if len(header) == 348 and struct.unpack(e + "i", header[:4])[0] == 348]
            endian = endians[0] if endians else None
            dtype = None
            if endian is not None:  # NIfTI-1 (other files: only the stream is checked)
                dims = struct.unpack(endian + "8h", header[40:56])
                datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
                expected = int(np.prod([max(d, 1) for d in dims[1 : min(max(dims[0], 0), 7) + 1]])) * (bitpix // 8)
                fh.read(max(int(struct.unpack(endian + "f", header[108:112])[0]) - 348, 0))
                if datatype in _NIFTI_FLOATS:
                    dtype = _NIFTI_FLOATS[datatype].newbyteorder(endian)
            rest = b""
            while chunk := fh.read(1 << 24):
                if dtype is not None and got < expected:
                    data = rest + chunk[: expected - got]
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int((~np.isfinite(np.frombuffer(data[:usable], dtype))).sum())
                    rest = data[usable:]
                got += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); the file may be truncated or damaged") from exc
    if got < expected:
        raise DataError(
            f"{path}: cannot read image (truncated: {got} of {expected} bytes of voxel data); "
            "the file may be truncated or damaged"
        )
    return bad


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


#: Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()


def publish(tmp: Path | str, path: Path) -> None:
    """Rename a finished temporary file into place with ordinary permissions (mkstemp makes it 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


#: How every temporary file or folder pancseg writes is named: a dot name that never ends in an
#: image or data extension, so that no glob of data (nnU-Net counts ``imagesTr/*.nii.gz``) takes one
#: a killed command left, and :func:`sweep_partials` can recognise it.
PARTIAL_PREFIX = ".pancseg.tmp-"
#: Temporary names of older pancseg versions (``.CASE_0000.nii.gz.k3j2h1x9.tmp.nii.gz``, ``.NAME.tmp``,
#: predict's ``.partial_CASE.nii.gz`` and ``.scratchXXXXXXXX``), swept too.
_OLD_PARTIAL = re.compile(r"\..+\.tmp(\.nii\.gz|\.nii|\.nrrd|\.mha|\.png|\.pth)?"
                          r"|\.partial_.+\.nii\.gz|\.scratch\w{8}")


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to, then :func:`publish` it.

    The file keeps ``path``'s name (writers such as SimpleITK choose the format by extension), in
    a temporary folder beside ``path`` (the same file system, so publishing is a rename); the
    folder's name is no data name (see :data:`PARTIAL_PREFIX`). The folder is removed on leaving.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=partial_name(), dir=path.parent))
    try:
        yield folder / path.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def partial_name(name: str = "") -> str:
    """The start of a temporary name for ``name``: :data:`PARTIAL_PREFIX` and the writer's
    ``HOST.PID`` (:mod:`pancreas_cli.writers`), so :func:`sweep_dead_partials` needs no lock."""
    return f"{PARTIAL_PREFIX}{writers.tag()}.{name}"


def sweep_dead_partials(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` of this machine's pancseg processes that no
    longer run (killed while writing); safe without a lock: a running writer's names are kept."""
    found = [p for p in partials(folder) if p.name.startswith(PARTIAL_PREFIX)
             and writers.dead_writer(p.name[len(PARTIAL_PREFIX):])]
    _remove(found)
    return found


def partials(folder: Path) -> list[Path]:
    """The temporary files and folders that killed pancseg commands left directly in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(PARTIAL_PREFIX) or _OLD_PARTIAL.fullmatch(p.name))


def sweep_partials(folder: Path) -> list[Path]:
    """Remove :func:`partials` of ``folder``; only while holding the lock that keeps other pancseg
    commands from writing there (theirs would go too)."""
    found = partials(folder)
    _remove(found)
    return found


def _remove(entries: list[Path]) -> None:
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # removed meanwhile, or on read-only storage
                entry.unlink(missing_ok=True)


#: torch.save's words for a write that failed (a full disk): they name no file and no reason.
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


@contextmanager
def naming_full_disk(path: Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a :class:`DiskFullError` naming it: a failed
    ``write()`` names no file, and torch.save says only ``[enforce fail at inline_container.cc]
    ... unexpected pos N vs M``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(path, exc.strerror or str(exc)) from exc
    except RuntimeError as exc:
        if not any(words in str(exc) for words in _TORCH_WRITE_FAILED):
            raise
        raise _disk_full(path, str(exc).strip().splitlines()[0] if str(exc).strip() else "write failed") from exc


def _disk_full(path: Path, said: str) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{path}: could not be written, the disk is full ({said}; {free} there); free some space "
                         "and run the command again")


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes ``path``'s content to a temporary path (:func:`atomic_target`), which is then
    published: atomic, and a full disk is named (:func:`naming_full_disk`)."""
    with atomic_target(path) as tmp, naming_full_disk(path):
        write(tmp)
        publish(tmp, path)


def write_image(image: sitk.Image, path: Path) -> None:
    """Write ``image`` to ``path`` atomically (temporary file, then rename), compressed."""
    import SimpleITK as sitk

    write_file(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_full_disk(path):
        fd, tmp = tempfile.mkstemp(prefix=partial_name(f"{path.name}."), suffix=".tmp", dir=path.parent)
    try:
        with naming_full_disk(path), os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path, *, link: bool = True) -> None:
    """Place ``src`` at ``dst`` by hard link when possible (and ``link``), else by copy; never moves ``src``.

    Later stages replace files by rename, never write into them, so a hard link cannot
    change the user's source.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(partial_name(f"{dst.name}.tmp"))
    tmp.unlink(missing_ok=True)
    try:
        with naming_full_disk(dst):
            if link:
                try:
                    os.link(src, tmp)
                except OSError as exc:  # another file system, or one without hard links: copy instead
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    shutil.copy2(src, tmp)
            else:
                shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
