"""Tests for pancreas_cli.metrics: known values from real data, hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pancreas_cli import metrics
from pancreas_cli.exceptions import DataError
from pancreas_cli.metrics import (
    bootstrap_ci,
    classification_metrics,
    dice,
    hd95,
    iou,
    load_mask_pair,
    nsd,
)

from conftest import REALDATA
TS = REALDATA / "totalsegmentator"
MSD = REALDATA / "msd_pancreas_masks"

# (prediction, reference, binarise, DSC, NSD border_voxel, NSD surface_area, HD95, HD95 decimals)
# from tests/data/realdata/README.md (MONAI 1.6, Metrics Reloaded, surface-distance 0.1)
KNOWN = {
    "totalsegmentator": (
        TS / "example_seg_fast.nii.gz",
        TS / "example_seg.nii.gz",
        lambda a: a == 7,
        0.8087,
        0.9666,
        0.9764,
        5.196,
        3,
    ),
    "msd_021": (
        MSD / "pred_Dice" / "pancreas_021.nii.gz",
        MSD / "gt" / "pancreas_021.nii.gz",
        lambda a: a > 0,
        0.8837,
        0.9925,
        0.9939,
        3.1585,
        4,
    ),
}


@pytest.mark.parametrize("case", sorted(KNOWN))
def test_known_values_on_real_data(case: str, realdata: Path) -> None:
    pred_path, ref_path, binarise, dsc, nsd_bv, nsd_sa, hd, hd_decimals = KNOWN[case]
    pred, ref, spacing = load_mask_pair(pred_path, ref_path)
    p, r = binarise(pred), binarise(ref)
    assert round(dice(p, r), 4) == dsc
    assert round(nsd(p, r, spacing, 5.0), 4) == nsd_bv
    assert round(nsd(p, r, spacing, 5.0, definition="surface_area"), 4) == nsd_sa
    assert round(hd95(p, r, spacing), hd_decimals) == hd


def test_load_mask_pair_returns_zyx(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    arr = np.zeros((4, 5, 6), dtype=np.uint8)
    arr[1, 2, 3] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.8, 2.5))
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "b.nii.gz"))
    pred, ref, spacing = load_mask_pair(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    assert pred.shape == ref.shape == (4, 5, 6)
    assert pred[1, 2, 3] == 1
    assert spacing == pytest.approx((2.5, 0.8, 0.5))


def _write(path: Path, size=(6, 5, 4), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    import SimpleITK as sitk

    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"size": (6, 5, 5)}, "size"),
        ({"spacing": (1.0, 1.0, 1.01)}, "spacing"),
        ({"origin": (0.0, 0.5, 0.0)}, "origin"),
    ],
)
def test_geometry_mismatch_names_both_files(tmp_path: Path, kwargs: dict, what: str) -> None:
    pytest.importorskip("SimpleITK")
    ref = _write(tmp_path / "ref_case.nii.gz")
    pred = _write(tmp_path / "pred_case.nii.gz", **kwargs)
    with pytest.raises(DataError, match=what) as info:
        load_mask_pair(pred, ref)
    assert "pred_case.nii.gz" in str(info.value) and "ref_case.nii.gz" in str(info.value)


def test_geometry_within_tolerance_is_accepted(tmp_path: Path) -> None:
    pytest.importorskip("SimpleITK")
    ref = _write(tmp_path / "ref.nii.gz", spacing=(1.0, 1.0, 2.5))
    pred = _write(tmp_path / "pred.nii.gz", spacing=(1.0, 1.0, 2.5001), origin=(1e-4, 0, 0))
    assert load_mask_pair(pred, ref)[2] == pytest.approx((2.5, 1.0, 1.0))


def test_missing_file_is_data_error(tmp_path: Path) -> None:
    pytest.importorskip("SimpleITK")
    ref = _write(tmp_path / "ref.nii.gz")
    with pytest.raises(DataError, match="nope.nii.gz"):
        load_mask_pair(tmp_path / "nope.nii.gz", ref)


# --------------------------------------------------------------------------- hand cases


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((10, 10, 10), dtype=bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True  # 64 voxels
    b[2:6, 2:6, 3:7] = True  # same cube shifted one voxel along x: 48 shared
    return a, b


def test_dice_iou_offset_cubes() -> None:
    a, b = _cubes()
    assert dice(a, b) == pytest.approx(2 * 48 / 128)
    assert iou(a, b) == pytest.approx(48 / 80)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0


def test_offset_cubes_surface_metrics() -> None:
    a, b = _cubes()
    # Every border voxel of either cube is 0 or 1 voxel from the other border.
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert nsd(a, b, (1.0, 1.0, 1.0), 1.0) == 1.0
    assert nsd(a, b, (1.0, 1.0, 1.0), 1.0, definition="surface_area") == 1.0
    assert 0.0 < nsd(a, b, (1.0, 1.0, 1.0), 0.5) < 1.0
    assert 0.0 < nsd(a, b, (1.0, 1.0, 1.0), 0.5, definition="surface_area") < 1.0


def test_empty_masks() -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    sp = (1.0, 1.0, 1.0)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0 and iou(empty, full) == 0.0
    for definition in ("border_voxel", "surface_area"):
        assert nsd(empty, empty, sp, 2.0, definition) == 1.0
        assert nsd(full, empty, sp, 2.0, definition) == 0.0
        assert nsd(empty, full, sp, 2.0, definition) == 0.0
    assert math.isnan(hd95(full, empty, sp)) and math.isnan(hd95(empty, full, sp))
    assert hd95(empty, empty, sp) == 0.0


def test_single_voxels_anisotropic_distance() -> None:
    a = np.zeros((12, 12, 12), dtype=bool)
    b = np.zeros_like(a)
    a[5, 5, 5] = True
    b[7, 5, 6] = True  # 2 voxels along z, 1 along x
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(5))
    assert hd95(a, b, (3.0, 1.0, 0.5)) == pytest.approx(math.sqrt(6.0**2 + 0.5**2))


def test_anisotropic_spacing_scales_hd95_and_nsd() -> None:
    # Two one-voxel-thick plates 2 slices apart: every border distance is 2 * z spacing.
    a = np.zeros((10, 20, 20), dtype=bool)
    b = np.zeros_like(a)
    a[3, 2:18, 2:18] = True
    b[5, 2:18, 2:18] = True
    assert hd95(a, b, (1.0, 0.8, 0.8)) == pytest.approx(2.0)
    assert hd95(a, b, (2.5, 0.8, 0.8)) == pytest.approx(5.0)
    assert nsd(a, b, (2.5, 0.8, 0.8), 5.0) == 1.0  # tolerance is inclusive
    assert nsd(a, b, (2.5, 0.8, 0.8), 4.9) == 0.0
    # spacing along x does not matter for a shift along z
    assert hd95(a, b, (2.5, 0.8, 3.0)) == pytest.approx(5.0)


def test_surface_area_table_known_entries() -> None:
    sp = (2.0, 3.0, 5.0)
    table = metrics._surfel_area_table(sp)
    # one corner inside (bit 0 = corner (1,1,1)): a triangle through three edge midpoints
    corner = np.linalg.norm(np.array([3 * 5, 2 * 5, 2 * 3]) / 8)
    assert table[1] == pytest.approx(corner)
    # four corners with a = 1 inside: a plane across axis 0 of area s1 * s2
    assert table[0b00001111] == pytest.approx(3 * 5)
    assert table[0] == 0.0 and table[255] == 0.0
    assert np.allclose(table, table[::-1])  # a code and its complement share the surface


def test_surface_area_nsd_flat_surface_is_spacing_independent() -> None:
    a = np.zeros((12, 12, 12), dtype=bool)
    a[2:10, 2:10, 2:10] = True
    assert nsd(a, a, (0.7, 1.0, 3.0), 0.0, definition="surface_area") == 1.0


def test_shape_mismatch_and_bad_arguments() -> None:
    a = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(DataError, match="shape"):
        dice(a, np.ones((3, 3, 4), dtype=bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="definition"):
        nsd(a, a, (1.0, 1.0, 1.0), 1.0, definition="nope")  # type: ignore[arg-type]


def test_large_volume_matches_its_cropped_copy() -> None:
    """Cropping to the masks' bounding box must not change any value (512x512 slices stay exact)."""
    a = np.zeros((100, 512, 512), dtype=bool)
    b = np.zeros_like(a)
    a[40:60, 200:260, 220:300] = True
    b[42:61, 203:262, 218:300] = True
    small_a, small_b = a[30:70, 190:270, 210:310], b[30:70, 190:270, 210:310]
    spacing = (2.5, 0.8, 0.8)
    assert nsd(a, b, spacing, 2.0) == pytest.approx(nsd(small_a, small_b, spacing, 2.0))
    assert nsd(a, b, spacing, 2.0, definition="surface_area") == pytest.approx(
        nsd(small_a, small_b, spacing, 2.0, definition="surface_area")
    )
    assert hd95(a, b, spacing) == pytest.approx(hd95(small_a, small_b, spacing))


