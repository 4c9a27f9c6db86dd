"""nnU-Net's environment and where its worker pools run."""

from __future__ import annotations

import multiprocessing
import os
import threading
from multiprocessing.pool import ThreadPool

import pytest

from pancreas_cli.nnunet_env import nnunet_worker_pools


def _where(_: int) -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def _fail(_: int) -> None:
    raise RuntimeError("worker failed")


def _workers_alive(pool: ThreadPool) -> bool:
    """nnU-Net checks its workers this way while it waits for them."""
    return all(worker.is_alive() for worker in pool._pool)  # type: ignore[attr-defined]


def test_one_process_runs_nnunets_spawn_pools_on_a_thread() -> None:
    spawning = multiprocessing.get_context
    with nnunet_worker_pools(1):
        # nnU-Net's own idiom, as in its fingerprint, preprocessing and validation code.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert isinstance(pool, ThreadPool)
            assert _workers_alive(pool)
            pid, thread = pool.map(_where, [0])[0]
        assert pid == os.getpid() and thread != threading.get_ident()
        assert multiprocessing.get_context("spawn").get_start_method() == "spawn"  # the rest is the real context
        assert multiprocessing.get_context("fork") is spawning("fork")
    assert multiprocessing.get_context is spawning


def test_more_processes_keep_nnunets_pools() -> None:
    spawning = multiprocessing.get_context
    with nnunet_worker_pools(2):
        assert multiprocessing.get_context is spawning


def test_the_real_context_is_back_after_an_error() -> None:
    spawning = multiprocessing.get_context
    with pytest.raises(RuntimeError, match="worker failed"), nnunet_worker_pools(1):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.map(_fail, [0])
    assert multiprocessing.get_context is spawning
