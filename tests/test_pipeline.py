"""pancreas_cli.inference.pipeline: cases overlapped across threads, results in order, nothing half-written."""

from __future__ import annotations

import threading
import time

import pytest

from pancreas_cli.inference.pipeline import Finished, run_overlapped


def test_results_in_order_and_stages_overlap() -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def log(stage: str, item: int) -> None:
        with lock:
            events.append((stage, item))

    def read(item: int) -> int:
        time.sleep(0.01)
        log("read", item)
        return item * 10

    def compute(item: int, value: int) -> int:
        time.sleep(0.05)
        log("computed", item)
        return value + 1

    def write(item: int, value: int) -> str:
        time.sleep(0.03 * (item % 2))  # an odd item's write is slower: results must still come in order
        log("written", item)
        return f"{item}:{value}"

    results = list(run_overlapped(list(range(6)), read, compute, write))
    assert results == [f"{i}:{i * 10 + 1}" for i in range(6)]
    assert events.index(("read", 1)) < events.index(("computed", 0))  # read while case 0 was on the network
    assert events.index(("written", 0)) < events.index(("computed", 1))  # written while case 1 was


def test_a_finished_case_skips_the_later_stages() -> None:
    computed, written = [], []

    def read(item: int) -> object:
        return Finished(f"{item} failed to read") if item == 1 else item

    def compute(item: int, value: int) -> object:
        computed.append(item)
        return Finished(f"{item} failed on the network") if item == 2 else value

    def write(item: int, value: int) -> str:
        written.append(item)
        return f"{item} ok"

    assert list(run_overlapped([0, 1, 2, 3], read, compute, write)) == [
        "0 ok", "1 failed to read", "2 failed on the network", "3 ok"]
    assert computed == [0, 2, 3] and written == [0, 3]


def test_interrupt_lets_the_write_in_progress_finish() -> None:
    """Ctrl-C on the network of case 1: case 0's write, already running, completes; nothing more starts."""
    writing = threading.Event()
    written: list[int] = []
    read_items: list[int] = []

    def read(item: int) -> int:
        read_items.append(item)
        return item

    def compute(item: int, value: int) -> int:
        if item == 1:
            assert writing.wait(5)
            raise KeyboardInterrupt
        return value

    def write(item: int, value: int) -> int:
        writing.set()
        time.sleep(0.2)
        written.append(item)
        return item

    with pytest.raises(KeyboardInterrupt):
        list(run_overlapped(list(range(10)), read, compute, write))
    assert written == [0]
    assert read_items[:2] == [0, 1] and len(read_items) <= 3  # nothing read beyond one case ahead


def test_bounded_reads_ahead() -> None:
    started: list[int] = []

    def read(item: int) -> int:
        started.append(item)
        return item

    gate = threading.Event()

    def compute(item: int, value: int) -> int:
        if item == 0:
            time.sleep(0.1)
            assert max(started) <= 1  # one case read ahead while case 0 is on the network
            gate.set()
        return value

    assert list(run_overlapped(list(range(5)), read, compute, lambda item, value: value)) == list(range(5))
    assert gate.is_set()


def test_two_readers_read_two_cases_at_once_results_still_in_order() -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def read(item: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return item

    results = list(run_overlapped(list(range(6)), read, lambda item, value: value, lambda item, value: value, ahead=2))
    assert results == list(range(6)) and peak[0] == 2
