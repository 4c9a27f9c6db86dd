"""nnU-Net's sliding-window predictor, reporting its progress and aggregating the subtype logits of the same passes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch._dynamo import OptimizedModule

from pancreas_cli.checkpoints import read_checkpoint
from pancreas_cli.exceptions import CheckpointError
from pancreas_cli.inference.backends import RuntimeNetwork
from pancreas_cli.inference.window import (AT_BORDER, NOTHING_FOUND, WindowStats, foreground, mirror_combinations,
                                           tiles_near, touches_border)
from pancreas_cli.layout import CHECKPOINT_FINAL, TRAINERS, fold_folder
from pancreas_cli.multitask.network import MultiTaskNet, build_multitask_network, lesion_found, tile_weights


@dataclass
class WindowSettings:
    """How pancseg's window runs (the answer is nnU-Net's either way; see ProgressPredictor)."""

    batch_size: int = 2  # network passes per batch (halved on running out of GPU memory)
    region: bool = True  # mirror only near the first pass's foreground
    margin_mm: float = 15.0  # how near
    keep_on_device: bool = False  # return the logits where they were computed (for an export there)
    pad_batches: bool = False  # fill the last batch up to batch_size: cuDNN then tunes one input shape, not one per
    # remainder (each new shape costs ~2 s of tuning on an H200, more than a crop's whole window; BENCHMARKS.md)
    compile: bool = False  # torch.compile the batched forward pass (pays over many cases: compiling takes minutes)
    backend: str = "torch"  # or a runtime for the CPU (pancreas_cli.inference.backends)


def network_builder(trainer_name: str) -> Callable[..., torch.nn.Module]:
    """The trainer's ``build_network_architecture``, found without nnU-Net's search for pancseg's trainers.

    The search imports every trainer module nnU-Net ships before it looks at ``nnUNet_extTrainer``:
    about 2 s of each ``pancseg predict`` on 2 cores, more than a crop's window on a GPU. Any other
    trainer (a model trained by stock nnU-Net) is still found by the search.
    """
    if trainer_name == TRAINERS["multitask"]:
        return build_multitask_network  # nnUNetTrainerMultiTask's own (pinned in tests/test_nnunet_seams.py)
    if trainer_name == TRAINERS["segmentation"]:  # nnUNetTrainerPancseg keeps nnU-Net's network
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer.build_network_architecture
    return recursive_find_trainer_class_by_name(trainer_name).build_network_architecture


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class ProgressPredictor(nnUNetPredictor):
    """nnU-Net's predictor that says how far a case's sliding window has got, with pancseg's window.

    A large or finely resampled scan takes many minutes on a CPU; ``on_progress`` (when set)
    receives a line at most every ``report_every_s`` seconds.

    With ``window`` set, :meth:`_fast_window` replaces nnU-Net's sliding window: the same tiles,
    Gaussian weights, mirrors and half-precision sums, computed in batches and, with
    ``window.region``, mirrored only near what an un-mirrored first pass calls foreground
    (:mod:`pancreas_cli.inference.window`). Without it, nnU-Net's own window runs unchanged.
    ``window_stats`` tells what the last case cost.

    Checkpoints are read by :mod:`pancreas_cli.checkpoints` (safely, unless ``trust_model``).
    """

    report_every_s = 15.0

    def __init__(self, *args: object, window: WindowSettings | None = None, trust_model: bool = False,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.trust_model = trust_model
        self.on_progress: Callable[[str], None] | None = None
        self.window = window
        self.window_stats = WindowStats()
        self._model = 0  # which of the folds' weights is predicting
        self._tiles = [0, 0]  # done, total of this sliding window
        self._reported = 0.0
        self._batch_forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._runtimes: dict[int, RuntimeNetwork] = {}  # per fold (self._model): its weights in the backend

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: tuple[int | str, ...] | str | None,
                                             checkpoint_name: str = CHECKPOINT_FINAL) -> None:
        """nnU-Net 2.8.1's, with the checkpoints read by :func:`~pancreas_cli.checkpoints.read_checkpoint`:
        nnU-Net's unpickles them whole (``weights_only=False``), so a model file could run code. It
        reads each fold's weights and the first fold's trainer name, configuration and mirroring axes
        (``tests/faults/test_model_faults.py`` checks that against nnU-Net's own)."""
        folder = Path(model_training_output_dir)
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        if isinstance(use_folds, str):
            use_folds = [use_folds]
        dataset_json = _model_json(folder / "dataset.json")
        plans_manager = PlansManager(_model_json(folder / "plans.json"))
        parameters, first = [], None
        for fold in use_folds:
            # Mapped, not read: only the network's weights are ever touched, not the optimizer state
            # beside them (half of an 820 MB ResEnc-M checkpoint): 0.5-0.7 s per fold read, 0.2 s mapped.
            checkpoint = read_checkpoint(fold_folder(folder, fold) / checkpoint_name, trust=self.trust_model,
                                         mmap=True)
            first = first or {key: checkpoint.get(key) for key in ("trainer_name", "init_args",
                                                                   "inference_allowed_mirroring_axes")}
            parameters.append(checkpoint["network_weights"])
        if first is None:
            raise ValueError(f"no folds to load from {folder}")
        configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
        network = network_builder(first["trainer_name"])(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
        network.load_state_dict(parameters[0])
        # nnU-Net's own initialisation from here on (the same fields; torch.compile if nnUNet_compile).
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   first["trainer_name"], first["inference_allowed_mirroring_axes"])

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        self._model = 0
        self.window_stats = WindowStats()
        if self.window is None or not self.window.keep_on_device:
            return super().predict_logits_from_preprocessed_data(data)
        return self._ensemble_on_device(data)

    @torch.inference_mode()
    def _ensemble_on_device(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold loop, except that the logits stay where the window left them (for the export)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, threads))
        try:
            prediction = None
            for params in self.list_of_parameters:
                unwrap(self.network).load_state_dict(params)
                logits = self.predict_sliding_window_return_logits(data)
                prediction = logits if prediction is None else prediction + logits
            assert prediction is not None  # list_of_parameters is never empty
            if len(self.list_of_parameters) > 1:
                prediction /= len(self.list_of_parameters)
            return prediction
        finally:
            torch.set_num_threads(threads)

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        self._model += 1  # once per fold; nnU-Net's retry on the CPU after running out of memory is inside
        return super().predict_sliding_window_return_logits(input_image)

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):  # type: ignore[no-untyped-def]
        self._tiles = [0, len(slicers)]
        self._reported = time.monotonic()
        if self.window is None:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        return self._fast_window(data, slicers, do_on_device)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        prediction = super()._internal_maybe_mirror_and_predict(x)
        self._tiles[0] += 1
        self._report("tiles")
        return prediction

    def _report(self, what: str) -> None:
        if self.on_progress is not None and time.monotonic() - self._reported >= self.report_every_s:
            self._reported = time.monotonic()
            models = len(self.list_of_parameters)
            self.on_progress(f"{self._tiles[0]}/{self._tiles[1]} {what}"
                             + (f" (model {self._model} of {models})" if models > 1 else ""))

    # --- pancseg's window -------------------------------------------------------------------------

    def _network_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Segmentation logits (and class logits, for the multi-task network) of a batch of tiles."""
        if self.window and self.window.backend != "torch":
            if self._model not in self._runtimes:  # this fold's weights are in the network now
                self._runtimes[self._model] = RuntimeNetwork(self.window.backend, unwrap(self.network),
                                                             self._runtime_skips(), x, torch.get_num_threads())
            return self._runtime_batch(self._runtimes[self._model], x)
        if self._batch_forward is None:
            forward = self._forward_function()
            self._batch_forward = torch.compile(forward, dynamic=False) if self.window and self.window.compile \
                else forward
        return self._batch_forward(x)

    def _forward_function(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
        network = unwrap(self.network)  # the folds' weights are loaded into this module in place
        return lambda x: (network(x), None)

    def _runtime_skips(self) -> tuple[int, ...]:
        """The encoder stages the network's torch part needs from a runtime (none: segmentation only)."""
        return ()

    def _runtime_batch(self, runtime: RuntimeNetwork, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return runtime(x)[0], None

    def _tile_done(self, prediction: torch.Tensor, class_logits: list[torch.Tensor]) -> None:
        """Called per tile, in window order, with its averaged logits (1,C,*P) and its passes' class logits."""

    @torch.inference_mode()
    def _fast_window(self, data: torch.Tensor, slicers: list, do_on_device: bool) -> torch.Tensor:
        """nnU-Net's Gaussian-weighted, mirrored sliding window, batched and (optionally) region-restricted."""
        assert self.window is not None
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        combos = mirror_combinations(self.allowed_mirroring_axes if self.use_mirroring else None)
        stats = WindowStats(tiles=len(slicers), stock_passes=len(slicers) * len(combos))
        gaussian = (compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                     value_scaling_factor=10, device=results_device) if self.use_gaussian else 1)
        sums = _WindowSums(self, data.shape[1:], slicers, gaussian, combos, results_device)
        first = [(i, ()) for i in range(len(slicers))]
        mirrors = [(i, axes) for i in range(len(slicers)) for axes in combos[1:]]
        if not self.window.region or len(combos) == 1:  # every pass, in one stream of full batches
            self._passes(data, first + mirrors, slicers, stats, sums.take, "passes" if mirrors else "tiles")
            full = [True] * len(slicers)
        else:
            # The first pass's last batch is filled up with the first mirrors, kept for the tiles that
            # turn out to need them: a GPU computes a padded batch's places anyway, and a CPU batch of
            # one is torch's slow path. A quiz-sized crop's 2 ResEnc-M tiles take 2 batches of 8, not 3.
            early = mirrors[:-len(first) % self.window.batch_size]
            self._passes(data, first + early, slicers, stats, sums.hold, "tiles (first pass)")
            full = self._tiles_to_mirror(data.shape[1:], sums.first, slicers, gaussian, results_device, stats)
            work = [(i, axes) for i, axes in mirrors if full[i]]
            self._passes(data, work[sums.release(work):], slicers, stats, sums.mirrored, "mirrored passes")
        stats.full = sum(full)
        self.window_stats.add(stats)
        return sums.result()

    def _tiles_to_mirror(self, shape: torch.Size, first: dict, slicers: list, gaussian: Any,
                         device: torch.device, stats: WindowStats) -> list[bool]:
        """Per tile: does it get every mirrored pass (region restriction, from the first pass)?"""
        assert self.window is not None
        sums = torch.zeros((self.label_manager.num_segmentation_heads, *shape), dtype=torch.float32, device=device)
        counts = torch.zeros(shape, dtype=torch.float32, device=device)
        for i, sl in enumerate(slicers):
            sums[sl] += first[i][0][0].to(device) * gaussian
            counts[sl[1:]] += gaussian
        found = foreground(sums / counts, self.label_manager.has_regions)
        del sums, counts
        if not found.any():
            stats.fallback = NOTHING_FOUND
        elif touches_border(found):
            stats.fallback = AT_BORDER
        if stats.fallback:
            return [True] * len(slicers)
        spacing = self.configuration_manager.spacing
        margin = tuple(math.ceil(self.window.margin_mm / s) for s in spacing[-len(shape):])
        return tiles_near(found, slicers, margin)

    def _passes(self, data: torch.Tensor, work: list[tuple[int, tuple[int, ...]]], slicers: list,
                stats: WindowStats, done: Callable[..., None], what: str) -> None:
        """Every (tile, flip) of ``work`` through the network, ``window.batch_size`` at a time; ``done``
        gets each output flipped back. On running out of GPU memory the batch size is halved."""
        assert self.window is not None
        queue = list(work)
        self._tiles = [0, len(work)]
        while queue:
            batch, queue = queue[:self.window.batch_size], queue[self.window.batch_size:]
            x = torch.cat([_flip(data[slicers[i]][None], axes) for i, axes in batch]).to(self.device)
            if self.window.pad_batches and len(batch) < self.window.batch_size:
                x = torch.cat([x, x.new_zeros((self.window.batch_size - len(batch), *x.shape[1:]))])
            try:
                seg, cls = self._network_batch(x)
            except torch.cuda.OutOfMemoryError:
                if len(batch) == 1:
                    raise
                del x
                empty_cache(self.device)
                self.window.batch_size = max(1, len(batch) // 2)
                queue = batch + queue
                continue
            stats.passes += len(batch)
            for j, (i, axes) in enumerate(batch):
                done(i, axes, _flip(seg[j:j + 1], axes), [] if cls is None else [cls[j:j + 1]])
            self._tiles[0] += len(batch)
            self._report(what)


class _WindowSums:
    """nnU-Net's Gaussian-weighted sums of a window, added in nnU-Net's tile order (float16 sums depend on
    the order): a mirrored tile once its last pass is in, the un-mirrored tiles before it as they come.

    ``first`` holds each tile's un-mirrored pass (segmentation logits, class logits) until it is added;
    ``held`` the mirrors computed with the first pass until region restriction has chosen the tiles.
    """

    def __init__(self, predictor: ProgressPredictor, shape: torch.Size, slicers: list, gaussian: Any,
                 combos: list[tuple[int, ...]], device: torch.device) -> None:
        self.predictor, self.slicers, self.gaussian, self.combos = predictor, slicers, gaussian, combos
        self.device = device
        self.logits = torch.zeros((predictor.label_manager.num_segmentation_heads, *shape), dtype=torch.half,
                                  device=device)
        self.counts = torch.zeros(shape, dtype=torch.half, device=device)
        self.first: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.held: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.mirror_sums: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.added = 0  # tiles 0 .. added-1 are in the sums

    def take(self, i: int, axes: tuple[int, ...], seg: torch.Tensor, cls: list[torch.Tensor]) -> None:
        """A pass of a stream in which every tile's first pass comes before any mirror."""
        (self.mirrored if axes else self.first_pass)(i, axes, seg, cls)

    def first_pass(self, i: int, axes: tuple[int, ...], seg: torch.Tensor, cls: list[torch.Tensor]) -> None:
        self.first[i] = (seg, cls)

    def hold(self, i: int, axes: tuple[int, ...], seg: torch.Tensor, cls: list[torch.Tensor]) -> None:
        """A first pass, or a mirror computed before it is known whether its tile needs it."""
        if axes:
            self.held[i, axes] = (seg, cls)
        else:
            self.first_pass(i, axes, seg, cls)

    def release(self, work: list[tuple[int, tuple[int, ...]]]) -> int:
        """Adds the held mirrors that ``work`` (the mirrors still wanted, in order) begins with; drops the
        others. Returns how many of ``work`` that was (held ones are a prefix of all mirrors)."""
        done = 0
        while done < len(work) and work[done] in self.held:
            self.mirrored(*work[done], *self.held.pop(work[done]))
            done += 1
        self.held.clear()
        return done

    def mirrored(self, i: int, axes: tuple[int, ...], seg: torch.Tensor, cls: list[torch.Tensor]) -> None:
        if i not in self.mirror_sums:
            base_seg, base_cls = self.first[i]
            self.mirror_sums[i] = (base_seg.clone(), list(base_cls))
        self.mirror_sums[i][0].add_(seg)  # nnU-Net's order of the mirrors: flips arrive in it
        self.mirror_sums[i][1].extend(cls)
        if axes == self.combos[-1]:
            self._add_up_to(i)

    def result(self) -> torch.Tensor:
        self._add_up_to(len(self.slicers) - 1)
        torch.div(self.logits, self.counts, out=self.logits)
        if torch.any(torch.isinf(self.logits)):
            raise RuntimeError("Encountered inf in predicted array (as nnU-Net would say): the half-precision "
                               "sums overflowed")
        return self.logits

    def _add_up_to(self, last: int) -> None:
        while self.added <= last:
            i = self.added
            mirrored = i in self.mirror_sums
            seg, cls = self.mirror_sums.pop(i) if mirrored else self.first[i]
            del self.first[i]
            if mirrored:
                seg /= len(self.combos)
            self.predictor._tile_done(seg, cls)
            prediction = seg[0].to(self.device)
            if self.predictor.use_gaussian:
                prediction *= self.gaussian
            self.logits[self.slicers[i]] += prediction
            self.counts[self.slicers[i][1:]] += self.gaussian
            self.added += 1


def _model_json(path: Path) -> dict[str, Any]:
    """A model folder's ``dataset.json`` or ``plans.json``; a damaged one is named (nnU-Net's reader says
    only ``JSONDecodeError``)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing from the model folder; copy the whole folder again") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); the model folder is damaged or was edited: copy it "
                              "again (or train again)") from exc
    if not isinstance(found, dict):
        raise CheckpointError(f"{path}: not an nnU-Net {path.stem} file; copy the model folder again")
    return found


def _flip(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, axes) if axes else x


class MultiTaskPredictor(ProgressPredictor):
    """Predicts segmentations as nnU-Net does and, from the same forward passes, a subtype per case.

    Class probabilities are averaged over test-time mirrors per tile, then over tiles weighted by
    :func:`~pancreas_cli.multitask.network.tile_weights`, then over the folds of an ensemble.
    ``case_class_probabilities`` holds one vector per predicted case, in prediction order, and
    ``case_lesion_found`` whether the case's (ensembled) segmentation has a lesion
    (:func:`~pancreas_cli.multitask.network.lesion_found`).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.case_class_probabilities: list[np.ndarray] = []
        self.case_lesion_found: list[bool] = []
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
        self._tile_done(prediction, logits)
        return prediction

    def _forward_function(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
        return self._multitask_net().forward_multitask  # (segmentation, class logits) from one encoder pass

    def _runtime_skips(self) -> tuple[int, ...]:
        return tuple(self._multitask_net().stage_indices)

    def _runtime_batch(self, runtime: RuntimeNetwork, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The runtime's segmentation and encoder features; the subtype head on them in torch."""
        seg, skips = runtime(x)
        return seg, self._multitask_net().classify(seg, skips, x)

    def _tile_done(self, prediction: torch.Tensor, class_logits: list[torch.Tensor]) -> None:
        """Adds a tile's class probabilities (averaged over its passes), weighted by its predicted lesion."""
        probs = torch.stack([torch.softmax(item.float(), dim=1) for item in class_logits]).mean(0)  # (B, K)
        weights = tile_weights(prediction, self._multitask_net().regions)  # (B,)
        contribution = (weights[:, None] * probs).sum(0)
        if self._weighted_sum is None or self._weight_total is None:
            self._weighted_sum, self._weight_total = contribution, weights.sum()
        else:
            self._weighted_sum = self._weighted_sum + contribution
            self._weight_total = self._weight_total + weights.sum()

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """One case through every fold: nnU-Net averages the logits, this averages the fold probabilities."""
        before = len(self.case_class_probabilities)
        logits = super().predict_logits_from_preprocessed_data(data)
        per_fold, found = self.case_class_probabilities[before:], self.case_lesion_found[before:]
        del self.case_class_probabilities[before:], self.case_lesion_found[before:]
        self.case_class_probabilities.append(np.mean(per_fold, axis=0))
        # One fold: its own answer (the same logits); an ensemble: the averaged logits' (one full-size argmax).
        ensemble = len(found) != 1
        self.case_lesion_found.append(lesion_found(logits, self._multitask_net().regions) if ensemble else found[0])
        return logits

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):  # type: ignore[no-untyped-def]
        # Reset here, not in the public method: nnU-Net retries this on CPU after running out of memory.
        self._weighted_sum = self._weight_total = None
        logits = super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        if self._weighted_sum is None or self._weight_total is None:
            raise RuntimeError("no tile was predicted")
        self.case_class_probabilities.append((self._weighted_sum / self._weight_total).float().cpu().numpy())
        self.case_lesion_found.append(lesion_found(logits, self._multitask_net().regions))
        return logits
