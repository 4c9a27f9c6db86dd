"""Matplotlib figures shared by the report and predict's previews: the CT window, CT slices with label
overlays, and writing a PNG atomically.

Figures are drawn with matplotlib's defaults (:func:`default_style`): nnU-Net's progress plot sets
seaborn's font scale process-wide, which pancseg's figures must not inherit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_cli.imageio import atomic_target, publish

CT_WINDOW = (-150.0, 250.0)  # abdominal soft-tissue window (HU): width 400, level 50


@contextlib.contextmanager
def default_style() -> Iterator[None]:
    """The Agg backend (no display needed) and matplotlib's default style, whatever was set before."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        yield


def save_figure(fig: Any, path: Path, **options: Any) -> Path:
    """Write ``fig`` as a PNG atomically and close it (``options``: savefig's, e.g. a fixed size)."""
    import matplotlib.pyplot as plt

    options = {"dpi": 110, "bbox_inches": "tight", **options}
    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, format="png", **options)
            publish(tmp, path)
    finally:
        plt.close(fig)
    return path


def show_ct(ax: Any, ct: np.ndarray, aspect: float = 1.0) -> None:
    """A CT slice in the abdominal window, rows top to bottom as given; ``aspect``: row over column spacing."""
    ax.imshow(np.clip(ct, *CT_WINDOW), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect,
              interpolation="nearest")
    ax.axis("off")


def contour_labels(ax: Any, mask: np.ndarray, color: str) -> None:
    """Contours of a label slice: the whole pancreas (labels 1 and 2) solid, the lesion (2) dashed."""
    for structure, style in (((mask > 0), "solid"), ((mask == 2), "dashed")):
        if structure.any():
            ax.contour(structure.astype(float), levels=[0.5], colors=color, linestyles=style, linewidths=1.2)


def fill_labels(ax: Any, mask: np.ndarray, colors: dict[int, str], alpha: float = 0.45,
                aspect: float = 1.0) -> None:
    """Each label of ``colors`` filled in its colour over what ``ax`` shows (other voxels transparent)."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*mask.shape, 4))
    for label, color in colors.items():
        rgba[mask == label] = to_rgba(color, alpha)
    ax.imshow(rgba, aspect=aspect, interpolation="nearest")
