"""``pancseg doctor``: is this machine and config ready to train?"""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pancreas_cli.config import load_config
from pancreas_cli.devices import find_device
from pancreas_cli.exceptions import ConfigError, DeviceError

Status = Literal["ok", "warning", "blocking", "info"]
#: Free disk a project needs (raw + preprocessed data, checkpoints, predictions): a full
#: 252-case dataset with ResEnc-M plans, or the tiny smoke preset.
MIN_FREE_DISK_GB = {"default": 10.0, "smoke": 1.0}
MIN_SHM_GB = 1.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def blocking(self) -> list[Check]:
        return [c for c in self.checks if c.status == "blocking"]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.blocking, "checks": [asdict(c) for c in self.checks]}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def pick_device(requested: str) -> tuple[str | None, str]:
    """The torch device that ``requested`` resolves to here (None if unavailable) and a description."""
    import torch

    try:
        device = find_device(requested)
    except DeviceError as exc:
        return None, exc.reason
    if device is None:
        return None, "no GPU found (training needs train.device: cpu, which is slow)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index)
        return f"cuda:{device.index}", f"cuda:{device.index}: {props.name}, {_gb(props.total_memory)}"
    if device.type == "mps":
        return "mps", "Apple MPS"
    return "cpu", f"cpu ({platform.processor() or platform.machine()}); training will be slow"


def check_torchvision(torch_version: str) -> Check:
    """Whether torchvision imports next to this torch.

    nnU-Net finds a trained network's class by importing every architecture of
    dynamic-network-architectures, and some of them import timm and so torchvision: a torchvision
    built for another torch (say the CUDA wheel from PyPI beside a CPU torch) lets training run
    and fails at prediction with "operator torchvision::nms does not exist".
    """
    version = _version("torchvision")
    if version is None:
        return Check("torchvision", "warning",
                     "not installed; nnU-Net's network library imports it through timm")
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # an ABI mismatch raises RuntimeError or OSError, not ImportError
        return Check("torchvision", "blocking",
                     f"torchvision {version} does not load with torch {torch_version} "
                     f"({type(exc).__name__}: {exc}); install both from the same index, e.g. "
                     "pip install --force-reinstall torch torchvision --index-url <torch's index>")
    return Check("torchvision", "ok", version)


def check_predict_backend(chosen: str) -> Check:
    """The chosen ``predict.backend`` is installed (blocking if not); which CPU runtimes are."""
    from pancreas_cli.inference.backends import BACKENDS, missing_packages, missing_text

    installed = [name for name in BACKENDS if name != "torch" and not missing_packages(name)]
    if missing := missing_text(chosen):
        return Check("predict backend", "blocking", missing)
    return Check("predict backend", "ok", f"{chosen}; CPU runtimes installed: "
                 f"{', '.join(installed) or 'none (optional: pancseg[openvino], pancseg[onnxruntime])'}")


def doctor(config_path: Path | None = None, overrides: list[str] | None = None) -> DoctorReport:
    """Collect versions, device, disk and shared memory, and validate the config."""
    report = DoctorReport()
    add = report.checks.append
    add(Check("python", "ok" if sys.version_info >= (3, 10) else "blocking", platform.python_version()))

    config = None
    if config_path is not None:
        try:
            config = load_config(config_path, overrides or [], check_source=True)
            add(Check("config", "ok", f"{config_path} is valid"))
        except ConfigError as exc:
            add(Check("config", "blocking", "; ".join(exc.problems)))

    nnunet = _version("nnunetv2")
    nnunet_ok = nnunet is not None and nnunet.startswith("2.8.")
    add(Check("nnunetv2", "ok" if nnunet_ok else "blocking", nnunet or "not installed (pip install 'nnunetv2>=2.8.1,<2.9')"))
    try:
        import torch
    except ImportError as exc:
        add(Check("torch", "blocking", f"cannot import torch ({exc})"))
        torch = None
    if torch is not None:
        add(Check("torch", "ok", torch.__version__))
        add(check_torchvision(torch.__version__))
        cuda = torch.version.cuda or "none (CPU build)"
        add(Check("cuda", "info", f"CUDA {cuda}; available: {torch.cuda.is_available()}"))
        requested = config.train.device if config else "auto"
        device, detail = pick_device(requested)
        if device is None:
            # Without a config nothing asked for a GPU yet: inform, do not block.
            add(Check("device", "blocking" if config else "warning", f"{requested}: {detail}"))
        else:
            add(Check("device", "ok", f"{requested} -> {detail}"))

    add(check_predict_backend(config.predict.backend if config else "torch"))
    where = _existing_parent(config.project_dir if config else Path.cwd())
    free = shutil.disk_usage(where).free
    preset = config.plan.preset if config else "default"
    need = MIN_FREE_DISK_GB[preset]
    add(Check("disk", "ok" if free / 1024**3 >= need else "blocking",
              f"{_gb(free)} free under {where} (the {preset} preset needs about {need:g} GiB)"))
    shm = Path("/dev/shm")
    if shm.is_dir():
        shm_free = shutil.disk_usage(shm).free
        status: Status = "ok" if shm_free / 1024**3 >= MIN_SHM_GB else "warning"
        add(Check("shared memory", status, f"{_gb(shm_free)} free in /dev/shm (data-loader workers need it)"))
    return report
