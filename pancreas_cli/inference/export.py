"""A case's logits back to a mask on the input grid, where the logits are (a GPU or the CPU).

The same steps as nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``
(resample to the cropped input shape, labels by argmax or by regions, uncrop, transpose back), with
the resampling as :mod:`~pancreas_cli.inference.resample`'s matrix products and the argmax on the
device: only the uint8 mask crosses to the CPU, not the float logits (unless the probabilities are
asked for: :func:`segmentation_and_probabilities`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def segmentation_from_logits(logits: torch.Tensor, properties: dict[str, Any], plans_manager: Any,
                             configuration_manager: Any, label_manager: Any) -> np.ndarray:
    """The mask (input orientation, uint8 or uint16) of (C, *S) ``logits`` from the network's grid.

    ``configuration_manager`` is a :class:`~pancreas_cli.inference.resample.DeviceResampling`.
    """
    resampled = _resampled(logits, properties, plans_manager, configuration_manager)
    return _segmentation(resampled, properties, plans_manager, label_manager)


def segmentation_and_probabilities(logits: torch.Tensor, properties: dict[str, Any], plans_manager: Any,
                                   configuration_manager: Any, label_manager: Any) -> tuple[np.ndarray, np.ndarray]:
    """The mask (as :func:`segmentation_from_logits`) and the (C, z, y, x) float32 class probabilities on
    the same grid: nnU-Net's inference nonlinearity of the same resampled logits, 1 for background
    outside the cropped region (as nnU-Net's ``revert_cropping_on_probabilities``)."""
    resampled = _resampled(logits, properties, plans_manager, configuration_manager)
    segmentation = _segmentation(resampled, properties, plans_manager, label_manager)
    probabilities = torch.as_tensor(label_manager.apply_inference_nonlin(resampled)).float()
    full = torch.zeros((probabilities.shape[0], *properties["shape_before_cropping"]), dtype=torch.float32,
                       device=probabilities.device)
    if not label_manager.has_regions:
        full[0] = 1
    crop = tuple(slice(*bounds) for bounds in properties["bbox_used_for_cropping"])
    full[(slice(None), *crop)] = probabilities
    axes = [0, *(i + 1 for i in plans_manager.transpose_backward)]
    return segmentation, full.cpu().numpy().transpose(axes)


def _resampled(logits: torch.Tensor, properties: dict[str, Any], plans_manager: Any,
               configuration_manager: Any) -> torch.Tensor:
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    current = (configuration_manager.spacing if len(configuration_manager.spacing) == len(cropped_shape)
               else [spacing[0], *configuration_manager.spacing])
    resampled = configuration_manager.resampling_fn_probabilities(logits, cropped_shape, current, spacing)
    return torch.as_tensor(resampled)


def _segmentation(resampled: torch.Tensor, properties: dict[str, Any], plans_manager: Any,
                  label_manager: Any) -> np.ndarray:
    if label_manager.has_regions:
        segmentation = label_manager.convert_logits_to_segmentation(resampled)
    else:  # nnU-Net's argmax goes through NumPy, which a GPU tensor cannot; the first maximum wins in both
        segmentation = resampled.argmax(0)
    dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
    full = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    crop = tuple(slice(*bounds) for bounds in properties["bbox_used_for_cropping"])
    full[crop] = torch.as_tensor(segmentation).cpu().numpy()
    return full.transpose(plans_manager.transpose_backward)


def write_segmentation(segmentation: np.ndarray, properties: dict[str, Any], plans_manager: Any,
                       dataset_json: dict[str, Any], truncated: Path) -> Path:
    """Writes as nnU-Net's export does (its image writer, the input's geometry); returns the file."""
    target = Path(f"{truncated}{dataset_json['file_ending']}")
    plans_manager.image_reader_writer_class().write_seg(segmentation, str(target), properties)
    return target
