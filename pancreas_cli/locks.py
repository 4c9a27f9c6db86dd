"""Advisory locks, so that two pancseg commands cannot change the same project or output at once.

Every stage holds its project shared; prepare, clean and preprocess turn that into an exclusive
hold (:func:`writing`) only when they are about to change something, so up-to-date stages (two
``pancseg run`` on two GPUs) pass each other. train also holds each fold it trains, and predict its
output folder (:func:`output_folder`). Locks are ``flock`` locks, which the system drops when the
process ends; forked children (nnU-Net's data-loader workers) close them at once, so a killed
command leaves no lock behind.

Every lock lives on the file system of what it guards (not in a temporary folder, which differs
between cluster jobs), and each holder leaves a note with its host, pid and command. Some network
file systems keep ``flock`` locks per machine: a note of another machine's holder that conflicts
is therefore refused as well, and reported, never removed (its process cannot be seen from here).

By default a busy lock fails at once (:class:`BusyError`); :func:`wait_for_locks` (``--wait``,
``locks.wait``) makes every lock this process takes wait for its holders instead, saying once on
stderr whom it waits for, and fail only after ``locks.wait_seconds``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pancreas_cli import writers
from pancreas_cli.exceptions import BusyError

LOCK_DIR = ".locks"
OUTPUT_LOCK_DIR = ".pancseg-locks"  # beside an output folder
PROJECT = "project"
HOST = writers.HOST
POLL_SECONDS = 0.5  # how often a waiting command tries the lock again

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Held:
    fd: int
    what: str
    shared: bool
    note: Path


@dataclass(frozen=True)
class _Note:
    """Another holder of a lock, as its note says."""

    path: Path
    pid: int
    host: str
    shared: bool
    command: str

    @property
    def here(self) -> bool:
        return self.host == HOST

    def describe(self, *, host: bool = False) -> str:
        """``pid N (`command`)``, with the host when it is another machine's (or ``host``)."""
        return f"pid {self.pid}{f' on host {self.host}' if host or not self.here else ''} (`{self.command}`)"


@dataclass
class _Waiting:
    """Whether and how long a busy lock is waited for (see :func:`wait_for_locks`)."""

    enabled: bool = False
    seconds: float | None = None  # None: as long as it takes


_waiting = _Waiting()


_held: dict[Path, _Held] = {}  # by lock file: a stage inside another (pancseg run) holds it once


def _close_in_child() -> None:
    for held in _held.values():
        os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _note_path(lock_file: Path) -> Path:
    return lock_file.with_name(f"{lock_file.name}.{writers.tag()}.holder")


def _write_note(held: _Held) -> None:
    from pancreas_cli.imageio import write_text

    write_text(json.dumps({"pid": os.getpid(), "host": HOST, "shared": held.shared,
                           "command": f"pancseg {' '.join(sys.argv[1:])}"}), held.note)


