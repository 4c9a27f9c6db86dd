"""Segmentation and classification metrics (pure numpy/scipy).

The surface metrics reproduce the reference implementations:

* ``nsd(..., definition="border_voxel")`` and :func:`hd95` follow Metrics Reloaded and
  MONAI (``compute_surface_dice`` with ``use_subvoxels=False``,
  ``compute_hausdorff_distance(percentile=95)``): the border of a mask is the set of its
  voxels with a face neighbour outside it (``mask ^ binary_erosion(mask)``, 6-connectivity,
  outside the image counts as background); distances are exact Euclidean distances in mm
  between voxel centres.
* ``nsd(..., definition="surface_area")`` follows the DeepMind ``surface-distance`` package
  (``compute_surface_dice_at_tolerance``, used by FLARE): surface elements are marching-cubes
  triangles on the grid of voxel corners, weighted by their area in mm^2.

Masks are boolean arrays in numpy axis order and ``spacing`` is given in the same order
(``(z, y, x)`` for arrays from SimpleITK). All work happens in the bounding box of the union
of both masks, so full-size CT masks are fast.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pancreas_cli.config import CleanConfig, EvaluateConfig, kept_labels
from pancreas_cli.exceptions import DataError
from pancreas_cli.imageio import read_image
from pancreas_cli.subtypes import SUBTYPES

if TYPE_CHECKING:
    import SimpleITK as sitk

NsdDefinition = Literal["border_voxel", "surface_area"]

#: Relative tolerance when comparing the geometry of two images.
GEOMETRY_RTOL = 1e-3


# --------------------------------------------------------------------------- overlap


def _as_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise DataError(f"prediction and reference differ in shape: {p.shape} vs {r.shape}")
    return p, r


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (1.0 if both are empty)."""
    p, r = _as_pair(pred, ref)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two boolean masks (1.0 if both are empty)."""
    p, r = _as_pair(pred, ref)
    union = int(np.logical_or(p, r).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, r).sum()) / union


# --------------------------------------------------------------------------- surfaces


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {tuple(spacing)}")
    return s


def _crop(p: np.ndarray, r: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Both masks cut to the union's bounding box, ``margin`` zero voxels on every side."""
    union = p | r
    if not union.any():
        return None
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    pad = [(margin, margin)] * union.ndim
    return np.pad(p[tuple(box)], pad), np.pad(r[tuple(box)], pad)


