"""Tests of ``pancseg prepare``: the three layouts, conversion, splits, errors, idempotency, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import ct_volume, label_volume, make_quiz, snapshot, write, write_config

from pancreas_cli.cli import app
from pancreas_cli.config import Config, load_config
from pancreas_cli.exceptions import OutputExistsError, PrepareError
from pancreas_cli.imageio import write_image
from pancreas_cli.prepare import RECORD_NAME, SourceCase, make_splits, prepare

DATASET = "Dataset001_PancreasCancer"
# make_quiz(per_subtype=2, validation=1, test=2): case numbers run across splits and subtypes.
QUIZ_TRAIN = ["quiz_0_001", "quiz_0_002", "quiz_1_003", "quiz_1_004", "quiz_2_005", "quiz_2_006"]
QUIZ_VAL = ["quiz_0_007", "quiz_1_008", "quiz_2_009"]
QUIZ_TEST = ["quiz_001", "quiz_002"]


# --------------------------------------------------------------------------------------------
# helpers


def _config(root: Path, dataset: str = "  source: ./data\n", extra: str = "") -> Config:
    path = write_config(root, f"project_dir: ./work\ndataset:\n{dataset}{extra}")
    return load_config(path)


def _quiz_config(root: Path, extra: str = "", **quiz: int) -> Config:
    make_quiz(root / "data", **quiz)
    return _config(root, extra=extra)


def _out(root: Path) -> Path:
    return root / "work" / "nnUNet_raw" / DATASET


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _subtypes(dataset_dir: Path) -> dict[str, int]:
    with (dataset_dir / "subtypes.csv").open(newline="") as fh:
        return {row["case_id"]: int(row["subtype"]) for row in csv.DictReader(fh)}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _error(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


def _check_stratified(folds: list[list[str]], subtype_of: dict[str, int]) -> None:
    """Each subtype is dealt evenly over the folds, and the folds have (almost) equal sizes."""
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for subtype in set(subtype_of.values()):
        per_fold = [sum(subtype_of[c] == subtype for c in fold) for fold in folds]
        assert max(per_fold) - min(per_fold) <= 1, (subtype, per_fold)


# --------------------------------------------------------------------------------------------
# quiz layout


def test_quiz_layout_builds_the_nnunet_dataset(tmp_path: Path) -> None:
    config = _quiz_config(tmp_path)
    result = prepare(config)
    out = _out(tmp_path)
    assert result.dataset_dir == out
    assert not result.up_to_date
    assert (result.count("train"), result.count("validation"), result.count("test")) == (6, 3, 2)
    assert result.subtype_counts == {0: 3, 1: 3, 2: 3}
    assert result.converted == 0
    assert result.official_split and result.folds == 5

    labelled = sorted(QUIZ_TRAIN + QUIZ_VAL)
    expected = (
        {f"imagesTr/{c}_0000.nii.gz" for c in labelled}
        | {f"labelsTr/{c}.nii.gz" for c in labelled}
        | {f"imagesTs/{c}_0000.nii.gz" for c in QUIZ_TEST}
        | {"dataset.json", "splits_final.json", "subtypes.csv", RECORD_NAME}
    )
    assert _files(out) == expected
    assert sorted(c.case_id for c in result.cases if c.split != "test") == labelled

    # the prepared files hold the source bytes (hard link or copy)
    src = tmp_path / "data"
    pairs = [
        (src / "train/subtype0/quiz_0_001_0000.nii.gz", out / "imagesTr/quiz_0_001_0000.nii.gz"),
        (src / "validation/subtype2/quiz_2_009.nii.gz", out / "labelsTr/quiz_2_009.nii.gz"),
        (src / "test/quiz_002_0000.nii.gz", out / "imagesTs/quiz_002_0000.nii.gz"),
    ]
    for source, prepared in pairs:
        assert prepared.read_bytes() == source.read_bytes()

    data = json.loads((out / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "CT"}
    assert data["labels"] == {"background": 0, "pancreas": [1, 2], "lesion": 2}  # regions, the default
    assert data["regions_class_order"] == [1, 2]
    assert data["numTraining"] == 9
    assert data["file_ending"] == ".nii.gz"
    assert data["name"] == "PancreasCancer"

    assert _subtypes(out) == {c: int(c.split("_")[1]) for c in labelled}
    assert (out / "subtypes.csv").read_text().splitlines()[0] == "case_id,subtype"


def test_label_dataset_json(tmp_path: Path) -> None:
    config = _quiz_config(tmp_path, extra="  region_based: false\n")
    prepare(config)
    data = json.loads((_out(tmp_path) / "dataset.json").read_text())
    assert data["labels"] == {"background": 0, "pancreas": 1, "lesion": 2}
    assert "regions_class_order" not in data
    assert data["numTraining"] == 9


def test_quiz_images_with_and_without_channel_suffix_in_test(tmp_path: Path) -> None:
    """Test images keep their id; a missing _0000 suffix is added in imagesTs."""
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=0)
    write(ct_volume(), tmp_path / "data" / "test" / "extra_case.nii.gz")
    prepare(_config(tmp_path))
    assert _files(_out(tmp_path) / "imagesTs") == {"extra_case_0000.nii.gz"}


# --------------------------------------------------------------------------------------------
# splits


def test_splits_fold0_is_the_official_split(tmp_path: Path) -> None:
    config = _quiz_config(tmp_path, per_subtype=4, validation=2)
    result = prepare(config)
    splits = json.loads((result.dataset_dir / "splits_final.json").read_text())
    subtype_of = _subtypes(result.dataset_dir)
    official_train = sorted(c.case_id for c in result.cases if c.split == "train")
    official_val = sorted(c.case_id for c in result.cases if c.split == "validation")
    labelled = sorted(subtype_of)
    assert len(labelled) == 18 and len(official_val) == 6

    assert len(splits) == 5 and result.folds == 5
    assert sorted(splits[0]["train"]) == official_train
    assert sorted(splits[0]["val"]) == official_val
    assert not set(official_val) & set(splits[0]["train"])

    # folds 1..4 are folds 1..4 of the stratified 5-fold over all labelled cases
    vals = [set(s["val"]) for s in splits[1:]]
    for split, val in zip(splits[1:], vals):
        assert set(split["train"]) | val == set(labelled)
        assert not set(split["train"]) & val
    for i in range(len(vals)):
        for j in range(i + 1, len(vals)):
            assert not vals[i] & vals[j]
    as_train = [SourceCase(c.case_id, "train", c.image, c.mask, c.subtype) for c in result.cases if c.split != "test"]
    stratified = make_splits(as_train, 5, config.dataset.split_seed)
    assert splits[1:] == stratified[1:]
    assert set().union(*vals) | set(stratified[0]["val"]) == set(labelled)
    _check_stratified([s["val"] for s in stratified], subtype_of)


def test_splits_without_validation_are_stratified_and_deterministic(tmp_path: Path) -> None:
    config = _quiz_config(tmp_path, per_subtype=4, validation=0)
    result = prepare(config)
    assert not result.official_split
    splits = json.loads((result.dataset_dir / "splits_final.json").read_text())
    subtype_of = _subtypes(result.dataset_dir)
    assert len(splits) == 5
    vals = [s["val"] for s in splits]
    assert sorted(c for v in vals for c in v) == sorted(subtype_of)  # a partition of all cases
    for split in splits:
        assert sorted(split["train"] + split["val"]) == sorted(subtype_of)
    _check_stratified(vals, subtype_of)

    # same seed, same folds (another project folder); another seed, other folds
    again = prepare(load_config(config.config_path, ["project_dir=./work2"]))
    assert json.loads((again.dataset_dir / "splits_final.json").read_text()) == splits
    other = make_splits(result.cases, 5, config.dataset.split_seed + 1)
    assert other != splits
    _check_stratified([s["val"] for s in other], subtype_of)


def test_fewer_cases_than_folds_gives_one_fold_per_case(tmp_path: Path) -> None:
    config = _quiz_config(tmp_path, per_subtype=1, validation=0, test=0)
    result = prepare(config)
    splits = json.loads((result.dataset_dir / "splits_final.json").read_text())
    assert result.folds == len(splits) == 3
    assert sorted(len(s["val"]) for s in splits) == [1, 1, 1]
    assert result.notes == ["3 labelled cases: 3 folds instead of dataset.num_folds = 5"]


def test_num_folds_is_respected(tmp_path: Path) -> None:
    config = _quiz_config(tmp_path, extra="  num_folds: 3\n", per_subtype=3, validation=0)
    result = prepare(config)
    splits = json.loads((result.dataset_dir / "splits_final.json").read_text())
    assert len(splits) == 3
    assert all(Counter(_subtypes(result.dataset_dir)[c] for c in s["val"]) == {0: 1, 1: 1, 2: 1} for s in splits)


# --------------------------------------------------------------------------------------------
# seed layout


def _seed(root: Path, n: int = 4, subtypes: str | None = None) -> Config:
    src = root / "seed"
    for i in range(1, n + 1):
        write(ct_volume(seed=i), src / "imagesTr" / f"img_{i:03d}.nii.gz")
        write(label_volume(), src / "labelsTr" / f"mask_{i:03d}.nii.gz")
    write(ct_volume(seed=99), src / "imagesTs" / "img_101.nii.gz")
    if subtypes is None:
        subtypes = "case_id,subtype\n" + "".join(f"img_{i:03d},{i % 3}\n" for i in range(1, n + 1))
    (root / "subtypes.csv").write_text(subtypes)
    return _config(root, "  source: ./seed\n  layout: seed\n  subtypes_csv: ./subtypes.csv\n")


def test_seed_layout(tmp_path: Path) -> None:
    result = prepare(_seed(tmp_path))
    out = result.dataset_dir
    ids = [f"img_{i:03d}" for i in range(1, 5)]
    assert sorted(c.case_id for c in result.cases if c.split == "train") == ids
    assert _files(out / "imagesTr") == {f"{c}_0000.nii.gz" for c in ids}
    assert _files(out / "labelsTr") == {f"{c}.nii.gz" for c in ids}
    assert _files(out / "imagesTs") == {"img_101_0000.nii.gz"}
    assert _subtypes(out) == {c: int(c[-1]) % 3 for c in ids}
    assert (out / "labelsTr" / "img_002.nii.gz").read_bytes() == (tmp_path / "seed/labelsTr/mask_002.nii.gz").read_bytes()
    assert not result.official_split and result.folds == 4


def test_seed_layout_missing_subtype_row(tmp_path: Path) -> None:
    config = _seed(tmp_path, subtypes="case_id,subtype\nimg_001,0\nimg_002,1\nimg_004,2\n")
    with pytest.raises(PrepareError) as excinfo:
        prepare(config)
    msg = _error(excinfo)
    assert "img_003" in msg and str(tmp_path / "subtypes.csv") in msg
    assert "add a row" in msg


def test_seed_layout_bad_subtype(tmp_path: Path) -> None:
    config = _seed(tmp_path, subtypes="case_id,subtype\nimg_001,0\nimg_002,3\nimg_003,1\nimg_004,2\n")
    with pytest.raises(PrepareError) as excinfo:
        prepare(config)
    msg = _error(excinfo)
    assert "subtypes.csv" in msg and "img_002" in msg and "'3'" in msg and "0, 1 or 2" in msg


def test_seed_layout_missing_column(tmp_path: Path) -> None:
    config = _seed(tmp_path, subtypes="case,subtype\nimg_001,0\n")
    with pytest.raises(PrepareError, match="missing column.*case_id"):
        prepare(config)


# --------------------------------------------------------------------------------------------
# manifest layout


def _manifest(root: Path, rows: list[str], n: int = 3) -> Config:
    """Images under root/files/, the manifest in root/lists/ (so paths are relative: ../files/...)."""
    files = root / "files"
    for i in range(1, n + 1):
        write(ct_volume(seed=i), files / f"ct{i}.nii.gz")
        write(label_volume(), files / f"seg{i}.nii.gz")
    (root / "lists").mkdir()
    (root / "lists" / "cases.csv").write_text("case_id,image,mask,subtype,split\n" + "".join(r + "\n" for r in rows))
    return _config(root, "  layout: manifest\n  manifest: ./lists/cases.csv\n")


def test_manifest_layout(tmp_path: Path) -> None:
    config = _manifest(
        tmp_path,
        [
            "a1,../files/ct1.nii.gz,../files/seg1.nii.gz,0,train",
            "a2,../files/ct2.nii.gz,../files/seg2.nii.gz,2,Validation",
            "a3,../files/ct3.nii.gz,../files/seg3.nii.gz,1,train",
            "t1,../files/ct1.nii.gz,,,test",
        ],
    )
    result = prepare(config)
    out = result.dataset_dir
    assert [(c.case_id, c.split, c.subtype) for c in result.cases] == [
        ("a1", "train", 0), ("a2", "validation", 2), ("a3", "train", 1), ("t1", "test", None)
    ]
    assert _files(out / "labelsTr") == {"a1.nii.gz", "a2.nii.gz", "a3.nii.gz"}
    assert _files(out / "imagesTs") == {"t1_0000.nii.gz"}
    assert (out / "imagesTr" / "a2_0000.nii.gz").read_bytes() == (tmp_path / "files/ct2.nii.gz").read_bytes()
    assert _subtypes(out) == {"a1": 0, "a2": 2, "a3": 1}
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits[0] == {"train": ["a1", "a3"], "val": ["a2"]}


def test_moved_manifest_names_dataset_manifest(tmp_path: Path) -> None:
    """The record's source of a manifest layout is the manifest: the refusal names the key the user set."""
    rows = ["a1,../files/ct1.nii.gz,../files/seg1.nii.gz,0,train", "a2,../files/ct2.nii.gz,../files/seg2.nii.gz,1,train"]
    prepare(_manifest(tmp_path, rows))
    shutil.copy(tmp_path / "lists" / "cases.csv", tmp_path / "lists" / "other.csv")
    moved = _config(tmp_path, "  layout: manifest\n  manifest: ./lists/other.csv\n")
    with pytest.raises(OutputExistsError) as excinfo:
        prepare(moved)
    msg = _error(excinfo)
    assert "dataset.manifest" in msg and "other.csv" in msg and "dataset.source" not in msg


