"""pancseg's sliding window (pancreas_cli.inference.window, ProgressPredictor._fast_window) against nnU-Net's.

The window must give nnU-Net's answer: batched mirrors the same logits as nnU-Net's one pass at a
time, and region restriction the same mask wherever the first pass's foreground (plus the margin)
reaches, including a lesion the un-mirrored first pass partly misses at the region's edge.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from pancreas_cli.inference.window import (
    AT_BORDER,
    NOTHING_FOUND,
    foreground,
    mirror_combinations,
    tiles_near,
    touches_border,
)
from pancreas_cli.multitask.predictor import ProgressPredictor, WindowSettings
from pancreas_cli.preprocess import SMOKE_CONFIGURATION
from test_network import DATASET_JSON, make_plans
from test_predictor import PATCH, REGIONS_JSON, _count_calls, _image, make_predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PhantomNet(nn.Module):
    """A 'network' that reads labels off its input (0 air, 1 pancreas, 2 lesion) voxel by voxel, biased
    by the input's forward difference along x: where the lesion drops to air it calls background.

    A flip along x turns the forward difference into a backward one, so nnU-Net's mirrored average
    halves the bias and finds the lesion's last column, which the un-mirrored first pass misses:
    a lesion at the edge of the first pass's foreground.
    """

    def __init__(self, bias: float = 3.0, regions: bool = False) -> None:
        super().__init__()
        self.bias = bias
        self.regions = regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = torch.zeros_like(x)
        step[..., :-1] = x[..., 1:] - x[..., :-1]
        background = torch.where(x > 0.5, -4.0, 4.0) - self.bias * step
        lesion = torch.where(x > 1.5, 4.0, -4.0) + self.bias * step
        if self.regions:  # a region model's sigmoid logits: whole pancreas, lesion
            return torch.cat([-background, lesion], dim=1)
        pancreas = torch.where(x > 0.5, 0.0, -4.0)
        return torch.cat([background, pancreas, lesion], dim=1)


def phantom_predictor(window: WindowSettings | None, mirroring: bool = True, regions: bool = False
                      ) -> ProgressPredictor:
    manager = PlansManager(make_plans(patch=PATCH))
    cm = manager.get_configuration(SMOKE_CONFIGURATION)
    predictor = ProgressPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                  perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                  allow_tqdm=False, window=window)
    predictor.manual_initialization(PhantomNet(regions=regions), manager, cm, None,
                                    REGIONS_JSON if regions else DATASET_JSON, "nnUNetTrainerMultiTask",
                                    inference_allowed_mirroring_axes=(0, 1, 2))
    return predictor


def phantom(shape: tuple[int, int, int] = (24, 48, 64), lesion: bool = True) -> torch.Tensor:
    """A pancreas block well inside the volume; the lesion at the block's +x edge, next to air."""
    image = torch.zeros(1, *shape)
    image[0, 8:14, 14:26, 20:38] = 1
    if lesion:
        image[0, 9:13, 17:23, 33:38] = 2
    return image


def labels(logits: torch.Tensor) -> torch.Tensor:
    """Labels from label logits (argmax), or from region logits (whole pancreas, lesion) by nnU-Net's rule."""
    if len(logits) == 2:
        return torch.where(logits[1] > 0, 2, torch.where(logits[0] > 0, 1, 0))
    return logits.float().argmax(0)


def test_mirror_combinations_in_nnunets_order() -> None:
    assert mirror_combinations((0, 1, 2)) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_combinations(None) == [()]


def test_foreground_of_label_and_region_logits() -> None:
    """A label model's foreground is argmax != background; a region model's (the default: whole
    pancreas, lesion) any region's sigmoid above 0.5, so a lesion outside the whole region counts too."""
    labels = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])[..., None, None]  # C=3, 3 voxels
    assert foreground(labels, regions=False).flatten().tolist() == [False, True, True]
    regions = torch.tensor([[-1.0, 0.5, -2.0], [-3.0, -1.0, 0.2]])[..., None, None]  # whole, lesion
    assert foreground(regions, regions=True).flatten().tolist() == [False, True, True]


def test_tiles_near_and_border() -> None:
    mask = torch.zeros(10, 10, 10, dtype=torch.bool)
    mask[5, 5, 5] = True
    slicers = [(slice(None), slice(0, 4), slice(0, 10), slice(0, 10)), (slice(None), slice(6, 10), slice(0, 10),
                                                                        slice(0, 10))]
    assert tiles_near(mask, slicers, (0, 0, 0)) == [False, False]
    assert tiles_near(mask, slicers, (1, 0, 0)) == [False, True]
    assert tiles_near(mask, slicers, (2, 0, 0)) == [True, True]
    assert not touches_border(mask)
    mask[0, 3, 3] = True
    assert touches_border(mask)


