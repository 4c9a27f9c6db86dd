"""Tests of the synthetic dataset generator: layouts, splits, content, determinism, quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pancreas_cli.exceptions import SynthError
from pancreas_cli.synth import FLOAT_LABELS, MARKER, ORIGIN_OFFSET_MM, SynthResult, synthesize

TINY = (16, 32, 32)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MARKER}


def _split_counts(result: SynthResult) -> tuple[int, int, int]:
    splits = [c.split for c in result.cases]
    return splits.count("train"), splits.count("validation"), splits.count("test")


def _relative(result: SynthResult) -> set[str]:
    """The case files of ``result``, relative to its folder."""
    paths = [p for c in result.cases for p in (c.image, c.mask)]
    return {p.relative_to(result.out_dir).as_posix() for p in paths}


def _dilate(mask: np.ndarray) -> np.ndarray:
    """26-neighbourhood dilation by one voxel, without scipy."""
    padded = np.pad(mask, 1)
    nz, ny, nx = mask.shape
    out = np.zeros_like(mask)
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                out |= padded[dz : dz + nz, dy : dy + ny, dx : dx + nx]
    return out


@pytest.fixture(scope="module")
def quiz(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize(tmp_path_factory.mktemp("quiz"), cases=10, shape=TINY, seed=3)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """12 cases, 4 per subtype, on a larger grid so subtype statistics are meaningful."""
    return synthesize(tmp_path_factory.mktemp("balanced"), cases=12, shape=(24, 48, 48), seed=11)


def test_quiz_layout_matches_the_real_dataset(quiz: SynthResult) -> None:
    root = quiz.out_dir
    for n, case in enumerate(quiz.cases, start=1):
        k = case.subtype
        if case.split == "test":
            assert case.case_id == f"quiz_{n:03d}"
            assert case.image == root / "test" / f"quiz_{n:03d}_0000.nii.gz"
            assert case.mask == root / "test_ground_truth" / f"quiz_{n:03d}.nii.gz"
        else:
            folder = root / case.split / f"subtype{k}"
            assert case.case_id == f"quiz_{k}_{n:03d}"
            assert case.image == folder / f"quiz_{k}_{n:03d}_0000.nii.gz"
            assert case.mask == folder / f"quiz_{k}_{n:03d}.nii.gz"
    assert _files(root) == _relative(quiz) | {"test_ground_truth/subtypes.csv"}
    assert quiz.layout == "quiz"
    assert quiz.quirks == []
    test_cases = [c for c in quiz.cases if c.split == "test"]
    csv = (root / "test_ground_truth" / "subtypes.csv").read_text()
    assert csv == "case_id,subtype\n" + "".join(f"{c.case_id},{c.subtype}\n" for c in test_cases)


def test_seed_layout_puts_validation_into_training(tmp_path: Path) -> None:
    result = synthesize(tmp_path, cases=10, shape=TINY, layout="seed")
    assert _split_counts(result) == (8, 0, 2)
    for n, case in enumerate(result.cases, start=1):
        assert case.case_id == f"img_{n:03d}"
        if case.split == "test":
            assert case.image == tmp_path / "imagesTs" / f"img_{n:03d}.nii.gz"
            assert case.mask == tmp_path / "test_ground_truth" / f"img_{n:03d}.nii.gz"
        else:
            assert case.image == tmp_path / "imagesTr" / f"img_{n:03d}.nii.gz"
            assert case.mask == tmp_path / "labelsTr" / f"mask_{n:03d}.nii.gz"
    csvs = {"subtypes.csv", "test_ground_truth/subtypes.csv"}
    assert _files(tmp_path) == _relative(result) | csvs
    rows = (tmp_path / "subtypes.csv").read_text().splitlines()
    assert rows[0] == "case_id,subtype"
    assert rows[1:] == [f"{c.case_id},{c.subtype}" for c in result.cases if c.split == "train"]
    assert rows[1] == "img_001,0"


@pytest.mark.parametrize(
    ("cases", "counts"),
    [(1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (5, (3, 1, 1)), (10, (7, 1, 2)),
     (20, (14, 2, 4))],
)
def test_splits_follow_the_real_proportions(
    tmp_path: Path, cases: int, counts: tuple[int, int, int]
) -> None:
    result = synthesize(tmp_path, cases=cases, shape=TINY)
    assert _split_counts(result) == counts
    subtypes = [c.subtype for c in result.cases]
    assert max(subtypes.count(k) for k in range(3)) - min(subtypes.count(k) for k in range(3)) <= 1
    if cases >= 5:
        assert {c.subtype for c in result.cases if c.split == "train"} == {0, 1, 2}
    if cases >= 20:
        for split in ("validation", "test"):
            assert len({c.subtype for c in result.cases if c.split == split}) > 1


def test_same_seed_same_arrays_other_seed_other_arrays(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", cases=3, shape=TINY, seed=5, quirks=True)
    b = synthesize(tmp_path / "b", cases=3, shape=TINY, seed=5, quirks=True)
    c = synthesize(tmp_path / "c", cases=3, shape=TINY, seed=6, quirks=True)
    assert a.quirks == b.quirks == c.quirks
    for ca, cb, cc in zip(a.cases, b.cases, c.cases):
        for attr in ("image", "mask"):
            first, second = _array(getattr(ca, attr)), _array(getattr(cb, attr))
            assert first.dtype == second.dtype
            np.testing.assert_array_equal(first, second)
            assert not np.array_equal(first, _array(getattr(cc, attr)))


def test_every_case_has_pancreas_and_an_attached_lesion(quiz: SynthResult) -> None:
    for case in quiz.cases:
        labels = _array(case.mask)
        assert labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0, 1, 2}, case.case_id
        lesion, pancreas = labels == 2, labels == 1
        assert lesion.sum() >= 8, case.case_id
        assert (lesion & _dilate(pancreas)).any(), case.case_id
        # Attached: growing the pancreas inside the labels reaches every lesion voxel.
        reached = pancreas
        while not np.array_equal(grown := _dilate(reached) & (labels > 0), reached):
            reached = grown
        assert reached[lesion].all(), case.case_id
        # Well inside the field of view: no label within 2 voxels of an in-plane border.
        assert not labels[:, :2].any() and not labels[:, -2:].any()
        assert not labels[:, :, :2].any() and not labels[:, :, -2:].any()
        # The pancreas is elongated along x and spans most slices.
        zs, _, xs = np.nonzero(labels)
        assert np.ptp(xs) > labels.shape[2] / 3
        assert len(np.unique(zs)) >= labels.shape[0] / 2


def test_images_look_like_ct(quiz: SynthResult) -> None:
    contrast = []
    for case in quiz.cases:
        image = sitk.ReadImage(str(case.image))
        assert image.GetPixelID() == sitk.sitkInt16
        ct = sitk.GetArrayFromImage(image)
        labels = _array(case.mask)
        assert ct.shape == labels.shape == TINY
        assert -1024 <= np.median(ct[:, :2, :2]) <= -980  # air in the corners
        assert ct.min() >= -1024 and ct.max() > 500  # bone
        body = ct[:, ct.shape[1] // 2, ct.shape[2] // 2]
        assert np.all(body > -300)
        pancreas = ct[labels == 1].mean()
        assert 90 <= pancreas <= 150
        if case.subtype in (0, 1):
            contrast.append(pancreas - ct[labels == 2].mean())
    # Hypodense and cystic lesions are darker than pancreas, subtly so when small and blurred.
    assert min(contrast) > 5 and np.mean(contrast) > 25


def test_geometry_is_anisotropic_as_asked(tmp_path: Path, quiz: SynthResult) -> None:
    for case in quiz.cases:
        image, mask = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.mask))
        assert image.GetSpacing() == pytest.approx((0.75, 0.75, 2.0))
        assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        assert image.GetOrigin() == mask.GetOrigin()
        assert image.GetSpacing() == mask.GetSpacing()
    other = synthesize(tmp_path, cases=1, shape=(16, 24, 40), spacing=(3.0, 0.5, 0.8))
    image = sitk.ReadImage(str(other.cases[0].image))
    assert image.GetSize() == (40, 24, 16)
    assert image.GetSpacing() == pytest.approx((0.8, 0.5, 3.0))


def test_subtypes_differ_on_average(balanced: SynthResult) -> None:
    volume: dict[int, list[float]] = {0: [], 1: [], 2: []}
    hu: dict[int, list[float]] = {0: [], 1: [], 2: []}
    texture: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for case in balanced.cases:
        ct, labels = _array(case.image).astype(float), _array(case.mask)
        lesion = ct[labels == 2]
        volume[case.subtype].append(lesion.size)
        hu[case.subtype].append(lesion.mean())
        texture[case.subtype].append(lesion.std())
    assert all(len(v) == 4 for v in volume.values())
    vol, hu_, sd = ({k: float(np.mean(d[k])) for k in range(3)} for d in (volume, hu, texture))
    assert hu_[1] + 15 < hu_[0] and hu_[0] + 30 < hu_[2]  # cystic < hypodense < hyperdense
    assert vol[1] > 1.5 * vol[0]  # cysts are larger
    assert sd[2] > 1.3 * max(sd[0], sd[1])  # subtype 2 is textured


@pytest.mark.parametrize("cases", [3, 10])
def test_quirks_are_planted_exactly(tmp_path: Path, cases: int) -> None:
    result = synthesize(tmp_path / "q", cases=cases, shape=TINY, seed=2, quirks=True)
    clean = synthesize(tmp_path / "c", cases=cases, shape=TINY, seed=2)
    planted: dict[str, set[str]] = {}
    for line in result.quirks:
        case_id, what = line.split(": ", 1)
        kind = {"float mask": "float", "origin": "origin", "int32": "int32"}
        planted.setdefault(case_id, set()).update(v for k, v in kind.items() if k in what)
    seen: set[str] = set()
    for case, reference in zip(result.cases, clean.cases):
        kinds = planted.get(case.case_id, set())
        seen |= kinds or {"clean"}
        image, mask = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.mask))
        want_ct = sitk.sitkInt32 if "int32" in kinds else sitk.sitkInt16
        assert image.GetPixelID() == want_ct, case.case_id
        labels = sitk.GetArrayFromImage(mask)
        if "float" in kinds:
            assert mask.GetPixelID() == sitk.sitkFloat32
            assert set(np.unique(labels).tolist()) == set(FLOAT_LABELS)
            assert 1.0000152587890625 in labels and 2.000030517578125 in labels
            labels = np.rint(labels).astype(np.uint8)
        else:
            assert mask.GetPixelID() == sitk.sitkUInt8
        offset = np.subtract(mask.GetOrigin(), image.GetOrigin())
        if "origin" in kinds:
            assert offset == pytest.approx((ORIGIN_OFFSET_MM, 0, 0), abs=1e-5)
            assert offset[0] > 5e-5
        else:
            assert tuple(offset) == (0, 0, 0)
        # Quirks change how the data is stored, never what it shows.
        np.testing.assert_array_equal(labels, _array(reference.mask))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), _array(reference.image))
    assert seen == {"float", "origin", "int32", "clean"}
    assert len(result.quirks) == sum(len(k) for k in planted.values())
    labelled = [c for c in result.cases if c.split != "test"]
    assert sum("float" in planted.get(c.case_id, ()) for c in labelled) > len(labelled) / 2
    assert any("float mask (1.0000152587890625)" in q for q in result.quirks)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cases": 0},
        {"cases": 2, "shape": (8, 32, 32)},
        {"cases": 2, "shape": (16, 32, 15)},
        {"cases": 2, "layout": "nnunet"},
        {"cases": 2, "seed": -1},
        {"cases": 2, "spacing": (2.0, 0.0, 0.75)},
    ],
)
def test_bad_arguments_raise_synth_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(SynthError):
        synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_needs_force(tmp_path: Path) -> None:
    synthesize(tmp_path, cases=10, shape=TINY)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match="--force"):
        synthesize(tmp_path, cases=3, shape=TINY)
    result = synthesize(tmp_path, cases=3, shape=TINY, force=True)
    # The earlier run's extra cases are gone; files synth does not own stay.
    assert _files(tmp_path) == _relative(result) | {"test_ground_truth/subtypes.csv", "notes.txt"}
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_force_refuses_a_folder_synth_did_not_make(tmp_path: Path) -> None:
    # A real dataset uses synth's file names: writing into it would replace its cases.
    real = tmp_path / "train" / "subtype0" / "quiz_0_001.nii.gz"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real case")
    with pytest.raises(SynthError, match="not made by pancseg synth"):
        synthesize(tmp_path, cases=3, shape=TINY, force=True)
    assert _files(tmp_path) == {"train/subtype0/quiz_0_001.nii.gz"}
    assert real.read_bytes() == b"a real case"


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "dataset"
    target.write_text("")
    with pytest.raises(SynthError, match="not a folder"):
        synthesize(target, cases=1, shape=TINY)


# ------------------------------------------------------------------ subtype cue profiles


def _lesion_stats(result: SynthResult) -> dict[int, tuple[float, float, float]]:
    """Per subtype: mean lesion HU, mean lesion volume (voxels), mean lesion sd (HU)."""
    found: dict[int, list[tuple[float, float, float]]] = {0: [], 1: [], 2: []}
    for case in result.cases:
        ct, labels = _array(case.image).astype(float), _array(case.mask)
        lesion = ct[labels == 2]
        found[case.subtype].append((lesion.mean(), lesion.size, lesion.std()))
    return {k: tuple(np.mean(v, axis=0)) for k, v in found.items()}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, float], SynthResult]:
    """9 cases (3 per subtype) of some cue profiles, on the small grid."""
    return {(cues, overlap): synthesize(tmp_path_factory.mktemp(f"{cues}{overlap}"), cases=9, shape=(16, 32, 32),
                                        seed=5, cues=cues, cue_overlap=overlap)
            for cues, overlap in (("attenuation", 0.0), ("attenuation", 1.0), ("size", 0.0), ("texture", 0.0))}


def test_attenuation_profile_orders_the_subtypes_by_hu_alone(profiles: dict) -> None:
    hu = {k: v[0] for k, v in _lesion_stats(profiles["attenuation", 0.0]).items()}
    assert hu[1] + 10 < hu[0] and hu[0] + 10 < hu[2]  # cystic < hypodense < the brightest (blurred: small grid)
    # full overlap: the cue is gone (the same draw, the same looks)
    same = {k: v[0] for k, v in _lesion_stats(profiles["attenuation", 1.0]).items()}
    assert max(same.values()) - min(same.values()) < 15


def test_size_profile_orders_the_subtypes_by_volume(profiles: dict) -> None:
    stats = _lesion_stats(profiles["size", 0.0])
    assert stats[2][1] < stats[0][1] < stats[1][1]
    assert max(v[0] for v in stats.values()) - min(v[0] for v in stats.values()) < 20  # no HU cue


def test_texture_profile_differs_in_the_lesions_sd(profiles: dict) -> None:
    sd = {k: v[2] for k, v in _lesion_stats(profiles["texture", 0.0]).items()}
    assert sd[1] < sd[0] < sd[2]


def test_default_cues_are_what_synth_always_wrote(tmp_path: Path) -> None:
    """``mixed`` at overlap 0 is the default: existing seeds keep their data."""
    a = synthesize(tmp_path / "a", cases=3, shape=TINY, seed=2)
    b = synthesize(tmp_path / "b", cases=3, shape=TINY, seed=2, cues="mixed", cue_overlap=0.0)
    c = synthesize(tmp_path / "c", cases=3, shape=TINY, seed=2, cues="size")
    for x, y, z in zip(a.cases, b.cases, c.cases):
        assert np.array_equal(_array(x.image), _array(y.image))
        assert not np.array_equal(_array(x.image), _array(z.image))


@pytest.mark.parametrize("kwargs", [{"cues": "colour"}, {"cue_overlap": 1.5}, {"cue_overlap": -0.1}])
def test_bad_cues_raise_synth_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(SynthError, match="cue"):
        synthesize(tmp_path / "out", cases=2, shape=TINY, **kwargs)
    assert not (tmp_path / "out").exists()
