"""Re-export for nnU-Net's trainer lookup (``nnUNet_extTrainer`` = this folder). nnU-Net imports
every module of this folder under a top-level name, so this folder holds only this tiny module;
the classes live in the installed package :mod:`nnunet_ima_trainers` (so pickling works).

Importing it (nnU-Net's lookup, in ``nnUNetv2_train``, ``nnUNetv2_predict`` and every ``-num_gpus``
worker) also installs the hook that prints an uncaught settings error as one line
(:func:`nnunet_ima_trainers.install_config_error_hook`): those commands catch nothing themselves."""
from nnunet_ima_trainers import TRAINERS, install_config_error_hook

globals().update(TRAINERS)
install_config_error_hook()
