"""Tests for pancreas_cli.multitask.trainer: settings, labels, losses, steps, selection and metrics.csv.

No nnU-Net training or preprocessing runs: the trainers are built from a plans dict (see
test_network.make_plans) with a preprocessed folder that holds only what ``initialize`` looks at.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pancreas_cli.config import TrainConfig
from pancreas_cli.exceptions import DataError, DiskFullError
from pancreas_cli.multitask import trainer as trainer_module
from pancreas_cli.multitask.network import HeadSettings, MultiTaskNet, tile_weights
from pancreas_cli.multitask.predictor import unwrap
from pancreas_cli.multitask.refit import RefitResult
from pancreas_cli.multitask.settings import SETTINGS_NAME, TrainingSettings, handed, handing, write_settings
from pancreas_cli.multitask.trainer import (
    METRICS_COLUMNS,
    METRICS_NAME,
    _predictor_class,
    nnUNetTrainerMultiTask,
    nnUNetTrainerPancseg,
)
from pancreas_cli.preprocess import SMOKE_CONFIGURATION
from test_network import DATASET_JSON, make_plans

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATASET = "Dataset001_PancreasCancer"
REGIONS_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "pancreas": [1, 2], "lesion": 2},
    "regions_class_order": [1, 2],
    "numTraining": 4,
    "file_ending": ".nii.gz",
}


@pytest.fixture
def preprocessed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nnU-Net's folders in tmp_path; the dataset's preprocessed folder (with a fake blosc2 case)."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_compile", "false")
    monkeypatch.delenv("nnUNet_wandb_enabled", raising=False)
    folder = tmp_path / "preprocessed" / DATASET
    # initialize() only infers the dataset class from the file endings of the data folder
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (folder / "nnUNetPlans_3d_fullres" / "case_000.b2nd").write_bytes(b"")
    return folder


def make_trainer(
    cls: type = nnUNetTrainerMultiTask,
    configuration: str = SMOKE_CONFIGURATION,
    plans: dict[str, Any] | None = None,
    dataset_json: dict[str, Any] | None = None,
    fold: int = 0,
) -> Any:
    plans = copy.deepcopy(plans if plans is not None else make_plans())
    plans["continue_training"] = False
    return cls(plans, configuration, fold, dataset_json or DATASET_JSON, device=torch.device("cpu"))


def with_settings(trainer: Any, **changes: Any) -> Any:
    trainer.pancseg_settings = trainer.pancseg_settings.model_copy(update=changes)
    return trainer


def fold_folder(preprocessed: Path, fold: int, trainer: str = "nnUNetTrainerMultiTask") -> Path:
    """Where nnU-Net puts ``fold`` of ``trainer`` (the ``preprocessed`` fixture's results folder)."""
    return (preprocessed.parent.parent / "results" / DATASET / f"{trainer}__nnUNetResEncUNetMPlans__{SMOKE_CONFIGURATION}"
            / f"fold_{fold}")


# ------------------------------------------------------------------ device


@pytest.mark.filterwarnings("ignore::UserWarning")  # GradScaler("cuda") without CUDA
@pytest.mark.parametrize("index, expected", [(1, "cuda:1"), (None, "cuda:0")])
def test_cuda_index_is_kept(preprocessed: Path, monkeypatch: pytest.MonkeyPatch, index: int | None,
                            expected: str) -> None:
    """nnU-Net replaces any CUDA device by cuda:0; `--device cuda:1` must train on GPU 1."""
    selected: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    plans = make_plans()
    plans["continue_training"] = False
    trainer = nnUNetTrainerMultiTask(plans, SMOKE_CONFIGURATION, 0, DATASET_JSON, device=torch.device("cuda", index))
    assert str(trainer.device) == expected
    assert selected == ([torch.device("cuda", 1)] if index == 1 else [])


# ------------------------------------------------------------------ settings


def test_handed_settings_reach_trainer(preprocessed: Path) -> None:
    settings = TrainingSettings(epochs=7, iterations_per_epoch=3, val_iterations=2, initial_lr=0.005,
                                batch_size=4, save_every=2, head_lr=2e-4, head_stages=[0, -1], head_pooling="mean")
    plans = make_plans()
    plans["continue_training"] = False
    with handing(settings):
        trainer = nnUNetTrainerMultiTask(plans, SMOKE_CONFIGURATION, 0, DATASET_JSON, device=torch.device("cpu"))
    assert handed() is None  # only for the trainers built in the block
    assert trainer.pancseg_settings == settings
    assert trainer.num_epochs == 7
    assert (trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 2)
    assert trainer.initial_lr == 0.005 and trainer.save_every == 2
    assert trainer.configuration_manager.batch_size == 4
    head = HeadSettings(stages=(0, -1), pooling="mean").to_dict()
    assert trainer.configuration_manager.configuration["pancseg_head"] == head
    # the plans nnU-Net copies into the results folder carry the head, so inference rebuilds it
    assert trainer.plans_manager.plans["configurations"][SMOKE_CONFIGURATION]["pancseg_head"] == head
    assert Path(trainer.output_folder) == fold_folder(preprocessed, 0)
    assert not list(Path(trainer.output_folder).parent.parent.parent.rglob(SETTINGS_NAME))  # handed, no file
    assert not (preprocessed / SETTINGS_NAME).exists()

    trainer.initialize()
    net = unwrap(trainer.network)
    assert isinstance(net, MultiTaskNet)
    assert net.settings == HeadSettings(stages=(0, -1), pooling="mean")
    assert trainer.batch_size == 4
    assert trainer.optimizer.param_groups[0]["lr"] == 0.005
    assert trainer.optimizer.head.param_groups[0]["lr"] == 2e-4
    assert [s.max_steps for s in trainer.lr_scheduler.schedulers] == [7, 7]


def test_settings_for_the_segmentation_trainer(preprocessed: Path) -> None:
    with handing(TrainingSettings(epochs=3, batch_size=1, save_every=1)):
        trainer = make_trainer(nnUNetTrainerPancseg)
    assert trainer.num_epochs == 3 and trainer.save_every == 1
    assert trainer.configuration_manager.batch_size == 1
    assert "pancseg_head" not in trainer.configuration_manager.configuration
    trainer.initialize()
    assert not isinstance(unwrap(trainer.network), MultiTaskNet)


def test_settings_default_without_record(preprocessed: Path) -> None:
    trainer = make_trainer()
    assert not (Path(trainer.output_folder) / SETTINGS_NAME).exists()
    defaults = TrainingSettings()
    assert trainer.pancseg_settings == defaults
    assert trainer.num_epochs == defaults.epochs == 1000
    assert trainer.num_iterations_per_epoch == 250 and trainer.num_val_iterations_per_epoch == 50
    assert trainer.initial_lr == 1e-2 and trainer.save_every == 5
    assert trainer.configuration_manager.batch_size == 2  # the plans' batch size
    assert trainer.configuration_manager.configuration["pancseg_head"] == HeadSettings().to_dict()


def test_trainer_built_by_nnunet_reads_its_fold_record(preprocessed: Path) -> None:
    """`nnUNetv2_train` and DDP processes build the trainer with nnU-Net's four arguments: each fold's
    trainer reads its own fold's record, not another fold's nor a file beside the preprocessed data."""
    zero, one = TrainingSettings(head_lr=1e-4, batch_size=1), TrainingSettings(head_lr=5e-3, head_hidden=16)
    write_settings(zero, fold_folder(preprocessed, 0))
    write_settings(one, fold_folder(preprocessed, 1))
    write_settings(TrainingSettings(head_lr=0.5), preprocessed)  # where an earlier pancseg wrote them
    first, second = make_trainer(fold=0), make_trainer(fold=1)
    assert first.pancseg_settings == zero and first.configuration_manager.batch_size == 1
    assert second.pancseg_settings == one
    assert second.configuration_manager.configuration["pancseg_head"]["hidden"] == 16
    assert Path(second.output_folder) / SETTINGS_NAME == fold_folder(preprocessed, 1) / SETTINGS_NAME
    # The segmentation trainer's fold 0 is another folder: no record there, the defaults.
    assert make_trainer(nnUNetTrainerPancseg).pancseg_settings == TrainingSettings()


def test_settings_handed_in_another_thread_do_not_leak(preprocessed: Path) -> None:
    """Fold 0's trainer is built after another fold's settings were handed (in another thread) and a
    record of other settings was written for fold 0 itself: it still gets the settings handed to it."""
    mine, other = TrainingSettings(head_lr=1e-4, epochs=3), TrainingSettings(head_lr=5e-3, epochs=9)
    write_settings(other, fold_folder(preprocessed, 0))
    other_handed, mine_built = threading.Event(), threading.Event()
    built: dict[str, Any] = {}

    def other_fold() -> None:
        with handing(other):
            other_handed.set()
            mine_built.wait(60)
            built["other"] = make_trainer(fold=1)

    thread = threading.Thread(target=other_fold)
    with handing(mine):
        thread.start()
        assert other_handed.wait(60)
        built["mine"] = make_trainer(fold=0)
        mine_built.set()
        thread.join(120)
    assert built["mine"].pancseg_settings == mine and built["mine"].num_epochs == 3
    assert built["other"].pancseg_settings == other and built["other"].num_epochs == 9
    assert built["mine"].optimizer is None  # not initialised yet: the head's rate comes from the settings
    built["mine"].initialize()
    assert built["mine"].optimizer.head.param_groups[0]["lr"] == 1e-4


def test_handed_settings_are_a_copy(preprocessed: Path) -> None:
    """The settings are handed as they were: a later change to the config does not reach the trainer."""
    config = TrainConfig(head_lr=1e-4, device="cpu")
    with handing(config):
        config.head_lr = 0.5
        config.head_stages.append(0)
        trainer = make_trainer()
    assert trainer.pancseg_settings == TrainingSettings(head_lr=1e-4)
    assert type(trainer.pancseg_settings) is TrainingSettings  # the run-only keys stay behind


def test_fold_record_format(tmp_path: Path) -> None:
    """The record keeps its format (the head as one mapping); one written by an earlier pancseg, with
    the trainer's ``ema_alpha``, is read; an unknown key or a bad value is named."""
    settings = TrainingSettings(head_stages=[0], head_dropout=0.0, class_weights=[1.0, 2.0, 3.0])
    data = json.loads(write_settings(settings, tmp_path).read_text(encoding="utf-8"))
    assert data["head"] == {"stages": [0], "pooling": "attention", "hidden": 128, "dropout": 0.0, "pancreas": True}
    # an earlier pancseg's record has no "pancreas": its head had none (resume must rebuild that head)
    old = {**data, "head": {k: v for k, v in data["head"].items() if k != "pancreas"}}
    assert TrainingSettings.from_record(old) == settings.model_copy(update={"head_pancreas": False})
    assert list(data) == ["epochs", "iterations_per_epoch", "val_iterations", "initial_lr", "batch_size", "save_every",
                          "cls_weight", "head_lr", "cls_warmup_epochs", "class_weights", "label_smoothing", "select_by",
                          "refit_subtype", "head"]
    # an earlier pancseg's record has no "refit_subtype": resuming it refits at the end, as new runs do
    assert TrainingSettings.from_record({k: v for k, v in data.items() if k != "refit_subtype"}) == settings
    assert TrainingSettings.from_record({**data, "ema_alpha": 0.9}) == settings
    for bad, named in ((dict(data, bogus=1), "bogus"), (dict(data, head={"bogus": 1}), "head_bogus"),
                       (dict(data, head_lr=-1), "head_lr"), (dict(data, head=[1]), "head")):
        with pytest.raises(ValueError, match=named):
            TrainingSettings.from_record(bad)


def test_fold_record_with_unknown_key(preprocessed: Path) -> None:
    record = fold_folder(preprocessed, 0) / SETTINGS_NAME
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"epochs": 2, "bogus": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match="bogus"):
        make_trainer()


