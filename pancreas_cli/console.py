"""Terminal output: rich on a TTY, plain lines elsewhere (Colab `!` cells, CI, pipes).

Results go to stdout, diagnostics (progress, warnings, errors) to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Output:
    """Where and how much pancseg prints; configured once by the CLI's global options."""

    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    debug: bool = False
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @property
    def out(self) -> Console:
        # Created lazily so that test runners that swap sys.stdout are honoured.
        if self._out is None or self._out.file is not sys.stdout:
            self._out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None or self._err.file is not sys.stderr:
            self._err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        return self._err

    @property
    def rich(self) -> bool:
        """True when stdout is an interactive terminal."""
        return self.out.is_terminal

    def result(self, text: str) -> None:
        """A result line (stdout), shown even with --quiet."""
        self.out.print(text, markup=False)

    def info(self, text: str) -> None:
        """A diagnostic line (stderr), hidden by --quiet."""
        if self.verbosity >= 0:
            self.err.print(text, markup=False)

    def detail(self, text: str) -> None:
        """A diagnostic shown only with --verbose."""
        if self.verbosity >= 1:
            self.err.print(text, markup=False)

    def warn(self, text: str) -> None:
        self.err.print(f"warning: {text}", markup=False, style="yellow")

    def error(self, text: str) -> None:
        self.err.print(f"error: {text}", markup=False, style="bold red")

    def json(self, data: Any) -> None:
        """Machine-readable output for scripts (stdout, no colour, no wrapping)."""
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A rich table on a terminal; aligned plain text otherwise."""
        cells = [[_fmt(v) for v in row] for row in rows]
        if self.rich:
            table = Table(title=title)
            for col in columns:
                table.add_column(col)
            for row in cells:
                table.add_row(*row)
            self.out.print(table)
            return
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        sys.stdout.write("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def count(n: int, noun: str) -> str:
    """``1 case``, ``2 cases``; nouns here take a plain -s."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


#: The process-wide output settings.
output = Output()