@pytest.mark.parametrize(
    "row, expected",
    [
        ("a2,../files/ct2.nii.gz,../files/seg2.nii.gz,1,training", ["line 3", "split must be train, validation or test", "'training'"]),
        ("a2,../files/missing.nii.gz,../files/seg2.nii.gz,1,train", ["line 3", "file not found", "missing.nii.gz"]),
        ("a2,../files/ct2.nii.gz,,1,train", ["line 3", "a2 needs a mask"]),
        ("a2,../files/ct2.nii.gz,../files/seg2.nii.gz,,train", ["line 3", "unknown subtype", "0, 1 or 2"]),
        ("a2,,../files/seg2.nii.gz,1,train", ["line 3", "no image path"]),
        ("a 2,../files/ct2.nii.gz,../files/seg2.nii.gz,1,train", ["'a 2'", "rename it"]),
    ],
    ids=["bad-split", "missing-file", "no-mask", "no-subtype", "no-image", "bad-case-id"],
)
def test_manifest_errors_name_the_line(tmp_path: Path, row: str, expected: list[str]) -> None:
    config = _manifest(tmp_path, ["a1,../files/ct1.nii.gz,../files/seg1.nii.gz,0,train", row,
                                  "a3,../files/ct3.nii.gz,../files/seg3.nii.gz,2,train"])
    with pytest.raises(PrepareError) as excinfo:
        prepare(config)
    msg = _error(excinfo)
    if "line 3" in expected:
        assert str(tmp_path / "lists" / "cases.csv") in msg
    for part in expected:
        assert part in msg


