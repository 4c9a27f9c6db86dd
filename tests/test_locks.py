"""Advisory locks: two commands may not change the same project, fold or output folder at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_config
from pancreas_cli import locks
from pancreas_cli.cli import app
from pancreas_cli.locks import BusyError


def test_exclusive_and_shared(tmp_path: Path) -> None:
    with locks.project(tmp_path):
        with pytest.raises(BusyError, match=rf"the project {tmp_path} is in use by pid {os.getpid()} "):
            with locks.project(tmp_path, shared=True):
                pass
    with locks.project(tmp_path, shared=True), locks.project(tmp_path, shared=True):  # e.g. two folds training
        with pytest.raises(BusyError):
            with locks.project(tmp_path):
                pass
    with locks.project(tmp_path):  # released when the blocks end
        pass


def test_output_folders_are_locked_one_by_one(tmp_path: Path) -> None:
    with locks.output_folder(tmp_path, tmp_path / "a"):
        with locks.output_folder(tmp_path, tmp_path / "b"):
            with pytest.raises(BusyError, match="the output folder .*a is in use"):
                with locks.output_folder(tmp_path, tmp_path / "x" / ".." / "a"):
                    pass
    assert not (tmp_path / "a").exists()  # the lock lives in the project, not in the user's folder


def test_a_shared_holder_creates_no_project(tmp_path: Path) -> None:
    with locks.project(tmp_path / "typo", shared=True):
        pass
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", [["prepare"], ["clean"], ["preprocess"], ["predict", "-i", "{in}", "-o", "{out}"]])
def test_commands_refuse_a_project_in_use(runner: CliRunner, tmp_path: Path, command: list[str]) -> None:
    command = [c.format(**{"in": tmp_path / "in", "out": tmp_path / "out"}) for c in command]
    (tmp_path / "data").mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.nii.gz").write_bytes(b"")
    cfg = write_config(tmp_path, "project_dir: ./work\n")
    with locks.project(tmp_path / "work"):  # e.g. preprocess --force running in another terminal
        result = runner.invoke(app, [*command, "-c", str(cfg)])
    assert result.exit_code == 1, result.output
    assert f"the project {tmp_path / 'work'} is in use by pid {os.getpid()}" in result.stderr
    assert "wait until it ends, or stop it" in result.stderr
