"""Tests for pancreas_cli.multitask.network: networks built from plans-like dicts, no preprocessing."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from pancreas_cli.multitask.network import (
    HISTOGRAM_CENTRES,
    RELATIVE_CENTRES,
    ClassificationHead,
    HeadSettings,
    MultiTaskNet,
    PancreasFeatures,
    RunningStandardize,
    build_multitask_network,
    lesion_found,
    lesion_gate,
    structure_probabilities,
    tile_weights,
)
from pancreas_cli.preprocess import SMOKE_CONFIGURATION, add_smoke_configuration

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
# Small enough for the CPU, deep enough to have a real stride pattern: (1,1,1), (1,2,2), then 2s.
PATCH = [16, 32, 32]
FEATURES = [8, 16, 32, 64, 64]
DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "pancreas": 1, "lesion": 2},
    "numTraining": 4,
    "file_ending": ".nii.gz",
}


def _resampling(is_seg: bool, order: int) -> dict[str, Any]:
    return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}


def make_plans(
    network: str = RESENC,
    features: list[int] | None = None,
    patch: list[int] | None = None,
    head: dict[str, Any] | None = None,
    smoke: bool = True,
    batch_size: int = 2,
) -> dict[str, Any]:
    """A plans dict shaped like nnU-Net's (ResEnc M planner), with a tiny 3d_fullres network."""
    features = list(features or FEATURES)
    n = len(features)
    strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n - 1)
    kwargs: dict[str, Any] = {
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if network == RESENC:
        kwargs["n_blocks_per_stage"] = [1, 2] + [2] * (n - 2)
    else:
        kwargs["n_conv_per_stage"] = [2] * n
    fullres: dict[str, Any] = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": list(patch or PATCH),
        "median_image_size_in_voxels": [32.0, 64.0, 64.0],
        "spacing": [2.0, 0.75, 0.75],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": _resampling(False, 3),
        "resampling_fn_seg_kwargs": _resampling(True, 1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": _resampling(False, 1),
        "architecture": {
            "network_class_name": network,
            "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    if head is not None:
        fullres["pancseg_head"] = head
    plans: dict[str, Any] = {
        "dataset_name": "Dataset001_PancreasCancer",
        "plans_name": "nnUNetResEncUNetMPlans",
        "original_median_spacing_after_transp": [2.0, 0.75, 0.75],
        "original_median_shape_after_transp": [32, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": fullres},
        "experiment_planner_used": "nnUNetPlannerResEncM",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 256.0, "mean": 96.4, "median": 106.0, "min": -26.0, "percentile_00_5": -9.0,
                  "percentile_99_5": 190.0, "std": 40.7}
        },
    }
    if smoke:
        add_smoke_configuration(plans)
        if head is not None:
            plans["configurations"][SMOKE_CONFIGURATION]["pancseg_head"] = head
    return plans


def make_net(
    configuration: str = "3d_fullres",
    outputs: int = 3,
    deep_supervision: bool = True,
    **plans_kwargs: Any,
) -> tuple[MultiTaskNet, Any]:
    manager = PlansManager(make_plans(**plans_kwargs))
    cm = manager.get_configuration(configuration)
    torch.manual_seed(0)
    return build_multitask_network(manager, cm, 1, outputs, deep_supervision), cm


def _strides(cm: Any) -> list[list[int]]:
    return [list(s) for s in cm.network_arch_init_kwargs["strides"]]


def _expected_ds_shapes(cm: Any, batch: int, channels: int) -> list[tuple[int, ...]]:
    """Deep-supervision output shapes: full resolution, then each stage's resolution (bottleneck excluded)."""
    shapes = []
    size = list(cm.patch_size)
    for stride in _strides(cm)[:-1]:
        size = [s // st for s, st in zip(size, stride)]
        shapes.append((batch, channels, *size))
    return shapes


def _decoder_only_params(net: MultiTaskNet) -> list[tuple[str, nn.Parameter]]:
    """The decoder's own parameters: ``decoder.encoder`` is the shared encoder and must be excluded."""
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    params = [(n, p) for n, p in net.decoder.named_parameters() if id(p) not in encoder_ids]
    assert params, "the decoder has parameters of its own"
    return params



# ------------------------------------------------------------------ forward and shapes

CONFIGURATIONS = [
    pytest.param({"configuration": SMOKE_CONFIGURATION}, id="smoke"),
    pytest.param({"configuration": "3d_fullres"}, id="resenc-5-stage"),
    pytest.param({"configuration": "3d_fullres", "network": PLAIN}, id="plain-5-stage"),
]


@pytest.mark.parametrize("spec", CONFIGURATIONS)
def test_forward_multitask_shapes(spec: dict[str, Any]) -> None:
    net, cm = make_net(**spec)
    assert isinstance(net, MultiTaskNet) and not net.regions
    n_stages = 4 if spec["configuration"] == SMOKE_CONFIGURATION else 5
    assert len(net.encoder.output_channels) == n_stages
    net.eval()
    x = torch.randn(2, 1, *cm.patch_size)
    with torch.no_grad():
        seg, logits = net.forward_multitask(x)
    assert isinstance(seg, list)
    assert [tuple(s.shape) for s in seg] == _expected_ds_shapes(cm, 2, 3)
    assert tuple(seg[0].shape) == (2, 3, *cm.patch_size)
    assert tuple(logits.shape) == (2, 3)
    assert torch.isfinite(logits).all()

    # forward returns exactly the segmentation output of the same pass (what nnU-Net expects)
    with torch.no_grad():
        plain = net(x)
    assert isinstance(plain, list) and len(plain) == len(seg)
    for a, b in zip(plain, seg):
        torch.testing.assert_close(a, b)

    net.decoder.deep_supervision = False
    with torch.no_grad():
        single = net(x)
        seg_single, logits_single = net.forward_multitask(x)
    assert isinstance(single, torch.Tensor)
    assert tuple(single.shape) == (2, 3, *cm.patch_size)
    torch.testing.assert_close(single, seg[0])
    torch.testing.assert_close(seg_single, seg[0])
    torch.testing.assert_close(logits_single, logits)


def test_return_class_logits_and_sink() -> None:
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, deep_supervision=False)
    net.eval()
    x = torch.randn(1, 1, *cm.patch_size)
    with torch.no_grad():
        seg_ref, logits_ref = net.forward_multitask(x)

        net.return_class_logits = True
        out = net(x)
        assert isinstance(out, tuple) and len(out) == 2
        torch.testing.assert_close(out[0], seg_ref)
        torch.testing.assert_close(out[1], logits_ref)

        net.return_class_logits = False
        net.class_logits_sink = []
        a = net(x)
        net(torch.flip(x, (2,)))  # a second tile: its logits go to the sink too
    assert isinstance(a, torch.Tensor)
    torch.testing.assert_close(a, seg_ref)
    assert len(net.class_logits_sink) == 2
    torch.testing.assert_close(net.class_logits_sink[0], logits_ref)
    assert not net.class_logits_sink[0].requires_grad

    # no sink (the default): nothing is collected anywhere, output is the plain segmentation
    net.class_logits_sink = None
    with torch.no_grad():
        assert isinstance(net(x), torch.Tensor)


def test_sink_does_not_recompile_under_torch_compile() -> None:
    """nnU-Net's predictor compiles the network (nnUNet_compile); a fresh sink per tile, filled by
    up to 8 mirrors, must not make a new graph per call (dynamo's recompile limit is 8)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, deep_supervision=False)
    net.eval()
    x = torch.randn(1, 1, *cm.patch_size)
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        for _ in range(2):  # two tiles
            net.class_logits_sink = []
            for mirror in range(4):
                compiled(torch.flip(x, (2,)) if mirror % 2 else x)
            assert len(net.class_logits_sink) == 4
    assert counters["stats"]["unique_graphs"] == 1


def test_regions_network() -> None:
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, outputs=2)
    assert net.regions is True
    net.eval()
    x = torch.randn(2, 1, *cm.patch_size)
    with torch.no_grad():
        seg, logits = net.forward_multitask(x)
    assert [tuple(s.shape) for s in seg] == _expected_ds_shapes(cm, 2, 2)
    assert tuple(logits.shape) == (2, 3)


# ------------------------------------------------------------------ gradients and passes


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_class_loss_reaches_encoder_not_decoder(pooling: str) -> None:
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, head={"pooling": pooling, "dropout": 0.0})
    assert net.settings.pooling == pooling
    net.train()
    x = torch.randn(2, 1, *cm.patch_size)
    _, logits = net.forward_multitask(x)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()

    for i, stage in enumerate(net.encoder.stages):
        grads = [p.grad for p in stage.parameters()]
        # stages feeding the head (and every stage below the deepest one used) get a gradient
        if i <= max(net.stage_indices):
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"encoder stage {i}: no gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head.parameters())
    for name, p in _decoder_only_params(net):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"decoder {name} got a class gradient"


def test_segmentation_loss_reaches_decoder() -> None:
    """Control for the test above: the decoder does get gradients, from the segmentation output."""
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, deep_supervision=False)
    x = torch.randn(1, 1, *cm.patch_size)
    seg, _ = net.forward_multitask(x)
    seg.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in _decoder_only_params(net))


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_encoder_runs_once_per_forward(deep_supervision: bool) -> None:
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, deep_supervision=deep_supervision)
    calls: list[int] = []
    handle = net.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 1, *cm.patch_size)
    try:
        with torch.no_grad():
            net.forward_multitask(x)
            assert len(calls) == 1
            net(x)
            assert len(calls) == 2
            net.return_class_logits = True
            net(x)
            assert len(calls) == 3
            net.return_class_logits = False
            net.class_logits_sink = []
            net(x)
            assert len(calls) == 4
    finally:
        handle.remove()


# ------------------------------------------------------------------ head settings


def test_head_settings_round_trip() -> None:
    settings = HeadSettings(stages=(0, -1), pooling="mean", hidden=32, dropout=0.1, num_classes=3)
    data = settings.to_dict()
    assert data == {"stages": [0, -1], "pooling": "mean", "hidden": 32, "dropout": 0.1, "pancreas": True,
                    "num_classes": 3, "pancreas_version": 3}
    assert HeadSettings.from_dict(data) == settings
    # JSON gives lists; None and {} give the defaults, except that plans without "pancreas" are older
    # pancseg's, whose head had no pancreas features, and plans without "pancreas_version" had the
    # first pancreas features (their checkpoints must load)
    assert HeadSettings.from_dict({"stages": [1, 2]}).stages == (1, 2)
    old = HeadSettings(pancreas=False, pancreas_version=1)
    assert HeadSettings.from_dict(None) == old == HeadSettings.from_dict({})
    assert HeadSettings.from_dict({"pancreas": True}) == HeadSettings(pancreas_version=1)
    assert HeadSettings.from_dict({"pancreas": True, "pancreas_version": 2}) == HeadSettings(pancreas_version=2)
    assert HeadSettings.from_dict({"pancreas": True, "pancreas_version": 3}) == HeadSettings()
    head = {"stages": [1, 2, -1], "pooling": "attention", "hidden": 128, "dropout": 0.3, "pancreas": True}
    assert HeadSettings.for_training(head) == HeadSettings()  # a new head has this pancseg's features
    assert HeadSettings().stages == (1, 2, -1) and HeadSettings().pooling == "attention" and HeadSettings().pancreas
    with pytest.raises(TypeError):
        HeadSettings.from_dict({"bogus": 1})


@pytest.mark.parametrize("stages", [(5,), (-6,), (0, 9)])
def test_head_stages_out_of_range(stages: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        make_net(configuration="3d_fullres", head={"stages": list(stages)})


def test_negative_stages_count_from_bottleneck() -> None:
    net, _ = make_net(configuration="3d_fullres", head={"stages": [1, 2, -1]})
    assert net.stage_indices == [1, 2, 4]
    net, _ = make_net(configuration="3d_fullres", head={"stages": [-1, 4]})
    assert net.stage_indices == [4]  # duplicates collapse


def test_pooling_changes_head_input_size() -> None:
    head = {"stages": [1, -1], "hidden": 16}
    mean, _ = make_net(configuration="3d_fullres", head={**head, "pooling": "mean"})
    attention, _ = make_net(configuration="3d_fullres", head={**head, "pooling": "attention"})
    channels = FEATURES[1] + FEATURES[-1]
    assert mean.head.mlp[0].mean.shape == (channels,)
    assert mean.head.mlp[2].in_features == channels
    assert attention.head.mlp[2].in_features == 3 * channels
    assert attention.head.mlp[2].out_features == 16 and attention.head.mlp[-1].out_features == 3


def test_head_settings_read_from_configuration() -> None:
    head = {"stages": [0, 3], "pooling": "mean", "hidden": 24, "dropout": 0.0}
    net, cm = make_net(configuration=SMOKE_CONFIGURATION, head=head)
    assert cm.configuration["pancseg_head"] == head
    assert net.settings == HeadSettings(stages=(0, 3), pooling="mean", hidden=24, dropout=0.0, pancreas=False,
                                        pancreas_version=1)
    assert net.stage_indices == [0, 3]
    assert net.head.mlp[2].in_features == 8 + 64
    # the 3d_fullres configuration of the same plans inherits nothing from the smoke one
    net_full, _ = make_net(configuration="3d_fullres", head=None)
    assert net_full.settings == HeadSettings(pancreas=False, pancreas_version=1)


def test_attention_pooling_needs_attention() -> None:
    head = ClassificationHead([4], HeadSettings(stages=(0,), pooling="attention"))
    with pytest.raises(ValueError, match="attention"):
        head([torch.randn(1, 4, 2, 2, 2)], None)


# ------------------------------------------------------------------ tile weights


def _label_logits(labels: torch.Tensor, strength: float = 10.0) -> torch.Tensor:
    """Softmax logits (B,3,*S) that are confident about ``labels`` (B,*S)."""
    return nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * strength


def test_tile_weights_prefer_lesion_tiles() -> None:
    labels = torch.zeros(3, 4, 4, 4, dtype=torch.long)
    labels[1, :2] = 1  # pancreas only
    labels[2, :2] = 2  # lesion
    weights = tile_weights(_label_logits(labels), regions=False)
    assert weights.shape == (3,)
    assert weights[2] > weights[1] > weights[0] > 0
    # background-only: just the floor; pancreas: a tenth of its fraction; lesion: fraction + tenth of pancreas
    assert weights[0].item() == pytest.approx(1e-6, abs=1e-4)
    assert weights[1].item() == pytest.approx(0.1 * 0.5, abs=1e-3)
    assert weights[2].item() == pytest.approx(0.5 + 0.1 * 0.5, abs=1e-3)


def test_structure_probabilities_labels_and_regions() -> None:
    labels = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    labels[0, 0] = 2
    labels[0, 1, 0] = 1
    lesion, pancreas = structure_probabilities(_label_logits(labels, 20.0), regions=False)
    assert lesion.shape == pancreas.shape == (1, 1, 2, 2, 2)
    assert torch.allclose(lesion[0, 0], (labels[0] == 2).float(), atol=1e-4)
    assert torch.allclose(pancreas[0, 0], (labels[0] > 0).float(), atol=1e-4)

    # regions: channel 0 = whole pancreas ([1, 2]), channel 1 = lesion ([2]); sigmoid, not softmax
    region_logits = torch.stack([(labels > 0).float(), (labels == 2).float()], dim=1) * 40 - 20
    lesion_r, pancreas_r = structure_probabilities(region_logits, regions=True)
    assert torch.allclose(lesion_r, lesion, atol=1e-4)
    assert torch.allclose(pancreas_r, pancreas, atol=1e-4)
    w = tile_weights(region_logits, regions=True)
    assert w.item() == pytest.approx(0.5 + 0.1 * 0.75, abs=1e-3)


def _pooled(features: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The head's pooling of one stage: its weight maps, then the product."""
    from pancreas_cli.multitask.network import _pool, _stage_maps

    return _pool(features, _stage_maps(weights, [features])[0])


def test_attention_pooling_weights_lesion_features() -> None:
    """Attention pooling averages features where the decoder sees lesion/pancreas, not the whole patch."""
    features = torch.zeros(1, 1, 4, 4, 4)
    features[..., :2, :, :] = 1.0  # "lesion texture" in half of the patch
    weights = torch.zeros(1, 1, 8, 8, 8)  # full resolution mask, pooled to the feature size
    weights[..., :4, :, :] = 1.0
    mean, weighted = _pooled(features, weights)[0].tolist()
    assert weighted == pytest.approx(1.0, abs=1e-3)
    assert mean == pytest.approx(0.5, rel=1e-5)  # ones / (64 + 1e-4)


def test_pool_matches_per_map_weighted_means() -> None:
    """[mean | lesion-weighted | pancreas-weighted] per channel, as products and sums would give them."""
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3, 4, 4)
    weights = torch.rand(2, 2, 6, 8, 8)
    small = nn.functional.adaptive_avg_pool3d(weights, (3, 4, 4))
    expected = [features.mean((2, 3, 4))] + [
        (features * small[:, k : k + 1]).sum((2, 3, 4)) / (small[:, k : k + 1].sum((2, 3, 4)) + 1e-4) for k in range(2)
    ]
    assert torch.allclose(_pooled(features, weights), torch.cat(expected, dim=1), atol=1e-5)
    assert torch.allclose(_pooled(features, None), expected[0], atol=1e-6)
    # 2D networks: (B,C,H,W) features, maps pooled in 2D
    assert _pooled(features[:, :, 0], weights[:, :, 0]).shape == (2, 15)


def test_stage_maps_pool_each_stage_from_the_finer_one() -> None:
    """Maps pooled stage by stage are the maps pooled to each stage from full resolution, after ones."""
    from pancreas_cli.multitask.network import _stage_maps

    torch.manual_seed(0)
    weights = torch.rand(2, 2, 8, 16, 16)
    shapes = [torch.Size(s) for s in ((8, 8, 8), (4, 4, 4), (1, 1, 1))]
    features = [torch.empty(2, 1, *s) for s in shapes]
    for maps, shape in zip(_stage_maps(weights, features), shapes):
        direct = nn.functional.adaptive_avg_pool3d(weights, shape).flatten(2)
        assert maps.shape == (2, 3, shape.numel())
        assert torch.allclose(maps[:, 1:], direct, atol=1e-6)
        assert torch.equal(maps[:, 0], torch.ones(2, shape.numel()))  # the plain average's weights


@pytest.fixture
def cpu_bmm_out_dtype() -> Iterator[None]:
    """A CPU kernel for ``bmm`` with ``out_dtype`` (torch has it on CUDA only): the half-precision
    product's forward and backward can then be checked here on half-precision inputs."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("bmm.dtype", lambda a, b, out_dtype: torch.bmm(a.to(out_dtype), b.to(out_dtype)), "CPU")
    yield
    library._destroy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_product_sums_in_float32_and_returns_the_gradient_in_half(cpu_bmm_out_dtype: None,
                                                                       dtype: torch.dtype) -> None:
    """On a GPU under autocast the finest stage's features are pooled without a float32 copy: the
    product returns float32 sums, and the features' gradient comes back in their dtype, contiguous."""
    from pancreas_cli.multitask.network import _HalfProduct

    torch.manual_seed(0)
    flat = (torch.randn(2, 5, 4096) + 3).to(dtype).requires_grad_()
    maps = torch.rand(2, 3, 4096).to(dtype)
    sums = _HalfProduct.apply(flat, maps)
    reference_input = flat.detach().float().requires_grad_()
    reference = torch.bmm(reference_input, maps.float().transpose(1, 2))
    assert sums.dtype == torch.float32 and sums.shape == (2, 5, 3)
    torch.testing.assert_close(sums, reference, rtol=1e-5, atol=1e-3)
    grad = torch.randn(2, 5, 3)
    sums.backward(grad)
    reference.backward(grad)
    assert flat.grad is not None and flat.grad.dtype == dtype and flat.grad.is_contiguous()
    torch.testing.assert_close(flat.grad.float(), reference_input.grad, rtol=2e-2, atol=2e-2)


def test_half_product_traces_under_torch_compile(cpu_bmm_out_dtype: None) -> None:
    """``train.compile`` compiles the network, head included: dynamo and AOTAutograd trace the product
    and its backward (on a GPU inductor lowers ``bmm`` with ``out_dtype`` itself)."""
    from pancreas_cli.multitask.network import _HalfProduct

    flat = torch.randn(2, 5, 64).half().requires_grad_()
    maps = torch.rand(2, 3, 64).half()
    expected = _HalfProduct.apply(flat, maps)
    compiled = torch.compile(lambda f, m: _HalfProduct.apply(f, m), backend="aot_eager", fullgraph=True)
    sums = compiled(flat, maps)
    torch.testing.assert_close(sums, expected)
    sums.sum().backward()
    assert flat.grad is not None and flat.grad.dtype == torch.float16


def test_head_runs_in_float32_under_autocast() -> None:
    """Training and inference run under autocast on a GPU; the head's sums over many voxels must not
    run in half precision, and its logits are float32."""
    torch.manual_seed(0)
    head = ClassificationHead([2], HeadSettings(stages=(0,))).eval()
    features = torch.full((1, 2, 16, 16, 16), 1.001)  # bfloat16 rounds it to 1.0
    weights = torch.ones(1, 2, 16, 16, 16)
    image = torch.full((1, 1, 16, 16, 16), 0.501)
    expected = head([features], weights, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head([features.bfloat16()], weights, image.bfloat16())  # the encoder's output under autocast
    assert logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head([features], weights, image)
    torch.testing.assert_close(logits, expected)


# ------------------------------------------------------------------ running standardisation


def test_standardize_first_batches_average_cumulatively() -> None:
    torch.manual_seed(0)
    layer = RunningStandardize(3, momentum=0.1)
    batches = [torch.randn(2, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([5.0, -3.0, 0.5]) for _ in range(10)]
    for batch in batches:
        out = layer(batch)
    seen = torch.cat(batches)
    # 10 batches = 1 / momentum: still the plain average of everything seen
    torch.testing.assert_close(layer.mean, seen.mean(0))
    torch.testing.assert_close(layer.mean_square - layer.mean.square(), seen.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    assert int(layer.batches) == 10
    # the last batch was normalised with the statistics that include it
    expected = (batches[-1] - seen.mean(0)) / torch.sqrt(seen.var(0, unbiased=False) + layer.eps)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_standardize_follows_drifting_features_then_freezes_in_eval() -> None:
    layer = RunningStandardize(2, momentum=0.1)
    for _ in range(200):  # features drift from around 0 to around 100
        layer(torch.full((2, 2), 0.0) + torch.randn(2, 2))
    for _ in range(200):
        layer(torch.full((2, 2), 100.0) + torch.randn(2, 2))
    assert torch.allclose(layer.mean, torch.full((2,), 100.0), atol=1.0)
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    out = layer(torch.full((4, 2), 100.0))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())  # eval: no update
    assert out.abs().max() < 1.5
    assert set(state) == {"mean", "mean_square", "batches"}  # buffers: saved in checkpoints


def test_standardize_gradients_and_constant_features() -> None:
    layer = RunningStandardize(2)
    x = torch.tensor([[1.0, 3.0], [2.0, 3.0]], requires_grad=True)  # second feature constant
    out = layer(x)
    assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros(2))
    out[:, 0].sum().backward()
    # the statistics are constants for the gradient: d out / d x = 1 / sqrt(variance + eps), here of [1, 2]
    assert x.grad is not None
    torch.testing.assert_close(x.grad[:, 0], torch.full((2,), (0.25 + layer.eps) ** -0.5))
    assert not layer.mean.requires_grad and layer.mean.grad is None


# ------------------------------------------------------------------ init


def test_initialize_applies_nnunet_init() -> None:
    net, cm = make_net(configuration=SMOKE_CONFIGURATION)
    before = copy.deepcopy(net.state_dict())
    for p in net.parameters():
        nn.init.constant_(p, 0.5)
    net.apply(net.initialize)
    conv = net.encoder.stem.convs[0].conv
    # He init: conv weights random again, biases zero
    assert conv.weight.std() > 0 and torch.count_nonzero(conv.bias) == 0
    # ResEnc init zeroes the last norm of each residual block before the addition
    block = net.encoder.stages[0].blocks[0]
    assert torch.count_nonzero(block.conv2.norm.weight) == 0
    # the head is not touched by nnU-Net's init (it initializes convolutions only)
    assert torch.all(net.head.mlp[2].weight == 0.5)
    net.eval()
    with torch.no_grad():
        seg, logits = net.forward_multitask(torch.randn(1, 1, *cm.patch_size))
    assert torch.isfinite(seg[0]).all() and torch.isfinite(logits).all()
    assert set(before) == set(net.state_dict())


def test_initialize_without_nnunet_init() -> None:
    class Seg(nn.Module):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.encoder, self.decoder = base.encoder, base.decoder

    net, _ = make_net(configuration=SMOKE_CONFIGURATION)
    wrapped = MultiTaskNet(Seg(net), HeadSettings(stages=(0,), pooling="mean"))
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    wrapped.apply(wrapped.initialize)  # no initialize on the seg network: a no-op
    for k, v in wrapped.state_dict().items():
        assert torch.equal(v, state[k])
    assert wrapped.settings.pooling == "mean" and wrapped.stage_indices == [0]


# ------------------------------------------------------------------ pancreas features and the lesion gate


def _maps(lesion: float, shape: tuple[int, ...] = (8, 8, 8)) -> torch.Tensor:
    """(lesion, pancreas) maps (1,2,*S): the pancreas fills the middle, the lesion (``lesion`` = its
    probability) a corner of it."""
    pancreas = torch.zeros(1, 1, *shape)
    pancreas[..., 2:6, 2:6, 2:6] = 1.0
    les = torch.zeros_like(pancreas)
    les[..., 2:4, 2:4, 2:4] = lesion
    return torch.cat([les, pancreas], dim=1)


def test_lesion_gate_follows_the_decoders_confidence() -> None:
    gate = lesion_gate(torch.stack([_maps(p)[:, :1] for p in (0.0, 0.3, 0.5, 0.75, 1.0)])[:, 0])
    torch.testing.assert_close(gate, torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0]))


