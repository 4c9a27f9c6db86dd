"""``pancseg evaluate``: Metrics Reloaded values on real masks, empty-mask rules, subtype metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write
from pancreas_cli.cli import app
from pancreas_cli.config import load_config
from pancreas_cli.evaluate import evaluate, evaluate_case
from pancreas_cli.exceptions import DataError
from pancreas_cli.subtypes import read_subtypes


@pytest.fixture
def config():
    return load_config(None, ["evaluate.bootstrap=200"], check_source=False)


def _pair(tmp_path: Path, pred: np.ndarray, ref: np.ndarray, case: str = "c1") -> tuple[Path, Path]:
    write(pred.astype(np.uint8), tmp_path / "pred" / f"{case}.nii.gz")
    write(ref.astype(np.uint8), tmp_path / "gt" / f"{case}.nii.gz")
    return tmp_path / "pred", tmp_path / "gt"


def test_reproduces_metrics_reloaded_on_real_masks(realdata: Path, config, tmp_path: Path) -> None:
    msd = realdata / "msd_pancreas_masks"
    result = evaluate(config, pred_dir=msd / "pred_Dice", gt_dir=msd / "gt", out_dir=tmp_path)
    case = next(c for c in result.cases if c.case == "pancreas_021")
    assert round(case.values["dice_pancreas"], 4) == 0.8837
    assert round(case.values["nsd_pancreas"], 4) == 0.9925
    assert round(case.values["hd95_pancreas"], 4) == 3.1585
    # No lesion in these masks: both empty -> Dice 1, NSD 1, HD95 0.
    assert case.values["dice_lesion"] == 1.0 and case.values["nsd_lesion"] == 1.0 and case.values["hd95_lesion"] == 0.0
    surface = load_config(None, ["evaluate.nsd_definition=surface_area", "evaluate.bootstrap=0"], check_source=False)
    case = evaluate_case("pancreas_021", msd / "pred_Dice" / "pancreas_021.nii.gz", msd / "gt" / "pancreas_021.nii.gz",
                         surface.evaluate)
    assert round(case.values["nsd_pancreas"], 4) == 0.9939
    summary = json.loads(result.summary_json.read_text())
    assert summary["cases"] == 3
    stats = summary["segmentation"]["dice_pancreas"]
    assert stats["ci95_low"] <= stats["mean"] <= stats["ci95_high"]
    assert summary["targets"]["dice_pancreas"]["passed"] is False  # the mean is below 0.91
    # No ground-truth lesion anywhere: the lesion target is not scored (it is not "passed" with Dice 1).
    assert summary["lesion_cases"] == 0
    assert summary["targets"]["dice_lesion"] == {"target": 0.31, "value": None, "passed": None}
    assert any("no ground-truth case has a lesion" in note for note in result.notes)


def test_multi_label_masks_need_a_label_map(realdata: Path, runner: CliRunner, tmp_path: Path) -> None:
    """TotalSegmentator's 41 organs must not be scored as 'pancreas' (label > 0) and 'lesion' (label 2)."""
    ts = realdata / "totalsegmentator"
    for folder, source in (("gt", "example_seg.nii.gz"), ("pred", "example_seg_fast.nii.gz")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ex.nii.gz").symlink_to(ts / source)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(tmp_path / "m"),
            "--set", "evaluate.bootstrap=0"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "ex.nii.gz: label values 3, 4, 5, " in refused.stderr and "values) are not among [0, 1, 2]" in refused.stderr and "evaluate.label_map" in refused.stderr
    mapped = runner.invoke(app, [*args, "--set", "evaluate.label_map={7: 1}", "--set",
                                 "evaluate.unknown_labels=background", "--json"])
    assert mapped.exit_code == 0, mapped.output
    summary = json.loads(mapped.stdout)
    assert round(summary["segmentation"]["dice_pancreas"]["mean"], 4) == 0.8087  # the known value
    assert summary["targets"]["dice_lesion"]["passed"] is None


def test_empty_mask_rules_and_worst_case_aggregation(config, tmp_path: Path) -> None:
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:10, 4:10] = 1
    pred_dir, gt_dir = _pair(tmp_path, np.zeros_like(ref), ref, "one_empty")
    _pair(tmp_path, np.zeros_like(ref), np.zeros_like(ref), "both_empty")
    result = evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir)
    values = {c.case: c.values for c in result.cases}
    assert values["one_empty"]["dice_pancreas"] == 0 and values["one_empty"]["nsd_pancreas"] == 0
    assert math.isnan(values["one_empty"]["hd95_pancreas"])
    assert values["both_empty"]["dice_pancreas"] == 1 and values["both_empty"]["nsd_pancreas"] == 1
    hd = result.summary["segmentation"]["hd95_pancreas"]
    diagonal = math.sqrt((8 * 2.0) ** 2 + (16 * 0.75) ** 2 + (16 * 0.75) ** 2)
    assert hd["undefined_cases"] == 1
    assert hd["mean"] == pytest.approx((diagonal + 0.0) / 2)
    row = result.per_case_csv.read_text().splitlines()
    assert row[0].startswith("case,dice_pancreas,iou_pancreas,nsd_pancreas,hd95_pancreas")


