"""Tests of ``pancseg clean``: planted problems, fixes with kept originals, --check, idempotency, CLI."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SPACING_XYZ, ct_volume, label_volume, snapshot, write, write_config

from pancreas_cli.cli import app
from pancreas_cli.clean import REPORT_NAME, CleanResult, clean
from pancreas_cli.config import Config, load_config
from pancreas_cli.exceptions import CleanError
from pancreas_cli.prepare import prepare

SHAPE = (8, 16, 16)
BAD = "quiz_0_001"  # the case that gets the planted problem
CASES = {"quiz_0_001": 0, "quiz_1_002": 1, "quiz_2_003": 2}
TEST_CASE = "quiz_001"


# --------------------------------------------------------------------------------------------
# helpers


def _ct(seed: int = 0) -> np.ndarray:
    """conftest's CT plus a little bone, so that the value range looks like real CT (air .. bone)."""
    vol = ct_volume(SHAPE, seed=seed)
    vol[4, 8, 8:10] = 700
    return vol


def _write(array: np.ndarray, path: Path, spacing: tuple[float, ...] = SPACING_XYZ,
           origin: tuple[float, ...] = (0.0, 0.0, 0.0)) -> Path:
    return write(array, path, spacing=spacing, origin=origin)


def _source_paths(root: Path, case: str = BAD) -> tuple[Path, Path]:
    folder = root / "data" / "train" / f"subtype{CASES[case]}"
    return folder / f"{case}_0000.nii.gz", folder / f"{case}.nii.gz"


def _dataset(root: Path, plant: Callable[[Path, Path], None] | None = None, clean_yaml: str = "",
             mask: Callable[[str], np.ndarray] | None = None) -> Config:
    """Three labelled cases and one test case in quiz layout; ``plant(image, mask)`` overwrites BAD's
    source files before ``prepare`` (which links them as they are), then prepares."""
    for i, case in enumerate(CASES, start=1):
        image_path, mask_path = _source_paths(root, case)
        _write(_ct(seed=i), image_path)
        _write(mask(case) if mask else label_volume(SHAPE), mask_path)
    _write(_ct(seed=50), root / "data" / "test" / f"{TEST_CASE}_0000.nii.gz")
    if plant is not None:
        plant(*_source_paths(root))
    text = "project_dir: ./work\ndataset:\n  source: ./data\n" + (f"clean:\n{clean_yaml}" if clean_yaml else "")
    config = load_config(write_config(root, text))
    prepare(config)
    return config


def _reconfigure(root: Path, clean_yaml: str) -> Config:
    text = "project_dir: ./work\ndataset:\n  source: ./data\n" + (f"clean:\n{clean_yaml}" if clean_yaml else "")
    return load_config(write_config(root, text))


def _report(result: CleanResult) -> list[dict[str, str]]:
    assert result.report is not None
    with result.report.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["case", "problem", "detail", "action", "severity"]
        return list(reader)


def _problems(result: CleanResult, severity: str, case: str = BAD) -> set[str]:
    return {f.problem for f in result.findings if f.severity == severity and f.case == case}


