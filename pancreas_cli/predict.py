"""``pancseg predict``: masks and lesion subtypes for new CT scans with a trained model.

The model is loaded once and cases stream through it. The subtype comes from the same forward
passes as the segmentation (see :class:`~pancreas_cli.multitask.predictor.MultiTaskPredictor`).
Every output is written under a temporary name and renamed. Each mask has a record (``.pancseg/``)
of the model, checkpoint and settings that wrote it: a case with a record of this model and these
settings is skipped, so an interrupted run just continues; a mask written otherwise (another model,
a retrained checkpoint, or not by pancseg) is refused unless ``overwrite`` (or ``replace_outdated``,
which keeps up-to-date cases). The CSVs are rebuilt at the end from every case predicted by this
model. A case that fails is reported and the others go on.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from pancreas_cli import locks
from pancreas_cli.config import Config
from pancreas_cli.console import count
from pancreas_cli.exceptions import DataError, OutputExistsError, PancsegError
from pancreas_cli.imageio import image_extension, image_stem, read_image, write_image, write_text
from pancreas_cli.inference.pipeline import Finished, run_overlapped
from pancreas_cli.inference.reading import nnunet_input, reads_like_simpleitk
from pancreas_cli.inference.window import WindowStats
from pancreas_cli.logcapture import redirect_output
from pancreas_cli.nnunet_env import setup_nnunet_env
from pancreas_cli.preprocess import read_state
from pancreas_cli.train import TRAINERS

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

SIDECAR_DIR = ".pancseg"  # per-case record: the model that wrote the mask, and its class probabilities
NOT_PANCSEG = "not written by pancseg predict"
INTERRUPTED = "interrupted while being replaced"


class PredictError(PancsegError):
    """The model or the input cannot be used for prediction."""


class CaseReporter(Protocol):
    """Receives per-case progress; ``stream`` reaches the terminal while nnU-Net's output is logged."""

    def start(self, total: int, stream: TextIO) -> None: ...

    def working(self, case: str, detail: str) -> None: ...

    def case(self, outcome: CaseOutcome, index: int) -> None: ...


