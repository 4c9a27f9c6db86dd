"""Beyond one process: folds side by side (``train --devices``), nnU-Net's DDP on two CPU processes
(gloo), and the SLURM templates of ``examples/slurm`` run locally with the array variables set."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pancreas_cli.checkpoints import read_checkpoint
from pancreas_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "examples" / "slurm"
RESULTS = Path("work/nnUNet_results/Dataset001_PancreasCancer/nnUNetTrainerMultiTask__nnUNetResEncUNetMPlans__3d_smoke")


@pytest.fixture
def project(trained_project: Path, tmp_path: Path) -> Path:
    """A copy of the shared trained project (fold 4 trained) that a test may train further: its stages
    are up to date (times kept; the source is the shared one, which prepare only reads)."""
    root = tmp_path / "project"
    shutil.copytree(trained_project / "work", root / "work", symlinks=True)
    text = (trained_project / "pancseg.yaml").read_text(encoding="utf-8")
    (root / "pancseg.yaml").write_text(text.replace("source: ./data", f"source: {trained_project / 'data'}"),
                                       encoding="utf-8")
    return root


def _epochs(fold_dir: Path) -> list[str]:
    with (fold_dir / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        return [row["epoch"] for row in csv.DictReader(fh)]


def _saved_epoch(path: Path) -> int:
    return int(read_checkpoint(path, trust=False, required=("current_epoch",))["current_epoch"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_checkpoints_and_resumes(project: Path, runner: CliRunner) -> None:
    """nnU-Net's DDP trainer path for real: 2 processes (gloo), 2 epochs x 2 iterations in two runs."""
    args = ["train", "-c", str(project / "pancseg.yaml"), "--fold", "0", "--num-gpus", "2", "--device", "cpu",
            "--set", "train.save_every=1"]
    fold_dir = project / RESULTS / "fold_0"
    log = project / "work" / "logs" / "train_multitask_fold0.log"
    first = runner.invoke(app, [*args, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    assert log.read_text(encoding="utf-8").count("The world size is 2") == 2  # both ranks ran
    assert _saved_epoch(fold_dir / "checkpoint_final.pth") == 1 and _epochs(fold_dir) == ["1"]
    resumed = runner.invoke(app, [*args, "--epochs", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert _saved_epoch(fold_dir / "checkpoint_final.pth") == 2 and _epochs(fold_dir) == ["1", "2"]
    assert (fold_dir / "validation" / "summary.json").is_file()
    assert (fold_dir / "validation" / "subtype_results.csv").is_file()  # gathered from both ranks


def test_more_processes_than_the_batch_is_refused_up_front(project: Path, runner: CliRunner) -> None:
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "0", "--num-gpus", "3"])
    assert result.exit_code == 1
    assert "train.num_gpus = 3 is more than the batch size 2" in result.stderr
    assert not (project / RESULTS / "fold_0").exists()


@pytest.mark.parametrize(("devices", "message"), [
    ("cpu,gpu", "'gpu' is not a device"),
    ("cuda:7", "cuda:7 requested but"),
])
def test_devices_are_checked_before_anything_starts(project: Path, runner: CliRunner, devices: str,
                                                    message: str) -> None:
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "all", "--devices", devices])
    assert result.exit_code == 1 and message in result.stderr


@pytest.mark.slow
def test_devices_train_folds_side_by_side_and_summarise_failures(project: Path, runner: CliRunner) -> None:
    """cpu,cpu: fold 0 (then 4) in one process, fold 1 in the other; fold 4 is trained already, so it
    fails without --resume while the others finish."""
    result = runner.invoke(app, ["train", "-c", str(project / "pancseg.yaml"), "--fold", "0", "--fold", "1",
                                 "--fold", "4", "--devices", "cpu,cpu", "--json"])
    assert result.exit_code == 1, result.output
    assert [fold["fold"] for fold in json.loads(result.stdout)["folds"]] == [0, 1]
    assert "fold 4 on cpu: fold 4 already has a training" in result.stderr
    assert "1 fold of 3 failed" in result.stderr
    for fold in (0, 1):
        assert (project / RESULTS / f"fold_{fold}" / "checkpoint_final.pth").is_file()
        assert (project / "work" / "logs" / f"train_multitask_fold{fold}.log").is_file()


def _env(project: Path, **more: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PANCSEG=f"{sys.executable} -m pancreas_cli", PANCSEG_CONFIG=str(project / "pancseg.yaml"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), **more)
    return env


def _body(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SLURM / name)], env=env, capture_output=True, encoding="utf-8", timeout=900)


