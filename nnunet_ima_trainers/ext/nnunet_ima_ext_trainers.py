"""Re-export for nnU-Net's trainer lookup (``nnUNet_extTrainer`` = this folder). nnU-Net imports
every module of this folder under a top-level name, so this folder holds only this tiny module;
the classes live in the installed package :mod:`nnunet_ima_trainers` (so pickling works)."""
from nnunet_ima_trainers import TRAINERS

globals().update(TRAINERS)
