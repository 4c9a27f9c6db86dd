"""``.pancseg/<case>.json``: predict's record of each mask it wrote, and its readers.

A record holds ``case``, ``source`` and ``source_stamp`` (the scan, as it was), ``probabilities`` (the
three subtype probabilities, or null for a segmentation-only model), ``lesion_found`` (whether the
mask has a lesion; older records lack it), ``model`` (what wrote the mask:
:func:`pancreas_cli.predict.model_stamp`), ``series`` for a DICOM series, and ``pending`` while the mask
is being replaced. ``pancseg predict`` writes them through :func:`write_record`; ``pancseg evaluate``
reads them (:func:`read_records`) to know which model wrote which mask.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pancreas_cli.exceptions import DataError
from pancreas_cli.imageio import write_text
from pancreas_cli.subtypes import SUBTYPES

SIDECAR_DIR = ".pancseg"  # in a prediction folder: a record per case (and predict.log on read-only projects)


def record_path(out_dir: Path, case: str) -> Path:
    return out_dir / SIDECAR_DIR / f"{case}.json"


def write_record(out_dir: Path, case: str, record: dict[str, Any]) -> None:
    write_text(json.dumps(record), record_path(out_dir, case))


def read_record(out_dir: Path, case: str) -> dict[str, Any] | None:
    """The case's record; None if there is none, {} if it cannot be read (hand-edited, truncated)."""
    path = record_path(out_dir, case)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def subtype_probabilities(record: dict[str, Any] | None) -> list[float] | None:
    """The record's subtype probabilities, or None where they are missing or not three finite numbers."""
    values = (record or {}).get("probabilities")
    if not isinstance(values, list) or len(values) != len(SUBTYPES):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def lesion_found(record: dict[str, Any] | None) -> bool | None:
    """Whether the record's mask has a lesion; None where the record does not say (older pancseg)."""
    value = (record or {}).get("lesion_found")
    return value if isinstance(value, bool) else None


def _problem(record: Any, case: str) -> str | None:
    """What makes ``record`` no pancseg prediction record of ``case`` (None: it is one)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("case", case) != case:
        return f"it names case {record['case']!r}"
    if not isinstance(record.get("model"), dict) or "probabilities" not in record:
        return "no model or no probabilities"
    if record["probabilities"] is not None and subtype_probabilities(record) is None:
        return f"probabilities {record['probabilities']!r} are not {len(SUBTYPES)} numbers"
    return None


def read_records(pred_dir: Path, cases: list[str]) -> dict[str, dict[str, Any]]:
    """The records of those ``cases`` that have one, each checked: DataError naming the file for a damaged
    record, or one whose mask was being replaced when its predict stopped."""
    records: dict[str, dict[str, Any]] = {}
    fix = "predict this folder again with `pancseg predict --force`"
    for case in cases:
        path = record_path(pred_dir, case)
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: unreadable prediction record ({exc}); {fix}") from exc
        if why := _problem(record, case):
            raise DataError(f"{path}: not a pancseg prediction record ({why}); {fix}")
        if record.get("pending"):
            raise DataError(f"{path}: the prediction of {case} was stopped while its mask was being "
                            "replaced, so the mask may be the old or the new one; run the same `pancseg "
                            "predict` again to finish it")
        records[case] = record
    return records


def finished(out_dir: Path, case: str) -> bool:
    """Whether ``case`` has a mask in ``out_dir`` whose record is complete (not pending a replacement):
    what the files derived from a mask (CSVs, statistics, previews) may describe."""
    record = read_record(out_dir, case)
    return bool(record) and not record.get("pending") and (out_dir / f"{case}.nii.gz").is_file()
