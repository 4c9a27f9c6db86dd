"""Faults of the data stages (prepare, clean, preprocess): each scenario through the CLI, checking
the exit code, the one-line message and what is left on disk afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from conftest import ct_volume, label_volume, make_quiz, snapshot, write, write_config
from pancreas_cli.cli import app

DATASET = "Dataset001_PancreasCancer"


def _invoke(runner: CliRunner, root: Path, *args: str):
    return runner.invoke(app, [*args, "-c", str(root / "pancseg.yaml")])


def _failed(result, *fragments: str) -> str:
    """The command failed with one error message (no traceback) holding every fragment."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, message
    return message


def _raw(root: Path) -> Path:
    return root / "work" / "nnUNet_raw" / DATASET


def _nnunet_cases(raw: Path) -> int:
    """How many training cases nnU-Net finds in imagesTr (what its integrity check counts)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    return len(get_identifiers_from_splitted_dataset_folder(str(raw / "imagesTr"), ".nii.gz"))


# --------------------------------------------------------------------------------------------
# issue 20, item 2: a source inside (or around) what pancseg writes and deletes


def _old_layout(root: Path) -> None:
    """A user of the older nnU-Net layout: the data already lies in project_dir/nnUNet_raw."""
    make_quiz(_raw(root), per_subtype=1, validation=0, test=1)
    write_config(root, f"project_dir: ./work\ndataset: {{source: ./work/nnUNet_raw/{DATASET}}}\n")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_source_in_the_project_is_refused_and_kept(runner: CliRunner, tmp_path: Path,
                                                    force: list[str]) -> None:
    _old_layout(tmp_path)
    before = snapshot(tmp_path / "work")
    message = _failed(_invoke(runner, tmp_path, "prepare", *force),
                      "dataset.source:", f"is inside {tmp_path / 'work' / 'nnUNet_raw'}", "which pancseg replaces",
                      "copy the data to a folder outside")
    assert "project_dir" in message
    assert snapshot(tmp_path / "work") == before  # nothing deleted, nothing written (not even a lock)


def _layouts(root: Path) -> list[tuple[str, str]]:
    """Configs whose inputs lie in what pancseg replaces or deletes, with the key the message must name."""
    make_quiz(root / "data", per_subtype=1, validation=0, test=1)
    make_quiz(root / "nnUNet_raw" / DATASET, per_subtype=1, validation=0, test=0)  # nnU-Net's own folder
    for folder in ("nnUNet_preprocessed/labels", "nnUNet_results/labels"):
        (root / "work" / folder).mkdir(parents=True)
    (root / "work" / "nnUNet_preprocessed" / "subtypes.csv").write_text("case_id,subtype\n")
    (root / "link").symlink_to(root / "work" / "nnUNet_results" / "labels")
    (root / "work" / "nnUNet_raw").symlink_to(root / "nnUNet_raw")
    return [
        ("source", f"project_dir: ./work\ndataset: {{source: ./nnUNet_raw/{DATASET}}}\n"),  # through the link
        ("source", "project_dir: ./work\ndataset: {source: ./work/nnUNet_preprocessed}\n"),
        ("test_labels", "project_dir: ./work\ndataset: {source: ./data, test_labels: ./work/nnUNet_results/labels}\n"),
        ("test_labels", "project_dir: ./work\ndataset: {source: ./data, test_labels: ./link}\n"),
        ("test_subtypes_csv", "project_dir: ./work\ndataset: {source: ./data, "
                              "test_subtypes_csv: ./work/nnUNet_preprocessed/subtypes.csv}\n"),
        ("subtypes_csv", "project_dir: ./work\ndataset: {source: ./data, layout: seed, "
                         "subtypes_csv: ./work/nnUNet_preprocessed/subtypes.csv}\n"),
        ("manifest", "project_dir: ./work\ndataset: {layout: manifest, "
                     "manifest: ./work/nnUNet_preprocessed/subtypes.csv}\n"),
    ]


def test_a_project_in_the_source_or_around_it_is_fine(runner: CliRunner, tmp_path: Path) -> None:
    """Only a source inside what pancseg replaces is at risk; ``source: .`` or ``project_dir: .`` are not."""
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=1)
    for text in ("project_dir: .\ndataset: {source: ./data}\n", "project_dir: ./data/work\ndataset: {source: ./data}\n"):
        write_config(tmp_path, text)
        assert _invoke(runner, tmp_path, "prepare", "--force").exit_code == 0, text


def test_every_input_apart_from_the_project(runner: CliRunner, tmp_path: Path) -> None:
    """The source in a linked nnUNet_raw or in nnUNet_preprocessed, labels and CSVs in folders pancseg
    replaces (also through a link): refused by prepare (even --force) and run before anything is written."""
    for key, text in _layouts(tmp_path):
        write_config(tmp_path, text)
        before = snapshot(tmp_path)
        for command in (["prepare", "--force"], ["run"]):
            _failed(_invoke(runner, tmp_path, *command), f"dataset.{key}:", "which pancseg replaces")
        assert snapshot(tmp_path) == before, text
        assert not (tmp_path / "data" / "work").exists()


def test_manifest_files_in_the_project_are_refused(runner: CliRunner, tmp_path: Path) -> None:
    """A manifest (or a link in the source) naming files of the prepared dataset: prepare --force
    would delete the folder it reads from."""
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=0)
    write_config(tmp_path, "project_dir: ./work\ndataset: {source: ./data}\n")
    assert _invoke(runner, tmp_path, "prepare").exit_code == 0
    raw = _raw(tmp_path)
    rows = [f"{p.name[:-12]},{p},{raw / 'labelsTr' / p.name.replace('_0000', '')},0,train"
            for p in sorted((raw / "imagesTr").glob("*_0000.nii.gz"))]
    (tmp_path / "cases.csv").write_text("case_id,image,mask,subtype,split\n" + "\n".join(rows) + "\n")
    write_config(tmp_path, "project_dir: ./work\ndataset: {layout: manifest, manifest: ./cases.csv}\n")
    before = snapshot(raw)
    _failed(_invoke(runner, tmp_path, "prepare", "--force"), "which pancseg replaces", "imagesTr")
    assert snapshot(raw) == before


# --------------------------------------------------------------------------------------------
# issue 20, item 5: another split, then preprocess --force; a failed re-run keeps the model usable


@pytest.mark.slow
def test_new_split_then_preprocess_and_a_failed_rerun_keeps_the_model(
        trained_project: Path, runner: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "project"
    shutil.copytree(trained_project, root, symlinks=True)
    pre = root / "work" / "nnUNet_preprocessed" / DATASET
    state = json.loads((pre / "pancseg_preprocess.json").read_text())
    assert _invoke(runner, root, "prepare", "--force", "--set", "dataset.split_seed=7").exit_code == 0
    raw = _raw(root)
    splits = json.loads((raw / "splits_final.json").read_text())
    assert splits != json.loads((pre / "splits_final.json").read_text())  # the stale copy nnU-Net asserts on

    # A re-run that fails (a mask with an unknown label: nnU-Net's integrity check) ...
    mask = next((raw / "labelsTr").glob("*.nii.gz"))
    good = sitk.ReadImage(str(mask))
    bad = sitk.GetArrayFromImage(good)
    bad[0, 0, 0] = 5
    write(bad, mask, spacing=good.GetSpacing(), origin=good.GetOrigin())
    _failed(_invoke(runner, root, "preprocess", "--force"), "nnU-Net preprocessing failed")
    # ... keeps the model usable (its state names the plans), never counts as up to date, and train waits.
    out = tmp_path / "pred"
    (out / ".pancseg").mkdir(parents=True)  # what killed predicts left: swept by the next one
    (out / ".partial_case.nii.gz").write_bytes(b"old")
    (out / ".pancseg.tmp-x1y2z3").mkdir()
    (out / ".pancseg" / ".pancseg.tmp-case.json.abcd1234.tmp").write_text("{")
    predicted = _invoke(runner, root, "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "--fold", "4")
    assert predicted.exit_code == 0, predicted.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".pancseg"]
    assert [p.name for p in (out / ".pancseg").iterdir() if p.name.startswith(".")] == []
    _failed(_invoke(runner, root, "train", "--fold", "4", "--resume"), "did not finish", "pancseg preprocess")

    # Once the data is right, preprocess (not forced: the pending state is not up to date) succeeds.
    write(sitk.GetArrayFromImage(good), mask, spacing=good.GetSpacing(), origin=good.GetOrigin())
    done = _invoke(runner, root, "preprocess", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["up_to_date"] is False
    assert json.loads((pre / "splits_final.json").read_text()) == splits
    new_state = json.loads((pre / "pancseg_preprocess.json").read_text())
    assert "pending" not in new_state and new_state["plans_identifier"] == state["plans_identifier"]


# --------------------------------------------------------------------------------------------
# issue 20, item 6: a killed write leaves nothing any glob of data takes; the next run sweeps it


def _killed_while_writing(write_file) -> None:
    """Run ``write_file()`` in a child that SIGKILLs itself the moment the finished temporary file
    would be renamed into place (the worst moment for kill -9)."""
    from pancreas_cli import imageio

    pid = os.fork()
    if pid == 0:
        try:
            imageio.publish = lambda tmp, path: os.kill(os.getpid(), signal.SIGKILL)
            write_file()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_kill_during_clean_leaves_no_case_and_is_swept(runner: CliRunner, quiz_project: Path) -> None:
    from pancreas_cli.imageio import write_image, write_text

    assert _invoke(runner, quiz_project, "prepare").exit_code == 0
    raw = _raw(quiz_project)
    cases = _nnunet_cases(raw)
    image = raw / "imagesTr" / "quiz_0_001_0000.nii.gz"
    _killed_while_writing(lambda: write_image(sitk.ReadImage(str(image)), image))
    _killed_while_writing(lambda: write_text("case,problem\n", raw / "clean_report.csv"))
    # what older pancseg versions left
    (raw / "imagesTr" / ".quiz_0_001_0000.nii.gz.k3j2h1x9.tmp.nii.gz").write_bytes(image.read_bytes())
    (raw / "labelsTr_original").mkdir()
    (raw / "labelsTr_original" / ".quiz_0_001.nii.gz.tmp").write_bytes(b"")
    leftovers = [p for p in raw.rglob("*") if ".tmp" in p.name]
    assert len(leftovers) >= 4
    assert not [p for p in raw.glob("*/*.nii.gz") if p.name.startswith(".pancseg")]  # no data name
    assert _nnunet_cases(raw) == cases + 1  # only the old name counts as a case

    result = _invoke(runner, quiz_project, "clean")
    assert result.exit_code == 0, result.output
    assert not [p for p in raw.rglob("*") if ".tmp" in p.name]
    assert _nnunet_cases(raw) == cases
    assert "error" not in (raw / "clean_report.csv").read_text()


def test_image_writers_keep_extension_and_clean_up(tmp_path: Path) -> None:
    """atomic_target's file keeps the name (SimpleITK's writer is chosen by it) and leaves nothing."""
    from pancreas_cli.imageio import atomic_target, read_image, write_image

    for name in ("a.nii.gz", "b.nrrd", "c.mha"):
        write_image(sitk.GetImageFromArray(ct_volume()), tmp_path / name)
        assert read_image(tmp_path / name, verify=True).GetSize() == (16, 16, 8)
    with pytest.raises(RuntimeError):
        with atomic_target(tmp_path / "d.nii.gz") as tmp:
            assert tmp.name == "d.nii.gz" and tmp.parent.parent == tmp_path
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nrrd", "c.mha"]


# --------------------------------------------------------------------------------------------
# issue 20, item 9: conflicting subtype rows


def _seed(root: Path, rows: str) -> None:
    for i in (1, 2, 3):
        write(ct_volume(seed=i), root / "data" / "imagesTr" / f"img_{i:03d}.nii.gz")
        write(label_volume(), root / "data" / "labelsTr" / f"mask_{i:03d}.nii.gz")
    (root / "data" / "subtypes.csv").write_text("case_id,subtype\n" + rows)
    write_config(root, "project_dir: ./work\n"
                       "dataset: {layout: seed, source: ./data, subtypes_csv: ./data/subtypes.csv}\n")


def test_conflicting_subtype_rows_are_an_error(runner: CliRunner, tmp_path: Path) -> None:
    _seed(tmp_path, "img_001,1\nimg_002,0\nimg_003,2\nimg_001,0\n")
    _failed(_invoke(runner, tmp_path, "prepare"),
            "subtypes.csv: case img_001 has subtype 1 on line 2 and 0 on line 5")
    assert not _raw(tmp_path).exists()
    _seed(tmp_path, "img_001,1\nimg_002,0\nimg_003,2\nmask_001,2\n")  # the same case by its mask's name
    _failed(_invoke(runner, tmp_path, "prepare"), "case img_001 has subtype 1 on line 2 and 2 on line 5")
    _seed(tmp_path, "img_001,1\nimg_002,0\nimg_003,2\nimg_001,1.0\n")  # identical rows pass
    assert _invoke(runner, tmp_path, "prepare").exit_code == 0
    assert "img_001,1\n" in (_raw(tmp_path) / "subtypes.csv").read_text()


def test_conflicting_manifest_rows_are_an_error(runner: CliRunner, tmp_path: Path) -> None:
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=0)
    cases = sorted((tmp_path / "data" / "train").glob("*/*_0000.nii.gz"))
    rows = [f"{p.name[:-12]},{p},{str(p).replace('_0000', '')},{p.parent.name[-1]},train" for p in cases]
    header = "case_id,image,mask,subtype,split\n"
    write_config(tmp_path, "project_dir: ./work\ndataset: {layout: manifest, manifest: ./cases.csv}\n")
    (tmp_path / "cases.csv").write_text(header + "\n".join([*rows, rows[0]]) + "\n")
    assert _invoke(runner, tmp_path, "prepare").exit_code == 0  # a row listed twice the same way
    other = rows[0].rsplit(",", 2)[0] + ",2,train"
    (tmp_path / "cases.csv").write_text(header + "\n".join([*rows, other]) + "\n")
    _failed(_invoke(runner, tmp_path, "prepare", "--force"),
            f"cases.csv: case {cases[0].name[:-12]} is on line 2 and line 5", "subtype 0 vs 2")


# --------------------------------------------------------------------------------------------
# issue 20, item 12: symbolic links in the source (git-annex, DataLad)


def _annexed(source: Path) -> dict[Path, Path]:
    """Replace every image of ``source`` by a relative link into an object store, as git-annex does
    (objects without an extension, as its SHA256 backend names them)."""
    store = source / ".git" / "annex" / "objects"
    store.mkdir(parents=True)
    links = {}
    for i, path in enumerate(sorted(p for p in source.rglob("*.nii.gz") if ".git" not in p.parts)):
        target = store / f"SHA256-s{i}"
        path.rename(target)
        path.symlink_to(os.path.relpath(target, path.parent))
        links[path] = target
    return links


def test_relative_links_in_the_source(runner: CliRunner, quiz_project: Path) -> None:
    links = _annexed(quiz_project / "data")
    assert _invoke(runner, quiz_project, "prepare").exit_code == 0
    raw = _raw(quiz_project)
    prepared = sorted(raw.rglob("*.nii.gz"))
    assert prepared and not [p for p in prepared if p.is_symlink() or not p.is_file()]
    cleaned = _invoke(runner, quiz_project, "clean", "--json")
    assert cleaned.exit_code == 0 and json.loads(cleaned.stdout)["errors"] == 0, cleaned.output
    again = _invoke(runner, quiz_project, "prepare", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["up_to_date"] is True

    # another version of a file (the link now leads to another object) is a changed source
    link, target = next(iter(links.items()))
    newer = target.with_name("SHA256-new")
    shutil.copy(target, newer)
    link.unlink()
    link.symlink_to(os.path.relpath(newer, link.parent))
    _failed(_invoke(runner, quiz_project, "prepare"), "differs from the source", "1 case(s) changed")

    # content not fetched: the link leads nowhere
    newer.unlink()
    _failed(_invoke(runner, quiz_project, "prepare", "--force"), f"{link}: broken symbolic link",
            "git annex get")


# --------------------------------------------------------------------------------------------
# issue 20, item 18: damaged files prepare wrote


@pytest.mark.parametrize("name", ["dataset.json", "splits_final.json", "subtypes.csv"])
def test_damaged_prepared_files_are_written_again(runner: CliRunner, quiz_project: Path, name: str) -> None:
    assert _invoke(runner, quiz_project, "prepare").exit_code == 0
    path = _raw(quiz_project) / name
    good = path.read_text()
    path.write_text(good[: len(good) // 2])  # cut short (a full disk, a killed copy)
    if name != "subtypes.csv":
        _failed(_invoke(runner, quiz_project, "preprocess"), f"{path}: damaged", "pancseg prepare --force")
    result = _invoke(runner, quiz_project, "prepare", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["up_to_date"] is False and "written again" in result.stderr
    assert path.read_text() == good
    assert json.loads(_invoke(runner, quiz_project, "prepare", "--json").stdout)["up_to_date"] is True


def test_damaged_prepare_record_is_refused(runner: CliRunner, quiz_project: Path) -> None:
    assert _invoke(runner, quiz_project, "prepare").exit_code == 0
    record = _raw(quiz_project) / "pancseg_prepare.json"
    record.write_text(record.read_text()[:100])
    _failed(_invoke(runner, quiz_project, "prepare"), "pancseg_prepare.json is damaged", "pass --force")
    assert _invoke(runner, quiz_project, "prepare", "--force").exit_code == 0