def test_pancreas_features_shift_with_an_unsegmented_lesion() -> None:
    """A dark lesion the decoder missed (lesion map empty, its voxels labelled pancreas) still moves the
    pancreas-level intensity features; voxels outside the pancreas do not."""
    from pancreas_cli.multitask.network import _stage_maps

    features = PancreasFeatures(in_channels=1, first_stage_channels=4)
    # input over patch and pancreas, shallow features, input relative to the pancreas' mean, lesion fraction, gate
    n = 2 + len(HISTOGRAM_CENTRES)  # mean, second moment, bins
    assert features.size == 2 * n + 4 + len(RELATIVE_CENTRES) + 1 + len(RELATIVE_CENTRES) + 2
    assert PancreasFeatures(1, 4, version=2).size == 2 * n + 4 + len(RELATIVE_CENTRES) + 2
    assert PancreasFeatures(1, 4, version=1).size == 2 * n + 4 + 2
    first = torch.ones(1, 4, 4, 4, 4)  # the first head stage, at half the input's resolution
    maps, gate = _stage_maps(_maps(0.0), [first])[0], torch.zeros(1)
    plain = torch.zeros(1, 1, 8, 8, 8)
    dark = plain.clone()
    dark[..., 2:4, 2:4, 2:4] = -2.5  # a hypodense lesion inside the pancreas, unsegmented
    outside = plain.clone()
    outside[..., :, :, 6:] = -2.5  # outside the pancreas
    a, b, c = (features(x, first, maps, gate) for x in (plain, dark, outside))
    assert a.shape == (1, features.size)
    assert b[0, n] < a[0, n] - 0.2  # the pancreas' mean of the input (1 of its 8 coarse voxels at -2.5)
    assert b[0, n + 2] > a[0, n + 2] == 0  # its lowest histogram bin (-3) gains mass
    assert b[0, 0] < a[0, 0] and c[0, 0] < a[0, 0]  # over the whole patch: both move
    torch.testing.assert_close(a[:, n:], c[:, n:])  # the pancreas' features ignore what lies outside it
    assert a[0, -1] == 0 and a[0, -2] == 0  # gate, lesion fraction
    relative = slice(2 * n + 4, 2 * n + 4 + len(RELATIVE_CENTRES))
    zero = RELATIVE_CENTRES.index(0.0)
    assert a[0, relative][zero] == pytest.approx(1, abs=1e-3) and b[0, relative][:zero].sum() > 0  # the lesion: below the pancreas' mean
    brighter = features(dark + 1.0, first, maps, gate)  # the whole patch 1 unit brighter: the same relative bins
    torch.testing.assert_close(brighter[:, relative], b[:, relative], atol=1e-4, rtol=0)
    # a segmented lesion: its fraction of the pancreas
    lesion = features(plain, first, _stage_maps(_maps(1.0), [first])[0], torch.ones(1))
    assert lesion[0, -2] == pytest.approx(1 / (8 + 1)) and lesion[0, -1] == 1  # voxels of the coarse grid