def _stats(folder: Path, skip: tuple[str, ...] = (REPORT_NAME,)) -> dict[str, tuple[int, int, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and p.name not in skip
    }


def _image(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(_image(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# planted problems ---------------------------------------------------------------------------


def _float_mask(image: Path, mask: Path) -> None:
    labels = label_volume(SHAPE).astype(np.float32)
    labels[labels == 1] = np.float32(1.0000152587890625)
    _write(labels, mask)


def _shifted_mask(image: Path, mask: Path) -> None:
    _write(label_volume(SHAPE), mask, origin=(1e-4, 0.0, 0.0))


def _int32_ct(image: Path, mask: Path) -> None:
    _write(_ct(seed=1).astype(np.int32), image)


def _int16_mask(image: Path, mask: Path) -> None:
    _write(label_volume(SHAPE).astype(np.int16), mask)


def _label5(image: Path, mask: Path) -> None:
    labels = label_volume(SHAPE)
    labels[0, 0, :4] = 5
    _write(labels, mask)


def _spacing_off(image: Path, mask: Path) -> None:
    _write(label_volume(SHAPE), mask, spacing=(SPACING_XYZ[0] * 1.1, SPACING_XYZ[1], SPACING_XYZ[2]))


def _origin_off(image: Path, mask: Path) -> None:
    _write(label_volume(SHAPE), mask, origin=(0.0, 1.0, 0.0))


def _shape_off(image: Path, mask: Path) -> None:
    _write(label_volume(SHAPE)[:, :, :15].copy(), mask)


def _nan_ct(image: Path, mask: Path) -> None:
    ct = _ct(seed=1).astype(np.float32)
    ct[1, 1, 1] = np.nan
    _write(ct, image)


def _nan_mask(image: Path, mask: Path) -> None:
    labels = label_volume(SHAPE).astype(np.float32)
    labels[0, 0, 0] = np.nan
    _write(labels, mask)


def _interpolated_mask(image: Path, mask: Path) -> None:
    labels = label_volume(SHAPE).astype(np.float32)
    labels[2, 5, 4] = 0.4
    _write(labels, mask)


def _ct_4d(image: Path, mask: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([_ct(1), _ct(2)]), isVector=False), str(image))


def _truncated_ct(image: Path, mask: Path) -> None:
    _truncate(image)


def _short_ct(image: Path, mask: Path) -> None:
    """A complete gzip stream whose NIfTI voxel data stops short (SimpleITK reads it silently)."""
    raw = gzip.decompress(image.read_bytes())
    image.write_bytes(gzip.compress(raw[: len(raw) - 100]))


def _truncated_mask(image: Path, mask: Path) -> None:
    _truncate(mask)


def _garbage_mask(image: Path, mask: Path) -> None:
    mask.write_bytes(b"this is not a NIfTI file\n" * 20)


def _no_lesion(image: Path, mask: Path) -> None:
    _write(label_volume(SHAPE, lesion=False), mask)


def _empty_mask(image: Path, mask: Path) -> None:
    _write(np.zeros(SHAPE, np.uint8), mask)


def _unit_ct(image: Path, mask: Path) -> None:
    ct = (_ct(seed=1).astype(np.float32) + 1024) / 4000
    _write(ct, image)


# --------------------------------------------------------------------------------------------
# a clean dataset


def test_clean_dataset_has_no_findings(tmp_path: Path) -> None:
    config = _dataset(tmp_path)
    before = snapshot(config.dataset_raw_dir)
    result = clean(config)
    assert result.cases == 4
    assert result.findings == [] and not result.changed_files
    assert _report(result) == []
    assert result.summary().startswith("4 cases checked: 0 errors, 0 problems fixed, 0 warnings")
    after = snapshot(config.dataset_raw_dir)
    assert after.pop(REPORT_NAME)
    assert after == before
    assert not (config.dataset_raw_dir / "labelsTr_original").exists()


def test_clean_before_prepare_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    config = load_config(write_config(tmp_path, "project_dir: ./work\ndataset:\n  source: ./data\n"))
    with pytest.raises(CleanError, match=r"no prepared dataset; run `pancseg prepare` first"):
        clean(config)


def test_missing_prepared_mask_is_an_error(tmp_path: Path) -> None:
    config = _dataset(tmp_path)
    (config.dataset_raw_dir / "labelsTr" / f"{BAD}.nii.gz").unlink()
    with pytest.raises(CleanError, match=rf"{BAD}\.nii\.gz: mask missing.*prepare --force"):
        clean(config)


# --------------------------------------------------------------------------------------------
# fixable problems


@dataclass
class Fix:
    plant: Callable[[Path, Path], None]
    problems: set[str]
    target: str  # "image" or "mask"
    check: Callable[[sitk.Image, sitk.Image], None]  # (fixed file, prepared image of the case)
    clean_yaml: str = ""


def _is_reference_mask(fixed: sitk.Image, image: sitk.Image) -> None:
    assert fixed.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed), label_volume(SHAPE))
    assert fixed.GetOrigin() == image.GetOrigin()
    assert fixed.GetSpacing() == image.GetSpacing()
    assert fixed.GetDirection() == image.GetDirection()


def _is_int16_ct(fixed: sitk.Image, image: sitk.Image) -> None:
    assert fixed.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed), _ct(seed=1))
    assert fixed.GetSpacing() == image.GetSpacing() and fixed.GetOrigin() == image.GetOrigin()


def _label5_to_background(fixed: sitk.Image, image: sitk.Image) -> None:
    expected = label_volume(SHAPE)
    expected[0, 0, :4] = 0
    assert fixed.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fixed), expected)


