"""Epoch and case progress: plain lines off a terminal, rich styling on one, nothing when quiet."""

from __future__ import annotations

import io
from pathlib import Path

from pancreas_cli.inference.window import WindowStats
from pancreas_cli.predict import CaseOutcome
from pancreas_cli.progress import CasePrinter, EpochPrinter


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _outcome(case: str, seconds: float, subtype: int | None, error: str | None = None, **extra: object) -> CaseOutcome:
    """What predict reports per case (see pancreas_cli.predict.CaseReporter)."""
    return CaseOutcome(case, Path(f"{case}_0000.nii.gz"), "failed" if error else "predicted", seconds, subtype,
                       error=error, **extra)  # type: ignore[arg-type]


def _row(epoch: int, seconds: float = 10.0, best: bool = False, **extra: object) -> dict:
    return {"epoch": epoch, "train_loss": -0.51234, "val_loss": -0.4, "dice_pancreas": 0.91234,
            "dice_lesion": float("nan"), "lr": 0.0098, "epoch_time_s": seconds, "best": int(best), **extra}


def test_epoch_lines_plain_with_eta() -> None:
    stream = io.StringIO()
    printer = EpochPrinter()
    printer.start_fold(0, 0, 4, stream)
    printer.epoch(_row(1, 10.0, best=True, cls_loss=1.1, val_macro_f1=0.5))
    printer.epoch(_row(2, 20.0))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fold 0: starting, 4 epochs"
    assert lines[1] == ("fold 0 epoch 1/4 | loss -0.5123 | cls 1.1000 | val -0.4000 | dice pancreas 0.912 | "
                        "lesion - | F1 0.500 | lr 9.80e-03 | 10.0s | ETA 0m30s *best*")
    # stock trainer rows have no class values; ETA = mean epoch time x epochs left
    assert lines[2] == ("fold 0 epoch 2/4 | loss -0.5123 | val -0.4000 | dice pancreas 0.912 | lesion - | "
                        "lr 9.80e-03 | 20.0s | ETA 0m30s")
    assert "\x1b[" not in stream.getvalue()  # no terminal codes in pipes, CI and Colab cells


def test_eta_in_hours() -> None:
    printer = EpochPrinter()
    printer.start_fold(1, 0, 1000, io.StringIO())
    assert printer.line(_row(1, 120.0)).endswith("ETA 33h18m")


def test_resume_and_finished_messages() -> None:
    stream = io.StringIO()
    printer = EpochPrinter()
    printer.start_fold(2, 3, 10, stream)
    printer.start_fold(2, 10, 10, stream)
    assert stream.getvalue().splitlines() == [
        "fold 2: resuming at epoch 4, 10 epochs",
        "fold 2: all 10 epochs done, validating again (a larger --epochs trains on)",
    ]


def test_terminal_styles_the_best_epoch() -> None:
    stream = Terminal()
    printer = EpochPrinter()
    printer.start_fold(0, 0, 2, stream)
    printer.epoch(_row(1, best=True))
    assert "\x1b[" in stream.getvalue() and "fold 0 epoch 1/2" in stream.getvalue()


def test_quiet_prints_nothing() -> None:
    stream = io.StringIO()
    printer = EpochPrinter(quiet=True)
    printer.start_fold(0, 0, 2, stream)
    printer.epoch(_row(1))
    cases = CasePrinter(quiet=True)
    cases.start(1, stream)
    cases.case(_outcome("quiz_001", 1.0, 1), 1)
    assert stream.getvalue() == ""


def test_case_lines_plain() -> None:
    stream = io.StringIO()
    printer = CasePrinter()
    printer.start(2, stream)
    window = WindowStats(tiles=45, full=12, passes=129, stock_passes=360)
    printer.case(_outcome("quiz_001", 1.25, 2, times={"read": 0.1, "network": 1.0, "export": 0.15}, window=window), 1)
    printer.case(_outcome("quiz_002", 0.5, None, error="unreadable header"), 2)
    assert stream.getvalue().splitlines() == [
        "[1/2] quiz_001 1.2s (read 0.1s, network 1.0s, export 0.1s); 12/45 tiles mirrored, 33 skipped "
        "(129 of nnU-Net's 360 passes); subtype 2",
        "[2/2] quiz_002 0.5s FAILED: unreadable header",
    ]


def test_case_progress_bar_on_a_terminal() -> None:
    stream = Terminal()
    printer = CasePrinter()
    printer.start(1, stream)
    assert printer.progress is not None
    printer.case(_outcome("quiz_001", 1.0, 0), 1)
    assert "quiz_001" in stream.getvalue() and "subtype 0" in stream.getvalue()
    assert not printer.progress.live.is_started  # stopped after the last case
