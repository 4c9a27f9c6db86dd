"""``--preview``: a PNG per case to check a prediction at a glance, and a page that shows them all.

``preview/<case>.png`` (1200 x 450 pixels): axial, coronal and sagittal CT slices in the abdominal window
through the centre of the largest lesion (else of the pancreas, else of the scan), the pancreas (label 1)
filled yellow and the lesion (label 2) red, with a legend. The scan is shown in radiological convention
(reoriented to LPS: patient's right on the left, anterior and superior up) at its physical aspect ratio.
``preview/index.html`` shows every case's preview with its statistics, when those were asked for too.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pancreas_cli.figures import default_style, fill_labels, save_figure, show_ct
from pancreas_cli.imageio import write_text
from pancreas_cli.outputs.statistics import finished_statistics
from pancreas_cli.records import finished

if TYPE_CHECKING:
    import SimpleITK as sitk

PREVIEW_DIR = "preview"  # in a prediction folder: <case>.png and index.html
PREVIEW_SIZE = (1200, 450)  # pixels, width x height
COLORS = {1: "gold", 2: "red"}  # pancreas, lesion
_DPI = 100


@dataclass
class Preview:
    path: Path
    centre: tuple[int, int, int]  # the voxel the slices go through (z, y, x) in the LPS-oriented scan
    panels: list[tuple[float, float, float, float]]  # each view's area in the PNG (left, top, right, bottom)


def preview_path(out_dir: Path, case: str) -> Path:
    return out_dir / PREVIEW_DIR / f"{case}.png"


def centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The voxel of the largest lesion component nearest its centroid; else the same for the whole
    pancreas (labels 1 and 2); else the centre of the scan. (z, y, x)."""
    from scipy import ndimage

    for region in (labels == 2, labels > 0):
        components, count = ndimage.label(region, structure=np.ones((3, 3, 3)))
        if count:
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            voxels = np.argwhere(components == largest)
            nearest = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
            return tuple(int(v) for v in nearest)  # type: ignore[return-value]
    return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]


def render_preview(case: str, ct: sitk.Image, mask: sitk.Image, target: Path) -> Preview:
    """Write the preview of ``case`` (``mask`` on ``ct``'s grid) to ``target``."""
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from matplotlib.patches import Patch

    ct, mask = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(mask, "LPS")
    values, labels = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(mask)
    sx, sy, sz = ct.GetSpacing()
    z, y, x = centre(labels)
    views = [("axial", values[z], labels[z], sy / sx, z),  # rows: anterior -> posterior
             ("coronal", values[::-1, y], labels[::-1, y], sz / sx, y),  # rows: superior -> inferior
             ("sagittal", values[::-1, :, x], labels[::-1, :, x], sz / sy, x)]
    with default_style():
        fig, axes = plt.subplots(1, 3, figsize=(PREVIEW_SIZE[0] / _DPI, PREVIEW_SIZE[1] / _DPI))
        for ax, (name, ct_slice, label_slice, aspect, index) in zip(axes, views):
            show_ct(ax, ct_slice.astype(np.float32), aspect)
            fill_labels(ax, label_slice, COLORS, aspect=aspect)
            ax.set_title(f"{name} {index}", fontsize=10)
        fig.legend(handles=[Patch(color=COLORS[1], label="pancreas"), Patch(color=COLORS[2], label="lesion")],
                   loc="lower center", ncol=2, frameon=False)
        fig.suptitle(case, fontsize=12)
        fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.1, wspace=0.04)
        fig.canvas.draw()
        panels = [_panel(ax, fig) for ax in axes]
        save_figure(fig, target, dpi=_DPI, bbox_inches=None)
    return Preview(target, (z, y, x), panels)


def _panel(ax: Any, fig: Any) -> tuple[float, float, float, float]:
    """The area an axes' image fills, in PNG pixels from the top left."""
    box = ax.get_window_extent()
    height = fig.bbox.height
    return box.x0, height - box.y1, box.x1, height - box.y0


def rebuild_index(out_dir: Path, statistics: dict[str, dict[str, Any]] | None = None) -> Path | None:
    """``preview/index.html``: the previews of the finished masks, each with its ``statistics`` if any (the
    finished masks', by case: read when not given); None (and no page) when there are none."""
    statistics = finished_statistics(out_dir) if statistics is None else statistics
    shown = [p.stem for p in sorted((out_dir / PREVIEW_DIR).glob("*.png")) if finished(out_dir, p.stem)]
    target = out_dir / PREVIEW_DIR / "index.html"
    if not shown:
        target.unlink(missing_ok=True)
        return None
    parts = ["<!doctype html><meta charset='utf-8'><title>pancseg previews</title>",
             "<style>body{font-family:sans-serif} img{max-width:100%} td{padding:0 .6em}</style>",
             f"<h1>pancseg previews ({len(shown)} cases)</h1>"]
    for case in shown:
        parts.append(f"<h2 id='{html.escape(case)}'>{html.escape(case)}</h2>")
        stats = statistics.get(case)
        if stats:
            cells = "".join(f"<td>{html.escape(k)}: {html.escape(str(v))}</td>" for k, v in stats.items() if k != "case")
            parts.append(f"<table><tr>{cells}</tr></table>")
        parts.append(f"<img src='{html.escape(case)}.png' alt='{html.escape(case)}'>")
    write_text("\n".join(parts) + "\n", target)
    return target
