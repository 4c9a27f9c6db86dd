"""Parts of a prediction: which cases ``predict --part I/N`` takes, and worker processes for ``--devices``.

The split is by size, so that parts finish together: the cases, largest first (voxels from the image
header; ties by name), each go to the part with the fewest voxels so far (ties: the lowest part),
greedy longest-processing-time scheduling as in nnU-Net's ``-num_parts``. Every part computes the same
split from the same inputs, so N commands started anywhere, each with its own ``--part``, cover every
case exactly once without talking to each other. Parts are numbered from 0, like nnU-Net's
``-part_id`` and SLURM's default array indices.

``predict --devices`` runs one part per device in worker processes (:func:`run_workers`): spawned,
not forked (CUDA cannot be forked), each sending its progress to the parent, which shows one display.
"""

from __future__ import annotations

import math
import multiprocessing
import queue as queues
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pancreas_cli.exceptions import PancsegError, PredictError
from pancreas_cli.signals import sigterm_as_interrupt


@dataclass(frozen=True)
class Part:
    """Part ``index`` (0 to ``total - 1``) of ``total``."""

    index: int
    total: int

    def __post_init__(self) -> None:
        if self.total < 1 or not 0 <= self.index < self.total:
            raise ValueError(f"part {self.index} of {self.total}: parts are numbered 0 to N-1 (as nnU-Net's "
                             "-part_id), e.g. 0/2 and 1/2")

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"

    @classmethod
    def parse(cls, text: str) -> Part:
        """``I/N`` (``0/2``, ``1/2``)."""
        index, slash, total = text.partition("/")
        if not (slash and index.strip().isdigit() and total.strip().isdigit()):
            raise ValueError(f"expected I/N like 0/2 (part I of N, numbered from 0), got {text!r}")
        return cls(int(index), int(total))


def split(sizes: Mapping[str, int], total: int) -> list[list[str]]:
    """The cases (by name, with their sizes) of each of ``total`` parts, balanced by size; each part's
    cases in name order. Deterministic: the same sizes give the same parts on every machine."""
    loads: list[int] = [0] * total
    parts: list[list[str]] = [[] for _ in range(total)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = min(range(total), key=lambda i: (loads[i], i))
        parts[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(p) for p in parts]


def voxels(path: Path) -> int:
    """The number of voxels of the image at ``path``, from its header (0 where it cannot be read: that
    case then fails in its part, with the reason)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 0
    return math.prod(reader.GetSize())


def _worker_main(target: Callable[..., Any], messages: Any, index: int, job: tuple[Any, ...]) -> None:
    """A worker: ``target(send, *job)``, its result or error sent to the parent last. A SIGTERM from the
    parent (it was stopped) stops the target as Ctrl-C does, so what it finished is kept."""
    with sigterm_as_interrupt():
        try:
            result = target(lambda payload: messages.put(("message", index, payload)), *job)
        except PancsegError as exc:
            messages.put(("error", index, str(exc)))
            return
        except KeyboardInterrupt:
            return
        except Exception:  # a bug: the parent shows the whole traceback
            messages.put(("error", index, traceback.format_exc()))
            return
        messages.put(("result", index, result))


def run_workers(target: Callable[..., Any], jobs: list[tuple[Any, ...]], names: list[str],
                on_message: Callable[[int, Any], None]) -> list[Any]:
    """Run ``target(send, *job)`` in one spawned process per job, all at once; what they ``send`` is handed to
    ``on_message(index, payload)`` here as it comes. Returns their results in the order of ``jobs``;
    PredictError naming every worker (``names``) that failed or died, once all have ended. An interrupt
    here stops the workers (SIGTERM: they keep what they finished) before it goes on."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    workers = [context.Process(target=_worker_main, args=(target, messages, i, job), name=f"pancseg-{names[i]}")
               for i, job in enumerate(jobs)]
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for worker in workers:
            worker.start()
        while len(results) + len(errors) < len(workers):
            try:
                kind, index, payload = messages.get(timeout=1.0)
            except queues.Empty:  # a worker sends its last message before it ends: one that ended silently died
                errors.update({i: f"ended with exit code {w.exitcode} (killed?)" for i, w in enumerate(workers)
                               if w.exitcode is not None and i not in results and i not in errors})
                continue
            if kind == "message":
                on_message(index, payload)
            elif kind == "result":
                results[index] = payload
            else:
                errors[index] = payload
    finally:
        _stop(workers)
    if errors:
        raise PredictError("; ".join(f"{names[i]}: {text.strip()}" for i, text in sorted(errors.items())))
    return [results[i] for i in range(len(workers))]


def _stop(workers: list[Any], grace: float = 5.0) -> None:
    """Wait for the workers to end. Those still running after ``grace`` seconds (the parent was stopped,
    and a Ctrl-C, which reaches them too, did not end them) get a SIGTERM: they keep what they finished."""
    for worker in workers:
        worker.join(timeout=grace)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
            worker.join()
