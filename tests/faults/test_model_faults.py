"""Fault scenarios of model files, training state, locks and config (issue 20): a checkpoint that
carries code, damaged checkpoints, a full disk, an edited metrics.csv, output-folder locks across
machines, a YAML alias bomb."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import held_elsewhere
from pancreas_cli import locks
from pancreas_cli.checkpoints import read_checkpoint
from pancreas_cli.cli import app

MODEL = Path("work/nnUNet_results/Dataset001_PancreasCancer/nnUNetTrainerMultiTask__nnUNetResEncUNetMPlans__3d_smoke")
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


class Payload:
    """What an attacker's checkpoint carries: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def project(trained_project: Path, tmp_path: Path) -> Path:
    """A writable copy of the trained project (the session's is shared, read-only)."""
    shutil.copytree(trained_project / "work", tmp_path / "work", ignore=shutil.ignore_patterns(".locks", "logs"))
    shutil.copy(trained_project / "pancseg.yaml", tmp_path / "pancseg.yaml")
    return tmp_path


def _scan(trained_project: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir(exist_ok=True)
    shutil.copy(sorted((trained_project / "data" / "test").glob("*_0000.nii.gz"))[0], folder / "scan.nii.gz")
    return folder


def _plant(project: Path, fold: int, content: bytes | dict) -> Path:
    """Fold ``fold`` looks finished, its checkpoints being ``content`` (bytes, or a dict torch saves)."""
    folder = project / MODEL / f"fold_{fold}"
    folder.mkdir(exist_ok=True)
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            torch.save(content, folder / name)
    return folder


def _malicious(project: Path, marker: Path) -> dict:
    checkpoint = read_checkpoint(project / MODEL / "fold_4" / "checkpoint_final.pth")
    return {**checkpoint, "logging": {**checkpoint["logging"], "note": Payload(marker)}}


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# ------------------------------------------------------------------ a checkpoint that carries code


def test_a_model_file_with_code_is_refused_by_predict(project: Path, trained_project: Path, tmp_path: Path,
                                                      runner: CliRunner) -> None:
    marker = tmp_path / "code_ran"
    fold_3 = _plant(project, 3, _malicious(project, marker))
    args = ["predict", "-c", str(project / "pancseg.yaml"), "-i", str(_scan(trained_project, tmp_path)),
            "-o", str(tmp_path / "out")]
    line = _one_line_error(runner.invoke(app, args))  # default folds: every finished one, 3 and 4
    assert f"{fold_3 / 'checkpoint_best.pth'}: refused to load this checkpoint" in line
    assert "may contain code" in line and "--trust-model" in line
    assert not marker.exists()

    trusted = runner.invoke(app, [*args, "--trust-model"])  # the user's explicit decision: loaded in full
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists()


def test_train_reads_no_code_from_a_checkpoint(project: Path, tmp_path: Path, runner: CliRunner) -> None:
    marker = tmp_path / "code_ran"
    fold_3 = _plant(project, 3, _malicious(project, marker))
    cfg = str(project / "pancseg.yaml")
    for trust in ([], ["--trust-model"]):  # a refusal never unpickles a checkpoint, not even trusted
        line = _one_line_error(runner.invoke(app, ["train", "-c", cfg, "--fold", "3", *trust]))
        assert re.search(rf"fold 3 already has a training in {re.escape(str(fold_3))} \((finished|stopped)\); "
                         "pass --resume", line), line  # no epoch: it cannot be read safely
    line = _one_line_error(runner.invoke(app, ["train", "-c", cfg, "--fold", "3", "--resume"]))
    assert re.search(rf"{re.escape(str(fold_3))}/checkpoint_(final|best).pth: refused to load this checkpoint", line)
    assert "--trust-model" in line
    assert not marker.exists()


@pytest.mark.parametrize("content, said", [
    (b"", "the file is empty"),
    (os.urandom(4096), "not a PyTorch checkpoint, or it is damaged or cut short"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 5421\n", "Git LFS pointer"),
])
def test_damaged_checkpoints_are_named(project: Path, trained_project: Path, tmp_path: Path, runner: CliRunner,
                                       content: bytes, said: str) -> None:
    fold_3 = _plant(project, 3, content)
    cfg = str(project / "pancseg.yaml")
    predicted = runner.invoke(app, ["predict", "-c", cfg, "-i", str(_scan(trained_project, tmp_path)),
                                    "-o", str(tmp_path / "out"), "--fold", "3"])
    line = _one_line_error(predicted)
    assert f"{fold_3 / 'checkpoint_best.pth'}: cannot read this checkpoint: " in line and said in line
    resumed = runner.invoke(app, ["train", "-c", cfg, "--fold", "3", "--resume"])
    line = _one_line_error(resumed)
    assert f"{fold_3}/checkpoint_" in line and said in line and "move it away" in line
    if "LFS" in said:
        assert "run `git lfs pull`" in line


def _checkpoint_keys(function: Any) -> set[str]:
    return set(re.findall(r"checkpoint\[\s*['\"](\w+)['\"]\s*\]", inspect.getsource(function)))


def test_the_safe_loaders_read_what_nnunets_read(trained_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pancseg replaces two nnU-Net functions that unpickle checkpoints; this fails when nnU-Net's
    versions read other fields, or when pancseg's give another model than nnU-Net's own."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from pancreas_cli.multitask.predictor import ProgressPredictor
    from pancreas_cli.multitask.trainer import nnUNetTrainerPancseg
    from pancreas_cli.nnunet_env import TRAINER_DIR

    assert _checkpoint_keys(nnUNetPredictor.initialize_from_trained_model_folder) == {
        "trainer_name", "init_args", "inference_allowed_mirroring_axes", "network_weights"}
    ours = _checkpoint_keys(nnUNetTrainerPancseg.load_checkpoint) | {"inference_allowed_mirroring_axes"}  # .get()
    assert _checkpoint_keys(nnUNetTrainer.load_checkpoint) == ours == {
        "network_weights", "init_args", "current_epoch", "logging", "_best_ema", "optimizer_state",
        "grad_scaler_state", "inference_allowed_mirroring_axes"}

    monkeypatch.setenv("nnUNet_extTrainer", str(TRAINER_DIR))
    loaded = []
    for cls in (nnUNetPredictor, ProgressPredictor):
        predictor = cls(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(trained_project / MODEL), (4,), "checkpoint_best.pth")
        loaded.append(predictor)
    stock, ours = loaded
    assert ours.trainer_name == stock.trainer_name == "nnUNetTrainerMultiTask"
    assert ours.configuration_manager.configuration == stock.configuration_manager.configuration
    assert ours.allowed_mirroring_axes == stock.allowed_mirroring_axes
    assert type(ours.network) is type(stock.network) and ours.dataset_json == stock.dataset_json
    for mine, theirs in [*zip(ours.list_of_parameters, stock.list_of_parameters),
                         (ours.network.state_dict(), stock.network.state_dict())]:
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_predictor_maps_checkpoints_and_a_trusted_old_format_is_read(
        trained_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prediction maps each fold's checkpoint (only the network's half of it is ever read); a trusted
    checkpoint in torch's pre-zip format cannot be mapped and is read whole."""
    from pancreas_cli.multitask import predictor as module

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(module, "read_checkpoint",
                        lambda path, **kwargs: calls.append(kwargs) or read_checkpoint(path, **kwargs))
    predictor = module.ProgressPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained_project / MODEL), (4,), "checkpoint_best.pth")
    assert [call["mmap"] for call in calls] == [True]
    old = tmp_path / "old.pth"
    torch.save(read_checkpoint(trained_project / MODEL / "fold_4" / "checkpoint_best.pth"), old,
               _use_new_zipfile_serialization=False)
    loaded = read_checkpoint(old, trust=True, mmap=True)
    assert torch.equal(next(iter(loaded["network_weights"].values())),
                       next(iter(predictor.list_of_parameters[0].values())))


# ------------------------------------------------------------------ resume, metrics.csv, a full disk


def test_resume_loads_safely_and_rebuilds_an_edited_metrics_csv(project: Path, runner: CliRunner,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fold_4 = project / MODEL / "fold_4"
    metrics = fold_4 / "metrics.csv"
    trained = metrics.read_text().splitlines()
    # Re-saved from a spreadsheet: another separator and a note of the user's.
    metrics.write_text("\n".join(line.replace(",", ";") for line in trained) + "\nmy notes;;\n")
    loads: list[Any] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))

    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "4", "--resume",
                                 "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert f"warning: {metrics}: not as training wrote it" in result.stderr and "rewritten" in result.stderr
    assert loads and all(weights_only is True for weights_only in loads)  # pancseg's own checkpoints load safely
    assert read_checkpoint(fold_4 / "checkpoint_final.pth")["current_epoch"] == 2
    lines = metrics.read_text().splitlines()
    assert lines[:2] == trained[:2]  # epoch 1's row rebuilt from the checkpoint's record, as it was written
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]


