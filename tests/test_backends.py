"""Inference runtimes for predict's window on a CPU (ONNX Runtime, OpenVINO): the same logits, features
and masks as torch, and clear refusals when one is missing or asked to run elsewhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from pancreas_cli.cli import app
from pancreas_cli.config import PredictConfig
from pancreas_cli.exceptions import PredictError
from pancreas_cli.inference import backends
from pancreas_cli.inference.backends import RuntimeNetwork, check_backend

RUNTIMES = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None,
                                                       reason=f"{name} is not installed (pancseg[{name}])"))
            for name in ("onnxruntime", "openvino")]


def _network(strides: tuple | list = (1, 2, 2)) -> torch.nn.Module:
    """A small residual-encoder U-Net as nnU-Net's plans build it (random weights)."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    torch.manual_seed(0)
    return ResidualEncoderUNet(
        input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d, kernel_sizes=3,
        strides=strides, n_blocks_per_stage=[1, 1, 1], num_classes=3, n_conv_per_stage_decoder=[1, 1],
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()


@pytest.mark.parametrize("backend", RUNTIMES)
@pytest.mark.parametrize(("strides", "traced"), [([1, 2, 2], (8, 8, 8)),
                                                 ([[1, 1, 1], [1, 2, 2], [2, 2, 2]], (4, 8, 8))])
def test_a_runtime_gives_torchs_logits_and_features(backend: str, strides: list, traced: tuple) -> None:
    """Exported from a trace on a smaller input than a tile (ResEnc-M's export: 4.8 s, not 15.7 s),
    with anisotropic strides as in nnU-Net's plans too, the runtime gives torch's answer on tiles."""
    network = _network(strides)
    x = torch.randn(3, 1, 16, 32, 32)
    assert backends._tracing_shape(network, x[:2].shape) == (1, 1, *traced)
    with torch.inference_mode():  # as the window calls it
        runtime = RuntimeNetwork(backend, network, (1, 2), x[:2], threads=1)
        seg, skips = runtime(x)  # another batch size than the one exported with
        features = network.encoder(x)
        expected = network.decoder(features)
    assert seg.shape == expected.shape and seg.dtype == torch.float32
    assert torch.allclose(seg, expected, atol=1e-3)
    assert (seg.argmax(1) != expected.argmax(1)).float().mean() < 1e-3
    assert [s.shape for s in skips] == [features[1].shape, features[2].shape]
    assert all(torch.allclose(s, f, atol=1e-3) for s, f in zip(skips, (features[1], features[2])))


def test_tracing_shapes() -> None:
    """Twice the total stride per axis, at most the tile; a whole tile for an encoder without strides."""
    assert backends._tracing_shape(_network([[1, 1, 1], [1, 2, 2], [2, 2, 2]]), (2, 1, 2, 64, 32)) == (1, 1, 2, 8, 8)
    foreign = torch.nn.Module()
    foreign.encoder = torch.nn.Identity()
    assert backends._tracing_shape(foreign, (2, 1, 16, 32, 32)) == (1, 1, 16, 32, 32)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_missing_runtime_is_named_with_its_install_command(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None if name == backend else real(name))
    with pytest.raises(PredictError, match=rf'needs {backend}, not installed here: `pip install "pancseg\[{backend}\]"`'):
        check_backend(backend, torch.device("cpu"))


def test_a_runtime_runs_on_the_cpu_only_and_with_pancsegs_engine() -> None:
    check_backend("torch", torch.device("cuda"))  # torch runs anywhere
    with pytest.raises(PredictError, match="onnxruntime runs on the CPU, but predict.device is cuda"):
        check_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValidationError, match="predict.backend: openvino runs pancseg's engine"):
        PredictConfig(backend="openvino", engine="nnunet")


@pytest.mark.slow
@pytest.mark.parametrize("backend", RUNTIMES)
def test_predict_with_a_runtime_writes_torchs_masks_and_subtypes(backend: str, trained_project: Path,
                                                                  runner: CliRunner, tmp_path: Path) -> None:
    outputs = {}
    for name in ("torch", backend):
        out = tmp_path / name
        result = runner.invoke(app, ["predict", "-c", str(trained_project / "pancseg.yaml"), "-i",
                                     str(trained_project / "data" / "test"), "-o", str(out), "--fold", "4",
                                     "--set", "predict.mirroring=true", "--set", f"predict.backend={name}"])
        assert result.exit_code == 0, result.output
        outputs[name] = out
    masks = sorted(p.name for p in outputs["torch"].glob("*.nii.gz"))
    assert masks and masks == sorted(p.name for p in outputs[backend].glob("*.nii.gz"))
    for name in masks:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[k] / name))) for k in ("torch", backend))
        assert (a != b).mean() <= 1e-3, name  # float rounding only
    assert (outputs[backend] / "subtype_results.csv").read_text() == (outputs["torch"] / "subtype_results.csv").read_text()
    probs = [np.loadtxt(outputs[k] / "subtype_probabilities.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
             for k in ("torch", backend)]
    assert np.allclose(probs[0], probs[1], atol=1e-3)