def test_logger_accepts_pancseg_keys(preprocessed: Path) -> None:
    trainer = make_trainer()
    for key in (*trainer_module._LOG_KEYS, *trainer_module._MT_LOG_KEYS):
        trainer.logger.log(key, 0.5, 0)
        assert trainer.logger.get_value(key, step=-1) == 0.5
    plain = make_trainer(nnUNetTrainerPancseg)
    with pytest.raises(AssertionError):
        plain.logger.log("pancseg_val_macro_f1", 0.5, 0)


# ------------------------------------------------------------------ subtype labels


def test_labels_for(preprocessed: Path) -> None:
    trainer = make_trainer()
    trainer.subtypes = {"case_a": 0, "case_b": 2, "case_c": 1}
    labels = trainer.labels_for(np.array(["case_b", "case_a", "case_c"]))  # nnU-Net's batch keys
    assert labels.dtype == torch.long and labels.tolist() == [2, 0, 1]
    with pytest.raises(DataError) as info:
        trainer.labels_for(["case_a", "case_x"])
    message = str(info.value)
    assert "case_x" in message and "subtypes.csv" in message
    assert str(preprocessed / "subtypes.csv") in message


def test_load_subtypes(preprocessed: Path) -> None:
    trainer = make_trainer()
    assert trainer.subtypes_file == preprocessed / "subtypes.csv"
    with pytest.raises(DataError, match="subtypes.csv: not found"):
        trainer.load_subtypes()
    csv_text = "case_id,subtype\nquiz_0_001,0\nquiz_2_002,2\n"
    (preprocessed / "subtypes.csv").write_text(csv_text, encoding="utf-8")
    assert trainer.load_subtypes() == {"quiz_0_001": 0, "quiz_2_002": 2}