def test_a_full_disk_while_saving_a_checkpoint_is_named(project: Path, runner: CliRunner,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    fold_4 = project / MODEL / "fold_4"
    before = {p.name: p.read_bytes() for p in fold_4.glob("*.pth")}

    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(nnUNetTrainerMultiTask, "run_training",
                        lambda self: self.save_checkpoint(str(fold_4 / "checkpoint_latest.pth")))
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "4", "--resume",
                                 "--epochs", "2"])
    line = _one_line_error(result)
    assert f"{fold_4 / 'checkpoint_latest.pth'}: could not be written, the disk is full (" in line
    assert "unexpected pos" in line and "free some space" in line
    assert {p.name: p.read_bytes() for p in fold_4.glob("*.pth")} == before
    assert not [p.name for p in fold_4.iterdir() if p.name.startswith(".")]  # no partial file left


def test_a_full_disk_in_an_atomic_write_is_named(runner: CliRunner, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.fh = real_fdopen(*args, **kwargs)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def write(self, text: str) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", Full)
    line = _one_line_error(runner.invoke(app, ["init", str(tmp_path / "pancseg.yaml")]))
    assert f"{tmp_path / 'pancseg.yaml'}: could not be written, the disk is full (No space left on device" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ output-folder locks


def test_predictions_with_other_temporary_folders_exclude_each_other(trained_project: Path, tmp_path: Path,
                                                                      runner: CliRunner) -> None:
    """Two cluster jobs (two nodes, two TMPDIRs) predicting into one folder."""
    out = tmp_path / "out"

    def on_another_node() -> Any:
        tempfile.tempdir = str(tmp_path / "tmp_node1")
        return locks.output_folder(out)

    with held_elsewhere(on_another_node) as pid:
        result = runner.invoke(app, ["predict", "-c", str(trained_project / "pancseg.yaml"), "-i",
                                     str(_scan(trained_project, tmp_path)), "-o", str(out), "--fold", "4"])
    line = _one_line_error(result)
    assert f"the output folder {out} is in use by pid {pid} (`pancseg" in line
    assert not out.exists()


def test_a_holder_on_another_machine_is_reported_not_broken(trained_project: Path, tmp_path: Path,
                                                            runner: CliRunner) -> None:
    out = tmp_path / "out"
    lock_dir = tmp_path / locks.OUTPUT_LOCK_DIR
    lock_dir.mkdir()
    note = lock_dir / "out.lock.node7.4242.holder"
    note.write_text(json.dumps({"pid": 4242, "host": "node7.cluster", "shared": False,
                                "command": "pancseg predict -o out"}))
    args = ["predict", "-c", str(trained_project / "pancseg.yaml"), "-i", str(_scan(trained_project, tmp_path)),
            "-o", str(out), "--fold", "4"]
    line = _one_line_error(runner.invoke(app, args))
    assert f"the output folder {out} is in use by pid 4242 on host node7.cluster (`pancseg predict -o out`)" in line
    assert f"if that command has ended, delete {note}" in line
    assert note.is_file() and not out.exists()


def test_a_refused_prediction_leaves_no_lock(trained_project: Path, tmp_path: Path, runner: CliRunner) -> None:
    """The lock is made after predict's checks: a folder of ground truth gets nothing beside or in it."""
    truth = tmp_path / "truth"
    truth.mkdir()
    shutil.copy(sorted((trained_project / "data" / "test").glob("*_0000.nii.gz"))[0], truth / "scan.nii.gz")
    result = runner.invoke(app, ["predict", "-c", str(trained_project / "pancseg.yaml"), "-i",
                                 str(_scan(trained_project, tmp_path)), "-o", str(truth), "--fold", "4"])
    assert "pancseg never replaces those" in _one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans", "truth"]
    assert [p.name for p in truth.iterdir()] == ["scan.nii.gz"]


# ------------------------------------------------------------------ config


def test_a_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text("project_dir: [" + ", ".join(levels) + "]\n")
    assert len(config.read_bytes()) < 500
    done = subprocess.run([sys.executable, "-m", "pancreas_cli", "train", "-c", str(config)], capture_output=True,
                          text=True, encoding="utf-8", timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"invalid configuration in {config}:" in done.stderr
    assert "its aliases (*name) expand to more than 10000 values" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plans.json", "dataset.json"])
def test_a_damaged_model_json_is_named(trained_project: Path, runner: CliRunner, tmp_path: Path, name: str) -> None:
    """nnU-Net's own reader says only JSONDecodeError: the file is named, with what to do."""
    project = tmp_path / "project"
    shutil.copytree(trained_project, project, symlinks=True)
    model = next((project / "work" / "nnUNet_results").glob("Dataset*/nnUNetTrainerMultiTask__*"))
    (model / name).write_text('{"configurations": ')
    result = runner.invoke(app, ["predict", "-c", str(project / "pancseg.yaml"), "-i",
                                 str(project / "data" / "test"), "-o", str(tmp_path / "out"), "--fold", "4"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{model / name}: unreadable" in result.stderr and "copy it again" in result.stderr
