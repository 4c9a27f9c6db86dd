"""pancseg: pancreas and lesion segmentation with lesion subtype classification on nnU-Net v2."""

__version__ = "0.1.0"
