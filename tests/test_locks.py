"""Advisory locks: two commands may not change the same project, fold or output folder at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import held_elsewhere, make_quiz, write_config
from pancreas_cli import locks, writers
from pancreas_cli.cli import app
from pancreas_cli.imageio import PARTIAL_PREFIX
from pancreas_cli.locks import BusyError


def _exclusive(project_dir: Path) -> None:
    """Take the project exclusively as a stage that writes would."""
    with locks.project(project_dir):
        locks.writing(project_dir)


def test_shared_holders_pass_each_other_a_writer_does_not(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # another command: holds the project shared for a while
        with locks.project(tmp_path):
            time.sleep(3)
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not list((tmp_path / locks.LOCK_DIR).glob("project.*.holder")) and time.monotonic() < deadline:
            time.sleep(0.05)
        with locks.project(tmp_path):  # e.g. a second `pancseg run` finding prepare up to date
            pass
        with pytest.raises(BusyError, match=rf"the project {tmp_path} is in use by pid {pid} "):
            _exclusive(tmp_path)
    finally:
        os.waitpid(pid, 0)
    _exclusive(tmp_path)  # released when the other command ended


def test_a_killed_command_leaves_no_lock(tmp_path: Path) -> None:
    """Forked children (nnU-Net's data-loader workers) must not keep a killed command's lock."""
    pid = os.fork()
    if pid == 0:
        with locks.project(tmp_path):
            locks.writing(tmp_path)
            if os.fork() == 0:  # a worker that outlives its parent
                time.sleep(5)
                os._exit(0)
            time.sleep(30)
        os._exit(0)
    deadline = time.monotonic() + 10
    while not list((tmp_path / locks.LOCK_DIR).glob("project.*.holder")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    _exclusive(tmp_path)  # the orphaned worker still runs, but holds nothing
    assert not list((tmp_path / locks.LOCK_DIR).glob(f"project.lock.*.{pid}.holder"))  # its note is cleared


def test_a_note_half_written_by_a_killed_command_is_removed(tmp_path: Path) -> None:
    """A command killed while writing its note leaves the write's temporary file; the next lock
    taken removes it when its pid is dead, and keeps a running command's."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no longer runs
    folder = tmp_path / locks.LOCK_DIR
    folder.mkdir()
    dead, running = (folder / f"{PARTIAL_PREFIX}{writers.HOST_TAG}.{p}.project.lock.{writers.HOST_TAG}.{p}.holder.k3.tmp"
                     for p in (pid, os.getppid()))
    for path in (dead, running):
        path.write_text('{"pid": ', encoding="utf-8")
    with locks.project(tmp_path):
        pass
    assert not dead.exists()
    assert running.exists()


def test_nested_and_repeated_holds_in_one_process(tmp_path: Path) -> None:
    with locks.project(tmp_path), locks.project(tmp_path):
        locks.writing(tmp_path)
    with locks.output_folder(tmp_path / "a"), locks.output_folder(tmp_path / "x" / ".." / "a"):
        pass


def test_output_folders_are_locked_outside_them(tmp_path: Path) -> None:
    with locks.output_folder(tmp_path / "a"):
        pass
    assert not (tmp_path / "a").exists()  # nothing is written into the user's folder


def test_a_shared_holder_creates_no_project(tmp_path: Path) -> None:
    with locks.project(tmp_path / "typo"):
        pass
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", [["prepare"], ["preprocess"], ["predict", "-i", "{in}", "-o", "{out}"]])
def test_commands_refuse_a_project_being_changed(runner: CliRunner, tmp_path: Path, command: list[str]) -> None:
    command = [c.format(**{"in": tmp_path / "in", "out": tmp_path / "out"}) for c in command]
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=1)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.nii.gz").write_bytes(b"")
    cfg = write_config(tmp_path, "project_dir: ./work\nplan: {preset: smoke}\n")
    assert runner.invoke(app, ["prepare", "-c", str(cfg)]).exit_code == 0
    work = tmp_path / "work"
    with held_elsewhere(lambda: locks.project(work), writing=work) as pid:  # e.g. preprocess --force
        result = runner.invoke(app, [*command, "-c", str(cfg)])
    assert result.exit_code == 1, result.output
    assert f"the project {work} is in use by pid {pid}" in result.stderr
    assert "wait until it ends, or stop it" in result.stderr


