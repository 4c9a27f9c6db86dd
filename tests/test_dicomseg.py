"""``--output-format dicom-seg``: a DICOM SEG that references its series and reads back as the mask."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pancreas_cli.dicom import choose_series
from pancreas_cli.exceptions import DataError, MissingDependencyError
from pancreas_cli.outputs.dicomseg import read_dicom_seg, require_highdicom, write_dicom_seg
from conftest import write_dicom_series


def _series(tmp_path: Path, anonymised: bool = False) -> tuple[tuple[str, ...], np.ndarray]:
    volume = np.full((10, 32, 36), -1000, np.int16)
    volume[:, 4:28, 4:32] = 40
    series = choose_series(write_dicom_series(volume, tmp_path / "series"), None, print)
    for file in series.files if anonymised else ():  # as some anonymisers leave a series
        dataset = pydicom.dcmread(file)
        dataset.SOPInstanceUID = dataset.SeriesInstanceUID = dataset.StudyInstanceUID = ""
        dataset.save_as(file)
    labels = np.zeros(volume.shape, np.uint8)
    labels[2:8, 8:20, 10:30] = 1
    labels[4:6, 10:14, 20:26] = 2
    return series.files, labels


def test_a_seg_references_its_series_and_reads_back_as_the_mask(tmp_path: Path) -> None:
    files, labels = _series(tmp_path)
    target = write_dicom_seg(labels, files, tmp_path / "dicom_seg" / "case.dcm")
    assert np.array_equal(read_dicom_seg(target, files), labels)
    seg, source = pydicom.dcmread(target), pydicom.dcmread(files[0])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (source.StudyInstanceUID, source.FrameOfReferenceUID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {pydicom.dcmread(f).SOPInstanceUID for f in files} and referenced
    segments = {s.SegmentNumber: s for s in seg.SegmentSequence}
    assert segments[1].SegmentLabel == "Pancreas" and segments[2].SegmentLabel == "Pancreatic lesion"
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "15776009"  # SNOMED CT Pancreas
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # Lesion
    assert segments[2].AnatomicRegionSequence[0].CodeValue == "15776009"
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in segments.values())


def test_empty_and_lesion_only_masks(tmp_path: Path) -> None:
    files, labels = _series(tmp_path)
    for name, mask in (("empty", np.zeros_like(labels)), ("lesion", np.where(labels == 2, 2, 0).astype(np.uint8))):
        target = write_dicom_seg(mask, files, tmp_path / f"{name}.dcm")
        assert np.array_equal(read_dicom_seg(target, files), mask)


def test_a_series_without_uids_is_refused_with_the_reason(tmp_path: Path) -> None:
    files, labels = _series(tmp_path, anonymised=True)
    with pytest.raises(DataError, match="files have no SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID .anonymised"):
        write_dicom_seg(labels, files, tmp_path / "case.dcm")
    with pytest.raises(DataError, match=r"the mask's shape \(10, 32, 35\) is not the series' \(10, 32, 36\)"):
        write_dicom_seg(labels[..., :35], _series(tmp_path / "b")[0], tmp_path / "case.dcm")
    assert not (tmp_path / "case.dcm").exists()


def test_without_highdicom_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "pancseg\[dicom\]"'):
        require_highdicom()
