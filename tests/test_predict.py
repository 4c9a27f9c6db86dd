"""``pancseg predict`` with a briefly trained smoke model (CPU)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from pancreas_cli.cli import app
from pancreas_cli.config import load_config
from pancreas_cli.predict import PredictError, find_inputs, predict

pytestmark = pytest.mark.slow


def _predict(runner: CliRunner, project: Path, source: Path, out: Path, *extra: str):
    return runner.invoke(app, ["predict", "-c", str(project / "pancseg.yaml"), "-i", str(source), "-o", str(out),
                               "--fold", "4", *extra])


def _inputs(project: Path, tmp_path: Path) -> Path:
    """The test images, one renamed without ``_0000`` and one converted to .nrrd."""
    folder = tmp_path / "in"
    folder.mkdir()
    images = sorted((project / "data" / "test").glob("*_0000.nii.gz"))
    shutil.copy(images[0], folder / images[0].name)
    sitk.WriteImage(sitk.ReadImage(str(images[1])), str(folder / "other_scan.nrrd"))
    return folder


def test_names_geometry_and_csv_format(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    result = _predict(runner, trained_project, source, out, "--json")
    assert result.exit_code == 0, result.output
    first = sorted((trained_project / "data" / "test").glob("*_0000.nii.gz"))[0].name.replace("_0000", "")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted([first, "other_scan.nii.gz"])
    for name, src in ((first, source / first.replace(".nii.gz", "_0000.nii.gz")), ("other_scan.nii.gz", source / "other_scan.nrrd")):
        mask, image = sitk.ReadImage(str(out / name)), sitk.ReadImage(str(src))
        assert mask.GetSize() == image.GetSize()
        assert np.allclose(mask.GetSpacing(), image.GetSpacing()) and np.allclose(mask.GetOrigin(), image.GetOrigin())
        assert mask.GetDirection() == image.GetDirection()
        assert set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist()) <= {0, 1, 2}
    lines = (out / "subtype_results.csv").read_text().splitlines()
    assert lines[0] == "Names,Subtype"
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted([first, "other_scan.nii.gz"])
    assert all(line.split(",")[1] in {"0", "1", "2"} for line in lines[1:])
    probs = (out / "subtype_probabilities.csv").read_text().splitlines()
    assert probs[0] == "Names,p0,p1,p2,subtype_source"
    assert all(abs(sum(map(float, row.split(",")[1:4])) - 1) < 1e-4 for row in probs[1:])
    # where each subtype came from: a lesion in the mask, or the pancreas alone (none segmented)
    for row in probs[1:]:
        name, source = row.split(",")[0], row.split(",")[4]
        has_lesion = bool((sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))) == 2).any())
        assert source == ("lesion" if has_lesion else "pancreas"), row
    data = json.loads(result.stdout)
    assert data["predicted"] == 2 and data["folds"] == [4] and not data["failed"]
    assert not list(out.glob(".partial_*")), "a temporary output was left behind"


def test_resume_skips_done_cases_and_rebuilds_csv(trained_project: Path, runner: CliRunner, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pancreas_cli.multitask.predictor import ProgressPredictor

    monkeypatch.setattr(ProgressPredictor, "report_every_s", 0.0)  # every tile, not every 15 s
    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    first_run = _predict(runner, trained_project, source, out)
    assert first_run.exit_code == 0
    # before each case's network work: its size (a finely resampled scan can take long on a CPU)
    assert re.search(r"other_scan: \d+x\d+x\d+ voxels at the model's spacing, \d+ tiles?; network passes: \d+",
                     first_run.stderr), first_run.stderr
    assert re.search(r"other_scan: (\d+)/\1 tiles", first_run.stderr), first_run.stderr  # progress within a case
    stamp = (out / "other_scan.nii.gz").stat().st_mtime_ns
    (out / "subtype_results.csv").unlink()
    first = next(p for p in out.glob("*.nii.gz") if p.name != "other_scan.nii.gz")
    first.unlink()
    again = _predict(runner, trained_project, source, out, "--json")
    assert again.exit_code == 0
    data = json.loads(again.stdout)
    assert data["predicted"] == 1 and data["skipped"] == 1
    skipped = next(c for c in data["cases"] if c["status"] == "skipped")
    assert skipped["subtype"] in (0, 1, 2) and len(skipped["probabilities"]) == 3  # from the case's record
    assert Path(data["out_dir"]).is_absolute()
    assert (out / "other_scan.nii.gz").stat().st_mtime_ns == stamp
    assert len((out / "subtype_results.csv").read_text().splitlines()) == 3  # header + both cases
    forced = json.loads(_predict(runner, trained_project, source, out, "--force", "--json").stdout)
    assert forced["predicted"] == 2 and forced["skipped"] == 0


def test_masks_not_written_by_this_model_are_refused(trained_project: Path, runner: CliRunner,
                                                     tmp_path: Path) -> None:
    """Nothing is lost: a mask another model, a retrained checkpoint or other settings wrote is not
    replaced without --force; one pancseg did not write (ground truth) not even with it."""
    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "other_scan.nii.gz").write_bytes(b"a user's own mask")
    for force in ((), ("--force",)):
        refused = _predict(runner, trained_project, source, out, *force)
        assert refused.exit_code == 1
        assert f"{out / 'other_scan.nii.gz'} exists and was not written by pancseg predict" in refused.stderr
        assert "not even with --force" in refused.stderr
    assert (out / "other_scan.nii.gz").read_bytes() == b"a user's own mask"
    assert sorted(p.name for p in out.iterdir()) == ["other_scan.nii.gz"]

    (out / "other_scan.nii.gz").unlink()
    assert _predict(runner, trained_project, source, out).exit_code == 0
    step = _predict(runner, trained_project, source, out, "--set", "predict.tile_step_size=1.0")
    assert step.exit_code == 1 and "(and 1 more) exists" in step.stderr and "another tile step size" in step.stderr

    checkpoint = trained_project / "work" / "nnUNet_results"
    checkpoint = next(checkpoint.glob("*/*/fold_4/checkpoint_best.pth"))
    times = checkpoint.stat()
    try:
        os.utime(checkpoint, ns=(times.st_atime_ns, times.st_mtime_ns + 10**9))  # as if trained again
        retrained = _predict(runner, trained_project, source, out)
        assert retrained.exit_code == 1 and "the checkpoint changed since (retrained?)" in retrained.stderr
        # pancseg run replaces only what the new checkpoint did not write
        config = load_config(trained_project / "pancseg.yaml")
        first = predict(config, input_path=source, out_dir=out, folds=[4], replace_outdated=True)
        assert (first.count("predicted"), first.count("skipped")) == (2, 0)
        # A run stopped between writing a mask and its record redoes that case without --force.
        record = out / ".pancseg" / "other_scan.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "pending": True}))
        resumed = predict(config, input_path=source, out_dir=out, folds=[4])
        assert (resumed.count("predicted"), resumed.count("skipped")) == (1, 1)
        assert "pending" not in json.loads(record.read_text())
        record.write_text("{truncated")
        unreadable = _predict(runner, trained_project, source, out)
        assert unreadable.exit_code == 1 and "its record is unreadable" in unreadable.stderr
    finally:
        os.utime(checkpoint, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_a_changed_scan_is_not_skipped(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """Same model, same case name, other scan (replaced, or another -i folder): the old mask is not kept."""
    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    assert _predict(runner, trained_project, source, out).exit_code == 0
    scan = source / "other_scan.nrrd"
    image = sitk.ReadImage(str(scan))
    sitk.WriteImage(sitk.Flip(image, [True, False, False]), str(scan))
    changed = _predict(runner, trained_project, source, out)
    assert changed.exit_code == 1
    assert f"made from another scan than {scan}, or before it changed" in changed.stderr
    config = load_config(trained_project / "pancseg.yaml")
    redone = predict(config, input_path=source, out_dir=out, folds=[4], replace_outdated=True)
    assert [o.case for o in redone.outcomes if o.status == "predicted"] == ["other_scan"]


def test_sigterm_keeps_finished_cases(trained_project: Path, runner: CliRunner, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped by a scheduler after the first case: its mask and CSV row stay, no scratch is left,
    and the same command continues."""
    import signal

    from pancreas_cli import predict as predict_module

    real_compute = predict_module._CaseRunner.compute
    calls: list[str] = []

    def terminated(self, case, ready):
        calls.append(case.case)
        if len(calls) == 2:  # the first case is being written meanwhile: that write completes
            os.kill(os.getpid(), signal.SIGTERM)
        return real_compute(self, case, ready)

    monkeypatch.setattr(predict_module._CaseRunner, "compute", terminated)
    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    result = _predict(runner, trained_project, source, out)
    assert result.exit_code == 143, result.output
    assert "interrupted; finished work is kept: run the same command again to continue" in result.stderr
    assert [p.name for p in out.glob("*.nii.gz")] == [f"{calls[0]}.nii.gz"]
    assert (out / "subtype_results.csv").read_text().splitlines()[1].startswith(f"{calls[0]}.nii.gz,")
    assert not list(out.glob(".scratch*")) and not list(out.glob(".partial*"))
    monkeypatch.setattr(predict_module._CaseRunner, "compute", real_compute)
    again = json.loads(_predict(runner, trained_project, source, out, "--json").stdout)
    assert again["predicted"] == 1 and again["skipped"] == 1


