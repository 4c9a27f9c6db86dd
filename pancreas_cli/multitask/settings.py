"""Run settings that pancseg hands to its nnU-Net trainers through a JSON file.

nnU-Net builds trainers itself (``nnUNetv2_train``, DDP workers, the predictor), always with the same
four arguments, so the settings travel as ``pancseg_training.json`` beside the preprocessed data.
No torch import here: the CLI writes this file before anything heavy is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pancreas_cli.imageio import write_text

SETTINGS_NAME = "pancseg_training.json"
SelectBy = Literal["combined", "segmentation", "classification"]


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    initial_lr: float = 1e-2
    batch_size: int | None = None  # None: the plans' batch size
    save_every: int = 5
    cls_weight: float = 0.05  # lambda of the classification loss (see BENCHMARKS.md for why small)
    head_lr: float = 1e-3  # AdamW learning rate of the classification head (poly decay as nnU-Net's)
    cls_warmup_epochs: int = 10  # lambda grows linearly over these epochs (segmentation first)
    class_weights: list[float] | Literal["inverse_frequency", "none"] = "inverse_frequency"
    label_smoothing: float = 0.0
    select_by: SelectBy = "combined"
    head: dict[str, Any] = field(default_factory=dict)  # HeadSettings fields
    ema_alpha: float = 0.9  # smoothing of the checkpoint-selection criterion, as nnU-Net's EMA Dice

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_path(preprocessed_dataset_dir: Path) -> Path:
    return preprocessed_dataset_dir / SETTINGS_NAME


def write_settings(settings: TrainingSettings, preprocessed_dataset_dir: Path) -> Path:
    path = settings_path(preprocessed_dataset_dir)
    write_text(json.dumps(settings.to_dict(), indent=2), path)
    return path


def read_settings(preprocessed_dataset_dir: Path) -> TrainingSettings:
    """The settings pancseg wrote, or the defaults when nnU-Net is used directly without them."""
    path = settings_path(preprocessed_dataset_dir)
    if not path.is_file():
        return TrainingSettings()
    return TrainingSettings.from_dict(json.loads(path.read_text(encoding="utf-8")))
