"""The places where pancseg reaches into nnU-Net's internals ("seams"), each pinned against nnU-Net itself.

pancseg subclasses nnU-Net's predictor and trainer, replaces a few of their method bodies, patches
one of their lookups and calls functions that are not nnU-Net's public API. A new nnU-Net release may
change any of them without an error in pancseg: an override no longer called, a body pancseg copied
that nnU-Net changed, a worker pool no longer started the patched way. Every test here fails with a
message naming the seam and what to do. docs/architecture.md lists all seams with the test that pins
each (several are pinned by behaviour tests in the stage's own test file).

Bodies that pancseg replaces are compared by what they use (attributes, string constants, in-place
updates of attributes), not by their text, so formatting and Python versions do not matter.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

SEAMS_DOC = "docs/architecture.md (nnU-Net seams)"


def _seam(name: str, what: str) -> str:
    return f"nnU-Net seam changed: {name}: {what}; see {SEAMS_DOC}"


def _function(fn: Any) -> ast.FunctionDef:
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    return node  # type: ignore[return-value]


def _uses(fn: Any) -> set[str]:
    """What a function's body uses: attribute names, string constants (also those named by a module
    constant, e.g. the checkpoint names layout.py owns) and in-place attribute updates."""
    names = getattr(inspect.unwrap(fn), "__globals__", {})
    body = _function(fn).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    used: set[str] = set()
    for node in (n for statement in body for n in ast.walk(statement)):
        if isinstance(node, ast.Attribute):
            used.add(f".{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.add(repr(node.value))
        elif isinstance(node, ast.Name) and isinstance(names.get(node.id), str):
            used.add(repr(names[node.id]))
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute):
            used.add(f".{node.target.attr} {type(node.op).__name__}=")
    return used


def _self_calls(fn: Any) -> set[str]:
    """The methods a function calls on ``self``."""
    return {node.func.attr for node in ast.walk(_function(fn))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"}


def _parameters(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _changed(expected: set[str], found: set[str]) -> str:
    return f"now also uses {sorted(found - expected)}, no longer {sorted(expected - found)}"


def _check_replaced_body(theirs: Any, recorded: set[str], ours: Any, replaced: set[str]) -> None:
    """nnU-Net's ``theirs`` still uses exactly ``recorded`` (as of the pinned version), and pancseg's
    ``ours``, which stands in for its body, does all of it but ``replaced``."""
    name, our_name = theirs.__qualname__, ours.__qualname__
    found = _uses(theirs)
    assert found == recorded, _seam(name, f"{_changed(recorded, found)}; pancseg's {our_name} replaces its body: "
                                    "carry the change over, then update the recorded set in this test")
    left_out = found - _uses(ours)
    assert left_out <= replaced, f"pancseg's {our_name} no longer does {sorted(left_out - replaced)} of {name}"


# ------------------------------------------------------------------ prediction: the predictor subclass

PREDICTOR_OVERRIDES = ("initialize_from_trained_model_folder", "predict_logits_from_preprocessed_data",
                       "predict_sliding_window_return_logits", "_internal_predict_sliding_window_return_logits",
                       "_internal_maybe_mirror_and_predict", "manual_initialization")


@pytest.mark.parametrize("name", PREDICTOR_OVERRIDES)
def test_predictor_methods_pancseg_overrides_or_calls_keep_their_signatures(name: str) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from pancreas_cli.multitask.predictor import MultiTaskPredictor

    theirs = _parameters(getattr(nnUNetPredictor, name))
    ours = _parameters(getattr(MultiTaskPredictor, name))
    assert theirs == ours, _seam(f"nnUNetPredictor.{name}", f"parameters {theirs}, pancseg's predictor "
                                 f"(multitask/predictor.py) has {ours}")


@pytest.mark.parametrize(("caller", "callees"), [
    ("predict_logits_from_preprocessed_data", {"predict_sliding_window_return_logits"}),
    ("predict_sliding_window_return_logits", {"_internal_predict_sliding_window_return_logits"}),
    ("_internal_predict_sliding_window_return_logits", {"_internal_maybe_mirror_and_predict"}),
    ("_internal_maybe_mirror_and_predict", {"network"}),
])
def test_nnunets_window_calls_what_pancseg_overrides(caller: str, callees: set[str]) -> None:
    """pancseg's window, tile counting and per-mirror class logits hang on these calls: were one gone,
    nnU-Net's own window would run instead, silently (same masks, no speed-up, no subtype)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    missing = callees - _self_calls(getattr(nnUNetPredictor, caller))
    assert not missing, _seam(f"nnUNetPredictor.{caller}", f"no longer calls self.{sorted(missing)}, which "
                              "pancseg's ProgressPredictor/MultiTaskPredictor override or rely on")


