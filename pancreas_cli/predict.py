"""``pancseg predict``: masks and lesion subtypes for new CT scans with a trained model.

The model is loaded once and cases stream through it. The subtype comes from the same forward
passes as the segmentation (see :class:`~pancreas_cli.multitask.predictor.MultiTaskPredictor`).
Every output is written under a temporary name and renamed. Each mask has a record (``.pancseg/``)
of the model, checkpoint and settings that wrote it: a case with a record of this model and these
settings is skipped, so an interrupted run just continues; a mask written otherwise (another model,
a retrained checkpoint, or not by pancseg) is refused unless ``overwrite`` (or ``replace_outdated``,
which keeps up-to-date cases). A mask that is not a complete image (cut short) is predicted again.
The CSVs are rebuilt from the records (:func:`rebuild_csvs`) before the first case, after each and at
the end, so they never disagree with the masks. A case that fails is reported and the others go on.
A project on read-only storage is used as it is: no project lock, nnU-Net's log in the output folder.
With ``part``, predict takes one part of the cases (:mod:`pancreas_cli.parts`) and shares the output
folder with the other parts of the same prediction; :func:`predict_on_devices` runs one part per device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from pancreas_cli import layout, locks, parts
from pancreas_cli.config import Config
from pancreas_cli.console import count
from pancreas_cli.devices import cpu_share, find_device
from pancreas_cli.dicom import choose_series, series_ids
from pancreas_cli.exceptions import DataError, OutputExistsError, PredictError
from pancreas_cli.imageio import (ct_value_problem, image_extension, partial_name, read_image,
                                  sweep_partials, verify_image, write_image)
from pancreas_cli.inference.backends import check_backend
from pancreas_cli.inference.pipeline import Finished, run_overlapped
from pancreas_cli.inference.reading import nnunet_input, reads_like_simpleitk
from pancreas_cli.inference.window import WindowStats
from pancreas_cli.logcapture import redirect_output
from pancreas_cli.nnunet_env import setup_nnunet_env
from pancreas_cli.outputs import FOLDERS, Outputs, rebuild_summaries, remove_outputs, write_derived
from pancreas_cli.outputs.dicomseg import require_highdicom
from pancreas_cli.outputs.probabilities import probabilities_path, write_probabilities
from pancreas_cli.records import SIDECAR_DIR, lesion_found, read_record, subtype_probabilities, write_record
from pancreas_cli.subtypes import case_id, image_name, subtype_of, write_predictions

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

NOT_PANCSEG = "not written by pancseg predict"
INTERRUPTED = "interrupted while being replaced"
DAMAGED = "not a complete image"  # cut short (a full disk, an interrupted copy): predicted again
UNREADABLE = "its record is unreadable or from an older pancseg"


class CaseReporter(Protocol):
    """Receives per-case progress; ``stream`` reaches the terminal while nnU-Net's output is logged."""

    def start(self, total: int, stream: TextIO) -> None: ...

    def working(self, case: str, detail: str) -> None: ...

    def case(self, outcome: CaseOutcome, index: int) -> None: ...

    def warn(self, text: str) -> None: ...  # about a case (not CT-like, say); shown even when quiet


@dataclass(frozen=True)
class InputCase:
    case: str
    source: Path  # a file, or a DICOM folder
    dicom: bool = False
    series: str | None = None  # the DICOM series segmented (its UID; see pancreas_cli.dicom)
    files: tuple[str, ...] = ()  # that series' files, in slice order


@dataclass
class CaseOutcome:
    case: str
    source: Path
    status: str  # "predicted" | "skipped" | "failed"
    seconds: float = 0.0  # read + network + export (they overlap between cases: see ``times``)
    subtype: int | None = None
    probabilities: list[float] | None = None
    error: str | None = None
    times: dict[str, float] = field(default_factory=dict)  # read, network, export (seconds)
    window: WindowStats | None = None  # what pancseg's sliding window computed (None: nnU-Net's window)
    warnings: list[str] = field(default_factory=list)  # about the scan (not CT-like)


@dataclass
class PredictResult:
    out_dir: Path
    model_dir: Path
    folds: list[int]
    device: str
    log_file: Path | None = None  # nnU-Net's output and the tracebacks of failed cases
    outcomes: list[CaseOutcome] = field(default_factory=list)
    subtype_csv: Path | None = None
    engine: str = "pancseg"
    seconds: float = 0.0  # wall time of the cases predicted (model loading excluded)
    load_seconds: float = 0.0  # loading the model (nnU-Net's imports, the network, the checkpoints)
    summaries: dict[str, Path] = field(default_factory=dict)  # statistics.csv, preview/index.html
    part: str | None = None  # "I/N" of ``predict --part``; None: every case

    def cases_per_minute(self) -> float | None:
        done = self.count("predicted")
        return 60.0 * done / self.seconds if done and self.seconds > 0 else None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir.resolve()), "model_dir": str(self.model_dir), "folds": self.folds,
            "device": self.device, "predicted": self.count("predicted"), "skipped": self.count("skipped"),
            "failed": [{"case": o.case, "source": str(o.source), "error": o.error} for o in self.failed],
            "subtype_csv": str(self.subtype_csv.resolve()) if self.subtype_csv else None,
            "log_file": str(self.log_file) if self.log_file else None,
            "engine": self.engine, "seconds": round(self.seconds, 3), "cases_per_minute": self.cases_per_minute(),
            "load_seconds": round(self.load_seconds, 3),
            "summaries": {name: str(path.resolve()) for name, path in self.summaries.items()},
            "part": self.part,
            "cases": [{"case": o.case, "status": o.status, "seconds": round(o.seconds, 3), "subtype": o.subtype,
                       "probabilities": o.probabilities, "times": {k: round(v, 3) for k, v in o.times.items()},
                       "warnings": o.warnings,
                       "window": None if o.window is None else {
                           "tiles": o.window.tiles, "mirrored": o.window.full, "passes": o.window.passes,
                           "stock_passes": o.window.stock_passes, "fallback": o.window.fallback}}
                      for o in self.outcomes],
        }


