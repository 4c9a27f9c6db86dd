"""Reading nnU-Net checkpoints without running code from them.

A ``.pth`` file is a pickle, and ``torch.load(weights_only=False)``, which nnU-Net uses for
prediction and resuming, calls whatever the file names (``__reduce__`` -> ``os.system``): a model
folder from elsewhere could run code on ``pancseg predict``. Every checkpoint pancseg reads goes
through :func:`read_checkpoint` instead: torch's restricted unpickler, which builds tensors and
plain containers only, plus exactly what nnU-Net 2.8.1 checkpoints hold beyond them (numpy scalars
of the logged losses and Dice values, and their numeric dtypes; trainer and network classes are
stored as names). Anything else is refused, naming the file, unless the user passes
``--trust-model``. Damaged files (empty, cut short, a Git LFS pointer) are named as such.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pancreas_cli.exceptions import CheckpointError, UntrustedCheckpointError

#: Set to "1" by ``pancseg train --trust-model`` for the trainers in nnU-Net's DDP processes.
TRUST_ENV = "PANCSEG_TRUST_MODEL"
#: What nnU-Net's loaders read from a checkpoint (prediction: the first three and the weights).
REQUIRED_KEYS = ("network_weights", "trainer_name", "init_args", "current_epoch")
LFS_POINTER = b"version https://git-lfs"
_NUMERIC = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64")


def allowed_globals() -> list[Any]:
    """The classes and functions beyond torch's own that nnU-Net checkpoints need: numpy scalars
    (``scalar(dtype, raw bytes)``) of numeric dtypes. An object dtype (which could carry arbitrary
    objects) stays refused."""
    import numpy as np
    import torch

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    allowed: list[Any] = [multiarray.scalar, np.dtype, *{type(np.dtype(name)) for name in _NUMERIC}]
    if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6):
        # Checkpoints written with numpy 1.x name the function by its old module.
        allowed.append((multiarray.scalar, "numpy.core.multiarray.scalar"))
    return allowed


def read_checkpoint(path: Path, *, trust: bool = False, map_location: Any = "cpu", mmap: bool = False,
                    required: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, Any]:
    """The checkpoint at ``path``, read safely unless ``trust``; :class:`CheckpointError` naming the
    file when it is damaged or lacks a ``required`` key, :class:`UntrustedCheckpointError` when it
    holds more than nnU-Net checkpoints do. ``mmap``: tensors are mapped, not read (for a field)."""
    mmap = _check_file(path, zip_only=not trust) and mmap  # torch maps only its zip format (trusted: maybe older)
    import torch

    try:
        if trust:
            data = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        else:
            with _safe_globals(torch):
                data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        foreign = None if trust else _foreign_object(str(exc))
        if foreign is not None:
            raise UntrustedCheckpointError(
                f"{path}: refused to load this checkpoint: it holds {foreign}, which nnU-Net checkpoints never "
                "hold, so it may contain code that runs when it is loaded; pass --trust-model only if you trust "
                "where it came from") from None
        raise _damaged(path, exc) from exc
    except (RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError,
            zipfile.BadZipFile) as exc:
        raise _damaged(path, exc) from exc
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise CheckpointError(f"{path}: cannot read this checkpoint: not an nnU-Net checkpoint (no {missing[0]!r})")
    return data


def _check_file(path: Path, *, zip_only: bool) -> bool:
    """Refuse what is not a checkpoint before torch reads it (torch's errors say neither which file
    nor why: an empty file ended a command with a bare ``Aborted!``); whether it is in torch's zip format."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with path.open("rb") as fh:
        head = fh.read(len(LFS_POINTER))
    if not head:
        raise CheckpointError(f"{path}: cannot read this checkpoint: the file is empty (a save or copy cut short)")
    if head == LFS_POINTER:
        raise CheckpointError(f"{path}: cannot read this checkpoint: it is a Git LFS pointer, not the model file; "
                              "run `git lfs pull` in the repository it came from")
    is_zip = zipfile.is_zipfile(path)
    if zip_only and not is_zip:
        raise CheckpointError(f"{path}: cannot read this checkpoint: it is not a PyTorch checkpoint, or it is damaged "
                              "or cut short (no zip directory as torch.save writes)")
    return is_zip


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return CheckpointError(f"{path}: cannot read this checkpoint: damaged or not a PyTorch checkpoint "
                           f"({type(exc).__name__}: {first[:200]})")


def _foreign_object(message: str) -> str | None:
    """What torch's restricted unpickler refused, if it refused an object (not a damaged stream)."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"but got <class '([^']+)'>", message)
    if found:
        return found.group(1)
    if "Unsupported class" in message or "not an allowed global" in message:
        return "a Python object"
    return None


@contextmanager
def _safe_globals(torch: Any) -> Iterator[None]:
    """torch's restricted unpickler, also allowing :func:`allowed_globals` (torch 2.4: for good)."""
    serialization = torch.serialization
    if not hasattr(serialization, "safe_globals"):
        serialization.add_safe_globals(allowed_globals())
        yield
        return
    with serialization.safe_globals(allowed_globals()):
        yield
