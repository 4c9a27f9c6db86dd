"""``pancseg evaluate``: segmentation and subtype metrics of predictions against ground truth.

Per case: whole pancreas (label > 0) and lesion (label 2) Dice, IoU, NSD, HD95 and volumes, plus
the predicted and true subtype. Definitions follow Metrics Reloaded (see :mod:`pancreas_cli.metrics`).
Empty masks: both empty -> Dice 1, NSD 1, HD95 0; one empty -> Dice 0, NSD 0, HD95 undefined (NaN
per case; in aggregates it counts as the worst case, the diagonal of the image in mm).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_cli.config import Config, EvaluateConfig
from pancreas_cli.evaluation import SEG_METRICS, STRUCTURES, SUMMARY_NAME, CaseResult, write_outputs
from pancreas_cli.exceptions import DataError, OutputExistsError
from pancreas_cli.imageio import IMAGE_EXTENSIONS, image_extension
from pancreas_cli.layout import CROSSVAL_DIR, fold_validation, model_folder, validated_folds
from pancreas_cli.metrics import (DEFAULT_LABEL_TOLERANCE, as_labels, bootstrap_ci, classification_metrics,
                                  dice, hd95, iou, load_mask_pair, nsd, read_label_image)
from pancreas_cli.records import SIDECAR_DIR, read_records
from pancreas_cli.subtypes import RESULTS_NAME, SUBTYPES, case_id, read_subtypes, subtype_of


@dataclass
class EvaluationResult:
    cases: list[CaseResult]
    summary: dict[str, Any]
    per_case_csv: Path
    summary_json: Path
    notes: list[str] = field(default_factory=list)
    folds: list[dict[str, Any]] = field(default_factory=list)  # --fold all: one row per fold


def _masks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and image_extension(path) and not path.name.startswith("."):
            case = case_id(path.name)
            if case in found:  # quiz_1.nii.gz and quiz_1.nrrd: which one is the mask?
                raise DataError(f"{folder}: two masks for case {case}, {found[case].name} and {path.name}; "
                                "keep one of them in the folder")
            found[case] = path
    return found


def evaluate_case(case: str, pred_path: Path | None, ref_path: Path, settings: EvaluateConfig,
                  label_tolerance: float = DEFAULT_LABEL_TOLERANCE) -> CaseResult:
    """All segmentation metrics of one case (a missing prediction counts as empty)."""
    import SimpleITK as sitk

    if pred_path is None:
        ref_image = read_label_image(ref_path)
        ref = sitk.GetArrayFromImage(ref_image)
        pred = np.zeros(ref.shape, dtype=np.uint8)
        spacing = tuple(float(s) for s in reversed(ref_image.GetSpacing()))
    else:
        pred, ref, spacing = load_mask_pair(pred_path, ref_path)
        pred = as_labels(pred, pred_path, settings, label_tolerance)
    ref = as_labels(ref, ref_path, settings, label_tolerance)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    values: dict[str, float] = {}
    tolerances = {"pancreas": settings.nsd_tolerance_pancreas_mm, "lesion": settings.nsd_tolerance_lesion_mm}
    for structure in STRUCTURES:
        p, r = (pred > 0, ref > 0) if structure == "pancreas" else (pred == 2, ref == 2)
        values[f"dice_{structure}"] = dice(p, r)
        values[f"iou_{structure}"] = iou(p, r)
        values[f"nsd_{structure}"] = nsd(p, r, spacing, tolerances[structure], definition=settings.nsd_definition)
        values[f"hd95_{structure}"] = hd95(p, r, spacing) if p.any() or r.any() else 0.0
        values[f"volume_pred_{structure}_ml"] = float(p.sum()) * voxel_ml
        values[f"volume_ref_{structure}_ml"] = float(r.sum()) * voxel_ml
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(ref.shape, spacing)))
    return CaseResult(case, values, diagonal, missing_prediction=pred_path is None)


def _aggregate(values: list[float], settings: EvaluateConfig) -> dict[str, float | None]:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "median": None, "ci95_low": None, "ci95_high": None}
    stats: dict[str, float | None] = {"mean": float(array.mean()), "median": float(np.median(array))}
    if settings.bootstrap and array.size > 1:
        low, high = bootstrap_ci(array, n=settings.bootstrap)
        stats.update(ci95_low=low, ci95_high=high)
    else:
        stats.update(ci95_low=None, ci95_high=None)
    return stats


def summarize(cases: list[CaseResult], settings: EvaluateConfig) -> dict[str, Any]:
    """Means, medians and bootstrap CIs; HD95 of one-sided empty cases counts as the image diagonal."""
    segmentation: dict[str, Any] = {}
    for structure in STRUCTURES:
        for metric in SEG_METRICS:
            key = f"{metric}_{structure}"
            values = [c.values[key] if not np.isnan(c.values[key]) else c.worst_hd95_mm for c in cases]
            segmentation[key] = _aggregate(values, settings)
            if metric == "hd95":
                segmentation[key]["undefined_cases"] = sum(bool(np.isnan(c.values[key])) for c in cases)
    lesion_cases = sum(c.values["volume_ref_lesion_ml"] > 0 for c in cases)
    summary: dict[str, Any] = {"cases": len(cases), "missing_predictions": sum(c.missing_prediction for c in cases),
                               "lesion_cases": lesion_cases, "nsd_definition": settings.nsd_definition,
                               "segmentation": segmentation}
    # A case without a prediction (--allow-missing) counts as wrong, as its empty mask counts as Dice 0.
    labelled = [c for c in cases if c.subtype_true is not None and (c.subtype_pred is not None or c.missing_prediction)]
    classification = None
    if labelled:
        m = classification_metrics([c.subtype_true for c in labelled], [c.subtype_pred for c in labelled],
                                   labels=SUBTYPES)
        classification = {"cases": len(labelled), "accuracy": m.accuracy, "macro_f1": m.macro_f1,
                          "precision": m.precision, "recall": m.recall, "f1": m.f1,
                          "confusion_matrix": m.confusion_matrix,
                          "unpredicted": sum(m.unpredicted.values())}
    summary["classification"] = classification
    targets = settings.targets
    # Without any true lesion, lesion Dice only says whether lesions were predicted (1 where none was):
    # not a score to hold against the target.
    observed = {"dice_pancreas": segmentation["dice_pancreas"]["mean"],
                "dice_lesion": segmentation["dice_lesion"]["mean"] if lesion_cases else None,
                "macro_f1": classification["macro_f1"] if classification else None}
    summary["targets"] = {
        key: {"target": getattr(targets, key), "value": value,
              "passed": None if value is None else bool(value >= getattr(targets, key))}
        for key, value in observed.items()
    }
    return summary


def _check_earlier_metrics(summary_json: Path, inputs: dict[str, Any]) -> None:
    """Refuse to replace the metrics of other predictions or ground truth (or ones pancseg did not write).

    Another subtypes CSV or case list is the same evaluation redone, so it replaces them.
    """
    if not summary_json.is_file():
        return
    try:
        earlier = json.loads(summary_json.read_text(encoding="utf-8")).get("inputs")
    except (ValueError, UnicodeDecodeError, AttributeError):
        earlier = None
    if not isinstance(earlier, dict):
        why = "not written by this pancseg evaluate"
    else:
        changed = [k for k in ("pred", "gt") if earlier.get(k) != inputs[k]]
        if not changed:
            return
        why = f"computed with {changed[0]} = {earlier.get(changed[0])}"
    raise OutputExistsError(f"{summary_json} holds other metrics ({why}); pass --force to replace them, "
                            "or -o another folder")


def _predicted_subtypes(pred_dir: Path, cases: list[str], notes: list[str]) -> dict[str, int]:
    """The predictions' subtypes: ``subtype_results.csv``, unless predict's per-case records say otherwise.

    A ``predict --force`` killed half-way leaves the CSV of the earlier run beside new masks; the
    records are written with each mask, so they are the ones that match it.
    """
    csv_path = pred_dir / RESULTS_NAME
    rows = read_subtypes(csv_path) if csv_path.is_file() else {}
    records = read_records(pred_dir, cases)
    wanted = {c: None if (p := r["probabilities"]) is None else subtype_of(p) for c, r in records.items()}
    stale = [c for c in sorted(wanted) if rows.get(c) != wanted[c]]
    if stale:
        c = stale[0]
        notes.append(f"{csv_path} disagrees with the per-case records in {pred_dir / SIDECAR_DIR} for "
                     f"{len(stale)} case(s), e.g. {c} (CSV: {rows.get(c, 'no row')}, record: "
                     f"{'no subtype' if wanted[c] is None else wanted[c]}), as a stopped `pancseg predict` "
                     "leaves it: the subtypes are taken from the records; predicting again rewrites the CSV")
        rows = {c: v for c, v in {**rows, **wanted}.items() if v is not None}
    models = {json.dumps(r["model"], sort_keys=True) for r in records.values()}
    if len(models) > 1:
        notes.append(f"{pred_dir}: the masks come from {len(models)} different models or prediction settings "
                     f"(their records in {SIDECAR_DIR}), as a stopped `pancseg predict --force` leaves them; "
                     "predict again to score one model")
    return rows


def _attach_subtypes(results: list[CaseResult], predicted: dict[str, int], truth: dict[str, int],
                     pred_dir: Path, subtypes_csv: Path | None, notes: list[str], *, all_cases: bool) -> None:
    """Set each case's true and predicted subtype; notes for cases without one."""
    predicted_csv = pred_dir / RESULTS_NAME
    if subtypes_csv is not None and not predicted:
        notes.append(f"no predicted subtypes ({predicted_csv} not found or empty): no classification metrics")
    for r in results:
        r.subtype_true = truth.get(r.case)
        r.subtype_pred = predicted.get(r.case)
    stray = sorted(set(truth) - {r.case for r in results})
    if stray and all_cases:
        notes.append(f"{len(stray)} case(s) of {subtypes_csv} have no ground-truth mask, e.g. {stray[0]}")
    unlabelled = [r.case for r in results if truth and r.subtype_true is None]
    if unlabelled:
        notes.append(f"{len(unlabelled)} case(s) have no true subtype in {subtypes_csv}, e.g. {unlabelled[0]}")
    no_pred = [r.case for r in results if r.subtype_true is not None and r.subtype_pred is None
               and not r.missing_prediction]
    if no_pred and predicted:
        raise DataError(f"{predicted_csv}: no subtype for case {no_pred[0]} ({len(no_pred)} case(s))")