def _nearest(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance of each point to the nearest target (exact Euclidean, same as an EDT)."""
    from scipy.spatial import cKDTree

    return cKDTree(targets).query(points, k=1)[0]


def _border_voxel_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed pred->ref and ref->pred border distances in mm; None if a mask is empty."""
    from scipy import ndimage

    p, r = _as_pair(pred, ref)
    s = _spacing(spacing, p.ndim)
    cropped = _crop(p, r, margin=1)
    if cropped is None or not p.any() or not r.any():
        return None
    pts = [np.argwhere(m ^ ndimage.binary_erosion(m)) * s for m in cropped]
    return _nearest(pts[0], pts[1]), _nearest(pts[1], pts[0])


_CORNERS = [((i >> 2) & 1, (i >> 1) & 1, i & 1) for i in range(8)]


def _cube_faces() -> list[list[int]]:
    """The six faces of the 2x2x2 neighbourhood, each as its four corner indices in ring order."""
    index = {c: i for i, c in enumerate(_CORNERS)}
    faces = []
    for axis, value in itertools.product(range(3), (0, 1)):
        ring = []
        for u, v in ((0, 0), (0, 1), (1, 1), (1, 0)):
            c = [u, v]
            c.insert(axis, value)
            ring.append(index[tuple(c)])
        faces.append(ring)
    return faces


def _triangulations(poly: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
    """Every triangulation of a convex polygon given by its vertex indices."""
    if len(poly) < 3:
        return [[]]
    return [
        [(poly[0], poly[k], poly[-1]), *left, *right]
        for k in range(1, len(poly) - 1)
        for left in _triangulations(poly[: k + 1])
        for right in _triangulations(poly[k:])
    ]


def _edge_links(inside: set[int], faces: list[list[int]]) -> dict[frozenset[int], list[frozenset[int]]]:
    """Which cut edges the surface joins on each face; a face with two diagonal inside corners has
    each corner cut off on its own."""
    links: dict[frozenset[int], list[frozenset[int]]] = {}
    for ring in faces:
        cut = [frozenset(e) for e in zip(ring, ring[1:] + ring[:1]) if (e[0] in inside) != (e[1] in inside)]
        pairs = [cut] if len(cut) == 2 else []
        if len(cut) == 4:
            pairs = [[e for e in cut if corner in e] for corner in ring if corner in inside]
        for a, b in pairs:
            links.setdefault(a, []).append(b)
            links.setdefault(b, []).append(a)
    return links


def _loops(links: dict[frozenset[int], list[frozenset[int]]]) -> list[list[frozenset[int]]]:
    """The closed polygons the links form, each as its cut edges in order."""
    loops: list[list[frozenset[int]]] = []
    seen: set[frozenset[int]] = set()
    for start in links:
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        while (nxt := next(e for e in links[cur] if e != prev)) != start:
            loop.append(nxt)
            prev, cur = cur, nxt
        seen.update(loop)
        loops.append(loop)
    return loops


def _max_area_vectors(loop: list[frozenset[int]]) -> list[np.ndarray]:
    """Area vectors of the polygon through the loop's edge midpoints, triangulated to maximum area."""
    pts = [np.mean([_CORNERS[i] for i in edge], axis=0) for edge in loop]
    return max(
        ([np.cross(pts[b] - pts[a], pts[c] - pts[a]) / 2 for a, b, c in tri]
         for tri in _triangulations(tuple(range(len(pts))))),
        key=lambda vecs: sum(np.linalg.norm(v) for v in vecs),
    )


@functools.lru_cache(maxsize=1)
def _surfel_area_vectors() -> np.ndarray:
    """Marching-cubes triangle area vectors for each 2x2x2 neighbourhood code, unit voxels.

    Returns an array (256, 4, 3): for each code, up to four triangles (zero-padded), each as
    its area vector (normal whose length is its area) in axis order. Corner ``(a, b, c)`` of
    the neighbourhood is bit ``7 - (4a + 2b + c)`` of the code. As in the DeepMind
    ``surface-distance`` table: vertices at edge midpoints; on a face with two diagonal inside
    corners the inside corners are cut off separately; a code with more than four inside
    corners gets the surface of its complement; each polygon is triangulated to maximum area
    (the triangulation that follows its creases).
    """
    faces = _cube_faces()
    table = np.zeros((256, 4, 3))
    for code in range(1, 255):
        inside = {i for i in range(8) if (code >> (7 - i)) & 1}
        if len(inside) > 4:
            inside = set(range(8)) - inside
        vectors = [v for loop in _loops(_edge_links(inside, faces)) for v in _max_area_vectors(loop)]
        table[code, : len(vectors)] = vectors
    return table


def _surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area in mm^2 of each of the 256 neighbourhood codes at ``spacing``."""
    s0, s1, s2 = _spacing(spacing, 3)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(_surfel_area_vectors() * scale, axis=-1).sum(axis=-1)


def _surfels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbourhood codes on the corner grid of a zero-bordered mask; (indices, codes) of surfels."""
    n = [d - 1 for d in mask.shape]
    code = np.zeros(n, dtype=np.int64)
    for a, b, c in itertools.product((0, 1), repeat=3):
        code += mask[a : a + n[0], b : b + n[1], c : c + n[2]].astype(np.int64) << (
            7 - (4 * a + 2 * b + c)
        )
    where = (code != 0) & (code != 255)
    return np.argwhere(where), code[where]


def nsd(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    definition: NsdDefinition = "border_voxel",
) -> float:
    """Normalised surface distance (surface Dice) at ``tolerance_mm``.

    The fraction of both borders lying within ``tolerance_mm`` (inclusive) of the other.
    ``"border_voxel"`` counts border voxels (Metrics Reloaded, MONAI);
    ``"surface_area"`` weights surface elements by area (DeepMind ``surface-distance``,
    FLARE; 3D only). Both masks empty: 1.0; exactly one empty: 0.0.
    """
    p, r = _as_pair(pred, ref)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if definition not in ("border_voxel", "surface_area"):
        raise ValueError(f"unknown NSD definition {definition!r}; use 'border_voxel' or 'surface_area'")
    if not p.any() and not r.any():
        return 1.0
    if not p.any() or not r.any():
        return 0.0
    if definition == "border_voxel":
        d_pred, d_ref = _border_voxel_distances(p, r, spacing)  # type: ignore[misc]
        within = int((d_pred <= tolerance_mm).sum()) + int((d_ref <= tolerance_mm).sum())
        return within / (d_pred.size + d_ref.size)
    if p.ndim != 3:
        raise ValueError("the surface_area definition needs 3D masks")
    s = _spacing(spacing, 3)
    area = _surfel_area_table(s)
    cp, cr = _crop(p, r, margin=1)  # type: ignore[misc]
    (ip, kp), (ir, kr) = _surfels(cp), _surfels(cr)
    d_pred, d_ref = _nearest(ip * s, ir * s), _nearest(ir * s, ip * s)
    a_pred, a_ref = area[kp], area[kr]
    within = a_pred[d_pred <= tolerance_mm].sum() + a_ref[d_ref <= tolerance_mm].sum()
    return float(within / (a_pred.sum() + a_ref.sum()))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm (Metrics Reloaded, MONAI).

    The larger of the two directed 95th percentiles (linear interpolation) of border-voxel
    distances. Exactly one mask empty: NaN; both empty: 0.0.
    """
    p, r = _as_pair(pred, ref)
    if not p.any() and not r.any():
        _spacing(spacing, p.ndim)
        return 0.0
    dists = _border_voxel_distances(p, r, spacing)
    if dists is None:
        return math.nan
    return float(max(np.percentile(d, 95) for d in dists))


# --------------------------------------------------------------------------- image pairs


def _differs(a: Sequence[float], b: Sequence[float], scale: float) -> bool:
    return bool(np.any(np.abs(np.asarray(a) - np.asarray(b)) > GEOMETRY_RTOL * scale))


def read_label_image(path: Path) -> sitk.Image:
    """A 3D single-channel image, read to its end (:func:`read_image` with ``verify``).

    Without the check a mask truncated to half reads without complaint and is scored as if complete.
    """
    img = read_image(Path(path), verify=True)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: expected a 3D single-channel label image, got {img.GetDimension()}D "
            f"with {img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return img


def check_same_grid(a: sitk.Image, b: sitk.Image, where: str, fix: str = "") -> None:
    """DataError unless ``a`` and ``b`` (named together by ``where``) lie on the same voxel grid.

    Equal size, and spacing, origin and direction equal to a relative tolerance of 1e-3 (origin
    relative to the largest voxel size, direction as unit vectors). ``fix`` ends the message.
    """
    if a.GetSize() != b.GetSize():
        raise DataError(f"{where} differ in size: {a.GetSize()} vs {b.GetSize()} (x, y, z){fix}")
    sa, sb = a.GetSpacing(), b.GetSpacing()
    if any(abs(x - y) > GEOMETRY_RTOL * max(abs(x), abs(y)) for x, y in zip(sa, sb)):
        raise DataError(f"{where} differ in spacing: {sa} vs {sb} (x, y, z){fix}")
    if _differs(a.GetOrigin(), b.GetOrigin(), max(*sa, *sb)):
        raise DataError(f"{where} differ in origin: {a.GetOrigin()} vs {b.GetOrigin()}{fix}")
    if _differs(a.GetDirection(), b.GetDirection(), 1.0):
        raise DataError(f"{where} differ in direction: {a.GetDirection()} vs {b.GetDirection()}{fix}")


def load_mask_pair(
    pred_path: Path, ref_path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a prediction and a reference label image, each verified (:func:`read_label_image`).

    Returns both label arrays in (z, y, x) order and the spacing in (z, y, x). Raises
    :class:`DataError` naming both files if they are not on the same grid (:func:`check_same_grid`).
    """
    import SimpleITK as sitk

    pred_path, ref_path = Path(pred_path), Path(ref_path)
    p, r = read_label_image(pred_path), read_label_image(ref_path)
    check_same_grid(p, r, f"prediction {pred_path} and reference {ref_path}")
    z, y, x = (float(v) for v in reversed(r.GetSpacing()))
    return sitk.GetArrayFromImage(p), sitk.GetArrayFromImage(r), (z, y, x)


#: Float masks hold labels like 1.0000152587890625: evaluate and report accept what clean accepts
#: (``clean.label_tolerance``); this is its default, for callers without a config.
DEFAULT_LABEL_TOLERANCE: float = CleanConfig.model_fields["label_tolerance"].default


def _integer_valued(values: np.ndarray, path: Path, tolerance: float) -> np.ndarray:
    """A float mask's values rounded, if every one is within ``tolerance`` of an integer."""
    if not np.isfinite(values).all():
        raise DataError(f"{path}: NaN/Inf label values; replace the mask")
    rounded = np.rint(values)
    off = np.abs(values - rounded) > tolerance
    if off.any():
        shown = ", ".join(f"{v:.6g}" for v in np.unique(values[off])[:5])
        raise DataError(f"{path}: label values like {shown} are not integers (beyond clean.label_tolerance = "
                        f"{tolerance:g}); the mask looks interpolated: re-export it with nearest-neighbour "
                        "resampling")
    return rounded


def as_labels(values: np.ndarray, path: Path, settings: EvaluateConfig,
              label_tolerance: float = DEFAULT_LABEL_TOLERANCE) -> np.ndarray:
    """``values`` as labels 0/1/2 (uint8) through ``evaluate.label_map``; others are an error or background.

    Every check runs on the values as stored, before any cast: a cast would round 0.5 to 0 and wrap
    int32 65537 to 1. Float masks may hold labels like 1.0000152587890625 (within ``clean.label_tolerance``
    of an integer, as clean accepts them). Scoring any value > 0 as pancreas would turn a multi-organ
    mask into a plausible-looking result.
    """
    if np.issubdtype(values.dtype, np.floating):
        values = _integer_valued(values, path, label_tolerance)
    elif not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{path}: label values of type {values.dtype}; masks hold integer labels 0/1/2")
    if not settings.label_map and 0 <= values.min() and values.max() <= 2:
        return values.astype(np.uint8)  # the usual case, without np.unique's sort of the whole volume
    mapping = kept_labels(settings.label_map)
    unknown = [int(v) for v in np.unique(values) if int(v) not in mapping]
    if unknown and settings.unknown_labels == "error":
        shown = ", ".join(map(str, unknown[:10])) + (f", ... ({len(unknown)} values)" if len(unknown) > 10 else "")
        raise DataError(f"{path}: label values {shown} are not among {sorted(mapping)}; map them with "
                        "evaluate.label_map (e.g. --set 'evaluate.label_map={7: 1}' for TotalSegmentator's "
                        "pancreas) or set evaluate.unknown_labels: background")
    out = np.zeros(values.shape, dtype=np.uint8)
    for source, target in mapping.items():
        out[values == source] = target
    return out


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassificationMetrics:
    """Classification scores over a fixed label set.

    ``precision``/``recall``/``f1`` are keyed by label. A score whose denominator is zero is
    0.0 (sklearn's ``zero_division=0``): a class never predicted has precision 0 and F1 0,
    and a class absent from ``y_true`` and never predicted also has F1 0, which lowers
    ``macro_f1`` (the unweighted mean over ``labels``). ``confusion_matrix[i][j]`` counts
    cases of true ``labels[i]`` predicted as ``labels[j]``; ``unpredicted[label]`` counts cases
    of that true label without a prediction (wrong for accuracy and recall, no false positive).
    """

    labels: tuple[int, ...]
    accuracy: float
    precision: dict[int, float]
    recall: dict[int, float]
    f1: dict[int, float]
    macro_f1: float
    confusion_matrix: list[list[int]]
    unpredicted: dict[int, int]


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int | None], labels: Sequence[int] = SUBTYPES
) -> ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1, macro F1 and confusion matrix.

    A ``None`` prediction (a case that was not predicted) is wrong without predicting any class.
    Raises ValueError if the sequences differ in length, are empty, or hold a value not in
    ``labels``.
    """
    labels = tuple(int(v) for v in labels)
    t, p = [int(v) for v in y_true], [None if v is None else int(v) for v in y_pred]
    if len(t) != len(p) or not t:
        raise ValueError(f"y_true and y_pred must be non-empty and equally long ({len(t)}, {len(p)})")
    unknown = sorted((set(t) | {v for v in p if v is not None}) - set(labels))
    if unknown:
        raise ValueError(f"values {unknown} are not among labels {labels}")
    pos = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    unpredicted = dict.fromkeys(labels, 0)
    for a, b in zip(t, p):
        if b is None:
            unpredicted[a] += 1
        else:
            cm[pos[a], pos[b]] += 1

    def ratio(num: float, den: float) -> float:
        return float(num / den) if den else 0.0

    precision, recall, f1 = {}, {}, {}
    for label, i in pos.items():
        tp, actual = cm[i, i], cm[i, :].sum() + unpredicted[label]
        precision[label] = ratio(tp, cm[:, i].sum())
        recall[label] = ratio(tp, actual)
        f1[label] = ratio(2 * tp, cm[:, i].sum() + actual)
    return ClassificationMetrics(
        labels=labels,
        accuracy=ratio(np.trace(cm), len(t)),
        precision=precision,
        recall=recall,
        f1=f1,
        macro_f1=float(np.mean(list(f1.values()))),
        confusion_matrix=cm.tolist(),
        unpredicted=unpredicted,
    )


def bootstrap_ci(
    values: Sequence[float],
    *,
    n: int = 1000,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of ``statistic``.

    Draws ``n`` resamples with replacement using ``numpy.random.default_rng(seed)``, so the
    result is deterministic. The caller drops NaNs (e.g. HD95 of an empty mask) and decides
    how to report them; NaN values raise ValueError, as does an empty sequence.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if np.isnan(x).any():
        raise ValueError("bootstrap_ci got NaN values; drop or replace them first")
    if n < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n >= 1 and 0 < alpha < 1, got n={n}, alpha={alpha}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n, x.size))
    stats = np.array([statistic(x[i]) for i in idx], dtype=np.float64)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
