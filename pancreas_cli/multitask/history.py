"""``metrics.csv``, one row per epoch for people, spreadsheets and ``pancseg report``: its writer and reader.

Training never reads it back: the trainer renders every row from its own record of the run
(nnU-Net's log, which each checkpoint carries) and replaces the file atomically after each epoch.
A line a spreadsheet re-saved, or a deleted file, therefore cannot stop a training or lose rows.
:func:`read_metrics` checks that every line is as training wrote it, with one error naming the file
and line (:class:`~pancreas_cli.exceptions.TableError`): ``report`` stops on it; the summary after
training and ``pancseg run`` (which only asks how far a fold got) pass ``tolerant`` and go without.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pancreas_cli.exceptions import TableError
from pancreas_cli.tables import read_written, render_table

METRICS_COLUMNS = (
    "epoch", "train_loss", "seg_loss", "cls_loss", "cls_lambda", "val_loss", "val_cls_loss",
    "dice_pancreas", "dice_lesion", "ema_pseudo_dice", "val_accuracy", "val_macro_f1", "val_cases",
    "criterion", "best", "lr", "epoch_time_s",
)
#: The columns ``pancseg report`` draws from (older pancseg versions wrote fewer columns than
#: :data:`METRICS_COLUMNS`: training reads those files as they are, report needs these).
REPORTED_COLUMNS = ("epoch", "dice_pancreas", "dice_lesion", "criterion", "best")
FIX = "restore the file, or delete the lines pancseg's trainer did not write"

Row = dict[str, float | int | None]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # not measured that epoch
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_metrics(rows: list[dict[str, Any]]) -> str:
    """The whole file for ``rows`` (one dict per epoch, keyed by column; other keys are ignored)."""
    return render_table(METRICS_COLUMNS, ([_cell(row.get(c)) for c in METRICS_COLUMNS] for row in rows))


def _number(text: str) -> float | int | None:
    """A cell as a number (empty: not measured that epoch); ValueError for anything else."""
    text = text.strip()
    if text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def read_metrics(path: Path, *, required: tuple[str, ...] = ("epoch",), tolerant: bool = False) -> list[Row]:
    """The rows of ``path`` as numbers ([] if there is no file), each line checked to be as training
    wrote it: pancseg's columns (``required`` among them), numbers, epochs 1, 2, ... in order.

    A file that is not: :class:`~pancreas_cli.exceptions.TableError` naming the file and line, or []
    when ``tolerant``.
    """
    if not path.is_file():
        return []
    try:
        return _checked_rows(path, required)
    except TableError:
        if tolerant:
            return []
        raise


def _checked_rows(path: Path, required: tuple[str, ...]) -> list[Row]:
    table = read_written(path, required, FIX)
    if table.header[0] != "epoch" or not set(table.header) <= set(METRICS_COLUMNS):
        shown = ",".join(table.header)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TableError(path, f"its first line is not pancseg's header ({shown!r})", FIX)
    rows: list[Row] = []
    for line, cells in table.records():
        row: Row = {}
        for key, text in cells.items():
            try:
                row[key] = _number(text)
            except ValueError:
                raise TableError(path, f"not a training metrics row ({key} = {text!r})", FIX, line) from None
        if not isinstance(row["epoch"], int) or row["epoch"] != len(rows) + 1:
            raise TableError(path, f"epoch {cells['epoch']} where epoch {len(rows) + 1} belongs", FIX, line)
        rows.append(row)
    return rows