# --------------------------------------------------------------------------- classification


def test_classification_metrics_hand_example() -> None:
    y_true = [0, 0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 0, 0, 0, 1]  # class 2 never predicted
    m = classification_metrics(y_true, y_pred, labels=(0, 1, 2))
    assert m.confusion_matrix == [[2, 1, 0], [1, 1, 0], [2, 1, 0]]
    assert m.accuracy == pytest.approx(3 / 8)
    # class 0: tp 2, predicted 5, true 3 -> P 2/5, R 2/3, F1 2*2/(5+3) = 1/2
    # class 1: tp 1, predicted 3, true 2 -> P 1/3, R 1/2, F1 2*1/(3+2) = 2/5
    # class 2: never predicted -> P 0, R 0, F1 0
    assert m.precision == pytest.approx({0: 2 / 5, 1: 1 / 3, 2: 0.0})
    assert m.recall == pytest.approx({0: 2 / 3, 1: 1 / 2, 2: 0.0})
    assert m.f1 == pytest.approx({0: 0.5, 1: 0.4, 2: 0.0})
    assert m.macro_f1 == pytest.approx((0.5 + 0.4 + 0.0) / 3)


def test_classification_absent_class_counts_as_zero_f1() -> None:
    m = classification_metrics([0, 1, 1, 0], [0, 1, 1, 0], labels=(0, 1, 2))
    assert m.accuracy == 1.0
    assert m.f1 == {0: 1.0, 1: 1.0, 2: 0.0}
    assert m.macro_f1 == pytest.approx(2 / 3)
    assert m.confusion_matrix == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]