FIXES = {
    "float-labels": Fix(_float_mask, {"float labels", "label type"}, "mask", _is_reference_mask),
    "origin-offset": Fix(_shifted_mask, {"geometry differs slightly"}, "mask", _is_reference_mask),
    "int16-mask": Fix(_int16_mask, {"label type"}, "mask", _is_reference_mask),
    "int32-ct": Fix(_int32_ct, {"wide integer CT"}, "image", _is_int16_ct),
    "unknown-label-to-background": Fix(_label5, {"unknown labels"}, "mask", _label5_to_background,
                                       clean_yaml="  unknown_labels: background\n"),
}


@pytest.mark.parametrize("name", list(FIXES))
def test_fixable_problem(tmp_path: Path, name: str) -> None:
    spec = FIXES[name]
    config = _dataset(tmp_path, spec.plant, spec.clean_yaml)
    ds = config.dataset_raw_dir
    source = tmp_path / "data"
    source_before = snapshot(source)
    src_image, src_mask = _source_paths(tmp_path)
    folder, name_ = ("imagesTr", f"{BAD}_0000.nii.gz") if spec.target == "image" else ("labelsTr", f"{BAD}.nii.gz")
    prepared, src = ds / folder / name_, (src_image if spec.target == "image" else src_mask)

    # --check: reports the pending fixes, changes nothing
    before = snapshot(ds)
    checked = clean(config, check=True)
    assert snapshot(ds) == before
    assert {f.problem for f in checked.fixable} == spec.problems
    assert all(f.case == BAD and f.pending and f.action.startswith("not applied (--check): ") for f in checked.fixable)
    assert not checked.errors and checked.report is None and not checked.changed_files
    assert "fixable problem" in checked.summary() and "without --check" in checked.summary()

    # clean: fixes, keeps the original, writes the report
    result = clean(config)
    assert result.changed_files == [prepared]
    assert not result.errors
    assert _problems(result, "fixed") == spec.problems
    assert all(not f.action.startswith("not applied") for f in result.fixable)
    rows = _report(result)
    assert {(r["case"], r["problem"], r["severity"]) for r in rows if r["severity"] == "fixed"} == {
        (BAD, p, "fixed") for p in spec.problems
    }
    assert all(r["action"] for r in rows)
    original = ds / f"{folder}_original" / name_
    assert original.read_bytes() == src.read_bytes()
    assert _files_in(ds / f"{folder}_original") == {name_}
    spec.check(_image(prepared), _image(ds / "imagesTr" / f"{BAD}_0000.nii.gz"))
    assert snapshot(source) == source_before

    # second run: nothing new written, nothing pending
    stats = _stats(ds)
    again = clean(config)
    assert again.changed_files == []
    assert _stats(ds) == stats
    assert _problems(again, "fixed") == spec.problems
    assert again.fixable == []
    assert all(f.action.endswith("(done by an earlier run)") for f in again.findings if f.severity == "fixed")
    assert {(r["problem"], r["severity"]) for r in _report(again)} >= {(p, "fixed") for p in spec.problems}
    final = clean(config, check=True)
    assert final.fixable == [] and not final.errors
    assert _stats(ds) == stats
    assert snapshot(source) == source_before


def _files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_hard_linked_source_survives_a_fix(tmp_path: Path) -> None:
    config = _dataset(tmp_path, _float_mask)
    _, src_mask = _source_paths(tmp_path)
    prepared = config.dataset_raw_dir / "labelsTr" / f"{BAD}.nii.gz"
    original_bytes = src_mask.read_bytes()
    linked = prepared.stat().st_ino == src_mask.stat().st_ino  # prepare hard-links where it can
    clean(config)
    if linked:
        assert prepared.stat().st_ino != src_mask.stat().st_ino  # replaced by rename, not written into
    assert src_mask.read_bytes() == original_bytes
    assert sitk.GetArrayViewFromImage(_image(src_mask)).dtype == np.float32
    kept = config.dataset_raw_dir / "labelsTr_original" / f"{BAD}.nii.gz"
    assert kept.read_bytes() == original_bytes


