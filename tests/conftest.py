"""Shared fixtures: tiny NIfTI cases written on the fly, the real-data folder, a CLI runner."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

REALDATA = Path(__file__).resolve().parent / "data" / "realdata"  # shipped with the tests: see its README.md
SPACING_XYZ = (0.75, 0.75, 2.0)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the console width so assertions on messages do not depend on line wrapping."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.fail(f"real data not found at {REALDATA}: it ships in the repository (tests/data/realdata)")
    return REALDATA


def ct_volume(shape: tuple[int, int, int] = (8, 16, 16), seed: int = 0) -> np.ndarray:
    """A small CT-like int16 volume: air around a soft-tissue block."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[:, 2:-2, 2:-2] = 40 + rng.normal(0, 10, size=(shape[0], shape[1] - 4, shape[2] - 4)).astype(np.int16)
    vol[:, -3, 3] = 700  # a bone-like column, so the range looks like CT
    return vol


def label_volume(shape: tuple[int, int, int] = (8, 16, 16), lesion: bool = True) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:6, 5:11, 4:12] = 1
    if lesion:
        lab[3:5, 7:9, 6:8] = 2
    return lab


def write(array: np.ndarray, path: Path, spacing: tuple[float, ...] = SPACING_XYZ,
          origin: tuple[float, ...] = (0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def make_quiz(root: Path, per_subtype: int = 2, validation: int = 1, test: int = 2) -> Path:
    """A minimal quiz-layout dataset: ``per_subtype`` train and ``validation`` validation cases per subtype."""
    n = 0
    for split, count in (("train", per_subtype), ("validation", validation)):
        for subtype in range(3):
            for _ in range(count):
                n += 1
                case = f"quiz_{subtype}_{n:03d}"
                folder = root / split / f"subtype{subtype}"
                write(ct_volume(seed=n), folder / f"{case}_0000.nii.gz")
                write(label_volume(), folder / f"{case}.nii.gz")
    for i in range(test):
        write(ct_volume(seed=100 + i), root / "test" / f"quiz_{i + 1:03d}_0000.nii.gz")
    return root


def write_config(folder: Path, text: str) -> Path:
    path = folder / "pancseg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove a source folder is unchanged)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def quiz_project(tmp_path: Path) -> Path:
    """A quiz dataset under tmp/data and a config tmp/pancseg.yaml pointing at it."""
    make_quiz(tmp_path / "data")
    write_config(tmp_path, "project_dir: ./work\ndataset:\n  source: ./data\nplan:\n  preset: smoke\n")
    return tmp_path


@pytest.fixture
def in_dir(tmp_path: Path):
    """Run the test with ``tmp_path`` as the working directory."""
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset with a multi-task smoke model trained briefly on fold 4 (shared, read-only use).

    Tests must not retrain fold 4; they predict with ``--fold 4``.
    """
    from pancreas_cli.cli import app

    root = tmp_path_factory.mktemp("trained")
    runner = CliRunner()
    assert runner.invoke(app, ["synth", str(root / "data"), "--cases", "8", "--shape", "24,48,48"]).exit_code == 0
    write_config(root, "project_dir: ./work\ndataset: {source: ./data}\nplan: {preset: smoke, num_processes: 1}\n"
                       "train: {device: cpu, epochs: 1, iterations_per_epoch: 2, val_iterations: 1}\n"
                       "predict: {device: cpu, mirroring: false}\nevaluate: {bootstrap: 100}\n")
    for args in (["prepare"], ["clean"], ["preprocess"], ["train", "--fold", "4"]):
        result = runner.invoke(app, [*args, "-c", str(root / "pancseg.yaml")])
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def no_spawned_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse to start any spawned process (nnU-Net starts its worker pools that way)."""
    import multiprocessing.context

    def refuse(process: Any) -> None:
        raise AssertionError(f"a spawned process was started: {process}")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "_Popen", staticmethod(refuse))


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions: one torch thread is fastest, and far faster on a busy machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextmanager
def held_elsewhere(lock: Callable[[], Any], *, writing: Path | None = None) -> Iterator[int]:
    """Hold the lock that ``lock()`` makes in another process (a lock is re-entrant within one);
    ``writing``: take that project exclusively. Yields the other process's pid."""
    from pancreas_cli import locks

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # never back into pytest from here
        try:
            os.close(ready_r)
            with lock():
                if writing is not None:
                    locks.writing(writing)
                os.write(ready_w, b"x")
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x", "the other process did not get the lock"
        yield pid
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def write_dicom_series(volume: np.ndarray, folder: Path, spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
                       uid: str = "1.2.826.0.1.3680043.2.1125.7") -> Path:
    """A synthetic CT series of (z, y, x) int16 ``volume``, one file per slice (SimpleITK's writer), with
    the UIDs a DICOM SEG references."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    ids = {"0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0020|0052": f"{uid}.3",
           "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}  # study, series, frame of reference, CT Image Storage
    for k, plane in enumerate(volume):
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(spacing[:2])
        tags = {**ids, "0008|0018": f"{uid}.4.{k + 1}", "0008|0060": "CT", "0020|0013": str(k + 1),
                "0020|0032": f"-20\\-30\\{k * spacing[2]}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": str(spacing[2]), "0008|103e": "synthetic CT", "0010|0020": "P1"}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    return folder
