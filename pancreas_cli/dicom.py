"""DICOM folders: their series, and which one is the CT volume to segment.

An exam folder often holds more than the CT series: a scout (topogram, a few slices), a dose
report, a second reconstruction. The rule: the series with the most slices is the CT volume (a
scout or a report has a few); a tie is ambiguous and must be named (``--series UID``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pancreas_cli.exceptions import SeriesError

_DESCRIPTION, _MODALITY = "0008|103e", "0008|0060"


@dataclass(frozen=True)
class Series:
    uid: str  # GDCM's series id: the SeriesInstanceUID (may be empty in anonymised exams)
    files: tuple[str, ...]  # sorted by slice position
    description: str = ""
    modality: str = ""

    def describe(self) -> str:
        """``UID (20 slices, CT, "CT Body 3.0")`` for messages."""
        extra = [f"{len(self.files)} slice{'s' if len(self.files) != 1 else ''}"]
        extra += [text for text in (self.modality, f'"{self.description}"' if self.description else "") if text]
        return f"{self.uid or '(empty UID)'} ({', '.join(extra)})"


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK warns on stderr when a folder has no series; for pancseg that is an answer, not a problem."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series ids in ``folder`` (not its subfolders); empty if it holds none."""
    import SimpleITK as sitk

    with _quiet_itk():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def list_series(folder: Path) -> list[Series]:
    """Every DICOM series in ``folder`` with its files, description and modality (from its first file)."""
    import SimpleITK as sitk

    found = []
    with _quiet_itk():
        for uid in series_ids(folder):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            found.append(Series(uid, files, *_tags(files[0]) if files else ("", "")))
    return found


def _tags(file: str) -> tuple[str, str]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # the series is listed anyway; reading it says what is wrong
        return "", ""
    return tuple(reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""  # type: ignore[return-value]
                 for key in (_DESCRIPTION, _MODALITY))


def choose_series(folder: Path, uid: str | None, warn: Callable[[str], None]) -> Series:
    """The series named by ``uid``, else the one with the most slices (a warning names it and the
    ones left out, when there are several); :class:`SeriesError` listing the series otherwise."""
    found = list_series(folder)
    listing = "; ".join(s.describe() for s in found)
    if uid is not None:
        chosen = next((s for s in found if s.uid == uid), None)
        if chosen is None:
            raise SeriesError(f"{folder}: no DICOM series {uid!r}; it holds: {listing}")
        return chosen
    if not found:
        raise SeriesError(f"{folder}: no DICOM series found")
    most = max(len(s.files) for s in found)
    largest = [s for s in found if len(s.files) == most]
    if len(largest) > 1:
        raise SeriesError(f"{folder}: {len(largest)} DICOM series have {most} slices, so which one is the CT is "
                          f"unclear; name one with --series UID. Series: {listing}")
    chosen = largest[0]
    if len(found) > 1:
        others = "; ".join(s.describe() for s in found if s is not chosen)
        warn(f"{folder}: {len(found)} DICOM series; segmenting the one with the most slices, {chosen.describe()}; "
             f"left out: {others} (--series UID chooses another)")
    return chosen
