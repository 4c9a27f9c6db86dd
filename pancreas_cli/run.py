"""``pancseg run``: the whole chain for one config, skipping what is up to date.

prepare -> clean -> preprocess -> train -> predict (test images) -> evaluate -> report. Each stage
is idempotent: unchanged data is not prepared or preprocessed again, a finished training is kept
(an interrupted one resumes), predicted cases are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pancreas_cli.clean import clean
from pancreas_cli.config import Config
from pancreas_cli.console import count
from pancreas_cli.evaluate import evaluate
from pancreas_cli.exceptions import CleanError
from pancreas_cli.layout import CHECKPOINT_FINAL, METRICS_NAME, fold_folder, fold_validation, model_folder
from pancreas_cli.multitask.history import read_metrics
from pancreas_cli.predict import CaseReporter, predict
from pancreas_cli.prepare import prepare
from pancreas_cli.preprocess import preprocess
from pancreas_cli.report import ReportResult, report
from pancreas_cli.train import EpochReporter, newest_checkpoint, train


@dataclass
class RunResult:
    report: ReportResult
    predictions: Path | None = None


def _finished(config: Config, fold: int) -> bool:
    """The fold's training reached the configured number of epochs (by metrics.csv; if that was edited
    since, train finds out from the checkpoint)."""
    fold_dir = fold_folder(model_folder(config), fold)
    if not (fold_dir / CHECKPOINT_FINAL).is_file():
        return False
    rows = read_metrics(fold_dir / METRICS_NAME, tolerant=True)  # not as training wrote it: not known
    return bool(rows) and int(rows[-1]["epoch"] or 0) >= config.train.epochs


_Stage = Callable[[str, str, float], None]


def _data_stages(config: Config, stage: _Stage) -> None:
    """prepare, clean (stopping at errors it cannot fix) and preprocess; each up to date is quick."""
    start = time.perf_counter()
    prepared = prepare(config)
    stage("prepare", "up to date" if prepared.up_to_date else count(len(prepared.cases), "case"), start)
    start = time.perf_counter()
    cleaned = clean(config)
    if cleaned.errors:
        raise CleanError(f"{len(cleaned.errors)} data error(s) that clean cannot fix, e.g. "
                         f"{cleaned.errors[0].case}: {cleaned.errors[0].problem} ({cleaned.errors[0].detail}); "
                         f"see {cleaned.report}")
    stage("clean", f"{count(len(cleaned.changed_files), 'file')} fixed, {count(len(cleaned.warnings), 'warning')}", start)
    start = time.perf_counter()
    pre = preprocess(config)
    stage("preprocess", "up to date" if pre.up_to_date else pre.plans[0].configuration, start)


def _evaluation_inputs(config: Config, fold: int, predicted_test: bool) -> tuple[Any, ...]:
    """(predictions, ground truth, images, subtypes CSV, cases, label): the test set where it has labels
    and was predicted, else the fold's validation (predicted by nnU-Net's validation after training)."""
    if config.dataset.test_labels is not None and predicted_test:
        return (config.project_dir / "predictions" / "test", config.dataset.test_labels,
                config.dataset_raw_dir / "imagesTs", config.dataset.test_subtypes_csv, None, "test")
    val = fold_validation(config, fold)
    return val.pred_dir, val.gt_dir, val.images_dir, val.subtypes_csv, val.cases, f"validation fold {fold}"


def run(
    config: Config,
    *,
    fold: int = 0,
    on_stage: _Stage = lambda stage, what, seconds: None,
    epoch_reporter: EpochReporter | None = None,
    case_reporter: CaseReporter | None = None,
    warn: Callable[[str], None] = lambda text: None,
    trust_model: bool = False,
) -> RunResult:
    """Run every stage for ``config`` (training and evaluating ``fold``; ``trust_model``: see checkpoints)."""
    def stage(name: str, what: str, start: float) -> None:
        on_stage(name, what, time.perf_counter() - start)

    _data_stages(config, stage)
    start = time.perf_counter()
    if _finished(config, fold):
        stage("train", f"fold {fold} up to date", start)
    else:
        resume = newest_checkpoint(fold_folder(model_folder(config), fold)) is not None
        trained = train(config, folds=[fold], resume=resume, reporter=epoch_reporter, trust_model=trust_model,
                        warn=warn)
        stage("train", f"fold {fold}: {count(trained.folds[0].epochs_done, 'epoch')}", start)

    start = time.perf_counter()
    test_images = config.dataset_raw_dir / "imagesTs"
    predictions = config.project_dir / "predictions" / "test"
    predicted_test = any(test_images.glob("*.nii.gz"))
    if predicted_test:
        predicted = predict(config, input_path=test_images, out_dir=predictions, folds=[fold],
                            replace_outdated=True, reporter=case_reporter, warn=warn, trust_model=trust_model)
        stage("predict", f"{predicted.count('predicted')} predicted, {predicted.count('skipped')} up to date, "
                         f"{len(predicted.failed)} failed", start)
    else:
        stage("predict", "no test images", start)

    start = time.perf_counter()
    pred_dir, gt_dir, images, subtypes, cases, label = _evaluation_inputs(config, fold, predicted_test)
    # The metrics are in run's own folders: a changed config (other test labels) replaces them.
    evaluated = evaluate(config, pred_dir=pred_dir, gt_dir=gt_dir, subtypes_csv=subtypes, cases=cases, force=True)
    stage("evaluate", f"{label}: {count(len(evaluated.cases), 'case')}", start)
    start = time.perf_counter()
    written = report(config, fold=fold, pred_dir=pred_dir, gt_dir=gt_dir, images_dir=images)
    stage("report", str(written.html), start)
    return RunResult(written, predictions if predicted_test else None)
