"""Where a project keeps what: folder and file names, and the records one stage leaves for the next.

The one place for the names every stage shares: nnU-Net's three folders in ``project_dir``, the
trainer class of each task and the results folder nnU-Net names after it
(``TRAINER__PLANS__CONFIGURATION/fold_N``), the checkpoint files, ``metrics.csv``, the logs; and the
readers of the records stages leave for later ones: preprocess's state (which plans the model was
trained with) and the prepared dataset's ``dataset.json`` and ``splits_final.json``. No stage is
imported here: the stages import this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pancreas_cli.exceptions import DataError, PredictError, PrepareError, PreprocessError
from pancreas_cli.subtypes import CASE_SUBTYPES_NAME

if TYPE_CHECKING:
    from pancreas_cli.config import Config

#: nnU-Net's folders in ``project_dir`` (its environment variables nnUNet_raw, ... point to them).
RAW_DIR, PREPROCESSED_DIR, RESULTS_DIR = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"
LOGS_DIR = "logs"  # in project_dir: nnU-Net's output during each stage

#: The nnU-Net trainer class of each ``train.task`` (pancseg's, in :mod:`pancreas_cli.multitask.trainer`).
TRAINERS = {"multitask": "nnUNetTrainerMultiTask", "segmentation": "nnUNetTrainerPancseg"}

#: nnU-Net's checkpoints in a fold folder: the end of training, the periodic one, the best by the criterion.
CHECKPOINT_FINAL = "checkpoint_final.pth"
CHECKPOINT_LATEST = "checkpoint_latest.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
CHECKPOINTS = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST)

VALIDATION_DIR = "validation"  # in a fold folder: nnU-Net's validation of the final checkpoint
CROSSVAL_DIR = "crossval"  # in the results folder: the pooled evaluation of every validated fold
GT_DIR = "gt_segmentations"  # in the preprocessed dataset: nnU-Net's copy of the ground truth
METRICS_NAME = "metrics.csv"  # in a fold folder: one row per epoch (format: pancreas_cli.multitask.history)
STATE_NAME = "pancseg_preprocess.json"  # in the preprocessed dataset: what preprocess did, for later stages
_STATE_KEYS = frozenset({"state", "plans_identifier", "configuration", "data_identifier"})


def checkpoint_name(which: str) -> str:
    """The file of checkpoint ``which`` (``best``, ``final``, ``latest``)."""
    return f"checkpoint_{which}.pth"


def log_file(project_dir: Path, name: str) -> Path:
    """Where a stage's nnU-Net output goes (``name``: e.g. ``preprocess.log``)."""
    return project_dir / LOGS_DIR / name


def read_state(out_dir: Path) -> dict[str, Any] | None:
    """What preprocess recorded it did in ``out_dir``; None if nothing, PreprocessError if unreadable."""
    path = out_dir / STATE_NAME
    if not path.is_file():
        return None
    problem = f"{path}: unreadable (edited or cut short?); run `pancseg preprocess --force` to preprocess again"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PreprocessError(problem) from exc
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise PreprocessError(problem)
    return state


def model_folder(config: Config, state: dict[str, Any] | None = None) -> Path:
    """The nnU-Net results folder of the configured task, plans and configuration; the plans come from
    preprocess's ``state`` (read from the preprocessed dataset when not given)."""
    if state is None:
        state = read_state(config.dataset_preprocessed_dir)
    if state is None:
        raise PredictError(f"{config.dataset_preprocessed_dir}: no finished preprocessing (never run, or "
                           "interrupted), so the model cannot be found; run `pancseg preprocess` (and `pancseg "
                           "train` if no model was trained yet)")
    name = f"{TRAINERS[config.train.task]}__{state['plans_identifier']}__{config.plan.configuration}"
    return config.results_dir / config.dataset.folder_name / name


def fold_folder(model_dir: Path, fold: int | str) -> Path:
    """Where nnU-Net trains ``fold`` of the model in ``model_dir``."""
    return model_dir / f"fold_{fold}"


def folds_with(model_dir: Path, checkpoint: str) -> list[int]:
    """The folds of ``model_dir`` that have the file ``checkpoint``, in order."""
    return sorted(int(p.name[5:]) for p in model_dir.glob("fold_*")
                  if p.name[5:].isdigit() and (p / checkpoint).is_file())


def read_prepared(dataset_dir: Path) -> dict[str, Any]:
    """``dataset.json``, after checking that it and ``splits_final.json`` are what prepare writes (a
    truncated file would otherwise surface as nnU-Net's JSONDecodeError)."""
    data = _dataset_json(dataset_dir)
    read_splits(dataset_dir)
    return data


def _dataset_json(dataset_dir: Path) -> dict[str, Any]:
    data = _read_json(dataset_dir / "dataset.json")
    required = {"channel_names", "labels", "numTraining", "file_ending"}
    if not isinstance(data, dict) or not required <= data.keys():
        raise PrepareError(_damaged(dataset_dir / "dataset.json", "not an nnU-Net dataset.json"))
    return data


def read_splits(dataset_dir: Path) -> list[dict[str, list[Any]]]:
    """``splits_final.json``, checked to be what prepare writes: a non-empty list of train/val folds."""
    splits = _read_json(dataset_dir / "splits_final.json")
    folds_ok = all(isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list)
                   for f in splits) if isinstance(splits, list) else False
    if not splits or not folds_ok:
        raise PrepareError(_damaged(dataset_dir / "splits_final.json", "not a list of train/val folds"))
    return splits


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PrepareError(_damaged(path, "missing")) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise PrepareError(_damaged(path, f"not valid JSON: {exc}")) from exc


def _damaged(path: Path, why: str) -> str:
    return (f"{path}: damaged ({why}); run `pancseg prepare` to write it again "
            "(or `pancseg prepare --force` to rebuild the dataset)")


@dataclass(frozen=True)
class FoldValidation:
    """What evaluating a trained fold reads: nnU-Net's validation masks of its final checkpoint, the
    ground truth nnU-Net validated against, the CT (for overlays), the true subtypes and the fold's
    validation cases from ``splits_final.json``."""

    fold: int
    pred_dir: Path
    gt_dir: Path
    images_dir: Path
    subtypes_csv: Path
    cases: list[str]


def fold_validation(config: Config, fold: int) -> FoldValidation:
    """The validation of ``fold`` of the configured model; DataError when it was never validated."""
    raw = config.dataset_raw_dir
    _dataset_json(raw)  # read_prepared's checks, with the splits read once
    splits = read_splits(raw)
    if not 0 <= fold < len(splits):
        raise DataError(f"{raw / 'splits_final.json'}: no fold {fold} (folds 0..{len(splits) - 1})")
    pred_dir = fold_folder(model_folder(config), fold) / VALIDATION_DIR
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: fold {fold} has no validation (not trained to the end yet); run "
                        f"`pancseg train --fold {fold}` (it validates when training ends)")
    return FoldValidation(fold, pred_dir, config.dataset_preprocessed_dir / GT_DIR, raw / "imagesTr",
                          raw / CASE_SUBTYPES_NAME, [str(c) for c in splits[fold]["val"]])


def validated_folds(model_dir: Path) -> list[int]:
    """The folds of ``model_dir`` whose training ended with nnU-Net's validation."""
    return [f for f in folds_with(model_dir, CHECKPOINT_FINAL) if (fold_folder(model_dir, f) / VALIDATION_DIR).is_dir()]
