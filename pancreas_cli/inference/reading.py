"""A scan pancseg has read (and verified) handed to nnU-Net's preprocessing without reading it again.

nnU-Net's preprocessor reads its input from a file with the plans' reader. pancseg reads every scan
itself first (to verify it: truncated files, NaN voxels, DICOM series), so with nnU-Net's default
reader, :class:`SimpleITKIO`, the image is handed over in the form that reader returns instead of
being decompressed a second time (and DICOM or NRRD input need no NIfTI copy in between).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk


def reads_like_simpleitk(plans_manager: Any) -> bool:
    """Whether the plans read images with nnU-Net's plain SimpleITK reader (no reorientation, no other library)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return plans_manager.image_reader_writer_class is SimpleITKIO


def nnunet_input(image: sitk.Image) -> tuple[np.ndarray, dict[str, Any]]:
    """What ``SimpleITKIO().read_images([file])`` returns for a 3D single-channel ``image`` of that file:
    a (1, z, y, x) float32 array and the properties (geometry, spacing in array order)."""
    import SimpleITK as sitk

    spacing = image.GetSpacing()
    properties = {"sitk_stuff": {"spacing": spacing, "origin": image.GetOrigin(), "direction": image.GetDirection()},
                  "spacing": list(np.abs(list(spacing)[::-1]))}
    return sitk.GetArrayFromImage(image)[None].astype(np.float32), properties
