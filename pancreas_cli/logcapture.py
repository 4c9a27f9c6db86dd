"""Send nnU-Net's own prints (and its worker processes') to a log file instead of the terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def redirect_output(log_file: Path) -> Iterator[TextIO]:
    """Redirect file descriptors 1 and 2 and ``sys.stdout``/``sys.stderr`` to ``log_file``.

    Redirecting the descriptors catches spawned workers and C libraries too; replacing the Python
    streams catches writes when a test runner has swapped them for in-memory buffers. Yields a
    stream that still reaches the original stderr, for progress lines.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    stderr_is_fd2 = _fileno(sys.stderr) == 2
    terminal: TextIO = os.fdopen(os.dup(saved_fds[1]), "w", buffering=1) if stderr_is_fd2 else sys.stderr
    with log_file.open("a", encoding="utf-8", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            yield terminal
        finally:
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            if stderr_is_fd2:
                terminal.close()


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def tail(log_file: Path, lines: int = 20) -> list[str]:
    """The last non-empty lines of a log file."""
    if not log_file.is_file():
        return []
    text = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line for line in text if line.strip()][-lines:]