@dataclass(frozen=True)
class InputCase:
    case: str
    source: Path  # a file, or a DICOM series folder
    dicom: bool = False


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
            "cases": [{"case": o.case, "status": o.status, "seconds": round(o.seconds, 3), "subtype": o.subtype,
                       "probabilities": o.probabilities, "times": {k: round(v, 3) for k, v in o.times.items()},
                       "window": None if o.window is None else {
                           "tiles": o.window.tiles, "mirrored": o.window.full, "passes": o.window.passes,
                           "stock_passes": o.window.stock_passes, "fallback": o.window.fallback}}
                      for o in self.outcomes],
        }


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk

    # ITK warns on stderr when it finds no series; here that is an answer, not a problem.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def find_inputs(path: Path) -> list[InputCase]:
    """Cases in a file, a folder of images (``_0000`` optional) or a DICOM series folder."""
    if path.is_file():
        if not image_extension(path):
            raise PredictError(f"{path}: not a .nii.gz, .nii, .nrrd or .mha image")
        return [InputCase(_case_name(path), path)]
    if not path.is_dir():
        raise PredictError(f"{path}: no such file or folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and image_extension(p) and not p.name.startswith("."))
    if not images:
        if _is_dicom_folder(path):
            return [InputCase(path.name, path, dicom=True)]
        raise PredictError(f"{path}: no images (.nii.gz, .nii, .nrrd, .mha) and no DICOM series found")
    cases: dict[str, InputCase] = {}
    for image in images:
        case = _case_name(image)
        if case in cases:
            raise PredictError(f"{image} and {cases[case].source} would both be written as {case}.nii.gz")
        cases[case] = InputCase(case, image)
    return list(cases.values())


def _case_name(path: Path) -> str:
    stem = image_stem(path)
    return stem[:-5] if stem.endswith("_0000") else stem


def model_folder(config: Config) -> Path:
    """The nnU-Net results folder of the configured task, plans and configuration."""
    state = read_state(config.dataset_preprocessed_dir)
    if state is None:
        raise PredictError(f"{config.dataset_preprocessed_dir}: no finished preprocessing (never run, or "
                           "interrupted), so the model cannot be found; run `pancseg preprocess` (and `pancseg "
                           "train` if no model was trained yet)")
    plans = state["plans_identifier"]
    name = f"{TRAINERS[config.train.task]}__{plans}__{config.plan.configuration}"
    return config.results_dir / config.dataset.folder_name / name


def _resolve_folds(model_dir: Path, requested: list[int] | None, checkpoint: str,
                   warn: Callable[[str], None], training: Callable[[int], list[str]]) -> list[int]:
    """The folds to ensemble: those asked for, else every fold whose training finished.

    A fold without checkpoint_final.pth is unfinished, and so is one that ``training(fold)`` names a
    command for (a finished fold trained further keeps its old final checkpoint meanwhile); their
    checkpoint_best.pth is used only when asked for by number, with a warning.
    """
    available = sorted(int(p.name[5:]) for p in model_dir.glob("fold_*")
                       if p.name[5:].isdigit() and (p / checkpoint).is_file())
    if not available:
        raise PredictError(f"{model_dir}: no fold has {checkpoint}; train first (`pancseg train --fold 0`)")
    running = {f: holders for f in available if (holders := training(f))}
    finished = [f for f in available
                if (model_dir / f"fold_{f}" / "checkpoint_final.pth").is_file() and f not in running]
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
    import torch

    from pancreas_cli.exceptions import TrainError
    from pancreas_cli.train import resolve_device

    if requested == "auto":
        try:
            return resolve_device("auto")
        except TrainError:
            warn("no GPU found: predicting on the CPU (slow; --fast skips test-time mirroring)")
            return torch.device("cpu")
    try:
        return resolve_device(requested)
    except TrainError as exc:
        raise PredictError(str(exc)) from exc


def _read_input(case: InputCase) -> sitk.Image:
    """The case's scan, verified: a 3D single-channel image (DataError naming the file otherwise)."""
    import SimpleITK as sitk

    if case.dicom:
        reader = sitk.ImageSeriesReader()
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(case.source))
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.source), series[0]))
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
    target = scratch / f"{case.case}_0000.nii.gz"
    write_image(image, target)
    return target


