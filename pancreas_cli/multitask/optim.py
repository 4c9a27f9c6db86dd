"""Optimizer of the multi-task network: nnU-Net's SGD for encoder and decoder, AdamW for the head.

Why two: the head is a fresh MLP on encoder features that only become informative once the
decoder has found the lesion, late in training. Under nnU-Net's SGD its step size is
``lambda * lr``, already decayed by the poly schedule by then, and a probe on a trained
encoder showed it lagging far behind what its features allow (BENCHMARKS.md). AdamW's step does
not depend on the loss weight lambda, so the head tracks the features while lambda only sets how
strongly the subtype loss shapes the shared encoder.

Both are fused (one kernel per step) on the CPU and CUDA. Fused optimizers also take the gradient
scaler's inf flag on the device, so a mixed-precision step needs no read-back to decide whether to
skip (see the trainer's ``train_step``). The fused SGD is nnU-Net's update: its momentum
buffers start at zero, which gives the first step's ``buffer = gradient`` without the fused kernel
creating them uninitialised (and leaving them so when the scaler skips that first step).

:class:`MultiTaskOptimizer` exposes what nnU-Net's loop, checkpoints and ``torch.amp.GradScaler``
use of an optimizer (``param_groups``, ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``);
:class:`MultiTaskPolyLR` applies nnU-Net's poly schedule to both with their own initial rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from pancreas_cli.exceptions import TrainError

HEAD_WEIGHT_DECAY = 1e-2  # AdamW's default; the head is small and sees few cases


class MultiTaskOptimizer:
    """SGD over the segmentation parameters and AdamW over the head's, stepped together.

    ``param_groups[0]`` is the segmentation group, whose learning rate nnU-Net logs.
    """

    def __init__(self, segmentation: torch.optim.Optimizer, head: torch.optim.Optimizer) -> None:
        self.segmentation = segmentation
        self.head = head

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.segmentation, self.head

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.segmentation.param_groups + self.head.param_groups

    def segmentation_parameters(self) -> Iterable[torch.Tensor]:
        return (p for group in self.segmentation.param_groups for p in group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"segmentation": self.segmentation.state_dict(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"segmentation", "head"}:
            raise TrainError(
                "the checkpoint's optimizer state is not a multi-task one (saved by another trainer or an "
                "older pancseg); train this fold again with --force"
            )
        for optimizer, part in zip(self.optimizers, ("segmentation", "head")):
            # The checkpoint restores its hyper-parameters, not how this machine runs the update.
            implementation = [(g["fused"], g["foreach"]) for g in optimizer.param_groups]
            optimizer.load_state_dict(state[part])
            _restore_implementation(optimizer, implementation)
        _zero_momentum(self.segmentation)  # parameters without a buffer in older checkpoints


class MultiTaskPolyLR:
    """nnU-Net's poly learning-rate decay on both optimizers, each from its own initial rate."""

    def __init__(self, optimizer: MultiTaskOptimizer, initial_lr: float, head_lr: float, max_steps: int) -> None:
        self.schedulers = (
            PolyLRScheduler(optimizer.segmentation, initial_lr, max_steps),
            PolyLRScheduler(optimizer.head, head_lr, max_steps),
        )

    def step(self, current_step: int | None = None) -> None:
        for scheduler in self.schedulers:
            scheduler.step(current_step)


def build_optimizer(
    network: torch.nn.Module, head: torch.nn.Module, initial_lr: float, head_lr: float, weight_decay: float,
    max_steps: int,
) -> tuple[MultiTaskOptimizer, MultiTaskPolyLR]:
    """nnU-Net's SGD (momentum 0.99, Nesterov) for everything but ``head``, AdamW for ``head``."""
    head_ids = {id(p) for p in head.parameters()}
    segmentation = [p for p in network.parameters() if id(p) not in head_ids]
    # Fused where torch has the kernels (CPU and CUDA): one kernel per step, and no sync under the
    # gradient scaler (module docstring).
    fused = all(p.device.type in ("cpu", "cuda") for p in network.parameters()) or None
    optimizer = MultiTaskOptimizer(
        torch.optim.SGD(segmentation, initial_lr, weight_decay=weight_decay, momentum=0.99, nesterov=True,
                        fused=fused),
        torch.optim.AdamW(head.parameters(), head_lr, weight_decay=HEAD_WEIGHT_DECAY, fused=fused),
    )
    _zero_momentum(optimizer.segmentation)
    return optimizer, MultiTaskPolyLR(optimizer, initial_lr, head_lr, max_steps)


def _restore_implementation(optimizer: torch.optim.Optimizer, implementation: list[tuple[Any, Any]]) -> None:
    """Set the groups' ``fused``/``foreach`` flags back after loading a state saved with others (by an
    older pancseg, or on another device), with the step counts where fused kernels keep them."""
    for group, (fused, foreach) in zip(optimizer.param_groups, implementation):
        group["fused"], group["foreach"] = fused, foreach
        for p in group["params"] if fused else ():
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(p.device, torch.float32)


def _zero_momentum(sgd: torch.optim.SGD) -> None:
    """Give every parameter without one a zero momentum buffer (see the module docstring)."""
    for group in sgd.param_groups:
        if group["momentum"] and group["fused"]:
            for p in group["params"]:
                state = sgd.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
