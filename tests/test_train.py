"""``pancseg train`` end to end on the smoke preset (CPU), resume, and nnU-Net's own commands."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import write_config
from pancreas_cli.cli import app
from pancreas_cli.exceptions import TrainError, TrainingInterrupted
from pancreas_cli.multitask.trainer import METRICS_COLUMNS
from pancreas_cli.nnunet_env import TRAINER_DIR
from pancreas_cli.train import _train_ddp, newest_checkpoint
from torch.multiprocessing import ProcessRaisedException

FAST = ["--set", "train.iterations_per_epoch=3", "--set", "train.val_iterations=2", "--set", "train.save_every=1"]
FOLDER = "nnUNetTrainerMultiTask__nnUNetResEncUNetMPlans__3d_smoke"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset, prepared, cleaned and preprocessed for the smoke preset (shared by the tests)."""
    root = tmp_path_factory.mktemp("train")
    runner = CliRunner()
    assert runner.invoke(app, ["synth", str(root / "data"), "--cases", "10", "--shape", "24,48,48"]).exit_code == 0
    cfg = write_config(root, "project_dir: ./work\ndataset: {source: ./data}\n"
                             "plan: {preset: smoke, num_processes: 1}\ntrain: {device: cpu}\n")
    for command in ("prepare", "clean", "preprocess"):
        result = runner.invoke(app, [command, "-c", str(cfg)])
        assert result.exit_code == 0, result.output
    return root