def test_lesion_is_label_2_and_pancreas_is_label_above_0(config, tmp_path: Path) -> None:
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:12, 4:12] = 1
    ref[3:5, 6:8, 6:8] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # lesion called pancreas: whole pancreas perfect, lesion missed
    pred_dir, gt_dir = _pair(tmp_path, pred, ref)
    case = evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir).cases[0]
    assert case.values["dice_pancreas"] == 1.0 and case.values["dice_lesion"] == 0.0
    assert case.values["volume_ref_lesion_ml"] == pytest.approx(8 * 2.0 * 0.75 * 0.75 / 1000)


def test_float_ground_truth_is_rounded(config, tmp_path: Path) -> None:
    ref = np.zeros((8, 16, 16), dtype=np.float32)
    ref[2:6, 4:12, 4:12] = 1.0000152587890625
    write(ref, tmp_path / "gt" / "c1.nii.gz")
    write((ref > 0).astype(np.uint8), tmp_path / "pred" / "c1.nii.gz")
    case = evaluate(config, pred_dir=tmp_path / "pred", gt_dir=tmp_path / "gt").cases[0]
    assert case.values["dice_pancreas"] == 1.0


def test_missing_prediction_and_geometry_mismatch(config, tmp_path: Path) -> None:
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:12, 4:12] = 1
    pred_dir, gt_dir = _pair(tmp_path, ref, ref, "c1")
    write(ref.astype(np.uint8), gt_dir / "c2.nii.gz")
    with pytest.raises(DataError, match="no prediction for 1 ground-truth case.*c2.*--allow-missing"):
        evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir)
    (pred_dir / "subtype_results.csv").write_text("Names,Subtype\nc1.nii.gz,1\n")
    (tmp_path / "truth.csv").write_text("case_id,subtype\nc1,1\nc2,0\n")
    result = evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir, allow_missing=True, subtypes_csv=tmp_path / "truth.csv")
    missing = next(c for c in result.cases if c.case == "c2")
    assert missing.missing_prediction and missing.values["dice_pancreas"] == 0.0
    # its subtype counts as wrong too (no invented prediction), without a false positive for any class
    assert missing.subtype_pred is None
    cls = result.summary["classification"]
    assert cls["cases"] == 2 and cls["accuracy"] == 0.5 and cls["unpredicted"] == 1
    assert cls["f1"] == {0: 0.0, 1: 1.0, 2: 0.0}
    (pred_dir / "subtype_results.csv").unlink()
    write(ref.astype(np.uint8), pred_dir / "c2.nii.gz", spacing=(1.0, 1.0, 3.0))
    with pytest.raises(DataError, match="c2.nii.gz.*spacing"):
        evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir)


