"""The subtype head's linear shortcut, refitted at the end of training on the training cases as inference sees them.

The head learns from augmented patches (nnU-Net's noise, blur, low-resolution and intensity
augmentations change exactly the pancreas' intensity and texture statistics the shortcut reads) in the
few hundred steps after the decoder finds the pancreas: at a short budget it underfits (right on 0.67-0.81
of its own training cases where a linear model on the same features reaches 0.81-0.93; BENCHMARKS.md).
So once training ends the final network predicts each training case once, un-augmented (nnU-Net's
sliding window, un-mirrored), and the shortcut is refitted to those cases' subtypes: a maximum-likelihood
fit of the case-level probabilities, aggregated over tiles as inference does, with the MLP's logits held
fixed and an L2 penalty on the distance from the trained shortcut (a prior centred on what training
found). Where the head already fits its training cases (the lesion found, a long budget) it barely
moves; where it underfits it moves as far as they ask. A penalty towards zero instead lost macro-F1 at
the default budget (BENCHMARKS.md). The MLP keeps what it learnt from the lesion; the fit is convex in
the shortcut, so it is deterministic and takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pancreas_cli.multitask.network import ClassificationHead, MultiTaskNet, tile_weights
from pancreas_cli.multitask.predictor import MultiTaskPredictor, unwrap

#: Inverse L2 strength of the fit, as scikit-learn's ``C`` (penalty ``|W - W_trained|^2 / (2 C n)`` for n
#: cases, on standardised features and logits): chosen on held-out synthetic cases (BENCHMARKS.md).
REFIT_C = 1.0
#: Fewer training cases than this, or a single subtype among them: the trained shortcut is kept.
MIN_CASES = 6


@dataclass
class CaseTiles:
    """One case's tiles as the head saw them: the MLP's logits (T,K), the standardised pancreas
    features the shortcut reads (T,F) and the tiles' aggregation weights (T,)."""

    offsets: np.ndarray
    features: np.ndarray
    weights: np.ndarray


@dataclass
class RefitResult:
    cases: int
    accuracy_before: float  # on the training cases, un-augmented, with the trained shortcut
    accuracy_after: float
    skipped: str = ""  # why the trained shortcut was kept


class _TileRecorder(MultiTaskPredictor):
    """nnU-Net's plain window (one network pass per tile, in order) recording what the head's shortcut read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tiles: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._shortcut: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._shortcut.append((inputs[0].detach().float(), output.detach().float()))

    def _tile_done(self, prediction: torch.Tensor, class_logits: list[torch.Tensor]) -> None:
        super()._tile_done(prediction, class_logits)
        (features, shortcut), = self._shortcut  # un-mirrored: one pass per tile
        self._shortcut.clear()
        net = self._multitask_net()
        offsets = class_logits[0].float() - shortcut * net.head.shortcut_gain
        self.tiles.append((offsets, features, tile_weights(prediction, net.regions)))


def shortcut_of(network: torch.nn.Module) -> ClassificationHead | None:
    """The network's head if it has a shortcut to refit (pancreas features), else None."""
    net = unwrap(network)
    head = net.head if isinstance(net, MultiTaskNet) else None
    return head if head is not None and head.pancreas is not None else None


@torch.inference_mode()
def collect(predictor: MultiTaskPredictor, cases: Iterable[torch.Tensor]) -> list[CaseTiles]:
    """Each preprocessed case (C,*S) through ``predictor``'s network (a :func:`recorder`), tiles as nnU-Net's window."""
    assert isinstance(predictor, _TileRecorder)
    head = shortcut_of(predictor.network)
    assert head is not None
    handle = head.shortcut.register_forward_hook(predictor.hook)
    found = []
    try:
        for data in cases:
            predictor.tiles.clear()
            predictor.predict_sliding_window_return_logits(data)
            offsets, features, weights = (torch.cat(parts).cpu().double().numpy() for parts in zip(*predictor.tiles))
            found.append(CaseTiles(offsets, features, weights))
    finally:
        handle.remove()
    return found


def recorder(network: torch.nn.Module, plans_manager: Any, configuration_manager: Any, dataset_json: dict,
             trainer_name: str, device: torch.device) -> MultiTaskPredictor:
    """A predictor for :func:`collect` on ``network`` (in memory, as nnU-Net's validation builds one)."""
    predictor = _TileRecorder(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                              perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                              verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, None, dataset_json, trainer_name,
                                    None)
    return predictor


def case_probabilities(cases: list[CaseTiles], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(n,K) case probabilities with shortcut logits ``features @ weight.T + bias`` (gain included), as
    inference aggregates them: tile probabilities weighted by the tiles' weights."""
    rows = []
    for case in cases:
        logits = torch.from_numpy(case.offsets) + torch.from_numpy(case.features) @ weight.T + bias
        w = torch.from_numpy(case.weights)
        rows.append((w[:, None] * F.softmax(logits, dim=1)).sum(0) / w.sum())
    return torch.stack(rows)


def fit_shortcut(cases: list[CaseTiles], labels: list[int], class_weights: list[float] | None,
                 c: float = REFIT_C, anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortcut's logits (weight (K,F), bias (K), gain included) that maximise the class-weighted
    likelihood of ``labels`` under :func:`case_probabilities`, with the penalty ``|weight - w0|^2 / (2 c n)``
    (``w0``: ``anchor``'s weight, else 0)."""
    k, n = cases[0].offsets.shape[1], len(cases)
    w0 = torch.zeros(k, cases[0].features.shape[1], dtype=torch.float64) if anchor is None else anchor[0].double()
    weight = w0.clone().requires_grad_(True)
    bias = (torch.zeros(k, dtype=torch.float64) if anchor is None else anchor[1].double().clone()).requires_grad_(True)
    y = torch.as_tensor(labels)
    sample = torch.ones(n, dtype=torch.float64) if class_weights is None else \
        torch.as_tensor(class_weights, dtype=torch.float64)[y]
    sample = sample / sample.sum()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        probs = case_probabilities(cases, weight, bias)
        loss = -(sample * probs[torch.arange(n), y].clamp_min(1e-12).log()).sum()
        loss = loss + ((weight - w0) ** 2).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def refit(head: ClassificationHead, cases: list[CaseTiles], labels: list[int],
          class_weights: list[float] | None) -> RefitResult:
    """Refit ``head``'s shortcut in place on ``cases`` (from :func:`collect`) and their subtypes, anchored
    at the trained shortcut."""
    gain = head.shortcut_gain
    layer = head.shortcut
    trained = (layer.weight.detach().double().cpu() * gain, layer.bias.detach().double().cpu() * gain)
    before = _accuracy(case_probabilities(cases, *trained), labels)
    if len(cases) < MIN_CASES or len(set(labels)) < 2:
        return RefitResult(len(cases), before, before, skipped=f"{len(cases)} training case(s) of "
                           f"{len(set(labels))} subtype(s): too few to refit on (at least {MIN_CASES}, of 2 subtypes)")
    weight, bias = fit_shortcut(cases, labels, class_weights, anchor=trained)
    with torch.no_grad():
        layer.weight.copy_((weight / gain).to(layer.weight))
        layer.bias.copy_((bias / gain).to(layer.bias))
    return RefitResult(len(cases), before, _accuracy(case_probabilities(cases, weight, bias), labels))


def _accuracy(probs: torch.Tensor, labels: list[int]) -> float:
    return float((probs.argmax(1) == torch.as_tensor(labels)).double().mean())
