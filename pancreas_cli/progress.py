"""One line per training epoch: rich on a terminal, plain text in Colab ``!`` cells, CI and pipes."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.console import Console


def _num(row: dict[str, Any], key: str, digits: int = 4) -> str:
    value = row.get(key)
    if value is None or value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class EpochPrinter:
    """Implements :class:`pancreas_cli.train.EpochReporter` for the CLI."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console: Console | None = None
        self.fold = 0
        self.total = 0
        self.first = 0
        self.times: list[float] = []

    def start_fold(self, fold: int, first_epoch: int, total_epochs: int, stream: TextIO) -> None:
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.fold, self.first, self.total, self.times = fold, first_epoch, total_epochs, []
        if self.quiet:
            return
        if first_epoch >= total_epochs:  # a finished run resumed: nnU-Net only validates again
            text = f"fold {fold}: all {total_epochs} epochs done, validating again (a larger --epochs trains on)"
        else:
            where = f"resuming at epoch {first_epoch + 1}" if first_epoch else "starting"
            text = f"fold {fold}: {where}, {total_epochs} epochs"
        self.console.print(text, markup=False)

    def line(self, row: dict[str, Any]) -> str:
        """The text of one epoch's line."""
        self.times.append(float(row["epoch_time_s"]))
        remaining = max(0, self.total - int(row["epoch"]))
        eta = _duration(sum(self.times) / len(self.times) * remaining)
        parts = [
            f"fold {self.fold} epoch {row['epoch']}/{self.total}",
            f"loss {_num(row, 'train_loss')}",
        ]
        if row.get("cls_loss") is not None:
            parts.append(f"cls {_num(row, 'cls_loss')}")
        parts += [f"val {_num(row, 'val_loss')}", f"dice pancreas {_num(row, 'dice_pancreas', 3)}",
                  f"lesion {_num(row, 'dice_lesion', 3)}"]
        if row.get("val_macro_f1") is not None:
            parts.append(f"F1 {_num(row, 'val_macro_f1', 3)}")
        parts += [f"lr {row['lr']:.2e}", f"{row['epoch_time_s']:.1f}s", f"ETA {eta}"]
        return " | ".join(parts) + (" *best*" if row.get("best") else "")

    def epoch(self, row: dict[str, Any]) -> None:
        text = self.line(row)
        if self.quiet or self.console is None:
            return
        if self.console.is_terminal:
            self.console.print(text, style="bold green" if row.get("best") else None, markup=False)
        else:
            self.console.print(text, markup=False)


def case_detail(outcome: Any) -> str:
    """Time (and its split), the tiles pancseg's window computed and skipped, and the subtype of a case."""
    if outcome.status == "failed":
        return f"{outcome.seconds:.1f}s FAILED: {outcome.error}"
    parts = [f"{outcome.seconds:.1f}s"]
    if outcome.times:
        parts[0] += " (" + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in outcome.times.items()) + ")"
    if outcome.window is not None:
        parts.append(outcome.window.describe())
    if outcome.subtype is not None:
        parts.append(f"subtype {outcome.subtype}")
    return "; ".join(parts)


class CasePrinter:
    """Implements :class:`pancreas_cli.predict.CaseReporter`: a progress bar on a terminal, lines otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console: Console | None = None
        self.progress: Any = None
        self.task: Any = None
        self.total = 0

    def start(self, total: int, stream: TextIO) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.total = total
        if self.console.is_terminal and not self.quiet:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("predicting", total=total)
            self.progress.start()

    def working(self, case: str, detail: str) -> None:
        if self.quiet or self.console is None:
            return
        (self.progress.console if self.progress is not None else self.console).print(f"{case}: {detail}", markup=False)

    def warn(self, text: str) -> None:
        """Shown even when quiet, as the CLI's warnings are (on stderr while nnU-Net's output is logged)."""
        console = self.progress.console if self.progress is not None else self.console
        if console is None:
            console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        console.print(f"warning: {text}", markup=False, style="yellow")

    def case(self, outcome: Any, index: int) -> None:
        if self.quiet or self.console is None:
            return
        text = f"[{index}/{self.total}] {outcome.case} {case_detail(outcome)}"
        if self.progress is not None:
            self.progress.console.print(text, markup=False)
            self.progress.update(self.task, advance=1, description=f"predicting ({outcome.seconds:.1f}s/case)")
            if index == self.total:
                self.progress.stop()
        else:
            self.console.print(text, markup=False)