def test_up_to_date_stages_pass_a_reader(runner: CliRunner, tmp_path: Path) -> None:
    """A second `pancseg run` (another fold, another GPU) passes prepare while the first one trains."""
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=1)
    cfg = write_config(tmp_path, "project_dir: ./work\n")
    assert runner.invoke(app, ["prepare", "-c", str(cfg)]).exit_code == 0
    with held_elsewhere(lambda: locks.project(tmp_path / "work")):
        again = runner.invoke(app, ["prepare", "-c", str(cfg)])
        assert again.exit_code == 0 and "up to date" in again.stdout
        forced = runner.invoke(app, ["prepare", "-c", str(cfg), "--force"])
        assert forced.exit_code == 1 and "is in use by" in forced.stderr


@pytest.fixture
def waiting() -> Iterator[None]:
    """This test's locks wait for their holders (as under --wait); afterwards they fail at once again."""
    locks.wait_for_locks(True)
    yield
    locks.wait_for_locks(False)


def _held_for(seconds: float, lock: Callable[[], Any]) -> int:
    """Hold ``lock()`` in another process for ``seconds``, then end it; its pid once it holds the lock."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            with lock():
                os.write(ready_w, b"x")
                time.sleep(seconds)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    return pid


def test_a_waiting_command_proceeds_when_the_holder_ends(tmp_path: Path, waiting: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pid = _held_for(1.0, lambda: locks.fold(tmp_path, "T", 1))
    try:
        with locks.fold(tmp_path, "T", 1):
            assert not list(tmp_path.glob(f"*.{pid}.holder"))  # it got the lock only when the holder let go
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pancseg: waiting for fold 1 of T: in use by pid {pid} on host "
                                                   f"{locks.HOST} (`pancseg ")


def test_waiting_with_a_limit_fails_naming_the_holder_and_host(tmp_path: Path) -> None:
    locks.wait_for_locks(True, 0.3)
    try:
        with held_elsewhere(lambda: locks.output_folder(tmp_path / "out")) as pid:
            with pytest.raises(BusyError, match=rf"the output folder {tmp_path / 'out'} is still in use by pid {pid} "
                                                rf"on host {re.escape(locks.HOST)} .* after waiting 0.3 s"):
                with locks.output_folder(tmp_path / "out"):
                    pass
    finally:
        locks.wait_for_locks(False)


def test_another_hosts_holder_is_waited_for_and_reported_never_removed(tmp_path: Path, waiting: None,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """flock may be per machine on a network file system: a note of another host's holder is the lock."""
    note = tmp_path / locks.LOCK_DIR / "project.lock.node7.4242.holder"
    note.parent.mkdir()
    note.write_text(json.dumps({"pid": 4242, "host": "node7", "shared": False, "command": "pancseg run"}))
    locks.wait_for_locks(True, 0.2)
    with pytest.raises(BusyError, match=r"pid 4242 on host node7 .*delete .*node7\.4242\.holder"):
        with locks.project(tmp_path):
            pass
    assert note.is_file()
    assert "pancseg: waiting for the project" in capsys.readouterr().err


def test_a_stage_that_waited_to_write_decides_again(tmp_path: Path, waiting: None) -> None:
    """While it waited, the other command may have done the work: the stage starts over, exclusive."""
    calls = []

    @locks.project_stage()
    def stage(config: Any) -> None:
        calls.append(len(calls))
        locks.writing(config.project_dir)

    (tmp_path / "work").mkdir()
    pid = _held_for(0.6, lambda: locks.project(tmp_path / "work"))  # e.g. another `pancseg run` passing by
    stage(SimpleNamespace(project_dir=tmp_path / "work"))
    os.waitpid(pid, 0)
    assert calls == [0, 1]


def test_prepare_with_wait_passes_a_busy_project(runner: CliRunner, tmp_path: Path) -> None:
    make_quiz(tmp_path / "data", per_subtype=1, validation=0, test=1)
    cfg = write_config(tmp_path, "project_dir: ./work\n")
    assert runner.invoke(app, ["prepare", "-c", str(cfg)]).exit_code == 0
    pid = _held_for(1.0, lambda: locks.project(tmp_path / "work"))
    try:
        result = runner.invoke(app, ["prepare", "-c", str(cfg), "--force", "--wait-seconds", "60"])
    finally:
        locks.wait_for_locks(False)
        os.waitpid(pid, 0)
    assert result.exit_code == 0, result.output
    assert f"waiting for the project {tmp_path / 'work'} (at most 60 s): in use by pid {pid}" in result.stderr