def test_two_predictions_into_one_folder(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """The second is refused: both checked the folder at their start, then wrote over each other."""
    from conftest import held_elsewhere
    from pancreas_cli import locks

    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    with held_elsewhere(lambda: locks.output_folder(out)) as pid:
        result = _predict(runner, trained_project, source, out)
    assert result.exit_code == 1 and f"the output folder {out} is in use by pid {pid}" in result.stderr
    assert not out.exists()


def test_an_input_scan_is_never_written_over(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    scan = tmp_path / "scans" / "ct.nii.gz"
    scan.parent.mkdir()
    shutil.copy(next((trained_project / "data" / "test").glob("*_0000.nii.gz")), scan)
    before = scan.read_bytes()
    result = _predict(runner, trained_project, scan, scan.parent, "--force")
    assert result.exit_code == 1 and "would be written over this input scan" in result.stderr
    assert scan.read_bytes() == before and sorted(p.name for p in scan.parent.iterdir()) == ["ct.nii.gz"]


def test_failing_case_is_reported_others_complete(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    source, out = _inputs(trained_project, tmp_path), tmp_path / "out"
    sitk.WriteImage(sitk.Image([16, 16], sitk.sitkInt16), str(source / "flat_2d.nii.gz"))
    (source / "broken.nii.gz").write_bytes(b"not an image")
    result = _predict(runner, trained_project, source, out)
    assert result.exit_code == 1
    assert "flat_2d.nii.gz" in result.stderr and "3D" in result.stderr
    assert "broken.nii.gz" in result.stderr
    assert result.stderr.count("broken.nii.gz") == 1  # named once, not again inside the error text
    assert "2 predicted" in result.stdout and "2 failed" in result.stdout
    log = trained_project / "work" / "logs" / "predict.log"
    assert f"full errors: {log}" in result.stderr
    assert "broken.nii.gz: prediction failed" in log.read_text() and "Traceback" in log.read_text()
    assert len(list(out.glob("*.nii.gz"))) == 2
    assert len((out / "subtype_results.csv").read_text().splitlines()) == 3


def test_errors(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    cfg = str(trained_project / "pancseg.yaml")
    missing = runner.invoke(app, ["predict", "-c", cfg, "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 1 and "no such file or folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["predict", "-c", cfg, "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert empty.exit_code == 1 and "no images" in empty.stderr
    fold = runner.invoke(app, ["predict", "-c", cfg, "-i", str(trained_project / "data" / "test"), "-o",
                               str(tmp_path / "o"), "--fold", "2"])
    assert fold.exit_code == 1 and "fold 2 has no checkpoint_best.pth" in fold.stderr
    bad = runner.invoke(app, ["predict", "-c", cfg, "-i", str(trained_project / "data" / "test"), "-o",
                              str(tmp_path / "o"), "--checkpoint", "latest"])
    assert bad.exit_code == 2
    same = runner.invoke(app, ["predict", "-c", cfg, "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "empty")])
    assert same.exit_code == 1 and "the output folder is the input folder" in same.stderr
    device = runner.invoke(app, ["predict", "-c", cfg, "-i", str(trained_project / "data" / "test"), "-o",
                                 str(tmp_path / "o"), "--device", "cuda:99"])
    assert device.exit_code == 1 and "cuda:99 requested but" in device.stderr


def test_model_that_cannot_be_loaded(trained_project: Path, runner: CliRunner, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import pancreas_cli.predict as predict_module

    def broken(*args: object) -> None:
        raise RuntimeError("Error(s) in loading state_dict for MultiTaskNet: size mismatch for head.mlp.2.weight")

    monkeypatch.setattr(predict_module, "_load_model", broken)
    result = _predict(runner, trained_project, _inputs(trained_project, tmp_path), tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot load the model in" in result.stderr and "size mismatch for head.mlp.2.weight" in result.stderr
    assert "predict.log" in result.stderr


def test_find_inputs_names(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "b.nii", "c.mha"):
        (tmp_path / name).write_bytes(b"")
    assert [c.case for c in find_inputs(tmp_path)] == ["a", "b", "c"]
    (tmp_path / "a.nrrd").write_bytes(b"")
    with pytest.raises(PredictError, match="both be written as a.nii.gz"):
        find_inputs(tmp_path)


def test_folder_without_images_or_dicom(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PredictError, match="no images .* and no DICOM series found"):
        find_inputs(tmp_path)
    assert "WARNING" not in capfd.readouterr().err  # ITK's own "No Series were found" stays quiet


def test_default_folds_are_the_finished_ones(tmp_path: Path) -> None:
    """A fold stopped half-way, or still training, has checkpoint_best.pth but must not join the ensemble."""
    from pancreas_cli.predict import _resolve_folds

    for fold, names in ((0, ["checkpoint_best.pth", "checkpoint_final.pth"]), (1, ["checkpoint_best.pth"])):
        (tmp_path / f"fold_{fold}").mkdir()
        for name in names:
            (tmp_path / f"fold_{fold}" / name).touch()
    warnings: list[str] = []
    idle = lambda fold: []  # noqa: E731
    assert _resolve_folds(tmp_path, None, "checkpoint_best.pth", warnings.append, idle) == [0]
    assert warnings == ["predicting with the finished fold(s) [0]; unfinished fold(s) [1] left out (pass --fold to "
                        "include them)"]
    warnings.clear()
    assert _resolve_folds(tmp_path, [0, 1], "checkpoint_best.pth", warnings.append, idle) == [0, 1]
    assert warnings == ["fold 1 has not finished training (no checkpoint_final.pth; stopped, or still running): "
                        "predicting with its checkpoint_best.pth so far"]
    with pytest.raises(PredictError, match=r"fold 2 has no checkpoint_best.pth .* trained folds: \[0, 1\]"):
        _resolve_folds(tmp_path, [2], "checkpoint_best.pth", warnings.append, idle)
    (tmp_path / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(PredictError, match=r"no fold has finished training \(fold\(s\) \[0, 1\] stopped"):
        _resolve_folds(tmp_path, None, "checkpoint_best.pth", warnings.append, idle)


def test_a_fold_trained_further_is_not_finished(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """`train --resume --epochs N` on a finished fold keeps its old checkpoint_final.pth while it trains:
    predict must not take that fold's changing checkpoint_best.pth into the default ensemble."""
    from conftest import held_elsewhere
    from pancreas_cli import locks

    cfg = str(trained_project / "pancseg.yaml")
    args = ["predict", "-c", cfg, "-i", str(trained_project / "data" / "test"), "-o", str(tmp_path / "out")]
    with held_elsewhere(lambda: locks.fold(trained_project / "work", "nnUNetTrainerMultiTask", 4)) as pid:
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert "no fold has finished training (fold(s) [4] stopped or are still running)" in result.stderr
        asked = runner.invoke(app, [*args, "--fold", "4"])
        assert asked.exit_code == 0, asked.output
        assert f"fold 4 is training now (pid {pid} " in asked.stderr
    assert not locks.fold_holders(trained_project / "work", "nnUNetTrainerMultiTask", 4)


def test_predict_before_preprocessing_says_what_to_run(runner: CliRunner, tmp_path: Path) -> None:
    from conftest import write_config

    (tmp_path / "data").mkdir()
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), str(tmp_path / "scan.nii.gz"))
    cfg = write_config(tmp_path, "project_dir: ./work\n")
    result = runner.invoke(app, ["predict", "-c", str(cfg), "-i", str(tmp_path / "scan.nii.gz"), "-o",
                                 str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no finished preprocessing (never run, or interrupted)" in result.stderr and "pancseg preprocess" in result.stderr


def test_engines_agree_and_the_summary_says_how_fast(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """pancseg's engine (mirrored, batched, region-restricted, overlapped) against nnU-Net's own path on the
    same scans: the same masks and subtypes; the output names the tiles and the speed."""
    source = _inputs(trained_project, tmp_path)
    mirrored = ("--set", "predict.mirroring=true")
    ours = _predict(runner, trained_project, source, tmp_path / "ours", *mirrored)
    assert ours.exit_code == 0, ours.output
    assert re.search(r"2 predicted in [\d.]+s \([\d.]+ cases/min; the model loaded in [\d.]+s before\)",
                     ours.stdout), ours.stdout
    assert re.search(r"\] \S+ [\d.]+s \(read [\d.]+s, network [\d.]+s, export [\d.]+s\); \d+/\d+ tiles mirrored",
                     ours.stderr), ours.stderr
    reference = _predict(runner, trained_project, source, tmp_path / "ref", *mirrored, "--set",
                         "predict.engine=nnunet", "--json")
    assert reference.exit_code == 0, reference.output
    assert json.loads(reference.stdout)["engine"] == "nnunet"
    assert json.loads(reference.stdout)["load_seconds"] > 0  # reported apart from the cases' time
    for mask in sorted((tmp_path / "ref").glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ours" / mask.name)))
        assert (a != b).mean() < 1e-4, mask.name
    assert (tmp_path / "ref" / "subtype_results.csv").read_text() == (tmp_path / "ours" / "subtype_results.csv").read_text()
    other = _predict(runner, trained_project, source, tmp_path / "ours", *mirrored, "--set", "predict.engine=nnunet")
    assert other.exit_code == 1 and "another prediction engine" in other.stderr


def test_subtype_source_column_and_older_records(tmp_path: Path) -> None:
    """``subtype_source`` says whether the case's mask had a lesion; records of a pancseg before the
    column (no ``lesion_found``) still rebuild the CSVs, with the source left empty."""
    from pancreas_cli.predict import rebuild_csvs
    from pancreas_cli.records import write_record

    out = tmp_path / "out"
    base = {"source": "x", "source_stamp": {}, "model": {"m": 1}}
    for case, extra in (("a", {"lesion_found": True}), ("b", {"lesion_found": False}), ("old", {})):
        (out / f"{case}.nii.gz").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{case}.nii.gz").write_bytes(b"mask")
        write_record(out, case, {**base, "case": case, "probabilities": [0.2, 0.5, 0.3], **extra})
    rebuild_csvs(out)
    assert (out / "subtype_probabilities.csv").read_text(encoding="utf-8").splitlines() == [
        "Names,p0,p1,p2,subtype_source",
        "a.nii.gz,0.200000,0.500000,0.300000,lesion",
        "b.nii.gz,0.200000,0.500000,0.300000,pancreas",
        "old.nii.gz,0.200000,0.500000,0.300000,",
    ]
    assert (out / "subtype_results.csv").read_text(encoding="utf-8").splitlines()[1:] == [
        "a.nii.gz,1", "b.nii.gz,1", "old.nii.gz,1"]
