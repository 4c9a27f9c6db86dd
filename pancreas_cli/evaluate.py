"""``pancseg evaluate``: segmentation and subtype metrics of predictions against ground truth.

Per case: whole pancreas (label > 0) and lesion (label 2) Dice, IoU, NSD, HD95 and volumes, plus
the predicted and true subtype. Definitions follow Metrics Reloaded (see :mod:`pancreas_cli.metrics`).
Empty masks: both empty -> Dice 1, NSD 1, HD95 0; one empty -> Dice 0, NSD 0, HD95 undefined (NaN
per case; in aggregates it counts as the worst case, the diagonal of the image in mm).
"""

from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_cli.config import Config, EvaluateConfig, kept_labels
from pancreas_cli.exceptions import DataError, OutputExistsError
from pancreas_cli.imageio import IMAGE_EXTENSIONS, image_extension, image_stem, write_text
from pancreas_cli.metrics import bootstrap_ci, classification_metrics, dice, hd95, iou, load_mask_pair, nsd

STRUCTURES = ("pancreas", "lesion")
SEG_METRICS = ("dice", "iou", "nsd", "hd95")
SUBTYPES = (0, 1, 2)
PER_CASE_NAME = "metrics_per_case.csv"
SUMMARY_NAME = "metrics_summary.json"


@dataclass
class CaseResult:
    case: str
    values: dict[str, float]  # e.g. dice_pancreas, hd95_lesion, volume_pred_lesion_ml
    worst_hd95_mm: float  # image diagonal: HD95 of a case with one empty mask, in aggregates
    subtype_true: int | None = None
    subtype_pred: int | None = None
    missing_prediction: bool = False


@dataclass
class EvaluationResult:
    cases: list[CaseResult]
    summary: dict[str, Any]
    per_case_csv: Path
    summary_json: Path
    notes: list[str] = field(default_factory=list)


def case_id_from_name(name: str) -> str:
    """``quiz_037.nii.gz`` / ``quiz_037_0000.nii.gz`` / ``quiz_037`` -> ``quiz_037``."""
    stem = image_stem(name) if image_extension(name) else name
    return stem[:-5] if stem.endswith("_0000") else stem


