"""``pancseg train``: train the multi-task model (or stock nnU-Net) on one or more folds.

nnU-Net's trainer runs in this process (its prints go to ``project_dir/logs/train_<task>_fold<N>.log``);
several GPUs go through nnU-Net's own DDP launcher. Resuming picks the newest checkpoint and may
extend a finished run to more epochs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TextIO

from pancreas_cli import layout, locks
from pancreas_cli.checkpoints import TRUST_ENV, read_checkpoint
from pancreas_cli.config import Config, load_config
from pancreas_cli.devices import cpu_share, ddp_backend, training_device
from pancreas_cli.exceptions import (CheckpointError, PancsegError, TableError, TrainError,
                                     TrainingInterrupted, UntrustedCheckpointError)
from pancreas_cli.imageio import sweep_partials
from pancreas_cli.logcapture import redirect_output, tail
from pancreas_cli.multitask.history import read_metrics
from pancreas_cli.multitask.settings import (TrainingSettings, handing, read_settings, settings_path,
                                             write_settings)
from pancreas_cli.nnunet_env import nnunet_worker_pools, scoped_env, setup_nnunet_env
from pancreas_cli.pretrained import PretrainedReport, load_matching, read_pretrained
from pancreas_cli.subtypes import CASE_SUBTYPES_NAME

if TYPE_CHECKING:
    import torch


class EpochReporter(Protocol):
    """Receives training progress; ``stream`` reaches the terminal while nnU-Net's output is logged."""

    def start_fold(self, fold: int, first_epoch: int, total_epochs: int, stream: TextIO) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...


@dataclass
class FoldResult:
    fold: int
    output_folder: Path
    log_file: Path
    epochs_done: int = 0
    resumed_from: int | None = None
    last: dict[str, float | int | None] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    up_to_date: bool = False  # --resume of a fold that had finished train.epochs and its validation
    pretrained: PretrainedReport | None = None  # --pretrained: what was loaded

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold, "output_folder": str(self.output_folder), "log_file": str(self.log_file),
            "epochs_done": self.epochs_done, "resumed_from": self.resumed_from, "last_epoch": self.last,
            "validation": self.validation, "seconds": round(self.seconds, 1), "up_to_date": self.up_to_date,
            "pretrained": None if self.pretrained is None else self.pretrained.to_dict(),
        }


@dataclass
class FoldFailure:
    """A fold that ``train --devices`` could not train (the others went on)."""

    fold: int
    device: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"fold": self.fold, "device": self.device, "error": self.error}


@dataclass
class TrainResult:
    task: str
    device: str
    trainer: str
    folds: list[FoldResult] = field(default_factory=list)
    failed: list[FoldFailure] = field(default_factory=list)  # train --devices only: the others raise

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "device": self.device, "trainer": self.trainer,
                "folds": [f.to_dict() for f in self.folds], "failed": [f.to_dict() for f in self.failed]}