def _matched_masks(pred_dir: Path, gt_dir: Path, cases: list[str] | None,
                   allow_missing: bool) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """Ground-truth and predicted masks by case (ground truth restricted to ``cases``), and notes.

    All predictions missing is not a few missing cases but names that do not match (quiz_9 against
    quiz_009): that is an error even with ``allow_missing``.
    """
    refs = _masks(gt_dir)
    if cases is not None:
        unknown = sorted(set(cases) - set(refs))
        if unknown:
            raise DataError(f"{gt_dir}: no ground truth for case {unknown[0]}")
        refs = {c: refs[c] for c in cases}
    if not refs:
        raise DataError(f"{gt_dir}: no ground-truth masks ({', '.join(IMAGE_EXTENSIONS)})")
    preds = _masks(pred_dir)
    missing = sorted(set(refs) - set(preds))
    if len(missing) == len(refs):
        shown = f"e.g. prediction {sorted(preds)[0]} and ground truth {missing[0]}" if preds else "it has no masks"
        raise DataError(f"{pred_dir}: no prediction matches a ground-truth case of {gt_dir} ({shown}); "
                        "predictions are matched to ground truth by file name")
    if missing and not allow_missing:
        raise DataError(f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s), e.g. {missing[0]}; "
                        "pass --allow-missing to count them as empty predictions")
    extra = sorted(set(preds) - set(refs))
    notes = [f"{len(extra)} prediction(s) without ground truth ignored, e.g. {extra[0]}"] if extra else []
    return refs, preds, notes


