"""Console scripts: nnU-Net's own ``nnUNetv2_train`` / ``nnUNetv2_predict`` with this project's
trainers findable, and a helper that prints the ``nnUNet_extTrainer`` line for a shell.

    nnunet-ima-train 4 2d 0 -tr nnUNetTrainerIMA        # = nnUNetv2_train, same arguments
    nnunet-ima-predict -i in -o out -d 4 -c 2d -f 0 -tr nnUNetTrainerIMA
    eval "$(nnunet-ima-env)"                            # then plain nnUNetv2_train / _predict work
"""
from __future__ import annotations

import os
import shlex
import sys

from . import EXT_DIR, EXT_VAR as VAR, ext_trainer_path, register_ext_trainers

__all__ = ["EXT_DIR", "VAR", "ext_trainer_path", "register_ext_trainers", "config_error_message", "train_entry",
           "predict_entry", "print_env"]


PROGRAM = "nnunet-ima-train"


def train_entry() -> None:
    """``nnUNetv2_train`` with the IMA trainers registered; a settings error prints one line
    ``nnunet-ima-train: error: ...`` and exits 2, also when it was raised in a ``-num_gpus`` worker process."""
    register_ext_trainers()
    from nnunetv2.run.run_training import run_training_entry

    from nnunet_ima.ui.errors import report_error  # here, not at the top: nnunet-ima-env stays torch-free

    try:
        run_training_entry()
    except Exception as e:
        message = config_error_message(e)
        if message is None:
            raise
        sys.exit(report_error(PROGRAM, message))


def config_error_message(exc: BaseException) -> str | None:
    """The message of the :class:`~nnunet_ima_trainers.config.ConfigError` ``exc`` is or carries, else
    None. ``-num_gpus N`` trains in worker processes; torch's ``ProcessRaisedException`` brings a
    worker's error back only as traceback text, whose last ``...ConfigError: <message>`` line is used."""
    from torch.multiprocessing import ProcessRaisedException

    from .config import ConfigError

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, ProcessRaisedException):
        prefix = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "
        lines = [line for line in str(exc).splitlines() if line.startswith(prefix)]
        return lines[-1][len(prefix):] if lines else None
    return None


def predict_entry() -> None:
    """``nnUNetv2_predict`` with the IMA trainers registered."""
    register_ext_trainers()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    predict_entry_point()


def print_env() -> None:
    """Print ``export nnUNet_extTrainer=...`` (use: ``eval "$(nnunet-ima-env)"``)."""
    print(f"export {VAR}={shlex.quote(ext_trainer_path(os.environ.get(VAR)))}")