def test_manifest_not_an_image_extension(tmp_path: Path) -> None:
    config = _manifest(tmp_path, ["a1,../files/ct1.nii.gz,../files/seg1.nii.gz,0,train",
                                  "a2,../lists/cases.csv,../files/seg2.nii.gz,1,train"])
    with pytest.raises(PrepareError, match=r"line 3: cases\.csv is not a \.nii\.gz, \.nii, \.nrrd or \.mha file"):
        prepare(config)


# --------------------------------------------------------------------------------------------
# format conversion


def test_other_formats_are_converted_to_nii_gz(tmp_path: Path) -> None:
    files = tmp_path / "files"
    spacing, origin = (0.5, 0.75, 2.5), (10.0, -20.0, 5.0)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = []
    for i, ext in enumerate((".nii", ".nrrd", ".mha")):
        ct, lab = ct_volume(seed=i), label_volume()
        lab[0, 0, 0] = i  # make the masks tell apart
        write(ct, files / f"ct{i}{ext}", spacing=spacing, origin=origin)
        write(lab, files / f"seg{i}{ext}", spacing=spacing, origin=origin)
        arrays[f"c{i}"] = (ct, lab)
        rows.append(f"c{i},files/ct{i}{ext},files/seg{i}{ext},{i},train")
    write(ct_volume(seed=9), files / "test.mha")
    rows.append("t9,files/test.mha,,,test")
    (tmp_path / "cases.csv").write_text("case_id,image,mask,subtype,split\n" + "\n".join(rows) + "\n")
    config = _config(tmp_path, "  layout: manifest\n  manifest: ./cases.csv\n")
    before = snapshot(files)

    result = prepare(config)
    assert result.converted == 7
    out = result.dataset_dir
    assert _files(out / "imagesTr") == {"c0_0000.nii.gz", "c1_0000.nii.gz", "c2_0000.nii.gz"}
    assert _files(out / "imagesTs") == {"t9_0000.nii.gz"}
    for case, (ct, lab) in arrays.items():
        for path, array in ((out / "imagesTr" / f"{case}_0000.nii.gz", ct), (out / "labelsTr" / f"{case}.nii.gz", lab)):
            image = sitk.ReadImage(str(path))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
            assert sitk.GetArrayViewFromImage(image).dtype == array.dtype
            np.testing.assert_allclose(image.GetSpacing(), spacing)
            np.testing.assert_allclose(image.GetOrigin(), origin)
    np.testing.assert_array_equal(_array(out / "imagesTs" / "t9_0000.nii.gz"), ct_volume(seed=9))
    assert snapshot(files) == before

    again = prepare(config)
    assert again.up_to_date and again.converted == 0


