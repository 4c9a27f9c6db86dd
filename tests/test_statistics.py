"""``--statistics``: volumes, the lesion's diameter and HU on known volumes; statistics.csv from the JSONs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pancreas_cli.outputs.statistics import (COLUMNS, STATISTICS_NAME, case_statistics, rebuild_statistics_csv,
                                             write_statistics)
from pancreas_cli.records import write_record
from pancreas_cli.tables import read_table

SPACING = (0.5, 0.8, 2.0)  # x, y, z: a voxel is 0.8 mm^3


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))  # oblique to the array axes: distances are physical
    return image


def _case(lesion: bool = True) -> tuple[sitk.Image, sitk.Image, np.ndarray, np.ndarray]:
    labels = np.zeros((20, 30, 40), np.uint8)  # z, y, x
    labels[2:12, 5:25, 5:35] = 1
    ct = np.full(labels.shape, -1000, np.int16)
    ct[labels == 1] = 40
    if lesion:
        labels[4:9, 10:14, 10:13] = 2  # the largest component: 5 x 4 x 3 voxels (z, y, x)
        labels[10, 20, 30] = 2  # a second, one voxel
        ct[4:9, 10:14, 10:13] = np.where(np.indices((5, 4, 3)).sum(axis=0) % 2 == 0, 10, 30)
        ct[10, 20, 30] = 20
    return _image(labels), _image(ct), labels, ct


def test_volumes_diameter_and_hu_of_a_known_case() -> None:
    mask, ct, labels, values = _case()
    found = case_statistics("c1", mask, ct, [0.1, 0.7, 0.2])
    assert list(found) == list(COLUMNS)
    voxel_ml = 0.5 * 0.8 * 2.0 / 1000
    assert math.isclose(found["pancreas_volume_ml"], (labels > 0).sum() * voxel_ml, rel_tol=1e-4)
    assert math.isclose(found["lesion_volume_ml"], 61 * voxel_ml, rel_tol=1e-4)
    assert found["lesion_components"] == 2
    # between the farthest voxel centres of the largest lesion: 4 steps in z, 3 in y, 2 in x
    assert math.isclose(found["lesion_diameter_mm"], math.hypot(4 * 2.0, 3 * 0.8, 2 * 0.5), abs_tol=0.01)
    inside = values[labels == 2].astype(float)
    assert math.isclose(found["lesion_hu_mean"], inside.mean(), abs_tol=0.01)
    assert math.isclose(found["lesion_hu_sd"], inside.std(), abs_tol=0.01) and found["lesion_hu_sd"] > 9
    pancreas = values[labels > 0].astype(float)
    assert math.isclose(found["pancreas_hu_mean"], pancreas.mean(), abs_tol=0.01)
    assert (found["subtype"], found["p1"]) == (1, 0.7)


def test_no_lesion_and_no_subtype_are_empty_not_zero() -> None:
    mask, ct, _, _ = _case(lesion=False)
    found = case_statistics("c2", mask, ct, None)
    assert found["lesion_volume_ml"] == 0 and found["lesion_components"] == 0
    assert found["lesion_diameter_mm"] is found["lesion_hu_mean"] is found["lesion_hu_sd"] is None
    assert found["pancreas_hu_mean"] == 40 and found["pancreas_hu_sd"] == 0
    assert found["subtype"] is found["p0"] is None


def test_the_csv_holds_the_finished_masks_only(tmp_path: Path) -> None:
    """Rebuilt from the JSONs of masks that exist with a finished record: a mask being replaced, or gone,
    has no row; without any, there is no CSV (an old one would describe masks that are not there)."""
    mask, ct, _, _ = _case()
    for case, pending in (("a", False), ("b", True), ("c", False)):
        write_statistics(tmp_path, case_statistics(case, mask, ct, [0.2, 0.3, 0.5]))
        write_record(tmp_path, case, {"case": case, "pending": pending})
        if case != "c":
            (tmp_path / f"{case}.nii.gz").write_bytes(b"mask")
    csv = rebuild_statistics_csv(tmp_path)
    assert csv == tmp_path / STATISTICS_NAME
    table = read_table(csv)
    assert table.header == list(COLUMNS) and [row["case"] for _, row in table.records()] == ["a"]
    (tmp_path / "a.nii.gz").unlink()
    assert rebuild_statistics_csv(tmp_path) is None and not csv.exists()