def _read_note(path: Path) -> _Note | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _Note(path, int(data["pid"]), str(data["host"]), bool(data["shared"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # removed meanwhile, or not a note pancseg wrote


def _notes(lock_file: Path) -> list[_Note]:
    """The other holders of ``lock_file``, from the notes they left beside it. Notes of this machine's
    killed holders are removed (and notes they were writing); another machine's are kept (its
    processes cannot be seen)."""
    from pancreas_cli.imageio import sweep_dead_partials

    sweep_dead_partials(lock_file.parent)
    found = []
    for path in sorted(lock_file.parent.glob(f"{glob.escape(lock_file.name)}.*.holder")):
        note = _read_note(path)
        if note is None or (note.here and note.pid == os.getpid()):
            continue
        if note.here and not writers.alive(note.pid):  # killed before it could remove it (kept on read-only storage)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            continue
        found.append(note)
    return found


def _holders(lock_file: Path) -> list[str]:
    """Who else holds ``lock_file`` (host, pid and command)."""
    return [note.describe() for note in _notes(lock_file)]


def _away_hint(notes: list[_Note]) -> str:
    away = [note for note in notes if not note.here]
    return (f" (pancseg cannot see processes on {away[0].host}: if that command has ended, delete {away[0].path})"
            if away else "")


def _holders_text(notes: list[_Note], *, host: bool = False) -> str:
    return ", ".join(note.describe(host=host) for note in notes) or "another pancseg command"


def _busy(what: str, notes: list[_Note]) -> BusyError:
    hint = _away_hint(notes)
    return BusyError(f"{what} is in use by {_holders_text(notes)}; wait until it ends, or stop it{hint} "
                     "(--wait waits for it)")


def wait_for_locks(enabled: bool, seconds: float | None = None) -> None:
    """Make the locks this process takes from now on wait for a busy holder (``enabled``), for at most
    ``seconds`` (None: as long as it takes), instead of failing at once. Jobs of a scheduler that start
    together (a SLURM array running ``pancseg run``) then take turns instead of failing "busy"."""
    _waiting.enabled, _waiting.seconds = enabled, seconds


def _try_flock(held: _Held, lock_file: Path, *, shared: bool) -> list[_Note] | None:
    """Take the lock if no one else holds it in a conflicting way; else the conflicting holders (an
    empty list when flock refused and they left no note yet), holding nothing new."""
    import fcntl

    locked = True
    try:
        fcntl.flock(held.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return _notes(lock_file)
    except OSError:
        locked = False  # a file system without locks (some network and FUSE mounts): only the notes guard it
    # Where flock is per machine, another machine's holder shows only by its note.
    conflicts = [note for note in _notes(lock_file)
                 if (not note.here or not locked) and not (shared and note.shared)]
    if conflicts:
        if locked:  # not held while another machine's holder is waited for
            fcntl.flock(held.fd, fcntl.LOCK_UN)
        return conflicts
    return None


def _flock(held: _Held, lock_file: Path, *, shared: bool) -> bool:
    """Take the lock, waiting for its holders if :func:`wait_for_locks` says so; True when it had to
    wait (what the caller decided before may be out of date); BusyError naming the holders."""
    conflicts = _try_flock(held, lock_file, shared=shared)
    if conflicts is None:
        held.shared = shared
        return False
    if not _waiting.enabled:
        raise _busy(held.what, conflicts)
    began = time.monotonic()
    limit = "" if _waiting.seconds is None else f" (at most {_waiting.seconds:g} s)"
    print(f"pancseg: waiting for {held.what}{limit}: in use by {_holders_text(conflicts, host=True)}"
          f"{_away_hint(conflicts)}", file=sys.stderr, flush=True)
    while (conflicts := _try_flock(held, lock_file, shared=shared)) is not None:
        waited = time.monotonic() - began
        if _waiting.seconds is not None and waited >= _waiting.seconds:
            raise BusyError(f"{held.what} is still in use by {_holders_text(conflicts, host=True)} after waiting "
                            f"{_waiting.seconds:g} s (locks.wait_seconds); try again later, or stop that command"
                            f"{_away_hint(conflicts)}")
        time.sleep(POLL_SECONDS)
    held.shared = shared
    return True


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
            _write_note(held)
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    held = _Held(os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644), what, shared, _note_path(lock_file))
    try:
        _flock(held, lock_file, shared=shared)
        _write_note(held)
        _held[lock_file] = held
        yield
    finally:
        _held.pop(lock_file, None)
        held.note.unlink(missing_ok=True)
        os.close(held.fd)


def project(project_dir: Path, *, shared: bool = True) -> Any:
    """The project's lock (shared: several stages may read it; see :func:`writing`)."""
    if shared and not project_dir.is_dir():  # nothing there to guard; the stage says what is missing
        return contextlib.nullcontext()
    return hold(project_dir / LOCK_DIR, PROJECT, f"the project {project_dir}", shared=shared)


class _Waited(Exception):  # noqa: N818 - not an error: the stage decides again
    """:func:`writing` had to wait: another command may have changed the project meanwhile."""


def writing(project_dir: Path) -> None:
    """Turn this command's shared hold of the project into an exclusive one, before changing what
    other stages read; BusyError if another command holds it. A stage under :func:`project_stage`
    that had to wait runs again from the start, now exclusive (the other command may have done the
    work it was about to do)."""
    lock_file = project_dir / LOCK_DIR / f"{PROJECT}.lock"
    held = _held.get(lock_file)
    if held is not None and held.shared:
        waited = _flock(held, lock_file, shared=False)
        _write_note(held)  # now exclusive: another machine's holders must see it
        if waited:
            raise _Waited()


def fold(project_dir: Path, trainer: str, fold_index: int) -> Any:
    """The lock that ``pancseg train`` holds on a fold while it trains it."""
    return hold(project_dir / LOCK_DIR, _fold_name(trainer, fold_index), f"fold {fold_index} of {trainer}")


def fold_holders(project_dir: Path, trainer: str, fold_index: int) -> list[str]:
    """The commands training this fold now (read from their notes, without touching the lock)."""
    return _holders(project_dir / LOCK_DIR / f"{_fold_name(trainer, fold_index)}.lock")


def _fold_name(trainer: str, fold_index: int) -> str:
    return f"train-{trainer}-fold{fold_index}"


def output_folder(folder: Path) -> Any:
    """The lock of an output folder, whatever project predicts into it. It is kept in
    ``.pancseg-locks`` beside the folder, on the folder's own file system: one in the temporary folder
    was not seen by a job on another node or with another TMPDIR, which then predicted into the same
    folder. Inside the folder only where its parent cannot be written (a container's mount point).
    predict takes it after its checks of the folder passed, so a refused predict leaves nothing there."""
    where, name = _output_place(folder)
    return hold(where, name, f"the output folder {folder}")


def _output_place(folder: Path) -> tuple[Path, str]:
    """The folder holding an output folder's locks (see :func:`output_folder`), and their name."""
    real = folder.resolve()
    where = real.parent / OUTPUT_LOCK_DIR
    if real.is_dir() and not os.access(real.parent, os.W_OK) and not where.is_dir():
        where = real / OUTPUT_LOCK_DIR
    return where, real.name or "root"


@contextmanager
def output_part(folder: Path, prediction: str, when_alone: Callable[[], None]) -> Iterator[None]:
    """The output folder's lock for one part of a prediction (``predict --part``): held shared, so that
    the other parts of the same ``prediction`` (a key of its model, settings, input and number of parts)
    write into the folder at the same time, while a predict without parts (:func:`output_folder`) or a
    part of another prediction is refused, naming the holders. Parts join one at a time; one that finds
    the folder free runs ``when_alone`` (sweeping what killed runs left) before the next may join."""
    if sys.platform == "win32":  # no flock: not guarded, and nothing swept (another part may own it)
        yield
        return
    where, name = _output_place(folder)
    lock_file = where / f"{name}.lock"
    key_file = lock_file.with_name(f"{lock_file.name}.prediction")  # no folder's lock has this name
    what = f"the output folder {folder}"
    with contextlib.ExitStack() as stack:
        with _moment(lock_file.with_name(f"{lock_file.name}.join")):
            alone = _free(lock_file)
            stack.enter_context(hold(where, name, what, shared=True))
            if alone:
                from pancreas_cli.imageio import write_text

                write_text(prediction, key_file)
                when_alone()
            elif not key_file.is_file() or key_file.read_text(encoding="utf-8") != prediction:
                raise _busy(f"{what} (by parts of another prediction: another model, settings, input or "
                            "number of parts)", _notes(lock_file))
        yield


def output_moment(folder: Path, purpose: str) -> Any:
    """An exclusive lock of an output folder for a moment, waited for (its holders keep it for
    milliseconds): the parts of a prediction rebuild its CSVs one at a time (``purpose`` "csv")."""
    where, name = _output_place(folder)
    return _moment(where / f"{name}.lock.{purpose}")


@contextmanager
def _moment(lock_file: Path) -> Iterator[None]:
    """Hold ``lock_file`` exclusively, waiting for it: only for locks that are held for moments."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: unguarded, as in _flock
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free(lock_file: Path) -> bool:
    """Whether no command holds ``lock_file`` (by its flock, and by the notes of other machines)."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass  # no locks there: only the notes tell
    finally:
        os.close(fd)
    return not _notes(lock_file)


def project_stage(*, creates: bool = False) -> Callable[[F], F]:
    """Run the stage ``func(config, ...)`` holding its project (shared until it calls :func:`writing`);
    ``creates``: the stage makes the project folder (prepare), the others expect it."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
            if creates:
                config.project_dir.mkdir(parents=True, exist_ok=True)
            with project(config.project_dir):
                try:
                    return func(config, *args, **kwargs)
                except _Waited:  # now exclusive: decide again what is up to date
                    return func(config, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