def model_stamp(model_dir: Path, folds: list[int], checkpoint_name: str, tile_step_size: float,
                mirroring: bool, engine: str = "nnunet") -> dict[str, Any]:
    """What decides a prediction: the model folder, its checkpoints as they are now, and the settings."""
    checkpoints = [model_dir / f"fold_{fold}" / checkpoint_name for fold in folds]
    return {"model": str(model_dir.resolve()), "folds": folds, "checkpoint": checkpoint_name,
            "checkpoint_files": [[p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoints],
            "tile_step_size": tile_step_size, "mirroring": mirroring, "engine": engine}


def engine_stamp(settings: Any) -> str:
    """The engine settings that can change a voxel (batching only changes float rounding)."""
    if settings.engine == "nnunet":
        return "nnunet"
    return f"pancseg region={settings.region_margin_mm:g}mm" if settings.region else "pancseg"


def _record(out_dir: Path, case: str) -> dict[str, Any] | None:
    """The case's record; None if there is none, {} if it cannot be read (hand-edited, truncated)."""
    path = out_dir / SIDECAR_DIR / f"{case}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def source_stamp(case: InputCase) -> list[Any]:
    """What identifies the input scan as it is now: path, size and time (of a DICOM series' files)."""
    path = case.source.resolve()
    if not case.dicom:
        info = path.stat()
        return [str(path), info.st_size, info.st_mtime_ns]
    files = [p.stat() for p in path.iterdir() if p.is_file()]
    return [str(path), len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]


def _outdated(out_dir: Path, case: InputCase, record: dict[str, Any] | None, stamp: dict[str, Any]) -> str | None:
    """None if ``stamp``'s model wrote the mask of ``case`` from its scan as it is now (by its
    ``record``), "" if there is no mask, else why the mask is not that.

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
    if not isinstance(written, dict):
        return "its record is unreadable or from an older pancseg"
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
    return None


def _check_output(out_dir: Path, cases: list[InputCase], stamp: dict[str, Any], *,
                  replacing: bool) -> tuple[dict[str, dict[str, Any] | None], dict[str, str | None]]:
    """Each case's record and why its mask is not this model's (see :func:`_outdated`); refuses what may
    not be replaced (:func:`_refuse_conflicts`)."""
    records = {c.case: _record(out_dir, c.case) for c in cases}
    outdated = {c.case: _outdated(out_dir, c, records[c.case], stamp) for c in cases}
    _refuse_conflicts(out_dir, outdated, replacing=replacing)
    return records, outdated


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
    conflicts = [case for case, why in outdated.items() if why and why != INTERRUPTED]
    if conflicts and not replacing:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise OutputExistsError(
            f"{out_dir / conflicts[0]}.nii.gz{more} exists but was not predicted by this model with these "
            f"settings ({outdated[conflicts[0]]}); pass --force to predict again, or choose another output folder"
        )


def _subtype(probabilities: list[float] | None) -> int | None:
    return None if probabilities is None else max(range(3), key=lambda i: probabilities[i])


def _write_csvs(out_dir: Path, stamp: dict[str, Any]) -> Path:
    """``subtype_results.csv`` and ``subtype_probabilities.csv`` from every case this model predicted."""
    rows = []
    for path in sorted((out_dir / SIDECAR_DIR).glob("*.json")):
        case = path.stem
        record = _record(out_dir, case) or {}
        if (out_dir / f"{case}.nii.gz").is_file() and record.get("model") == stamp and not record.get("pending"):
            rows.append((case, record["probabilities"]))
    results = out_dir / "subtype_results.csv"
    write_text("Names,Subtype\n" + "".join(f"{c}.nii.gz,{_subtype(p)}\n" for c, p in rows),
               results)
    write_text("Names,p0,p1,p2\n" + "".join(f"{c}.nii.gz," + ",".join(f"{v:.6f}" for v in p) + "\n"
                                            for c, p in rows), out_dir / "subtype_probabilities.csv")
    return results


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
    reporter: CaseReporter | None = None,
    warn: Callable[[str], None] = lambda text: None,
    trust_model: bool = False,
) -> PredictResult:
    """Predict every case under ``input_path`` into ``out_dir``.

    ``overwrite`` predicts every case again; ``replace_outdated`` only those whose masks another
    model or other settings wrote (``pancseg run`` after more training). Without either, such
    masks are refused with :class:`OutputExistsError` before anything is written. Masks pancseg
    did not write (ground truth, another tool's) and input scans are never replaced.
    ``trust_model``: load the checkpoints in full, not only what nnU-Net's hold (see checkpoints).
    """
    settings = config.predict
    checkpoint_name = f"checkpoint_{checkpoint or settings.checkpoint}.pth"
    if input_path.is_dir() and out_dir.resolve() == input_path.resolve():
        raise PredictError(f"{out_dir}: the output folder is the input folder; its masks would be read as new "
                           "scans next time: choose another -o")
    cases = find_inputs(input_path)
    sources = {c.source.resolve() for c in cases if not c.dicom}
    clash = next((c for c in cases if (out_dir / f"{c.case}.nii.gz").resolve() in sources), None)
    if clash is not None:
        raise PredictError(f"{clash.source}: its mask would be written over this input scan; choose another -o")
    with contextlib.ExitStack() as held:
        held.enter_context(locks.project(config.project_dir, shared=True))  # no preprocess meanwhile
        model_dir = model_folder(config)
        trainer = TRAINERS[config.train.task]
        folds = _resolve_folds(model_dir, folds or settings.folds, checkpoint_name, warn,
                               lambda fold: locks.fold_holders(config.project_dir, trainer, fold))
        device = _device(settings.device, warn)
        setup_nnunet_env(config, device_type=device.type)
        multitask = config.train.task == "multitask"
        mirroring = settings.mirroring and not fast
        stamp = model_stamp(model_dir, folds, checkpoint_name, settings.tile_step_size, mirroring,
                            engine_stamp(settings))
        _check_output(out_dir, cases, stamp, replacing=overwrite or replace_outdated)  # before anything is written
        # One predict per output folder. Its lock is taken only now (a refused predict leaves nothing
        # beside the folder); another predict may have finished meanwhile, so the checks are repeated.
        held.enter_context(locks.output_folder(out_dir))
        records, outdated = _check_output(out_dir, cases, stamp, replacing=overwrite or replace_outdated)
        log_file = config.project_dir / "logs" / "predict.log"
        result = PredictResult(out_dir, model_dir, folds, str(device), log_file, engine=settings.engine)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SIDECAR_DIR).mkdir(exist_ok=True)
        todo = [c for c in cases if overwrite or outdated[c.case] is not None]
        for case in cases:
            if case not in todo:
                probabilities = (records[case.case] or {}).get("probabilities")
                result.outcomes.append(CaseOutcome(case.case, case.source, "skipped", subtype=_subtype(probabilities),
                                                   probabilities=probabilities))
        if todo:
            with redirect_output(log_file) as terminal, \
                    tempfile.TemporaryDirectory(dir=out_dir, prefix=".scratch") as scratch:
                try:
                    predictor = _load_model(config, model_dir, folds, checkpoint_name, device, mirroring, trust_model)
                except (RuntimeError, ValueError, OSError, KeyError) as exc:
                    raise PredictError(f"cannot load the model in {model_dir}: {type(exc).__name__}: {exc}; "
                                       f"nnU-Net log: {log_file}") from exc
                runner = _CaseRunner(predictor, out_dir, Path(scratch), multitask, stamp, device, reporter)
                if reporter is not None:
                    reporter.start(len(todo), terminal)
                start = time.perf_counter()
                try:
                    for index, outcome in enumerate(runner.run(todo), start=1):
                        result.outcomes.append(outcome)
                        if reporter is not None:
                            reporter.case(outcome, index)
                except KeyboardInterrupt:
                    if multitask:  # the CSVs list the cases finished so far
                        _write_csvs(out_dir, stamp)
                    raise
                finally:
                    result.seconds = time.perf_counter() - start
        if multitask:
            result.subtype_csv = _write_csvs(out_dir, stamp)
        return result


def _load_model(config: Config, model_dir: Path, folds: list[int], checkpoint_name: str, device: torch.device,
                mirroring: bool, trust_model: bool = False) -> Any:
    from pancreas_cli.multitask.predictor import MultiTaskPredictor, ProgressPredictor, WindowSettings

    settings = config.predict
    window = None
    if settings.engine == "pancseg":
        window = WindowSettings(batch_size=batch_size(settings.batch_size, device), region=settings.region,
                                margin_mm=settings.region_margin_mm, keep_on_device=True,
                                pad_batches=device.type == "cuda")
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
                 device: torch.device, reporter: CaseReporter | None) -> None:
        from pancreas_cli.inference.resample import DeviceResampling

        self.predictor, self.out_dir, self.scratch, self.multitask = predictor, out_dir, scratch, multitask
        self.stamp, self.reporter = stamp, reporter
        self.fast = predictor.window is not None
        manager = predictor.configuration_manager
        self.manager = DeviceResampling(manager, device) if self.fast else manager
        self.preprocessor = manager.preprocessor_class(verbose=False)

    def run(self, cases: list[InputCase]) -> Iterator[CaseOutcome]:
        for outcome in run_overlapped(cases, self.read, self.compute, self.write):
            shutil.rmtree(self.scratch / outcome.case, ignore_errors=True)
            yield outcome

    def read(self, case: InputCase) -> Any:
        import torch

        start = time.perf_counter()
        try:
            scan = source_stamp(case)  # before reading: a scan replaced meanwhile counts as changed next time
            image = _read_input(case)
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
            return {"scan": scan, "data": data, "properties": properties, "read": time.perf_counter() - start}
        except (DataError, RuntimeError, ValueError, OSError) as exc:
            return Finished(_failed(case, exc, start))

    def compute(self, case: InputCase, ready: dict[str, Any]) -> Any:
        import torch

        start = time.perf_counter()
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
            start = time.perf_counter()
            ready["mask"] = self._mask(logits, ready["properties"]) if self.fast else logits.cpu()
            ready["export"] = time.perf_counter() - start
            return ready
        except (RuntimeError, ValueError) as exc:
            return Finished(_failed(case, exc, start - ready["read"]))

    def _mask(self, logits: torch.Tensor, properties: dict[str, Any]) -> Any:
        from pancreas_cli.inference.export import segmentation_from_logits

        predictor = self.predictor
        return segmentation_from_logits(logits, properties, predictor.plans_manager, self.manager,
                                        predictor.label_manager)

    def write(self, case: InputCase, done: dict[str, Any]) -> CaseOutcome:
        start = time.perf_counter()
        partial = self.out_dir / f".partial_{case.case}"
        predictor = self.predictor
        try:
            if self.fast:
                from pancreas_cli.inference.export import write_segmentation

                write_segmentation(done["mask"], done["properties"], predictor.plans_manager, predictor.dataset_json,
                                   partial)
            else:
                from nnunetv2.inference.export_prediction import export_prediction_from_logits

                export_prediction_from_logits(done["mask"], done["properties"], predictor.configuration_manager,
                                              predictor.plans_manager, predictor.dataset_json, str(partial), False)
            self._replace(case, done, partial)
        except (DataError, RuntimeError, ValueError, OSError) as exc:
            return _failed(case, exc, start - done["read"] - done["network"] - done["export"])
        finally:
            Path(f"{partial}.nii.gz").unlink(missing_ok=True)
        times = {"read": done["read"], "network": done["network"],
                 "export": done["export"] + time.perf_counter() - start}
        return CaseOutcome(case.case, case.source, "predicted", sum(times.values()), _subtype(done["probabilities"]),
                           done["probabilities"], times=times, window=done["window"])

    def _replace(self, case: InputCase, done: dict[str, Any], partial: Path) -> None:
        """The mask into place, its record marked pending meanwhile: a run stopped in between redoes the case."""
        record = {"case": case.case, "source": str(case.source), "source_stamp": done["scan"],
                  "probabilities": done["probabilities"], "model": self.stamp}
        sidecar = self.out_dir / SIDECAR_DIR / f"{case.case}.json"
        write_text(json.dumps({**record, "pending": True}), sidecar)
        os.replace(f"{partial}.nii.gz", self.out_dir / f"{case.case}.nii.gz")
        write_text(json.dumps(record), sidecar)


def _failed(case: InputCase, exc: Exception, start: float) -> CaseOutcome:
    """The failed outcome of ``case``: its first line for the summary, the whole error for predict.log."""
    print(f"{case.source}: prediction failed", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    # The report names the source already; a DataError's own message starts with it too.
    text = str(exc).removeprefix(f"{case.source}: ") if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
    return CaseOutcome(case.case, case.source, "failed", time.perf_counter() - start,
                       error=text.strip().splitlines()[0])
