"""SIGTERM as an interrupt for pancseg's commands, and the default SIGTERM for the workers they fork.

A scheduler's or Colab's stop (SIGTERM) would otherwise kill a command at once, without the checkpoint
that Ctrl-C saves or any cleanup. Forked workers (nnU-Net's pools and data loaders) must not inherit
that handler: they die on SIGTERM as they would have.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or Colab's stop), delivered as an interrupt so that stages stop as on Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _ours() -> bool:
    return signal.getsignal(signal.SIGTERM) is _raise_terminated


def _mask_sigterm(how: int) -> None:
    if _ours():
        signal.pthread_sigmask(how, {signal.SIGTERM})


def _default_sigterm_in_child() -> None:
    """Forked workers (nnU-Net's pools and data loaders) die on SIGTERM as they would have. Set at the
    fork, with SIGTERM blocked across it, not from a handler: a SIGTERM that reaches a Python handler
    just before the worker blocks on a lock is never acted on, and ``Pool.terminate()`` then waits
    for that worker forever; one arriving during the fork stays pending until the default is back."""
    if _ours():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


if hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):
    os.register_at_fork(before=functools.partial(_mask_sigterm, signal.SIG_BLOCK),
                        after_in_parent=functools.partial(_mask_sigterm, signal.SIG_UNBLOCK),
                        after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` in this process on SIGTERM: the default would kill it at once, without
    the checkpoint that Ctrl-C saves or any cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
