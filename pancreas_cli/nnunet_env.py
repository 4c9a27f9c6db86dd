"""The one place that tells nnU-Net where its folders are and how many processes to use.

nnU-Net reads ``nnUNet_def_n_proc`` once, when ``nnunetv2`` is first imported, so this must run
before any nnU-Net import. Every stage calls it first; users never set these variables by hand.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

from pancreas_cli.config import Config

#: The folder to put in ``nnUNet_extTrainer`` so that nnU-Net's own commands find pancseg's trainers.
TRAINER_DIR = Path(__file__).with_name("nnunet_ext")


def nnunet_environment(config: Config, *, device_type: str | None = None) -> dict[str, str]:
    """The environment variables nnU-Net needs for ``config``.

    ``device_type`` ("cpu", "cuda", "mps") picks the data-augmentation worker default: CPU runs and the
    smoke preset use none (workers would compete with the network for the few cores).
    """
    if config.train.da_workers is not None:
        da_workers = config.train.da_workers
    elif config.plan.preset == "smoke" or device_type in ("cpu", "mps"):
        da_workers = 0
    else:
        da_workers = min(12, os.cpu_count() or 1)
    wandb = config.train.wandb
    return {
        "nnUNet_raw": str(config.raw_dir),
        "nnUNet_preprocessed": str(config.preprocessed_dir),
        "nnUNet_results": str(config.results_dir),
        "nnUNet_def_n_proc": str(config.plan.num_processes),
        "nnUNet_n_proc_DA": str(da_workers),
        "nnUNet_compile": "true" if config.train.compile else "false",
        "nnUNet_extTrainer": os.pathsep.join(dict.fromkeys([str(TRAINER_DIR), *_user_ext_trainers()])),
        "nnUNet_wandb_enabled": "1" if wandb.enabled else "0",
        "nnUNet_wandb_project": wandb.project,
        "nnUNet_wandb_mode": wandb.mode,
    }


def _user_ext_trainers() -> list[str]:
    """Trainer folders the user already gave nnU-Net (kept after pancseg's own)."""
    return [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != str(TRAINER_DIR)]


def setup_nnunet_env(config: Config, *, device_type: str | None = None, create: bool = True) -> dict[str, str]:
    """Export :func:`nnunet_environment` into ``os.environ`` and create the three folders (unless not
    ``create``: a prediction with a model from elsewhere leaves no project behind)."""
    env = nnunet_environment(config, device_type=device_type)
    os.environ.update(env)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if create else ():
        os.makedirs(env[key], exist_ok=True)
    return env


@contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """Set one variable for a single nnU-Net call that reads it, then put back what was there."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class _ThreadPoolContext:
    """A multiprocessing context whose ``Pool`` runs on threads; everything else is ``context``'s."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def Pool(self, processes: int | None = None, *args: Any, **kwargs: Any) -> ThreadPool:
        return ThreadPool(processes, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


@contextmanager
def nnunet_worker_pools(num_processes: int) -> Iterator[None]:
    """With ``num_processes`` 1, nnU-Net's worker pools run on a thread of this process.

    nnU-Net starts each pool (fingerprint, integrity check, preprocessing, validation export and its
    metrics) as freshly spawned interpreters that import torch and nnU-Net again: about 10 s per pool
    on two cores. One such worker runs nothing in parallel that a thread could not, so its start-up is
    pure cost (preprocessing the demo's cases: 29 s with it, 16 s on a thread; BENCHMARKS.md). With more processes the
    pools stay nnU-Net's own.
    """
    if num_processes != 1:
        yield
        return
    spawning = multiprocessing.get_context

    def get_context(method: str | None = None) -> Any:
        context = spawning(method)
        return _ThreadPoolContext(context) if method == "spawn" else context

    multiprocessing.get_context = get_context  # type: ignore[assignment]
    try:
        yield
    finally:
        multiprocessing.get_context = spawning  # type: ignore[assignment]
