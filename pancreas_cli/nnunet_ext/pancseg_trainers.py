"""Entry point for nnU-Net's ``nnUNet_extTrainer`` search: point it at this folder.

nnU-Net imports every module in that folder by name and looks for the trainer class there.
"""

from pancreas_cli.multitask.trainer import nnUNetTrainerMultiTask, nnUNetTrainerPancseg

__all__ = ["nnUNetTrainerMultiTask", "nnUNetTrainerPancseg"]