def test_classification_metrics_and_csv_formats(config, tmp_path: Path) -> None:
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:12, 4:12] = 1
    for case in ("a", "b", "c", "d"):
        _pair(tmp_path, ref, ref, case)
    (tmp_path / "pred" / "subtype_results.csv").write_text("Names,Subtype\na.nii.gz,0\nb.nii.gz,0\nc.nii.gz,1\nd.nii.gz,1\n")
    (tmp_path / "truth.csv").write_text("case_id,subtype\na,0\nb,1\nc,1\nd,2\n")
    result = evaluate(config, pred_dir=tmp_path / "pred", gt_dir=tmp_path / "gt", subtypes_csv=tmp_path / "truth.csv")
    cls = result.summary["classification"]
    assert cls["accuracy"] == 0.5
    # F1: class 0 = 2/3, class 1 = 1/2, class 2 never predicted = 0.
    assert cls["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert cls["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    assert result.summary["targets"]["macro_f1"]["passed"] is False
    assert read_subtypes(tmp_path / "pred" / "subtype_results.csv") == {"a": 0, "b": 0, "c": 1, "d": 1}
    for value in ("4", "1.7", "inf", "1e400"):
        (tmp_path / "bad.csv").write_text(f"Names,Subtype\na.nii.gz,{value}\n")
        with pytest.raises(DataError, match=f"subtype {value} is not 0, 1 or 2"):
            read_subtypes(tmp_path / "bad.csv")
    (tmp_path / "float.csv").write_text("Names,Subtype\na.nii.gz,2.0\n")
    assert read_subtypes(tmp_path / "float.csv") == {"a": 2}


def test_cli_json_and_table(runner: CliRunner, realdata: Path, tmp_path: Path) -> None:
    msd = realdata / "msd_pancreas_masks"
    out = tmp_path / "metrics"
    result = runner.invoke(app, ["evaluate", "--pred", str(msd / "pred_CE"), "--gt", str(msd / "gt"), "-o", str(out),
                                 "--set", "evaluate.bootstrap=100", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["cases"] == 3 and "dice_pancreas" in summary["segmentation"]
    assert (out / "metrics_per_case.csv").is_file() and (out / "metrics_summary.json").is_file()
    table = runner.invoke(app, ["evaluate", "--pred", str(msd / "pred_CE"), "--gt", str(msd / "gt"), "-o", str(out)])
    assert table.exit_code == 0 and "dice_pancreas" in table.stdout and "0.91" in table.stdout
    missing = runner.invoke(app, ["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(msd / "gt")])
    assert missing.exit_code == 1 and "folder not found" in missing.stderr


@pytest.mark.parametrize(("setup", "extra", "message"), [
    (lambda d: (d / "gt" / "c1.nii.gz").unlink(), [], "no ground-truth masks"),
    (lambda d: (d / "pred" / "c1.nii.gz").rename(d / "pred" / "c01.nii.gz"), [],
     "no prediction matches a ground-truth case of"),
    (lambda d: (d / "truth.csv").write_text("id,label\nc1,1\n"), ["--subtypes"],
     "expected columns Names,Subtype or case_id,subtype, got id,label"),
    (lambda d: (d / "truth.csv").write_text("case_id,subtype\nc1,high\n"), ["--subtypes"],
     "truth.csv, line 2: subtype 'high' is not a number"),
    (lambda d: (d / "pred" / "subtype_results.csv").write_text("Names,Subtype\nother.nii.gz,1\n"), ["--subtypes"],
     "subtype_results.csv: no subtype for case c1"),
    (lambda d: (d / "truth.csv").write_bytes(b"case_id,subtype\nc1,1\xe9\n"), ["--subtypes"],
     "truth.csv: cannot read as a UTF-8 CSV"),
    (lambda d: (d / "truth.csv").write_text("case_id,subtype\nc1,1,2\n"), ["--subtypes"],
     "truth.csv, line 2: expected 2 columns (case_id,subtype)"),
    (lambda d: (d / "truth.csv").write_text("case_id,subtype\nc1\n"), ["--subtypes"],
     "truth.csv, line 2: expected 2 columns (case_id,subtype)"),
])
def test_cli_errors(runner: CliRunner, tmp_path: Path, setup: Any, extra: list[str], message: str) -> None:
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:12, 4:12] = 1
    pred_dir, gt_dir = _pair(tmp_path, ref, ref)
    (tmp_path / "truth.csv").write_text("case_id,subtype\nc1,1\n")
    setup(tmp_path)
    args = ["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), *extra]
    if extra:
        args.append(str(tmp_path / "truth.csv"))
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_metrics_of_other_inputs_are_not_replaced_without_force(runner: CliRunner, tmp_path: Path) -> None:
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:12, 4:12] = 1
    pred_dir, gt_dir = _pair(tmp_path, ref, ref)
    write(np.zeros((8, 16, 16), np.uint8), tmp_path / "gt2" / "c1.nii.gz")
    base = ["evaluate", "--pred", str(pred_dir), "--set", "evaluate.bootstrap=10"]
    assert runner.invoke(app, [*base, "--gt", str(gt_dir)]).exit_code == 0
    summary = pred_dir / "metrics_summary.json"
    first = summary.read_text()
    assert json.loads(first)["inputs"]["gt"] == str(gt_dir.resolve())
    assert runner.invoke(app, [*base, "--gt", str(gt_dir)]).exit_code == 0  # same inputs: brought up to date
    other = runner.invoke(app, [*base, "--gt", str(tmp_path / "gt2")])
    assert other.exit_code == 1
    assert f"{summary} holds other metrics (computed with gt = {gt_dir.resolve()}); pass --force" in other.stderr
    assert summary.read_text() == first
    forced = runner.invoke(app, [*base, "--gt", str(tmp_path / "gt2"), "--force"])
    assert forced.exit_code == 0 and json.loads(summary.read_text())["inputs"]["gt"] == str((tmp_path / "gt2").resolve())
    summary.write_text("{}")
    foreign = runner.invoke(app, [*base, "--gt", str(gt_dir)])
    assert foreign.exit_code == 1 and "not written by this pancseg evaluate" in foreign.stderr


def test_no_matching_names_is_an_error_even_with_allow_missing(config, tmp_path: Path) -> None:
    """--allow-missing is for a few missing cases; names that never match would score every case as 0."""
    ref = np.zeros((8, 16, 16))
    ref[2:6, 4:12, 4:12] = 1
    pred_dir, gt_dir = _pair(tmp_path, ref, ref, "quiz_009")
    (gt_dir / "quiz_009.nii.gz").rename(gt_dir / "quiz_9.nii.gz")
    with pytest.raises(DataError, match="no prediction matches a ground-truth case .*e.g. prediction quiz_009 and "
                                        "ground truth quiz_9"):
        evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir, allow_missing=True)
    (gt_dir / "quiz_9.nii.gz").rename(gt_dir / "quiz_009.nii.gz")
    (tmp_path / "truth.csv").write_text("case_id,subtype\nquiz_009,1\nquiz_999,2\n")
    result = evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir, subtypes_csv=tmp_path / "truth.csv")
    assert f"1 case(s) of {tmp_path / 'truth.csv'} have no ground-truth mask, e.g. quiz_999" in result.notes


@pytest.fixture
def fold_project(trained_project: Path, tmp_path: Path) -> Path:
    """A copy of the trained smoke project (fold 4 trained and validated), free to evaluate into."""
    shutil.copytree(trained_project / "work", tmp_path / "work", ignore=shutil.ignore_patterns(".locks", "logs"))
    shutil.copy(trained_project / "pancseg.yaml", tmp_path / "pancseg.yaml")
    return tmp_path / "pancseg.yaml"


@pytest.mark.slow
def test_a_folds_validation_is_evaluated_and_reported_without_folders(fold_project: Path, runner: CliRunner) -> None:
    """`evaluate --fold 4` scores the fold's validation masks on its own cases and subtypes; `report --fold 4`
    then has the curves, the metrics and the overlays; `--fold all` pools the folds, one row each."""
    cfg = str(fold_project)
    work = fold_project.parent / "work"
    cases = json.loads((work / "nnUNet_raw" / "Dataset001_PancreasCancer" / "splits_final.json").read_text())[4]["val"]
    result = runner.invoke(app, ["evaluate", "-c", cfg, "--fold", "4", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["cases"] == len(cases) and summary["classification"]["cases"] == len(cases)
    validation = next(work.glob("nnUNet_results/*/*/fold_4/validation"))
    assert (validation / "metrics_summary.json").is_file()
    assert sorted(line.split(",")[0] for line in (validation / "metrics_per_case.csv").read_text().splitlines()[1:]) \
        == sorted(cases)

    report = runner.invoke(app, ["report", "-c", cfg, "--fold", "4"])
    assert report.exit_code == 0, report.output
    page = (work / "report" / "report_fold4.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "id='overlays'" in page  # curves, metrics, overlays
    assert "dice_pancreas:" in report.stdout

    pooled = runner.invoke(app, ["evaluate", "-c", cfg, "--fold", "all", "--json"])
    assert pooled.exit_code == 0, pooled.output
    rows = json.loads(pooled.stdout)["folds"]
    assert [r["fold"] for r in rows] == [4, "pooled"] and rows[0]["dice_pancreas"] == rows[1]["dice_pancreas"]
    assert next(work.glob("nnUNet_results/*/*/crossval/metrics_summary.json")).is_file()
    crossval = runner.invoke(app, ["report", "-c", cfg, "--fold", "all"])
    assert crossval.exit_code == 0, crossval.output
    page = (work / "report" / "report_crossval.html").read_text()
    assert "<h3>Cross-validation</h3>" in page and "id='overlays'" in page and "cross-validation" in page
    assert page.count("data:image/png;base64,") == 4 and "fold 4 training" not in crossval.stdout  # one fold


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["--fold", "3"], "fold 3 has no validation"),
    (["--fold", "x"], "a fold number or 'all'"),
    (["--fold", "4", "--gt", "."], "leave out --pred, --gt"),
])
def test_fold_errors(fold_project: Path, runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["evaluate", "-c", str(fold_project), *args])
    assert result.exit_code in (1, 2) and message in result.output


@pytest.mark.slow
def test_fold_evaluation_names_a_damaged_splits_file(fold_project: Path, runner: CliRunner) -> None:
    splits = fold_project.parent / "work" / "nnUNet_raw" / "Dataset001_PancreasCancer" / "splits_final.json"
    splits.write_text('[{"train": []}]')
    result = runner.invoke(app, ["evaluate", "-c", str(fold_project), "--fold", "4"])
    assert result.exit_code != 0 and "splits_final.json: damaged" in result.output
    assert "pancseg prepare" in result.output and "Traceback" not in result.output
