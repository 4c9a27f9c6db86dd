"""Damaged or unexpected files that ``evaluate``, ``report`` and ``run`` read back: one clear error each.

Every file is checked as it is read: a truncated mask, labels that are no labels, conflicting subtype
rows, a subtype CSV out of step with predict's per-case records, a damaged evaluation or training
log, and CT scans of another grid than their masks. Each gives one line naming the file, what is
wrong and the fix (no traceback, nothing written), or, for pancseg's own derived state that can be
rebuilt, the rebuilt content with a note.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ct_volume, label_volume, write, write_config
from pancreas_cli.cli import app

CASES = ("c1", "c2", "c3")


def _invoke(runner: CliRunner, args: list[str]):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, ValueError, IndexError))
    return result


def _evaluate(runner: CliRunner, pred: Path, gt: Path, *extra: str):  # type: ignore[no-untyped-def]
    return _invoke(runner, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--set", "evaluate.bootstrap=0",
                            *extra])


def _random_labels(shape: tuple[int, int, int] = (16, 32, 32)) -> np.ndarray:
    """Noise, so that a compressed file keeps its header when cut in half."""
    return np.random.default_rng(0).integers(0, 3, size=shape).astype(np.uint8)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("which", ["pred", "gt"])
def test_a_truncated_mask_is_refused(runner: CliRunner, tmp_path: Path, ext: str, which: str) -> None:
    labels = _random_labels()
    for folder in ("pred", "gt"):
        write(labels, tmp_path / folder / f"c1{ext}")
    damaged = tmp_path / which / f"c1{ext}"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = _evaluate(runner, tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 1
    assert f"{damaged}: cannot read image" in result.stderr and "truncated" in result.stderr
    assert not (tmp_path / "pred" / "metrics_summary.json").exists()


def test_a_truncated_ground_truth_without_prediction_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    """--allow-missing reads the ground truth alone: it is checked as well."""
    write(_random_labels(), tmp_path / "pred" / "c1.nii.gz")
    gt = write(_random_labels(), tmp_path / "gt" / "c1.nii.gz")
    missing = write(_random_labels(), tmp_path / "gt" / "c2.nii")
    missing.write_bytes(missing.read_bytes()[:-1000])
    result = _evaluate(runner, tmp_path / "pred", gt.parent, "--allow-missing")
    assert result.exit_code == 1 and f"{missing}: cannot read image (truncated: " in result.stderr


@pytest.mark.parametrize(("which", "dtype", "value", "message"), [
    ("pred", np.float32, 0.5, "label values like 0.5 are not integers"),
    ("gt", np.float32, 1.5, "label values like 1.5 are not integers"),
    ("pred", np.int32, 65537, "label values 65537 are not among [0, 1, 2]"),
    ("gt", np.float64, 1e10, "label values 10000000000 are not among [0, 1, 2]"),
])
def test_labels_are_checked_before_any_cast(runner: CliRunner, tmp_path: Path, which: str, dtype: type,
                                            value: float, message: str) -> None:
    """0.5 was rounded to background, 1.5 to lesion and int32 65537 wrapped to pancreas (Dice 1.0)."""
    labels = label_volume(lesion=False)
    for folder in ("pred", "gt"):
        write(labels, tmp_path / folder / "c1.nii.gz")
    bad = labels.astype(dtype)
    bad[labels == 1] = value
    path = write(bad, tmp_path / which / "c1.nii.gz")
    result = _evaluate(runner, tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 1 and f"{path}: {message}" in result.stderr
    # unknown_labels: background maps foreign integers away, never a fraction
    background = _evaluate(runner, tmp_path / "pred", tmp_path / "gt", "--set", "evaluate.unknown_labels=background",
                           "--json")
    assert background.exit_code == (0 if float(value).is_integer() else 1), background.output


def test_float_labels_within_clean_tolerance_are_accepted(runner: CliRunner, tmp_path: Path) -> None:
    """The real data's 1.0000152587890625 is a 1, as clean accepts it (clean.label_tolerance)."""
    labels = label_volume()
    write(labels, tmp_path / "pred" / "c1.nii.gz")
    write(labels.astype(np.float32) * np.float32(1.0000152587890625), tmp_path / "gt" / "c1.nii.gz")
    result = _evaluate(runner, tmp_path / "pred", tmp_path / "gt", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["segmentation"]["dice_lesion"]["mean"] == 1.0
    tight = _evaluate(runner, tmp_path / "pred", tmp_path / "gt", "--set", "clean.label_tolerance=1e-6")
    assert tight.exit_code == 1 and "beyond clean.label_tolerance = 1e-06" in tight.stderr


def test_two_masks_of_one_case_are_refused(runner: CliRunner, tmp_path: Path) -> None:
    write(label_volume(), tmp_path / "pred" / "c1.nii.gz")
    write(label_volume(), tmp_path / "gt" / "c1.nii.gz")
    write(np.zeros((8, 16, 16), np.uint8), tmp_path / "pred" / "c1.nrrd")
    result = _evaluate(runner, tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 1
    assert f"{tmp_path / 'pred'}: two masks for case c1, c1.nii.gz and c1.nrrd" in result.stderr


# --------------------------------------------------------------------------- subtype CSVs


@pytest.fixture
def three_cases(tmp_path: Path) -> Path:
    for case in CASES:
        for folder in ("pred", "gt"):
            write(label_volume(), tmp_path / folder / f"{case}.nii.gz")
    (tmp_path / "truth.csv").write_text("case_id,subtype\nc1,2\nc2,0\nc3,1\n")
    return tmp_path


@pytest.mark.parametrize("which", ["truth", "pred"])
def test_conflicting_subtype_rows_are_refused(runner: CliRunner, three_cases: Path, which: str) -> None:
    root = three_cases
    path = root / "truth.csv" if which == "truth" else root / "pred" / "subtype_results.csv"
    (root / "pred" / "subtype_results.csv").write_text("Names,Subtype\nc1.nii.gz,2\nc2.nii.gz,0\nc3.nii.gz,1\n")
    good = path.read_text()
    path.write_text(good + good.splitlines()[1] + "\n")  # an identical repeat is harmless
    assert _evaluate(runner, root / "pred", root / "gt", "--subtypes", str(root / "truth.csv")).exit_code == 0
    name = "c1" if which == "truth" else "c1.nii.gz"
    path.write_text(good + "\n" + f"{name},0\n")  # line 6, after a blank line
    result = _evaluate(runner, root / "pred", root / "gt", "--subtypes", str(root / "truth.csv"))
    assert result.exit_code == 1
    assert f"{path}: conflicting subtypes for case c1: 2 on line 2, 0 on line 6; keep one row per case" \
        in result.stderr


def _record(case: str, probabilities: list[float] | None, model: str = "new", **extra: object) -> str:
    """A per-case record as pancseg predict writes it (predict.py, _CaseRunner._replace)."""
    return json.dumps({"case": case, "source": f"/scans/{case}_0000.nii.gz", "source_stamp": [],
                       "probabilities": probabilities, "model": {"model": model, "folds": [0]}, **extra})


def _records(pred: Path, records: dict[str, str]) -> None:
    (pred / ".pancseg").mkdir(exist_ok=True)
    for case, text in records.items():
        (pred / ".pancseg" / f"{case}.json").write_text(text)


def test_records_win_over_a_stale_subtype_csv(runner: CliRunner, three_cases: Path) -> None:
    """A `predict --force` killed half-way: c1 and c3 are new masks, the CSV still holds the old run's rows."""
    root = three_cases
    pred = root / "pred"
    (pred / "subtype_results.csv").write_text("Names,Subtype\nc1.nii.gz,0\nc2.nii.gz,0\nc3.nii.gz,0\n")
    _records(pred, {"c1": _record("c1", [0.1, 0.2, 0.7]), "c2": _record("c2", [0.8, 0.1, 0.1], model="old"),
                    "c3": _record("c3", [0.2, 0.6, 0.2])})
    result = _evaluate(runner, pred, root / "gt", "--subtypes", str(root / "truth.csv"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classification"]["accuracy"] == 1.0  # 1/3 by the stale CSV
    assert (f"{pred / 'subtype_results.csv'} disagrees with the per-case records in {pred / '.pancseg'} for 2 "
            "case(s), e.g. c1 (CSV: 0, record: 2)") in result.stderr
    assert "the masks come from 2 different models or prediction settings" in result.stderr
    rows = list(csv.DictReader(io.StringIO((pred / "metrics_per_case.csv").read_text())))
    assert [r["subtype_pred"] for r in rows] == ["2", "0", "1"]
    assert (pred / "subtype_results.csv").read_text().count(",0\n") == 3  # the predictions are not edited


def test_records_without_a_csv_and_segmentation_only_records(runner: CliRunner, three_cases: Path) -> None:
    root = three_cases
    pred = root / "pred"
    _records(pred, {c: _record(c, p) for c, p in zip(CASES, ([0, 0, 1], [1, 0, 0], [0, 1, 0]))})
    found = _evaluate(runner, pred, root / "gt", "--subtypes", str(root / "truth.csv"), "--json")
    assert found.exit_code == 0 and json.loads(found.stdout)["classification"]["accuracy"] == 1.0
    assert "(CSV: no row, record: 2)" in found.stderr
    # A segmentation-only model's records hold no subtype: an older run's CSV is not scored for it.
    _records(pred, {c: _record(c, None) for c in CASES})
    (pred / "subtype_results.csv").write_text("Names,Subtype\nc1.nii.gz,2\nc2.nii.gz,0\nc3.nii.gz,1\n")
    segmentation = _evaluate(runner, pred, root / "gt", "--subtypes", str(root / "truth.csv"), "--json")
    assert segmentation.exit_code == 0, segmentation.output
    assert json.loads(segmentation.stdout)["classification"] is None
    assert "record: no subtype" in segmentation.stderr


@pytest.mark.parametrize(("text", "message"), [
    (_record("c2", [0.1, 0.2, 0.7], pending=True),
     "the prediction of c2 was stopped while its mask was being replaced"),
    (_record("c2", [0.1, 0.2, 0.7])[:40], "unreadable prediction record"),
    (_record("c2", [0.5, 0.5]), "not a pancseg prediction record (probabilities [0.5, 0.5] are not 3 numbers)"),
    (_record("c9", [0.1, 0.2, 0.7]), "not a pancseg prediction record (it names case 'c9')"),
])
def test_a_damaged_or_pending_record_is_refused(runner: CliRunner, three_cases: Path, text: str,
                                               message: str) -> None:
    pred = three_cases / "pred"
    (pred / "subtype_results.csv").write_text("Names,Subtype\nc1.nii.gz,2\nc2.nii.gz,0\nc3.nii.gz,1\n")
    _records(pred, {"c1": _record("c1", [0, 0, 1]), "c2": text})
    result = _evaluate(runner, pred, three_cases / "gt")
    assert result.exit_code == 1 and f"{pred / '.pancseg' / 'c2.json'}: {message}" in result.stderr
    assert "pancseg predict" in result.stderr and not (pred / "metrics_summary.json").exists()


@pytest.mark.slow
def test_records_of_a_real_prediction(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """The record format evaluate reads is the one predict writes."""
    cfg = str(trained_project / "pancseg.yaml")
    data = trained_project / "data"
    pred = tmp_path / "pred"
    predicted = runner.invoke(app, ["predict", "-c", cfg, "-i", str(data / "test"), "-o", str(pred), "--fold", "4"])
    assert predicted.exit_code == 0, predicted.output
    written = (pred / "subtype_results.csv").read_text()
    truth = data / "test_ground_truth"
    args = ["-c", cfg, "--subtypes", str(truth / "subtypes.csv"), "--json"]
    plain = _evaluate(runner, pred, truth, *args)
    assert plain.exit_code == 0 and "disagrees" not in plain.stderr
    lines = written.splitlines()  # as a stopped `predict --force` of another model leaves it: other subtypes
    stale = [lines[0]] + [f"{line.rsplit(',', 1)[0]},{(int(line[-1]) + 1) % 3}" for line in lines[1:]]
    (pred / "subtype_results.csv").write_text("\n".join(stale) + "\n")
    redone = _evaluate(runner, pred, truth, *args)
    assert redone.exit_code == 0 and f"for {len(lines) - 1} case(s)" in redone.stderr
    assert json.loads(redone.stdout)["classification"] == json.loads(plain.stdout)["classification"]


# --------------------------------------------------------------------------- report and run


@pytest.fixture
def project(tmp_path: Path, runner: CliRunner) -> SimpleNamespace:
    """A project whose preprocessing and fold-0 training are only their records, plus an evaluation."""
    from pancreas_cli.config import load_config
    from pancreas_cli.multitask.trainer import METRICS_COLUMNS
    from pancreas_cli.layout import STATE_NAME, model_folder

    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "project_dir: ./work\ndataset: {source: ./data}\nevaluate: {bootstrap: 0}\n"
                                 "train: {epochs: 2}\n")
    config = load_config(cfg, check_source=False)
    config.dataset_preprocessed_dir.mkdir(parents=True)
    (config.dataset_preprocessed_dir / STATE_NAME).write_text(json.dumps(
        {"state": "done", "plans_identifier": "nnUNetPlans", "configuration": "3d_fullres", "data_identifier": "d"}))
    fold = model_folder(config) / "fold_0"
    fold.mkdir(parents=True)
    rows = [{"epoch": e, "train_loss": 1 - e / 4, "dice_pancreas": 0.5, "dice_lesion": "", "criterion": 0.5,
             "best": 1} for e in (1, 2)]  # epochs as training numbers them
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, METRICS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (fold / "metrics.csv").write_text(buffer.getvalue())
    for i, case in enumerate(CASES):
        write(ct_volume(seed=i), tmp_path / "images" / f"{case}_0000.nii.gz")
        for folder in ("pred", "gt"):
            write(label_volume(), tmp_path / folder / f"{case}.nii.gz")
    assert _evaluate(runner, tmp_path / "pred", tmp_path / "gt").exit_code == 0
    return SimpleNamespace(root=tmp_path, cfg=cfg, fold=fold, pred=tmp_path / "pred", gt=tmp_path / "gt",
                           images=tmp_path / "images", html=tmp_path / "out" / "r.html")


def _report(runner: CliRunner, p: SimpleNamespace, images: Path | None = None):  # type: ignore[no-untyped-def]
    return _invoke(runner, ["report", "-c", str(p.cfg), "-o", str(p.html), "--pred", str(p.pred), "--gt", str(p.gt),
                            "--images", str(images or p.images)])


def _without_column(path: Path, column: str) -> None:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [c for c in rows[0] if c != column], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: (p.pred / "metrics_summary.json").write_text((p.pred / "metrics_summary.json").read_text()[:300]),
     "metrics_summary.json: unreadable evaluation summary, cut short or edited"),
    (lambda p: (p.pred / "metrics_summary.json").write_text('{"cases": 3, "nsd_definition": "border_voxel"}'),
     "metrics_summary.json: not an evaluation summary of this pancseg (no segmentation)"),
    (lambda p: _without_column(p.pred / "metrics_per_case.csv", "dice_pancreas"),
     "metrics_per_case.csv: no column dice_pancreas (not written by this pancseg?)"),
    (lambda p: (p.pred / "metrics_per_case.csv").write_text(
        (p.pred / "metrics_per_case.csv").read_text().rsplit("\n", 2)[0] + "\n"),
     "metrics_per_case.csv holds 2 case(s) but"),
    (lambda p: (p.fold / "metrics.csv").write_text((p.fold / "metrics.csv").read_text() + "<<<<<<< HEAD\n"),
     "metrics.csv, line 4: a line pancseg did not write (1 cells, the header has 17)"),
    (lambda p: (p.fold / "metrics.csv").write_text((p.fold / "metrics.csv").read_text() + "2" + ",oops" * 16 + "\n"),
     "metrics.csv, line 4: not a training metrics row (train_loss = 'oops')"),
    (lambda p: _without_column(p.fold / "metrics.csv", "dice_pancreas"),
     "metrics.csv: no column dice_pancreas"),
    (lambda p: (p.fold / "metrics.csv").write_text(
        (p.fold / "metrics.csv").read_text() + "2" + ",1" * 16 + "\n"),
     "metrics.csv, line 4: epoch 2 where epoch 3 belongs"),  # an epoch twice: not as training numbers them
])
def test_report_refuses_damaged_metrics(runner: CliRunner, project: SimpleNamespace, damage, message: str) -> None:
    damage(project)
    result = _report(runner, project)
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert "pancseg evaluate" in result.stderr or "restore the file" in result.stderr
    assert not project.html.parent.exists()  # refused before anything is written


@pytest.mark.parametrize(("shape", "spacing", "message"), [
    ((6, 16, 16), (0.75, 0.75, 2.0), "differ in size: (16, 16, 6) vs (16, 16, 8)"),  # was an IndexError
    ((8, 20, 16), (0.75, 0.75, 2.0), "differ in size: (16, 20, 8) vs (16, 16, 8)"),  # was drawn misaligned
    ((8, 16, 16), (1.0, 1.0, 2.0), "differ in spacing"),
])
def test_report_refuses_ct_of_another_grid(runner: CliRunner, project: SimpleNamespace, shape: tuple[int, int, int],
                                           spacing: tuple[float, float, float], message: str) -> None:
    other = project.root / "other"
    for case in CASES:
        write(ct_volume(shape), other / f"{case}_0000.nii.gz", spacing=spacing)
    result = _report(runner, project, images=other)
    assert result.exit_code == 1, result.output
    shown = f"CT {other / 'c1_0000.nii.gz'} and ground truth {project.gt / 'c1.nii.gz'} {message}"
    assert shown in result.stderr and "pass as --images the CT scans these masks belong to" in result.stderr
    assert not project.html.parent.exists()


def test_report_refuses_a_mask_truncated_after_evaluation(runner: CliRunner, project: SimpleNamespace) -> None:
    mask = write(_random_labels((8, 16, 16)), project.pred / "c2.nii")  # ranked by the per-case CSV, read now
    (project.pred / "c2.nii.gz").unlink()
    mask.write_bytes(mask.read_bytes()[:-500])
    result = _report(runner, project)
    assert result.exit_code == 1 and f"{mask}: cannot read image (truncated: " in result.stderr


def test_report_with_sound_inputs_and_an_unreadable_nnunet_debug_file(runner: CliRunner,
                                                                    project: SimpleNamespace) -> None:
    (project.fold / "debug.json").write_text('{"device": "cu')
    result = _report(runner, project)
    assert result.exit_code == 0, result.output
    assert f"{project.fold / 'debug.json'}: unreadable" in result.stderr
    assert project.html.read_text().count("data:image/png;base64,") == 3  # curves, distributions, overlays


def test_run_resumes_a_fold_whose_metrics_gained_a_foreign_line(project: SimpleNamespace) -> None:
    """Which epoch the fold reached decides between keeping and resuming the training: with a line
    pancseg did not write, run never guesses "finished"; it resumes, and the trainer rebuilds metrics.csv
    from nnU-Net's log in the checkpoint (tests/faults/test_model_faults.py)."""
    from pancreas_cli.config import load_config
    from pancreas_cli.run import _finished

    (project.fold / "checkpoint_final.pth").write_bytes(b"")
    metrics = project.fold / "metrics.csv"
    metrics.write_text(metrics.read_text() + "garbage\n")
    assert _finished(load_config(project.cfg), 0) is False
