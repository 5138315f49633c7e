"""Folder named by ``nnUNet_extTrainer``: nnU-Net imports its modules to find our trainer class by name."""