def find_inputs(path: Path, *, series: str | None = None,
                warn: Callable[[str], None] = lambda text: None) -> list[InputCase]:
    """Cases in a file, a folder of images (``_0000`` optional) or a DICOM folder: its series ``series``,
    else its CT series by :func:`~pancreas_cli.dicom.choose_series`'s rule (a warning names it)."""
    if path.is_file():
        if not image_extension(path):
            raise PredictError(f"{path}: not a .nii.gz, .nii, .nrrd or .mha image")
        cases = [InputCase(_case_name(path), path)]
    elif path.is_dir():
        images = sorted(p for p in path.iterdir()
                        if p.is_file() and image_extension(p) and not p.name.startswith("."))
        if not images:
            return [_dicom_case(path, series, warn)]
        cases = _image_cases(images)
    else:
        raise PredictError(f"{path}: no such file or folder")
    if series is not None:
        raise PredictError(f"{path}: --series chooses a series of a DICOM folder, and this is not one")
    return cases


def _image_cases(images: list[Path]) -> list[InputCase]:
    cases: dict[str, InputCase] = {}
    for image in images:
        case = _case_name(image)
        if case in cases:
            raise PredictError(f"{image} and {cases[case].source} would both be written as {case}.nii.gz")
        cases[case] = InputCase(case, image)
    return list(cases.values())


def _dicom_case(folder: Path, series: str | None, warn: Callable[[str], None]) -> InputCase:
    """The case of a DICOM folder, named after the folder (resolved: ``-i .`` is not a case named '')."""
    if not series_ids(folder):
        raise PredictError(f"{folder}: no images (.nii.gz, .nii, .nrrd, .mha) and no DICOM series found")
    chosen = choose_series(folder, series, warn)
    return InputCase(_checked_name(folder.resolve().name, folder), folder, dicom=True, series=chosen.uid,
                     files=chosen.files)


def _case_name(path: Path) -> str:
    return _checked_name(case_id(path.name), path)


def _checked_name(case: str, source: Path) -> str:
    """``case``, unless it is empty (``_0000.nii.gz``, the root folder): its mask would be ``.nii.gz``."""
    if not case.strip():
        raise PredictError(f"{source}: gives an empty case name, so its mask would be named {case}.nii.gz; "
                           "rename the file (or folder) to the case's name")
    return case


def _resolve_folds(model_dir: Path, requested: list[int] | None, checkpoint: str,
                   warn: Callable[[str], None], training: Callable[[int], list[str]]) -> list[int]:
    """The folds to ensemble: those asked for, else every fold whose training finished.

    A fold without checkpoint_final.pth is unfinished, and so is one that ``training(fold)`` names a
    command for (a finished fold trained further keeps its old final checkpoint meanwhile); their
    checkpoint_best.pth is used only when asked for by number, with a warning.
    """
    available = layout.folds_with(model_dir, checkpoint)
    if not available:
        raise PredictError(f"{model_dir}: no fold has {checkpoint}; train first (`pancseg train --fold 0`)")
    running = {f: holders for f in available if (holders := training(f))}
    final = layout.folds_with(model_dir, layout.CHECKPOINT_FINAL)
    finished = [f for f in available if f in final and f not in running]
    unfinished = [f for f in available if f not in finished]
    if requested:
        missing = [f for f in requested if f not in available]
        if missing:
            raise PredictError(f"fold {missing[0]} has no {checkpoint} in {model_dir}; trained folds: {available}")
        for f in requested:
            if f in running:
                warn(f"fold {f} is training now ({', '.join(running[f])}): predicting with its {checkpoint} so far")
            elif f in unfinished:
                warn(f"fold {f} has not finished training (no checkpoint_final.pth; stopped, or still running): "
                     f"predicting with its {checkpoint} so far")
        return requested
    if not finished:
        raise PredictError(f"{model_dir}: no fold has finished training (fold(s) {unfinished} stopped or are still "
                           f"running); finish one with `pancseg train --resume`, or pass --fold N to use its "
                           f"{checkpoint} so far")
    if unfinished:
        warn(f"predicting with the finished fold(s) {finished}; unfinished fold(s) {unfinished} left out "
             "(pass --fold to include them)")
    return finished


def _device(requested: str, warn: Callable[[str], None]) -> torch.device:
    """The device to predict on: ``auto`` without a GPU is the CPU, with a warning."""
    import torch

    device = find_device(requested)
    if device is None:
        warn("no GPU found: predicting on the CPU (slow; --fast skips test-time mirroring)")
        return torch.device("cpu")
    return device


def _read_input(case: InputCase) -> sitk.Image:
    """The case's scan, verified: a 3D single-channel image (DataError naming the file otherwise)."""
    import SimpleITK as sitk

    if case.dicom:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(case.files))
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise DataError(f"{case.source}: cannot read the DICOM series ({exc})") from exc
    else:
        image = read_image(case.source, verify=True)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{case.source}: expected a 3D single-channel CT, got {image.GetDimension()}D with "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    return image


def _as_nifti(case: InputCase, image: sitk.Image, scratch: Path) -> Path:
    """A ``.nii.gz`` of the case nnU-Net's own reader can take: the source itself, or a copy in ``scratch``."""
    if not case.dicom and image_extension(case.source) == ".nii.gz":
        return case.source
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / image_name(case.case)
    write_image(image, target)
    return target


