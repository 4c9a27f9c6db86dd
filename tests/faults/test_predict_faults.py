"""``pancseg predict`` under faults: damaged outputs, mixed DICOM folders, killed runs, read-only models,
odd names, hand-edited records and scans that are not CT (issue 20)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from pancreas_cli.cli import app
from pancreas_cli.imageio import read_image
from pancreas_cli.predict import rebuild_csvs

pytestmark = pytest.mark.slow

SCOUT_UID = "1.2.826.0.1.3680043.2.1125.1.4242"
REPO = Path(__file__).resolve().parents[2]


def _predict(runner: CliRunner, project: Path, source: Path | str, out: Path | str, *extra: str):
    return runner.invoke(app, ["predict", "-c", str(project / "pancseg.yaml"), "-i", str(source), "-o", str(out),
                               "--fold", "4", *extra])


def _scans(project: Path, folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for image in sorted((project / "data" / "test").glob("*_0000.nii.gz"))[:n]:
        shutil.copy(image, folder / image.name)
    return folder


def _csv_rows(out: Path) -> dict[str, str]:
    lines = (out / "subtype_results.csv").read_text().splitlines()
    assert lines[0] == "Names,Subtype"
    return dict(line.split(",") for line in lines[1:])


def _record_rows(out: Path) -> dict[str, str]:
    """What the CSV must say: the finished records whose masks exist."""
    rows = {}
    for path in sorted((out / ".pancseg").glob("*.json")):
        record = json.loads(path.read_text())
        if not record.get("pending") and (out / f"{path.stem}.nii.gz").is_file():
            rows[f"{path.stem}.nii.gz"] = str(int(np.argmax(record["probabilities"])))
    return rows


def test_a_truncated_mask_is_predicted_again(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """A mask cut to half (a full disk, an interrupted copy) is not skipped as done: it is redone, with a note."""
    source, out = _scans(trained_project, tmp_path / "in", 1), tmp_path / "out"
    assert _predict(runner, trained_project, source, out).exit_code == 0
    mask = next(out.glob("*.nii.gz"))
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    again = _predict(runner, trained_project, source, out, "--json")
    assert again.exit_code == 0, again.output
    assert f"{mask} is not a complete image (" in again.stderr and "predicting it again" in again.stderr
    assert json.loads(again.stdout)["predicted"] == 1
    read_image(mask, verify=True)  # complete again
    assert list(_csv_rows(out)) == [mask.name]


def _add_series(folder: Path, uid: str, description: str, slices: int = 3) -> None:
    """A small second series (a scout) beside the CT's files, written with SimpleITK's DICOM writer."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(slices):
        image = sitk.GetImageFromArray(np.full((32, 32), -1000, np.int16))
        image.SetSpacing((8.0, 8.0))
        tags = {"0020|000e": uid, "0008|0060": "CT", "0008|103e": description, "0020|0013": str(i + 1),
                "0020|0032": f"0\\0\\{5 * i}", "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"{uid}.{i + 1}"}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{description}{i}.dcm"))
        writer.Execute(image)


def test_a_dicom_folder_with_a_scout_series(trained_project: Path, runner: CliRunner, tmp_path: Path,
                                            realdata: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CT series (most slices) is segmented, on its grid, with one warning naming it and the scout;
    --series names one; an unknown UID lists the series. Run from inside the folder (``-i .``): the case
    is the folder's name. (Also the test of DICOM input: one prediction of the real series, not two.)"""
    exam = tmp_path / "exam"
    shutil.copytree(realdata / "totalsegmentator" / "example_ct_dicom", exam)
    _add_series(exam, SCOUT_UID, "Topogram")
    monkeypatch.chdir(exam)
    unknown = _predict(runner, trained_project, ".", "../out", "--series", "1.2.3")
    assert unknown.exit_code == 1 and "Traceback" not in unknown.output
    assert "no DICOM series '1.2.3'" in unknown.stderr
    assert "(empty UID) (20 slices, CT, \"CT Body 3.0\")" in unknown.stderr
    assert f"{SCOUT_UID} (3 slices, CT, \"Topogram\")" in unknown.stderr
    assert not (tmp_path / "out").exists()

    chosen = _predict(runner, trained_project, ".", "../out", "--fast", "--set", "predict.tile_step_size=1.0")
    assert chosen.exit_code == 0, chosen.output
    assert chosen.stderr.count("warning: ") == 1, chosen.stderr
    assert "2 DICOM series; segmenting the one with the most slices, (empty UID) (20 slices" in chosen.stderr
    assert f"left out: {SCOUT_UID} (3 slices" in chosen.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["exam.nii.gz"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(exam), ""))  # the CT's files
    image, mask = reader.Execute(), sitk.ReadImage(str(out / "exam.nii.gz"))
    assert mask.GetSize() == image.GetSize() == (512, 512, 20)  # on the CT's grid
    assert np.allclose(mask.GetSpacing(), image.GetSpacing()) and np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert (out / "subtype_results.csv").read_text().splitlines()[1].startswith("exam.nii.gz,")

    named = _predict(runner, trained_project, ".", "../out", "--fast", "--set", "predict.tile_step_size=1.0",
                     "--series", "", "--json")
    assert named.exit_code == 0 and "warning" not in named.stderr
    assert json.loads(named.stdout)["skipped"] == 1
    scout = _predict(runner, trained_project, ".", "../out", "--fast", "--set", "predict.tile_step_size=1.0",
                     "--series", SCOUT_UID)
    assert scout.exit_code == 1 and "made from another DICOM series of . ('')" in scout.stderr


