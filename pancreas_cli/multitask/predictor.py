"""nnU-Net's sliding-window predictor, reporting its progress and aggregating the subtype logits of the same passes."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch._dynamo import OptimizedModule

from pancreas_cli.multitask.network import MultiTaskNet, tile_weights


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class ProgressPredictor(nnUNetPredictor):
    """nnU-Net's predictor that says how far a case's sliding window has got.

    A large or finely resampled scan takes many minutes on a CPU; ``on_progress`` (when set)
    receives a line at most every ``report_every_s`` seconds.
    """

    report_every_s = 15.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.on_progress: Callable[[str], None] | None = None
        self._model = 0  # which of the folds' weights is predicting
        self._tiles = [0, 0]  # done, total of this sliding window
        self._reported = 0.0

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        self._model = 0
        return super().predict_logits_from_preprocessed_data(data)

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        self._model += 1  # once per fold; nnU-Net's retry on the CPU after running out of memory is inside
        return super().predict_sliding_window_return_logits(input_image)

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):  # type: ignore[no-untyped-def]
        self._tiles = [0, len(slicers)]
        self._reported = time.monotonic()
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        prediction = super()._internal_maybe_mirror_and_predict(x)
        self._tiles[0] += 1
        if self.on_progress is not None and time.monotonic() - self._reported >= self.report_every_s:
            self._reported = time.monotonic()
            models = len(self.list_of_parameters)
            self.on_progress(f"{self._tiles[0]}/{self._tiles[1]} tiles"
                             + (f" (model {self._model} of {models})" if models > 1 else ""))
        return prediction


class MultiTaskPredictor(ProgressPredictor):
    """Predicts segmentations as nnU-Net does and, from the same forward passes, a subtype per case.

    Class probabilities are averaged over test-time mirrors per tile, then over tiles weighted by
    :func:`~pancreas_cli.multitask.network.tile_weights`, then over the folds of an ensemble.
    ``case_class_probabilities`` holds one vector per predicted case, in prediction order.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.case_class_probabilities: list[np.ndarray] = []
        self._weighted_sum: torch.Tensor | None = None
        self._weight_total: torch.Tensor | None = None

    def _multitask_net(self) -> MultiTaskNet:
        net = unwrap(self.network)
        if not isinstance(net, MultiTaskNet):
            raise TypeError(f"MultiTaskPredictor needs a MultiTaskNet, got {type(net).__name__}")
        return net

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        net = self._multitask_net()
        net.class_logits_sink = []
        try:
            prediction = super()._internal_maybe_mirror_and_predict(x)
            logits = net.class_logits_sink
        finally:
            net.class_logits_sink = None
        probs = torch.stack([torch.softmax(item.float(), dim=1) for item in logits]).mean(0)  # (B, K)
        weights = tile_weights(prediction, net.regions)  # (B,)
        contribution = (weights[:, None] * probs).sum(0)
        if self._weighted_sum is None or self._weight_total is None:
            self._weighted_sum, self._weight_total = contribution, weights.sum()
        else:
            self._weighted_sum = self._weighted_sum + contribution
            self._weight_total = self._weight_total + weights.sum()
        return prediction

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """One case through every fold: nnU-Net averages the logits, this averages the fold probabilities."""
        before = len(self.case_class_probabilities)
        logits = super().predict_logits_from_preprocessed_data(data)
        per_fold = self.case_class_probabilities[before:]
        del self.case_class_probabilities[before:]
        self.case_class_probabilities.append(np.mean(per_fold, axis=0))
        return logits

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):  # type: ignore[no-untyped-def]
        # Reset here, not in the public method: nnU-Net retries this on CPU after running out of memory.
        self._weighted_sum = self._weight_total = None
        logits = super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        if self._weighted_sum is None or self._weight_total is None:
            raise RuntimeError("no tile was predicted")
        self.case_class_probabilities.append((self._weighted_sum / self._weight_total).float().cpu().numpy())
        return logits
