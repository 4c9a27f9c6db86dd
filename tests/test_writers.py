"""Temporary names carry their writer (host and pid): what a killed command left is removed without a
lock, what a running command (here or on another machine) is writing is kept."""

from __future__ import annotations

import os
from pathlib import Path

from pancreas_cli import writers
from pancreas_cli.imageio import PARTIAL_PREFIX, atomic_target, partial_name, sweep_dead_partials, write_text


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_name_tells_a_dead_writer_of_this_machine() -> None:
    dead = _dead_pid()
    assert writers.tag() == f"{writers.HOST_TAG}.{os.getpid()}"
    assert writers.dead_writer(f"{writers.HOST_TAG}.{dead}.case.nii.gz")
    assert not writers.dead_writer(f"{writers.tag()}.case.nii.gz")  # this process
    assert not writers.dead_writer(f"{writers.HOST_TAG}.{os.getppid()}.x")  # running
    assert not writers.dead_writer(f"another-host.{dead}.x")  # its processes cannot be seen
    assert not writers.dead_writer("k3j2h1x9")  # an untagged name (older pancseg)


def test_temporary_names_carry_the_writer(tmp_path: Path) -> None:
    with atomic_target(tmp_path / "a.png") as tmp:
        assert tmp.parent.name.startswith(partial_name())
    assert partial_name("x") == f"{PARTIAL_PREFIX}{writers.tag()}.x"


def test_only_the_leftovers_of_dead_writers_are_swept(tmp_path: Path) -> None:
    dead = _dead_pid()
    left_file = tmp_path / f"{PARTIAL_PREFIX}{writers.HOST_TAG}.{dead}.report.html.k3j2h1x9.tmp"
    left_folder = tmp_path / f"{PARTIAL_PREFIX}{writers.HOST_TAG}.{dead}.a1b2c3d4"
    kept = [tmp_path / f"{PARTIAL_PREFIX}{writers.HOST_TAG}.{os.getppid()}.x.tmp",  # a running command's
            tmp_path / f"{PARTIAL_PREFIX}another-host.{dead}.x.tmp",  # another machine's
            tmp_path / f"{PARTIAL_PREFIX}report.html.k3j2h1x9.tmp",  # untagged: swept under a lock only
            tmp_path / "report.html"]
    for path in [left_file, *kept]:
        path.write_text("x", encoding="utf-8")
    left_folder.mkdir()
    (left_folder / "report.png").write_bytes(b"x")
    write_text("done", tmp_path / "mine.txt")
    assert sorted(sweep_dead_partials(tmp_path)) == sorted([left_file, left_folder])
    assert not left_file.exists() and not left_folder.exists()
    assert all(path.exists() for path in kept)