def read_subtype_csv(path: Path) -> dict[str, int]:
    """Subtypes from ``Names,Subtype`` (pancseg predict's format) or ``case_id,subtype`` CSVs."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [c for c in reader.fieldnames or [] if c]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as a UTF-8 CSV ({exc})") from exc
    if not rows:
        return {}
    columns = {c.strip().lower(): c for c in header}
    name_col = columns.get("names") or columns.get("case_id")
    value_col = columns.get("subtype")
    if name_col is None or value_col is None:
        raise DataError(f"{path}: expected columns Names,Subtype or case_id,subtype, got {','.join(header)}")
    out: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        name, text = row.get(name_col), row.get(value_col)
        if name is None or text is None or any(v.strip() for v in row.get(None) or []):  # type: ignore[call-overload]
            raise DataError(f"{path}, line {line}: expected {len(header)} columns ({','.join(header)})")
        try:
            number = float(text)
        except ValueError:
            raise DataError(f"{path}, line {line}: subtype {text!r} is not a number") from None
        if number not in SUBTYPES:  # 1.0 is 1; 1.7 or inf are no subtype
            raise DataError(f"{path}, line {line}: subtype {text.strip()} is not 0, 1 or 2")
        value = int(number)
        out[case_id_from_name(name.strip())] = value
    return out


def _masks(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and image_extension(path) and not path.name.startswith("."):
            found.setdefault(case_id_from_name(path.name), path)
    return found


def evaluate_case(case: str, pred_path: Path | None, ref_path: Path, settings: EvaluateConfig) -> CaseResult:
    """All segmentation metrics of one case (a missing prediction counts as empty)."""
    import SimpleITK as sitk

    from pancreas_cli.imageio import read_image

    if pred_path is None:
        ref_image = read_image(ref_path)
        ref = sitk.GetArrayFromImage(ref_image)
        pred = np.zeros_like(ref)
        spacing = tuple(float(s) for s in reversed(ref_image.GetSpacing()))
    else:
        pred, ref, spacing = load_mask_pair(pred_path, ref_path)
    pred = _labels(np.rint(pred).astype(np.int16), pred_path, settings)  # float masks (1.0000152)
    ref = _labels(np.rint(ref).astype(np.int16), ref_path, settings)
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


def _labels(mask: np.ndarray, path: Path | None, settings: EvaluateConfig) -> np.ndarray:
    """``mask`` in labels 0/1/2 through ``evaluate.label_map``; other values are an error or background.

    Scoring any value > 0 as pancreas would turn a multi-organ mask into a plausible-looking result.
    """
    if not settings.label_map and 0 <= mask.min() and mask.max() <= 2:
        return mask  # the usual case, without np.unique's sort of the whole volume (0.5 s at 512x512x100)
    mapping = kept_labels(settings.label_map)
    unknown = [int(v) for v in np.unique(mask) if int(v) not in mapping]
    if unknown and settings.unknown_labels == "error":
        shown = ", ".join(map(str, unknown[:10])) + (f", ... ({len(unknown)} values)" if len(unknown) > 10 else "")
        raise DataError(f"{path}: label values {shown} are not among {sorted(mapping)}; map them with "
                        "evaluate.label_map (e.g. --set 'evaluate.label_map={7: 1}' for TotalSegmentator's "
                        "pancreas) or set evaluate.unknown_labels: background")
    out = np.zeros_like(mask)
    for source, target in mapping.items():
        out[mask == source] = target
    return out


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


def _per_case_csv(cases: list[CaseResult]) -> str:
    keys = [f"{m}_{s}" for s in STRUCTURES for m in SEG_METRICS]
    keys += [f"volume_{w}_{s}_ml" for s in STRUCTURES for w in ("pred", "ref")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", *keys, "subtype_true", "subtype_pred", "missing_prediction"])
    for c in cases:
        writer.writerow([c.case, *(f"{c.values[k]:.6g}" for k in keys),
                         "" if c.subtype_true is None else c.subtype_true,
                         "" if c.subtype_pred is None else c.subtype_pred, int(c.missing_prediction)])
    return buffer.getvalue()


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
    if len(missing) == len(refs):  # not a few missing cases: names that do not match (quiz_9 vs quiz_009)
        shown = f"e.g. prediction {sorted(preds)[0]} and ground truth {missing[0]}" if preds else "it has no masks"
        raise DataError(f"{pred_dir}: no prediction matches a ground-truth case of {gt_dir} ({shown}); "
                        "predictions are matched to ground truth by file name")
    if missing and not allow_missing:
        raise DataError(f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s), e.g. {missing[0]}; "
                        "pass --allow-missing to count them as empty predictions")
    notes = []
    extra = sorted(set(preds) - set(refs))
    if extra:
        notes.append(f"{len(extra)} prediction(s) without ground truth ignored, e.g. {extra[0]}")
    with ThreadPoolExecutor(max_workers=settings.num_workers) as pool:
        results = list(pool.map(lambda c: evaluate_case(c, preds.get(c), refs[c], settings), sorted(refs)))

    predicted_csv = pred_dir / "subtype_results.csv"
    predicted = read_subtype_csv(predicted_csv) if predicted_csv.is_file() else {}
    truth = read_subtype_csv(subtypes_csv) if subtypes_csv is not None else {}
    if subtypes_csv is not None and not predicted:
        notes.append(f"{predicted_csv} not found: no classification metrics")
    for r in results:
        r.subtype_true = truth.get(r.case)
        r.subtype_pred = predicted.get(r.case)
    stray = sorted(set(truth) - set(refs))
    if stray and cases is None:
        notes.append(f"{len(stray)} case(s) of {subtypes_csv} have no ground-truth mask, e.g. {stray[0]}")
    unlabelled = [r.case for r in results if truth and r.subtype_true is None]
    if unlabelled:
        notes.append(f"{len(unlabelled)} case(s) have no true subtype in {subtypes_csv}, e.g. {unlabelled[0]}")
    no_pred = [r.case for r in results if r.subtype_true is not None and r.subtype_pred is None
               and not r.missing_prediction]
    if no_pred and predicted:
        raise DataError(f"{predicted_csv}: no subtype for case {no_pred[0]} ({len(no_pred)} case(s))")

    summary = summarize(results, settings)
    if not summary["lesion_cases"]:
        notes.append("no ground-truth case has a lesion (label 2): the lesion metrics only count predicted "
                     "lesions, and the lesion target is not scored")
    summary["notes"] = notes
    summary["inputs"] = inputs
    per_case_csv, summary_json = out / PER_CASE_NAME, out / SUMMARY_NAME
    write_text(_per_case_csv(results), per_case_csv)
    write_text(json.dumps(summary, indent=2), summary_json)
    return EvaluationResult(results, summary, per_case_csv, summary_json, notes)



