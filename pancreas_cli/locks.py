"""Advisory locks, so that two pancseg commands cannot change the same project or output at once.

Every stage holds its project shared; prepare, clean and preprocess turn that into an exclusive
hold (:func:`writing`) only when they are about to change something, so up-to-date stages (two
``pancseg run`` on two GPUs) pass each other. train also holds each fold it trains, and predict its
output folder (by a digest of its path, in the user's temporary folder: a lock file inside the
folder would be written into a user's folder before predict has checked it). Locks are ``flock``
locks, which the system drops when the process ends; forked children (nnU-Net's data-loader
workers) close them at once, so a killed command leaves no lock behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pancreas_cli.exceptions import PancsegError

LOCK_DIR = ".locks"
PROJECT = "project"

F = TypeVar("F", bound=Callable[..., Any])


class BusyError(PancsegError):
    """Another pancseg command is changing the same project, fold or output folder."""


@dataclass
class _Held:
    fd: int
    what: str
    shared: bool


_held: dict[Path, _Held] = {}  # by lock file: a stage inside another (pancseg run) holds it once


def _close_in_child() -> None:
    for held in _held.values():
        os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holders(lock_file: Path) -> list[str]:
    """Who else holds ``lock_file``, from the notes its living holders left beside it (the notes of
    killed holders are removed)."""
    found = []
    for note in sorted(lock_file.parent.glob(f"{lock_file.stem}.*.holder")):
        pid = note.name.split(".")[-2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if _alive(int(pid)):
            found.append(note.read_text(encoding="utf-8").strip())
        else:  # its process was killed before it could remove it (kept on read-only storage)
            with contextlib.suppress(OSError):
                note.unlink(missing_ok=True)
    return found


def _flock(held: _Held, lock_file: Path, *, shared: bool) -> None:
    import fcntl

    try:
        fcntl.flock(held.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = ", ".join(_holders(lock_file)) or "another pancseg command"
        raise BusyError(f"{held.what} is in use by {holders}; wait until it ends, or stop it") from None
    except OSError:
        return  # a file system without locks (some network and FUSE mounts): the command runs unguarded
    held.shared = shared


@contextmanager
def hold(folder: Path, name: str, what: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock ``name`` kept in ``folder`` while the block runs; BusyError naming the holders."""
    if sys.platform == "win32":  # no flock: commands are not guarded against each other there
        yield
        return
    lock_file = folder / f"{name}.lock"
    held = _held.get(lock_file)
    if held is not None:  # already ours (a fold named twice): held until the outer block ends
        if held.shared and not shared:
            _flock(held, lock_file, shared=False)
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    held = _Held(os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644), what, shared)
    note = folder / f"{name}.{os.getpid()}.holder"
    try:
        _flock(held, lock_file, shared=shared)
        _holders(lock_file)  # clears notes that killed commands left
        note.write_text(f"pid {os.getpid()} (`pancseg {' '.join(sys.argv[1:])}`)\n", encoding="utf-8")
        _held[lock_file] = held
        yield
    finally:
        _held.pop(lock_file, None)
        note.unlink(missing_ok=True)
        os.close(held.fd)


def project(project_dir: Path, *, shared: bool = True) -> Any:
    """The project's lock (shared: several stages may read it; see :func:`writing`)."""
    if shared and not project_dir.is_dir():  # nothing there to guard; the stage says what is missing
        return contextlib.nullcontext()
    return hold(project_dir / LOCK_DIR, PROJECT, f"the project {project_dir}", shared=shared)


def writing(project_dir: Path) -> None:
    """Turn this command's shared hold of the project into an exclusive one, before changing what
    other stages read; BusyError if another command holds it."""
    lock_file = project_dir / LOCK_DIR / f"{PROJECT}.lock"
    held = _held.get(lock_file)
    if held is not None and held.shared:
        _flock(held, lock_file, shared=False)


def fold(project_dir: Path, trainer: str, fold_index: int) -> Any:
    """The lock that ``pancseg train`` holds on a fold while it trains it."""
    return hold(project_dir / LOCK_DIR, _fold_name(trainer, fold_index), f"fold {fold_index} of {trainer}")


def fold_holders(project_dir: Path, trainer: str, fold_index: int) -> list[str]:
    """The commands training this fold now (read from their notes, without touching the lock)."""
    return _holders(project_dir / LOCK_DIR / f"{_fold_name(trainer, fold_index)}.lock")


def _fold_name(trainer: str, fold_index: int) -> str:
    return f"train-{trainer}-fold{fold_index}"


def output_folder(folder: Path) -> Any:
    """The lock of an output folder, wherever it is (so predictions of two projects exclude each other)."""
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    where = Path(tempfile.gettempdir()) / f"pancseg-locks-{getattr(os, 'getuid', lambda: 0)()}"
    return hold(where, f"output-{digest}", f"the output folder {folder}")


def project_stage(*, creates: bool = False) -> Callable[[F], F]:
    """Run the stage ``func(config, ...)`` holding its project (shared until it calls :func:`writing`);
    ``creates``: the stage makes the project folder (prepare), the others expect it."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
            if creates:
                config.project_dir.mkdir(parents=True, exist_ok=True)
            with project(config.project_dir):
                return func(config, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
