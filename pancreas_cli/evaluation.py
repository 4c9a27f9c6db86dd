"""``pancseg evaluate``'s output files: ``metrics_per_case.csv`` and ``metrics_summary.json``.

Their names, columns and writer, and the checked readers ``pancseg report`` draws from: evaluate
writes them, report reads them, and neither imports the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pancreas_cli.exceptions import DataError, TableError
from pancreas_cli.imageio import sweep_dead_partials, write_text
from pancreas_cli.tables import read_written, render_table

STRUCTURES = ("pancreas", "lesion")
SEG_METRICS = ("dice", "iou", "nsd", "hd95")
PER_CASE_NAME = "metrics_per_case.csv"
SUMMARY_NAME = "metrics_summary.json"

#: The numeric columns of metrics_per_case.csv, and all of its columns in order.
PER_CASE_VALUES = (*(f"{m}_{s}" for s in STRUCTURES for m in SEG_METRICS),
                   *(f"volume_{w}_{s}_ml" for s in STRUCTURES for w in ("pred", "ref")))
PER_CASE_COLUMNS = ("case", *PER_CASE_VALUES, "subtype_true", "subtype_pred", "missing_prediction")

EVALUATE_AGAIN = "run `pancseg evaluate` again (with --force) to rewrite it"


@dataclass
class CaseResult:
    """One case's row of metrics_per_case.csv."""

    case: str
    values: dict[str, float]  # e.g. dice_pancreas, hd95_lesion, volume_pred_lesion_ml
    worst_hd95_mm: float  # image diagonal: HD95 of a case with one empty mask, in aggregates
    subtype_true: int | None = None
    subtype_pred: int | None = None
    missing_prediction: bool = False


def render_per_case(cases: Iterable[CaseResult]) -> str:
    """The text of metrics_per_case.csv."""
    return render_table(PER_CASE_COLUMNS, ([c.case, *(f"{c.values[k]:.6g}" for k in PER_CASE_VALUES),
                                            "" if c.subtype_true is None else c.subtype_true,
                                            "" if c.subtype_pred is None else c.subtype_pred,
                                            int(c.missing_prediction)] for c in cases))


def _value(text: str) -> float:
    """A cell as a float; ValueError for anything else (empty: NaN, not measured)."""
    return float(text) if text.strip() else float("nan")


def write_outputs(out_dir: Path, cases: list[CaseResult], summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write metrics_per_case.csv and metrics_summary.json into ``out_dir`` (first removing what a
    killed evaluate left there); returns their paths."""
    per_case_csv, summary_json = out_dir / PER_CASE_NAME, out_dir / SUMMARY_NAME
    sweep_dead_partials(out_dir)
    write_text(render_per_case(cases), per_case_csv)
    write_text(json.dumps(summary, indent=2), summary_json)
    return per_case_csv, summary_json


def load_per_case(path: Path, summary_json: Path, cases: int) -> list[dict[str, Any]]:
    """``metrics_per_case.csv``, checked: evaluate's columns, numbers (as floats, NaN where empty), and
    as many cases as its summary."""
    rows = []
    for line, row in read_written(path, PER_CASE_COLUMNS, EVALUATE_AGAIN).records():
        bad = next((key for key in PER_CASE_VALUES if not _is_value(row[key])), None)
        if bad is None and not math.isfinite(_value(row["dice_pancreas"])):
            bad = "dice_pancreas"
        if bad is not None or not row["case"].strip():
            shown = f"{bad} = {row[bad]!r}" if bad else "no case"
            raise TableError(path, f"not a per-case metrics row ({shown})", EVALUATE_AGAIN, line)
        rows.append({**row, **{key: _value(row[key]) for key in PER_CASE_VALUES}})
    if len(rows) != cases:
        raise DataError(f"{path} holds {len(rows)} case(s) but {summary_json} {cases}: they come from "
                        f"different evaluations; {EVALUATE_AGAIN}")
    return rows


def _is_value(text: str) -> bool:
    try:
        _value(text)
    except ValueError:
        return False
    return True


def verdict(target: dict[str, Any] | None) -> str:
    """The one wording of a target's outcome, in the CLI's table and the report alike: "pass",
    "FAIL" (upper case: it is what a reader scans for), "n/a" when there was no value, "" without a target."""
    if target is None:
        return ""
    if target.get("passed") is None:
        return "n/a"
    return "pass" if target["passed"] else "FAIL"


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _segmentation_problem(summary: dict[str, Any]) -> str | None:
    """What is wrong with the summary's segmentation statistics and targets (None: nothing)."""
    for key, stats in summary["segmentation"].items():
        keys = ("mean", "median", "ci95_low", "ci95_high")
        values = [stats.get(k, "-") if isinstance(stats, dict) else "-" for k in keys]
        if not all(v is None or _is_num(v) for v in values) or (values[2] is None) != (values[3] is None):
            return f"segmentation.{key} is not mean, median, ci95_low and ci95_high"
    for key, target in summary["targets"].items():
        if not (isinstance(target, dict) and _is_num(target.get("target"))
                and (target.get("value") is None or _is_num(target["value"]))
                and target.get("passed", "-") in (True, False, None)):
            return f"targets.{key} is not target, value and passed"
    return None


def _classification_problem(cls: Any, targets: dict[str, Any]) -> str | None:
    """What is wrong with the summary's classification block (None: nothing)."""
    if cls is None:
        return None
    if not isinstance(cls, dict) or not all(_is_num(cls.get(k)) for k in ("macro_f1", "accuracy")):
        return "classification has no macro_f1 or accuracy"
    if "macro_f1" not in targets:
        return "no targets.macro_f1"
    matrix = cls.get("confusion_matrix")
    square = isinstance(matrix, list) and matrix and all(isinstance(row, list) and len(row) == len(matrix)
                                                         for row in matrix)
    if not square or not all(isinstance(v, int) for row in matrix for v in row):
        return "classification.confusion_matrix is not a square table of counts"
    scores = [cls.get(k) for k in ("precision", "recall", "f1")]
    if not all(isinstance(d, dict) and d.keys() == scores[2].keys() and all(map(_is_num, d.values()))
               for d in scores):
        return "classification precision, recall and f1 are not scores per subtype"
    return None


def load_summary(path: Path) -> dict[str, Any]:
    """``metrics_summary.json`` as ``pancseg evaluate`` wrote it, checked before anything is drawn."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable evaluation summary, cut short or edited ({exc}); "
                        f"{EVALUATE_AGAIN}") from exc
    kinds = (("cases", int), ("nsd_definition", str), ("segmentation", dict), ("targets", dict))
    why = "not a JSON object" if not isinstance(summary, dict) else next(
        (f"no {k}" for k, kind in kinds if not isinstance(summary.get(k), kind)), None)
    why = why or _segmentation_problem(summary) or _classification_problem(summary.get("classification"),
                                                                           summary["targets"])
    if why:
        raise DataError(f"{path}: not an evaluation summary of this pancseg ({why}); {EVALUATE_AGAIN}")
    return summary