def _rows(fold_dir: Path) -> list[dict[str, str]]:
    with (fold_dir / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_train_resume_and_nnunet_commands(project: Path, runner: CliRunner) -> None:
    cfg = project / "pancseg.yaml"
    fold_dir = project / "work" / "nnUNet_results" / "Dataset001_PancreasCancer" / FOLDER / "fold_0"

    result = runner.invoke(app, ["train", "-c", str(cfg), "--fold", "0", "--epochs", "2", *FAST])
    assert result.exit_code == 0, result.output
    assert "fold 0 epoch 1/2" in result.stderr and "fold 0 epoch 2/2" in result.stderr
    assert "dice pancreas" in result.stderr and "ETA" in result.stderr
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png"):
        assert (fold_dir / name).is_file(), name
    rows = _rows(fold_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert tuple(rows[0]) == METRICS_COLUMNS
    assert all(rows[0][c] != "" for c in ("train_loss", "cls_loss", "val_macro_f1", "dice_pancreas", "lr"))
    with (fold_dir / "validation" / "subtype_results.csv").open() as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "Names,Subtype" and len(lines) == 2  # synth puts 1 of 10 cases in validation
    name, subtype = lines[1].split(",")
    assert name.endswith(".nii.gz") and not name.endswith("_0000.nii.gz") and subtype in {"0", "1", "2"}
    probabilities = (fold_dir / "validation" / "subtype_probabilities.csv").read_text().splitlines()
    assert probabilities[0] == "Names,p0,p1,p2,subtype_source"
    assert abs(sum(float(p) for p in probabilities[1].split(",")[1:4]) - 1) < 1e-4
    assert probabilities[1].split(",")[4] in {"lesion", "pancreas"}
    assert (fold_dir / "validation" / f"{name}").is_file()  # nnU-Net's own validation segmentation

    again = runner.invoke(app, ["train", "-c", str(cfg), "--epochs", "2", *FAST])
    assert again.exit_code == 1 and "--resume" in again.stderr and "--force" in again.stderr

    resumed = runner.invoke(app, ["train", "-c", str(cfg), "--resume", "--epochs", "3", "--json", *FAST])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 3" in resumed.stderr and "fold 0 epoch 1/" not in resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["folds"][0]["resumed_from"] == 2 and data["folds"][0]["epochs_done"] == 3
    last = data["folds"][0]["last_epoch"]
    assert last["epoch"] == 3 and isinstance(last["dice_pancreas"], float) and isinstance(last["best"], int)
    assert [r["epoch"] for r in _rows(fold_dir)] == ["1", "2", "3"]

    # nnU-Net's own commands find the trainer through nnUNet_extTrainer and use pancseg's results.
    env = {**os.environ, "nnUNet_extTrainer": str(TRAINER_DIR), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "nnUNet_raw": str(project / "work" / "nnUNet_raw"),
           "nnUNet_preprocessed": str(project / "work" / "nnUNet_preprocessed"),
           "nnUNet_results": str(project / "work" / "nnUNet_results")}
    bin_dir = Path(sys.executable).parent
    val = subprocess.run([str(bin_dir / "nnUNetv2_train"), "1", "3d_smoke", "0", "-tr", "nnUNetTrainerMultiTask",
                          "-p", "nnUNetResEncUNetMPlans", "-device", "cpu", "--val"],
                         capture_output=True, text=True, encoding="utf-8", env=env)
    assert val.returncode == 0, val.stdout[-3000:] + val.stderr[-3000:]
    assert "Using trainer 'nnUNetTrainerMultiTask'" in val.stdout
    out = project / "nnunet_predict"
    pred = subprocess.run([str(bin_dir / "nnUNetv2_predict"), "-i", str(project / "work" / "nnUNet_raw" /
                           "Dataset001_PancreasCancer" / "imagesTs"), "-o", str(out), "-d", "1", "-c", "3d_smoke",
                           "-p", "nnUNetResEncUNetMPlans", "-tr", "nnUNetTrainerMultiTask", "-f", "0", "-device",
                           "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], capture_output=True, text=True, encoding="utf-8", env=env)
    assert pred.returncode == 0, pred.stdout[-3000:] + pred.stderr[-3000:]
    assert len(list(out.glob("*.nii.gz"))) == 2


@pytest.mark.slow
def test_segmentation_task_uses_the_stock_trainer(project: Path, runner: CliRunner) -> None:
    cfg = project / "pancseg.yaml"
    result = runner.invoke(app, ["train", "-c", str(cfg), "--task", "segmentation", "--epochs", "1", "--json", *FAST])
    assert result.exit_code == 0, result.output
    fold = json.loads(result.stdout)["folds"][0]
    assert "nnUNetTrainerPancseg__" in fold["output_folder"]
    row = _rows(Path(fold["output_folder"]))[0]
    assert row["cls_loss"] == "" and row["dice_pancreas"] != ""
    assert not (Path(fold["output_folder"]) / "validation" / "subtype_results.csv").exists()


def test_train_before_preprocess(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, "project_dir: ./work\ntrain: {device: cpu}\n")
    result = runner.invoke(app, ["train", "-c", str(cfg)])
    assert result.exit_code == 1 and "run `pancseg preprocess` first" in result.stderr


def test_auto_device_without_gpu_needs_explicit_cpu(runner: CliRunner, project: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto would pick it")
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--device", "auto"])
    assert result.exit_code == 1 and "--device cpu" in result.stderr
    missing = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--device", "cuda:3"])
    assert missing.exit_code == 1 and "cuda:3 requested" in missing.stderr


def test_fold_arguments(runner: CliRunner, project: Path) -> None:
    cfg = str(project / "pancseg.yaml")
    assert runner.invoke(app, ["train", "-c", cfg, "--fold", "7"]).exit_code == 2
    assert runner.invoke(app, ["train", "-c", cfg, "--fold", "x"]).exit_code == 2
    bad_device = runner.invoke(app, ["train", "-c", cfg, "--device", "gpu"])
    assert bad_device.exit_code == 1 and "train.device: invalid value 'gpu'" in bad_device.stderr


def test_fold_must_be_in_the_splits(runner: CliRunner, project: Path) -> None:
    """With fewer labelled cases than dataset.num_folds the splits have fewer folds; nnU-Net would train a
    random 80:20 split for a fold that is not there."""
    splits = project / "work" / "nnUNet_preprocessed" / "Dataset001_PancreasCancer" / "splits_final.json"
    original = splits.read_text()
    splits.write_text(json.dumps(json.loads(original)[:3]))
    try:
        result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "4"])
        assert result.exit_code == 1
        assert (f"fold 4 does not exist: {splits} has 3 folds (0-2); the dataset has fewer labelled cases than "
                "dataset.num_folds = 5") in result.stderr
    finally:
        splits.write_text(original)


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "plan.preset=default"], "the data was preprocessed for 3d_smoke but plan.preset asks for 3d_fullres; "
                                       "re-run `pancseg preprocess` with the same preset"),
    (["--num-gpus", "3"], "train.num_gpus = 3 is more than the batch size 2"),
    (["--device", "cuda:99"], "cuda:99 requested but "),
])
def test_train_errors(runner: CliRunner, project: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "2", *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_resume_with_nothing_to_resume(runner: CliRunner, project: Path) -> None:
    """A wrong project_dir or fold with --resume must not quietly start a new (hours-long) training."""
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "2", "--resume"])
    assert result.exit_code == 1
    assert "nothing to resume: no checkpoint for fold(s) 2 in " in result.stderr
    assert "drop --resume to start a new training" in result.stderr