def test_class_weights(preprocessed: Path) -> None:
    trainer = make_trainer()
    trainer.subtypes = {"a": 0, "b": 0, "c": 1, "d": 2, "e": 1}
    weights = trainer.class_weights(["a", "b", "c", "d"])  # counts 2/1/1
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 3, 4 / 3])

    weights = trainer.class_weights(["a", "b", "c"])  # subtype 2 absent: weight 0, warning in the log
    assert weights.tolist() == pytest.approx([3 / 6, 1.0, 0.0])
    assert "absent from the training cases of fold 0" in Path(trainer.log_file).read_text(encoding="utf-8")

    with_settings(trainer, class_weights=[1.0, 2.5, 3.0])
    assert trainer.class_weights(["a"]).tolist() == [1.0, 2.5, 3.0]
    with_settings(trainer, class_weights="none")
    assert trainer.class_weights(["a", "b"]) is None


@pytest.mark.parametrize(
    ("warmup", "epoch", "expected"),
    [(0, 0, 0.4), (0, 9, 0.4), (4, 0, 0.1), (4, 1, 0.2), (4, 3, 0.4), (4, 20, 0.4), (1, 0, 0.4)],
)
def test_cls_lambda_warmup(preprocessed: Path, warmup: int, epoch: int, expected: float) -> None:
    trainer = with_settings(make_trainer(), cls_weight=0.4, cls_warmup_epochs=warmup)
    trainer.current_epoch = epoch
    assert trainer.cls_lambda() == pytest.approx(expected)


# ------------------------------------------------------------------ train and validation steps


def _batch(trainer: Any, labels: torch.Tensor, keys: list[str], regions: bool = False) -> dict[str, Any]:
    """A batch as nnU-Net's loader gives it: data and the deep-supervision list of targets."""
    patch = list(trainer.configuration_manager.patch_size)
    torch.manual_seed(1)
    data = torch.randn(labels.shape[0], 1, *patch)
    if regions:
        full = torch.stack([labels > 0, labels == 2], dim=1)  # pancreas=[1,2], lesion=[2]
    else:
        full = labels[:, None].to(torch.int16)
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        size = [int(round(p * s)) for p, s in zip(patch, scale)]
        targets.append(F.interpolate(full.float(), size=size, mode="nearest").to(full.dtype))
    return {"data": data, "target": targets, "keys": np.array(keys)}


def _labels(batch: int, patch: list[int]) -> torch.Tensor:
    labels = torch.zeros(batch, *patch, dtype=torch.long)
    labels[:, 4:12, 8:24, 8:24] = 1
    labels[0, 6:10, 12:20, 12:20] = 2
    return labels


def _ready_trainer() -> Any:
    """A multi-task trainer set up as on_train_start leaves it, for cases case_a (1) and case_b (2)."""
    trainer = make_trainer()
    trainer.initialize()
    trainer.subtypes = {"case_a": 1, "case_b": 2}
    trainer.cls_loss = nn.CrossEntropyLoss()
    unwrap(trainer.network).return_class_logits = True
    return trainer


INITIALIZED = TrainingSettings(epochs=5, cls_weight=0.5, cls_warmup_epochs=2, head_dropout=0.0)


@pytest.fixture
def initialized(preprocessed: Path) -> Any:
    with handing(INITIALIZED):
        return _ready_trainer()


