"""Model archives: one zip that carries a trained model to another machine or project.

The zip holds nnU-Net's results-folder layout (``DatasetXXX/TRAINER__PLANS__CONFIGURATION/``:
``plans.json``, ``dataset.json``, ``fold_N/checkpoint_*.pth``, ``fold_N/pancseg_training.json``), so
nnU-Net's ``nnUNetv2_install_pretrained_model_from_zip`` can unpack it too, plus a manifest
(:data:`MANIFEST_NAME`) with the pancseg version that wrote it, the versions that may read it and
the sha256 of every file. Reading one checks all of this: a file added, missing or changed, a name
that leaves the folder (zip slip) or a link refuses the archive before anything is used. An archive
is unpacked once into a cache keyed by its manifest's hash (renamed into place when complete), so
the next ``--model`` with the same archive starts at once. Checkpoints inside are still read
through :mod:`pancreas_cli.checkpoints` (no code runs from them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from pancreas_cli import __version__
from pancreas_cli.checkpoints import read_checkpoint
from pancreas_cli.exceptions import ModelArchiveError, OutputExistsError
from pancreas_cli.imageio import atomic_target, partial_name, publish, sweep_dead_partials
from pancreas_cli.layout import TRAINERS, checkpoint_name, fold_folder, folds_with, model_folder
from pancreas_cli.multitask.settings import SETTINGS_NAME

if TYPE_CHECKING:
    from pancreas_cli.config import Config

MANIFEST_NAME = "pancseg_model.json"  # in the model folder inside the archive
FORMAT = 1
CACHE_ENV = "PANCSEG_CACHE_DIR"
_MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Model:
    """A model folder ready for prediction, and the manifest it came with."""

    model_dir: Path
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        """``multitask`` or ``segmentation``: which pancseg trainer trained it."""
        return next(task for task, trainer in TRAINERS.items() if trainer == self.manifest["trainer"])

    @property
    def checkpoint(self) -> str:
        """Which checkpoint it holds (``best`` or ``final``), as ``predict.checkpoint`` names it."""
        return self.manifest["checkpoint"].removeprefix("checkpoint_").removesuffix(".pth")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split(".")[:3])


def _stream_sha256(src: IO[bytes], out: IO[bytes] | None = None) -> str:
    """The sha256 of what ``src`` holds, copied to ``out`` on the way when given."""
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return _stream_sha256(fh)


def _nnunet_version() -> str:
    try:
        return metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        return "not installed"


def _export_files(model_dir: Path, folds: list[int], checkpoint: str) -> list[Path]:
    """The files of ``model_dir`` an archive of ``folds`` holds; each checkpoint read safely first, so
    that no archive carries a file pancseg would refuse to load."""
    files = [model_dir / name for name in _MODEL_FILES if (model_dir / name).is_file()]
    for fold in folds:
        folder = fold_folder(model_dir, fold)
        read_checkpoint(folder / checkpoint)
        files += [folder / checkpoint, *([folder / SETTINGS_NAME] if (folder / SETTINGS_NAME).is_file() else [])]
    return files


def export_model(config: Config, out_zip: Path, *, folds: list[int] | None = None, checkpoint: str = "final",
                 force: bool = False) -> tuple[Model, bool]:
    """Write the configured model's ``folds`` (default: every fold with the checkpoint) to ``out_zip``;
    returns the model and whether ``out_zip`` held this very archive already (nothing written: a
    script run again, or after a kill, goes on). Another archive there needs ``force``."""
    model_dir = model_folder(config)
    name = checkpoint_name(checkpoint)
    available = folds_with(model_dir, name)
    folds = folds or available
    missing = [f for f in folds if f not in available] or ([] if folds else ["any"])
    if missing:
        raise ModelArchiveError(f"{model_dir}: fold {missing[0]} has no {name}; trained folds with it: "
                                f"{available or 'none'} (train first, or pass --checkpoint)")
    files = _export_files(model_dir, folds, name)
    root = model_dir.parent.parent
    manifest = {"format": FORMAT, "pancseg_version": __version__, "nnunetv2_version": _nnunet_version(),
                # The versions that read it: from the writer's own, below the next minor one (0.x) or the
                # next major one: those may change the network or the settings.
                "reads_with": [__version__, _next_minor(__version__)],
                "model": model_dir.relative_to(root).as_posix(), "trainer": model_dir.name.split("__")[0],
                "folds": folds, "checkpoint": name,
                "files": {p.relative_to(model_dir).as_posix(): _sha256(p) for p in files}}
    if out_zip.exists() and not force:
        if _holds(out_zip, manifest):
            return Model(model_dir, manifest), True
        raise OutputExistsError(f"{out_zip} exists and is not this archive (another model, other folds, checkpoint "
                                "or versions, or no model archive); pass --force to replace it, or choose another -o")
    sweep_dead_partials(out_zip.parent)  # what a killed export left
    with atomic_target(out_zip) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for path in files:  # checkpoints are zips already: stored; the JSON files compressed
                archive.write(path, path.relative_to(root).as_posix(),
                              zipfile.ZIP_STORED if path.suffix == ".pth" else zipfile.ZIP_DEFLATED)
            archive.writestr(f"{manifest['model']}/{MANIFEST_NAME}", json.dumps(manifest, indent=2),
                             zipfile.ZIP_DEFLATED)
        publish(tmp, out_zip)
    return Model(model_dir, manifest), False


def _holds(zip_path: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``zip_path`` is an intact archive with this ``manifest`` (every file's checksum read)."""
    try:
        archive, held, _ = _open(zip_path)
    except ModelArchiveError:
        return False
    with archive:
        if held != manifest:
            return False
        model = manifest["model"]
        try:
            return all(_member_sha256(archive, f"{model}/{name}") == expected
                       for name, expected in manifest["files"].items())
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error):  # damaged: a CRC or a stream that breaks off
            return False


