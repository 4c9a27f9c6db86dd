"""Model archives: export -> a fresh folder -> predict --model gives the project's masks; tampered,
unsafe or foreign archives are refused before anything is used; install-model and nnU-Net's installer."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from pancreas_cli import modelzip
from pancreas_cli.cli import app
from pancreas_cli.exceptions import ModelArchiveError

pytestmark = pytest.mark.slow  # the trained smoke project


@pytest.fixture(scope="module")
def archive(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "model.zip"
    result = CliRunner().invoke(app, ["export", "-c", str(trained_project / "pancseg.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(modelzip.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rewrite(source: Path, target: Path, edit) -> Path:
    """A copy of the archive with ``edit(name, data)`` -> [(name, data), ...] applied to every entry."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            for name, data in edit(info.filename, src.read(info)):
                out.writestr(name, data)
    return target


def _voxels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_an_exported_model_predicts_the_projects_masks_elsewhere(archive: Path, trained_project: Path,
                                                                  runner: CliRunner, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    names = [n for n in zipfile.ZipFile(archive).namelist()]
    model = "Dataset001_PancreasCancer/nnUNetTrainerMultiTask__nnUNetResEncUNetMPlans__3d_smoke"
    assert sorted(names) == sorted(f"{model}/{n}" for n in (
        "plans.json", "dataset.json", "dataset_fingerprint.json", "fold_4/checkpoint_final.pth",
        "fold_4/pancseg_training.json", "pancseg_model.json"))
    scans = trained_project / "data" / "test"
    project = runner.invoke(app, ["predict", "-c", str(trained_project / "pancseg.yaml"), "-i", str(scans), "-o",
                                  str(tmp_path / "project"), "--fold", "4", "--fast"])
    assert project.exit_code == 0, project.output
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)  # no config, no project: the archive is all there is
    for out in ("a", "b"):
        result = runner.invoke(app, ["predict", "--model", str(archive), "-i", str(scans), "-o", out, "--fast",
                                     "--device", "cpu"])
        assert result.exit_code == 0, result.output
    expected, got = _voxels(tmp_path / "project"), _voxels(fresh / "a")
    assert expected.keys() == got.keys() and len(got) == 2
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert (fresh / "a" / "subtype_results.csv").read_text() == (tmp_path / "project" / "subtype_results.csv").read_text()
    assert sorted(p.name for p in fresh.iterdir()) == [".pancseg-locks", "a", "b"]  # no project made
    assert len(list(cache.iterdir())) == 1  # unpacked once, reused by the second run


