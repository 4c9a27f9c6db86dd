"""``metrics.csv``: one row per epoch, for people, spreadsheets and ``pancseg report``.

Training never reads it back: the trainer renders every row from its own record of the run
(nnU-Net's log, which each checkpoint carries) and replaces the file atomically after each epoch.
A line a spreadsheet re-saved, or a deleted file, therefore cannot stop a training or lose rows;
readers (the summary after training, ``pancseg run``) get :func:`read_metrics`'s ``ValueError``
for a file that is not as training wrote it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.csv"
METRICS_COLUMNS = (
    "epoch", "train_loss", "seg_loss", "cls_loss", "cls_lambda", "val_loss", "val_cls_loss",
    "dice_pancreas", "dice_lesion", "ema_pseudo_dice", "val_accuracy", "val_macro_f1", "val_cases",
    "criterion", "best", "lr", "epoch_time_s",
)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # not measured that epoch
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_metrics(rows: list[dict[str, Any]]) -> str:
    """The whole file for ``rows`` (one dict per epoch, keyed by column; other keys are ignored)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    writer.writerows([_cell(row.get(c)) for c in METRICS_COLUMNS] for row in rows)
    return buffer.getvalue()


def _number(text: str) -> float | int | None:
    """A cell as a number (empty: not measured that epoch); ValueError for anything else."""
    if text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def read_metrics(path: Path) -> list[dict[str, float | int | None]]:
    """The rows of ``path`` as numbers ([] if there is none); ValueError saying what is not as training
    wrote it (older pancseg versions wrote fewer columns: those are read as they are)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        lines = list(csv.reader(fh))
    if not lines or not lines[0] or lines[0][0] != "epoch" or not set(lines[0]) <= set(METRICS_COLUMNS):
        raise ValueError(f"not as training wrote it (its first line is not pancseg's header: {_shown(lines[:1])})")
    rows = []
    for number, cells in enumerate(lines[1:], start=2):
        try:
            if len(cells) != len(lines[0]):
                raise ValueError(f"{len(cells)} cells, not {len(lines[0])}")
            row = {key: _number(cell) for key, cell in zip(lines[0], cells)}
            if row["epoch"] != len(rows) + 1:
                raise ValueError(f"epoch {row['epoch']} where epoch {len(rows) + 1} belongs")
        except ValueError as exc:
            raise ValueError(f"not as training wrote it (line {number}: {_shown([cells])}: {exc})") from None
        rows.append(row)
    return rows


def _shown(lines: list[list[str]]) -> str:
    text = ",".join(lines[0]) if lines else ""
    return repr(text if len(text) <= 60 else text[:57] + "...")