@pytest.mark.parametrize("mirroring", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_batched_mirrors_give_nnunets_logits(mirroring: bool, batch: int) -> None:
    """The multi-task network: logits (half-precision sums), masks and case probabilities as nnU-Net's."""
    image = _image(1)
    stock = make_predictor(mirroring)
    expected = stock.predict_sliding_window_return_logits(image)
    fast = make_predictor(mirroring)
    fast.window = WindowSettings(batch_size=batch, region=False)
    logits = fast.predict_sliding_window_return_logits(image)
    torch.testing.assert_close(logits.float(), expected.float(), atol=2e-3, rtol=0)  # 1-2 ulp of float16
    assert torch.equal(labels(logits), labels(expected))
    np.testing.assert_allclose(fast.case_class_probabilities[-1], stock.case_class_probabilities[-1], atol=1e-6)
    passes = fast.window_stats
    assert passes.passes == passes.stock_passes == passes.tiles * (8 if mirroring else 1)


def test_batch_one_is_bitwise_nnunet() -> None:
    image = _image(2)
    expected = make_predictor().predict_sliding_window_return_logits(image)
    fast = make_predictor()
    fast.window = WindowSettings(batch_size=1, region=False)
    assert torch.equal(fast.predict_sliding_window_return_logits(image), expected)


@pytest.mark.parametrize("regions", [False, True])
def test_lesion_at_the_region_edge_is_fully_segmented(regions: bool) -> None:
    image = phantom()
    expected = labels(phantom_predictor(None, regions=regions).predict_sliding_window_return_logits(image))
    unmirrored = labels(phantom_predictor(None, mirroring=False, regions=regions)
                        .predict_sliding_window_return_logits(image))
    assert (unmirrored[..., 37] == 0).any() and (unmirrored > 0).sum() < (expected > 0).sum()  # first pass: missed
    assert torch.equal(expected == 2, image[0] == 2)  # nnU-Net's mirrored average finds the whole lesion
    predictor = phantom_predictor(WindowSettings(batch_size=4, region=True, margin_mm=0.0), regions=regions)
    result = labels(predictor.predict_sliding_window_return_logits(image))
    stats = predictor.window_stats
    assert stats.fallback is None and 0 < stats.full < stats.tiles  # restricted, and tiles were skipped
    early = stats.passes - (stats.tiles + 7 * stats.full)  # mirrors filling the first pass's last batch
    assert 0 <= early < 4 and stats.passes < stats.stock_passes
    assert torch.equal(result, expected)


def test_mirrors_filling_the_first_pass_change_nothing() -> None:
    """The first pass's last batch is filled with the first mirrors; the tiles region restriction
    leaves un-mirrored do not take them, so any batch size gives batch one's answer."""
    image = phantom()
    answers, early = [], []
    for batch in (1, 4, 8):  # 175 tiles: 0, 1 and 1 mirrors of tile 0 computed early, not kept (tile 0 is air)
        predictor = phantom_predictor(WindowSettings(batch_size=batch, region=True, margin_mm=0.0))
        answers.append(predictor.predict_sliding_window_return_logits(image))
        stats = predictor.window_stats
        early.append(stats.passes - (stats.tiles + 7 * stats.full))
    assert early == [0, 1, 1] and 0 < stats.full < stats.tiles
    assert all(torch.equal(answer, answers[0]) for answer in answers[1:])


def test_early_mirrors_keep_the_case_probabilities() -> None:
    """The multi-task network: mirrors computed with the first pass bring their class logits along."""
    image = _image(3)
    results = []
    for batch in (1, 3):  # 8 tiles: a batch of 3 computes one mirror with the first pass
        predictor = make_predictor()
        predictor.window = WindowSettings(batch_size=batch, region=True)
        logits = predictor.predict_sliding_window_return_logits(image)
        results.append((logits, predictor.case_class_probabilities[-1], predictor.window_stats))
    (one, probs_one, stats_one), (three, probs_three, stats_three) = results
    assert stats_one.passes == stats_one.tiles + 7 * stats_one.full
    assert stats_three.full == stats_one.full and stats_three.passes - stats_one.passes in (0, 1)
    torch.testing.assert_close(three.float(), one.float(), atol=2e-3, rtol=0)
    np.testing.assert_allclose(probs_three, probs_one, atol=1e-6)


def test_two_tiles_take_two_padded_batches_of_eight() -> None:
    """A quiz-sized crop has 2 ResEnc-M tiles: its 16 passes fill 2 batches of 8 (the first pass's
    batch carries 6 mirrors), where a separate first pass would take 3."""
    image = torch.zeros(1, 8, 16, 24)  # 1 x 1 x 2 tiles of 8 x 16 x 16
    image[0, 2:6, 4:12, 8:16] = 1
    image[0, 3:5, 6:10, 10:14] = 2
    expected = phantom_predictor(None).predict_sliding_window_return_logits(image)
    predictor = phantom_predictor(WindowSettings(batch_size=8, region=True, pad_batches=True))
    calls = _count_calls(predictor.network)
    logits = predictor.predict_sliding_window_return_logits(image)
    stats = predictor.window_stats
    assert (stats.tiles, stats.full, stats.passes, stats.fallback) == (2, 2, 16, None)
    assert len(calls) == 2
    torch.testing.assert_close(logits.float(), expected.float(), atol=2e-3, rtol=0)
    assert torch.equal(labels(logits), labels(expected))


def test_margin_widens_the_region() -> None:
    image = phantom()
    narrow = phantom_predictor(WindowSettings(batch_size=4, region=True, margin_mm=0.0))
    wide = phantom_predictor(WindowSettings(batch_size=4, region=True, margin_mm=30.0))
    narrow.predict_sliding_window_return_logits(image)
    wide.predict_sliding_window_return_logits(image)
    assert narrow.window_stats.full < wide.window_stats.full


def test_nothing_found_falls_back_to_the_whole_volume() -> None:
    image = torch.zeros(1, 24, 48, 64)
    expected = phantom_predictor(None).predict_sliding_window_return_logits(image)
    predictor = phantom_predictor(WindowSettings(batch_size=4, region=True))
    logits = predictor.predict_sliding_window_return_logits(image)
    assert predictor.window_stats.fallback == NOTHING_FOUND
    assert predictor.window_stats.full == predictor.window_stats.tiles
    assert torch.equal(labels(logits), labels(expected))


def test_foreground_at_the_border_falls_back_to_the_whole_volume() -> None:
    image = phantom()
    image[0, 0:3, 0:5, 0:5] = 1  # pancreas cut by the scan's edge: the crop may hide more of it
    predictor = phantom_predictor(WindowSettings(batch_size=4, region=True))
    predictor.predict_sliding_window_return_logits(image)
    assert predictor.window_stats.fallback == AT_BORDER
    assert predictor.window_stats.full == predictor.window_stats.tiles


def test_running_out_of_gpu_memory_halves_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    image = phantom()
    expected = phantom_predictor(None).predict_sliding_window_return_logits(image)
    predictor = phantom_predictor(WindowSettings(batch_size=8, region=False))
    real = predictor._network_batch

    def small_memory(x: torch.Tensor):  # type: ignore[no-untyped-def]
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(predictor, "_network_batch", small_memory)
    logits = predictor.predict_sliding_window_return_logits(image)
    assert predictor.window.batch_size == 2
    assert torch.equal(labels(logits), labels(expected))


def test_padded_batches_keep_one_shape_and_the_answer() -> None:
    """On a GPU every batch is filled up to the batch size (one shape for cuDNN to tune), padding ignored."""
    image = phantom()
    expected = phantom_predictor(None).predict_sliding_window_return_logits(image)
    predictor = phantom_predictor(WindowSettings(batch_size=8, region=True, pad_batches=True))
    shapes: set[int] = set()
    predictor.network.register_forward_hook(lambda module, args, out: shapes.add(args[0].shape[0]))
    logits = predictor.predict_sliding_window_return_logits(image)
    assert shapes == {8}
    assert torch.equal(labels(logits), labels(expected))


def test_compiled_forward_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict.compile``: the batched forward pass (segmentation and class logits of the multi-task
    network) goes through torch.compile once; the eager backend stands in for inductor here."""
    real_compile = torch.compile
    compiled: list[object] = []

    def eager_compile(fn, **kwargs):  # type: ignore[no-untyped-def]
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    image = _image(4)
    plain = make_predictor()
    plain.window = WindowSettings(batch_size=4, region=False)
    expected = plain.predict_sliding_window_return_logits(image)
    fast = make_predictor()
    fast.window = WindowSettings(batch_size=4, region=False, compile=True)
    logits = fast.predict_sliding_window_return_logits(image)
    fast.predict_sliding_window_return_logits(image)
    assert len(compiled) == 1
    torch.testing.assert_close(logits, expected)
    np.testing.assert_allclose(fast.case_class_probabilities[0], plain.case_class_probabilities[0], atol=1e-6)