def test_predictor_fields_pancseg_reads_are_set_by_manual_initialization() -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from test_network import DATASET_JSON, make_plans

    manager = PlansManager(make_plans())
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(torch.nn.Identity(), manager, manager.get_configuration("3d_fullres"), [{}],
                                    DATASET_JSON, "nnUNetTrainerMultiTask", (0, 1, 2))
    fields = ("list_of_parameters", "allowed_mirroring_axes", "use_mirroring", "use_gaussian", "tile_step_size",
              "configuration_manager", "plans_manager", "label_manager", "dataset_json", "network", "device",
              "perform_everything_on_device")
    missing = [name for name in fields if not hasattr(predictor, name)]
    assert not missing, _seam("nnUNetPredictor fields", f"{missing} not set; pancseg's window and predict read them")


def test_pancsegs_trainers_networks_are_found_without_nnunets_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """The predictor builds a pancseg model's network with what nnU-Net's trainer search would find,
    without the search (it imports every trainer module nnU-Net ships: seconds of each prediction);
    other trainers still go through it."""
    from nnunetv2.utilities import find_objects

    from pancreas_cli.layout import TRAINERS
    from pancreas_cli.multitask import predictor
    from pancreas_cli.nnunet_env import TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", str(TRAINER_DIR))
    for name in TRAINERS.values():
        found = find_objects.recursive_find_trainer_class_by_name(name)
        assert predictor.network_builder(name) == found.build_network_architecture, _seam(
            f"{name}.build_network_architecture", "the network the trainer builds is not the one "
            "multitask/predictor.py's network_builder gives for it: make them the same")
    searched: list[str] = []
    monkeypatch.setattr(predictor, "recursive_find_trainer_class_by_name", lambda name: searched.append(name))
    for name in TRAINERS.values():
        predictor.network_builder(name)
    assert not searched
    with pytest.raises(AttributeError):  # the search's None has no builder: it was asked
        predictor.network_builder("nnUNetTrainer")
    assert searched == ["nnUNetTrainer"]


NNUNET_FOLD_LOOP = {
    ".get_num_threads", ".set_num_threads", ".list_of_parameters", ".network", ".load_state_dict", "._orig_mod",
    ".predict_sliding_window_return_logits", ".to", "'cpu'", ".verbose", "'Prediction done'"}


def test_the_fold_loop_pancseg_copies_is_nnunets() -> None:
    """``ProgressPredictor._ensemble_on_device`` is nnU-Net's fold loop with the logits left on the device."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from pancreas_cli.multitask.predictor import ProgressPredictor

    _check_replaced_body(nnUNetPredictor.predict_logits_from_preprocessed_data, NNUNET_FOLD_LOOP,
                         ProgressPredictor._ensemble_on_device,
                         {"._orig_mod", ".to", "'cpu'", ".verbose", "'Prediction done'"})


def test_validation_builds_its_predictor_by_its_module_name() -> None:
    """The trainer swaps ``nnUNetPredictor`` in nnU-Net's trainer module for the validation's predictor
    (``_predictor_class``): that works only while the validation looks the name up there at run time."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    function = _function(module.nnUNetTrainer.perform_actual_validation)
    looked_up = any(isinstance(n, ast.Name) and n.id == "nnUNetPredictor" and isinstance(n.ctx, ast.Load)
                    for n in ast.walk(function))
    imported = any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(function))
    assert looked_up and not imported and hasattr(module, "nnUNetPredictor"), _seam(
        "nnUNetTrainer.perform_actual_validation", "no longer builds nnUNetPredictor through its module's "
        "global name, so pancseg's _predictor_class (multitask/trainer.py) cannot give it MultiTaskPredictor "
        "and the validation writes no subtype_results.csv")