def _preprocessed_state(config: Config) -> dict[str, Any]:
    state = layout.read_state(config.dataset_preprocessed_dir)
    if state is None:
        raise TrainError(f"{config.dataset_preprocessed_dir}: not preprocessed; run `pancseg preprocess` first")
    if state.get("pending"):
        raise TrainError(f"{config.dataset_preprocessed_dir}: the last preprocessing did not finish (it "
                         "failed or was stopped); run `pancseg preprocess` first")
    if state["configuration"] != config.plan.configuration:
        raise TrainError(
            f"the data was preprocessed for {state['configuration']} but plan.preset asks for "
            f"{config.plan.configuration}; re-run `pancseg preprocess` with the same preset"
        )
    return state


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written checkpoint (a resumed run's latest is newer than an older final)."""
    found = [folder / name for name in layout.CHECKPOINTS if (folder / name).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _checkpoint_epoch(path: Path, *, trust: bool) -> int:
    """The epoch a checkpoint resumes at (read safely unless ``trust``, its tensors only mapped);
    TrainError naming it if it is damaged, UntrustedCheckpointError if it holds more than nnU-Net's."""
    try:
        return int(read_checkpoint(path, trust=trust, mmap=True, required=("current_epoch",))["current_epoch"])
    except UntrustedCheckpointError:
        raise
    except CheckpointError as exc:
        raise TrainError(f"{exc}; move it away to use the fold's other checkpoints, or pass --force to train the "
                         "fold again") from exc


def _stopped_after(path: Path) -> str:
    """`` after epoch N`` for a message, when the checkpoint says so safely (nothing is unpickled just
    to print a number; a checkpoint that holds more than nnU-Net's is not described)."""
    try:
        return f" after epoch {_checkpoint_epoch(path, trust=False)}"
    except UntrustedCheckpointError:
        return ""


def _note_foreign_metrics(output_folder: Path, warn: Callable[[str], None]) -> None:
    """Say when a resumed fold's metrics.csv is not as training wrote it: the trainer rewrites it
    from its own record (the checkpoint's log) at the end of the next epoch."""
    path = output_folder / layout.METRICS_NAME
    try:
        read_metrics(path)
    except TableError as exc:
        where = "" if exc.line is None else f"line {exc.line}: "
        warn(f"{path}: not as training wrote it ({where}{exc.why}); it is rewritten from the checkpoint's "
             "record of every epoch (keep a copy of your edits elsewhere)")


def _stop_loaders(trainer: Any) -> None:
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            finish()


def _raise_worker_death(trainer: Any, exc: RuntimeError) -> NoReturn:
    """nnU-Net only says its workers died: load one batch without workers to show the real error."""
    try:
        with scoped_env("nnUNet_n_proc_DA", "0"):  # read by get_dataloaders
            loader, _ = trainer.get_dataloaders()
        next(loader)
    except Exception as real:  # noqa: BLE001 - any error here is the one the user needs to see
        raise TrainError(f"data loading failed in nnU-Net's background workers: {type(real).__name__}: {real}") \
            from real
    raise TrainError(f"nnU-Net's data-loader workers died ({exc}); a batch loads fine without workers, so "
                     "the workers probably ran out of memory: lower train.da_workers or raise shared memory") from exc


def _fold_summary(output_folder: Path) -> tuple[dict[str, float | int | None], dict[str, Any]]:
    """The last metrics.csv row (as numbers, for --json and the table) and the validation summaries."""
    # Not as training wrote it (edited since): the summary goes without it.
    rows = read_metrics(output_folder / layout.METRICS_NAME, tolerant=True)
    last = rows[-1] if rows else {}
    validation: dict[str, Any] = {}
    summary = output_folder / layout.VALIDATION_DIR / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        validation["dice_per_label"] = {k: v["Dice"] for k, v in data.get("mean", {}).items()}
        validation["foreground_dice"] = data.get("foreground_mean", {}).get("Dice")
    classification = output_folder / layout.VALIDATION_DIR / "classification_summary.json"
    if classification.is_file():
        data = json.loads(classification.read_text(encoding="utf-8"))
        validation.update(accuracy=data["accuracy"], macro_f1=data["macro_f1"])
    return last, validation


def train(
    config: Config,
    *,
    folds: list[int] | None,
    resume: bool = False,
    force: bool = False,
    reporter: EpochReporter | None = None,
    trust_model: bool = False,
    warn: Callable[[str], None] = lambda text: None,
    pretrained: Path | None = None,
) -> TrainResult:
    """Train ``config.train.task`` on each fold (None: every fold of the splits) with nnU-Net's machinery.

    ``trust_model``: load checkpoints in full, not only what nnU-Net's hold (see checkpoints).
    ``pretrained``: a model archive or checkpoint whose matching weights each new training starts from.
    """
    if config.train.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise TrainError("train.wandb.enabled needs wandb: pip install 'pancseg[wandb]'")
    with contextlib.ExitStack() as held:
        held.enter_context(locks.project(config.project_dir, shared=True))  # no preprocess meanwhile
        state = _preprocessed_state(config)
        folds = _check_folds(config, folds)
        source = _pretrained_source(config, pretrained, resume=resume, trust=trust_model)
        device = training_device(config.train.device)
        if config.train.num_gpus > 1:
            _check_ddp(config, state, device)
        setup_nnunet_env(config, device_type=device.type)
        trainer_name = layout.TRAINERS[config.train.task]
        for fold in folds:  # other folds may train meanwhile, but not these
            held.enter_context(locks.fold(config.project_dir, trainer_name, fold))
        # Every fold is checked before anything is written: a refused fold changes nothing.
        starts = [_fold_start(config, state, fold, resume=resume, force=force, trust=trust_model)
                  for fold in folds]
        if resume and all(start.checkpoint is None and not start.finished for start in starts):
            # Most likely a wrong project_dir, fold or task; quietly starting over could cost hours.
            where = starts[0].output_folder.parent
            raise TrainError(f"nothing to resume: no checkpoint for fold(s) {', '.join(map(str, folds))} in {where}; "
                             "check project_dir, --fold and --task, or drop --resume to start a new training")
        write_training_inputs(config)
        result = TrainResult(config.train.task, str(device), trainer_name)
        for start in starts:
            if start.checkpoint is not None:
                _note_foreign_metrics(start.output_folder, warn)
            result.folds.append(_train_fold(config, state, trainer_name, start, device, reporter=reporter,
                                            trust=trust_model, pretrained=source))
        return result


def _pretrained_source(config: Config, path: Path | None, *, resume: bool,
                       trust: bool) -> tuple[str, dict[str, Any]] | None:
    """``--pretrained``'s checkpoint and weights, read once before any fold starts."""
    if path is None:
        return None
    if resume:
        raise TrainError("--pretrained starts a new training; leave it out to --resume one")
    if config.train.num_gpus > 1:
        raise TrainError("--pretrained trains on one device; leave out --num-gpus (or start from one GPU's run)")
    return read_pretrained(path, trust=trust)
def train_on_devices(config: Config, *, folds: list[int] | None, devices: list[str], resume: bool = False,
                     force: bool = False, trust_model: bool = False, pretrained: Path | None = None) -> TrainResult:
    """``train --devices``: the folds side by side, one process per device (folds dealt out in turn,
    each process training its share one after another); every fold takes its own lock and log as in
    :func:`train`. A failed fold does not stop the others: it is in ``failed``. SIGTERM (a scheduler's
    stop) is passed on to the processes, which save a checkpoint as a single ``train`` does."""
    from concurrent.futures import ProcessPoolExecutor

    from pancreas_cli.signals import Terminated

    if config.train.num_gpus > 1:
        raise TrainError("--devices trains one fold per device; train.num_gpus > 1 (DDP) trains one fold on several: "
                         "use one or the other")
    with locks.project(config.project_dir, shared=True):
        _preprocessed_state(config)
        folds = _check_folds(config, folds)
    shares = [(device, folds[i::len(devices)]) for i, device in enumerate(devices) if folds[i::len(devices)]]
    result = TrainResult(config.train.task, ",".join(devices), layout.TRAINERS[config.train.task])
    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        cpu_threads = cpu_share(sum(device == "cpu" for device, _ in shares))
        jobs = [(device, share, pool.submit(_train_share, config, device, share, resume, force, trust_model,
                                            cpu_threads, pretrained)) for device, share in shares]
        try:
            _collect(jobs, result)
        except Terminated:  # only this process got it (kill PID, a scheduler's batch-shell signal)
            for child in multiprocessing.active_children():
                child.terminate()  # they save a checkpoint and say how to resume
            _collect(jobs, result)
            raise TrainingInterrupted("training interrupted: " + "; ".join(
                f"fold {f.fold} on {f.device}: {f.error}" for f in result.failed)) from None
    result.folds.sort(key=lambda f: f.fold)
    return result


def _collect(jobs: list[tuple[str, list[int], Any]], result: TrainResult) -> None:
    """The outcomes of the ``--devices`` processes into ``result`` (each job once, removed when read)."""
    from concurrent.futures.process import BrokenProcessPool

    while jobs:
        device, share, job = jobs[0]
        try:
            outcomes = job.result()
        except BrokenProcessPool as exc:
            outcomes = [FoldFailure(fold, device, f"its process ended unexpectedly ({exc})") for fold in share]
        jobs.pop(0)
        for outcome in outcomes:
            (result.failed if isinstance(outcome, FoldFailure) else result.folds).append(outcome)


def _train_share(config: Config, device: str, folds: list[int], resume: bool, force: bool, trust: bool,
                 cpu_threads: int, pretrained: Path | None = None) -> list[FoldResult | FoldFailure]:
    """One ``--devices`` process: train ``folds`` on ``device`` one after another (on the CPU with
    its share of the cores: processes that each use them all slow each other down)."""
    import torch

    from pancreas_cli.signals import sigterm_as_interrupt

    if device == "cpu":
        torch.set_num_threads(cpu_threads)

    locks.wait_for_locks(config.locks.wait, config.locks.wait_seconds)  # the command's --wait
    config = config.model_copy(deep=True)
    config.train.device = device
    outcomes: list[FoldResult | FoldFailure] = []
    with sigterm_as_interrupt():
        for fold in folds:
            print(f"pancseg: fold {fold} training on {device} (log: "
                  f"{layout.log_file(config.project_dir, f'train_{config.train.task}_fold{fold}.log')})",
                  file=sys.stderr, flush=True)
            try:
                outcomes += train(config, folds=[fold], resume=resume, force=force, trust_model=trust,
                                  warn=lambda text: print(f"pancseg: warning: {text}", file=sys.stderr),
                                  pretrained=pretrained).folds
            except PancsegError as exc:
                outcomes.append(FoldFailure(fold, device, str(exc)))
                if isinstance(exc, TrainingInterrupted):
                    break  # stopped: the folds after it are not started
            except KeyboardInterrupt:  # Ctrl-C before nnU-Net's loop: nothing to save
                outcomes.append(FoldFailure(fold, device, "interrupted"))
                break
    return outcomes


def _check_ddp(config: Config, state: dict[str, Any], device: torch.device) -> None:
    """What nnU-Net's DDP needs, checked before anything starts: as many GPUs (or, for tests, CPU
    processes), and no more of them than samples in a batch (nnU-Net splits each batch over them and
    would stop with an assertion in every process)."""
    import torch

    count = config.train.num_gpus
    if device.type == "mps":
        raise TrainError("train.num_gpus > 1 (DDP) runs on CUDA GPUs (or CPU processes), not on mps")
    if device.type == "cuda" and torch.cuda.device_count() < count:
        raise TrainError(f"train.num_gpus = {count} but {torch.cuda.device_count()} CUDA device(s) are "
                         "available; see `pancseg doctor`")
    plans_file = config.dataset_preprocessed_dir / f"{state['plans_identifier']}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    batch = config.train.batch_size or int(plans["configurations"][config.plan.configuration]["batch_size"])
    if count > batch:
        raise TrainError(f"train.num_gpus = {count} is more than the batch size {batch} (train.batch_size, or the "
                         f"plans' in {plans_file}): nnU-Net splits each batch over the GPUs; use at most {batch} "
                         "GPUs, or raise train.batch_size")


def _check_folds(config: Config, folds: list[int] | None) -> list[int]:
    """The folds, all of which must be in splits_final.json (nnU-Net would quietly train a random split)."""
    path = config.dataset_preprocessed_dir / "splits_final.json"
    if not path.is_file():
        raise TrainError(f"{path}: not found; re-run `pancseg prepare` and `pancseg preprocess`")
    count = len(json.loads(path.read_text(encoding="utf-8")))
    if folds is None:
        return list(range(count))
    missing = [f for f in folds if not 0 <= f < count]
    if missing:
        why = (f"; the dataset has fewer labelled cases than dataset.num_folds = {config.dataset.num_folds}"
               if count < config.dataset.num_folds else "")
        raise TrainError(f"fold {missing[0]} does not exist: {path} has {count} folds (0-{count - 1}){why}")
    return list(dict.fromkeys(folds))  # a fold named twice is trained once


def write_training_inputs(config: Config) -> None:
    """Put what the trainers read beside the preprocessed data: subtypes.csv (the settings are the
    fold's own: :func:`build_trainer` hands them, the fold record holds them for nnU-Net's processes)."""
    pre = config.dataset_preprocessed_dir
    # Under a temporary name: a fold training in another process may be reading the file; this process's
    # own, as folds that start together (train --devices, a SLURM array) write it at the same time.
    partial = pre / f".{CASE_SUBTYPES_NAME}.{os.getpid()}.partial"
    shutil.copyfile(config.dataset_raw_dir / CASE_SUBTYPES_NAME, partial)
    os.replace(partial, pre / CASE_SUBTYPES_NAME)
    settings_path(pre).unlink(missing_ok=True)  # an earlier pancseg's settings for all folds: read by nothing now


def build_trainer(config: Config, state: dict[str, Any], trainer_name: str, fold: int, device: torch.device, *,
                  continue_training: bool) -> Any:
    """The nnU-Net trainer ``trainer_name`` for ``fold`` on the preprocessed plans (nnU-Net must be set up),
    handed ``config``'s training settings."""
    from pancreas_cli.multitask import trainer as trainers

    pre = config.dataset_preprocessed_dir
    plans = json.loads((pre / f"{state['plans_identifier']}.json").read_text(encoding="utf-8"))
    plans["continue_training"] = continue_training
    dataset_json = json.loads((pre / "dataset.json").read_text(encoding="utf-8"))
    trainer_class = getattr(trainers, trainer_name)
    with handing(config.train):
        return trainer_class(plans=plans, configuration=config.plan.configuration, fold=fold,
                             dataset_json=dataset_json, device=device)


@dataclass(frozen=True)
class _FoldStart:
    fold: int
    output_folder: Path
    checkpoint: Path | None  # to resume from
    discard: bool  # --force: an existing training is deleted first
    finished: bool = False  # --resume of a fold already trained to train.epochs and validated: nothing to do


def _fold_start(config: Config, state: dict[str, Any], fold: int, *, resume: bool, force: bool,
                trust: bool) -> _FoldStart:
    """Where ``fold`` trains and from what; refuses to discard a training without ``force``."""
    output_folder = layout.fold_folder(layout.model_folder(config, state), fold)
    existing = newest_checkpoint(output_folder)
    if existing is not None and not resume:
        if not force:
            state_text = "finished" if existing.name == layout.CHECKPOINT_FINAL else "stopped"
            raise TrainError(f"fold {fold} already has a training in {output_folder} ({state_text}"
                             f"{_stopped_after(existing)}); pass --resume to continue it or --force to start over")
        return _FoldStart(fold, output_folder, None, discard=True)
    if resume and existing is not None:
        done = _checkpoint_epoch(existing, trust=trust)  # also: a checkpoint that cannot be loaded fails here, named
        final = existing.name == layout.CHECKPOINT_FINAL
        if not final and done >= config.train.epochs:
            # nnU-Net would skip the loop and finalise the unfinished run as if it were complete.
            raise TrainError(f"fold {fold} stopped after epoch {done} of an unfinished run, but train.epochs is "
                             f"{config.train.epochs}: pass --epochs N with N > {done} to continue it")
        _check_resume_settings(config, fold, output_folder)
        summary = output_folder / layout.VALIDATION_DIR / "summary.json"
        # The validation must be of this final checkpoint, not left from before the run was extended.
        if (final and done >= config.train.epochs and summary.is_file()
                and summary.stat().st_mtime_ns >= existing.stat().st_mtime_ns):
            return _FoldStart(fold, output_folder, None, discard=False, finished=True)
    return _FoldStart(fold, output_folder, existing if resume else None, discard=False)


def _fixed_settings(settings: TrainingSettings) -> dict[str, Any]:
    """The settings a resume must keep (:meth:`TrainingSettings.learning`), by config key."""
    return {f"train.{name}": value for name, value in settings.learning().items()}


def _check_resume_settings(config: Config, fold: int, output_folder: Path) -> None:
    """Refuse to continue a fold with other learning settings than it was trained with (the schedule
    and the loss would change mid-run without a word); say which ``--set`` options continue it."""
    record = settings_path(output_folder)
    if not record.is_file():
        return  # trained by an older pancseg, or by nnU-Net's own command
    try:
        earlier = _fixed_settings(read_settings(output_folder))
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise TrainError(f"{record}: unreadable ({exc}); pass --force to train fold {fold} again") from exc
    now = _fixed_settings(config.train)
    changed = [key for key in now if earlier.get(key) != now[key]]
    if changed:
        listed = ", ".join(f"{key} = {_yaml(earlier.get(key))} (now {_yaml(now[key])})" for key in changed)
        raise TrainError(f"fold {fold} was trained with other settings: {listed}; continue it with the same ones: "
                         f"`{_resume_command(config, fold, earlier)}`, or pass --force to start over")


def _train_fold(config: Config, state: dict[str, Any], trainer_name: str, start: _FoldStart, device: torch.device, *,
                reporter: EpochReporter | None, trust: bool,
                pretrained: tuple[str, dict[str, Any]] | None = None) -> FoldResult:
    fold, output_folder = start.fold, start.output_folder
    if start.discard:
        shutil.rmtree(output_folder)
    sweep_partials(output_folder)  # checkpoints a killed training was writing (this fold is locked)
    log_file = layout.log_file(config.project_dir, f"train_{config.train.task}_fold{fold}.log")
    fold_result = FoldResult(fold, output_folder, log_file)
    if start.finished:
        fold_result.last, fold_result.validation = _fold_summary(output_folder)
        fold_result.epochs_done = int(fold_result.last.get("epoch", 0) or 0)
        fold_result.up_to_date = True
        return fold_result
    # What this fold is trained with: for a later --resume's check, and read by nnU-Net's DDP processes.
    write_settings(config.train, output_folder)
    began = time.perf_counter()
    if config.train.num_gpus > 1:
        with scoped_env(TRUST_ENV, "1" if trust else "0"):  # read by the trainers in the DDP processes
            _train_ddp(config, state, trainer_name, fold, start.checkpoint, log_file, device.type)
    else:
        _train_single(config, state, trainer_name, fold, device, start.checkpoint, log_file, reporter, fold_result,
                      trust, None if start.checkpoint is not None else pretrained)
    fold_result.seconds = time.perf_counter() - began
    fold_result.last, fold_result.validation = _fold_summary(output_folder)
    fold_result.epochs_done = int(fold_result.last.get("epoch", 0) or 0)
    return fold_result


def _train_single(config: Config, state: dict[str, Any], trainer_name: str, fold: int, device: torch.device,
                  checkpoint: Path | None, log_file: Path, reporter: EpochReporter | None,
                  fold_result: FoldResult, trust: bool, pretrained: tuple[str, dict[str, Any]] | None = None) -> None:
    import torch

    with redirect_output(log_file) as terminal, nnunet_worker_pools(config.plan.num_processes):
        try:
            trainer = build_trainer(config, state, trainer_name, fold, device, continue_training=checkpoint is not None)
            trainer.trust_model = trust
            if checkpoint is not None:
                trainer.load_checkpoint(str(checkpoint))
                fold_result.resumed_from = trainer.current_epoch
            elif pretrained is not None:
                trainer.initialize()  # builds the network (nnU-Net's load_checkpoint does the same)
                fold_result.pretrained = load_matching(trainer.network, pretrained[1], pretrained[0])
                for line in fold_result.pretrained.lines():
                    trainer.print_to_log_file(line)
            if reporter is not None:
                reporter.start_fold(fold, trainer.current_epoch, trainer.num_epochs, terminal)
                trainer.epoch_callback = reporter.epoch
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            try:
                trainer.run_training()
            except KeyboardInterrupt:
                _save_on_interrupt(trainer)
                raise TrainingInterrupted(
                    f"training of fold {fold} interrupted at epoch {trainer.current_epoch + 1}; a checkpoint was "
                    f"saved: continue with `{_resume_command(config, fold)}`"
                ) from None
            except RuntimeError as exc:
                if "background workers are no longer alive" in str(exc):
                    _raise_worker_death(trainer, exc)
                raise
            try:
                trainer.perform_actual_validation(False)
            except KeyboardInterrupt:
                raise TrainingInterrupted(
                    f"validation of fold {fold} interrupted; its training is complete: "
                    f"`{_resume_command(config, fold)}` validates it again"
                ) from None
        except PancsegError:
            raise
        except (RuntimeError, ValueError, OSError, AssertionError, KeyError) as exc:
            raise _training_failed(exc, log_file) from exc
        finally:
            _finish_wandb()


def _training_failed(exc: BaseException, log_file: Path) -> TrainError:
    lines = "\n".join(f"    {line}" for line in tail(log_file, 8))
    return TrainError(f"nnU-Net training failed: {type(exc).__name__}: {exc}\n  last log lines:\n{lines}\n"
                      f"  full log: {log_file} (re-run with --debug for the traceback)")


def _resume_command(config: Config, fold: int, settings: dict[str, Any] | None = None) -> str:
    """The command that continues ``fold`` as this run went: its config file, ``--set`` for every value
    that file alone would not give (the run's options and ``--set``), ``settings`` (by config key)
    instead of the run's own, and its ``--epochs``."""
    wanted = {**_flat(config), **(settings or {})}
    try:
        from_file = _flat(load_config(config.config_path, check_source=False))
    except PancsegError:  # the file changed since: name every value
        from_file = {}
    epochs = wanted.pop("train.epochs")
    options = [f"-c {shlex.quote(str(config.config_path))}"] if config.config_path is not None else []
    options.append(f"--fold {fold} --resume")
    missing = object()
    options += [f"--set {shlex.quote(f'{key}={_yaml(value)}')}" for key, value in wanted.items()
                if from_file.get(key, missing) != value]
    return "pancseg train " + " ".join([*options, f"--epochs {epochs}"])


def _flat(model: Any, prefix: str = "") -> dict[str, Any]:
    """A config's values by dotted key (``train.head_stages``); sections are pydantic models."""
    from pydantic import BaseModel

    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _yaml(value: Any) -> str:
    """A value as ``--set`` reads it (YAML; flow style for lists and mappings)."""
    import yaml

    if isinstance(value, str | Path):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _finish_wandb() -> None:
    """Close nnU-Net's W&B run (nnU-Net never does), so that every logged value is written."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _save_on_interrupt(trainer: Any) -> None:
    """Save ``checkpoint_latest.pth`` so that --resume redoes the interrupted epoch."""
    _stop_loaders(trainer)
    if trainer.optimizer is None:
        return  # interrupted before the first step: nothing worth saving
    trainer.current_epoch -= 1  # save_checkpoint stores current_epoch + 1 as the epoch to resume at
    trainer.save_checkpoint(str(Path(trainer.output_folder) / layout.CHECKPOINT_LATEST))
    trainer.current_epoch += 1


def _train_ddp(config: Config, state: dict[str, Any], trainer_name: str, fold: int, checkpoint: Path | None,
               log_file: Path, device_type: str = "cuda") -> None:
    """Several GPUs (or CPU processes): one DDP process each, running nnU-Net's trainer as its own
    launcher does (:func:`_ddp_process`)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    if checkpoint is not None:
        _resume_from(checkpoint, trust=os.environ.get(TRUST_ENV) == "1")
    with redirect_output(log_file):
        try:
            launch_ddp(config, state, trainer_name, fold, device_type, continue_training=checkpoint is not None)
        except KeyboardInterrupt:
            # A SIGTERM reaches only this process (kill PID, docker stop), and the exit would wait
            # for the GPU processes, which are no daemons: stop them.
            for child in multiprocessing.active_children():
                child.terminate()
            raise TrainingInterrupted(
                f"training of fold {fold} interrupted; the GPU processes stop without saving, so "
                f"`{_resume_command(config, fold)}` continues from the last periodic checkpoint "
                f"(every train.save_every = {config.train.save_every} epochs)"
            ) from None
        except (ProcessRaisedException, ProcessExitedException, RuntimeError, ValueError, OSError) as exc:
            # A worker's error (a DataError too) arrives as ProcessRaisedException with its traceback.
            raise _training_failed(exc, log_file) from exc


def launch_ddp(config: Config, state: dict[str, Any], trainer_name: str, fold: int, device_type: str, *,
               continue_training: bool) -> None:
    """Start ``train.num_gpus`` DDP processes on this machine and wait for them (nnU-Net's
    ``run_training`` does the same, but only with NCCL on CUDA). A MASTER_PORT that is set (torchrun,
    a SLURM script) is kept, as nnU-Net keeps it."""
    import torch.multiprocessing as mp
    from nnunetv2.run.run_training import find_free_network_port

    port = os.environ.get("MASTER_PORT") or str(find_free_network_port())
    with scoped_env("MASTER_ADDR", "localhost"), scoped_env("MASTER_PORT", port):
        mp.spawn(_ddp_process, nprocs=config.train.num_gpus, join=True,
                 args=(config.train.num_gpus, device_type, str(config.dataset.id), config.plan.configuration, fold,
                       trainer_name, state["plans_identifier"], continue_training, config.plan.num_processes))


def _ddp_process(rank: int, world_size: int, device_type: str, dataset: str, configuration: str, fold: int,
                 trainer_name: str, plans_identifier: str, continue_training: bool, num_processes: int) -> None:
    """One DDP process: the steps of nnU-Net's ``run_ddp`` (trainer by name, resume, train, validate),
    with the process group's backend and the device from :func:`ddp_backend` (``run_ddp`` hard-codes
    NCCL and CUDA). The trainer finds the fold's settings in its fold folder."""
    import torch
    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    dist.init_process_group(ddp_backend(device_type), rank=rank, world_size=world_size)
    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:  # the cores shared between the processes
            torch.set_num_threads(cpu_share(world_size))
            device = torch.device("cpu")
        trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans_identifier,
                                        continue_training, device=device)
        maybe_load_checkpoint(trainer, continue_training, False)
        with nnunet_worker_pools(num_processes):
            trainer.run_training()
            trainer.perform_actual_validation(False)
    finally:
        dist.destroy_process_group()


def _resume_from(checkpoint: Path, *, trust: bool) -> None:
    """Make nnU-Net's launcher, which prefers checkpoint_final.pth, resume from ``checkpoint``.

    An extended run that was interrupted has a checkpoint_latest.pth newer than the first run's
    final one; that older final is kept under another name.
    """
    final = checkpoint.parent / layout.CHECKPOINT_FINAL
    if checkpoint != final and final.is_file():
        os.replace(final, final.with_name(f"checkpoint_final_epoch{_checkpoint_epoch(final, trust=trust)}.pth"))
