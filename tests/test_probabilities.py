"""``--save-probabilities``' file (a 4D NIfTI on the mask's grid) and the export that computes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from pancreas_cli.exceptions import DataError
from pancreas_cli.inference.export import segmentation_and_probabilities, segmentation_from_logits
from pancreas_cli.inference.resample import DeviceResampling
from pancreas_cli.outputs.probabilities import read_probabilities, segmentation_of, write_probabilities
from test_network import DATASET_JSON, make_plans


def _mask(tmp_path: Path, shape: tuple[int, int, int]) -> Path:
    image = sitk.GetImageFromArray(np.zeros(shape, np.uint8))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_written_on_the_masks_grid_and_read_back(tmp_path: Path) -> None:
    mask = _mask(tmp_path, (4, 5, 6))
    probabilities = np.random.default_rng(0).dirichlet((1, 1, 1), size=(4, 5, 6)).transpose(3, 0, 1, 2)
    target = write_probabilities(probabilities, mask, tmp_path / "probabilities" / "case.nii.gz")
    assert np.allclose(read_probabilities(target), probabilities.astype(np.float32))
    image, reference = sitk.ReadImage(str(target)), sitk.ReadImage(str(mask))
    assert image.GetSize() == (*reference.GetSize(), 3) and image.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(image.GetSpacing()[:3], reference.GetSpacing())
    assert np.allclose(image.GetOrigin()[:3], reference.GetOrigin())
    assert np.allclose(np.reshape(image.GetDirection(), (4, 4))[:3, :3], np.reshape(reference.GetDirection(), (3, 3)))


def test_a_shape_other_than_the_masks_is_refused(tmp_path: Path) -> None:
    mask = _mask(tmp_path, (4, 5, 6))
    with pytest.raises(DataError, match=r"the probabilities' shape \(5, 5, 6\) is not the mask's \(4, 5, 6\)"):
        write_probabilities(np.zeros((3, 5, 5, 6)), mask, tmp_path / "p.nii.gz")
    assert not (tmp_path / "p.nii.gz").exists()


def test_device_export_gives_nnunets_probabilities_whose_argmax_is_the_mask() -> None:
    """The same resampled logits give the mask and the probabilities: their argmax is the mask, they sum to
    one, background is certain outside the cropped region, and they are nnU-Net's export's probabilities."""
    mask, probabilities, expected = _export(DATASET_JSON, channels=3)
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, *mask.shape)
    assert np.array_equal(probabilities.argmax(0), mask) and np.array_equal(segmentation_of(probabilities), mask)
    assert np.allclose(probabilities.sum(0), 1, atol=1e-5)
    assert (probabilities[0, :2] == 1).all() and (probabilities[1:, :2] == 0).all()  # outside the crop
    assert np.allclose(probabilities, expected, atol=1e-4)


def test_region_models_probabilities_give_the_mask_by_nnunets_region_rule() -> None:
    """A region-based model (the default) writes the whole pancreas' and the lesion's sigmoids: no
    background channel, 0 outside the crop, and the mask is nnU-Net's region order over them."""
    regions = {**DATASET_JSON, "labels": {"background": 0, "pancreas": [1, 2], "lesion": 2},
               "regions_class_order": [1, 2]}
    mask, probabilities, expected = _export(regions, channels=2)
    assert probabilities.shape == (2, *mask.shape) and set(np.unique(mask)) == {0, 1, 2}
    assert np.array_equal(segmentation_of(probabilities), mask)
    assert (probabilities[:, :2] == 0).all()  # outside the crop
    assert np.allclose(probabilities, expected, atol=1e-4)


def test_segmentation_of_refuses_other_channel_counts() -> None:
    with pytest.raises(DataError, match="4 probability channels"):
        segmentation_of(np.zeros((4, 2, 2, 2), np.float32))


def _export(dataset_json: dict, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pancseg's device export of random logits: (mask, probabilities, nnU-Net's export's probabilities)."""
    plans = PlansManager(make_plans())
    manager = plans.get_configuration("3d_fullres")
    labels = plans.get_label_manager(dataset_json)
    cropped = (18, 40, 44)
    properties = {"spacing": [2.0, 0.66, 0.7], "shape_before_cropping": (22, 48, 50),
                  "bbox_used_for_cropping": [[2, 20], [3, 43], [4, 48]],
                  "shape_after_cropping_and_before_resampling": cropped}
    shape = compute_new_shape(cropped, properties["spacing"], manager.spacing)
    logits = torch.from_numpy(np.random.default_rng(1).normal(size=(channels, *shape)).astype(np.float32) * 3)
    device = DeviceResampling(manager, torch.device("cpu"))
    mask, probabilities = segmentation_and_probabilities(logits, properties, plans, device, labels)
    assert np.array_equal(mask, segmentation_from_logits(logits, properties, plans, device, labels))
    _, expected = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.numpy(), plans, manager, labels, properties, return_probabilities=True)
    return mask, probabilities, expected
