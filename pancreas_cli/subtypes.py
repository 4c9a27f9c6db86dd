"""Lesion subtypes and case ids: the values, the file-name rule, and the subtype CSVs.

* A subtype is 0, 1 or 2 (:data:`SUBTYPES`); a CSV cell holds one if it is a number equal to one
  (``1.0`` is 1; ``1.7`` and ``inf`` are none).
* A case's CT is ``<case>_0000.<ext>`` (nnU-Net's first and only channel, :data:`CHANNEL`); its mask
  and its CSV rows name the case, with or without the extension and the channel (:func:`case_id`).
* Subtype CSVs: ``case_id,subtype`` (the user's truth, and prepare's copy beside the dataset) and
  ``Names,Subtype`` with ``Names,p0,p1,p2,subtype_source`` (what predict and the validation after training
  predicted).
  :func:`read_subtypes` reads either, with every check in one place (columns, widths, values, one
  subtype per case); :func:`render_case_subtypes` and :func:`write_predictions` write them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from pancreas_cli.exceptions import DataError, SubtypeConflictError
from pancreas_cli.imageio import image_extension, image_stem, write_text
from pancreas_cli.tables import read_table, render_table

SUBTYPES = (0, 1, 2)
CHANNEL = "_0000"  # nnU-Net's suffix of a case's first (here: only) image channel
CASE_SUBTYPES_NAME = "subtypes.csv"  # prepare's case_id,subtype, beside the dataset and the preprocessed data
RESULTS_NAME = "subtype_results.csv"  # Names,Subtype
PROBABILITIES_NAME = "subtype_probabilities.csv"  # Names,p0,p1,p2,subtype_source
#: ``subtype_source`` of a case: its mask has a lesion, or none (the subtype came from pancreas-level
#: features alone); empty where unknown (a record of an older pancseg).
SOURCES = {True: "lesion", False: "pancreas", None: ""}


def case_id(name: str) -> str:
    """``quiz_037.nii.gz`` / ``quiz_037_0000.nii.gz`` / ``quiz_037_0000`` / ``quiz_037`` -> ``quiz_037``."""
    stem = image_stem(name) if image_extension(name) else name
    return stem.removesuffix(CHANNEL)


def is_image(name: str) -> bool:
    """Whether ``name`` (a file name or stem) names a case's CT rather than its mask."""
    return (image_stem(name) if image_extension(name) else name).endswith(CHANNEL)


def image_name(case: str, extension: str = ".nii.gz") -> str:
    """The file name of ``case``'s CT (``case`` may be a glob pattern: ``*``)."""
    return f"{case}{CHANNEL}{extension}"


def subtype_value(text: str) -> int:
    """The subtype a cell holds; ValueError saying why it holds none."""
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"subtype {text!r} is not a number") from None
    if number not in SUBTYPES:  # 1.0 is 1; 1.7 or inf are no subtype
        raise ValueError(f"subtype {text.strip()} is not 0, 1 or 2")
    return int(number)


def subtype_of(probabilities: Sequence[float]) -> int:
    """The predicted subtype: the most probable, the first of equals (as ``numpy.argmax``)."""
    return max(range(len(SUBTYPES)), key=lambda i: probabilities[i])


def subtype_cells(path: Path) -> list[tuple[int, str, str]]:
    """(line, case, subtype cell) of each row of a subtype CSV in either format; rows without a case name
    (a spreadsheet's empty rows) are left out. DataError naming the file (and line) when it cannot be read,
    lacks the columns, or a row lacks a cell or holds more than the header names."""
    try:
        table = read_table(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as a UTF-8 CSV ({exc})") from exc
    if table.rows.empty:
        return []
    named = [c for c in table.header if c]
    columns = {c.strip().lower(): c for c in named}
    name_col, value_col = columns.get("names") or columns.get("case_id"), columns.get("subtype")
    if name_col is None or value_col is None:
        raise DataError(f"{path}: missing column(s); expected columns Names,Subtype or case_id,subtype, "
                        f"got {','.join(named)}")
    needed = max(table.header.index(name_col), table.header.index(value_col)) + 1
    out = []
    for line, row in table.records():
        if table.cells[line] < needed or table.overflow[line]:
            raise DataError(f"{path}, line {line}: expected {len(named)} columns ({','.join(named)})")
        if row[name_col].strip():
            out.append((line, case_id(row[name_col].strip()), row[value_col]))
    return out


def one_per_case(path: Path, rows: Iterable[tuple[int, str, int]]) -> dict[str, tuple[int, int]]:
    """Case -> (subtype, first line) of ``rows`` (line, case, subtype). A case listed twice with one subtype
    passes; with two: :class:`~pancreas_cli.exceptions.SubtypeConflictError` (last-wins would change a label
    unseen)."""
    found: dict[str, tuple[int, int]] = {}
    for line, case, value in rows:
        first = found.setdefault(case, (value, line))
        if first[0] != value:
            raise SubtypeConflictError(path, case, first, (value, line))
    return found


def read_subtypes(path: Path) -> dict[str, int]:
    """The subtype of each case of a ``Names,Subtype`` or ``case_id,subtype`` CSV, every row checked."""
    rows = []
    for line, case, text in subtype_cells(path):
        try:
            rows.append((line, case, subtype_value(text)))
        except ValueError as exc:
            raise DataError(f"{path}, line {line}: {exc}") from None
    return {case: value for case, (value, _) in one_per_case(path, rows).items()}


def render_case_subtypes(subtypes: Iterable[tuple[str, int | None]]) -> str:
    """The text of a ``case_id,subtype`` CSV."""
    return render_table(("case_id", "subtype"), subtypes)


def write_predictions(folder: Path, probabilities: dict[str, Sequence[float]],
                      lesion_found: dict[str, bool | None] | None = None) -> Path:
    """Write ``subtype_results.csv`` (``Names,Subtype``) and ``subtype_probabilities.csv``
    (``Names,p0,p1,p2,subtype_source``, see :data:`SOURCES`; ``lesion_found`` per case, missing =
    unknown) of the cases' masks into ``folder``, in the order given; returns the results CSV."""
    found = lesion_found or {}
    rows = [(case, f"{case}.nii.gz", p) for case, p in probabilities.items()]
    results = folder / RESULTS_NAME
    write_text(render_table(("Names", "Subtype"), ((name, subtype_of(p)) for _, name, p in rows)), results)
    rounded = ((name, *(f"{v:.6f}" for v in p), SOURCES[found.get(case)]) for case, name, p in rows)
    columns = ("Names", "p0", "p1", "p2", "subtype_source")
    write_text(render_table(columns, rounded), folder / PROBABILITIES_NAME)
    return results