def test_a_second_open_reuses_the_cache(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = modelzip.open_model(archive)
    monkeypatch.setattr(modelzip, "_unpack", lambda *a: pytest.fail("unpacked again"))
    assert modelzip.open_model(archive) == first
    assert first.task == "multitask" and (first.model_dir / "fold_4" / "checkpoint_final.pth").is_file()


def _flip_checkpoint_byte(name: str, data: bytes) -> list[tuple[str, bytes]]:
    if name.endswith(".pth"):
        data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    return [(name, data)]


def _manifest_edit(change):
    def edit(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name.endswith(modelzip.MANIFEST_NAME):
            manifest = json.loads(data)
            change(manifest)
            data = json.dumps(manifest).encode()
        return [(name, data)]
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_flip_checkpoint_byte, "checkpoint_final.pth does not match its checksum"),
    (lambda n, d: [(n, d)] + ([(n.replace("plans.json", "extra.py"), b"print(1)")] if n.endswith("/plans.json") else []),
     "extra.py is not in its manifest"),
    (lambda n, d: [] if n.endswith("dataset.json") else [(n, d)], "dataset.json is missing"),
    (lambda n, d: [(n, d)] + ([("../evil.txt", b"x")] if n.endswith("/plans.json") else []),
     "leaves the folder it is unpacked into"),
    (_manifest_edit(lambda m: m.update(reads_with=["9.0", "10.0"])), "for pancseg >=9.0,<10.0"),
    (lambda n, d: [(n.replace("pancseg_model.json", "other.json"), d)], "not a pancseg model archive"),
])
def test_a_changed_archive_is_refused_and_leaves_nothing(archive: Path, tmp_path: Path, cache: Path, edit,
                                                         message: str, runner: CliRunner) -> None:
    bad = _rewrite(archive, tmp_path / "bad.zip", edit)
    with pytest.raises(ModelArchiveError, match="refused|pancseg|not a pancseg") as caught:
        modelzip.open_model(bad)
    assert message in str(caught.value)
    assert not cache.exists() or not any(cache.iterdir())  # no half-unpacked model left
    result = runner.invoke(app, ["predict", "--model", str(bad), "-i", str(tmp_path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and message in result.stderr


def test_a_link_in_the_archive_is_refused(archive: Path, tmp_path: Path) -> None:
    bad = shutil.copy(archive, tmp_path / "link.zip")
    with zipfile.ZipFile(bad, "a") as out:
        info = zipfile.ZipInfo("Dataset001_PancreasCancer/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        out.writestr(info, "/etc/passwd")
    with pytest.raises(ModelArchiveError, match="is a link or leaves the folder"):
        modelzip.open_model(Path(bad))


def test_install_model_and_nnunets_installer(archive: Path, tmp_path: Path, runner: CliRunner,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pancseg.yaml").write_text("project_dir: ./work\n")
    args = ["install-model", str(archive), "-c", str(tmp_path / "pancseg.yaml")]
    first, again = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0 and "installed:" in first.stdout, first.output
    assert again.exit_code == 0 and "already installed" in again.stdout
    installed = next((tmp_path / "work" / "nnUNet_results").glob("Dataset*/*__*__*"))
    assert modelzip.open_model(installed).manifest["folds"] == [4]
    (installed / "dataset.json").write_text("{}")
    with pytest.raises(ModelArchiveError, match="changed since the model was installed"):
        modelzip.open_model(installed)
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--force" in refused.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0 and modelzip.open_model(installed)

    from nnunetv2.model_sharing import model_import

    monkeypatch.setattr(model_import, "nnUNet_results", str(tmp_path / "nnunet"))
    model_import.install_model_from_zip_file(str(archive))
    assert (tmp_path / "nnunet" / installed.relative_to(installed.parents[1]) / "fold_4" / "checkpoint_final.pth").is_file()


def test_export_keeps_its_own_archive_and_refuses_another_file_and_a_missing_fold(trained_project: Path, runner: CliRunner,
                                                             tmp_path: Path) -> None:
    cfg = str(trained_project / "pancseg.yaml")
    (tmp_path / "m.zip").write_text("mine")
    taken = runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "m.zip")])
    assert taken.exit_code == 1 and "--force" in taken.stderr and (tmp_path / "m.zip").read_text() == "mine"
    done = runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "a.zip")])
    assert done.exit_code == 0 and done.stdout.startswith("exported: ")
    written = (tmp_path / "a.zip").stat().st_mtime_ns
    again = runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "a.zip")])  # the same archive: nothing to do
    assert again.exit_code == 0 and again.stdout.startswith("up to date: ")
    assert (tmp_path / "a.zip").stat().st_mtime_ns == written
    best = runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "a.zip"), "--checkpoint", "best"])
    assert best.exit_code == 1 and "is not this archive" in best.stderr  # another archive: refused
    damaged = _rewrite(tmp_path / "a.zip", tmp_path / "b.zip",
                       lambda name, data: [(name, data[:-1] + b"x" if name.endswith(".pth") else data)])
    shutil.copyfile(damaged, tmp_path / "a.zip")
    assert runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "a.zip")]).exit_code == 1  # not the same
    data = bytearray((tmp_path / "b.zip").read_bytes())  # bytes flipped inside a checkpoint: its CRC fails
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    (tmp_path / "a.zip").write_bytes(bytes(data))
    flipped = runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "a.zip")])
    assert flipped.exit_code == 1 and "is not this archive" in flipped.stderr
    missing = runner.invoke(app, ["export", "-c", cfg, "-o", str(tmp_path / "n.zip"), "--fold", "2"])
    assert missing.exit_code == 1 and "fold 2 has no checkpoint_final.pth" in missing.stderr