def test_texture_features_see_a_rough_unsegmented_lesion() -> None:
    """Version 3: the input's variance inside each coarse voxel, over the pancreas and by relative intensity:
    a rough lesion shows in its intensity's bins, a smooth one with the same means does not."""
    from pancreas_cli.multitask.network import _stage_maps

    features = PancreasFeatures(in_channels=1, first_stage_channels=4)
    first = torch.ones(1, 4, 4, 4, 4)
    maps, gate = _stage_maps(_maps(0.0), [first])[0], torch.zeros(1)
    smooth = torch.zeros(1, 1, 8, 8, 8)
    smooth[..., 2:4, 2:4, 2:4] = -2.5  # one coarse voxel of the pancreas' 8: mean -0.3125, the lesion at -2.19
    rough = smooth.clone()
    i, j, k = torch.meshgrid(*[torch.arange(2)] * 3, indexing="ij")
    rough[..., 2:4, 2:4, 2:4] += 0.5 * ((i + j + k) % 2 * 2 - 1)  # a checkerboard of +-0.5: the same mean
    a, b = features(smooth, first, maps, gate), features(rough, first, maps, gate)
    texture = slice(features.size - 2 - (1 + len(RELATIVE_CENTRES)), features.size - 2)
    torch.testing.assert_close(a[:, : texture.start], b[:, : texture.start])  # the same means and histograms
    assert torch.count_nonzero(a[0, texture]) == 0
    assert b[0, texture][0] == pytest.approx(0.25 / 8, rel=1e-3)  # over the pancreas
    by_bin = b[0, texture][1:]
    assert by_bin[RELATIVE_CENTRES.index(-2.0)] == pytest.approx(0.25, rel=0.02)  # the lesion's own roughness
    assert by_bin[RELATIVE_CENTRES.index(0.0)] == 0 and by_bin[RELATIVE_CENTRES.index(0.5)] == 0  # the pancreas


