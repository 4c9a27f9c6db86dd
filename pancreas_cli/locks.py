"""Advisory locks, so that two pancseg commands cannot change the same project or output at once.

prepare, clean and preprocess replace what every other stage reads: they hold the project
exclusively. train and predict hold it shared (folds may train side by side on several GPUs, and
predictions may run while another fold trains), plus an exclusive lock on what they write: the
fold, or the output folder. Locks live in ``project_dir/.locks`` (never in a user's folder) and
are ``flock`` locks, which the system drops when the process ends, however it ends.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pancreas_cli.exceptions import PancsegError

LOCK_DIR = ".locks"
PROJECT = "project"

F = TypeVar("F", bound=Callable[..., Any])


class BusyError(PancsegError):
    """Another pancseg command is changing the same project, fold or output folder."""


@contextmanager
def hold(project_dir: Path, name: str, what: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock ``name`` of ``project_dir`` while the block runs; BusyError naming the holder."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock: commands are not guarded against each other there
        yield
        return
    if shared and not project_dir.is_dir():  # nothing there to guard; the stage says what is missing
        yield
        return
    folder = project_dir / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.lock").open("a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another pancseg command"
            raise BusyError(f"{what} is in use by {holder}; wait until it ends, or stop it") from None
        except OSError:  # a file system without locks (some network and FUSE mounts): run unguarded
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} (`pancseg {' '.join(sys.argv[1:])}`)\n")
        fh.flush()
        yield


def project(project_dir: Path, *, shared: bool = False) -> Any:
    return hold(project_dir, PROJECT, f"the project {project_dir}", shared=shared)


def output_folder(project_dir: Path, folder: Path) -> Any:
    """The lock of an output folder, which may lie outside the project (so it is named by a digest)."""
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return hold(project_dir, f"output-{digest}", f"the output folder {folder}")


def exclusive_project(func: F) -> F:
    """Run the stage ``func(config, ...)`` holding its project exclusively."""

    @functools.wraps(func)
    def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
        with project(config.project_dir):
            return func(config, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