def test_unreadable_source_to_convert_is_a_prepare_error(tmp_path: Path) -> None:
    files = tmp_path / "files"
    write(ct_volume(), files / "ct1.nii.gz")
    write(label_volume(), files / "seg1.nii.gz")
    write(ct_volume(), files / "ct2.nii.gz")
    (files / "seg2.mha").write_bytes(b"not an image at all")
    (tmp_path / "cases.csv").write_text(
        "case_id,image,mask,subtype,split\na,files/ct1.nii.gz,files/seg1.nii.gz,0,train\n"
        "b,files/ct2.nii.gz,files/seg2.mha,1,train\n"
    )
    config = _config(tmp_path, "  layout: manifest\n  manifest: ./cases.csv\n")
    with pytest.raises(PrepareError, match="seg2.mha: cannot read image"):
        prepare(config)
    assert not config.dataset_raw_dir.exists()


# --------------------------------------------------------------------------------------------
# source errors


def _move(src: Path, rel: str, to: str) -> None:
    (src / to).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src / rel, src / to)


def _empty(src: Path) -> None:
    for p in list(src.iterdir()):
        shutil.rmtree(p)


def _one_labelled(src: Path) -> None:
    for folder in ("train/subtype1", "train/subtype2", "validation"):
        shutil.rmtree(src / folder)
    for name in ("quiz_0_002.nii.gz", "quiz_0_002_0000.nii.gz"):
        (src / "train/subtype0" / name).unlink()


