"""predict's optional outputs beside the masks: probabilities, statistics, previews and DICOM SEG.

Each lives in its own folder of the prediction folder and module (:mod:`.probabilities`,
:mod:`.statistics`, :mod:`.preview`, :mod:`.dicomseg`). The probabilities come from the network's
logits, so only while a case is predicted; the others are derived from a finished mask (and its scan),
so they are added to a finished folder without running the network again. Whenever a mask is replaced,
its case's optional outputs are removed first: none ever describes another mask than the one there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pancreas_cli.outputs.dicomseg import DICOM_SEG_DIR, dicom_seg_path
from pancreas_cli.outputs.preview import PREVIEW_DIR, preview_path
from pancreas_cli.outputs.probabilities import PROBABILITIES_DIR, probabilities_path
from pancreas_cli.outputs.statistics import STATISTICS_DIR, statistics_path

if TYPE_CHECKING:
    import SimpleITK as sitk

OUTPUT_FORMATS = ("nifti", "dicom-seg")
FOLDERS = (PROBABILITIES_DIR, STATISTICS_DIR, PREVIEW_DIR, DICOM_SEG_DIR)  # never a case's mask or scan


@dataclass(frozen=True)
class Outputs:
    """The optional outputs asked for (``pancseg predict`` options)."""

    probabilities: bool = False  # --save-probabilities
    statistics: bool = False  # --statistics
    preview: bool = False  # --preview
    dicom_seg: bool = False  # --output-format dicom-seg (the NIfTI mask is written too)

    def missing(self, out_dir: Path, case: str) -> list[str]:
        """The outputs derived from the mask that ``case`` lacks (by name: statistics, preview, dicom-seg)."""
        paths = {"statistics": (self.statistics, statistics_path), "preview": (self.preview, preview_path),
                 "dicom-seg": (self.dicom_seg, dicom_seg_path)}
        return [name for name, (wanted, path) in paths.items() if wanted and not path(out_dir, case).is_file()]


def remove_outputs(out_dir: Path, case: str) -> None:
    """Remove every optional output of ``case`` (its mask is about to be replaced)."""
    for path in (probabilities_path, statistics_path, preview_path, dicom_seg_path):
        path(out_dir, case).unlink(missing_ok=True)


def write_derived(out_dir: Path, case: str, missing: Sequence[str], ct: sitk.Image, mask: sitk.Image,
                  probabilities: Sequence[float] | None, files: Sequence[str]) -> None:
    """Write the ``missing`` outputs of ``case`` from its scan ``ct``, its ``mask`` (on the scan's grid),
    its subtype ``probabilities`` and, for a DICOM SEG, its series' ``files`` (in slice order)."""
    import SimpleITK as sitk

    from pancreas_cli.metrics import check_same_grid
    from pancreas_cli.outputs.dicomseg import write_dicom_seg
    from pancreas_cli.outputs.preview import render_preview
    from pancreas_cli.outputs.statistics import case_statistics, write_statistics

    check_same_grid(ct, mask, f"scan and mask {out_dir / case}.nii.gz", "; predict the case again (--force)")
    if "statistics" in missing:
        write_statistics(out_dir, case_statistics(case, mask, ct, probabilities))
    if "preview" in missing:
        render_preview(case, ct, mask, preview_path(out_dir, case))
    if "dicom-seg" in missing:
        write_dicom_seg(sitk.GetArrayFromImage(mask), files, dicom_seg_path(out_dir, case))


def rebuild_summaries(out_dir: Path) -> dict[str, Path]:
    """``statistics.csv`` and ``preview/index.html`` from the cases' files (derived data, like the subtype
    CSVs: also when not asked for this time, so that they never list a replaced mask); those that exist."""
    from pancreas_cli.outputs.preview import rebuild_index
    from pancreas_cli.outputs.statistics import finished_statistics, rebuild_statistics_csv

    statistics = finished_statistics(out_dir)  # read once for both
    found = {"statistics": rebuild_statistics_csv(out_dir, statistics), "preview": rebuild_index(out_dir, statistics)}
    return {name: path for name, path in found.items() if path is not None}
