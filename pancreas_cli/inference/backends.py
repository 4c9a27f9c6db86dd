"""Optional inference runtimes for the window's network passes on a CPU: ONNX Runtime and OpenVINO.

On the CPU both run the window's passes faster than torch, OpenVINO by more (``predict_speed.py
--backends``; numbers in BENCHMARKS.md), so ``predict.backend`` may choose one. Neither is a dependency (``pip install
"pancseg[onnxruntime]"`` or ``"pancseg[openvino]"``). The encoder and segmentation decoder are
exported to ONNX once per fold's weights, in a temporary folder removed once the runtime has loaded
them; the subtype head stays in torch, on the encoder features the runtime returns (its adaptive
pooling has an input-dependent size, which ONNX export refuses). Float32 throughout, as torch on a CPU.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pancreas_cli.exceptions import PredictError

if TYPE_CHECKING:  # torch is imported where a runtime is built: predict's module stays importable without it
    import torch

#: The values of ``predict.backend``, and the packages each needs besides pancseg's own.
BACKENDS: dict[str, tuple[str, ...]] = {"torch": (), "onnxruntime": ("onnxruntime", "onnx"),
                                        "openvino": ("openvino", "onnx")}


def missing_packages(backend: str) -> list[str]:
    """The packages ``backend`` needs that are not installed."""
    return [name for name in BACKENDS[backend] if importlib.util.find_spec(name) is None]


def missing_text(backend: str) -> str | None:
    """What ``backend`` lacks and the command that installs it; None when it is installed."""
    missing = missing_packages(backend)
    return (f"predict.backend: {backend} needs {' and '.join(missing)}, not installed here: "
            f"`pip install \"pancseg[{backend}]\"`") if missing else None


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse a runtime that would run on another device than the CPU, or that is not installed."""
    if backend != "torch" and device.type != "cpu":
        raise PredictError(f"predict.backend: {backend} runs on the CPU, but predict.device is {device}; set "
                           "predict.device: cpu, or predict.backend: torch (on a GPU torch is the fast one)")
    if missing := missing_text(backend):
        raise PredictError(f"{missing}, or set predict.backend: torch")


def _exported(network: torch.nn.Module, skips: tuple[int, ...]) -> torch.nn.Module:
    """Encoder and segmentation decoder as one module: the segmentation logits, then the encoder
    features of stages ``skips``."""
    import torch

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = network.encoder, network.decoder

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.encoder(x)
            seg = self.decoder(features)
            return (seg[0] if isinstance(seg, (list, tuple)) else seg, *(features[i] for i in skips))

    return Exported().eval()


def _tracing_shape(network: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The smallest input the exporter can trace ``network`` with, for a batch of ``shape``.

    Tracing runs the network once: on a whole batch of ResEnc-M tiles with constant folding the
    export took 37.8 s on 2 cores, on one tile without folding 15.7 s, on this (one tile, twice the
    encoder's total stride per axis, spatial axes left free) 4.8 s. Instance norm needs more than
    one voxel in the deepest stage, hence twice the stride.
    """
    strides = getattr(network.encoder, "strides", None)
    if strides is None:  # not one of nnU-Net's encoders: trace a whole tile
        return (1, *shape[1:])
    spatial = [min(size, 2 * math.prod(s[axis] for s in strides)) for axis, size in enumerate(shape[2:])]
    return (1, shape[1], *spatial)


def _export(module: torch.nn.Module, names: list[str], shape: tuple[int, ...], path: Path) -> None:
    """``module`` to ONNX at ``path``, traced on zeros of ``shape``, every axis but the channels free."""
    import torch

    free = {name: {0: "batch", **{axis: f"{name}_{axis}" for axis in range(2, len(shape))}} for name in ["x", *names]}
    # The exporter's warnings (e.g. that instance norm uses the input's statistics, as it must) are
    # about its own choices, not the user's data or settings.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():  # plain tensors to trace
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(shape),), str(path), input_names=["x"], output_names=names,
                          dynamic_axes=free, opset_version=17, dynamo=False, do_constant_folding=False)


class RuntimeNetwork:
    """``network``'s current weights in ``backend``: called with a batch of tiles, returns the
    segmentation logits and the encoder features of stages ``skips`` (torch tensors, float32)."""

    def __init__(self, backend: str, network: torch.nn.Module, skips: tuple[int, ...], example: torch.Tensor,
                 threads: int) -> None:
        self.backend = backend
        names = ["seg", *(f"skip{i}" for i in skips)]
        with tempfile.TemporaryDirectory(prefix="pancseg-onnx-") as folder:
            path = Path(folder) / "network.onnx"
            _export(_exported(network, skips), names, _tracing_shape(network, example.shape), path)
            tile = tuple(example.shape[1:])
            self._run = _onnxruntime(path, threads) if backend == "onnxruntime" else _openvino(path, threads, tile)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        import torch

        outputs = self._run(np.ascontiguousarray(x.float().cpu().numpy()))
        seg, *skips = (torch.from_numpy(np.asarray(o)) for o in outputs)
        return seg, skips


def _onnxruntime(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # torch's work comes between calls
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _openvino(path: Path, threads: int, tile: tuple[int, ...]) -> Any:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0]: ov.PartialShape([-1, *tile])})  # static tiles: the CPU plugin's fast path
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: x})
        return [np.array(result[output]) for output in compiled.outputs]  # copies: the request reuses its buffers
    return run