# ------------------------------------------------------------------ prediction: reading, resampling, export


@pytest.mark.parametrize(("path", "name", "leading"), [
    ("nnunetv2.preprocessing.preprocessors.default_preprocessor", "DefaultPreprocessor.run_case_npy",
     ["self", "data", "seg", "properties", "plans_manager", "configuration_manager", "dataset_json"]),
    ("nnunetv2.preprocessing.preprocessors.default_preprocessor", "DefaultPreprocessor.run_case",
     ["self", "image_files", "seg_file", "plans_manager", "configuration_manager", "dataset_json"]),
    ("nnunetv2.inference.export_prediction", "export_prediction_from_logits",
     ["predicted_array_or_file", "properties_dict", "configuration_manager", "plans_manager",
      "dataset_json_dict_or_file", "output_file_truncated", "save_probabilities"]),
    ("nnunetv2.inference.export_prediction", "convert_predicted_logits_to_segmentation_with_correct_shape",
     ["predicted_logits", "plans_manager", "configuration_manager", "label_manager", "properties_dict",
      "return_probabilities"]),
    ("nnunetv2.utilities.label_handling.label_handling", "LabelManager.apply_inference_nonlin", ["self", "logits"]),
    ("nnunetv2.imageio.simpleitk_reader_writer", "SimpleITKIO.write_seg",
     ["self", "seg", "output_fname", "properties"]),
    ("nnunetv2.experiment_planning.plan_and_preprocess_api", "extract_fingerprints",
     ["dataset_ids", "fingerprint_extractor_class_name", "num_processes", "check_dataset_integrity", "clean",
      "verbose", "show_progress_bar"]),
    ("nnunetv2.experiment_planning.plan_and_preprocess_api", "plan_experiments",
     ["dataset_ids", "experiment_planner_class_name"]),
    ("nnunetv2.experiment_planning.plan_and_preprocess_api", "preprocess",
     ["dataset_ids", "plans_identifier", "configurations", "num_processes", "verbose", "show_progress_bar"]),
    ("nnunetv2.run.run_training", "get_trainer_from_args",
     ["dataset_name_or_id", "configuration", "fold", "trainer_name", "plans_identifier", "continue_training",
      "device"]),
    ("nnunetv2.run.run_training", "maybe_load_checkpoint", ["nnunet_trainer", "continue_training", "validation_only"]),
    ("nnunetv2.run.run_training", "find_free_network_port", []),
])
def test_nnunet_functions_pancseg_calls_keep_their_parameters(path: str, name: str, leading: list[str]) -> None:
    import importlib

    target: Any = importlib.import_module(path)
    for part in name.split("."):
        target = getattr(target, part)
    found = _parameters(target)
    assert found[:len(leading)] == leading, _seam(f"{path}.{name}", f"parameters {found}, pancseg passes {leading}")


def test_default_plans_resample_on_the_device() -> None:
    """``DeviceResampling`` replaces nnU-Net's resampling only for the default function given as a
    ``partial`` with known keywords; anything else quietly runs nnU-Net's CPU code (correct, slower)."""
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncM,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from test_network import make_plans

    from pancreas_cli.inference.resample import DeviceResampling

    planner: Any = nnUNetPlannerResEncM  # its two methods use nothing of the instance
    data_fn, data_kwargs, _, _ = planner.determine_resampling(None)
    probabilities_fn, probabilities_kwargs = planner.determine_segmentation_softmax_export_fn(None)
    plans = make_plans()
    plans["configurations"]["3d_fullres"].update(
        resampling_fn_data=data_fn.__name__, resampling_fn_data_kwargs=data_kwargs,
        resampling_fn_probabilities=probabilities_fn.__name__, resampling_fn_probabilities_kwargs=probabilities_kwargs)
    wrapped = DeviceResampling(PlansManager(plans).get_configuration("3d_fullres"), torch.device("cpu"))
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 4, 10, 10)).astype(np.float32))
    for kind, fn in (("data", wrapped.resampling_fn_data), ("probabilities", wrapped.resampling_fn_probabilities)):
        result = fn(data, (4, 12, 12), (2.0, 0.9, 0.9), (2.0, 0.75, 0.75))
        assert isinstance(result, torch.Tensor), _seam(
            f"the planner's resampling_fn_{kind}", "no longer the partial of resample_data_or_seg_to_shape that "
            "pancreas_cli/inference/resample.py reads its matrices off; prediction falls back to nnU-Net's CPU "
            "resampling")


