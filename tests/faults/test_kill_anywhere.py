"""kill -9 at a random point of every stage, then the same command again: the result of an uninterrupted run.

One chain on a tiny synthetic project: prepare, clean, preprocess, train (continued with
``--resume``, the documented way on), predict, evaluate, report, export. Each stage is started as its own process and killed
with SIGKILL after a random delay within the time an uninterrupted run of it took, once per seed (the
second kill hits what the first left), then run again to the end. The outputs are then compared with an uninterrupted chain (and, for the stages after train,
with an uninterrupted run on the same model, written under ``ref/``), and nothing temporary may be
left behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import write_config

pytestmark = pytest.mark.slow

CONFIG = ("project_dir: ./work\ndataset: {source: ./data}\nplan: {preset: smoke, num_processes: 1}\n"
          "train: {device: cpu, epochs: 2, iterations_per_epoch: 2, val_iterations: 1, save_every: 1, da_workers: 0}\n"
          "predict: {device: cpu, mirroring: false}\n")
STAGES = [["prepare"], ["clean"], ["preprocess"], ["train", "--fold", "0"], ["predict", "-i", "data/test", "-o", "pred"],
          ["evaluate", "--fold", "0", "-o", "eval"], ["report", "--fold", "0", "-o", "report/report.html"],
          ["export", "-o", "model.zip"]]
#: Stages whose output depends on the model (another training changes it) and is named by their last
#: argument: compared with an uninterrupted run on the same model.
MODEL_STAGES = ("predict", "evaluate", "report", "export")
LEFTOVERS = ("*.tmp*", ".partial_*", ".scratch*")


def _command(root: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pancreas_cli", *args, "-c", str(root / "pancseg.yaml")]


def _run(root: Path, args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(_command(root, args), cwd=root, capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return time.perf_counter() - start


def _killed(root: Path, args: list[str], delay: float) -> None:
    process = subprocess.Popen(_command(root, args), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the command and any worker it started
        process.wait()


def _project(root: Path) -> Path:
    from pancreas_cli.synth import synthesize

    synthesize(root / "data", cases=6, shape=(16, 32, 32), seed=2)
    write_config(root, CONFIG)
    return root


def _raw(root: Path) -> Path:
    return next((root / "work" / "nnUNet_raw").glob("Dataset*"))


def _state(root: Path, stage: str, out: str | None = None) -> dict[str, object]:
    """What an uninterrupted run of ``stage`` leaves (a model stage: in ``out``), independent of where
    the project lies."""
    if stage in ("prepare", "clean"):
        raw = _raw(root)
        # pancseg's own state files record absolute paths and times: compared by presence only
        files = {str(p.relative_to(raw)): b"" if p.name.startswith("pancseg_") else p.read_bytes()
                 for p in sorted(raw.rglob("*")) if p.is_file() and p.name != "clean_report.csv"}
        return {"files": files, "dataset": json.loads((raw / "dataset.json").read_text())}
    if stage == "preprocess":
        pre = next((root / "work" / "nnUNet_preprocessed").glob("Dataset*"))
        return {"files": sorted(str(p.relative_to(pre)) for p in pre.rglob("*") if p.is_file())}
    if stage == "train":
        fold = next((root / "work" / "nnUNet_results").glob("Dataset*/*/fold_0"))
        rows = (fold / "metrics.csv").read_text().splitlines()
        return {"final": (fold / "checkpoint_final.pth").is_file(), "epochs": len(rows) - 1}
    path = root / str(out)
    if stage == "export":  # the zip's times differ: its names and manifest (every file's sha256)
        with zipfile.ZipFile(path) as archive:
            manifest = next(n for n in archive.namelist() if n.endswith("/pancseg_model.json"))
            return {"names": sorted(archive.namelist()), "manifest": json.loads(archive.read(manifest))}
    if stage == "report":  # the page says when it was written (to the minute)
        return {p.name: re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC", b"TIME", p.read_bytes())
                for p in sorted(path.parent.iterdir()) if p.is_file()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for pattern in LEFTOVERS for p in root.rglob(pattern))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], dict[str, float]]:
    root = _project(tmp_path_factory.mktemp("uninterrupted"))
    states, seconds = {}, {}
    for args in STAGES:
        seconds[args[0]] = _run(root, args)
        if args[0] not in MODEL_STAGES:  # their outputs depend on the model, which another training changes
            states[args[0]] = _state(root, args[0])
    return states, seconds


SEEDS = (0, 1)  # each stage is killed once per seed, at that seed's random point, before it runs through


def test_kill_any_stage_then_run_it_again(reference, tmp_path: Path) -> None:
    states, seconds = reference
    rngs = [random.Random(seed) for seed in SEEDS]
    root = _project(tmp_path)
    for args in STAGES:
        stage = args[0]
        delays = [rng.uniform(0.2, seconds[stage]) for rng in rngs]
        what = f"{stage} killed after {', '.join(f'{d:.1f}' for d in delays)} s"
        if stage in MODEL_STAGES:  # the same model's uninterrupted run, to compare with
            _run(root, [*args[:-1], f"ref/{args[-1]}"])
        for delay in delays:
            _killed(root, _resumed(root, args), delay)
        _run(root, _resumed(root, args))
        if stage in MODEL_STAGES:
            assert _state(root, stage, args[-1]) == _state(root, stage, f"ref/{args[-1]}"), what
        else:
            assert _state(root, stage) == states[stage], what
        assert not _leftovers(root), f"{what}: left {_leftovers(root)}"


def _resumed(root: Path, args: list[str]) -> list[str]:
    """``args``, with ``--resume`` for a training that has begun (the documented way on)."""
    return [*args, "--resume"] if args[0] == "train" and _has_training(root) else args


def _has_training(root: Path) -> bool:
    return any((root / "work" / "nnUNet_results").glob("Dataset*/*/fold_0/checkpoint_*.pth"))
