"""``pancseg preprocess``: nnU-Net v2 fingerprinting, planning and preprocessing through its API.

Always runs nnU-Net's dataset integrity check and always recomputes the fingerprint, so plans never
go stale after the raw data changed. A state file records what the raw data looked like, so an
unchanged dataset is not preprocessed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pancreas_cli import layout
from pancreas_cli.config import Config
from pancreas_cli.exceptions import PreprocessError
from pancreas_cli.imageio import sweep_partials, write_text
from pancreas_cli.locks import project_stage, writing
from pancreas_cli.logcapture import redirect_output, tail
from pancreas_cli.nnunet_env import nnunet_worker_pools, scoped_env, setup_nnunet_env
from pancreas_cli.subtypes import CHANNEL

SMOKE_CONFIGURATION = "3d_smoke"
#: The smoke network: 4 stages, one block each, small features, batch 2, patch at most this (z, y, x).
SMOKE_FEATURES = (8, 16, 32, 64)
SMOKE_MAX_PATCH = (32, 64, 64)
SMOKE_BATCH = 2


@dataclass(frozen=True)
class PlanSummary:
    configuration: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    batch_size: int
    n_parameters: int
    network: str


@dataclass
class PreprocessResult:
    plans_identifier: str
    output_dir: Path
    log_file: Path
    plans: list[PlanSummary] = field(default_factory=list)
    up_to_date: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "plans_identifier": self.plans_identifier,
            "output_dir": str(self.output_dir),
            "log_file": str(self.log_file),
            "up_to_date": self.up_to_date,
            "seconds": round(self.seconds, 1),
            "plans": [asdict(p) for p in self.plans],
        }


def raw_state(config: Config) -> str:
    """A digest of everything preprocessing depends on: raw files (size, mtime) and plan settings."""
    dataset = config.dataset_raw_dir
    digest = hashlib.sha256()
    digest.update(json.dumps(config.plan.model_dump(mode="json"), sort_keys=True).encode())
    files = [dataset / "dataset.json", dataset / "splits_final.json"]
    files += sorted(p for folder in ("imagesTr", "labelsTr") for p in (dataset / folder).glob("*.nii.gz")
                    if not p.name.startswith("."))  # a dot name is no case (a temporary file: swept)
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(dataset)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def add_smoke_configuration(plans: dict[str, Any]) -> dict[str, Any]:
    """Add the tiny CPU configuration ``3d_smoke`` (inherits 3d_fullres's data and spacing)."""
    full = plans["configurations"]["3d_fullres"]
    arch = full["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    n = min(len(SMOKE_FEATURES), kwargs["n_stages"])
    strides = kwargs["strides"][:n]
    divisor = [1] * len(full["patch_size"])
    for stride in strides:
        divisor = [d * s for d, s in zip(divisor, stride)]
    patch = [max(d, min(p, cap) // d * d) for p, cap, d in zip(full["patch_size"], SMOKE_MAX_PATCH, divisor)]
    kwargs.update(
        n_stages=n,
        features_per_stage=list(SMOKE_FEATURES[:n]),
        kernel_sizes=kwargs["kernel_sizes"][:n],
        strides=strides,
        n_conv_per_stage_decoder=[1] * (n - 1),
    )
    blocks_key = "n_blocks_per_stage" if "n_blocks_per_stage" in kwargs else "n_conv_per_stage"
    kwargs[blocks_key] = [1] * n
    plans["configurations"][SMOKE_CONFIGURATION] = {
        "inherits_from": "3d_fullres",
        "batch_size": SMOKE_BATCH,
        "patch_size": patch,
        "architecture": {**arch, "arch_kwargs": kwargs},
    }
    return plans


def _summaries(plans_file: Path, dataset_json: dict[str, Any], configurations: tuple[str, ...]) -> list[PlanSummary]:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(plans_file))
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    out = []
    for name in configurations:
        cm = manager.get_configuration(name)
        network = get_network_from_plans(
            cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
            1, heads, allow_init=False, deep_supervision=True,
        )
        out.append(
            PlanSummary(
                configuration=name,
                patch_size=tuple(int(p) for p in cm.patch_size),
                spacing=tuple(round(float(s), 4) for s in cm.spacing),
                batch_size=int(cm.batch_size),
                n_parameters=sum(p.numel() for p in network.parameters()),
                network=cm.network_arch_class_name.rsplit(".", 1)[-1],
            )
        )
    return out


def _mark_pending(out_dir: Path) -> None:
    """Mark the state of the last preprocessing as being redone, before nnU-Net overwrites its files.

    The state is kept, not deleted: it names the plans of the trained model, which predict needs
    (nnU-Net keeps its own copy of the plans with the model), so a failed or interrupted re-run
    leaves that model usable. A pending state is never up to date, and train refuses it.
    """
    try:
        saved = layout.read_state(out_dir)
    except PreprocessError:  # unreadable: it names nothing usable
        (out_dir / layout.STATE_NAME).unlink(missing_ok=True)
        return
    if saved is not None and not saved.get("pending"):
        write_text(json.dumps({**saved, "state": "", "pending": True}, indent=2), out_dir / layout.STATE_NAME)


def _replace_splits(dataset_dir: Path, out_dir: Path) -> None:
    """Put prepare's ``splits_final.json`` beside the preprocessed data.

    nnU-Net's planner copies it there only when there is none, and otherwise asserts that the two
    match: after ``pancseg prepare --force`` with another split (other ``split_seed``, added cases)
    every preprocessing would fail on that assertion.
    """
    raw, copy = dataset_dir / "splits_final.json", out_dir / "splits_final.json"
    text = raw.read_text(encoding="utf-8")
    if not copy.is_file() or copy.read_text(encoding="utf-8", errors="replace") != text:
        write_text(text, copy)


def _explain_failure(exc: BaseException, log_file: Path, dataset_dir: Path) -> str:
    """One message with nnU-Net's own error and the case(s) it names, instead of 'check the output above'.

    nnU-Net's dataset checks print ``Error: ...`` lines and then raise a generic exception, so an
    error line is the reason when there is one; otherwise the exception is. Warnings are context:
    nnU-Net prints some for ordinary data, so they never replace the reason.
    """
    lines = [line.strip() for line in tail(log_file, 200)]
    errors = [line for line in lines if re.match(r"^Error\b", line)]
    warnings = [line for line in lines if re.match(r"^(Warning|WARNING)\b", line)]
    exc_text = (str(exc).strip().splitlines() or [""])[0]
    reason = errors[0] if errors else f"{type(exc).__name__}: {exc_text}" if exc_text else type(exc).__name__
    case_ids = {p.name[: -len(".nii.gz")] for p in (dataset_dir / "labelsTr").glob("*.nii.gz")}
    named = sorted({c for c in case_ids for line in [*errors, exc_text]
                    if re.search(rf"\b{re.escape(c)}({CHANNEL})?\.nii\.gz", line)})
    where = f" for case {', '.join(named[:5])}" if named else ""
    if errors or named:
        fix = "run `pancseg clean` (it repairs or names most data problems), then preprocess again"
    else:
        fix = "this does not look like a data problem; re-run with --debug for the traceback"
    warned = f"\n  nnU-Net also warned: {warnings[0]}" if warnings else ""
    return f"nnU-Net preprocessing failed{where}: {reason}{warned}\n  fix: {fix}\n  full nnU-Net output: {log_file}"


def _up_to_date(config: Config, dataset_json: dict[str, Any], log_file: Path) -> PreprocessResult | None:
    """The result of the last preprocessing when it was made from the same raw data and settings."""
    out_dir = config.dataset_preprocessed_dir
    saved = layout.read_state(out_dir)
    if saved is None or saved.get("pending") or saved.get("state") != raw_state(config):
        return None
    plans_file = out_dir / f"{saved['plans_identifier']}.json"
    if not (plans_file.is_file() and (out_dir / saved["data_identifier"]).is_dir()):
        return None
    setup_nnunet_env(config)
    return PreprocessResult(saved["plans_identifier"], out_dir, log_file,
                            _summaries(plans_file, dataset_json, (config.plan.configuration,)), up_to_date=True)


def _run_nnunet(config: Config, log_file: Path) -> str:
    """nnU-Net's fingerprint, planning and preprocessing, in-process, its output in ``log_file``;
    returns the plans identifier."""
    ds_id, n, out_dir = config.dataset.id, config.plan.num_processes, config.dataset_preprocessed_dir
    try:
        with redirect_output(log_file), nnunet_worker_pools(n):
            from nnunetv2.experiment_planning.plan_and_preprocess_api import (
                extract_fingerprints,
                plan_experiments,
                preprocess as nnunet_preprocess,
            )

            extract_fingerprints([ds_id], num_processes=n, check_dataset_integrity=True, clean=True,
                                 verbose=False, show_progress_bar=False)
            # The planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0.
            with scoped_env("nnUNet_n_proc_DA", str(max(1, int(os.environ["nnUNet_n_proc_DA"])))):
                plans_identifier = plan_experiments([ds_id], config.plan.planner)
            plans_file = out_dir / f"{plans_identifier}.json"
            if config.plan.configuration == SMOKE_CONFIGURATION:
                plans = add_smoke_configuration(json.loads(plans_file.read_text(encoding="utf-8")))
                write_text(json.dumps(plans, indent=4), plans_file)
            # nnU-Net copies labels into gt_segmentations only when newer: stale ones must go.
            shutil.rmtree(out_dir / "gt_segmentations", ignore_errors=True)
            nnunet_preprocess([ds_id], plans_identifier, configurations=(config.plan.configuration,),
                              num_processes=(n,), verbose=False, show_progress_bar=False)
    except (AssertionError, RuntimeError, ValueError, OSError, KeyError, IndexError) as exc:
        raise PreprocessError(_explain_failure(exc, log_file, config.dataset_raw_dir)) from exc
    return plans_identifier


@project_stage()
def preprocess(config: Config, *, force: bool = False,
               on_start: Callable[[], None] = lambda: None) -> PreprocessResult:
    """Fingerprint, plan with ``config.plan.planner`` and preprocess the configuration to train.

    ``on_start`` is called when nnU-Net is about to run (not when everything is up to date).
    """
    dataset_dir = config.dataset_raw_dir
    if not (dataset_dir / "dataset.json").is_file():
        raise PreprocessError(f"{dataset_dir}: no prepared dataset; run `pancseg prepare` (and `pancseg clean`) first")
    dataset_json = layout.read_prepared(dataset_dir)  # damaged: one line, not nnU-Net's JSONDecodeError
    out_dir = config.dataset_preprocessed_dir
    log_file = layout.log_file(config.project_dir, "preprocess.log")
    if not force and (done := _up_to_date(config, dataset_json, log_file)) is not None:
        return done

    writing(config.project_dir)
    on_start()
    setup_nnunet_env(config)
    log_file.unlink(missing_ok=True)
    for folder in (dataset_dir / "imagesTr", dataset_dir / "labelsTr", out_dir):  # nnU-Net would count them
        sweep_partials(folder)
    state = raw_state(config)
    _mark_pending(out_dir)
    _replace_splits(dataset_dir, out_dir)
    start = time.perf_counter()
    plans_identifier = _run_nnunet(config, log_file)
    plans_file = out_dir / f"{plans_identifier}.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    data_identifier = plans["configurations"]["3d_fullres"]["data_identifier"]
    write_text(json.dumps({"state": state, "plans_identifier": plans_identifier, "configuration": config.plan.configuration,
                           "data_identifier": data_identifier}, indent=2), out_dir / layout.STATE_NAME)
    return PreprocessResult(plans_identifier, out_dir, log_file,
                            _summaries(plans_file, dataset_json, (config.plan.configuration,)),
                            seconds=time.perf_counter() - start)