@pytest.mark.parametrize(("version", "gain"), [(1, 10.0), (2, 30.0), (3, 30.0)])
def test_shortcut_gain_follows_the_features_version(version: int, gain: float) -> None:
    """A checkpoint's shortcut was trained with its version's gain: an older model's logits must not change."""
    head = ClassificationHead([4], HeadSettings(stages=(0,), dropout=0.0, pancreas_version=version)).eval()
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
        head.shortcut.bias.fill_(1.0)
        logits = head([torch.randn(1, 4, 8, 8, 8)], _maps(0.0), torch.zeros(1, 1, 8, 8, 8))
    torch.testing.assert_close(logits, torch.full((1, 3), gain))


def test_unknown_features_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version 9 .* newer pancseg"):
        ClassificationHead([4], HeadSettings(stages=(0,), pancreas_version=9))


def test_head_with_pancreas_features_shapes_and_gradient() -> None:
    net, _ = make_net(configuration="3d_fullres", head={"stages": [1, -1], "hidden": 16, "pancreas": True})
    head = net.head
    channels = FEATURES[1] + FEATURES[-1]
    assert head.mlp[2].in_features == 3 * channels + head.pancreas.size
    # the gated columns are the lesion-weighted averages, C per stage after the plain ones
    assert int(head.lesion_columns.sum()) == channels
    assert head.lesion_columns[FEATURES[1] : 2 * FEATURES[1]].all() and not head.lesion_columns[: FEATURES[1]].any()
    x = torch.randn(2, 1, *PATCH, requires_grad=True)
    seg, logits = net.forward_multitask(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in head.parameters())
    # legacy head (plans without "pancreas"): no pancreas features, as older checkpoints were saved
    old, _ = make_net(configuration="3d_fullres", head={"stages": [1, -1], "hidden": 16})
    assert old.head.pancreas is None and old.head.mlp[2].in_features == 3 * channels