def test_train_step_combines_losses(initialized: Any) -> None:
    trainer = initialized
    assert trainer.grad_scaler is None  # CPU: plain backward
    batch = _batch(trainer, _labels(2, trainer.configuration_manager.patch_size), ["case_a", "case_b"])
    lam = trainer.cls_lambda()
    assert lam == pytest.approx(0.25)  # epoch 0 of a 2-epoch warm-up

    net = unwrap(trainer.network)
    trainer.network.train()
    with torch.no_grad():  # head dropout 0 and instance norm: the same pass train_step will do
        seg, logits = trainer.network(batch["data"])
        seg_ref = trainer.loss(seg, batch["target"]).item()
        cls_ref = F.cross_entropy(logits, torch.tensor([1, 2])).item()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}

    out = trainer.train_step(batch)
    assert set(out) == {"loss", "seg_loss", "cls_loss"}
    assert float(out["seg_loss"]) == pytest.approx(seg_ref, rel=1e-4, abs=1e-5)
    assert float(out["cls_loss"]) == pytest.approx(cls_ref, rel=1e-4, abs=1e-5)
    assert float(out["loss"]) == pytest.approx(seg_ref + lam * cls_ref, rel=1e-4, abs=1e-5)

    changed = {name for name, p in net.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert any(n.startswith("encoder.") for n in changed)
    assert any(n.startswith("decoder.seg_layers") for n in changed)
    assert any(n.startswith("head.") for n in changed)

    second = trainer.train_step(batch)
    trainer.on_train_epoch_end([out, second])
    get = trainer.logger.get_value
    for key in ("loss", "seg_loss", "cls_loss"):
        logged = get("train_losses" if key == "loss" else f"pancseg_{key}", step=0)
        assert logged == pytest.approx((float(out[key]) + float(second[key])) / 2)


def test_train_step_with_grad_scaler(initialized: Any) -> None:
    """The mixed-precision path (CUDA): both parts stepped by the scaler, nnU-Net's clipping, and no
    read-back of any value, so the CPU never waits for the GPU within or between steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # On a GPU these wait for it: a tensor's value read into Python (item(), float(), bool()), and
    # operators whose output size depends on the values (boolean masks).
    waiting = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Reads.count += func in waiting
            return func(*args, **(kwargs or {}))

    trainer = initialized
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    net = unwrap(trainer.network)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    batch = _batch(trainer, _labels(2, trainer.configuration_manager.patch_size), ["case_a", "case_b"])
    with Reads():
        out = trainer.train_step(batch)
    assert Reads.count == 0
    assert all(isinstance(v, torch.Tensor) for v in out.values())  # read back once per epoch
    assert np.isfinite(float(out["loss"]))
    changed = {name for name, p in net.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert any(n.startswith("encoder.") for n in changed) and any(n.startswith("head.") for n in changed)
    assert trainer.grad_scaler.get_scale() == 1024.0  # finite gradients: no skipped step, scale kept
    assert int(next(iter(trainer.optimizer.head.state.values()))["step"]) == 1


def test_train_step_with_grad_scaler_makes_the_unscaled_update(initialized: Any) -> None:
    """With finite gradients the mixed-precision path is the plain step: the scaler's factor is
    divided out of both parts' gradients exactly once (the SGD's by unscale_ before clipping, the
    AdamW's inside its fused kernel)."""
    scaled = initialized
    with handing(INITIALIZED):
        plain = _ready_trainer()
    plain.network.load_state_dict(scaled.network.state_dict())
    scaled.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batch = _batch(scaled, _labels(2, scaled.configuration_manager.patch_size), ["case_a", "case_b"])
    for trainer in (scaled, plain):
        torch.manual_seed(0)  # the same random gate dropout (the head's) for both
        for _ in range(2):
            trainer.train_step(batch)
    for (name, a), b in zip(scaled.network.named_parameters(), plain.network.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overflowing", ["encoder", "head", "both"])
def test_train_step_with_grad_scaler_skips_what_overflowed(initialized: Any, overflowing: str) -> None:
    """A part whose gradients overflow skips its step (the other part's gradients are still true ones,
    torch's rule for several optimizers) and the scale is halved; a skipped first SGD step leaves the
    momentum at zero, so the next step is a true first step."""
    trainer = initialized
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    net = unwrap(trainer.network)
    poisoned = {"encoder": [net.encoder.stem.convs[0].conv.weight], "head": [net.head.mlp[5].weight]}
    poisoned["both"] = poisoned["encoder"] + poisoned["head"]
    hooks = [p.register_hook(lambda g: torch.full_like(g, float("inf"))) for p in poisoned[overflowing]]
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    batch = _batch(trainer, _labels(2, trainer.configuration_manager.patch_size), ["case_a", "case_b"])
    trainer.train_step(batch)
    for hook in hooks:
        hook.remove()
    changed = {name.split(".")[0] for name, p in net.named_parameters() if not torch.equal(p.detach(), before[name])}
    stepped = {"encoder": {"head"}, "head": {"encoder", "decoder"}, "both": set()}[overflowing]
    assert changed == stepped
    assert all(int(state["step"]) == ("head" in stepped) for state in trainer.optimizer.head.state.values())
    buffers = [state["momentum_buffer"] for state in trainer.optimizer.segmentation.state.values()]
    assert len(buffers) == len(list(trainer.optimizer.segmentation_parameters()))
    assert any(b.any() for b in buffers) == ("encoder" in stepped)
    assert trainer.grad_scaler.get_scale() == 512.0


def test_train_step_unknown_case(initialized: Any) -> None:
    batch = _batch(initialized, _labels(2, initialized.configuration_manager.patch_size), ["case_a", "nope"])
    with pytest.raises(DataError, match="nope"):
        initialized.train_step(batch)


def test_validation_step_counts_and_case_outputs(initialized: Any) -> None:
    trainer = initialized
    patch = trainer.configuration_manager.patch_size
    labels = _labels(2, patch)
    batch = _batch(trainer, labels, ["case_a", "case_b"])
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        out = trainer.validation_step(batch)
        seg, logits = trainer.network(batch["data"])
    assert {"loss", "tp_hard", "fp_hard", "fn_hard", "structure_counts", "cls_loss", "case_keys",
            "case_probs", "case_weights"} <= set(out)
    assert out["tp_hard"].shape == (2,)  # pancreas, lesion labels (background dropped)
    pred = seg[0].argmax(1)
    # whole pancreas = labels 1 and 2 together; lesion = label 2, which equals nnU-Net's count of class 2
    for row, (p, t) in enumerate(((pred > 0, labels > 0), (pred == 2, labels == 2))):
        expected = [(p & t).sum().item(), (p & ~t).sum().item(), (~p & t).sum().item()]
        assert out["structure_counts"][row].tolist() == expected
    assert out["structure_counts"][1].tolist() == [out["tp_hard"][1], out["fp_hard"][1], out["fn_hard"][1]]
    assert out["case_keys"] == ["case_a", "case_b"]
    np.testing.assert_allclose(out["case_probs"], torch.softmax(logits, 1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["case_probs"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["case_weights"], tile_weights(seg[0], False).numpy(), rtol=1e-5)
    expected_cls = F.cross_entropy(logits, torch.tensor([1, 2])).item()
    assert float(out["cls_loss"]) == pytest.approx(expected_cls, rel=1e-5)


def test_validation_step_regions(preprocessed: Path) -> None:
    trainer = make_trainer(dataset_json=REGIONS_JSON)
    assert trainer.label_manager.has_regions
    trainer.initialize()
    net = unwrap(trainer.network)
    assert net.regions and net.decoder.seg_layers[0].out_channels == 2
    trainer.subtypes = {"case_a": 0}
    net.return_class_logits = True
    labels = _labels(1, trainer.configuration_manager.patch_size)
    batch = _batch(trainer, labels, ["case_a"], regions=True)
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        out = trainer.validation_step(batch)
    # regions: the two structures are exactly nnU-Net's two regions
    counts = np.stack([out["tp_hard"], out["fp_hard"], out["fn_hard"]], axis=1)
    np.testing.assert_array_equal(out["structure_counts"], counts)
    assert out["structure_counts"][:, [0, 2]].sum(1).tolist() == [(labels > 0).sum().item(),
                                                                  (labels == 2).sum().item()]
    assert out["case_probs"].shape == (1, 3) and out["case_weights"].shape == (1,)


def test_segmentation_trainer_validation_step(preprocessed: Path) -> None:
    trainer = make_trainer(nnUNetTrainerPancseg)
    trainer.initialize()
    labels = _labels(2, trainer.configuration_manager.patch_size)
    batch = _batch(trainer, labels, ["x", "y"])
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        out = trainer.validation_step(batch)
    assert set(out) == {"loss", "tp_hard", "fp_hard", "fn_hard", "structure_counts"}
    assert out["structure_counts"][1].tolist() == [out["tp_hard"][1], out["fp_hard"][1], out["fn_hard"][1]]
    assert out["structure_counts"][0, [0, 2]].sum() == (labels > 0).sum().item()


# ------------------------------------------------------------------ validation epoch end


def _val_output(keys: list[str], probs: list[list[float]], weights: list[float], counts: list[list[float]],
                cls_loss: float) -> dict[str, Any]:
    c = np.asarray(counts, dtype=np.float64)
    return {
        "loss": np.float32(1.0),
        "tp_hard": np.array([c[0, 0], c[1, 0]]), "fp_hard": np.array([c[0, 1], c[1, 1]]),
        "fn_hard": np.array([c[0, 2], c[1, 2]]),
        "structure_counts": c,
        "cls_loss": np.float32(cls_loss),
        "case_keys": keys,
        "case_probs": np.asarray(probs, dtype=np.float32),
        "case_weights": np.asarray(weights, dtype=np.float32),
    }


def test_validation_epoch_end_aggregates_cases(preprocessed: Path) -> None:
    trainer = make_trainer()
    trainer.subtypes = {"a": 1, "b": 0, "c": 2}
    outputs = [
        # case a: a confident but almost weightless background patch, and its lesion patch saying 1
        _val_output(["a", "a"], [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]], [0.001, 0.5],
                    [[10, 2, 3], [4, 1, 1]], 0.5),
        _val_output(["b", "c"], [[0.7, 0.2, 0.1], [0.6, 0.1, 0.3]], [0.2, 0.3], [[20, 0, 5], [0, 2, 3]], 1.5),
    ]
    trainer.on_validation_epoch_end(outputs)
    get = trainer.logger.get_value
    assert get("pancseg_dice_pancreas", step=0) == pytest.approx(2 * 30 / (2 * 30 + 2 + 8))
    assert get("pancseg_dice_lesion", step=0) == pytest.approx(2 * 4 / (2 * 4 + 3 + 4))
    assert get("pancseg_val_cls_loss", step=0) == pytest.approx(1.0)
    assert get("pancseg_val_cases", step=0) == 3
    # a -> 1 (weighted; an unweighted mean would say 0), b -> 0, c -> 0 (wrong): 2 of 3
    assert get("pancseg_val_accuracy", step=0) == pytest.approx(2 / 3)
    f1 = [2 / 3, 1.0, 0.0]  # subtype 0: tp 1, fp 1; subtype 1: tp 1; subtype 2: missed
    assert get("pancseg_val_macro_f1", step=0) == pytest.approx(np.mean(f1))
    # nnU-Net's own values are logged too
    assert get("mean_fg_dice", step=0) == pytest.approx(np.mean([2 * 30 / 70, 8 / 15]))


# ------------------------------------------------------------------ selection and metrics.csv


def _log_epoch(trainer: Any, epoch: int, *, fg_dice: float = 0.5, dice_pancreas: float = 0.6,
               f1: float = 0.4, multitask: bool = True) -> None:
    log = trainer.logger.log
    log("epoch_start_timestamps", time.time() - 1.5, epoch)
    log("lrs", 0.01 / (epoch + 1), epoch)
    log("train_losses", 1.0 - 0.1 * epoch, epoch)
    log("val_losses", 1.1 - 0.1 * epoch, epoch)
    log("mean_fg_dice", fg_dice, epoch)
    log("dice_per_class_or_region", [fg_dice, fg_dice], epoch)
    log("pancseg_dice_pancreas", dice_pancreas, epoch)
    log("pancseg_dice_lesion", 0.3, epoch)
    if multitask:
        log("pancseg_seg_loss", 0.8, epoch)
        log("pancseg_cls_loss", 1.2 + epoch, epoch)
        log("pancseg_val_cls_loss", 0.9, epoch)
        log("pancseg_val_accuracy", 0.75, epoch)
        log("pancseg_val_macro_f1", f1, epoch)
        log("pancseg_val_cases", 4, epoch)


@pytest.mark.parametrize(
    ("select_by", "expected"), [("combined", 0.6), ("segmentation", 0.7), ("classification", 0.5)]
)
def test_selection_value(preprocessed: Path, select_by: str, expected: float) -> None:
    trainer = with_settings(make_trainer(), select_by=select_by)
    _log_epoch(trainer, 0, fg_dice=0.7, dice_pancreas=0.7, f1=0.5)
    assert trainer._selection_value() == pytest.approx(expected)


def test_selection_value_with_nan_f1(preprocessed: Path) -> None:
    trainer = with_settings(make_trainer(), select_by="combined")
    _log_epoch(trainer, 0, dice_pancreas=0.8, f1=float("nan"))
    assert trainer._selection_value() == pytest.approx(0.8)
    plain = with_settings(make_trainer(nnUNetTrainerPancseg), select_by="classification")
    _log_epoch(plain, 0, fg_dice=0.65, multitask=False)
    assert plain._selection_value() == pytest.approx(0.65)  # only segmentation there


def _read_metrics(trainer: Any) -> tuple[list[str], list[dict[str, str]]]:
    with (Path(trainer.output_folder) / METRICS_NAME).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _epoch_end_setup(trainer: Any, monkeypatch: pytest.MonkeyPatch, plot: bool = False) -> list[str]:
    saved: list[str] = []
    monkeypatch.setattr(trainer, "save_checkpoint", lambda f: saved.append(Path(f).name))
    if not plot:
        monkeypatch.setattr(trainer.logger, "plot_progress_png", lambda folder: None)
    return saved


def test_on_epoch_end_metrics_checkpoints_and_ema(preprocessed: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = with_settings(make_trainer(), select_by="classification", save_every=2, cls_weight=0.3,
                            cls_warmup_epochs=2)
    trainer.ema_alpha = 0.5
    trainer.num_epochs = 10
    trainer.save_every = 2
    saved = _epoch_end_setup(trainer, monkeypatch, plot=True)
    rows_seen: list[dict[str, Any]] = []
    trainer.epoch_callback = rows_seen.append

    f1s = [0.2, 0.6, 0.3, float("nan")]
    for epoch, f1 in enumerate(f1s):
        assert trainer.current_epoch == epoch
        _log_epoch(trainer, epoch, f1=f1)
        trainer.on_epoch_end()
        if epoch == 0:  # nnU-Net's plot copes with pancseg's extra keys; slow, so only once
            assert (Path(trainer.output_folder) / "progress.png").is_file()
            monkeypatch.setattr(trainer.logger, "plot_progress_png", lambda folder: None)
    assert trainer.current_epoch == 4
    # EMA with alpha 0.5: 0.2, 0.5*0.2+0.5*0.6, 0.5*0.4+0.5*0.3; a NaN epoch keeps the previous value
    criteria = [0.2, 0.4, 0.35, 0.35]
    assert trainer.logger.get_value("pancseg_criterion", step=None) == pytest.approx(criteria)
    best, latest = "checkpoint_best.pth", "checkpoint_latest.pth"
    assert saved == [best, latest, best, latest]  # best at epochs 1, 2; latest every 2 epochs
    assert trainer._best_ema == pytest.approx(0.4)

    header, rows = _read_metrics(trainer)
    assert tuple(header) == METRICS_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["criterion"]) for r in rows] == pytest.approx(criteria)
    assert [r["best"] for r in rows] == ["1", "1", "0", "0"]
    assert rows[3]["val_macro_f1"] == ""  # NaN is written as an empty cell
    assert float(rows[1]["val_macro_f1"]) == pytest.approx(0.6)
    assert [float(r["cls_lambda"]) for r in rows] == pytest.approx([0.15, 0.3, 0.3, 0.3])
    assert [float(r["cls_loss"]) for r in rows] == pytest.approx([1.2, 2.2, 3.2, 4.2])
    assert float(rows[2]["train_loss"]) == pytest.approx(0.8)
    assert float(rows[2]["lr"]) == pytest.approx(0.01 / 3, rel=1e-5)  # 6 significant digits
    assert rows[0]["val_cases"] == "4" and float(rows[0]["dice_pancreas"]) == pytest.approx(0.6)
    assert float(rows[0]["ema_pseudo_dice"]) == pytest.approx(0.5)
    assert all(1.5 <= float(r["epoch_time_s"]) < 60 for r in rows)
    assert [r["epoch"] for r in rows_seen] == [1, 2, 3, 4] and rows_seen[1]["best"] == 1

    # resume from the checkpoint of epoch 2 (1-based): epochs >= 3 are trained again and replace their rows
    resumed = with_settings(make_trainer(), select_by="classification")
    resumed.ema_alpha = 0.5
    assert resumed.output_folder == trainer.output_folder
    saved = _epoch_end_setup(resumed, monkeypatch)
    resumed.logger.load_checkpoint({k: list(v[:2]) for k, v in trainer.logger.get_checkpoint().items()})
    resumed.current_epoch, resumed._best_ema = 2, 0.4
    _log_epoch(resumed, 2, f1=1.0)
    resumed.on_epoch_end()
    header, rows = _read_metrics(resumed)
    assert tuple(header) == METRICS_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[2]["criterion"]) == pytest.approx(0.5 * 0.4 + 0.5 * 1.0)
    assert rows[2]["best"] == "1" and saved == ["checkpoint_best.pth"]
    assert float(rows[0]["criterion"]) == pytest.approx(0.2)  # earlier rows kept as they were


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_ema_alpha(preprocessed: Path, monkeypatch: pytest.MonkeyPatch, alpha: float) -> None:
    trainer = with_settings(make_trainer(), select_by="combined")
    trainer.ema_alpha = alpha
    _epoch_end_setup(trainer, monkeypatch)
    raws = []
    for epoch, (dice, f1) in enumerate([(0.5, 0.1), (0.9, 0.9), (0.3, 0.1)]):
        _log_epoch(trainer, epoch, dice_pancreas=dice, f1=f1)
        raws.append((dice + f1) / 2)
        trainer.on_epoch_end()
    expected = [raws[0]]
    for raw in raws[1:]:
        expected.append(alpha * expected[-1] + (1 - alpha) * raw)
    assert trainer.logger.get_value("pancseg_criterion", step=None) == pytest.approx(expected)
    best = [r["best"] for r in _read_metrics(trainer)[1]]
    assert best == ["1", "1", "0"]


def test_first_epochs_without_criterion(preprocessed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN until the first usable value: no 'best' checkpoint for a NaN criterion."""
    trainer = with_settings(make_trainer(), select_by="classification")
    saved = _epoch_end_setup(trainer, monkeypatch)
    _log_epoch(trainer, 0, f1=float("nan"))
    trainer.on_epoch_end()
    assert saved == [] and trainer._best_ema is None
    _log_epoch(trainer, 1, f1=0.3)
    trainer.on_epoch_end()
    assert saved == ["checkpoint_best.pth"]
    assert trainer.logger.get_value("pancseg_criterion", step=1) == pytest.approx(0.3)
    rows = _read_metrics(trainer)[1]
    assert rows[0]["criterion"] == "" and rows[0]["best"] == "0"
    assert rows[1]["best"] == "1"


def test_segmentation_trainer_metrics_row(preprocessed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(nnUNetTrainerPancseg)
    saved = _epoch_end_setup(trainer, monkeypatch)
    _log_epoch(trainer, 0, fg_dice=0.5, multitask=False)
    trainer.on_epoch_end()
    _log_epoch(trainer, 1, fg_dice=0.4, multitask=False)
    trainer.on_epoch_end()
    header, rows = _read_metrics(trainer)
    assert tuple(header) == METRICS_COLUMNS and len(rows) == 2
    assert [float(r["criterion"]) for r in rows] == pytest.approx([0.5, 0.9 * 0.5 + 0.1 * 0.4])
    # the criterion is nnU-Net's EMA pseudo Dice for the segmentation trainer
    assert [float(r["ema_pseudo_dice"]) for r in rows] == pytest.approx([float(r["criterion"]) for r in rows])
    assert all(r[c] == "" for r in rows for c in ("seg_loss", "cls_loss", "cls_lambda", "val_macro_f1"))
    assert saved == ["checkpoint_best.pth"]


# ------------------------------------------------------------------ validation outputs


def test_checkpoints_are_written_atomically(preprocessed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer()
    trainer.initialize()
    target = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(target))
    assert torch.load(target, weights_only=False)["current_epoch"] == 1
    before = target.read_bytes()

    def killed(obj: Any, f: str) -> None:  # a write cut short
        Path(f).write_bytes(b"trunc")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(DiskFullError, match="checkpoint_latest.pth: could not be written, the disk is full"):
        trainer.save_checkpoint(str(target))
    assert target.read_bytes() == before  # the previous checkpoint is intact
    assert not [p.name for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_write_subtype_results(preprocessed: Path) -> None:
    trainer = make_trainer()
    trainer.subtypes = {"c1": 0, "c2": 1, "c3": 2}
    results = {"c2": (np.array([0.1, 0.7, 0.2]), False), "c1": (np.array([0.6, 0.3, 0.1]), True),
               "c3": (np.array([0.5, 0.2, 0.3]), True)}
    trainer._write_subtype_results(results)
    folder = Path(trainer.output_folder) / "validation"
    assert (folder / "subtype_results.csv").read_text(encoding="utf-8") == (
        "Names,Subtype\nc1.nii.gz,0\nc2.nii.gz,1\nc3.nii.gz,0\n"
    )
    probs = (folder / "subtype_probabilities.csv").read_text(encoding="utf-8").splitlines()
    assert probs[0] == "Names,p0,p1,p2,subtype_source"
    assert probs[1] == "c1.nii.gz,0.600000,0.300000,0.100000,lesion"
    assert probs[2] == "c2.nii.gz,0.100000,0.700000,0.200000,pancreas"  # no lesion segmented
    summary = json.loads((folder / "classification_summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == 3 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert math.isclose(summary["macro_f1"], np.mean([2 / 3, 1.0, 0.0]))


def test_predictor_class_swap() -> None:
    module = trainer_module.sys.modules[trainer_module.nnUNetTrainer.__module__]
    original = module.nnUNetPredictor

    class Dummy:
        def __init__(self, value: int) -> None:
            self.value = value

    with _predictor_class(Dummy) as created:
        assert module.nnUNetPredictor is not original
        instance = module.nnUNetPredictor(3)
        assert isinstance(instance, Dummy) and created == [instance]
    assert module.nnUNetPredictor is original
    with pytest.raises(RuntimeError), _predictor_class(Dummy):
        raise RuntimeError("restored even on errors")
    assert module.nnUNetPredictor is original


def test_validation_refuses_to_pair_subtypes_it_did_not_predict(preprocessed: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Subtypes are paired with cases by order: a count mismatch must stop, not mislabel or drop cases."""
    trainer = make_trainer()
    trainer.initialize()
    monkeypatch.setattr(trainer_module.nnUNetTrainer, "perform_actual_validation", lambda self, save: None)
    monkeypatch.setattr(trainer, "do_split", lambda: (["t1"], ["v1", "v2"]))
    with pytest.raises(RuntimeError, match="validation predicted subtypes for 0 of 2 cases of fold 0"):
        trainer.perform_actual_validation(False)
    assert not (Path(trainer.output_folder) / "validation" / "subtype_results.csv").exists()


# ------------------------------------------------------------------ end of training: the shortcut refit


def _fingerprint(network: nn.Module) -> float:
    """The weights outside the shortcut, as one number: which checkpoint's weights the network holds."""
    return float(sum(p.detach().double().sum() for n, p in unwrap(network).named_parameters() if "shortcut" not in n))


def _refit_setup(preprocessed: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> tuple[Any, list]:
    """A trainer whose checkpoint_best.pth holds other weights than the network's (the final ones), with
    ``refit`` recording what it was given and writing the network's fingerprint into the shortcut."""
    keys = [f"case_{i}" for i in range(7)]
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": keys[:6], "val": keys[6:]}] * 5))
    trainer = with_settings(make_trainer(), **settings)
    trainer.initialize()
    trainer.subtypes = {k: i % 3 for i, k in enumerate(keys)}
    network = unwrap(trainer.network)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.01)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_best.pth"))
    with torch.no_grad():
        for p in network.parameters():
            p.sub_(0.01)
    calls: list = []

    def collect(predictor: Any, cases: Any) -> list:
        assert unwrap(predictor.network) is network and not network.training
        return ["tiles"] * 6

    def refit(head: Any, tiles: list, labels: list[int], class_weights: list[float] | None) -> Any:
        calls.append((_fingerprint(network), labels, class_weights))
        with torch.no_grad():
            head.shortcut.weight.fill_(len(calls))
        return RefitResult(cases=6, accuracy_before=0.5, accuracy_after=0.8)

    monkeypatch.setattr(trainer_module, "collect", collect)
    monkeypatch.setattr(trainer_module, "refit", refit)
    return trainer, calls


def test_training_ends_with_the_shortcut_refitted_in_best_and_final(preprocessed: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, calls = _refit_setup(preprocessed, monkeypatch)
    network = unwrap(trainer.network)
    folder = Path(trainer.output_folder)
    best_before = torch.load(folder / "checkpoint_best.pth", weights_only=False)["network_weights"]
    final_before = {k: v.clone() for k, v in network.state_dict().items()}
    trainer.on_train_end()

    # best's weights were refitted first (then the final ones), each on the fold's 6 training cases
    assert [c[0] for c in calls] == pytest.approx([_fingerprint(network) + 0.01 * sum(
        p.numel() for n, p in network.named_parameters() if "shortcut" not in n), _fingerprint(network)])
    assert calls[0][1] == [0, 1, 2, 0, 1, 2] and calls[0][2] == pytest.approx([1.0, 1.0, 1.0])
    best = torch.load(folder / "checkpoint_best.pth", weights_only=False)["network_weights"]
    final = torch.load(folder / "checkpoint_final.pth", weights_only=False)["network_weights"]
    for weights, before, refit_number in ((best, best_before, 1), (final, final_before, 2)):
        assert (weights["head.shortcut.weight"] == refit_number).all()
        assert all(torch.equal(weights[k].cpu(), before[k].cpu()) for k in before if "shortcut.weight" not in k)
    assert (network.head.shortcut.weight == 2).all()  # the network goes on (validation) with the final refit
    assert network.return_class_logits and network.training
    log = Path(trainer.log_file).read_text()
    assert "subtype shortcut of checkpoint_best.pth refitted on 6 training cases: their accuracy 0.500 -> 0.800" in log
    assert "subtype shortcut of the final weights refitted" in log


def test_refit_can_be_switched_off(preprocessed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, calls = _refit_setup(preprocessed, monkeypatch, refit_subtype=False)
    trainer.on_train_end()
    assert calls == []
    assert "subtype shortcut" not in Path(trainer.log_file).read_text()


def test_every_ddp_process_refits_the_checkpoints_rank_0_sees(preprocessed: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 writes checkpoint_best.pth at its epoch end, which another process may pass first: had that
    process skipped the best's refit, its gathers would pair with the wrong ones of rank 0 (a hang)."""
    trainer = make_trainer()
    calls: list[str] = []

    def broadcast(objects: list, src: int) -> None:
        calls.append(f"broadcast from {src}")
        objects[0] = True  # rank 0 has the file

    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    assert trainer._on_every_rank(False) is False and calls == []  # one process: its own decision
    trainer.is_ddp = True
    assert trainer._on_every_rank(False) is True
    assert calls == ["barrier", "broadcast from 0"]