def model_stamp(model_dir: Path, folds: list[int], checkpoint_name: str, tile_step_size: float,
                mirroring: bool, engine: str = "nnunet") -> dict[str, Any]:
    """What decides a prediction: the model folder, its checkpoints as they are now, and the settings."""
    checkpoints = [layout.fold_folder(model_dir, fold) / checkpoint_name for fold in folds]
    return {"model": str(model_dir.resolve()), "folds": folds, "checkpoint": checkpoint_name,
            "checkpoint_files": [[p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoints],
            "tile_step_size": tile_step_size, "mirroring": mirroring, "engine": engine}


def engine_stamp(settings: Any) -> str:
    """The engine settings that can change a voxel (batching only changes float rounding)."""
    if settings.engine == "nnunet":
        return "nnunet"
    return f"pancseg region={settings.region_margin_mm:g}mm" if settings.region else "pancseg"


def source_stamp(case: InputCase) -> list[Any]:
    """What identifies the input scan as it is now: path, size and time (of a DICOM series' files)."""
    path = case.source.resolve()
    if not case.dicom:
        info = path.stat()
        return [str(path), info.st_size, info.st_mtime_ns]
    files = [p.stat() for p in path.iterdir() if p.is_file()]
    return [str(path), len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]


def _outdated(out_dir: Path, case: InputCase, record: dict[str, Any] | None, stamp: dict[str, Any],
              multitask: bool) -> str | None:
    """None if ``stamp``'s model wrote the mask of ``case`` from its scan as it is now (by its
    ``record``), "" if there is no mask, else why the mask is not that (a multitask record without
    valid probabilities counts as unreadable: its CSV row cannot be written).

    :data:`NOT_PANCSEG` (no record) and :data:`INTERRUPTED` (a replacement was stopped half-way,
    so it was authorised already) are answered apart from the other reasons, which need ``--force``.
    """
    if not (out_dir / f"{case.case}.nii.gz").is_file():
        return ""
    if record is None:
        return NOT_PANCSEG
    if record.get("pending"):
        return INTERRUPTED
    written = record.get("model")
    if not isinstance(written, dict) or (multitask and subtype_probabilities(record) is None):
        return UNREADABLE
    for key, why in (("model", "another model"), ("folds", "other folds"), ("checkpoint", "another checkpoint"),
                     ("checkpoint_files", "the checkpoint changed since (retrained?)"),
                     ("tile_step_size", "another tile step size"), ("mirroring", "other mirroring (--fast)"),
                     ("engine", "another prediction engine (predict.engine, predict.region)")):
        if written.get(key) != stamp[key]:
            return why
    if "source_stamp" not in record:
        return "its record (by an older pancseg) does not say which scan it was made from"
    if record["source_stamp"] != source_stamp(case):
        return f"made from another scan than {case.source}, or before it changed"
    if case.dicom and record.get("series", case.series) != case.series:
        return f"made from another DICOM series of {case.source} ({record['series']!r})"
    return None


def _damaged(out_dir: Path, cases: list[str]) -> dict[str, str]:
    """The masks of ``cases`` that are not complete images (cut short by a full disk or a copy), with why.

    Checked before a case is skipped as done; decompressing runs outside the GIL, so a few threads
    check a large output folder in a fraction of the time.
    """

    def problem(case: str) -> str | None:
        mask = out_dir / f"{case}.nii.gz"
        try:
            verify_image(mask)
        except DataError as exc:
            return str(exc).removeprefix(f"{mask}: ")
        return None

    if not cases:
        return {}
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="pancseg-verify") as pool:
        found = dict(zip(cases, pool.map(problem, cases)))
    return {case: why for case, why in found.items() if why}


def _check_output(out_dir: Path, cases: list[InputCase], stamp: dict[str, Any], multitask: bool, *,
                  replacing: bool) -> None:
    """Refuses masks that may not be replaced (:func:`_refuse_conflicts`), reading only: predict runs it
    before it takes the output folder's lock, so that a refused predict leaves nothing behind."""
    outdated = {c.case: _outdated(out_dir, c, read_record(out_dir, c.case), stamp, multitask) for c in cases}
    _refuse_conflicts(out_dir, outdated, replacing=replacing)


def _refuse_conflicts(out_dir: Path, outdated: dict[str, str | None], *, replacing: bool) -> None:
    """OutputExistsError for masks that may not be replaced: never those pancseg did not write, and
    those of another model, settings or scan only when ``replacing``."""
    foreign = [case for case, why in outdated.items() if why == NOT_PANCSEG]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputExistsError(
            f"{out_dir / foreign[0]}.nii.gz{more} exists and was {NOT_PANCSEG} (no record in "
            f"{out_dir / SIDECAR_DIR}): ground truth or another tool's mask? pancseg never replaces those, not "
            "even with --force: choose another output folder, or move them away"
        )
    conflicts = [case for case, why in outdated.items() if why and why not in (INTERRUPTED, DAMAGED)]
    if conflicts and not replacing:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise OutputExistsError(
            f"{out_dir / conflicts[0]}.nii.gz{more} exists but was not predicted by this model with these "
            f"settings ({outdated[conflicts[0]]}); pass --force to predict again, or choose another output folder"
        )


def _subtype(found: list[float] | None) -> int | None:
    return None if found is None else subtype_of(found)


def rebuild_csvs(out_dir: Path, model: dict[str, Any] | None = None) -> Path:
    """Write ``subtype_results.csv`` and ``subtype_probabilities.csv`` of ``out_dir`` from its case records:
    a row for each mask whose record is finished (not pending) and has probabilities, and, when ``model``
    (a :func:`model_stamp`) is given, was written by that model. Returns the results CSV.

    The CSVs are derived data, never updated row by row: predict rebuilds them before its first case,
    after each case and at the end, so that a killed run or a retrained model cannot leave rows that
    disagree with the masks. Other commands may call it on an output folder too (cheap: small files).
    """
    rows: dict[str, list[float]] = {}
    lesions: dict[str, bool | None] = {}
    for path in sorted((out_dir / SIDECAR_DIR).glob("*.json")):
        case = path.stem
        record = read_record(out_dir, case) or {}
        found = subtype_probabilities(record)
        if (found is not None and not record.get("pending") and (out_dir / f"{case}.nii.gz").is_file()
                and (model is None or record.get("model") == model)):
            rows[case], lesions[case] = found, lesion_found(record)
    return write_predictions(out_dir, rows, lesions)


