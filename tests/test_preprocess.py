"""nnU-Net fingerprinting, planning and preprocessing, end to end on real nnU-Net (slow)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import snapshot, write, write_config
from pancreas_cli.cli import app
from pancreas_cli.preprocess import SMOKE_CONFIGURATION, add_smoke_configuration


def _plans(work: Path) -> dict:
    return json.loads((work / "nnUNet_preprocessed" / "Dataset001_PancreasCancer" / "nnUNetResEncUNetMPlans.json").read_text())


def test_add_smoke_configuration_cuts_the_network_and_patch() -> None:
    plans = {
        "configurations": {
            "3d_fullres": {
                "patch_size": [40, 160, 192],
                "architecture": {
                    "network_class_name": "x.ResidualEncoderUNet",
                    "arch_kwargs": {
                        "n_stages": 6,
                        "features_per_stage": [32, 64, 128, 256, 320, 320],
                        "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5,
                        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
                        "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
                        "n_conv_per_stage_decoder": [1] * 5,
                    },
                },
            }
        }
    }
    smoke = add_smoke_configuration(plans)["configurations"][SMOKE_CONFIGURATION]
    kwargs = smoke["architecture"]["arch_kwargs"]
    assert smoke["inherits_from"] == "3d_fullres" and smoke["batch_size"] == 2
    assert kwargs["n_stages"] == 4 and kwargs["features_per_stage"] == [8, 16, 32, 64]
    assert kwargs["n_blocks_per_stage"] == [1, 1, 1, 1] and kwargs["n_conv_per_stage_decoder"] == [1, 1, 1]
    assert kwargs["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    # Patch: at most 32x64x64 and divisible by the stride product (4, 8, 8) per axis.
    assert smoke["patch_size"] == [32, 64, 64]
    assert all(p % d == 0 for p, d in zip(smoke["patch_size"], (4, 8, 8)))


@pytest.mark.slow
def test_messy_synthetic_dataset_end_to_end(runner: CliRunner, tmp_path: Path) -> None:
    """synth --quirks -> prepare -> clean -> preprocess (smoke): every quirk named, source untouched."""
    data = tmp_path / "data"
    assert runner.invoke(app, ["synth", str(data), "--cases", "10", "--quirks", "--shape", "24,48,48"]).exit_code == 0
    before = snapshot(data)
    cfg = write_config(tmp_path, "project_dir: ./work\ndataset:\n  source: ./data\nplan:\n  preset: smoke\n")

    assert runner.invoke(app, ["prepare", "-c", str(cfg)]).exit_code == 0
    check = runner.invoke(app, ["clean", "-c", str(cfg), "--check"])
    assert check.exit_code == 1 and "fixable problems" in check.stdout
    cleaned = runner.invoke(app, ["clean", "-c", str(cfg)])
    assert cleaned.exit_code == 0, cleaned.output

    raw = tmp_path / "work" / "nnUNet_raw" / "Dataset001_PancreasCancer"
    with (raw / "clean_report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    problems = {(r["case"], r["problem"]) for r in rows}
    from pancreas_cli.synth import synthesize  # the quirks synth reports planting

    planted = synthesize(tmp_path / "again", cases=10, quirks=True, shape=(24, 48, 48)).quirks
    for quirk in planted:
        case = quirk.split(":")[0]
        kind = {"float mask": "float labels", "origin": "geometry differs slightly", "int32": "wide integer CT"}
        expected = next(v for k, v in kind.items() if k in quirk)
        assert (case, expected) in problems, f"{quirk} not in clean_report.csv"
    for mask in (raw / "labelsTr").glob("*.nii.gz"):
        image = sitk.ReadImage(str(mask))
        assert image.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) <= {0, 1, 2}

    result = runner.invoke(app, ["preprocess", "-c", str(cfg)])
    assert result.exit_code == 0, result.output + (tmp_path / "work" / "logs" / "preprocess.log").read_text()
    assert "3d_smoke" in result.stdout and "nnUNetResEncUNetMPlans" in result.stdout
    assert "running nnU-Net fingerprinting" in result.stderr
    plans = _plans(tmp_path / "work")
    assert SMOKE_CONFIGURATION in plans["configurations"]
    pre = tmp_path / "work" / "nnUNet_preprocessed" / "Dataset001_PancreasCancer"
    data_dir = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
    assert len(list(data_dir.glob("*_seg.b2nd"))) == 8  # train + validation cases
    assert json.loads((pre / "splits_final.json").read_text()) == json.loads((raw / "splits_final.json").read_text())
    assert snapshot(data) == before, "the source folder changed"

    again = runner.invoke(app, ["preprocess", "-c", str(cfg), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["up_to_date"] is True
    assert "running nnU-Net" not in again.stderr  # nothing ran

    # Changed raw data re-plans instead of reusing a stale fingerprint.
    fingerprint = pre / "dataset_fingerprint.json"
    stamp = fingerprint.stat().st_mtime_ns
    label = next((raw / "labelsTr").glob("*.nii.gz"))
    os.utime(label, ns=(stamp + 10**9, stamp + 10**9))
    rerun = runner.invoke(app, ["preprocess", "-c", str(cfg), "--json"])
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["up_to_date"] is False
    assert fingerprint.stat().st_mtime_ns > stamp


@pytest.mark.slow
def test_real_ct_passes_prepare_clean_preprocess(runner: CliRunner, tmp_path: Path, realdata: Path) -> None:
    """Real headers (sform only, flipped axes) and real HU values through the data stages."""
    ts = realdata / "totalsegmentator"
    # A second case with a synthetic lesion in the pancreas, so both labels occur.
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    array = sitk.GetArrayFromImage(seg)
    z, y, x = np.argwhere(array == 7)[len(np.argwhere(array == 7)) // 2]
    lesion = array.copy()
    lesion[z, y - 1 : y + 2, x - 1 : x + 2] = np.where(array[z, y - 1 : y + 2, x - 1 : x + 2] == 7, 250, array[z, y - 1 : y + 2, x - 1 : x + 2])
    with_lesion = sitk.GetImageFromArray(lesion)
    with_lesion.CopyInformation(seg)
    sitk.WriteImage(with_lesion, str(tmp_path / "seg_lesion.nii.gz"))
    (tmp_path / "manifest.csv").write_text(
        "case_id,image,mask,subtype,split\n"
        f"ct_a,{ts / 'example_ct_sm.nii.gz'},{ts / 'example_seg.nii.gz'},0,train\n"
        f"ct_b,{ts / 'example_ct_sm.nii.gz'},seg_lesion.nii.gz,1,validation\n"
        f"ct_test,{ts / 'example_ct.nii.gz'},,,test\n"
    )
    cfg = write_config(
        tmp_path,
        "project_dir: ./work\ndataset: {layout: manifest, manifest: manifest.csv}\n"
        "clean: {label_map: {7: 1, 250: 2}, unknown_labels: background}\nplan: {preset: smoke, num_processes: 1}\n",
    )
    assert runner.invoke(app, ["prepare", "-c", str(cfg)]).exit_code == 0
    cleaned = runner.invoke(app, ["clean", "-c", str(cfg), "--json"])
    assert cleaned.exit_code == 0, cleaned.output
    findings = json.loads(cleaned.stdout)["findings"]
    assert not [f for f in findings if f["problem"] == "not CT-like values"]
    assert {f["problem"] for f in findings if f["case"] == "ct_test"} == {"wide integer CT"}  # example_ct is int32
    raw = tmp_path / "work" / "nnUNet_raw" / "Dataset001_PancreasCancer"
    mask = sitk.ReadImage(str(raw / "labelsTr" / "ct_b.nii.gz"))
    values, counts = np.unique(sitk.GetArrayViewFromImage(mask), return_counts=True)
    assert values.tolist() == [0, 1, 2] and counts[1] + counts[2] == 644
    image = sitk.ReadImage(str(ts / "example_ct_sm.nii.gz"))
    assert mask.GetDirection() == image.GetDirection() and mask.GetOrigin() == image.GetOrigin()

    result = runner.invoke(app, ["preprocess", "-c", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["plans"][0]
    assert summary["configuration"] == "3d_smoke" and summary["spacing"] == [3.0, 3.0, 3.0]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_nnunet_failure_names_the_case(runner: CliRunner, tmp_path: Path, processes: int) -> None:
    """Skipping clean on a bad mask: nnU-Net's integrity check fails, the message names the case, whether
    its workers are processes or (with one) a thread."""
    from conftest import make_quiz

    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=0)
    bad = tmp_path / "data" / "train" / "subtype1" / "quiz_1_002.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(bad)))
    labels[0, 0, 0] = 5
    write(labels, bad)
    cfg = write_config(tmp_path, "project_dir: ./work\ndataset: {source: ./data}\n"
                                 f"plan: {{preset: smoke, num_processes: {processes}}}\n")
    assert runner.invoke(app, ["prepare", "-c", str(cfg)]).exit_code == 0
    result = runner.invoke(app, ["preprocess", "-c", str(cfg)])
    assert result.exit_code == 1
    assert "for case quiz_1_002" in result.stderr and "pancseg clean" in result.stderr
    assert "preprocess.log" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_one_process_spawns_no_workers(runner: CliRunner, tmp_path: Path, no_spawned_processes: None) -> None:
    """plan.num_processes 1: nnU-Net's pools run on a thread (a spawned worker first imports torch and
    nnU-Net, ~10 s per pool); with 2 they are nnU-Net's spawned processes, which the fixture refuses."""
    from conftest import make_quiz

    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=0)
    cfg = write_config(tmp_path, "project_dir: ./work\ndataset: {source: ./data}\n"
                                 "plan: {preset: smoke, num_processes: 1}\n")
    for command in ("prepare", "clean", "preprocess"):
        result = runner.invoke(app, [command, "-c", str(cfg)])
        assert result.exit_code == 0, result.output
    spawned = runner.invoke(app, ["preprocess", "-c", str(cfg), "--force", "--set", "plan.num_processes=2"])
    assert spawned.exit_code == 1 and "a spawned process was started" in spawned.stderr