def _array(name: str, env: dict[str, str], tasks: int) -> list[subprocess.CompletedProcess[str]]:
    """A template's body as the tasks of an array, all started at once."""
    started = [subprocess.Popen(["bash", str(SLURM / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                encoding="utf-8",
                                env={**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(tasks)})
               for task in range(tasks)]
    done = []
    for task in started:
        out, err = task.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(task.args, task.returncode, out, err))
    return done


@pytest.mark.slow
def test_slurm_chain_runs_locally_without_a_busy_failure(project: Path, tmp_path: Path) -> None:
    """The templates' bodies with the array variables set: preprocess, two folds at once (as two array
    tasks), predict, evaluate and report; --wait lets tasks that meet on a lock take turns."""
    raw = project / "work" / "nnUNet_raw" / "Dataset001_PancreasCancer"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (raw / "labelsTr").glob("*.nii.gz"))[:2]
    for case in cases:
        (tmp_path / "scans").mkdir(exist_ok=True)
        (tmp_path / "gt").mkdir(exist_ok=True)
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "scans")
        shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", tmp_path / "gt")
    env = _env(project, PANCSEG_INPUT=str(tmp_path / "scans"), PANCSEG_OUTPUT=str(tmp_path / "pred"),
               PANCSEG_GT=str(tmp_path / "gt"))
    steps = [_body("preprocess.sbatch", env)]
    steps += _array("train_array.sbatch", env, 2)  # two folds at once
    steps += _array("predict_array.sbatch", env, 2)  # two parts into one folder at once
    steps.append(_body("evaluate.sbatch", env))
    for step in steps:
        assert step.returncode == 0, f"{step.args}:\n{step.stdout}\n{step.stderr}"
        assert "in use by" not in step.stderr
    for fold in (0, 1):
        assert (project / RESULTS / f"fold_{fold}" / "checkpoint_final.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == [f"{case}.nii.gz" for case in cases]
    assert (tmp_path / "pred" / "metrics_summary.json").is_file()
    assert list((project / "work" / "report").glob("report_fold0.html"))


def test_slurm_predict_parts_and_submit_chain(tmp_path: Path) -> None:
    """The predict array's command for each part (--part I/N), and submit.sh's dependencies, through
    stand-ins for pancseg and sbatch that record their arguments."""
    calls = tmp_path / "calls.txt"
    for name, reply in (("fake-pancseg", ""), ("sbatch", "echo $((1000 + $(wc -l < \"$CALLS\")))")):
        (tmp_path / name).write_text(f'#!/bin/bash\necho "{name} $*" >> "$CALLS"\n{reply}\n', encoding="utf-8")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "CALLS": str(calls), "PANCSEG": str(tmp_path / "fake-pancseg"), "PANCSEG_INPUT": "scans",
           "PANCSEG_OUTPUT": "pred", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    for task in (0, 1):
        run = _body("predict_array.sbatch", {**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"})
        assert run.returncode == 0, run.stderr
    assert subprocess.run(["bash", str(SLURM / "submit.sh")], env=env, capture_output=True, encoding="utf-8",
                          timeout=60).returncode == 0
    lines = calls.read_text(encoding="utf-8").splitlines()
    assert lines[:2] == [f"fake-pancseg predict -c pancseg.yaml -i scans -o pred --wait --part {part}/2"
                         for part in (0, 1)]
    assert lines[2:] == [f"sbatch --parsable {SLURM}/preprocess.sbatch",
                         f"sbatch --parsable --dependency=afterok:1003 {SLURM}/train_array.sbatch",
                         f"sbatch --parsable --dependency=afterok:1004 {SLURM}/predict_array.sbatch",
                         f"sbatch --parsable --dependency=afterok:1005 {SLURM}/evaluate.sbatch"]


def test_slurm_train_task_passes_sigterm_on_and_requeues(tmp_path: Path) -> None:
    """`--signal=B:TERM@120` reaches only the batch shell: the template passes it on to pancseg (which
    saves a checkpoint and exits 143), then requeues the task; the requeued run resumes."""
    calls = tmp_path / "calls.txt"
    started = tmp_path / "started"
    (tmp_path / "fake-pancseg").write_text(
        '#!/bin/bash\necho "pancseg $*" >> "$CALLS"\nsleep 60 &\n'
        "trap 'echo \"pancseg got TERM\" >> \"$CALLS\"; kill $!; exit 143' TERM\n"
        f'touch "{started}"\nwait $!\n', encoding="utf-8")
    (tmp_path / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$CALLS"\n', encoding="utf-8")
    for name in ("fake-pancseg", "scontrol"):
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "CALLS": str(calls), "PANCSEG": str(tmp_path / "fake-pancseg"),
           "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "77",
           "SLURM_RESTART_COUNT": "1"}
    task = subprocess.Popen(["bash", str(SLURM / "train_array.sbatch")], env=env, encoding="utf-8",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(600):
        if started.exists():
            break
        time.sleep(0.05)
    task.send_signal(signal.SIGTERM)
    task.communicate(timeout=60)
    assert task.returncode == 143
    assert calls.read_text(encoding="utf-8").splitlines() == [
        "pancseg train -c pancseg.yaml --fold 3 --wait --resume", "pancseg got TERM", "scontrol requeue 77"]


def test_cpu_share_splits_the_cores_and_never_divides_by_zero() -> None:
    """``train --devices cuda:0,cuda:1`` has no CPU process: the share must still be a thread count."""
    from pancreas_cli.devices import cpu_share

    cores = os.cpu_count() or 1
    assert cpu_share(0) == cpu_share(1) == cores
    assert cpu_share(2) == max(1, cores // 2) and cpu_share(10 * cores) == 1