def sweep_leftovers(out_dir: Path) -> None:
    """Remove what a killed predict left in ``out_dir``: scratch folders, partial masks and the temporary
    files of atomic writes (older pancseg's names too). Called with the folder's lock held and no other
    part in the folder: no living predict owns them then."""
    if not out_dir.is_dir():
        return
    for folder in (out_dir, out_dir / SIDECAR_DIR, *(out_dir / name for name in FOLDERS)):
        sweep_partials(folder)
    for scratch in out_dir.glob(".scratch*"):
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
    leftovers = [*out_dir.glob(".partial_*"), *out_dir.glob(".subtype_*.csv.*.tmp"),
                 *(out_dir / SIDECAR_DIR).glob(".*.json.*.tmp")]
    for path in leftovers:
        if path.is_file():
            path.unlink(missing_ok=True)


def project_writable(project_dir: Path) -> bool:
    """Whether predict may write its lock and log into the project. A model on read-only storage (or
    another user's) may not be: it is used without a project lock (this user cannot preprocess it
    meanwhile either) and nnU-Net's log goes to the output folder (:func:`predict_log`)."""
    folders = (project_dir, project_dir / locks.LOCK_DIR, project_dir / layout.LOGS_DIR)
    return all(os.access(p, os.W_OK | os.X_OK) for p in folders if p.is_dir())


def predict_log(project_dir: Path, out_dir: Path, writable: bool) -> Path:
    """Where nnU-Net's output and the tracebacks of failed cases go: the project's logs, else the output folder."""
    return layout.log_file(project_dir, "predict.log") if writable else out_dir / SIDECAR_DIR / "predict.log"


