"""The settings a fold is trained with: one model (defaults, bounds), handed to its trainer, recorded per fold.

``config.TrainConfig`` extends :class:`TrainingSettings` with the keys that only say how a run goes
(device, GPUs, workers, W&B); the classification head takes its defaults from it. pancseg's train
stage hands each trainer its settings through :func:`handing` while it builds it: a file shared by
the folds let one ``pancseg train`` change what another, running, built for its next fold.

nnU-Net builds trainers itself in ``nnUNetv2_train`` and in its DDP processes, always with the same
four arguments (which it records in checkpoints, so the settings cannot be a fifth): there the
trainer reads its fold's record, ``fold_N/pancseg_training.json``, which pancseg writes before a fold
trains (also for ``--resume``'s check). No torch import here: the CLI loads this module early.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pancreas_cli.imageio import write_text

SETTINGS_NAME = "pancseg_training.json"
_HEAD = ("stages", "pooling", "hidden", "dropout", "pancreas")  # the head_* settings, HeadSettings' names
Pooling = Literal["attention", "mean"]


class TrainingSettings(BaseModel):
    """What shapes a fold's training, by config key (``train.<name>``): the trainer's only settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    epochs: int = Field(1000, gt=0)
    iterations_per_epoch: int = Field(250, gt=0)
    val_iterations: int = Field(50, gt=0)
    initial_lr: float = Field(1e-2, gt=0)
    batch_size: int | None = Field(None, gt=0)  # None: the plans' batch size
    save_every: int = Field(5, gt=0)
    cls_weight: float = Field(0.05, ge=0)  # lambda of the subtype loss (see BENCHMARKS.md for why small)
    head_lr: float = Field(1e-3, gt=0)  # AdamW learning rate of the head (poly decay as nnU-Net's)
    cls_warmup_epochs: int = Field(10, ge=0)  # lambda grows linearly over these epochs (segmentation first)
    class_weights: Literal["inverse_frequency", "none"] | list[float] = "inverse_frequency"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    select_by: Literal["combined", "segmentation", "classification"] = "combined"
    head_stages: list[int] = Field(default_factory=lambda: [1, 2, -1], min_length=1)
    head_pooling: Pooling = "attention"
    head_hidden: int = Field(128, gt=0)
    head_dropout: float = Field(0.3, ge=0, lt=1)
    head_pancreas: bool = True  # pancreas-level features + lesion gate (with attention pooling; README)
    refit_subtype: bool = True  # refit the head's linear shortcut on the training cases after training (refit.py)

    #: What a resumed run may change: more epochs extend it; the checkpoint interval and the number of
    #: validation batches do not change what is learned. The rest must stay as the run began.
    RESUMABLE: ClassVar[tuple[str, ...]] = ("epochs", "val_iterations", "save_every")

    @field_validator("class_weights")
    @classmethod
    def _three_weights(cls, value: Any) -> Any:
        # A zero weight makes the loss 0/0 (NaN) on every batch whose cases all have that subtype.
        if isinstance(value, list) and (len(value) != 3 or any(w <= 0 for w in value)):
            raise ValueError("must be inverse_frequency, none, or three positive numbers (subtypes 0, 1, 2)")
        return value

    def settings(self) -> TrainingSettings:
        """These settings alone, as a trainer gets them (a ``TrainConfig`` also holds run-only keys);
        a copy, so that a later change to the config does not reach a trainer built with it."""
        return TrainingSettings.model_validate({name: getattr(self, name) for name in _NAMES})

    def learning(self) -> dict[str, Any]:
        """The settings a resumed run must keep, by name."""
        return {name: getattr(self, name) for name in _NAMES if name not in self.RESUMABLE}

    def head(self) -> dict[str, Any]:
        """The ``head_*`` settings as ``HeadSettings`` fields."""
        return {key: getattr(self, f"head_{key}") for key in _HEAD}

    def to_record(self) -> dict[str, Any]:
        """The fold record's JSON (its format since the first pancseg: the head as one mapping)."""
        data = self.settings().model_dump(mode="json", exclude={f"head_{key}" for key in _HEAD})
        return {**data, "head": self.head()}

    @classmethod
    def from_record(cls, data: Any) -> TrainingSettings:
        """Settings from a fold record; ValueError (pydantic's, naming the key) for a value or key that is
        not one. ``ema_alpha``, a constant of the trainer that older records carry, is dropped; a head
        without ``pancreas`` is an older pancseg's, which had no pancreas-level features."""
        if not isinstance(data, dict) or not isinstance(data.get("head", {}), dict):
            raise ValueError("not a mapping of training settings with a 'head' mapping")
        fields = {key: value for key, value in data.items() if key not in ("head", "ema_alpha")}
        head = {f"head_{key}": value for key, value in {"pancreas": False, **data.get("head", {})}.items()}
        return cls.model_validate({**fields, **head})


_NAMES = tuple(TrainingSettings.model_fields)  # not a TrainConfig's run-only keys
_handed: ContextVar[TrainingSettings | None] = ContextVar("pancseg_training_settings", default=None)


@contextmanager
def handing(settings: TrainingSettings) -> Iterator[None]:
    """Hand ``settings`` to the trainers built in this block, in this thread only (a context variable:
    another thread, or a block around another fold's trainer, has its own)."""
    token = _handed.set(settings.settings())
    try:
        yield
    finally:
        _handed.reset(token)


def handed() -> TrainingSettings | None:
    """The settings handed to the trainer being built (None: built by nnU-Net, outside :func:`handing`)."""
    return _handed.get()


def settings_path(fold_folder: Path) -> Path:
    return fold_folder / SETTINGS_NAME


def write_settings(settings: TrainingSettings, fold_folder: Path) -> Path:
    """Record what the fold in ``fold_folder`` is trained with."""
    path = settings_path(fold_folder)
    write_text(json.dumps(settings.to_record(), indent=2), path)
    return path


def read_settings(fold_folder: Path) -> TrainingSettings:
    """The fold's recorded settings, or the defaults for a fold pancseg never trained (``nnUNetv2_train``
    used directly); ValueError, OSError or UnicodeDecodeError for a record that cannot be read."""
    path = settings_path(fold_folder)
    if not path.is_file():
        return TrainingSettings()
    return TrainingSettings.from_record(json.loads(path.read_text(encoding="utf-8")))