def test_test_images_are_audited_and_fixed(tmp_path: Path) -> None:
    config = _dataset(tmp_path)
    ds = config.dataset_raw_dir
    test_src = tmp_path / "data" / "test" / f"{TEST_CASE}_0000.nii.gz"
    _write(_ct(seed=50).astype(np.int32), test_src)
    prepare(config, force=True)
    result = clean(config)
    assert [(f.case, f.problem) for f in result.fixable] == [(TEST_CASE, "wide integer CT")]
    fixed = ds / "imagesTs" / f"{TEST_CASE}_0000.nii.gz"
    assert result.changed_files == [fixed]
    assert _image(fixed).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(_array(fixed), _ct(seed=50))
    assert (ds / "imagesTs_original" / fixed.name).read_bytes() == test_src.read_bytes()
    assert clean(config, check=True).fixable == []


def test_prepare_after_clean_is_up_to_date_and_keeps_fixes(tmp_path: Path) -> None:
    config = _dataset(tmp_path, _float_mask)
    clean(config)
    prepared = config.dataset_raw_dir / "labelsTr" / f"{BAD}.nii.gz"
    assert prepare(config).up_to_date
    assert _image(prepared).GetPixelID() == sitk.sitkUInt8
    assert clean(config, check=True).fixable == []


# --------------------------------------------------------------------------------------------
# label maps (TotalSegmentator-style masks)


