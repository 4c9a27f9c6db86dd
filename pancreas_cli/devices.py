"""The torch device a ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) names here.

One rule for ``train``, ``predict`` and ``doctor``: ``auto`` is the first GPU (CUDA, then Apple MPS); a
named device that is not here is a :class:`~pancreas_cli.exceptions.DeviceError`. What to do without a
GPU is each command's choice (training refuses the CPU unless asked; predict falls back to it).
"""

from __future__ import annotations

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


def ddp_backend(device_type: str) -> str:
    """torch.distributed's backend for DDP processes on ``device_type``: NCCL between GPUs, gloo between
    CPU processes (nnU-Net's own launcher knows only NCCL; gloo lets CI run its DDP path on the CPU)."""
    return "nccl" if device_type == "cuda" else "gloo"


def device_list(text: str) -> list[str]:
    """``cuda:0,cuda:1`` (``--devices``) as a list, each a device setting this machine has; a
    DeviceError naming the first that is not (a device may be named twice: two folds share it)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise DeviceError(f"--devices {text!r} names no device", "; e.g. --devices cuda:0,cuda:1")
    for name in names:
        if name == "auto" or not (name in ("cpu", "mps", "cuda") or name.startswith("cuda:")):
            raise DeviceError(f"--devices: {name!r} is not a device", "; use cpu, cuda, cuda:N or mps")
        training_device(name)
    return names
