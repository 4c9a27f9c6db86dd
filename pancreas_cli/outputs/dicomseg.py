"""``--output-format dicom-seg``: the mask of a DICOM series as a DICOM Segmentation (SEG) for a PACS.

``dicom_seg/<case>.dcm`` references the source series (its Study, Frame of Reference and each slice's
SOP Instance UID) and holds two binary segments, as the NIfTI mask's labels: 1 "Pancreas" (SNOMED CT
15776009, category Anatomical Structure; the pancreas outside the lesion, label 1) and 2 "Pancreatic
lesion" (SNOMED CT 52988006 Lesion, category Morphologically Abnormal Structure, anatomic region
Pancreas; label 2), both marked as made by an automatic AI algorithm (pancseg and its version). Written
with highdicom, an optional dependency (``pip install "pancseg[dicom]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pancreas_cli import __version__
from pancreas_cli.exceptions import DataError, MissingDependencyError
from pancreas_cli.imageio import write_file

DICOM_SEG_DIR = "dicom_seg"  # in a prediction folder: <case>.dcm
_REFERENCED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
SEGMENTS = {1: "Pancreas", 2: "Pancreatic lesion"}  # label (= segment number) -> segment label


def dicom_seg_path(out_dir: Path, case: str) -> Path:
    return out_dir / DICOM_SEG_DIR / f"{case}.dcm"


def require_highdicom() -> Any:
    """highdicom, or MissingDependencyError saying how to install it (checked before predicting)."""
    try:
        import highdicom
    except ImportError as exc:
        raise MissingDependencyError(
            f"--output-format dicom-seg needs highdicom, which is not installed ({exc}); install it with "
            "`pip install \"pancseg[dicom]\"` (or `pip install highdicom`)") from exc
    return highdicom


def _descriptions(hd: Any) -> list[Any]:
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="pancseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    concepts = {1: (codes.SCT.AnatomicalStructure, codes.SCT.Pancreas, None),
                2: (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion, [codes.SCT.Pancreas])}
    return [hd.seg.SegmentDescription(segment_number=number, segment_label=SEGMENTS[number],
                                      segmented_property_category=category, segmented_property_type=kind,
                                      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                      algorithm_identification=algorithm, anatomic_regions=regions,
                                      tracking_uid=hd.UID(), tracking_id=SEGMENTS[number])
            for number, (category, kind, regions) in concepts.items()]


def write_dicom_seg(labels: np.ndarray, files: Sequence[str], target: Path) -> Path:
    """Write the (z, y, x) ``labels`` (0/1/2) of the series ``files`` (in slice order: the mask's z) as a SEG."""
    hd = require_highdicom()
    import pydicom

    try:
        sources = [pydicom.dcmread(f) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise DataError(f"{Path(files[0]).parent}: cannot read the DICOM series for its SEG ({exc})") from exc
    folder = Path(files[0]).parent
    missing = [key for key in _REFERENCED if not str(sources[0].get(key, "")).strip()]
    if missing:
        raise DataError(f"{folder}: its DICOM files have no {', '.join(missing)} (anonymised without new UIDs?), "
                        "which a DICOM SEG must reference; give the series UIDs, or use the NIfTI mask")
    if labels.shape != (len(sources), sources[0].Rows, sources[0].Columns):
        raise DataError(f"{target}: the mask's shape {labels.shape} is not the series' "
                        f"({len(sources)}, {sources[0].Rows}, {sources[0].Columns})")
    try:
        seg = _segmentation(hd, sources, labels)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source headers
        raise DataError(f"{folder}: cannot make a DICOM SEG referencing this series ({exc})") from exc
    write_file(target, seg.save_as)
    return target


def _segmentation(hd: Any, sources: list[Any], labels: np.ndarray) -> Any:
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=labels.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(hd), series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="pancseg", manufacturer_model_name="pancseg",
        software_versions=__version__, device_serial_number="0", series_description="pancseg segmentation",
        content_label="PANCSEG", omit_empty_frames=bool(labels.any()))  # an empty SEG keeps its frames


def read_dicom_seg(path: Path, files: Sequence[str]) -> np.ndarray:
    """The (z, y, x) label map of a SEG written by :func:`write_dicom_seg` over the series ``files``."""
    hd = require_highdicom()
    import pydicom

    seg = hd.seg.segread(str(path))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                             skip_overlap_checks=True, ignore_spatial_locations=True)