def evaluate(
    config: Config,
    *,
    pred_dir: Path,
    gt_dir: Path,
    subtypes_csv: Path | None = None,
    allow_missing: bool = False,
    out_dir: Path | None = None,
    cases: list[str] | None = None,
    force: bool = False,
) -> EvaluationResult:
    """Evaluate the masks (and ``subtype_results.csv``) in ``pred_dir`` against ``gt_dir``.

    ``cases`` restricts the evaluation to these ground-truth cases (e.g. one validation fold).
    Metrics that ``out_dir`` (default ``pred_dir``) holds for other predictions or ground truth
    are replaced only with ``force``; for the same ones they are brought up to date.
    """
    settings = config.evaluate
    out = out_dir or pred_dir
    inputs = {"pred": str(pred_dir.resolve()), "gt": str(gt_dir.resolve()),
              "subtypes": None if subtypes_csv is None else str(subtypes_csv.resolve()),
              "cases": None if cases is None else sorted(cases)}
    if not force:
        _check_earlier_metrics(out / SUMMARY_NAME, inputs)
    refs, preds, notes = _matched_masks(pred_dir, gt_dir, cases, allow_missing)
    # The subtype files first: a bad row is reported before minutes of metrics, not after.
    predicted = _predicted_subtypes(pred_dir, sorted(set(refs) & set(preds)), notes)
    truth = read_subtypes(subtypes_csv) if subtypes_csv is not None else {}
    tolerance = config.clean.label_tolerance
    with ThreadPoolExecutor(max_workers=settings.num_workers) as pool:
        results = list(pool.map(lambda c: evaluate_case(c, preds.get(c), refs[c], settings, tolerance),
                                sorted(refs)))
    _attach_subtypes(results, predicted, truth, pred_dir, subtypes_csv, notes, all_cases=cases is None)

    summary = summarize(results, settings)
    if not summary["lesion_cases"]:
        notes.append("no ground-truth case has a lesion (label 2): the lesion metrics only count predicted "
                     "lesions, and the lesion target is not scored")
    summary["notes"] = notes
    summary["inputs"] = inputs
    per_case_csv, summary_json = write_outputs(out, results, summary)
    return EvaluationResult(results, summary, per_case_csv, summary_json, notes)


