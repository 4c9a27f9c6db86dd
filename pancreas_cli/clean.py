"""``pancseg clean``: audit every prepared case and fix what is safe to fix.

Fixes are written atomically and the file they replace is kept first under
``imagesTr_original/`` or ``labelsTr_original/`` (only the very first original is kept, so
re-running never loses it). ``check=True`` changes nothing.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pancreas_cli.config import CleanConfig, Config, kept_labels
from pancreas_cli.console import count
from pancreas_cli.exceptions import CleanError, DataError
from pancreas_cli.imageio import (ct_value_problem, partial_name, partials, read_image, scan_nifti, sweep_partials,
                                  write_image, write_text)
from pancreas_cli.locks import project_stage, writing
from pancreas_cli.subtypes import case_id, image_name

if TYPE_CHECKING:
    import SimpleITK as sitk

Severity = Literal["error", "fixed", "warning"]
REPORT_NAME = "clean_report.csv"
DATA_FOLDERS = ("imagesTr", "labelsTr", "imagesTs")


@dataclass(frozen=True)
class Finding:
    """One problem of one case. ``severity`` is "fixed" for problems clean repairs (or would repair)."""

    severity: Severity
    case: str
    problem: str
    detail: str
    action: str
    pending: bool = False  # a fix not yet written (what --check fails on)


@dataclass
class CleanResult:
    dataset_dir: Path
    cases: int
    check: bool
    findings: list[Finding] = field(default_factory=list)
    report: Path | None = None
    changed_files: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def fixable(self) -> list[Finding]:
        """Fixes still to write (fixes applied by an earlier run are not counted)."""
        return [f for f in self.findings if f.severity == "fixed" and f.pending]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def summary(self) -> str:
        fixable = len(self.fixable)
        fixes = count(fixable, "fixable problem") if self.check else f"{count(fixable, 'problem')} fixed"
        text = (f"{count(self.cases, 'case')} checked: {count(len(self.errors), 'error')}, {fixes}, "
                f"{count(len(self.warnings), 'warning')}")
        if self.report:
            text += f"; report: {self.report}"
        if self.errors:
            text += "\nerrors cannot be fixed automatically: correct the source files, then `pancseg prepare --force`"
        elif self.check and self.fixable:
            text += "\nrun `pancseg clean` without --check to apply the fixes"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "cases": self.cases,
            "check": self.check,
            "errors": len(self.errors),
            "fixed": len(self.fixable),
            "warnings": len(self.warnings),
            "report": str(self.report) if self.report else None,
            "findings": [asdict(f) for f in self.findings],
        }


class _CaseAudit:
    """Collects findings and the repaired images of one case."""

    def __init__(self, case: str) -> None:
        self.case = case
        self.findings: list[Finding] = []
        self.fixes: dict[str, list[int]] = {"image": [], "mask": []}  # finding indices per file
        self.new_image: sitk.Image | None = None
        self.new_mask: sitk.Image | None = None

    def error(self, problem: str, detail: str, fix_hint: str) -> None:
        self.findings.append(Finding("error", self.case, problem, detail, f"none: {fix_hint}"))

    def warning(self, problem: str, detail: str) -> None:
        self.findings.append(Finding("warning", self.case, problem, detail, "none"))

    def fixed(self, target: str, problem: str, detail: str, action: str) -> None:
        self.fixes[target].append(len(self.findings))
        self.findings.append(Finding("fixed", self.case, problem, detail, action, pending=True))

    def settle(self, target: str, pending: bool, check: bool) -> None:
        """Word the fixes of one file: applied now, to be applied (--check), or applied by an earlier run."""
        for i in self.fixes[target]:
            f = self.findings[i]
            if not pending:
                action = f"{f.action} (done by an earlier run)"
            else:
                action = f"not applied (--check): {f.action}" if check else f.action
            self.findings[i] = Finding(f.severity, f.case, f.problem, f.detail, action, pending=pending)


def _read_scanned(audit: _CaseAudit, path: Path, what: str) -> tuple[sitk.Image, int] | None:
    """The image and its count of non-finite voxels (scanned in the file: SimpleITK zeroes them and
    reads truncated files without complaint), or None with the error recorded."""
    try:
        nonfinite = scan_nifti(path)
        return read_image(path), nonfinite
    except DataError as exc:
        audit.error(f"unreadable {what}", str(exc), "replace the file in the source")
        return None


def _audit_image(audit: _CaseAudit, path: Path, hu_range: tuple[float, float]) -> sitk.Image | None:
    """Checks shared by training and test images. Returns the image when it is usable."""
    import SimpleITK as sitk

    if (read := _read_scanned(audit, path, "image")) is None:
        return None
    image, nonfinite = read
    if image.GetDimension() != 3:
        audit.error("not a 3D image", f"{path.name} has {image.GetDimension()} dimensions", "provide a 3D CT volume")
        return None
    if image.GetNumberOfComponentsPerPixel() != 1:
        audit.error(
            "multi-component image",
            f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel",
            "provide a single-channel CT volume",
        )
        return None
    array = sitk.GetArrayViewFromImage(image)
    if nonfinite or (np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()):
        bad = nonfinite or int((~np.isfinite(array)).sum())
        audit.error("NaN/Inf voxels", f"{path.name}: {bad} non-finite voxels", "replace them in the source (e.g. with -1024)")
        return None
    lo, hi = float(array.min()), float(array.max())
    if problem := ct_value_problem(lo, hi, hu_range):
        audit.warning("not CT-like values", f"{path.name}: {problem}")
    if array.dtype in (np.int32, np.int64, np.uint32, np.uint64) and lo >= -32768 and hi <= 32767:
        audit.fixed("image", "wide integer CT", f"{path.name} stored as {array.dtype}", "stored as int16 (all values fit)")
        image = sitk.Cast(image, sitk.sitkInt16)
        audit.new_image = image
    return image


def _geometry_delta(image: sitk.Image, mask: sitk.Image) -> tuple[float, float, float]:
    spacing_i, spacing_m = np.array(image.GetSpacing()), np.array(mask.GetSpacing())
    spacing = float(np.max(np.abs(spacing_i - spacing_m) / spacing_i))
    origin = float(np.max(np.abs(np.array(image.GetOrigin()) - np.array(mask.GetOrigin()))))
    direction = float(np.max(np.abs(np.array(image.GetDirection()) - np.array(mask.GetDirection()))))
    return spacing, origin, direction


def _read_mask(audit: _CaseAudit, path: Path, image: sitk.Image) -> tuple[sitk.Image, int] | None:
    """The mask and its count of non-finite voxels, or None (with the error recorded) when it cannot be
    used at all: unreadable, not a single-channel 3D map, or on another voxel grid."""
    if (read := _read_scanned(audit, path, "mask")) is None:
        return None
    mask, nonfinite = read
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        audit.error("mask not 3D", f"{path.name}: {mask.GetDimension()}D, {mask.GetNumberOfComponentsPerPixel()} components",
                    "provide a single-channel 3D label map")
        return None
    if mask.GetSize() != image.GetSize():
        audit.error("shape mismatch", f"image {image.GetSize()} vs mask {mask.GetSize()} (x,y,z)",
                    "the mask must be drawn on this image's voxel grid")
        return None
    return mask, nonfinite


def _geometry_fixable(audit: _CaseAudit, image: sitk.Image, mask: sitk.Image, cfg: CleanConfig) -> bool | None:
    """Whether the mask's geometry needs the image's copied onto it; None (error recorded) when the
    difference is beyond the tolerances, i.e. the mask may belong to another image."""
    spacing, origin, direction = _geometry_delta(image, mask)
    if spacing > cfg.spacing_tolerance or origin > cfg.origin_tolerance_mm or direction > cfg.direction_tolerance:
        audit.error(
            "geometry mismatch",
            f"mask vs image: spacing differs by {spacing:.2g} (relative), origin by {origin:.3g} mm, "
            f"direction by {direction:.2g}; beyond clean.*_tolerance",
            "check the mask belongs to this image; raise the tolerances only if it does",
        )
        return None
    if not (spacing or origin or direction):
        return False
    audit.fixed("mask", "geometry differs slightly",
                f"mask vs image: spacing {spacing:.2g} (relative), origin {origin:.3g} mm, direction {direction:.2g}",
                "copied the image geometry onto the mask")
    return True


def _integer_labels(audit: _CaseAudit, path: Path, values: np.ndarray, nonfinite: int,
                    cfg: CleanConfig) -> tuple[np.ndarray, bool] | None:
    """Float masks as integer labels (the quiz set stores 1.0000152587890625), and whether they changed;
    None (error recorded) for NaN/Inf or values too far from an integer (an interpolated mask)."""
    if not np.issubdtype(values.dtype, np.floating):
        return values, False
    if nonfinite or not np.isfinite(values).all():
        audit.error("NaN/Inf in mask", f"{path.name}", "replace the mask in the source")
        return None
    rounded = np.rint(values)
    off = np.abs(values - rounded)
    if off.max() > cfg.label_tolerance:
        bad = np.unique(values[off > cfg.label_tolerance])[:5]
        audit.error("non-integer labels", f"{path.name}: values like {', '.join(f'{v:.6g}' for v in bad)}",
                    "the mask looks interpolated; re-export it with nearest-neighbour resampling")
        return None
    if off.max() > 0:
        odd = np.unique(values[off > 0])[:3]
        audit.fixed("mask", "float labels", f"{path.name}: values like {', '.join(repr(float(v)) for v in odd)}",
                    "rounded to integers")
    return rounded.astype(np.int64), bool(off.max() > 0)


def _mapped_labels(audit: _CaseAudit, path: Path, labels: np.ndarray, cfg: CleanConfig) -> tuple[np.ndarray, bool] | None:
    """Labels after ``clean.label_map`` and ``clean.unknown_labels``, and whether they changed; None
    (error recorded) for unknown labels the config does not send to background."""
    mapping = kept_labels(cfg.label_map)
    present = np.unique(labels).tolist()
    unknown = sorted(set(present) - set(mapping))
    moved = sorted(k for k in present if k in mapping and mapping[k] != k)
    if moved:
        audit.fixed("mask", "remapped labels", ", ".join(f"{k}->{mapping[k]}" for k in moved), "applied clean.label_map")
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        if cfg.unknown_labels != "background":
            audit.error("unknown labels", f"{path.name}: values {shown} (expected {', '.join(map(str, mapping))})",
                        "map them with clean.label_map or set clean.unknown_labels: background")
            return None
        audit.fixed("mask", "unknown labels", f"{path.name}: values {shown}", "set to background (clean.unknown_labels)")
    if not (moved or unknown):
        return labels, False
    return np.select([labels == k for k in mapping], [mapping[k] for k in mapping], 0), True


def _audit_mask(audit: _CaseAudit, path: Path, image: sitk.Image, cfg: CleanConfig) -> None:
    import SimpleITK as sitk

    if (read := _read_mask(audit, path, image)) is None:
        return
    mask, nonfinite = read
    if (geometry_changed := _geometry_fixable(audit, image, mask, cfg)) is None:
        return
    values = sitk.GetArrayFromImage(mask)
    if (integer := _integer_labels(audit, path, values, nonfinite, cfg)) is None:
        return
    if (mapped := _mapped_labels(audit, path, integer[0], cfg)) is None:
        return
    labels = mapped[0]
    changed = geometry_changed or integer[1] or mapped[1]
    if values.dtype != np.uint8:
        audit.fixed("mask", "label type", f"{path.name} stored as {values.dtype}", "stored as uint8")
        changed = True
    if not (labels > 0).any():
        audit.warning("no pancreas", f"{path.name} has no label 1 or 2")
    elif not (labels == 2).any():
        audit.warning("no lesion", f"{path.name} has no label 2: this case cannot teach the subtype")
    if changed:
        new = sitk.GetImageFromArray(labels.astype(np.uint8))
        new.CopyInformation(image)
        audit.new_mask = new


def _replace(path: Path, new: sitk.Image) -> None:
    """Keep the first original of ``path`` (see :func:`_original`), then write ``new`` over it atomically."""
    keep = _original(path)
    if not keep.exists():
        keep.parent.mkdir(parents=True, exist_ok=True)
        tmp = keep.with_name(partial_name(f"{keep.name}.tmp"))
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, keep)
    write_image(new, path)


def _original(path: Path) -> Path:
    """Where clean keeps the first original of a prepared file."""
    return path.parent.with_name(path.parent.name + "_original") / path.name


def _same(a: sitk.Image, b: sitk.Image) -> bool:
    import SimpleITK as sitk

    return (
        a.GetSize() == b.GetSize()
        and a.GetPixelID() == b.GetPixelID()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
        and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    )


def _pending(path: Path, new: sitk.Image | None) -> tuple[bool, sitk.Image | None]:
    """Whether ``path`` still has to change, and to what.

    Clean always audits the original (so a changed config, e.g. a new label_map, applies to the
    source values, and re-runs are idempotent); the fix is pending unless the current file already
    holds it.
    """
    original = _original(path)
    if not original.exists():
        return new is not None, new
    target = new if new is not None else read_image(original)
    return not _same(target, read_image(path)), target


def _audit_case(
    case: str, image_path: Path, mask_path: Path | None, cfg: CleanConfig, check: bool
) -> tuple[_CaseAudit, sitk.Image | None, sitk.Image | None]:
    """Audit one case from its originals; return the audit and the images still to write."""
    audit = _CaseAudit(case)
    source = _original(image_path) if _original(image_path).exists() else image_path
    image = _audit_image(audit, source, cfg.hu_range)
    write_image_to = write_mask_to = None
    if image is not None:
        pending, write_image_to = _pending(image_path, audit.new_image)
        audit.settle("image", pending, check)
        write_image_to = write_image_to if pending else None
    if image is not None and mask_path is not None:
        source = _original(mask_path) if _original(mask_path).exists() else mask_path
        _audit_mask(audit, source, image, cfg)
        if not any(f.severity == "error" for f in audit.findings):
            pending, write_mask_to = _pending(mask_path, audit.new_mask)
            audit.settle("mask", pending, check)
            write_mask_to = write_mask_to if pending else None
    return audit, write_image_to, write_mask_to


@project_stage()
def clean(config: Config, *, check: bool = False) -> CleanResult:
    """Audit imagesTr/labelsTr/imagesTs of the prepared dataset; fix unless ``check``."""
    dataset = config.dataset_raw_dir
    if not (dataset / "dataset.json").is_file():
        raise CleanError(f"{dataset}: no prepared dataset; run `pancseg prepare` first")
    jobs: list[tuple[str, Path, Path | None]] = []
    for image in sorted((dataset / "imagesTr").glob(image_name("*"))):
        case = case_id(image.name)
        jobs.append((case, image, dataset / "labelsTr" / f"{case}.nii.gz"))
    for image in sorted((dataset / "imagesTs").glob(image_name("*"))):
        jobs.append((case_id(image.name), image, None))
    missing = [m for _, _, m in jobs if m is not None and not m.is_file()]
    if missing:
        raise CleanError(f"{missing[0]}: mask missing from the prepared dataset; re-run `pancseg prepare --force`")

    with ThreadPoolExecutor(max_workers=config.plan.num_processes) as pool:
        audits = list(pool.map(lambda job: _audit_case(*job, config.clean, check), jobs))

    result = CleanResult(dataset, len(jobs), check, [f for a, _, _ in audits for f in a.findings])
    if check:
        return result
    folders = [dataset, *(dataset / f"{name}{end}" for name in DATA_FOLDERS for end in ("", "_original"))]
    leftovers = any(partials(folder) for folder in folders)
    if leftovers or any(new_image is not None or new_mask is not None for _, new_image, new_mask in audits):
        writing(config.project_dir)
    for folder in folders:  # what a killed clean left (nnU-Net would count a leftover image as a case)
        sweep_partials(folder)
    for (_, image_path, mask_path), (_, new_image, new_mask) in zip(jobs, audits):
        for path, new in ((image_path, new_image), (mask_path, new_mask)):
            if path is not None and new is not None:
                _replace(path, new)
                result.changed_files.append(path)
    result.report = dataset / REPORT_NAME
    write_text(_report_csv(result.findings), result.report)
    return result


def _report_csv(findings: list[Finding]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "problem", "detail", "action", "severity"])
    for f in findings:
        writer.writerow([f.case, f.problem, f.detail, f.action, f.severity])
    return buffer.getvalue()
