"""Found by nnU-Net's own tools through ``nnUNet_extTrainer`` (see :func:`..paths.nnunet_environment`).

nnU-Net imports every module of an ``nnUNet_extTrainer`` folder as a top-level
module and looks the trainer class up by name, so this file only re-exports it.
"""

from ActiveLearning3DLib.nnunet.trainer import nnUNetTrainerPartial  # noqa: F401
