"""Tiny deterministic synthetic pancreas CT datasets.

The real data (CT, pancreas + lesion masks, three lesion subtypes) cannot be shipped, so
demos and tests run the whole pipeline on look-alikes written in the real layouts. The
phantom is defined in voxel space relative to the grid, so it scales with ``shape``;
``spacing`` is only written into the files. With ``quirks`` the known defects of the
real files are planted, so the cleaning stage has real work to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np

from pancreas_cli.exceptions import SynthError
from pancreas_cli.imageio import write_image, write_text
from pancreas_cli.subtypes import CASE_SUBTYPES_NAME, CHANNEL, SUBTYPES, image_name, render_case_subtypes

#: Smallest axis length: below it the organs no longer fit the field of view.
MIN_AXIS = 16
#: Label values of the real quiz masks, which are stored as float32 (index = label).
FLOAT_LABELS: tuple[float, float, float] = (0.0, 1.0000152587890625, 2.000030517578125)
#: How far (mm, along x) a quirky mask's origin is from its image's origin.
ORIGIN_OFFSET_MM = 1e-4
#: Range of HU values a CT file may hold (12-bit CT plus the -1024 floor).
HU_MIN, HU_MAX = -1024, 3071
#: Fewest lesion voxels a case may have, so every case has something to find and classify.
MIN_LESION_VOXELS = 8

Layout = Literal["quiz", "seed"]
LAYOUTS: tuple[str, ...] = ("quiz", "seed")

#: Marks a folder synth wrote, so ``force`` only ever deletes in synth's own folders.
MARKER = ".pancseg_synth"

#: Files an earlier run may have left, as (path glob, exact name pattern); ``force`` removes
#: them from a folder with :data:`MARKER` so a smaller or other-layout rerun leaves no stale cases.
_OWN_FILES: tuple[tuple[str, str], ...] = (
    ("train/subtype*/quiz_*", rf"quiz_\d+_\d+({CHANNEL})?\.nii\.gz"),
    ("validation/subtype*/quiz_*", rf"quiz_\d+_\d+({CHANNEL})?\.nii\.gz"),
    ("test/quiz_*", rf"quiz_\d+{CHANNEL}\.nii\.gz"),
    ("test_ground_truth/*", rf"(quiz|img)_\d+\.nii\.gz|{re.escape(CASE_SUBTYPES_NAME)}"),
    ("imagesTr/img_*", r"img_\d+\.nii\.gz"),
    ("labelsTr/mask_*", r"mask_\d+\.nii\.gz"),
    ("imagesTs/img_*", r"img_\d+\.nii\.gz"),
    (CASE_SUBTYPES_NAME, re.escape(CASE_SUBTYPES_NAME)),
)


@dataclass(frozen=True)
class SynthCase:
    """One written case; a test case's ``mask`` is its ground truth in ``test_ground_truth/``."""

    case_id: str
    split: str
    subtype: int
    image: Path
    mask: Path


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote, and which quirks it planted where (one line each)."""

    out_dir: Path
    layout: str
    cases: list[SynthCase]
    quirks: list[str]


@dataclass(frozen=True)
class _LesionLook:
    """Appearance of one subtype; the ranges overlap so classifying is learnable but not trivial."""

    radius: tuple[float, float]  # mean, sd, as a fraction of the local pancreas radius
    hu: tuple[float, float]  # mean, sd of the lesion's attenuation
    noise_factor: float  # scales the image noise inside the lesion (< 1: smooth)
    texture: tuple[float, float]  # range of the sd (HU) of extra blotchy texture
    elong: tuple[float, float] = (1.0, 1.4)  # range of the lesion's elongation along the pancreas

    def toward(self, common: _LesionLook, overlap: float) -> _LesionLook:
        """This look with every cue moved ``overlap`` of the way to ``common`` (the subtypes' average)."""
        return _map_cues(lambda a, b: a + overlap * (b - a), self, common)


_LOOKS: dict[int, _LesionLook] = {
    0: _LesionLook(radius=(0.75, 0.15), hu=(50.0, 10.0), noise_factor=1.0, texture=(0.0, 8.0)),
    1: _LesionLook(radius=(1.25, 0.2), hu=(12.0, 8.0), noise_factor=0.5, texture=(0.0, 0.0)),
    2: _LesionLook(radius=(1.0, 0.2), hu=(125.0, 20.0), noise_factor=1.0, texture=(25.0, 40.0)),
}
_PLAIN = _LesionLook(radius=(1.0, 0.2), hu=(60.0, 10.0), noise_factor=1.0, texture=(0.0, 8.0))

#: Subtype cue profiles: which property tells the subtypes apart. ``mixed`` (the default, and what synth
#: always wrote) differs in all of them; the others differ in one and share the rest (``_PLAIN``).
#: ``shape`` elongates the lesion at about the same volume (the radius shrinks as the cube root).
CUES: dict[str, dict[int, _LesionLook]] = {
    "mixed": _LOOKS,
    "attenuation": {k: replace(_PLAIN, hu=(hu, 10.0)) for k, hu in ((0, 50.0), (1, 15.0), (2, 85.0))},
    "texture": {0: replace(_PLAIN, noise_factor=1.0, texture=(0.0, 4.0)),
                1: replace(_PLAIN, noise_factor=0.3, texture=(0.0, 0.0)),
                2: replace(_PLAIN, noise_factor=1.0, texture=(30.0, 40.0))},
    "shape": {k: replace(_PLAIN, elong=(e, e + 0.2), radius=(e ** (-1 / 3), 0.1))
              for k, e in ((0, 1.0), (1, 1.7), (2, 2.6))},
    "size": {k: replace(_PLAIN, radius=(r, 0.1)) for k, r in ((0, 1.0), (1, 1.5), (2, 0.6))},
}
CUE_NAMES: tuple[str, ...] = tuple(CUES)


def subtype_looks(cues: str, overlap: float) -> dict[int, _LesionLook]:
    """The subtypes' looks under a cue profile, their cues ``overlap`` (0: as defined, 1: identical) alike."""
    looks = CUES[cues]
    if overlap == 0:
        return looks
    common = _map_cues(lambda *values: float(np.mean(values)), *(looks[k] for k in SUBTYPES))
    return {k: look.toward(common, overlap) for k, look in looks.items()}


def _map_cues(combine: Callable[..., float], *looks: _LesionLook) -> _LesionLook:
    """A look whose every number is ``combine`` of the same number in ``looks`` (pairs element-wise)."""
    def each(name: str) -> float | tuple[float, ...]:
        values = [getattr(look, name) for look in looks]
        if isinstance(values[0], tuple):
            return tuple(combine(*parts) for parts in zip(*values))
        return combine(*values)

    return _LesionLook(**{f.name: each(f.name) for f in fields(_LesionLook)})


@dataclass(frozen=True)
class _Tube:
    """Pancreas: a tube whose centre-line runs along x (head to tail), arching in y and rising in z.

    Cross-sections are taken per x column with rounded ends, which keeps the mask a cheap
    broadcast instead of a distance transform.
    """

    x_head: float
    x_tail: float
    y_mid: float
    drift: float
    bend: float
    z_mid: float
    rise: float
    radius: float
    z_ratio: float

    def centre(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x) of the centre-line at ``t`` in [0, 1] (0 = head)."""
        t = np.asarray(t, dtype=np.float32)
        x = self.x_head + t * (self.x_tail - self.x_head)
        y = self.y_mid + self.drift * (t - 0.5) + self.bend * (1.0 - (2.0 * t - 1.0) ** 2)
        z = self.z_mid + self.rise * (t - 0.5)
        return z, y, x

    def radii(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(z, in-plane) radius at ``t``: the head is thicker than the tail, as in real anatomy."""
        r = self.radius * (1.15 - 0.3 * np.asarray(t, dtype=np.float32))
        return np.maximum(1.25, r * self.z_ratio), r

    def mask(self, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, grow: float = 0.0) -> np.ndarray:
        """Voxels inside the tube, every radius widened by ``grow`` voxels."""
        t = np.clip((xx - self.x_head) / (self.x_tail - self.x_head), 0.0, 1.0)
        zc, yc, xc = self.centre(t)
        rz, r = self.radii(t)
        d = ((zz - zc) / (rz + grow)) ** 2 + ((yy - yc) / (r + grow)) ** 2
        return d + ((xx - xc) / (r + grow)) ** 2 <= 1.0


def synthesize(
    out_dir: Path,
    *,
    cases: int,
    shape: tuple[int, int, int] = (32, 64, 64),
    layout: Layout = "quiz",
    seed: int = 0,
    quirks: bool = False,
    spacing: tuple[float, float, float] = (2.0, 0.75, 0.75),
    force: bool = False,
    cues: str = "mixed",
    cue_overlap: float = 0.0,
) -> SynthResult:
    """Write ``cases`` synthetic CT cases in ``layout`` under ``out_dir`` and say what was written.

    ``shape`` and ``spacing`` are (Z, Y, X). Same arguments give identical files. Cases are
    split 70/10/20 % into train/validation/test like the real data (at least one validation
    and one test case from 3 cases on, every subtype in train from 5 on); subtypes go round
    robin. ``force`` writes over an earlier synth dataset in ``out_dir``, first removing files
    named like synth's own (its cases) but nothing else; other non-empty folders are refused.
    ``cues`` picks what tells the subtypes apart (:data:`CUES`), ``cue_overlap`` in [0, 1] how alike
    they are (1: not at all learnable); the defaults write what synth always wrote.
    """
    _check_arguments(cases, shape, layout, seed, spacing, cues, cue_overlap)
    looks = subtype_looks(cues, float(cue_overlap))
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text("written by pancseg synth\n", out_dir / MARKER)
    n_train, n_val, _ = _split_sizes(cases)
    n_labelled = n_train + n_val
    # Centred in x and y with the slices below 0, like scanner patient coordinates.
    origin = (-shape[2] * spacing[2] / 2, -shape[1] * spacing[1] / 2, -float(shape[0] * spacing[0]))
    written: list[SynthCase] = []
    planted: list[str] = []
    test_rows: list[tuple[str, int]] = []
    labelled_rows: list[tuple[str, int]] = []
    for index in range(cases):
        subtype = SUBTYPES[index % len(SUBTYPES)]
        split = "train" if index < n_train else "validation" if index < n_labelled else "test"
        case = _case_paths(out_dir, layout, split, subtype, index + 1)
        case_quirks = _quirks_of(index, n_labelled) if quirks else set()
        ct, labels = _render_case(np.random.default_rng([seed, index]), shape, looks[subtype])
        _write_case(case, ct, labels, case_quirks, origin, spacing)
        planted += [f"{case.case_id}: {_QUIRK_TEXT[q]}" for q in sorted(case_quirks)]
        (test_rows if split == "test" else labelled_rows).append((case.case_id, subtype))
        written.append(case)
    if layout == "seed" and labelled_rows:
        write_text(render_case_subtypes(labelled_rows), out_dir / CASE_SUBTYPES_NAME)
    if test_rows:
        write_text(render_case_subtypes(test_rows), out_dir / "test_ground_truth" / CASE_SUBTYPES_NAME)
    return SynthResult(out_dir=out_dir, layout=layout, cases=written, quirks=planted)


def _check_arguments(
    cases: int,
    shape: tuple[int, int, int],
    layout: str,
    seed: int,
    spacing: tuple[float, float, float],
    cues: str = "mixed",
    cue_overlap: float = 0.0,
) -> None:
    """Reject arguments that cannot make a dataset, before anything is written."""
    if cues not in CUES:
        raise SynthError(f"cues must be one of {', '.join(CUE_NAMES)}, got {cues!r}")
    if not 0.0 <= cue_overlap <= 1.0:
        raise SynthError(f"cue overlap must be between 0 and 1, got {cue_overlap!r}")
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise SynthError(f"cases must be a whole number >= 1, got {cases!r}")
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, int) for n in shape):
        raise SynthError(f"shape must be three whole numbers (Z, Y, X), got {shape!r}")
    if min(shape) < MIN_AXIS:
        raise SynthError(
            f"shape {tuple(shape)} is too small: every axis needs at least {MIN_AXIS} voxels"
        )
    if layout not in LAYOUTS:
        raise SynthError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthError(f"seed must be a whole number >= 0, got {seed!r}")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise SynthError(f"spacing must be three positive numbers (Z, Y, X) in mm, got {spacing!r}")


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse to mix into someone's folder; when forced, drop an earlier synth run's files.

    Only a folder that synth made (it holds :data:`MARKER`) is written into: synth's file names are
    the real dataset's, so writing into a real dataset would replace its cases.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthError(f"{out_dir} exists and is not a folder; pick another output folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise SynthError(
            f"{out_dir} exists and is not empty; pass --force to write over it "
            "or pick an empty folder"
        )
    if not (out_dir / MARKER).is_file():
        raise SynthError(
            f"{out_dir} is not empty and was not made by pancseg synth (no {MARKER} in it); synthetic "
            "cases would replace files of the same names: pick an empty folder"
        )
    for path_glob, pattern in _OWN_FILES:
        for path in out_dir.glob(path_glob):
            if path.is_file() and re.fullmatch(pattern, path.name):
                path.unlink()


