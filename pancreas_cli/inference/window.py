"""The pieces of pancseg's sliding window that do not need a network: mirrors, tile choice, batches.

nnU-Net's window runs every tile through the network 8 times (test-time mirroring over three axes),
one pass at a time. pancseg's window computes the same average with two changes that leave the
answer alone (see :class:`~pancreas_cli.multitask.predictor.ProgressPredictor`):

- the passes go through the network in batches (a batch of 1 takes torch's slow convolution path
  on a CPU, and launches few, small kernels on a GPU);
- a first pass (the un-mirrored one, which is one of the 8) covers every tile; the other 7 mirrors
  run only on tiles within ``margin`` voxels of what that first pass calls foreground. Every voxel
  within the margin is covered only by fully mirrored tiles, so it gets exactly nnU-Net's average;
  beyond it, tiles keep their un-mirrored prediction. The first pass's last batch is filled up with
  the first mirrors, which only the tiles that get mirrored keep.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only tensors pass through here: predict's module stays importable without torch
    import torch

#: Why the whole volume got the full mirrored window although region restriction was on.
NOTHING_FOUND = "the first pass found no foreground"
AT_BORDER = "the first pass found foreground at the volume's border"


def mirror_combinations(axes: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    """The flips of a tile in nnU-Net's order: none first, then single axes, pairs, all three.

    ``axes`` are spatial axes (0-based, as in the plans); the result holds tensor dims (+2).
    """
    dims = [a + 2 for a in axes or ()]
    return [(), *(c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1))]


def foreground(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """Voxels (bool, spatial shape) whose label would not be background, from (C, *S) logits."""
    if regions:  # sigmoid(x) > 0.5 for any region
        return (logits > 0).any(0)
    return logits.argmax(0) != 0


def touches_border(mask: torch.Tensor) -> bool:
    """Whether any True voxel lies on a face of the volume."""
    for dim in range(mask.ndim):
        if mask.select(dim, 0).any() or mask.select(dim, mask.shape[dim] - 1).any():
            return True
    return False


def tiles_near(mask: torch.Tensor, slicers: list[tuple[slice, ...]], margin: tuple[int, ...]) -> list[bool]:
    """Per tile: does the tile, grown by ``margin`` voxels per axis, hold a True voxel of ``mask``?

    ``slicers`` are nnU-Net's (a channel slice, then one slice per spatial axis).
    """
    keep = []
    for sl in slicers:
        grown = tuple(slice(max(0, s.start - m), s.stop + m) for s, m in zip(sl[1:], margin))
        keep.append(bool(mask[grown].any()))
    return keep


@dataclass
class WindowStats:
    """What one sliding window over one case computed (summed over the folds of an ensemble)."""

    tiles: int = 0  # tiles in the window (per fold)
    full: int = 0  # of those, tiles that got every mirrored pass
    passes: int = 0  # network passes (one per tile and mirror) actually computed
    stock_passes: int = 0  # passes nnU-Net's own window would compute
    fallback: str | None = None  # why region restriction did not apply, if it was on
    notes: list[str] = field(default_factory=list)

    def add(self, other: WindowStats) -> None:
        self.tiles += other.tiles
        self.full += other.full
        self.passes += other.passes
        self.stock_passes += other.stock_passes
        self.fallback = self.fallback or other.fallback

    def describe(self) -> str:
        """E.g. ``12/45 tiles mirrored, 33 skipped (129 of nnU-Net's 360 passes)``."""
        if self.passes == self.tiles:  # no mirroring: every tile is one pass
            return f"{self.tiles} tiles"
        text = f"{self.full}/{self.tiles} tiles mirrored, {self.tiles - self.full} skipped"
        text += f" ({self.passes} of nnU-Net's {self.stock_passes} passes)"
        return text + (f"; {self.fallback}: whole volume" if self.fallback else "")


def batches(items: list, size: int) -> list[list]:
    """``items`` in consecutive groups of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]
