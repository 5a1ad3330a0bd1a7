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
from pathlib import Path

EXT_DIR = str(Path(__file__).resolve().parent / "ext")
VAR = "nnUNet_extTrainer"


def ext_trainer_path(existing: str | None = None) -> str:
    """``nnUNet_extTrainer`` value: this package's ext folder first, then any folders already set."""
    others = [p for p in (existing or "").split(os.pathsep) if p.strip() and os.path.abspath(p) != EXT_DIR]
    return os.pathsep.join([EXT_DIR, *others])


def _register() -> None:
    os.environ[VAR] = ext_trainer_path(os.environ.get(VAR))


def train_entry() -> None:
    """``nnUNetv2_train`` with the IMA trainers registered; settings errors print one line, exit 2."""
    from .config import ConfigError

    _register()
    from nnunetv2.run.run_training import run_training_entry

    try:
        run_training_entry()
    except ConfigError as e:
        print(f"nnunet-ima-train: {e}", file=sys.stderr)
        sys.exit(2)


def predict_entry() -> None:
    """``nnUNetv2_predict`` with the IMA trainers registered."""
    _register()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    predict_entry_point()


def print_env() -> None:
    """Print ``export nnUNet_extTrainer=...`` (use: ``eval "$(nnunet-ima-env)"``)."""
    print(f"export {VAR}={shlex.quote(ext_trainer_path(os.environ.get(VAR)))}")