def _split_sizes(cases: int) -> tuple[int, int, int]:
    """(train, validation, test) counts in the real dataset's 252/36/72 proportions."""
    if cases < 3:
        return cases, 0, 0
    n_test = max(1, int(cases * 0.2 + 0.5))
    n_val = max(1, int(cases * 0.1 + 0.5))
    return cases - n_val - n_test, n_val, n_test


def _case_paths(out_dir: Path, layout: str, split: str, subtype: int, number: int) -> SynthCase:
    """Where a case goes: the real quiz layout, or the older Colab pipeline's seed layout."""
    nnn = f"{number:03d}"
    truth = out_dir / "test_ground_truth"
    if layout == "seed":
        case_id = f"img_{nnn}"
        if split == "test":
            return SynthCase(case_id, "test", subtype, out_dir / "imagesTs" / f"{case_id}.nii.gz",
                             truth / f"{case_id}.nii.gz")
        return SynthCase(case_id, "train", subtype, out_dir / "imagesTr" / f"{case_id}.nii.gz",
                         out_dir / "labelsTr" / f"mask_{nnn}.nii.gz")
    if split == "test":
        case_id = f"quiz_{nnn}"
        return SynthCase(case_id, split, subtype, out_dir / "test" / image_name(case_id),
                         truth / f"{case_id}.nii.gz")
    case_id = f"quiz_{subtype}_{nnn}"
    folder = out_dir / split / f"subtype{subtype}"
    return SynthCase(case_id, split, subtype, folder / image_name(case_id),
                     folder / f"{case_id}.nii.gz")