def _ts_mask(case: str) -> np.ndarray:
    """Organ labels: 3 somewhere, 7 = pancreas, 12 elsewhere."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 5:11, 4:12] = 7
    labels[0:2, 0:4, 0:4] = 3
    labels[6:8, 12:16, 12:16] = 12
    return labels


def test_label_map_without_unknown_labels_setting_is_an_error(tmp_path: Path) -> None:
    config = _dataset(tmp_path, mask=_ts_mask, clean_yaml="  label_map: {7: 1}\n")
    result = clean(config)
    assert {f.case for f in result.errors} == set(CASES)
    error = next(f for f in result.errors if f.case == BAD)
    assert error.problem == "unknown labels"
    assert "values 3, 12" in error.detail and "expected 0, 7" in error.detail
    assert "clean.unknown_labels: background" in error.action
    assert not result.changed_files
    assert not (config.dataset_raw_dir / "labelsTr_original").exists()


def test_label_map_with_unknown_labels_to_background(tmp_path: Path) -> None:
    config = _dataset(tmp_path, mask=_ts_mask, clean_yaml="  label_map: {7: 1}\n  unknown_labels: background\n")
    result = clean(config)
    assert not result.errors
    assert _problems(result, "fixed") == {"remapped labels", "unknown labels"}
    assert _problems(result, "warning") == {"no lesion"}
    expected = (_ts_mask(BAD) == 7).astype(np.uint8)
    for case in CASES:
        mask = config.dataset_raw_dir / "labelsTr" / f"{case}.nii.gz"
        assert _image(mask).GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(_array(mask), expected)
    assert clean(config, check=True).fixable == []


def test_changed_label_map_applies_to_the_original_values(tmp_path: Path) -> None:
    root = tmp_path
    config = _dataset(root, mask=_ts_mask, clean_yaml="  label_map: {7: 1, 3: 2}\n  unknown_labels: background\n")
    mask = config.dataset_raw_dir / "labelsTr" / f"{BAD}.nii.gz"
    original = config.dataset_raw_dir / "labelsTr_original" / f"{BAD}.nii.gz"
    ts = _ts_mask(BAD)
    clean(config)
    np.testing.assert_array_equal(_array(mask), np.select([ts == 7, ts == 3], [1, 2], 0))
    kept = original.read_bytes()

    # swapped targets: computed from the original 3/7/12, not from the 1/2 written by the first run
    swapped = _reconfigure(root, "  label_map: {7: 2, 3: 1}\n  unknown_labels: background\n")
    assert {f.case for f in clean(swapped, check=True).fixable} == set(CASES)
    result = clean(swapped)
    assert len(result.changed_files) == 3
    np.testing.assert_array_equal(_array(mask), np.select([ts == 7, ts == 3], [2, 1], 0))
    assert original.read_bytes() == kept  # the very first original is kept
    assert clean(swapped, check=True).fixable == []

    # without a label map the original values are unknown labels again: an error, nothing written
    stats = _stats(config.dataset_raw_dir)
    strict = clean(_reconfigure(root, ""))
    assert {f.problem for f in strict.errors} == {"unknown labels"}
    assert "values 3, 7, 12" in next(f for f in strict.errors if f.case == BAD).detail
    assert _stats(config.dataset_raw_dir) == stats


# --------------------------------------------------------------------------------------------
# unfixable problems


ERRORS = {
    "mask-spacing-10%": (_spacing_off, "geometry mismatch", "spacing differs by 0.1"),
    "mask-origin-1mm": (_origin_off, "geometry mismatch", "origin by 1 mm"),
    "shape-mismatch": (_shape_off, "shape mismatch", "image (16, 16, 8) vs mask (15, 16, 8)"),
    "nan-in-ct": (_nan_ct, "NaN/Inf voxels", "1 non-finite voxels"),
    "nan-in-mask": (_nan_mask, "NaN/Inf in mask", f"{BAD}.nii.gz"),
    "interpolated-mask": (_interpolated_mask, "non-integer labels", "values like 0.4"),
    "unknown-label": (_label5, "unknown labels", "values 5 (expected 0, 1, 2)"),
    "4d-image": (_ct_4d, "not a 3D image", "has 4 dimensions"),
    "truncated-ct": (_truncated_ct, "unreadable image", f"{BAD}_0000.nii.gz: cannot read image"),
    "short-voxel-data": (_short_ct, "unreadable image", "truncated: "),
    "truncated-mask": (_truncated_mask, "unreadable mask", f"{BAD}.nii.gz: cannot read image"),
    "garbage-mask": (_garbage_mask, "unreadable mask", "cannot read image"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_unfixable_problem(tmp_path: Path, name: str, runner) -> None:
    plant, problem, detail = ERRORS[name]
    config = _dataset(tmp_path, plant)
    ds = config.dataset_raw_dir
    source_before = snapshot(tmp_path / "data")
    before = snapshot(ds)

    checked = clean(config, check=True)
    assert snapshot(ds) == before
    assert [(f.case, f.problem) for f in checked.errors] == [(BAD, problem)]
    assert detail in checked.errors[0].detail
    assert checked.errors[0].action.startswith("none: ")

    result = clean(config)
    assert [(f.case, f.problem) for f in result.errors] == [(BAD, problem)]
    assert result.changed_files == []
    assert "errors cannot be fixed automatically" in result.summary()
    rows = [r for r in _report(result) if r["severity"] == "error"]
    assert [(r["case"], r["problem"]) for r in rows] == [(BAD, problem)]
    after = snapshot(ds)
    after.pop(REPORT_NAME)
    assert after == before
    assert snapshot(tmp_path / "data") == source_before

    cli = runner.invoke(app, ["clean", "-c", str(config.config_path)])
    assert cli.exit_code == 1
    assert "errors cannot be fixed automatically" in cli.output
    assert problem in cli.stdout and "Traceback" not in cli.output


# --------------------------------------------------------------------------------------------
# warnings


WARNINGS = {
    "no-lesion": (_no_lesion, "no lesion", "cannot teach the subtype"),
    "no-pancreas": (_empty_mask, "no pancreas", "has no label 1 or 2"),
    "ct-in-0..1": (_unit_ct, "not CT-like values", "expected Hounsfield units"),
}


@pytest.mark.parametrize("name", list(WARNINGS))
def test_warning(tmp_path: Path, name: str, runner) -> None:
    plant, problem, detail = WARNINGS[name]
    config = _dataset(tmp_path, plant)
    result = clean(config)
    assert [(f.case, f.problem) for f in result.warnings] == [(BAD, problem)]
    assert detail in result.warnings[0].detail
    assert not result.errors and not result.fixable and not result.changed_files
    assert [(r["case"], r["problem"], r["severity"], r["action"]) for r in _report(result)] == [
        (BAD, problem, "warning", "none")
    ]
    cli = runner.invoke(app, ["clean", "-c", str(config.config_path), "--check"])
    assert cli.exit_code == 0, cli.output
    assert "0 errors, 0 fixable problems, 1 warning" in cli.stdout


def test_soft_tissue_only_ct_is_not_ct_like(tmp_path: Path) -> None:
    """A volume with no voxel above 100 HU (no bone, no contrast): the range heuristic flags it."""
    soft = np.minimum(ct_volume(SHAPE, seed=1), 90).astype(np.int16)
    config = _dataset(tmp_path, lambda image, mask: _write(soft, image))
    assert _problems(clean(config, check=True), "warning") == {"not CT-like values"}


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_clean_before_prepare(tmp_path: Path, runner) -> None:
    cfg = write_config(tmp_path, "project_dir: ./work\ndataset:\n  source: .\n")
    result = runner.invoke(app, ["clean", "-c", str(cfg)])
    assert result.exit_code == 1
    assert "error: " in result.stderr and "run `pancseg prepare` first" in result.stderr
    assert "Traceback" not in result.output


def test_cli_check_then_clean_then_check(tmp_path: Path, runner) -> None:
    config = _dataset(tmp_path, _float_mask)
    cfg = str(config.config_path)
    before = snapshot(config.dataset_raw_dir)

    check = runner.invoke(app, ["clean", "-c", cfg, "--check"])
    assert check.exit_code == 1
    assert "not applied (--check): rounded to integers" in check.stdout
    assert "fixable" in check.stdout and "fixed" not in check.stdout
    assert "0 errors, 2 fixable problems" in check.stdout
    assert "run `pancseg clean` without --check" in check.stdout
    assert snapshot(config.dataset_raw_dir) == before

    fix = runner.invoke(app, ["clean", "-c", cfg])
    assert fix.exit_code == 0, fix.output
    assert "0 errors, 2 problems fixed" in fix.stdout
    assert str(config.dataset_raw_dir / REPORT_NAME) in fix.stdout

    again = runner.invoke(app, ["clean", "-c", cfg, "--check"])
    assert again.exit_code == 0, again.output
    assert "0 errors, 0 fixable problems" in again.stdout
    assert "(done by an earlier run)" in again.stdout


def test_cli_clean_json(tmp_path: Path, runner) -> None:
    config = _dataset(tmp_path, _int32_ct)
    result = runner.invoke(app, ["clean", "-c", str(config.config_path), "--check", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["check"] is True and data["cases"] == 4
    assert (data["errors"], data["fixed"], data["warnings"]) == (0, 1, 0)
    assert data["findings"][0]["problem"] == "wide integer CT" and data["findings"][0]["pending"] is True
    assert data["report"] is None


# --------------------------------------------------------------------------------------------
# real data: a TotalSegmentator segmentation used as pancreas mask


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_totalsegmentator_masks(tmp_path: Path, realdata: Path) -> None:
    ts = realdata / "totalsegmentator"
    ct, seg = ts / "example_ct_sm.nii.gz", ts / "example_seg.nii.gz"
    hashes = (_sha(ct), _sha(seg))
    (tmp_path / "cases.csv").write_text(
        "case_id,image,mask,subtype,split\n"
        f"ts_train,{ct},{seg},0,train\n"
        f"ts_val,{ct},{seg},1,validation\n"
    )
    config = load_config(write_config(
        tmp_path,
        "project_dir: ./work\ndataset:\n  layout: manifest\n  manifest: ./cases.csv\n"
        "clean:\n  label_map: {7: 1}\n  unknown_labels: background\n",
    ))
    prepare(config)
    result = clean(config)
    assert not result.errors
    assert not [f for f in result.warnings if f.problem == "not CT-like values"]
    assert {(f.case, f.problem) for f in result.warnings} == {("ts_train", "no lesion"), ("ts_val", "no lesion")}
    assert {f.problem for f in result.fixable} == {"remapped labels", "unknown labels"}

    reference = _image(ct)
    for case in ("ts_train", "ts_val"):
        mask = _image(config.dataset_raw_dir / "labelsTr" / f"{case}.nii.gz")
        values, counts = np.unique(sitk.GetArrayViewFromImage(mask), return_counts=True)
        assert dict(zip(values.tolist(), counts.tolist())) == {0: int(np.prod(reference.GetSize())) - 644, 1: 644}
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert mask.GetSize() == reference.GetSize()
        np.testing.assert_allclose(mask.GetDirection(), reference.GetDirection())
        np.testing.assert_allclose(np.diag(np.reshape(mask.GetDirection(), (3, 3))), [-1, -1, 1])
        np.testing.assert_allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(mask.GetSpacing(), reference.GetSpacing())
        image = config.dataset_raw_dir / "imagesTr" / f"{case}_0000.nii.gz"
        assert image.read_bytes() == ct.read_bytes()  # CT untouched (int16 HU)

    assert clean(config, check=True).fixable == []  # idempotent with a real (-1,-1,1) header
    assert (_sha(ct), _sha(seg)) == hashes
