"""``--save-probabilities``: each case's class probabilities as one 4D NIfTI, ``probabilities/<case>.nii.gz``.

The probabilities are those of the segmentation logits resampled to the input grid exactly as the mask
is: for a label model the softmax (channels 0 background, 1 pancreas, 2 lesion), whose argmax is the
saved mask; for a region-based model (``dataset.region_based``, the default) a sigmoid per region
(channels 0 whole pancreas = labels 1+2, 1 lesion), whose mask is the lesion where its probability
exceeds 0.5, else pancreas where the whole pancreas' does (:func:`segmentation_of`). One float32 4D
image per case, on the mask's grid: axes x, y, z of the scan, then the channel, which ITK-SNAP,
3D Slicer and nibabel open as a multi-component volume. NIfTI,
not nnU-Net's ``.npz``: nnU-Net writes the case's properties beside it as a pickle, which runs code when
read, and a NIfTI carries its geometry itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pancreas_cli.exceptions import DataError
from pancreas_cli.imageio import write_image

PROBABILITIES_DIR = "probabilities"  # in a prediction folder


def probabilities_path(out_dir: Path, case: str) -> Path:
    return out_dir / PROBABILITIES_DIR / f"{case}.nii.gz"


def write_probabilities(probabilities: np.ndarray, mask_file: Path, target: Path) -> Path:
    """Write (C, z, y, x) ``probabilities`` (the mask's array axes) atomically as a 4D image on the grid of
    ``mask_file`` (only its header is read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(mask_file))
    reader.ReadImageInformation()
    if tuple(probabilities.shape[1:]) != tuple(reversed(reader.GetSize())):
        raise DataError(f"{mask_file}: the probabilities' shape {probabilities.shape[1:]} is not the mask's "
                        f"{tuple(reversed(reader.GetSize()))} (z, y, x)")
    image = sitk.GetImageFromArray(np.ascontiguousarray(probabilities, dtype=np.float32), isVector=False)
    image.SetSpacing((*reader.GetSpacing(), 1.0))
    image.SetOrigin((*reader.GetOrigin(), 0.0))
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(reader.GetDirection(), (3, 3))
    image.SetDirection(direction.ravel().tolist())
    write_image(image, target)
    return target


def read_probabilities(path: Path) -> np.ndarray:
    """The (C, z, y, x) float32 probabilities written by :func:`write_probabilities`."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 4:
        raise DataError(f"{path}: not a 4D probability image ({image.GetDimension()}D)")
    return sitk.GetArrayFromImage(image)


def segmentation_of(probabilities: np.ndarray) -> np.ndarray:
    """The mask (0, 1, 2) that (C, *S) ``probabilities`` as written give: the argmax of a label model's
    three, or from a region-based model's two (whole pancreas, lesion) nnU-Net's rule for the regions
    (``regions_class_order`` [1, 2]: each region's label where its probability exceeds 0.5, the lesion last)."""
    if len(probabilities) == 3:
        return probabilities.argmax(0).astype(np.uint8)
    if len(probabilities) != 2:
        raise DataError(f"{len(probabilities)} probability channels: expected 3 (labels) or 2 (regions)")
    mask = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    mask[probabilities[0] > 0.5] = 1
    mask[probabilities[1] > 0.5] = 2
    return mask