def test_classification_unpredicted_case_is_wrong_without_a_false_positive() -> None:
    m = classification_metrics([0, 0, 1, 2], [0, None, 1, 2], labels=(0, 1, 2))
    assert m.accuracy == 0.75
    assert m.recall == {0: 0.5, 1: 1.0, 2: 1.0}
    assert m.precision == {0: 1.0, 1: 1.0, 2: 1.0}  # no class was predicted for the missing case
    assert m.f1[0] == pytest.approx(2 / 3)
    assert m.confusion_matrix == [[1, 0, 0], [0, 1, 0], [0, 0, 1]] and m.unpredicted == {0: 1, 1: 0, 2: 0}


def test_classification_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="labels"):
        classification_metrics([0, 3], [0, 1])
    with pytest.raises(ValueError, match=r"values \[5\]"):
        classification_metrics([0, 1], [0, 5])


def test_bootstrap_ci() -> None:
    values = [0.81, 0.88, 0.75, 0.92, 0.69, 0.85, 0.79, 0.9]
    lo, hi = bootstrap_ci(values, n=500, seed=3)
    assert lo < float(np.mean(values)) < hi
    assert (lo, hi) == bootstrap_ci(values, n=500, seed=3)
    assert (lo, hi) != bootstrap_ci(values, n=500, seed=4)
    med = bootstrap_ci(values, n=200, statistic=np.median, alpha=0.1)
    assert med[0] <= float(np.median(values)) <= med[1]
    assert bootstrap_ci([0.5], n=10) == (0.5, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.5, float("nan")])