def test_gate_closes_the_lesion_features_when_no_lesion_is_segmented() -> None:
    """Without a confident lesion the lesion-weighted averages (noise of near-zero weights) reach the MLP
    as zeros (the average case); with one they pass. In training the gate is closed for some items."""
    torch.manual_seed(0)
    head = ClassificationHead([4], HeadSettings(stages=(0,), dropout=0.0)).eval()
    with torch.no_grad():
        head.mlp[0].mean.normal_()  # standardised features away from zero
    seen: list[torch.Tensor] = []
    head.mlp[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    image, features = torch.zeros(1, 1, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    columns = head.lesion_columns
    with torch.no_grad():
        head([features], _maps(0.3), image)  # the decoder's lesion below 0.5 everywhere
        assert torch.count_nonzero(seen[-1][:, columns]) == 0 and torch.count_nonzero(seen[-1][:, ~columns]) > 0
        head([features], _maps(1.0), image)  # a confident lesion
        assert torch.count_nonzero(seen[-1][:, columns]) == int(columns.sum())
        head.train()
        head([features.expand(64, -1, -1, -1, -1)], _maps(1.0).expand(64, -1, -1, -1, -1),
             image.expand(64, -1, -1, -1, -1))
    closed = (seen[-1][:, columns] == 0).all(1).float().mean().item()
    assert 0.05 < closed < 0.5  # GATE_DROPOUT of the items learn to do without the lesion


def test_lesion_found_labels_and_regions() -> None:
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    labels[1, :2] = 1
    assert not lesion_found(_label_logits(labels)[1], regions=False)
    labels[1, 0, 0, 0] = 2
    assert lesion_found(_label_logits(labels)[1], regions=False)
    regions = torch.full((2, 4, 4, 4), -5.0)
    assert not lesion_found(regions, regions=True)
    regions[1, 0, 0, 0] = 5.0
    assert lesion_found(regions, regions=True)
