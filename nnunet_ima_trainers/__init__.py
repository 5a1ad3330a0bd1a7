"""nnU-Net v2 trainers for robust segmentation: ``nnUNetTrainerIMA``, ``nnUNetTrainerSAT`` and the
plain ``nnUNetTrainerSTD``, with length variants (e.g. ``nnUNetTrainerIMA_50epochs_50iters``).

They run with the real ``nnUNetv2_train`` / ``nnUNetv2_predict`` once nnU-Net can find them::

    eval "$(nnunet-ima-env)"        # export nnUNet_extTrainer=<this package>/ext
    nnUNetv2_train 4 2d 0 -tr nnUNetTrainerIMA

or without the variable through ``nnunet-ima-train`` / ``nnunet-ima-predict`` (same arguments), or
from Python after :func:`register_ext_trainers`. Settings: NNUNET_IMA_* variables or a JSON file,
see :mod:`nnunet_ima_trainers.config`.

Importing this package is cheap: the trainers (torch, nnU-Net) load on first use of a trainer name,
``TRAINERS``, ``ConfigError``, ``IMAConfig`` or ``load_config``; it leaves ``sys.excepthook`` alone.
The module nnU-Net's trainer lookup imports from the ext folder (``nnUNet_extTrainer``) installs
:func:`install_config_error_hook`: inside the real ``nnUNetv2_train`` / ``nnUNetv2_predict``, which
catch nothing, an uncaught :class:`~nnunet_ima_trainers.config.ConfigError` then prints as one line
``<program>: error: <message>`` on stderr without a traceback (exit status 1); every other exception
prints as before. ``nnunet-ima-train`` catches the error itself (exit status 2).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

EXT_DIR = str(Path(__file__).resolve().parent / "ext")   # nnU-Net's trainer lookup folder (re-export module)
EXT_VAR = "nnUNet_extTrainer"

_LAZY = {"nnUNetTrainerSTD": "base", "nnUNetTrainerSAT": "adversarial", "nnUNetTrainerIMA": "adversarial",
         "ConfigError": "config", "IMAConfig": "config", "load_config": "config",
         "SampleKeyDataLoader": "data", "slice_key": "data"}
_PUBLIC = ["nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA", "TRAINERS", "ConfigError", "IMAConfig",
           "load_config", "SampleKeyDataLoader", "slice_key", "register_ext_trainers", "ext_trainer_path", "EXT_DIR"]


def ext_trainer_path(existing: str | None = None) -> str:
    """``nnUNet_extTrainer`` value: this package's ext folder first, then the other folders of
    ``existing`` (an ``os.pathsep``-separated value, e.g. the variable's current one) in their order."""
    others = [p for p in (existing or "").split(os.pathsep) if p.strip() and os.path.abspath(p) != EXT_DIR]
    return os.pathsep.join([EXT_DIR, *others])


def register_ext_trainers() -> str:
    """Let nnU-Net's trainer lookup (training, ``nnUNetPredictor``) find this package's trainers:
    puts the ext folder first in ``os.environ["nnUNet_extTrainer"]``, keeping any other folders.
    Idempotent. Returns the new value."""
    value = ext_trainer_path(os.environ.get(EXT_VAR))
    os.environ[EXT_VAR] = value
    return value


def _trainers() -> dict:
    variants = importlib.import_module(".variants", __name__)
    return {name: cls for name, cls in vars(variants).items() if name.startswith("nnUNetTrainer")}


def __getattr__(name: str):
    """Load the trainers and settings on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name == "TRAINERS":
        value = _trainers()
    elif name.startswith("nnUNetTrainer") and name in _trainers():
        value = _trainers()[name]
    elif name == "__all__":
        value = [*_PUBLIC, *(n for n in _trainers() if n not in _PUBLIC)]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def _config_error_hook(previous):
    """A ``sys.excepthook`` that prints an uncaught ConfigError as ``<program>: error: <message>``
    (:func:`nnunet_ima.ui.report_error`) and hands every other exception to ``previous``."""
    def hook(exc_type, exc, tb):
        config = sys.modules.get(__name__ + ".config")  # not imported: the exception cannot be a ConfigError
        if config is not None and isinstance(exc_type, type) and issubclass(exc_type, config.ConfigError):
            from nnunet_ima.ui.errors import report_error

            report_error(os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", exc)
        else:
            previous(exc_type, exc, tb)

    hook.nnunet_ima_config_errors = True
    return hook


def install_config_error_hook() -> None:
    """Install :func:`_config_error_hook` once, in front of the current ``sys.excepthook``. Called by
    the ext folder's module, i.e. in the processes whose trainer lookup nnU-Net runs (training,
    prediction, each ``-num_gpus`` worker); never on a plain ``import nnunet_ima_trainers``."""
    if not getattr(sys.excepthook, "nnunet_ima_config_errors", False):
        sys.excepthook = _config_error_hook(sys.excepthook)