def _member_sha256(archive: zipfile.ZipFile, name: str) -> str:
    with archive.open(name) as src:
        return _stream_sha256(src)


def _next_minor(version: str) -> str:
    major, minor = (_version(version) + (0, 0))[:2]
    return f"{major}.{minor + 1}" if major == 0 else f"{major + 1}.0"


def cache_dir() -> Path:
    """Where archives are unpacked: ``$PANCSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/pancseg/models``
    (``~/.cache/pancseg/models``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pancseg" / "models"


def _checked_names(archive: zipfile.ZipFile, zip_path: Path) -> tuple[str, list[zipfile.ZipInfo]]:
    """The model folder the archive holds and its files; refuses names that would leave the folder
    they are unpacked into, links, duplicates, and files outside one model folder."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    names = [i.filename for i in infos]
    for info in infos:
        path = PurePosixPath(info.filename)
        if ("\\" in info.filename or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]
                or stat.S_ISLNK(info.external_attr >> 16)):
            raise ModelArchiveError(f"{zip_path}: refused: {info.filename!r} is a link or leaves the folder it is "
                                    "unpacked into (a tampered archive); export the model again")
    if len(set(names)) != len(names):
        raise ModelArchiveError(f"{zip_path}: refused: a file name is in the archive twice (a tampered archive)")
    manifests = [n for n in names if PurePosixPath(n).name == MANIFEST_NAME and len(PurePosixPath(n).parts) == 3]
    if len(manifests) != 1:
        raise ModelArchiveError(f"{zip_path}: not a pancseg model archive (no single {MANIFEST_NAME}); write "
                                "one with `pancseg export`")
    return str(PurePosixPath(manifests[0]).parent), infos


def _read_manifest(archive: zipfile.ZipFile, zip_path: Path, model: str) -> tuple[dict[str, Any], str]:
    """The archive's manifest, checked, and its hash (the archive's identity)."""
    raw = archive.read(f"{model}/{MANIFEST_NAME}")
    manifest = _checked_manifest(raw, zip_path)
    if manifest["model"] != model:
        raise ModelArchiveError(f"{zip_path}: its manifest names another model folder ({manifest['model']}); export "
                                "the model again")
    return manifest, hashlib.sha256(raw).hexdigest()


def _checked_manifest(raw: bytes, where: Path) -> dict[str, Any]:
    """A manifest's content, with pancseg's keys, one of its trainers, and this pancseg in its version range."""
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelArchiveError(f"{where}: damaged {MANIFEST_NAME} ({exc}); export the model again") from exc
    keys = ("format", "pancseg_version", "reads_with", "model", "trainer", "folds", "checkpoint", "files")
    if not isinstance(manifest, dict) or any(k not in manifest for k in keys) \
            or manifest["trainer"] not in TRAINERS.values() or not isinstance(manifest["files"], dict):
        raise ModelArchiveError(f"{where}: {MANIFEST_NAME} is not a pancseg model manifest; export the model again")
    low, below = manifest["reads_with"]
    if manifest["format"] != FORMAT or not _version(low) <= _version(__version__) < _version(below):
        raise ModelArchiveError(f"{where}: written by pancseg {manifest['pancseg_version']} for pancseg "
                                f">={low},<{below}; this is pancseg {__version__}: install a version in that range "
                                "(or export the model again with this one)")
    return manifest


