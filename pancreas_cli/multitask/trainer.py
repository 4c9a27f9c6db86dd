"""pancseg's nnU-Net v2 trainers.

``nnUNetTrainerPancseg`` is nnU-Net's default trainer with pancseg's run settings (epochs,
iterations, learning rate, batch size, checkpoint interval), whole-pancreas and lesion pseudo-Dice,
and ``metrics.csv``. ``nnUNetTrainerMultiTask`` adds the lesion-subtype head: a few overridden
hooks, nnU-Net's loop, data loading, checkpoints and validation unchanged.

Both are found by nnU-Net's own commands when ``nnUNet_extTrainer`` points at
``pancreas_cli/nnunet_ext`` (see README).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from time import time
from typing import Any

import numpy as np
import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from pancreas_cli.checkpoints import TRUST_ENV, read_checkpoint
from pancreas_cli.exceptions import DataError
from pancreas_cli.imageio import write_file, write_text
from pancreas_cli.layout import CHECKPOINT_BEST, CHECKPOINT_LATEST, METRICS_NAME, VALIDATION_DIR
from pancreas_cli.metrics import classification_metrics
from pancreas_cli.multitask.history import METRICS_COLUMNS, render_metrics
from pancreas_cli.multitask.network import HeadSettings, build_multitask_network, tile_weights
from pancreas_cli.multitask.optim import MultiTaskOptimizer, MultiTaskPolyLR, build_optimizer
from pancreas_cli.multitask.predictor import MultiTaskPredictor, unwrap
from pancreas_cli.multitask.refit import collect, recorder, refit, shortcut_of
from pancreas_cli.multitask.settings import TrainingSettings, handed, read_settings
from pancreas_cli.subtypes import CASE_SUBTYPES_NAME, SUBTYPES, read_subtypes, subtype_of, write_predictions

__all__ = ["METRICS_COLUMNS", "METRICS_NAME", "nnUNetTrainerMultiTask", "nnUNetTrainerPancseg"]

# Values the base logger must accept (it only takes registered keys, one value per epoch).
_LOG_KEYS = ("pancseg_dice_pancreas", "pancseg_dice_lesion", "pancseg_criterion")
_MT_LOG_KEYS = ("pancseg_seg_loss", "pancseg_cls_loss", "pancseg_val_cls_loss", "pancseg_val_accuracy",
                "pancseg_val_macro_f1", "pancseg_val_cases")


def _dice(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else float("nan")


def _plain(value: Any) -> float | int | None:
    """A logged value (numpy scalars in nnU-Net's log) as a plain number."""
    if value is None:
        return None
    return int(value) if isinstance(value, int | np.integer) else float(value)


class nnUNetTrainerPancseg(nnUNetTrainer):
    """nnU-Net's trainer with pancseg's settings, structure pseudo-Dice and ``metrics.csv``."""

    #: Smoothing of the checkpoint-selection criterion, as nnU-Net's EMA Dice (a constant, as its weight decay).
    ema_alpha = 0.9

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.pancseg_settings = handed() or self._recorded_settings(plans, configuration, fold)
        self._prepare_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.is_ddp and device.type == "cuda" and device.index is not None:
            # nnU-Net takes cuda:0 whatever it is given (it expects CUDA_VISIBLE_DEVICES); honour cuda:N.
            # The current device decides where the data loader pins batches and cudnn.benchmark runs.
            self.device = device
            torch.cuda.set_device(device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net's DDP assumes one GPU per process and takes cuda:RANK; CPU processes (gloo) keep the CPU.
            self.device = device
        settings = self.pancseg_settings
        self.num_epochs = settings.epochs
        self.num_iterations_per_epoch = settings.iterations_per_epoch
        self.num_val_iterations_per_epoch = settings.val_iterations
        self.initial_lr = settings.initial_lr
        self.save_every = settings.save_every
        #: Called after every epoch with that epoch's metrics row (pancseg's progress display).
        self.epoch_callback: Callable[[dict[str, Any]], None] | None = None
        #: Load checkpoints in full, not only what nnU-Net's hold (``pancseg train --trust-model``; in
        #: nnU-Net's DDP processes, which pancseg does not build, from the environment).
        self.trust_model = os.environ.get(TRUST_ENV) == "1"
        self._register_log_keys(_LOG_KEYS)

    def initialize(self) -> None:
        """nnU-Net's, with one change in DDP processes on the CPU (gloo): nnU-Net wraps the network as
        ``DDP(network, device_ids=[rank])``, which only a GPU module accepts; a CPU module gets none."""
        if not (self.is_ddp and self.device.type == "cpu"):
            super().initialize()
            return
        module = sys.modules[nnUNetTrainer.__module__]
        original = module.DDP  # type: ignore[attr-defined]
        module.DDP = lambda network, device_ids=None, **kwargs: original(network, **kwargs)  # type: ignore[attr-defined]
        try:
            super().initialize()
        finally:
            module.DDP = original  # type: ignore[attr-defined]

    def _recorded_settings(self, plans: dict, configuration: str, fold: int) -> TrainingSettings:
        """The fold record's settings, for a trainer that nnU-Net builds (``nnUNetv2_train``, DDP): the
        fold folder by nnU-Net's own rule, which ``__init__`` applies only after the plans are read."""
        if not nnUNet_results.is_set():
            return TrainingSettings()
        folder = get_output_folder(plans["dataset_name"], type(self).__name__, plans["plans_name"], configuration, fold)
        return read_settings(Path(folder))

    def _prepare_plans(self, plans: dict, configuration: str) -> None:
        """Adjust the plans before nnU-Net reads them (they are copied into the results folder)."""
        if self.pancseg_settings.batch_size is not None:
            plans["configurations"][configuration]["batch_size"] = self.pancseg_settings.batch_size

    def _register_log_keys(self, keys: tuple[str, ...]) -> None:
        store = self.logger.local_logger.my_fantastic_logging
        for key in keys:
            store.setdefault(key, [])

    @property
    def _regions(self) -> bool:
        return bool(self.label_manager.has_regions)

    # ---------------------------------------------------------------- forward and steps

    def _forward(self, data: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """Segmentation output and class logits (None for plain segmentation)."""
        return self.network(data), None

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, Any]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    def _autocast(self) -> Any:
        # As nnU-Net: autocast only on CUDA (slow on CPU, unsupported on MPS).
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's per-class counts plus whole-pancreas and lesion counts (and class outputs)."""
        data, target = self._to_device(batch)
        with self._autocast():
            seg, logits = self._forward(data)
            loss = self.loss(seg, target)
        output = seg[0] if self.enable_deep_supervision else seg
        target = target[0] if self.enable_deep_supervision else target
        axes = [0] + list(range(2, output.ndim))
        if self._regions:
            onehot = (torch.sigmoid(output) > 0.5).long()
            structures_pred = [onehot[:, 0], onehot[:, 1]]
            structures_true = [target[:, 0] > 0, target[:, 1] > 0]
        else:
            labels = output.argmax(1)
            onehot = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            onehot.scatter_(1, labels[:, None], 1)
            structures_pred = [labels > 0, labels == 2]
            structures_true = [target[:, 0] > 0, target[:, 0] == 2]
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes)
        tp, fp, fn = (t.detach().cpu().numpy() for t in (tp, fp, fn))
        if not self._regions:  # drop the background
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        # tp, fp, fn per structure, read back in one copy (each .item() would wait for the GPU).
        counts = torch.stack([torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()])
                              for p, t in ((p.bool(), t.bool()) for p, t in zip(structures_pred, structures_true))])
        structure_counts = counts.cpu().numpy().astype(np.float64)
        result = {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn,
                  "structure_counts": structure_counts}
        result.update(self._validation_classification(output, logits, batch["keys"]))
        return result

    def _validation_classification(self, seg: torch.Tensor, logits: torch.Tensor | None, keys: Any) -> dict:
        return {}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        counts = np.sum([o["structure_counts"] for o in val_outputs], axis=0)
        if self.is_ddp:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, counts)
            counts = np.sum(gathered, axis=0)
        self.logger.log("pancseg_dice_pancreas", _dice(*counts[0]), self.current_epoch)
        self.logger.log("pancseg_dice_lesion", _dice(*counts[1]), self.current_epoch)

    # ---------------------------------------------------------------- selection, metrics.csv

    def _selection_value(self) -> float:
        """This epoch's raw value of the checkpoint-selection criterion."""
        return float(self.logger.get_value("mean_fg_dice", step=-1))

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end, with pancseg's checkpoint selection and a metrics.csv row."""
        epoch = self.current_epoch
        log = self.logger
        log.log("epoch_end_timestamps", time(), epoch)
        raw = self._selection_value()
        history = log.get_value("pancseg_criterion", step=None)
        previous = history[epoch - 1] if epoch > 0 and len(history) >= epoch else None
        alpha = self.ema_alpha
        if np.isnan(raw):
            criterion = previous if previous is not None else float("nan")
        else:
            criterion = raw if previous is None or np.isnan(previous) else alpha * previous + (1 - alpha) * raw
        log.log("pancseg_criterion", criterion, epoch)
        epoch_time = log.get_value("epoch_end_timestamps", step=-1) - log.get_value("epoch_start_timestamps", step=-1)
        self.print_to_log_file("train_loss", np.round(log.get_value("train_losses", step=-1), decimals=4))
        self.print_to_log_file("val_loss", np.round(log.get_value("val_losses", step=-1), decimals=4))
        self.print_to_log_file("Pseudo dice", [np.round(i, decimals=4) for i in log.get_value("dice_per_class_or_region", step=-1)])
        self.print_to_log_file(f"Epoch time: {np.round(epoch_time, decimals=2)} s")

        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, CHECKPOINT_LATEST))
        best = not np.isnan(criterion) and (self._best_ema is None or criterion > self._best_ema)
        if best:
            self._best_ema = criterion
            self.print_to_log_file(f"New best {self.pancseg_settings.select_by} criterion: {np.round(criterion, 4)}")
            self.save_checkpoint(os.path.join(self.output_folder, CHECKPOINT_BEST))
        if self.local_rank == 0:
            log.plot_progress_png(self.output_folder)
            rows = [self._metrics_row(e) for e in range(epoch + 1)]
            write_text(render_metrics(rows), Path(self.output_folder) / METRICS_NAME)
            if self.epoch_callback is not None:
                self.epoch_callback(rows[-1])
        self.current_epoch += 1

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written under a temporary name and renamed: nnU-Net writes in place,
        so a kill or a full disk during the write left a truncated file that resuming picked up."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing (or logs why)
            return
        # torch says only "unexpected pos" when the disk is full: write_file names it
        write_file(Path(filename), lambda tmp: super(nnUNetTrainerPancseg, self).save_checkpoint(str(tmp)))

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net 2.8.1's, with a file read by :func:`~pancreas_cli.checkpoints.read_checkpoint`:
        nnU-Net's unpickles it whole (``weights_only=False``), so a checkpoint could run code (and
        its version fails on a dict). Reads what nnU-Net's reads (tests/faults checks the keys)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = read_checkpoint(Path(checkpoint), trust=self.trust_model, map_location=self.device)
        network = unwrap(self.network)
        own = network.state_dict().keys()
        # A DataParallel checkpoint's keys start with "module." (nnU-Net's heuristic).
        network.load_state_dict({k[7:] if k not in own and k.startswith("module.") else k: v
                                 for k, v in checkpoint["network_weights"].items()})
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def _logged(self, key: str, epoch: int) -> float | int | None:
        """What the log holds for ``key`` at ``epoch`` (None: not logged, e.g. by an older version)."""
        values = self.logger.local_logger.my_fantastic_logging.get(key, [])
        return _plain(values[epoch]) if epoch < len(values) else None

    def _was_best(self, epoch: int) -> bool:
        """Whether ``epoch``'s criterion beat every earlier one (checkpoint_best.pth was saved then)."""
        history = [self._logged("pancseg_criterion", e) for e in range(epoch + 1)]
        earlier = [c for c in history[:-1] if c is not None and not np.isnan(c)]
        now = history[-1]
        return now is not None and not np.isnan(now) and (not earlier or now > max(earlier))

    def _metrics_row(self, epoch: int) -> dict[str, Any]:
        """Epoch ``epoch``'s metrics.csv row (0-based), from the log (the checkpoint's, on resume)."""
        get = self._logged
        start, end = get("epoch_start_timestamps", epoch), get("epoch_end_timestamps", epoch)
        return {
            "epoch": epoch + 1,
            "train_loss": get("train_losses", epoch),
            "val_loss": get("val_losses", epoch),
            "dice_pancreas": get("pancseg_dice_pancreas", epoch),
            "dice_lesion": get("pancseg_dice_lesion", epoch),
            "ema_pseudo_dice": get("ema_fg_dice", epoch),
            "criterion": get("pancseg_criterion", epoch),
            "best": int(self._was_best(epoch)),
            "lr": get("lrs", epoch),
            "epoch_time_s": end - start if start is not None and end is not None else None,
            "total_epochs": self.num_epochs,
        }


