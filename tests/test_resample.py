"""pancreas_cli.inference.resample and .export against nnU-Net's own resampling and export.

These pin the seam into nnU-Net (and scikit-image, which it calls): if either changes how it
resamples, the matrices stop matching and these fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from pancreas_cli.inference.export import segmentation_from_logits
from pancreas_cli.inference.resample import DeviceResampling, resample_separable
from test_network import DATASET_JSON, make_plans

CPU = torch.device("cpu")
CASES = [  # shape (z, y, x), input spacing, target spacing
    ((20, 50, 60), (2.0, 0.68, 0.68), (2.0, 0.75, 0.75)),  # in-plane only, as on the quiz data
    ((20, 50, 60), (2.5, 0.82, 0.7), (2.0, 0.75, 0.75)),  # every axis
    ((12, 50, 60), (5.0, 0.8, 0.8), (2.5, 0.75, 0.75)),  # anisotropic: nnU-Net's separate z
    ((12, 50, 60), (0.8, 0.8, 3.5), (0.75, 0.75, 2.5)),  # separate z along the last axis
]

@pytest.mark.parametrize(("shape", "current", "target"), CASES)
@pytest.mark.parametrize("order", [3, 1])
def test_equals_nnunets_resampling(shape, current, target, order: int) -> None:
    rng = np.random.default_rng(order)
    dtype = np.float32 if order == 3 else np.float16  # images are float32, nnU-Net's logits float16
    data = (rng.normal(size=(2, *shape)) * 100).astype(dtype)
    new_shape = compute_new_shape(shape, current, target)
    expected = resample_data_or_seg_to_shape(data, new_shape, current, target, is_seg=False, order=order, order_z=0,
                                             force_separate_z=None)
    result = resample_separable(data, new_shape, current, target, order=order, device=CPU,
                                out_dtype=torch.from_numpy(data[:0]).dtype).numpy()
    assert result.dtype == expected.dtype and result.shape == expected.shape
    if order == 3:  # float32: equal to rounding (float64 matrix products in another order than scipy's)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-4)
    else:  # float16 logits: at most one unit in the last place, and the same argmax
        np.testing.assert_allclose(result.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)
        assert np.array_equal(result.argmax(0), expected.argmax(0))

def test_the_clip_of_scikit_image_is_kept() -> None:
    """Cubic splines overshoot at a step; scikit-image clips to the input's range, so must we."""
    data = np.zeros((1, 8, 16, 16), dtype=np.float32)
    data[0, :, :, 8:] = 1000
    new_shape = compute_new_shape(data.shape[1:], (2.0, 0.6, 0.6), (2.0, 0.75, 0.75))
    result = resample_separable(data, new_shape, (2.0, 0.6, 0.6), (2.0, 0.75, 0.75), order=3, device=CPU,
                                out_dtype=torch.float32)
    assert float(result.min()) == 0.0 and float(result.max()) == 1000.0

def test_unchanged_shape_is_returned_as_it_is() -> None:
    data = np.ones((1, 4, 5, 6), dtype=np.float32)
    result = resample_separable(data, (4, 5, 6), (1, 1, 1), (1, 1, 1), order=3, device=CPU, out_dtype=torch.float32)
    assert torch.equal(result, torch.from_numpy(data))

def test_other_resampling_functions_run_as_they_are() -> None:
    manager = PlansManager(make_plans()).get_configuration("3d_fullres")
    manager.configuration["resampling_fn_data_kwargs"] = {"is_seg": False, "order": 3, "order_z": 1,
                                                          "force_separate_z": None}
    wrapped = DeviceResampling(manager, CPU)
    data = np.random.default_rng(0).normal(size=(1, 6, 20, 20)).astype(np.float32)
    args = ((6, 24, 24), (5.0, 0.9, 0.9), (2.5, 0.75, 0.75))
    np.testing.assert_array_equal(wrapped.resampling_fn_data(torch.from_numpy(data), *args),
                                  manager.resampling_fn_data(data, *args))

def test_constant_nonzero_mask_is_not_resampled() -> None:
    manager = PlansManager(make_plans()).get_configuration("3d_fullres")
    seg = np.zeros((1, 6, 20, 20), dtype=np.int8)
    args = ((6, 24, 24), (2.0, 0.9, 0.9), (2.0, 0.75, 0.75))
    result = DeviceResampling(manager, CPU).resampling_fn_seg(seg, *args)
    expected = manager.resampling_fn_seg(seg, *args)
    assert result.dtype == expected.dtype and np.array_equal(result, expected)

@pytest.mark.parametrize("regions", [False, True])
def test_export_equals_nnunets(regions: bool) -> None:
    """Logits on the network's grid -> mask on the input grid, cropped region put back, as nnU-Net does."""
    dataset_json = dict(DATASET_JSON)
    if regions:
        dataset_json.update(labels={"background": 0, "pancreas": [1, 2], "lesion": 2}, regions_class_order=[1, 2])
    plans = PlansManager(make_plans())
    manager = plans.get_configuration("3d_fullres")
    labels = plans.get_label_manager(dataset_json)
    spacing = (0.7, 0.66, 2.0)  # x, y, z as SimpleITK gives it
    cropped = (18, 40, 44)
    properties = {"spacing": [2.0, 0.66, 0.7], "shape_before_cropping": (22, 48, 50),
                  "bbox_used_for_cropping": [[2, 20], [3, 43], [4, 48]],
                  "shape_after_cropping_and_before_resampling": cropped, "sitk_stuff": {"spacing": spacing}}
    shape = compute_new_shape(cropped, properties["spacing"], manager.spacing)
    rng = np.random.default_rng(1)
    logits = torch.from_numpy((rng.normal(size=(labels.num_segmentation_heads, *shape)) * 3).astype(np.float16))
    expected = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.numpy(), plans, manager, labels, properties)
    result = segmentation_from_logits(logits, properties, plans, DeviceResampling(manager, CPU), labels)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    # float16 rounding may flip a voxel whose two largest logits tie to the last place
    assert (result != expected).mean() < 1e-3


def test_a_read_scan_is_what_nnunets_reader_gives(tmp_path) -> None:
    """pancseg hands the scan it verified to nnU-Net's preprocessing instead of letting it read the file again."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from pancreas_cli.inference.reading import nnunet_input, reads_like_simpleitk

    array = np.random.default_rng(0).integers(-1024, 2000, size=(7, 9, 11)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((1.0, -2.0, 3.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "ct_0000.nii.gz"))
    expected, expected_properties = SimpleITKIO().read_images([str(tmp_path / "ct_0000.nii.gz")])
    data, properties = nnunet_input(sitk.ReadImage(str(tmp_path / "ct_0000.nii.gz")))
    assert data.dtype == expected.dtype and np.array_equal(data, expected)
    assert properties == expected_properties
    assert reads_like_simpleitk(PlansManager(make_plans()))