def predict(
    config: Config,
    *,
    input_path: Path,
    out_dir: Path,
    folds: list[int] | None = None,
    checkpoint: str | None = None,
    fast: bool = False,
    overwrite: bool = False,
    replace_outdated: bool = False,
    series: str | None = None,
    reporter: CaseReporter | None = None,
    warn: Callable[[str], None] = lambda text: None,
    trust_model: bool = False,
    outputs: Outputs = Outputs(),
    model_dir: Path | None = None,
    part: parts.Part | None = None,
) -> PredictResult:
    """Predict every case under ``input_path`` into ``out_dir`` (only those of ``part``, if given).

    ``overwrite`` predicts every case again; ``replace_outdated`` only those whose masks another
    model or other settings wrote (``pancseg run`` after more training). Without either, such
    masks are refused with :class:`OutputExistsError` before anything is written. Masks pancseg
    did not write (ground truth, another tool's) and input scans are never replaced. ``series``
    names the series of a DICOM folder to segment. ``trust_model``: load the checkpoints in full,
    not only what nnU-Net's hold (see :mod:`pancreas_cli.checkpoints`). ``outputs``: the optional
    outputs (:mod:`pancreas_cli.outputs`), added to finished cases too. ``model_dir``: a model from
    elsewhere (``--model``) instead of the project's; without a project folder nothing is written
    outside ``out_dir``. ``part``: see :mod:`pancreas_cli.parts`.
    """
    settings = config.predict
    checkpoint_name = layout.checkpoint_name(checkpoint or settings.checkpoint)
    cases = _part_cases(_checked_inputs(input_path, out_dir, series, warn), part)
    _check_outputs(cases, outputs)
    writable = project_writable(config.project_dir) and (model_dir is None or config.project_dir.is_dir())
    with contextlib.ExitStack() as held:
        if writable:  # no preprocess meanwhile (a read-only project cannot be preprocessed by us anyway)
            held.enter_context(locks.project(config.project_dir, shared=True))
        model_dir, folds, device, stamp = _model(config, model_dir, folds, checkpoint_name, fast, writable, warn)
        multitask = config.train.task == "multitask"
        replacing = overwrite or replace_outdated
        _check_output(out_dir, cases, stamp, multitask, replacing=replacing)  # before anything is written
        # One predict per output folder. Its lock is taken only now (a refused predict leaves nothing
        # beside the folder); another predict may have finished meanwhile, so the checks are repeated.
        _hold_output(held, out_dir, part, stamp, input_path, series)
        records = {c.case: read_record(out_dir, c.case) for c in cases}
        todo = _cases_to_predict(out_dir, cases, records, stamp, multitask, overwrite=overwrite,
                                 replace_outdated=replace_outdated, warn=warn)
        if outputs.probabilities:  # only the network gives them: such cases are predicted again
            todo += [c for c in cases if c not in todo and not probabilities_path(out_dir, c.case).is_file()]
        log_file = predict_log(config.project_dir, out_dir, writable)
        result = PredictResult(out_dir, model_dir, folds, str(device), log_file, engine=settings.engine,
                               part=str(part) if part else None)
        (out_dir / SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
        _rebuild(out_dir, stamp, multitask)  # a killed run's CSVs may disagree with its masks
        _rebuild_summaries(out_dir)
        _add_skipped(result, [c for c in cases if c not in todo], records)
        if todo:
            _predict_cases(config, result, todo, stamp, device, log_file, reporter, warn, trust_model,
                           outputs.probabilities)
        result.subtype_csv = _rebuild(out_dir, stamp, multitask)
        _derived_outputs(result, cases, outputs)
        result.summaries = _rebuild_summaries(out_dir)
        return result


def _add_skipped(result: PredictResult, skipped: list[InputCase], records: dict[str, dict[str, Any] | None]) -> None:
    """Finished cases as "skipped" outcomes, with the subtype their records hold."""
    for case in skipped:
        found = subtype_probabilities(records[case.case])
        result.outcomes.append(CaseOutcome(case.case, case.source, "skipped", subtype=_subtype(found),
                                           probabilities=found))


def _model(config: Config, model_dir: Path | None, folds: list[int] | None, checkpoint_name: str, fast: bool,
           writable: bool, warn: Callable[[str], None]) -> tuple[Path, list[int], torch.device, dict[str, Any]]:
    """The model folder, its usable folds, the device (nnU-Net's environment set for it) and the stamp
    that says which model and settings wrote a mask."""
    settings = config.predict
    model_dir = model_dir or layout.model_folder(config)
    trainer = layout.TRAINERS[config.train.task]
    folds = _resolve_folds(model_dir, folds or settings.folds, checkpoint_name, warn,
                           lambda fold: locks.fold_holders(config.project_dir, trainer, fold))
    device = _device(settings.device, warn)
    if settings.engine == "pancseg":
        check_backend(settings.backend, device)
    setup_nnunet_env(config, device_type=device.type, create=writable)
    stamp = model_stamp(model_dir, folds, checkpoint_name, settings.tile_step_size,
                        settings.mirroring and not fast, engine_stamp(settings))
    return model_dir, folds, device, stamp


def _check_outputs(cases: list[InputCase], outputs: Outputs) -> None:
    """Refuse what cannot be written, before anything is: a DICOM SEG references a DICOM series."""
    if outputs.dicom_seg:
        require_highdicom()
        images = [c for c in cases if not c.dicom]
        if images:
            raise PredictError(f"{images[0].source}: --output-format dicom-seg needs a DICOM series folder as input "
                               "(a SEG references the series' images); for image files leave it out")


def _derived_outputs(result: PredictResult, cases: list[InputCase], outputs: Outputs) -> None:
    """Statistics, previews and DICOM SEGs that the cases' masks lack, from the masks and the scans (not
    the network); a case whose outputs cannot be written fails with the reason (its mask stays)."""
    by_case = {c.case: c for c in cases}
    for outcome in result.outcomes:
        missing = outputs.missing(result.out_dir, outcome.case)
        if outcome.status == "failed" or not missing:
            continue
        case, errors = by_case[outcome.case], []
        try:
            mask, ct = read_image(result.out_dir / f"{case.case}.nii.gz", verify=True), _read_input(case)
        except DataError as exc:
            missing, errors = [], [f"its {', '.join(missing)}: {exc}"]
        for name in missing:  # each on its own: one that cannot be written does not keep the others
            try:
                write_derived(result.out_dir, case.case, [name], ct, mask, outcome.probabilities, case.files)
            except (DataError, RuntimeError, ValueError) as exc:
                errors.append(f"its {name}: {str(exc).removeprefix(f'{case.source}: ')}")
        if errors:
            outcome.status, outcome.error = "failed", "; ".join(errors)
def _part_cases(cases: list[InputCase], part: parts.Part | None) -> list[InputCase]:
    """The cases of ``part`` (every case without one): :func:`~pancreas_cli.parts.split` by voxels."""
    if part is None:
        return cases
    sizes = {c.case: len(c.files) if c.dicom else parts.voxels(c.source) for c in cases}
    mine = set(parts.split(sizes, part.total)[part.index])
    return [c for c in cases if c.case in mine]


def _hold_output(held: contextlib.ExitStack, out_dir: Path, part: parts.Part | None, stamp: dict[str, Any],
                 input_path: Path, series: str | None) -> None:
    """The output folder's lock: this predict's alone, or shared by the parts of one prediction (same
    model, settings, input and number of parts). What a killed run left is swept when no other run
    is there (it may be theirs otherwise)."""
    if part is None:
        held.enter_context(locks.output_folder(out_dir))
        sweep_leftovers(out_dir)
        return
    key = json.dumps({"model": stamp, "input": str(input_path.resolve()), "series": series, "parts": part.total},
                     sort_keys=True)
    held.enter_context(locks.output_part(out_dir, key, lambda: sweep_leftovers(out_dir)))


def _checked_inputs(input_path: Path, out_dir: Path, series: str | None,
                    warn: Callable[[str], None]) -> list[InputCase]:
    """The cases of ``input_path``; PredictError if a mask would be written over an input."""
    if input_path.is_dir() and out_dir.resolve() == input_path.resolve():
        raise PredictError(f"{out_dir}: the output folder is the input folder; its masks would be read as new "
                           "scans next time: choose another -o")
    cases = find_inputs(input_path, series=series, warn=warn)
    sources = {c.source.resolve() for c in cases if not c.dicom}
    clash = next((c for c in cases if (out_dir / f"{c.case}.nii.gz").resolve() in sources), None)
    if clash is not None:
        raise PredictError(f"{clash.source}: its mask would be written over this input scan; choose another -o")
    return cases


def _cases_to_predict(out_dir: Path, cases: list[InputCase], records: dict[str, dict[str, Any] | None],
                      stamp: dict[str, Any], multitask: bool, *, overwrite: bool, replace_outdated: bool,
                      warn: Callable[[str], None]) -> list[InputCase]:
    """The cases to predict: every one with ``overwrite``, else those without an up-to-date, complete mask.

    Masks that may not be replaced are refused (:func:`_refuse_conflicts`) before anything is written. A
    damaged mask's record is then marked pending: its CSV row goes, and a run stopped before the case is
    done again still redoes it.
    """
    outdated = {c.case: _outdated(out_dir, c, records[c.case], stamp, multitask) for c in cases}
    damaged = _damaged(out_dir, [case for case, why in outdated.items() if why is None])
    outdated.update(dict.fromkeys(damaged, DAMAGED))
    _refuse_conflicts(out_dir, outdated, replacing=overwrite or replace_outdated)
    for case, why in damaged.items():
        warn(f"{out_dir / case}.nii.gz is {DAMAGED} ({why}): predicting it again")
        write_record(out_dir, case, {**(records[case] or {}), "pending": True})
    return [c for c in cases if overwrite or outdated[c.case] is not None]


def _rebuild(out_dir: Path, stamp: dict[str, Any], multitask: bool) -> Path | None:
    """The CSVs from this model's records (:func:`rebuild_csvs`); a segmentation-only model writes none.
    One part at a time: a part that read the records before another's last case could otherwise
    write its CSVs after that part's."""
    if not multitask:
        return None
    with locks.output_moment(out_dir, "csv"):
        return rebuild_csvs(out_dir, stamp)


def _rebuild_summaries(out_dir: Path) -> dict[str, Path]:
    """statistics.csv and preview/index.html (:func:`rebuild_summaries`), one part at a time as the CSVs."""
    with locks.output_moment(out_dir, "csv"):
        return rebuild_summaries(out_dir)


def _predict_cases(config: Config, result: PredictResult, todo: list[InputCase], stamp: dict[str, Any],
                   device: torch.device, log_file: Path, reporter: CaseReporter | None,
                   warn: Callable[[str], None], trust_model: bool = False, probabilities: bool = False) -> None:
    """Load the model and predict ``todo`` into ``result`` (nnU-Net's output into ``log_file``; with
    ``probabilities``, the class probabilities too), rebuilding the CSVs after each case, and when
    stopped (the cases finished so far)."""
    out_dir, multitask = result.out_dir, config.train.task == "multitask"
    with redirect_output(log_file) as terminal, \
            tempfile.TemporaryDirectory(dir=out_dir, prefix=partial_name()) as scratch:
        try:
            loading = time.perf_counter()
            predictor = _load_model(config, result.model_dir, result.folds, stamp["checkpoint"], device,
                                    stamp["mirroring"], trust_model)
            result.load_seconds = time.perf_counter() - loading
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            raise PredictError(f"cannot load the model in {result.model_dir}: {type(exc).__name__}: {exc}; "
                               f"nnU-Net log: {log_file} (`pancseg doctor` checks torch and torchvision)") from exc
        notify = reporter.warn if reporter is not None else warn  # the terminal: stderr is the log now
        runner = _CaseRunner(predictor, out_dir, Path(scratch), multitask, stamp, device, reporter, notify,
                             config.clean.hu_range, probabilities)
        if reporter is not None:
            reporter.start(len(todo), terminal)
        start = time.perf_counter()
        try:
            for index, outcome in enumerate(runner.run(todo), start=1):
                result.outcomes.append(outcome)
                _rebuild(out_dir, stamp, multitask)
                if reporter is not None:
                    reporter.case(outcome, index)
        except BaseException:
            with contextlib.suppress(OSError):  # the case being written when stopped completes first
                _rebuild(out_dir, stamp, multitask)
            raise
        finally:
            result.seconds = time.perf_counter() - start


def _load_model(config: Config, model_dir: Path, folds: list[int], checkpoint_name: str, device: torch.device,
                mirroring: bool, trust_model: bool = False) -> Any:
    from pancreas_cli.multitask.predictor import MultiTaskPredictor, ProgressPredictor, WindowSettings

    settings = config.predict
    window = None
    if settings.engine == "pancseg":
        window = WindowSettings(batch_size=batch_size(settings.batch_size, device), region=settings.region,
                                margin_mm=settings.region_margin_mm, keep_on_device=True,
                                pad_batches=device.type == "cuda", compile=settings.compile, backend=settings.backend)
    cls = MultiTaskPredictor if config.train.task == "multitask" else ProgressPredictor
    predictor = cls(tile_step_size=settings.tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                    perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                    allow_tqdm=False, window=window, trust_model=trust_model)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=tuple(folds),
                                                   checkpoint_name=checkpoint_name)
    return predictor