def test_a_fold_in_training_is_not_trained_twice(runner: CliRunner, project: Path) -> None:
    """Two terminals, same fold: the second is refused; another fold may train meanwhile."""
    from conftest import held_elsewhere
    from pancreas_cli import locks

    work = project / "work"
    cfg = str(project / "pancseg.yaml")
    fold2 = lambda: locks.fold(work, "nnUNetTrainerMultiTask", 2)  # noqa: E731
    with held_elsewhere(lambda: locks.project(work)), held_elsewhere(fold2) as pid:
        result = runner.invoke(app, ["train", "-c", cfg, "--fold", "2", "--force"])
        assert result.exit_code == 1
        assert f"fold 2 of nnUNetTrainerMultiTask is in use by pid {pid}" in result.stderr
        other = runner.invoke(app, ["train", "-c", cfg, "--fold", "3", "--resume"])  # fold 3 is free
        assert other.exit_code == 1 and "nothing to resume" in other.stderr


def test_unreadable_preprocess_state_is_named(runner: CliRunner, project: Path) -> None:
    state = project / "work" / "nnUNet_preprocessed" / "Dataset001_PancreasCancer" / "pancseg_preprocess.json"
    saved = state.read_bytes()
    try:
        state.write_text('{"state": ')
        for command in (["train", "--fold", "2"], ["preprocess"]):
            result = runner.invoke(app, [*command, "-c", str(project / "pancseg.yaml")])
            assert result.exit_code == 1, result.output
            assert f"{state}: unreadable (edited or cut short?); run `pancseg preprocess --force`" in result.stderr
    finally:
        state.write_bytes(saved)


def test_truncated_checkpoint_is_named(runner: CliRunner, project: Path) -> None:
    """A checkpoint cut short (a kill during an older nnU-Net's in-place write) is named, no traceback."""
    fold_dir = project / "work" / "nnUNet_results" / "Dataset001_PancreasCancer" / FOLDER / "fold_2"
    fold_dir.mkdir(parents=True)
    try:
        (fold_dir / "checkpoint_latest.pth").write_bytes(b"PK\x03\x04 truncated")
        for extra in ([], ["--resume"]):
            result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "2", *extra])
            assert result.exit_code == 1, result.output
            assert f"{fold_dir / 'checkpoint_latest.pth'}: cannot read this checkpoint" in result.stderr
            assert "move it away" in result.stderr and "Traceback" not in result.output
    finally:
        shutil.rmtree(fold_dir)


