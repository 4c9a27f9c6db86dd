"""``--preview``: the PNG's size, the overlay where the mask is, the slices through the lesion, the page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pancreas_cli.outputs.preview import PREVIEW_SIZE, centre, preview_path, rebuild_index, render_preview
from pancreas_cli.outputs.statistics import case_statistics, write_statistics
from pancreas_cli.records import write_record


def _case(lesion: bool = True) -> tuple[sitk.Image, sitk.Image]:
    """A body (soft tissue in air) with a pancreas on the patient's left (array x high) and a lesion in it."""
    ct = np.full((30, 64, 64), -1000, np.int16)  # z, y, x
    ct[:, 8:56, 6:58] = 30
    labels = np.zeros(ct.shape, np.uint8)
    labels[10:20, 28:38, 34:54] = 1
    if lesion:
        labels[13:17, 30:35, 44:50] = 2
    images = []
    for array in (ct, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        images.append(image)
    return images[0], images[1]


def _read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(str(path))[..., :3] * 255).astype(int)


def _coloured(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """The pixels where the overlay of colour ``rgb`` (alpha 0.45 over grey) shows."""
    grey = pixels.mean(axis=-1, keepdims=True)
    tint = pixels - grey
    expected = np.array(rgb) - np.mean(rgb)
    return (np.abs(tint - 0.45 * expected) < 25).all(axis=-1) & (np.abs(tint).max(axis=-1) > 40)


def test_three_views_through_the_lesion_with_the_mask_overlaid(tmp_path: Path) -> None:
    ct, mask = _case()
    target = preview_path(tmp_path, "case1")
    drawn = render_preview("case1", ct, mask, target)
    print(f"preview written to {target}")  # look at it: pytest -s
    pixels = _read_png(target)
    assert pixels.shape[:2] == (PREVIEW_SIZE[1], PREVIEW_SIZE[0])
    assert drawn.centre == (14, 32, 46)  # LPS: the array as given (identity direction), lesion's centre
    red, gold = _coloured(pixels, (255, 0, 0)), _coloured(pixels, (255, 215, 0))
    assert red.sum() > 50 and gold.sum() > 50
    left, top, right, bottom = (int(round(v)) for v in drawn.panels[0])  # the axial view
    rows, cols = np.nonzero(red[top:bottom, left:right])
    # the lesion's centre in the axial slice: x 44..49 of 64 columns, y 30..34 of 64 rows
    assert abs(cols.mean() / (right - left) - 47 / 64) < 0.03 and abs(rows.mean() / (bottom - top) - 32.5 / 64) < 0.03
    for panel in drawn.panels:  # every view shows the lesion
        left, top, right, bottom = (int(round(v)) for v in panel)
        assert red[top:bottom, left:right].sum() > 5


def test_without_a_lesion_the_slices_go_through_the_pancreas(tmp_path: Path) -> None:
    ct, mask = _case(lesion=False)
    drawn = render_preview("case2", ct, mask, tmp_path / "p.png")
    assert drawn.centre == (14, 32, 43)  # the voxel nearest the centroid (14.5, 32.5, 43.5), first of the ties
    pixels = _read_png(drawn.path)
    assert not _coloured(pixels, (255, 0, 0)).any() and _coloured(pixels, (255, 215, 0)).sum() > 50
    assert centre(np.zeros((4, 6, 8), np.uint8)) == (2, 3, 4)


def test_the_page_shows_the_finished_cases_previews_and_statistics(tmp_path: Path) -> None:
    ct, mask = _case()
    for case in ("a", "b"):
        render_preview(case, ct, mask, preview_path(tmp_path, case))
        write_record(tmp_path, case, {"case": case})
    (tmp_path / "a.nii.gz").write_bytes(b"mask")  # b's mask is gone: not shown
    write_statistics(tmp_path, case_statistics("a", mask, ct, [0.1, 0.2, 0.7]))
    page = rebuild_index(tmp_path)
    assert page is not None
    text = page.read_text(encoding="utf-8")
    assert "<img src='a.png'" in text and "b.png" not in text and "lesion_volume_ml: " in text
    print(f"preview page: {page}")  # look at it: pytest -s
