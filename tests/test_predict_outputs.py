"""``pancseg predict``'s optional outputs end to end: a DICOM series in, every output out, with both
engines; re-runs add what is missing without predicting again, and a replaced mask takes its outputs along."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import write_dicom_series
from pancreas_cli.cli import app
from pancreas_cli.outputs.dicomseg import read_dicom_seg
from pancreas_cli.outputs.probabilities import read_probabilities, segmentation_of
from pancreas_cli.outputs.preview import PREVIEW_SIZE
from pancreas_cli.tables import read_table

pytestmark = pytest.mark.slow
ALL = ("--save-probabilities", "--statistics", "--preview", "--output-format", "dicom-seg")


def _predict(runner: CliRunner, project: Path, source: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["predict", "-c", str(project / "pancseg.yaml"), "-i", str(source), "-o", str(out),
                                 "--fold", "4", "--json", *extra])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


def _scan(project: Path) -> Path:
    return sorted((project / "data" / "test").glob("*_0000.nii.gz"))[0]


def _mask(out: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))


def test_every_output_of_a_dicom_series_and_reruns(trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    image = sitk.ReadImage(str(_scan(trained_project)))
    exam = write_dicom_series(sitk.GetArrayFromImage(image).astype(np.int16), tmp_path / "exam", image.GetSpacing())
    out = tmp_path / "out"
    first, summary = _predict(runner, trained_project, exam, out, "--fast", *ALL)
    assert first.exit_code == 0, first.output
    assert summary["predicted"] == 1 and set(summary["summaries"]) == {"statistics", "preview"}
    mask = _mask(out, "exam")
    probabilities = read_probabilities(out / "probabilities" / "exam.nii.gz")
    assert len(probabilities) == 2 and np.array_equal(segmentation_of(probabilities), mask)  # regions (the default)
    stats = json.loads((out / "statistics" / "exam.json").read_text(encoding="utf-8"))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    assert stats["pancreas_volume_ml"] == pytest.approx((mask > 0).sum() * voxel_ml, rel=1e-3)
    assert stats["subtype"] == summary["cases"][0]["subtype"]
    assert [row["case"] for _, row in read_table(out / "statistics.csv").records()] == ["exam"]
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "preview" / "exam.png")).shape[:2] == (PREVIEW_SIZE[1], PREVIEW_SIZE[0])
    assert "exam.png" in (out / "preview" / "index.html").read_text(encoding="utf-8")
    print(f"preview: {out / 'preview' / 'exam.png'}")
    files = tuple(sorted(str(p) for p in exam.iterdir()))
    assert np.array_equal(read_dicom_seg(out / "dicom_seg" / "exam.dcm", files), mask)

    outputs = [out / "exam.nii.gz", out / "probabilities" / "exam.nii.gz", out / "statistics" / "exam.json",
               out / "preview" / "exam.png", out / "dicom_seg" / "exam.dcm"]
    written = {p: p.stat().st_mtime_ns for p in outputs}
    again, summary = _predict(runner, trained_project, exam, out, "--fast", *ALL)
    assert again.exit_code == 0 and (summary["predicted"], summary["skipped"]) == (0, 1)
    assert {p: p.stat().st_mtime_ns for p in outputs} == written  # nothing redone

    for path in outputs[2:]:
        path.unlink()
    added, summary = _predict(runner, trained_project, exam, out, "--fast", *ALL)
    assert added.exit_code == 0 and summary["predicted"] == 0 and all(p.is_file() for p in outputs)
    assert outputs[0].stat().st_mtime_ns == written[outputs[0]]

    forced, summary = _predict(runner, trained_project, exam, out, "--fast", "--force")  # a new mask
    assert forced.exit_code == 0 and summary["predicted"] == 1 and summary["summaries"] == {}
    assert not any(p.exists() for p in outputs[1:]) and not (out / "statistics.csv").exists()
    assert not (out / "preview" / "index.html").exists()


def test_nnunets_engine_saves_probabilities_without_pickles(trained_project: Path, runner: CliRunner,
                                                            tmp_path: Path) -> None:
    """Asking for probabilities later predicts the finished case again (only the network gives them), with
    no --force: the mask is this model's. nnU-Net's .npz and .pkl are not written."""
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(_scan(trained_project), source)
    out, nnunet = tmp_path / "out", ("--set", "predict.engine=nnunet")
    plain, _ = _predict(runner, trained_project, source, out, *nnunet)
    assert plain.exit_code == 0, plain.output
    case = next(out.glob("*.nii.gz")).name.removesuffix(".nii.gz")
    before = _mask(out, case)
    with_maps, summary = _predict(runner, trained_project, source, out, *nnunet, "--save-probabilities")
    assert with_maps.exit_code == 0 and summary["predicted"] == 1, with_maps.output
    mask = _mask(out, case)
    assert np.array_equal(mask, before)
    assert np.array_equal(segmentation_of(read_probabilities(out / "probabilities" / f"{case}.nii.gz")), mask)
    assert not [p for p in out.rglob("*") if p.suffix in (".pkl", ".npz")]

    refused, _ = _predict(runner, trained_project, source, tmp_path / "seg", *nnunet, "--output-format", "dicom-seg")
    assert refused.exit_code == 1 and "--output-format dicom-seg needs a DICOM series folder" in refused.stderr
    assert not (tmp_path / "seg").exists()
    unknown = runner.invoke(app, ["predict", "-i", str(source), "-o", str(tmp_path / "x"), "--output-format", "png"])
    assert unknown.exit_code == 2 and "must be nifti or dicom-seg" in unknown.output


def test_an_output_that_cannot_be_written_fails_the_case_but_keeps_the_rest(trained_project: Path, runner: CliRunner,
                                                                         tmp_path: Path) -> None:
    """A series whose UIDs an anonymiser blanked cannot get a SEG: the case fails with the reason, its mask
    and statistics are kept."""
    import pydicom

    image = sitk.ReadImage(str(_scan(trained_project)))
    exam = write_dicom_series(sitk.GetArrayFromImage(image).astype(np.int16), tmp_path / "anon", image.GetSpacing())
    for file in exam.iterdir():
        dataset = pydicom.dcmread(file)
        dataset.SOPInstanceUID = dataset.SeriesInstanceUID = dataset.StudyInstanceUID = ""
        dataset.save_as(file)
    out = tmp_path / "out"
    result, _ = _predict(runner, trained_project, exam, out, "--fast", "--statistics", "--output-format", "dicom-seg")
    assert result.exit_code == 1
    assert f"{exam}: its dicom-seg: its DICOM files have no SOPInstanceUID, StudyInstanceUID" in result.stderr
    assert (out / "anon.nii.gz").is_file() and (out / "statistics" / "anon.json").is_file()
    assert not (out / "dicom_seg").exists() or not any((out / "dicom_seg").iterdir())
