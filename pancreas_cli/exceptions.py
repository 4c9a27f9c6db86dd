"""Typed errors. Library code raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class PancsegError(Exception):
    """Base class of every user-facing pancseg error (exit code 1).

    The message says what is wrong, with which file, and how to fix it.
    """

    exit_code = 1


class ConfigError(PancsegError):
    """The configuration file or an override is invalid.

    ``problems`` holds one ``dotted.path: message`` line per bad field.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  {p}" for p in problems))


class OverrideSyntaxError(ConfigError):
    """A ``--set`` argument that is not ``dotted.key=value``: command-line usage (exit code 2)."""

    exit_code = 2


class DataError(PancsegError):
    """The user's data is missing, unreadable or inconsistent."""


class SeriesError(DataError):
    """The DICOM series to segment cannot be chosen: an unknown UID, or several equal candidates."""


class TableError(DataError):
    """A CSV table is not as pancseg wrote it (or could read it): ``why``, on ``line`` (None: the file as
    a whole); the message names the file and line and says how to fix it."""

    def __init__(self, path: object, why: str, fix: str, line: int | None = None) -> None:
        self.path, self.why, self.line = path, why, line
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {why}; {fix}")


class SubtypeConflictError(DataError):
    """A subtype CSV gives one case two subtypes (``first`` and ``second``: subtype and line each)."""

    def __init__(self, path: object, case: str, first: tuple[int, int], second: tuple[int, int]) -> None:
        self.path, self.case, self.first, self.second = path, case, first, second
        super().__init__(f"{path}: conflicting subtypes for case {case}: {first[0]} on line {first[1]}, "
                         f"{second[0]} on line {second[1]}; keep one row per case")


class SynthError(PancsegError):
    """Synthetic data generation was asked for something impossible."""


class PrepareError(DataError):
    """The raw dataset cannot be turned into an nnU-Net dataset."""


class CleanError(DataError):
    """Cleaning found problems it cannot fix."""


class PreprocessError(PancsegError):
    """nnU-Net fingerprinting, planning or preprocessing failed."""


class OutputExistsError(PancsegError):
    """An output exists and differs from what would be written; ``--force`` replaces it."""


class CheckpointError(PancsegError):
    """A checkpoint (model file) is missing, damaged, not nnU-Net's, or not safe to load."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds Python objects beyond nnU-Net's: loading it could run code (``--trust-model``)."""


class ModelArchiveError(PancsegError):
    """A model archive (``pancseg export``'s zip) is not one, was changed, or is for another pancseg version."""


class DiskFullError(PancsegError):
    """A file could not be written because its file system is full."""


class BusyError(PancsegError):
    """Another pancseg command is changing the same project, fold or output folder."""


class DeviceError(PancsegError):
    """The device asked for (``cuda:N``, ``mps``) is not here; ``reason`` says why, without the advice."""

    def __init__(self, reason: str, advice: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}{advice}")


class TrainError(PancsegError):
    """Training cannot start or failed."""


class PredictError(PancsegError):
    """The model or the input cannot be used for prediction (or the model cannot be found)."""


class TrainingInterrupted(PancsegError):
    """Training was stopped by the user (Ctrl-C) after saving a checkpoint."""

    exit_code = 130


class MissingDependencyError(PancsegError):
    """An optional library that a requested output needs is not installed (the message names the extra)."""