class nnUNetTrainerMultiTask(nnUNetTrainerPancseg):
    """Shared encoder, nnU-Net's segmentation decoder and a lesion-subtype classification head.

    Loss = nnU-Net's Dice+CE (deep supervision) + lambda * cross-entropy on the case's subtype, which
    comes from ``subtypes.csv`` through the batch's case keys.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._register_log_keys(_MT_LOG_KEYS)
        self.subtypes: dict[str, int] = {}
        self.cls_loss: nn.Module | None = None

    def _prepare_plans(self, plans: dict, configuration: str) -> None:
        super()._prepare_plans(plans, configuration)
        head = HeadSettings.for_training(self.pancseg_settings.head())
        plans["configurations"][configuration]["pancseg_head"] = head.to_dict()

    build_network_architecture = staticmethod(build_multitask_network)  # the predictor builds it without this class

    def configure_optimizers(self) -> tuple[MultiTaskOptimizer, MultiTaskPolyLR]:
        """nnU-Net's SGD and poly schedule for encoder and decoder; AdamW for the head (see optim)."""
        return build_optimizer(self.network, unwrap(self.network).head, self.initial_lr,
                               self.pancseg_settings.head_lr, self.weight_decay, self.num_epochs)

    # ---------------------------------------------------------------- labels and loss

    @property
    def subtypes_file(self) -> Path:
        return Path(self.preprocessed_dataset_folder_base) / CASE_SUBTYPES_NAME

    def load_subtypes(self) -> dict[str, int]:
        path = self.subtypes_file
        if not path.is_file():
            raise DataError(f"{path}: not found; run `pancseg preprocess` (it copies subtypes.csv there)")
        return read_subtypes(path)

    def labels_for(self, keys: Any) -> torch.Tensor:
        """Subtype labels of a batch's cases, looked up by case key."""
        try:
            labels = [self.subtypes[str(k)] for k in keys]
        except KeyError as exc:
            raise DataError(
                f"case {exc.args[0]} has no subtype in {self.subtypes_file}; re-run `pancseg prepare` "
                "and `pancseg preprocess`"
            ) from None
        tensor = torch.as_tensor(labels, dtype=torch.long)
        if self.device.type == "cuda":
            # Pinned, so the copy is queued like the batch's: one from pageable memory may wait for the GPU.
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def class_weights(self, train_keys: list[str]) -> torch.Tensor | None:
        """Class weights of the subtype loss: configured, none, or inverse frequency in this fold."""
        spec = self.pancseg_settings.class_weights
        if spec == "none":
            return None
        if isinstance(spec, list):
            return torch.as_tensor(spec, dtype=torch.float32, device=self.device)
        counts = Counter(self.subtypes[k] for k in train_keys)
        n = sum(counts.values())
        weights = [n / (len(SUBTYPES) * counts[c]) if counts[c] else 0.0 for c in SUBTYPES]
        missing = [c for c in SUBTYPES if not counts[c]]
        if missing:
            self.print_to_log_file(f"WARNING: subtype(s) {missing} absent from the training cases of fold {self.fold}")
        return torch.as_tensor(weights, dtype=torch.float32, device=self.device)

    def cls_lambda(self, epoch: int | None = None) -> float:
        """Weight of the subtype loss in ``epoch`` (default: this one; linear warm-up)."""
        settings = self.pancseg_settings
        if settings.cls_warmup_epochs <= 0:
            return settings.cls_weight
        epoch = self.current_epoch if epoch is None else epoch
        return settings.cls_weight * min(1.0, (epoch + 1) / settings.cls_warmup_epochs)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.subtypes = self.load_subtypes()
        train_keys, val_keys = self.do_split()
        unknown = sorted(k for k in [*train_keys, *val_keys] if k not in self.subtypes)
        if unknown:
            raise DataError(f"case {unknown[0]} has no subtype in {self.subtypes_file} ({len(unknown)} such cases)")
        weights = self.class_weights(train_keys)
        self.print_to_log_file(f"subtype loss: lambda {self.pancseg_settings.cls_weight}, class weights "
                               f"{None if weights is None else weights.tolist()}")
        self.cls_loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=self.pancseg_settings.label_smoothing)
        unwrap(self.network).return_class_logits = True

    def _forward(self, data: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        return self.network(data)

    def train_step(self, batch: dict) -> dict:
        """One step that never waits for the GPU: the CPU queues the next batch's work while this one's runs.

        nnU-Net's step waits twice (the gradient scaler reading its inf flag, the loss read back), and
        in between the GPU idles while the CPU launches the optimizer step and the next forward pass;
        the multi-task step launches more (the head). Here the fused optimizers take the inf flag on
        the device, and the losses stay there until :meth:`on_train_epoch_end` reads the epoch's at once.
        """
        labels = self.labels_for(batch["keys"])
        data, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        lam = self.cls_lambda()
        with self._autocast():
            seg, logits = self._forward(data)
            seg_loss = self.loss(seg, target)
            cls_loss = self.cls_loss(logits.float(), labels)  # type: ignore[misc]
            loss = seg_loss + lam * cls_loss
        # nnU-Net's gradient clipping for encoder and decoder; AdamW normalises the head's steps itself.
        optimizer: MultiTaskOptimizer = self.optimizer  # type: ignore[assignment]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(optimizer.segmentation)
            torch.nn.utils.clip_grad_norm_(list(optimizer.segmentation_parameters()), 12)
            # Each part skips its step if its own gradients overflowed (torch's rule for several
            # optimizers); update() lowers the scale if either did.
            for part in optimizer.optimizers:
                self.grad_scaler.step(part)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(optimizer.segmentation_parameters()), 12)
            optimizer.step()
        return {"loss": loss.detach(), "seg_loss": seg_loss.detach(), "cls_loss": cls_loss.detach()}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        keys = ("loss", "seg_loss", "cls_loss")
        # The epoch's losses in one read-back (train_step leaves them on the device).
        values = torch.stack([o[k].float() for o in train_outputs for k in keys]).cpu().numpy()
        outputs = [dict(zip(keys, row)) for row in values.reshape(len(train_outputs), len(keys))]
        super().on_train_epoch_end(outputs)
        for key in keys[1:]:
            value = float(np.mean([o[key] for o in outputs]))
            if self.is_ddp:
                gathered: list[Any] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, value)
                value = float(np.mean(gathered))
            self.logger.log(f"pancseg_{key}", value, self.current_epoch)

    # ---------------------------------------------------------------- end of training

    def on_train_end(self) -> None:
        """nnU-Net's end of training (the final checkpoint), after the subtype head's shortcut is refitted
        on the training cases (:mod:`~pancreas_cli.multitask.refit`) in checkpoint_best.pth and in the
        final weights: before the final checkpoint is written, so a run stopped in between refits again
        on resuming (the fit is deterministic)."""
        if self.pancseg_settings.refit_subtype and shortcut_of(self.network) is not None:
            if self.is_cascaded:
                self.print_to_log_file("subtype shortcut not refitted: a cascade's inputs need the previous stage")
            else:
                self._refit_checkpoints()
        super().on_train_end()

    def _refit_checkpoints(self) -> None:
        network = unwrap(self.network)
        self.set_deep_supervision_enabled(False)
        network.eval()
        network.return_class_logits = False
        try:
            train_keys, _ = self.do_split()
            # In DDP each process predicts its share; every process fits on all of them (the same result).
            mine = train_keys[self.local_rank :: torch.distributed.get_world_size()] if self.is_ddp else train_keys
            dataset = self.dataset_class(self.preprocessed_dataset_folder, mine)
            predictor = recorder(network, self.plans_manager, self.configuration_manager, self.dataset_json,
                                 self.__class__.__name__, self.device)
            refit_weights = partial(self._refit_shortcut, predictor, dataset)
            best = Path(self.output_folder) / CHECKPOINT_BEST
            if self._on_every_rank(best.is_file()):
                final = {k: v.clone() for k, v in network.state_dict().items()}
                checkpoint = read_checkpoint(best, trust=self.trust_model, map_location=self.device)
                network.load_state_dict(checkpoint["network_weights"])
                refit_weights(CHECKPOINT_BEST)
                checkpoint["network_weights"] = {**checkpoint["network_weights"], **_shortcut_state(network)}
                if self.local_rank == 0:
                    write_file(best, lambda tmp: torch.save(checkpoint, tmp))
                network.load_state_dict(final)
            refit_weights("the final weights")
        finally:
            network.return_class_logits = True
            network.train()
            self.set_deep_supervision_enabled(True)

    def _on_every_rank(self, decision: bool) -> bool:
        """``decision`` as rank 0 takes it, once every process got here: each refit gathers from all of
        them, so all must refit the same checkpoints (rank 0 writes checkpoint_best.pth at its epoch end,
        which another process may reach first)."""
        if not self.is_ddp:
            return decision
        torch.distributed.barrier()
        taken = [decision]
        torch.distributed.broadcast_object_list(taken, src=0)
        return bool(taken[0])

    def _refit_shortcut(self, predictor: MultiTaskPredictor, dataset: Any, what: str) -> None:
        """Refit the shortcut of the weights now in the network on ``dataset``'s cases (this process' share of
        the fold's training cases) and the other processes'; ``predictor``: a :func:`recorder` of the network."""
        start = time()
        keys = list(dataset.identifiers)
        tiles = collect(predictor, (torch.from_numpy(np.asarray(dataset.load_case(k)[0][:])) for k in keys))
        if self.is_ddp:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, dict(zip(keys, tiles)))
            found = {k: v for g in gathered for k, v in g.items()}
            keys, tiles = sorted(found), [found[k] for k in sorted(found)]
        weights = self.class_weights(keys)
        head = shortcut_of(self.network)
        assert head is not None  # on_train_end checked
        result = refit(head, tiles, [self.subtypes[k] for k in keys], None if weights is None else weights.tolist())
        done = f"kept: {result.skipped}" if result.skipped else \
            f"refitted on {result.cases} training cases: their accuracy {result.accuracy_before:.3f} -> " \
            f"{result.accuracy_after:.3f}"
        self.print_to_log_file(f"subtype shortcut of {what} {done} ({time() - start:.1f} s)", also_print_to_console=True)

    # ---------------------------------------------------------------- validation

    def _validation_classification(self, seg: torch.Tensor, logits: torch.Tensor | None, keys: Any) -> dict:
        assert logits is not None  # the multi-task network always returns class logits here
        labels = self.labels_for(keys)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        return {
            "cls_loss": loss.detach().cpu().numpy(),
            "case_keys": [str(k) for k in keys],
            "case_probs": torch.softmax(logits.float(), 1).cpu().numpy(),
            "case_weights": tile_weights(seg, self._regions).float().cpu().numpy(),
        }

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        keys = [k for o in val_outputs for k in o["case_keys"]]
        probs = np.concatenate([o["case_probs"] for o in val_outputs])
        weights = np.concatenate([o["case_weights"] for o in val_outputs])
        cls_loss = float(np.mean([o["cls_loss"] for o in val_outputs]))
        if self.is_ddp:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (keys, probs, weights, cls_loss))
            keys = [k for g in gathered for k in g[0]]
            probs = np.concatenate([g[1] for g in gathered])
            weights = np.concatenate([g[2] for g in gathered])
            cls_loss = float(np.mean([g[3] for g in gathered]))
        # Case-level: patch probabilities weighted like inference tiles, then argmax per case.
        sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(SUBTYPES)))
        totals: dict[str, float] = defaultdict(float)
        for key, p, w in zip(keys, probs, weights):
            sums[key] += w * p
            totals[key] += float(w)
        cases = sorted(sums)
        predicted = [subtype_of(sums[k] / totals[k]) for k in cases]
        metrics = classification_metrics([self.subtypes[k] for k in cases], predicted, labels=SUBTYPES)
        log = self.logger.log
        log("pancseg_val_cls_loss", cls_loss, self.current_epoch)
        log("pancseg_val_accuracy", metrics.accuracy, self.current_epoch)
        log("pancseg_val_macro_f1", metrics.macro_f1, self.current_epoch)
        log("pancseg_val_cases", len(cases), self.current_epoch)

    def _selection_value(self) -> float:
        get = self.logger.get_value
        f1 = float(get("pancseg_val_macro_f1", step=-1))
        select_by = self.pancseg_settings.select_by
        if select_by == "classification":
            return f1
        if select_by == "segmentation":
            return super()._selection_value()
        return float(np.nanmean([get("pancseg_dice_pancreas", step=-1), f1]))

    def _metrics_row(self, epoch: int) -> dict[str, Any]:
        row = super()._metrics_row(epoch)
        for column in ("seg_loss", "cls_loss", "val_cls_loss", "val_accuracy", "val_macro_f1", "val_cases"):
            row[column] = self._logged(f"pancseg_{column}", epoch)
        row["cls_lambda"] = self.cls_lambda(epoch)
        return row

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation (segmentations, summary.json) plus ``subtype_results.csv`` from the same passes."""
        unwrap(self.network).return_class_logits = False
        with _predictor_class(MultiTaskPredictor) as created:
            super().perform_actual_validation(save_probabilities)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank :: torch.distributed.get_world_size()]
        keys = sorted(val_keys)  # nnU-Net's dataset sorts its identifiers: the prediction order
        probs = created[0].case_class_probabilities if created else []
        found = created[0].case_lesion_found if created else []
        # the order-based pairing below would silently mislabel cases
        if len(probs) != len(keys) or len(found) != len(keys):
            raise RuntimeError(f"validation predicted subtypes for {len(probs)} of {len(keys)} cases of fold "
                               f"{self.fold}; the fold's segmentations are in {self.output_folder}/validation")
        results = {k: (p, f) for k, p, f in zip(keys, probs, found)}
        if self.is_ddp:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, results)
            results = {k: v for g in gathered for k, v in g.items()}
        if self.local_rank == 0:
            self._write_subtype_results(results)
        unwrap(self.network).return_class_logits = True

    def _write_subtype_results(self, results: dict[str, tuple[np.ndarray, bool]]) -> None:
        """``results``: case -> (subtype probabilities, whether its segmentation has a lesion)."""
        folder = Path(self.output_folder) / VALIDATION_DIR
        cases = sorted(results)
        predicted = {k: subtype_of(results[k][0]) for k in cases}
        write_predictions(folder, {k: results[k][0] for k in cases}, {k: results[k][1] for k in cases})
        subtypes = self.subtypes or self.load_subtypes()
        metrics = classification_metrics([subtypes[k] for k in cases], [predicted[k] for k in cases], labels=SUBTYPES)
        summary = {"cases": len(cases), "accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1,
                   "f1": metrics.f1, "confusion_matrix": metrics.confusion_matrix}
        write_text(json.dumps(summary, indent=2), folder / "classification_summary.json")
        self.print_to_log_file(f"Validation subtype accuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f}",
                               also_print_to_console=True)


def _shortcut_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The shortcut's entries of ``network``'s state dict (a checkpoint's ``network_weights`` keys)."""
    head = shortcut_of(network)
    assert head is not None
    name = next(n for n, m in unwrap(network).named_modules() if m is head.shortcut)
    return {f"{name}.{k}": v.detach().clone() for k, v in head.shortcut.state_dict().items()}


@contextmanager
def _predictor_class(cls: type) -> Iterator[list[Any]]:
    """Let nnU-Net's validation build ``cls`` instead of ``nnUNetPredictor``; yields the instances.

    nnU-Net's ``perform_actual_validation`` creates its predictor by name inside the function; the
    swap is the only way to get the class logits of its own forward passes without copying it.
    """
    created: list[Any] = []

    class Recording(cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    module = sys.modules[nnUNetTrainer.__module__]
    original = module.nnUNetPredictor  # type: ignore[attr-defined]
    module.nnUNetPredictor = Recording  # type: ignore[attr-defined]
    try:
        yield created
    finally:
        module.nnUNetPredictor = original  # type: ignore[attr-defined]