def test_failure_reason_is_the_error_not_a_warning(tmp_path: Path) -> None:
    """nnU-Net warns about ordinary data (a case with only background); a full disk must not read as that."""
    from pancreas_cli.preprocess import _explain_failure

    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "quiz_0_001.nii.gz").touch()
    log = tmp_path / "preprocess.log"
    log.write_text("WARNING: File quiz_0_001.nii.gz only has label 0\n")
    message = _explain_failure(OSError(28, "No space left on device"), log, tmp_path)
    assert message.startswith("nnU-Net preprocessing failed: OSError: [Errno 28] No space left on device\n")
    assert "nnU-Net also warned: WARNING: File quiz_0_001.nii.gz only has label 0" in message
    assert "not look like a data problem" in message
    log.write_text("WARNING: something\nError: Unexpected labels found in file quiz_0_001.nii.gz\n")
    message = _explain_failure(RuntimeError("Some images have errors. Please check text output above"), log, tmp_path)
    assert message.startswith("nnU-Net preprocessing failed for case quiz_0_001: Error: Unexpected labels")
    assert "pancseg clean" in message


def test_preprocess_before_prepare(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "project_dir: ./work\n")
    result = runner.invoke(app, ["preprocess", "-c", str(cfg)])
    assert result.exit_code == 1 and "run `pancseg prepare`" in result.stderr