# ------------------------------------------------------------------ training: the trainer subclass


def test_trainer_constructor_is_nnunets() -> None:
    """nnU-Net records ``__init__``'s arguments from its own ``locals()`` (checkpoints' ``init_args``) and
    builds trainers with exactly these (``nnUNetv2_train``, DDP, the predictor); pancseg also hands it
    ``continue_training`` inside the plans, which nnU-Net pops there."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask, nnUNetTrainerPancseg

    theirs = _parameters(nnUNetTrainer.__init__)
    for cls in (nnUNetTrainerPancseg, nnUNetTrainerMultiTask):
        assert _parameters(cls.__init__) == theirs, _seam(
            "nnUNetTrainer.__init__", f"parameters {theirs}, {cls.__name__} has {_parameters(cls.__init__)}")
    assert "'continue_training'" in _uses(nnUNetTrainer.__init__), _seam(
        "nnUNetTrainer.__init__", "no longer reads continue_training from the plans (pancseg's build_trainer "
        "puts it there)")


def _keys_pancseg_reads() -> set[str]:
    """Log keys of nnU-Net's that pancseg's trainer reads (``logger.get_value``, ``_logged``)."""
    import pancreas_cli.multitask.trainer as trainer

    keys = set()
    for node in ast.walk(ast.parse(Path(trainer.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func  # logger.get_value(key), self._logged(key), or get(key) with get = self._logged
            method = isinstance(func, ast.Attribute) and func.attr in ("get_value", "_logged")
            alias = isinstance(func, ast.Name) and func.id in ("get", "_logged")
            if (method or alias) and isinstance(node.args[0].value, str):
                keys.add(node.args[0].value)
    return {key for key in keys if not key.startswith("pancseg_")}


def test_logger_keys_pancseg_reads_and_registers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pancseg registers its own keys in ``logger.local_logger.my_fantastic_logging`` (nnU-Net's logger
    refuses unregistered keys) and reads nnU-Net's keys to write metrics.csv."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    monkeypatch.delenv("nnUNet_wandb_enabled", raising=False)
    logger = MetaLogger(str(tmp_path), False)
    store = getattr(getattr(logger, "local_logger", None), "my_fantastic_logging", None)
    assert isinstance(store, dict), _seam("nnU-Net's logger", "no dict logger.local_logger.my_fantastic_logging, "
                                          "where pancseg's trainer registers and reads its values")
    reads = _keys_pancseg_reads()
    assert {"train_losses", "mean_fg_dice", "ema_fg_dice"} <= reads  # the scan of trainer.py found them
    assert reads <= set(store), _seam("nnU-Net's logger keys", f"{sorted(reads - set(store))} are gone; "
                                      "pancseg's trainer reads them for metrics.csv")
    with pytest.raises(AssertionError):
        logger.log("pancseg_unregistered", 1.0, 0)  # why pancseg registers its keys first
    logger.log("mean_fg_dice", 0.5, 0)
    assert logger.get_value("ema_fg_dice", step=-1) == 0.5, _seam(
        "nnU-Net's logger", "logging mean_fg_dice no longer logs ema_fg_dice (metrics.csv's ema_pseudo_dice)")


NNUNET_ON_EPOCH_END = {
    "' s'", "'Epoch time: '", "'Pseudo dice'", "'Yayy! New best EMA pseudo Dice: '", "'checkpoint_best.pth'",
    "'checkpoint_latest.pth'", "'dice_per_class_or_region'", "'ema_fg_dice'", "'epoch_end_timestamps'",
    "'epoch_start_timestamps'", "'train_loss'", "'train_losses'", "'val_loss'", "'val_losses'", "._best_ema",
    ".current_epoch", ".current_epoch Add=", ".get_value", ".local_rank", ".log", ".logger", ".num_epochs",
    ".output_folder", ".plot_progress_png", ".print_to_log_file", ".round", ".save_checkpoint", ".save_every"}


def test_on_epoch_end_is_what_pancseg_replaces() -> None:
    """``nnUNetTrainerPancseg.on_epoch_end`` replaces nnU-Net's whole body (its best checkpoint follows
    ``train.select_by``, not nnU-Net's EMA Dice, and it writes metrics.csv): everything else of nnU-Net's
    must still happen, so a change there has to be carried over."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from pancreas_cli.multitask.trainer import nnUNetTrainerPancseg

    _check_replaced_body(nnUNetTrainer.on_epoch_end, NNUNET_ON_EPOCH_END, nnUNetTrainerPancseg.on_epoch_end,
                         {"'ema_fg_dice'", "'Yayy! New best EMA pseudo Dice: '"})