def evaluate_fold(config: Config, fold: int, *, out_dir: Path | None = None, force: bool = False) -> EvaluationResult:
    """Evaluate nnU-Net's validation of ``fold`` against its own cases of ``splits_final.json`` and the
    dataset's subtypes; the metrics go into the fold's ``validation/`` folder (or ``out_dir``)."""
    val = fold_validation(config, fold)
    return evaluate(config, pred_dir=val.pred_dir, gt_dir=val.gt_dir, subtypes_csv=val.subtypes_csv,
                    cases=val.cases, out_dir=out_dir, force=force)


def _fold_row(fold: int | str, summary: dict[str, Any]) -> dict[str, Any]:
    """One row of the cross-validation table: a fold's (or the pooled) means and macro-F1."""
    seg, cls = summary["segmentation"], summary["classification"]
    return {"fold": fold, "cases": summary["cases"], "dice_pancreas": seg["dice_pancreas"]["mean"],
            "dice_lesion": seg["dice_lesion"]["mean"], "nsd_pancreas": seg["nsd_pancreas"]["mean"],
            "hd95_pancreas": seg["hd95_pancreas"]["mean"], "macro_f1": cls["macro_f1"] if cls else None,
            "accuracy": cls["accuracy"] if cls else None}


def evaluate_folds(config: Config, *, out_dir: Path | None = None, force: bool = False) -> EvaluationResult:
    """Cross-validation: each validated fold evaluated as by :func:`evaluate_fold` (into ``out_dir/fold_N``
    with ``out_dir``), then all their cases pooled into ``crossval/`` of the results folder (or
    ``out_dir``), whose summary also holds one row per fold and the pooled row."""
    model_dir = model_folder(config)
    folds = validated_folds(model_dir)
    if not folds:
        raise DataError(f"{model_dir}: no fold has finished training with its validation; run "
                        "`pancseg train --fold all` (or one fold) first")
    out = out_dir or model_dir / CROSSVAL_DIR
    inputs = {"pred": str(model_dir.resolve()), "gt": str(fold_validation(config, folds[0]).gt_dir.resolve()),
              "folds": folds}
    if not force:
        _check_earlier_metrics(out / SUMMARY_NAME, inputs)
    per_fold = [evaluate_fold(config, f, out_dir=None if out_dir is None else out_dir / f"fold_{f}", force=force)
                for f in folds]
    cases = [c for r in per_fold for c in r.cases]
    notes = [f"fold {f}: {n}" for f, r in zip(folds, per_fold) for n in r.notes]
    repeated = sorted(case for case, n in Counter(c.case for c in cases).items() if n > 1)
    if repeated:
        notes.append(f"{len(repeated)} case(s) are in the validation of more than one fold (e.g. {repeated[0]}): "
                     "pooled once per fold")
    summary = summarize(cases, config.evaluate)
    rows = [_fold_row(f, r.summary) for f, r in zip(folds, per_fold)] + [_fold_row("pooled", summary)]
    summary.update(notes=notes, inputs=inputs, folds=rows)
    per_case_csv, summary_json = write_outputs(out, cases, summary)
    return EvaluationResult(cases, summary, per_case_csv, summary_json, notes, rows)
