"""A segmentation network from nnU-Net's plans with a classification head on its encoder.

The encoder runs once per forward pass and feeds both nnU-Net's decoder and the head. ``forward``
returns only what nnU-Net expects (segmentation logits, or the deep-supervision list), so nnU-Net's
predictor, validation and checkpoints keep working. The class logits of the same pass come from
:meth:`MultiTaskNet.forward_multitask`, from ``forward`` while ``return_class_logits`` is set (the
trainer's steps, which must call the possibly DDP-wrapped module itself), or are appended to
``class_logits_sink`` when that is a list (tile-wise aggregation in sliding-window inference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pancreas_cli.multitask.settings import Pooling, TrainingSettings

# CUDA's bmm from half-precision inputs to float32 output (torch >= 2.8; pancseg allows older).
_HALF_BMM = "dtype" in torch.ops.aten.bmm.overloads()
_DEFAULTS = TrainingSettings()  # the head's defaults are the train.head_* settings'


@dataclass(frozen=True)
class HeadSettings:
    """The classification head, stored in the plans so inference rebuilds the same network.

    ``stages`` index encoder stages (0 = full resolution); negative values count from the
    bottleneck. Shallow stages carry subtype texture, so the default mixes shallow and deep ones.
    ``pooling="attention"`` adds lesion- and pancreas-weighted averages (weights = the decoder's
    probabilities) to the plain global average, so a small lesion is not diluted by the patch.
    ``pancreas`` (with attention pooling) adds pancreas-level features and the lesion gate
    (:class:`PancreasFeatures`), so the subtype does not wait for the decoder to find the lesion.
    ``pancreas_version`` says which of those features: 1 (the first), 2 (with the input relative
    to the pancreas' own mean, and a larger shortcut gain), 3 (with the input's fine texture by
    relative intensity); a checkpoint must be read with the features it was trained on.
    """

    stages: tuple[int, ...] = tuple(_DEFAULTS.head_stages)
    pooling: Pooling = _DEFAULTS.head_pooling
    hidden: int = _DEFAULTS.head_hidden
    dropout: float = _DEFAULTS.head_dropout
    pancreas: bool = _DEFAULTS.head_pancreas
    num_classes: int = 3
    pancreas_version: int = 3

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> HeadSettings:
        """From the plans' ``pancseg_head``; plans without ``pancreas`` are older pancseg's, whose head
        had no pancreas-level features, and plans without ``pancreas_version`` had the first ones (so
        their checkpoints load into the network they were saved from)."""
        data = dict(data or {})
        data.setdefault("pancreas", False)
        data.setdefault("pancreas_version", 1)
        if "stages" in data:
            data["stages"] = tuple(int(s) for s in data["stages"])
        return cls(**data)

    @classmethod
    def for_training(cls, head: dict[str, Any]) -> HeadSettings:
        """A new head from the ``train.head_*`` settings (``TrainingSettings.head()``): this pancseg's features."""
        return cls(**{**head, "stages": tuple(int(s) for s in head["stages"])})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stages": list(self.stages)}