def test_checkpoints_hold_what_pancseg_reads_and_the_next_epoch() -> None:
    """pancseg's load_checkpoint (and predictor) read the keys nnU-Net saves, and a checkpoint stores
    the epoch to resume at (``current_epoch + 1``), which ``train``'s save on Ctrl-C compensates for."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from pancreas_cli.checkpoints import REQUIRED_KEYS

    saved = None
    for node in ast.walk(_function(nnUNetTrainer.save_checkpoint)):
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "current_epoch"
                                              for k in node.keys):
            saved = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
    assert saved is not None, _seam("nnUNetTrainer.save_checkpoint", "no checkpoint dict with current_epoch")
    wanted = {*REQUIRED_KEYS, "logging", "_best_ema", "optimizer_state", "grad_scaler_state",
              "inference_allowed_mirroring_axes"}
    assert wanted <= set(saved), _seam("nnUNetTrainer.save_checkpoint",
                                       f"no longer saves {sorted(wanted - set(saved))}")
    assert ast.unparse(saved["current_epoch"]) == "self.current_epoch + 1", _seam(
        "nnUNetTrainer.save_checkpoint", f"stores current_epoch as {ast.unparse(saved['current_epoch'])}; "
        "pancreas_cli/train.py's _save_on_interrupt assumes current_epoch + 1")


# ------------------------------------------------------------------ processes, data loading, DDP

POOL_SITES = [
    ("nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor", "DatasetFingerprintExtractor.run"),
    ("nnunetv2.experiment_planning.verify_dataset_integrity", "verify_dataset_integrity"),
    ("nnunetv2.preprocessing.preprocessors.default_preprocessor", "DefaultPreprocessor.run"),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnUNetTrainer.perform_actual_validation"),
    ("nnunetv2.evaluation.evaluate_predictions", "compute_metrics_on_folder"),
]


@pytest.mark.parametrize(("path", "name"), POOL_SITES)
def test_nnunets_pools_start_through_multiprocessing_get_context(path: str, name: str) -> None:
    """``nnunet_worker_pools`` runs nnU-Net's pools on a thread by patching ``multiprocessing.get_context``:
    it reaches only pools made as ``multiprocessing.get_context("spawn").Pool`` from the module."""
    import importlib
    import multiprocessing

    module = importlib.import_module(path)
    target: Any = module
    for part in name.split("."):
        target = getattr(target, part)
    calls = [ast.unparse(n.func) for n in ast.walk(_function(target)) if isinstance(n, ast.Call)]
    patched = any(call.startswith("multiprocessing.get_context(") and call.endswith(").Pool") for call in calls)
    assert patched and getattr(module, "multiprocessing", None) is multiprocessing, _seam(
        f"{path}.{name}", "no longer starts its pool as multiprocessing.get_context('spawn').Pool, so "
        "plan.num_processes: 1 (pancreas_cli/nnunet_env.py) spawns workers again (slow, not wrong)")


def test_nnunet_reads_its_process_count_when_imported() -> None:
    import nnunetv2.configuration as configuration

    source = inspect.getsource(configuration)
    assert "nnUNet_def_n_proc" in source and hasattr(configuration, "default_num_processes"), _seam(
        "nnunetv2.configuration", "default_num_processes no longer read from nnUNet_def_n_proc at import "
        "(pancreas_cli/nnunet_env.py sets it before any nnU-Net import)")


def test_data_loader_workers_as_train_diagnoses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` recognises dead workers by their message, reloads one batch with ``nnUNet_n_proc_DA`` 0
    (read when the loaders are built) and stops the loaders with ``_finish`` before saving on Ctrl-C."""
    from batchgenerators.dataloading import nondet_multi_threaded_augmenter as augmenter
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    assert "background workers are no longer alive" in inspect.getsource(augmenter), _seam(
        "batchgenerators' NonDetMultiThreadedAugmenter", "its dead-worker message changed; pancreas_cli/train.py "
        "matches 'background workers are no longer alive'")
    assert callable(getattr(augmenter.NonDetMultiThreadedAugmenter, "_finish", None)), _seam(
        "NonDetMultiThreadedAugmenter._finish", "gone; train's _stop_loaders would leave the workers running")
    called = {n.func.id for n in ast.walk(_function(nnUNetTrainer.get_dataloaders))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    assert "get_allowed_n_proc_DA" in called and get_allowed_n_proc_DA() == 0, _seam(
        "nnUNetTrainer.get_dataloaders", "no longer takes its worker count from nnUNet_n_proc_DA when called")


def test_ddp_launcher_resumes_from_checkpoint_final_first(tmp_path: Path) -> None:
    """With several GPUs nnU-Net's launcher picks the checkpoint: final before latest. ``_resume_from``
    (pancreas_cli/train.py) moves an older final aside so that the newest checkpoint wins."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    class Trainer:
        output_folder = str(tmp_path)
        loaded: list[str] = []

        def load_checkpoint(self, path: str) -> None:
            self.loaded.append(Path(path).name)

    for name in ("checkpoint_latest.pth", "checkpoint_final.pth"):
        (tmp_path / name).touch()
        trainer = Trainer()
        maybe_load_checkpoint(trainer, True, False)  # type: ignore[arg-type]
    assert Trainer.loaded == ["checkpoint_latest.pth", "checkpoint_final.pth"], _seam(
        "nnunetv2.run.run_training.maybe_load_checkpoint", f"loaded {Trainer.loaded}; pancseg's _resume_from "
        "expects checkpoint_final.pth first, else checkpoint_latest.pth")


def test_a_trainer_initialised_before_training_keeps_its_network() -> None:
    """``train --pretrained`` (pancreas_cli/train.py ``_train_single``) calls ``initialize()`` and loads
    weights before ``run_training``: nnU-Net's ``on_train_start`` must build the network only when the
    trainer was not initialised yet, as its ``load_checkpoint`` relies on too."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    start = _function(nnUNetTrainer.on_train_start)
    guarded = [n for n in ast.walk(start) if isinstance(n, ast.If) and ".was_initialized" in {
        f".{a.attr}" for a in ast.walk(n.test) if isinstance(a, ast.Attribute)}]
    assert guarded and "initialize" in {c.func.attr for c in ast.walk(guarded[0]) if isinstance(c, ast.Call)
                                        and isinstance(c.func, ast.Attribute)}, _seam(
        "nnUNetTrainer.on_train_start", "no longer initialises only an uninitialised trainer; --pretrained weights "
        "would be replaced by a fresh network")
    assert ".was_initialized" in _uses(nnUNetTrainer.initialize), _seam(
        "nnUNetTrainer.initialize", "no longer records was_initialized")
def _called_names(fn: Any) -> list[str]:
    """The functions and methods a function calls, by name, in order."""
    calls = [n.func for n in ast.walk(_function(fn)) if isinstance(n, ast.Call)]
    return [c.attr if isinstance(c, ast.Attribute) else c.id for c in calls if isinstance(c, ast.Attribute | ast.Name)]


def test_pancseg_ddp_process_does_what_nnunets_run_ddp_does() -> None:
    """``_ddp_process`` (pancreas_cli/train.py) repeats nnU-Net's ``run_ddp`` with the backend and device
    chosen by devices.py (``run_ddp`` hard-codes NCCL and CUDA): a step nnU-Net adds must be added there."""
    from nnunetv2.run import run_training as module

    steps = set(_called_names(module.run_ddp)) - {"join", "device", "get_rank", "is_available"}
    assert steps == {"setup_ddp", "set_device", "get_trainer_from_args", "maybe_load_checkpoint", "run_training",
                     "load_checkpoint", "perform_actual_validation", "cleanup_ddp"}, _seam(
        "nnunetv2.run.run_training.run_ddp", f"now calls {sorted(steps)}; compare pancseg's _ddp_process")
    assert "init_process_group" in _called_names(module.setup_ddp), _seam(
        "nnunetv2.run.run_training.setup_ddp", "no longer just starts the process group")


def test_ddp_wrapping_is_looked_up_by_its_module_name() -> None:
    """On the CPU (gloo) the trainer's ``initialize`` swaps ``DDP`` in nnU-Net's trainer module for a
    wrapper without ``device_ids`` (which a CPU module refuses); that works only while nnU-Net wraps the
    network through that global name, and sets a CUDA device under DDP (which pancseg puts back)."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    wraps = [n for n in ast.walk(_function(module.nnUNetTrainer.initialize)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "DDP"]
    assert hasattr(module, "DDP") and wraps and [k.arg for k in wraps[0].keywords] == ["device_ids"], _seam(
        "nnUNetTrainer.initialize", "no longer wraps the network as DDP(network, device_ids=...) through its "
        "module's global name; see nnUNetTrainerPancseg.initialize (multitask/trainer.py)")
    assert "'cuda'" in _uses(module.nnUNetTrainer.__init__) and ".is_ddp" in _uses(module.nnUNetTrainer.__init__), \
        _seam("nnUNetTrainer.__init__", "no longer chooses the device under DDP; see nnUNetTrainerPancseg.__init__")


def test_training_ends_where_pancseg_refits_the_shortcut() -> None:
    """The subtype shortcut's refit (``nnUNetTrainerMultiTask.on_train_end``, before nnU-Net's) must run before
    checkpoint_final.pth is written from the network, once after the last epoch; it reads the training cases
    as nnU-Net's validation reads its own: ``dataset_class(folder, identifiers)``, then ``load_case(key)``'s
    first item (the preprocessed image)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert "on_train_end" in _self_calls(nnUNetTrainer.run_training), _seam(
        "nnUNetTrainer.run_training", "no longer calls on_train_end, where pancseg refits the subtype shortcut")
    assert {".save_checkpoint", "'checkpoint_final.pth'"} <= _uses(nnUNetTrainer.on_train_end), _seam(
        "nnUNetTrainer.on_train_end", "no longer writes checkpoint_final.pth: the refitted shortcut may not reach it")
    validation = _function(nnUNetTrainer.perform_actual_validation)
    reads = [n for n in ast.walk(validation) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
             and isinstance(n.value.func, ast.Attribute) and n.value.func.attr == "load_case"]
    assert reads and isinstance(reads[0].targets[0], ast.Tuple) and len(reads[0].targets[0].elts) == 4, _seam(
        "nnUNetBaseDataset.load_case", "validation no longer reads (data, seg, seg_prev, properties): check what "
        "multitask/trainer.py _refit_shortcut takes as the image")
    assert ".dataset_class" in _uses(nnUNetTrainer.perform_actual_validation)
    assert _parameters(nnUNetBaseDataset.__init__)[:3] == ["self", "folder", "identifiers"], _seam(
        "nnUNetBaseDataset.__init__", "no longer takes (folder, identifiers)")