def test_equal_series_must_be_named(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    exam = tmp_path / "exam"
    exam.mkdir()
    _add_series(exam, SCOUT_UID, "arterial")
    _add_series(exam, SCOUT_UID + ".2", "venous")
    result = _predict(runner, trained_project, exam, tmp_path / "out")
    assert result.exit_code == 1 and "2 DICOM series have 3 slices" in result.stderr
    assert "name one with --series UID" in result.stderr and '"venous"' in result.stderr
    images = _predict(runner, trained_project, _scans(trained_project, tmp_path / "in", 1), tmp_path / "out",
                      "--series", SCOUT_UID)
    assert images.exit_code == 1 and "--series chooses a series of a DICOM folder" in images.stderr


def test_the_csvs_never_disagree_with_the_records(trained_project: Path, runner: CliRunner, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed --force run (or a retrained model) left rows for masks that are gone or replaced: the CSVs
    are rebuilt from the records before the first case and after each, so a kill at any point leaves them right."""
    from pancreas_cli.progress import CasePrinter

    source, out = _scans(trained_project, tmp_path / "in"), tmp_path / "out"
    assert _predict(runner, trained_project, source, out).exit_code == 0
    truth = _csv_rows(out)
    for path in (out / ".pancseg").glob("*.json"):  # the records of an earlier prediction, and its CSV
        record = json.loads(path.read_text())
        wrong = (int(np.argmax(record["probabilities"])) + 1) % 3
        path.write_text(json.dumps({**record, "probabilities": [float(i == wrong) for i in range(3)]}))
    (out / "subtype_results.csv").write_text("Names,Subtype\nghost.nii.gz,2\n")  # a stale row of no mask

    seen: list[tuple[str, dict[str, str]]] = []
    real_start, real_case = CasePrinter.start, CasePrinter.case

    def start(self, total, stream):
        seen.append(("start", _csv_rows(out)))
        assert seen[-1][1] == _record_rows(out)
        real_start(self, total, stream)

    def case(self, outcome, index):
        seen.append((outcome.case, _csv_rows(out)))
        real_case(self, outcome, index)

    monkeypatch.setattr(CasePrinter, "start", start)
    monkeypatch.setattr(CasePrinter, "case", case)
    forced = _predict(runner, trained_project, source, out, "--force")
    assert forced.exit_code == 0, forced.output
    assert [name for name, _ in seen][0] == "start" and len(seen) == 3
    for name, rows in seen[1:]:  # the case just finished has its new row already
        assert rows[f"{name}.nii.gz"] == truth[f"{name}.nii.gz"]
    assert _csv_rows(out) == truth == _record_rows(out)
    (out / "subtype_results.csv").unlink()
    rebuild_csvs(out)  # the public rebuild, for other commands
    assert _csv_rows(out) == truth


def _make_read_only(root: Path, read_only: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        os.chmod(path, mode & ~0o222 if read_only else mode | stat.S_IWUSR)


def _unprivileged() -> None:
    """In the child: a new user namespace, where root's files are an ordinary owner's (chmod binds root too)."""
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")


def test_a_model_on_read_only_storage_predicts(trained_project: Path, tmp_path: Path) -> None:
    """Only -o is written: no project lock, nnU-Net's log in the output folder. The project is a chmod'ed
    copy; as root (whom chmod does not bind) the command runs in a user namespace, where it does."""
    model = tmp_path / "model"
    shutil.copytree(trained_project, model, ignore=shutil.ignore_patterns("*.holder"))
    source, out = _scans(trained_project, tmp_path / "in", 1), tmp_path / "out"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in model.rglob("*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    _make_read_only(model, True)
    try:
        try:
            done = subprocess.run([sys.executable, "-m", "pancreas_cli", "predict", "-c", str(model / "pancseg.yaml"),
                                   "-i", str(source), "-o", str(out), "--fold", "4"], env=env, capture_output=True,
                                  text=True, encoding="utf-8", timeout=300, preexec_fn=_unprivileged if os.geteuid() == 0 else None)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"running as root and no user namespace to drop its privileges: {exc}")
    finally:
        _make_read_only(model, False)
    assert done.returncode == 0, done.stderr
    assert "1 predicted" in done.stdout
    assert len(list(out.glob("*.nii.gz"))) == 1 and (out / ".pancseg" / "predict.log").is_file()
    assert sorted((str(p), p.stat().st_mtime_ns) for p in model.rglob("*")) == before  # nothing written there


def test_read_only_decision(tmp_path: Path) -> None:
    from pancreas_cli.predict import predict_log, project_writable

    assert project_writable(tmp_path) and project_writable(tmp_path / "missing")
    assert predict_log(tmp_path, tmp_path / "out", False) == tmp_path / "out" / ".pancseg" / "predict.log"
    assert predict_log(tmp_path, tmp_path / "out", True) == tmp_path / "logs" / "predict.log"


def test_an_empty_case_name_is_an_error(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    scan = tmp_path / "in" / "_0000.nii.gz"
    scan.parent.mkdir()
    shutil.copy(next((trained_project / "data" / "test").glob("*_0000.nii.gz")), scan)
    for source in (scan, scan.parent):
        result = _predict(runner, trained_project, source, tmp_path / "out")
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"{scan}: gives an empty case name" in result.stderr
    assert not (tmp_path / "out").exists()


def test_records_without_probabilities(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """Hand-edited records (probabilities null or missing): unreadable, so refused without --force and
    redone with it; never a traceback or a ``None`` row."""
    source, out = _scans(trained_project, tmp_path / "in"), tmp_path / "out"
    assert _predict(runner, trained_project, source, out).exit_code == 0
    first, second = sorted((out / ".pancseg").glob("*.json"))
    first.write_text(json.dumps({**json.loads(first.read_text()), "probabilities": None}))
    record = json.loads(second.read_text())
    del record["probabilities"]
    second.write_text(json.dumps(record))
    refused = _predict(runner, trained_project, source, out)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "its record is unreadable or from an older pancseg" in refused.stderr
    rebuild_csvs(out)
    assert _csv_rows(out) == {}  # no row for either: not "None"
    assert (out / "subtype_probabilities.csv").read_text() == "Names,p0,p1,p2,subtype_source\n"
    forced = _predict(runner, trained_project, source, out, "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["predicted"] == 2
    assert set(_csv_rows(out).values()) <= {"0", "1", "2"} and len(_csv_rows(out)) == 2


def test_a_scan_that_is_not_ct_warns(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """An MR-like scan (0..4000, no air) gets a subtype, so it is named in a warning (also with --quiet)."""
    source = _scans(trained_project, tmp_path / "in", 1)
    ct = next(source.glob("*.nii.gz"))
    image = sitk.ReadImage(str(ct))
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    mr = sitk.GetImageFromArray(((values - values.min()) / np.ptp(values) * 4000).astype(np.int16))
    mr.CopyInformation(image)
    sitk.WriteImage(mr, str(source / "mr.nii.gz"))
    result = runner.invoke(app, ["-q", "predict", "-c", str(trained_project / "pancseg.yaml"), "-i", str(source),
                                 "-o", str(tmp_path / "out"), "--fold", "4", "--json"])
    assert result.exit_code == 0, result.output
    warning = f"warning: {source / 'mr.nii.gz'}: does not look like CT in HU: range [0, 4000]"
    assert result.stderr.count("does not look like CT") == 1 and warning in result.stderr, result.stderr
    assert "the model was trained on CT" in result.stderr
    cases = {c["case"]: c["warnings"] for c in json.loads(result.stdout)["cases"]}
    assert len(cases["mr"]) == 1 and cases[ct.name.replace("_0000.nii.gz", "")] == []


def test_leftovers_of_a_killed_run_are_swept(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    """Scratch folders, partial masks and temporary files of a killed run go at the next run's start, once
    the folder's lock is held (not while another predict holds it); the user's files stay."""
    from conftest import held_elsewhere

    from pancreas_cli import locks

    source, out = _scans(trained_project, tmp_path / "in", 1), tmp_path / "out"
    assert _predict(runner, trained_project, source, out).exit_code == 0
    leftovers = [out / ".scratch_k1w2" / "case" / "case_0000.nii.gz", out / ".partial_case.nii.gz",
                 out / ".pancseg" / ".case.json.x1y2.tmp", out / ".subtype_results.csv.z3.tmp"]
    kept = [out / "notes.txt", out / ".user_settings"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with held_elsewhere(lambda: locks.output_folder(out)):
        assert _predict(runner, trained_project, source, out).exit_code == 1
    assert all(p.exists() for p in leftovers)  # they may be the running command's
    again = _predict(runner, trained_project, source, out)
    assert again.exit_code == 0 and "0 predicted" in again.stdout
    assert not any(p.exists() for p in leftovers) and not (out / ".scratch_k1w2").exists()
    assert all(p.exists() for p in kept)


def test_a_single_series_folder_needs_no_choice(realdata: Path) -> None:
    from pancreas_cli.predict import find_inputs

    warnings: list[str] = []
    dicom = realdata / "totalsegmentator" / "example_ct_dicom"
    (case,) = find_inputs(dicom, warn=warnings.append)
    assert (case.case, case.series, len(case.files), warnings) == ("example_ct_dicom", "", 20, [])
