"""The multi-task model: nnU-Net's segmentation network plus a lesion-subtype head on its encoder."""
