"""``--statistics``: per case, the pancreas and its lesion measured on the predicted mask and the CT.

``statistics/<case>.json`` holds, for each case:

* ``pancreas_volume_ml`` (labels 1 and 2) and ``lesion_volume_ml`` (label 2): voxel count times voxel volume;
* ``lesion_components``: connected lesion regions (26-connectivity), and ``lesion_diameter_mm``: the
  largest 3D extent of the largest of them (its maximum Feret diameter: the longest distance between two
  of its voxel centres, in physical space, so a one-voxel lesion measures 0), null without a lesion;
* ``pancreas_hu_mean``/``_sd`` and ``lesion_hu_mean``/``_sd``: the CT values inside each (population
  standard deviation), null where the region is empty;
* ``subtype`` and ``p0``, ``p1``, ``p2``: the predicted lesion subtype and its probabilities (null for a
  segmentation-only model).

``statistics.csv`` (one row per case, these columns) is derived data: rebuilt from the JSONs of the
finished masks (:func:`rebuild_statistics_csv`), never edited row by row, like the subtype CSVs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pancreas_cli.imageio import write_text
from pancreas_cli.records import finished
from pancreas_cli.subtypes import subtype_of
from pancreas_cli.tables import render_table

if TYPE_CHECKING:
    import SimpleITK as sitk

STATISTICS_DIR = "statistics"  # in a prediction folder: one JSON per case
STATISTICS_NAME = "statistics.csv"
COLUMNS = ("case", "pancreas_volume_ml", "lesion_volume_ml", "lesion_components", "lesion_diameter_mm",
           "pancreas_hu_mean", "pancreas_hu_sd", "lesion_hu_mean", "lesion_hu_sd", "subtype", "p0", "p1", "p2")


def statistics_path(out_dir: Path, case: str) -> Path:
    return out_dir / STATISTICS_DIR / f"{case}.json"


def case_statistics(case: str, mask: sitk.Image, ct: sitk.Image,
                    probabilities: Sequence[float] | None) -> dict[str, Any]:
    """The statistics of one case (the keys of :data:`COLUMNS`); ``mask`` and ``ct`` share one grid."""
    import SimpleITK as sitk

    labels = sitk.GetArrayViewFromImage(mask)
    values = sitk.GetArrayViewFromImage(ct)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    pancreas, lesion = labels > 0, labels == 2
    components, diameter = _largest_lesion(mask)
    found: dict[str, Any] = {
        "case": case,
        "pancreas_volume_ml": round(int(pancreas.sum()) * voxel_ml, 4),
        "lesion_volume_ml": round(int(lesion.sum()) * voxel_ml, 4),
        "lesion_components": components, "lesion_diameter_mm": diameter,
    }
    for name, region in (("pancreas", pancreas), ("lesion", lesion)):
        inside = values[region].astype(np.float64)
        found[f"{name}_hu_mean"] = round(float(inside.mean()), 2) if inside.size else None
        found[f"{name}_hu_sd"] = round(float(inside.std()), 2) if inside.size else None
    found["subtype"] = None if probabilities is None else subtype_of(probabilities)
    for i in range(3):
        found[f"p{i}"] = None if probabilities is None else round(float(probabilities[i]), 6)
    return found


def _largest_lesion(mask: sitk.Image) -> tuple[int, float | None]:
    """The number of lesion components and the maximum Feret diameter (mm) of the largest one."""
    import SimpleITK as sitk

    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask == 2, True))  # 1: the largest
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.ComputeFeretDiameterOn()
    shapes.Execute(components == 1)
    count = int(sitk.GetArrayViewFromImage(components).max())
    return count, (round(float(shapes.GetFeretDiameter(1)), 2) if count else None)


def write_statistics(out_dir: Path, stats: dict[str, Any]) -> Path:
    target = statistics_path(out_dir, stats["case"])
    write_text(json.dumps(stats, indent=1) + "\n", target)
    return target


def read_statistics(out_dir: Path, case: str) -> dict[str, Any] | None:
    """The case's statistics, or None if there are none or they cannot be read (they are written again)."""
    try:
        found = json.loads(statistics_path(out_dir, case).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) and set(COLUMNS) <= found.keys() else None


def finished_statistics(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The statistics of the finished masks (a mask and a record that is not pending), by case, in order."""
    found = {path.stem: read_statistics(out_dir, path.stem) for path in sorted((out_dir / STATISTICS_DIR).glob("*.json"))}
    return {case: stats for case, stats in found.items() if stats and finished(out_dir, case)}


def rebuild_statistics_csv(out_dir: Path, statistics: dict[str, dict[str, Any]] | None = None) -> Path | None:
    """``statistics.csv`` from the finished masks' ``statistics`` (:func:`finished_statistics`, read when not
    given); None when there are none (and no CSV: an old one would name masks that are gone)."""
    statistics = finished_statistics(out_dir) if statistics is None else statistics
    rows = [["" if found[c] is None else found[c] for c in COLUMNS] for found in statistics.values()]
    target = out_dir / STATISTICS_NAME
    if not rows:
        target.unlink(missing_ok=True)
        return None
    write_text(render_table(COLUMNS, rows), target)
    return target