def batch_size(setting: int | str, device: torch.device) -> int:
    """Network passes per batch: ``auto`` is 2 on a CPU (torch's fast convolutions need a batch of 2 or
    more; larger batches measured slower there) and 8 elsewhere (a tile's 8 mirrors at once)."""
    if setting != "auto":
        return int(setting)
    return 2 if device.type == "cpu" else 8


def _workload(predictor: Any, shape: tuple[int, ...]) -> str:
    """How much network work a case is: a large or finely resampled scan can take long on a CPU."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = predictor.configuration_manager.patch_size
    padded = [max(s, p) for s, p in zip(shape, patch)]
    tiles = math.prod(len(steps) for steps in compute_steps_for_sliding_window(padded, patch, predictor.tile_step_size))
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    passes = tiles * 2 ** len(axes or ()) * len(predictor.list_of_parameters)
    return f"{'x'.join(map(str, shape))} voxels at the model's spacing, {count(tiles, 'tile')}; network passes: {passes}"


class _CaseRunner:
    """One case's stages, run overlapped by :func:`~pancreas_cli.inference.pipeline.run_overlapped`:
    read and preprocess (reader thread), network and, with pancseg's engine, the export on the device
    (here), writing the mask and its record (writer thread). A failing case ends as a failed outcome."""

    def __init__(self, predictor: Any, out_dir: Path, scratch: Path, multitask: bool, stamp: dict[str, Any],
                 device: torch.device, reporter: CaseReporter | None, notify: Callable[[str], None],
                 hu_range: tuple[float, float], probabilities: bool = False) -> None:
        from pancreas_cli.inference.resample import DeviceResampling

        self.predictor, self.out_dir, self.scratch, self.multitask = predictor, out_dir, scratch, multitask
        self.stamp, self.reporter, self.notify, self.hu_range = stamp, reporter, notify, hu_range
        self.probabilities = probabilities
        self.fast = predictor.window is not None
        manager = predictor.configuration_manager
        self.manager = DeviceResampling(manager, device) if self.fast else manager
        self.preprocessor = manager.preprocessor_class(verbose=False)

    def run(self, cases: list[InputCase]) -> Iterator[CaseOutcome]:
        # A GPU may finish a case's network before one thread has read the next: two read ahead there.
        ahead = 2 if self.predictor.device.type == "cuda" else 1
        for outcome in run_overlapped(cases, self.read, self.compute, self.write, ahead=ahead):
            shutil.rmtree(self.scratch / outcome.case, ignore_errors=True)
            yield outcome

    def read(self, case: InputCase) -> Any:
        import torch

        start = time.perf_counter()
        try:
            scan = source_stamp(case)  # before reading: a scan replaced meanwhile counts as changed next time
            image = _read_input(case)
            warnings = _not_ct(case, image, self.hu_range)
            predictor = self.predictor
            with torch.inference_mode():
                if self.fast and reads_like_simpleitk(predictor.plans_manager):  # no second read
                    array, properties = nnunet_input(image)
                    data, _, properties = self.preprocessor.run_case_npy(
                        array, None, properties, predictor.plans_manager, self.manager, predictor.dataset_json)
                else:
                    data, _, properties = self.preprocessor.run_case(
                        [str(_as_nifti(case, image, self.scratch / case.case))], None, predictor.plans_manager,
                        self.manager, predictor.dataset_json)
            return {"scan": scan, "data": data, "properties": properties, "warnings": warnings,
                    "read": time.perf_counter() - start}
        except (DataError, RuntimeError, ValueError, OSError) as exc:
            return Finished(_failed(case, exc, start))

    def compute(self, case: InputCase, ready: dict[str, Any]) -> Any:
        import torch

        start = time.perf_counter()
        for text in ready["warnings"]:  # here, on the main thread, in the order of the cases
            self.notify(text)
        predictor = self.predictor
        working = (lambda detail: self.reporter.working(case.case, detail)) if self.reporter else None
        try:
            data = torch.as_tensor(ready.pop("data"))
            if working is not None:
                working(_workload(predictor, tuple(data.shape[1:])))
            predictor.on_progress = working
            try:
                logits = predictor.predict_logits_from_preprocessed_data(data)
            finally:
                predictor.on_progress = None
            ready["network"] = time.perf_counter() - start
            ready["window"] = predictor.window_stats if self.fast else None
            ready["probabilities"] = ([float(p) for p in predictor.case_class_probabilities[-1]]
                                      if self.multitask else None)
            ready["lesion_found"] = predictor.case_lesion_found[-1] if self.multitask else None
            start = time.perf_counter()
            ready["mask"], ready["maps"] = self._mask(logits, ready["properties"]) if self.fast else (logits.cpu(), None)
            ready["export"] = time.perf_counter() - start
            return ready
        except (RuntimeError, ValueError) as exc:
            return Finished(_failed(case, exc, start - ready["read"]))

    def _mask(self, logits: torch.Tensor, properties: dict[str, Any]) -> tuple[Any, Any]:
        """The mask, and the class probabilities on its grid when asked for (else None)."""
        from pancreas_cli.inference.export import segmentation_and_probabilities, segmentation_from_logits

        predictor = self.predictor
        arguments = (logits, properties, predictor.plans_manager, self.manager, predictor.label_manager)
        if self.probabilities:
            return segmentation_and_probabilities(*arguments)
        return segmentation_from_logits(*arguments), None

    def write(self, case: InputCase, done: dict[str, Any]) -> CaseOutcome:
        start = time.perf_counter()
        partial = self.scratch / case.case / "mask"  # the writers add .nii.gz; no data name in out_dir
        partial.parent.mkdir(parents=True, exist_ok=True)
        predictor = self.predictor
        try:
            if self.fast:
                from pancreas_cli.inference.export import write_segmentation

                write_segmentation(done["mask"], done["properties"], predictor.plans_manager, predictor.dataset_json,
                                   partial)
            elif self.probabilities:
                self._export_with_probabilities(done, partial)
            else:
                from nnunetv2.inference.export_prediction import export_prediction_from_logits

                export_prediction_from_logits(done["mask"], done["properties"], predictor.configuration_manager,
                                              predictor.plans_manager, predictor.dataset_json, str(partial), False)
            if done["maps"] is not None:
                write_probabilities(done.pop("maps"), Path(f"{partial}.nii.gz"), self._maps_file(case))
            self._replace(case, done, partial)
        except (DataError, RuntimeError, ValueError, OSError) as exc:
            return _failed(case, exc, start - done["read"] - done["network"] - done["export"])
        finally:
            Path(f"{partial}.nii.gz").unlink(missing_ok=True)
            self._maps_file(case).unlink(missing_ok=True)
        times = {"read": done["read"], "network": done["network"],
                 "export": done["export"] + time.perf_counter() - start}
        return CaseOutcome(case.case, case.source, "predicted", sum(times.values()), _subtype(done["probabilities"]),
                           done["probabilities"], times=times, window=done["window"], warnings=done["warnings"])

    def _export_with_probabilities(self, done: dict[str, Any], partial: Path) -> None:
        """nnU-Net's ``export_prediction_from_logits`` with probabilities, without its ``.npz`` and ``.pkl``."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        from pancreas_cli.inference.export import write_segmentation

        predictor = self.predictor
        segmentation, done["maps"] = convert_predicted_logits_to_segmentation_with_correct_shape(
            done.pop("mask"), predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
            done["properties"], return_probabilities=True)
        write_segmentation(segmentation, done["properties"], predictor.plans_manager, predictor.dataset_json, partial)

    def _maps_file(self, case: InputCase) -> Path:
        return self.scratch / case.case / "probabilities.nii.gz"

    def _replace(self, case: InputCase, done: dict[str, Any], partial: Path) -> None:
        """The mask (and its probabilities) into place, its record marked pending meanwhile and the case's
        older optional outputs removed: a run stopped in between redoes the case."""
        record = {"case": case.case, "source": str(case.source), "source_stamp": done["scan"],
                  "probabilities": done["probabilities"], "lesion_found": done["lesion_found"],
                  "model": self.stamp,
                  **({"series": case.series} if case.dicom else {})}
        write_record(self.out_dir, case.case, {**record, "pending": True})
        remove_outputs(self.out_dir, case.case)
        os.replace(f"{partial}.nii.gz", self.out_dir / f"{case.case}.nii.gz")
        if self._maps_file(case).is_file():
            probabilities_path(self.out_dir, case.case).parent.mkdir(exist_ok=True)
            os.replace(self._maps_file(case), probabilities_path(self.out_dir, case.case))
        write_record(self.out_dir, case.case, record)


