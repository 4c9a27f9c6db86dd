"""Cases through three stages at once: the next one is read while this one is on the network and
the previous one is written.

Reading and preprocessing (files, NumPy, SimpleITK) and writing (compression, file system) wait on
the disk or run in C without the GIL, so threads overlap them with the network, which keeps
the main thread. Memory stays bounded: while a case is on the network, at most ``ahead`` later ones
are read, and at most two earlier ones wait for or are in the writer. Results come back in input
order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Finished(Generic[Result]):
    """Returned by a stage when the case needs no later stage (it failed, say)."""

    result: Result


def run_overlapped(items: list[Item], read: Callable[[Item], Any], compute: Callable[[Item, Any], Any],
                   write: Callable[[Item, Any], Result], ahead: int = 1) -> Iterator[Result]:
    """Yields each item's result in order, the stages of neighbouring items overlapping.

    ``read(item)`` runs on ``ahead`` reader threads (the next ``ahead`` items are read at once: on a GPU
    the network may take less time per case than one thread's reading), ``compute(item, read's value)``
    here, ``write(item, compute's value)`` on a writer thread; a stage that returns :class:`Finished`
    ends its case.
    On an exception here (Ctrl-C, SIGTERM), reads not yet started are cancelled and the write in
    progress finishes, so no case is left half-written.
    """
    with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="pancseg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="pancseg-write") as writer:
        reads: deque[Future[Any]] = deque(reader.submit(read, item) for item in items[:ahead])
        writes: deque[Future[Result] | Finished[Result]] = deque()
        try:
            for index, item in enumerate(items):
                if index + ahead < len(items):
                    reads.append(reader.submit(read, items[index + ahead]))
                value = reads.popleft().result()
                if not isinstance(value, Finished):
                    value = compute(item, value)
                writes.append(value if isinstance(value, Finished) else writer.submit(write, item, value))
                while writes and (len(writes) > 2 or _ready(writes[0])):
                    yield _result(writes.popleft())
            while writes:
                yield _result(writes.popleft())
        finally:
            for future in reads:
                future.cancel()


def _ready(entry: Future[Any] | Finished[Any]) -> bool:
    return isinstance(entry, Finished) or entry.done()


def _result(entry: Future[Result] | Finished[Result]) -> Result:
    return entry.result if isinstance(entry, Finished) else entry.result()
