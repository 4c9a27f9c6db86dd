"""The one place that tells nnU-Net where its folders are and how many processes to use.

nnU-Net reads ``nnUNet_def_n_proc`` once, when ``nnunetv2`` is first imported, so this must run
before any nnU-Net import. Every stage calls it first; users never set these variables by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def setup_nnunet_env(config: Config, *, device_type: str | None = None) -> dict[str, str]:
    """Export :func:`nnunet_environment` into ``os.environ`` and create the three folders."""
    env = nnunet_environment(config, device_type=device_type)
    os.environ.update(env)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
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