def _stage_maps(attention: torch.Tensor | None, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per stage of ``features`` (B,C,*S, finest first), the weight maps (B,P,N) over its N voxels
    whose weighted averages the head takes: ones (the plain average), then each of the K maps in
    ``attention`` (B,K,*S) pooled to the stage's size, so P = 1 + K (without attention P = 1).

    Each stage's maps are pooled from the previous, finer stage's (the same average where the sizes
    divide, as nnU-Net's strides make them), not again from the full resolution. The ones go through
    the same pooling instead of a ``full`` and ``cat`` per stage: on a GPU every operation is a launch,
    and the step is partly bound by them.
    """
    if attention is None:
        return [f.new_ones(len(f), 1, f.shape[2:].numel()) for f in features]
    maps = attention.float()
    stages = []
    for i, shape in enumerate(f.shape[2:] for f in features):
        if maps.shape[2:] != shape:
            maps = (F.adaptive_avg_pool3d if maps.ndim == 5 else F.adaptive_avg_pool2d)(maps, shape)
        if i == 0:
            maps = torch.cat([torch.ones_like(maps[:, :1]), maps], dim=1)
        stages.append(maps.flatten(2))
    return stages


class _HalfProduct(torch.autograd.Function):
    """``features (B,C,N) @ maps (B,P,N)^T`` from half-precision inputs, summed and returned in float32
    (CUDA's ``bmm`` with ``out_dtype``, which has no derivative in torch); the features' gradient comes
    back in their own dtype, contiguous."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(maps)
        return torch.bmm(flat, maps.transpose(1, 2), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (maps,) = ctx.saved_tensors
        return torch.bmm(grad.to(maps.dtype), maps), None  # the maps are the detached decoder's


def _pool(features: torch.Tensor, maps: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The weighted averages of ``features`` (B,C,*S) by each of ``maps`` (B,P,N), as (B,P*C), map by
    map: one product of the features with the maps, divided by each map's sum (+``eps``).

    The sums run over up to a few hundred thousand voxels, which half precision cannot hold, so they
    accumulate in float32. On a GPU under autocast the features are float16: there the product reads
    them as they are and only accumulates in float32; a float32 copy of the finest stage (and the cast
    of its gradient back) makes its pooling 1.43 instead of 0.57 ms per step on an H200 (BENCHMARKS.md).
    Elsewhere, as on the CPU, whose ``bmm`` has no float32-output kernel for half inputs, all of it
    runs in float32.
    """
    flat = features.flatten(2)  # B,C,N
    if _HALF_BMM and flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16):
        maps = maps.to(flat.dtype)
        sums = _HalfProduct.apply(flat, maps)
    else:
        maps = maps.float()
        # (B,C,N) @ (B,N,P), not (B,P,N) @ (B,N,C): the features' gradient then comes back contiguous.
        sums = torch.bmm(flat.float(), maps.transpose(1, 2))
    totals = maps.sum(2, dtype=torch.float32).unsqueeze(1)  # B,1,P
    return (sums / (totals + eps)).transpose(1, 2).flatten(1)  # B,P*C


class RunningStandardize(nn.Module):
    """Per-feature standardisation by running mean and variance, in training as in inference.

    The pooled features differ between subtypes by small amounts on top of large common offsets;
    without per-feature centring and scaling a small MLP needs several times more steps to fit
    them (BENCHMARKS.md), and the head only gets the last part of training once the lesion is
    found. BatchNorm would do this from batch statistics, which at nnU-Net's batch size of 2 are
    noise; here the running statistics (a cumulative average for the first ``1 / momentum``
    batches, then an exponential one that follows the training encoder) normalise every batch,
    and no gradient flows through them. They are buffers, so checkpoints carry them to inference.
    """

    def __init__(self, features: int, momentum: float = 0.05, eps: float = 1e-4) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("mean_square", torch.ones(features))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few operations: on a GPU each is a launch, and the step is partly bound by them.
        if self.training:
            with torch.no_grad():
                # A tensor, not float(self.batches): reading the counter would sync the GPU every step.
                rate = (self.batches + 1).reciprocal().clamp_min_(self.momentum)
                variance, mean = torch.var_mean(x.detach().float(), 0, correction=0)
                self.mean_square.lerp_(torch.addcmul(variance, mean, mean), rate)
                self.mean.lerp_(mean, rate)
                self.batches += 1
        variance = torch.addcmul(self.mean_square, self.mean, self.mean, value=-1).clamp_min_(0)
        # (x - mean) / sqrt(variance + eps) as one kernel, and one for its gradient.
        return F.batch_norm(x, self.mean, variance, training=False, eps=self.eps)


#: Centres of the soft histogram of the input inside the pancreas, in nnU-Net's normalised CT units
#: (z-scores of the foreground's HU): the lesion's attenuation shows as mass in the low or high bins.
HISTOGRAM_CENTRES = tuple(-3.0 + 0.75 * k for k in range(9))
#: Centres of the soft histogram of the input minus the pancreas' own mean, inside the pancreas (features
#: version 2): a lesion shows as mass below 0 whatever the pancreas' attenuation (which varies with the
#: contrast phase and the scanner, and with nnU-Net's brightness augmentation); finer than the absolute
#: bins, since subtypes differ by tens of HU (a z-unit of the foreground is ~35 HU).
RELATIVE_CENTRES = tuple(-4.0 + 0.5 * k for k in range(11))
#: The shortcut's logits are its linear layer's times this (the layer starts at zero): AdamW's step is
#: about the learning rate whatever the gradient, so this is the shortcut's own, larger learning rate
#: (no optimizer group of its own): the subtype must be learnt in the few hundred steps after the
#: pancreas is found. By features version (a checkpoint's shortcut was trained with its version's gain):
#: 30 since version 2 (BENCHMARKS.md: at 600 iterations it did better in 3 of 4 paired runs).
SHORTCUT_GAINS = {1: 10.0, 2: 30.0, 3: 30.0}
#: Share of training items whose lesion gate is closed at random, so the head also learns to classify
#: from pancreas-level features alone once the decoder finds the lesion (as at test time when it misses it).
GATE_DROPOUT = 0.25


def lesion_gate(lesion: torch.Tensor) -> torch.Tensor:
    """How much the lesion-attention features count, per item (B,): 0 while no voxel of the lesion map
    (B,1,*S) reaches probability 0.5 (no confident lesion: they average noise), rising to 1 at 1."""
    return (lesion.flatten(1).amax(1) * 2 - 1).clamp(0, 1)


class PancreasFeatures(nn.Module):
    """Features of the predicted whole pancreas that exist before the lesion is segmented.

    The decoder finds the pancreas within the first epochs and the lesion much later (BENCHMARKS.md), and
    a region model (the default) keeps a lesion it misses mostly inside the predicted whole pancreas (a
    label model calls much of it background): there an unsegmented lesion still
    shifts the input's mean, second moment and histogram (linear bins at :data:`HISTOGRAM_CENTRES`), and
    the second moment of the first head stage's features (texture). The lesion fraction of the pancreas
    and the gate are features too. Version 2 adds the input's histogram relative to the pancreas' own
    mean (:data:`RELATIVE_CENTRES`). Version 3 adds the input's fine texture (its variance within each
    voxel of the first head stage's grid, which the pooling to that grid averages away) over the pancreas
    and per relative-intensity bin: a lesion's texture and its border show in the bins of its intensity
    (zero when the first head stage is the full resolution: the head's stages should not start at 0).
    All of it at the first head stage's resolution, whose pancreas map the attention pooling has already
    made: cheap next to the encoder (BENCHMARKS.md).
    """

    def __init__(self, in_channels: int, first_stage_channels: int, version: int = 3) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor(HISTOGRAM_CENTRES), persistent=False)
        self.register_buffer("relative_centres", torch.tensor(RELATIVE_CENTRES), persistent=False)
        self.relative, self.texture = version >= 2, version >= 3
        self.size = 2 * in_channels * (2 + len(HISTOGRAM_CENTRES)) + first_stage_channels + 2
        self.size += in_channels * len(RELATIVE_CENTRES) if self.relative else 0
        self.size += in_channels * (1 + len(RELATIVE_CENTRES)) if self.texture else 0

    def forward(self, image: torch.Tensor, first: torch.Tensor, maps: torch.Tensor,
                gate: torch.Tensor) -> torch.Tensor:
        """(B, size) from the input (B,Cin,*S), the first head stage (B,C,*s) and its weight maps (B,3,n)
        (plain, lesion, pancreas: :func:`_stage_maps`). The input's statistics are taken over the whole
        patch too: they exist before the decoder has found even the pancreas."""
        shrink = F.adaptive_avg_pool3d if image.ndim == 5 else F.adaptive_avg_pool2d
        image = image.float()
        x = shrink(image, first.shape[2:]).flatten(2)  # B,Cin,n
        values = torch.cat([x, x * x, _soft_bins(x, self.centres)], dim=1)
        pooled = _pool(values, maps[:, 0::2])  # over the patch, then over the pancreas (values.shape[1] each)
        totals = maps.sum(2)  # B,3
        fraction = totals[:, 1] / (totals[:, 2] + 1.0)
        parts = [pooled, _pool(first.float() ** 2, maps[:, 2:3])]
        if self.relative:
            mean = pooled[:, values.shape[1] : values.shape[1] + x.shape[1]]  # the input's mean in the pancreas
            bins = _soft_bins(x - mean.unsqueeze(2), self.relative_centres)  # B,Cin*K,n
            histogram = _pool(bins, maps[:, 2:3])
            parts.append(histogram)
            if self.texture:
                parts += self._texture(shrink(image * image, first.shape[2:]).flatten(2) - x * x, bins, histogram,
                                       maps[:, 2:3])
        return torch.cat([*parts, fraction.unsqueeze(1), gate.unsqueeze(1)], dim=1)

    def _texture(self, variance: torch.Tensor, bins: torch.Tensor, histogram: torch.Tensor,
                 pancreas: torch.Tensor) -> list[torch.Tensor]:
        """From the input's variance within each coarse voxel (B,Cin,n: the pooled square minus the pooled
        value's square), its average over the pancreas (B,Cin) and per relative-intensity bin (B,Cin*K; the
        bin's share of the pancreas, ``histogram``, divided out)."""
        variance = variance.clamp_min(0)  # rounding
        by_bin = _pool(bins * variance.repeat_interleave(len(self.relative_centres), dim=1), pancreas)
        return [_pool(variance, pancreas), by_bin / (histogram + 1e-3)]


def _soft_bins(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Linear (triangle) histogram memberships of ``x`` (B,C,n) in equally spaced bins, as (B,C*K,n)."""
    step = centres[1] - centres[0]
    return (1 - (x.unsqueeze(2) - centres.view(1, 1, -1, 1)).abs() / step).clamp_min(0).flatten(1, 2)


class ClassificationHead(nn.Module):
    """Pooled features of several encoder stages -> standardised -> MLP with dropout -> class logits.

    With pancreas features the lesion-attention columns are multiplied by the lesion gate after the
    standardisation (0 = the average case, which the MLP reads as "no lesion evidence"), and a linear
    layer on the standardised pancreas features adds its logits to the MLP's: a few dozen features
    that a linear model fits in a few hundred steps, where the MLP on all of them needs many more.
    """

    def __init__(self, stage_channels: list[int], settings: HeadSettings, in_channels: int = 1) -> None:
        super().__init__()
        self.settings = settings
        poolings = 3 if settings.pooling == "attention" else 1
        in_features = sum(stage_channels) * poolings
        self.pancreas: PancreasFeatures | None = None
        if settings.pancreas and settings.pooling == "attention":
            if settings.pancreas_version not in SHORTCUT_GAINS:
                raise ValueError(f"head features version {settings.pancreas_version} is not one this pancseg knows "
                                 f"({', '.join(map(str, SHORTCUT_GAINS))}): the model needs a newer pancseg")
            self.pancreas = PancreasFeatures(in_channels, stage_channels[0], settings.pancreas_version)
            # _pool's order per stage: plain, lesion-weighted, pancreas-weighted averages (C each).
            columns = torch.cat([torch.arange(3 * c) // c == 1 for c in stage_channels])
            columns = torch.cat([columns, torch.zeros(self.pancreas.size, dtype=torch.bool)])
            self.register_buffer("lesion_columns", columns, persistent=False)
            in_features += self.pancreas.size
            self.shortcut = nn.Linear(self.pancreas.size, settings.num_classes)
            nn.init.zeros_(self.shortcut.weight)
            nn.init.zeros_(self.shortcut.bias)
        self.mlp = nn.Sequential(
            RunningStandardize(in_features),
            nn.Dropout(settings.dropout),
            nn.Linear(in_features, settings.hidden),
            nn.GELU(),
            nn.Dropout(settings.dropout),
            nn.Linear(settings.hidden, settings.num_classes),
        )

    @property
    def shortcut_gain(self) -> float:
        """What the shortcut layer's output is multiplied by (:data:`SHORTCUT_GAINS`, by features version)."""
        return SHORTCUT_GAINS[self.settings.pancreas_version]

    def forward(self, features: list[torch.Tensor], attention: torch.Tensor | None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits from encoder stage outputs; ``attention``: (lesion, pancreas) maps as (B,2,*S);
        ``image``: the network's input (B,Cin,*S), needed for the pancreas features."""
        if self.settings.pooling == "attention" and attention is None:
            raise ValueError("attention pooling needs the segmentation probabilities")
        if self.pancreas is not None and image is None:
            raise ValueError("pancreas features need the network's input image")
        weights = attention if self.settings.pooling == "attention" else None
        # Autocast off: the pooling sums in float32 (see _pool), and the MLP is too small for half
        # precision to gain anything but the casts of its inputs, weights and gradients (launches).
        with torch.autocast(features[0].device.type, enabled=False):
            maps = _stage_maps(weights, features)
            pooled = torch.cat([_pool(f, m) for f, m in zip(features, maps)], dim=1)
            if self.pancreas is None:
                return self.mlp(pooled)
            return self._gated(pooled, features[0], maps[0], image, attention)

    def _gated(self, pooled: torch.Tensor, first: torch.Tensor, maps: torch.Tensor, image: torch.Tensor,
               attention: torch.Tensor) -> torch.Tensor:
        gate = lesion_gate(attention[:, :1])
        if self.training:  # see GATE_DROPOUT
            gate = gate * (torch.rand_like(gate) >= GATE_DROPOUT)
        extra = self.pancreas(image, first, maps, gate)
        z = self.mlp[0](torch.cat([pooled, extra], dim=1))
        shortcut = self.shortcut(z[:, -extra.shape[1]:]) * self.shortcut_gain
        z = torch.where(self.lesion_columns, z * gate.unsqueeze(1), z)
        for layer in list(self.mlp)[1:]:  # not self.mlp[1:]: that builds a new Sequential every step
            z = layer(z)
        return z + shortcut


class MultiTaskNet(nn.Module):
    """nnU-Net's encoder-decoder (``encoder``/``decoder`` kept as attributes) plus a subtype head.

    ``regions``: the decoder predicts sigmoid regions (pancreas=[1,2], lesion=[2]) instead of
    softmax labels; this decides how the attention weights are read from its output.
    """

    def __init__(self, seg_network: nn.Module, settings: HeadSettings, regions: bool = False,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.encoder = seg_network.encoder
        self.decoder = seg_network.decoder
        self.settings = settings
        self.regions = regions
        channels = list(self.encoder.output_channels)
        n = len(channels)
        self.stage_indices = sorted({s % n for s in settings.stages})
        if any(not -n <= s < n for s in settings.stages):
            raise ValueError(f"head stages {settings.stages} out of range for {n} encoder stages")
        self.head = ClassificationHead([channels[i] for i in self.stage_indices], settings, in_channels)
        self.return_class_logits = False
        self.class_logits_sink: list[torch.Tensor] | None = None
        self._initialize = getattr(seg_network, "initialize", None)

    def initialize(self, module: nn.Module) -> None:
        """nnU-Net's weight init for the segmentation parts (``network.apply(network.initialize)``)."""
        if self._initialize is not None:
            self._initialize(module)

    def _attention(self, seg_logits: torch.Tensor) -> torch.Tensor:
        """(lesion, pancreas) probabilities as (B,2,*S), detached: the class loss must not reshape the masks."""
        return torch.cat(structure_probabilities(seg_logits.detach(), self.regions), dim=1)

    def forward_multitask(self, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Segmentation output (as ``forward``) and class logits from one encoder pass."""
        skips = self.encoder(x)
        seg = self.decoder(skips)
        full_res = seg[0] if isinstance(seg, (list, tuple)) else seg
        return seg, self.classify(full_res, [skips[i] for i in self.stage_indices], x)

    def classify(self, seg: torch.Tensor, features: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Class logits from the full-resolution segmentation logits, the encoder features of
        ``stage_indices`` and the input (so an inference runtime can compute the rest)."""
        attention = self._attention(seg) if self.settings.pooling == "attention" else None
        return self.head(features, attention, x)

    def forward(self, x: torch.Tensor) -> Any:
        seg, logits = self.forward_multitask(x)
        if self.return_class_logits:
            return seg, logits
        self._collect(logits)
        return seg

    @torch.compiler.disable
    def _collect(self, logits: torch.Tensor) -> None:
        # Outside torch.compile: a traced append guards on the sink's length, so every test-time
        # mirror (up to 8 per tile) would compile the whole network again.
        if self.class_logits_sink is not None:
            self.class_logits_sink.append(logits.detach())


def structure_probabilities(seg_logits: torch.Tensor, regions: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lesion, whole pancreas) probability maps (B,1,*S) from segmentation logits."""
    if regions:
        probs = torch.sigmoid(seg_logits.float())
        return probs[:, 1:2], probs[:, 0:1]
    probs = torch.softmax(seg_logits, dim=1, dtype=torch.float32)  # the cast inside: one full-size pass less
    return probs[:, 2:3], probs[:, 1:3].sum(1, keepdim=True)


def lesion_found(seg_logits: torch.Tensor, regions: bool) -> bool:
    """Whether a case's segmentation logits (C,*S) predict any lesion voxel (as its mask will, on the
    network's grid): when none, the subtype came from the pancreas-level features alone."""
    if regions:
        return bool((seg_logits[1] > 0).any())
    return bool((seg_logits.argmax(0) == 2).any())


def tile_weights(seg_logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """How much a tile's class logits count when a case's tiles are aggregated, per batch item.

    The subtype is a property of the lesion: tiles count by their predicted lesion fraction, plus a
    tenth of their pancreas fraction (so a case whose lesion is missed still gets a vote from its
    pancreas), plus a tiny floor so that a case without either still averages all tiles.
    """
    lesion, pancreas = structure_probabilities(seg_logits, regions)
    dims = tuple(range(1, lesion.ndim))
    return lesion.mean(dims) + 0.1 * pancreas.mean(dims) + 1e-6


def build_multitask_network(
    plans_manager: Any,
    configuration_manager: Any,
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool = True,
) -> MultiTaskNet:
    """Build the plans' architecture and wrap it; head settings come from the configuration's
    ``pancseg_head`` entry (written by the trainer, so the predictor rebuilds the same head)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    seg = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=enable_deep_supervision,
    )
    settings = HeadSettings.from_dict(configuration_manager.configuration.get("pancseg_head"))
    # Labels need background + pancreas + lesion outputs; regions (pancreas=[1,2], lesion=[2]) two.
    return MultiTaskNet(seg, settings, regions=num_output_channels == 2, in_channels=num_input_channels)
