"""The torch device a ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) names here.

One rule for ``train``, ``predict`` and ``doctor``: ``auto`` is the first GPU (CUDA, then Apple MPS); a
named device that is not here is a :class:`~pancreas_cli.exceptions.DeviceError`. What to do without a
GPU is each command's choice (training refuses the CPU unless asked; predict falls back to it).
``predict --devices`` lists devices, one worker process each (:func:`device_list`).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from pancreas_cli.exceptions import DeviceError

if TYPE_CHECKING:
    import torch


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def find_device(requested: str) -> torch.device | None:
    """The device ``requested`` names here; for ``auto`` the first GPU, or None when there is none."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else None
    if requested.startswith("cuda"):
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceError(f"{requested} requested but {count} CUDA device(s) are available",
                              "; see `pancseg doctor`")
        return torch.device("cuda", index)
    if requested == "mps":
        if not _mps_available():
            raise DeviceError("mps requested but not available on this machine")
        return torch.device("mps")
    return torch.device("cpu")


def training_device(requested: str) -> torch.device:
    """:func:`find_device` for training: ``auto`` without a GPU is an error (the CPU is for smoke runs)."""
    device = find_device(requested)
    if device is None:
        raise DeviceError("no GPU found; training on the CPU is very slow: pass --device cpu to do it anyway")
    return device


def cpu_share(processes: int) -> int:
    """Torch threads for each of ``processes`` CPU processes on this machine (at least 1): processes
    that each use every core slow each other down."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def ddp_backend(device_type: str) -> str:
    """torch.distributed's backend for DDP processes on ``device_type``: NCCL between GPUs, gloo between
    CPU processes (nnU-Net's own launcher knows only NCCL; gloo lets CI run its DDP path on the CPU)."""
    return "nccl" if device_type == "cuda" else "gloo"


def device_list(devices: str | None, num_gpus: int | None = None) -> list[str] | None:
    """The devices of ``--devices cuda:0,cuda:1`` (a device may repeat: two processes share a GPU) or
    ``--num-gpus N`` (``cuda:0`` to ``cuda:N-1``), each checked here; None when neither is given."""
    if devices is not None and num_gpus is not None:
        raise DeviceError("--devices and --num-gpus both name the devices", ": give one of them")
    if num_gpus is not None:
        if num_gpus < 1:
            raise DeviceError(f"--num-gpus {num_gpus}: give 1 or more")
        names = [f"cuda:{i}" for i in range(num_gpus)]
    elif devices is not None:
        names = [name.strip() for name in devices.split(",")]
    else:
        return None
    for name in names:
        if name not in ("cpu", "mps", "cuda") and not re.fullmatch(r"cuda:\d+", name):
            raise DeviceError(f"--devices {devices}: {name!r} is not a device",
                              ": list cpu, mps, cuda or cuda:N, separated by commas (auto is not one)")
        find_device(name)  # DeviceError if it is not here
    return names