_QUIRK_TEXT: dict[str, str] = {
    "float": f"float mask ({FLOAT_LABELS[1]!r})",
    "int32": "CT stored as int32",
    "origin": f"mask origin off by {ORIGIN_OFFSET_MM:g} mm in x",
}


def _quirks_of(index: int, n_labelled: int) -> set[str]:
    """Quirks planted on case ``index``: float masks on most labelled cases, the rest on some.

    The pattern repeats every 4 labelled cases, so from 3 cases on each quirk appears and
    some cases stay clean. Test cases only get int32 CT: the real test set has no masks.
    """
    if index >= n_labelled:
        return {"int32"} if (index - n_labelled) % 3 == 1 else set()
    return [{"float", "origin"}, {"float", "int32"}, set(), {"float"}][index % 4]


def _write_case(
    case: SynthCase,
    ct: np.ndarray,
    labels: np.ndarray,
    quirks: set[str],
    origin: tuple[float, float, float],
    spacing: tuple[float, float, float],
) -> None:
    """Write CT and mask with the case's quirks applied to the stored types and geometry."""
    import SimpleITK as sitk

    if "float" in quirks:
        mask_array = np.asarray(FLOAT_LABELS, dtype=np.float32)[labels]
    else:
        mask_array = labels
    mask_origin = (origin[0] + ORIGIN_OFFSET_MM, *origin[1:]) if "origin" in quirks else origin
    image = sitk.GetImageFromArray(ct.astype(np.int32) if "int32" in quirks else ct)
    mask = sitk.GetImageFromArray(mask_array)
    for img, org in ((image, origin), (mask, mask_origin)):
        img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        img.SetOrigin(org)
    write_image(image, case.image)
    write_image(mask, case.mask)


