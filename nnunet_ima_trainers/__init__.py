"""nnU-Net v2 trainers for robust segmentation: ``nnUNetTrainerIMA``, ``nnUNetTrainerSAT`` and the
plain ``nnUNetTrainerSTD``, with length variants (e.g. ``nnUNetTrainerIMA_50epochs_50iters``).

They run with the real ``nnUNetv2_train`` / ``nnUNetv2_predict`` once nnU-Net can find them::

    eval "$(nnunet-ima-env)"        # export nnUNet_extTrainer=<this package>/ext
    nnUNetv2_train 4 2d 0 -tr nnUNetTrainerIMA

or without the variable through ``nnunet-ima-train`` / ``nnunet-ima-predict`` (same arguments).
Settings: NNUNET_IMA_* variables or a JSON file, see :mod:`nnunet_ima_trainers.config`.
"""
from . import variants
from .adversarial import nnUNetTrainerIMA, nnUNetTrainerSAT
from .base import nnUNetTrainerSTD
from .config import ConfigError, IMAConfig, load_config
from .data import SampleKeyDataLoader, slice_key

TRAINERS = {name: cls for name, cls in vars(variants).items() if name.startswith("nnUNetTrainer")}
globals().update(TRAINERS)

__all__ = ["nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA", "TRAINERS", "ConfigError", "IMAConfig",
           "load_config", "SampleKeyDataLoader", "slice_key", *TRAINERS]
