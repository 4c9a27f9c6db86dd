"""CSV tables through pandas: one reader that keeps what the checks need, one writer.

Every CSV pancseg reads or writes (subtype CSVs, manifests, ``metrics.csv``, ``metrics_per_case.csv``)
goes through here; what each file must hold is checked by its owner (:mod:`pancreas_cli.subtypes`,
:mod:`pancreas_cli.multitask.history`, :mod:`pancreas_cli.evaluation`). The reader keeps, per line,
its number as an editor shows it and how many cells it has: pandas would pad a short line and drop a
blank one unseen, and the errors must name the line a person has to fix.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pancreas_cli.exceptions import TableError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Table:
    """A CSV file as read: its header and every other non-blank line."""

    path: Path
    header: list[str]
    rows: pd.DataFrame  # the cells as text ("" when empty), one column per header cell; index: line numbers
    cells: pd.Series  # how many cells each of those lines has (a line pancseg wrote has len(header))
    overflow: pd.Series  # whether a line holds something in a cell beyond the header's

    def missing(self, required: Iterable[str]) -> list[str]:
        """The ``required`` columns the header lacks."""
        return [c for c in required if c not in self.header]

    def foreign_line(self) -> tuple[int, int] | None:
        """(line, cells) of the first line with another number of cells than the header, if any."""
        odd = self.cells[self.cells != len(self.header)]
        return None if odd.empty else (int(odd.index[0]), int(odd.iloc[0]))

    def records(self) -> list[tuple[int, dict[str, str]]]:
        """(line, {column: cell}) of every line; a cell a short line lacks is ""."""
        return [(int(line), dict(zip(self.header, values)))
                for line, values in zip(self.rows.index, self.rows.itertuples(index=False, name=None))]


def read_table(path: Path) -> Table:
    """``path`` as a :class:`Table`; OSError, or ValueError when it is not UTF-8 text or not CSV."""
    import pandas as pd

    text = path.read_text(encoding="utf-8-sig")
    # At most one cell more than commas on any line: a table that wide holds every line whole.
    width = max((line.count(",") for line in text.splitlines()), default=0) + 1
    try:
        frame = pd.read_csv(io.StringIO(text), header=None, names=range(width), dtype=str,
                            keep_default_na=False, skip_blank_lines=False, engine="python")
    except pd.errors.EmptyDataError:  # an empty file: no header
        frame = pd.DataFrame(columns=range(width), dtype=str)
    frame.index = frame.index + 1  # line numbers (a quoted line break would shift them; pancseg writes none)
    cells = frame.notna().sum(axis=1)  # a short line's missing cells are NaN, its empty ones ""
    header = [str(c) for c in frame.iloc[0, : cells.iloc[0]]] if len(frame) else []
    body = frame.iloc[1:][cells.iloc[1:] > 0]  # blank lines hold no row
    rows = body.iloc[:, : len(header)].fillna("").set_axis(header, axis=1) if header else body.iloc[:, :0]
    beyond = body.iloc[:, len(header):].fillna("")
    overflow = (beyond.apply(lambda cells: cells.str.strip()) != "").any(axis=1)
    return Table(path, header, rows, cells.loc[body.index], overflow)


def read_written(path: Path, required: Sequence[str], fix: str) -> Table:
    """A table pancseg wrote, checked: readable, the ``required`` columns, no line of another width.

    :class:`~pancreas_cli.exceptions.TableError` names the file, the line and says ``fix``.
    """
    try:
        table = read_table(path)
    except ValueError as exc:
        raise TableError(path, f"not a CSV table pancseg wrote ({exc})", fix) from exc
    missing = table.missing(required)
    if missing:
        raise TableError(path, f"no column {missing[0]} (not written by this pancseg?)", fix)
    foreign = table.foreign_line()
    if foreign is not None:
        raise TableError(path, f"a line pancseg did not write ({foreign[1]} cells, the header has "
                               f"{len(table.header)})", fix, line=foreign[0])
    return table


def render_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The CSV text of ``rows`` under ``columns`` (cells as given: format numbers before)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(columns), dtype=object)
    return frame.to_csv(index=False, lineterminator="\n")