def test_nnunet_failure_shows_the_log_tail(runner: CliRunner, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    def fails(self: nnUNetTrainerMultiTask) -> None:
        print("nnU-Net says: patch size too large")
        raise ValueError("shapes do not match")

    monkeypatch.setattr(nnUNetTrainerMultiTask, "run_training", fails)
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "2", "--force"])
    assert result.exit_code == 1
    assert "nnU-Net training failed: ValueError: shapes do not match" in result.stderr
    assert "nnU-Net says: patch size too large" in result.stderr  # the log's last lines
    assert "train_multitask_fold2.log (re-run with --debug for the traceback)" in result.stderr
    debug = runner.invoke(app, ["--debug", "train", "-c", str(project / "pancseg.yaml"), "--fold", "2", "--force"])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_wandb_needs_the_extra(runner: CliRunner, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--set", "train.wandb.enabled=true"])
    assert result.exit_code == 1 and "pancseg[wandb]" in result.stderr


@pytest.mark.slow
def test_wandb_offline_logs_the_multitask_values(project: Path, runner: CliRunner,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = str(project / "pancseg.yaml")
    result = runner.invoke(app, ["train", "-c", cfg, "--fold", "2", "--epochs", "1", "--force", "--json", *FAST,
                                 "--set", "train.wandb.enabled=true", "--set", "train.wandb.mode=offline"])
    assert result.exit_code == 0, result.output
    folder = Path(json.loads(result.stdout)["folds"][0]["output_folder"])
    records = list((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    assert records, "no offline W&B run was written"
    data = records[0].read_bytes()
    for key in (b"pancseg_cls_loss", b"pancseg_val_macro_f1", b"pancseg_dice_pancreas", b"train_losses"):
        assert key in data, key


@pytest.mark.slow
def test_one_process_validates_without_spawning(project: Path, runner: CliRunner, no_spawned_processes: None) -> None:
    """nnU-Net's validation export and metrics pools run on a thread with plan.num_processes 1."""
    cfg = str(project / "pancseg.yaml")
    result = runner.invoke(app, ["train", "-c", cfg, "--fold", "2", "--epochs", "1", "--force", "--json", *FAST])
    assert result.exit_code == 0, result.output
    folder = Path(json.loads(result.stdout)["folds"][0]["output_folder"])
    assert (folder / "validation" / "summary.json").is_file()  # nnU-Net's metrics over its exported masks


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resume_continues(project: Path, runner: CliRunner,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    cfg = str(project / "pancseg.yaml")
    # No periodic checkpoint before the interrupt: the one --resume finds must be the interrupt's.
    args = ["--set", "train.iterations_per_epoch=3", "--set", "train.val_iterations=1", "--set", "train.save_every=50"]
    real_step = nnUNetTrainerMultiTask.train_step
    calls = []

    def interrupted_step(self: nnUNetTrainerMultiTask, batch: dict) -> dict:
        calls.append(self.current_epoch)
        if len(calls) == 8:  # second step of epoch 3
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(nnUNetTrainerMultiTask, "train_step", interrupted_step)
    result = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--epochs", "4", "--force", *args])
    assert result.exit_code == 130, result.output
    assert "interrupted at epoch 3" in result.stderr
    # The command that continues repeats the run's --set options (all of them, any order) and --epochs.
    hint = re.search(r"continue with `(pancseg train -c \S+ --fold 1 --resume .*)`", result.stderr)
    assert hint is not None, result.stderr
    assert sorted(re.findall(r"--set (\S+)", hint[1])) == sorted(args[1::2]) and hint[1].endswith(" --epochs 4")
    fold_dir = project / "work" / "nnUNet_results" / "Dataset001_PancreasCancer" / FOLDER / "fold_1"
    latest = torch.load(fold_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2  # 0-based: epoch 3 is trained again
    assert [r["epoch"] for r in _rows(fold_dir)] == ["1", "2"]

    monkeypatch.setattr(nnUNetTrainerMultiTask, "train_step", real_step)
    # An epoch count the run has already reached is refused, not taken as "finished": nnU-Net would
    # skip the loop and write checkpoint_final.pth for the unfinished run.
    short = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--resume", "--epochs", "2", *args])
    assert short.exit_code == 1
    assert "fold 1 stopped after epoch 2 of an unfinished run, but train.epochs is 2" in short.stderr
    assert "--epochs N with N > 2" in short.stderr and not (fold_dir / "checkpoint_final.pth").exists()
    # Resuming with other learning settings would change the run half-way without a word.
    changed = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--resume", "--epochs", "3", *args,
                                  "--set", "train.cls_weight=0.5"])
    assert changed.exit_code == 1
    assert "fold 1 was trained with other settings: train.cls_weight = 0.05 (now 0.5); continue it" in changed.stderr
    same = re.search(r"with the same ones: `(pancseg train -c \S+ --fold 1 --resume .*)`", changed.stderr)
    assert same is not None and "cls_weight" not in same[1] and same[1].endswith(" --epochs 3")
    assert sorted(re.findall(r"--set (\S+)", same[1])) == sorted(args[1::2])
    resumed = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--resume", "--epochs", "3", *args])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 3" in resumed.stderr
    assert [r["epoch"] for r in _rows(fold_dir)] == ["1", "2", "3"]
    # A finished and validated fold: --resume has nothing to do (scripts can re-run it).
    again = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--resume", "--epochs", "3", "--json", *args])
    assert again.exit_code == 0, again.output
    assert "fold 1 up to date: trained to epoch 3 and validated" in again.stderr
    assert json.loads(again.stdout)["folds"][0]["up_to_date"] is True
    assert [r["epoch"] for r in _rows(fold_dir)] == ["1", "2", "3"]
    # A validation older than the final checkpoint (stopped after an extension) is not "up to date".
    summary, final = fold_dir / "validation" / "summary.json", fold_dir / "checkpoint_final.pth"
    os.utime(summary, ns=(final.stat().st_atime_ns, final.stat().st_mtime_ns - 10**9))
    monkeypatch.setattr(nnUNetTrainerMultiTask, "perform_actual_validation",
                        lambda self, save_probabilities=False: (_ for _ in ()).throw(KeyboardInterrupt))
    stopped = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--resume", "--epochs", "3", *args])
    assert stopped.exit_code == 130
    assert "validation of fold 1 interrupted; its training is complete: `pancseg train" in stopped.stderr
    assert "--epochs 3` validates it again" in stopped.stderr
    monkeypatch.undo()
    revalidated = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", "--resume", "--epochs", "3", *args])
    assert revalidated.exit_code == 0 and "up to date" not in revalidated.stderr
    assert summary.stat().st_mtime_ns >= final.stat().st_mtime_ns


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_like_ctrl_c(project: Path, runner: CliRunner,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM and Colab stop jobs with SIGTERM, whose default would kill the run without a checkpoint."""
    import signal

    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    real_step = nnUNetTrainerMultiTask.train_step
    calls = []

    def terminated_step(self: nnUNetTrainerMultiTask, batch: dict) -> dict:
        calls.append(self.current_epoch)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batch)

    monkeypatch.setattr(nnUNetTrainerMultiTask, "train_step", terminated_step)
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "3", "--epochs", "2",
                                 "--force", "--set", "train.iterations_per_epoch=3", "--set", "train.save_every=50"])
    fold_dir = project / "work" / "nnUNet_results" / "Dataset001_PancreasCancer" / FOLDER / "fold_3"
    try:
        assert result.exit_code == 143, result.output
        assert "interrupted at epoch 1; a checkpoint was saved" in result.stderr
        assert (fold_dir / "checkpoint_latest.pth").is_file()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after the command
    finally:
        shutil.rmtree(fold_dir, ignore_errors=True)


WORKERS_DIED = "One or more background workers are no longer alive. Exiting. Please check the print statements above"


@pytest.mark.parametrize(("batch_error", "message"), [
    (ValueError("quiz_0_001: broken array"),
     "data loading failed in nnU-Net's background workers: ValueError: quiz_0_001: broken array"),
    (None, "a batch loads fine without workers, so the workers probably ran out of memory: lower train.da_workers"),
])
def test_dead_workers_show_the_real_error(project: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                          batch_error: Exception | None, message: str) -> None:
    """nnU-Net only says its workers died; pancseg loads one batch without workers to say why."""
    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    def loader() -> Iterator[dict]:
        if batch_error is not None:
            raise batch_error
        yield {"data": None}

    def workers_died(self: nnUNetTrainerMultiTask) -> None:
        raise RuntimeError(WORKERS_DIED)

    workers: list[str] = []

    def dataloaders(self: nnUNetTrainerMultiTask) -> tuple[Iterator[dict], None]:
        workers.append(os.environ["nnUNet_n_proc_DA"])
        return loader(), None

    monkeypatch.setattr(nnUNetTrainerMultiTask, "run_training", workers_died)
    monkeypatch.setattr(nnUNetTrainerMultiTask, "get_dataloaders", dataloaders)
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "4", "--force",
                                 "--set", "train.da_workers=3"])
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert workers == ["0"]  # the retry ran without workers
    assert os.environ["nnUNet_n_proc_DA"] == "3"  # and did not change the setting for what follows


def test_refused_fold_changes_nothing(project: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--fold 4 --fold 3` with fold 3 trained: refused before fold 4 starts or the settings change."""
    import torch

    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    fold_dir = project / "work" / "nnUNet_results" / "Dataset001_PancreasCancer" / FOLDER / "fold_3"
    fold_dir.mkdir(parents=True)
    torch.save({"current_epoch": 2}, fold_dir / "checkpoint_latest.pth")
    settings = fold_dir.parent / "fold_4" / "pancseg_training.json"
    before = settings.read_bytes() if settings.is_file() else None
    monkeypatch.setattr(nnUNetTrainerMultiTask, "run_training", lambda self: pytest.fail("fold 4 started"))
    try:
        result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "4", "--fold", "3",
                                     "--set", "train.cls_weight=0.9"])
        assert result.exit_code == 1
        assert "fold 3 already has a training" in result.stderr and "stopped after epoch 2" in result.stderr
        assert (settings.read_bytes() if settings.is_file() else None) == before
    finally:
        shutil.rmtree(fold_dir)


@pytest.mark.slow
def test_each_fold_is_trained_with_its_own_settings(project: Path, runner: CliRunner,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`--fold 0 --fold 1` with one head_lr while a second `pancseg train --fold 2` with another starts
    during fold 0 (folds may train side by side): fold 1 is still built with the first run's settings
    (they reached it through a file beside the data, which the second run rewrote), and each fold's
    trainer, checkpoint and record hold its own; the second run changes nothing in fold 0's files."""
    import torch

    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask

    cfg = str(project / "pancseg.yaml")
    fast = ["--epochs", "1", "--force", "--set", "train.iterations_per_epoch=1", "--set", "train.val_iterations=1"]
    results = project / "work" / "nnUNet_results" / "Dataset001_PancreasCancer" / FOLDER
    real_start = nnUNetTrainerMultiTask.on_train_start
    seen: dict[int, tuple[float, float]] = {}
    second: list[Any] = []

    def start(self: nnUNetTrainerMultiTask) -> None:
        real_start(self)
        seen[self.fold] = (self.pancseg_settings.head_lr, self.optimizer.head.param_groups[0]["lr"])
        if self.fold == 0:
            second.append(runner.invoke(app, ["train", "-c", cfg, "--fold", "2", *fast, "--set", "train.head_lr=0.004"]))

    monkeypatch.setattr(nnUNetTrainerMultiTask, "on_train_start", start)
    monkeypatch.setattr(nnUNetTrainerMultiTask, "perform_actual_validation", lambda self, save_probabilities=False: None)
    records = {fold: results / f"fold_{fold}" / "pancseg_training.json" for fold in (0, 1, 2)}
    shared = project / "work" / "nnUNet_preprocessed" / "Dataset001_PancreasCancer" / "pancseg_training.json"
    shared.write_text('{"head_lr": 0.5}', encoding="utf-8")  # an earlier pancseg's, which nothing reads now
    result = runner.invoke(app, ["train", "-c", cfg, "--fold", "0", "--fold", "1", *fast, "--set", "train.head_lr=0.002"])
    assert result.exit_code == 0, result.output
    assert second[0].exit_code == 0, second[0].output
    assert seen == {0: (0.002, 0.002), 2: (0.004, 0.004), 1: (0.002, 0.002)}
    for fold, head_lr in ((0, 0.002), (1, 0.002), (2, 0.004)):
        assert json.loads(records[fold].read_text(encoding="utf-8"))["head_lr"] == head_lr
        checkpoint = torch.load(results / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["optimizer_state"]["head"]["param_groups"][0]["lr"] == head_lr
    assert not shared.exists()
    # Training fold 1 again with other settings leaves fold 0 as it was trained and recorded.
    fold_0 = {path.name: path.read_bytes() for path in (records[0], results / "fold_0" / "checkpoint_final.pth")}
    again = runner.invoke(app, ["train", "-c", cfg, "--fold", "1", *fast, "--set", "train.head_lr=0.008"])
    assert again.exit_code == 0, again.output
    assert seen[1] == (0.008, 0.008)
    assert fold_0 == {path.name: path.read_bytes() for path in (records[0], results / "fold_0" / "checkpoint_final.pth")}


def _ddp_config(project: Path) -> Any:
    from pancreas_cli.config import load_config

    return load_config(project / "pancseg.yaml", ["train.num_gpus=2"])


@pytest.mark.parametrize(("error", "expected", "message"), [
    (KeyboardInterrupt(), TrainingInterrupted,
     "--resume --set train.num_gpus=2 --epochs 1000` continues from the last periodic checkpoint"),
    (ProcessRaisedException("Traceback ...\nDataError: case quiz_9 has no subtype", 1, 123), TrainError,
     "nnU-Net training failed: ProcessRaisedException: Traceback ...\nDataError: case quiz_9 has no subtype"),
])
def test_ddp_errors(project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException,
                    expected: type, message: str) -> None:
    """Several GPUs go through the DDP launcher; its failures and Ctrl-C still become pancseg errors."""
    import pancreas_cli.train as train_module

    def launch(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(train_module, "launch_ddp", launch)
    with pytest.raises(expected, match=re.escape(message)):
        _train_ddp(_ddp_config(project), {"plans_identifier": "nnUNetResEncUNetMPlans"}, "nnUNetTrainerMultiTask",
                   2, None, tmp_path / "train.log")


def test_ddp_resumes_from_the_newest_checkpoint(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """nnU-Net's checkpoint choice in DDP processes resumes from checkpoint_final.pth when there is one;
    after an extended run was interrupted the newer checkpoint_latest.pth must win, and the old final
    is kept aside."""
    import torch

    import pancreas_cli.train as train_module

    folder = tmp_path / "fold_2"
    folder.mkdir()
    torch.save({"current_epoch": 5}, folder / "checkpoint_final.pth")
    torch.save({"current_epoch": 8}, folder / "checkpoint_latest.pth")
    os.utime(folder / "checkpoint_final.pth", ns=(1, 1))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(train_module, "launch_ddp", lambda *args, **kwargs: calls.append(kwargs))
    _train_ddp(_ddp_config(project), {"plans_identifier": "nnUNetResEncUNetMPlans"}, "nnUNetTrainerMultiTask", 2,
               newest_checkpoint(folder), tmp_path / "train.log")
    assert calls[0]["continue_training"]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_final_epoch5.pth", "checkpoint_latest.pth"]


def test_fold_summary_reads_numbers(tmp_path: Path) -> None:
    """The last metrics.csv row reaches --json and the table as numbers; empty cells (not measured) as None."""
    from pancreas_cli.train import _fold_summary

    (tmp_path / "metrics.csv").write_text("epoch,train_loss,cls_loss,val_macro_f1,best,lr\n"
                                          "1,0.5,,0.25,1,0.01\n2,-0.125,,,0,9.5e-03\n")
    last, validation = _fold_summary(tmp_path)
    assert last == {"epoch": 2, "train_loss": -0.125, "cls_loss": None, "val_macro_f1": None, "best": 0,
                    "lr": 0.0095}
    assert validation == {}
    assert _fold_summary(tmp_path / "missing") == ({}, {})