@dataclass(frozen=True)
class _Body:
    """The body ellipse of a case: its centre and half-axes (voxels), and its soft tissue inside the fat rim."""
    cy: float
    cx: float
    ay: float
    ax: float
    inner: np.ndarray


def _render_body(rng: np.random.Generator, shape: tuple[int, int, int], zz: np.ndarray, yy: np.ndarray,
                 xx: np.ndarray) -> tuple[np.ndarray, _Body]:
    """HU of the body without the pancreas: a fat rim, soft tissue and the distractors of a
    pancreatic-phase scan (liver darker than the enhancing pancreas, kidney cortex and aorta brighter,
    the spine). Anterior is small y, posterior (spine) large y; slightly narrower at the z ends."""
    nz, ny, nx = shape
    cy = ny / 2 + rng.uniform(-0.03, 0.03) * ny
    cx = nx / 2 + rng.uniform(-0.03, 0.03) * nx
    ay = rng.uniform(0.36, 0.42) * ny
    ax = rng.uniform(0.42, 0.47) * nx
    taper = 1.0 - 0.06 * ((zz - nz / 2) / (nz / 2)) ** 2
    rho = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2) / taper
    inner = rho <= 1.0 - rng.uniform(0.08, 0.14)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[rho <= 1.0] = -100.0
    hu[inner] = rng.uniform(35.0, 45.0)

    def column(y: float, x: float, ry: float, rx: float) -> np.ndarray:
        """An elliptic cylinder along z, clipped to the body's soft tissue."""
        return (((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 <= 1.0) & inner

    liver = column(cy - 0.1 * ay, cx - 0.6 * ax, 0.55 * ay, 0.35 * ax)
    hu[liver & (zz >= rng.uniform(0.2, 0.4) * nz)] = rng.uniform(60.0, 75.0)
    kidneys = column(cy + 0.4 * ay, cx - 0.5 * ax, 0.16 * ay, 0.12 * ax)
    kidneys |= column(cy + 0.4 * ay, cx + 0.5 * ax, 0.16 * ay, 0.12 * ax)
    hu[kidneys & (zz < rng.uniform(0.6, 0.8) * nz)] = rng.uniform(190.0, 240.0)
    hu[column(cy + 0.38 * ay, cx + 0.1 * ax, 0.09 * ay, 0.09 * ay)] = rng.uniform(240.0, 300.0)
    hu[column(cy + 0.68 * ay, cx, 0.17 * ay, 0.2 * ay)] = rng.uniform(650.0, 750.0)
    return hu, _Body(cy, cx, ay, ax, inner)


def _pancreas_tube(rng: np.random.Generator, shape: tuple[int, int, int], body: _Body) -> _Tube:
    """The pancreas across the body's middle, head to tail, rising along z."""
    nz, ny, nx = shape
    scale = min(ny, nx) / 64
    return _Tube(
        x_head=body.cx - rng.uniform(0.45, 0.55) * body.ax,
        x_tail=body.cx + rng.uniform(0.4, 0.55) * body.ax,
        y_mid=body.cy - rng.uniform(0.0, 0.12) * body.ay,
        drift=rng.uniform(-0.12, 0.12) * body.ay,
        bend=rng.uniform(-0.2, 0.2) * body.ay,
        z_mid=nz / 2 + rng.uniform(-0.05, 0.05) * nz,
        rise=rng.uniform(0.3, 0.45) * nz,
        radius=max(2.0, rng.uniform(5.0, 7.0) * scale),
        z_ratio=2 * nz / min(ny, nx),
    )


def _render_case(
    rng: np.random.Generator, shape: tuple[int, int, int], look: _LesionLook
) -> tuple[np.ndarray, np.ndarray]:
    """One case as (int16 HU, uint8 labels), both (Z, Y, X).

    Axial slices show a body ellipse (fat rim, soft tissue, liver, kidneys, aorta, spine) with the
    pancreas across its middle; label 1 is pancreas, 2 the lesion.
    """
    nz, ny, nx = shape
    zz = np.arange(nz, dtype=np.float32)[:, None, None]
    yy = np.arange(ny, dtype=np.float32)[None, :, None]
    xx = np.arange(nx, dtype=np.float32)[None, None, :]
    hu, body = _render_body(rng, shape, zz, yy, xx)
    tube = _pancreas_tube(rng, shape, body)
    pancreas = tube.mask(zz, yy, xx)
    lesion = _lesion(rng, tube, zz, yy, xx, look)
    hu[pancreas] = rng.uniform(110.0, 140.0)
    hu[lesion] = rng.normal(*look.hu)

    # Partial volume, then correlated CT noise; the lesion gets its subtype's texture.
    hu = _blur(hu, 0.6)
    noise = _unit_noise(rng, shape, 0.6) * rng.uniform(15.0, 20.0)
    noise[lesion] *= look.noise_factor
    hu += noise + lesion * (_unit_noise(rng, shape, 1.0) * rng.uniform(*look.texture))
    ct = np.rint(np.clip(hu, HU_MIN, HU_MAX)).astype(np.int16)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[pancreas] = 1
    labels[lesion] = 2
    return ct, labels


def _lesion(
    rng: np.random.Generator,
    tube: _Tube,
    zz: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    look: _LesionLook,
) -> np.ndarray:
    """Lesion mask: an ellipsoid on the pancreas, clipped to the pancreas widened by a voxel.

    The clipping keeps the lesion attached; its size grows until it has enough voxels.
    """
    t = rng.uniform(0.2, 0.8)
    zc, yc, xc = tube.centre(t)
    rz, r = (float(v) for v in tube.radii(t))
    zc = zc + rng.uniform(-0.3, 0.3) * rz
    yc = yc + rng.uniform(-0.3, 0.3) * r
    radius = float(np.clip(rng.normal(*look.radius), 0.3, 2.0)) * r
    elong = rng.uniform(*look.elong)
    host = tube.mask(zz, yy, xx, grow=1.0)
    while True:
        ry = max(1.5, radius)
        zr = max(1.0, ry * rz / r)
        d = ((zz - zc) / zr) ** 2 + ((yy - yc) / ry) ** 2 + ((xx - xc) / (ry * elong)) ** 2
        lesion = (d <= 1.0) & host
        if lesion.sum() >= MIN_LESION_VOXELS:
            return lesion
        radius = ry + 0.5


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Spatially correlated Gaussian noise with unit sd: CT noise is not white."""
    noise = _blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    return noise / noise.std()


def _blur(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (sigma in voxels, edges repeated), numpy only."""
    radius = max(1, round(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).tolist()
    out = volume.astype(np.float32)
    for axis in range(out.ndim):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.moveaxis(np.pad(out, pad, mode="edge"), axis, 0)
        n = out.shape[axis]
        out = np.moveaxis(sum(w * padded[i : i + n] for i, w in enumerate(kernel)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)
