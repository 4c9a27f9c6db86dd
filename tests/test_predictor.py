"""Tests for pancreas_cli.multitask.predictor: sliding-window subtype aggregation on a tiny network."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from pancreas_cli.multitask.network import MultiTaskNet, build_multitask_network, tile_weights
from pancreas_cli.multitask.predictor import MultiTaskPredictor, unwrap
from pancreas_cli.preprocess import SMOKE_CONFIGURATION
from test_network import DATASET_JSON, make_plans

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH = [8, 16, 16]  # the smoke configuration keeps it: divisible by its strides (4, 8, 8)
IMAGE = (1, 12, 24, 20)  # (C, Z, Y, X): 2 x 2 x 2 tiles at step 0.5
REGIONS_JSON = {**DATASET_JSON, "labels": {"background": 0, "pancreas": [1, 2], "lesion": 2},
                "regions_class_order": [1, 2]}



def make_predictor(mirroring: bool = True, dataset_json: dict[str, Any] | None = None,
                   network: nn.Module | None = None) -> MultiTaskPredictor:
    dataset_json = dataset_json or DATASET_JSON
    manager = PlansManager(make_plans(patch=PATCH, head={"dropout": 0.3}))
    cm = manager.get_configuration(SMOKE_CONFIGURATION)
    assert list(cm.patch_size) == PATCH
    if network is None:
        outputs = manager.get_label_manager(dataset_json).num_segmentation_heads
        torch.manual_seed(0)
        network = build_multitask_network(manager, cm, 1, outputs, enable_deep_supervision=False)
    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                   perform_everything_on_device=False, device=torch.device("cpu"),
                                   verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, manager, cm, None, dataset_json, "nnUNetTrainerMultiTask",
                                    inference_allowed_mirroring_axes=(0, 1, 2))
    return predictor


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(*IMAGE, generator=torch.Generator().manual_seed(seed))


def _count_calls(net: nn.Module) -> list[int]:
    calls: list[int] = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _expected_case_probabilities(predictor: MultiTaskPredictor, image: torch.Tensor,
                                 mirroring: bool) -> np.ndarray:
    """Recomputed by hand: per tile, softmax averaged over mirrors; tiles weighted by tile_weights."""
    net = unwrap(predictor.network)
    net.eval()
    combos: list[tuple[int, ...]] = [()]
    if mirroring:
        combos += [c for i in range(3) for c in itertools.combinations((2, 3, 4), i + 1)]
    total, weight_sum = torch.zeros(3), torch.zeros(())
    with torch.no_grad():
        for sl in predictor._internal_get_sliding_window_slicers(image.shape[1:]):
            tile = image[sl][None]
            probs, seg = [], []
            for axes in combos:
                x = torch.flip(tile, axes) if axes else tile
                s, logits = net.forward_multitask(x)
                seg.append(torch.flip(s, axes) if axes else s)
                probs.append(torch.softmax(logits, 1))
            w = tile_weights(torch.stack(seg).mean(0), net.regions)
            total += (w[:, None] * torch.stack(probs).mean(0)).sum(0)
            weight_sum += w.sum()
    return (total / weight_sum).numpy()


@pytest.mark.parametrize("mirroring", [True, False])
def test_sliding_window_case_probabilities(mirroring: bool) -> None:
    predictor = make_predictor(mirroring=mirroring)
    net = unwrap(predictor.network)
    assert isinstance(net, MultiTaskNet)
    calls = _count_calls(net)
    image = _image()
    n_tiles = len(predictor._internal_get_sliding_window_slicers(image.shape[1:]))
    assert n_tiles == 8

    logits = predictor.predict_sliding_window_return_logits(image)
    assert tuple(logits.shape) == (3, *IMAGE[1:])
    assert torch.isfinite(logits).all()
    assert len(calls) == n_tiles * (8 if mirroring else 1)  # 7 mirror combinations of 3 axes + the original
    assert len(predictor.case_class_probabilities) == 1
    probs = predictor.case_class_probabilities[0]
    assert probs.shape == (3,) and probs.dtype == np.float32
    assert probs.sum() == pytest.approx(1.0, abs=1e-5) and (probs > 0).all()
    expected = _expected_case_probabilities(predictor, image, mirroring)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    assert net.class_logits_sink is None  # restored after the pass
    assert not net.training  # dropout in the head is off at inference
    # whether the case's segmentation holds a lesion (subtype_source), from the same logits
    assert predictor.case_lesion_found == [bool((logits.argmax(0) == 2).any())]


def test_mirroring_changes_the_average() -> None:
    """The mirrored passes really count: with and without mirroring the case vector differs."""
    image = _image(3)
    with_mirrors = make_predictor(mirroring=True)
    with_mirrors.predict_sliding_window_return_logits(image)
    without = make_predictor(mirroring=False)
    without.predict_sliding_window_return_logits(image)
    a, b = with_mirrors.case_class_probabilities[0], without.case_class_probabilities[0]
    assert not np.allclose(a, b, atol=1e-7)
    np.testing.assert_allclose(without.case_class_probabilities[0],
                               _expected_case_probabilities(without, image, False), rtol=1e-4, atol=1e-6)


def test_one_entry_per_call_in_order() -> None:
    predictor = make_predictor(mirroring=False)
    first, second = _image(1), _image(2) * 3
    predictor.predict_sliding_window_return_logits(first)
    predictor.predict_sliding_window_return_logits(second)
    assert len(predictor.case_class_probabilities) == 2 == len(predictor.case_lesion_found)
    for probs in predictor.case_class_probabilities:
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(predictor.case_class_probabilities[1],
                               _expected_case_probabilities(predictor, second, False), rtol=1e-4, atol=1e-6)
    assert not np.allclose(predictor.case_class_probabilities[0], predictor.case_class_probabilities[1])


def test_image_smaller_than_patch_is_padded() -> None:
    predictor = make_predictor(mirroring=False)
    image = torch.randn(1, 5, 10, 12)
    logits = predictor.predict_sliding_window_return_logits(image)
    assert tuple(logits.shape) == (3, 5, 10, 12)
    assert len(predictor.case_class_probabilities) == 1
    assert predictor.case_class_probabilities[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_regions_network() -> None:
    predictor = make_predictor(mirroring=False, dataset_json=REGIONS_JSON)
    assert unwrap(predictor.network).regions
    logits = predictor.predict_sliding_window_return_logits(_image())
    assert tuple(logits.shape) == (2, *IMAGE[1:])
    assert predictor.case_class_probabilities[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_retry_after_running_out_of_memory_starts_over() -> None:
    """nnU-Net retries the whole case with results on the CPU: tiles of the failed try must not count."""
    image = _image(5)
    reference = make_predictor(mirroring=False)
    reference.predict_sliding_window_return_logits(image)

    predictor = make_predictor(mirroring=False)
    predictor.perform_everything_on_device = True  # CPU predictors switch it off; force the retry path
    net = unwrap(predictor.network)
    state = {"calls": 0}

    def fail_once(module: nn.Module, args: Any) -> None:
        state["calls"] += 1
        if state["calls"] == 5:
            raise RuntimeError("CUDA out of memory (simulated)")

    net.register_forward_pre_hook(fail_once)
    logits = predictor.predict_sliding_window_return_logits(image)
    assert state["calls"] == 4 + 1 + 8  # 4 tiles, the failure, then all 8 tiles again
    assert tuple(logits.shape) == (3, *IMAGE[1:])
    assert len(predictor.case_class_probabilities) == 1
    np.testing.assert_allclose(predictor.case_class_probabilities[0], reference.case_class_probabilities[0],
                               rtol=1e-5, atol=1e-7)
    assert net.class_logits_sink is None


def test_no_tile_predicted() -> None:
    predictor = make_predictor(mirroring=False)
    with pytest.raises(RuntimeError, match="no tile was predicted"):
        predictor._internal_predict_sliding_window_return_logits(_image()[:, :8, :16, :16], [], False)
    assert predictor.case_class_probabilities == []


# ------------------------------------------------------------------ wrappers


def test_unwrap() -> None:
    net = nn.Linear(2, 2)
    assert unwrap(net) is net

    class FakeDDP(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap(FakeDDP(net)) is net
    compiled = torch.compile(net)  # lazy: nothing is compiled until it is called
    assert compiled is not net and unwrap(compiled) is net
    assert unwrap(FakeDDP(compiled)) is net


def test_wrapped_multitask_network_is_accepted() -> None:
    predictor = make_predictor(mirroring=False)
    inner = predictor.network

    class Wrapper(nn.Module):  # like DDP: forwards to .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> Any:
            return self.module(x)

    predictor.network = Wrapper(inner)
    predictor.predict_sliding_window_return_logits(_image())
    assert len(predictor.case_class_probabilities) == 1
    assert inner.class_logits_sink is None


def test_plain_network_is_rejected() -> None:
    manager = PlansManager(make_plans(patch=PATCH))
    cm = manager.get_configuration(SMOKE_CONFIGURATION)
    plain = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                   cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=False)
    predictor = make_predictor(network=plain)
    with pytest.raises(TypeError, match="needs a MultiTaskNet, got ResidualEncoderUNet"):
        predictor.predict_sliding_window_return_logits(_image())
    assert predictor.case_class_probabilities == []