def _not_ct(case: InputCase, image: sitk.Image, hu_range: tuple[float, float]) -> list[str]:
    """A warning when the scan's values do not look like CT in HU (an MR, a rescaled export): the model was
    trained on CT and would still give a subtype. The same check as clean's on training data."""
    import SimpleITK as sitk

    values = sitk.MinimumMaximumImageFilter()
    values.Execute(image)
    problem = ct_value_problem(values.GetMinimum(), values.GetMaximum(), hu_range)
    return [f"{case.source}: does not look like CT in HU: {problem}; the model was trained on CT"] if problem else []


def _failed(case: InputCase, exc: Exception, start: float) -> CaseOutcome:
    """The failed outcome of ``case``: its first line for the summary, the whole error for predict.log."""
    print(f"{case.source}: prediction failed", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    # The report names the source already; a DataError's own message starts with it too.
    text = str(exc).removeprefix(f"{case.source}: ") if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
    return CaseOutcome(case.case, case.source, "failed", time.perf_counter() - start,
                       error=text.strip().splitlines()[0])


def predict_on_devices(config: Config, devices: list[str], *, reporter: CaseReporter | None = None,
                       warn: Callable[[str], None] = lambda text: None, **options: Any) -> PredictResult:
    """:func:`predict` (``options`` are its keywords) in one worker process per device, each predicting one
    part of the cases; their progress reaches ``reporter`` as one display. The files are those of one
    process; the result's time is the longest worker's."""
    total = len(devices)
    threads = cpu_share(devices.count("cpu"))
    jobs = [(config, parts.Part(i, total), device, threads, options) for i, device in enumerate(devices)]
    names = [f"part {i}/{total} on {device}" for i, device in enumerate(devices)]
    results = parts.run_workers(_predict_part, jobs, names, _Relay(reporter, warn, total).handle)
    first = results[0]
    merged = PredictResult(first.out_dir, first.model_dir, first.folds, ",".join(devices), first.log_file,
                           subtype_csv=first.subtype_csv, engine=first.engine,
                           seconds=max(r.seconds for r in results), load_seconds=max(r.load_seconds for r in results))
    merged.outcomes = sorted((o for r in results for o in r.outcomes), key=lambda o: o.case)
    return merged


def _predict_part(send: Callable[[Any], None], config: Config, part: parts.Part, device: str, threads: int,
                  options: dict[str, Any]) -> PredictResult:
    """A worker of :func:`predict_on_devices` (a spawned process): ``part`` on ``device``, its progress
    and warnings sent to the parent (:class:`_Relay`)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    locks.wait_for_locks(config.locks.wait, config.locks.wait_seconds)  # the command's --wait
    config = config.model_copy(update={"predict": config.predict.model_copy(update={"device": device})})
    forward = _Forward(send)
    try:
        return predict(config, part=part, reporter=forward, warn=forward.warn, **options)
    finally:
        send(("end",))


class _Forward:
    """A worker's :class:`CaseReporter`: every call goes to the parent's :class:`_Relay`."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self.send = send

    def start(self, total: int, stream: TextIO) -> None:
        self.send(("start", total))

    def working(self, case: str, detail: str) -> None:
        self.send(("working", case, detail))

    def case(self, outcome: CaseOutcome, index: int) -> None:
        self.send(("case", outcome))

    def warn(self, text: str) -> None:
        self.send(("warn", text))


class _Relay:
    """The workers' progress as one display: ``reporter`` starts once every worker has said how many cases
    it predicts (or ended), with their sum, and numbers their cases as they come; a warning that several
    workers give (about the model, say) is shown once."""

    def __init__(self, reporter: CaseReporter | None, warn: Callable[[str], None], workers: int) -> None:
        self.reporter, self.warn, self.workers = reporter, warn, workers
        self.totals: dict[int, int] = {}
        self.waiting: list[tuple[Any, ...]] = []
        self.warned: set[str] = set()
        self.done = 0

    def handle(self, worker: int, message: tuple[Any, ...]) -> None:
        kind, *args = message
        started = len(self.totals) == self.workers
        if kind == "warn":
            if args[0] not in self.warned:
                self.warned.add(args[0])
                (self.reporter.warn if started and self.reporter else self.warn)(args[0])
            return
        if kind in ("start", "end"):
            self.totals.setdefault(worker, args[0] if kind == "start" else 0)
        else:
            self.waiting.append(message)
        if len(self.totals) < self.workers or self.reporter is None:
            return
        if not started and sum(self.totals.values()):
            self.reporter.start(sum(self.totals.values()), sys.stderr)
        for kind, *args in self.waiting:
            if kind == "working":
                self.reporter.working(*args)
            else:
                self.done += 1
                self.reporter.case(args[0], self.done)
        self.waiting.clear()