ERRORS = {
    "mask-without-image": (
        lambda s: (s / "train/subtype0/quiz_0_001_0000.nii.gz").unlink(),
        ["train/subtype0/quiz_0_001.nii.gz", "mask without image", "expected", "quiz_0_001_0000.nii.gz"],
    ),
    "image-without-mask": (
        lambda s: (s / "train/subtype1/quiz_1_003.nii.gz").unlink(),
        ["train/subtype1/quiz_1_003_0000.nii.gz", "image without mask", "expected", "subtype1/quiz_1_003.nii.gz"],
    ),
    "duplicate-case-id": (
        lambda s: [shutil.copy(s / f"train/subtype0/quiz_0_001{x}.nii.gz", s / f"validation/subtype0/quiz_0_001{x}.nii.gz")
                   for x in ("", "_0000")],
        ["duplicate case id 'quiz_0_001'", "train/subtype0/quiz_0_001_0000.nii.gz",
         "validation/subtype0/quiz_0_001_0000.nii.gz", "must be unique"],
    ),
    "unknown-subtype-folder": (
        lambda s: _move(s, "train/subtype2", "train/subtype7"),
        ["train/subtype7", "unknown subtype '7'", "0, 1 or 2"],
    ),
    "non-subtype-folder": (
        lambda s: _move(s, "train/subtype2", "train/pancreas"),
        ["train/pancreas", "unexpected folder", "subtype0, subtype1, subtype2"],
    ),
    "image-outside-subtype-folder": (
        lambda s: _move(s, "train/subtype2/quiz_2_005_0000.nii.gz", "train/quiz_2_005_0000.nii.gz"),
        ["train/quiz_2_005_0000.nii.gz", "outside a subtype folder", "train/subtype0|subtype1|subtype2"],
    ),
    "empty-source": (_empty, ["no train/ folder", "dataset.layout"]),
    "empty-train-folder": (lambda s: (_empty(s), (s / "train").mkdir()), ["no cases found for layout 'quiz'"]),
    "one-labelled-case": (_one_labelled, ["at least 2 labelled (train/validation) cases are needed"]),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_source_errors_name_the_file_and_the_fix(tmp_path: Path, name: str) -> None:
    mutate, expected = ERRORS[name]
    source = make_quiz(tmp_path / "data")
    mutate(source)
    config = _config(tmp_path)
    before = snapshot(source)
    with pytest.raises(PrepareError) as excinfo:
        prepare(config)
    msg = _error(excinfo)
    assert str(source) in msg  # the file, or the source folder, is named
    for part in expected:
        assert part in msg, (part, msg)
    assert not config.raw_dir.exists()  # nothing half-written
    assert snapshot(source) == before


# --------------------------------------------------------------------------------------------
# the source is never modified; idempotency and changed sources


def test_source_is_never_modified(quiz_project: Path) -> None:
    source = quiz_project / "data"
    before = snapshot(source)
    config = load_config(quiz_project / "pancseg.yaml")
    prepare(config)
    prepare(config, force=True)
    assert snapshot(source) == before
    # CTs are hard links (or copies): replacing one by rename leaves the source alone
    prepared_ct = config.dataset_raw_dir / "imagesTr" / "quiz_0_001_0000.nii.gz"
    src_ct = source / "train" / "subtype0" / "quiz_0_001_0000.nii.gz"
    assert prepared_ct.read_bytes() == src_ct.read_bytes()
    write_image(sitk.GetImageFromArray(np.zeros((8, 16, 16), np.int16)), prepared_ct)
    assert snapshot(source) == before
    # masks are copies: a source mask edited in place (ITK writes into the same file) changes only itself
    prepared = config.dataset_raw_dir / "labelsTr" / "quiz_0_001.nii.gz"
    src = source / "train" / "subtype0" / "quiz_0_001.nii.gz"
    assert prepared.read_bytes() == src.read_bytes() and prepared.stat().st_ino != src.stat().st_ino
    kept = prepared.read_bytes()
    with src.open("r+b") as fh:  # an in-place edit
        fh.write(b"\0")
    assert prepared.read_bytes() == kept


def test_second_prepare_is_up_to_date_and_touches_nothing(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    first = prepare(config)
    stats = _stats(first.dataset_dir)
    second = prepare(config)
    assert second.up_to_date
    assert second.folds == first.folds == 5 and second.official_split
    assert [c.case_id for c in second.cases] == [c.case_id for c in first.cases]
    assert _stats(first.dataset_dir) == stats


def test_changed_source_needs_force(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    prepare(config)
    out = config.dataset_raw_dir
    folder = quiz_project / "data" / "train" / "subtype1"
    write(ct_volume(seed=50), folder / "quiz_1_050_0000.nii.gz")
    write(label_volume(), folder / "quiz_1_050.nii.gz")
    stats = _stats(out)

    with pytest.raises(OutputExistsError) as excinfo:
        prepare(config)
    msg = _error(excinfo)
    assert str(out) in msg and "--force" in msg
    assert "1 case(s) added (e.g. quiz_1_050)" in msg
    assert _stats(out) == stats  # untouched

    result = prepare(config, force=True)
    assert not result.up_to_date
    assert (out / "labelsTr" / "quiz_1_050.nii.gz").is_file()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 10
    assert _subtypes(out)["quiz_1_050"] == 1
    assert prepare(config).up_to_date


def test_changed_settings_are_named(quiz_project: Path) -> None:
    prepare(load_config(quiz_project / "pancseg.yaml"))
    changed = load_config(quiz_project / "pancseg.yaml", ["dataset.split_seed=7"])
    with pytest.raises(OutputExistsError, match=r"split_seed 12345 -> 7.*--force"):
        prepare(changed)
    # a project prepared with labels, before regions became the default: the key and the way back are named
    labels = load_config(quiz_project / "pancseg.yaml", ["dataset.region_based=false"])
    with pytest.raises(OutputExistsError, match=r"dataset\.region_based True -> False.*set changed dataset"):
        prepare(labels)
    (quiz_project / "data" / "test" / "quiz_002_0000.nii.gz").unlink()
    with pytest.raises(OutputExistsError, match=r"1 case\(s\) removed \(e\.g\. quiz_002\)"):
        prepare(load_config(quiz_project / "pancseg.yaml"))


def test_modified_source_file_is_detected(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    prepare(config)
    mask = quiz_project / "data" / "validation" / "subtype0" / "quiz_0_007.nii.gz"
    write(label_volume(lesion=False), mask)
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    with pytest.raises(OutputExistsError, match=r"1 case\(s\) changed \(e\.g\. quiz_0_007\)"):
        prepare(config)
    prepare(config, force=True)
    np.testing.assert_array_equal(_array(config.dataset_raw_dir / "labelsTr" / "quiz_0_007.nii.gz"),
                                  label_volume(lesion=False))


def test_another_dataset_with_the_same_id(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    other = config.raw_dir / "Dataset001_Other"
    other.mkdir(parents=True)
    (other / "dataset.json").write_text("{}")
    with pytest.raises(OutputExistsError) as excinfo:
        prepare(config)
    msg = _error(excinfo)
    assert str(other) in msg and "dataset.id" in msg and "--force" in msg
    assert not config.dataset_raw_dir.exists()

    # another id is fine and leaves the other dataset alone
    moved = prepare(load_config(quiz_project / "pancseg.yaml", ["dataset.id=2"]))
    assert moved.dataset_dir.name == "Dataset002_PancreasCancer" and other.is_dir()

    result = prepare(config, force=True)
    assert result.dataset_dir.is_dir() and not other.exists()


def test_deleted_prepared_file_is_rebuilt_without_force(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    prepare(config)
    missing = config.dataset_raw_dir / "labelsTr" / "quiz_2_005.nii.gz"
    missing.unlink()
    result = prepare(config)
    assert not result.up_to_date
    assert any("rebuilt" in note for note in result.notes)
    assert missing.read_bytes() == (quiz_project / "data/train/subtype2/quiz_2_005.nii.gz").read_bytes()
    assert prepare(config).up_to_date


def test_notes_reach_stderr_with_json(quiz_project: Path, runner: CliRunner) -> None:
    cfg = str(quiz_project / "pancseg.yaml")
    assert runner.invoke(app, ["prepare", "-c", cfg]).exit_code == 0
    (load_config(quiz_project / "pancseg.yaml").dataset_raw_dir / "labelsTr" / "quiz_2_005.nii.gz").unlink()
    result = runner.invoke(app, ["prepare", "-c", cfg, "--json"])
    assert result.exit_code == 0 and "rebuilt" in result.stderr
    assert any("rebuilt" in note for note in json.loads(result.stdout)["notes"])


def test_folder_not_made_by_prepare_needs_force(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    config.dataset_raw_dir.mkdir(parents=True)
    (config.dataset_raw_dir / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not made by pancseg prepare.*--force"):
        prepare(config)
    assert (config.dataset_raw_dir / "mine.txt").read_text() == "keep"
    prepare(config, force=True)
    assert not (config.dataset_raw_dir / "mine.txt").exists()


def test_leftover_temporary_folder_is_replaced(quiz_project: Path) -> None:
    config = load_config(quiz_project / "pancseg.yaml")
    tmp = config.raw_dir / f".{DATASET}.tmp"
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "imagesTr" / "stale_0000.nii.gz").write_bytes(b"half written")
    result = prepare(config)
    assert not tmp.exists()
    assert not (result.dataset_dir / "imagesTr" / "stale_0000.nii.gz").exists()


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_prepare_summary_and_up_to_date(quiz_project: Path, runner) -> None:
    cfg = str(quiz_project / "pancseg.yaml")
    result = runner.invoke(app, ["prepare", "-c", cfg])
    assert result.exit_code == 0, result.output
    out = quiz_project / "work" / "nnUNet_raw" / DATASET
    assert f"prepared: {out}" in result.stdout
    assert "6 train, 3 validation, 2 test; subtypes 0/1/2: 3/3/3; 5 folds (fold 0 = official validation split)" in result.stdout

    again = runner.invoke(app, ["prepare", "-c", cfg])
    assert again.exit_code == 0
    assert f"up to date: {out}" in again.stdout


def test_cli_prepare_json(quiz_project: Path, runner) -> None:
    result = runner.invoke(app, ["prepare", "-c", str(quiz_project / "pancseg.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["train"] == 6 and data["validation"] == 3 and data["test"] == 2
    assert data["subtypes"] == {"0": 3, "1": 3, "2": 3}
    assert data["folds"] == 5 and data["official_split"] is True
    assert data["up_to_date"] is False and data["converted"] == 0
    assert data["dataset_dir"] == str(quiz_project / "work" / "nnUNet_raw" / DATASET)


def test_cli_prepare_error_has_no_traceback(quiz_project: Path, runner) -> None:
    (quiz_project / "data" / "train" / "subtype0" / "quiz_0_001_0000.nii.gz").unlink()
    result = runner.invoke(app, ["prepare", "-c", str(quiz_project / "pancseg.yaml")])
    assert result.exit_code == 1
    assert "error: " in result.stderr and "mask without image" in result.stderr
    assert "quiz_0_001.nii.gz" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_cli_prepare_existing_output_mentions_force(quiz_project: Path, runner) -> None:
    cfg = str(quiz_project / "pancseg.yaml")
    assert runner.invoke(app, ["prepare", "-c", cfg]).exit_code == 0
    result = runner.invoke(app, ["prepare", "-c", cfg, "--set", "dataset.num_folds=3"])
    assert result.exit_code == 1
    assert "error: " in result.stderr and "--force" in result.stderr and "num_folds 5 -> 3" in result.stderr
    forced = runner.invoke(app, ["prepare", "-c", cfg, "--set", "dataset.num_folds=3", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "3 folds" in forced.stdout


def test_cli_prepare_bad_layout_override(quiz_project: Path, runner) -> None:
    result = runner.invoke(app, ["prepare", "-c", str(quiz_project / "pancseg.yaml"), "--set", "dataset.layout=bogus"])
    assert result.exit_code == 1
    assert "error: " in result.stderr
    assert any(line.strip().startswith("dataset.layout:") and "bogus" in line for line in result.stderr.splitlines())
    assert "Traceback" not in result.output
    assert not (quiz_project / "work").exists()