def _check_listing(manifest: dict[str, Any], infos: Iterable[zipfile.ZipInfo], zip_path: Path) -> None:
    """The archive holds exactly the manifest's files."""
    prefix = manifest["model"] + "/"
    held = {i.filename[len(prefix):] if i.filename.startswith(prefix) else i.filename for i in infos} - {MANIFEST_NAME}
    listed = set(manifest["files"])
    for what, names in (("not in its manifest", held - listed), ("missing", listed - held)):
        if names:
            raise ModelArchiveError(f"{zip_path}: refused: {sorted(names)[0]} is {what} (a tampered or incomplete "
                                    "archive); export the model again")


def _unpack(archive: zipfile.ZipFile, zip_path: Path, manifest: dict[str, Any], dest: Path) -> None:
    """Write the archive's files under ``dest``, checking each one's sha256 as it is written."""
    model = manifest["model"]
    for name, expected in [(MANIFEST_NAME, None), *manifest["files"].items()]:
        target = dest / model / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(f"{model}/{name}") as src, target.open("wb") as out:
            digest = _stream_sha256(src, out)
        if expected is not None and digest != expected:
            raise ModelArchiveError(f"{zip_path}: refused: {name} does not match its checksum in the manifest (a "
                                    "tampered or damaged archive); export the model again")


def _open(zip_path: Path) -> tuple[zipfile.ZipFile, dict[str, Any], str]:
    """The archive, opened once, its names, manifest and listing checked; its manifest and identity."""
    if not zip_path.is_file():
        raise ModelArchiveError(f"{zip_path}: model archive not found")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelArchiveError(f"{zip_path}: not a zip file, or damaged ({exc}); export the model again") from exc
    model, infos = _checked_names(archive, zip_path)
    manifest, identity = _read_manifest(archive, zip_path, model)
    _check_listing(manifest, infos, zip_path)
    return archive, manifest, identity


def _unpacked(archive: zipfile.ZipFile, zip_path: Path, manifest: dict[str, Any], dest_parent: Path) -> Path:
    """The opened and checked archive unpacked (each file checked) into a new temporary folder in ``dest_parent``."""
    dest_parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_partials(dest_parent)  # what a killed unpacking left
    tmp = Path(tempfile.mkdtemp(prefix=partial_name(), dir=dest_parent))
    try:
        _unpack(archive, zip_path, manifest, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def open_model(path: Path) -> Model:
    """The model of an archive (unpacked into the cache once) or of a model folder (``install-model``'s)."""
    if path.is_dir():
        return _installed(path)
    archive, manifest, identity = _open(path)
    final = cache_dir() / identity[:32]
    with archive:
        if not final.is_dir():
            tmp = _unpacked(archive, path, manifest, final.parent)
            try:
                os.rename(tmp, final)
            except OSError:  # another command unpacked it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                if not final.is_dir():
                    raise
    return Model(final / manifest["model"], manifest)


def _installed(model_dir: Path) -> Model:
    """A model folder with its manifest (as ``install-model`` leaves it), its files checked."""
    try:
        raw = (model_dir / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise ModelArchiveError(f"{model_dir}: not an installed pancseg model (no {MANIFEST_NAME}); pass the .zip "
                                "`pancseg export` wrote") from exc
    manifest = _checked_manifest(raw, model_dir)
    changed = next((n for n, digest in manifest["files"].items()
                    if not (model_dir / n).is_file() or _sha256(model_dir / n) != digest), None)
    if changed is not None:
        raise ModelArchiveError(f"{model_dir / changed}: missing or changed since the model was installed; "
                                "install it again with `pancseg install-model --force`")
    return Model(model_dir, manifest)


def install_model(config: Config, zip_path: Path, *, force: bool = False) -> tuple[Model, bool]:
    """Unpack the archive into the project's ``nnUNet_results`` (where nnU-Net's own commands find it);
    returns the model and whether it was there already. Another model, or a changed one, in its place
    needs ``force``."""
    archive, manifest, _ = _open(zip_path)
    with archive:
        target = config.results_dir / manifest["model"]
        if not force and target.exists():
            try:
                if _installed(target).manifest["files"] == manifest["files"]:
                    return Model(target, manifest), True
            except ModelArchiveError:  # a model trained here, or an installed one changed since
                pass
            raise OutputExistsError(f"{target} holds another model (or one changed since it was installed); pass "
                                    "--force to replace it")
        tmp = _unpacked(archive, zip_path, manifest, config.results_dir)
    try:
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp / manifest["model"], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Model(target, manifest), False
